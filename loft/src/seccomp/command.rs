//! The `loft` command's main thread once its VM runs: it waits for the VM, copies the files of
//! `--copy-in` into the guest, runs `-- CMD` through the guest agent (the agent's frames come
//! from the guest: this thread parses hostile input), streams the command's output to stdout and
//! stderr and, with `-i`, loft's stdin to the command, copies the files of `--copy-out` out,
//! puts the user's terminal in raw mode for `-t` and restores it, and at the end removes the
//! VM's private socket directory. It starts no thread; it opens the files the user named and that
//! directory; its only sockets are Unix ones to the VM's own vsock socket.

use super::{ioctls, Only, Syscall};

pub(super) fn syscalls() -> Vec<Syscall> {
    let any = |nr, name, why| Syscall::new(nr, name, Only::Any, why);
    vec![
        Syscall::unix_socket("a connection to the guest agent through the VM's vsock socket"),
        any(libc::SYS_connect, "connect", "to the VM's vsock socket"),
        any(
            libc::SYS_sendto,
            "sendto",
            "requests to the agent (the standard library writes sockets with send)",
        ),
        any(
            libc::SYS_recvfrom,
            "recvfrom",
            "the agent's answers (the standard library reads sockets with recv)",
        ),
        any(
            libc::SYS_read,
            "read",
            "reads on the agent's stream, from stdin (-i) and from --copy-in files",
        ),
        any(
            libc::SYS_setsockopt,
            "setsockopt",
            "deadlines on the agent's stream (SO_RCVTIMEO, SO_SNDTIMEO)",
        ),
        any(libc::SYS_shutdown, "shutdown", "ends the command's stdin"),
        any(
            libc::SYS_poll,
            "poll",
            "waits on the agent's stream, and on it and stdin at once (-i)",
        ),
        any(
            libc::SYS_close,
            "close",
            "agent streams; the VM's eventfds when its handle is dropped",
        ),
        any(
            libc::SYS_fcntl,
            "fcntl",
            "F_GETFD before a close (debug builds); F_GETFL and F_SETFD while removing the \
             socket directory",
        ),
        any(
            libc::SYS_clock_nanosleep,
            "clock_nanosleep",
            "waits between attempts to reach the agent, and between looks at the console",
        ),
        any(
            libc::SYS_sched_yield,
            "sched_yield",
            "the standard library's channels and locks back off",
        ),
        Syscall::new(
            libc::SYS_ioctl,
            "ioctl",
            Only::Ioctls(&[
                ioctls::TCGETS,
                ioctls::TCSETS,
                ioctls::TCSETSW,
                ioctls::TCSETSF,
                ioctls::TIOCGWINSZ,
            ]),
            "puts the user's terminal in raw mode for -t and restores it; its size for -t",
        ),
        any(
            libc::SYS_openat,
            "openat",
            "--copy-in and --copy-out files; the VM's private socket directory, to remove it",
        ),
        any(
            libc::SYS_getdents64,
            "getdents64",
            "lists the private socket directory while removing it",
        ),
        any(
            libc::SYS_newfstatat,
            "newfstatat",
            "the private socket directory while removing it",
        ),
        any(
            libc::SYS_statx,
            "statx",
            "the private socket directory while removing it",
        ),
        any(
            libc::SYS_unlink,
            "unlink",
            "removes a --copy-out file whose copy failed",
        ),
        any(
            libc::SYS_unlinkat,
            "unlinkat",
            "removes the private socket directory and the socket in it",
        ),
    ]
}
