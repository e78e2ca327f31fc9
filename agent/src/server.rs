//! The agent's side of one connection, over any byte stream (a vsock socket in the guest, a
//! Unix socket in tests).
//!
//! Per connection: the thread that runs [`handle_connection`] reads the `Exec` frame, starts
//! the command with stdout and stderr piped separately, and then only coordinates; one thread
//! per pipe relays its output as frames as soon as it is read (one `read` and one `write` per
//! chunk), and one thread reads the host's further frames (stdin, and the end of the stream,
//! which means the host gave up: the command is killed). Nothing polls: every thread blocks
//! in a read or on a channel.
//!
//! A `Sync` request instead is answered on the connection's thread: its steps go through the
//! [`SyncOps`] the handler is given ([`LinuxGuest`](crate::guest::LinuxGuest) in the agent, a
//! fake in tests), then `Synced` or `Error` is sent and the connection closed.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::fileops;
use crate::guest::{self, check, SyncOps};
use crate::{
    header, pty, read_frame, ExecRequest, Frame, Kind, Peer, ProtocolError, CHUNK, EPROTO,
    HEADER_LEN,
};

/// Most connections served at once; more are answered with `Error` and closed.
pub const MAX_CONNECTIONS: usize = 64;

/// Stack size of the agent's threads (they only shuffle bytes).
const STACK_SIZE: usize = 128 * 1024;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The stream ended before a request (e.g. a readiness probe).
    Closed,
    /// The request was refused with an `Error` frame (malformed, or the agent is busy).
    Rejected(String),
    /// The command could not be started; `Error` was sent.
    SpawnFailed(String),
    /// The command ran and its `Exit` / `Signal` frame was sent (or the host was gone by then).
    Finished(Frame),
    /// The host left before the end: the command was killed (or the file request dropped).
    Abandoned,
    /// The host broke the protocol while the command ran: `Error` was sent, the command killed.
    Aborted(String),
    /// Every step of a `Sync` succeeded; `Synced` was sent.
    Synced,
    /// A `Sync` step failed (the others were still tried); `Error` was sent with this message.
    SyncFailed(String),
    /// A file request succeeded; `Done` was sent.
    FileDone,
    /// A file request failed; `Error` was sent with this message.
    FileFailed(String),
    /// The host left before a detached command ended: it runs on.
    Detached,
}

/// The write half, shared by the relays and the coordinator. Once the final frame is out (or a
/// write failed), nothing more is written.
struct Sink<W> {
    w: W,
    closed: bool,
}

type SharedSink<W> = Arc<Mutex<Sink<W>>>;

/// Writes `bytes` (whole frames) unless the sink is closed; `final_frame` closes it. Returns
/// false if nothing could be written.
fn send<W: Write>(sink: &SharedSink<W>, bytes: &[u8], final_frame: bool) -> bool {
    let mut s = match sink.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    if s.closed {
        return false;
    }
    let ok = s.w.write_all(bytes).and_then(|()| s.w.flush()).is_ok();
    s.closed = final_frame || !ok;
    ok
}

fn send_frame<W: Write>(sink: &SharedSink<W>, frame: &Frame) -> bool {
    match frame.encode() {
        Ok(bytes) => send(sink, &bytes, true),
        Err(_) => false,
    }
}

fn send_error<W: Write>(sink: &SharedSink<W>, errno: i32, message: String) {
    send_frame(sink, &Frame::Error { errno, message });
}

/// What the helper threads tell the coordinator.
enum Event {
    /// A pipe reached its end.
    RelayDone,
    /// The host asks for this signal to be sent to the command.
    Kill(i32),
    /// The host closed the stream (or it broke): kill the command.
    HostGone,
    /// The host sent something invalid.
    Fatal(String),
}

/// Serves one connection: reads the request from `reader`, runs it, writes the answer to
/// `writer`. `reader` and `writer` are the two halves of one stream (e.g. a socket and its
/// `try_clone`). Returns when the final frame is written (or the host is gone); `reader` may
/// stay with a helper thread until the host closes the stream. A `Sync` request is carried
/// out through `ops`.
pub fn handle_connection<R, W>(reader: R, writer: W, ops: &dyn SyncOps) -> Outcome
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let mut reader = BufReader::with_capacity(CHUNK, reader);
    let sink = Arc::new(Mutex::new(Sink {
        w: writer,
        closed: false,
    }));
    let (request, stdin) = match read_frame(&mut reader, Peer::Host) {
        // No request at all (a readiness probe, or the host reset the stream): nothing to say.
        Ok(None) | Err(ProtocolError::Io(_)) => return Outcome::Closed,
        Ok(Some(Frame::Exec { request, stdin })) => (request, stdin),
        Ok(Some(Frame::Sync(request))) => {
            let answer = guest::apply(&request, ops);
            send_frame(&sink, &answer);
            return match answer {
                Frame::Error { message, .. } => Outcome::SyncFailed(message),
                _ => Outcome::Synced,
            };
        }
        Ok(Some(Frame::File(request))) => {
            let mut write = |bytes: &[u8]| send(&sink, bytes, false);
            return fileops::serve(&request, &mut reader, &mut write);
        }
        Ok(Some(f)) => {
            let msg = ProtocolError::Unexpected(f.kind()).to_string();
            send_error(&sink, 0, msg.clone());
            return Outcome::Rejected(msg);
        }
        Err(e) => {
            let msg = e.to_string();
            let errno = match e {
                ProtocolError::Version { .. } => EPROTO,
                _ => 0,
            };
            send_error(&sink, errno, msg.clone());
            return Outcome::Rejected(msg);
        }
    };

    let mut spawned = match spawn(&request, stdin) {
        Ok(c) => c,
        Err(e) => {
            let what = match &request.cwd {
                Some(dir) => format!("cannot run {:?} in {dir:?}: {e}", request.argv[0]),
                None => format!("cannot run {:?}: {e}", request.argv[0]),
            };
            send_error(&sink, e.raw_os_error().unwrap_or(0), what.clone());
            return Outcome::SpawnFailed(what);
        }
    };
    // Before any output: the host learns the command runs (and its pid) at once.
    send(
        &sink,
        &Frame::Started(spawned.child.id())
            .encode()
            .unwrap_or_default(),
        false,
    );
    let (tx, rx) = mpsc::channel();
    let mut relays = spawned.outputs.len();
    let helpers = start_helpers(&mut spawned, reader, request.detach, &sink, tx);
    let mut child = spawned.child;
    if let Err(e) = helpers {
        let msg = format!("cannot start a thread: {e}");
        send_error(&sink, e.raw_os_error().unwrap_or(0), msg.clone());
        kill_group(&mut child);
        let _ = child.wait();
        return Outcome::Aborted(msg);
    }

    while relays > 0 {
        match rx.recv() {
            Ok(Event::RelayDone) => relays -= 1,
            Ok(Event::Kill(sig)) => {
                if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                    // SAFETY: kill(2) takes plain integers. The child is not reaped yet (only
                    // this thread waits for it), so its pid cannot have been reused.
                    unsafe { libc::kill(pid, sig) };
                }
            }
            Ok(Event::HostGone) if request.detach => {
                // Asked to outlive the connection: it runs on; a thread reaps it.
                // (Without a reaper it would stay a zombie once done; it runs either way.)
                let reaper = thread::Builder::new().stack_size(STACK_SIZE);
                let _ = reaper.spawn(move || child.wait());
                return Outcome::Detached;
            }
            Ok(Event::HostGone) => {
                // Nobody is left to report to. The child is not reaped yet (only this thread
                // waits for it), so its pid cannot have been reused.
                kill_group(&mut child);
                let _ = child.wait();
                return Outcome::Abandoned;
            }
            Ok(Event::Fatal(msg)) => {
                send_error(&sink, 0, msg.clone());
                kill_group(&mut child);
                let _ = child.wait();
                return Outcome::Aborted(msg);
            }
            // Every helper is gone without saying so (cannot happen): wait for the child.
            Err(_) => break,
        }
    }
    let frame = match child.wait() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => Frame::Exit(code),
            (None, Some(sig)) => Frame::Signal(sig),
            (None, None) => Frame::Error {
                errno: 0,
                message: format!("unknown wait status {status:?}"),
            },
        },
        Err(e) => Frame::Error {
            errno: e.raw_os_error().unwrap_or(0),
            message: format!("cannot wait for the command: {e}"),
        },
    };
    send_frame(&sink, &frame);
    Outcome::Finished(frame)
}

/// A started command and the ends of its standard streams the agent keeps.
struct Spawned {
    child: Child,
    /// What the relays read: stdout and stderr, or the terminal.
    outputs: Vec<(Box<dyn Read + Send>, Kind)>,
    /// Where `Stdin` frames go: the stdin pipe, or the terminal (with the stdin flag only).
    input: Option<Box<dyn Write + Send>>,
    /// The terminal's master, for `Resize`.
    pty: Option<File>,
}

fn spawn(req: &ExecRequest, stdin: bool) -> std::io::Result<Spawned> {
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = &req.cwd {
        cmd.current_dir(dir);
    }
    // Limits first (still root: a hard limit can be raised), then the user.
    let rlimits: Vec<(libc::c_int, libc::rlimit)> = req
        .rlimits
        .iter()
        .map(|l| {
            let lim = libc::rlimit {
                rlim_cur: l.soft,
                rlim_max: l.hard,
            };
            (libc::c_int::from(l.resource as u8), lim)
        })
        .collect();
    let user = req.user.clone();
    let drop_privileges = move || -> std::io::Result<()> {
        for (resource, lim) in &rlimits {
            // SAFETY: setrlimit reads one rlimit from a live reference. (`as _`: glibc's
            // resource type is an enum typedef.)
            check(unsafe { libc::setrlimit(*resource as _, lim) })?;
        }
        if let Some(u) = &user {
            // SAFETY: setgroups reads `len` gids from the live vector; setgid and setuid take
            // integers. All three are async-signal-safe, as pre_exec needs.
            check(unsafe { libc::setgroups(u.groups.len(), u.groups.as_ptr()) })?;
            // SAFETY: as above.
            check(unsafe { libc::setgid(u.gid) })?;
            // SAFETY: as above.
            check(unsafe { libc::setuid(u.uid) })?;
        }
        Ok(())
    };
    if let Some(size) = req.pty {
        let pty = pty::open(size)?;
        cmd.stdin(pty.slave.try_clone()?)
            .stdout(pty.slave.try_clone()?)
            .stderr(pty.slave);
        // SAFETY: the closure makes only async-signal-safe system calls (setsid, ioctl and
        // those of drop_privileges) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own, with the terminal (its stdin by now) as controlling
                // terminal: job control and ^C work as on a console.
                check(libc::setsid())?;
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
                drop_privileges()
            })
        };
        let child = cmd.spawn()?;
        let input: Option<Box<dyn Write + Send>> = match stdin {
            true => Some(Box::new(pty.master.try_clone()?)),
            false => None,
        };
        return Ok(Spawned {
            child,
            outputs: vec![(Box::new(pty.master.try_clone()?), Kind::Stdout)],
            input,
            pty: Some(pty.master),
        });
    }
    cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that giving up on it can kill what it started, too.
        .process_group(0);
    // SAFETY: drop_privileges makes only async-signal-safe system calls and allocates nothing.
    unsafe { cmd.pre_exec(drop_privileges) };
    let mut child = cmd.spawn()?;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other("missing output pipes"));
    };
    let input = child
        .stdin
        .take()
        .map(|s| Box::new(s) as Box<dyn Write + Send>);
    Ok(Spawned {
        child,
        outputs: vec![(Box::new(out), Kind::Stdout), (Box::new(err), Kind::Stderr)],
        input,
        pty: None,
    })
}

/// SIGKILLs the command's process group (the command and what it started there).
fn kill_group(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours. The group is the
        // child's (process_group(0) at spawn) and the child is not reaped yet (only the
        // connection's own thread waits for it), so the id cannot have been reused.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
}

fn start_helpers<R, W>(
    spawned: &mut Spawned,
    reader: BufReader<R>,
    detach: bool,
    sink: &SharedSink<W>,
    tx: Sender<Event>,
) -> std::io::Result<()>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let builder = || thread::Builder::new().stack_size(STACK_SIZE);
    for (pipe, kind) in spawned.outputs.drain(..) {
        let (s, t) = (sink.clone(), tx.clone());
        builder().spawn(move || relay(pipe, kind, detach, &s, &t))?;
    }
    let input = spawned.input.take();
    let pty = match &spawned.pty {
        Some(m) => Some(m.try_clone()?),
        None => None,
    };
    builder().spawn(move || host_reader(reader, input, pty, &tx))?;
    Ok(())
}

/// Relays one pipe (or the terminal): a frame per `read`, written in place behind its header.
/// Once the host is gone, a detached command's output is read and dropped (so that it does not
/// block or get `SIGPIPE`); otherwise the relay says so and stops.
fn relay<W: Write>(
    mut pipe: impl Read,
    kind: Kind,
    detach: bool,
    sink: &SharedSink<W>,
    tx: &Sender<Event>,
) {
    let mut buf = vec![0u8; HEADER_LEN + CHUNK];
    let mut host_gone = false;
    loop {
        let n = match pipe.read(&mut buf[HEADER_LEN..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EIO: a terminal whose every other end is closed (the command is done).
            Err(_) => break,
        };
        if host_gone {
            continue;
        }
        buf[..HEADER_LEN].copy_from_slice(&header(kind, n as u32));
        if !send(sink, &buf[..HEADER_LEN + n], false) {
            // The host is gone (or the final frame is out already, after a protocol error).
            if detach {
                host_gone = true;
                continue;
            }
            let _ = tx.send(Event::HostGone);
            return;
        }
    }
    let _ = tx.send(Event::RelayDone);
}

/// Reads the host's frames after `Exec`: stdin data and its end, signals, terminal sizes; the
/// end of the stream means the host left.
fn host_reader<R: Read>(
    mut reader: BufReader<R>,
    mut input: Option<Box<dyn Write + Send>>,
    pty: Option<File>,
    tx: &Sender<Event>,
) {
    let mut stdin_open = input.is_some();
    loop {
        let event = match read_frame(&mut reader, Peer::Host) {
            Ok(Some(Frame::Stdin(data))) if stdin_open => {
                // A command that does not read its stdin (or exited): drop the input.
                if let Some(w) = input.as_mut() {
                    if w.write_all(&data).is_err() {
                        input = None;
                    }
                }
                continue;
            }
            Ok(Some(Frame::StdinEof)) if stdin_open => {
                stdin_open = false;
                if let (Some(w), true) = (input.as_mut(), pty.is_some()) {
                    // A terminal has no end of input but its EOF character (^D), which ends
                    // a read at the start of a line.
                    let _ = w.write_all(&[4]);
                }
                input = None;
                continue;
            }
            Ok(Some(Frame::Kill(sig))) => {
                if tx.send(Event::Kill(sig)).is_err() {
                    return;
                }
                continue;
            }
            Ok(Some(Frame::Resize(size))) => match &pty {
                Some(master) => {
                    let _ = pty::set_size(master, size);
                    continue;
                }
                None => Event::Fatal(ProtocolError::Unexpected(Kind::Resize).to_string()),
            },
            Ok(Some(f)) => Event::Fatal(ProtocolError::Unexpected(f.kind()).to_string()),
            Ok(None) | Err(ProtocolError::Io(_)) => Event::HostGone,
            Err(e) => Event::Fatal(e.to_string()),
        };
        let _ = tx.send(event);
        return;
    }
}

/// Runs connections on their own threads, at most `max` at once.
#[derive(Clone)]
pub struct Server {
    active: Arc<AtomicUsize>,
    max: usize,
    ops: Arc<dyn SyncOps>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("active", &self.active())
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A server for at most `max` connections at once, doing `Sync` requests through `ops`
    /// (the agent: [`LinuxGuest`](crate::guest::LinuxGuest)).
    pub fn new(max: usize, ops: Arc<dyn SyncOps>) -> Self {
        Server {
            active: Arc::new(AtomicUsize::new(0)),
            max,
            ops,
        }
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Serves a connection on a new thread (or, when `max` are already being served or no
    /// thread can be started, answers `Error` right here and drops it).
    pub fn spawn<R, W>(&self, reader: R, mut writer: W)
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let refuse = |w: &mut W, errno: i32, msg: &str| {
            let frame = Frame::Error {
                errno,
                message: msg.to_string(),
            };
            if let Ok(bytes) = frame.encode() {
                let _ = w.write_all(&bytes);
            }
        };
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            refuse(&mut writer, libc::EBUSY, "agent busy: too many connections");
            return;
        }
        let active = self.active.clone();
        let ops = self.ops.clone();
        // The writer moves into the thread only if the thread starts; keep a way to answer.
        let slot = Arc::new(Mutex::new(Some((reader, writer))));
        let theirs = slot.clone();
        let started = thread::Builder::new()
            .stack_size(STACK_SIZE)
            .spawn(move || {
                let taken = theirs.lock().ok().and_then(|mut s| s.take());
                if let Some((r, w)) = taken {
                    handle_connection(r, w, &*ops);
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = started {
            self.active.fetch_sub(1, Ordering::SeqCst);
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            if let Some((_, mut w)) = taken {
                refuse(
                    &mut w,
                    e.raw_os_error().unwrap_or(0),
                    "agent cannot start a thread",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::fake::{Call, Recorder};
    use crate::guest::Step;
    use crate::{write_frame, SyncRequest, MAX_FRAME, MAX_SYNC_PAYLOAD};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    /// A connection to a freshly spawned handler; returns the host's end and the handler's
    /// thread (whose result is the outcome).
    fn connect() -> (UnixStream, thread::JoinHandle<Outcome>) {
        connect_with(Arc::new(Recorder::default()))
    }

    /// Like [`connect`], with `ops` doing the `Sync` steps.
    fn connect_with(ops: Arc<Recorder>) -> (UnixStream, thread::JoinHandle<Outcome>) {
        let (host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let handle = thread::spawn(move || {
            let r = agent.try_clone().unwrap();
            handle_connection(r, agent, &*ops)
        });
        (host, handle)
    }

    fn recording_server(max: usize) -> Server {
        Server::new(max, Arc::new(Recorder::default()))
    }

    fn exec(req: ExecRequest, stdin: bool) -> Frame {
        Frame::Exec {
            request: req,
            stdin,
        }
    }

    /// Reads frames until the final one: (stdout, stderr, final frame).
    fn collect(host: &mut UnixStream) -> (Vec<u8>, Vec<u8>, Frame) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match read_frame(host, Peer::Agent)
                .unwrap()
                .expect("EOF before the final frame")
            {
                Frame::Started(pid) => assert!(pid > 0),
                Frame::Stdout(d) => out.extend_from_slice(&d),
                Frame::Stderr(d) => err.extend_from_slice(&d),
                f => return (out, err, f),
            }
        }
    }

    fn run(req: ExecRequest) -> (Vec<u8>, Vec<u8>, Frame) {
        let (mut host, handle) = connect();
        write_frame(&mut host, &exec(req, false)).unwrap();
        let r = collect(&mut host);
        drop(host);
        assert!(matches!(handle.join().unwrap(), Outcome::Finished(_)));
        r
    }

    #[test]
    fn exit_code_and_separate_streams() {
        let (out, err, fin) = run(ExecRequest::shell("echo out; echo err >&2; exit 7"));
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err\n");
        assert_eq!(fin, Frame::Exit(7));
    }

    #[test]
    fn killed_by_a_signal() {
        let (_, _, fin) = run(ExecRequest::shell("kill -TERM $$"));
        assert_eq!(fin, Frame::Signal(libc::SIGTERM));
        let (_, _, fin) = run(ExecRequest::shell("kill -KILL $$"));
        assert_eq!(fin, Frame::Signal(libc::SIGKILL));
    }

    #[test]
    fn missing_command_is_an_error_frame_with_enoent() {
        let (mut host, handle) = connect();
        write_frame(&mut host, &exec(ExecRequest::new(["/no/such/cmd"]), false)).unwrap();
        match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno, message } => {
                assert_eq!(errno, libc::ENOENT);
                assert!(message.contains("/no/such/cmd"), "{message}");
            }
            f => panic!("{f:?}"),
        }
        // Then the agent closes the connection.
        assert!(read_frame(&mut host, Peer::Agent).unwrap().is_none());
        assert!(matches!(handle.join().unwrap(), Outcome::SpawnFailed(_)));
        let (mut host, _) = connect();
        write_frame(
            &mut host,
            &exec(ExecRequest::new(["true"]).cwd("/no/dir"), false),
        )
        .unwrap();
        match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno, message } => {
                assert_eq!(errno, libc::ENOENT);
                assert!(message.contains("/no/dir"), "{message}");
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn env_and_cwd_are_applied() {
        let req = ExecRequest::shell("pwd; echo \"$LOFT_X\"")
            .env("LOFT_X", "a b")
            .cwd("/tmp");
        let (out, _, fin) = run(req);
        assert_eq!(String::from_utf8(out).unwrap(), "/tmp\na b\n");
        assert_eq!(fin, Frame::Exit(0));
    }

    #[test]
    fn stdin_is_fed_and_closed() {
        let (mut host, handle) = connect();
        write_frame(&mut host, &exec(ExecRequest::new(["cat"]), true)).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // Write the input from another thread while this one reads the output.
        let mut w = host.try_clone().unwrap();
        let input = data.clone();
        let writer = thread::spawn(move || {
            for chunk in input.chunks(CHUNK) {
                write_frame(&mut w, &Frame::Stdin(chunk.to_vec())).unwrap();
            }
            write_frame(&mut w, &Frame::StdinEof).unwrap();
        });
        let (out, _, fin) = collect(&mut host);
        writer.join().unwrap();
        assert_eq!(fin, Frame::Exit(0));
        assert!(out == data, "stdout differs ({} bytes)", out.len());
        drop(host);
        assert!(matches!(handle.join().unwrap(), Outcome::Finished(_)));
    }

    #[test]
    fn input_for_a_command_that_does_not_read_is_dropped() {
        let (mut host, _) = connect();
        write_frame(&mut host, &exec(ExecRequest::new(["true"]), true)).unwrap();
        for _ in 0..4 {
            // Ignore errors: the agent may be done already.
            let _ = write_frame(&mut host, &Frame::Stdin(vec![1; CHUNK]));
        }
        let _ = write_frame(&mut host, &Frame::StdinEof);
        let (_, _, fin) = collect(&mut host);
        assert_eq!(fin, Frame::Exit(0));
    }

    #[test]
    fn stdin_is_dev_null_without_the_flag() {
        let (out, _, fin) = run(ExecRequest::shell("cat; echo done"));
        assert_eq!(out, b"done\n");
        assert_eq!(fin, Frame::Exit(0));
    }

    /// Sends raw bytes as the request and expects an `Error` frame with errno 0, then EOF.
    fn expect_rejected(bytes: &[u8]) -> String {
        let (mut host, handle) = connect();
        host.write_all(bytes).unwrap();
        let msg = match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno: 0, message } => message,
            f => panic!("{f:?}"),
        };
        assert!(read_frame(&mut host, Peer::Agent).unwrap().is_none());
        assert!(matches!(handle.join().unwrap(), Outcome::Rejected(_)));
        msg
    }

    #[test]
    fn malformed_requests_get_an_error_and_the_connection_closes() {
        let m = expect_rejected(&header(Kind::Exec, u32::MAX));
        assert!(m.contains("exceeds"), "{m}");
        let m = expect_rejected(b"GET / HTTP/1.0\r\n\r\n");
        assert!(m.contains("unknown frame kind"), "{m}");
        let m = expect_rejected(&Frame::Stdin(b"x".to_vec()).encode().unwrap());
        assert!(m.contains("unexpected Stdin"), "{m}");
        let m = expect_rejected(&Frame::Exit(0).encode().unwrap());
        assert!(m.contains("unexpected Exit"), "{m}");
        let mut bad = header(Kind::Exec, 3).to_vec();
        bad.extend_from_slice(&[crate::PROTOCOL_VERSION, 0, 0]);
        let m = expect_rejected(&bad);
        assert!(m.contains("malformed Exec"), "{m}");
    }

    #[test]
    fn a_request_of_another_version_gets_the_version_message() {
        for (kind, version) in [
            (Kind::Exec, crate::PROTOCOL_VERSION + 1),
            (Kind::ListDir, 1),
        ] {
            let mut bad = header(kind, 2).to_vec();
            bad.extend_from_slice(&[version, 0]);
            let (mut host, handle) = connect();
            host.write_all(&bad).unwrap();
            match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
                Frame::Error { errno, message } => {
                    assert_eq!(errno, EPROTO);
                    assert!(message.contains("protocol version mismatch"), "{message}");
                    assert!(message.contains(&format!("version {version}")), "{message}");
                }
                f => panic!("{f:?}"),
            }
            assert!(matches!(handle.join().unwrap(), Outcome::Rejected(_)));
        }
    }

    /// Sends a file request (and `content` as `Stdin` frames for a write), returns the frames
    /// up to the final one.
    fn file_request(req: crate::FileRequest, content: Option<&[u8]>) -> Vec<Frame> {
        let (mut host, handle) = connect();
        write_frame(&mut host, &Frame::File(req)).unwrap();
        if let Some(data) = content {
            for chunk in data.chunks(CHUNK) {
                write_frame(&mut host, &Frame::Stdin(chunk.to_vec())).unwrap();
            }
            write_frame(&mut host, &Frame::StdinEof).unwrap();
        }
        let mut frames = Vec::new();
        while let Some(f) = read_frame(&mut host, Peer::Agent).unwrap() {
            frames.push(f);
        }
        handle.join().unwrap();
        frames
    }

    fn errno_of(frames: &[Frame]) -> i32 {
        match frames.last() {
            Some(Frame::Error { errno, .. }) => *errno,
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn files_written_read_listed_removed() {
        use crate::FileRequest;
        let dir = std::env::temp_dir().join(format!("loft-agent-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("a/b/f.bin");
        let p = path.to_str().unwrap().to_string();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let write = |parents| FileRequest::Write {
            path: p.clone(),
            mode: 0o640,
            parents,
        };
        // No parents: ENOENT, and the answer comes although the content was still sent.
        assert_eq!(
            errno_of(&file_request(write(false), Some(&data))),
            libc::ENOENT
        );
        assert_eq!(file_request(write(true), Some(&data)), vec![Frame::Done]);
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read(&path).unwrap(), data);

        let read = |path: &str, limit| FileRequest::Read {
            path: path.into(),
            limit,
        };
        let frames = file_request(read(&p, data.len() as u64), None);
        assert_eq!(frames.last(), Some(&Frame::Done));
        let got: Vec<u8> = frames
            .iter()
            .flat_map(|f| match f {
                Frame::Data(d) => d.clone(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(got, data);
        assert_eq!(errno_of(&file_request(read(&p, 1000), None)), libc::EFBIG);
        let d = dir.to_str().unwrap();
        assert_eq!(errno_of(&file_request(read(d, 1000), None)), libc::EISDIR);
        let missing = format!("{d}/missing");
        assert_eq!(
            errno_of(&file_request(read(&missing, 1), None)),
            libc::ENOENT
        );

        let list = file_request(
            FileRequest::List {
                path: format!("{d}/a/b"),
            },
            None,
        );
        match &list[..] {
            [Frame::Entry(e), Frame::Done] => {
                assert_eq!(e.name, "f.bin");
                assert_eq!(e.size, data.len() as u64);
                assert_eq!(e.file_type, crate::FileType::File);
            }
            f => panic!("{f:?}"),
        }
        let remove = |recursive| FileRequest::Remove {
            path: format!("{d}/a"),
            recursive,
        };
        assert_eq!(
            errno_of(&file_request(remove(false), None)),
            libc::ENOTEMPTY
        );
        assert_eq!(file_request(remove(true), None), vec![Frame::Done]);
        assert!(!dir.join("a").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn kill_sends_the_signal_and_it_is_reported() {
        let (mut host, handle) = connect();
        write_frame(&mut host, &exec(ExecRequest::new(["sleep", "100"]), false)).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        write_frame(&mut host, &Frame::Kill(libc::SIGTERM)).unwrap();
        let (_, _, fin) = collect(&mut host);
        assert_eq!(fin, Frame::Signal(libc::SIGTERM));
        drop(host);
        handle.join().unwrap();
    }

    #[test]
    fn a_pty_command_has_a_terminal_of_the_size_asked() {
        let (mut host, handle) = connect();
        let req =
            ExecRequest::shell("tty >/dev/null && stty size; read l; echo got-$l").pty(24, 91);
        write_frame(&mut host, &exec(req, true)).unwrap();
        write_frame(&mut host, &Frame::Stdin(b"x\n".to_vec())).unwrap();
        let (out, err, fin) = collect(&mut host);
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("24 91\r\n"), "{out:?}");
        assert!(out.contains("got-x\r\n"), "{out:?}");
        assert!(err.is_empty());
        assert_eq!(fin, Frame::Exit(0));
        drop(host);
        handle.join().unwrap();
    }

    #[test]
    fn rlimits_are_set_in_the_command() {
        let req = ExecRequest::shell("ulimit -n; ulimit -t")
            .rlimit(crate::Resource::OpenFiles, 20, 30)
            .rlimit(crate::Resource::Cpu, 5, 5);
        let (out, _, fin) = run(req);
        assert_eq!(String::from_utf8_lossy(&out), "20\n5\n");
        assert_eq!(fin, Frame::Exit(0));
    }

    #[test]
    fn a_user_the_agent_cannot_become_is_a_spawn_error() {
        // As root this would work (and is what the guest tests check); as anyone else,
        // setgroups fails with EPERM before the command runs.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let (out, _, fin) = run(ExecRequest::shell("id -u; id -g").user(1000, 1001));
            assert_eq!(String::from_utf8_lossy(&out), "1000\n1001\n");
            assert_eq!(fin, Frame::Exit(0));
            return;
        }
        let (mut host, _) = connect();
        write_frame(
            &mut host,
            &exec(ExecRequest::new(["true"]).user(1, 1), false),
        )
        .unwrap();
        match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno, .. } => assert_eq!(errno, libc::EPERM),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn a_detached_command_outlives_the_connection() {
        let dir = std::env::temp_dir().join(format!("loft-agent-detach-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let script = format!("sleep 0.5; echo late > {}", dir.display());
        let (host, handle) = connect();
        let mut h = host;
        write_frame(&mut h, &exec(ExecRequest::shell(&script).detach(), false)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        drop(h);
        assert_eq!(handle.join().unwrap(), Outcome::Detached);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(std::fs::read_to_string(&dir).unwrap(), "late\n");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn truncated_request_then_close_is_rejected() {
        let (mut host, handle) = connect();
        host.write_all(&header(Kind::Exec, 100)).unwrap();
        host.write_all(&[crate::PROTOCOL_VERSION, 0]).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno: 0, message } => assert!(message.contains("inside a frame")),
            f => panic!("{f:?}"),
        }
        assert!(matches!(handle.join().unwrap(), Outcome::Rejected(_)));
    }

    #[test]
    fn closing_before_a_request_is_quiet() {
        let (host, handle) = connect();
        drop(host);
        assert_eq!(handle.join().unwrap(), Outcome::Closed);
    }

    #[test]
    fn protocol_error_while_running_aborts_the_command() {
        let (mut host, handle) = connect();
        write_frame(&mut host, &exec(ExecRequest::new(["sleep", "30"]), false)).unwrap();
        // Stdin data without having asked for a stdin pipe.
        write_frame(&mut host, &Frame::Stdin(b"x".to_vec())).unwrap();
        let t = Instant::now();
        let started = read_frame(&mut host, Peer::Agent).unwrap().unwrap();
        assert!(matches!(started, Frame::Started(_)), "{started:?}");
        match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno: 0, message } => assert!(message.contains("Stdin"), "{message}"),
            f => panic!("{f:?}"),
        }
        assert!(matches!(handle.join().unwrap(), Outcome::Aborted(_)));
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn oversized_frame_while_running_aborts() {
        let (mut host, handle) = connect();
        write_frame(&mut host, &exec(ExecRequest::new(["cat"]), true)).unwrap();
        host.write_all(&header(Kind::Stdin, MAX_FRAME + 1)).unwrap();
        let (_, _, fin) = collect(&mut host);
        assert!(matches!(fin, Frame::Error { errno: 0, .. }), "{fin:?}");
        assert!(matches!(handle.join().unwrap(), Outcome::Aborted(_)));
    }

    #[test]
    fn host_leaving_kills_the_command() {
        let (mut host, handle) = connect();
        let marker = std::env::temp_dir().join(format!("loft-agent-gone-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let script = format!("echo started; sleep 2; touch {}", marker.display());
        write_frame(&mut host, &exec(ExecRequest::shell(&script), false)).unwrap();
        let started = read_frame(&mut host, Peer::Agent).unwrap().unwrap();
        assert!(matches!(started, Frame::Started(_)), "{started:?}");
        assert_eq!(
            read_frame(&mut host, Peer::Agent).unwrap().unwrap(),
            Frame::Stdout(b"started\n".to_vec())
        );
        drop(host);
        assert_eq!(handle.join().unwrap(), Outcome::Abandoned);
        thread::sleep(Duration::from_millis(2500));
        assert!(!marker.exists(), "the command survived its host");
    }

    #[test]
    fn server_serves_concurrently_and_survives_bad_clients() {
        let server = recording_server(8);
        let flag = std::env::temp_dir().join(format!("loft-agent-conc-{}", std::process::id()));
        let _ = std::fs::remove_file(&flag);
        let open = |server: &Server| {
            let (host, agent) = UnixStream::pair().unwrap();
            host.set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            server.spawn(agent.try_clone().unwrap(), agent);
            host
        };
        // A bad client first: the server answers it and keeps going.
        let mut bad = open(&server);
        bad.write_all(b"\xff\xff\xff").unwrap();
        assert!(matches!(
            read_frame(&mut bad, Peer::Agent).unwrap(),
            Some(Frame::Error { .. })
        ));
        // The first command can only finish if the second runs while it waits.
        let mut waiter = open(&server);
        let script = format!(
            "while [ ! -e {0} ]; do sleep 0.02; done; echo seen",
            flag.display()
        );
        write_frame(&mut waiter, &exec(ExecRequest::shell(&script), false)).unwrap();
        let mut toucher = open(&server);
        let touch = ExecRequest::new(["touch".to_string(), flag.display().to_string()]);
        write_frame(&mut toucher, &exec(touch, false)).unwrap();
        assert_eq!(collect(&mut toucher).2, Frame::Exit(0));
        let (out, _, fin) = collect(&mut waiter);
        assert_eq!((out.as_slice(), fin), (&b"seen\n"[..], Frame::Exit(0)));
        let _ = std::fs::remove_file(&flag);
    }

    #[test]
    fn server_refuses_beyond_its_limit() {
        let server = recording_server(1);
        let (mut first, agent) = UnixStream::pair().unwrap();
        first
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        server.spawn(agent.try_clone().unwrap(), agent);
        // The first connection sits before its request; the second is turned away.
        let (mut second, agent) = UnixStream::pair().unwrap();
        second
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        server.spawn(agent.try_clone().unwrap(), agent);
        match read_frame(&mut second, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno, .. } => assert_eq!(errno, libc::EBUSY),
            f => panic!("{f:?}"),
        }
        write_frame(&mut first, &exec(ExecRequest::new(["true"]), false)).unwrap();
        assert_eq!(collect(&mut first).2, Frame::Exit(0));
        drop(first);
        let t = Instant::now();
        while server.active() > 0 && t.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.active(), 0);
    }
    fn sync_request(clone_id: Option<&str>) -> SyncRequest {
        SyncRequest {
            realtime: Duration::new(1_800_000_000, 5),
            entropy: vec![0x5a; 64],
            clone_id: clone_id.map(str::to_string),
        }
    }

    #[test]
    fn sync_runs_every_step_then_answers_synced_and_closes() {
        let ops = Arc::new(Recorder::default());
        let (mut host, handle) = connect_with(ops.clone());
        write_frame(&mut host, &Frame::Sync(sync_request(Some("vm-3")))).unwrap();
        assert_eq!(
            read_frame(&mut host, Peer::Agent).unwrap(),
            Some(Frame::Synced)
        );
        assert!(read_frame(&mut host, Peer::Agent).unwrap().is_none());
        assert_eq!(handle.join().unwrap(), Outcome::Synced);
        assert_eq!(
            ops.calls(),
            [
                Call::Clock(Duration::new(1_800_000_000, 5)),
                Call::Entropy(vec![0x5a; 64]),
                Call::Reseed,
                Call::CloneId(Some("vm-3".into())),
            ]
        );
    }

    #[test]
    fn failed_sync_step_is_an_error_frame_with_its_errno() {
        let ops = Arc::new(Recorder::failing(&[(Step::Entropy, libc::EPERM)]));
        let (mut host, handle) = connect_with(ops.clone());
        write_frame(&mut host, &Frame::Sync(sync_request(None))).unwrap();
        match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno, message } => {
                assert_eq!(errno, libc::EPERM);
                assert!(message.contains("add entropy"), "{message}");
            }
            f => panic!("{f:?}"),
        }
        assert!(read_frame(&mut host, Peer::Agent).unwrap().is_none());
        assert!(matches!(handle.join().unwrap(), Outcome::SyncFailed(_)));
        // The later steps were still tried.
        assert_eq!(ops.calls().len(), 4);
    }

    /// Sends raw bytes as a Sync and expects a rejection with no step run.
    fn expect_sync_rejected(bytes: &[u8]) -> String {
        let ops = Arc::new(Recorder::default());
        let (mut host, handle) = connect_with(ops.clone());
        host.write_all(bytes).unwrap();
        let msg = match read_frame(&mut host, Peer::Agent).unwrap().unwrap() {
            Frame::Error { errno: 0, message } => message,
            f => panic!("{f:?}"),
        };
        assert!(matches!(handle.join().unwrap(), Outcome::Rejected(_)));
        assert!(ops.calls().is_empty(), "a malformed Sync ran a step");
        msg
    }

    #[test]
    fn malformed_sync_is_rejected_without_running_a_step() {
        // Oversized: refused from the header, without waiting for the payload.
        let m = expect_sync_rejected(&header(Kind::Sync, MAX_SYNC_PAYLOAD + 1));
        assert!(m.contains("malformed Sync"), "{m}");
        let m = expect_sync_rejected(&header(Kind::Sync, u32::MAX));
        assert!(m.contains("exceeds"), "{m}");
        // Too little entropy.
        let mut req = sync_request(None).encode().unwrap();
        req[14] = 1;
        let mut bytes = header(Kind::Sync, req.len() as u32).to_vec();
        bytes.extend_from_slice(&req);
        let m = expect_sync_rejected(&bytes);
        assert!(m.contains("entropy"), "{m}");
        // A clone id that is not one.
        let mut req = sync_request(Some("abc")).encode().unwrap();
        *req.last_mut().unwrap() = b'/';
        let mut bytes = header(Kind::Sync, req.len() as u32).to_vec();
        bytes.extend_from_slice(&req);
        let m = expect_sync_rejected(&bytes);
        assert!(m.contains("clone id"), "{m}");
        // Truncated, then the host closes its side.
        let ops = Arc::new(Recorder::default());
        let (mut host, handle) = connect_with(ops.clone());
        host.write_all(&header(Kind::Sync, 80)).unwrap();
        host.write_all(&[1, 0, 0]).unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(matches!(
            read_frame(&mut host, Peer::Agent).unwrap(),
            Some(Frame::Error { errno: 0, .. })
        ));
        assert!(matches!(handle.join().unwrap(), Outcome::Rejected(_)));
        assert!(ops.calls().is_empty());
    }

    #[test]
    fn server_passes_sync_to_its_ops() {
        let ops = Arc::new(Recorder::default());
        let server = Server::new(4, ops.clone());
        let (mut host, agent) = UnixStream::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        server.spawn(agent.try_clone().unwrap(), agent);
        write_frame(&mut host, &Frame::Sync(sync_request(Some("s")))).unwrap();
        assert_eq!(
            read_frame(&mut host, Peer::Agent).unwrap(),
            Some(Frame::Synced)
        );
        assert_eq!(ops.calls()[3], Call::CloneId(Some("s".into())));
    }
}
