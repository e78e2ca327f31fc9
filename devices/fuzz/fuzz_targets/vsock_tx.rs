//! Guest-to-host vsock packets through the muxer, after a plausible activation.
//!
//! The input is a sequence of TX packets (headers with any CIDs, ports, op, type, flags,
//! credit and `len`, the packet split over device-readable descriptors at arbitrary points,
//! sometimes with a wrong-direction or out-of-memory descriptor), RX buffers for the answers,
//! event-queue buffers, and host-side traffic on real Unix sockets in a temp dir: a listener
//! for guest connections (`<uds>_1024`) and host connections through the device's socket
//! (`CONNECT <port>`), written to, read from and closed. So REQUEST/RESPONSE/RW/SHUTDOWN/
//! CREDIT/RST go through real connection paths.
//!
//! Checked after each step, besides no panic and no access outside guest memory: the
//! transport reads sane, the muxer never holds more than `MAX_CONNECTIONS` connections, and
//! every packet the device puts in an RX buffer is a well-formed host-to-guest header (to the
//! guest's CID, from the host's but for a RST answering a packet to another CID, stream type,
//! a known op, `len` matching the used length and the buffer).

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use loft_devices::virtio::vsock::packet::{Header, HDR_LEN, HOST_CID, OP_RST, TYPE_STREAM};
use loft_devices::virtio::vsock::{Vsock, FIRST_LOCAL_PORT, MAX_CONNECTIONS};
use loft_devices_fuzz::*;
use vm_memory::{Bytes, GuestAddress};

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 1024;
const MAX_STREAMS: usize = 8;
/// TX packets are written here, round robin.
const TX_AREA: u64 = DATA;
const TX_AREA_LEN: u64 = 0xa000;
/// RX buffer `slot` lives at `RX_AREA + slot * RX_SLOT`.
const RX_AREA: u64 = DATA + TX_AREA_LEN;
const RX_SLOT: u64 = 0xc00;
const RX_SLOTS: u16 = 16;

#[derive(Arbitrary, Debug)]
struct Tx {
    /// Bit 0: raw CIDs; bit 1: raw type; bit 2: raw op; bit 3: raw len; bit 4: raw ports.
    raw: u8,
    src_cid: u64,
    dst_cid: u64,
    src_port: u16,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    payload: Vec<u8>,
    /// Split points (offsets into header + payload) and their oddities.
    splits: Vec<(u16, u8)>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Tx(Tx),
    /// `n` RX buffers of `len` bytes (some split in two), then a notification.
    Rx {
        n: u8,
        len: u16,
        split: Option<u16>,
    },
    /// An event-queue buffer of `len` bytes, then a notification.
    Event {
        len: u8,
    },
    Notify {
        queue: u8,
    },
    Connect {
        port: u32,
        line: Option<Vec<u8>>,
    },
    Write {
        which: u8,
        data: Vec<u8>,
    },
    Close {
        which: u8,
    },
    Drain,
    Events,
    Reset {
        sizes: [u8; 3],
    },
}

struct Rx {
    /// Per RX slot, the (address, length) of each descriptor of the chain posted there.
    posted: Vec<Vec<(u64, u32)>>,
    in_flight: u16,
    descs_in_flight: u16,
    next_area: u16,
    used_seen: u16,
}

struct State {
    rig: Rig,
    dev: Arc<Mutex<Vsock>>,
    uds: std::path::PathBuf,
    listener: UnixListener,
    streams: Vec<UnixStream>,
    tx_cursor: u64,
    rx: Rx,
}

impl State {
    fn new() -> Self {
        let uds = scratch_dir().join("tx.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, &uds).unwrap()));
        let port_path = scratch_dir().join(format!("tx.sock_{HOST_PORT}"));
        let _ = std::fs::remove_file(&port_path);
        let listener = UnixListener::bind(&port_path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let rig = Rig::new(dev.clone(), guest_memory());
        Self {
            rig,
            dev,
            uds,
            listener,
            streams: Vec::new(),
            tx_cursor: 0,
            rx: Rx {
                posted: vec![Vec::new(); 256],
                in_flight: 0,
                descs_in_flight: 0,
                next_area: 0,
                used_seen: 0,
            },
        }
    }

    fn setup(&mut self, sizes: &[u8; 3]) {
        // The first activation is a plain one; later ones let the sizes vary.
        self.rig.setup(0, false, sizes);
        self.rx.in_flight = 0;
        self.rx.descs_in_flight = 0;
        self.rx.used_seen = 0;
    }

    /// Writes `bytes` in the TX area; returns where.
    fn tx_bytes(&mut self, bytes: &[u8]) -> u64 {
        let len = bytes.len() as u64;
        if self.tx_cursor + len > TX_AREA_LEN {
            self.tx_cursor = 0;
        }
        let at = TX_AREA + self.tx_cursor;
        let n = len.min(TX_AREA_LEN) as usize;
        self.rig
            .mem
            .write_slice(&bytes[..n], GuestAddress(at))
            .unwrap();
        self.tx_cursor += (n as u64 + 15) & !15;
        at
    }

    fn tx(&mut self, p: Tx) {
        let pick = |raw: bool, v: u64, plausible: u64| if raw { v } else { plausible };
        let conn_port = u32::from(p.src_port % 8);
        let dst_port = if p.raw & 16 != 0 {
            p.dst_port
        } else {
            match p.dst_port % 4 {
                0 => HOST_PORT,
                1 => FIRST_LOCAL_PORT + p.dst_port % 8,
                2 => 52,
                _ => p.dst_port,
            }
        };
        let hdr = Header {
            src_cid: pick(p.raw & 1 != 0, p.src_cid, GUEST_CID),
            dst_cid: pick(p.raw & 1 != 0, p.dst_cid, HOST_CID),
            src_port: if p.raw & 16 != 0 {
                u32::from(p.src_port)
            } else {
                0x8000 + conn_port
            },
            dst_port,
            len: if p.raw & 8 != 0 {
                p.len
            } else {
                p.payload.len() as u32
            },
            type_: pick(p.raw & 2 != 0, p.type_.into(), TYPE_STREAM.into()) as u16,
            op: pick(p.raw & 4 != 0, p.op.into(), u64::from(p.op % 7 + 1)) as u16,
            flags: p.flags,
            buf_alloc: p.buf_alloc,
            fwd_cnt: p.fwd_cnt,
        };
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(&p.payload);
        let at = self.tx_bytes(&bytes);
        // Cut at the split points, in order; each piece one descriptor.
        let total = bytes.len() as u64;
        let mut cuts: Vec<(u64, u8)> = p
            .splits
            .iter()
            .take(8)
            .map(|&(o, odd)| (u64::from(o) % (total + 1), odd))
            .collect();
        cuts.sort_unstable();
        // Piece k > 0 starts at cut k - 1 and takes that cut's oddity (rarely any).
        let mut descs = Vec::new();
        let mut start = 0;
        let mut odd = 0xffu8;
        for (cut, next_odd) in cuts.into_iter().chain([(total, 0xff)]) {
            let len = (cut - start) as u32;
            let desc = match odd % 32 {
                0 => (at + start, len, F_WRITE, None),
                1 => (MEM_END - 4, len, 0, None),
                2 => (pick_addr(odd >> 5, at + start), len, 0, None),
                3 => (at + start, len, 0, Some(u16::from(odd >> 5))),
                _ => (at + start, len, 0, None),
            };
            descs.push(desc);
            start = cut;
            odd = next_odd;
        }
        let q = &mut self.rig.queues[1];
        q.add_chain(&self.rig.mem, &descs);
        self.rig.notify(1);
    }

    fn post_rx(&mut self, n: u8, len: u16, split: Option<u16>) {
        let size = self.rig.queues[0].size;
        for _ in 0..n % 8 {
            let len = u64::from(len) % (RX_SLOT + 1);
            let ndesc = if split.is_some() && size > 1 { 2 } else { 1 };
            // Never reuse a descriptor or a buffer the device still holds (it uses them in
            // order, so buffers are taken round robin).
            if self.rx.in_flight >= RX_SLOTS || self.rx.descs_in_flight + ndesc > size {
                break;
            }
            let base = RX_AREA + u64::from(self.rx.next_area) * RX_SLOT;
            self.rx.next_area = (self.rx.next_area + 1) % RX_SLOTS;
            let chain: Vec<(u64, u32)> = match split {
                Some(s) if ndesc == 2 => {
                    let s = u64::from(s) % (len + 1);
                    vec![(base, s as u32), (base + s, (len - s) as u32)]
                }
                _ => vec![(base, len as u32)],
            };
            let descs: Vec<_> = chain.iter().map(|&(a, l)| (a, l, F_WRITE, None)).collect();
            let head = self.rig.queues[0].add_chain(&self.rig.mem, &descs);
            self.rx.posted[usize::from(head)] = chain;
            self.rx.in_flight += 1;
            self.rx.descs_in_flight += ndesc;
        }
        self.rig.notify(0);
    }

    fn post_event(&mut self, len: u8) {
        let at = RX_AREA + u64::from(RX_SLOTS) * RX_SLOT;
        let descs = [(at, u32::from(len % 16), F_WRITE, None)];
        self.rig.queues[2].add_chain(&self.rig.mem, &descs);
        self.rig.notify(2);
    }

    fn host(&mut self, op: Op) {
        while self.streams.len() < MAX_STREAMS {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(true).unwrap();
                    self.streams.push(s);
                }
                Err(_) => break,
            }
        }
        match op {
            Op::Connect { port, line } => {
                if self.streams.len() < MAX_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&self.uds) {
                        s.set_nonblocking(true).unwrap();
                        let _ = match line {
                            Some(line) => s.write(&line),
                            None => s.write(format!("CONNECT {}\n", port % 64).as_bytes()),
                        };
                        self.streams.push(s);
                    }
                }
            }
            Op::Write { which, data } => {
                let n = self.streams.len().max(1);
                if let Some(s) = self.streams.get_mut(usize::from(which) % n) {
                    let _ = s.write(&data);
                }
            }
            Op::Close { which } => {
                let n = self.streams.len();
                if n > 0 {
                    self.streams.swap_remove(usize::from(which) % n);
                }
            }
            Op::Drain => {
                let mut buf = [0u8; 4096];
                for s in self.streams.iter_mut() {
                    for _ in 0..16 {
                        match s.read(&mut buf) {
                            Ok(n) if n > 0 => {}
                            _ => break,
                        }
                    }
                }
            }
            _ => unreachable!(),
        }
        self.rig.run_events();
    }

    /// Every RX packet the device returned since the last look is well formed.
    fn check_rx(&mut self) {
        let q = &self.rig.queues[0];
        let mem = &self.rig.mem;
        let used_idx: u16 = mem.read_obj(GuestAddress(q.used_addr() + 2)).unwrap();
        let size = q.size.max(1);
        while self.rx.used_seen != used_idx {
            let slot = u64::from(self.rx.used_seen % size);
            let at = q.used_addr() + 4 + 8 * slot;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            assert!(
                id < u32::from(size),
                "used id {id} past the queue size {size}"
            );
            assert!(self.rx.in_flight > 0, "more RX buffers used than posted");
            self.rx.in_flight -= 1;
            let chain = std::mem::take(&mut self.rx.posted[id as usize]);
            assert!(
                !chain.is_empty(),
                "used RX id {id} is not a buffer the driver posted"
            );
            self.rx.descs_in_flight -= chain.len() as u16;
            let room: u64 = chain.iter().map(|&(_, l)| u64::from(l)).sum();
            assert!(
                u64::from(len) <= room,
                "used length {len} past the buffer {room}"
            );
            if len > 0 {
                assert!(
                    len as usize >= HDR_LEN,
                    "RX packet shorter than a header: {len}"
                );
                let mut raw = Vec::new();
                for &(a, l) in &chain {
                    let mut b = vec![0u8; l as usize];
                    mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                    raw.extend_from_slice(&b);
                }
                let hdr = Header::from_bytes(raw[..HDR_LEN].try_into().unwrap());
                // A RST answering a packet to another CID comes from that CID (so that the
                // guest's socket connecting there is the one reset); all else from the host.
                if hdr.op != OP_RST {
                    assert_eq!(hdr.src_cid, HOST_CID, "{hdr:?}");
                }
                assert_eq!(hdr.dst_cid, GUEST_CID, "{hdr:?}");
                assert_eq!(hdr.type_, TYPE_STREAM, "{hdr:?}");
                assert!((1..=7).contains(&hdr.op), "{hdr:?}");
                assert_eq!(
                    HDR_LEN as u64 + u64::from(hdr.len),
                    u64::from(len),
                    "{hdr:?}"
                );
            }
            self.rx.used_seen = self.rx.used_seen.wrapping_add(1);
        }
    }
}

fn run(sizes: [u8; 3], ops: Vec<Op>) {
    let mut s = State::new();
    // Small queues most of the time: chains and rings wrap sooner.
    s.setup(&sizes.map(|v| v % 6));
    for op in ops.into_iter().take(64) {
        match op {
            Op::Tx(p) => s.tx(p),
            Op::Rx { n, len, split } => s.post_rx(n, len, split),
            Op::Event { len } => s.post_event(len),
            Op::Notify { queue } => s.rig.notify(u32::from(queue % 3)),
            Op::Events => s.rig.run_events(),
            Op::Reset { sizes } => {
                s.rig.write32(REG_STATUS, 0);
                s.setup(&sizes.map(|v| v % 9));
            }
            op => s.host(op),
        }
        s.rig.check();
        if s.rig.t.is_active() {
            s.check_rx();
        }
        assert!(s.dev.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
    }
}

fuzz_target!(|input: ([u8; 3], Vec<Op>)| run(input.0, input.1));
