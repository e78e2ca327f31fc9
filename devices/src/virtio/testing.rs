//! Test helpers: guest memory and a driver-side split queue to put hostile chains in.

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the test guest memory, starting at 0.
pub const MEM_SIZE: u64 = 0x10_0000;

/// 1 MiB of guest memory at address 0.
pub fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// One descriptor of a chain: `next` is filled in by [`TestQueue::add_chain`].
#[derive(Clone, Copy, Debug)]
pub struct DescSpec {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

impl DescSpec {
    pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: Self::WRITE,
        }
    }
}

/// A split queue at guest address 0, driven from the driver side.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap<()>,
    vq: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    size: u16,
}

impl<'a> TestQueue<'a> {
    /// A queue of `size` entries at address 0.
    pub fn new(mem: &'a GuestMemoryMmap<()>, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue of `size` entries at `addr`.
    pub fn at(mem: &'a GuestMemoryMmap<()>, addr: u64, size: u16) -> Self {
        Self {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(addr), size),
            size,
        }
    }

    pub fn mem(&self) -> &'a GuestMemoryMmap<()> {
        self.mem
    }

    /// A device-side queue, ready, pointing at this queue's rings.
    pub fn queue(&self) -> Queue {
        self.vq.create_queue().unwrap()
    }

    pub fn desc_table_addr(&self) -> u64 {
        self.vq.desc_table_addr().raw_value()
    }

    pub fn avail_addr(&self) -> u64 {
        self.vq.avail_addr().raw_value()
    }

    pub fn used_addr(&self) -> u64 {
        self.vq.used_addr().raw_value()
    }

    /// Writes descriptor `index` verbatim.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.vq.desc_table().store(index, d).unwrap();
    }

    /// Writes `specs` as a chain at descriptor indices `first..` and makes it available.
    pub fn add_chain(&self, first: u16, specs: &[DescSpec]) {
        for (i, s) in specs.iter().enumerate() {
            let index = first + i as u16;
            let (flags, next) = if i + 1 < specs.len() {
                (s.flags | DescSpec::NEXT, index + 1)
            } else {
                (s.flags & !DescSpec::NEXT, 0)
            };
            self.set_desc(index, s.addr, s.len, flags, next);
        }
        self.publish(&[first]);
    }

    /// Appends `heads` to the available ring and bumps its index.
    pub fn publish(&self, heads: &[u16]) {
        let size = usize::from(self.size);
        for &h in heads {
            let idx = self.vq.avail().idx().load();
            let slot = usize::from(idx) % size;
            self.vq
                .avail()
                .ring()
                .ref_at(slot)
                .unwrap()
                .store(h.to_le());
            self.vq.avail().idx().store(idx.wrapping_add(1));
        }
    }

    /// Sets the available index directly (to lie about how much is available).
    pub fn set_avail_idx(&self, idx: u16) {
        self.vq.avail().idx().store(idx);
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// Used ring entry `i`: (descriptor id, length).
    pub fn used(&self, i: usize) -> (u32, u32) {
        let e = self.vq.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Writes `data` to guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// A temporary disk image, removed on drop.
pub struct TempImage {
    pub path: std::path::PathBuf,
}

impl TempImage {
    /// An image of `sectors` 512-byte sectors; byte `i` of sector `s` is `(s + i) as u8`.
    pub fn new(sectors: u64) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "loft-virtio-test-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, Self::pattern(sectors)).unwrap();
        Self { path }
    }

    /// The initial contents of an image of `sectors` sectors.
    pub fn pattern(sectors: u64) -> Vec<u8> {
        (0..sectors * 512)
            .map(|b| ((b / 512) + (b % 512)) as u8)
            .collect()
    }

    /// The current contents of the image.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// 32-bit register write through the bus interface.
pub fn mmio_write(t: &mut dyn crate::BusDevice, offset: u64, v: u32) {
    t.write(offset, &v.to_le_bytes());
}

/// 32-bit register read through the bus interface.
pub fn mmio_read(t: &mut dyn crate::BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Negotiates the offered features and sets up queue `i` from `queues[i]`, the way the Linux
/// driver does, ending with DRIVER_OK.
pub fn drive_to_driver_ok(dev: &super::VirtioMmioDevice, queues: &[&TestQueue]) {
    let mut t = crate::bus::lock(&dev.transport);
    drive(&mut *t, queues);
    assert_eq!(mmio_read(&mut *t, 0x70), 0xf, "DRIVER_OK refused");
}

/// ACKNOWLEDGE, DRIVER, accept every offered feature, FEATURES_OK.
pub fn negotiate(t: &mut dyn crate::BusDevice) {
    mmio_write(t, 0x70, 1);
    mmio_write(t, 0x70, 3);
    mmio_write(t, 0x14, 0);
    let lo = mmio_read(t, 0x10);
    mmio_write(t, 0x14, 1);
    let hi = mmio_read(t, 0x10);
    mmio_write(t, 0x24, 0);
    mmio_write(t, 0x20, lo);
    mmio_write(t, 0x24, 1);
    mmio_write(t, 0x20, hi);
    mmio_write(t, 0x70, 0xb);
    assert_eq!(mmio_read(t, 0x70), 0xb, "FEATURES_OK refused");
}

/// Programs queue `index` with the rings of `q`, its size and QueueReady.
pub fn setup_queue(t: &mut dyn crate::BusDevice, index: u32, q: &TestQueue) {
    mmio_write(t, 0x30, index);
    mmio_write(t, 0x38, u32::from(q.size));
    let rings = [
        (0x80, q.desc_table_addr()),
        (0x90, q.avail_addr()),
        (0xa0, q.used_addr()),
    ];
    for (reg, addr) in rings {
        mmio_write(t, reg, addr as u32);
        mmio_write(t, reg + 4, (addr >> 32) as u32);
    }
    mmio_write(t, 0x44, 1);
}

/// [`negotiate`], [`setup_queue`] for each queue, then DRIVER_OK.
pub fn drive(t: &mut dyn crate::BusDevice, queues: &[&TestQueue]) {
    negotiate(t);
    for (i, q) in queues.iter().enumerate() {
        setup_queue(t, i as u32, q);
    }
    mmio_write(t, 0x70, 0xf);
}
