//! The ticking guest the first-byte step restores: a loop printing `tick N` lines, snapshotted
//! by `loft snapshot create --when-console` at its first line, so that a restored copy prints
//! as soon as it runs again.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::create::Size;
use crate::host::show;
use crate::measure;
use crate::on_disk;
use crate::report::Setup;

/// The guest's command: a line per loop, no process started (echo is a builtin).
pub const TICK_CMD: &str = "i=0; while true; do i=$((i+1)); echo tick $i; done";
/// What `loft snapshot create --when-console` waits for: the first line. (Not `tick` alone:
/// the kernel echoes its command line, `echo tick $i` included, long before user space.)
pub const TICK_MARKER: &str = "tick 1";
/// What a restored guest prints first (after the rest of a line it was cut in).
pub const TICK: &str = "tick ";

/// `loft snapshot create DIR` of the ticking guest with `size` of RAM, timed.
pub fn snapshot(
    loft: &Path,
    gdir: &Path,
    size: &Size,
    dir: &Path,
    timeout: Duration,
    log: &Path,
) -> Setup {
    let _ = std::fs::remove_dir_all(dir);
    let mut cmd = Command::new(loft);
    cmd.args(["snapshot", "create"])
        .arg(dir)
        .arg("--kernel")
        .arg(gdir.join("vmlinux"))
        .arg("--initrd")
        .arg(gdir.join("initramfs.cpio"))
        .arg("--memory")
        .arg(&size.label)
        .arg("--cmdline")
        .arg(format!("guest_cmd=\"{TICK_CMD}\""))
        .arg("--when-console")
        .arg(TICK_MARKER);
    let command = show(&cmd);
    eprintln!("snapshot bench: {command}");
    let o = measure::run(cmd, &[], timeout, false, false);
    let mut text = format!("$ {command}\n# status: {:?}\n==== stdout\n", o.status).into_bytes();
    text.extend_from_slice(&o.stdout);
    text.extend_from_slice(b"\n==== stderr\n");
    text.extend_from_slice(&o.stderr);
    let _ = std::fs::write(log, text);
    let error = if let Some(e) = o.spawn_error {
        Some(e)
    } else if o.timed_out {
        Some(format!("timed out after {} s", timeout.as_secs_f64()))
    } else if !o.success || !dir.join("state").is_file() {
        Some(format!(
            "{}: {}",
            o.status.as_deref().unwrap_or("?"),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ))
    } else {
        None
    };
    Setup {
        name: format!("loft-{} snapshot", size.label),
        command,
        ok: error.is_none(),
        create_ms: o.exit.map(|d| d.as_secs_f64() * 1e3),
        memory_on_disk_bytes: on_disk(&dir.join("memory")),
        error,
    }
}
