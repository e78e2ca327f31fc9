//! File requests: what the host asks of the guest's file system (write a file, read one, list a
//! directory, remove), and the directory entries the agent answers a listing with.
//!
//! Each request is the first frame of its own connection, like `Exec`. Its payload
//! (little-endian, strings as in `Exec`: `u32` length + UTF-8, no NUL):
//!
//! ```text
//! u8  version = PROTOCOL_VERSION
//! u8  flags: bit 0 = WriteFile: create missing parent directories; Remove: recursive
//! WriteFile: u32 mode (permission bits, at most 0o7777), then the path
//! ReadFile:  u64 limit (most bytes the host takes), then the path
//! ListDir, Remove: the path
//! ```
//!
//! Paths are absolute guest paths of at most [`MAX_PATH`] bytes. The agent acts as root.
//!
//! - `WriteFile`: the content follows as `Stdin` frames, ended by `StdinEof`. The agent creates
//!   (or truncates) the file with the mode, writes each chunk as it comes and answers `Done` after
//!   `StdinEof`. If anything fails it answers `Error` at once and drops the rest of the content.
//! - `ReadFile`: `Error` (`EISDIR`, `EFBIG` if the file is larger than the limit, `ENOENT`,
//!   `EACCES`, ...), or the content as `Data` frames then `Done`.
//! - `ListDir`: one `Entry` frame per entry (not `.` and `..`), then `Done`; or `Error`.
//! - `Remove`: a file, a symlink, an empty directory, or with the flag a whole tree; `Done` or
//!   `Error`.

use crate::{malformed, Cursor, Kind, ProtocolError, PROTOCOL_VERSION};

/// Longest path in a file request (Linux's `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Largest file request payload: version, flags, the widest field (8), the path and its length.
pub const MAX_FILE_REQUEST: u32 = (1 + 1 + 8 + 4 + MAX_PATH) as u32;
/// Largest `Entry` payload: type, mode, size, mtime, the name (at most 255 bytes on Linux, but
/// bounded here by [`MAX_PATH`]) and its length.
pub const MAX_ENTRY: u32 = (1 + 4 + 8 + 8 + 4 + MAX_PATH) as u32;

const FLAG_RECURSIVE: u8 = 1;

/// A request about the guest's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileRequest {
    /// Create or truncate `path` with `mode` and write the content that follows into it.
    Write {
        /// Absolute guest path.
        path: String,
        /// Permission bits (`0o644`, at most `0o7777`).
        mode: u32,
        /// Create missing parent directories (mode 0755).
        parents: bool,
    },
    /// Send `path`'s content, if it has at most `limit` bytes.
    Read {
        /// Absolute guest path.
        path: String,
        /// Most bytes the host takes.
        limit: u64,
    },
    /// List the directory `path`.
    List {
        /// Absolute guest path.
        path: String,
    },
    /// Remove `path`: a file, a symlink, an empty directory, or any directory if `recursive`.
    Remove {
        /// Absolute guest path.
        path: String,
        /// Remove a directory with everything in it.
        recursive: bool,
    },
}

impl FileRequest {
    /// The frame kind carrying this request.
    pub fn kind(&self) -> Kind {
        match self {
            FileRequest::Write { .. } => Kind::WriteFile,
            FileRequest::Read { .. } => Kind::ReadFile,
            FileRequest::List { .. } => Kind::ListDir,
            FileRequest::Remove { .. } => Kind::Remove,
        }
    }

    /// The guest path the request is about.
    pub fn path(&self) -> &str {
        match self {
            FileRequest::Write { path, .. }
            | FileRequest::Read { path, .. }
            | FileRequest::List { path }
            | FileRequest::Remove { path, .. } => path,
        }
    }

    /// Checks the request's rules (the same checks the agent makes).
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let kind = self.kind();
        let path = self.path();
        if !path.starts_with('/') {
            return Err(malformed(kind, format!("path {path:?} is not absolute")));
        }
        if path.len() > MAX_PATH || path.contains('\0') {
            return Err(malformed(kind, "path too long or with a NUL byte"));
        }
        if let FileRequest::Write { mode, .. } = self {
            if *mode > 0o7777 {
                return Err(malformed(kind, format!("mode {mode:#o} above 0o7777")));
            }
        }
        Ok(())
    }

    /// The request's payload.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        self.validate()?;
        let flag = match self {
            FileRequest::Write { parents: true, .. }
            | FileRequest::Remove {
                recursive: true, ..
            } => FLAG_RECURSIVE,
            _ => 0,
        };
        let mut out = vec![PROTOCOL_VERSION, flag];
        match self {
            FileRequest::Write { mode, .. } => out.extend_from_slice(&mode.to_le_bytes()),
            FileRequest::Read { limit, .. } => out.extend_from_slice(&limit.to_le_bytes()),
            _ => {}
        }
        let path = self.path();
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        Ok(out)
    }

    /// Decodes the payload of a `kind` frame (one of the four file kinds).
    pub fn decode(kind: Kind, payload: &[u8]) -> Result<FileRequest, ProtocolError> {
        let mut c = Cursor::new(kind, payload);
        c.version()?;
        let flags = c.u8()?;
        let flag_ok = matches!(kind, Kind::WriteFile | Kind::Remove);
        if flags & !FLAG_RECURSIVE != 0 || (flags != 0 && !flag_ok) {
            return Err(malformed(kind, format!("unknown flags {flags:#04x}")));
        }
        let on = flags & FLAG_RECURSIVE != 0;
        let req = match kind {
            Kind::WriteFile => {
                let mode = c.u32()?;
                FileRequest::Write {
                    mode,
                    parents: on,
                    path: c.string()?,
                }
            }
            Kind::ReadFile => {
                let limit = c.u64()?;
                FileRequest::Read {
                    limit,
                    path: c.string()?,
                }
            }
            Kind::ListDir => FileRequest::List { path: c.string()? },
            Kind::Remove => FileRequest::Remove {
                recursive: on,
                path: c.string()?,
            },
            other => return Err(ProtocolError::Unexpected(other)),
        };
        c.end()?;
        req.validate()?;
        Ok(req)
    }
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else: a device, a FIFO, a socket.
    Other,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name (not a path; non-UTF-8 bytes replaced by U+FFFD).
    pub name: String,
    /// What it is.
    pub file_type: FileType,
    /// Its permission bits (and set-id/sticky bits).
    pub mode: u32,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, seconds since the Unix epoch.
    pub mtime: i64,
}

impl DirEntry {
    /// The `Entry` payload.
    pub fn encode(&self) -> Vec<u8> {
        let t = match self.file_type {
            FileType::File => 1,
            FileType::Dir => 2,
            FileType::Symlink => 3,
            FileType::Other => 0,
        };
        // Names longer than MAX_PATH cannot exist on Linux (NAME_MAX 255); cut to stay in bounds.
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_PATH)];
        let mut out = vec![t];
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.mtime.to_le_bytes());
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name);
        out
    }

    /// Decodes an `Entry` payload.
    pub fn decode(payload: &[u8]) -> Result<DirEntry, ProtocolError> {
        let mut c = Cursor::new(Kind::Entry, payload);
        let file_type = match c.u8()? {
            1 => FileType::File,
            2 => FileType::Dir,
            3 => FileType::Symlink,
            0 => FileType::Other,
            t => return Err(malformed(Kind::Entry, format!("unknown type {t}"))),
        };
        let mode = c.u32()?;
        let size = c.u64()?;
        let mtime = c.u64()? as i64;
        let n = c.u32()? as usize;
        if n == 0 || n > MAX_PATH {
            return Err(malformed(Kind::Entry, format!("name of {n} bytes")));
        }
        let name = String::from_utf8_lossy(c.take(n)?).into_owned();
        c.end()?;
        if name.contains('/') || name.contains('\0') {
            return Err(malformed(Kind::Entry, "name with '/' or NUL"));
        }
        Ok(DirEntry {
            name,
            file_type,
            mode,
            size,
            mtime,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests() -> Vec<FileRequest> {
        vec![
            FileRequest::Write {
                path: "/tmp/a b".into(),
                mode: 0o4755,
                parents: true,
            },
            FileRequest::Write {
                path: "/x".into(),
                mode: 0,
                parents: false,
            },
            FileRequest::Read {
                path: "/etc/passwd".into(),
                limit: u64::MAX,
            },
            FileRequest::List { path: "/".into() },
            FileRequest::Remove {
                path: "/tmp/d".into(),
                recursive: true,
            },
        ]
    }

    #[test]
    fn requests_round_trip_and_every_cut_fails() {
        for r in requests() {
            let p = r.encode().unwrap();
            assert_eq!(FileRequest::decode(r.kind(), &p).unwrap(), r);
            for cut in 0..p.len() {
                assert!(
                    FileRequest::decode(r.kind(), &p[..cut]).is_err(),
                    "{r:?} {cut}"
                );
            }
            let mut longer = p.clone();
            longer.push(0);
            assert!(FileRequest::decode(r.kind(), &longer).is_err());
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let rel = FileRequest::List { path: "etc".into() };
        assert!(rel.encode().is_err());
        let mode = FileRequest::Write {
            path: "/a".into(),
            mode: 0o10000,
            parents: false,
        };
        assert!(mode.encode().is_err());
        let long = FileRequest::List {
            path: format!("/{}", "a".repeat(MAX_PATH)),
        };
        assert!(long.encode().is_err());
        // A relative path and a flag a listing has no use for, built by hand.
        let mut p = vec![PROTOCOL_VERSION, 0, 1, 0, 0, 0, b'a'];
        assert!(FileRequest::decode(Kind::ListDir, &p).is_err());
        p = vec![PROTOCOL_VERSION, 1, 1, 0, 0, 0, b'/'];
        assert!(FileRequest::decode(Kind::ListDir, &p).is_err());
        p[0] = PROTOCOL_VERSION + 1;
        assert!(matches!(
            FileRequest::decode(Kind::ListDir, &p),
            Err(ProtocolError::Version { .. })
        ));
        assert!(FileRequest::decode(Kind::Exec, &[PROTOCOL_VERSION, 0]).is_err());
    }

    #[test]
    fn entries_round_trip_and_are_checked() {
        let e = DirEntry {
            name: "héllo".into(),
            file_type: FileType::Symlink,
            mode: 0o777,
            size: 12,
            mtime: -5,
        };
        let p = e.encode();
        assert_eq!(DirEntry::decode(&p).unwrap(), e);
        for cut in 0..p.len() {
            assert!(DirEntry::decode(&p[..cut]).is_err());
        }
        let mut bad = p.clone();
        bad[0] = 9;
        assert!(DirEntry::decode(&bad).is_err());
        let slash = DirEntry {
            name: "a/b".into(),
            ..e
        };
        assert!(DirEntry::decode(&slash.encode()).is_err());
    }
}
