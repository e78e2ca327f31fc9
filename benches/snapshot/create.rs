//! Creating snapshots through the library: a cold boot until the guest agent answers, then
//! timed `VmHandle::snapshot` calls (the VM runs on) and one timed `snapshot_and_stop`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use loft::{MemSize, VmBuilder};

use crate::report::Create;

/// A guest memory size, as given and in bytes.
#[derive(Clone, Debug)]
pub struct Size {
    pub label: String,
    pub bytes: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Boots the guest in `guest_dir` with `size` of RAM, waits for its agent (at most `timeout`),
/// snapshots it `repeats` times into `dir` while it runs, then once more with
/// `snapshot_and_stop`. `dir` then holds an agent-ready snapshot.
pub fn create(
    guest_dir: &Path,
    size: &Size,
    dir: &Path,
    repeats: usize,
    timeout: Duration,
) -> Create {
    let mut c = Create {
        memory: size.label.clone(),
        memory_bytes: size.bytes,
        ..Create::default()
    };
    let _ = std::fs::remove_dir_all(dir);
    let result = (|| -> Result<(), loft::Error> {
        let t0 = Instant::now();
        let vm = VmBuilder::new()
            .guest_dir(guest_dir)
            .memory(MemSize(size.bytes))
            .agent_timeout(timeout)
            .start()?;
        vm.wait_for_agent()?;
        c.boot_to_agent_ms = Some(ms(t0.elapsed()));
        for i in 0..repeats {
            let t = Instant::now();
            vm.snapshot(dir)?;
            let took = ms(t.elapsed());
            eprintln!(
                "snapshot bench: {} snapshot() {}/{repeats}: {took:.1} ms",
                size.label,
                i + 1
            );
            c.snapshot_ms.push(took);
        }
        let t = Instant::now();
        vm.snapshot_and_stop(dir)?;
        c.snapshot_and_stop_ms = Some(ms(t.elapsed()));
        Ok(())
    })();
    match result {
        Ok(()) => {
            let mem = std::fs::metadata(dir.join("memory")).ok();
            c.memory_file_bytes = mem.as_ref().map(|m| m.len());
            c.memory_on_disk_bytes = mem.as_ref().map(|m| m.blocks() * 512);
            c.state_file_bytes = std::fs::metadata(dir.join("state")).ok().map(|m| m.len());
            c.ok = true;
        }
        Err(e) => c.error = Some(loft::error::chain(&e)),
    }
    c
}
