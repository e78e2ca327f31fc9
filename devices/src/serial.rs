//! The 16550A UART at COM1 (0x3f8, IRQ 4), from vm-superio, wired to a host writer for output and
//! fed with host input through [`SerialConsole::enqueue_input`].
//!
//! Snapshots: [`SerialConsole::save`] keeps the UART's registers and the input not yet read by
//! the guest as a [`SerialConsoleState`]; [`SerialConsole::restore`] rebuilds the UART from one.
//! Output is written through at once, so none is held.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// I/O port base of COM1.
pub const COM1_PORT: u64 = 0x3f8;
/// Number of ports the UART decodes.
pub const COM1_PORT_LEN: u64 = 8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing the irqfd the VMM registered with KVM.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// Bytes the UART's receive FIFO holds.
pub const FIFO_SIZE: usize = 64;

/// Errors from restoring the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO holds more than the UART's.
    #[error("saved receive FIFO holds {0} bytes, more than the UART's 64")]
    FifoOverflow(usize),
    /// The interrupt pending in the saved state could not be raised.
    #[error("cannot raise the restored UART's interrupt")]
    Interrupt(#[source] io::Error),
}

/// The saved state of the UART: its registers, and the host input the guest has not read yet.
///
/// The same fields as vm-superio's `SerialState`, which has no serde support.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt Enable Register.
    pub interrupt_enable: u8,
    /// Interrupt Identification Register.
    pub interrupt_identification: u8,
    /// Line Control Register.
    pub line_control: u8,
    /// Line Status Register.
    pub line_status: u8,
    /// Modem Control Register.
    pub modem_control: u8,
    /// Modem Status Register.
    pub modem_status: u8,
    /// Scratch Register.
    pub scratch: u8,
    /// The receive FIFO: input the guest has not read, at most [`FIFO_SIZE`] bytes.
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialConsoleState {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialConsoleState> for SerialState {
    fn from(s: &SerialConsoleState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// The guest's serial console.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A UART restored from `state`, raising `irq` and writing to `out` as [`SerialConsole::new`]
    /// does. An interrupt pending in the state is raised again.
    pub fn restore(
        irq: EventFd,
        out: ConsoleOut,
        state: &SerialConsoleState,
    ) -> Result<Self, SerialError> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(SerialError::FifoOverflow(state.in_buffer.len()));
        }
        let uart = Serial::from_state(&state.into(), IrqTrigger(irq), NoEvents, out).map_err(
            |e| match e {
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    SerialError::Interrupt(e)
                }
                vm_superio::serial::Error::FullFifo => {
                    SerialError::FifoOverflow(state.in_buffer.len())
                }
            },
        )?;
        Ok(Self { uart })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn save(&self) -> SerialConsoleState {
        self.uart.state().into()
    }

    /// Free room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial: input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= COM1_PORT_LEN {
            return;
        }
        // A failing host writer (closed pipe, full disk) must not stop the guest: the output is
        // lost, as on a real UART with nothing attached.
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            log::debug!("serial: output error: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_writer_and_receives_input_with_interrupt() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");

        // Enable the "received data available" interrupt (IER bit 0), then feed input.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'o');
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        let mut wide = [0u8; 2];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        s.write(0, &[1, 2, 3]);
    }

    #[test]
    fn save_restore_keeps_registers_and_unread_input() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq.try_clone().unwrap(), Box::new(io::sink()));
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x0c]);
        s.write(1, &[0x00]);
        s.write(3, &[0x03]); // 8N1
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x01]); // RX interrupt
        assert_eq!(s.enqueue_input(b"abc"), 3);
        assert_eq!(irq.read().unwrap(), 1);

        let state = s.save();
        assert_eq!(state.in_buffer, b"abc");
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialConsoleState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let out = Shared::default();
        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialConsole::restore(irq2.try_clone().unwrap(), Box::new(out.clone()), &back)
            .unwrap();
        assert_eq!(r.save(), state);
        // The RX interrupt was pending: raised again.
        assert_eq!(irq2.read().unwrap(), 1);
        let mut b = [0u8];
        for (off, want) in [(3, 0x03), (7, 0x5a), (1, 0x01)] {
            r.read(off, &mut b);
            assert_eq!(b[0], want, "register {off}");
        }
        for want in b"abc" {
            r.read(0, &mut b);
            assert_eq!(b[0], *want);
        }
        r.read(5, &mut b);
        assert_eq!(b[0] & 1, 0, "no data left");
        r.write(0, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"!");
    }

    #[test]
    fn hostile_states_are_refused_or_harmless() {
        let mut state = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(io::sink())).save();
        state.in_buffer = vec![0; FIFO_SIZE + 1];
        let err = SerialConsole::restore(EventFd::new(0).unwrap(), Box::new(io::sink()), &state)
            .err()
            .unwrap();
        assert!(matches!(err, SerialError::FifoOverflow(65)), "{err}");
        // A full FIFO is fine.
        state.in_buffer.pop();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialConsole::restore(irq, Box::new(io::sink()), &state).is_ok());
        // Every register at every value: the UART works on.
        for v in [0u8, 0x55, 0xaa, 0xff] {
            let state = SerialConsoleState {
                baud_divisor_low: v,
                baud_divisor_high: v,
                interrupt_enable: v,
                interrupt_identification: v,
                line_control: v,
                line_status: v,
                modem_control: v,
                modem_status: v,
                scratch: v,
                in_buffer: vec![v; usize::from(v) % FIFO_SIZE],
            };
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let mut s = SerialConsole::restore(irq, Box::new(io::sink()), &state).unwrap();
            for off in 0..COM1_PORT_LEN {
                let mut b = [0u8];
                s.read(off, &mut b);
                s.write(off, &[v]);
            }
            s.enqueue_input(b"x");
        }
    }

    #[test]
    fn input_beyond_fifo_is_refused_not_lost_silently() {
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        let cap = s.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(s.enqueue_input(&big), cap);
        assert_eq!(s.enqueue_input(b"y"), 0);
    }
}
