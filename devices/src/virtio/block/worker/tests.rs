//! The disk worker thread: it serves requests, pauses for snapshots without a request in
//! flight, keeps a failed device failed, and stops (or is left behind) on time.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::virtio::testing::{mem, DescSpec, TempImage, TestQueue};
use crate::virtio::VirtioDevice;

const SECTORS: u64 = 64;
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
/// Request headers, status bytes and data buffers, one set per descriptor slot.
const HDR: u64 = 0x4_0000;
const STATUS: u64 = 0x4_8000;
const DATA: u64 = 0x6_0000;
const UNANSWERED: u8 = 0xee;
const WAIT: Duration = Duration::from_secs(10);

struct Rig<'a> {
    img: TempImage,
    dev: Arc<Mutex<Block>>,
    tq: TestQueue<'a>,
    notify: EventFd,
    irq: EventFd,
}

impl<'a> Rig<'a> {
    fn new(m: &'a GuestMemoryMmap<()>) -> Self {
        let img = TempImage::new(SECTORS);
        let mut blk = Block::new(&img.path, false).unwrap();
        let tq = TestQueue::new(m, 64);
        blk.activate(m.clone(), vec![tq.queue()], FEATURES).unwrap();
        let notify = blk.queue_event().unwrap();
        let irq = blk.interrupt().eventfd().try_clone().unwrap();
        Self {
            img,
            dev: Arc::new(Mutex::new(blk)),
            tq,
            notify,
            irq,
        }
    }

    fn spawn(&self) -> BlockWorker {
        BlockWorker::spawn(self.dev.clone(), "test-blk".into(), || {
            Ok::<(), Infallible>(())
        })
        .unwrap()
    }

    /// Puts request `n` (a header, one sector of data, a status byte; descriptors 3n..3n+2) in
    /// the available ring: a write of `fill` bytes to sector `n`, or a read of sector `n`.
    fn queue(&self, n: u16, write: bool, fill: u8) {
        let (hdr, status, data) = (
            HDR + 16 * u64::from(n),
            STATUS + u64::from(n),
            DATA + 512 * u64::from(n),
        );
        let mut h = [0u8; 16];
        let t = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&u64::from(n).to_le_bytes());
        self.tq.write(hdr, &h);
        self.tq.write(status, &[UNANSWERED]);
        let buf = if write {
            self.tq.write(data, &[fill; 512]);
            DescSpec::r(data, 512)
        } else {
            DescSpec::w(data, 512)
        };
        self.tq
            .add_chain(3 * n, &[DescSpec::r(hdr, 16), buf, DescSpec::w(status, 1)]);
    }

    fn status(&self, n: u16) -> u8 {
        self.tq.read(STATUS + u64::from(n), 1)[0]
    }

    fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + WAIT;
        while self.tq.used_idx() < n {
            assert!(
                Instant::now() < deadline,
                "the worker answered {} of {n} requests",
                self.tq.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[test]
fn the_worker_serves_notified_requests_and_interrupts() {
    let m = mem();
    let r = Rig::new(&m);
    let w = r.spawn();
    r.queue(0, true, 0xab);
    // What KVM does for an ioeventfd hit.
    r.notify.write(1).unwrap();
    r.wait_used(1);
    assert_eq!(r.status(0), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&r.img.contents()[..512], &[0xab; 512]);
    r.queue(1, false, 0);
    r.notify.write(1).unwrap();
    r.wait_used(2);
    assert_eq!(
        r.tq.read(DATA + 512, 512),
        &TempImage::pattern(SECTORS)[512..1024]
    );
    assert!(r.irq.read().unwrap() >= 1, "the guest was interrupted");
    assert!(w.join_until_stopped());
    // The worker is gone, the device is the caller's alone again.
    assert_eq!(Arc::strong_count(&r.dev), 1);
}

#[test]
fn requests_made_before_the_worker_started_are_served() {
    // A restored device: requests in the ring, their notification lost with the old process.
    let m = mem();
    let r = Rig::new(&m);
    r.queue(0, true, 1);
    r.queue(1, true, 2);
    let w = r.spawn();
    r.wait_used(2);
    assert_eq!(r.img.contents()[512], 2);
    assert!(w.join_until_stopped());
}

#[test]
fn a_paused_worker_takes_no_request_and_resumes_where_it_was() {
    let m = mem();
    let r = Rig::new(&m);
    let w = r.spawn();
    // Many requests, notified, then a pause at once: the worker may be in the middle of them.
    for n in 0..16 {
        r.queue(n, true, n as u8 + 1);
    }
    r.notify.write(1).unwrap();
    w.pause();
    // No request is half done: each one is answered or untouched, in ring order.
    let done = r.tq.used_idx();
    let image = r.img.contents();
    for n in 0..16u16 {
        let answered = n < done;
        assert_eq!(r.status(n) != UNANSWERED, answered, "request {n} of {done}");
        let sector = &image[512 * n as usize..512 * (n as usize + 1)];
        assert_eq!(
            sector == [n as u8 + 1; 512],
            answered,
            "sector {n} of {done}"
        );
    }
    // Nothing moves while paused, whatever the guest notifies.
    r.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.tq.used_idx(), done);
    assert_eq!(r.img.contents(), image);
    // The device's lock is free for a snapshot meanwhile.
    assert!(r.dev.try_lock().is_ok());
    w.resume();
    r.wait_used(16);
    assert!((0..16).all(|n| r.status(n) == VIRTIO_BLK_S_OK as u8));
    assert!(w.join_until_stopped());
}

#[test]
fn a_failed_device_stays_failed_and_the_worker_goes_on() {
    let m = mem();
    let r = Rig::new(&m);
    let w = r.spawn();
    // More available than the queue holds: the driver broke the ring.
    r.tq.set_avail_idx(1000);
    r.notify.write(1).unwrap();
    let deadline = Instant::now() + WAIT;
    while !r.dev.lock().unwrap().interrupt().needs_reset() {
        assert!(Instant::now() < deadline, "the device never failed");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Later notifications change nothing, and the worker still answers to stop.
    r.tq.set_avail_idx(0);
    r.queue(0, true, 9);
    r.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.tq.used_idx(), 0);
    assert!(r.dev.lock().unwrap().interrupt().needs_reset());
    assert!(!w.is_finished());
    assert!(w.join_until_stopped());
}

#[test]
fn a_worker_stuck_past_the_deadline_is_left_to_end_on_its_own() {
    let m = mem();
    let r = Rig::new(&m);
    let w = r.spawn();
    // Hold the device as a long system call would hold the worker: it blocks on the lock.
    let held = r.dev.lock().unwrap();
    r.queue(0, true, 7);
    r.notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let started = Instant::now();
    let left = stop_all(vec![w], Duration::from_millis(100));
    let waited = started.elapsed();
    assert_eq!(left, ["test-blk"]);
    assert!(waited < Duration::from_millis(500), "{waited:?}");
    // Released, it sees the stop flag and ends without taking the request, dropping its
    // reference to the device.
    drop(held);
    let deadline = Instant::now() + WAIT;
    while Arc::strong_count(&r.dev) > 1 {
        assert!(Instant::now() < deadline, "the detached worker never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.tq.used_idx(), 0);
    assert_eq!(r.status(0), UNANSWERED);
}

#[test]
fn a_failing_start_hook_is_the_spawns_error() {
    let m = mem();
    let r = Rig::new(&m);
    let e = BlockWorker::spawn(r.dev.clone(), "test-blk".into(), || {
        Err(io::Error::other("no filter"))
    })
    .err()
    .expect("spawn must fail");
    assert!(matches!(e, WorkerError::Start(_)), "{e:?}");
    assert_eq!(Arc::strong_count(&r.dev), 1, "the thread has ended");
}

/// Stops after `n` calls to `stopping`.
struct StopAfter(std::cell::Cell<u32>);

impl Halt for StopAfter {
    fn stopping(&self) -> bool {
        let left = self.0.get();
        self.0.set(left.saturating_sub(1));
        left == 0
    }
}

#[test]
fn a_stop_in_the_middle_of_a_request_leaves_it_unanswered() {
    let m = mem();
    let r = Rig::new(&m);
    // One request of 4 chunks (256 KiB) writing over sectors 0..512 would be past the end of
    // this image: use a read of 8 sectors spread as 8 descriptors instead, and stop after the
    // first steps.
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    r.tq.write(HDR, &h);
    r.tq.write(STATUS, &[UNANSWERED]);
    let mut specs = vec![DescSpec::r(HDR, 16)];
    specs.extend((0..8).map(|i| DescSpec::w(DATA + 512 * i, 512)));
    specs.push(DescSpec::w(STATUS, 1));
    r.tq.add_chain(0, &specs);
    let answered = r
        .dev
        .lock()
        .unwrap()
        .process_queue_with(&StopAfter(std::cell::Cell::new(3)));
    assert_eq!(answered, 0);
    assert_eq!(r.tq.used_idx(), 0);
    assert_eq!(r.status(0), UNANSWERED);
}

impl BlockWorker {
    /// Stops the worker and waits (boundedly) for it.
    fn join_until_stopped(self) -> bool {
        self.stop();
        self.join_until(Instant::now() + WAIT)
    }
}
