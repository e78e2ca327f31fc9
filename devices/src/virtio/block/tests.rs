//! virtio-blk request handling, mostly against a hostile driver.

use super::*;
use crate::virtio::testing::{mem, mmio_read, DescSpec, TempImage, TestQueue, MEM_SIZE};
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use vm_memory::Bytes;

const HDR: u64 = 0x4_0000;
const DATA: u64 = 0x5_0000;
const STATUS: u64 = 0x4_1000;
const SECTORS: u64 = 16;
/// Status byte value before the device answers.
const UNANSWERED: u8 = 0xee;

const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

struct Rig<'a> {
    img: TempImage,
    blk: Block,
    tq: TestQueue<'a>,
}

impl<'a> Rig<'a> {
    fn new(m: &'a GuestMemoryMmap<()>, read_only: bool) -> Self {
        Self::with_size(m, read_only, 256)
    }

    fn with_size(m: &'a GuestMemoryMmap<()>, read_only: bool, qsize: u16) -> Self {
        let img = TempImage::new(SECTORS);
        let mut blk = Block::new(&img.path, read_only).unwrap();
        let tq = TestQueue::new(m, qsize);
        blk.activate(m.clone(), vec![tq.queue()], FEATURES).unwrap();
        tq.write(STATUS, &[UNANSWERED]);
        Self { img, blk, tq }
    }

    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.tq.write(HDR, &h);
    }

    /// Submits header + `data` + status as one chain and runs the device.
    fn submit(&mut self, req_type: u32, sector: u64, data: &[DescSpec]) {
        self.header(req_type, sector);
        let mut specs = vec![DescSpec::r(HDR, 16)];
        specs.extend_from_slice(data);
        specs.push(DescSpec::w(STATUS, 1));
        self.tq.add_chain(0, &specs);
        self.blk.process_queue();
    }

    fn status(&self) -> u8 {
        self.tq.read(STATUS, 1)[0]
    }

    /// The only used entry: (id, len).
    fn used(&self) -> (u32, u32) {
        assert_eq!(self.tq.used_idx(), 1, "exactly one chain must be returned");
        self.tq.used(0)
    }

    fn assert_ioerr(&self) {
        assert_eq!(self.status(), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(self.used(), (0, 1));
    }

    fn assert_image_untouched(&self) {
        assert_eq!(self.img.contents(), TempImage::pattern(SECTORS));
    }
}

#[test]
fn config_features_and_capacity() {
    let img = TempImage::new(SECTORS);
    let blk = Block::new(&img.path, false).unwrap();
    assert_eq!(blk.capacity(), SECTORS);
    assert_eq!(&blk.config()[0..8], &SECTORS.to_le_bytes());
    assert_eq!(&blk.config()[12..16], &SEG_MAX.to_le_bytes());
    assert_eq!(blk.device_type(), 2);
    assert_ne!(blk.features() & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    drop(blk); // its lock would keep a second open out
    let ro = Block::new(&img.path, true).unwrap();
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn open_error_names_the_path() {
    let err = Block::new("/nonexistent/loft.img", false).err().unwrap();
    assert!(
        matches!(&err, BlockError::Open { path, .. } if path.as_os_str() == "/nonexistent/loft.img"),
        "{err:?}"
    );
    let cause = std::error::Error::source(&err)
        .map(|c| c.to_string())
        .unwrap_or_default();
    assert!(cause.contains("No such file"), "{cause}");
}

#[test]
fn read_returns_image_data_and_interrupts() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(
        VIRTIO_BLK_T_IN,
        2,
        &[DescSpec::w(DATA, 512), DescSpec::w(DATA + 0x1000, 1024)],
    );
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.used(), (0, 1536 + 1));
    let image = TempImage::pattern(SECTORS);
    assert_eq!(r.tq.read(DATA, 512), &image[1024..1536]);
    assert_eq!(r.tq.read(DATA + 0x1000, 1024), &image[1536..2560]);
    assert_eq!(r.blk.interrupt().status() & INT_USED, INT_USED);
    assert_eq!(r.blk.interrupt().eventfd().read().unwrap(), 1);
}

const INT_USED: u32 = crate::virtio::INT_USED_RING;

#[test]
fn write_reaches_the_image() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.write(DATA, &[0xab; 1024]);
    r.submit(VIRTIO_BLK_T_OUT, 3, &[DescSpec::r(DATA, 1024)]);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.used(), (0, 1));
    let mut expected = TempImage::pattern(SECTORS);
    expected[1536..2560].fill(0xab);
    assert_eq!(r.img.contents(), expected);
}

#[test]
fn large_transfer_crosses_chunks() {
    let m = mem();
    let img = TempImage::new(512); // 256 KiB
    let mut blk = Block::new(&img.path, false).unwrap();
    let tq = TestQueue::new(&m, 256);
    blk.activate(m.clone(), vec![tq.queue()], FEATURES).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    tq.write(HDR, &h);
    tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 16),
            DescSpec::w(0x8_0000, 0x4_0000),
            DescSpec::w(STATUS, 1),
        ],
    );
    blk.process_queue();
    assert_eq!(tq.used(0), (0, 0x4_0000 + 1));
    assert_eq!(tq.read(0x8_0000, 0x4_0000), TempImage::pattern(512));
}

#[test]
fn flush_and_get_id() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.used(), (0, 1));

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_GET_ID, 0, &[DescSpec::w(DATA, 20)]);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.used(), (0, 21));
    assert_eq!(r.tq.read(DATA, 20), r.blk.serial());
    assert!(r.blk.serial().iter().all(u8::is_ascii_hexdigit));
}

#[test]
fn unknown_request_is_unsupported() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(
        11, /* DISCARD, not offered */
        0,
        &[DescSpec::r(DATA, 16)],
    );
    assert_eq!(r.status(), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(r.used(), (0, 1));
    r.assert_image_untouched();
}

#[test]
fn data_outside_guest_memory_is_ioerr() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_IN, 0, &[DescSpec::w(MEM_SIZE - 256, 512)]);
    r.assert_ioerr();

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(
        VIRTIO_BLK_T_OUT,
        0,
        &[DescSpec::r(DATA, 512), DescSpec::r(0x40_0000_0000, 512)],
    );
    r.assert_ioerr();
    r.assert_image_untouched();
}

#[test]
fn address_overflow_is_ioerr() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_IN, 0, &[DescSpec::w(u64::MAX - 100, 512)]);
    r.assert_ioerr();

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_OUT, 0, &[DescSpec::r(u64::MAX - 511, 512)]);
    r.assert_ioerr();
    r.assert_image_untouched();
}

#[test]
fn header_or_status_outside_memory() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.add_chain(0, &[DescSpec::r(MEM_SIZE, 16), DescSpec::w(STATUS, 1)]);
    r.blk.process_queue();
    r.assert_ioerr();

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 16),
            DescSpec::w(DATA, 512),
            DescSpec::w(MEM_SIZE + 8, 1),
        ],
    );
    r.blk.process_queue();
    assert_eq!(r.used(), (0, 0));
}

#[test]
fn descriptor_loop_terminates_with_ioerr() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.header(VIRTIO_BLK_T_OUT, 0);
    // 0 (header) -> 1 (status) -> 0 -> ...
    r.tq.set_desc(0, HDR, 16, DescSpec::NEXT, 1);
    r.tq.set_desc(1, STATUS, 1, DescSpec::NEXT | DescSpec::WRITE, 0);
    r.tq.publish(&[0]);
    r.blk.process_queue();
    r.assert_ioerr();
    r.assert_image_untouched();
}

#[test]
fn self_loop_without_status_is_returned_empty() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.tq.set_desc(0, HDR, 16, DescSpec::NEXT, 0);
    r.tq.publish(&[0]);
    r.blk.process_queue();
    assert_eq!(r.used(), (0, 0));
    assert_eq!(r.status(), UNANSWERED);
}

#[test]
fn chain_longer_than_queue_is_refused() {
    let m = mem();
    let mut r = Rig::with_size(&m, false, 16);
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.tq.write(DATA, &[0x55; 512]);
    // An indirect table of 40 descriptors: header, 38 x 512-byte data, status.
    let table = 0x9_0000u64;
    let n = 40u16;
    for i in 0..n {
        let (addr, len, flags) = match i {
            0 => (HDR, 16, 0),
            i if i == n - 1 => (STATUS, 1, DescSpec::WRITE),
            _ => (DATA, 512, 0),
        };
        let flags = if i + 1 < n {
            flags | DescSpec::NEXT
        } else {
            flags
        };
        let d = Descriptor::new(addr, len, flags, i + 1);
        m.write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }
    r.tq.set_desc(0, table, u32::from(n) * 16, VRING_DESC_F_INDIRECT as u16, 0);
    r.tq.publish(&[0]);
    r.blk.process_queue();
    // Cut at 16 descriptors: the last one seen is a readable data buffer, so no status.
    assert_eq!(r.used(), (0, 0));
    assert_eq!(r.status(), UNANSWERED);
    r.assert_image_untouched();
}

#[test]
fn wrong_direction_buffers_are_ioerr() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.write(DATA, &[0x11; 512]);
    r.submit(VIRTIO_BLK_T_IN, 0, &[DescSpec::r(DATA, 512)]);
    r.assert_ioerr();
    assert_eq!(r.tq.read(DATA, 512), vec![0x11; 512]);

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.write(DATA, &[0x11; 512]);
    r.submit(VIRTIO_BLK_T_OUT, 0, &[DescSpec::w(DATA, 512)]);
    r.assert_ioerr();
    r.assert_image_untouched();

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_GET_ID, 0, &[DescSpec::r(DATA, 20)]);
    r.assert_ioerr();
}

#[test]
fn bad_header_is_ioerr() {
    // Writable header.
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.tq.add_chain(
        0,
        &[
            DescSpec::w(HDR, 16),
            DescSpec::w(DATA, 512),
            DescSpec::w(STATUS, 1),
        ],
    );
    r.blk.process_queue();
    r.assert_ioerr();

    // Short header.
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.header(VIRTIO_BLK_T_IN, 0);
    r.tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 8),
            DescSpec::w(DATA, 512),
            DescSpec::w(STATUS, 1),
        ],
    );
    r.blk.process_queue();
    r.assert_ioerr();

    // Status alone, no header.
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.add_chain(0, &[DescSpec::w(STATUS, 1)]);
    r.blk.process_queue();
    r.assert_ioerr();
}

#[test]
fn missing_or_readonly_status_returns_len_zero() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.header(VIRTIO_BLK_T_OUT, 0);
    r.tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 16),
            DescSpec::r(DATA, 512),
            DescSpec::r(STATUS, 1),
        ],
    );
    r.blk.process_queue();
    assert_eq!(r.used(), (0, 0));
    assert_eq!(r.status(), UNANSWERED);
    r.assert_image_untouched();

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.add_chain(0, &[DescSpec::w(STATUS, 0)]);
    r.blk.process_queue();
    assert_eq!(r.used(), (0, 0));
}

#[test]
fn requests_beyond_capacity_are_ioerr() {
    let cases: &[(u32, u64, u32)] = &[
        (VIRTIO_BLK_T_IN, SECTORS, 512),
        (VIRTIO_BLK_T_IN, SECTORS - 1, 1024),
        (VIRTIO_BLK_T_OUT, SECTORS, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512, 512),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, 512),
    ];
    for &(t, sector, len) in cases {
        let m = mem();
        let mut r = Rig::new(&m, false);
        let spec = if t == VIRTIO_BLK_T_IN {
            DescSpec::w(DATA, len)
        } else {
            DescSpec::r(DATA, len)
        };
        r.submit(t, sector, &[spec]);
        r.assert_ioerr();
        r.assert_image_untouched();
    }
    // The last sector itself is fine.
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_IN, SECTORS - 1, &[DescSpec::w(DATA, 512)]);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn partial_sectors_are_ioerr() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(VIRTIO_BLK_T_IN, 0, &[DescSpec::w(DATA, 100)]);
    r.assert_ioerr();

    let m = mem();
    let mut r = Rig::new(&m, false);
    r.submit(
        VIRTIO_BLK_T_OUT,
        0,
        &[DescSpec::r(DATA, 256), DescSpec::r(DATA, 512)],
    );
    r.assert_ioerr();
    r.assert_image_untouched();
}

#[test]
fn read_only_disk_refuses_writes() {
    let m = mem();
    let mut r = Rig::new(&m, true);
    r.tq.write(DATA, &[0xab; 512]);
    r.submit(VIRTIO_BLK_T_OUT, 0, &[DescSpec::r(DATA, 512)]);
    r.assert_ioerr();
    r.assert_image_untouched();

    let m = mem();
    let mut r = Rig::new(&m, true);
    r.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);

    let m = mem();
    let mut r = Rig::new(&m, true);
    r.submit(VIRTIO_BLK_T_IN, 1, &[DescSpec::w(DATA, 512)]);
    assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        r.tq.read(DATA, 512),
        &TempImage::pattern(SECTORS)[512..1024]
    );
}

#[test]
fn avail_index_too_far_ahead_needs_reset() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.set_avail_idx(1000);
    r.blk.process_queue();
    assert!(r.blk.interrupt().needs_reset());
    assert_eq!(
        r.blk.interrupt().status() & crate::virtio::INT_CONFIG,
        crate::virtio::INT_CONFIG
    );
    assert_eq!(r.tq.used_idx(), 0);
    // The device stopped using the queue until reset.
    r.blk.process_queue();
    assert_eq!(r.tq.used_idx(), 0);
}

#[test]
fn head_index_past_table_needs_reset() {
    let m = mem();
    let mut r = Rig::new(&m, false);
    r.tq.publish(&[300]);
    r.blk.process_queue();
    assert!(r.blk.interrupt().needs_reset());
    assert_eq!(r.tq.used_idx(), 0);
}

#[test]
fn nothing_happens_before_activation() {
    let img = TempImage::new(SECTORS);
    let mut blk = Block::new(&img.path, false).unwrap();
    blk.process_queue();
    assert_eq!(blk.interrupt().status(), 0);
    let m = mem();
    let tq = TestQueue::new(&m, 256);
    // Activation needs VERSION_1 and exactly one queue.
    assert!(blk.activate(m.clone(), vec![tq.queue()], 0).is_err());
    assert!(blk.activate(m.clone(), vec![], FEATURES).is_err());
}

#[test]
fn many_requests_are_handled_in_budgeted_rounds() {
    let m = mem();
    let mut r = Rig::with_size(&m, false, 16);
    r.header(VIRTIO_BLK_T_FLUSH, 0);
    // 8 two-descriptor chains fill the 16-entry table; publish them 3 times over two rounds.
    for i in 0..8u16 {
        r.tq.set_desc(2 * i, HDR, 16, DescSpec::NEXT, 2 * i + 1);
        r.tq.set_desc(2 * i + 1, STATUS, 1, DescSpec::WRITE, 0);
    }
    let heads: Vec<u16> = (0..8).map(|i| 2 * i).collect();
    r.tq.publish(&heads);
    r.tq.publish(&heads);
    r.blk.process_queue();
    assert_eq!(r.tq.used_idx(), 16);
    // The budget was spent: the device re-signalled itself.
    assert_eq!(r.blk.queue_events()[0].read().unwrap(), 1);
    r.tq.publish(&heads);
    r.blk.process_queue();
    assert_eq!(r.tq.used_idx(), 24);
}

#[test]
fn event_loop_runs_requests() {
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};

    let m = mem();
    let img = TempImage::new(SECTORS);
    let blk = Block::new(&img.path, false).unwrap();
    let dev = crate::virtio::VirtioMmioDevice::new(blk, m.clone()).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.subscriber.clone());

    let tq = TestQueue::new(&m, 256);
    crate::virtio::testing::drive_to_driver_ok(&dev, &[&tq]);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&1u64.to_le_bytes());
    tq.write(HDR, &h);
    tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 16),
            DescSpec::w(DATA, 512),
            DescSpec::w(STATUS, 1),
        ],
    );
    // What KVM does for an ioeventfd hit.
    dev.queue_evts[0].0.write(1).unwrap();
    em.run_with_timeout(1000).unwrap();
    assert_eq!(tq.used(0), (0, 513));
    assert_eq!(tq.read(DATA, 512), &TempImage::pattern(SECTORS)[512..1024]);
    assert_eq!(dev.irq_evt.read().unwrap(), 1);
}

/// A copy of `img` at a new path (another place for the snapshot's disk).
fn copy_image(img: &TempImage) -> TempImage {
    let copy = TempImage::new(0);
    std::fs::copy(&img.path, &copy.path).unwrap();
    copy
}

#[test]
fn save_restore_round_trip() {
    let img = TempImage::new(SECTORS);
    let blk = Block::new(&img.path, false).unwrap();
    let state = blk.save();
    assert_eq!(state.path, img.path);
    assert!(!state.read_only);
    assert_eq!(state.capacity, SECTORS);
    assert_eq!(state.serial.as_bytes(), &blk.serial()[..]);
    let json = serde_json::to_string(&state).unwrap();
    let back: BlockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    // Restored from a copy elsewhere: the guest sees the same disk.
    let copy = copy_image(&img);
    let r = Block::restore(&copy.path, &back).unwrap();
    assert_eq!(r.path(), copy.path);
    assert_eq!(r.capacity(), SECTORS);
    assert_eq!(
        r.serial(),
        blk.serial(),
        "serial kept, not the copy's inode"
    );
    assert_eq!(r.features(), blk.features());
    assert_eq!(r.config(), blk.config());
    assert_eq!(
        r.save(),
        BlockState {
            path: copy.path.clone(),
            ..state
        }
    );
    let crate::virtio::VirtioDeviceState::Block(s) = r.state() else {
        panic!("not a block state");
    };
    assert_eq!(s, r.save());
}

#[test]
fn restore_keeps_read_only() {
    let m = mem();
    let img = TempImage::new(SECTORS);
    let state = Block::new(&img.path, true).unwrap().save();
    assert!(state.read_only);
    let mut blk = Block::restore(&img.path, &state).unwrap();
    assert!(blk.read_only());
    assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let tq = TestQueue::new(&m, 256);
    blk.activate(m.clone(), vec![tq.queue()], FEATURES).unwrap();
    tq.write(STATUS, &[UNANSWERED]);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    tq.write(HDR, &h);
    tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 16),
            DescSpec::r(DATA, 512),
            DescSpec::w(STATUS, 1),
        ],
    );
    blk.process_queue();
    assert_eq!(tq.read(STATUS, 1)[0], VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(img.contents(), TempImage::pattern(SECTORS));
    // A read-only image needs no flush.
    assert!(blk.sync().is_ok());
}

#[test]
fn restore_refuses_a_smaller_image() {
    let img = TempImage::new(SECTORS);
    let state = Block::new(&img.path, false).unwrap().save();
    let small = TempImage::new(SECTORS / 2);
    let err = Block::restore(&small.path, &state).err().unwrap();
    assert!(
        matches!(
            err,
            BlockError::Shrunk {
                saved: SECTORS,
                found: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        matches!(&err, BlockError::Shrunk { path, .. } if *path == small.path),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("fewer than the 16"), "{msg}");
    // A capacity no image can have.
    for capacity in [u64::MAX, u64::MAX / SECTOR_SIZE + 1, SECTORS + 1] {
        let state = BlockState {
            capacity,
            ..state.clone()
        };
        let err = Block::restore(&img.path, &state).err().unwrap();
        assert!(matches!(err, BlockError::Shrunk { .. }), "{err}");
    }
}

#[test]
fn restore_serves_a_larger_image_at_the_saved_capacity() {
    let m = mem();
    let img = TempImage::new(SECTORS);
    let state = Block::new(&img.path, false).unwrap().save();
    let big = TempImage::new(2 * SECTORS);
    let mut blk = Block::restore(&big.path, &state).unwrap();
    assert_eq!(blk.capacity(), SECTORS);
    assert_eq!(&blk.config()[0..8], &SECTORS.to_le_bytes());
    let tq = TestQueue::new(&m, 256);
    blk.activate(m.clone(), vec![tq.queue()], FEATURES).unwrap();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    h[8..16].copy_from_slice(&SECTORS.to_le_bytes());
    tq.write(HDR, &h);
    tq.add_chain(
        0,
        &[
            DescSpec::r(HDR, 16),
            DescSpec::w(DATA, 512),
            DescSpec::w(STATUS, 1),
        ],
    );
    blk.process_queue();
    assert_eq!(tq.read(STATUS, 1)[0], VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn restore_refuses_bad_serials_and_missing_images() {
    let img = TempImage::new(SECTORS);
    let state = Block::new(&img.path, false).unwrap().save();
    let long = BlockState {
        serial: "x".repeat(21),
        ..state.clone()
    };
    let err = Block::restore(&img.path, &long).err().unwrap();
    assert!(matches!(err, BlockError::SerialTooLong(21)), "{err}");
    // Shorter serials are NUL-padded, and saved back the same.
    let short = BlockState {
        serial: "disk0".into(),
        ..state.clone()
    };
    let blk = Block::restore(&img.path, &short).unwrap();
    assert_eq!(&blk.serial()[..6], b"disk0\0");
    assert_eq!(blk.save().serial, "disk0");
    let err = Block::restore("/nonexistent/loft.img", &state)
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::Open { .. }), "{err}");
}

#[test]
fn sync_flushes_the_image() {
    let img = TempImage::new(SECTORS);
    let mut blk = Block::new(&img.path, false).unwrap();
    Block::sync(&blk).unwrap();
    VirtioDevice::sync(&mut blk).unwrap();
}

/// Puts an OUT request of one sector at `sector`, filled with `fill`, at descriptors
/// `3 * slot..`, with its own header, data and status buffers; publishes it.
fn queue_write(tq: &TestQueue, slot: u16, sector: u64, fill: u8) -> u64 {
    let base = 0x4_0000 + u64::from(slot) * 0x1000;
    let (hdr, data, status) = (base, base + 0x200, base + 0x400);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    tq.write(hdr, &h);
    tq.write(data, &[fill; 512]);
    tq.write(status, &[UNANSWERED]);
    tq.add_chain(
        3 * slot,
        &[
            DescSpec::r(hdr, 16),
            DescSpec::r(data, 512),
            DescSpec::w(status, 1),
        ],
    );
    data
}

fn sector(img: &TempImage, s: u64) -> Vec<u8> {
    img.contents()[(s * 512) as usize..((s + 1) * 512) as usize].to_vec()
}

/// A block device saved mid-stream and restored over a copy of its image: requests before
/// `next_avail` are not handled again, the one the guest queued without a notification the
/// snapshot kept is handled, and the pending interrupt is raised again.
#[test]
fn restored_device_resumes_at_the_saved_ring_position() {
    use crate::virtio::{MmioState, VirtioDeviceState, VirtioMmioDevice};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};

    let m = mem();
    let img = TempImage::new(SECTORS);
    let tq = TestQueue::new(&m, 16);
    let (mmio, blk_state, first_data) = {
        let dev = VirtioMmioDevice::new(Block::new(&img.path, false).unwrap(), m.clone()).unwrap();
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(dev.subscriber.clone());
        crate::virtio::testing::drive_to_driver_ok(&dev, &[&tq]);
        let first_data = queue_write(&tq, 0, 1, 0xaa);
        queue_write(&tq, 1, 2, 0xbb);
        dev.queue_evts[0].0.write(1).unwrap();
        em.run_with_timeout(1000).unwrap();
        assert_eq!(tq.used_idx(), 2);
        // The guest queues a third request; its notification is not handled before the
        // snapshot.
        queue_write(&tq, 2, 3, 0xcc);
        dev.queue_evts[0].0.write(1).unwrap();

        let t = crate::bus::lock(&dev.transport);
        let mmio = t.save();
        let VirtioDeviceState::Block(blk_state) = t.save_device().unwrap() else {
            panic!("not a block state");
        };
        (mmio, blk_state, first_data)
    };
    assert!(mmio.activated);
    assert_eq!(
        (mmio.queues[0].next_avail, mmio.queues[0].next_used),
        (2, 2)
    );
    assert_eq!(mmio.interrupt_status, crate::virtio::INT_USED_RING);
    let json = serde_json::to_string(&mmio).unwrap();
    let mmio: MmioState = serde_json::from_str(&json).unwrap();

    // If the first request were handled again, sector 1 would get this.
    tq.write(first_data, &[0xee; 512]);
    let disk = copy_image(&img);

    let blk = Block::restore(&disk.path, &blk_state).unwrap();
    let dev = VirtioMmioDevice::restore(blk, m.clone(), &mmio).unwrap();
    assert_eq!(
        dev.irq_evt.read().unwrap(),
        1,
        "pending interrupt raised again"
    );
    assert_eq!(mmio_read(&mut *crate::bus::lock(&dev.transport), 0x70), 0xf);
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(dev.subscriber.clone());
    em.run_with_timeout(1000).unwrap();
    assert_eq!(tq.used_idx(), 3, "only the third request is handled");
    assert_eq!(tq.used(2), (6, 1));
    assert_eq!(sector(&disk, 1), [0xaa; 512]);
    assert_eq!(sector(&disk, 2), [0xbb; 512]);
    assert_eq!(sector(&disk, 3), [0xcc; 512]);

    // And the device goes on.
    queue_write(&tq, 3, 4, 0xdd);
    dev.queue_evts[0].0.write(1).unwrap();
    em.run_with_timeout(1000).unwrap();
    assert_eq!(tq.used_idx(), 4);
    assert_eq!(tq.used(3), (9, 1));
    assert_eq!(sector(&disk, 4), [0xdd; 512]);
    assert_eq!(sector(&img, 4), TempImage::pattern(SECTORS)[2048..2560]);
}

#[test]
fn inactive_device_restores_inactive_and_can_be_driven() {
    use crate::virtio::VirtioMmioDevice;

    let m = mem();
    let img = TempImage::new(SECTORS);
    let state = Block::new(&img.path, false).unwrap().save();
    let dev = VirtioMmioDevice::new(Block::new(&img.path, false).unwrap(), m.clone()).unwrap();
    let mmio = crate::bus::lock(&dev.transport).save();
    drop(dev); // the restored device opens the image again
    assert!(!mmio.activated);
    let dev =
        VirtioMmioDevice::restore(Block::restore(&img.path, &state).unwrap(), m.clone(), &mmio)
            .unwrap();
    assert!(!crate::bus::lock(&dev.transport).is_active());
    assert!(dev.queue_evts[0].0.read().is_err());
    let tq = TestQueue::new(&m, 256);
    crate::virtio::testing::drive_to_driver_ok(&dev, &[&tq]);
}

#[test]
fn hostile_block_transport_states_are_refused() {
    use crate::virtio::{Error, VirtioMmioDevice};

    let m = mem();
    let img = TempImage::new(SECTORS);
    let dev = VirtioMmioDevice::new(Block::new(&img.path, false).unwrap(), m.clone()).unwrap();
    let tq = TestQueue::new(&m, 256);
    crate::virtio::testing::drive_to_driver_ok(&dev, &[&tq]);
    let good = crate::bus::lock(&dev.transport).save();
    drop(dev); // the restored devices open the image again
    let state = Block::new(&img.path, false).unwrap().save();
    let restore = |mmio: &crate::virtio::MmioState| {
        VirtioMmioDevice::restore(Block::restore(&img.path, &state).unwrap(), m.clone(), mmio)
    };
    assert!(restore(&good).is_ok());

    let mut bad = good.clone();
    bad.queues[0].desc = MEM_SIZE;
    assert!(matches!(
        restore(&bad),
        Err(Error::InvalidQueue { index: 0, .. })
    ));
    let mut bad = good.clone();
    bad.queues[0].size = 512;
    assert!(matches!(
        restore(&bad),
        Err(Error::InvalidQueue { index: 0, .. })
    ));
    let mut bad = good.clone();
    bad.queues[0].max_size = 512;
    bad.queues[0].size = 512;
    assert!(matches!(restore(&bad), Err(Error::QueueMaxSize { .. })));
    let mut bad = good.clone();
    bad.queues.push(bad.queues[0].clone());
    assert!(matches!(restore(&bad), Err(Error::QueueCount { .. })));
    let mut bad = good.clone();
    bad.driver_features |= 1 << 3;
    assert!(matches!(restore(&bad), Err(Error::UnofferedFeatures(8))));
    // Read-only offered in the state's device only.
    let ro_state = Block::new(&img.path, true).unwrap().save();
    let mut bad = good.clone();
    bad.driver_features |= 1 << VIRTIO_BLK_F_RO;
    assert!(matches!(
        VirtioMmioDevice::restore(Block::restore(&img.path, &state).unwrap(), m.clone(), &bad),
        Err(Error::UnofferedFeatures(_))
    ));
    assert!(VirtioMmioDevice::restore(
        Block::restore(&img.path, &ro_state).unwrap(),
        m.clone(),
        &bad
    )
    .is_ok());
    // A net device's state.
    let mut bad = good.clone();
    bad.device_type = 1;
    assert!(matches!(restore(&bad), Err(Error::DeviceType { .. })));
}

/// Ring positions that do not match the rings are not checked against guest memory at restore
/// (the memory is the guest's to change): the device meets them as it would a lying driver,
/// and fails with NEEDS_RESET instead of handling anything.
#[test]
fn lying_ring_positions_fail_the_device_safely() {
    use crate::virtio::MmioTransport;
    use std::sync::{Arc, Mutex};

    let m = mem();
    let img = TempImage::new(SECTORS);
    let tq = TestQueue::new(&m, 16);
    let blk = Arc::new(Mutex::new(Block::new(&img.path, false).unwrap()));
    let mut t = MmioTransport::new(blk.clone(), m.clone()).unwrap();
    crate::virtio::testing::drive(&mut t, &[&tq]);
    queue_write(&tq, 0, 1, 0xaa);
    let mut state = t.save();
    assert!(state.activated);
    drop(t);
    let saved = blk.lock().unwrap().save();
    drop(blk); // the restored devices open the image again
    for (next_avail, next_used) in [(1000, 0), (100, 5), (0, 17)] {
        state.queues[0].next_avail = next_avail;
        state.queues[0].next_used = next_used;
        let blk = Arc::new(Mutex::new(Block::restore(&img.path, &saved).unwrap()));
        let mut t = MmioTransport::restore(blk.clone(), m.clone(), &state).unwrap();
        blk.lock().unwrap().process_queue();
        if next_avail == 0 {
            // The request is handled; the used entry goes where the state says.
            assert_eq!(tq.used(17 % 16), (0, 1));
        } else {
            assert!(blk.lock().unwrap().interrupt().needs_reset());
            assert_eq!(mmio_read(&mut t, 0x70) & 0x40, 0x40, "NEEDS_RESET");
        }
    }
    assert_eq!(sector(&img, 1), [0xaa; 512]);
}

#[test]
fn an_image_open_read_write_is_locked_against_every_other_open() {
    let img = TempImage::new(SECTORS);
    let first = Block::new(&img.path, false).unwrap();
    for read_only in [false, true] {
        match Block::new(&img.path, read_only) {
            Err(BlockError::Locked { path, .. }) => assert_eq!(path, img.path),
            other => panic!(
                "a second open (read_only={read_only}) was not refused: {:?}",
                other.map(|_| ())
            ),
        }
    }
    drop(first);
    let again = Block::new(&img.path, false).expect("the lock goes with the first device");
    drop(again);
}

#[test]
fn read_only_opens_share_the_image_and_keep_writers_out() {
    let img = TempImage::new(SECTORS);
    let a = Block::new(&img.path, true).unwrap();
    let b = Block::new(&img.path, true).expect("two read-only opens share the image");
    assert!(matches!(
        Block::new(&img.path, false),
        Err(BlockError::Locked {
            read_only: false,
            ..
        })
    ));
    drop((a, b));
    Block::new(&img.path, false).expect("writable once the readers are gone");
}
