//! `loft-vmm`: the event loop. Serves the network and vsock devices' queues and backends (TAP
//! devices, vsock's Unix sockets), the console's input, stop requests and snapshot requests
//! (which flush the disks and write the snapshot's files); kicks and at the end stops the vCPU
//! threads and the disks' threads, which it started before confining itself.

use super::ioctls::*;
use super::{Only, Syscall};

const IOCTLS: &[Ioctl] = &[
    // Accepted vsock streams are made non-blocking.
    FIONBIO,
    // A snapshot saves the VM's interrupt controllers and clock, and this host's facts.
    KVM_GET_IRQCHIP,
    KVM_GET_PIT2,
    KVM_GET_CLOCK,
    KVM_CHECK_EXTENSION,
    KVM_GET_SUPPORTED_CPUID,
];

pub(super) fn syscalls() -> Vec<Syscall> {
    let any = |nr, name, why| Syscall::new(nr, name, Only::Any, why);
    vec![
        // The event loop.
        any(libc::SYS_epoll_wait, "epoll_wait", "the event loop waits"),
        any(
            libc::SYS_epoll_pwait,
            "epoll_pwait",
            "the event loop waits (C libraries that implement epoll_wait with it)",
        ),
        any(
            libc::SYS_epoll_ctl,
            "epoll_ctl",
            "devices and vsock streams are watched and unwatched",
        ),
        any(
            libc::SYS_read,
            "read",
            "eventfds, timerfds, TAP devices, the console's input, snapshot state files",
        ),
        any(
            libc::SYS_close,
            "close",
            "vsock streams, snapshot files, and every fd of the VM at the end",
        ),
        Syscall::new(
            libc::SYS_fcntl,
            "fcntl",
            super::CHECK_FD_OPEN,
            "the Rust standard library checks that an fd is open before it closes it (debug builds)",
        ),
        any(
            libc::SYS_timerfd_settime,
            "timerfd_settime",
            "vsock connection deadlines, the console input's retry",
        ),
        // Disks (their requests run on their own `loft-blkN` threads).
        any(
            libc::SYS_pwrite64,
            "pwrite64",
            "the snapshot's memory file",
        ),
        any(
            libc::SYS_fdatasync,
            "fdatasync",
            "the disks, flushed before a snapshot",
        ),
        // vsock.
        any(
            libc::SYS_accept4,
            "accept4",
            "host connections on the vsock device's socket",
        ),
        Syscall::unix_socket("guest connections to a host port: a Unix socket to `<uds>_<port>`"),
        any(
            libc::SYS_connect,
            "connect",
            "guest connections to a host port",
        ),
        any(libc::SYS_recvfrom, "recvfrom", "vsock streams' data"),
        any(libc::SYS_sendto, "sendto", "vsock streams' data"),
        any(libc::SYS_shutdown, "shutdown", "vsock streams' half-close"),
        any(libc::SYS_poll, "poll", "a vsock stream's hang-up check"),
        Syscall::new(
            libc::SYS_ioctl,
            "ioctl",
            Only::Ioctls(IOCTLS),
            "non-blocking vsock streams; the VM's state for a snapshot",
        ),
        // Snapshots.
        any(
            libc::SYS_openat,
            "openat",
            "snapshot files; /proc/cpuinfo and /sys for this host's facts",
        ),
        any(
            libc::SYS_mkdir,
            "mkdir",
            "the snapshot directory, created when missing",
        ),
        any(
            libc::SYS_statx,
            "statx",
            "snapshot files' sizes, this host's KVM module, the vsock socket file at the end",
        ),
        any(
            libc::SYS_newfstatat,
            "newfstatat",
            "as statx, where the C library or a container refuses statx",
        ),
        any(
            libc::SYS_ftruncate,
            "ftruncate",
            "the snapshot's memory file to the guest memory's size",
        ),
        any(
            libc::SYS_fsync,
            "fsync",
            "snapshot files before they are renamed into place",
        ),
        any(libc::SYS_rename, "rename", "snapshot files into place"),
        any(
            libc::SYS_unlink,
            "unlink",
            "a snapshot's temporary file after a failure; the vsock socket file at the end",
        ),
        // The vCPU threads.
        any(
            libc::SYS_tgkill,
            "tgkill",
            "kicks a vCPU thread out of KVM_RUN (pause, stop)",
        ),
        any(
            libc::SYS_getpid,
            "getpid",
            "pthread_kill's tgkill names this process",
        ),
        any(
            libc::SYS_clock_nanosleep,
            "clock_nanosleep",
            "waits between kicks while the vCPU threads stop",
        ),
    ]
}
