//! `loft --api-sock PATH` (wait for a VM to be configured and started over the control API) and
//! `loft run --api-sock PATH` (boot as usual and also serve it): the command-line side of
//! `loft::api`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use loft::api::ApiServer;
use loft::{StopReason, VmBuilder, VmHandle};

use crate::{install_terminate_handlers, INTERRUPTED};

/// Creates the API socket and starts its thread.
pub fn bind(path: &Path, seccomp: bool) -> Result<ApiServer, loft::Error> {
    Ok(ApiServer::bind(path, seccomp)?)
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Acquire)
}

/// `loft run --api-sock`: serves the API while `vm` runs; returns it and why it stopped.
pub fn serve_running(
    server: &ApiServer,
    vm: VmHandle,
) -> (VmHandle, Result<StopReason, loft::Error>) {
    install_terminate_handlers();
    let mut slot = Some(vm);
    let result = server.serve(&mut slot, &mut VmBuilder::new, &interrupted);
    let vm = slot.expect("serve keeps the running VM in its slot");
    let result = result.map(|r| r.unwrap_or(StopReason::Stopped));
    if let Ok(reason) = &result {
        tell_parent(reason);
    }
    (vm, result)
}

/// For the library's process mode (`loft::VmBuilder::isolated`, `loft::isolated`): writes why
/// the VM stopped, in [`StopReason`]'s `Debug` form, to the pipe the parent passed down and
/// named in `LOFT_STOP_FD`. Nothing when there is none (a descriptor that is not a pipe is
/// left alone).
fn tell_parent(reason: &StopReason) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let Some(fd) = std::env::var("LOFT_STOP_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .filter(|fd| *fd > 2)
    else {
        return;
    };
    // SAFETY: fstat writes into the zeroed stat it is given.
    let is_pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if !is_pipe {
        return;
    }
    // SAFETY: an open pipe descriptor inherited for this purpose, used by nothing else in loft;
    // the File closes it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = writeln!(pipe, "{reason:?}");
}

/// `loft --api-sock PATH`: no VM until the API starts (or loads) one; the guest's console on
/// stdout. Exits as `loft run` does once that VM stops, or with 0 on SIGTERM before any.
pub fn serve_only(path: &Path, started: Instant, report: fn(&dyn std::error::Error)) -> ExitCode {
    let server = match bind(path, true) {
        Ok(s) => s,
        Err(e) => {
            report(&e);
            return ExitCode::FAILURE;
        }
    };
    install_terminate_handlers();
    let mut vm = None;
    let mut new_vm = || {
        VmBuilder::new()
            .times_from(started)
            .console_writer(std::io::stdout())
    };
    let result = server.serve(&mut vm, &mut new_vm, &interrupted);
    drop(server);
    let dropped = vm.as_ref().map_or(0, |vm| vm.console_bytes_dropped());
    if dropped > 0 {
        eprintln!(
            "loft: {dropped} bytes of guest console output were dropped: stdout did not keep up"
        );
    }
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(reason)) if reason.is_clean() => ExitCode::SUCCESS,
        Ok(Some(reason)) => {
            eprintln!("loft: error: {reason}");
            ExitCode::FAILURE
        }
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}
