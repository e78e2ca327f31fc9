//! The virtio-mmio register window of every device that needs no host privileges: block (over
//! a small image, read-write or read-only), net (over a Unix datagram pair instead of a TAP)
//! and vsock (a muxer listening in a temp dir, with a host listener for guest connections).
//!
//! The input is a sequence of operations: register and config reads and writes at any offset
//! and of any size, the plausible driver sequence up to DRIVER_OK, descriptor chains put in
//! the queues, notifications (the event loop then runs the device as the VMM's does), writes
//! to guest memory, and host-side traffic. After each step the transport must still read
//! sane: magic, version, device ID, known status and interrupt bits, an unchanged config space.
//! Nothing may panic, and memory outside the guest's is never touched (the devices only get
//! the checked `GuestMemory` API; the memory has a hole to fall into).

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use loft_devices::virtio::block::Block;
use loft_devices::virtio::net::Net;
use loft_devices::virtio::vsock::{Vsock, MAX_CONNECTIONS};
use loft_devices::BusDevice;
use loft_devices_fuzz::*;
use vm_memory::{Bytes, GuestAddress};

#[derive(Arbitrary, Debug)]
enum Kind {
    BlockRw,
    BlockRo,
    Net,
    NetMac,
    Vsock,
}

#[derive(Arbitrary, Debug)]
struct Desc {
    sel: u8,
    addr: u64,
    len: u16,
    write: bool,
    /// Raw flags and next index instead of a well-formed chain link.
    raw: Option<(u16, u16)>,
    /// What the driver puts in the buffer first (a request header, a frame, a packet).
    fill: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        size: u8,
    },
    Write {
        offset: u16,
        size: u8,
        value: u64,
    },
    ReadAnywhere {
        offset: u64,
        size: u8,
    },
    WriteAnywhere {
        offset: u64,
        size: u8,
        value: u64,
    },
    Setup {
        feature_mask: u64,
        drop_version: bool,
        sizes: [u8; 3],
    },
    Chain {
        queue: u8,
        descs: Vec<Desc>,
    },
    /// A well-formed virtio-blk request on queue 0 (whatever the device): header, data
    /// buffers, status byte.
    BlockRequest {
        type_: u8,
        sector: u8,
        raw_sector: Option<u64>,
        data: Vec<u16>,
        fill: u8,
    },
    Notify {
        queue: u8,
    },
    AvailIdx {
        queue: u8,
        idx: u16,
    },
    AvailFlags {
        queue: u8,
        flags: u16,
    },
    Mem {
        offset: u16,
        data: Vec<u8>,
    },
    Ack {
        mask: u32,
    },
    Events,
    Reset,
    Host(Host),
}

#[derive(Arbitrary, Debug)]
enum Host {
    /// net: a frame for the guest; vsock: a host connection asking for `CONNECT port`.
    Send { port: u8, data: Vec<u8> },
    /// Drain what the device sent to the host side.
    Drain,
    /// vsock: bytes on a host stream (or a guest connection accepted on the port listener).
    Stream { which: u8, data: Vec<u8> },
    /// vsock: close a host stream.
    Close { which: u8 },
}

/// Host ends a target can touch.
enum Backend {
    None,
    Net(UnixDatagram),
    Vsock {
        dev: Arc<Mutex<Vsock>>,
        path: std::path::PathBuf,
        listener: UnixListener,
        streams: Vec<UnixStream>,
    },
}

/// Guest port range of the host listener: `<uds>_1024`.
const HOST_PORT: u32 = 1024;
const MAX_STREAMS: usize = 8;

fn image(read_only: bool) -> std::path::PathBuf {
    let path = scratch_dir().join(if read_only { "ro.img" } else { "rw.img" });
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(16 * 512) {
        std::fs::write(&path, vec![0x5a; 16 * 512]).unwrap();
    }
    path
}

fn build(kind: &Kind) -> (Rig, Backend) {
    let mem = guest_memory();
    match kind {
        Kind::BlockRw | Kind::BlockRo => {
            let ro = matches!(kind, Kind::BlockRo);
            let dev = Arc::new(Mutex::new(Block::new(image(ro), ro).unwrap()));
            (Rig::new(dev, mem), Backend::None)
        }
        Kind::Net | Kind::NetMac => {
            let (a, b) = UnixDatagram::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            b.set_nonblocking(true).unwrap();
            let mac = matches!(kind, Kind::NetMac).then_some([2, 0, 0, 0, 0, 1]);
            let dev = Arc::new(Mutex::new(Net::with_backend(Box::new(a), mac).unwrap()));
            (Rig::new(dev, mem), Backend::Net(b))
        }
        Kind::Vsock => {
            let path = scratch_dir().join("v.sock");
            let dev = Arc::new(Mutex::new(Vsock::new(3, &path).unwrap()));
            let port_path = scratch_dir().join(format!("v.sock_{HOST_PORT}"));
            let _ = std::fs::remove_file(&port_path);
            let listener = UnixListener::bind(&port_path).unwrap();
            listener.set_nonblocking(true).unwrap();
            let rig = Rig::new(dev.clone(), mem);
            let backend = Backend::Vsock {
                dev,
                path,
                listener,
                streams: Vec::new(),
            };
            (rig, backend)
        }
    }
}

fn host(rig: &mut Rig, backend: &mut Backend, op: Host) {
    match backend {
        Backend::None => {}
        Backend::Net(peer) => match op {
            Host::Send { data, .. } => {
                let _ = peer.send(&data);
            }
            _ => {
                let mut buf = vec![0u8; 70_000];
                for _ in 0..64 {
                    if peer.recv(&mut buf).is_err() {
                        break;
                    }
                }
            }
        },
        Backend::Vsock {
            path,
            listener,
            streams,
            ..
        } => {
            // Guest connections to the host listener become streams too.
            while streams.len() < MAX_STREAMS {
                match listener.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(true).unwrap();
                        streams.push(s);
                    }
                    Err(_) => break,
                }
            }
            match op {
                Host::Send { port, data } => {
                    if streams.len() < MAX_STREAMS {
                        if let Ok(mut s) = UnixStream::connect(&*path) {
                            s.set_nonblocking(true).unwrap();
                            if data.is_empty() {
                                let _ = writeln!(s, "CONNECT {port}");
                            } else {
                                let _ = s.write(&data);
                            }
                            streams.push(s);
                        }
                    }
                }
                Host::Stream { which, data } => {
                    let n = streams.len();
                    if let Some(s) = streams.get_mut(usize::from(which) % n.max(1)) {
                        let _ = s.write(&data);
                    }
                }
                Host::Close { which } => {
                    let n = streams.len();
                    if n > 0 {
                        streams.swap_remove(usize::from(which) % n);
                    }
                }
                Host::Drain => {
                    let mut buf = [0u8; 4096];
                    for s in streams.iter_mut() {
                        for _ in 0..16 {
                            match s.read(&mut buf) {
                                Ok(n) if n > 0 => {}
                                _ => break,
                            }
                        }
                    }
                }
            }
        }
    }
    rig.run_events();
}

fn run(kind: Kind, ops: Vec<Op>) {
    let (mut rig, mut backend) = build(&kind);
    // Where the next driver-allocated buffer goes, from DATA.
    let mut cursor = 0u64;
    for op in ops.into_iter().take(64) {
        match op {
            Op::Read { offset, size } => {
                let mut b = [0u8; 16];
                let n = access_size(size);
                rig.t.read(u64::from(offset) % 0x1100, &mut b[..n]);
            }
            Op::Write {
                offset,
                size,
                value,
            } => {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&value.to_le_bytes());
                b[8..].copy_from_slice(&value.to_le_bytes());
                let n = access_size(size);
                rig.t.write(u64::from(offset) % 0x1100, &b[..n]);
                rig.run_events();
            }
            Op::ReadAnywhere { offset, size } => {
                let mut b = [0u8; 16];
                let n = access_size(size);
                rig.t.read(offset, &mut b[..n]);
            }
            Op::WriteAnywhere {
                offset,
                size,
                value,
            } => {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&value.to_le_bytes());
                let n = access_size(size);
                rig.t.write(offset, &b[..n]);
            }
            Op::Setup {
                feature_mask,
                drop_version,
                sizes,
            } => {
                rig.setup(feature_mask, drop_version, &sizes);
                rig.run_events();
            }
            Op::Chain { queue, descs } => {
                let n = rig.queues.len();
                let q = &mut rig.queues[usize::from(queue) % n];
                let descs: Vec<_> = descs
                    .iter()
                    .take(16)
                    .map(|d| {
                        let flags = if d.write { F_WRITE } else { 0 };
                        let raw_next = d.raw.map(|(_, next)| next);
                        let flags = d.raw.map_or(flags, |(f, _)| f);
                        let len = u32::from(d.len);
                        // Mostly buffers a driver would allocate: fresh, in the data area.
                        let addr = if d.sel & 0x80 == 0 {
                            let at = DATA + cursor;
                            cursor = (cursor + u64::from(d.len) + 15) & !15;
                            if DATA + cursor > MEM_END {
                                cursor = 0;
                                DATA
                            } else {
                                at
                            }
                        } else {
                            pick_addr(d.sel, d.addr)
                        };
                        let fill = &d.fill[..d.fill.len().min(d.len.into())];
                        let _ = rig.mem.write_slice(fill, GuestAddress(addr));
                        (addr, len, flags, raw_next)
                    })
                    .collect();
                q.add_chain(&rig.mem, &descs);
            }
            Op::BlockRequest {
                type_,
                sector,
                raw_sector,
                data,
                fill,
            } => {
                // IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES, or anything.
                let type_ = match type_ % 8 {
                    0 => 0u32,
                    1 => 1,
                    2 => 4,
                    3 => 8,
                    4 => 11,
                    5 => 13,
                    _ => u32::from(type_),
                };
                let sector = raw_sector.unwrap_or(u64::from(sector % 20));
                let mut hdr = [0u8; 16];
                hdr[..4].copy_from_slice(&type_.to_le_bytes());
                hdr[8..].copy_from_slice(&sector.to_le_bytes());
                let mut alloc = |len: u64| {
                    if DATA + cursor + len > MEM_END {
                        cursor = 0;
                    }
                    let at = DATA + cursor;
                    cursor = (cursor + len + 15) & !15;
                    at
                };
                let h = alloc(16);
                rig.mem.write_slice(&hdr, GuestAddress(h)).unwrap();
                let mut descs = vec![(h, 16, 0, None)];
                let write = if type_ == 0 || type_ == 8 { F_WRITE } else { 0 };
                for &len in data.iter().take(6) {
                    let len = u64::from(len % 0x1100);
                    let at = alloc(len);
                    let room = (MEM_END - at).min(len) as usize;
                    rig.mem
                        .write_slice(&vec![fill; room], GuestAddress(at))
                        .unwrap();
                    descs.push((at, len as u32, write, None));
                }
                descs.push((alloc(1), 1, F_WRITE, None));
                rig.queues[0].add_chain(&rig.mem, &descs);
                rig.notify(0);
            }
            Op::Notify { queue } => rig.notify(u32::from(queue % 4)),
            Op::AvailIdx { queue, idx } => {
                let n = rig.queues.len();
                rig.queues[usize::from(queue) % n].set_avail_idx(&rig.mem, idx);
            }
            Op::AvailFlags { queue, flags } => {
                let n = rig.queues.len();
                rig.queues[usize::from(queue) % n].set_avail_flags(&rig.mem, flags);
            }
            Op::Mem { offset, data } => {
                let at = DATA + u64::from(offset);
                let room = (MEM_END - at) as usize;
                rig.mem
                    .write_slice(&data[..data.len().min(room)], GuestAddress(at))
                    .unwrap();
            }
            Op::Ack { mask } => rig.write32(REG_INTERRUPT_ACK, mask),
            Op::Events => rig.run_events(),
            Op::Reset => rig.write32(REG_STATUS, 0),
            Op::Host(h) => host(&mut rig, &mut backend, h),
        }
        rig.check();
        if let Backend::Vsock { dev, .. } = &backend {
            assert!(dev.lock().unwrap().connection_count() <= MAX_CONNECTIONS);
        }
    }
}

fuzz_target!(|input: (Kind, Vec<Op>)| run(input.0, input.1));
