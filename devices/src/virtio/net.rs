//! virtio-net over a TAP interface (or any [`NetBackend`] that keeps frame boundaries).
//!
//! Queue 0 receives (host to guest), queue 1 transmits. Every frame carries the 12-byte
//! `virtio_net_hdr_v1` in front, which the TAP understands as is, so frames pass through
//! unchanged. No checksum or segmentation offloads are offered, so the header stays trivial.
//!
//! RX: when the backend is readable and the guest has a receive buffer, one frame is read into
//! a bounce buffer and copied into the buffer's device-writable descriptors. A frame that does
//! not fit is dropped and the buffer reused. With no buffer free the frame waits, and the
//! backend is not read again until the guest adds buffers (its RX notification resumes
//! reading); the backend fd is watched edge-triggered, so a full RX queue costs no CPU.
//!
//! TX: each chain's device-readable buffers are gathered and written to the backend in one
//! `write`. Frames longer than [`MAX_FRAME_LEN`] or chains with writable buffers are dropped;
//! the chain is returned to the guest either way.
//!
//! Snapshots: [`Net::save`] keeps the TAP name and the MAC address as a [`NetState`];
//! [`Net::restore`] opens a TAP (the same name or another) and shows the guest the same device.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::chain::{check_buffer, Chain, ChainError};
use super::tap::{Tap, TapError, VNET_HDR_LEN};
use super::{DeviceBase, VirtioDevice, VirtioDeviceState};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Largest frame moved, virtio-net header included: 12 + 65550 bytes.
pub const MAX_FRAME_LEN: usize = 65562;
/// Event data of the backend fd (queues use their index).
const BACKEND_EVENT: u32 = 2;
/// Frames or chains handled per call before yielding to the rest of the event loop.
const BUDGET: usize = 256;

/// Where frames come from and go to. Each `recv` returns one frame and each `send` takes one,
/// virtio-net header included; both are non-blocking.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn send(&mut self, buf: &[u8]) -> io::Result<usize>;
}

/// A datagram socket as a backend (each datagram is a frame): for tests, or to connect two
/// VMs. Set it non-blocking first.
impl NetBackend for UnixDatagram {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        UnixDatagram::recv(self, buf)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        UnixDatagram::send(self, buf)
    }
}

/// Errors from creating a network device, or about one frame.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP interface could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The virtio plumbing (eventfds) could not be set up.
    #[error("cannot set up virtio-net")]
    Virtio(#[from] super::Error),
    /// A descriptor chain is malformed.
    #[error("bad descriptor chain")]
    Chain(#[from] ChainError),
    /// A transmitted frame is longer than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is too large")]
    FrameTooLarge(u64),
    /// A received frame does not fit the guest's buffer.
    #[error("frame of {frame} bytes does not fit a {capacity}-byte receive buffer")]
    BufferTooSmall {
        /// Frame length.
        frame: usize,
        /// Buffer length.
        capacity: u64,
    },
}

/// The saved state of a network device: what it was built with.
///
/// Frames in flight are not saved, as on a real network: a frame read from the TAP and waiting
/// for a receive buffer is lost, and so are frames queued in the host's TAP. Transmission is
/// synchronous (each frame is written to the backend within the event that took it), so no
/// outgoing frame is held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Name of the TAP interface when saved, if the backend was one (the restored device may
    /// use another).
    pub tap_name: Option<String>,
    /// The MAC address given to the guest, if any.
    pub mac: Option<[u8; 6]>,
}

/// A virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    tap_name: Option<String>,
    mac: Option<[u8; 6]>,
    base: DeviceBase,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the backend and not yet delivered.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
}

impl Net {
    /// Opens the TAP interface `tap_name` (created if it does not exist) as the backend.
    ///
    /// With `mac`, the guest is told its MAC address; without, the guest picks one.
    pub fn new(tap_name: &str, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name)?;
        let name = tap.name().to_owned();
        let mut net = Self::with_backend(Box::new(tap), mac)?;
        net.tap_name = Some(name);
        Ok(net)
    }

    /// A device over any non-blocking, frame-preserving backend.
    pub fn with_backend(
        backend: Box<dyn NetBackend>,
        mac: Option<[u8; 6]>,
    ) -> Result<Self, NetError> {
        let mut features = (1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_STATUS);
        // virtio_net_config: mac[6], then status (u16).
        let mut config = vec![0u8; 8];
        if let Some(mac) = mac {
            features |= 1 << VIRTIO_NET_F_MAC;
            config[..6].copy_from_slice(&mac);
        }
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Self {
            backend,
            tap_name: None,
            mac,
            base: DeviceBase::new(VIRTIO_ID_NET, features, config, vec![QUEUE_SIZE; 2])?,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME_LEN],
        })
    }

    /// A device over the TAP interface `tap_name` (the snapshot's or another) that shows the
    /// guest the device saved in `state`.
    pub fn restore(tap_name: &str, state: &NetState) -> Result<Self, NetError> {
        Self::new(tap_name, state.mac)
    }

    /// A device over `backend` that shows the guest the device saved in `state`.
    pub fn restore_with_backend(
        backend: Box<dyn NetBackend>,
        state: &NetState,
    ) -> Result<Self, NetError> {
        Self::with_backend(backend, state.mac)
    }

    /// What the device was built with, for a snapshot.
    pub fn save(&self) -> NetState {
        NetState {
            tap_name: self.tap_name.clone(),
            mac: self.mac,
        }
    }

    /// Name of the TAP interface, when the backend is one.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap_name.as_deref()
    }

    /// Moves frames from the backend into the guest's receive buffers, until the backend has no
    /// more, the guest has no free buffer, or the budget is spent (then it re-signals its RX
    /// `EventFd` to come back). Does nothing before activation.
    pub fn process_rx(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let q = &mut active.queues[RX_QUEUE];
        let max_chain = usize::from(q.size());
        let mut used = 0;
        let mut broken = false;
        let mut spent = true;
        for _ in 0..BUDGET {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.recv(&mut self.rx_buf) {
                    Ok(len) if len < VNET_HDR_LEN => {
                        debug!("virtio-net: dropped a {len}-byte frame from the backend");
                        continue;
                    }
                    Ok(len) => {
                        // num_buffers: always one buffer per frame (no mergeable buffers).
                        self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                        self.rx_pending = Some(len);
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        spent = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("virtio-net: backend read failed: {e}");
                        spent = false;
                        break;
                    }
                },
            };
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    debug!("virtio-net: bad RX available ring: {e}");
                    broken = true;
                    break;
                }
            };
            let Some(chain) = chain else {
                // No buffer: the frame waits for the guest's next RX notification.
                spent = false;
                break;
            };
            let chain = Chain::collect(chain, max_chain);
            let written = match write_frame(mem, &chain, &self.rx_buf[..len]) {
                Ok(n) => {
                    self.rx_pending = None;
                    n
                }
                Err(e @ NetError::BufferTooSmall { .. }) => {
                    debug!("virtio-net: RX frame dropped: {e}");
                    self.rx_pending = None;
                    q.go_to_previous_position();
                    continue;
                }
                Err(e) => {
                    debug!("virtio-net: RX buffer returned unused: {e}");
                    0
                }
            };
            if let Err(e) = q.add_used(mem, chain.head, written) {
                debug!(
                    "virtio-net: cannot return RX descriptor {}: {e}",
                    chain.head
                );
                broken = true;
                break;
            }
            used += 1;
        }
        if used > 0 && !matches!(q.needs_notification(mem), Ok(false)) {
            self.base.interrupt.signal_used();
        }
        if spent {
            self.base.kick(RX_QUEUE);
        }
        if broken {
            self.break_device();
        }
    }

    /// Sends the frames the guest queued for transmission (at most the budget per call; then it
    /// re-signals its TX `EventFd`). Does nothing before activation.
    pub fn process_tx(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let q = &mut active.queues[TX_QUEUE];
        let max_chain = usize::from(q.size());
        let mut handled = 0;
        let mut broken = false;
        while handled < BUDGET {
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    debug!("virtio-net: bad TX available ring: {e}");
                    broken = true;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let chain = Chain::collect(chain, max_chain);
            match read_frame(mem, &chain, &mut self.tx_buf) {
                Ok(len) => {
                    if let Err(e) = self.backend.send(&self.tx_buf[..len]) {
                        debug!("virtio-net: TX frame dropped by the backend: {e}");
                    }
                }
                Err(e) => debug!("virtio-net: TX frame dropped: {e}"),
            }
            if let Err(e) = q.add_used(mem, chain.head, 0) {
                debug!(
                    "virtio-net: cannot return TX descriptor {}: {e}",
                    chain.head
                );
                broken = true;
                break;
            }
            handled += 1;
        }
        if handled > 0 && !matches!(q.needs_notification(mem), Ok(false)) {
            self.base.interrupt.signal_used();
        }
        if handled == BUDGET {
            self.base.kick(TX_QUEUE);
        }
        if broken {
            self.break_device();
        }
    }

    /// The driver broke a queue: stop using the queues until it resets the device.
    fn break_device(&mut self) {
        self.rx_pending = None;
        self.base.fail();
    }
}

/// Copies `frame` into the device-writable buffers of `chain`; returns the bytes written.
fn write_frame(mem: &GuestMemoryMmap<()>, chain: &Chain, frame: &[u8]) -> Result<u32, NetError> {
    if !chain.complete {
        return Err(ChainError::Unterminated.into());
    }
    let mut capacity: u64 = 0;
    for d in &chain.descs {
        check_buffer(mem, d, true)?;
        capacity += u64::from(d.len());
    }
    if frame.len() as u64 > capacity {
        return Err(NetError::BufferTooSmall {
            frame: frame.len(),
            capacity,
        });
    }
    let mut left = frame;
    for d in &chain.descs {
        if left.is_empty() {
            break;
        }
        let n = left.len().min(d.len() as usize);
        mem.write_slice(&left[..n], d.addr())
            .map_err(|_| ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            })?;
        left = &left[n..];
    }
    Ok(frame.len() as u32)
}

/// Gathers the device-readable buffers of `chain` into `buf`; returns the frame length.
fn read_frame(mem: &GuestMemoryMmap<()>, chain: &Chain, buf: &mut [u8]) -> Result<usize, NetError> {
    if !chain.complete {
        return Err(ChainError::Unterminated.into());
    }
    let mut total: u64 = 0;
    for d in &chain.descs {
        check_buffer(mem, d, false)?;
        total += u64::from(d.len());
    }
    if total > buf.len() as u64 {
        return Err(NetError::FrameTooLarge(total));
    }
    let mut pos = 0;
    for d in &chain.descs {
        let n = d.len() as usize;
        mem.read_slice(&mut buf[pos..pos + n], d.addr())
            .map_err(|_| ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            })?;
        pos += n;
    }
    Ok(pos)
}

impl VirtioDevice for Net {
    fn base(&self) -> &DeviceBase {
        &self.base
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), super::Error> {
        self.base.activate(mem, queues, features)?;
        // Frames may have waited in the backend: have the event loop look.
        self.base.kick(RX_QUEUE);
        Ok(())
    }

    fn reset(&mut self) {
        self.base.active = None;
        self.rx_pending = None;
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.save())
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.base.watch_queues(ops, "virtio-net");
        // Edge-triggered: a backend that stays readable while the guest has no RX buffer does
        // not wake the loop again; the RX notification resumes reading.
        let backend = Events::with_data_raw(
            self.backend.as_raw_fd(),
            BACKEND_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(backend) {
            error!("virtio-net: cannot watch the backend: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            BACKEND_EVENT => {
                if events
                    .event_set()
                    .intersects(EventSet::ERROR | EventSet::HANG_UP)
                {
                    warn!("virtio-net: backend reports an error or hang-up");
                }
                self.process_rx();
            }
            i => match self.base.queue_evts.get(i as usize) {
                Some(evt) => {
                    let _ = evt.read();
                    if i as usize == RX_QUEUE {
                        self.process_rx();
                    } else {
                        self.process_tx();
                    }
                }
                None => debug!("virtio-net: event for unknown source {i}"),
            },
        }
    }
}

#[cfg(test)]
mod tests;
