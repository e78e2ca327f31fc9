//! Just enough of the i8042 keyboard controller for the guest to ask to stop.
//!
//! A Linux guest booted with `reboot=k` restarts by polling the status port 0x64 until the input
//! buffer is empty and then writing the pulse-reset command 0xfe to it. loft treats that write as
//! "the guest wants to stop" (the Firecracker convention): it signals an [`EventFd`] the VMM waits
//! on. Everything else reads as an idle controller with no data.
//!
//! The controller keeps no state of its own: its [`I8042State`] is empty, and is there so that
//! every device saves and restores the same way.

use serde::{Deserialize, Serialize};
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

/// The saved state of the controller: nothing, since every read is the idle status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {}

/// The reset half of an i8042.
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest pulses the reset line.
    pub fn new(reset_evt: EventFd) -> Self {
        Self { reset_evt }
    }

    /// A controller restored from `state`, writing `reset_evt` as [`I8042::new`] does.
    pub fn restore(reset_evt: EventFd, state: &I8042State) -> Self {
        let I8042State {} = state;
        Self::new(reset_evt)
    }

    /// The controller's state, for a snapshot.
    pub fn save(&self) -> I8042State {
        I8042State {}
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

    #[test]
    fn save_restore() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let state = I8042::new(evt.try_clone().unwrap()).save();
        let json = serde_json::to_string(&state).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let mut dev = I8042::restore(evt.try_clone().unwrap(), &back);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0], 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
