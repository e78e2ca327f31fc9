//! Just enough of the i8042 keyboard controller for the guest to ask to stop.
//!
//! A Linux guest booted with `reboot=k` restarts by polling the status port 0x64 until the input
//! buffer is empty and then writing the pulse-reset command 0xfe to it. loft treats that write as
//! "the guest wants to stop" (the Firecracker convention): it signals an [`EventFd`] the VMM waits
//! on. Everything else reads as an idle controller with no data.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// First port the device decodes (data port).
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command/status port (0x64) from [`I8042_PORT`].
const COMMAND_OFFSET: u64 = 4;
/// Command byte: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset half of an i8042.
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest pulses the reset line.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest's wait loops end.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data == [CMD_RESET_CPU] {
            if let Err(e) = self.reset_evt.write(1) {
                log::error!("i8042: cannot signal the guest's reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(0, &[CMD_RESET_CPU]); // data port: not a reset
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]); // wrong width
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
