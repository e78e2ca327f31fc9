//! `loft-load`: copies the kernel or the initramfs, opened before, into guest memory while the
//! VM is created.

use super::{Only, Syscall};

pub(super) fn syscalls() -> Vec<Syscall> {
    vec![
        Syscall::new(
            libc::SYS_read,
            "read",
            Only::Any,
            "the kernel and initramfs files, into guest memory",
        ),
        Syscall::new(
            libc::SYS_lseek,
            "lseek",
            Only::Any,
            "the kernel's headers and segments; the initramfs from its start",
        ),
    ]
}
