//! A test tool run *inside* a guest: tries to have the guest agent run a command over a vsock
//! connection made from the guest itself, as a process in the guest that wants the agent's
//! powers would, and says whether the agent served it.
//!
//! ```text
//! vsock_probe CID PORT     # prints "served" or "refused: WHY"; exits 0 either way, 2 on bad use
//! ```
//!
//! The agent must serve the host (CID 2) alone: from inside the guest, to the guest's own CID,
//! to the local CID (1) or to another VM's, every attempt must print `refused`. Built static for
//! the guest by `firmware/build-agent.sh`; the guest tests copy it in through a data disk.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use loft_agent::client::{exec_on_stream, ExecRequest, ExitStatus};
use socket2::{Domain, SockAddr, Socket, Type};

/// What the agent would print for us, were it to serve this connection.
const WORD: &str = "served-by-agent";

fn probe(cid: u32, port: u32) -> Result<(), String> {
    let socket =
        Socket::new(Domain::VSOCK, Type::STREAM, None).map_err(|e| format!("socket: {e}"))?;
    socket
        .connect_timeout(&SockAddr::vsock(cid, port), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    // The client speaks to any connected stream socket; a vsock stream is one.
    let stream = UnixStream::from(OwnedFd::from(socket));
    let mut out = Vec::new();
    let status = exec_on_stream(
        stream,
        &ExecRequest::new(["echo", WORD]),
        None,
        Some(Duration::from_secs(10)),
        |d| out.extend_from_slice(d),
        |_| {},
    )
    .map_err(|e| format!("exec: {e}"))?;
    if status == ExitStatus::Code(0) && out.starts_with(WORD.as_bytes()) {
        Ok(())
    } else {
        Err(format!(
            "exec answered {status:?} with {:?}",
            String::from_utf8_lossy(&out)
        ))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [cid, port] => cid.parse::<u32>().ok().zip(port.parse::<u32>().ok()),
        _ => None,
    };
    let Some((cid, port)) = parsed else {
        eprintln!("usage: vsock_probe CID PORT");
        return ExitCode::from(2);
    };
    match probe(cid, port) {
        Ok(()) => println!("cid {cid}: served"),
        Err(why) => println!("cid {cid}: refused: {why}"),
    }
    ExitCode::SUCCESS
}
