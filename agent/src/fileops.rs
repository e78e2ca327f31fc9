//! The agent's side of the file requests ([`crate::files`]): carried out on the connection's
//! own thread, as root, one request per connection.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::files::{DirEntry, FileRequest, FileType};
use crate::server::Outcome;
use crate::{header, read_frame, Frame, Kind, Peer, ProtocolError, CHUNK, HEADER_LEN};

/// Serves `req`: reads what follows it from `reader` (a `WriteFile`'s content) and answers
/// through `write_frames` (whole frames; it returns false when the host is gone). Ends as
/// [`Outcome::FileDone`], [`Outcome::FileFailed`], or [`Outcome::Abandoned`] when the host
/// left before the end.
pub fn serve<R: Read>(
    req: &FileRequest,
    reader: &mut R,
    write_frames: &mut dyn FnMut(&[u8]) -> bool,
) -> Outcome {
    let result = match req {
        FileRequest::Write {
            path,
            mode,
            parents,
        } => write_file(Path::new(path), *mode, *parents, reader),
        FileRequest::Read { path, limit } => read_file(Path::new(path), *limit, write_frames),
        FileRequest::List { path } => list_dir(Path::new(path), write_frames),
        FileRequest::Remove { path, recursive } => remove(Path::new(path), *recursive),
    };
    let frame = match result {
        Ok(()) => Frame::Done,
        Err(Failure::HostGone) => return Outcome::Abandoned,
        Err(Failure::Io(what, e)) => Frame::Error {
            errno: e.raw_os_error().unwrap_or(0),
            message: format!("{what} {:?}: {e}", req.path()),
        },
        Err(Failure::Protocol(e)) => Frame::Error {
            errno: 0,
            message: e.to_string(),
        },
    };
    let sent = frame.encode().map(|b| write_frames(&b)).unwrap_or(false);
    match frame {
        Frame::Error { message, .. } if sent => {
            // Drop the rest of a WriteFile's content so that the host, still sending it, gets
            // to read the answer instead of a broken pipe.
            if matches!(req, FileRequest::Write { .. }) {
                let _ = skip_content(reader);
            }
            Outcome::FileFailed(message)
        }
        _ if sent => Outcome::FileDone,
        _ => Outcome::Abandoned,
    }
}

enum Failure {
    /// An OS error while doing `what` (e.g. "cannot open").
    Io(&'static str, io::Error),
    /// The host sent something other than content frames.
    Protocol(ProtocolError),
    /// The stream ended.
    HostGone,
}

fn io(what: &'static str) -> impl FnOnce(io::Error) -> Failure {
    move |e| Failure::Io(what, e)
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// The next content chunk of a `WriteFile`: `Some(bytes)`, or `None` after `StdinEof`.
fn next_chunk<R: Read>(reader: &mut R) -> Result<Option<Vec<u8>>, Failure> {
    match read_frame(reader, Peer::Host) {
        Ok(Some(Frame::Stdin(data))) => Ok(Some(data)),
        Ok(Some(Frame::StdinEof)) => Ok(None),
        Ok(Some(f)) => Err(Failure::Protocol(ProtocolError::Unexpected(f.kind()))),
        Ok(None) | Err(ProtocolError::Io(_)) => Err(Failure::HostGone),
        Err(e) => Err(Failure::Protocol(e)),
    }
}

fn skip_content<R: Read>(reader: &mut R) -> Result<(), Failure> {
    while next_chunk(reader)?.is_some() {}
    Ok(())
}

fn write_file<R: Read>(
    path: &Path,
    mode: u32,
    parents: bool,
    reader: &mut R,
) -> Result<(), Failure> {
    if parents {
        if let Some(dir) = path.parent() {
            let made = match fs::create_dir_all(dir) {
                // A file in the way of a directory to create.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(errno(libc::ENOTDIR)),
                r => r,
            };
            made.map_err(io("cannot create the parent directories of"))?;
        }
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io("cannot create"))?;
    // The umask may have taken bits away: the mode asked for is the mode set.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("cannot set the mode of"))?;
    let written = (|| {
        while let Some(chunk) = next_chunk(reader)? {
            file.write_all(&chunk).map_err(io("cannot write"))?;
        }
        Ok(())
    })();
    if written.is_err() {
        // Half a file is no file.
        drop(file);
        let _ = fs::remove_file(path);
    }
    written
}

fn read_file(path: &Path, limit: u64, send: &mut dyn FnMut(&[u8]) -> bool) -> Result<(), Failure> {
    let mut file = File::open(path).map_err(io("cannot open"))?;
    let meta = file.metadata().map_err(io("cannot stat"))?;
    if meta.is_dir() {
        return Err(Failure::Io("cannot read", errno(libc::EISDIR)));
    }
    if meta.len() > limit {
        return Err(Failure::Io("too large to read", errno(libc::EFBIG)));
    }
    let mut buf = vec![0u8; HEADER_LEN + CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf[HEADER_LEN..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::Io("cannot read", e)),
        };
        total += n as u64;
        // A file that grew past the limit while being read (or that stat said was empty).
        if total > limit {
            return Err(Failure::Io("too large to read", errno(libc::EFBIG)));
        }
        buf[..HEADER_LEN].copy_from_slice(&header(Kind::Data, n as u32));
        if !send(&buf[..HEADER_LEN + n]) {
            return Err(Failure::HostGone);
        }
    }
}

fn list_dir(path: &Path, send: &mut dyn FnMut(&[u8]) -> bool) -> Result<(), Failure> {
    for entry in fs::read_dir(path).map_err(io("cannot list"))? {
        let entry = entry.map_err(io("cannot list"))?;
        // An entry removed meanwhile is skipped.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        let ft = meta.file_type();
        let file_type = if ft.is_file() {
            FileType::File
        } else if ft.is_dir() {
            FileType::Dir
        } else if ft.is_symlink() {
            FileType::Symlink
        } else {
            FileType::Other
        };
        let e = DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            file_type,
            mode: meta.mode() & 0o7777,
            size: meta.len(),
            mtime: meta.mtime(),
        };
        let bytes = Frame::Entry(e).encode().map_err(Failure::Protocol)?;
        if !send(&bytes) {
            return Err(Failure::HostGone);
        }
    }
    Ok(())
}

fn remove(path: &Path, recursive: bool) -> Result<(), Failure> {
    let meta = path.symlink_metadata().map_err(io("cannot remove"))?;
    let r = if !meta.is_dir() {
        fs::remove_file(path)
    } else if recursive {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    };
    r.map_err(io("cannot remove"))
}
