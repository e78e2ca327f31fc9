//! Places devices in the guest: MMIO windows and IRQ lines from allocators, KVM ioeventfds and
//! irqfds for virtio queues and interrupts, and the kernel command-line entries that tell the
//! guest where each virtio-mmio device is. Network and vsock devices are served by the event
//! loop; each disk by a worker thread of its own, which the VMM starts ([`DeviceManager::disks`]).

use std::sync::{Arc, Mutex};

use event_manager::SubscriberOps;
use kvm_ioctls::{IoEventAddress, VmFd};
use loft_devices::virtio::block::Block;
use loft_devices::virtio::{
    MmioTransport, VirtioMmioDevice, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use loft_devices::Bus;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};

use crate::arch::x86_64::{layout, mptable};
use crate::event_loop::EventLoop;

mod legacy;
mod persist;

pub use legacy::LegacyDevices;
pub use persist::{DeviceOverrides, DevicesState};

/// First IRQ line for virtio devices: 0-4 are the PIT, keyboard, cascade and COM1/COM2.
const FIRST_VIRTIO_IRQ: u32 = 5;
/// Size of the MMIO range handed to virtio devices.
const VIRTIO_MMIO_SIZE: u64 = layout::IOAPIC_ADDR - layout::VIRTIO_MMIO_START;

/// Errors placing devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// A saved device cannot be restored.
    #[error("cannot restore virtio device {index} from the snapshot")]
    Restore {
        /// Its place among the snapshot's virtio devices.
        index: usize,
        /// Why.
        #[source]
        source: loft_devices::virtio::Error,
    },
    /// The snapshot's devices are not where loft would put them.
    #[error("the snapshot's virtio device {index} is at {saved_addr:#x} (IRQ {saved_irq}), where loft would not put it")]
    Layout {
        /// Its place among the snapshot's virtio devices.
        index: usize,
        /// Its saved MMIO address.
        saved_addr: u64,
        /// Its saved IRQ.
        saved_irq: u32,
    },
    /// The console UART's saved state cannot be restored.
    #[error("cannot restore the serial console from the snapshot")]
    Serial(#[source] loft_devices::serial::SerialError),
    /// A device's state could not be saved.
    #[error("cannot save virtio device {index}")]
    Save {
        /// Its place among the VM's virtio devices.
        index: usize,
        /// Why.
        #[source]
        source: loft_devices::virtio::Error,
    },
    /// No MMIO window or IRQ line left.
    #[error("no room for another device")]
    Exhausted(#[source] vm_allocator::Error),
    /// The bus refused the window.
    #[error("cannot map the device")]
    Bus(#[from] loft_devices::BusError),
    /// KVM refused an ioeventfd or irqfd.
    #[error("cannot connect the device to KVM ({what})")]
    Kvm {
        /// Which connection.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A virtio device could not be wrapped in its transport.
    #[error("cannot set up a virtio device")]
    Virtio(#[source] loft_devices::virtio::Error),
}

/// Where a device landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceSlot {
    /// Base of its MMIO window.
    pub addr: u64,
    /// Its IRQ line (GSI).
    pub irq: u32,
}

impl DeviceSlot {
    /// The `virtio_mmio.device=` kernel parameter for this slot.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_WINDOW_SIZE / 1024,
            self.addr,
            self.irq
        )
    }
}

/// Hands out MMIO windows and IRQs, and keeps both buses: port I/O (the legacy devices) and
/// MMIO (the virtio devices).
pub struct DeviceManager {
    pio: Bus,
    mmio: Bus,
    virtio: Vec<(DeviceSlot, Arc<Mutex<MmioTransport>>)>,
    /// The disks, in order: each gets a worker thread when the VM runs.
    disks: Vec<Arc<Mutex<Block>>>,
    addresses: AddressAllocator,
    irqs: IdAllocator,
    cmdline: Vec<String>,
}

impl DeviceManager {
    /// An empty manager covering the virtio MMIO range and IRQs 5..23.
    pub fn new() -> Self {
        Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            virtio: Vec::new(),
            disks: Vec::new(),
            // Both ranges are constants that fit: these cannot fail.
            addresses: AddressAllocator::new(layout::VIRTIO_MMIO_START, VIRTIO_MMIO_SIZE)
                .expect("virtio MMIO range is valid"),
            irqs: IdAllocator::new(FIRST_VIRTIO_IRQ, u32::from(mptable::IOAPIC_PINS) - 1)
                .expect("virtio IRQ range is valid"),
            cmdline: Vec::new(),
        }
    }

    /// Reserves a window and an IRQ line.
    pub fn allocate(&mut self) -> Result<DeviceSlot, DeviceManagerError> {
        let range = self
            .addresses
            .allocate(MMIO_WINDOW_SIZE, MMIO_WINDOW_SIZE, AllocPolicy::FirstMatch)
            .map_err(DeviceManagerError::Exhausted)?;
        let irq = self
            .irqs
            .allocate_id()
            .map_err(DeviceManagerError::Exhausted)?;
        Ok(DeviceSlot {
            addr: range.start(),
            irq,
        })
    }

    /// Wires a virtio-mmio device in the next free slot: window on the bus, queue notifications
    /// as ioeventfds, interrupt as an irqfd, processing on the event loop.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        event_manager: &mut EventLoop,
        device: VirtioMmioDevice,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        let slot = self.allocate()?;
        self.wire(vm, device, slot, QueueWork::EventLoop(event_manager))?;
        Ok(slot)
    }

    /// Wires a disk in the next free slot like [`DeviceManager::add_virtio`], except that its
    /// queue is served by a worker thread of its own (started by the VMM), not by the event loop.
    pub fn add_disk(
        &mut self,
        vm: &VmFd,
        mem: &vm_memory::GuestMemoryMmap,
        block: Block,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        let slot = self.allocate()?;
        let block = Arc::new(Mutex::new(block));
        let device = VirtioMmioDevice::new_shared(block.clone(), mem.clone())
            .map_err(DeviceManagerError::Virtio)?;
        self.wire(vm, device, slot, QueueWork::Worker(block))?;
        Ok(slot)
    }

    fn wire(
        &mut self,
        vm: &VmFd,
        device: VirtioMmioDevice,
        slot: DeviceSlot,
        work: QueueWork,
    ) -> Result<(), DeviceManagerError> {
        let kvm = |what| move |source| DeviceManagerError::Kvm { what, source };
        for (evt, datamatch) in &device.queue_evts {
            let addr = IoEventAddress::Mmio(slot.addr + QUEUE_NOTIFY_OFFSET);
            vm.register_ioevent(evt, &addr, *datamatch)
                .map_err(kvm("queue notification"))?;
        }
        vm.register_irqfd(&device.irq_evt, slot.irq)
            .map_err(kvm("interrupt"))?;
        let transport: Arc<Mutex<dyn loft_devices::BusDevice>> = device.transport.clone();
        self.mmio.insert(transport, slot.addr, MMIO_WINDOW_SIZE)?;
        match work {
            QueueWork::EventLoop(event_loop) => {
                event_loop.add_subscriber(device.subscriber);
            }
            // The worker waits on the queue's notification EventFd itself.
            QueueWork::Worker(block) => self.disks.push(block),
        }
        self.cmdline.push(slot.cmdline_entry());
        self.virtio.push((slot, device.transport));
        Ok(())
    }

    /// The disks, in the order they were added: the VMM starts a worker thread for each.
    pub fn disks(&self) -> &[Arc<Mutex<Block>>] {
        &self.disks
    }

    /// The kernel command-line entries for the devices added so far.
    pub fn cmdline_entries(&self) -> &[String] {
        &self.cmdline
    }

    /// Wires the legacy devices on the port-I/O bus.
    pub fn add_legacy(&mut self, legacy: &LegacyDevices) -> Result<(), DeviceManagerError> {
        legacy.attach(&mut self.pio)
    }

    /// The port-I/O and MMIO buses, for the vCPUs.
    pub fn buses(&self) -> (Bus, Bus) {
        (self.pio.clone(), self.mmio.clone())
    }
}

/// Who serves a device's queues.
enum QueueWork<'a> {
    /// The VMM's event loop (network, vsock).
    EventLoop(&'a mut EventLoop),
    /// A worker thread of the device's own (disks).
    Worker(Arc<Mutex<Block>>),
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_page_windows_with_distinct_irqs() {
        let mut dm = DeviceManager::new();
        let a = dm.allocate().unwrap();
        let b = dm.allocate().unwrap();
        assert_eq!(
            a,
            DeviceSlot {
                addr: 0xd000_0000,
                irq: 5
            }
        );
        assert_eq!(
            b,
            DeviceSlot {
                addr: 0xd000_1000,
                irq: 6
            }
        );
        assert_eq!(a.cmdline_entry(), "virtio_mmio.device=4K@0xd0000000:5");
    }

    #[test]
    fn irqs_run_out_cleanly() {
        let mut dm = DeviceManager::new();
        for _ in FIRST_VIRTIO_IRQ..24 {
            dm.allocate().unwrap();
        }
        assert!(matches!(
            dm.allocate(),
            Err(DeviceManagerError::Exhausted(_))
        ));
    }
}
