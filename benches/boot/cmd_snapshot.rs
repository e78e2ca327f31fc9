//! The snapshot loft-restore-cmd restores: made once before the runs with `loft snapshot
//! create` (a cold boot until the guest agent answers, then the save), timed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::host::show;
use crate::measure;
use crate::report::CmdSnapshot;
use crate::runners::Setup;
use crate::vm::GUEST_MEM_MIB;

/// `loft snapshot create DIR` with the guest, memory and kernel the loft-cold-cmd runner boots;
/// its output goes to `log`. Returns what happened, and the directory when it worked.
pub fn create(
    s: &Setup,
    dir: &Path,
    timeout: Duration,
    log: &Path,
) -> (CmdSnapshot, Result<PathBuf, String>) {
    let _ = std::fs::remove_dir_all(dir);
    let mut cmd = Command::new(&s.loft);
    cmd.args(["snapshot", "create"])
        .arg(dir)
        .arg("--kernel")
        .arg(&s.vmlinux)
        .arg("--initrd")
        .arg(&s.initrd)
        .arg("--memory")
        .arg(format!("{GUEST_MEM_MIB}M"));
    let command = show(&cmd);
    eprintln!("boot bench: making loft-restore-cmd's snapshot: {command}");
    let o = measure::run(cmd, &[], timeout, false, false);
    let mut text = format!("$ {command}\n# status: {:?}\n==== stdout\n", o.status).into_bytes();
    text.extend_from_slice(&o.stdout);
    text.extend_from_slice(b"\n==== stderr\n");
    text.extend_from_slice(&o.stderr);
    let _ = std::fs::write(log, text);

    let memory = std::fs::metadata(dir.join("memory")).ok();
    let error = if let Some(e) = o.spawn_error {
        Some(e)
    } else if o.timed_out {
        Some(format!("timed out after {} s", timeout.as_secs_f64()))
    } else if !o.success {
        let err = String::from_utf8_lossy(&o.stderr);
        Some(format!(
            "{}: {}",
            o.status.as_deref().unwrap_or("?"),
            err.lines().last().unwrap_or("").trim()
        ))
    } else if memory.is_none() || !dir.join("state").is_file() {
        Some(format!("no memory and state files in {}", dir.display()))
    } else {
        None
    };
    let info = CmdSnapshot {
        command,
        ok: error.is_none(),
        create_ms: o.exit.map(|d| d.as_secs_f64() * 1e3),
        memory_bytes: memory.as_ref().map(|m| m.len()),
        memory_on_disk_bytes: memory.as_ref().map(|m| m.blocks() * 512),
        error: error.clone(),
    };
    let result = match error {
        None => Ok(dir.to_path_buf()),
        Some(e) => Err(format!("no snapshot to restore: {e}")),
    };
    (info, result)
}
