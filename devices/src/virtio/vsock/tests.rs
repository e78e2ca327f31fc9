//! virtio-vsock against a hostile driver, with real Unix sockets on the host side.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::packet::*;
use super::*;
use crate::virtio::testing::{mem, DescSpec, TestQueue, MEM_SIZE};
use crate::virtio::INT_USED_RING;

const CID: u64 = 3;
const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
const TX_Q_ADDR: u64 = 0x1_0000;
const EV_Q_ADDR: u64 = 0x2_0000;
/// RX buffers: one per slot, the slot being the descriptor index modulo [`RX_SLOTS`].
const RX_BUF: u64 = 0x3_0000;
const RX_SLOT: u64 = 0x2000;
const RX_SLOTS: u16 = 16;
const RX_LEN: u32 = HDR_LEN as u32 + 4096;
/// TX packets are written here (each is consumed before the next is written).
const TX_BUF: u64 = 0x6_0000;
const GUEST_PORT: u32 = 1234;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "loft-vsock-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest packet header from the guest's CID to the host.
fn pkt(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

struct Rig<'a> {
    dev: Vsock,
    dir: TempDir,
    rxq: TestQueue<'a>,
    txq: TestQueue<'a>,
    rx_next: u16,
    rx_seen: u16,
    tx_next: u16,
}

impl<'a> Rig<'a> {
    fn new(m: &'a GuestMemoryMmap<()>) -> Self {
        let mut r = Self::inactive(m);
        r.activate();
        r
    }

    /// A device that the driver has not activated yet.
    fn inactive(m: &'a GuestMemoryMmap<()>) -> Self {
        let dir = TempDir::new();
        let dev = Vsock::new(CID, dir.join("v.sock")).unwrap();
        Self {
            dev,
            dir,
            rxq: TestQueue::new(m, QUEUE_SIZE),
            txq: TestQueue::at(m, TX_Q_ADDR, QUEUE_SIZE),
            rx_next: 0,
            rx_seen: 0,
            tx_next: 0,
        }
    }

    fn activate(&mut self) {
        let evq = TestQueue::at(self.rxq.mem(), EV_Q_ADDR, QUEUE_SIZE);
        let queues = vec![self.rxq.queue(), self.txq.queue(), evq.queue()];
        self.dev
            .activate(self.rxq.mem().clone(), queues, FEATURES)
            .unwrap();
        // Activation asks the loop for an RX pass; drop that here.
        let _ = self.dev.queue_events()[RX_QUEUE].read();
    }

    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Adds `n` RX buffers of `len` bytes.
    fn give_rx_len(&mut self, n: usize, len: u32) {
        for _ in 0..n {
            let slot = u64::from(self.rx_next % RX_SLOTS);
            self.rxq
                .add_chain(self.rx_next, &[DescSpec::w(RX_BUF + slot * RX_SLOT, len)]);
            self.rx_next = (self.rx_next + 1) % QUEUE_SIZE;
        }
    }

    /// Adds `n` RX buffers and lets the device fill them.
    fn give_rx(&mut self, n: usize) {
        self.give_rx_len(n, RX_LEN);
        self.dev.process_rx();
    }

    /// The packets the device put in the RX queue since the last call.
    fn rx_packets(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rxq.used_idx() {
            let (id, len) = self.rxq.used(usize::from(self.rx_seen % QUEUE_SIZE));
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if len == 0 {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let addr = RX_BUF + u64::from(id as u16 % RX_SLOTS) * RX_SLOT;
            let bytes = self.rxq.read(addr, len as usize);
            let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, len as usize - HDR_LEN, "{hdr:?}");
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Exactly one packet arrived; returns it.
    fn one_packet(&mut self) -> (Header, Vec<u8>) {
        let mut p = self.rx_packets();
        assert_eq!(p.len(), 1, "{p:?}");
        p.pop().unwrap()
    }

    /// Puts one packet chain on the TX queue.
    fn queue_tx_specs(&mut self, specs: &[DescSpec]) {
        self.txq.add_chain(self.tx_next, specs);
        self.tx_next = (self.tx_next + specs.len() as u16) % (QUEUE_SIZE - 8);
    }

    /// The guest sends `hdr` (its `len` set from `payload`) and the device handles it.
    fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        self.send_raw(&hdr, payload);
    }

    /// The guest sends `hdr` as is, followed by `payload`, in one descriptor.
    fn send_raw(&mut self, hdr: &Header, payload: &[u8]) {
        self.txq.write(TX_BUF, &hdr.to_bytes());
        self.txq.write(TX_BUF + HDR_LEN as u64, payload);
        let len = (HDR_LEN + payload.len()) as u32;
        self.queue_tx_specs(&[DescSpec::r(TX_BUF, len)]);
        self.dev.process_tx();
    }

    /// Runs the host side until it settles.
    fn pump(&mut self) {
        for _ in 0..4 {
            self.dev.process_host();
        }
    }

    /// A host process connects to guest port `port`; returns its stream and the REQUEST the
    /// guest got.
    fn host_request(&mut self, port: u32) -> (UnixStream, Header) {
        let mut s = UnixStream::connect(self.uds()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        self.pump();
        self.give_rx(1);
        let (req, _) = self.one_packet();
        (s, req)
    }

    /// A host-initiated connection to [`GUEST_PORT`], accepted by the guest with `buf_alloc`;
    /// returns the host stream and the host port.
    fn host_connection(&mut self, buf_alloc: u32) -> (UnixStream, u32) {
        let (mut s, req) = self.host_request(GUEST_PORT);
        let resp = Header {
            buf_alloc,
            ..pkt(OP_RESPONSE, GUEST_PORT, req.src_port)
        };
        self.send(resp, &[]);
        let line = format!("OK {}\n", req.src_port);
        assert_eq!(read_n(&mut s, line.len()), line.as_bytes());
        (s, req.src_port)
    }

    /// The guest connects to host port `port` where `listener` listens; returns the accepted
    /// host stream.
    fn guest_connection(&mut self, listener: &UnixListener, port: u32) -> UnixStream {
        self.send(pkt(OP_REQUEST, GUEST_PORT, port), &[]);
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        self.give_rx(1);
        let (resp, _) = self.one_packet();
        assert_eq!(resp.op, OP_RESPONSE, "{resp:?}");
        s
    }
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// True when the host stream reads end-of-file (or is reset) right away.
fn host_closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
    }
}

/// Asserts `p` is a RST from host port `src` to guest port `dst`.
fn assert_rst(p: &(Header, Vec<u8>), src: u32, dst: u32) {
    let h = &p.0;
    assert_eq!(h.op, OP_RST, "{h:?}");
    assert_eq!((h.src_port, h.dst_port), (src, dst), "{h:?}");
    assert_eq!(h.dst_cid, CID);
    assert_eq!(h.len, 0);
}

#[test]
fn config_and_features() {
    let dir = TempDir::new();
    let dev = Vsock::new(0x1234_5678, dir.join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.config(), &0x1234_5678u64.to_le_bytes());
    assert_eq!(dev.features(), 1 << VIRTIO_F_VERSION_1);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(dev.guest_cid(), 0x1234_5678);
    assert_eq!(dev.uds_path(), dir.join("v.sock"));
}

#[test]
fn reserved_cids_are_refused() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32, u64::MAX] {
        let err = Vsock::new(cid, dir.join("v.sock")).err().unwrap();
        assert!(
            matches!(err, VsockError::InvalidCid(c) if c == cid),
            "{err}"
        );
    }
    assert!(Vsock::new(u64::from(u32::MAX) - 1, dir.join("v.sock")).is_ok());
}

#[test]
fn stale_socket_is_replaced_and_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.join("v.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves the socket file behind
    assert!(path.exists());
    let dev = Vsock::new(CID, &path).unwrap();
    UnixStream::connect(&path).expect("the new socket listens");
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn bind_errors_name_the_path() {
    let dir = TempDir::new();
    let missing = dir.join("no-such-dir/v.sock");
    let err = Vsock::new(CID, &missing).err().unwrap();
    assert!(err.to_string().contains("no-such-dir/v.sock"), "{err}");

    // A file that is not a socket is left alone.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let err = Vsock::new(CID, &file).err().unwrap();
    assert!(err.to_string().contains("not-a-socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn host_connect_end_to_end() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, req) = r.host_request(GUEST_PORT);
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
    assert_eq!(req.src_port, FIRST_LOCAL_PORT);
    assert_eq!(req.dst_port, GUEST_PORT);
    assert_eq!(req.buf_alloc, BUF_ALLOC);
    assert_eq!(r.dev.interrupt().status() & INT_USED_RING, INT_USED_RING);

    let local = req.src_port;
    r.send(pkt(OP_RESPONSE, GUEST_PORT, local), &[]);
    assert_eq!(read_n(&mut s, 14), b"OK 1073741824\n");

    // Host to guest.
    s.write_all(b"hello guest").unwrap();
    r.pump();
    r.give_rx(1);
    let (h, data) = r.one_packet();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, local, GUEST_PORT));
    assert_eq!(data, b"hello guest");

    // Guest to host.
    r.send(pkt(OP_RW, GUEST_PORT, local), b"hello host");
    assert_eq!(read_n(&mut s, 10), b"hello host");

    // The guest closes: the host reads end-of-file and the guest gets its RST.
    let shut = Header {
        flags: SHUTDOWN_BOTH,
        ..pkt(OP_SHUTDOWN, GUEST_PORT, local)
    };
    r.send(shut, &[]);
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn host_ports_are_allocated_upward() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (_s1, a) = r.host_request(80);
    let (_s2, b) = r.host_request(80);
    assert_eq!(a.src_port, FIRST_LOCAL_PORT);
    assert_eq!(b.src_port, FIRST_LOCAL_PORT + 1);
}

#[test]
fn host_connect_refused_by_guest_closes_stream() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, req) = r.host_request(GUEST_PORT);
    r.send(pkt(OP_RST, GUEST_PORT, req.src_port), &[]);
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert!(r.rx_packets().is_empty(), "no answer to a RST");
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn bad_connect_lines_close_the_stream() {
    let m = mem();
    let mut r = Rig::new(&m);
    for line in [
        &b"HELLO 52\n"[..],
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 52 53\n",
        &[b'x'; 40],
    ] {
        let mut s = UnixStream::connect(r.uds()).unwrap();
        s.write_all(line).unwrap();
        r.pump();
        assert!(host_closed(&mut s), "{line:?}");
    }
    // Hanging up half-way is no trouble either.
    let mut s = UnixStream::connect(r.uds()).unwrap();
    s.write_all(b"CONN").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    r.pump();
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert!(r.rx_packets().is_empty());
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn connect_line_in_pieces_and_data_right_after() {
    let m = mem();
    let mut r = Rig::new(&m);
    let mut s = UnixStream::connect(r.uds()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"conn").unwrap();
    r.pump();
    s.write_all(b"ect 77\r\nearly bytes").unwrap();
    r.pump();
    r.give_rx(1);
    let (req, _) = r.one_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 77));
    r.send(pkt(OP_RESPONSE, 77, req.src_port), &[]);
    assert_eq!(read_n(&mut s, 14), b"OK 1073741824\n");
    r.pump();
    r.give_rx(1);
    let (h, data) = r.one_packet();
    assert_eq!(h.op, OP_RW);
    assert_eq!(data, b"early bytes");
}

#[test]
fn host_connect_times_out_without_response() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.dev.muxer.request_timeout = Duration::from_millis(20);
    let (mut s, req) = r.host_request(GUEST_PORT);
    std::thread::sleep(Duration::from_millis(60));
    r.pump();
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), req.src_port, GUEST_PORT);
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn host_connect_waits_for_activation() {
    let m = mem();
    let mut r = Rig::inactive(&m);
    let mut s = UnixStream::connect(r.uds()).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    r.pump();
    r.give_rx_len(1, RX_LEN);
    r.dev.process_rx();
    assert_eq!(r.rxq.used_idx(), 0, "nothing before activation");
    r.activate();
    r.dev.process_rx();
    let (req, _) = r.one_packet();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 5));
}

#[test]
fn guest_connect_end_to_end() {
    let m = mem();
    let mut r = Rig::new(&m);
    let listener = UnixListener::bind(muxer::port_path(&r.uds(), 5000)).unwrap();
    r.send(pkt(OP_REQUEST, GUEST_PORT, 5000), &[]);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    r.give_rx(1);
    let (resp, _) = r.one_packet();
    assert_eq!(resp.op, OP_RESPONSE);
    assert_eq!((resp.src_cid, resp.dst_cid), (HOST_CID, CID));
    assert_eq!((resp.src_port, resp.dst_port), (5000, GUEST_PORT));
    assert_eq!(resp.buf_alloc, BUF_ALLOC);

    r.send(pkt(OP_RW, GUEST_PORT, 5000), b"ping");
    assert_eq!(read_n(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    r.pump();
    r.give_rx(1);
    let (h, data) = r.one_packet();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, 5000, GUEST_PORT));
    assert_eq!(data, b"pong");

    // The host closes: the guest is told neither way is open, then resets.
    drop(s);
    r.pump();
    r.give_rx(1);
    let (h, _) = r.one_packet();
    assert_eq!(h.op, OP_SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_BOTH);
    r.send(pkt(OP_RST, GUEST_PORT, 5000), &[]);
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.send(pkt(OP_REQUEST, GUEST_PORT, 6000), &[]);
    r.give_rx(1);
    assert_rst(&r.one_packet(), 6000, GUEST_PORT);
    assert_eq!(r.dev.connection_count(), 0);

    // A stale socket file with nobody behind it: the same.
    drop(UnixListener::bind(muxer::port_path(&r.uds(), 6001)).unwrap());
    r.send(pkt(OP_REQUEST, GUEST_PORT, 6001), &[]);
    r.give_rx(1);
    assert_rst(&r.one_packet(), 6001, GUEST_PORT);
}

#[test]
fn wrong_source_cid_is_dropped() {
    let m = mem();
    let mut r = Rig::new(&m);
    let listener = UnixListener::bind(muxer::port_path(&r.uds(), 5000)).unwrap();
    listener.set_nonblocking(true).unwrap();
    for cid in [0, 2, 4, u64::MAX] {
        let h = Header {
            src_cid: cid,
            ..pkt(OP_REQUEST, GUEST_PORT, 5000)
        };
        r.send(h, &[]);
    }
    assert!(listener.accept().is_err(), "nothing connected");
    r.give_rx(4);
    assert!(r.rx_packets().is_empty());
    assert_eq!(r.txq.used_idx(), 4, "chains are returned");
    assert_eq!(r.txq.used(0), (0, 0));
}

#[test]
fn other_destination_cid_gets_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    let h = Header {
        dst_cid: 7,
        ..pkt(OP_REQUEST, GUEST_PORT, 5000)
    };
    r.send(h, &[]);
    r.give_rx(1);
    let p = r.one_packet();
    assert_rst(&p, 5000, GUEST_PORT);
    assert_eq!(p.0.src_cid, 7);
}

#[test]
fn non_stream_types_get_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    let listener = UnixListener::bind(muxer::port_path(&r.uds(), 5000)).unwrap();
    let seqpacket = Header {
        type_: 2,
        ..pkt(OP_REQUEST, GUEST_PORT, 5000)
    };
    r.send(seqpacket, &[]);
    r.give_rx(1);
    assert_rst(&r.one_packet(), 5000, GUEST_PORT);
    assert_eq!(r.dev.connection_count(), 0);

    // On an open connection: it is reset.
    let mut s = r.guest_connection(&listener, 5000);
    let bogus = Header {
        type_: 0xffff,
        ..pkt(OP_RW, GUEST_PORT, 5000)
    };
    r.send(bogus, b"data");
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), 5000, GUEST_PORT);
}

#[test]
fn unknown_ops_get_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    for op in [0, 8, 0xffff] {
        r.send(pkt(op, GUEST_PORT, 5000), &[]);
    }
    r.give_rx(3);
    for p in r.rx_packets() {
        assert_rst(&p, 5000, GUEST_PORT);
    }

    let (mut s, local) = r.host_connection(4096);
    r.send(pkt(0, GUEST_PORT, local), &[]);
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
}

#[test]
fn len_beyond_the_chain_gets_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    let h = Header {
        len: 100,
        ..pkt(OP_RW, GUEST_PORT, local)
    };
    r.send_raw(&h, b"only 10 b.");
    assert!(host_closed(&mut s), "connection reset, nothing written");
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);

    // Without a connection: just the RST.
    let h = Header {
        len: u32::MAX,
        ..pkt(OP_RW, GUEST_PORT, 9)
    };
    r.send_raw(&h, &[]);
    r.give_rx(1);
    assert_rst(&r.one_packet(), 9, GUEST_PORT);
}

#[test]
fn len_beyond_the_bound_gets_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    // The chain does hold the claimed bytes, but more than a packet may carry.
    let h = Header {
        len: MAX_PAYLOAD as u32 + 1,
        ..pkt(OP_RW, GUEST_PORT, local)
    };
    r.send_raw(&h, &vec![7; MAX_PAYLOAD + 1]);
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let m = mem();
    let mut r = Rig::new(&m);
    let ops = [
        OP_RESPONSE,
        OP_RW,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ];
    for (i, op) in ops.iter().enumerate() {
        r.send(pkt(*op, GUEST_PORT, 100 + i as u32), b"x");
    }
    // RST for nothing is not answered.
    r.send(pkt(OP_RST, GUEST_PORT, 200), &[]);
    r.give_rx(8);
    let p = r.rx_packets();
    assert_eq!(p.len(), ops.len());
    for (i, p) in p.iter().enumerate() {
        assert_rst(p, 100 + i as u32, GUEST_PORT);
    }
}

#[test]
fn malformed_tx_chains_are_dropped() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    r.txq
        .write(TX_BUF, &pkt(OP_RW, GUEST_PORT, local).to_bytes());
    let good_hdr = DescSpec::r(TX_BUF, HDR_LEN as u32);
    let cases: [&[DescSpec]; 4] = [
        &[good_hdr, DescSpec::w(TX_BUF + 0x1000, 16)], // writable payload
        &[DescSpec::r(TX_BUF, 20)],                    // shorter than a header
        &[good_hdr, DescSpec::r(MEM_SIZE - 4, 16)],    // outside memory
        &[DescSpec::r(u64::MAX - 8, 64)],              // wraps around
    ];
    for specs in cases {
        r.queue_tx_specs(specs);
    }
    // And a descriptor loop.
    r.txq
        .set_desc(100, TX_BUF, HDR_LEN as u32, DescSpec::NEXT, 100);
    r.txq.publish(&[100]);
    r.dev.process_tx();
    assert_eq!(r.txq.used_idx(), 6, "the RESPONSE and the five bad chains");
    for i in 0..6 {
        assert_eq!(r.txq.used(i).1, 0);
    }
    r.give_rx(2);
    assert!(r.rx_packets().is_empty(), "dropped without an answer");
    // The connection is unharmed.
    r.send(pkt(OP_RW, GUEST_PORT, local), b"still here");
    assert_eq!(read_n(&mut s, 10), b"still here");
}

#[test]
fn bad_rx_buffers_are_returned_empty() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.send(pkt(OP_REQUEST, GUEST_PORT, 6000), &[]); // answered by a RST
    let base = r.rx_next;
    r.rxq.add_chain(base, &[DescSpec::r(RX_BUF, RX_LEN)]); // device-readable
    r.rxq.add_chain(base + 1, &[DescSpec::w(RX_BUF, 43)]); // too small for a header
    r.rxq
        .add_chain(base + 2, &[DescSpec::w(MEM_SIZE - 8, RX_LEN)]); // outside memory
    r.rxq.set_desc(
        base + 3,
        RX_BUF,
        8,
        DescSpec::WRITE | DescSpec::NEXT,
        base + 3,
    ); // loop
    r.rxq.publish(&[base + 3]);
    r.rx_next = base + 4;
    r.dev.process_rx();
    assert_eq!(r.rxq.used_idx(), 4);
    for i in 0..4 {
        assert_eq!(r.rxq.used(i).1, 0);
    }
    r.rx_seen = 4;
    r.give_rx(1);
    assert_rst(&r.one_packet(), 6000, GUEST_PORT);
}

#[test]
fn rx_payload_fits_the_buffer() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(1 << 20);
    s.write_all(b"0123456789").unwrap();
    r.pump();
    // A buffer with room for a header only cannot carry data: it is returned empty, not kept
    // at the head of the queue.
    r.give_rx_len(1, HDR_LEN as u32);
    r.give_rx_len(1, HDR_LEN as u32 + 4);
    r.dev.process_rx();
    let p = r.rx_packets();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0], (Header::default(), Vec::new()), "used length 0");
    let (h, data) = &p[1];
    assert_eq!((h.op, h.dst_port, h.src_port), (OP_RW, GUEST_PORT, local));
    assert_eq!(data, b"0123");
    r.give_rx(1);
    assert_eq!(r.one_packet().1, b"456789");
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(10);
    s.write_all(&[b'a'; 25]).unwrap();
    r.pump();
    r.give_rx(3);
    let p = r.rx_packets();
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!((p[0].0.op, p[0].1.len()), (OP_RW, 10));
    assert_eq!(p[1].0.op, OP_CREDIT_REQUEST, "out of credit: ask once");

    // The guest consumed 4 bytes: 4 more may come (into the buffer left over).
    let upd = Header {
        buf_alloc: 10,
        fwd_cnt: 4,
        ..pkt(OP_CREDIT_UPDATE, GUEST_PORT, local)
    };
    r.send(upd, &[]);
    let (h, data) = r.one_packet();
    assert_eq!((h.op, data.len()), (OP_RW, 4));
    r.give_rx(1);
    assert_eq!(r.one_packet().0.op, OP_CREDIT_REQUEST);
    // Packets that give no credit do not ask again.
    r.send(upd, &[]);
    r.give_rx(1);
    assert!(r.rx_packets().is_empty());

    // A bigger buffer: the rest.
    let upd = Header {
        buf_alloc: 1000,
        fwd_cnt: 14,
        ..upd
    };
    r.send(upd, &[]);
    let (h, data) = r.one_packet();
    assert_eq!((h.op, data.len()), (OP_RW, 11));
}

#[test]
fn credit_request_gets_credit_update() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    r.send(pkt(OP_RW, GUEST_PORT, local), b"12345");
    assert_eq!(read_n(&mut s, 5), b"12345");
    r.send(pkt(OP_CREDIT_REQUEST, GUEST_PORT, local), &[]);
    r.give_rx(1);
    let (h, _) = r.one_packet();
    assert_eq!(h.op, OP_CREDIT_UPDATE);
    assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, 5));
    assert_eq!((h.src_port, h.dst_port), (local, GUEST_PORT));
}

/// Writes packets of `chunk` bytes as a guest that respects the device's credit would, until
/// the host stream stops taking them; returns the bytes sent.
fn fill_host_stream(r: &mut Rig, local: u32, chunk: usize) -> usize {
    let mut sent = 0;
    for i in 0.. {
        let before = r
            .dev
            .muxer
            .connection(local, GUEST_PORT)
            .unwrap()
            .pending_len();
        if before + chunk > BUF_ALLOC as usize {
            break;
        }
        let data = vec![i as u8; chunk];
        r.send(pkt(OP_RW, GUEST_PORT, local), &data);
        sent += chunk;
    }
    sent
}

/// Reads `n` bytes from the host stream, pumping the device while the stream is dry.
fn read_pumping(r: &mut Rig, s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < n {
        match s.read(&mut buf) {
            Ok(0) => panic!("end of file after {} bytes", got.len()),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(_) => r.pump(),
        }
    }
    got
}

#[test]
fn slow_host_data_waits_then_flows_with_credit_updates() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    let chunk = 16 * 1024;
    let sent = fill_host_stream(&mut r, local, chunk);
    let pending = r
        .dev
        .muxer
        .connection(local, GUEST_PORT)
        .unwrap()
        .pending_len();
    assert!(pending > BUF_ALLOC as usize - chunk && pending <= BUF_ALLOC as usize);
    // What the host socket took is credit again.
    r.give_rx(1);
    let (h, _) = r.one_packet();
    assert_eq!(h.op, OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt as usize, sent - pending);

    // The host reads everything: the waiting bytes follow in order, and the guest hears of the
    // freed buffer.
    let got = read_pumping(&mut r, &mut s, sent);
    let want: Vec<u8> = (0..sent / chunk)
        .flat_map(|i| vec![i as u8; chunk])
        .collect();
    assert!(got == want, "host data differs");
    assert_eq!(
        r.dev
            .muxer
            .connection(local, GUEST_PORT)
            .unwrap()
            .pending_len(),
        0
    );
    r.give_rx(1);
    let (h, _) = r.one_packet();
    assert_eq!(h.op, OP_CREDIT_UPDATE);
    assert_eq!(h.fwd_cnt as usize, sent);
}

#[test]
fn credit_overrun_resets() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    let chunk = 16 * 1024;
    fill_host_stream(&mut r, local, chunk);
    // One more than the credit allows.
    r.send(pkt(OP_RW, GUEST_PORT, local), &vec![0xee; chunk]);
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
    // The host stream is closed (after what it had buffered).
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => assert!(buf[..n].iter().all(|&b| b != 0xee)),
        }
    }
}

#[test]
fn guest_half_close_and_host_half_close() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    // The guest will send no more: the host reads end-of-file but can still write.
    let shut = Header {
        flags: SHUTDOWN_SEND,
        ..pkt(OP_SHUTDOWN, GUEST_PORT, local)
    };
    r.send(shut, &[]);
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    s.write_all(b"reply").unwrap();
    r.pump();
    r.give_rx(1);
    assert_eq!(r.one_packet().1, b"reply");

    // Data after SHUTDOWN(SEND) is a protocol error... (checked on another connection below)
    // The host is done too: the guest hears SHUTDOWN(SEND), then both ways are over: RST.
    s.shutdown(Shutdown::Write).unwrap();
    r.pump();
    r.give_rx(2);
    let p = r.rx_packets();
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!((p[0].0.op, p[0].0.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    assert_rst(&p[1], local, GUEST_PORT);
    assert_eq!(r.dev.connection_count(), 0);

    let (mut s, local) = r.host_connection(4096);
    r.send(shut_from(local, SHUTDOWN_SEND), &[]);
    r.send(pkt(OP_RW, GUEST_PORT, local), b"late");
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
}

fn shut_from(local: u32, flags: u32) -> Header {
    Header {
        flags,
        ..pkt(OP_SHUTDOWN, GUEST_PORT, local)
    }
}

#[test]
fn guest_shutdown_rcv_stops_reading_the_host() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    r.send(shut_from(local, SHUTDOWN_RCV), &[]);
    s.write_all(b"unwanted").unwrap();
    r.pump();
    r.give_rx(1);
    assert!(r.rx_packets().is_empty());
    // The guest can still send.
    r.send(pkt(OP_RW, GUEST_PORT, local), b"still");
    assert_eq!(read_n(&mut s, 5), b"still");
}

#[test]
fn full_shutdown_waits_for_pending_data() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, local) = r.host_connection(4096);
    let sent = fill_host_stream(&mut r, local, 16 * 1024);
    r.send(shut_from(local, SHUTDOWN_BOTH), &[]);
    r.give_rx(2);
    let p = r.rx_packets();
    assert!(
        p.iter().all(|p| p.0.op != OP_RST),
        "no RST before the data is out"
    );
    assert_eq!(read_pumping(&mut r, &mut s, sent).len(), sent);
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
}

#[test]
fn closing_connection_times_out() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.dev.muxer.shutdown_timeout = Duration::from_millis(20);
    let (s, local) = r.host_connection(4096);
    drop(s);
    r.pump();
    r.give_rx(1);
    assert_eq!(r.one_packet().0.flags, SHUTDOWN_BOTH);
    // The guest never answers.
    std::thread::sleep(Duration::from_millis(60));
    r.pump();
    r.give_rx(1);
    assert_rst(&r.one_packet(), local, GUEST_PORT);
    assert_eq!(r.dev.connection_count(), 0);
}

#[test]
fn repeated_request_resets_the_connection() {
    let m = mem();
    let mut r = Rig::new(&m);
    let listener = UnixListener::bind(muxer::port_path(&r.uds(), 5000)).unwrap();
    let mut s = r.guest_connection(&listener, 5000);
    r.send(pkt(OP_REQUEST, GUEST_PORT, 5000), &[]);
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), 5000, GUEST_PORT);
    // Afterwards the port can be used again.
    let _s = r.guest_connection(&listener, 5000);
}

#[test]
fn early_packets_reset_a_connecting_connection() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, req) = r.host_request(GUEST_PORT);
    r.send(pkt(OP_RW, GUEST_PORT, req.src_port), b"too early");
    assert!(host_closed(&mut s));
    r.give_rx(1);
    assert_rst(&r.one_packet(), req.src_port, GUEST_PORT);
}

#[test]
fn connection_count_is_bounded() {
    let m = mem();
    let mut r = Rig::new(&m);
    r.dev.muxer.max_connections = 2;
    let listener = UnixListener::bind(muxer::port_path(&r.uds(), 5000)).unwrap();
    let _a = r.guest_connection(&listener, 5000);
    r.send(pkt(OP_REQUEST, GUEST_PORT + 1, 5000), &[]);
    let _b = listener.accept().unwrap();
    r.send(pkt(OP_REQUEST, GUEST_PORT + 2, 5000), &[]);
    r.give_rx(2);
    let p = r.rx_packets();
    // RSTs go first.
    assert_rst(&p[0], 5000, GUEST_PORT + 2);
    assert_eq!(p[1].0.op, OP_RESPONSE);
    assert_eq!(r.dev.connection_count(), 2);

    // Host connections beyond the bound are closed at once.
    let mut s = UnixStream::connect(r.uds()).unwrap();
    r.pump();
    assert!(host_closed(&mut s));
    assert_eq!(r.dev.connection_count(), 2);
}

#[test]
fn unanswered_rsts_are_bounded_and_stall_tx() {
    let m = mem();
    let mut r = Rig::new(&m);
    // Without RX buffers, each bogus packet's RST waits; past the bound TX stops.
    for i in 0..300u32 {
        let h = pkt(OP_RW, GUEST_PORT, 1000 + i);
        r.txq.write(TX_BUF + u64::from(i) * 64, &h.to_bytes());
        r.txq
            .set_desc(i as u16 % 256, TX_BUF + u64::from(i) * 64, 44, 0, 0);
    }
    let heads: Vec<u16> = (0..250).collect();
    r.txq.publish(&heads);
    r.dev.process_tx();
    assert_eq!(r.txq.used_idx(), 250);
    let heads: Vec<u16> = (0..50).collect();
    r.txq.publish(&heads);
    r.dev.process_tx();
    assert_eq!(r.txq.used_idx(), 256, "TX stops with 256 answers waiting");

    // RX buffers drain the answers, and TX resumes.
    r.give_rx(16);
    assert_eq!(r.rx_packets().len(), 16);
    assert_eq!(r.dev.queue_events()[TX_QUEUE].read().unwrap(), 1);
    r.dev.process_tx();
    assert_eq!(r.txq.used_idx(), 272);
}

#[test]
fn reset_closes_host_streams() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s1, _) = r.host_connection(4096);
    let listener = UnixListener::bind(muxer::port_path(&r.uds(), 5000)).unwrap();
    let mut s2 = r.guest_connection(&listener, 5000);
    r.dev.reset();
    assert!(host_closed(&mut s1));
    assert!(host_closed(&mut s2));
    assert_eq!(r.dev.connection_count(), 0);
    // The listener still works after the driver comes back.
    r.rx_seen = 0;
    r.rx_next = 0;
    r.rxq = TestQueue::at(&m, 0x8_0000, QUEUE_SIZE);
    r.txq = TestQueue::at(&m, 0x9_0000, QUEUE_SIZE);
    r.tx_next = 0;
    r.activate();
    let (_s, local) = r.host_connection(4096);
    assert_eq!(local, FIRST_LOCAL_PORT + 1);
}

#[test]
fn bad_avail_index_needs_reset() {
    let m = mem();
    let mut r = Rig::new(&m);
    let (mut s, _) = r.host_connection(4096);
    r.txq.set_avail_idx(300);
    r.dev.process_tx();
    assert!(r.dev.interrupt().needs_reset());
    assert!(r.dev.base.active.is_none());
    assert!(host_closed(&mut s));

    let m = mem();
    let mut r = Rig::new(&m);
    r.send(pkt(OP_RW, GUEST_PORT, 1), &[]);
    r.rxq.publish(&[999]);
    r.dev.process_rx();
    assert!(r.dev.interrupt().needs_reset());
}

#[test]
fn tx_budget_reschedules() {
    let m = mem();
    let mut r = Rig::new(&m);
    // RSTs for nothing are not answered, so these do not fill the RST queue.
    r.txq.write(TX_BUF, &pkt(OP_RST, GUEST_PORT, 1).to_bytes());
    r.txq.set_desc(0, TX_BUF, HDR_LEN as u32, 0, 0);
    r.txq.publish(&[0; 256]);
    r.dev.process_tx();
    assert_eq!(r.txq.used_idx(), 256);
    assert_eq!(r.dev.queue_events()[TX_QUEUE].read().unwrap(), 1);
    r.txq.publish(&[0]);
    r.dev.process_tx();
    assert_eq!(r.txq.used_idx(), 257);
}

#[test]
fn event_loop_end_to_end() {
    use crate::BusDevice;
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};

    let m = mem();
    let dir = TempDir::new();
    let uds = dir.join("v.sock");
    let vsock = Vsock::new(CID, &uds).unwrap();
    let vdev = crate::virtio::VirtioMmioDevice::new(vsock, m.clone()).unwrap();
    assert_eq!(vdev.queue_evts.len(), 3);
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(vdev.subscriber.clone());
    type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;
    fn run(em: &mut Em) {
        while em.run_with_timeout(50).unwrap() > 0 {}
    }

    // The config space holds the CID.
    {
        let mut t = crate::bus::lock(&vdev.transport);
        let mut cid = [0u8; 8];
        t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), CID);
    }

    let rxq = TestQueue::new(&m, QUEUE_SIZE);
    let txq = TestQueue::at(&m, TX_Q_ADDR, QUEUE_SIZE);
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    crate::virtio::testing::drive_to_driver_ok(&vdev, &[&rxq, &txq, &evq]);
    evq.add_chain(0, &[DescSpec::w(0x5_8000, 8)]);
    vdev.queue_evts[2].0.write(1).unwrap();

    // A host process connects; no RX buffer yet.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    run(&mut em);
    assert_eq!(rxq.used_idx(), 0);
    assert_eq!(evq.used_idx(), 0, "event buffers are kept");

    // The guest adds buffers and notifies through the MMIO register.
    for i in 0..4u16 {
        rxq.add_chain(i, &[DescSpec::w(RX_BUF + u64::from(i) * RX_SLOT, RX_LEN)]);
    }
    crate::bus::lock(&vdev.transport).write(0x50, &0u32.to_le_bytes());
    run(&mut em);
    assert_eq!(rxq.used_idx(), 1);
    let req = Header::from_bytes(rxq.read(RX_BUF, HDR_LEN).as_slice().try_into().unwrap());
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
    assert!(vdev.irq_evt.read().unwrap() >= 1);

    // RESPONSE through the TX queue eventfd, as KVM's ioeventfd would signal it.
    txq.write(TX_BUF, &pkt(OP_RESPONSE, 52, req.src_port).to_bytes());
    txq.add_chain(0, &[DescSpec::r(TX_BUF, HDR_LEN as u32)]);
    vdev.queue_evts[1].0.write(1).unwrap();
    run(&mut em);
    assert_eq!(read_n(&mut s, 14), b"OK 1073741824\n");

    // Host data reaches the guest through the loop.
    s.write_all(b"over the loop").unwrap();
    run(&mut em);
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(rxq.used(1), (1, HDR_LEN as u32 + 13));
    assert_eq!(
        rxq.read(RX_BUF + RX_SLOT + HDR_LEN as u64, 13),
        b"over the loop"
    );

    // Used up the buffers: host data waits, and the loop goes quiet.
    s.write_all(&[1; 3 * 4096]).unwrap();
    run(&mut em);
    assert_eq!(rxq.used_idx(), 4);
    s.write_all(b"more").unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 0, "no busy loop");

    // Guest data reaches the host.
    txq.write(
        TX_BUF,
        &{
            let mut h = pkt(OP_RW, 52, req.src_port);
            h.len = 3;
            h
        }
        .to_bytes(),
    );
    txq.write(TX_BUF + HDR_LEN as u64, b"bye");
    txq.add_chain(1, &[DescSpec::r(TX_BUF, HDR_LEN as u32 + 3)]);
    vdev.queue_evts[1].0.write(1).unwrap();
    run(&mut em);
    assert_eq!(read_n(&mut s, 3), b"bye");

    // The driver resets the device: the host stream is closed.
    crate::bus::lock(&vdev.transport).write(0x70, &0u32.to_le_bytes());
    run(&mut em);
    assert!(host_closed(&mut s));
}

/// Where the event queue's buffers are.
const EV_BUF: u64 = 0x5_8000;

/// A device restored from a snapshot's state (listening on a new socket) and activated with
/// the event queue `evq`.
fn restored<'a>(m: &'a GuestMemoryMmap<()>, evq: &TestQueue) -> Rig<'a> {
    let mut r = Rig::inactive(m);
    let state = VsockState {
        guest_cid: CID,
        uds_path: r.uds(),
    };
    r.dev = Vsock::restore(r.dir.join("restored.sock"), &state).unwrap();
    assert!(r.dev.reset_pending());
    let queues = vec![r.rxq.queue(), r.txq.queue(), evq.queue()];
    r.dev.activate(m.clone(), queues, FEATURES).unwrap();
    let _ = r.dev.queue_events()[RX_QUEUE].read();
    r
}

/// The event ID in event buffer `slot`.
fn event_at(evq: &TestQueue, slot: u64) -> u32 {
    u32::from_le_bytes(evq.read(EV_BUF + slot * 0x10, 4).try_into().unwrap())
}

#[test]
fn save_restore_round_trip() {
    let dir = TempDir::new();
    let dev = Vsock::new(CID, dir.join("v.sock")).unwrap();
    let state = dev.save();
    assert_eq!(
        state,
        VsockState {
            guest_cid: CID,
            uds_path: dir.join("v.sock")
        }
    );
    assert_eq!(
        dev.state(),
        crate::virtio::VirtioDeviceState::Vsock(state.clone())
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    assert!(!dev.reset_pending(), "a new device owes no reset");

    let r = Vsock::restore(dir.join("w.sock"), &back).unwrap();
    assert_eq!(r.guest_cid(), CID);
    assert_eq!(r.uds_path(), dir.join("w.sock"));
    assert_eq!(r.config(), dev.config());
    assert_eq!(r.features(), dev.features());
    assert_eq!(r.connection_count(), 0);
    assert!(r.reset_pending());
    // The CID is checked as for a new device.
    let bad = VsockState {
        guest_cid: 2,
        ..back
    };
    assert!(matches!(
        Vsock::restore(dir.join("x.sock"), &bad),
        Err(VsockError::InvalidCid(2))
    ));
}

#[test]
fn restored_device_sends_a_transport_reset_once() {
    let m = mem();
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    evq.write(EV_BUF, &[0xff; 8]);
    evq.add_chain(0, &[DescSpec::w(EV_BUF, 4)]);
    evq.add_chain(1, &[DescSpec::w(EV_BUF + 0x10, 4)]);
    let mut r = restored(&m, &evq);
    r.dev.process_event_queue();
    assert_eq!(evq.used_idx(), 1);
    assert_eq!(evq.used(0), (0, 4));
    assert_eq!(event_at(&evq, 0), EVENT_TRANSPORT_RESET);
    assert_eq!(
        evq.read(EV_BUF + 4, 4),
        [0xff; 4],
        "4 bytes written, no more"
    );
    assert!(!r.dev.reset_pending());
    assert_eq!(r.dev.interrupt().status() & INT_USED_RING, INT_USED_RING);
    assert_eq!(r.dev.interrupt().eventfd().read().unwrap(), 1);
    // Sent once: the other buffer stays with the device.
    r.dev.process_event_queue();
    assert_eq!(evq.used_idx(), 1);
}

/// Restored before the driver was up: once it activates the device, the reset waits for an
/// event buffer, and goes out on the event queue's notification.
#[test]
fn transport_reset_waits_for_an_event_buffer() {
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};

    let m = mem();
    let dir = TempDir::new();
    let state = VsockState {
        guest_cid: CID,
        uds_path: dir.join("before.sock"),
    };
    let vsock = Vsock::restore(dir.join("after.sock"), &state).unwrap();
    let vdev = crate::virtio::VirtioMmioDevice::new(vsock, m.clone()).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(vdev.subscriber.clone());
    let rxq = TestQueue::new(&m, QUEUE_SIZE);
    let txq = TestQueue::at(&m, TX_Q_ADDR, QUEUE_SIZE);
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    crate::virtio::testing::drive_to_driver_ok(&vdev, &[&rxq, &txq, &evq]);
    vdev.queue_evts[2].0.write(1).unwrap();
    while em.run_with_timeout(50).unwrap() > 0 {}
    assert_eq!(evq.used_idx(), 0);
    assert!(vdev.irq_evt.read().is_err(), "no interrupt");

    // The guest gives an event buffer and notifies the event queue.
    evq.add_chain(0, &[DescSpec::w(EV_BUF, 4)]);
    vdev.queue_evts[2].0.write(1).unwrap();
    while em.run_with_timeout(50).unwrap() > 0 {}
    assert_eq!(evq.used_idx(), 1);
    assert_eq!(evq.used(0), (0, 4));
    assert_eq!(event_at(&evq, 0), EVENT_TRANSPORT_RESET);
    assert_eq!(vdev.irq_evt.read().unwrap(), 1);
}

#[test]
fn unusable_event_buffers_are_returned_and_the_next_one_used() {
    let m = mem();
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    evq.write(EV_BUF, &[0xff; 0x40]);
    // Too short, device-readable, outside memory, a loop; then a good one split in two.
    evq.add_chain(0, &[DescSpec::w(EV_BUF, 2)]);
    evq.add_chain(1, &[DescSpec::r(EV_BUF + 0x10, 4)]);
    evq.add_chain(2, &[DescSpec::w(MEM_SIZE - 2, 4)]);
    evq.set_desc(3, EV_BUF + 0x20, 4, DescSpec::WRITE | DescSpec::NEXT, 3);
    evq.publish(&[3]);
    evq.add_chain(
        4,
        &[DescSpec::w(EV_BUF + 0x30, 2), DescSpec::w(EV_BUF + 0x38, 2)],
    );
    let mut r = restored(&m, &evq);
    r.dev.process_event_queue();
    assert_eq!(evq.used_idx(), 5);
    for i in 0..4 {
        assert_eq!(evq.used(i), (i as u32, 0), "buffer {i} returned unused");
    }
    assert_eq!(evq.used(4), (4, 4));
    assert_eq!(evq.read(EV_BUF, 2), [0xff; 2]);
    assert_eq!(evq.read(EV_BUF + 0x30, 2), [0, 0]);
    assert_eq!(evq.read(EV_BUF + 0x38, 2), [0, 0]);
    assert!(!r.dev.reset_pending());
}

#[test]
fn broken_event_ring_needs_reset() {
    let m = mem();
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    evq.set_avail_idx(QUEUE_SIZE + 1);
    let mut r = restored(&m, &evq);
    r.dev.process_event_queue();
    assert!(r.dev.interrupt().needs_reset());
    // The driver resets the device: it starts over, with nothing to reset.
    r.dev.reset();
    assert!(!r.dev.reset_pending());
}

#[test]
fn new_devices_send_no_event() {
    let m = mem();
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    evq.add_chain(0, &[DescSpec::w(EV_BUF, 4)]);
    let mut r = Rig::new(&m);
    r.dev.process_event_queue();
    assert_eq!(evq.used_idx(), 0);
}

/// A device with a host connection open is saved through its transport and restored on
/// another socket path: the restored device has no connection, tells the guest with a
/// transport reset from the event loop, answers the stale connection with RST and takes new
/// connections.
#[test]
fn restore_through_the_transport_resets_the_guest_connections() {
    use crate::virtio::{MmioState, VirtioDeviceState, VirtioMmioDevice};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};
    type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;
    fn run(em: &mut Em) {
        while em.run_with_timeout(50).unwrap() > 0 {}
    }

    let m = mem();
    let dir = TempDir::new();
    let rxq = TestQueue::new(&m, QUEUE_SIZE);
    let txq = TestQueue::at(&m, TX_Q_ADDR, QUEUE_SIZE);
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    let (mmio, state, mut old_stream, host_port) = {
        let uds = dir.join("before.sock");
        let vdev = VirtioMmioDevice::new(Vsock::new(CID, &uds).unwrap(), m.clone()).unwrap();
        let mut em = Em::new().unwrap();
        em.add_subscriber(vdev.subscriber.clone());
        crate::virtio::testing::drive_to_driver_ok(&vdev, &[&rxq, &txq, &evq]);
        for i in 0..4u16 {
            evq.add_chain(i, &[DescSpec::w(EV_BUF + u64::from(i) * 0x10, 4)]);
            rxq.add_chain(i, &[DescSpec::w(RX_BUF + u64::from(i) * RX_SLOT, RX_LEN)]);
        }
        vdev.queue_evts[2].0.write(1).unwrap();
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        run(&mut em);
        assert_eq!(evq.used_idx(), 0, "a new device sends no event");
        assert_eq!(rxq.used_idx(), 1);
        let req = Header::from_bytes(rxq.read(RX_BUF, HDR_LEN).as_slice().try_into().unwrap());
        txq.write(TX_BUF, &pkt(OP_RESPONSE, 52, req.src_port).to_bytes());
        txq.add_chain(0, &[DescSpec::r(TX_BUF, HDR_LEN as u32)]);
        vdev.queue_evts[1].0.write(1).unwrap();
        run(&mut em);
        assert_eq!(read_n(&mut s, 14), b"OK 1073741824\n");

        let t = crate::bus::lock(&vdev.transport);
        let VirtioDeviceState::Vsock(state) = t.save_device().unwrap() else {
            panic!("not a vsock state");
        };
        (t.save(), state, s, req.src_port)
    };
    // The device is gone, and with it the host side of the connection.
    assert!(host_closed(&mut old_stream));
    assert_eq!(state.uds_path, dir.join("before.sock"));
    let pos: Vec<_> = mmio
        .queues
        .iter()
        .map(|q| (q.next_avail, q.next_used))
        .collect();
    assert_eq!(pos, [(1, 1), (1, 1), (0, 0)]);
    let json = serde_json::to_string(&mmio).unwrap();
    let mmio: MmioState = serde_json::from_str(&json).unwrap();

    let uds = dir.join("after.sock");
    let vsock = Vsock::restore(&uds, &state).unwrap();
    let vdev = VirtioMmioDevice::restore(vsock, m.clone(), &mmio).unwrap();
    let mut em = Em::new().unwrap();
    em.add_subscriber(vdev.subscriber.clone());
    run(&mut em);
    assert_eq!(evq.used_idx(), 1, "transport reset sent");
    assert_eq!(evq.used(0), (0, 4));
    assert_eq!(event_at(&evq, 0), EVENT_TRANSPORT_RESET);
    assert!(vdev.irq_evt.read().unwrap() >= 1);
    assert_eq!(rxq.used_idx(), 1, "nothing else for the guest");

    // The guest, not yet done with its stale connection, writes on it: RST.
    let mut h = pkt(OP_RW, 52, host_port);
    h.len = 2;
    txq.write(TX_BUF, &h.to_bytes());
    txq.write(TX_BUF + HDR_LEN as u64, b"hi");
    txq.add_chain(1, &[DescSpec::r(TX_BUF, HDR_LEN as u32 + 2)]);
    vdev.queue_evts[1].0.write(1).unwrap();
    run(&mut em);
    assert_eq!(txq.used_idx(), 2);
    assert_eq!(rxq.used_idx(), 2);
    let rst = Header::from_bytes(
        rxq.read(RX_BUF + RX_SLOT, HDR_LEN)
            .as_slice()
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, host_port, 52)
    );

    // A new host connection, through the new socket: it waits while the driver has not handled
    // the reset (Linux would take it, then drop it with the stale ones without a word).
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 53\n").unwrap();
    run(&mut em);
    assert_eq!(rxq.used_idx(), 2, "no REQUEST before the reset is handled");
    // The driver handles the reset: it gives the event buffer back and notifies the queue.
    evq.add_chain(0, &[DescSpec::w(EV_BUF, 4)]);
    vdev.queue_evts[2].0.write(1).unwrap();
    run(&mut em);
    assert_eq!(evq.used_idx(), 1, "one reset only");
    assert_eq!(rxq.used_idx(), 3);
    let req = Header::from_bytes(
        rxq.read(RX_BUF + 2 * RX_SLOT, HDR_LEN)
            .as_slice()
            .try_into()
            .unwrap(),
    );
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 53));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    txq.write(TX_BUF, &pkt(OP_RESPONSE, 53, req.src_port).to_bytes());
    txq.add_chain(2, &[DescSpec::r(TX_BUF, HDR_LEN as u32)]);
    vdev.queue_evts[1].0.write(1).unwrap();
    run(&mut em);
    let line = format!("OK {}\n", req.src_port);
    assert_eq!(read_n(&mut s, line.len()), line.as_bytes());
}

/// A driver that never gives the reset's event buffer back still gets host connections, once
/// the wait for it is over.
#[test]
fn host_connections_wait_for_the_reset_at_most_a_while() {
    use crate::virtio::{MmioState, VirtioMmioDevice};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let m = mem();
    let dir = TempDir::new();
    let rxq = TestQueue::new(&m, QUEUE_SIZE);
    let txq = TestQueue::at(&m, TX_Q_ADDR, QUEUE_SIZE);
    let evq = TestQueue::at(&m, EV_Q_ADDR, QUEUE_SIZE);
    let mmio: MmioState = {
        let vdev =
            VirtioMmioDevice::new(Vsock::new(CID, dir.join("a.sock")).unwrap(), m.clone()).unwrap();
        crate::virtio::testing::drive_to_driver_ok(&vdev, &[&rxq, &txq, &evq]);
        let t = crate::bus::lock(&vdev.transport);
        t.save()
    };
    evq.add_chain(0, &[DescSpec::w(EV_BUF, 4)]);
    rxq.add_chain(0, &[DescSpec::w(RX_BUF, RX_LEN)]);
    let state = VsockState {
        guest_cid: CID,
        uds_path: dir.join("a.sock"),
    };
    let uds = dir.join("b.sock");
    let mut vsock = Vsock::restore(&uds, &state).unwrap();
    // As RESET_ACK_TIMEOUT, shorter.
    vsock.muxer.pause_listener(Duration::from_millis(200));
    let vdev = VirtioMmioDevice::restore(vsock, m.clone(), &mmio).unwrap();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
    em.add_subscriber(vdev.subscriber.clone());
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 52\n").unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(100) {
        em.run_with_timeout(10).unwrap();
    }
    assert_eq!(evq.used_idx(), 1, "transport reset sent");
    assert_eq!(
        rxq.used_idx(),
        0,
        "the connection waits for the reset to be handled"
    );
    while rxq.used_idx() == 0 && start.elapsed() < Duration::from_secs(5) {
        em.run_with_timeout(10).unwrap();
    }
    assert_eq!(rxq.used_idx(), 1);
    let req = Header::from_bytes(rxq.read(RX_BUF, HDR_LEN).as_slice().try_into().unwrap());
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
    assert!(start.elapsed() >= Duration::from_millis(200));
}
