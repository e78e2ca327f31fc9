//! The host side of the serial console: host input into the guest's UART.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use loft_devices::serial::SerialConsole;
use loft_devices::sync::lock;
use vmm_sys_util::timerfd::TimerFd;

use crate::stop::{StopNotifier, StopReason};

/// Ctrl-A: the escape key, as in QEMU. Ctrl-A x quits; Ctrl-A Ctrl-A sends one Ctrl-A.
const ESCAPE: u8 = 0x01;

/// Feeds host input (stdin) to the guest's UART on the event loop.
///
/// The UART's FIFO is small; when it is full, loft stops watching the input and looks again
/// after a short delay instead of spinning on a readable descriptor.
pub struct ConsoleInput {
    input: File,
    serial: Arc<Mutex<SerialConsole>>,
    notifier: Arc<StopNotifier>,
    retry: TimerFd,
    pending: Vec<u8>,
    escape: bool,
    interactive: bool,
}

impl ConsoleInput {
    /// Reads from a duplicate of stdin. `interactive` turns on the Ctrl-A escape.
    pub fn from_stdin(
        serial: Arc<Mutex<SerialConsole>>,
        notifier: Arc<StopNotifier>,
    ) -> io::Result<Self> {
        let stdin = io::stdin();
        let interactive = stdin.is_terminal();
        let input = File::from(stdin.as_fd().try_clone_to_owned()?);
        Ok(Self {
            input,
            serial,
            notifier,
            retry: TimerFd::new()?,
            pending: Vec::new(),
            escape: false,
            interactive,
        })
    }

    fn filter_escape(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if self.escape {
                self.escape = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => self.pending.push(ESCAPE),
                    other => self.pending.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE && self.interactive {
                self.escape = true;
            } else {
                self.pending.push(b);
            }
        }
        false
    }

    /// Moves pending bytes into the UART; returns whether everything fit.
    fn flush_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let n = lock(&self.serial).enqueue_input(&self.pending);
        self.pending.drain(..n);
        self.pending.is_empty()
    }

    fn pause(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::new(&self.input, EventSet::IN));
        if let Err(e) = self.retry.reset(Duration::from_millis(10), None) {
            log::warn!("console: cannot arm the input retry timer: {e}");
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            // /dev/null and regular files cannot be polled: the guest simply gets no input.
            log::debug!("console: not reading input: {e}");
        }
        let _ = ops.add(Events::new(&self.retry, EventSet::IN));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.retry.as_raw_fd() {
            let _ = self.retry.wait();
            if self.flush_pending() {
                let _ = ops.add(Events::new(&self.input, EventSet::IN));
            } else {
                self.pause(ops);
            }
            return;
        }
        if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR)
            && !events.event_set().contains(EventSet::IN)
        {
            let _ = ops.remove(events);
            return;
        }
        let room = lock(&self.serial).input_capacity().max(1);
        let mut buf = [0u8; 64];
        match self.input.read(&mut buf[..room.min(64)]) {
            Ok(0) | Err(_) => {
                // End of input: the guest keeps running without it.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                if self.filter_escape(&buf[..n]) {
                    self.notifier.notify(StopReason::Stopped);
                    return;
                }
                if !self.flush_pending() {
                    self.pause(ops);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn input(interactive: bool) -> ConsoleInput {
        let serial = SerialConsole::new(EventFd::new(0).unwrap(), Box::new(io::sink()));
        ConsoleInput {
            input: File::open("/dev/null").unwrap(),
            serial: Arc::new(Mutex::new(serial)),
            notifier: Arc::new(StopNotifier::new().unwrap()),
            retry: TimerFd::new().unwrap(),
            pending: Vec::new(),
            escape: false,
            interactive,
        }
    }

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut c = input(true);
        assert!(!c.filter_escape(b"ab\x01\x01c\x01d"));
        assert_eq!(c.pending, b"ab\x01c\x01d");
        assert!(c.filter_escape(b"\x01x"));
    }

    #[test]
    fn piped_input_passes_ctrl_a_through() {
        let mut c = input(false);
        assert!(!c.filter_escape(b"\x01x"));
        assert_eq!(c.pending, b"\x01x");
    }
}
