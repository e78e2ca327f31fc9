//! The host side of loft's guest agent (`loft-agent`): run a command in the guest over the
//! VM's virtio-vsock device, and sync a guest restored from a snapshot ([`sync_on_stream`]:
//! its clock, its RNG, its clone id).
//!
//! The VMM exposes the device as a Unix socket in Firecracker's convention: connect to it,
//! write `CONNECT <port>\n`, read `OK <hostport>\n`, and the stream is then connected to the
//! guest process listening on vsock port `<port>` (the agent, [`DEFAULT_AGENT_PORT`] unless
//! the guest was told otherwise with `loft_agent=PORT`). If nothing listens there, the VMM
//! closes the stream without `OK`: [`AgentError::Refused`]. What follows is the frame
//! protocol of [the crate's](crate) (one request per connection).
//!
//! The guest is not trusted: frames are checked before anything is allocated for them (at most
//! [`crate::MAX_FRAME`] bytes each), anything unexpected is a typed error, and every read
//! and write is bounded by the call's timeout, so a silent, slow or hostile guest costs at most
//! that long. [`exec_output`] also caps what it collects ([`OUTPUT_LIMIT`] per stream).
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use loft_agent::client::{exec_output, wait_for_agent, ExecRequest, ExitStatus};
//! let uds = std::path::Path::new("/tmp/vm.vsock");
//! wait_for_agent(uds, 52, Instant::now() + Duration::from_secs(60))?;
//! let out = exec_output(uds, 52, &ExecRequest::shell("uname -r"), None, Some(Duration::from_secs(10)))?;
//! assert_eq!(out.status, ExitStatus::Code(0));
//! # Ok::<(), loft_agent::client::AgentError>(())
//! ```

use std::fmt;
use std::io::{self, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::{header, read_frame, Frame, Kind, Peer, ProtocolError, CHUNK, EPROTO, HEADER_LEN};

mod files;
mod process;

pub use crate::{
    DirEntry, ExecRequest, FileType, Resource, SyncRequest, DEFAULT_PORT as DEFAULT_AGENT_PORT,
    MAX_CLONE_ID, MAX_FRAME, MAX_SYNC_ENTROPY, MIN_SYNC_ENTROPY, UNLIMITED,
};
pub use files::{list_dir, read_file, remove, write_file, FileError, MAX_ENTRIES};
pub use process::{Process, ProcessInput, ProcessOutput};

/// Most bytes [`exec_output`] collects from each of stdout and stderr.
pub const OUTPUT_LIMIT: usize = 64 << 20;
/// Pause between two attempts of [`wait_for_agent`].
pub const RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// Longest handshake answer accepted (`OK 4294967295` is 13 bytes).
const MAX_HANDSHAKE_LINE: usize = 64;
/// Longest `Error` message kept from the guest.
const MAX_ERROR_MESSAGE: usize = 4096;

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            ExitStatus::Signal(_) => None,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// A finished command's status and output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// Everything that can go wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The Unix socket failed (connecting to it included: e.g. `NotFound` when the VMM has not
    /// created it).
    #[error("agent connection failed")]
    Io(#[source] io::Error),
    /// The call's timeout ran out.
    #[error("timed out waiting for the guest agent")]
    Timeout,
    /// The VMM closed the stream without `OK`: nothing listens on that guest vsock port (yet).
    #[error("connection to guest vsock port {port} refused (is the agent running?)")]
    Refused {
        /// The guest vsock port.
        port: u32,
    },
    /// The VMM or the agent sent something that breaks the protocol.
    #[error("agent protocol violation")]
    Protocol(#[source] ProtocolError),
    /// The VMM's vsock socket answered `CONNECT` with something other than `OK <port>`.
    #[error("unexpected answer from the VMM's vsock socket: {0:?}")]
    Handshake(String),
    /// The agent closed the connection before it sent the command's exit status (or its
    /// answer to a `Sync`).
    #[error("the agent closed the connection without an exit status or answer")]
    NoExitStatus,
    /// The agent announced a frame larger than [`MAX_FRAME`] (nothing was allocated for it).
    #[error("the agent announced a {len}-byte frame (limit {MAX_FRAME})")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
    },
    /// The request breaks the protocol's rules (empty argv, NUL byte, too big, too little
    /// entropy, a bad clone id, ...); nothing was sent.
    #[error("invalid request")]
    InvalidRequest(#[source] ProtocolError),
    /// The agent could not run the command (`Error` frame). `errno` is the guest's OS error
    /// (`ENOENT` = 2: command or working directory not found), 0 for a protocol complaint.
    #[error("the guest agent could not run the command: {message}")]
    Remote {
        /// The guest's errno, 0 if none.
        errno: i32,
        /// The agent's message.
        message: String,
    },
    /// A `Sync` step failed in the guest (`Error` frame; the agent still tried the others).
    /// `errno` is the first failed step's guest OS error (`EPERM` = 1: the agent is not root),
    /// 0 for a protocol complaint, e.g. from an agent too old to know `Sync`.
    #[error("the guest agent could not sync the guest: {message}")]
    SyncFailed {
        /// The guest's errno, 0 if none.
        errno: i32,
        /// The agent's message, naming every failed step.
        message: String,
    },
    /// The command wrote more than its limit on one stream ([`ExecRequest::output_limit`] for
    /// [`exec_on_stream`], [`OUTPUT_LIMIT`] for [`exec_output`]); it was killed.
    #[error("command output exceeds {limit} bytes")]
    OutputTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The agent speaks another protocol version (its `Error` frame said so, errno
    /// [`EPROTO`]): the host's loft and the guest's agent come from different loft versions.
    #[error("the guest agent refused the request: {message}")]
    Version {
        /// The agent's message, naming both versions.
        message: String,
    },
    /// A file request failed in the guest, or a file read went over its limit.
    #[error("{message}")]
    File {
        /// What kind of failure.
        kind: FileError,
        /// The guest's errno (0 when the host found the file too large).
        errno: i32,
        /// What happened, with the guest path.
        message: String,
    },
}

impl AgentError {
    /// The command (or its working directory) does not exist in the guest: what a shell
    /// reports as exit status 127.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AgentError::Remote { errno, .. } if *errno == libc::ENOENT)
    }
}

pub(crate) fn io_error(e: io::Error) -> AgentError {
    match e.kind() {
        // A socket timeout shows up as EAGAIN.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AgentError::Timeout,
        _ => AgentError::Io(e),
    }
}

pub(crate) fn protocol_error(e: ProtocolError) -> AgentError {
    match e {
        ProtocolError::FrameTooLarge { len } => AgentError::FrameTooLarge { len },
        ProtocolError::Io(e) => io_error(e),
        e => AgentError::Protocol(e),
    }
}

pub(crate) fn deadline_after(timeout: Option<Duration>) -> Option<Instant> {
    // A timeout too large to add is no timeout.
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// The stream, with each read and write bounded by what is left until the deadline.
pub(crate) struct Timed<'a> {
    pub(crate) stream: &'a UnixStream,
    pub(crate) deadline: Option<Instant>,
}

impl Timed<'_> {
    fn left(&self) -> io::Result<Option<Duration>> {
        match self.deadline {
            None => Ok(None),
            Some(d) => match d.saturating_duration_since(Instant::now()) {
                left if left.is_zero() => Err(io::ErrorKind::TimedOut.into()),
                left => Ok(Some(left)),
            },
        }
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(self.left()?)?;
        (&*self.stream).read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(self.left()?)?;
        (&*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects to the agent on guest vsock `port` through the VMM's Unix socket `uds`: the
/// `CONNECT` handshake, bounded by `timeout`. The stream then carries the agent protocol.
pub fn connect(uds: &Path, port: u32, timeout: Option<Duration>) -> Result<UnixStream, AgentError> {
    connect_by(uds, port, deadline_after(timeout))
}

fn connect_by(uds: &Path, port: u32, deadline: Option<Instant>) -> Result<UnixStream, AgentError> {
    let stream = UnixStream::connect(uds).map_err(AgentError::Io)?;
    let mut t = Timed {
        stream: &stream,
        deadline,
    };
    // The VMM dropping the stream at once (e.g. it is at its connection limit) is a refusal.
    let refused = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => AgentError::Refused { port },
        _ => io_error(e),
    };
    t.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(refused)?;
    // One byte at a time: nothing of the agent's stream may be read into a buffer here.
    let mut line = Vec::with_capacity(MAX_HANDSHAKE_LINE);
    loop {
        let mut b = [0u8; 1];
        match t.read(&mut b) {
            Ok(0) => return Err(AgentError::Refused { port }),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() == MAX_HANDSHAKE_LINE => {
                return Err(AgentError::Handshake("(answer too long)".into()))
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(refused(e)),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    match host_port {
        Some(_) => Ok(stream),
        None => Err(AgentError::Handshake(
            text.chars().take(MAX_HANDSHAKE_LINE).collect::<String>(),
        )),
    }
}

/// Retries [`connect`] (every [`RETRY_INTERVAL`]) until the agent accepts a connection, or
/// `deadline` passes ([`AgentError::Timeout`]). Retried: a refused `CONNECT` (the guest is
/// still booting), and a Unix socket that does not exist or accept yet (the VMM is starting).
/// The probe connection is closed again; the agent ignores it.
pub fn wait_for_agent(uds: &Path, port: u32, deadline: Instant) -> Result<(), AgentError> {
    connect_when_ready(uds, port, deadline, &|| false).map(drop)
}

/// Longest a single connection attempt of [`connect_when_ready`] may take: a guest whose vsock
/// driver is not up yet never answers a `CONNECT`, and the next attempt may find it up.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the agent on vsock `port` once it listens: retries while the guest is booting
/// (a refused `CONNECT`, an attempt that got no answer within [`ATTEMPT_TIMEOUT`]) or the VMM is
/// starting (no socket yet), until `deadline` passes or `gone()` says the VM has stopped (both
/// [`AgentError::Timeout`]). Any other error is returned at once.
pub fn connect_when_ready(
    uds: &Path,
    port: u32,
    deadline: Instant,
    gone: &dyn Fn() -> bool,
) -> Result<UnixStream, AgentError> {
    loop {
        let attempt = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
        match connect_by(uds, port, Some(attempt)) {
            Ok(stream) => return Ok(stream),
            Err(AgentError::Refused { .. } | AgentError::Timeout) => {}
            Err(AgentError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || gone() {
            return Err(AgentError::Timeout);
        }
        thread::sleep(left.min(RETRY_INTERVAL));
    }
}

/// Runs `cmd` in the guest through the VMM's Unix socket `uds` (agent on vsock `port`):
/// connects, sends the request, passes output to `on_stdout` / `on_stderr` as it arrives, and
/// returns how the command ended. The command's stdin is `/dev/null`. `timeout` bounds the
/// whole call (`None`: no limit); when it runs out the connection is closed, which makes the
/// agent kill the command.
pub fn exec_over_uds(
    uds: &Path,
    port: u32,
    cmd: &ExecRequest,
    timeout: Option<Duration>,
    mut on_stdout: impl FnMut(&[u8]),
    mut on_stderr: impl FnMut(&[u8]),
) -> Result<ExitStatus, AgentError> {
    let mut sink = route(&mut on_stdout, &mut on_stderr);
    exec_by(uds, port, cmd, None, deadline_after(timeout), &mut sink)
}

/// Like [`exec_over_uds`], but collects the output (at most [`OUTPUT_LIMIT`] bytes per stream)
/// and, if `stdin` is given, feeds it to the command's stdin (then closes it).
pub fn exec_output(
    uds: &Path,
    port: u32,
    cmd: &ExecRequest,
    stdin: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<Output, AgentError> {
    collect_output(OUTPUT_LIMIT, |sink| {
        exec_by(uds, port, cmd, stdin, deadline_after(timeout), sink)
    })
}

/// Runs `cmd` on a stream already connected to the agent (see [`connect`]; the stream is used
/// up: one command per connection). With `stdin`, the bytes are fed to the command's stdin
/// from a helper thread while the output is read, then its stdin is closed; without, its stdin
/// is `/dev/null`. `timeout` bounds the whole call.
pub fn exec_on_stream(
    stream: UnixStream,
    cmd: &ExecRequest,
    stdin: Option<&[u8]>,
    timeout: Option<Duration>,
    mut on_stdout: impl FnMut(&[u8]),
    mut on_stderr: impl FnMut(&[u8]),
) -> Result<ExitStatus, AgentError> {
    let request = encode_request(cmd, stdin)?;
    let limit = cmd.max_output();
    let (mut out_len, mut err_len) = (0usize, 0usize);
    let mut sink = |is_stderr: bool, data: &[u8]| {
        let seen = if is_stderr {
            &mut err_len
        } else {
            &mut out_len
        };
        *seen = seen.saturating_add(data.len());
        if *seen > limit {
            // Returning drops the stream: the agent kills the command.
            return Err(AgentError::OutputTooLarge { limit });
        }
        if is_stderr {
            on_stderr(data)
        } else {
            on_stdout(data)
        }
        Ok(())
    };
    run(stream, &request, stdin, deadline_after(timeout), &mut sink)
}

/// An [`OutputSink`] that hands each stream to its callback.
fn route<'a>(
    on_stdout: &'a mut impl FnMut(&[u8]),
    on_stderr: &'a mut impl FnMut(&[u8]),
) -> impl FnMut(bool, &[u8]) -> Result<(), AgentError> + 'a {
    move |is_stderr, data| {
        if is_stderr {
            on_stderr(data)
        } else {
            on_stdout(data)
        }
        Ok(())
    }
}

/// Receives output: (is it stderr, bytes); an error stops the command.
type OutputSink<'a> = dyn FnMut(bool, &[u8]) -> Result<(), AgentError> + 'a;

fn collect_output(
    limit: usize,
    exec: impl FnOnce(&mut OutputSink<'_>) -> Result<ExitStatus, AgentError>,
) -> Result<Output, AgentError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let status = exec(&mut |is_err, data| {
        let buf = if is_err { &mut stderr } else { &mut stdout };
        if buf.len() + data.len() > limit {
            return Err(AgentError::OutputTooLarge { limit });
        }
        buf.extend_from_slice(data);
        Ok(())
    })?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// The `Exec` frame, plus `StdinEof` right behind it for an empty stdin.
fn encode_request(cmd: &ExecRequest, stdin: Option<&[u8]>) -> Result<Vec<u8>, AgentError> {
    let mut bytes = exec_frame(cmd, stdin.is_some())?;
    if stdin.is_some_and(<[u8]>::is_empty) {
        bytes.extend_from_slice(&header(Kind::StdinEof, 0));
    }
    Ok(bytes)
}

/// The whole `Exec` frame for `cmd`; `stdin`: `Stdin` frames will follow.
pub(crate) fn exec_frame(cmd: &ExecRequest, stdin: bool) -> Result<Vec<u8>, AgentError> {
    let payload = cmd.encode(stdin).map_err(AgentError::InvalidRequest)?;
    let mut bytes = header(Kind::Exec, payload.len() as u32).to_vec();
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

fn exec_by(
    uds: &Path,
    port: u32,
    cmd: &ExecRequest,
    stdin: Option<&[u8]>,
    deadline: Option<Instant>,
    sink: &mut OutputSink<'_>,
) -> Result<ExitStatus, AgentError> {
    // A request that cannot be sent fails before anything is asked of the guest.
    let request = encode_request(cmd, stdin)?;
    let stream = connect_by(uds, port, deadline)?;
    run(stream, &request, stdin, deadline, sink)
}

fn run(
    stream: UnixStream,
    request: &[u8],
    stdin: Option<&[u8]>,
    deadline: Option<Instant>,
    sink: &mut OutputSink<'_>,
) -> Result<ExitStatus, AgentError> {
    let mut t = Timed {
        stream: &stream,
        deadline,
    };
    if let Err(e) = t.write_all(request) {
        let e = io_error(e);
        if matches!(e, AgentError::Timeout) {
            return Err(e);
        }
        // The agent may have answered (e.g. busy) and closed before reading it all: what it
        // sent says more than EPIPE does.
        return match read_answer(&stream, deadline, sink) {
            Err(
                answer @ (AgentError::Remote { .. }
                | AgentError::Protocol(_)
                | AgentError::NoExitStatus
                | AgentError::FrameTooLarge { .. }),
            ) => Err(answer),
            _ => Err(e),
        };
    }
    let stdin = stdin.filter(|d| !d.is_empty());
    thread::scope(|scope| {
        let feeder = stdin.map(|data| scope.spawn(|| feed_stdin(&stream, data, deadline)));
        let result = read_answer(&stream, deadline, sink);
        if feeder.is_some() {
            // Unblocks the feeder if the command ended without reading all of its input.
            let _ = stream.shutdown(Shutdown::Both);
        }
        result
    })
}

/// Sends `data` as `Stdin` frames, then `StdinEof`. Errors end it quietly: the answer (or
/// its absence) tells the caller what happened.
fn feed_stdin(stream: &UnixStream, data: &[u8], deadline: Option<Instant>) {
    let mut t = Timed { stream, deadline };
    if write_stdin_frames(data, |frame| t.write_all(frame)).is_ok() {
        let _ = t.write_all(&header(Kind::StdinEof, 0));
    }
}

/// Hands `data` to `write` as `Stdin` frames of at most [`CHUNK`] bytes each, one buffer for
/// all of them; stops at the first error.
pub(crate) fn write_stdin_frames<E>(
    data: &[u8],
    mut write: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let mut frame = Vec::with_capacity(HEADER_LEN + CHUNK.min(data.len()));
    for chunk in data.chunks(CHUNK) {
        frame.clear();
        frame.extend_from_slice(&header(Kind::Stdin, chunk.len() as u32));
        frame.extend_from_slice(chunk);
        write(&frame)?;
    }
    Ok(())
}

/// The error for a frame that has no place where it came.
pub(crate) fn unexpected(f: &Frame) -> AgentError {
    protocol_error(ProtocolError::Unexpected(f.kind()))
}

fn read_answer(
    stream: &UnixStream,
    deadline: Option<Instant>,
    sink: &mut OutputSink<'_>,
) -> Result<ExitStatus, AgentError> {
    let mut r = BufReader::with_capacity(HEADER_LEN + CHUNK, Timed { stream, deadline });
    loop {
        match read_frame(&mut r, Peer::Agent).map_err(protocol_error)? {
            Some(Frame::Started(_)) => {}
            Some(Frame::Stdout(data)) => sink(false, &data)?,
            Some(Frame::Stderr(data)) => sink(true, &data)?,
            Some(Frame::Exit(code)) => return Ok(ExitStatus::Code(code)),
            Some(Frame::Signal(sig)) => return Ok(ExitStatus::Signal(sig)),
            Some(Frame::Error { errno, message }) => return Err(remote(errno, message)),
            Some(f) => return Err(unexpected(&f)),
            None => return Err(AgentError::NoExitStatus),
        }
    }
}

/// The error an `Error` frame answering a request stands for: a version mismatch ([`EPROTO`]),
/// or the agent's failure.
pub(crate) fn remote(errno: i32, message: String) -> AgentError {
    let message = bounded(message);
    match errno {
        EPROTO => AgentError::Version { message },
        _ => AgentError::Remote { errno, message },
    }
}

/// An `Error` message from the guest, cut to [`MAX_ERROR_MESSAGE`] bytes.
pub(crate) fn bounded(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE {
        let mut end = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// Syncs a guest just restored from a snapshot, through the VMM's Unix socket `uds` (agent on
/// vsock `port`): connects, then does what [`sync_on_stream`] does. `timeout` bounds the
/// whole call, connecting included.
pub fn sync_guest(
    uds: &Path,
    port: u32,
    realtime: SystemTime,
    entropy: &[u8],
    clone_id: Option<&str>,
    timeout: Option<Duration>,
) -> Result<(), AgentError> {
    let start = Instant::now();
    let deadline = deadline_after(timeout);
    // A request that cannot be sent fails before anything is asked of the guest.
    let request =
        SyncRequest::new(realtime, entropy, clone_id).map_err(AgentError::InvalidRequest)?;
    let stream = connect_by(uds, port, deadline)?;
    sync_by(stream, request, start, deadline)
}

/// Syncs a guest just restored from a snapshot, on a stream already connected to its agent
/// (see [`connect_when_ready`]; the stream is used up): the guest's `CLOCK_REALTIME` is set to
/// `realtime` (pass `SystemTime::now()`; the time this call spends before sending is added),
/// `entropy` ([`MIN_SYNC_ENTROPY`]..=[`MAX_SYNC_ENTROPY`] bytes, e.g. 64 from the host's
/// `getrandom`; different for every clone) is added to the guest kernel's RNG, credited, and
/// the RNG reseeded from it, and `clone_id` (1..=[`MAX_CLONE_ID`] bytes of `[A-Za-z0-9._-]`) is
/// written to the guest's `/run/loft/clone-id`, or that file removed for `None`. Do it before
/// the first command, so that nothing in the guest reads the stale clock or the RNG state
/// shared with the other clones.
///
/// Errors: [`AgentError::InvalidRequest`] (nothing sent) for arguments out of those bounds;
/// [`AgentError::SyncFailed`] when a step failed in the guest (or the agent does not know
/// `Sync`); and the transport errors of [`exec_on_stream`]. `timeout` bounds the whole call.
pub fn sync_on_stream(
    stream: UnixStream,
    realtime: SystemTime,
    entropy: &[u8],
    clone_id: Option<&str>,
    timeout: Option<Duration>,
) -> Result<(), AgentError> {
    let start = Instant::now();
    let request =
        SyncRequest::new(realtime, entropy, clone_id).map_err(AgentError::InvalidRequest)?;
    sync_by(stream, request, start, deadline_after(timeout))
}

fn sync_by(
    stream: UnixStream,
    mut request: SyncRequest,
    start: Instant,
    deadline: Option<Instant>,
) -> Result<(), AgentError> {
    // The guest's clock should read what the host's reads when the frame leaves.
    request.realtime = request.realtime.saturating_add(start.elapsed());
    let bytes = Frame::Sync(request)
        .encode()
        .map_err(AgentError::InvalidRequest)?;
    let mut t = Timed {
        stream: &stream,
        deadline,
    };
    if let Err(e) = t.write_all(&bytes) {
        let e = io_error(e);
        if matches!(e, AgentError::Timeout) {
            return Err(e);
        }
        // The agent may have answered (e.g. busy) and closed before reading it all.
        return match read_sync_answer(&stream, deadline) {
            Err(
                answer @ (AgentError::SyncFailed { .. }
                | AgentError::Protocol(_)
                | AgentError::NoExitStatus
                | AgentError::FrameTooLarge { .. }),
            ) => Err(answer),
            _ => Err(e),
        };
    }
    read_sync_answer(&stream, deadline)
}

fn read_sync_answer(stream: &UnixStream, deadline: Option<Instant>) -> Result<(), AgentError> {
    let mut r = Timed { stream, deadline };
    match read_frame(&mut r, Peer::Agent).map_err(protocol_error)? {
        Some(Frame::Synced) => Ok(()),
        Some(Frame::Error { errno, message }) if errno != EPROTO => Err(AgentError::SyncFailed {
            errno,
            message: bounded(message),
        }),
        Some(Frame::Error { errno, message }) => Err(remote(errno, message)),
        Some(f) => Err(unexpected(&f)),
        None => Err(AgentError::NoExitStatus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::fake::{Call, Recorder};
    use crate::guest::Step;
    use crate::server::handle_connection;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::UNIX_EPOCH;

    const PORT: u32 = 52;
    const LONG: Option<Duration> = Some(Duration::from_secs(30));
    const SHORT: Duration = Duration::from_millis(300);

    fn sock_path(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        std::env::temp_dir().join(format!("loft-ac-{}-{n}-{tag}.sock", std::process::id()))
    }

    /// A fake VMM Unix socket: every connection is handed to `serve` on its own thread. The
    /// socket file goes away with the value.
    struct FakeVmm {
        path: PathBuf,
    }

    impl Drop for FakeVmm {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn fake_vmm(tag: &str, serve: impl Fn(UnixStream, usize) + Send + Sync + 'static) -> FakeVmm {
        let path = sock_path(tag);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let serve = Arc::new(serve);
        thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let serve = serve.clone();
                thread::spawn(move || serve(stream, i));
            }
        });
        FakeVmm { path }
    }

    /// Reads the CONNECT line the way the VMM does (a byte at a time).
    fn read_connect_line(s: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// Answers `OK 1073741824` to exactly `CONNECT 52` (else closes, i.e. refuses).
    fn accept_connect(s: &mut UnixStream) -> bool {
        if read_connect_line(s) != format!("CONNECT {PORT}") {
            return false;
        }
        s.write_all(b"OK 1073741824\n").unwrap();
        true
    }

    /// A VMM with the real agent handler behind port 52.
    fn vmm_with_agent() -> FakeVmm {
        vmm_with_agent_ops(Arc::new(Recorder::default()))
    }

    /// A VMM with the real agent handler behind port 52, doing `Sync` steps through `ops`.
    fn vmm_with_agent_ops(ops: Arc<Recorder>) -> FakeVmm {
        fake_vmm("agent", move |mut s, _| {
            if accept_connect(&mut s) {
                handle_connection(s.try_clone().unwrap(), s, &*ops);
            }
        })
    }

    /// A VMM whose "agent" sends `bytes` after `OK`, then closes (`close`) or keeps the
    /// stream open until the client leaves.
    fn vmm_with_hostile_agent(bytes: Vec<u8>, close: bool) -> FakeVmm {
        fake_vmm("hostile", move |mut s, _| {
            if !accept_connect(&mut s) {
                return;
            }
            if close {
                // Read the request first: closing with unread data would make the client see
                // ECONNRESET instead of what was sent.
                let _ = read_frame(&mut s, Peer::Host);
            }
            let _ = s.write_all(&bytes);
            if !close {
                let mut sink = [0u8; 4096];
                while s.read(&mut sink).unwrap_or(0) > 0 {}
            }
        })
    }

    fn output(
        vmm: &FakeVmm,
        cmd: &ExecRequest,
        timeout: Option<Duration>,
    ) -> Result<Output, AgentError> {
        exec_output(&vmm.path, PORT, cmd, None, timeout)
    }

    #[test]
    fn runs_a_command_with_separate_streams_and_exit_code() {
        let vmm = vmm_with_agent();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = exec_over_uds(
            &vmm.path,
            PORT,
            &ExecRequest::shell("echo out; echo err >&2; exit 7"),
            LONG,
            |d| out.extend_from_slice(d),
            |d| err.extend_from_slice(d),
        )
        .unwrap();
        assert_eq!(status, ExitStatus::Code(7));
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert!(!status.success());
        assert_eq!(status.code(), Some(7));
    }

    #[test]
    fn output_streams_as_it_is_produced() {
        let vmm = vmm_with_agent();
        // The second line comes only after the host has seen the first one.
        let flag = sock_path("flag");
        let script = format!(
            "echo first; while [ ! -e {0} ]; do sleep 0.02; done; echo second",
            flag.display()
        );
        let mut seen = Vec::new();
        let status = exec_over_uds(
            &vmm.path,
            PORT,
            &ExecRequest::shell(&script),
            LONG,
            |d| {
                seen.extend_from_slice(d);
                if seen == b"first\n" {
                    std::fs::write(&flag, b"").unwrap();
                }
            },
            |_| {},
        )
        .unwrap();
        let _ = std::fs::remove_file(&flag);
        assert_eq!(status, ExitStatus::Code(0));
        assert_eq!(seen, b"first\nsecond\n");
    }

    #[test]
    fn a_signal_is_reported_as_such() {
        let vmm = vmm_with_agent();
        let out = output(&vmm, &ExecRequest::shell("echo bye; kill -KILL $$"), LONG).unwrap();
        assert_eq!(out.status, ExitStatus::Signal(libc::SIGKILL));
        assert_eq!(out.stdout, b"bye\n");
        let out = output(&vmm, &ExecRequest::shell("kill -TERM $$"), LONG).unwrap();
        assert_eq!(out.status, ExitStatus::Signal(libc::SIGTERM));
        assert_eq!(out.status.to_string(), "killed by signal 15");
    }

    #[test]
    fn a_missing_command_is_a_remote_not_found_error() {
        let vmm = vmm_with_agent();
        let err = output(&vmm, &ExecRequest::new(["no-such-command-xyz"]), LONG).unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(err.to_string().contains("no-such-command-xyz"), "{err}");
        // A directory is no program: another errno.
        let err = output(&vmm, &ExecRequest::new(["/"]), LONG).unwrap_err();
        assert!(
            matches!(err, AgentError::Remote { errno, .. } if errno == libc::EACCES),
            "{err:?}"
        );
    }

    #[test]
    fn stdin_env_and_cwd() {
        let vmm = vmm_with_agent();
        let input: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let out = exec_output(
            &vmm.path,
            PORT,
            &ExecRequest::new(["cat"]),
            Some(&input),
            LONG,
        )
        .unwrap();
        assert_eq!(out.status, ExitStatus::Code(0));
        assert!(
            out.stdout == input,
            "cat returned {} bytes",
            out.stdout.len()
        );
        let out = exec_output(
            &vmm.path,
            PORT,
            &ExecRequest::new(["wc", "-c"]),
            Some(b""),
            LONG,
        )
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
        let req = ExecRequest::shell("pwd; echo \"$GREETING\"")
            .env("GREETING", "hi there")
            .cwd("/");
        let out = output(&vmm, &req, LONG).unwrap();
        assert_eq!(out.stdout, b"/\nhi there\n");
    }

    #[test]
    fn concurrent_execs() {
        let vmm = Arc::new(vmm_with_agent());
        // The waiter can only finish if the toucher runs while it waits.
        let flag = sock_path("conc");
        let script = format!(
            "while [ ! -e {0} ]; do sleep 0.02; done; echo seen",
            flag.display()
        );
        let v = vmm.clone();
        let waiter = thread::spawn(move || output(&v, &ExecRequest::shell(&script), LONG));
        let many: Vec<_> = (0..6)
            .map(|i| {
                let v = vmm.clone();
                thread::spawn(move || output(&v, &ExecRequest::shell(&format!("echo {i}")), LONG))
            })
            .collect();
        let touch = ExecRequest::new(["touch".to_string(), flag.display().to_string()]);
        assert!(output(&vmm, &touch, LONG).unwrap().status.success());
        for (i, h) in many.into_iter().enumerate() {
            assert_eq!(
                h.join().unwrap().unwrap().stdout,
                format!("{i}\n").as_bytes()
            );
        }
        assert_eq!(waiter.join().unwrap().unwrap().stdout, b"seen\n");
        let _ = std::fs::remove_file(&flag);
    }

    #[test]
    fn exec_on_a_socketpair() {
        let (host, agent) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            handle_connection(agent.try_clone().unwrap(), agent, &Recorder::default())
        });
        let mut out = Vec::new();
        let status = exec_on_stream(
            host,
            &ExecRequest::new(["tr", "a-z", "A-Z"]),
            Some(b"shout\n"),
            LONG,
            |d| out.extend_from_slice(d),
            |_| {},
        )
        .unwrap();
        assert_eq!(
            (status, out.as_slice()),
            (ExitStatus::Code(0), &b"SHOUT\n"[..])
        );
    }

    #[test]
    fn invalid_requests_are_refused_locally() {
        // No VMM at all: the request fails before any connection is tried.
        let path = sock_path("none");
        for req in [ExecRequest::default(), ExecRequest::new(["a\0b"])] {
            let err = exec_output(&path, PORT, &req, None, LONG).unwrap_err();
            assert!(matches!(err, AgentError::InvalidRequest(_)), "{err:?}");
        }
    }

    #[test]
    fn handshake_sends_connect_and_accepts_ok() {
        let vmm = vmm_with_agent();
        let s = connect(&vmm.path, PORT, LONG).unwrap();
        drop(s);
        // The fake answers only "CONNECT 52": another port is refused.
        let err = connect(&vmm.path, 53, LONG).unwrap_err();
        assert!(matches!(err, AgentError::Refused { port: 53 }), "{err:?}");
    }

    #[test]
    fn closing_without_ok_is_refused() {
        let vmm = fake_vmm("refuse", |mut s, _| {
            read_connect_line(&mut s);
        });
        let t = Instant::now();
        let err = output(&vmm, &ExecRequest::new(["true"]), LONG).unwrap_err();
        assert!(matches!(err, AgentError::Refused { port: PORT }), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn bad_handshake_answers_are_protocol_errors() {
        let vmm = fake_vmm("nope", |mut s, _| {
            read_connect_line(&mut s);
            let _ = s.write_all(b"NOPE\n");
        });
        let err = connect(&vmm.path, PORT, LONG).unwrap_err();
        assert!(
            matches!(err, AgentError::Handshake(ref m) if m == "NOPE"),
            "{err:?}"
        );
        let vmm = fake_vmm("long", |mut s, _| {
            read_connect_line(&mut s);
            let _ = s.write_all(&vec![b'O'; 1 << 20]);
        });
        let err = connect(&vmm.path, PORT, LONG).unwrap_err();
        assert!(
            matches!(err, AgentError::Handshake(ref m) if m.contains("too long")),
            "{err:?}"
        );
    }

    #[test]
    fn silent_vmm_times_out() {
        let vmm = fake_vmm("silent", |mut s, _| {
            let mut b = [0u8; 64];
            while s.read(&mut b).unwrap_or(0) > 0 {}
        });
        let t = Instant::now();
        let err = connect(&vmm.path, PORT, Some(SHORT)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_for_agent_retries_refusals() {
        // Refuses the first three connections, then accepts.
        let vmm = fake_vmm("boot", |mut s, i| {
            if i >= 3 {
                accept_connect(&mut s);
            } else {
                read_connect_line(&mut s);
            }
        });
        wait_for_agent(&vmm.path, PORT, Instant::now() + Duration::from_secs(20)).unwrap();
        // Always refused: times out at the deadline.
        let vmm = fake_vmm("never", |mut s, _| {
            read_connect_line(&mut s);
        });
        let t = Instant::now();
        let err = wait_for_agent(&vmm.path, PORT, Instant::now() + SHORT).unwrap_err();
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
        assert!(t.elapsed() >= SHORT && t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn wait_for_agent_waits_for_the_socket_to_appear() {
        let path = sock_path("late");
        let err = wait_for_agent(&path, PORT, Instant::now() + SHORT).unwrap_err();
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
        let p = path.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let listener = UnixListener::bind(&p).unwrap();
            let (mut s, _) = listener.accept().unwrap();
            accept_connect(&mut s);
        });
        let res = wait_for_agent(&path, PORT, Instant::now() + Duration::from_secs(20));
        let _ = std::fs::remove_file(&path);
        res.unwrap();
    }

    /// Runs `true` against an agent that answers `bytes`; returns the error and how long it took.
    fn hostile(bytes: Vec<u8>, close: bool) -> (AgentError, Duration) {
        let vmm = vmm_with_hostile_agent(bytes, close);
        let t = Instant::now();
        let err = output(&vmm, &ExecRequest::new(["true"]), Some(SHORT)).unwrap_err();
        (err, t.elapsed())
    }

    #[test]
    fn hostile_oversized_frame_fails_fast() {
        for kind in [Kind::Stdout, Kind::Error] {
            let (err, took) = hostile(header(kind, u32::MAX).to_vec(), false);
            assert!(
                matches!(err, AgentError::FrameTooLarge { len } if len == u64::from(u32::MAX)),
                "{err:?}"
            );
            assert!(took < SHORT, "took {took:?}: it waited instead of failing");
        }
    }

    #[test]
    fn hostile_garbage_is_a_protocol_error() {
        let (err, took) = hostile(b"garbage, not frames\n".to_vec(), false);
        assert!(
            matches!(err, AgentError::Protocol(ProtocolError::UnknownKind(_))),
            "{err:?}"
        );
        assert!(took < SHORT);
        // A host-side kind from the agent.
        let exec = Frame::Exec {
            request: ExecRequest::new(["x"]),
            stdin: false,
        };
        let (err, _) = hostile(exec.encode().unwrap(), false);
        assert!(
            matches!(
                err,
                AgentError::Protocol(ProtocolError::Unexpected(Kind::Exec))
            ),
            "{err:?}"
        );
        // A final frame with a bad payload.
        let mut bad_exit = header(Kind::Exit, 3).to_vec();
        bad_exit.extend_from_slice(&[0, 0, 0]);
        let (err, _) = hostile(bad_exit, false);
        assert!(matches!(err, AgentError::Protocol(_)), "{err:?}");
    }

    #[test]
    fn hostile_stall_mid_frame_times_out() {
        let mut bytes = header(Kind::Stdout, 1000).to_vec();
        bytes.extend_from_slice(&[b'x'; 10]);
        let (err, took) = hostile(bytes, false);
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
        assert!(took >= SHORT && took < SHORT * 4, "took {took:?}");
        // Silence right after OK, too.
        let (err, _) = hostile(Vec::new(), false);
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
    }

    #[test]
    fn hostile_close_mid_frame_or_without_status() {
        let mut bytes = header(Kind::Stdout, 1000).to_vec();
        bytes.extend_from_slice(&[b'x'; 10]);
        let (err, took) = hostile(bytes, true);
        assert!(
            matches!(err, AgentError::Protocol(ProtocolError::Truncated)),
            "{err:?}"
        );
        assert!(took < SHORT);
        let (err, _) = hostile(Frame::Stdout(b"hi".to_vec()).encode().unwrap(), true);
        assert!(matches!(err, AgentError::NoExitStatus), "{err:?}");
    }

    #[test]
    fn hostile_trickle_is_bounded_by_the_timeout() {
        // Valid output, a byte at a time, forever: the deadline still ends it.
        let vmm = fake_vmm("trickle", |mut s, _| {
            if !accept_connect(&mut s) {
                return;
            }
            let frame = Frame::Stdout(b"y".to_vec()).encode().unwrap();
            for b in frame.iter().cycle() {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        let t = Instant::now();
        let err = output(&vmm, &ExecRequest::new(["true"]), Some(SHORT)).unwrap_err();
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
        assert!(t.elapsed() < SHORT * 4);
    }

    #[test]
    fn output_is_capped() {
        let (host, agent) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut agent = agent;
            let chunk = Frame::Stdout(vec![b'z'; 1000]).encode().unwrap();
            while agent.write_all(&chunk).is_ok() {}
        });
        let request = encode_request(&ExecRequest::new(["yes"]), None).unwrap();
        let err = collect_output(10_000, |sink| {
            run(host, &request, None, deadline_after(LONG), sink)
        })
        .unwrap_err();
        assert!(
            matches!(err, AgentError::OutputTooLarge { limit: 10_000 }),
            "{err:?}"
        );
    }

    /// Against a real guest: boot one with `--vsock cid=3,uds=PATH` and `loft_agent=52` on its
    /// command line (see firmware/build-agent.sh), then
    /// `LOFT_AGENT_UDS=PATH cargo test -p loft --lib agent_client -- --ignored`.
    #[test]
    #[ignore = "needs a running guest: set LOFT_AGENT_UDS"]
    fn real_guest() {
        let uds = PathBuf::from(std::env::var("LOFT_AGENT_UDS").expect("LOFT_AGENT_UDS"));
        let t = Instant::now();
        wait_for_agent(&uds, PORT, Instant::now() + Duration::from_secs(300)).unwrap();
        eprintln!("agent up after {:?}", t.elapsed());
        let timed = |req: &ExecRequest, stdin: Option<&[u8]>| {
            let t = Instant::now();
            let out = exec_output(&uds, PORT, req, stdin, Some(Duration::from_secs(120)));
            eprintln!("{:?}: {:?}", req.argv, t.elapsed());
            out
        };
        let out = timed(&ExecRequest::shell("echo out; echo err >&2; exit 7"), None).unwrap();
        assert_eq!(
            (out.status, out.stdout, out.stderr),
            (ExitStatus::Code(7), b"out\n".to_vec(), b"err\n".to_vec())
        );
        let out = timed(&ExecRequest::shell("kill -TERM $$"), None).unwrap();
        assert_eq!(out.status, ExitStatus::Signal(libc::SIGTERM));
        let err = timed(&ExecRequest::new(["no-such-command"]), None).unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        let input: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let out = timed(&ExecRequest::new(["cat"]), Some(&input)).unwrap();
        assert!(
            out.status.success() && out.stdout == input,
            "cat: {} bytes",
            out.stdout.len()
        );
        let out = timed(&ExecRequest::new(["uname", "-r"]), None).unwrap();
        eprintln!(
            "guest kernel {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        // Concurrent: the waiter finishes only if the toucher runs meanwhile.
        let u = uds.clone();
        let waiter = thread::spawn(move || {
            let req = ExecRequest::shell("while [ ! -e /tmp/flag ]; do sleep 0.1; done; echo seen");
            exec_output(&u, PORT, &req, None, Some(Duration::from_secs(120)))
        });
        assert!(timed(&ExecRequest::new(["touch", "/tmp/flag"]), None)
            .unwrap()
            .status
            .success());
        assert_eq!(waiter.join().unwrap().unwrap().stdout, b"seen\n");
        // A timeout on the host kills the command in the guest.
        let err = exec_output(
            &uds,
            PORT,
            &ExecRequest::new(["sleep", "30"]),
            None,
            Some(Duration::from_secs(3)),
        );
        assert!(matches!(err, Err(AgentError::Timeout)), "{err:?}");
        // Nobody on another port: refused.
        let err = exec_output(
            &uds,
            53,
            &ExecRequest::new(["true"]),
            None,
            Some(Duration::from_secs(30)),
        );
        assert!(
            matches!(err, Err(AgentError::Refused { port: 53 })),
            "{err:?}"
        );
        let out = timed(
            &ExecRequest::shell("sleep 1; ps | grep -c '[s]leep 30'; true"),
            None,
        )
        .unwrap();
        assert_eq!(out.stdout, b"0\n", "the timed-out command still runs");
    }

    #[test]
    fn remote_error_messages_are_bounded() {
        let frame = Frame::Error {
            errno: 5,
            message: "e".repeat(100_000),
        };
        let (err, _) = hostile(frame.encode().unwrap(), false);
        match err {
            AgentError::Remote { errno: 5, message } => {
                assert_eq!(message.len(), MAX_ERROR_MESSAGE)
            }
            e => panic!("{e:?}"),
        }
    }
    const ENTROPY: [u8; 64] = [0xc3; 64];

    /// Syncs through a socket pair whose other end is the real handler with `ops`.
    fn sync_pair(
        ops: Arc<Recorder>,
        realtime: SystemTime,
        id: Option<&str>,
    ) -> Result<(), AgentError> {
        let (host, agent) = UnixStream::pair().unwrap();
        let handler =
            thread::spawn(move || handle_connection(agent.try_clone().unwrap(), agent, &*ops));
        let res = sync_on_stream(host, realtime, &ENTROPY, id, LONG);
        handler.join().unwrap();
        res
    }

    #[test]
    fn sync_on_a_socketpair_reaches_every_step() {
        let ops = Arc::new(Recorder::default());
        let realtime = UNIX_EPOCH + Duration::new(1_760_000_000, 250_000_000);
        sync_pair(ops.clone(), realtime, Some("clone-01")).unwrap();
        let calls = ops.calls();
        assert_eq!(calls.len(), 4, "{calls:?}");
        // The clock sent is the one given plus the (short) time the call took to send it.
        match calls[0] {
            Call::Clock(sent) => {
                let given = Duration::new(1_760_000_000, 250_000_000);
                assert!(
                    sent >= given && sent < given + Duration::from_secs(5),
                    "{sent:?}"
                );
            }
            ref c => panic!("{c:?}"),
        }
        assert_eq!(calls[1], Call::Entropy(ENTROPY.to_vec()));
        assert_eq!(calls[2], Call::Reseed);
        assert_eq!(calls[3], Call::CloneId(Some("clone-01".into())));
    }

    #[test]
    fn sync_guest_through_the_vmm_socket() {
        let ops = Arc::new(Recorder::default());
        let vmm = vmm_with_agent_ops(ops.clone());
        sync_guest(&vmm.path, PORT, SystemTime::now(), &ENTROPY, None, LONG).unwrap();
        assert_eq!(ops.calls()[3], Call::CloneId(None));
        // Refused port: nothing was synced.
        let err = sync_guest(&vmm.path, 53, SystemTime::now(), &ENTROPY, None, LONG).unwrap_err();
        assert!(matches!(err, AgentError::Refused { port: 53 }), "{err:?}");
        assert_eq!(ops.calls().len(), 4);
    }

    #[test]
    fn failed_sync_is_a_sync_error_with_the_guest_errno() {
        let ops = Arc::new(Recorder::failing(&[
            (Step::Clock, libc::EPERM),
            (Step::CloneId, libc::EROFS),
        ]));
        let err = sync_pair(ops.clone(), SystemTime::now(), Some("x")).unwrap_err();
        match err {
            AgentError::SyncFailed { errno, ref message } => {
                assert_eq!(errno, libc::EPERM);
                assert!(
                    message.contains("clock") && message.contains("clone id"),
                    "{message}"
                );
            }
            ref e => panic!("{e:?}"),
        }
        assert!(err.to_string().contains("sync"), "{err}");
        assert_eq!(ops.calls().len(), 4);
    }

    #[test]
    fn invalid_sync_arguments_are_refused_locally() {
        // No VMM at all: the request fails before any connection is tried.
        let path = sock_path("none");
        let now = SystemTime::now();
        let short = [0u8; MIN_SYNC_ENTROPY - 1];
        let long = [0u8; MAX_SYNC_ENTROPY + 1];
        let cases: [(SystemTime, &[u8], Option<&str>); 6] = [
            (now, &short, None),
            (now, &long, None),
            (now, &ENTROPY, Some("")),
            (now, &ENTROPY, Some("no spaces")),
            (now, &ENTROPY, Some(&"x".repeat(MAX_CLONE_ID + 1))),
            (UNIX_EPOCH - Duration::from_secs(1), &ENTROPY, None),
        ];
        for (realtime, entropy, id) in cases {
            let err = sync_guest(&path, PORT, realtime, entropy, id, LONG).unwrap_err();
            assert!(matches!(err, AgentError::InvalidRequest(_)), "{err:?}");
        }
        // On a stream: nothing is written to it.
        let (host, mut agent) = UnixStream::pair().unwrap();
        let err = sync_on_stream(host, now, &short, None, LONG).unwrap_err();
        assert!(matches!(err, AgentError::InvalidRequest(_)), "{err:?}");
        let mut rest = Vec::new();
        agent.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    /// Syncs against an agent that answers `bytes`; returns the error and how long it took.
    fn hostile_sync(bytes: Vec<u8>, close: bool) -> (AgentError, Duration) {
        let vmm = vmm_with_hostile_agent(bytes, close);
        let t = Instant::now();
        let res = sync_guest(
            &vmm.path,
            PORT,
            SystemTime::now(),
            &ENTROPY,
            None,
            Some(SHORT),
        );
        (res.unwrap_err(), t.elapsed())
    }

    #[test]
    fn hostile_answers_to_sync_are_typed_errors() {
        // An exec answer is no sync answer.
        let (err, _) = hostile_sync(Frame::Exit(0).encode().unwrap(), false);
        assert!(
            matches!(
                err,
                AgentError::Protocol(ProtocolError::Unexpected(Kind::Exit))
            ),
            "{err:?}"
        );
        // Synced with a payload: refused from its header.
        let mut bad = header(Kind::Synced, 4).to_vec();
        bad.extend_from_slice(&[0; 4]);
        let (err, took) = hostile_sync(bad, false);
        assert!(
            matches!(
                err,
                AgentError::Protocol(ProtocolError::Malformed {
                    kind: Kind::Synced,
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(took < SHORT);
        let (err, took) = hostile_sync(header(Kind::Error, u32::MAX).to_vec(), false);
        assert!(matches!(err, AgentError::FrameTooLarge { .. }), "{err:?}");
        assert!(took < SHORT);
        // An agent that does not know Sync answers a protocol complaint.
        let old = Frame::Error {
            errno: 0,
            message: "unknown frame kind 0x04".into(),
        };
        let (err, _) = hostile_sync(old.encode().unwrap(), true);
        assert!(
            matches!(err, AgentError::SyncFailed { errno: 0, ref message } if message.contains("0x04")),
            "{err:?}"
        );
        let long = Frame::Error {
            errno: 5,
            message: "e".repeat(100_000),
        };
        match hostile_sync(long.encode().unwrap(), false).0 {
            AgentError::SyncFailed { errno: 5, message } => {
                assert_eq!(message.len(), MAX_ERROR_MESSAGE)
            }
            e => panic!("{e:?}"),
        }
        // Closed without an answer; silent.
        let (err, _) = hostile_sync(Vec::new(), true);
        assert!(matches!(err, AgentError::NoExitStatus), "{err:?}");
        let (err, took) = hostile_sync(Vec::new(), false);
        assert!(matches!(err, AgentError::Timeout), "{err:?}");
        assert!(took >= SHORT && took < SHORT * 4, "took {took:?}");
    }

    #[test]
    fn a_process_echoes_stdin_reports_a_signal_and_waits_with_a_timeout() {
        let vmm = vmm_with_agent();
        let conn = || connect(&vmm.path, PORT, LONG).unwrap();
        let mut cat = Process::start(conn(), &ExecRequest::new(["cat"]), LONG).unwrap();
        assert!(cat.pid() > 0);
        cat.write_stdin(b"x").unwrap();
        assert_eq!(
            cat.read_output(LONG).unwrap(),
            Some(ProcessOutput::Stdout(b"x".to_vec()))
        );
        cat.close_stdin().unwrap();
        assert_eq!(cat.wait().unwrap(), ExitStatus::Code(0));
        assert_eq!(cat.read_output(LONG).unwrap(), None);

        let mut sleep = Process::start(conn(), &ExecRequest::new(["sleep", "100"]), LONG).unwrap();
        let t = Instant::now();
        assert_eq!(sleep.wait_timeout(SHORT).unwrap(), None);
        assert!(t.elapsed() < SHORT * 3, "{:?}", t.elapsed());
        assert!(matches!(
            sleep.read_output(Some(SHORT)),
            Err(AgentError::Timeout)
        ));
        sleep.signal(libc::SIGTERM).unwrap();
        assert_eq!(
            sleep.wait_timeout(Duration::from_secs(10)).unwrap(),
            Some(ExitStatus::Signal(libc::SIGTERM))
        );

        // Output that came while waiting is kept for read_output.
        let mut p =
            Process::start(conn(), &ExecRequest::shell("echo a; echo b >&2"), LONG).unwrap();
        assert_eq!(p.wait().unwrap(), ExitStatus::Code(0));
        assert_eq!(p.take_output(), (b"a\n".to_vec(), b"b\n".to_vec()));

        let missing = Process::start(conn(), &ExecRequest::new(["/no/such"]), LONG).unwrap_err();
        assert!(missing.is_not_found(), "{missing:?}");
    }

    #[test]
    fn files_go_in_and_out_with_typed_errors() {
        let vmm = vmm_with_agent();
        let conn = || connect(&vmm.path, PORT, LONG).unwrap();
        let dir = std::env::temp_dir().join(format!("loft-ac-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = dir.to_str().unwrap().to_string();
        let path = format!("{d}/sub/data");
        let data: Vec<u8> = (0..333_333u32).map(|i| (i % 253) as u8).collect();
        let n = write_file(conn(), &path, 0o600, &mut &data[..], LONG).unwrap();
        assert_eq!(n, data.len() as u64);
        let mut back = Vec::new();
        read_file(conn(), &path, u64::MAX, &mut back, LONG).unwrap();
        assert_eq!(back, data);
        let kind = |e: AgentError| match e {
            AgentError::File { kind, .. } => kind,
            e => panic!("{e:?}"),
        };
        let e = read_file(conn(), &path, 1000, &mut Vec::new(), LONG).unwrap_err();
        assert!(e.to_string().contains("data"), "{e}");
        assert_eq!(kind(e), FileError::TooLarge);
        let e = read_file(conn(), &format!("{d}/nope"), 10, &mut Vec::new(), LONG).unwrap_err();
        assert_eq!(kind(e), FileError::NotFound);
        let e = read_file(conn(), &d, 10, &mut Vec::new(), LONG).unwrap_err();
        assert_eq!(kind(e), FileError::IsADirectory);
        let e = write_file(
            conn(),
            &format!("{path}/below"),
            0o600,
            &mut &b"x"[..],
            LONG,
        );
        assert_eq!(kind(e.unwrap_err()), FileError::NotADirectory);
        let names: Vec<String> = list_dir(conn(), &d, LONG)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["sub"]);
        assert_eq!(
            kind(remove(conn(), &d, false, LONG).unwrap_err()),
            FileError::NotEmpty
        );
        remove(conn(), &d, true, LONG).unwrap();
        assert!(!dir.exists());
        assert!(matches!(
            list_dir(conn(), "relative", LONG),
            Err(AgentError::InvalidRequest(_))
        ));
    }

    #[test]
    fn a_file_read_over_its_limit_is_cut_by_the_host() {
        // A hostile agent that ignores the limit: the host stops at it.
        let mut bytes = Vec::new();
        for _ in 0..4 {
            bytes.extend_from_slice(&Frame::Data(vec![7; 1000]).encode().unwrap());
        }
        bytes.extend_from_slice(&Frame::Done.encode().unwrap());
        let vmm = vmm_with_hostile_agent(bytes, false);
        let stream = connect(&vmm.path, PORT, LONG).unwrap();
        let mut out = Vec::new();
        let e = read_file(stream, "/f", 2500, &mut out, LONG).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::File {
                    kind: FileError::TooLarge,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(out.len() <= 2500);
    }

    #[test]
    fn an_agent_of_another_version_is_a_version_error() {
        let answer = Frame::Error {
            errno: EPROTO,
            message:
                "protocol version mismatch: the request is version 2, this side speaks version 3"
                    .into(),
        };
        let vmm = vmm_with_hostile_agent(answer.encode().unwrap(), true);
        let e = exec_output(&vmm.path, PORT, &ExecRequest::new(["true"]), None, LONG).unwrap_err();
        assert!(matches!(e, AgentError::Version { .. }), "{e:?}");
        assert!(e.to_string().contains("protocol version mismatch"), "{e}");
    }
}
