//! Virtio devices (block, net, vsock) over the virtio-mmio transport.
//!
//! # Wiring contract
//!
//! Build a device ([`block::Block::new`], [`net::Net::new`]) and wrap it with
//! [`VirtioMmioDevice::new`], giving it the guest memory. The bundle holds everything the VMM
//! must wire:
//!
//! - [`VirtioMmioDevice::transport`] goes on the MMIO bus at `mmio_base`, with a window of
//!   [`MMIO_WINDOW_SIZE`] bytes (it implements [`BusDevice`]). vCPU threads reach it through
//!   MMIO exits; it only touches registers and never runs queue work.
//! - [`VirtioMmioDevice::subscriber`] is added to the VMM's event loop with
//!   `EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>::add_subscriber`. Queue work
//!   (TAP I/O, vsock) happens there, on the event-loop thread, never on a vCPU thread. A block
//!   device is instead built with [`VirtioMmioDevice::new_shared`] and served by a
//!   [`block::worker::BlockWorker`], a thread of its own, so that disk I/O never holds up the
//!   event loop; its subscriber is then left out of the event loop.
//! - [`VirtioMmioDevice::irq_evt`]: register with KVM as an irqfd on the device's GSI. When the
//!   device puts buffers in a used ring it sets bit 0 of InterruptStatus and then writes 1 to this
//!   `EventFd`; a configuration change (or a failure that sets NEEDS_RESET) sets bit 1 first.
//! - [`VirtioMmioDevice::queue_evts`]: one `(EventFd, datamatch)` per queue. Register each with
//!   KVM as an ioeventfd at `mmio_base + QUEUE_NOTIFY_OFFSET` (4 bytes) with `datamatch` = queue
//!   index as `u32`, so guest notifications never leave the kernel. A QueueNotify write that does
//!   reach the transport (no ioeventfd) writes the same `EventFd`, so the device runs either way.
//!
//! The transport and the device are two objects behind two mutexes: a vCPU reading
//! InterruptStatus or acknowledging an interrupt takes only the transport's lock (the interrupt
//! state is shared through atomics in [`Interrupt`]), so it never waits behind disk or network
//! I/O. Only feature negotiation, config-space accesses, activation and reset lock the device.
//!
//! The guest is hostile: any malformed descriptor chain gets an error status (or is returned
//! with a used length of 0), and a broken queue setup puts the device in NEEDS_RESET with a
//! configuration-change interrupt. Nothing the guest writes panics the VMM or reaches memory
//! outside the guest's.
//!
//! # Snapshots
//!
//! A device is saved in two parts: the transport's registers and queue positions
//! ([`MmioTransport::save`], an [`MmioState`]) and what the device itself was built from
//! ([`MmioTransport::save_device`], a [`VirtioDeviceState`]). Save from the event-loop thread,
//! between events, with the vCPUs paused and every block worker paused
//! ([`block::worker::BlockWorker::pause`]): queue work runs under the device's lock, on the
//! event loop or on a paused worker, so no request is half done and none starts until the
//! snapshot is written. [`MmioTransport::save_device`] flushes the device's backend first (the block
//! device `fdatasync`s its image), so the disk files match the memory image.
//!
//! To restore, load the guest memory first, then build a fresh device from its state (for
//! instance [`block::Block::restore`], possibly over a different image, TAP or socket path) and
//! hand it with the [`MmioState`] to [`VirtioMmioDevice::restore`]. The result is wired like a
//! new device. The state is untrusted input: restoring checks it as DRIVER_OK activation checks
//! the driver's registers and returns an [`Error`] for anything the device could not have been
//! in.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod tap;
pub mod vsock;

#[cfg(test)]
mod testing;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, error};
use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[cfg(doc)]
use crate::BusDevice;

pub use mmio::{MmioState, MmioTransport, QueueState};

/// Size of the MMIO window of one virtio-mmio device (registers and config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Offset of the QueueNotify register in the MMIO window: where the VMM puts the ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// InterruptStatus bit: the device used buffers in a queue.
pub const INT_USED_RING: u32 = 1;
/// InterruptStatus bit: the device configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// Errors from building or activating a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An `EventFd` could not be created or cloned.
    #[error("cannot create or clone an eventfd")]
    EventFd(#[source] io::Error),
    /// The driver activated the device with a queue that cannot be used.
    #[error("virtio queue {index} is invalid: {reason}")]
    InvalidQueue {
        /// Index of the queue.
        index: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The device was handed a different number of queues than it has.
    #[error("device expects {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// A required feature was not negotiated.
    #[error("required feature bit {0} was not negotiated")]
    MissingFeature(u32),
    /// A saved state belongs to another kind of device than the one it is restored into.
    #[error("the state is of virtio device type {saved}, the device is of type {device}")]
    DeviceType {
        /// Device type in the state.
        saved: u32,
        /// Device type of the device.
        device: u32,
    },
    /// A saved queue has another maximum size than the device's queue.
    #[error("queue {index} has a maximum size of {device}, the state says {saved}")]
    QueueMaxSize {
        /// Index of the queue.
        index: usize,
        /// Maximum size in the state.
        saved: u16,
        /// Maximum size of the device's queue.
        device: u16,
    },
    /// A saved state has the driver accept features the device does not offer.
    #[error("the state accepts feature bits {0:#x} that the device does not offer")]
    UnofferedFeatures(u64),
    /// A saved state is one the device could not have been in.
    #[error("invalid device state: {0}")]
    InvalidState(&'static str),
    /// The device's backend could not be flushed before saving.
    #[error("cannot flush the device's backend")]
    Sync(#[source] io::Error),
}

/// Interrupt state of one device, shared by the transport (vCPU side) and the device (event loop).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    evt: EventFd,
}

impl Interrupt {
    /// New interrupt state with its own non-blocking `EventFd`.
    pub fn new() -> Result<Self, Error> {
        Ok(Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?,
        })
    }

    /// The `EventFd` written on each interrupt (the VMM's irqfd).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// True once the device has failed and must be reset by the driver.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus bit 0 (used buffers) and raises the interrupt.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Sets InterruptStatus bit 1 (configuration change) and raises the interrupt.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    /// Marks the device as needing a reset (status bit NEEDS_RESET) and tells the driver with a
    /// configuration-change interrupt.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.signal_config();
        }
    }

    /// The driver acknowledges the bits in `mask` (InterruptACK).
    pub fn ack(&self, mask: u32) {
        self.status.fetch_and(!mask, Ordering::SeqCst);
    }

    /// Clears all interrupt state (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Restores saved interrupt state, and raises the interrupt again if any status bit is set:
    /// irqfd interrupts are edge-triggered, so a pending one would otherwise never reach the
    /// guest.
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
        if status != 0 {
            self.raise(status);
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            debug!("virtio: cannot signal interrupt: {e}");
        }
    }
}

/// A virtio device as seen by the transport.
///
/// Implementors also implement [`MutEventSubscriber`]: they watch their queue `EventFd`s (and
/// their backend) and do all queue work from the event loop.
pub trait VirtioDevice: Send {
    /// What the device keeps the way every device does (see [`DeviceBase`]); the accessors
    /// below read it from there.
    fn base(&self) -> &DeviceBase;

    /// Virtio device ID (1 = network, 2 = block, 19 = vsock).
    fn device_type(&self) -> u32 {
        self.base().device_type
    }

    /// Feature bits the device offers.
    fn features(&self) -> u64 {
        self.base().features
    }

    /// Maximum size of each queue, one entry per queue.
    fn queue_max_sizes(&self) -> &[u16] {
        &self.base().queue_max_sizes
    }

    /// Device configuration space, as read by the driver at offset 0x100 of the window.
    fn config(&self) -> &[u8] {
        &self.base().config
    }

    /// The driver writes `data` at `offset` of the config space (already bounds-checked).
    /// Ignored by default: the config fields of our devices are read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "virtio: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    /// The driver set DRIVER_OK: start using `queues` (validated against `mem` by the transport,
    /// one per entry of [`VirtioDevice::queue_max_sizes`]) with the negotiated `features`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), Error>;

    /// The driver reset the device: drop the queues and the memory.
    fn reset(&mut self);

    /// What the device was built from, for a snapshot (the transport saves the queues).
    fn state(&self) -> VirtioDeviceState;

    /// Makes what the guest wrote durable in the backend, before a snapshot. Nothing to do by
    /// default.
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Interrupt state shared with the transport.
    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.base().interrupt
    }

    /// One notification `EventFd` per queue.
    fn queue_events(&self) -> &[EventFd] {
        &self.base().queue_evts
    }
}

/// What every virtio device keeps the same way: what it offers the driver (type, features,
/// config space, queue sizes), one notification `EventFd` per queue, the interrupt state it
/// shares with the transport, and, from DRIVER_OK until a reset or a failure, its queues and the
/// guest memory.
pub struct DeviceBase {
    pub(crate) device_type: u32,
    pub(crate) features: u64,
    pub(crate) config: Vec<u8>,
    pub(crate) queue_max_sizes: Vec<u16>,
    pub(crate) queue_evts: Vec<EventFd>,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) active: Option<Active>,
}

impl DeviceBase {
    /// A device of `device_type` offering `features` and `config`, with one queue per entry of
    /// `queue_max_sizes`.
    pub(crate) fn new(
        device_type: u32,
        features: u64,
        config: Vec<u8>,
        queue_max_sizes: Vec<u16>,
    ) -> Result<Self, Error> {
        Ok(Self {
            device_type,
            features,
            config,
            queue_evts: queue_eventfds(queue_max_sizes.len())?,
            queue_max_sizes,
            interrupt: Arc::new(Interrupt::new()?),
            active: None,
        })
    }

    /// DRIVER_OK: checks the queues and VERSION_1, then keeps the queues and `mem`.
    pub(crate) fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
        queues: Vec<Queue>,
        features: u64,
    ) -> Result<(), Error> {
        check_activation(&queues, self.queue_max_sizes.len(), features)?;
        self.active = Some(Active { mem, queues });
        Ok(())
    }

    /// Has the event loop look at queue `index` again, as if the driver had notified it.
    pub(crate) fn kick(&self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.write(1);
        }
    }

    /// The driver broke a queue: stop using the queues until it resets the device, and tell it
    /// so (NEEDS_RESET with a configuration-change interrupt).
    pub(crate) fn fail(&mut self) {
        self.active = None;
        self.interrupt.set_needs_reset();
    }

    /// Adds every queue's notification `EventFd` to the event loop, with the queue index as its
    /// data.
    pub(crate) fn watch_queues(&self, ops: &mut EventOps, device: &str) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                error!("{device}: cannot watch queue {i}: {e}");
            }
        }
    }
}

/// The saved state of one virtio device, by kind: what it was built from. Queue positions and
/// negotiated features are in the transport's [`MmioState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    /// A block device.
    Block(block::BlockState),
    /// A network device.
    Net(net::NetState),
    /// A vsock device.
    Vsock(vsock::VsockState),
}

/// Queues and memory of an activated device.
#[derive(Debug)]
pub(crate) struct Active {
    pub mem: GuestMemoryMmap<()>,
    pub queues: Vec<Queue>,
}

/// Creates `n` non-blocking queue notification `EventFd`s.
pub(crate) fn queue_eventfds(n: usize) -> Result<Vec<EventFd>, Error> {
    (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd))
        .collect()
}

/// Checks the queues handed to [`VirtioDevice::activate`] and the VERSION_1 feature.
pub(crate) fn check_activation(
    queues: &[Queue],
    expected: usize,
    features: u64,
) -> Result<(), Error> {
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    if queues.len() != expected {
        return Err(Error::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    if features & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(Error::MissingFeature(VIRTIO_F_VERSION_1));
    }
    Ok(())
}

/// A virtio device on virtio-mmio, ready for the VMM to wire (see the module docs).
pub struct VirtioMmioDevice {
    /// Register window: put on the MMIO bus at the device's base, [`MMIO_WINDOW_SIZE`] long.
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Queue and backend processing: add to the event manager.
    pub subscriber: Arc<Mutex<dyn MutEventSubscriber + Send>>,
    /// Per queue, the notification `EventFd` and its datamatch (the queue index): register each
    /// as a KVM ioeventfd at `base + QUEUE_NOTIFY_OFFSET`, 4 bytes.
    pub queue_evts: Vec<(EventFd, u32)>,
    /// The interrupt `EventFd`: register as a KVM irqfd on the device's GSI.
    pub irq_evt: EventFd,
}

impl VirtioMmioDevice {
    /// Puts `device` behind a virtio-mmio transport over guest memory `mem`.
    pub fn new<D>(device: D, mem: GuestMemoryMmap<()>) -> Result<Self, Error>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        Self::new_shared(Arc::new(Mutex::new(device)), mem)
    }

    /// [`VirtioMmioDevice::new`] for a device the caller keeps a handle on: a block device
    /// served by its own [`block::worker::BlockWorker`] rather than by the event loop.
    pub fn new_shared<D>(device: Arc<Mutex<D>>, mem: GuestMemoryMmap<()>) -> Result<Self, Error>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        Self::build(device, |device| MmioTransport::new(device, mem))
    }

    /// Puts a freshly built `device` behind a transport restored from `state` (see
    /// [`MmioTransport::restore`]): when the saved device was active, its queues are rebuilt,
    /// checked and handed to the device at their saved positions, with no register write from
    /// the guest. Wire the result like a new device.
    ///
    /// `mem` must already hold the snapshot's guest memory. A state the device could not have
    /// been in (queues outside `mem`, bad sizes, another queue count, unoffered features, ...)
    /// is an error, and `device` is dropped.
    pub fn restore<D>(device: D, mem: GuestMemoryMmap<()>, state: &MmioState) -> Result<Self, Error>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        Self::restore_shared(Arc::new(Mutex::new(device)), mem, state)
    }

    /// [`VirtioMmioDevice::restore`] for a device the caller keeps a handle on (see
    /// [`VirtioMmioDevice::new_shared`]).
    pub fn restore_shared<D>(
        device: Arc<Mutex<D>>,
        mem: GuestMemoryMmap<()>,
        state: &MmioState,
    ) -> Result<Self, Error>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        Self::build(device, |device| MmioTransport::restore(device, mem, state))
    }

    fn build<D>(
        device: Arc<Mutex<D>>,
        transport: impl FnOnce(Arc<Mutex<dyn VirtioDevice>>) -> Result<MmioTransport, Error>,
    ) -> Result<Self, Error>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        let (queue_evts, irq_evt) = {
            let device = crate::sync::lock(&device);
            let queue_evts = device
                .queue_events()
                .iter()
                .enumerate()
                .map(|(i, evt)| Ok((evt.try_clone().map_err(Error::EventFd)?, i as u32)))
                .collect::<Result<Vec<_>, Error>>()?;
            let irq_evt = device
                .interrupt()
                .eventfd()
                .try_clone()
                .map_err(Error::EventFd)?;
            (queue_evts, irq_evt)
        };
        let transport = transport(device.clone())?;
        Ok(Self {
            transport: Arc::new(Mutex::new(transport)),
            subscriber: device,
            queue_evts,
            irq_evt,
        })
    }
}
