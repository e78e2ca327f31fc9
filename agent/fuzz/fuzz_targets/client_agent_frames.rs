//! The host side (feature `client`): decoding what the guest agent sends back.
//!
//! The input's first byte picks the call and an output limit, the rest is what the "agent"
//! writes on a real Unix stream pair: `exec_on_stream` (with a small output limit, so the
//! limit path is reached), `sync_on_stream`, `read_file` (with a small limit), `list_dir`, or a
//! `Process` started and waited for, exactly as loft calls them.
//!
//! Checked: no panic or hang; a payload is never allocated before it arrives (libFuzzer's
//! `-malloc_limit_mb` catches a buffer sized from a hostile length); the output handed to the
//! callbacks never exceeds the request's limit; an exit by signal has a positive signal; an
//! `Error` message kept from the guest is bounded.

#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Once;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use loft_agent::client::{
    exec_on_stream, list_dir, read_file, sync_on_stream, AgentError, ExitStatus, Process,
};
use loft_agent::ExecRequest;

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(20));
/// `MAX_ERROR_MESSAGE` of the client.
const MAX_ERROR_MESSAGE: usize = 4096;

fn bounded(e: &AgentError) {
    if let AgentError::Remote { message, .. }
    | AgentError::SyncFailed { message, .. }
    | AgentError::Version { message }
    | AgentError::File { message, .. } = e
    {
        assert!(
            message.len() <= MAX_ERROR_MESSAGE,
            "{} bytes",
            message.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    static SIGPIPE: Once = Once::new();
    // libFuzzer's main does not ignore SIGPIPE as a Rust main would.
    // SAFETY: setting a signal disposition to SIG_IGN, no handler involved.
    SIGPIPE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (host, mut agent) = UnixStream::pair().unwrap();
    let rest = rest.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = agent.write_all(&rest);
        // Dropping the agent's end is the end of its stream.
    });
    let limit = [0usize, 1, 100, 4096, 1 << 20][usize::from(mode >> 3) % 5];
    if mode & 7 == 2 {
        let mut out = Vec::new();
        if let Err(e) = read_file(host, "/f", limit as u64, &mut out, TIMEOUT) {
            bounded(&e);
        }
        assert!(out.len() <= limit, "{} bytes past {limit}", out.len());
    } else if mode & 7 == 4 {
        if let Err(e) = list_dir(host, "/d", TIMEOUT) {
            bounded(&e);
        }
    } else if mode & 7 == 6 {
        let req = ExecRequest::new(["true"]).output_limit(limit);
        match Process::start(host, &req, TIMEOUT).and_then(|mut p| p.wait()) {
            Ok(ExitStatus::Signal(s)) => assert!(s > 0, "signal {s}"),
            Ok(ExitStatus::Code(_)) => {}
            Err(e) => bounded(&e),
        }
    } else if mode & 1 == 0 {
        let limit = [0usize, 1, 100, 4096, 1 << 20][usize::from(mode >> 1) % 5];
        let req = ExecRequest::new(["true"]).output_limit(limit);
        let (mut out, mut err) = (0usize, 0usize);
        let r = exec_on_stream(
            host,
            &req,
            None,
            TIMEOUT,
            |d| out += d.len(),
            |d| err += d.len(),
        );
        assert!(
            out <= limit && err <= limit,
            "{out}/{err} bytes past {limit}"
        );
        match r {
            Ok(ExitStatus::Signal(s)) => assert!(s > 0, "signal {s}"),
            Ok(ExitStatus::Code(_)) => {}
            Err(e) => bounded(&e),
        }
    } else {
        let entropy = [mode; 32];
        if let Err(e) = sync_on_stream(host, SystemTime::now(), &entropy, None, TIMEOUT) {
            bounded(&e);
        }
    }
    feeder.join().unwrap();
});
