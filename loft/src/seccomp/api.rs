//! `loft-api`: the control API's thread. It accepts one client at a time on the API socket,
//! reads and parses its request, hands it to the serving thread over a channel and writes the
//! answer; it opens nothing and starts nothing.

use super::{Only, Syscall};

pub(super) fn syscalls() -> Vec<Syscall> {
    let any = |nr, name, why| Syscall::new(nr, name, Only::Any, why);
    vec![
        any(
            libc::SYS_poll,
            "poll",
            "waits for a client, a few times a second looking whether to stop",
        ),
        any(
            libc::SYS_sendto,
            "sendto",
            "writes the answer (the standard library writes sockets with send, MSG_NOSIGNAL)",
        ),
        any(libc::SYS_accept4, "accept4", "takes a client's connection"),
        any(
            libc::SYS_recvfrom,
            "recvfrom",
            "reads the client's request (the standard library reads sockets with recv)",
        ),
        any(
            libc::SYS_setsockopt,
            "setsockopt",
            "the read deadline of a client's connection (SO_RCVTIMEO)",
        ),
        any(libc::SYS_close, "close", "closes a client's connection"),
        Syscall::new(
            libc::SYS_fcntl,
            "fcntl",
            super::CHECK_FD_OPEN,
            "the Rust standard library checks that an fd is open before it closes it (debug builds)",
        ),
        any(
            libc::SYS_sched_yield,
            "sched_yield",
            "the standard library's channels back off while waiting for the serving thread",
        ),
    ]
}
