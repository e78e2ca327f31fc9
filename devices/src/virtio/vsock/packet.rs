//! The virtio-vsock packet header, and moving packets between descriptor chains and host
//! buffers.
//!
//! A packet is the 44-byte little-endian `virtio_vsock_hdr` followed by `len` payload bytes.
//! On the TX queue the whole chain is device-readable; on the RX queue device-writable. Header
//! and payload may be split across descriptors anywhere (Linux uses one or two descriptors).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::chain::{check_buffer, Chain, ChainError};

/// Length of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID: the only destination the guest can reach through this device.
pub const HOST_CID: u64 = 2;
/// Largest payload of one packet, both ways. A TX header claiming more is refused before
/// anything is read or allocated.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Length of `struct virtio_vsock_event`: an `le32` event ID.
pub const EVENT_LEN: usize = 4;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the device lost every connection (sent on the event
/// queue after a snapshot is restored); the driver resets its connected sockets and re-reads
/// the guest CID.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or reset.
pub const OP_RST: u16 = 3;
/// No more data will be sent and/or received (see the `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// The sender's `buf_alloc` and `fwd_cnt` changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// The sender asks for a CREDIT_UPDATE.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_hdr`, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// Parses the wire format.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire format.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a TX chain is not a usable packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The chain is malformed: dropped without an answer (its header cannot be trusted).
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The chain is shorter than a header.
    #[error("{0}-byte chain is shorter than a packet header")]
    Short(u64),
    /// An event-queue chain is shorter than an event.
    #[error("{0}-byte chain is shorter than an event")]
    ShortEvent(u64),
    /// The header claims more payload than the chain holds or than [`MAX_PAYLOAD`]: the
    /// sender gets RST.
    #[error("header claims {claimed} payload bytes, the chain holds {held}")]
    BadLen {
        /// The parsed header.
        hdr: Header,
        /// Its `len`.
        claimed: u32,
        /// Payload bytes the chain has room for.
        held: u64,
    },
}

/// Checks the buffers of `chain` (all in guest memory, all `writable` or all not); returns
/// their total length.
fn chain_len(mem: &GuestMemoryMmap<()>, chain: &Chain, writable: bool) -> Result<u64, ChainError> {
    if !chain.complete {
        return Err(ChainError::Unterminated);
    }
    let mut total: u64 = 0;
    for d in &chain.descs {
        check_buffer(mem, d, writable)?;
        total += u64::from(d.len());
    }
    Ok(total)
}

/// Reads a TX packet: the header, then its payload into `buf[HDR_LEN..]`. `buf` must hold
/// `HDR_LEN + MAX_PAYLOAD` bytes; nothing is allocated. Returns the header (its `len` bytes of
/// payload follow the header in `buf`).
pub(crate) fn read_tx(
    mem: &GuestMemoryMmap<()>,
    chain: &Chain,
    buf: &mut [u8],
) -> Result<Header, PacketError> {
    let total = chain_len(mem, chain, false)?;
    if total < HDR_LEN as u64 {
        return Err(PacketError::Short(total));
    }
    let mut raw = [0u8; HDR_LEN];
    read_at(mem, chain, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    let held = total - HDR_LEN as u64;
    let len = hdr.len as usize;
    if u64::from(hdr.len) > held || len > MAX_PAYLOAD || HDR_LEN + len > buf.len() {
        return Err(PacketError::BadLen {
            hdr,
            claimed: hdr.len,
            held,
        });
    }
    read_at(mem, chain, HDR_LEN as u64, &mut buf[HDR_LEN..HDR_LEN + len])?;
    Ok(hdr)
}

/// Checks an RX chain; returns how many payload bytes fit after the header.
pub(crate) fn rx_room(mem: &GuestMemoryMmap<()>, chain: &Chain) -> Result<usize, PacketError> {
    let total = chain_len(mem, chain, true)?;
    if total < HDR_LEN as u64 {
        return Err(PacketError::Short(total));
    }
    Ok((total - HDR_LEN as u64).min(MAX_PAYLOAD as u64) as usize)
}

/// Writes `hdr` and `payload` into an RX chain already checked by [`rx_room`]; returns the
/// used length.
pub(crate) fn write_rx(
    mem: &GuestMemoryMmap<()>,
    chain: &Chain,
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, ChainError> {
    write_at(mem, chain, 0, &hdr.to_bytes())?;
    write_at(mem, chain, HDR_LEN as u64, payload)?;
    Ok((HDR_LEN + payload.len()) as u32)
}

/// Writes a `virtio_vsock_event` with `id` into an event-queue chain (all device-writable, in
/// guest memory, at least [`EVENT_LEN`] bytes); returns the used length.
pub(crate) fn write_event(
    mem: &GuestMemoryMmap<()>,
    chain: &Chain,
    id: u32,
) -> Result<u32, PacketError> {
    let total = chain_len(mem, chain, true)?;
    if total < EVENT_LEN as u64 {
        return Err(PacketError::ShortEvent(total));
    }
    write_at(mem, chain, 0, &id.to_le_bytes())?;
    Ok(EVENT_LEN as u32)
}

/// Where byte `offset` of the chain's buffers is, and how much of that buffer is left.
fn segments(
    chain: &Chain,
    mut offset: u64,
    len: usize,
) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut left = len;
    chain.descs.iter().filter_map(move |d| {
        let dlen = u64::from(d.len());
        if left == 0 {
            return None;
        }
        if offset >= dlen {
            offset -= dlen;
            return None;
        }
        let n = ((dlen - offset) as usize).min(left);
        // The buffer was checked: `addr + len` does not overflow.
        let addr = GuestAddress(d.addr().0 + offset);
        offset = 0;
        left -= n;
        Some((addr, n))
    })
}

fn read_at(
    mem: &GuestMemoryMmap<()>,
    chain: &Chain,
    offset: u64,
    out: &mut [u8],
) -> Result<(), ChainError> {
    let mut done = 0;
    for (addr, n) in segments(chain, offset, out.len()) {
        mem.read_slice(&mut out[done..done + n], addr)
            .map_err(|_| ChainError::OutsideMemory {
                addr: addr.0,
                len: n as u32,
            })?;
        done += n;
    }
    debug_assert_eq!(done, out.len());
    Ok(())
}

fn write_at(
    mem: &GuestMemoryMmap<()>,
    chain: &Chain,
    offset: u64,
    data: &[u8],
) -> Result<(), ChainError> {
    let mut done = 0;
    for (addr, n) in segments(chain, offset, data.len()) {
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| ChainError::OutsideMemory {
                addr: addr.0,
                len: n as u32,
            })?;
        done += n;
    }
    debug_assert_eq!(done, data.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{mem, DescSpec, TestQueue, MEM_SIZE};
    use virtio_queue::QueueOwnedT;

    fn hdr() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 52,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0xa5a5_0001,
            buf_alloc: 65536,
            fwd_cnt: 0xffff_fff0,
        }
    }

    fn first_chain(tq: &TestQueue) -> Chain {
        let mut q = tq.queue();
        let c = q.iter(tq.mem()).unwrap().next().unwrap();
        Chain::collect(c, 16)
    }

    #[test]
    fn header_wire_format() {
        let h = hdr();
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(&b[40..44], &0xffff_fff0u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn tx_header_and_payload_split_anywhere() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        let mut bytes = hdr().to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        // 30 + 17 + 2 bytes: the header and the payload both straddle descriptors.
        tq.write(0x4_0000, &bytes[..30]);
        tq.write(0x5_0000, &bytes[30..47]);
        tq.write(0x6_0000, &bytes[47..]);
        tq.add_chain(
            0,
            &[
                DescSpec::r(0x4_0000, 30),
                DescSpec::r(0x5_0000, 17),
                DescSpec::r(0x6_0000, 2),
            ],
        );
        let mut buf = vec![0u8; HDR_LEN + MAX_PAYLOAD];
        let h = read_tx(&m, &first_chain(&tq), &mut buf).unwrap();
        assert_eq!(h, hdr());
        assert_eq!(&buf[HDR_LEN..HDR_LEN + 5], b"hello");
    }

    #[test]
    fn tx_len_is_checked_against_chain_and_bound() {
        let m = mem();
        let mut buf = vec![0u8; HDR_LEN + MAX_PAYLOAD];
        for (claimed, room) in [
            (6u32, 5u32),
            (u32::MAX, 100),
            (MAX_PAYLOAD as u32 + 1, 70_000),
        ] {
            let tq = TestQueue::new(&m, 16);
            let h = Header {
                len: claimed,
                ..hdr()
            };
            tq.write(0x4_0000, &h.to_bytes());
            tq.add_chain(0, &[DescSpec::r(0x4_0000, HDR_LEN as u32 + room)]);
            match read_tx(&m, &first_chain(&tq), &mut buf) {
                Err(PacketError::BadLen { hdr, .. }) => assert_eq!(hdr.len, claimed),
                other => panic!("len {claimed}: {other:?}"),
            }
        }
    }

    #[test]
    fn tx_broken_chains_are_refused() {
        let m = mem();
        let mut buf = vec![0u8; HDR_LEN + MAX_PAYLOAD];
        let cases: [(&[DescSpec], PacketError); 4] = [
            (&[DescSpec::r(0x4_0000, 43)], PacketError::Short(43)),
            (
                &[DescSpec::r(0x4_0000, 20), DescSpec::w(0x5_0000, 40)],
                PacketError::Chain(ChainError::WrongDirection),
            ),
            (
                &[DescSpec::r(MEM_SIZE - 10, 44)],
                PacketError::Chain(ChainError::OutsideMemory {
                    addr: MEM_SIZE - 10,
                    len: 44,
                }),
            ),
            (
                &[DescSpec::r(u64::MAX - 10, 44)],
                PacketError::Chain(ChainError::OutsideMemory {
                    addr: u64::MAX - 10,
                    len: 44,
                }),
            ),
        ];
        for (specs, want) in cases {
            let tq = TestQueue::new(&m, 16);
            tq.add_chain(0, specs);
            assert_eq!(read_tx(&m, &first_chain(&tq), &mut buf), Err(want));
        }
        let tq = TestQueue::new(&m, 16);
        tq.set_desc(0, 0x4_0000, 44, DescSpec::NEXT, 0);
        tq.publish(&[0]);
        assert_eq!(
            read_tx(&m, &first_chain(&tq), &mut buf),
            Err(PacketError::Chain(ChainError::Unterminated))
        );
    }

    #[test]
    fn rx_room_and_write() {
        let m = mem();
        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[DescSpec::w(0x4_0000, 10), DescSpec::w(0x5_0000, 100)]);
        let c = first_chain(&tq);
        assert_eq!(rx_room(&m, &c), Ok(66));
        assert_eq!(write_rx(&m, &c, &hdr(), b"hello"), Ok(49));
        let mut back = tq.read(0x4_0000, 10);
        back.extend(tq.read(0x5_0000, 39));
        assert_eq!(Header::from_bytes(back[..44].try_into().unwrap()), hdr());
        assert_eq!(&back[44..], b"hello");

        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[DescSpec::w(0x4_0000, 43)]);
        assert_eq!(rx_room(&m, &first_chain(&tq)), Err(PacketError::Short(43)));
        let tq = TestQueue::new(&m, 16);
        tq.add_chain(0, &[DescSpec::r(0x4_0000, 4096)]);
        assert!(rx_room(&m, &first_chain(&tq)).is_err());
    }
}
