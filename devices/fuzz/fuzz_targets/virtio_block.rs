//! Feeds arbitrary split queues to the virtio-blk request handling.
//!
//! The input describes a queue size, a descriptor table (arbitrary addresses, lengths, flags and
//! next indices, mostly aimed at guest memory), the available ring and the bytes of guest
//! memory the descriptors point at (request headers included). The device must never panic,
//! hang or touch memory outside the guest's.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use loft_devices::virtio::block::Block;
use loft_devices::virtio::VirtioDevice;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: rings at 0, data from `DATA` on.
const MEM_SIZE: u64 = 0x2_0000;
const DATA: u64 = 0x8000;
const VERSION_1: u64 = 1 << 32;

/// Reads the fuzz input front to back; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// Two disk images (read-write and read-only), 16 sectors each, made once per process.
fn images() -> &'static (PathBuf, PathBuf) {
    static IMAGES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let rw = dir.join(format!("loft-fuzz-blk-{pid}-rw.img"));
        let ro = dir.join(format!("loft-fuzz-blk-{pid}-ro.img"));
        std::fs::write(&rw, vec![0x5a; 16 * 512]).unwrap();
        std::fs::write(&ro, vec![0xa5; 16 * 512]).unwrap();
        (rw, ro)
    })
}

fn run(data: &[u8]) {
    let mut input = Input(data);
    let mode = input.u8();
    let size = 1u16 << (mode % 9); // 1 ..= 256
    let read_only = mode & 0x80 != 0;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), size);

    // Descriptor table.
    let ndesc = u16::from(input.u8()).min(size);
    for i in 0..ndesc {
        let sel = input.u8();
        let raw_addr = input.u64();
        let raw_len = input.u32();
        let flags = input.u16();
        let next = input.u16();
        // Mostly inside guest memory, sometimes anywhere.
        let addr = match sel & 3 {
            0 => raw_addr,
            1 => MEM_SIZE - (raw_addr % 0x400),
            _ => DATA + raw_addr % (MEM_SIZE - DATA),
        };
        let len = if sel & 4 != 0 {
            raw_len
        } else {
            raw_len % 0x2000
        };
        let next = if sel & 8 != 0 { next } else { next % size };
        let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        vq.desc_table().store(i, d).unwrap();
    }

    // Available ring: heads, then the index (sometimes a lie).
    let navail = u16::from(input.u8()) % (size + 1);
    for i in 0..navail {
        let head = input.u16();
        let head = if head & 0x8000 != 0 {
            head
        } else {
            head % size
        };
        vq.avail()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .store(head);
    }
    let idx_lie = input.u16();
    let idx = if idx_lie & 0x8000 != 0 {
        idx_lie
    } else {
        navail
    };
    vq.avail().idx().store(idx);

    // The rest of the input is guest data: request headers and buffers.
    let rest = &input.0[..input.0.len().min((MEM_SIZE - DATA) as usize)];
    mem.write_slice(rest, GuestAddress(DATA)).unwrap();

    let (rw, ro) = images();
    let path = if read_only { ro } else { rw };
    let mut blk = Block::new(path, read_only).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    blk.activate(mem.clone(), vec![queue], VERSION_1).unwrap();
    // Twice: the second pass sees the used ring the first one wrote.
    blk.process_queue();
    blk.process_queue();
}

fuzz_target!(|data: &[u8]| run(data));
