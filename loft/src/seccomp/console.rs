//! `loft-console`: drains the guest's console output into the host's writer (stdout for
//! `loft run`, or the embedder's writer or callback).

use super::{Only, Syscall};

pub(super) fn syscalls() -> Vec<Syscall> {
    vec![
        Syscall::new(
            libc::SYS_close,
            "close",
            Only::Any,
            "the writer, dropped at the end (a file, say)",
        ),
        Syscall::new(
            libc::SYS_fcntl,
            "fcntl",
            super::CHECK_FD_OPEN,
            "the Rust standard library checks that an fd is open before it closes it (debug builds)",
        ),
    ]
}
