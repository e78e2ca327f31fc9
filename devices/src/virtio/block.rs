//! virtio-blk backed by a raw disk image file.
//!
//! One request queue. Requests: IN, OUT, FLUSH (a real `fdatasync`), GET_ID; anything else is
//! answered UNSUPP. A request is a chain of a 16-byte device-readable header, data buffers
//! (device-writable for IN and GET_ID, device-readable for OUT) and a device-writable status
//! byte in the last descriptor. A chain that breaks these rules, points outside guest memory or
//! outside the disk gets VIRTIO_BLK_S_IOERR; a chain without a writable status byte is returned
//! with a used length of 0.
//!
//! Snapshots: [`Block::save`] keeps the image's path, read-only flag, capacity and serial as a
//! [`BlockState`]; [`Block::restore`] opens an image (the same one, or a copy elsewhere) and
//! shows the guest the same disk. [`Block::sync`] makes the writes durable before a snapshot.
//!
//! # Threads
//!
//! loft serves each disk on a thread of its own, a [`worker::BlockWorker`], so that a long
//! request (up to a whole disk) or an `fdatasync` never holds up the VMM's event loop (stop,
//! console, network, vsock). The worker waits on the queue's notification `EventFd`, locks the
//! device and runs [`Block::process_queue_with`], which looks at the worker's stop and pause
//! flags between requests (and at the stop flag between the 64 KiB steps of one request).
//! A request is handled under the device's lock from start to end, so whoever holds the lock
//! sees no request in flight: that is what a snapshot relies on (see [`worker`]).
//! [`Block`] also implements `MutEventSubscriber`, for an event loop that runs the queue itself
//! (the tests, or an embedder of this crate); loft does not use it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::chain::{check_buffer, check_range, Chain};
use super::{DeviceBase, VirtioDevice, VirtioDeviceState};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes per sector, the unit of request offsets and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Largest number of data segments in one request (the queue less header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes moved between the image and guest memory per step.
const CHUNK: usize = 64 * 1024;
/// Length of the request header.
const HEADER_LEN: u32 = 16;
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Errors from creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image could not be opened.
    #[error("cannot open the image")]
    Open {
        /// Path of the image.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The size or identity of the disk image could not be read.
    #[error("cannot read the size of the image")]
    Size {
        /// Path of the image.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The virtio plumbing (eventfds) could not be set up.
    #[error("cannot set up virtio-blk")]
    Virtio(#[from] super::Error),
    /// The image to restore is smaller than the disk the snapshot was taken with.
    #[error(
        "the image has {found} sectors, fewer than the {saved} of the snapshot: \
         a disk cannot shrink under a restored guest"
    )]
    Shrunk {
        /// Path of the image.
        path: PathBuf,
        /// Capacity in the snapshot, in sectors.
        saved: u64,
        /// Capacity of the image, in sectors.
        found: u64,
    },
    /// Another VM (in this process or another) has the image open in a way this one conflicts
    /// with: read-write there, or read-write here while it is open there.
    #[error("the image is in use by another VM ({}); two VMs writing one image corrupt it", if *read_only { "it writes to it" } else { "it is open there" })]
    Locked {
        /// Path of the image.
        path: PathBuf,
        /// This VM wanted it read-only.
        read_only: bool,
    },
    /// The image could not be locked.
    #[error("cannot lock the image")]
    Lock {
        /// Path of the image.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The serial in the state is longer than virtio-blk's 20 bytes.
    #[error("disk serial of {0} bytes in the state is longer than 20 bytes")]
    SerialTooLong(usize),
}

/// The saved state of a block device: what the guest was shown of the disk.
///
/// Nothing is in flight whenever the device's lock is free (each request is read, done and
/// returned under the lock, and a snapshot pauses the device's worker first), so there is no
/// request to save; the image itself is not part of the state, and must
/// match the guest memory (call [`Block::sync`], or save through
/// [`super::MmioTransport::save_device`], which does).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Path of the image when saved (the restored device may use another).
    pub path: PathBuf,
    /// The disk is read-only.
    pub read_only: bool,
    /// Capacity in 512-byte sectors, as the guest knows it.
    pub capacity: u64,
    /// The serial returned by GET_ID (at most 20 bytes; shorter ones are NUL-padded).
    pub serial: String,
}

/// What went wrong with a request, reported to the driver as its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    IoErr,
    Unsupp,
    /// Not an answer: the device is stopping, and left the request half done and unanswered
    /// (the guest never sees it complete).
    Abandoned,
}

impl Status {
    fn code(self) -> u8 {
        match self {
            Status::IoErr | Status::Abandoned => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// When [`Block::process_queue_with`] must stop taking requests.
pub trait Halt {
    /// The device is stopping for good: give up at once, even in the middle of a request
    /// (which is then never answered).
    fn stopping(&self) -> bool;
    /// Take no new request (a request under way is finished first).
    fn paused(&self) -> bool {
        self.stopping()
    }
}

/// Never halts: what [`Block::process_queue`] uses.
struct Never;

impl Halt for Never {
    fn stopping(&self) -> bool {
        false
    }
}

/// The disk image and what request handling needs of it.
struct Disk {
    file: File,
    read_only: bool,
    /// Size in bytes: a whole number of sectors.
    size: u64,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
}

impl Disk {
    /// Handles one request chain; returns the number of bytes written to the guest, or `None`
    /// when `halt` said to stop in the middle of it (the chain is then left unanswered).
    fn handle(&mut self, mem: &GuestMemoryMmap<()>, chain: &Chain, halt: &dyn Halt) -> Option<u32> {
        let Some((status, rest)) = chain.descs.split_last() else {
            debug!("virtio-blk: empty descriptor chain");
            return Some(0);
        };
        if !status.is_write_only()
            || status.len() == 0
            || check_range(mem, status.addr(), 1).is_err()
        {
            debug!("virtio-blk: request without a writable status byte, returned unanswered");
            return Some(0);
        }
        let result = if chain.complete {
            self.execute(mem, rest, halt)
        } else {
            debug!("virtio-blk: descriptor chain does not terminate");
            Err(Status::IoErr)
        };
        let (code, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(Status::Abandoned) => return None,
            Err(s) => (s.code(), 0),
        };
        if mem.write_obj(code, status.addr()).is_err() {
            return Some(0);
        }
        Some(written.saturating_add(1))
    }

    /// Runs the request of header + data descriptors `descs`; returns data bytes written to the
    /// guest.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        descs: &[Descriptor],
        halt: &dyn Halt,
    ) -> Result<u32, Status> {
        let Some((header, data)) = descs.split_first() else {
            debug!("virtio-blk: request without a header");
            return Err(Status::IoErr);
        };
        if header.is_write_only() || header.len() < HEADER_LEN {
            debug!("virtio-blk: request header is writable or short");
            return Err(Status::IoErr);
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut hdr, header.addr()).map_err(|e| {
            debug!("virtio-blk: cannot read request header: {e}");
            Status::IoErr
        })?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(sector);
        match req_type {
            VIRTIO_BLK_T_IN => self.read(mem, sector, data, halt),
            VIRTIO_BLK_T_OUT => self.write(mem, sector, data, halt).map(|()| 0),
            VIRTIO_BLK_T_FLUSH => self.flush().map(|()| 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, data),
            other => {
                debug!("virtio-blk: unsupported request type {other}");
                Err(Status::Unsupp)
            }
        }
    }

    /// Checks the data buffers of a transfer at `sector`; returns the image byte offset.
    fn check_transfer(
        &self,
        mem: &GuestMemoryMmap<()>,
        sector: u64,
        data: &[Descriptor],
        writable: bool,
    ) -> Result<u64, Status> {
        let mut total: u64 = 0;
        for d in data {
            check_buffer(mem, d, writable).map_err(|e| {
                debug!("virtio-blk: bad data buffer: {e}");
                Status::IoErr
            })?;
            total += u64::from(d.len());
        }
        if total % SECTOR_SIZE != 0 {
            debug!("virtio-blk: transfer of {total} bytes is not whole sectors");
            return Err(Status::IoErr);
        }
        let start = sector.checked_mul(SECTOR_SIZE);
        let end = start.and_then(|s| s.checked_add(total));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.size => Ok(start),
            _ => {
                debug!("virtio-blk: transfer at sector {sector} of {total} bytes is past the end");
                Err(Status::IoErr)
            }
        }
    }

    fn read(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        sector: u64,
        data: &[Descriptor],
        halt: &dyn Halt,
    ) -> Result<u32, Status> {
        let mut pos = self.check_transfer(mem, sector, data, true)?;
        let mut written: u32 = 0;
        for d in data {
            let mut done: u32 = 0;
            while done < d.len() {
                if halt.stopping() {
                    return Err(Status::Abandoned);
                }
                let n = (d.len() - done).min(CHUNK as u32);
                let buf = &mut self.bounce[..n as usize];
                self.file.read_exact_at(buf, pos).map_err(|e| {
                    warn!("virtio-blk: read of disk image at {pos:#x} failed: {e}");
                    Status::IoErr
                })?;
                let addr = GuestAddress(d.addr().0 + u64::from(done));
                mem.write_slice(buf, addr).map_err(|_| Status::IoErr)?;
                done += n;
                pos += u64::from(n);
            }
            written = written.saturating_add(done);
        }
        Ok(written)
    }

    fn write(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        sector: u64,
        data: &[Descriptor],
        halt: &dyn Halt,
    ) -> Result<(), Status> {
        if self.read_only {
            debug!("virtio-blk: write to a read-only disk");
            return Err(Status::IoErr);
        }
        let mut pos = self.check_transfer(mem, sector, data, false)?;
        for d in data {
            let mut done: u32 = 0;
            while done < d.len() {
                if halt.stopping() {
                    return Err(Status::Abandoned);
                }
                let n = (d.len() - done).min(CHUNK as u32);
                let buf = &mut self.bounce[..n as usize];
                let addr = GuestAddress(d.addr().0 + u64::from(done));
                mem.read_slice(buf, addr).map_err(|_| Status::IoErr)?;
                self.file.write_all_at(buf, pos).map_err(|e| {
                    warn!("virtio-blk: write of disk image at {pos:#x} failed: {e}");
                    Status::IoErr
                })?;
                done += n;
                pos += u64::from(n);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Status> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| {
            warn!("virtio-blk: fdatasync of disk image failed: {e}");
            Status::IoErr
        })
    }

    fn get_id(&mut self, mem: &GuestMemoryMmap<()>, data: &[Descriptor]) -> Result<u32, Status> {
        for d in data {
            check_buffer(mem, d, true).map_err(|e| {
                debug!("virtio-blk: bad GET_ID buffer: {e}");
                Status::IoErr
            })?;
        }
        let mut left: &[u8] = &self.id;
        for d in data {
            let n = left.len().min(d.len() as usize);
            mem.write_slice(&left[..n], d.addr())
                .map_err(|_| Status::IoErr)?;
            left = &left[n..];
        }
        Ok((ID_BYTES - left.len()) as u32)
    }
}

/// A virtio-blk device over a raw image file.
pub struct Block {
    disk: Disk,
    path: PathBuf,
    base: DeviceBase,
}

/// An opened image: the file, its size in bytes and its metadata.
struct Image {
    file: File,
    len: u64,
    meta: std::fs::Metadata,
}

/// Locks the whole image with an open-file-description lock, as QEMU does: exclusive for a
/// read-write disk, shared for a read-only one. OFD locks (unlike POSIX record locks) conflict
/// between two opens in one process too, and stay until this open is closed, whatever other
/// descriptors of the file are closed meanwhile. A conflict is refused at once, never waited for.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    use std::os::fd::AsRawFd;
    let request = libc::flock {
        l_type: if read_only {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        } as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads a valid `flock` through the pointer, which lives across the
    // call; the descriptor is open (owned by `file`).
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(BlockError::Locked {
            path: path.to_owned(),
            read_only,
        }),
        // Filesystems without locks (some network ones): go on unlocked, as QEMU warns.
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
            warn!(
                "virtio-blk: {} cannot be locked ({err}); serving it unlocked",
                path.display()
            );
            Ok(())
        }
        _ => Err(BlockError::Lock {
            path: path.to_owned(),
            source: err,
        }),
    }
}

impl Image {
    /// Opens the raw image at `path` (read-write unless `read_only`) and locks it.
    fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size_err = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        // A directory opens read-only and "seeks" to an absurd end: refuse it like a write open
        // would. Regular files and block devices are the images loft serves.
        if meta.is_dir() {
            return Err(BlockError::Open {
                path: path.to_owned(),
                source: io::Error::from_raw_os_error(libc::EISDIR),
            });
        }
        lock(&file, path, read_only)?;
        // Seeking works for regular files and block devices alike.
        let len = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        Ok(Self { file, len, meta })
    }
}

impl Block {
    /// Opens the raw image at `path` (read-write unless `read_only`).
    ///
    /// The capacity is the file size in whole 512-byte sectors; a trailing partial sector is
    /// not visible to the guest.
    pub fn new(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlockError> {
        let path = path.as_ref();
        let Image { file, len, meta } = Image::open(path, read_only)?;
        if len % SECTOR_SIZE != 0 {
            warn!(
                "virtio-blk: {} is not a whole number of sectors; the last {} bytes are not visible",
                path.display(),
                len % SECTOR_SIZE
            );
        }
        let size = len - len % SECTOR_SIZE;

        // A stable serial: the image's device and inode numbers, 20 hex digits.
        let serial = format!(
            "{:08x}{:012x}",
            meta.dev() as u32,
            meta.ino() & 0xffff_ffff_ffff
        );
        let mut id = [0u8; ID_BYTES];
        id.copy_from_slice(&serial.as_bytes()[..ID_BYTES]);
        Self::build(path, file, read_only, size, id)
    }

    /// A device over the image at `path` (the snapshot's or another) that shows the guest the
    /// disk saved in `state`: same capacity, serial and read-only flag.
    ///
    /// An image smaller than the saved capacity is an error; a larger one is served at the
    /// saved capacity (the guest would not notice a resize without a config interrupt).
    pub fn restore(path: impl AsRef<Path>, state: &BlockState) -> Result<Self, BlockError> {
        let path = path.as_ref();
        let serial = state.serial.as_bytes();
        if serial.len() > ID_BYTES {
            return Err(BlockError::SerialTooLong(serial.len()));
        }
        let mut id = [0u8; ID_BYTES];
        id[..serial.len()].copy_from_slice(serial);
        let Image { file, len, .. } = Image::open(path, state.read_only)?;
        let size = match state.capacity.checked_mul(SECTOR_SIZE) {
            Some(size) if size <= len => size,
            _ => {
                return Err(BlockError::Shrunk {
                    path: path.to_owned(),
                    saved: state.capacity,
                    found: len / SECTOR_SIZE,
                })
            }
        };
        if len / SECTOR_SIZE > state.capacity {
            warn!(
                "virtio-blk: {} is larger than the snapshot's disk; the guest keeps seeing {} sectors",
                path.display(),
                state.capacity
            );
        }
        Self::build(path, file, state.read_only, size, id)
    }

    /// The device over an opened image of `size` bytes (whole sectors).
    fn build(
        path: &Path,
        file: File,
        read_only: bool,
        size: u64,
        id: [u8; ID_BYTES],
    ) -> Result<Self, BlockError> {
        let mut features =
            (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        // virtio_blk_config: capacity (sectors) at 0, seg_max at 12, the rest 0.
        let mut config = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
        config[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Self {
            disk: Disk {
                file,
                read_only,
                size,
                id,
                bounce: vec![0; CHUNK],
            },
            path: path.to_owned(),
            base: DeviceBase::new(VIRTIO_ID_BLOCK, features, config, vec![QUEUE_SIZE])?,
        })
    }

    /// What the guest was shown of the disk, for a snapshot.
    pub fn save(&self) -> BlockState {
        let len = self
            .disk
            .id
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |i| i + 1);
        let serial = &self.disk.id[..len];
        BlockState {
            path: self.path.clone(),
            read_only: self.disk.read_only,
            capacity: self.capacity(),
            serial: String::from_utf8_lossy(serial).into_owned(),
        }
    }

    /// Makes the guest's writes durable (`fdatasync` of the image), so that a snapshot's disk
    /// matches its memory. Nothing to do for a read-only disk.
    pub fn sync(&self) -> io::Result<()> {
        if self.disk.read_only {
            return Ok(());
        }
        self.disk.file.sync_data()
    }

    /// Path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the guest cannot write to the disk.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    /// The 20-byte serial returned by GET_ID.
    pub fn serial(&self) -> [u8; ID_BYTES] {
        self.disk.id
    }

    /// Handles the requests available in the queue, then interrupts the driver if it wants.
    ///
    /// This is what a queue notification does. It handles at most one queue's worth of
    /// requests per call and re-signals its own notification `EventFd` if more are left, so a
    /// busy guest cannot hog the thread that runs it. Does nothing before activation.
    pub fn process_queue(&mut self) {
        self.process_queue_with(&Never);
    }

    /// [`Block::process_queue`], taking no new request once `halt` says it is paused or
    /// stopping, and leaving the request under way (unanswered) once it says it is stopping.
    ///
    /// Requests it did not take stay in the available ring, where the next call finds them
    /// (and so does a snapshot: the queue's position is where this stopped). Returns the
    /// number of requests answered.
    pub fn process_queue_with(&mut self, halt: &dyn Halt) -> usize {
        let Some(active) = self.base.active.as_mut() else {
            debug!("virtio-blk: queue notification before activation, ignored");
            return 0;
        };
        let mem = &active.mem;
        let q = &mut active.queues[0];
        let budget = usize::from(q.size());
        let mut handled = 0;
        let mut broken = false;
        let mut halted = false;
        while handled < budget {
            if halt.paused() {
                halted = true;
                break;
            }
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    debug!("virtio-blk: bad available ring: {e}");
                    broken = true;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let chain = Chain::collect(chain, budget);
            let Some(len) = self.disk.handle(mem, &chain, halt) else {
                // Stopping for good: the chain is taken from the ring but never answered.
                halted = true;
                break;
            };
            if let Err(e) = q.add_used(mem, chain.head, len) {
                debug!("virtio-blk: cannot return descriptor {}: {e}", chain.head);
                broken = true;
                break;
            }
            handled += 1;
        }
        if handled > 0 && !matches!(q.needs_notification(mem), Ok(false)) {
            self.base.interrupt.signal_used();
        }
        if handled == budget && !halted {
            // Maybe more: come back after the other event sources had their turn.
            self.base.kick(0);
        }
        if broken {
            self.base.fail();
        }
        handled
    }

    /// A clone of the queue's notification `EventFd`, for a thread that waits on it.
    pub fn queue_event(&self) -> io::Result<vmm_sys_util::eventfd::EventFd> {
        self.base.queue_evts[0].try_clone()
    }
}

impl VirtioDevice for Block {
    fn base(&self) -> &DeviceBase {
        &self.base
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), super::Error> {
        self.base.activate(mem, queues, features)
    }

    fn reset(&mut self) {
        self.base.active = None;
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.save())
    }

    fn sync(&mut self) -> io::Result<()> {
        Block::sync(self)
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.base.watch_queues(ops, "virtio-blk");
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match self.base.queue_evts.get(events.data() as usize) {
            Some(evt) => {
                let _ = evt.read();
                self.process_queue();
            }
            None => debug!("virtio-blk: event for unknown source {}", events.data()),
        }
    }
}

pub mod worker;

#[cfg(test)]
mod tests;
