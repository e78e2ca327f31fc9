//! A command started in the guest and left running: [`Process`], the host's handle on it.
//!
//! One connection carries the command's stdin, signals and terminal sizes to the agent
//! ([`ProcessInput`], which may be cloned and used from other threads) and its output and end
//! back ([`Process::read_output`], [`Process::wait_timeout`]). Nothing runs in the background:
//! output is read from the connection when the handle is asked for it, so a command whose
//! output nobody reads stalls once the buffers on the way are full, as with a pipe. Dropping
//! the handle closes the connection, and the agent kills the command then, unless it was started
//! with [`ExecRequest::detach`](crate::ExecRequest::detach).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    deadline_after, exec_frame, io_error, protocol_error, remote, unexpected, write_stdin_frames,
    AgentError, ExitStatus, Timed,
};
use crate::{read_header, ExecRequest, Frame, Kind, Peer, ProtocolError, WindowSize, HEADER_LEN};

/// A chunk of a running command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessOutput {
    /// From its stdout (or its terminal).
    Stdout(Vec<u8>),
    /// From its stderr.
    Stderr(Vec<u8>),
}

/// The input side of a [`Process`]: its stdin, signals and terminal size. Cheap to clone; each
/// call writes one frame (or a few for large stdin data) under a lock.
#[derive(Debug, Clone)]
pub struct ProcessInput {
    stream: Arc<Mutex<UnixStream>>,
}

impl ProcessInput {
    fn send(&self, frame: &[u8]) -> Result<(), AgentError> {
        let stream = match self.stream.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        (&*stream).write_all(frame).map_err(io_error)
    }

    /// Writes `data` to the command's stdin (in chunks of at most 64 KiB). Blocks while the
    /// command does not read and the buffers on the way are full.
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        write_stdin_frames(data, |frame| self.send(frame))
    }

    /// Closes the command's stdin (on a terminal: sends its end-of-file character, ^D).
    pub fn close_stdin(&self) -> Result<(), AgentError> {
        self.send(&crate::header(Kind::StdinEof, 0))
    }

    /// Sends signal `signal` (e.g. `libc::SIGTERM`) to the command.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let bytes = Frame::Kill(signal)
            .encode()
            .map_err(AgentError::InvalidRequest)?;
        self.send(&bytes)
    }

    /// Tells the command's terminal its new size (the command gets `SIGWINCH`).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        let bytes = Frame::Resize(WindowSize { rows, cols })
            .encode()
            .map_err(AgentError::InvalidRequest)?;
        self.send(&bytes)
    }
}

/// A command running in the guest: its input, its output as it comes, its end. Nothing runs in
/// the background: output is read when asked for, so a command whose output nobody reads
/// stalls once the buffers on the way are full. Dropping it closes the connection, and the
/// agent kills the command then, unless it was started detached.
#[derive(Debug)]
pub struct Process {
    stream: UnixStream,
    input: ProcessInput,
    pid: u32,
    /// Bytes received and not yet made into frames (at most one frame and one read).
    rbuf: Vec<u8>,
    /// Output read while waiting, not yet taken by `read_output`.
    pending: VecDeque<ProcessOutput>,
    pending_bytes: usize,
    limit: usize,
    status: Option<ExitStatus>,
}

impl Process {
    /// Starts `cmd` on a stream connected to the agent (see [`super::connect_when_ready`]; used
    /// up), with its stdin fed by [`ProcessInput::write_stdin`]. Returns once the agent has
    /// started it (or said why it could not: [`AgentError::Remote`], e.g. errno `ENOENT`),
    /// within `timeout`. Output read by [`Process::wait_timeout`] and not yet taken is kept up
    /// to [`ExecRequest::output_limit`] bytes.
    pub fn start(
        stream: UnixStream,
        cmd: &ExecRequest,
        timeout: Option<Duration>,
    ) -> Result<Process, AgentError> {
        let frame = exec_frame(cmd, true)?;
        let deadline = deadline_after(timeout);
        Timed {
            stream: &stream,
            deadline,
        }
        .write_all(&frame)
        .map_err(io_error)?;
        let input = ProcessInput {
            stream: Arc::new(Mutex::new(stream.try_clone().map_err(AgentError::Io)?)),
        };
        let mut p = Process {
            stream,
            input,
            pid: 0,
            rbuf: Vec::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            limit: cmd.max_output(),
            status: None,
        };
        match p.next_frame(deadline)? {
            Some(Frame::Started(pid)) => {
                p.pid = pid;
                Ok(p)
            }
            Some(Frame::Error { errno, message }) => Err(remote(errno, message)),
            Some(f) => Err(unexpected(&f)),
            None => Err(AgentError::Timeout),
        }
    }

    /// The command's process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle on the command's input, for other threads.
    pub fn input(&self) -> ProcessInput {
        self.input.clone()
    }

    /// See [`ProcessInput::write_stdin`].
    pub fn write_stdin(&self, data: &[u8]) -> Result<(), AgentError> {
        self.input.write_stdin(data)
    }

    /// See [`ProcessInput::close_stdin`].
    pub fn close_stdin(&self) -> Result<(), AgentError> {
        self.input.close_stdin()
    }

    /// See [`ProcessInput::signal`].
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.input.signal(signal)
    }

    /// See [`ProcessInput::resize`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), AgentError> {
        self.input.resize(rows, cols)
    }

    /// How the command ended, once known.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// The next chunk of output, waiting at most `timeout` (`None`: no limit) for it:
    /// `Ok(None)` once the command has ended and all its output was taken,
    /// [`AgentError::Timeout`] when nothing came in time (the process goes on; call again).
    pub fn read_output(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ProcessOutput>, AgentError> {
        if let Some(out) = self.pending.pop_front() {
            self.pending_bytes -= out_len(&out);
            return Ok(Some(out));
        }
        if self.status.is_some() {
            return Ok(None);
        }
        match self.next_frame(deadline_after(timeout))? {
            Some(Frame::Stdout(d)) => Ok(Some(ProcessOutput::Stdout(d))),
            Some(Frame::Stderr(d)) => Ok(Some(ProcessOutput::Stderr(d))),
            Some(f) => self.finish(f).map(|()| None),
            None => Err(AgentError::Timeout),
        }
    }

    /// Waits at most `timeout` for the command to end: `Some(status)` if it did, `None` if it
    /// still runs. Output that arrives meanwhile is kept for [`Process::read_output`] (more
    /// than the output limit fails with [`AgentError::OutputTooLarge`]).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, AgentError> {
        self.wait_until(deadline_after(Some(timeout)))
    }

    /// Waits for the command to end (output that arrives meanwhile is kept, as in
    /// [`Process::wait_timeout`]).
    pub fn wait(&mut self) -> Result<ExitStatus, AgentError> {
        match self.wait_until(None)? {
            Some(status) => Ok(status),
            None => Err(AgentError::Timeout),
        }
    }

    /// Everything kept so far: (stdout, stderr).
    pub fn take_output(&mut self) -> (Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for chunk in self.pending.drain(..) {
            match chunk {
                ProcessOutput::Stdout(d) => out.extend_from_slice(&d),
                ProcessOutput::Stderr(d) => err.extend_from_slice(&d),
            }
        }
        self.pending_bytes = 0;
        (out, err)
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> Result<Option<ExitStatus>, AgentError> {
        while self.status.is_none() {
            let out = match self.next_frame(deadline)? {
                Some(Frame::Stdout(d)) => ProcessOutput::Stdout(d),
                Some(Frame::Stderr(d)) => ProcessOutput::Stderr(d),
                Some(f) => {
                    self.finish(f)?;
                    continue;
                }
                None => return Ok(None),
            };
            self.pending_bytes += out_len(&out);
            if self.pending_bytes > self.limit {
                // The agent kills the command when the connection closes.
                let _ = self.stream.shutdown(Shutdown::Both);
                return Err(AgentError::OutputTooLarge { limit: self.limit });
            }
            self.pending.push_back(out);
        }
        Ok(self.status)
    }

    /// Handles a frame that is not output: the final one, or an error.
    fn finish(&mut self, f: Frame) -> Result<(), AgentError> {
        self.status = Some(match f {
            Frame::Exit(code) => ExitStatus::Code(code),
            Frame::Signal(sig) => ExitStatus::Signal(sig),
            Frame::Error { errno, message } => return Err(remote(errno, message)),
            f => return Err(unexpected(&f)),
        });
        Ok(())
    }

    /// The next whole frame, or `None` when `deadline` passes first (what arrived of a frame
    /// is kept for the next call). The header is checked before anything is read for the
    /// payload; the buffer never holds more than one frame and one read.
    fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Option<Frame>, AgentError> {
        loop {
            if self.rbuf.len() >= HEADER_LEN {
                let mut h = &self.rbuf[..HEADER_LEN];
                let (kind, len) = read_header(&mut h, Peer::Agent)
                    .map_err(protocol_error)?
                    .ok_or(AgentError::NoExitStatus)?;
                let end = HEADER_LEN + len as usize;
                if self.rbuf.len() >= end {
                    let frame =
                        Frame::decode(kind, &self.rbuf[HEADER_LEN..end]).map_err(protocol_error)?;
                    self.rbuf.drain(..end);
                    return Ok(Some(frame));
                }
            } else if let Some(&k) = self.rbuf.first() {
                // Garbage fails on its first byte.
                let mut one = &[k][..];
                match read_header(&mut one, Peer::Agent) {
                    Err(ProtocolError::Truncated) => {}
                    Err(e) => return Err(protocol_error(e)),
                    Ok(_) => {}
                }
            }
            let left = match deadline {
                None => None,
                Some(d) => match d.saturating_duration_since(Instant::now()) {
                    left if left.is_zero() => return Ok(None),
                    left => Some(left),
                },
            };
            self.stream.set_read_timeout(left).map_err(AgentError::Io)?;
            let mut buf = [0u8; 16 * 1024];
            match (&self.stream).read(&mut buf) {
                Ok(0) => return Err(AgentError::NoExitStatus),
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(AgentError::Io(e)),
            }
        }
    }
}

/// The connection, to poll for output together with other file descriptors (then
/// [`Process::read_output`] with a short timeout reads what arrived).
impl std::os::fd::AsFd for Process {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

fn out_len(o: &ProcessOutput) -> usize {
    match o {
        ProcessOutput::Stdout(d) | ProcessOutput::Stderr(d) => d.len(),
    }
}
