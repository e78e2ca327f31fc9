//! The `loft` command's signal watcher: polls a flag that its SIGTERM/SIGINT/SIGHUP handler sets,
//! and stops the VM through its handle ([`crate::VmHandle::stop`]).

use super::{Only, Syscall};

pub(super) fn syscalls() -> Vec<Syscall> {
    vec![Syscall::new(
        libc::SYS_clock_nanosleep,
        "clock_nanosleep",
        Only::Any,
        "sleeps between looks at the flag",
    )]
}
