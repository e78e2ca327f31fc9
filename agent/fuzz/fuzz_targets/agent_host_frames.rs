//! The guest agent's side: decoding what the host sends.
//!
//! The input is the byte stream of one connection. It is read frame by frame as the agent's
//! readers do (`read_frame(_, Peer::Host)`), and, unless its first frame is an `Exec` (which
//! would run a command) or a file request (which would write, read or remove the fuzzing host's
//! files), handed whole to the real connection handler with `Sync` steps that do nothing.
//!
//! Checked: no panic; a payload is never allocated before it arrives (libFuzzer's
//! `-malloc_limit_mb` catches a buffer sized from a hostile length); every frame decoded is
//! one the host may send, valid, and encodes back to a frame that decodes to the same value;
//! the handler answers with exactly one final frame (`Synced` or `Error`), or nothing when the
//! stream holds no request.

#![no_main]

use std::io::{Cursor, Write};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use loft_agent::guest::SyncOps;
use loft_agent::server::{handle_connection, Outcome};
use loft_agent::{read_frame, Frame, Peer};

/// `Sync` steps that succeed without touching the machine (or fail, for odd entropy).
struct NoOps;

impl SyncOps for NoOps {
    fn set_clock(&self, _: std::time::Duration) -> std::io::Result<()> {
        Ok(())
    }
    fn add_entropy(&self, entropy: &[u8]) -> std::io::Result<()> {
        match entropy[0] & 1 {
            0 => Ok(()),
            _ => Err(std::io::Error::from_raw_os_error(libc::EPERM)),
        }
    }
    fn reseed(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_clone_id(&self, _: Option<&str>) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn check_frame(f: &Frame) {
    assert_eq!(f.kind().sender(), Peer::Host, "{f:?}");
    match f {
        Frame::Exec { request, .. } => request.validate().expect("decoded Exec is valid"),
        Frame::Sync(request) => request.validate().expect("decoded Sync is valid"),
        Frame::File(request) => request.validate().expect("decoded file request is valid"),
        _ => {}
    }
    let bytes = f.encode().expect("a decoded frame encodes");
    let back = read_frame(&mut &bytes[..], Peer::Host).expect("re-encoded frame decodes");
    assert_eq!(back.as_ref(), Some(f));
}

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    let mut acts_on_the_host = false;
    for i in 0.. {
        match read_frame(&mut r, Peer::Host) {
            Ok(Some(f)) => {
                check_frame(&f);
                acts_on_the_host |= i == 0 && matches!(f, Frame::Exec { .. } | Frame::File(_));
            }
            Ok(None) | Err(_) => break,
        }
    }
    if acts_on_the_host {
        return;
    }
    let out = Shared::default();
    let outcome = handle_connection(Cursor::new(data.to_vec()), out.clone(), &NoOps);
    let written = out.0.lock().unwrap().clone();
    let mut w = &written[..];
    let answer = read_frame(&mut w, Peer::Agent).expect("the agent's answer decodes");
    assert!(w.is_empty(), "more than one answer frame: {outcome:?}");
    match (&outcome, &answer) {
        (Outcome::Closed, None)
        | (Outcome::Synced, Some(Frame::Synced))
        | (Outcome::SyncFailed(_), Some(Frame::Error { .. }))
        | (Outcome::Rejected(_), Some(Frame::Error { .. })) => {}
        _ => panic!("outcome {outcome:?} with answer {answer:?}"),
    }
});
