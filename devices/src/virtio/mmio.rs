//! The virtio-mmio transport, version 2 ("modern") register layout.
//!
//! Registers are 32-bit: any other access size reads as 0 and is ignored on write. The device
//! config space starts at 0x100 and takes 1, 2, 4 or 8-byte accesses within its bounds.
//!
//! For snapshots the transport saves its registers, the positions of the live queues and the
//! interrupt state as an [`MmioState`], and is rebuilt from one by [`MmioTransport::restore`].

use std::sync::{Arc, Mutex};

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::chain::check_range;
use super::{Error, Interrupt, VirtioDevice, VirtioDeviceState, INT_CONFIG, INT_USED_RING};
use crate::bus::{lock, BusDevice};

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The modern virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver: "LOFT" in ASCII.
pub const VENDOR_ID: u32 = 0x4c4f_4654;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device config space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// Queue registers as the driver wrote them; turned into a [`Queue`] and checked on DRIVER_OK.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    max_size: u16,
    size: u32,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    /// The registers as saved, with the positions of the live queue (0 when there is none).
    fn save(&self, live: Option<&Queue>) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc: self.desc,
            driver: self.driver,
            device: self.device,
            next_avail: live.map_or(0, |q| q.next_avail()),
            next_used: live.map_or(0, |q| q.next_used()),
        }
    }

    /// Registers as the driver left them in `state` (its maximum size checked by the caller).
    fn restored(state: &QueueState) -> Self {
        Self {
            max_size: state.max_size,
            size: state.size,
            ready: state.ready,
            desc: state.desc,
            driver: state.driver,
            device: state.device,
        }
    }

    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Builds the queue and checks it against guest memory: size, alignment, rings in memory.
    fn build(&self, mem: &GuestMemoryMmap<()>) -> Result<Queue, &'static str> {
        let mut q = Queue::new(self.max_size).map_err(|_| "bad maximum size")?;
        let size = u16::try_from(self.size).map_err(|_| "size larger than the maximum")?;
        q.try_set_size(size)
            .map_err(|_| "size is 0, not a power of two, or larger than the maximum")?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| "descriptor table is not 16-byte aligned")?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| "available ring is not 2-byte aligned")?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| "used ring is not 4-byte aligned")?;
        if !self.ready {
            return Err("queue is not ready");
        }
        if self.driver == 0 {
            return Err("available ring at address 0");
        }
        q.set_ready(true);
        // Check the rings here first so that a hostile layout is refused quietly (is_valid logs
        // at error level, and the guest can retry as often as it likes).
        let n = u32::from(size);
        let rings = [
            (self.desc, 16 * n),
            (self.driver, 6 + 2 * n),
            (self.device, 6 + 8 * n),
        ];
        let in_memory = rings
            .iter()
            .all(|&(addr, len)| check_range(mem, GuestAddress(addr), len).is_ok());
        if !in_memory || !q.is_valid(mem) {
            return Err("rings are outside guest memory");
        }
        Ok(q)
    }
}

/// The saved registers of one queue, and where the device was in its rings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// QueueNumMax: the device's maximum size (must match the restored device's).
    pub max_size: u16,
    /// QueueNum as the driver wrote it (checked only when the device is active).
    pub size: u32,
    /// QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available (driver) ring.
    pub driver: u64,
    /// Guest address of the used (device) ring.
    pub device: u64,
    /// Next available-ring entry the device will take: requests before it were handled and
    /// must not be handled again. 0 when the device is not active.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill. 0 when the device is not active.
    pub next_used: u16,
}

/// The saved state of a virtio-mmio transport: the registers the driver wrote, the queues (with
/// the device's positions in them when it is active) and the interrupt state.
///
/// What the device itself was built from is saved apart, as a [`VirtioDeviceState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Virtio device ID of the device (must match the restored device's).
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted (all must be offered by the restored device).
    pub driver_features: u64,
    /// The driver wrote a 1 in a feature word past the second (FEATURES_OK then fails).
    pub driver_features_high: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status as written by the driver, without NEEDS_RESET (see `needs_reset`).
    pub status: u32,
    /// Every queue of the device, in order.
    pub queues: Vec<QueueState>,
    /// InterruptStatus: bits not yet acknowledged by the driver.
    pub interrupt_status: u32,
    /// The device failed and waits for the driver to reset it (status bit NEEDS_RESET).
    pub needs_reset: bool,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The device was active: DRIVER_OK accepted and the queues in use.
    pub activated: bool,
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The virtio-mmio register window of one device. Put it on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap<()>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    /// The driver wrote a 1 in a feature word past the second one.
    driver_features_high: bool,
    queues: Vec<QueueRegs>,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    activation_failures: u32,
}

impl MmioTransport {
    /// A transport for `device` over guest memory `mem`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap<()>,
    ) -> Result<Self, Error> {
        let (interrupt, queue_evts, device_type, device_features, queues) = {
            let d = lock(&device);
            let evts = d
                .queue_events()
                .iter()
                .map(|e| e.try_clone().map_err(Error::EventFd))
                .collect::<Result<Vec<_>, _>>()?;
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&m| QueueRegs::new(m))
                .collect();
            (
                d.interrupt().clone(),
                evts,
                d.device_type(),
                d.features(),
                queues,
            )
        };
        Ok(Self {
            device,
            mem,
            interrupt,
            queue_evts,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            driver_features_high: false,
            queues,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            activation_failures: 0,
        })
    }

    /// Saves the registers, the queues and the interrupt state.
    ///
    /// Call it from the event-loop thread between events, with the vCPUs paused, so that no
    /// queue work is under way. A device that failed since its activation (NEEDS_RESET) is
    /// saved as not active: its queues are gone until the driver resets it.
    pub fn save(&self) -> MmioState {
        let device = lock(&self.device);
        let live = device.base().active.as_ref().filter(|_| self.active);
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, regs)| regs.save(live.and_then(|a| a.queues.get(i))))
            .collect();
        MmioState {
            device_type: self.device_type,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            driver_features_high: self.driver_features_high,
            queue_sel: self.queue_sel,
            status: self.status,
            queues,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            config_generation: self.config_generation,
            activated: live.is_some(),
        }
    }

    /// Flushes the device's backend (see [`VirtioDevice::sync`]), then saves what the device
    /// was built from. Call it with [`MmioTransport::save`], under the same conditions.
    pub fn save_device(&self) -> Result<VirtioDeviceState, Error> {
        let mut device = lock(&self.device);
        device.sync().map_err(Error::Sync)?;
        Ok(device.state())
    }

    /// A transport for `device`, freshly built and never activated, restored from `state`.
    ///
    /// The state is checked as the driver's writes would have been: the device type, queue
    /// count and maximum sizes must be the device's, the status bits must have been set in
    /// order (DRIVER_OK only after FEATURES_OK, ...), the accepted features must be offered
    /// ones with VERSION_1. When the state is active, each queue is built and checked as
    /// DRIVER_OK does (size a power of two within the maximum, rings aligned and inside `mem`,
    /// ready), set to its saved positions and handed to the device, and every queue's
    /// notification `EventFd` is written so that requests the guest made before the snapshot
    /// are looked at. A pending interrupt is raised again.
    ///
    /// `mem` must hold the snapshot's guest memory.
    pub fn restore(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap<()>,
        state: &MmioState,
    ) -> Result<Self, Error> {
        let mut t = Self::new(device, mem)?;
        if lock(&t.device).base().active.is_some() {
            return Err(Error::InvalidState(
                "the device to restore into is already active",
            ));
        }
        t.check_state(state)?;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.driver_features_high = state.driver_features_high;
        t.queue_sel = state.queue_sel;
        t.status = state.status;
        t.config_generation = state.config_generation;
        t.queues = state.queues.iter().map(QueueRegs::restored).collect();
        if state.activated {
            let queues = t
                .queues
                .iter()
                .zip(&state.queues)
                .enumerate()
                .map(|(index, (regs, saved))| {
                    let mut q = regs
                        .build(&t.mem)
                        .map_err(|reason| Error::InvalidQueue { index, reason })?;
                    q.set_next_avail(saved.next_avail);
                    q.set_next_used(saved.next_used);
                    Ok(q)
                })
                .collect::<Result<Vec<_>, Error>>()?;
            lock(&t.device).activate(t.mem.clone(), queues, t.driver_features)?;
            t.active = true;
        }
        t.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if t.active {
            // Notifications sent before the snapshot were not saved: look at every queue.
            for evt in &t.queue_evts {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal a restored queue: {e}");
                }
            }
        }
        Ok(t)
    }

    /// Checks that `state` is one this transport's device could have been in.
    fn check_state(&self, state: &MmioState) -> Result<(), Error> {
        if state.device_type != self.device_type {
            return Err(Error::DeviceType {
                saved: state.device_type,
                device: self.device_type,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(Error::QueueCount {
                expected: self.queues.len(),
                got: state.queues.len(),
            });
        }
        for (index, (saved, regs)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != regs.max_size {
                return Err(Error::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    device: regs.max_size,
                });
            }
        }
        let unoffered = state.driver_features & !self.device_features;
        if unoffered != 0 {
            return Err(Error::UnofferedFeatures(unoffered));
        }
        let status = state.status;
        let known = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED;
        if status & !known != 0 {
            return Err(Error::InvalidState("unknown device status bits"));
        }
        let requires = [
            (S_DRIVER, S_ACK, "DRIVER without ACKNOWLEDGE"),
            (S_FEATURES_OK, S_DRIVER, "FEATURES_OK without DRIVER"),
            (S_DRIVER_OK, S_FEATURES_OK, "DRIVER_OK without FEATURES_OK"),
        ];
        for (bit, needed, what) in requires {
            if status & bit != 0 && status & needed == 0 {
                return Err(Error::InvalidState(what));
            }
        }
        if status & S_FEATURES_OK != 0 {
            if state.driver_features_high {
                return Err(Error::InvalidState("FEATURES_OK with features past bit 63"));
            }
            if state.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
                return Err(Error::MissingFeature(VIRTIO_F_VERSION_1));
            }
        }
        if state.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(Error::InvalidState("unknown interrupt status bits"));
        }
        if state.activated {
            if status & S_DRIVER_OK == 0 {
                return Err(Error::InvalidState("active without DRIVER_OK"));
            }
            if state.needs_reset {
                return Err(Error::InvalidState("active while needing a reset"));
            }
        } else if status & S_DRIVER_OK != 0 && !state.needs_reset {
            return Err(Error::InvalidState(
                "DRIVER_OK on an inactive device that does not need a reset",
            ));
        }
        Ok(())
    }

    /// The device status register, NEEDS_RESET included.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            S_NEEDS_RESET
        } else {
            0
        };
        self.status | needs_reset
    }

    /// True while the device is activated (DRIVER_OK accepted and queues handed over).
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change between feature negotiation and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & (S_DRIVER_OK | S_FAILED) == 0 && !self.interrupt.needs_reset()
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            // No shared memory regions: their length reads as -1.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.write_queue(|q| q.size = v),
            REG_QUEUE_READY => self.write_queue(|q| q.ready = v == 1),
            REG_QUEUE_DESC_LOW => self.write_queue(|q| set_low(&mut q.desc, v)),
            REG_QUEUE_DESC_HIGH => self.write_queue(|q| set_high(&mut q.desc, v)),
            REG_QUEUE_DRIVER_LOW => self.write_queue(|q| set_low(&mut q.driver, v)),
            REG_QUEUE_DRIVER_HIGH => self.write_queue(|q| set_high(&mut q.driver, v)),
            REG_QUEUE_DEVICE_LOW => self.write_queue(|q| set_low(&mut q.device, v)),
            REG_QUEUE_DEVICE_HIGH => self.write_queue(|q| set_high(&mut q.device, v)),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            _ => debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & (S_DRIVER | S_FEATURES_OK) != S_DRIVER {
            debug!("virtio-mmio: driver features written outside negotiation, ignored");
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, v),
            1 => set_high(&mut self.driver_features, v),
            _ => self.driver_features_high |= v != 0,
        }
    }

    fn write_queue(&mut self, f: impl FnOnce(&mut QueueRegs)) {
        if !self.queue_config_allowed() {
            debug!("virtio-mmio: queue register written after DRIVER_OK, ignored");
            return;
        }
        match self.selected_queue() {
            Some(q) => f(q),
            None => debug!("virtio-mmio: write to nonexistent queue, ignored"),
        }
    }

    fn notify(&mut self, index: u32) {
        if !self.active {
            debug!("virtio-mmio: notify of queue {index} before DRIVER_OK, ignored");
            return;
        }
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => debug!("virtio-mmio: notify of nonexistent queue {index}, ignored"),
        }
    }

    /// Features the driver accepted are acceptable: offered ones only, VERSION_1 among them.
    fn features_acceptable(&self) -> bool {
        let unoffered = self.driver_features & !self.device_features;
        if unoffered != 0 || self.driver_features_high {
            debug!("virtio-mmio: driver accepted features not offered: {unoffered:#x}");
            return false;
        }
        if self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            debug!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        true
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET belongs to the device; the driver may only add bits, in order.
        let v = v & !S_NEEDS_RESET;
        if v & self.status != self.status {
            debug!(
                "virtio-mmio: status {v:#x} clears bits of {:#x}, ignored",
                self.status
            );
            return;
        }
        let added = v & !self.status;
        let mut new = self.status;
        if added & S_ACK != 0 {
            new |= S_ACK;
        }
        if added & S_DRIVER != 0 && new & S_ACK != 0 {
            new |= S_DRIVER;
        }
        if added & S_FEATURES_OK != 0 && new & S_DRIVER != 0 && self.features_acceptable() {
            new |= S_FEATURES_OK;
        }
        if added & S_FAILED != 0 {
            new |= S_FAILED;
        }
        let activate = added & S_DRIVER_OK != 0
            && new & S_FEATURES_OK != 0
            && new & S_FAILED == 0
            && !self.interrupt.needs_reset();
        if activate {
            new |= S_DRIVER_OK;
        }
        if new != v {
            debug!("virtio-mmio: status {v:#x} not accepted in full, now {new:#x}");
        }
        self.status = new;
        if activate {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, regs)| {
                regs.build(&self.mem)
                    .map_err(|reason| Error::InvalidQueue { index, reason })
            })
            .collect::<Result<Vec<_>, _>>();
        let result = queues.and_then(|queues| {
            lock(&self.device).activate(self.mem.clone(), queues, self.driver_features)
        });
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                // The guest can retry forever: warn about the first few only.
                if self.activation_failures < 3 {
                    warn!(
                        "virtio-mmio: cannot activate device {}: {e}",
                        self.device_type
                    );
                } else {
                    debug!(
                        "virtio-mmio: cannot activate device {}: {e}",
                        self.device_type
                    );
                }
                self.activation_failures = self.activation_failures.saturating_add(1);
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.interrupt.clear();
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.driver_features_high = false;
        self.queue_sel = 0;
        self.status = 0;
        self.active = false;
        // Drop notifications the guest sent to the old queues.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let device = lock(&self.device);
        let config = device.config();
        match config_range(offset, data.len(), config.len()) {
            Some(r) => data.copy_from_slice(&config[r]),
            None => debug!(
                "virtio-mmio: {}-byte config read at {offset:#x} out of bounds",
                data.len()
            ),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut device = lock(&self.device);
        let len = device.config().len();
        match config_range(offset, data.len(), len) {
            Some(_) => device.write_config(offset, data),
            None => debug!(
                "virtio-mmio: {}-byte config write at {offset:#x} out of bounds",
                data.len()
            ),
        }
    }
}

/// The byte range of a config-space access, if its size is allowed and it lies in the space.
fn config_range(offset: u64, len: usize, config_len: usize) -> Option<std::ops::Range<usize>> {
    if !matches!(len, 1 | 2 | 4 | 8) {
        return None;
    }
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= config_len).then_some(start..end)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            debug!(
                "virtio-mmio: {}-byte register read at {offset:#x}, reads as 0",
                data.len()
            );
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!(
                "virtio-mmio: {}-byte register write at {offset:#x}, ignored",
                data.len()
            );
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{
        drive, mem, mmio_read, mmio_write, negotiate, setup_queue, TestQueue,
    };
    use crate::virtio::{DeviceBase, INT_CONFIG, INT_USED_RING};
    use event_manager::{EventOps, Events, MutEventSubscriber};

    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 5) | (1 << 40);

    struct Dummy {
        base: DeviceBase,
        activated: Option<(usize, u64)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        refuse: bool,
    }

    impl Dummy {
        fn new() -> Self {
            Self {
                base: DeviceBase::new(42, FEATURES, (1..=10).collect(), vec![8, 8]).unwrap(),
                activated: None,
                resets: 0,
                config_writes: Vec::new(),
                refuse: false,
            }
        }
    }

    impl VirtioDevice for Dummy {
        fn base(&self) -> &DeviceBase {
            &self.base
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            mem: GuestMemoryMmap<()>,
            queues: Vec<Queue>,
            features: u64,
        ) -> Result<(), Error> {
            if self.refuse {
                return Err(Error::MissingFeature(0));
            }
            self.activated = Some((queues.len(), features));
            self.base.activate(mem, queues, features)
        }
        fn reset(&mut self) {
            self.activated = None;
            self.base.active = None;
            self.resets += 1;
        }
        fn state(&self) -> VirtioDeviceState {
            VirtioDeviceState::Vsock(crate::virtio::vsock::VsockState {
                guest_cid: 3,
                uds_path: "dummy".into(),
            })
        }
    }

    impl MutEventSubscriber for Dummy {
        fn init(&mut self, _ops: &mut EventOps) {}
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
    }

    struct Rig {
        dev: Arc<Mutex<Dummy>>,
        t: MmioTransport,
        m: GuestMemoryMmap<()>,
    }

    impl Rig {
        fn new() -> Self {
            let m = mem();
            let dev = Arc::new(Mutex::new(Dummy::new()));
            let t = MmioTransport::new(dev.clone(), m.clone()).unwrap();
            Self { dev, t, m }
        }
        fn r(&mut self, off: u64) -> u32 {
            mmio_read(&mut self.t, off)
        }
        fn w(&mut self, off: u64, v: u32) {
            mmio_write(&mut self.t, off, v)
        }
        fn activated(&self) -> Option<(usize, u64)> {
            self.dev.lock().unwrap().activated
        }
        /// Sets up both queues with valid rings, then lets `tweak` spoil queue 1 before
        /// DRIVER_OK.
        fn activate_with(&mut self, tweak: impl FnOnce(&mut Self)) {
            let m = self.m.clone();
            let q0 = TestQueue::new(&m, 8);
            let q1 = TestQueue::at(&m, 0x1000, 8);
            negotiate(&mut self.t);
            setup_queue(&mut self.t, 0, &q0);
            setup_queue(&mut self.t, 1, &q1);
            self.w(REG_QUEUE_SEL, 1);
            tweak(self);
            self.w(REG_STATUS, 0xf);
        }
        fn assert_needs_reset(&mut self) {
            assert_eq!(self.activated(), None);
            assert!(!self.t.is_active());
            assert_eq!(self.r(REG_STATUS) & S_NEEDS_RESET, S_NEEDS_RESET);
            assert_eq!(self.r(REG_INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
            assert_eq!(self.t.interrupt.eventfd().read().unwrap(), 1);
        }
    }

    #[test]
    fn identity_registers() {
        let mut r = Rig::new();
        assert_eq!(r.r(REG_MAGIC), 0x7472_6976);
        assert_eq!(r.r(REG_VERSION), 2);
        assert_eq!(r.r(REG_DEVICE_ID), 42);
        assert_eq!(r.r(REG_VENDOR_ID), VENDOR_ID);
        assert_eq!(r.r(REG_CONFIG_GENERATION), 0);
        assert_eq!(r.r(REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(r.r(REG_QUEUE_NUM_MAX), 8);
        // Write-only and unknown registers read as 0.
        assert_eq!(r.r(REG_QUEUE_NOTIFY), 0);
        assert_eq!(r.r(0xf0), 0);
    }

    #[test]
    fn non_word_register_accesses_are_ignored() {
        let mut r = Rig::new();
        let mut b = [0xffu8; 2];
        r.t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 8];
        r.t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0; 8]);
        let mut b = [0xffu8; 1];
        r.t.read(REG_STATUS, &mut b);
        assert_eq!(b, [0]);
        r.t.write(REG_STATUS, &[1]);
        r.t.write(REG_STATUS, &[1, 0]);
        r.t.write(REG_STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.r(REG_STATUS), 0);
        // Unaligned word access inside a register.
        r.t.write(REG_STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(r.r(REG_STATUS), 0);
    }

    #[test]
    fn feature_banks() {
        let mut r = Rig::new();
        r.w(REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r.r(REG_DEVICE_FEATURES), FEATURES as u32);
        r.w(REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r.r(REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
        r.w(REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r.r(REG_DEVICE_FEATURES), 0);
        r.w(REG_DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(r.r(REG_DEVICE_FEATURES), 0);
    }

    fn negotiate_with(r: &mut Rig, banks: &[(u32, u32)]) -> u32 {
        r.w(REG_STATUS, 1);
        r.w(REG_STATUS, 3);
        for &(sel, v) in banks {
            r.w(REG_DRIVER_FEATURES_SEL, sel);
            r.w(REG_DRIVER_FEATURES, v);
        }
        r.w(REG_STATUS, 0xb);
        r.r(REG_STATUS)
    }

    #[test]
    fn feature_negotiation() {
        let lo = FEATURES as u32;
        let hi = (FEATURES >> 32) as u32;
        // Everything offered: accepted.
        let mut r = Rig::new();
        assert_eq!(negotiate_with(&mut r, &[(0, lo), (1, hi)]), 0xb);
        // A subset with VERSION_1: accepted.
        let mut r = Rig::new();
        assert_eq!(negotiate_with(&mut r, &[(1, 1)]), 0xb);
        // Not offered (bit 0): refused.
        let mut r = Rig::new();
        assert_eq!(negotiate_with(&mut r, &[(0, 1), (1, 1)]), 3);
        // Not offered (bit 63): refused.
        let mut r = Rig::new();
        assert_eq!(negotiate_with(&mut r, &[(1, 1 | 0x8000_0000)]), 3);
        // Bits in a bank past the second: refused.
        let mut r = Rig::new();
        assert_eq!(negotiate_with(&mut r, &[(1, 1), (2, 1)]), 3);
        // Without VERSION_1: refused.
        let mut r = Rig::new();
        assert_eq!(negotiate_with(&mut r, &[(0, lo)]), 3);
    }

    #[test]
    fn features_only_written_during_negotiation() {
        let mut r = Rig::new();
        // Before DRIVER: ignored.
        r.w(REG_DRIVER_FEATURES_SEL, 1);
        r.w(REG_DRIVER_FEATURES, 1);
        r.w(REG_STATUS, 1);
        r.w(REG_STATUS, 3);
        r.w(REG_STATUS, 0xb);
        assert_eq!(
            r.r(REG_STATUS),
            3,
            "VERSION_1 written too early must not count"
        );
        r.w(REG_DRIVER_FEATURES, 1);
        r.w(REG_STATUS, 0xb);
        assert_eq!(r.r(REG_STATUS), 0xb);
        // After FEATURES_OK: ignored.
        r.w(REG_DRIVER_FEATURES_SEL, 0);
        r.w(REG_DRIVER_FEATURES, 1);
        assert_eq!(r.t.driver_features, 1 << 32);
    }

    #[test]
    fn status_bits_follow_the_protocol() {
        let mut r = Rig::new();
        r.w(REG_STATUS, 2);
        assert_eq!(r.r(REG_STATUS), 0, "DRIVER before ACKNOWLEDGE");
        r.w(REG_STATUS, 1);
        r.w(REG_STATUS, 3);
        r.w(REG_STATUS, 1);
        assert_eq!(r.r(REG_STATUS), 3, "bits cannot be cleared but by reset");
        r.w(REG_STATUS, 7);
        assert_eq!(r.r(REG_STATUS), 3, "DRIVER_OK before FEATURES_OK");
        assert_eq!(r.activated(), None);
        r.w(REG_STATUS, 3 | S_NEEDS_RESET);
        assert_eq!(r.r(REG_STATUS), 3, "the driver cannot set NEEDS_RESET");
        r.w(REG_STATUS, 3 | S_FAILED);
        assert_eq!(r.r(REG_STATUS), 3 | S_FAILED);
    }

    #[test]
    fn activation_hands_queues_and_features_over() {
        let mut r = Rig::new();
        r.activate_with(|_| {});
        assert_eq!(r.r(REG_STATUS), 0xf);
        assert_eq!(r.activated(), Some((2, FEATURES)));
        assert!(r.t.is_active());
        assert_eq!(r.r(REG_QUEUE_READY), 1);
        // Queue registers are frozen after DRIVER_OK.
        r.w(REG_QUEUE_READY, 0);
        assert_eq!(r.r(REG_QUEUE_READY), 1);
    }

    #[test]
    fn failed_driver_does_not_activate() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_STATUS, 0xb | S_FAILED));
        assert_eq!(r.activated(), None);
    }

    #[test]
    fn queue_size_above_max_needs_reset() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 16));
        r.assert_needs_reset();
    }

    #[test]
    fn queue_size_zero_needs_reset() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 0));
        r.assert_needs_reset();
    }

    #[test]
    fn queue_size_not_power_of_two_needs_reset() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 6));
        r.assert_needs_reset();
    }

    #[test]
    fn queue_size_absurd_needs_reset() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 0x1_0008));
        r.assert_needs_reset();
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, u32::MAX));
        r.assert_needs_reset();
    }

    #[test]
    fn rings_outside_memory_need_reset() {
        let end = crate::virtio::testing::MEM_SIZE as u32;
        for reg in [
            REG_QUEUE_DESC_LOW,
            REG_QUEUE_DRIVER_LOW,
            REG_QUEUE_DEVICE_LOW,
        ] {
            // Wholly outside.
            let mut r = Rig::new();
            r.activate_with(|r| r.w(reg + 4, 0x10));
            r.assert_needs_reset();
            // Straddling the end of memory.
            let mut r = Rig::new();
            r.activate_with(|r| r.w(reg, end - 16));
            r.assert_needs_reset();
            // At the very top of the address space.
            let mut r = Rig::new();
            r.activate_with(|r| {
                r.w(reg, 0xffff_fff0);
                r.w(reg + 4, u32::MAX);
            });
            r.assert_needs_reset();
        }
    }

    #[test]
    fn misaligned_rings_need_reset() {
        for (reg, addr) in [
            (REG_QUEUE_DESC_LOW, 0x3008),
            (REG_QUEUE_DRIVER_LOW, 0x3001),
            (REG_QUEUE_DEVICE_LOW, 0x3002),
        ] {
            let mut r = Rig::new();
            r.activate_with(|r| r.w(reg, addr));
            r.assert_needs_reset();
        }
    }

    #[test]
    fn queue_not_ready_needs_reset() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_READY, 0));
        r.assert_needs_reset();
    }

    #[test]
    fn device_refusal_needs_reset() {
        let mut r = Rig::new();
        r.dev.lock().unwrap().refuse = true;
        r.activate_with(|_| {});
        r.assert_needs_reset();
    }

    #[test]
    fn notify_before_ready_is_ignored() {
        let mut r = Rig::new();
        r.w(REG_QUEUE_NOTIFY, 0);
        negotiate(&mut r.t);
        r.w(REG_QUEUE_NOTIFY, 0);
        let evt = r.dev.lock().unwrap().base.queue_evts[0]
            .try_clone()
            .unwrap();
        assert!(evt.read().is_err(), "no notification before DRIVER_OK");
        // After a failed activation too.
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 3));
        r.w(REG_QUEUE_NOTIFY, 0);
        assert!(evt.read().is_err());
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let mut r = Rig::new();
        r.activate_with(|_| {});
        let (e0, e1) = {
            let d = r.dev.lock().unwrap();
            (
                d.base.queue_evts[0].try_clone().unwrap(),
                d.base.queue_evts[1].try_clone().unwrap(),
            )
        };
        r.w(REG_QUEUE_NOTIFY, 1);
        assert_eq!(e1.read().unwrap(), 1);
        assert!(e0.read().is_err());
        // Nonexistent queues are ignored.
        r.w(REG_QUEUE_NOTIFY, 2);
        r.w(REG_QUEUE_NOTIFY, u32::MAX);
        assert!(e0.read().is_err());
        assert!(e1.read().is_err());
    }

    #[test]
    fn queue_select_out_of_range() {
        let mut r = Rig::new();
        negotiate(&mut r.t);
        r.w(REG_QUEUE_SEL, 2);
        assert_eq!(r.r(REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r.r(REG_QUEUE_READY), 0);
        r.w(REG_QUEUE_NUM, 4);
        r.w(REG_QUEUE_READY, 1);
        r.w(REG_QUEUE_DESC_LOW, 0x1000);
        r.w(REG_QUEUE_SEL, u32::MAX);
        r.w(REG_QUEUE_READY, 1);
        assert_eq!(r.r(REG_QUEUE_READY), 0);
    }

    #[test]
    fn config_space_bounds() {
        let mut r = Rig::new();
        let base = CONFIG_SPACE_OFFSET;
        let mut b1 = [0u8; 1];
        r.t.read(base + 9, &mut b1);
        assert_eq!(b1, [10]);
        let mut b2 = [0u8; 2];
        r.t.read(base + 1, &mut b2);
        assert_eq!(b2, [2, 3]);
        let mut b8 = [0u8; 8];
        r.t.read(base + 2, &mut b8);
        assert_eq!(b8, [3, 4, 5, 6, 7, 8, 9, 10]);
        // Past the end, straddling it, odd sizes, absurd offsets: zeros.
        let mut b4 = [0xffu8; 4];
        r.t.read(base + 8, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b4 = [0xffu8; 4];
        r.t.read(base + 100, &mut b4);
        assert_eq!(b4, [0; 4]);
        let mut b3 = [0xffu8; 3];
        r.t.read(base, &mut b3);
        assert_eq!(b3, [0; 3]);
        let mut b8 = [0xffu8; 8];
        r.t.read(u64::MAX, &mut b8);
        assert_eq!(b8, [0; 8]);
        let mut big = [0xffu8; 16];
        r.t.read(base, &mut big);
        assert_eq!(big, [0; 16]);
        // Writes: in bounds reach the device, the rest does not.
        r.t.write(base + 8, &[1, 2]);
        r.t.write(base + 9, &[1, 2]);
        r.t.write(base + 0x800, &[1, 2, 3, 4]);
        r.t.write(base, &[1, 2, 3]);
        r.t.write(u64::MAX - 1, &[1, 2]);
        assert_eq!(r.dev.lock().unwrap().config_writes, vec![(8, vec![1, 2])]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut r = Rig::new();
        r.t.interrupt.signal_used();
        r.t.interrupt.signal_config();
        assert_eq!(r.r(REG_INTERRUPT_STATUS), INT_USED_RING | INT_CONFIG);
        r.w(REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(r.r(REG_INTERRUPT_STATUS), INT_CONFIG);
        r.w(REG_INTERRUPT_ACK, u32::MAX);
        assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
        assert_eq!(r.t.interrupt.eventfd().read().unwrap(), 2);
    }

    #[test]
    fn reset_clears_everything_and_allows_reactivation() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 5));
        r.assert_needs_reset();
        r.w(REG_STATUS, 7 | S_FEATURES_OK);
        assert_eq!(r.activated(), None, "no activation while NEEDS_RESET");

        r.w(REG_STATUS, 0);
        assert_eq!(r.r(REG_STATUS), 0);
        assert_eq!(r.r(REG_INTERRUPT_STATUS), 0);
        assert_eq!(r.dev.lock().unwrap().resets, 1);
        r.w(REG_QUEUE_SEL, 1);
        assert_eq!(r.r(REG_QUEUE_READY), 0);
        assert_eq!(r.t.queues[1].size, 8);

        r.activate_with(|_| {});
        assert_eq!(r.activated(), Some((2, FEATURES)));
        r.w(REG_STATUS, 0);
        assert_eq!(r.activated(), None);
        assert!(!r.t.is_active());
        assert_eq!(r.dev.lock().unwrap().resets, 2);
    }

    #[test]
    fn full_driver_sequence_over_the_bus() {
        let mut r = Rig::new();
        let m = r.m.clone();
        let q0 = TestQueue::new(&m, 8);
        let q1 = TestQueue::at(&m, 0x1000, 4);
        drive(&mut r.t, &[&q0, &q1]);
        assert_eq!(r.r(REG_STATUS), 0xf);
        assert!(r.t.is_active());
    }

    /// A transport over a fresh [`Dummy`] restored from `state`.
    fn restored(state: &MmioState) -> Result<Rig, Error> {
        let m = mem();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let t = MmioTransport::restore(dev.clone(), m.clone(), state)?;
        Ok(Rig { dev, t, m })
    }

    /// Through JSON and back, as a state file would take it.
    fn json_round_trip(state: &MmioState) -> MmioState {
        let json = serde_json::to_string(state).unwrap();
        let back: MmioState = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, state);
        back
    }

    fn queue_evts(r: &Rig) -> Vec<EventFd> {
        let d = r.dev.lock().unwrap();
        d.base
            .queue_evts
            .iter()
            .map(|e| e.try_clone().unwrap())
            .collect()
    }

    /// The state of an activated [`Rig`] whose queues are at positions 5/4 and 3/3.
    fn active_state() -> MmioState {
        let mut r = Rig::new();
        r.activate_with(|_| {});
        {
            let mut d = r.dev.lock().unwrap();
            let q = &mut d.base.active.as_mut().unwrap().queues;
            q[0].set_next_avail(5);
            q[0].set_next_used(4);
            q[1].set_next_avail(3);
            q[1].set_next_used(3);
        }
        r.t.save()
    }

    #[test]
    fn save_restore_inactive_transport() {
        let mut r = Rig::new();
        r.w(REG_STATUS, 1);
        r.w(REG_STATUS, 3);
        r.w(REG_DRIVER_FEATURES_SEL, 1);
        r.w(REG_DRIVER_FEATURES, 1);
        r.w(REG_DEVICE_FEATURES_SEL, 1);
        r.w(REG_QUEUE_SEL, 1);
        r.w(REG_QUEUE_NUM, 4);
        r.w(REG_QUEUE_DESC_LOW, 0x3000);
        r.w(REG_QUEUE_READY, 1);
        let state = r.t.save();
        assert!(!state.activated);
        assert_eq!(state.status, 3);
        assert_eq!(state.driver_features, 1 << 32);
        assert_eq!(state.queues[1].size, 4);
        assert_eq!(state.queues[1].desc, 0x3000);
        assert_eq!(
            (state.queues[1].next_avail, state.queues[1].next_used),
            (0, 0)
        );

        let mut back = restored(&json_round_trip(&state)).unwrap();
        assert_eq!(back.t.save(), state);
        assert!(!back.t.is_active());
        assert_eq!(back.activated(), None);
        assert_eq!(back.r(REG_STATUS), 3);
        assert_eq!(back.r(REG_DEVICE_FEATURES), (FEATURES >> 32) as u32);
        assert_eq!(back.r(REG_QUEUE_READY), 1);
        assert_eq!(back.t.interrupt.eventfd().read().ok(), None, "no interrupt");
        for evt in queue_evts(&back) {
            assert!(evt.read().is_err(), "an inactive device is not kicked");
        }
        // The driver goes on where it was.
        let m = back.m.clone();
        let q0 = TestQueue::new(&m, 8);
        let q1 = TestQueue::at(&m, 0x1000, 8);
        setup_queue(&mut back.t, 0, &q0);
        setup_queue(&mut back.t, 1, &q1);
        back.w(REG_STATUS, 0xb);
        back.w(REG_STATUS, 0xf);
        assert_eq!(back.activated(), Some((2, 1 << VIRTIO_F_VERSION_1)));
    }

    #[test]
    fn save_restore_active_transport_keeps_queue_positions() {
        let state = active_state();
        assert!(state.activated);
        assert_eq!(state.status, 0xf);
        assert_eq!(state.driver_features, FEATURES);
        let positions: Vec<_> = state
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        assert_eq!(positions, [(5, 4), (3, 3)]);

        let mut r = restored(&json_round_trip(&state)).unwrap();
        assert!(r.t.is_active());
        assert_eq!(r.activated(), Some((2, FEATURES)));
        assert_eq!(r.r(REG_STATUS), 0xf);
        {
            let d = r.dev.lock().unwrap();
            let q = &d.base.active.as_ref().unwrap().queues;
            assert_eq!((q[0].next_avail(), q[0].next_used()), (5, 4));
            assert_eq!((q[1].next_avail(), q[1].next_used()), (3, 3));
            assert_eq!(q[1].desc_table(), state.queues[1].desc);
        }
        assert_eq!(r.t.save(), state);
        // Notifications the snapshot did not keep: every queue is looked at.
        for evt in queue_evts(&r) {
            assert_eq!(evt.read().unwrap(), 1);
        }
        // No guest write was needed, and queue registers stay frozen.
        r.w(REG_QUEUE_SEL, 0);
        r.w(REG_QUEUE_NUM, 2);
        assert_eq!(r.t.save().queues[0].size, 8);
        // A reset still works.
        r.w(REG_STATUS, 0);
        assert_eq!(r.activated(), None);
        assert!(!r.t.is_active());
    }

    #[test]
    fn pending_interrupt_is_signalled_again() {
        let mut r = Rig::new();
        r.activate_with(|_| {});
        r.t.interrupt.signal_used();
        let state = r.t.save();
        assert_eq!(state.interrupt_status, INT_USED_RING);
        let mut back = restored(&state).unwrap();
        assert_eq!(back.r(REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(back.t.interrupt.eventfd().read().unwrap(), 1);
        back.w(REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(back.r(REG_INTERRUPT_STATUS), 0);

        // Nothing pending: nothing signalled.
        let mut r = Rig::new();
        r.activate_with(|_| {});
        let back = restored(&r.t.save()).unwrap();
        assert!(back.t.interrupt.eventfd().read().is_err());
    }

    #[test]
    fn needs_reset_is_restored() {
        let mut r = Rig::new();
        r.activate_with(|r| r.w(REG_QUEUE_NUM, 5));
        r.assert_needs_reset();
        let state = r.t.save();
        assert!(state.needs_reset);
        assert!(!state.activated);
        assert_eq!(state.interrupt_status, INT_CONFIG);
        let mut back = restored(&json_round_trip(&state)).unwrap();
        back.assert_needs_reset();
        assert_eq!(back.r(REG_STATUS), 0xf | S_NEEDS_RESET);
        // The driver resets and starts over.
        back.w(REG_STATUS, 0);
        back.activate_with(|_| {});
        assert_eq!(back.activated(), Some((2, FEATURES)));
    }

    #[test]
    fn device_failed_after_activation_is_saved_inactive() {
        let mut r = Rig::new();
        r.activate_with(|_| {});
        r.dev.lock().unwrap().base.fail();
        let state = r.t.save();
        assert!(!state.activated);
        assert!(state.needs_reset);
        let mut back = restored(&state).unwrap();
        assert!(!back.t.is_active());
        assert_eq!(back.r(REG_STATUS), 0xf | S_NEEDS_RESET);
    }

    /// Restoring `state` fails, with an error `check` accepts, and activates nothing.
    fn assert_refused(state: &MmioState, check: impl Fn(&Error) -> bool) {
        let m = mem();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        match MmioTransport::restore(dev.clone(), m, state) {
            Ok(_) => panic!("state accepted: {state:?}"),
            Err(e) => assert!(check(&e), "unexpected error: {e}"),
        }
        let d = dev.lock().unwrap();
        assert_eq!(d.activated, None);
        assert!(d.base.active.is_none());
        assert_eq!(d.base.interrupt.status(), 0);
    }

    fn assert_bad_queue(tweak: impl Fn(&mut QueueState)) {
        let mut state = active_state();
        tweak(&mut state.queues[1]);
        assert_refused(&state, |e| {
            matches!(e, Error::InvalidQueue { index: 1, .. })
        });
    }

    #[test]
    fn hostile_queue_states_are_refused() {
        let end = crate::virtio::testing::MEM_SIZE;
        for size in [0, 3, 6, 16, 0x1_0008, u32::MAX] {
            assert_bad_queue(|q| q.size = size);
        }
        assert_bad_queue(|q| q.ready = false);
        assert_bad_queue(|q| q.driver = 0);
        for addr in [
            end,
            end - 16,
            0x10_0000_0000,
            u64::MAX - 15,
            0xffff_ffff_0000_0000,
        ] {
            assert_bad_queue(|q| q.desc = addr);
            assert_bad_queue(|q| q.driver = addr);
            assert_bad_queue(|q| q.device = addr & !3);
        }
        assert_bad_queue(|q| q.desc = 0x3008);
        assert_bad_queue(|q| q.driver = 0x3001);
        assert_bad_queue(|q| q.device = 0x3002);
    }

    #[test]
    fn hostile_queue_counts_and_sizes_are_refused() {
        let mut state = active_state();
        state.queues.push(state.queues[0].clone());
        assert_refused(&state, |e| {
            matches!(
                e,
                Error::QueueCount {
                    expected: 2,
                    got: 3
                }
            )
        });
        let mut state = active_state();
        state.queues.pop();
        assert_refused(&state, |e| {
            matches!(
                e,
                Error::QueueCount {
                    expected: 2,
                    got: 1
                }
            )
        });
        let mut state = active_state();
        state.queues.clear();
        state.activated = false;
        state.status = 0;
        assert_refused(&state, |e| matches!(e, Error::QueueCount { .. }));
        let mut state = active_state();
        state.queues[0].max_size = 256;
        state.queues[0].size = 256;
        assert_refused(&state, |e| {
            matches!(
                e,
                Error::QueueMaxSize {
                    index: 0,
                    saved: 256,
                    device: 8
                }
            )
        });
    }

    #[test]
    fn hostile_status_and_features_are_refused() {
        let invalid = |e: &Error| matches!(e, Error::InvalidState(_));
        let mut state = active_state();
        state.device_type = 2;
        assert_refused(&state, |e| {
            matches!(
                e,
                Error::DeviceType {
                    saved: 2,
                    device: 42
                }
            )
        });
        // Features the device never offered, before or after FEATURES_OK.
        let mut state = active_state();
        state.driver_features |= 1;
        assert_refused(&state, |e| matches!(e, Error::UnofferedFeatures(1)));
        let mut state = active_state();
        state.driver_features = u64::MAX;
        state.activated = false;
        state.status = 3;
        assert_refused(&state, |e| matches!(e, Error::UnofferedFeatures(_)));
        let mut state = active_state();
        state.driver_features_high = true;
        assert_refused(&state, invalid);
        let mut state = active_state();
        state.driver_features = 1 << 5;
        assert_refused(&state, |e| {
            matches!(e, Error::MissingFeature(VIRTIO_F_VERSION_1))
        });
        // Status bits out of order, unknown or the device's own.
        for status in [
            0x7,
            0x5,
            0x2,
            0x4 | 0x1,
            0x10 | 0xf,
            0x20 | 0xf,
            S_NEEDS_RESET | 0xf,
        ] {
            let mut state = active_state();
            state.status = status;
            assert_refused(&state, invalid);
        }
        // FAILED after DRIVER_OK is a state the driver can reach.
        let mut state = active_state();
        state.status |= S_FAILED;
        assert!(restored(&state).unwrap().t.is_active());
        let mut state = active_state();
        state.status = 0xb;
        assert_refused(&state, |e| {
            matches!(e, Error::InvalidState("active without DRIVER_OK"))
        });
        let mut state = active_state();
        state.needs_reset = true;
        assert_refused(&state, invalid);
        let mut state = active_state();
        state.activated = false;
        assert_refused(&state, invalid);
        let mut state = active_state();
        state.interrupt_status = 4;
        assert_refused(&state, invalid);
    }

    #[test]
    fn a_device_already_active_is_not_restored_into() {
        let state = active_state();
        let m = mem();
        let dev = Arc::new(Mutex::new(Dummy::new()));
        let q0 = TestQueue::new(&m, 8);
        let q1 = TestQueue::at(&m, 0x1000, 8);
        dev.lock()
            .unwrap()
            .activate(m.clone(), vec![q0.queue(), q1.queue()], FEATURES)
            .unwrap();
        let err = MmioTransport::restore(dev, m.clone(), &state)
            .err()
            .unwrap();
        assert!(matches!(err, Error::InvalidState(_)), "{err}");
    }

    #[test]
    fn restore_errors_read_well() {
        let mut state = active_state();
        state.queues[1].size = 3;
        let m = mem();
        let err = MmioTransport::restore(Arc::new(Mutex::new(Dummy::new())), m, &state)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "virtio queue 1 is invalid: size is 0, not a power of two, or larger than the maximum"
        );
    }
}
