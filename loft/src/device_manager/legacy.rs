//! The legacy port-I/O devices every loft VM has: the COM1 UART (the guest's console), the
//! i8042 (whose reset line ends the VM) and the boot-timer port.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use loft_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT, BOOT_TIMER_PORT_LEN};
use loft_devices::i8042::{I8042, I8042_KBD_IRQ, I8042_PORT, I8042_PORT_LEN};
use loft_devices::serial::{ConsoleOut, SerialConsole, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use loft_devices::Bus;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceManagerError, DevicesState};
use crate::boot_timer::{self, Timeline};

/// The legacy devices of one VM, kept for the console input and for snapshots.
pub struct LegacyDevices {
    /// The guest's console.
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The keyboard controller: its reset line ends the VM; Ctrl-Alt-Del can be pressed on it.
    pub i8042: Arc<Mutex<I8042>>,
    /// The port the project's guest kernel writes its boot milestones to.
    pub boot_timer: Arc<Mutex<BootTimer>>,
}

impl LegacyDevices {
    /// Creates the devices — as new, or as `saved` left them: the UART writes to `console` and
    /// interrupts through an irqfd on COM1's line; the i8042's reset writes `reset_evt` and its keys interrupt on IRQ 1; the
    /// boot timer records into `timeline`.
    pub fn new(
        vm: &VmFd,
        console: ConsoleOut,
        reset_evt: EventFd,
        timeline: &Timeline,
        saved: Option<&DevicesState>,
    ) -> Result<Self, DeviceManagerError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "serial interrupt",
                source,
            })?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)
            .map_err(|source| DeviceManagerError::Kvm {
                what: "keyboard interrupt",
                source,
            })?;
        let milestones = timeline.guest.clone();
        let cpu = boot_timer::process_cpu;
        let (serial, i8042, boot_timer) = match saved {
            None => (
                SerialConsole::new(serial_irq, console),
                I8042::new(reset_evt, kbd_irq),
                BootTimer::new(milestones, cpu),
            ),
            Some(s) => (
                SerialConsole::restore(serial_irq, console, &s.serial)
                    .map_err(DeviceManagerError::Serial)?,
                I8042::restore(reset_evt, kbd_irq, &s.i8042),
                BootTimer::restore(milestones, cpu, &s.boot_timer),
            ),
        };
        Ok(Self {
            serial: Arc::new(Mutex::new(serial)),
            i8042: Arc::new(Mutex::new(i8042)),
            boot_timer: Arc::new(Mutex::new(boot_timer)),
        })
    }

    /// Puts the devices at their ports.
    pub fn attach(&self, pio: &mut Bus) -> Result<(), DeviceManagerError> {
        pio.insert(self.serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
        pio.insert(self.i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
        pio.insert(
            self.boot_timer.clone(),
            BOOT_TIMER_PORT,
            BOOT_TIMER_PORT_LEN,
        )?;
        Ok(())
    }
}
