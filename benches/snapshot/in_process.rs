//! Restoring in the bench's own process: `Snapshot::open`, `VmBuilder::restore_from(..).start()`,
//! `wait_for_agent` (the agent answers and the guest's clock and entropy are synced), the first
//! `exec(["true"])`, a second one, then `kill`, each timed.

use std::path::Path;
use std::time::{Duration, Instant};

use loft::{ExecRequest, ExitStatus, Snapshot, VmBuilder};

use crate::report::InProcessRun;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One restore of the agent-ready snapshot in `dir` (`label` names its memory size).
pub fn run(label: &str, dir: &Path, round: usize, timeout: Duration) -> InProcessRun {
    let mut r = InProcessRun {
        memory: label.to_string(),
        round,
        ..InProcessRun::default()
    };
    let result = (|| -> Result<(), String> {
        let t0 = Instant::now();
        let snapshot = Snapshot::open(dir).map_err(|e| loft::error::chain(&e))?;
        let t1 = Instant::now();
        let vm = VmBuilder::new()
            .agent_timeout(timeout)
            .restore_from(snapshot)
            .start()
            .map_err(|e| loft::error::chain(&e))?;
        let t2 = Instant::now();
        let synced = vm.wait_for_agent();
        let t2b = Instant::now();
        let out = synced.and_then(|()| vm.exec(&ExecRequest::new(["true"])));
        let t3 = Instant::now();
        // the same again in the now warm guest: what a command costs once the restore's first
        // touches are paid
        let again = out.is_ok().then(|| vm.exec(&ExecRequest::new(["true"])));
        let t4 = Instant::now();
        let times = vm.boot_times();
        r.open_ms = Some(ms(t1 - t0));
        r.start_ms = Some(ms(t2 - t1));
        r.restored_ms = times.restored.map(|m| ms(m.wall));
        r.first_entry_ms = times.first_entry.map(|m| ms(m.wall));
        let killed = vm.kill();
        r.kill_ms = Some(ms(t4.elapsed()));
        let out = out.map_err(|e| format!("exec: {}", loft::error::chain(&e)))?;
        if !matches!(out.status, ExitStatus::Code(0)) {
            return Err(format!("`true` ended with {:?}", out.status));
        }
        killed.map_err(|e| format!("kill: {}", loft::error::chain(&e)))?;
        if let Some(again) = again {
            let again = again.map_err(|e| format!("second exec: {}", loft::error::chain(&e)))?;
            if !matches!(again.status, ExitStatus::Code(0)) {
                return Err(format!("the second `true` ended with {:?}", again.status));
            }
            r.second_exec_ms = Some(ms(t4 - t3));
        }
        r.sync_ms = Some(ms(t2b - t2));
        r.exec_ms = Some(ms(t3 - t2b));
        r.total_ms = Some(ms(t3 - t0));
        Ok(())
    })();
    r.ok = result.is_ok();
    r.error = result.err();
    r
}
