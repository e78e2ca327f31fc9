//! Enough of the i8042 keyboard controller for the guest to ask to stop, and for the host to press
//! Ctrl-Alt-Del.
//!
//! A Linux guest booted with `reboot=k` restarts by polling the status port 0x64 until the input
//! buffer is empty and then writing the pulse-reset command 0xfe to it. loft treats that write as
//! "the guest wants to stop" (the Firecracker convention): it signals an [`EventFd`] the VMM waits
//! on.
//!
//! The rest is the controller as Linux's `i8042` and `atkbd` drivers use it: the command byte
//! (read 0x20, write 0x60), the self tests (0xaa, 0xab), enabling and disabling the ports, and a
//! keyboard that acknowledges its commands (reset, identify, LEDs, scan code set, enable). Bytes
//! for the guest wait in a bounded output queue; each one put in the output buffer raises IRQ 1
//! through `irq_evt` when the command byte enables the keyboard interrupt.
//! [`I8042::ctrl_alt_del`] queues the key presses and releases of Ctrl-Alt-Del, in scan code set
//! 1 when the controller translates (the command byte's XLATE bit, Linux's default), else set 2.
//! There is no mouse port: loft boots Linux with `i8042.noaux`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// First port the device decodes (data port).
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// The ISA interrupt line of the keyboard.
pub const I8042_KBD_IRQ: u32 = 1;
/// Offset of the data port (0x60) from [`I8042_PORT`].
const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) from [`I8042_PORT`].
const COMMAND_OFFSET: u64 = 4;

/// Controller commands (written to 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
/// Command byte: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

/// Command byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// The command byte at power-on: keyboard interrupt on, system flag, translation.
const CTR_RESET: u8 = CTR_KBD_INT | SB_SYSTEM | CTR_XLATE;

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Most bytes waiting for the guest: a guest that never reads cannot grow it.
const OUT_QUEUE_MAX: usize = 64;

/// Ctrl-Alt-Del pressed and released, scan code set 1 (what a translating controller sends).
const CTRL_ALT_DEL_SET1: [u8; 8] = [
    0x1d, 0x38, 0xe0, 0x53, // Ctrl, Alt, Delete pressed
    0xe0, 0xd3, 0xb8, 0x9d, // released
];
/// The same in scan code set 2 (a controller that does not translate).
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // pressed
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // released
];

/// A controller command waiting for its data byte on port 0x60.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    /// None: a data byte goes to the keyboard.
    #[default]
    None,
    /// The next byte is the command byte.
    WriteCtr,
    /// The next byte is the output port (ignored: there is no A20 gate to move).
    WriteOutput,
    /// The next byte goes into the output buffer as if the keyboard had sent it.
    WriteKbdOut,
    /// The next byte goes to the (absent) mouse: dropped.
    WriteAux,
    /// The keyboard command `0` waits for its argument.
    KbdArg(u8),
}

/// The saved state of the controller. Every field has a default, so snapshots of the older,
/// stateless controller still load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct I8042State {
    /// The command byte.
    pub ctr: u8,
    /// A command waiting for its data byte.
    pub pending: Pending,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
    /// Bytes for the guest, the first in the output buffer.
    pub out: Vec<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        Self {
            ctr: CTR_RESET,
            pending: Pending::None,
            last_was_command: false,
            out: Vec::new(),
        }
    }
}

/// The keyboard controller.
pub struct I8042 {
    reset_evt: EventFd,
    irq_evt: EventFd,
    ctr: u8,
    pending: Pending,
    last_was_command: bool,
    out: VecDeque<u8>,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest pulses the reset line, and
    /// `irq_evt` (an irqfd on [`I8042_KBD_IRQ`]) when it has a byte for the guest.
    pub fn new(reset_evt: EventFd, irq_evt: EventFd) -> Self {
        Self::restore(reset_evt, irq_evt, &I8042State::default())
    }

    /// A controller restored from `state`, signalling as [`I8042::new`] does.
    pub fn restore(reset_evt: EventFd, irq_evt: EventFd, state: &I8042State) -> Self {
        let mut out: VecDeque<u8> = state.out.iter().copied().collect();
        out.truncate(OUT_QUEUE_MAX);
        Self {
            reset_evt,
            irq_evt,
            ctr: state.ctr,
            pending: state.pending,
            last_was_command: state.last_was_command,
            out,
        }
    }

    /// The controller's state, for a snapshot.
    pub fn save(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            pending: self.pending,
            last_was_command: self.last_was_command,
            out: self.out.iter().copied().collect(),
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard. Fails (and queues nothing) when the
    /// guest has not read earlier keys yet.
    pub fn ctrl_alt_del(&mut self) -> Result<(), QueueFull> {
        let keys: &[u8] = if self.ctr & CTR_XLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if self.out.len() + keys.len() > OUT_QUEUE_MAX {
            return Err(QueueFull);
        }
        for &b in keys {
            self.push(b);
        }
        Ok(())
    }

    /// Puts a byte for the guest in the queue, and interrupts when it reached the output buffer.
    fn push(&mut self, byte: u8) {
        if self.out.len() >= OUT_QUEUE_MAX {
            return;
        }
        self.out.push_back(byte);
        if self.out.len() == 1 {
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        if self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = self.irq_evt.write(1) {
                log::warn!("i8042: cannot interrupt the guest: {e}");
            }
        }
    }

    fn status(&self) -> u8 {
        let mut s = SB_SYSTEM | SB_KBD_ENABLED;
        if !self.out.is_empty() {
            s |= SB_OUT_FULL;
        }
        if self.last_was_command {
            s |= SB_CMD;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR => self.pending = Pending::WriteCtr,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            // 0xff: "general error", so that a guest without i8042.noaux leaves the port alone.
            CMD_AUX_TEST => self.push(0xff),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_INPUT => self.push(0x00),
            // A20 on, reset line high.
            CMD_READ_OUTPUT => self.push(0x03),
            CMD_WRITE_OUTPUT => self.pending = Pending::WriteOutput,
            CMD_WRITE_KBD_OUT => self.pending = Pending::WriteKbdOut,
            CMD_WRITE_AUX_OUT | CMD_WRITE_AUX => self.pending = Pending::WriteAux,
            CMD_RESET_CPU => {
                if let Err(e) = self.reset_evt.write(1) {
                    log::error!("i8042: cannot signal the guest's reset: {e}");
                }
            }
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match std::mem::take(&mut self.pending) {
            Pending::WriteCtr => self.ctr = byte,
            Pending::WriteOutput | Pending::WriteAux => {}
            Pending::WriteKbdOut => self.push(byte),
            Pending::KbdArg(0xf0) if byte == 0 => {
                // "Which scan code set?": 2.
                self.push(KBD_ACK);
                self.push(2);
            }
            Pending::KbdArg(_) => self.push(KBD_ACK),
            Pending::None => self.keyboard_command(byte),
        }
    }

    /// A command to the keyboard itself.
    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            // Reset: acknowledge, then the self test passed.
            0xff => {
                self.out.clear();
                self.push(KBD_ACK);
                self.push(KBD_SELF_TEST_OK);
            }
            // Identify: an MF2 keyboard.
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            0xee => self.push(0xee),
            // LEDs, scan code set, typematic rate: an argument follows.
            0xed | 0xf0 | 0xf3 => {
                self.push(KBD_ACK);
                self.pending = Pending::KbdArg(cmd);
            }
            _ => self.push(KBD_ACK),
        }
    }
}

/// [`I8042::ctrl_alt_del`] found the guest's queue of keys full.
#[derive(Debug, thiserror::Error)]
#[error("the guest has not read the keys sent before")]
pub struct QueueFull;

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0);
            return;
        }
        data[0] = match offset {
            DATA_OFFSET => {
                let byte = self.out.pop_front().unwrap_or(0);
                if !self.out.is_empty() {
                    // The next byte is in the output buffer.
                    self.interrupt();
                }
                byte
            }
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        match offset {
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(*byte);
            }
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(*byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, EventFd, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap());
        (dev, reset, irq)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0xffu8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let (mut dev, evt, _irq) = dev();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & (SB_OUT_FULL | 0x02), 0);
        dev.write(0, &[CMD_RESET_CPU]); // data port: a keyboard command, not a reset
        dev.write(COMMAND_OFFSET, &[0xd1]);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]); // wrong width
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut dev, _reset, irq) = dev();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let ctr = read(&mut dev, DATA_OFFSET);
        assert_eq!(ctr, CTR_RESET);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[ctr & !CTR_KBD_INT]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), ctr & !CTR_KBD_INT);
        // Keyboard commands are acknowledged; the interrupt is off, so none was raised since.
        while irq.read().is_ok() {}
        dev.write(DATA_OFFSET, &[0xf2]);
        assert!(irq.read().is_err());
        assert_eq!(
            [0; 3].map(|_| read(&mut dev, DATA_OFFSET)),
            [KBD_ACK, 0xab, 0x83]
        );
        dev.write(DATA_OFFSET, &[0xed]);
        dev.write(DATA_OFFSET, &[0x00]);
        assert_eq!([0; 2].map(|_| read(&mut dev, DATA_OFFSET)), [KBD_ACK; 2]);
    }

    #[test]
    fn ctrl_alt_del_in_both_scan_code_sets_with_an_interrupt_per_byte() {
        let (mut dev, _reset, irq) = dev();
        dev.ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL != 0 {
            assert_eq!(irq.read().unwrap(), 1, "one interrupt per byte");
            got.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CTR_KBD_INT]);
        dev.ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while read(&mut dev, COMMAND_OFFSET) & SB_OUT_FULL != 0 {
            got.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        for _ in 0..OUT_QUEUE_MAX {
            let _ = dev.ctrl_alt_del();
        }
        assert!(dev.ctrl_alt_del().is_err(), "the queue is bounded");
    }

    #[test]
    fn save_restore() {
        let (mut dev, reset, irq) = dev();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x45]);
        dev.ctrl_alt_del().unwrap();
        let state = dev.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let mut dev = I8042::restore(reset.try_clone().unwrap(), irq, &back);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x1d);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
        // The older, stateless controller's snapshots.
        let old: I8042State = serde_json::from_str("{}").unwrap();
        assert_eq!(old, I8042State::default());
    }
}
