//! The host side of the file requests ([`crate::files`]): each call uses up one connection to
//! the agent (from [`super::connect`] or [`super::connect_when_ready`]) and is bounded by its
//! timeout. What the guest sends is checked and bounded like any frame: a read takes at most its
//! limit, a listing at most [`MAX_ENTRIES`] entries.

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{deadline_after, io_error, protocol_error, remote, unexpected, AgentError, Timed};
use crate::files::{DirEntry, FileRequest};
use crate::{header, read_frame, Frame, Kind, Peer, CHUNK, HEADER_LEN};

/// Most entries [`list_dir`] takes from one directory.
pub const MAX_ENTRIES: usize = 1 << 20;

/// Why a file request failed, from the guest's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileError {
    /// No such file or directory (`ENOENT`).
    NotFound,
    /// Not allowed (`EACCES`, `EPERM`, `EROFS`).
    PermissionDenied,
    /// A directory where a file was expected (`EISDIR`).
    IsADirectory,
    /// A file where a directory was expected (`ENOTDIR`).
    NotADirectory,
    /// A directory to remove is not empty (`ENOTEMPTY`).
    NotEmpty,
    /// Larger than the read's limit (`EFBIG` from the guest, or found by the host), or than
    /// [`MAX_ENTRIES`] entries.
    TooLarge,
    /// No space left in the guest (`ENOSPC`, `EDQUOT`).
    NoSpace,
    /// Anything else: see the errno.
    Other,
}

impl FileError {
    /// The kind of a guest errno.
    pub fn from_errno(errno: i32) -> FileError {
        match errno {
            libc::ENOENT => FileError::NotFound,
            libc::EACCES | libc::EPERM | libc::EROFS => FileError::PermissionDenied,
            libc::EISDIR => FileError::IsADirectory,
            libc::ENOTDIR => FileError::NotADirectory,
            libc::ENOTEMPTY => FileError::NotEmpty,
            libc::EFBIG => FileError::TooLarge,
            libc::ENOSPC | libc::EDQUOT => FileError::NoSpace,
            _ => FileError::Other,
        }
    }
}

/// The `Error` answer to a file request as an [`AgentError`]: [`AgentError::File`] for an OS
/// error in the guest, else what [`remote`] makes of it (a version mismatch, a protocol
/// complaint).
fn file_error(errno: i32, message: String) -> AgentError {
    match remote(errno, message) {
        AgentError::Remote { errno, message } if errno != 0 => AgentError::File {
            kind: FileError::from_errno(errno),
            errno,
            message,
        },
        e => e,
    }
}

fn too_large(path: &str, what: String) -> AgentError {
    AgentError::File {
        kind: FileError::TooLarge,
        errno: 0,
        message: format!("{path:?} {what}"),
    }
}

/// Sends the request frame (checked first: an invalid request sends nothing).
fn send_request(
    stream: &UnixStream,
    req: &FileRequest,
    deadline: Option<Instant>,
) -> Result<(), AgentError> {
    let bytes = Frame::File(req.clone())
        .encode()
        .map_err(AgentError::InvalidRequest)?;
    Timed { stream, deadline }
        .write_all(&bytes)
        .map_err(io_error)
}

/// Reads answer frames, handing each non-final one to `each`, until `Done` (Ok) or `Error`.
fn read_until_done(
    stream: &UnixStream,
    deadline: Option<Instant>,
    each: &mut dyn FnMut(Frame) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let mut r = BufReader::with_capacity(HEADER_LEN + CHUNK, Timed { stream, deadline });
    loop {
        match read_frame(&mut r, Peer::Agent).map_err(protocol_error)? {
            Some(Frame::Done) => return Ok(()),
            Some(Frame::Error { errno, message }) => return Err(file_error(errno, message)),
            Some(f) => each(f)?,
            None => return Err(AgentError::NoExitStatus),
        }
    }
}

/// Writes `content` (read to its end) to the guest file `path` (absolute), created or
/// truncated with permission bits `mode`, creating missing parent directories. Returns the
/// bytes written. The guest writes as root.
pub fn write_file(
    stream: UnixStream,
    path: &str,
    mode: u32,
    content: &mut dyn Read,
    timeout: Option<Duration>,
) -> Result<u64, AgentError> {
    let deadline = deadline_after(timeout);
    let req = FileRequest::Write {
        path: path.to_string(),
        mode,
        parents: true,
    };
    send_request(&stream, &req, deadline)?;
    let mut t = Timed {
        stream: &stream,
        deadline,
    };
    let mut buf = vec![0u8; HEADER_LEN + CHUNK];
    let mut total = 0u64;
    let sent: Result<(), AgentError> = (|| loop {
        let n = match content.read(&mut buf[HEADER_LEN..]) {
            Ok(0) => break t.write_all(&header(Kind::StdinEof, 0)).map_err(io_error),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(AgentError::Io(io::Error::new(
                    e.kind(),
                    format!("cannot read what goes to {path:?}: {e}"),
                )))
            }
        };
        buf[..HEADER_LEN].copy_from_slice(&header(Kind::Stdin, n as u32));
        t.write_all(&buf[..HEADER_LEN + n]).map_err(io_error)?;
        total += n as u64;
    })();
    match (
        sent,
        read_until_done(&stream, deadline, &mut |f| Err(unexpected(&f))),
    ) {
        // The agent's answer (an error it found) says more than a broken pipe.
        (_, Err(e @ (AgentError::File { .. } | AgentError::Version { .. }))) => Err(e),
        (Err(e), _) => Err(e),
        (Ok(()), answer) => answer.map(|()| total),
    }
}

/// Reads the guest file `path` (absolute) into `out`, failing with [`FileError::TooLarge`] if it
/// holds more than `limit` bytes (checked by the guest before it sends, and by the host on what
/// arrives). Returns the bytes read. `out` may have received part of the file when this fails.
pub fn read_file(
    stream: UnixStream,
    path: &str,
    limit: u64,
    out: &mut dyn Write,
    timeout: Option<Duration>,
) -> Result<u64, AgentError> {
    let deadline = deadline_after(timeout);
    let req = FileRequest::Read {
        path: path.to_string(),
        limit,
    };
    send_request(&stream, &req, deadline)?;
    let mut total = 0u64;
    read_until_done(&stream, deadline, &mut |f| match f {
        Frame::Data(d) => {
            total += d.len() as u64;
            if total > limit {
                // Returning drops the connection: the agent stops.
                return Err(too_large(path, format!("holds more than {limit} bytes")));
            }
            out.write_all(&d).map_err(|e| {
                AgentError::Io(io::Error::new(
                    e.kind(),
                    format!("cannot write what came from {path:?}: {e}"),
                ))
            })
        }
        f => Err(unexpected(&f)),
    })?;
    Ok(total)
}

/// Lists the guest directory `path` (absolute): its entries but `.` and `..`, in the order the
/// guest's file system gives them.
pub fn list_dir(
    stream: UnixStream,
    path: &str,
    timeout: Option<Duration>,
) -> Result<Vec<DirEntry>, AgentError> {
    let deadline = deadline_after(timeout);
    send_request(
        &stream,
        &FileRequest::List {
            path: path.to_string(),
        },
        deadline,
    )?;
    let mut entries = Vec::new();
    read_until_done(&stream, deadline, &mut |f| match f {
        Frame::Entry(e) if entries.len() < MAX_ENTRIES => {
            entries.push(e);
            Ok(())
        }
        Frame::Entry(_) => Err(too_large(
            path,
            format!("has more than {MAX_ENTRIES} entries"),
        )),
        f => Err(unexpected(&f)),
    })?;
    Ok(entries)
}

/// Removes the guest file, symlink or empty directory `path` (absolute); with `recursive`, a
/// directory and everything in it.
pub fn remove(
    stream: UnixStream,
    path: &str,
    recursive: bool,
    timeout: Option<Duration>,
) -> Result<(), AgentError> {
    let deadline = deadline_after(timeout);
    let req = FileRequest::Remove {
        path: path.to_string(),
        recursive,
    };
    send_request(&stream, &req, deadline)?;
    read_until_done(&stream, deadline, &mut |f| Err(unexpected(&f)))
}
