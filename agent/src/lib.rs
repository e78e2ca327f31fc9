//! The wire protocol between loft (the host) and `loft-agent` (the guest), and the agent's
//! connection handler ([`server`]).
//!
//! # Transport
//!
//! One stream connection per request (a command, a `Sync`, a file request): the agent listens on a vsock
//! port (default [`DEFAULT_PORT`]); the host reaches it through the VMM's Unix socket in
//! Firecracker's convention (`CONNECT <port>\n` → `OK <hostport>\n`, then a byte stream), see
//! `loft::agent_client`. Everything below is what flows on that byte stream.
//!
//! # Frames
//!
//! ```text
//! [kind: u8][len: u32 little-endian][payload: len bytes]      len <= MAX_FRAME (1 MiB)
//! ```
//!
//! A reader checks `kind` (known, and sent by the right side) and `len` (at most
//! [`MAX_FRAME`]) from the 5-byte header *before* it reads or allocates anything for the
//! payload, and the payload buffer only grows as bytes actually arrive, so a peer that claims
//! 4 GiB costs nothing.
//!
//! | kind | name | direction | payload |
//! | --- | --- | --- | --- |
//! | `0x01` | `Exec` | host → agent | the request, below (exactly one, first) |
//! | `0x02` | `Stdin` | host → agent | bytes for the command's stdin (only if the `stdin` flag was set), or a `WriteFile`'s content |
//! | `0x03` | `StdinEof` | host → agent | empty: close the command's stdin (a terminal gets ^D), or end a `WriteFile`'s content |
//! | `0x04` | `Sync` | host → agent | the request, below (exactly one, first; at most [`MAX_SYNC_PAYLOAD`] = 593 bytes) |
//! | `0x05`–`0x08` | `WriteFile`, `ReadFile`, `ListDir`, `Remove` | host → agent | a file request ([`files`]; exactly one, first) |
//! | `0x09` | `Kill` | host → agent | `i32` LE (> 0): send this signal to the running command |
//! | `0x0a` | `Resize` | host → agent | `u16` rows, `u16` cols (LE): the command's terminal's new size |
//! | `0x81` | `Stdout` | agent → host | a chunk of the command's stdout, as produced |
//! | `0x82` | `Stderr` | agent → host | a chunk of the command's stderr, as produced |
//! | `0x83` | `Exit` | agent → host | `i32` LE: the exit code (final frame) |
//! | `0x84` | `Signal` | agent → host | `i32` LE (> 0): the signal that killed the command (final frame) |
//! | `0x85` | `Error` | agent → host | `i32` LE errno (0 if none) + UTF-8 message (final frame) |
//! | `0x86` | `Synced` | agent → host | empty: every step of a `Sync` succeeded (final frame) |
//! | `0x87` | `Done` | agent → host | empty: a file request succeeded (final frame) |
//! | `0x88` | `Data` | agent → host | a chunk of the file a `ReadFile` reads |
//! | `0x89` | `Entry` | agent → host | one directory entry of a `ListDir` ([`DirEntry`]) |
//! | `0x8a` | `Started` | agent → host | `u32` LE: the command's guest pid (first answer to `Exec`) |
//!
//! The `Exec` payload (every integer little-endian, every string `u32` length +
//! UTF-8 bytes, at most [`MAX_STRING`] bytes, no NUL byte):
//!
//! ```text
//! u8  version = PROTOCOL_VERSION (2)
//! u8  flags: bit 0 = stdin frames follow (else the command's stdin is /dev/null);
//!     bit 1 = run on a new pseudo-terminal; bit 2 = detached (not killed when the host
//!     leaves); others 0
//! u32 argc (1..=MAX_ARGS), then argc strings (argv[0] non-empty; looked up in $PATH)
//! u32 envc (0..=MAX_ENV), then envc (name, value) string pairs (name non-empty, no '='),
//!     added to the agent's environment
//! u8  has_cwd (0 or 1), then the working directory string if 1
//! u8  has_user (0 or 1), then if 1: u32 uid, u32 gid, u32 ngroups (..=MAX_GROUPS = 64),
//!     ngroups u32 supplementary groups (no id may be u32::MAX)
//! u8  nrlimits (..=MAX_RLIMITS = 16), then each: u8 resource (RLIMIT_*, < 16), u64 soft,
//!     u64 hard (soft <= hard; u64::MAX = unlimited)
//! u16 rows, u16 cols: the terminal's size (only with flag bit 1)
//! (nothing after it)
//! ```
//!
//! The command starts in the agent's environment plus `env`, in `cwd`, with the rlimits set
//! and then (if given) the user's groups, gid and uid; on a terminal it leads a new session
//! with the terminal as its controlling terminal, and stdin, stdout and stderr all are the
//! terminal (its output comes as `Stdout`).
//!
//! # Versions
//!
//! Every request payload starts with [`PROTOCOL_VERSION`]. An agent answers a request of any
//! other version with `Error`, errno [`EPROTO`] (71) and a message naming both versions, and
//! closes; the host reports that as a version mismatch. Host and guest agent are built from the
//! same source, so a mismatch means a guest image from another loft.
//!
//! # Conversation
//!
//! 1. The host sends `Exec`, then, if it set the stdin flag, any number of `Stdin` frames and
//!    one `StdinEof` (which it may send at any time; the agent drops input the command does
//!    not read); and at any time `Kill` (a signal for the command) and, on a terminal,
//!    `Resize`. The agent answers `Started` with the command's pid once it runs.
//! 2. The agent answers with `Stdout` / `Stderr` frames as the command writes (the two streams
//!    are kept apart; their relative order is not preserved), then **exactly one** final frame:
//!    `Exit`, `Signal`, or `Error`. Output ends when both pipes are closed, i.e. when the
//!    command *and* anything it left running in the background with those pipes open are done.
//! 3. `Error` means the command did not run to completion: it could not be started (the errno
//!    says why: `ENOENT` = 2 for a missing command or working directory, `EACCES` = 13, ...),
//!    or the host broke the protocol (errno 0). The host maps it to an error, not to an exit
//!    status (a caller wanting shell semantics maps `ENOENT` to 127).
//! 4. The host keeps its end open until it has read the final frame, then closes. If the host
//!    closes (or the stream breaks) before that, the agent kills the command (`SIGKILL` to its
//!    process group), unless it was started detached: then it runs on, its output dropped.
//!
//! # Sync: after a snapshot restore
//!
//! A restored guest goes on exactly where its snapshot was taken: its wall clock is behind by
//! however long the snapshot was stored, and every clone of one snapshot starts with the same
//! kernel RNG state. Right after a restore, before any command, the host opens a connection
//! and sends one `Sync` frame instead of `Exec`. Its payload (little-endian):
//!
//! ```text
//! u8  version = PROTOCOL_VERSION (2)
//! u8  flags = 0 (reserved)
//! u64 seconds since the Unix epoch (the host's CLOCK_REALTIME), at most i64::MAX
//! u32 nanoseconds, below 1_000_000_000
//! u16 entropy length (MIN_SYNC_ENTROPY..=MAX_SYNC_ENTROPY, 32..=512), then that many bytes
//!     of fresh host randomness
//! u8  clone id length (0 = none, else 1..=MAX_CLONE_ID = 64), then the id: bytes of
//!     [A-Za-z0-9._-]
//! (nothing after it)
//! ```
//!
//! A `Sync` header announcing more than [`MAX_SYNC_PAYLOAD`] bytes is refused from the header
//! alone. The agent then, in this order: sets `CLOCK_REALTIME` (`clock_settime`); adds the
//! entropy to the input pool and credits it (`RNDADDENTROPY` on `/dev/urandom`, 8 bits per
//! byte); forces a reseed of the CRNG from that pool (`RNDRESEEDCRNG`: new input alone does
//! not make an initialised CRNG reseed now, Linux 6.1 does that on a schedule); and writes the clone id
//! and a newline to `/run/loft/clone-id` (creating `/run/loft`), or removes that file when no
//! id was given, so that it always holds the id of the latest `Sync`. Every step is tried even
//! if an earlier one failed (a wrong clock is no reason to keep the shared RNG state). The
//! answer is `Synced` when all succeeded, else `Error` with the errno of the first step that
//! failed and a message naming every failed step; then the agent closes the connection.
//!
//! A malformed, oversized or unexpected frame from the host makes the agent answer `Error`
//! (errno 0) and close that connection; other connections are not affected. The host treats
//! anything unexpected from the agent the same way, as a typed error.

use std::fmt;
use std::io::{self, Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(feature = "client")]
pub mod client;
pub mod fileops;
pub mod files;
pub mod guest;
pub mod pty;
pub mod server;

pub use files::{DirEntry, FileRequest, FileType};

/// The vsock port the agent listens on by default.
pub const DEFAULT_PORT: u32 = 52;
/// Largest frame payload either side accepts (and sends).
pub const MAX_FRAME: u32 = 1 << 20;
/// Bytes in a frame header: kind (1) + length (4).
pub const HEADER_LEN: usize = 5;
/// Most `argv` words in an `Exec` request.
pub const MAX_ARGS: usize = 4096;
/// Most environment variables in an `Exec` request.
pub const MAX_ENV: usize = 4096;
/// Longest string in an `Exec` request (Linux's `MAX_ARG_STRLEN`).
pub const MAX_STRING: usize = 128 * 1024;
/// Version byte at the start of every request payload (`Exec`, `Sync`, the file requests): an
/// agent answers a request of another version with `Error` (errno [`EPROTO`]) and a message
/// naming both versions.
pub const PROTOCOL_VERSION: u8 = 2;
/// The errno of an `Error` answering a request of another protocol version (Linux's `EPROTO`).
pub const EPROTO: i32 = 71;
/// Most supplementary groups in an `Exec` request's user.
pub const MAX_GROUPS: usize = 64;
/// Most rlimits in an `Exec` request (Linux has 16 resources).
pub const MAX_RLIMITS: usize = 16;
/// Size of the data chunks both sides put in one `Stdin` / `Stdout` / `Stderr` frame.
pub const CHUNK: usize = 64 * 1024;

/// Fewest entropy bytes in a `Sync` request (256 bits: a full CRNG key).
pub const MIN_SYNC_ENTROPY: usize = 32;
/// Most entropy bytes in a `Sync` request (the kernel takes any amount; this bounds the frame).
pub const MAX_SYNC_ENTROPY: usize = 512;
/// Longest clone id in a `Sync` request.
pub const MAX_CLONE_ID: usize = 64;
/// Largest `Sync` payload: version, flags, seconds, nanoseconds, the entropy and the clone id
/// with their lengths.
pub const MAX_SYNC_PAYLOAD: u32 = (1 + 1 + 8 + 4 + 2 + MAX_SYNC_ENTROPY + 1 + MAX_CLONE_ID) as u32;

const FLAG_STDIN: u8 = 1;
const FLAG_PTY: u8 = 2;
const FLAG_DETACH: u8 = 4;
const EXEC_FLAGS: u8 = FLAG_STDIN | FLAG_PTY | FLAG_DETACH;

/// A frame's kind byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host → agent: the command to run.
    Exec = 0x01,
    /// Host → agent: stdin bytes.
    Stdin = 0x02,
    /// Host → agent: end of stdin.
    StdinEof = 0x03,
    /// Host → agent: set the clock, reseed the RNG, store the clone id (after a restore).
    Sync = 0x04,
    /// Host → agent: write a file; its bytes follow as `Stdin` frames, ended by `StdinEof`.
    WriteFile = 0x05,
    /// Host → agent: read a file (answered with `Data` frames, then `Done`).
    ReadFile = 0x06,
    /// Host → agent: list a directory (answered with `Entry` frames, then `Done`).
    ListDir = 0x07,
    /// Host → agent: remove a file or directory (answered with `Done`).
    Remove = 0x08,
    /// Host → agent: send a signal to the running command.
    Kill = 0x09,
    /// Host → agent: the command's terminal has a new size.
    Resize = 0x0a,
    /// Agent → host: stdout bytes.
    Stdout = 0x81,
    /// Agent → host: stderr bytes.
    Stderr = 0x82,
    /// Agent → host: exit code (final).
    Exit = 0x83,
    /// Agent → host: killed by a signal (final).
    Signal = 0x84,
    /// Agent → host: the command could not be run, or a `Sync` step failed (final).
    Error = 0x85,
    /// Agent → host: every step of a `Sync` succeeded (final).
    Synced = 0x86,
    /// Agent → host: a file request succeeded (final).
    Done = 0x87,
    /// Agent → host: a chunk of a file being read.
    Data = 0x88,
    /// Agent → host: one directory entry.
    Entry = 0x89,
    /// Agent → host: the command started, with this guest pid (right after `Exec`).
    Started = 0x8a,
}

impl Kind {
    /// The kind for a byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Exec,
            0x02 => Kind::Stdin,
            0x03 => Kind::StdinEof,
            0x04 => Kind::Sync,
            0x05 => Kind::WriteFile,
            0x06 => Kind::ReadFile,
            0x07 => Kind::ListDir,
            0x08 => Kind::Remove,
            0x09 => Kind::Kill,
            0x0a => Kind::Resize,
            0x81 => Kind::Stdout,
            0x82 => Kind::Stderr,
            0x83 => Kind::Exit,
            0x84 => Kind::Signal,
            0x85 => Kind::Error,
            0x86 => Kind::Synced,
            0x87 => Kind::Done,
            0x88 => Kind::Data,
            0x89 => Kind::Entry,
            0x8a => Kind::Started,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind can have: [`MAX_FRAME`] but for the small
    /// fixed-layout `Sync` and the empty `Synced`, whose headers are checked against it.
    pub fn max_len(self) -> u32 {
        match self {
            Kind::Sync => MAX_SYNC_PAYLOAD,
            Kind::Synced | Kind::Done | Kind::StdinEof => 0,
            Kind::Kill | Kind::Resize | Kind::Started => 4,
            Kind::ReadFile | Kind::ListDir | Kind::Remove | Kind::WriteFile => {
                files::MAX_FILE_REQUEST
            }
            Kind::Entry => files::MAX_ENTRY,
            _ => MAX_FRAME,
        }
    }

    /// Which side sends frames of this kind.
    pub fn sender(self) -> Peer {
        if (self as u8) < 0x80 {
            Peer::Host
        } else {
            Peer::Agent
        }
    }
}

/// One side of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// loft, on the host.
    Host,
    /// loft-agent, in the guest.
    Agent,
}

/// What can be wrong with a frame, or with the stream carrying frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A header announced more than [`MAX_FRAME`] bytes (nothing was allocated for it).
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME} bytes")]
    FrameTooLarge {
        /// The announced payload length.
        len: u64,
    },
    /// A header's kind byte is no known kind.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A known kind, but not one this side may receive (or not at this point).
    #[error("unexpected {0:?} frame")]
    Unexpected(Kind),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// A payload that does not decode.
    #[error("malformed {kind:?} frame: {reason}")]
    Malformed {
        /// The frame's kind.
        kind: Kind,
        /// What is wrong with it.
        reason: String,
    },
    /// A request of another protocol version: host and agent come from different loft
    /// versions.
    #[error(
        "protocol version mismatch: the request is version {got}, this side speaks version \
         {PROTOCOL_VERSION} (the host's loft and the guest image's loft-agent must come from \
         the same loft; rebuild the guest with firmware/build.sh)"
    )]
    Version {
        /// The version byte received.
        got: u8,
    },
    /// The stream failed.
    #[error("i/o error")]
    Io(#[from] io::Error),
}

pub(crate) fn malformed(kind: Kind, reason: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        kind,
        reason: reason.into(),
    }
}

/// What the host asks the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// The program (looked up in `$PATH` unless it contains a `/`) and its arguments.
    pub argv: Vec<String>,
    /// Environment variables added to (or replacing those of) the agent's environment.
    pub env: Vec<(String, String)>,
    /// Working directory; the agent's (`/`) when `None`.
    pub cwd: Option<String>,
    /// How long the host waits for the command to end: past it the host closes the connection,
    /// which makes the agent kill the command. `None`: no limit. Host side only: not sent.
    pub timeout: Option<std::time::Duration>,
    /// Most bytes the host takes from each of stdout and stderr; beyond, the command is killed
    /// the same way and the exec fails. `None`: [`DEFAULT_OUTPUT_LIMIT`]. Host side only.
    pub output_limit: Option<usize>,
    /// Run as this user instead of root (the agent's user).
    pub user: Option<User>,
    /// Resource limits set for the command before it starts (before it drops to `user`).
    pub rlimits: Vec<Rlimit>,
    /// Run on a new pseudo-terminal of this size: its stdin, stdout and stderr are the
    /// terminal, its output comes as `Stdout` frames, and it leads a new session with the
    /// terminal as its controlling terminal.
    pub pty: Option<WindowSize>,
    /// Leave the command running when the host's connection ends before it does (by default
    /// the agent kills it then).
    pub detach: bool,
}

/// The guest user a command runs as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct User {
    /// User id (not `u32::MAX`).
    pub uid: u32,
    /// Group id (not `u32::MAX`).
    pub gid: u32,
    /// Supplementary groups (at most [`MAX_GROUPS`]); none when empty.
    pub groups: Vec<u32>,
}

/// A resource an [`Rlimit`] limits: Linux's `RLIMIT_*`, with their numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)]
pub enum Resource {
    /// CPU time, in seconds (`RLIMIT_CPU`).
    Cpu = 0,
    /// Largest file the command may create, in bytes (`RLIMIT_FSIZE`).
    FileSize = 1,
    Data = 2,
    Stack = 3,
    Core = 4,
    Rss = 5,
    /// Processes (threads) of the command's user (`RLIMIT_NPROC`).
    Processes = 6,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    OpenFiles = 7,
    MemLock = 8,
    /// Address space, in bytes (`RLIMIT_AS`).
    AddressSpace = 9,
    Locks = 10,
    SigPending = 11,
    MsgQueue = 12,
    Nice = 13,
    RtPrio = 14,
    RtTime = 15,
}

impl Resource {
    /// The resource with this `RLIMIT_*` number.
    pub fn from_u8(n: u8) -> Option<Resource> {
        use Resource::*;
        [
            Cpu,
            FileSize,
            Data,
            Stack,
            Core,
            Rss,
            Processes,
            OpenFiles,
            MemLock,
            AddressSpace,
            Locks,
            SigPending,
            MsgQueue,
            Nice,
            RtPrio,
            RtTime,
        ]
        .get(usize::from(n))
        .copied()
    }
}

/// No limit, as an [`Rlimit`] value (`RLIM_INFINITY`).
pub const UNLIMITED: u64 = u64::MAX;

/// A resource limit: `setrlimit(resource, {soft, hard})` in the command before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// What is limited.
    pub resource: Resource,
    /// The soft limit (at most `hard`; [`UNLIMITED`] for none).
    pub soft: u64,
    /// The hard limit ([`UNLIMITED`] for none).
    pub hard: u64,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl WindowSize {
    /// The 4 bytes of a `Resize` payload (and of the `Exec` field): rows, cols, little-endian.
    pub fn to_bytes(self) -> [u8; 4] {
        let (r, c) = (self.rows.to_le_bytes(), self.cols.to_le_bytes());
        [r[0], r[1], c[0], c[1]]
    }

    /// From the 4 bytes of [`WindowSize::to_bytes`].
    pub fn from_bytes(b: [u8; 4]) -> Self {
        WindowSize {
            rows: u16::from_le_bytes([b[0], b[1]]),
            cols: u16::from_le_bytes([b[2], b[3]]),
        }
    }
}

/// What [`ExecRequest::output_limit`] is when not set: 64 MiB per stream.
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 << 20;

impl ExecRequest {
    /// A request to run `argv`.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// A request to run `/bin/sh -c script`.
    pub fn shell(script: &str) -> Self {
        Self::new(["/bin/sh", "-c", script])
    }

    /// Adds an environment variable.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Kills the command and fails the exec when it has not ended after `timeout`.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Kills the command and fails the exec when it writes more than `bytes` to stdout or to
    /// stderr (default [`DEFAULT_OUTPUT_LIMIT`]).
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = Some(bytes);
        self
    }

    /// Runs the command as user `uid` and group `gid` (no supplementary groups unless
    /// [`ExecRequest::groups`] adds some). The bundled guest has user `loft`, 1000:1000.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        let groups = self.user.take().map(|u| u.groups).unwrap_or_default();
        self.user = Some(User { uid, gid, groups });
        self
    }

    /// Supplementary groups for [`ExecRequest::user`] (root's gid 0 when no user is set).
    pub fn groups(mut self, groups: impl IntoIterator<Item = u32>) -> Self {
        let mut user = self.user.take().unwrap_or_default();
        user.groups = groups.into_iter().collect();
        self.user = Some(user);
        self
    }

    /// Sets a resource limit (soft and hard) for the command.
    pub fn rlimit(mut self, resource: Resource, soft: u64, hard: u64) -> Self {
        self.rlimits.push(Rlimit {
            resource,
            soft,
            hard,
        });
        self
    }

    /// Runs the command on a pseudo-terminal of `rows` × `cols`.
    pub fn pty(mut self, rows: u16, cols: u16) -> Self {
        self.pty = Some(WindowSize { rows, cols });
        self
    }

    /// Leaves the command running when the connection to it ends first.
    pub fn detach(mut self) -> Self {
        self.detach = true;
        self
    }

    /// The output limit in force.
    pub fn max_output(&self) -> usize {
        self.output_limit.unwrap_or(DEFAULT_OUTPUT_LIMIT)
    }

    /// Checks every bound and rule of the `Exec` payload (the same checks the agent makes).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |r: &str| Err(malformed(Kind::Exec, r));
        if self.argv.is_empty() {
            return bad("empty argv");
        }
        if self.argv[0].is_empty() {
            return bad("empty program name");
        }
        if self.argv.len() > MAX_ARGS {
            return bad("too many arguments");
        }
        if self.env.len() > MAX_ENV {
            return bad("too many environment variables");
        }
        let strings = self
            .argv
            .iter()
            .chain(self.env.iter().flat_map(|(k, v)| [k, v]))
            .chain(self.cwd.iter());
        for s in strings {
            check_string(s.as_bytes())?;
        }
        for (k, _) in &self.env {
            if k.is_empty() || k.contains('=') {
                return bad("environment variable name empty or containing '='");
            }
        }
        if let Some(u) = &self.user {
            if u.uid == u32::MAX || u.gid == u32::MAX || u.groups.contains(&u32::MAX) {
                return bad("user or group id 4294967295 (-1)");
            }
            if u.groups.len() > MAX_GROUPS {
                return bad("too many supplementary groups");
            }
        }
        if self.rlimits.len() > MAX_RLIMITS {
            return bad("too many rlimits");
        }
        if self.rlimits.iter().any(|l| l.soft > l.hard) {
            return bad("an rlimit's soft limit is above its hard limit");
        }
        Ok(())
    }

    /// The `Exec` payload; `stdin` says whether `Stdin` frames will follow.
    pub fn encode(&self, stdin: bool) -> Result<Vec<u8>, ProtocolError> {
        self.validate()?;
        let flags = [
            (stdin, FLAG_STDIN),
            (self.pty.is_some(), FLAG_PTY),
            (self.detach, FLAG_DETACH),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |f, (_, bit)| f | bit);
        let mut out = vec![PROTOCOL_VERSION, flags];
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        out.extend_from_slice(&(self.argv.len() as u32).to_le_bytes());
        for a in &self.argv {
            put_str(&mut out, a);
        }
        out.extend_from_slice(&(self.env.len() as u32).to_le_bytes());
        for (k, v) in &self.env {
            put_str(&mut out, k);
            put_str(&mut out, v);
        }
        match &self.cwd {
            Some(dir) => {
                out.push(1);
                put_str(&mut out, dir);
            }
            None => out.push(0),
        }
        match &self.user {
            Some(u) => {
                out.push(1);
                for n in [u.uid, u.gid, u.groups.len() as u32]
                    .iter()
                    .chain(&u.groups)
                {
                    out.extend_from_slice(&n.to_le_bytes());
                }
            }
            None => out.push(0),
        }
        out.push(self.rlimits.len() as u8);
        for l in &self.rlimits {
            out.push(l.resource as u8);
            out.extend_from_slice(&l.soft.to_le_bytes());
            out.extend_from_slice(&l.hard.to_le_bytes());
        }
        if let Some(size) = self.pty {
            out.extend_from_slice(&size.to_bytes());
        }
        if out.len() > MAX_FRAME as usize {
            return Err(ProtocolError::FrameTooLarge {
                len: out.len() as u64,
            });
        }
        Ok(out)
    }

    /// Decodes an `Exec` payload: the request and the stdin flag.
    pub fn decode(payload: &[u8]) -> Result<(ExecRequest, bool), ProtocolError> {
        let mut c = Cursor {
            kind: Kind::Exec,
            buf: payload,
        };
        c.version()?;
        let flags = c.u8()?;
        if flags & !EXEC_FLAGS != 0 {
            return Err(malformed(Kind::Exec, format!("unknown flags {flags:#04x}")));
        }
        let argc = c.count(MAX_ARGS, 1)?;
        if argc == 0 {
            return Err(malformed(Kind::Exec, "empty argv"));
        }
        let mut argv = Vec::new();
        for _ in 0..argc {
            argv.push(c.string()?);
        }
        let envc = c.count(MAX_ENV, 2)?;
        let mut env = Vec::new();
        for _ in 0..envc {
            let k = c.string()?;
            let v = c.string()?;
            env.push((k, v));
        }
        let cwd = match c.u8()? {
            0 => None,
            1 => Some(c.string()?),
            _ => return Err(malformed(Kind::Exec, "bad cwd marker")),
        };
        let user = match c.u8()? {
            0 => None,
            1 => {
                let (uid, gid) = (c.u32()?, c.u32()?);
                let n = c.u32()? as usize;
                if n > MAX_GROUPS {
                    return Err(malformed(Kind::Exec, "too many supplementary groups"));
                }
                let groups = (0..n).map(|_| c.u32()).collect::<Result<_, _>>()?;
                Some(User { uid, gid, groups })
            }
            _ => return Err(malformed(Kind::Exec, "bad user marker")),
        };
        let n = usize::from(c.u8()?);
        if n > MAX_RLIMITS {
            return Err(malformed(Kind::Exec, "too many rlimits"));
        }
        let mut rlimits = Vec::with_capacity(n);
        for _ in 0..n {
            let r = c.u8()?;
            let resource = Resource::from_u8(r)
                .ok_or_else(|| malformed(Kind::Exec, format!("unknown rlimit resource {r}")))?;
            let (soft, hard) = (c.u64()?, c.u64()?);
            rlimits.push(Rlimit {
                resource,
                soft,
                hard,
            });
        }
        let pty = if flags & FLAG_PTY != 0 {
            let b = c.take(4)?;
            Some(WindowSize::from_bytes([b[0], b[1], b[2], b[3]]))
        } else {
            None
        };
        c.end()?;
        let req = ExecRequest {
            argv,
            env,
            cwd,
            user,
            rlimits,
            pty,
            detach: flags & FLAG_DETACH != 0,
            ..Default::default()
        };
        req.validate()?;
        Ok((req, flags & FLAG_STDIN != 0))
    }
}

/// What the host asks the agent to do right after a snapshot restore (a `Sync` frame): set the
/// guest's wall clock, reseed its RNG with fresh entropy, and store which clone it is.
///
/// Its `Debug` output shows the entropy's length, not the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncRequest {
    /// The host's `CLOCK_REALTIME`: time since the Unix epoch (at most `i64::MAX` seconds).
    pub realtime: Duration,
    /// Fresh random bytes for the guest's RNG, credited as 8 bits each
    /// ([`MIN_SYNC_ENTROPY`]..=[`MAX_SYNC_ENTROPY`] bytes).
    pub entropy: Vec<u8>,
    /// Written to the guest's `/run/loft/clone-id` (removed when `None`): 1..=[`MAX_CLONE_ID`]
    /// bytes of `[A-Za-z0-9._-]`.
    pub clone_id: Option<String>,
}

impl fmt::Debug for SyncRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncRequest")
            .field("realtime", &self.realtime)
            .field("entropy", &format_args!("[{} bytes]", self.entropy.len()))
            .field("clone_id", &self.clone_id)
            .finish()
    }
}

impl SyncRequest {
    /// A request for the wall-clock time `realtime` (e.g. `SystemTime::now()`), checked.
    pub fn new(
        realtime: SystemTime,
        entropy: &[u8],
        clone_id: Option<&str>,
    ) -> Result<Self, ProtocolError> {
        let realtime = realtime
            .duration_since(UNIX_EPOCH)
            .map_err(|_| malformed(Kind::Sync, "time before the Unix epoch"))?;
        let req = SyncRequest {
            realtime,
            entropy: entropy.to_vec(),
            clone_id: clone_id.map(str::to_string),
        };
        req.validate()?;
        Ok(req)
    }

    /// Checks every bound and rule of the `Sync` payload (the same checks the agent makes).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let bad = |r: String| Err(malformed(Kind::Sync, r));
        if i64::try_from(self.realtime.as_secs()).is_err() {
            return bad(format!("{} seconds out of range", self.realtime.as_secs()));
        }
        let n = self.entropy.len();
        if !(MIN_SYNC_ENTROPY..=MAX_SYNC_ENTROPY).contains(&n) {
            return bad(format!(
                "{n} bytes of entropy, expected {MIN_SYNC_ENTROPY}..={MAX_SYNC_ENTROPY}"
            ));
        }
        if let Some(id) = &self.clone_id {
            check_clone_id(id.as_bytes())?;
        }
        Ok(())
    }

    /// The `Sync` payload.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.validate()?;
        let id = self.clone_id.as_deref().unwrap_or("");
        let mut out = Vec::with_capacity(MAX_SYNC_PAYLOAD as usize);
        out.extend_from_slice(&[PROTOCOL_VERSION, 0]);
        out.extend_from_slice(&self.realtime.as_secs().to_le_bytes());
        out.extend_from_slice(&self.realtime.subsec_nanos().to_le_bytes());
        // Both lengths fit: validate() bounded them.
        out.extend_from_slice(&(self.entropy.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.entropy);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        Ok(out)
    }

    /// Decodes a `Sync` payload.
    pub fn decode(payload: &[u8]) -> Result<SyncRequest, ProtocolError> {
        let bad = |r: String| Err(malformed(Kind::Sync, r));
        if payload.len() > MAX_SYNC_PAYLOAD as usize {
            return bad(format!(
                "{} bytes, at most {MAX_SYNC_PAYLOAD}",
                payload.len()
            ));
        }
        let mut c = Cursor {
            kind: Kind::Sync,
            buf: payload,
        };
        c.version()?;
        let flags = c.u8()?;
        if flags != 0 {
            return bad(format!("unknown flags {flags:#04x}"));
        }
        let secs = c.u64()?;
        if i64::try_from(secs).is_err() {
            return bad(format!("{secs} seconds out of range"));
        }
        let nanos = c.u32()?;
        if nanos >= 1_000_000_000 {
            return bad(format!("{nanos} nanoseconds out of range"));
        }
        // Lengths are checked against their bounds before anything is taken or copied.
        let n = usize::from(c.u16()?);
        if !(MIN_SYNC_ENTROPY..=MAX_SYNC_ENTROPY).contains(&n) {
            return bad(format!(
                "{n} bytes of entropy, expected {MIN_SYNC_ENTROPY}..={MAX_SYNC_ENTROPY}"
            ));
        }
        let entropy = c.take(n)?.to_vec();
        let clone_id = match usize::from(c.u8()?) {
            0 => None,
            n if n > MAX_CLONE_ID => return bad(format!("clone id of {n} bytes")),
            n => {
                let id = c.take(n)?;
                check_clone_id(id)?;
                // Checked: ASCII only.
                Some(String::from_utf8_lossy(id).into_owned())
            }
        };
        c.end()?;
        Ok(SyncRequest {
            realtime: Duration::new(secs, nanos),
            entropy,
            clone_id,
        })
    }
}

/// A clone id: 1..=[`MAX_CLONE_ID`] bytes of `[A-Za-z0-9._-]`.
fn check_clone_id(id: &[u8]) -> Result<(), ProtocolError> {
    if id.is_empty() || id.len() > MAX_CLONE_ID {
        return Err(malformed(
            Kind::Sync,
            format!(
                "clone id of {} bytes, expected 1..={MAX_CLONE_ID}",
                id.len()
            ),
        ));
    }
    if !id
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(malformed(
            Kind::Sync,
            "clone id has a character outside [A-Za-z0-9._-]",
        ));
    }
    Ok(())
}

fn check_string(s: &[u8]) -> Result<(), ProtocolError> {
    if s.len() > MAX_STRING {
        return Err(malformed(Kind::Exec, "string too long"));
    }
    if s.contains(&0) {
        return Err(malformed(Kind::Exec, "NUL byte in a string"));
    }
    Ok(())
}

/// A bounds-checked reader over a request payload.
pub(crate) struct Cursor<'a> {
    kind: Kind,
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(kind: Kind, buf: &'a [u8]) -> Self {
        Cursor { kind, buf }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(malformed(self.kind, "truncated payload"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// The version byte every request starts with.
    pub(crate) fn version(&mut self) -> Result<(), ProtocolError> {
        match self.u8()? {
            PROTOCOL_VERSION => Ok(()),
            got => Err(ProtocolError::Version { got }),
        }
    }

    /// Nothing may follow the last field.
    pub(crate) fn end(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.kind, "trailing bytes"))
        }
    }

    /// A count of items of at least `strings_each` strings (4 bytes each at least): bounded by
    /// `max` and by what the rest of the payload can possibly hold.
    fn count(&mut self, max: usize, strings_each: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n > max || n > self.buf.len() / (4 * strings_each) {
            return Err(malformed(self.kind, format!("count {n} out of bounds")));
        }
        Ok(n)
    }

    pub(crate) fn string(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(malformed(Kind::Exec, "string too long"));
        }
        let bytes = self.take(len)?;
        check_string(bytes)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| malformed(self.kind, "string not UTF-8"))
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The command; `stdin`: `Stdin` frames follow.
    Exec {
        /// What to run.
        request: ExecRequest,
        /// Whether the command's stdin is a pipe fed by `Stdin` frames.
        stdin: bool,
    },
    /// Bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// End of the command's stdin.
    StdinEof,
    /// Set the clock, reseed the RNG, store the clone id.
    Sync(SyncRequest),
    /// A chunk of stdout.
    Stdout(Vec<u8>),
    /// A chunk of stderr.
    Stderr(Vec<u8>),
    /// The command exited with this code.
    Exit(i32),
    /// The command was killed by this signal.
    Signal(i32),
    /// The command could not be run.
    Error {
        /// The OS error number, 0 if none.
        errno: i32,
        /// What happened.
        message: String,
    },
    /// Every step of a `Sync` succeeded.
    Synced,
    /// A file request (`WriteFile`, `ReadFile`, `ListDir`, `Remove`).
    File(FileRequest),
    /// Send this signal to the command.
    Kill(i32),
    /// The command's terminal has a new size.
    Resize(WindowSize),
    /// A file request succeeded.
    Done,
    /// A chunk of a file being read.
    Data(Vec<u8>),
    /// A directory entry.
    Entry(DirEntry),
    /// The command started with this guest pid.
    Started(u32),
}

impl Frame {
    /// This frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Exec { .. } => Kind::Exec,
            Frame::Stdin(_) => Kind::Stdin,
            Frame::StdinEof => Kind::StdinEof,
            Frame::Sync(_) => Kind::Sync,
            Frame::Stdout(_) => Kind::Stdout,
            Frame::Stderr(_) => Kind::Stderr,
            Frame::Exit(_) => Kind::Exit,
            Frame::Signal(_) => Kind::Signal,
            Frame::Error { .. } => Kind::Error,
            Frame::Synced => Kind::Synced,
            Frame::File(r) => r.kind(),
            Frame::Kill(_) => Kind::Kill,
            Frame::Resize(_) => Kind::Resize,
            Frame::Done => Kind::Done,
            Frame::Data(_) => Kind::Data,
            Frame::Entry(_) => Kind::Entry,
            Frame::Started(_) => Kind::Started,
        }
    }

    /// The whole frame, header included, ready for one `write_all`.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let payload = match self {
            Frame::Exec { request, stdin } => request.encode(*stdin)?,
            Frame::Stdin(d) | Frame::Stdout(d) | Frame::Stderr(d) | Frame::Data(d) => d.clone(),
            Frame::StdinEof | Frame::Synced | Frame::Done => Vec::new(),
            Frame::Sync(request) => request.encode()?,
            Frame::File(request) => request.encode()?,
            Frame::Entry(entry) => entry.encode(),
            Frame::Resize(size) => size.to_bytes().to_vec(),
            Frame::Started(pid) => pid.to_le_bytes().to_vec(),
            Frame::Exit(v) | Frame::Signal(v) | Frame::Kill(v) => v.to_le_bytes().to_vec(),
            Frame::Error { errno, message } => {
                let mut p = errno.to_le_bytes().to_vec();
                // Keep the message within the limit (cut at a char boundary).
                let mut end = message.len().min(MAX_FRAME as usize - 4);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&message.as_bytes()[..end]);
                p
            }
        };
        if payload.len() > MAX_FRAME as usize {
            return Err(ProtocolError::FrameTooLarge {
                len: payload.len() as u64,
            });
        }
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&header(self.kind(), payload.len() as u32));
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes a payload of a given kind.
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<Frame, ProtocolError> {
        let four = || -> Result<[u8; 4], ProtocolError> {
            payload
                .try_into()
                .map_err(|_| malformed(kind, format!("{} bytes, expected 4", payload.len())))
        };
        let i32_payload = || four().map(i32::from_le_bytes);
        let signal = || match i32_payload()? {
            s if s > 0 => Ok(s),
            s => Err(malformed(kind, format!("signal {s}"))),
        };
        Ok(match kind {
            Kind::Exec => {
                let (request, stdin) = ExecRequest::decode(payload)?;
                Frame::Exec { request, stdin }
            }
            Kind::Stdin => Frame::Stdin(payload.to_vec()),
            Kind::StdinEof if payload.is_empty() => Frame::StdinEof,
            Kind::StdinEof => return Err(malformed(kind, "payload not empty")),
            Kind::Sync => Frame::Sync(SyncRequest::decode(payload)?),
            Kind::Synced if payload.is_empty() => Frame::Synced,
            Kind::Done if payload.is_empty() => Frame::Done,
            Kind::Synced | Kind::Done => return Err(malformed(kind, "payload not empty")),
            Kind::WriteFile | Kind::ReadFile | Kind::ListDir | Kind::Remove => {
                Frame::File(FileRequest::decode(kind, payload)?)
            }
            Kind::Kill => Frame::Kill(signal()?),
            Kind::Resize => Frame::Resize(WindowSize::from_bytes(four()?)),
            Kind::Data => Frame::Data(payload.to_vec()),
            Kind::Started => Frame::Started(u32::from_le_bytes(four()?)),
            Kind::Entry => Frame::Entry(DirEntry::decode(payload)?),
            Kind::Stdout => Frame::Stdout(payload.to_vec()),
            Kind::Stderr => Frame::Stderr(payload.to_vec()),
            Kind::Exit => Frame::Exit(i32_payload()?),
            Kind::Signal => Frame::Signal(signal()?),
            Kind::Error => {
                if payload.len() < 4 {
                    return Err(malformed(kind, "shorter than its errno"));
                }
                let errno = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                Frame::Error {
                    errno,
                    message: String::from_utf8_lossy(&payload[4..]).into_owned(),
                }
            }
        })
    }
}

/// A frame header.
pub fn header(kind: Kind, len: u32) -> [u8; HEADER_LEN] {
    let l = len.to_le_bytes();
    [kind as u8, l[0], l[1], l[2], l[3]]
}

/// Reads one header: `None` on a clean end of stream before its first byte. The kind must be
/// one `from` sends and the length at most [`MAX_FRAME`] (and at most [`Kind::max_len`]).
pub fn read_header<R: Read + ?Sized>(
    r: &mut R,
    from: Peer,
) -> Result<Option<(Kind, u32)>, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        // Check the kind as soon as it is there: garbage fails without waiting for more.
        if got >= 1 {
            let kind = Kind::from_u8(h[0]).ok_or(ProtocolError::UnknownKind(h[0]))?;
            if kind.sender() != from {
                return Err(ProtocolError::Unexpected(kind));
            }
        }
    }
    let kind = Kind::from_u8(h[0]).ok_or(ProtocolError::UnknownKind(h[0]))?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]);
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len: len.into() });
    }
    if len > kind.max_len() {
        return Err(malformed(
            kind,
            format!("{len} bytes, at most {}", kind.max_len()),
        ));
    }
    Ok(Some((kind, len)))
}

/// Reads one whole frame sent by `from`: `None` on a clean end of stream between frames.
///
/// The payload buffer grows only as bytes arrive (never to the announced size up front).
pub fn read_frame<R: Read + ?Sized>(r: &mut R, from: Peer) -> Result<Option<Frame>, ProtocolError> {
    let Some((kind, len)) = read_header(r, from)? else {
        return Ok(None);
    };
    let mut payload = Vec::new();
    // read_to_end retries EINTR itself, and grows the buffer only as data comes in.
    (&mut *r).take(len.into()).read_to_end(&mut payload)?;
    if payload.len() < len as usize {
        return Err(ProtocolError::Truncated);
    }
    Frame::decode(kind, &payload).map(Some)
}

/// Writes one frame with a single `write_all`.
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<(), ProtocolError> {
    let bytes = frame.encode()?;
    w.write_all(&bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Records the largest allocation made by the current thread, so that tests can check that
    /// a hostile length was never allocated.
    struct TrackingAlloc;

    thread_local! {
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
    }

    // SAFETY: forwards every call to the system allocator unchanged.
    unsafe impl GlobalAlloc for TrackingAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static ALLOC: TrackingAlloc = TrackingAlloc;

    /// Runs `f` and returns its result and the largest allocation it made on this thread.
    fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|c| c.set(0));
        let r = f();
        (r, LARGEST.with(|c| c.get()))
    }

    fn sample_request() -> ExecRequest {
        ExecRequest::new(["/bin/echo", "héllo", ""])
            .env("A", "1")
            .env("EMPTY", "")
            .cwd("/tmp")
    }

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Exec {
                request: sample_request(),
                stdin: true,
            },
            Frame::Exec {
                request: ExecRequest::new(["true"]),
                stdin: false,
            },
            Frame::Stdin(b"in".to_vec()),
            Frame::StdinEof,
            Frame::Stdout(b"out\n".to_vec()),
            Frame::Stdout(Vec::new()),
            Frame::Stderr(vec![0, 255, 10]),
            Frame::Exit(7),
            Frame::Exit(-1),
            Frame::Signal(9),
            Frame::Error {
                errno: 2,
                message: "not found".into(),
            },
            Frame::Sync(sample_sync(Some("clone-7.a_b"))),
            Frame::Sync(sample_sync(None)),
            Frame::Synced,
        ]
    }

    fn sample_sync(clone_id: Option<&str>) -> SyncRequest {
        SyncRequest {
            realtime: Duration::new(1_754_000_000, 999_999_999),
            entropy: (0..64).map(|i| i * 3).collect(),
            clone_id: clone_id.map(str::to_string),
        }
    }

    fn roundtrip(f: &Frame) -> Frame {
        let bytes = f.encode().unwrap();
        let mut r = &bytes[..];
        let got = read_frame(&mut r, f.kind().sender()).unwrap().unwrap();
        assert!(r.is_empty(), "frame not fully consumed");
        got
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            assert_eq!(roundtrip(&f), f);
        }
    }

    #[test]
    fn frames_back_to_back_then_clean_eof() {
        let mut bytes = Vec::new();
        let frames: Vec<Frame> = all_frames()
            .into_iter()
            .filter(|f| f.kind().sender() == Peer::Agent)
            .collect();
        for f in &frames {
            write_frame(&mut bytes, f).unwrap();
        }
        let mut r = &bytes[..];
        for f in &frames {
            assert_eq!(&read_frame(&mut r, Peer::Agent).unwrap().unwrap(), f);
        }
        assert!(read_frame(&mut r, Peer::Agent).unwrap().is_none());
    }

    #[test]
    fn header_layout_is_kind_then_le_length() {
        let b = Frame::Stdout(b"abc".to_vec()).encode().unwrap();
        assert_eq!(b, [0x81, 3, 0, 0, 0, b'a', b'b', b'c']);
        assert_eq!(
            Frame::Exit(7).encode().unwrap(),
            [0x83, 4, 0, 0, 0, 7, 0, 0, 0]
        );
    }

    #[test]
    fn truncated_frames_are_errors_not_eof() {
        let bytes = Frame::Stdout(b"hello".to_vec()).encode().unwrap();
        for cut in 1..bytes.len() {
            let mut r = &bytes[..cut];
            match read_frame(&mut r, Peer::Agent) {
                Err(ProtocolError::Truncated) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty, Peer::Agent).unwrap().is_none());
    }

    #[test]
    fn oversized_length_fails_fast_without_allocating() {
        // A header claiming 4 GiB, and one claiming just over the limit, followed by no data.
        for len in [u32::MAX, MAX_FRAME + 1] {
            let mut bytes = vec![Kind::Stdout as u8];
            bytes.extend_from_slice(&len.to_le_bytes());
            let mut r = &bytes[..];
            let (res, largest) = largest_alloc(|| read_frame(&mut r, Peer::Agent));
            match res {
                Err(ProtocolError::FrameTooLarge { len: l }) => assert_eq!(l, u64::from(len)),
                other => panic!("{other:?}"),
            }
            assert!(largest < 4096, "allocated {largest} bytes");
        }
    }

    #[test]
    fn claimed_length_is_not_allocated_up_front() {
        // A legal 1 MiB claim with 10 bytes behind it: truncated, and no 1 MiB buffer.
        let mut bytes = header(Kind::Stdout, MAX_FRAME).to_vec();
        bytes.extend_from_slice(&[1; 10]);
        let mut r = &bytes[..];
        let (res, largest) = largest_alloc(|| read_frame(&mut r, Peer::Agent));
        assert!(matches!(res, Err(ProtocolError::Truncated)), "{res:?}");
        assert!(largest < 64 * 1024, "allocated {largest} bytes");
    }

    #[test]
    fn max_frame_is_accepted() {
        let f = Frame::Stdout(vec![7; MAX_FRAME as usize]);
        assert_eq!(roundtrip(&f), f);
        let too_big = Frame::Stdout(vec![7; MAX_FRAME as usize + 1]);
        assert!(matches!(
            too_big.encode(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn unknown_kinds_fail_on_the_first_byte() {
        for b in [0x00, 0x0b, 0x7f, 0x80, 0x8b, 0xff, b'G'] {
            // Only the kind byte is available: the reader must not wait for the rest.
            let mut r = &[b][..];
            match read_frame(&mut r, Peer::Agent) {
                Err(ProtocolError::UnknownKind(k)) => assert_eq!(k, b),
                other => panic!("{b:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn kinds_from_the_wrong_side_are_rejected() {
        let exec = Frame::Exec {
            request: ExecRequest::new(["true"]),
            stdin: false,
        }
        .encode()
        .unwrap();
        let mut r = &exec[..];
        assert!(matches!(
            read_frame(&mut r, Peer::Agent),
            Err(ProtocolError::Unexpected(Kind::Exec))
        ));
        let out = Frame::Exit(0).encode().unwrap();
        let mut r = &out[..];
        assert!(matches!(
            read_frame(&mut r, Peer::Host),
            Err(ProtocolError::Unexpected(Kind::Exit))
        ));
    }

    #[test]
    fn fixed_size_payloads_are_checked() {
        for (kind, payload) in [
            (Kind::Exit, &[1u8, 2, 3][..]),
            (Kind::Exit, &[0; 5][..]),
            (Kind::Signal, &[0; 4][..]),
            (Kind::Signal, &(-3i32).to_le_bytes()[..]),
            (Kind::StdinEof, &[1][..]),
            (Kind::Error, &[1, 2][..]),
        ] {
            assert!(
                matches!(
                    Frame::decode(kind, payload),
                    Err(ProtocolError::Malformed { .. })
                ),
                "{kind:?} {payload:?}"
            );
        }
    }

    #[test]
    fn error_message_is_lossy_utf8() {
        let mut p = 2i32.to_le_bytes().to_vec();
        p.extend_from_slice(b"bad \xff byte");
        match Frame::decode(Kind::Error, &p).unwrap() {
            Frame::Error { errno: 2, message } => assert!(message.starts_with("bad ")),
            other => panic!("{other:?}"),
        }
    }

    /// The end of a hand-built Exec payload: no cwd, no user, no rlimits.
    const TAIL: &[u8] = &[0, 0, 0];

    /// Builds an Exec payload by hand.
    fn exec_payload(argc: u32, args: &[&[u8]], envc: u32, env: &[&[u8]], tail: &[u8]) -> Vec<u8> {
        let mut p = vec![PROTOCOL_VERSION, 0];
        p.extend_from_slice(&argc.to_le_bytes());
        for a in args {
            p.extend_from_slice(&(a.len() as u32).to_le_bytes());
            p.extend_from_slice(a);
        }
        p.extend_from_slice(&envc.to_le_bytes());
        for e in env {
            p.extend_from_slice(&(e.len() as u32).to_le_bytes());
            p.extend_from_slice(e);
        }
        p.extend_from_slice(tail);
        p
    }

    fn decode_err(p: &[u8]) -> String {
        match ExecRequest::decode(p) {
            Err(ProtocolError::Malformed { reason, .. }) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exec_payload_hand_built_decodes() {
        let p = exec_payload(2, &[b"ls", b"-l"], 1, &[b"K", b"V"], TAIL);
        let (req, stdin) = ExecRequest::decode(&p).unwrap();
        assert_eq!(req, ExecRequest::new(["ls", "-l"]).env("K", "V"));
        assert!(!stdin);
    }

    #[test]
    fn exec_counts_are_bounded() {
        // Counts that the limits, or the bytes actually present, cannot satisfy.
        for argc in [u32::MAX, MAX_ARGS as u32 + 1, 1000] {
            let p = exec_payload(argc, &[b"x"], 0, &[], TAIL);
            let (res, largest) = largest_alloc(|| ExecRequest::decode(&p));
            assert!(
                matches!(res, Err(ProtocolError::Malformed { .. })),
                "{res:?}"
            );
            assert!(largest < 4096, "argc {argc}: allocated {largest} bytes");
        }
        let p = exec_payload(1, &[b"x"], u32::MAX, &[], TAIL);
        assert!(decode_err(&p).contains("out of bounds"));
        let p = exec_payload(0, &[], 0, &[], TAIL);
        assert!(decode_err(&p).contains("empty argv"));
    }

    #[test]
    fn exec_strings_are_bounded_and_checked() {
        // A string claiming more than MAX_STRING.
        let mut p = vec![PROTOCOL_VERSION, 0];
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        p.extend_from_slice(&[b'a'; 8]);
        assert!(decode_err(&p).contains("too long"));
        // A string longer than what is left.
        let mut p = vec![PROTOCOL_VERSION, 0];
        p.extend_from_slice(&1u32.to_le_bytes());
        p.extend_from_slice(&100u32.to_le_bytes());
        p.extend_from_slice(b"ab");
        assert!(decode_err(&p).contains("truncated"));
        assert!(decode_err(&exec_payload(1, &[b"a\0b"], 0, &[], TAIL)).contains("NUL"));
        assert!(decode_err(&exec_payload(1, &[b"\xff"], 0, &[], TAIL)).contains("UTF-8"));
        assert!(decode_err(&exec_payload(1, &[b""], 0, &[], TAIL)).contains("program"));
        assert!(decode_err(&exec_payload(1, &[b"x"], 1, &[b"A=B", b"v"], TAIL)).contains("'='"));
        assert!(decode_err(&exec_payload(1, &[b"x"], 1, &[b"", b"v"], TAIL)).contains("'='"));
    }

    #[test]
    fn exec_header_fields_are_checked() {
        let good = exec_payload(1, &[b"x"], 0, &[], TAIL);
        let mut p = good.clone();
        p[0] = 9;
        let e = ExecRequest::decode(&p).unwrap_err();
        assert!(matches!(e, ProtocolError::Version { got: 9 }), "{e:?}");
        assert!(
            e.to_string()
                .contains("version 9, this side speaks version 2"),
            "{e}"
        );
        let mut p = good.clone();
        p[1] = 0x80;
        assert!(decode_err(&p).contains("flags"));
        let mut p = good.clone();
        let cwd_at = p.len() - TAIL.len();
        p[cwd_at] = 2;
        assert!(decode_err(&p).contains("cwd"));
        let mut p = good.clone();
        p[cwd_at + 1] = 2;
        assert!(decode_err(&p).contains("user"));
        let mut p = good.clone();
        p[cwd_at + 2] = MAX_RLIMITS as u8 + 1;
        assert!(decode_err(&p).contains("rlimits"));
        let mut p = good.clone();
        p.push(0);
        assert!(decode_err(&p).contains("trailing"));
        for cut in 0..good.len() {
            assert!(ExecRequest::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        assert!(ExecRequest::default().encode(false).is_err());
        assert!(ExecRequest::new(["a\0"]).encode(false).is_err());
        assert!(ExecRequest::new(["a"])
            .env("X=Y", "1")
            .encode(false)
            .is_err());
        let huge = "x".repeat(MAX_STRING + 1);
        assert!(ExecRequest::new([huge]).encode(false).is_err());
        // Many legal strings adding up to more than MAX_FRAME.
        let big = "y".repeat(MAX_STRING);
        let req = ExecRequest::new(vec![big; 9]);
        assert!(matches!(
            req.encode(false),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn error_frame_message_is_kept_within_the_limit() {
        let f = Frame::Error {
            errno: 0,
            message: "é".repeat(MAX_FRAME as usize),
        };
        let bytes = f.encode().unwrap();
        assert!(bytes.len() <= HEADER_LEN + MAX_FRAME as usize);
        let mut r = &bytes[..];
        assert!(read_frame(&mut r, Peer::Agent).unwrap().is_some());
    }
    /// Builds a Sync payload by hand.
    fn sync_payload(secs: u64, nanos: u32, entropy_len: u16, entropy: &[u8], id: &[u8]) -> Vec<u8> {
        let mut p = vec![PROTOCOL_VERSION, 0];
        p.extend_from_slice(&secs.to_le_bytes());
        p.extend_from_slice(&nanos.to_le_bytes());
        p.extend_from_slice(&entropy_len.to_le_bytes());
        p.extend_from_slice(entropy);
        p.push(id.len() as u8);
        p.extend_from_slice(id);
        p
    }

    fn sync_err(p: &[u8]) -> String {
        match SyncRequest::decode(p) {
            Err(ProtocolError::Malformed {
                kind: Kind::Sync,
                reason,
            }) => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sync_layout_is_fixed_fields_then_entropy_then_clone_id() {
        let req = SyncRequest {
            realtime: Duration::new(0x0102_0304_0506_0708, 0x0a0b_0c0d),
            entropy: vec![0xee; 32],
            clone_id: Some("ab".into()),
        };
        let bytes = Frame::Sync(req.clone()).encode().unwrap();
        let mut want = vec![0x04];
        want.extend_from_slice(&(2 + 8 + 4 + 2 + 32 + 1 + 2u32).to_le_bytes());
        want.extend_from_slice(&[PROTOCOL_VERSION, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        want.extend_from_slice(&[0x0d, 0x0c, 0x0b, 0x0a, 32, 0]);
        want.extend_from_slice(&[0xee; 32]);
        want.extend_from_slice(&[2, b'a', b'b']);
        assert_eq!(bytes, want);
        assert_eq!(
            Frame::Synced.encode().unwrap(),
            [Kind::Synced as u8, 0, 0, 0, 0]
        );
        // The largest request is exactly MAX_SYNC_PAYLOAD.
        let big = SyncRequest {
            realtime: Duration::new(i64::MAX as u64, 999_999_999),
            entropy: vec![1; MAX_SYNC_ENTROPY],
            clone_id: Some("z".repeat(MAX_CLONE_ID)),
        };
        assert_eq!(big.encode().unwrap().len(), MAX_SYNC_PAYLOAD as usize);
        assert_eq!(MAX_SYNC_PAYLOAD, 593, "the docs say 593");
        assert_eq!(roundtrip(&Frame::Sync(big.clone())), Frame::Sync(big));
    }

    #[test]
    fn sync_header_over_its_limit_fails_without_reading_or_allocating() {
        // Legal for MAX_FRAME, not for a Sync: refused from the header, no payload behind it.
        for len in [MAX_SYNC_PAYLOAD + 1, MAX_FRAME] {
            let bytes = header(Kind::Sync, len);
            let mut r = &bytes[..];
            let (res, largest) = largest_alloc(|| read_frame(&mut r, Peer::Host));
            match res {
                Err(ProtocolError::Malformed {
                    kind: Kind::Sync,
                    reason,
                }) => assert!(reason.contains("at most"), "{reason}"),
                other => panic!("{len}: {other:?}"),
            }
            assert!(largest < 4096, "allocated {largest} bytes");
        }
        let bytes = header(Kind::Sync, u32::MAX);
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, Peer::Host),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        // Synced has no payload at all.
        let mut bytes = header(Kind::Synced, 1).to_vec();
        bytes.push(0);
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, Peer::Agent),
            Err(ProtocolError::Malformed {
                kind: Kind::Synced,
                ..
            })
        ));
        assert!(Frame::decode(Kind::Synced, TAIL).is_err());
        // And a Sync only comes from the host.
        let bytes = Frame::Sync(sample_sync(None)).encode().unwrap();
        let mut r = &bytes[..];
        assert!(matches!(
            read_frame(&mut r, Peer::Agent),
            Err(ProtocolError::Unexpected(Kind::Sync))
        ));
    }

    #[test]
    fn sync_payload_hand_built_decodes() {
        let p = sync_payload(5, 6, 32, &[9; 32], b"");
        let req = SyncRequest::decode(&p).unwrap();
        assert_eq!(req.realtime, Duration::new(5, 6));
        assert_eq!(req.entropy, [9; 32]);
        assert_eq!(req.clone_id, None);
        let p = sync_payload(5, 6, 32, &[9; 32], b"Az09._-");
        assert_eq!(
            SyncRequest::decode(&p).unwrap().clone_id.as_deref(),
            Some("Az09._-")
        );
    }

    #[test]
    fn sync_entropy_length_is_bounded_before_allocating() {
        // A claimed length beyond the bound, with nothing behind it.
        let p = sync_payload(1, 0, u16::MAX, &[], b"");
        let (res, largest) = largest_alloc(|| SyncRequest::decode(&p));
        match res {
            Err(ProtocolError::Malformed { reason, .. }) => {
                assert!(reason.contains("entropy"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(largest < 1024, "allocated {largest} bytes");
        let too_long = MAX_SYNC_ENTROPY as u16 + 1;
        let p = sync_payload(1, 0, too_long, &vec![0; too_long.into()], b"");
        assert!(sync_err(&p).contains("entropy"));
        let too_short = MIN_SYNC_ENTROPY as u16 - 1;
        let p = sync_payload(1, 0, too_short, &vec![0; too_short.into()], b"");
        assert!(sync_err(&p).contains("entropy"));
        // A legal claim the payload does not hold.
        let p = sync_payload(1, 0, 64, &[0; 10], b"");
        assert!(sync_err(&p).contains("truncated"));
        // A payload longer than a Sync can be, handed to decode directly.
        let mut p = sync_payload(1, 0, 32, &[0; 32], b"");
        p.resize(MAX_SYNC_PAYLOAD as usize + 1, 0);
        assert!(sync_err(&p).contains("at most"));
    }

    #[test]
    fn sync_fields_are_checked() {
        let good = sync_payload(1, 2, 32, &[7; 32], b"id");
        SyncRequest::decode(&good).unwrap();
        let mut p = good.clone();
        p[0] = PROTOCOL_VERSION + 1;
        assert!(matches!(
            SyncRequest::decode(&p),
            Err(ProtocolError::Version { .. })
        ));
        let mut p = good.clone();
        p[1] = 1;
        assert!(sync_err(&p).contains("flags"));
        let p = sync_payload(1 << 63, 0, 32, &[7; 32], b"");
        assert!(sync_err(&p).contains("seconds"));
        let p = sync_payload(1, 1_000_000_000, 32, &[7; 32], b"");
        assert!(sync_err(&p).contains("nanoseconds"));
        for id in [
            &b"a/b"[..],
            b"a b",
            b"x\0",
            "é".as_bytes(),
            b"\n",
            b"$(reboot)",
        ] {
            let p = sync_payload(1, 0, 32, &[7; 32], id);
            assert!(sync_err(&p).contains("clone id"), "{id:?}");
        }
        let p = sync_payload(1, 0, 32, &[7; 32], &[b'a'; MAX_CLONE_ID + 1]);
        assert!(sync_err(&p).contains("clone id"));
        let mut p = good.clone();
        p.push(0);
        assert!(sync_err(&p).contains("trailing"));
        // A clone id length with no id behind it.
        let mut p = sync_payload(1, 0, 32, &[7; 32], b"");
        *p.last_mut().unwrap() = 5;
        assert!(sync_err(&p).contains("truncated"));
        for cut in 0..good.len() {
            assert!(SyncRequest::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn sync_encode_refuses_what_decode_would_refuse() {
        let ok = sample_sync(Some("ok"));
        ok.validate().unwrap();
        let with = |f: &dyn Fn(&mut SyncRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            r.encode()
        };
        assert!(with(&|r| r.entropy.truncate(MIN_SYNC_ENTROPY - 1)).is_err());
        assert!(with(&|r| r.entropy = vec![0; MAX_SYNC_ENTROPY + 1]).is_err());
        assert!(with(&|r| r.clone_id = Some(String::new())).is_err());
        assert!(with(&|r| r.clone_id = Some("a".repeat(MAX_CLONE_ID + 1))).is_err());
        assert!(with(&|r| r.clone_id = Some("../x".into())).is_err());
        assert!(with(&|r| r.realtime = Duration::new(1 << 63, 0)).is_err());
        assert!(with(&|r| r.realtime = Duration::MAX).is_err());
        let before_epoch = UNIX_EPOCH - Duration::from_secs(1);
        assert!(SyncRequest::new(before_epoch, &[0; 64], None).is_err());
        let now = SyncRequest::new(SystemTime::now(), &[0; 64], Some("c1")).unwrap();
        assert_eq!(now.clone_id.as_deref(), Some("c1"));
    }

    #[test]
    fn sync_debug_hides_the_entropy() {
        let req = SyncRequest {
            realtime: Duration::ZERO,
            entropy: vec![0xab; 40],
            clone_id: None,
        };
        let text = format!("{req:?}");
        assert!(text.contains("[40 bytes]"), "{text}");
        assert!(!text.contains("171"), "{text}");
    }
}
