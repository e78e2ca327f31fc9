//! A guest-side virtio-mmio driver for the fuzz targets: guest memory with a hole, split queues
//! laid out at fixed addresses, the register sequence a Linux driver uses, and the event loop
//! the VMM runs the devices on.
//!
//! Everything goes through the real [`MmioTransport`] (the one `VirtioMmioDevice` puts on the
//! MMIO bus) and the devices' real `MutEventSubscriber::process`, driven by an
//! [`EventManager`] exactly as the VMM's event loop does.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use loft_devices::virtio::{MmioTransport, VirtioDevice};
use loft_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// First RAM region: rings at the start, data after [`DATA`].
pub const MEM_END: u64 = 0x2_0000;
/// Second RAM region, after a hole: buffers crossing [`MEM_END`] fall into the hole.
pub const HIGH: u64 = 0x3_0000;
/// Length of the second region.
pub const HIGH_LEN: u64 = 0x1000;
/// Start of the data area (after the rings of four queues).
pub const DATA: u64 = 0x8000;
/// Bytes of rings per queue.
const QUEUE_SPAN: u64 = 0x2000;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const CONFIG: u64 = 0x100;

/// VRING_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VRING_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;

/// Status bits a driver or the device may set: ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK,
/// NEEDS_RESET, FAILED.
const KNOWN_STATUS: u32 = 1 | 2 | 4 | 8 | 0x40 | 0x80;

/// Guest memory: `[0, MEM_END)` and `[HIGH, HIGH + HIGH_LEN)`.
pub fn guest_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_END as usize),
        (GuestAddress(HIGH), HIGH_LEN as usize),
    ])
    .expect("guest memory")
}

/// A fresh per-process scratch directory (for disk images and vsock sockets).
pub fn scratch_dir() -> &'static std::path::Path {
    use std::sync::OnceLock;
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("loft-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// The driver's view of one split queue: rings at fixed addresses, its own indices.
#[derive(Debug, Clone)]
pub struct QueueDriver {
    pub index: u32,
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl QueueDriver {
    pub fn desc_addr(&self) -> u64 {
        u64::from(self.index) * QUEUE_SPAN
    }
    pub fn avail_addr(&self) -> u64 {
        self.desc_addr() + 0x1000
    }
    pub fn used_addr(&self) -> u64 {
        self.desc_addr() + 0x1400
    }

    /// The descriptor slot the next chain starts at (its head).
    pub fn next_slot(&self) -> u16 {
        self.next_desc % self.size.max(1)
    }

    /// Writes descriptor `i` verbatim.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap<()>,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let at = self.desc_addr() + 16 * u64::from(i % self.size.max(1));
        mem.write_slice(&raw, GuestAddress(at))
            .expect("descriptor table in memory");
    }

    /// Writes `descs` (address, length, flags) as one chain in the next free descriptor slots
    /// (the NEXT flag and `next` set as a driver does unless `raw_next` says otherwise), then
    /// publishes its head. Returns the head.
    pub fn add_chain(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        descs: &[(u64, u32, u16, Option<u16>)],
    ) -> u16 {
        let size = self.size.max(1);
        let head = self.next_desc % size;
        let n = descs.len().min(usize::from(size)) as u16;
        for (k, &(addr, len, flags, raw_next)) in descs.iter().take(usize::from(n)).enumerate() {
            let i = (head + k as u16) % size;
            let last = k as u16 + 1 == n;
            let (flags, next) = match raw_next {
                Some(next) => (flags, next),
                None if last => (flags & !F_NEXT, 0),
                None => (flags | F_NEXT, (i + 1) % size),
            };
            self.set_desc(mem, i, addr, len, flags, next);
        }
        self.next_desc = self.next_desc.wrapping_add(n.max(1)) % size;
        self.publish(mem, head);
        head
    }

    /// Appends `head` to the available ring and bumps its index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = u64::from(self.avail_idx % self.size.max(1));
        mem.write_obj(head, GuestAddress(self.avail_addr() + 4 + 2 * slot))
            .expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the available index (possibly a lie).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap<()>, idx: u16) {
        mem.write_obj(idx, GuestAddress(self.avail_addr() + 2))
            .expect("avail ring in memory");
    }

    /// Sets the available ring's flags (VRING_AVAIL_F_NO_INTERRUPT is bit 0).
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap<()>, flags: u16) {
        mem.write_obj(flags, GuestAddress(self.avail_addr()))
            .expect("avail ring in memory");
    }
}

/// Maps a fuzzed selector and value to a guest address: mostly in the data area, sometimes at
/// the edges of memory, in the hole, in the rings, or anywhere at all.
pub fn pick_addr(sel: u8, raw: u64) -> u64 {
    match sel % 8 {
        0 => raw,
        1 => MEM_END - (raw % 0x100),
        2 => HIGH + raw % HIGH_LEN,
        3 => raw % MEM_END,
        _ => DATA + raw % (MEM_END - DATA),
    }
}

/// Event-loop type of the VMM.
pub type Loop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// One device behind the real virtio-mmio transport, with an event loop and a driver.
pub struct Rig {
    pub mem: GuestMemoryMmap<()>,
    pub t: MmioTransport,
    pub ev: Loop,
    pub queues: Vec<QueueDriver>,
    pub device_id: u32,
    pub config: Vec<u8>,
}

impl Rig {
    pub fn new<D>(dev: Arc<Mutex<D>>, mem: GuestMemoryMmap<()>) -> Self
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (nq, device_id, config) = {
            let d = dev.lock().unwrap();
            (
                d.queue_max_sizes().len(),
                d.device_type(),
                d.config().to_vec(),
            )
        };
        let t = MmioTransport::new(dev.clone(), mem.clone()).expect("transport");
        let mut ev = Loop::new().expect("event manager");
        let sub: Arc<Mutex<dyn MutEventSubscriber + Send>> = dev;
        ev.add_subscriber(sub);
        let queues = (0..nq as u32)
            .map(|index| QueueDriver {
                index,
                size: 1,
                next_desc: 0,
                avail_idx: 0,
            })
            .collect();
        Self {
            mem,
            t,
            ev,
            queues,
            device_id,
            config,
        }
    }

    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(&mut self, offset: u64, v: u32) {
        self.t.write(offset, &v.to_le_bytes());
    }

    /// What a Linux driver does: reset, ACKNOWLEDGE, DRIVER, features (the offered ones
    /// masked by `feature_mask`, VERSION_1 kept unless `drop_version`), FEATURES_OK, each queue
    /// set up with `sizes[i]` (a power of two, clamped to the maximum), DRIVER_OK. Returns true
    /// when the device took DRIVER_OK.
    pub fn setup(&mut self, feature_mask: u64, drop_version: bool, sizes: &[u8]) -> bool {
        self.write32(REG_STATUS, 0);
        self.write32(REG_STATUS, 1);
        self.write32(REG_STATUS, 3);
        self.write32(REG_DEVICE_FEATURES_SEL, 0);
        let lo = self.read32(REG_DEVICE_FEATURES);
        self.write32(REG_DEVICE_FEATURES_SEL, 1);
        let hi = self.read32(REG_DEVICE_FEATURES);
        let mut features = (u64::from(hi) << 32 | u64::from(lo)) & (feature_mask | 1 << 32);
        if drop_version {
            features &= !(1 << 32);
        }
        self.write32(REG_DRIVER_FEATURES_SEL, 0);
        self.write32(REG_DRIVER_FEATURES, features as u32);
        self.write32(REG_DRIVER_FEATURES_SEL, 1);
        self.write32(REG_DRIVER_FEATURES, (features >> 32) as u32);
        self.write32(REG_STATUS, 0xb);
        for i in 0..self.queues.len() {
            self.write32(REG_QUEUE_SEL, i as u32);
            let max = self.read32(REG_QUEUE_NUM_MAX).clamp(1, 256);
            let want = 1u32 << (sizes.get(i).copied().unwrap_or(3) % 9);
            let size = want.min(max);
            let q = &mut self.queues[i];
            q.size = size as u16;
            q.next_desc = 0;
            q.avail_idx = 0;
            let rings = [
                (REG_QUEUE_DESC_LOW, q.desc_addr()),
                (REG_QUEUE_DRIVER_LOW, q.avail_addr()),
                (REG_QUEUE_DEVICE_LOW, q.used_addr()),
            ];
            // Fresh rings: nothing available, nothing used.
            self.mem
                .write_slice(&[0u8; 4], GuestAddress(self.queues[i].avail_addr()))
                .unwrap();
            self.mem
                .write_slice(&[0u8; 4], GuestAddress(self.queues[i].used_addr()))
                .unwrap();
            self.write32(REG_QUEUE_NUM, size);
            for (reg, addr) in rings {
                self.write32(reg, addr as u32);
                self.write32(reg + 4, (addr >> 32) as u32);
            }
            self.write32(REG_QUEUE_READY, 1);
        }
        self.write32(REG_STATUS, 0xf);
        self.t.is_active()
    }

    /// QueueNotify, then the event loop runs.
    pub fn notify(&mut self, queue: u32) {
        self.write32(REG_QUEUE_NOTIFY, queue);
        self.run_events();
    }

    /// Runs what the event loop has ready, a bounded number of rounds (devices re-signal
    /// themselves when they spend their budget).
    pub fn run_events(&mut self) {
        for _ in 0..8 {
            match self.ev.run_with_timeout(0) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// What must hold whatever the guest did.
    pub fn check(&mut self) {
        assert_eq!(self.read32(REG_MAGIC), 0x7472_6976);
        assert_eq!(self.read32(REG_VERSION), 2);
        assert_eq!(self.read32(REG_DEVICE_ID), self.device_id);
        let isr = self.read32(REG_INTERRUPT_STATUS);
        assert_eq!(isr & !3, 0, "unknown interrupt status bits {isr:#x}");
        let status = self.read32(REG_STATUS);
        assert_eq!(status & !KNOWN_STATUS, 0, "unknown status bits {status:#x}");
        if status & 4 != 0 {
            assert!(
                status & 8 != 0,
                "DRIVER_OK without FEATURES_OK: {status:#x}"
            );
        }
        if self.t.is_active() {
            assert!(status & 4 != 0, "active without DRIVER_OK: {status:#x}");
        }
        // The config space never changes and reads back as the device offers it.
        let config = self.config.clone();
        for (off, len) in [(0usize, 8usize), (0, 4), (4, 4), (6, 2), (0, 1)] {
            if off + len <= config.len() {
                let mut b = [0u8; 8];
                self.t.read(CONFIG + off as u64, &mut b[..len]);
                assert_eq!(&b[..len], &config[off..off + len], "config at {off}");
            }
        }
    }
}

/// A register or config access size: the four real ones most of the time, anything up to 16
/// bytes (0 and odd sizes included) otherwise.
pub fn access_size(sel: u8) -> usize {
    match sel % 8 {
        0 => 1,
        1 => 2,
        2 | 3 => 4,
        4 => 8,
        _ => usize::from(sel >> 3) % 17,
    }
}
