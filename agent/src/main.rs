//! `loft-agent`: runs commands in the guest for the host, over virtio-vsock.
//!
//! ```text
//! loft-agent [--port PORT]      (default 52)
//! ```
//!
//! Listens on vsock port PORT (any CID) and serves each connection on its own thread with
//! [`loft_agent::server`]; the protocol is in [`loft_agent`]. Prints nothing unless something
//! fails (the console is slow and shared with `/init`).
//!
//! Runs as root: besides running commands, it carries out the host's `Sync` after a snapshot
//! restore ([`loft_agent::guest::LinuxGuest`]: set the clock, reseed the RNG, store the clone
//! id in `/run/loft/clone-id`).

use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use loft_agent::guest::LinuxGuest;
use loft_agent::server::{Server, MAX_CONNECTIONS};
use loft_agent::DEFAULT_PORT;
use socket2::{Domain, SockAddr, Socket, Type};

const USAGE: &str = "usage: loft-agent [--port PORT]\n\
    Runs commands for the host: listens on vsock port PORT (default 52).";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<u32>, String> {
    let mut port = DEFAULT_PORT;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "-V" | "--version" => {
                println!("loft-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--port" => args.next().ok_or("--port needs a value")?,
            a => match a.strip_prefix("--port=") {
                Some(v) => v.to_string(),
                None => return Err(format!("unknown argument {a:?}")),
            },
        };
        port = value.parse().map_err(|_| format!("bad port {value:?}"))?;
    }
    Ok(Some(port))
}

fn listen(port: u32) -> std::io::Result<Socket> {
    // socket2 opens it close-on-exec, so commands do not inherit it.
    let socket = Socket::new(Domain::VSOCK, Type::STREAM, None)?;
    socket.bind(&SockAddr::vsock(libc::VMADDR_CID_ANY, port))?;
    socket.listen(64)?;
    Ok(socket)
}

/// Whether `peer` is the host (vsock CID 2), the only peer the agent runs commands for.
fn from_host(peer: &SockAddr) -> bool {
    matches!(peer.as_vsock_address(), Some((cid, _)) if cid == libc::VMADDR_CID_HOST)
}

fn main() -> ExitCode {
    let port = match parse_args(std::env::args().skip(1)) {
        Ok(Some(port)) => port,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("loft-agent: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Started with `&` by a non-interactive shell (/init), this process ignores SIGINT and
    // SIGQUIT, and commands would inherit that: give them the default dispositions back.
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: installs no handler (SIG_DFL); no other thread exists yet.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    let listener = match listen(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("loft-agent: cannot listen on vsock port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = Server::new(MAX_CONNECTIONS, Arc::new(LinuxGuest::default()));
    loop {
        let socket = match listener.accept() {
            Ok((socket, peer)) if from_host(&peer) => socket,
            Ok((_, peer)) => {
                // Another VM's or this guest's own process (loopback): not the host, whom
                // alone the agent serves. Dropping the socket refuses it.
                eprintln!(
                    "loft-agent: refused a connection from {:?}",
                    peer.as_vsock_address()
                );
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                eprintln!("loft-agent: accept: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match socket.try_clone() {
            Ok(reader) => server.spawn(reader, socket),
            Err(e) => eprintln!("loft-agent: cannot duplicate a connection: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{from_host, parse_args};
    use socket2::SockAddr;

    #[test]
    fn only_the_host_is_served() {
        assert!(from_host(&SockAddr::vsock(libc::VMADDR_CID_HOST, 1234)));
        for cid in [libc::VMADDR_CID_LOCAL, 3, 4, libc::VMADDR_CID_ANY] {
            assert!(!from_host(&SockAddr::vsock(cid, 1234)), "cid {cid}");
        }
        let unix = SockAddr::unix("/tmp/x").unwrap();
        assert!(!from_host(&unix));
    }

    fn parse(args: &[&str]) -> Result<Option<u32>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]), Ok(Some(52)));
        assert_eq!(parse(&["--port", "1024"]), Ok(Some(1024)));
        assert_eq!(parse(&["--port=7"]), Ok(Some(7)));
        assert_eq!(parse(&["--help"]), Ok(None));
        assert!(parse(&["--port"]).is_err());
        assert!(parse(&["--port", "x"]).is_err());
        assert!(parse(&["--port", "-1"]).is_err());
        assert!(parse(&["extra"]).is_err());
    }
}
