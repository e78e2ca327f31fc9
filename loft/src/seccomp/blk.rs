//! `loft-blkN`: serves one disk's virtio queue (see `loft_devices::virtio::block::worker`):
//! waits on the queue's notification and its control eventfd, reads and writes the disk image
//! (opened before) and guest memory, and interrupts the guest through the device's irqfd.

use super::{Only, Syscall};

pub(super) fn syscalls() -> Vec<Syscall> {
    let any = |nr, name, why| Syscall::new(nr, name, Only::Any, why);
    vec![
        any(
            libc::SYS_poll,
            "poll",
            "waits for a queue notification or a word from the VMM (pause, resume, stop)",
        ),
        any(
            libc::SYS_ppoll,
            "ppoll",
            "waits, as poll (C libraries that implement poll with it)",
        ),
        any(
            libc::SYS_restart_syscall,
            "restart_syscall",
            "resumes the wait after the process was stopped and continued (SIGSTOP, a debugger)",
        ),
        any(
            libc::SYS_read,
            "read",
            "the queue's notification eventfd and the worker's control eventfd",
        ),
        any(
            libc::SYS_pread64,
            "pread64",
            "virtio-blk reads from the disk image",
        ),
        any(
            libc::SYS_pwrite64,
            "pwrite64",
            "virtio-blk writes to the disk image",
        ),
        any(libc::SYS_fdatasync, "fdatasync", "virtio-blk FLUSH"),
        any(
            libc::SYS_close,
            "close",
            "the device's image and eventfds, when the worker holds the last reference at the end",
        ),
        Syscall::new(
            libc::SYS_fcntl,
            "fcntl",
            super::CHECK_FD_OPEN,
            "the Rust standard library checks that an fd is open before it closes it (debug builds)",
        ),
    ]
}
