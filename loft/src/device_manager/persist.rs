//! Saving every device of a VM for a snapshot, and putting them back at restore: the legacy
//! devices' registers, and for each virtio device where it was (MMIO window, IRQ), what it was
//! built from and its transport's state (negotiated features, queues and positions in them,
//! pending interrupts).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use loft_devices::boot_timer::BootTimerState;
use loft_devices::i8042::I8042State;
use loft_devices::serial::SerialConsoleState;
use loft_devices::sync::lock;
use loft_devices::virtio::block::Block;
use loft_devices::virtio::net::Net;
use loft_devices::virtio::vsock::Vsock;
use loft_devices::virtio::{MmioState, VirtioDeviceState, VirtioMmioDevice};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use super::{DeviceManager, DeviceManagerError, DeviceSlot, LegacyDevices, QueueWork};
use crate::event_loop::EventLoop;
use crate::Error;

/// Every device of a VM, saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// The console UART.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
    /// The boot-timer port.
    pub boot_timer: BootTimerState,
    /// The virtio devices, in the order they were added (disks, NICs, vsock).
    pub virtio: Vec<VirtioSaved>,
}

/// One virtio device, saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioSaved {
    /// Where it was.
    pub slot: DeviceSlot,
    /// What it was built from.
    pub device: VirtioDeviceState,
    /// Its transport.
    pub transport: MmioState,
}

/// Host resources a restored VM's devices get instead of the saved ones: disk images (by the
/// disk's place among the block devices), TAP devices (by the NIC's place), the vsock socket.
#[derive(Clone, Debug, Default)]
pub struct DeviceOverrides {
    /// New image paths for the disks, in order; `None` keeps the saved path.
    pub disks: Vec<Option<PathBuf>>,
    /// New TAP devices for the NICs, in order; `None` keeps the saved one.
    pub taps: Vec<Option<String>>,
    /// The vsock device's host socket; `None` keeps the saved path.
    pub vsock_uds: Option<PathBuf>,
}

impl DeviceManager {
    /// Saves the legacy devices and every virtio device. Call it on the event-loop thread
    /// between events with the vCPUs and the disks' workers paused: no queue work is under way
    /// then. Writable disks are flushed first, so the image files match the guest memory saved
    /// with them.
    pub fn save(&self, legacy: &LegacyDevices) -> Result<DevicesState, DeviceManagerError> {
        let virtio = self
            .virtio
            .iter()
            .enumerate()
            .map(|(index, (slot, transport))| {
                let t = lock(transport);
                let device = t
                    .save_device()
                    .map_err(|source| DeviceManagerError::Save { index, source })?;
                Ok(VirtioSaved {
                    slot: *slot,
                    device,
                    transport: t.save(),
                })
            })
            .collect::<Result<_, DeviceManagerError>>()?;
        Ok(DevicesState {
            serial: lock(&legacy.serial).save(),
            i8042: lock(&legacy.i8042).save(),
            boot_timer: lock(&legacy.boot_timer).save(),
            virtio,
        })
    }

    /// Puts back the virtio devices of `state` in their saved slots, each on a freshly opened
    /// host resource (the saved one, or the one `overrides` names), with its transport restored
    /// over `mem` (which must already hold the snapshot's memory).
    pub fn restore_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        event_loop: &mut EventLoop,
        state: &[VirtioSaved],
        overrides: &DeviceOverrides,
    ) -> Result<(), Error> {
        let (mut disks, mut nics) = (0usize, 0usize);
        for (index, saved) in state.iter().enumerate() {
            let slot = self.allocate()?;
            if slot != saved.slot {
                return Err(DeviceManagerError::Layout {
                    index,
                    saved_addr: saved.slot.addr,
                    saved_irq: saved.slot.irq,
                }
                .into());
            }
            let restore = |device| -> Result<VirtioMmioDevice, Error> {
                Ok(restore_transport(device, mem, &saved.transport, index)?)
            };
            let device = match &saved.device {
                VirtioDeviceState::Block(s) => {
                    let path = overrides.disks.get(disks).cloned().flatten();
                    let path = path.unwrap_or_else(|| s.path.clone());
                    disks += 1;
                    let block = Block::restore(&path, s).map_err(|source| Error::Disk {
                        path: path.clone(),
                        source,
                    })?;
                    // Served by a worker thread, not the event loop: wired here.
                    let block = Arc::new(Mutex::new(block));
                    let device = VirtioMmioDevice::restore_shared(
                        block.clone(),
                        mem.clone(),
                        &saved.transport,
                    )
                    .map_err(|source| DeviceManagerError::Restore { index, source })?;
                    self.wire(vm, device, slot, QueueWork::Worker(block))?;
                    continue;
                }
                VirtioDeviceState::Net(s) => {
                    let tap = overrides.taps.get(nics).cloned().flatten();
                    let tap = tap.or_else(|| s.tap_name.clone()).unwrap_or_default();
                    nics += 1;
                    let nic = Net::restore(&tap, s).map_err(|source| Error::Net {
                        tap: tap.clone(),
                        source,
                    })?;
                    restore(Box::new(nic) as _)?
                }
                VirtioDeviceState::Vsock(s) => {
                    let uds = overrides
                        .vsock_uds
                        .clone()
                        .unwrap_or_else(|| s.uds_path.clone());
                    let dev = Vsock::restore(&uds, s).map_err(|source| Error::Vsock {
                        uds: uds.clone(),
                        source,
                    })?;
                    restore(Box::new(dev) as _)?
                }
            };
            self.wire(vm, device, slot, QueueWork::EventLoop(event_loop))?;
        }
        Ok(())
    }
}

/// A device that can go behind a restored transport.
type AnyDevice = Box<dyn RestorableDevice>;

/// What [`VirtioMmioDevice::restore`] needs of a device, boxed so the three kinds share one
/// path.
trait RestorableDevice {
    fn into_mmio(
        self: Box<Self>,
        mem: GuestMemoryMmap,
        state: &MmioState,
    ) -> Result<VirtioMmioDevice, loft_devices::virtio::Error>;
}

impl<D> RestorableDevice for D
where
    D: loft_devices::virtio::VirtioDevice + event_manager::MutEventSubscriber + 'static,
{
    fn into_mmio(
        self: Box<Self>,
        mem: GuestMemoryMmap,
        state: &MmioState,
    ) -> Result<VirtioMmioDevice, loft_devices::virtio::Error> {
        VirtioMmioDevice::restore(*self, mem, state)
    }
}

fn restore_transport(
    device: AnyDevice,
    mem: &GuestMemoryMmap,
    state: &MmioState,
    index: usize,
) -> Result<VirtioMmioDevice, DeviceManagerError> {
    device
        .into_mmio(mem.clone(), state)
        .map_err(|source| DeviceManagerError::Restore { index, source })
}
