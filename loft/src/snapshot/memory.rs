//! The snapshot's `memory` file: guest RAM laid out region after region, with holes where the
//! guest never wrote (a page of zeros is not written), and the restore side that maps it
//! `MAP_PRIVATE`: no copy at restore, pages load on first touch, and the guest's writes go to
//! private copies, so the file stays as it was and many VMs can map it at once.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout;

/// One guest RAM region and where it is in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRegion {
    /// Guest physical address of the region's start.
    pub guest_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where it starts in the memory file.
    pub file_offset: u64,
}

/// Errors writing or mapping the memory file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotMemoryError {
    /// The memory file cannot be opened, read or written.
    #[error("cannot {what} the memory file {}", path.display())]
    Io {
        /// What loft was doing.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be read while saving.
    #[error("cannot read guest memory at {0:#x}")]
    Read(u64, #[source] vm_memory::GuestMemoryError),
    /// The state's memory layout is not the one loft gives a guest of that size.
    #[error("the snapshot's memory layout does not match a {size}-byte guest")]
    Layout {
        /// The guest size the state claims.
        size: u64,
    },
    /// The memory file is shorter than the layout needs.
    #[error("the memory file {} has {len} bytes; the snapshot's layout needs {needed}", path.display())]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What the layout needs.
        needed: u64,
    },
    /// The host refused the mapping.
    #[error("cannot map the memory file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions overlap or are not in order (cannot happen for a checked layout).
    #[error("cannot assemble guest memory from the memory file")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// The layout of `mem` in a memory file: its regions one after the other.
pub fn layout_of(mem: &GuestMemoryMmap) -> Vec<MemRegion> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let region = MemRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            region
        })
        .collect()
}

/// Total guest RAM described by `regions`.
pub fn total_size(regions: &[MemRegion]) -> u64 {
    regions.iter().map(|r| r.size).sum()
}

/// Bytes read from guest memory at a time while saving.
const CHUNK: usize = 1 << 20;
/// The unit of holes: a page of zeros is not written.
const PAGE: usize = 4096;

/// Writes guest RAM to `file` as `regions` lays it out, leaving holes for zero pages; returns
/// the bytes written (what the file costs on disk, near enough).
pub fn write(
    mem: &GuestMemoryMmap,
    regions: &[MemRegion],
    file: &File,
    path: &Path,
) -> Result<u64, SnapshotMemoryError> {
    let io = |what| {
        move |source| SnapshotMemoryError::Io {
            what,
            path: path.into(),
            source,
        }
    };
    file.set_len(total_size(regions)).map_err(io("size"))?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for r in regions {
        let mut done = 0u64;
        while done < r.size {
            let n = (r.size - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            let at = r.guest_addr + done;
            mem.read_slice(chunk, GuestAddress(at))
                .map_err(|e| SnapshotMemoryError::Read(at, e))?;
            // Write each run of non-zero pages with one call.
            let mut page = 0;
            while page < n {
                if is_zero(&chunk[page..(page + PAGE).min(n)]) {
                    page += PAGE;
                    continue;
                }
                let start = page;
                while page < n && !is_zero(&chunk[page..(page + PAGE).min(n)]) {
                    page += PAGE;
                }
                let end = page.min(n);
                file.write_all_at(&chunk[start..end], r.file_offset + done + start as u64)
                    .map_err(io("write"))?;
                written += (end - start) as u64;
            }
            done += n as u64;
        }
    }
    Ok(written)
}

fn is_zero(page: &[u8]) -> bool {
    // Compare in words: this runs over every byte of guest RAM at each snapshot.
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only splits the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Maps the memory file at `path` as guest RAM of `size` bytes laid out as `regions`, privately:
/// the guest's writes never reach the file. The layout must be the one loft gives a guest of
/// that size, and the file must cover it.
pub fn map(
    path: &Path,
    size: u64,
    regions: &[MemRegion],
) -> Result<GuestMemoryMmap, SnapshotMemoryError> {
    let expected: Vec<(u64, u64)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start.0, len))
        .collect();
    let given: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    let mut offset = 0u64;
    let contiguous = regions.iter().all(|r| {
        let ok = r.file_offset == offset;
        offset = offset.saturating_add(r.size);
        ok
    });
    if given != expected || !contiguous || size == 0 {
        return Err(SnapshotMemoryError::Layout { size });
    }
    let file = File::open(path).map_err(|source| SnapshotMemoryError::Io {
        what: "open",
        path: path.into(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| SnapshotMemoryError::Io {
            what: "read the size of",
            path: path.into(),
            source,
        })?
        .len();
    if len < size {
        return Err(SnapshotMemoryError::TooShort {
            path: path.into(),
            len,
            needed: size,
        });
    }
    let file = Arc::new(file);
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let mapping = MmapRegionBuilder::new(r.size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(SnapshotMemoryError::Map)?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or(SnapshotMemoryError::Layout { size })?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(SnapshotMemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("loft-snapmem-{}-{name}", std::process::id()))
    }

    #[test]
    fn writes_holes_for_untouched_pages_and_maps_back_privately() {
        let size = 64u64 << 20;
        let mem = crate::vstate::memory::create(size).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(0x20_0000))
            .unwrap();
        let regions = layout_of(&mem);
        let path = tmp("mem");
        let file = File::create(&path).unwrap();
        let written = write(&mem, &regions, &file, &path).unwrap();
        assert_eq!(written, 3 * 4096, "only the three non-zero pages");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), size);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            meta.blocks()
        );
        let restored = map(&path, size, &regions).unwrap();
        let mut b = [0u8; 5];
        restored.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        restored
            .write_slice(b"HELLO", GuestAddress(0x1000))
            .unwrap();
        let again = map(&path, size, &regions).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello", "the guest's writes stay private");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn refuses_foreign_layouts_and_short_files() {
        let size = 16u64 << 20;
        let mem = crate::vstate::memory::create(size).unwrap();
        let regions = layout_of(&mem);
        let path = tmp("short");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(matches!(
            map(&path, size, &regions),
            Err(SnapshotMemoryError::TooShort { .. })
        ));
        let mut moved = regions.clone();
        moved[0].guest_addr = 0xfee0_0000;
        assert!(matches!(
            map(&path, size, &moved),
            Err(SnapshotMemoryError::Layout { .. })
        ));
        let mut gap = regions.clone();
        gap[0].file_offset = 4096;
        assert!(matches!(
            map(&path, size, &gap),
            Err(SnapshotMemoryError::Layout { .. })
        ));
        assert!(matches!(
            map(&path, 0, &[]),
            Err(SnapshotMemoryError::Layout { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
