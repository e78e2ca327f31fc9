//! The snapshot's `state` file: a small header that says what the file is and checks itself,
//! then the state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "LOFTSNAP"
//!      8     4  format version, little-endian (FORMAT_VERSION)
//!     12     4  CRC-32 (IEEE) of the body, little-endian
//!     16     8  body length in bytes, little-endian (at most MAX_BODY)
//!     24     …  body: the state, JSON
//! ```
//!
//! The file is input a user hands loft: every field is checked before it is trusted (magic,
//! version, length against the file's and against [`MAX_BODY`], checksum), then the JSON is
//! parsed into typed state, which the restore path checks again against the host.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What the file starts with.
pub const MAGIC: &[u8; 8] = b"LOFTSNAP";
/// The format this loft writes and reads. Bump it whenever the state changes shape.
pub const FORMAT_VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: usize = 24;
/// Largest body loft reads: a state is a few hundred KiB even with many vCPUs.
pub const MAX_BODY: u64 = 64 << 20;

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file cannot be opened, read or written.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What loft was doing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a loft snapshot state file.
    #[error("{} is not a loft snapshot state file (bad magic)", .0.display())]
    BadMagic(PathBuf),
    /// Written by another version of the format.
    #[error("{} has snapshot format version {found}; this loft reads version {FORMAT_VERSION}", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// Shorter than its header says, or longer than loft reads.
    #[error("{} is truncated or oversized: the header announces {announced} bytes of state, the file has {present}", path.display())]
    Length {
        /// The file.
        path: PathBuf,
        /// The body length in the header.
        announced: u64,
        /// The bytes present after the header.
        present: u64,
    },
    /// The body does not match its checksum.
    #[error("{} is corrupt: its checksum does not match", .0.display())]
    Checksum(PathBuf),
    /// The body is not a state this loft understands.
    #[error("{} holds a state loft cannot read", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The state could not be serialized (a bug).
    #[error("cannot serialize the snapshot state")]
    Serialize(#[source] serde_json::Error),
}

/// The header and body of `state`, as bytes.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, StateFileError> {
    let body = serde_json::to_vec(state).map_err(StateFileError::Serialize)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks `bytes` (read from `path`) and parses the state.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StateFileError> {
    let header = bytes.get(..HEADER_LEN);
    let Some(header) = header.filter(|h| h.starts_with(MAGIC)) else {
        return Err(StateFileError::BadMagic(path.into()));
    };
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version {
            path: path.into(),
            found: version,
        });
    }
    let crc = word(12);
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[16..24]);
    let announced = u64::from_le_bytes(len);
    let body = &bytes[HEADER_LEN..];
    if announced != body.len() as u64 || announced > MAX_BODY {
        return Err(StateFileError::Length {
            path: path.into(),
            announced,
            present: body.len() as u64,
        });
    }
    if crc32fast::hash(body) != crc {
        return Err(StateFileError::Checksum(path.into()));
    }
    serde_json::from_slice(body).map_err(|source| StateFileError::Parse {
        path: path.into(),
        source,
    })
}

/// Reads and checks the state file at `path`, reading at most what [`MAX_BODY`] allows.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, StateFileError> {
    let io = |what| {
        move |source| StateFileError::Io {
            what,
            path: path.into(),
            source,
        }
    };
    let file = File::open(path).map_err(io("open"))?;
    let mut bytes = Vec::new();
    file.take(HEADER_LEN as u64 + MAX_BODY + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read"))?;
    decode(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed over `path`: a reader sees the old file or the whole new one, never a half-written
/// one, and a file another VM has mapped is never rewritten in place.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateFileError> {
    replace_with(path, |f| f.write_all(bytes))
}

/// Creates `path`'s content with `fill` on a temporary file beside it, syncs it and renames it
/// over `path`.
pub fn replace_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), StateFileError> {
    let io = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| StateFileError::Io {
            what,
            path: p,
            source,
        }
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
        fill(&mut f).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(io("rename into place", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(&S {
            a: 7,
            b: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn round_trips() {
        let s: S = decode(Path::new("x"), &sample()).unwrap();
        assert_eq!(
            s,
            S {
                a: 7,
                b: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_an_error() {
        let good = sample();
        for len in 0..good.len() {
            assert!(
                decode::<S>(Path::new("x"), &good[..len]).is_err(),
                "truncated to {len}"
            );
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x5a;
            assert!(
                decode::<S>(Path::new("x"), &bad).is_err(),
                "byte {i} flipped"
            );
        }
        let mut longer = good.clone();
        longer.push(b' ');
        assert!(matches!(
            decode::<S>(Path::new("x"), &longer),
            Err(StateFileError::Length { .. })
        ));
    }

    #[test]
    fn names_the_problem() {
        let good = sample();
        let mut v = good.clone();
        v[8] = 9;
        assert!(matches!(
            decode::<S>(Path::new("x"), &v),
            Err(StateFileError::Version { found: 9, .. })
        ));
        assert!(matches!(
            decode::<S>(Path::new("x"), b"ELF\x7f and more bytes than a header"),
            Err(StateFileError::BadMagic(_))
        ));
        let mut huge = good[..HEADER_LEN].to_vec();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<S>(Path::new("x"), &huge),
            Err(StateFileError::Length { .. })
        ));
        // A well-formed file whose JSON is another shape.
        let other = encode(&vec!["not", "S"]).unwrap();
        assert!(matches!(
            decode::<S>(Path::new("x"), &other),
            Err(StateFileError::Parse { .. })
        ));
    }

    #[test]
    fn writes_through_a_temporary_file() {
        let dir = std::env::temp_dir().join(format!("loft-statefile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state");
        write_atomically(&p, &sample()).unwrap();
        let s: S = read(&p).unwrap();
        assert_eq!(s.a, 7);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary left"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
