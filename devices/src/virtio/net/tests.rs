//! virtio-net frame handling over a socketpair backend, mostly against a hostile driver.

use super::*;
use crate::virtio::testing::{mem, DescSpec, TestQueue, MEM_SIZE};
use crate::virtio::INT_USED_RING;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
const TX_Q_ADDR: u64 = 0x1_0000;
const BUF: u64 = 0x4_0000;

struct Rig<'a> {
    net: Net,
    host: UnixDatagram,
    rxq: TestQueue<'a>,
    txq: TestQueue<'a>,
}

impl<'a> Rig<'a> {
    fn new(m: &'a GuestMemoryMmap<()>) -> Self {
        let (host, dev) = UnixDatagram::pair().unwrap();
        host.set_nonblocking(true).unwrap();
        dev.set_nonblocking(true).unwrap();
        let mut net = Net::with_backend(Box::new(dev), Some(MAC)).unwrap();
        let rxq = TestQueue::new(m, QUEUE_SIZE);
        let txq = TestQueue::at(m, TX_Q_ADDR, QUEUE_SIZE);
        net.activate(m.clone(), vec![rxq.queue(), txq.queue()], FEATURES)
            .unwrap();
        // Activation asks the loop for an RX pass; drop that here.
        let _ = net.queue_events()[RX_QUEUE].read();
        Self {
            net,
            host,
            rxq,
            txq,
        }
    }

    /// What the host received, frame by frame.
    fn host_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }
}

/// A frame with a zero virtio-net header (num_buffers = 1, as the device sets it on RX).
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| seed.wrapping_add(i as u8)).collect();
    f[..VNET_HDR_LEN].fill(0);
    f[10] = 1;
    f
}

#[test]
fn config_and_features() {
    let (_, dev) = UnixDatagram::pair().unwrap();
    let net = Net::with_backend(Box::new(dev), Some(MAC)).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(&net.config()[..6], &MAC);
    assert_eq!(&net.config()[6..8], &[1, 0], "link up");
    assert_ne!(net.features() & (1 << VIRTIO_NET_F_MAC), 0);
    assert_ne!(net.features() & (1 << VIRTIO_NET_F_STATUS), 0);
    assert_ne!(net.features() & (1 << VIRTIO_F_VERSION_1), 0);
    // Nothing else: no offloads, no mergeable buffers, no control queue.
    let allowed = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS) | (1 << VIRTIO_F_VERSION_1);
    assert_eq!(net.features() & !allowed, 0);

    let (_, dev) = UnixDatagram::pair().unwrap();
    let net = Net::with_backend(Box::new(dev), None).unwrap();
    assert_eq!(net.features() & (1 << VIRTIO_NET_F_MAC), 0);
    assert_eq!(net.queue_max_sizes(), &[256, 256]);
}

#[test]
fn tx_gathers_a_chain_into_one_frame() {
    let m = mem();
    let mut r = Rig::new(&m);
    let f = frame(72, 7);
    r.txq.write(BUF, &f[..12]);
    r.txq.write(BUF + 0x1000, &f[12..]);
    r.txq
        .add_chain(0, &[DescSpec::r(BUF, 12), DescSpec::r(BUF + 0x1000, 60)]);
    r.net.process_tx();
    assert_eq!(r.host_frames(), vec![f]);
    assert_eq!(r.txq.used_idx(), 1);
    assert_eq!(r.txq.used(0), (0, 0));
    assert_eq!(r.net.interrupt().status() & INT_USED_RING, INT_USED_RING);
}

#[test]
fn tx_oversized_frame_is_dropped() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.txq
        .add_chain(0, &[DescSpec::r(BUF, MAX_FRAME_LEN as u32 + 1)]);
    r.net.process_tx();
    assert!(r.host_frames().is_empty());
    assert_eq!(r.txq.used(0), (0, 0));

    // The largest allowed frame goes through.
    let m = mem();
    let mut r = Rig::new(&m);
    r.txq.add_chain(
        0,
        &[
            DescSpec::r(BUF, 12),
            DescSpec::r(BUF + 12, MAX_FRAME_LEN as u32 - 12),
        ],
    );
    r.net.process_tx();
    let frames = r.host_frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].len(), MAX_FRAME_LEN);
}

#[test]
fn tx_writable_buffer_is_dropped() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.txq
        .add_chain(0, &[DescSpec::r(BUF, 12), DescSpec::w(BUF + 0x1000, 60)]);
    r.net.process_tx();
    assert!(r.host_frames().is_empty());
    assert_eq!(r.txq.used(0), (0, 0));
}

#[test]
fn tx_buffers_outside_memory_are_dropped() {
    for addr in [MEM_SIZE - 10, u64::MAX - 20, 0x7000_0000_0000] {
        let m = mem();
        let mut r = Rig::new(&m);
        r.txq
            .add_chain(0, &[DescSpec::r(BUF, 12), DescSpec::r(addr, 60)]);
        r.net.process_tx();
        assert!(r.host_frames().is_empty());
        assert_eq!(r.txq.used(0), (0, 0));
    }
}

#[test]
fn tx_descriptor_loop_is_dropped() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.txq.set_desc(0, BUF, 12, DescSpec::NEXT, 1);
    r.txq.set_desc(1, BUF, 60, DescSpec::NEXT, 0);
    r.txq.publish(&[0]);
    r.net.process_tx();
    assert!(r.host_frames().is_empty());
    assert_eq!(r.txq.used(0), (0, 0));
}

#[test]
fn tx_budget_reschedules() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.txq.set_desc(0, BUF, 14, 0, 0);
    let heads = vec![0u16; 256];
    r.txq.publish(&heads);
    r.net.process_tx();
    assert_eq!(r.txq.used_idx(), 256);
    assert_eq!(r.net.queue_events()[TX_QUEUE].read().unwrap(), 1);
    r.txq.publish(&[0]);
    r.net.process_tx();
    assert_eq!(r.txq.used_idx(), 257);
}

#[test]
fn rx_delivers_a_frame_across_buffers() {
    let m = mem();
    let mut r = Rig::new(&m);
    let mut f = frame(100, 3);
    f[10] = 0xaa; // num_buffers from the backend is overwritten with 1
    r.host.send(&f).unwrap();
    r.rxq
        .add_chain(0, &[DescSpec::w(BUF, 12), DescSpec::w(BUF + 0x1000, 1514)]);
    r.net.process_rx();
    assert_eq!(r.rxq.used(0), (0, 100));
    f[10] = 1;
    assert_eq!(r.rxq.read(BUF, 12), &f[..12]);
    assert_eq!(r.rxq.read(BUF + 0x1000, 88), &f[12..]);
    assert_eq!(r.net.interrupt().eventfd().read().unwrap(), 1);
}

#[test]
fn rx_frame_waits_for_a_buffer() {
    let m = mem();
    let mut r = Rig::new(&m);
    let f1 = frame(60, 1);
    let f2 = frame(60, 2);
    r.host.send(&f1).unwrap();
    r.host.send(&f2).unwrap();
    // No buffers: the first frame is held, the second stays in the backend.
    r.net.process_rx();
    assert_eq!(r.rxq.used_idx(), 0);
    assert_eq!(r.net.rx_pending, Some(60));
    assert!(
        r.net.queue_events()[RX_QUEUE].read().is_err(),
        "no self-kick when blocked"
    );
    r.rxq.add_chain(0, &[DescSpec::w(BUF, 1526)]);
    r.net.process_rx();
    assert_eq!(r.rxq.used_idx(), 1);
    assert_eq!(r.rxq.read(BUF, 60), f1);
    r.rxq.add_chain(1, &[DescSpec::w(BUF + 0x1000, 1526)]);
    r.net.process_rx();
    assert_eq!(r.rxq.used_idx(), 2);
    assert_eq!(r.rxq.read(BUF + 0x1000, 60), f2);
}

#[test]
fn rx_frame_too_large_for_buffer_is_dropped_and_buffer_reused() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.host.send(&frame(2000, 1)).unwrap();
    let small = frame(80, 9);
    r.host.send(&small).unwrap();
    r.rxq.add_chain(0, &[DescSpec::w(BUF, 1526)]);
    r.net.process_rx();
    assert_eq!(r.rxq.used_idx(), 1);
    assert_eq!(r.rxq.used(0), (0, 80));
    assert_eq!(r.rxq.read(BUF, 80), small);
}

#[test]
fn rx_bad_buffers_are_returned_empty_and_frame_kept() {
    let m = mem();
    let mut r = Rig::new(&m);
    let f = frame(64, 5);
    r.host.send(&f).unwrap();
    r.rxq.add_chain(0, &[DescSpec::w(MEM_SIZE - 8, 1526)]); // outside memory
    r.rxq.add_chain(1, &[DescSpec::r(BUF, 1526)]); // device-readable
    r.rxq.add_chain(2, &[DescSpec::w(u64::MAX - 8, 1526)]); // overflows
    r.rxq
        .set_desc(3, BUF, 1526, DescSpec::WRITE | DescSpec::NEXT, 3); // loop
    r.rxq.publish(&[3]);
    r.rxq.add_chain(4, &[DescSpec::w(BUF + 0x1000, 1526)]);
    r.rxq.write(BUF, &[0xcc; 64]);
    r.net.process_rx();
    assert_eq!(r.rxq.used_idx(), 5);
    for i in 0..4 {
        assert_eq!(r.rxq.used(i), (i as u32, 0));
    }
    assert_eq!(r.rxq.used(4), (4, 64));
    assert_eq!(r.rxq.read(BUF + 0x1000, 64), f);
    assert_eq!(
        r.rxq.read(BUF, 64),
        vec![0xcc; 64],
        "readable buffer left alone"
    );
}

#[test]
fn rx_runt_frames_from_the_backend_are_dropped() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.host.send(&[1, 2, 3]).unwrap();
    r.rxq.add_chain(0, &[DescSpec::w(BUF, 1526)]);
    r.net.process_rx();
    assert_eq!(r.rxq.used_idx(), 0);
}

#[test]
fn bad_avail_index_needs_reset() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.txq.set_avail_idx(300);
    r.net.process_tx();
    assert!(r.net.interrupt().needs_reset());
    assert!(r.net.base.active.is_none());

    let m = mem();
    let mut r = Rig::new(&m);
    r.host.send(&frame(60, 0)).unwrap();
    r.rxq.publish(&[999]);
    r.net.process_rx();
    assert!(r.net.interrupt().needs_reset());
}

#[test]
fn nothing_happens_before_activation() {
    let (host, dev) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    let mut net = Net::with_backend(Box::new(dev), None).unwrap();
    host.send(&frame(60, 0)).unwrap();
    net.process_rx();
    net.process_tx();
    assert_eq!(net.rx_pending, None, "backend not read before activation");
    assert_eq!(net.interrupt().status(), 0);
}

#[test]
fn event_loop_moves_frames_both_ways() {
    use crate::BusDevice;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};

    let m = mem();
    let (host, dev) = UnixDatagram::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    dev.set_nonblocking(true).unwrap();
    let net = Net::with_backend(Box::new(dev), Some(MAC)).unwrap();
    let vdev = crate::virtio::VirtioMmioDevice::new(net, m.clone()).unwrap();
    assert_eq!(vdev.queue_evts.len(), 2);
    assert_eq!(vdev.queue_evts[1].1, 1);
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(vdev.subscriber.clone());

    // A frame arrives before the driver is up: it waits in the backend.
    let early = frame(60, 1);
    host.send(&early).unwrap();
    em.run_with_timeout(0).unwrap();

    let rxq = TestQueue::new(&m, QUEUE_SIZE);
    let txq = TestQueue::at(&m, TX_Q_ADDR, QUEUE_SIZE);
    rxq.add_chain(0, &[DescSpec::w(BUF, 1526)]);
    crate::virtio::testing::drive_to_driver_ok(&vdev, &[&rxq, &txq]);
    em.run_with_timeout(1000).unwrap();
    assert_eq!(rxq.used_idx(), 1, "activation resumes RX");
    assert_eq!(rxq.read(BUF, 60), early);

    // With no RX buffer free, a readable backend does not spin the loop.
    host.send(&frame(60, 2)).unwrap();
    em.run_with_timeout(1000).unwrap();
    assert_eq!(
        em.run_with_timeout(50).unwrap(),
        0,
        "edge-triggered backend fires once"
    );

    // The guest adds a buffer and notifies (an MMIO write without ioeventfd).
    rxq.add_chain(1, &[DescSpec::w(BUF + 0x1000, 1526)]);
    crate::bus::lock(&vdev.transport).write(0x50, &0u32.to_le_bytes());
    em.run_with_timeout(1000).unwrap();
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(rxq.read(BUF + 0x1000, 60), frame(60, 2));

    // TX through the queue eventfd, as KVM's ioeventfd would signal it.
    let out = frame(90, 4);
    txq.write(BUF + 0x2000, &out);
    txq.add_chain(0, &[DescSpec::r(BUF + 0x2000, 90)]);
    vdev.queue_evts[1].0.write(1).unwrap();
    em.run_with_timeout(1000).unwrap();
    let mut buf = [0u8; 200];
    assert_eq!(host.recv(&mut buf).unwrap(), 90);
    assert_eq!(&buf[..90], &out[..]);
    assert!(vdev.irq_evt.read().unwrap() >= 1);
}

fn backend_pair() -> (UnixDatagram, UnixDatagram) {
    let (host, dev) = UnixDatagram::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    dev.set_nonblocking(true).unwrap();
    (host, dev)
}

#[test]
fn save_restore_round_trip() {
    for mac in [Some(MAC), None] {
        let (_host, dev) = backend_pair();
        let net = Net::with_backend(Box::new(dev), mac).unwrap();
        let state = net.save();
        assert_eq!(
            state,
            NetState {
                tap_name: None,
                mac
            }
        );
        let json = serde_json::to_string(&state).unwrap();
        let back: NetState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (_host, dev) = backend_pair();
        let r = Net::restore_with_backend(Box::new(dev), &back).unwrap();
        assert_eq!(r.save(), state);
        assert_eq!(r.features(), net.features());
        assert_eq!(r.config(), net.config());
        assert_eq!(r.state(), crate::virtio::VirtioDeviceState::Net(state));
    }
}

/// Saved after one frame went out, restored on a new backend: the next frame goes out there,
/// and the first is not sent again.
#[test]
fn restored_device_resumes_at_the_saved_ring_position() {
    use crate::virtio::{MmioTransport, VirtioDeviceState};
    use std::sync::{Arc, Mutex};

    let m = mem();
    let rxq = TestQueue::new(&m, QUEUE_SIZE);
    let txq = TestQueue::at(&m, TX_Q_ADDR, QUEUE_SIZE);
    let (host, dev) = backend_pair();
    let net = Arc::new(Mutex::new(
        Net::with_backend(Box::new(dev), Some(MAC)).unwrap(),
    ));
    let mut t = MmioTransport::new(net.clone(), m.clone()).unwrap();
    crate::virtio::testing::drive(&mut t, &[&rxq, &txq]);
    assert!(t.is_active());
    rxq.add_chain(0, &[DescSpec::w(BUF, 1526)]);
    let first = frame(60, 1);
    txq.write(BUF + 0x2000, &first);
    txq.add_chain(0, &[DescSpec::r(BUF + 0x2000, 60)]);
    net.lock().unwrap().process_tx();
    let mut buf = [0u8; 200];
    assert_eq!(host.recv(&mut buf).unwrap(), 60);

    let mmio = t.save();
    let VirtioDeviceState::Net(state) = t.save_device().unwrap() else {
        panic!("not a net state");
    };
    assert_eq!(
        (mmio.queues[1].next_avail, mmio.queues[1].next_used),
        (1, 1)
    );
    assert_eq!(
        (mmio.queues[0].next_avail, mmio.queues[0].next_used),
        (0, 0)
    );
    drop(t);
    drop(net);

    let (host, dev) = backend_pair();
    let net = Arc::new(Mutex::new(
        Net::restore_with_backend(Box::new(dev), &state).unwrap(),
    ));
    let _t = MmioTransport::restore(net.clone(), m.clone(), &mmio).unwrap();
    let second = frame(70, 2);
    txq.write(BUF + 0x3000, &second);
    txq.add_chain(1, &[DescSpec::r(BUF + 0x3000, 70)]);
    net.lock().unwrap().process_tx();
    assert_eq!(host.recv(&mut buf).unwrap(), 70);
    assert_eq!(&buf[..70], &second[..]);
    assert!(
        host.recv(&mut buf).is_err(),
        "the first frame is not sent again"
    );
    assert_eq!(txq.used_idx(), 2);

    // RX goes on in the buffer the guest gave before the snapshot.
    let incoming = frame(80, 3);
    host.send(&incoming).unwrap();
    net.lock().unwrap().process_rx();
    assert_eq!(rxq.used_idx(), 1);
    assert_eq!(rxq.read(BUF, 80), incoming);
}

/// Needs root and /dev/net/tun (the project's dev and CI machines have both): fails with the
/// OS error rather than passing silently when the TAP cannot be created.
#[test]
fn real_tap_backend() {
    let net = Net::new("lofttest%d", Some(MAC))
        .unwrap_or_else(|e| panic!("cannot create a TAP (root and /dev/net/tun needed): {e}"));
    assert!(net.tap_name().unwrap().starts_with("lofttest"));
    assert_ne!(net.features() & (1 << VIRTIO_NET_F_MAC), 0);

    let err = Net::new("this-name-is-far-too-long", None).err().unwrap();
    assert!(
        err.to_string().contains("this-name-is-far-too-long"),
        "{err}"
    );
}
