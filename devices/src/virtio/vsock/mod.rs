//! virtio-vsock, with the host side as Unix sockets in Firecracker's convention.
//!
//! Queues: 0 receives (device to guest), 1 transmits, 2 carries events (only the transport
//! reset sent after a restore). The config space is the guest's CID (`le64`). Only stream
//! sockets are offered (no SEQPACKET feature); other socket types get RST.
//!
//! Host side: a process connects to the Unix socket given to [`Vsock::new`] and
//! writes `CONNECT <port>\n` to reach guest port `port`, then reads `OK <host port>\n` once the
//! guest accepted; the guest reaching host port P connects to the Unix socket `<path>_P`. This
//! is what Firecracker does, so its tooling works unchanged.
//!
//! TX: each chain is one packet, all device-readable: the 44-byte header, then `len` payload
//! bytes. A chain that is malformed (wrong direction, outside memory, no end, shorter than a
//! header) is returned unanswered. A header whose `len` exceeds the chain or [`MAX_PAYLOAD`] is
//! refused before any payload is read (nothing is ever allocated for it) and answered with RST,
//! as are packets to other CIDs, other socket types, unknown operations and connections that do
//! not exist. Packets with a source CID other than the guest's are dropped.
//!
//! RX: each chain (all device-writable, room for at least a header) gets one packet: RSTs first,
//! then each connection in turn. Data read from a host stream never exceeds the guest's credit
//! or the buffer. With no RX buffer, packets wait and host streams are not read.
//!
//! Flow control toward the host: the guest's data is written to the host stream at once; what
//! does not fit waits in a per-connection buffer of [`BUF_ALLOC`] bytes, which is the credit the
//! guest is given, so a guest that overruns it is reset. All streams are non-blocking and all
//! work runs on the event loop.
//!
//! Limits: at most [`MAX_CONNECTIONS`] connections (host ones past it are closed at once, guest
//! ones get RST); a host-initiated REQUEST waits [`REQUEST_TIMEOUT`] for the guest's answer; a
//! connection closing on one side is reset after [`SHUTDOWN_TIMEOUT`] if the other side does not
//! finish.
//!
//! Snapshots: host connections are not saved (their host sockets are not part of a snapshot).
//! [`Vsock::restore`] starts with no connection and, once active, sends the guest a
//! `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (as soon as the guest has an event
//! buffer there), so that the driver drops its stale connections; listening sockets stay, and
//! new connections work as before, once the driver has handled the reset (host connections
//! wait for that, see [`Vsock::restore`]).
//!
//! Wiring is that of every virtio device here:
//! `VirtioMmioDevice::new(Vsock::new(cid, "/run/vm.vsock")?, mem)`, then the transport on the
//! MMIO bus, the subscriber on the event loop, the queue eventfds as ioeventfds and the irq
//! eventfd as an irqfd (see [`super`]).

mod connection;
mod muxer;
pub mod packet;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::Chain;
use super::{DeviceBase, VirtioDevice, VirtioDeviceState};
use muxer::Muxer;
use packet::{PacketError, EVENT_TRANSPORT_RESET, HDR_LEN};

pub use connection::BUF_ALLOC;
pub use muxer::{FIRST_LOCAL_PORT, MAX_CONNECTIONS, REQUEST_TIMEOUT, SHUTDOWN_TIMEOUT};
pub use packet::{HOST_CID, MAX_PAYLOAD};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// Event data of the host side's epoll fd (queues use their index).
const BACKEND_EVENT: u32 = 3;
/// Packets handled per call before yielding to the rest of the event loop.
const BUDGET: usize = 256;
/// How long a restored device keeps host connections waiting for the driver to handle its
/// transport reset (see [`Vsock::restore`]), at most: a driver that never hands the event
/// buffer back still gets them then.
pub const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0, 1, 2, `u32::MAX`) or does not fit 32 bits.
    #[error("guest CID {0} is reserved or out of range (3 to 4294967294)")]
    InvalidCid(u64),
    /// A stale socket file could not be removed.
    #[error("cannot remove stale vsock socket {}", path.display())]
    RemoveStale {
        /// Path of the socket.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The listening socket could not be bound.
    #[error("cannot bind vsock socket {}", path.display())]
    Bind {
        /// Path of the socket.
        path: PathBuf,
        /// OS error.
        source: io::Error,
    },
    /// The epoll set or timer of the host side could not be set up.
    #[error("cannot set up the vsock event loop")]
    Epoll(#[source] io::Error),
    /// The virtio plumbing (eventfds) could not be set up.
    #[error("cannot set up virtio-vsock")]
    Virtio(#[from] super::Error),
}

/// The saved state of a vsock device: what it was built with.
///
/// Connections are not saved: their host streams, the data buffered for them and answers
/// waiting for RX buffers are lost. The restored device tells the guest with a transport reset
/// (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Path of the listening Unix socket when saved (the restored device may use another).
    pub uds_path: PathBuf,
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    base: DeviceBase,
    /// One packet, header and payload, on its way in or out.
    bounce: Vec<u8>,
    /// TX stopped because answers wait for RX buffers.
    tx_stalled: bool,
    /// A transport reset is owed to the guest (restored device): sent on the event queue once
    /// active and given a buffer.
    reset_pending: bool,
    /// The transport reset went out and the driver has not handled it yet: it notifies the
    /// event queue when it has (it gives the event buffer back).
    reset_unacked: bool,
}

impl Vsock {
    /// A device for a guest with CID `guest_cid`, listening on the Unix socket `uds_path` for
    /// host connections (a stale socket file there is replaced; the file is removed on drop).
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let muxer = Muxer::new(guest_cid, uds_path.into())?;
        Ok(Self {
            guest_cid,
            muxer,
            base: DeviceBase::new(
                VIRTIO_ID_VSOCK,
                1u64 << VIRTIO_F_VERSION_1,
                guest_cid.to_le_bytes().to_vec(),
                vec![QUEUE_SIZE; 3],
            )?,
            bounce: vec![0; HDR_LEN + MAX_PAYLOAD],
            tx_stalled: false,
            reset_pending: false,
            reset_unacked: false,
        })
    }

    /// A device for the guest saved in `state`, listening on `uds_path` (the snapshot's or
    /// another), with no connection. Once active it sends the guest a transport reset on the
    /// event queue, so that the driver drops the connections the snapshot had.
    ///
    /// Host connections wait (in the listening socket's backlog) until the driver has handled
    /// that reset, which it tells by notifying the event queue as it gives the buffer back, or
    /// for [`RESET_ACK_TIMEOUT`] at most. The Linux driver drops every connected socket when it
    /// handles the reset, without a word to the device; a host connection it took before (its
    /// RX and event work run in either order) would be dropped with them, and the host would
    /// wait forever for an answer on it.
    pub fn restore(uds_path: impl Into<PathBuf>, state: &VsockState) -> Result<Self, VsockError> {
        let mut dev = Self::new(state.guest_cid, uds_path)?;
        dev.reset_pending = true;
        dev.muxer.pause_listener(RESET_ACK_TIMEOUT);
        dev.muxer.sync();
        Ok(dev)
    }

    /// What the device was built with, for a snapshot.
    pub fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path().to_owned(),
        }
    }

    /// True while a transport reset waits to be sent to the guest.
    pub fn reset_pending(&self) -> bool {
        self.reset_pending
    }

    /// Sends the guest a pending transport reset, if the event queue has a buffer for it (else
    /// it waits for the next event-queue notification). A buffer that cannot hold the event is
    /// returned unused and the next one tried. Does nothing before activation.
    pub fn process_event_queue(&mut self) {
        if !self.reset_pending {
            return;
        }
        let Some(active) = self.base.active.as_mut() else {
            return;
        };
        let mem = &active.mem;
        let q = &mut active.queues[EVENT_QUEUE];
        let max_chain = usize::from(q.size());
        let mut used = 0;
        let mut broken = false;
        // Each pass takes a buffer, so the queue size bounds the loop.
        for _ in 0..max_chain {
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    debug!("virtio-vsock: bad event available ring: {e}");
                    broken = true;
                    break;
                }
            };
            let Some(chain) = chain else {
                debug!("virtio-vsock: no event buffer for the transport reset yet");
                break;
            };
            let chain = Chain::collect(chain, max_chain);
            let len = packet::write_event(mem, &chain, EVENT_TRANSPORT_RESET).unwrap_or_else(|e| {
                debug!("virtio-vsock: event buffer returned unused: {e}");
                0
            });
            if let Err(e) = q.add_used(mem, chain.head, len) {
                debug!(
                    "virtio-vsock: cannot return event descriptor {}: {e}",
                    chain.head
                );
                broken = true;
                break;
            }
            used += 1;
            if len > 0 {
                self.reset_pending = false;
                self.reset_unacked = true;
                break;
            }
        }
        if used > 0 && !matches!(q.needs_notification(mem), Ok(false)) {
            self.base.interrupt.signal_used();
        }
        if broken {
            self.break_device();
        }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Path of the listening Unix socket.
    pub fn uds_path(&self) -> &Path {
        self.muxer.uds_path()
    }

    /// Open connections (any state, host handshakes included).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Handles what the host side reports (new connections, readable or writable streams,
    /// timeouts), then fills RX buffers with what is ready.
    pub fn process_host(&mut self) {
        self.muxer.process_events();
        self.process_rx();
    }

    /// Fills the guest's receive buffers with waiting packets, until none is left, the guest
    /// has no free buffer, or the budget is spent (then it re-signals its RX `EventFd`). Does
    /// nothing before activation.
    pub fn process_rx(&mut self) {
        let Some(active) = self.base.active.as_mut() else {
            self.muxer.sync();
            return;
        };
        let mem = &active.mem;
        let q = &mut active.queues[RX_QUEUE];
        let max_chain = usize::from(q.size());
        let mut used = 0;
        let mut broken = false;
        let mut starved = false;
        let mut spent = true;
        for _ in 0..BUDGET {
            if !self.muxer.has_rx() {
                spent = false;
                break;
            }
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    debug!("virtio-vsock: bad RX available ring: {e}");
                    broken = true;
                    break;
                }
            };
            let Some(chain) = chain else {
                starved = true;
                spent = false;
                break;
            };
            let chain = Chain::collect(chain, max_chain);
            let len = match packet::rx_room(mem, &chain) {
                Ok(room) => match self.muxer.next_rx(&mut self.bounce[..room]) {
                    Some((hdr, n)) => packet::write_rx(mem, &chain, &hdr, &self.bounce[..n])
                        .unwrap_or_else(|e| {
                            debug!("virtio-vsock: RX packet lost: {e}");
                            0
                        }),
                    None if self.muxer.has_rx() => {
                        // Only data waits, and the buffer has no room past the header: return
                        // it rather than keep it at the head of the queue forever.
                        debug!("virtio-vsock: RX buffer without room for data returned unused");
                        0
                    }
                    None => {
                        // Nothing could be sent after all: keep the buffer.
                        q.go_to_previous_position();
                        spent = false;
                        break;
                    }
                },
                Err(e) => {
                    debug!("virtio-vsock: RX buffer returned unused: {e}");
                    0
                }
            };
            if let Err(e) = q.add_used(mem, chain.head, len) {
                debug!(
                    "virtio-vsock: cannot return RX descriptor {}: {e}",
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
        if self.tx_stalled && !self.muxer.rx_full() {
            self.tx_stalled = false;
            self.base.kick(TX_QUEUE);
        }
        self.muxer.set_rx_starved(starved);
        if broken {
            self.break_device();
        }
        self.muxer.sync();
    }

    /// Handles the packets the guest queued for transmission (at most the budget per call; then
    /// it re-signals its TX `EventFd`), then sends the guest what they produced. Does nothing
    /// before activation.
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
            if self.muxer.rx_full() {
                // Answers wait for RX buffers; TX resumes once they are sent.
                self.tx_stalled = true;
                break;
            }
            let chain = match q.iter(mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    debug!("virtio-vsock: bad TX available ring: {e}");
                    broken = true;
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let chain = Chain::collect(chain, max_chain);
            match packet::read_tx(mem, &chain, &mut self.bounce) {
                Ok(hdr) => {
                    let payload = &self.bounce[HDR_LEN..HDR_LEN + hdr.len as usize];
                    self.muxer.handle_guest_packet(&hdr, payload);
                }
                Err(PacketError::BadLen { hdr, claimed, held }) => {
                    debug!(
                        "virtio-vsock: TX packet claims {claimed} payload bytes, has {held}: reset"
                    );
                    self.muxer.reject(&hdr);
                }
                Err(e) => debug!("virtio-vsock: TX packet dropped: {e}"),
            }
            if let Err(e) = q.add_used(mem, chain.head, 0) {
                debug!(
                    "virtio-vsock: cannot return TX descriptor {}: {e}",
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
            self.muxer.sync();
            return;
        }
        self.process_rx();
    }

    /// The driver broke a queue: stop using the queues until it resets the device.
    fn break_device(&mut self) {
        self.tx_stalled = false;
        self.muxer.reset();
        self.base.fail();
    }
}

impl VirtioDevice for Vsock {
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
        // Host connections may have come in before: have the event loop send their requests.
        self.base.kick(RX_QUEUE);
        Ok(())
    }

    fn reset(&mut self) {
        self.base.active = None;
        self.tx_stalled = false;
        // The driver starts over: it has no connection left to drop.
        self.reset_pending = false;
        self.reset_unacked = false;
        self.muxer.reset();
        self.muxer.resume_listener();
        self.muxer.sync();
    }

    fn state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(self.save())
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.base.watch_queues(ops, "virtio-vsock");
        let backend = Events::with_data_raw(self.muxer.epoll_fd(), BACKEND_EVENT, EventSet::IN);
        if let Err(e) = ops.add(backend) {
            error!("virtio-vsock: cannot watch the host side: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            BACKEND_EVENT => self.process_host(),
            i => match self.base.queue_evts.get(i as usize) {
                Some(evt) => {
                    let _ = evt.read();
                    match i as usize {
                        RX_QUEUE => self.process_rx(),
                        TX_QUEUE => self.process_tx(),
                        _ => {
                            // The driver notifies the event queue after handling the events
                            // it was given: the reset is done, host connections may come.
                            if std::mem::take(&mut self.reset_unacked) {
                                self.muxer.resume_listener();
                                self.muxer.sync();
                            }
                            self.process_event_queue();
                        }
                    }
                }
                None => debug!("virtio-vsock: event for unknown source {i}"),
            },
        }
    }
}

#[cfg(test)]
mod tests;
