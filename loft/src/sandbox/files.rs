//! Files in and out of the guest, through its agent: [`VmHandle::write_file`],
//! [`VmHandle::copy_in`], [`VmHandle::read_file`], [`VmHandle::copy_out`],
//! [`VmHandle::list_dir`], [`VmHandle::remove`].
//!
//! Guest paths are absolute; the agent acts as root. A guest-side failure is
//! [`Error::Agent`] holding [`AgentError::File`], whose [`FileError`] says what kind
//! (not found, permission, a directory, too large, ...). Each call uses one agent connection and
//! is bounded by the builder's agent timeout.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use loft_agent::client::{self as agent_client, AgentError, DirEntry, FileError};

use super::VmHandle;
use crate::Error;

impl VmHandle {
    /// Writes `data` to the guest file `path` with permission bits `mode` (e.g. `0o644`),
    /// replacing it if it exists and creating missing parent directories.
    pub fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), Error> {
        let stream = self.agent_stream()?;
        agent_client::write_file(stream, path, mode, &mut &data[..], Some(self.agent_timeout))?;
        Ok(())
    }

    /// Copies the host file `host` to the guest file `path`, with the host file's permission
    /// bits, streaming it (any size). Returns the bytes copied.
    pub fn copy_in(&self, host: impl AsRef<Path>, path: &str) -> Result<u64, Error> {
        let host = host.as_ref();
        let file = File::open(host).map_err(|e| host_file_error(host, "open", e))?;
        let meta = file
            .metadata()
            .map_err(|e| host_file_error(host, "stat", e))?;
        if meta.is_dir() {
            return Err(host_file_error(
                host,
                "copy",
                io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        let mode = meta.permissions().mode() & 0o7777;
        let stream = self.agent_stream()?;
        let mut reader = BufReader::with_capacity(loft_agent::CHUNK, file);
        Ok(agent_client::write_file(
            stream,
            path,
            mode,
            &mut reader,
            Some(self.agent_timeout),
        )?)
    }

    /// Reads the guest file `path`, at most `limit` bytes: a larger file is
    /// [`FileError::TooLarge`], a directory [`FileError::IsADirectory`].
    pub fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>, Error> {
        let stream = self.agent_stream()?;
        let mut out = Vec::new();
        agent_client::read_file(stream, path, limit, &mut out, Some(self.agent_timeout))?;
        Ok(out)
    }

    /// Copies the guest file `path` to the host file `host` (created or replaced), streaming it
    /// (any size). Returns the bytes copied. If the copy fails, `host` is removed.
    pub fn copy_out(&self, path: &str, host: impl AsRef<Path>) -> Result<u64, Error> {
        let host = host.as_ref();
        let stream = self.agent_stream()?;
        let file = File::create(host).map_err(|e| host_file_error(host, "create", e))?;
        let mut writer = BufWriter::with_capacity(loft_agent::CHUNK, file);
        let copied = agent_client::read_file(
            stream,
            path,
            u64::MAX,
            &mut writer,
            Some(self.agent_timeout),
        )
        .map_err(Error::from)
        .and_then(|n| {
            writer
                .flush()
                .map_err(|e| host_file_error(host, "write", e))
                .map(|()| n)
        });
        if copied.is_err() {
            drop(writer);
            let _ = std::fs::remove_file(host);
        }
        copied
    }

    /// Lists the guest directory `path` (its entries but `.` and `..`).
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>, Error> {
        let stream = self.agent_stream()?;
        Ok(agent_client::list_dir(
            stream,
            path,
            Some(self.agent_timeout),
        )?)
    }

    /// Removes the guest file, symlink or empty directory `path`; with `recursive`, a
    /// directory with everything in it.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        let stream = self.agent_stream()?;
        Ok(agent_client::remove(
            stream,
            path,
            recursive,
            Some(self.agent_timeout),
        )?)
    }
}

fn host_file_error(path: &Path, what: &str, e: io::Error) -> Error {
    Error::Agent(AgentError::Io(io::Error::new(
        e.kind(),
        format!("cannot {what} the host file {}: {e}", path.display()),
    )))
}

impl Error {
    /// What kind of file error this is, when a file request failed in the guest (or a read went
    /// over its limit).
    pub fn file_error(&self) -> Option<FileError> {
        match self {
            Error::Agent(AgentError::File { kind, .. }) => Some(*kind),
            _ => None,
        }
    }
}
