//! The 16550A UART at COM1 (0x3f8, IRQ 4), from vm-superio, wired to a host writer for output and
//! fed with host input through [`SerialConsole::enqueue_input`].

use std::io::{self, Write};

use vm_superio::serial::NoEvents;
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
    fn input_beyond_fifo_is_refused_not_lost_silently() {
        let mut s = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        let cap = s.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(s.enqueue_input(&big), cap);
        assert_eq!(s.enqueue_input(b"y"), 0);
    }
}
