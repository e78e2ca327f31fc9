//! Restore → first guest byte: `loft run --restore DIR` (or a Firecracker snapshot load) of a
//! guest snapshotted while it printed `tick N` lines in a loop, timed to the first byte and the
//! first `tick ` on stdout, then stopped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::firecracker::{self, FcSnapshot};
use crate::host::show;
use crate::measure::{self, Options};
use crate::report::FirstByteRun;
use crate::tick::TICK;
use crate::timer;

/// Something restoring a ticking guest.
pub enum Target {
    Loft {
        name: String,
        dir: PathBuf,
    },
    Firecracker {
        name: String,
        fc: PathBuf,
        snap: FcSnapshot,
    },
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::Loft { name, .. } | Target::Firecracker { name, .. } => name,
        }
    }

    /// The command of one run, and what [`measure::run_with`] must do besides timing it.
    pub fn prepare(&self, loft: &Path, work: &Path, round: usize) -> (Command, Options) {
        match self {
            Target::Loft { dir, .. } => {
                let mut cmd = Command::new(loft);
                cmd.args(["run", "--boot-timer", "--restore"]).arg(dir);
                let opts = Options {
                    // loft stops the guest and prints its boot-timer line on SIGTERM
                    signal_at_marker: Some(libc::SIGTERM),
                    ..Options::default()
                };
                (cmd, opts)
            }
            Target::Firecracker { fc, snap, .. } => {
                let sock = work.join(format!("fc-load-{round}.sock"));
                let (cmd, hook) = firecracker::load(fc, snap, &sock);
                let opts = Options {
                    stdin_pipe: true,
                    signal_at_marker: Some(libc::SIGKILL),
                    on_spawn: Some(hook),
                    ..Options::default()
                };
                (cmd, opts)
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One run of `target`; its output goes to `out_dir/logs/`.
pub fn run(
    target: &Target,
    loft: &Path,
    work: &Path,
    round: usize,
    timeout: Duration,
    out_dir: &Path,
) -> FirstByteRun {
    let (cmd, opts) = target.prepare(loft, work, round);
    let shown = show(&cmd);
    let is_loft = matches!(target, Target::Loft { .. });
    let o = measure::run_with(cmd, &[TICK], timeout, opts);
    if let Target::Firecracker { .. } = target {
        let _ = std::fs::remove_file(work.join(format!("fc-load-{round}.sock")));
    }
    let tick = o.marks[0];
    let stderr = String::from_utf8_lossy(&o.stderr);
    let last = |text: &str| text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    let error = if let Some(e) = o.spawn_error {
        Some(e)
    } else if let Some(e) = o.hook_error {
        Some(format!("snapshot load failed: {e}"))
    } else if o.timed_out {
        Some(format!(
            "timed out after {} s {}",
            timeout.as_secs_f64(),
            if tick.is_some() {
                "after the tick"
            } else {
                "without a tick"
            }
        ))
    } else if tick.is_none() {
        Some(format!(
            "no {TICK:?} on stdout ({}); stderr: {}",
            o.status.as_deref().unwrap_or("?"),
            last(&stderr)
        ))
    } else if is_loft && !o.success {
        // loft exits 0 after the SIGTERM; Firecracker gets a SIGKILL
        Some(format!(
            "{} after the SIGTERM; stderr: {}",
            o.status.as_deref().unwrap_or("?"),
            last(&stderr)
        ))
    } else {
        None
    };
    let rel = format!("logs/{}-{round}.log", target.name());
    let mut log = format!("$ {shown}\n# status: {:?}\n==== stdout\n", o.status).into_bytes();
    log.extend_from_slice(&o.stdout);
    log.extend_from_slice(b"\n==== stderr\n");
    log.extend_from_slice(&o.stderr);
    let log = std::fs::write(out_dir.join(&rel), log).ok().map(|()| rel);
    let first: Vec<u8> = o.stdout.iter().copied().take(24).collect();
    FirstByteRun {
        runner: target.name().to_string(),
        round,
        ok: error.is_none(),
        first_byte_ms: o.first_byte.map(ms),
        tick_ms: tick.map(ms),
        exit_ms: o.exit.map(ms),
        hwm_at_tick_kib: o.hwm_at_marker_kib,
        cpu_ms: o.cpu.map(ms),
        first_output: String::from_utf8_lossy(&first).into_owned(),
        boot_timer: if is_loft { timer::parse(&stderr) } else { None },
        status: o.status,
        error,
        log,
    }
}
