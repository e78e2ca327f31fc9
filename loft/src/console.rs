//! The host side of the serial console: host input into the guest's UART, and the guest's
//! output on its way to the host's writer.
//!
//! The UART is written by a vCPU thread holding the UART's lock. Output therefore never goes
//! to the host's writer directly (a full pipe nobody reads would stop the vCPU, and the VM
//! with it): it goes into a bounded buffer that a `loft-console` thread drains into the
//! writer. When the buffer is full, bytes are dropped and counted (as Firecracker counts lost
//! log lines), and loft reports the count; a slow reader loses output, never the VM.

use std::fs::File;
use std::io::{self, IsTerminal, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use loft_devices::serial::SerialConsole;
use loft_devices::sync::lock;
use vmm_sys_util::timerfd::TimerFd;

use crate::seccomp::{self, ThreadKind};
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

/// Most guest output held for a slow writer before bytes are dropped, by default.
pub const CONSOLE_BUFFER: usize = 1 << 20;

/// The buffer between the UART (writing) and the `loft-console` thread (draining).
#[derive(Default)]
struct Pending {
    bytes: std::collections::VecDeque<u8>,
    /// The UART side is gone: drain what is left and end.
    closed: bool,
    /// The drain thread has ended.
    drained: bool,
    /// Chunks written so far: how [`ConsoleDrain::finish`] tells a slow writer from a stuck one.
    written: u64,
}

/// What the UART side and the drain thread share.
struct Shared {
    capacity: usize,
    pending: Mutex<Pending>,
    changed: std::sync::Condvar,
    dropped: std::sync::atomic::AtomicU64,
}

/// The UART's end: a writer that never blocks.
struct BufferedConsole(Arc<Shared>);

impl io::Write for BufferedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut p = lock(&self.0.pending);
        let room = self.0.capacity.saturating_sub(p.bytes.len());
        let taken = room.min(buf.len());
        p.bytes.extend(&buf[..taken]);
        drop(p);
        if taken < buf.len() {
            self.0.dropped.fetch_add(
                (buf.len() - taken) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.0.changed.notify_one();
        // Dropped bytes count as written: the UART must not retry them.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BufferedConsole {
    fn drop(&mut self) {
        lock(&self.0.pending).closed = true;
        self.0.changed.notify_all();
    }
}

/// The drain side of a console: how many bytes were dropped, and waiting for the drain.
pub struct ConsoleDrain(Arc<Shared>);

impl ConsoleDrain {
    /// Guest output bytes dropped so far because the writer did not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Once the UART side is gone, waits until what it wrote has reached the writer, as long
    /// as the writer keeps taking it: a writer that takes nothing for `stall` is given up on
    /// (it keeps its thread, and the rest is lost).
    pub fn finish(&self, stall: Duration) {
        let mut p = lock(&self.0.pending);
        let (mut seen, mut since) = (p.written, std::time::Instant::now());
        while !p.drained {
            if p.written != seen {
                (seen, since) = (p.written, std::time::Instant::now());
            }
            let left = stall.saturating_sub(since.elapsed());
            if left.is_zero() {
                return;
            }
            p = self
                .0
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Puts a buffer of `capacity` bytes and a `loft-console` thread between the UART and `sink`:
/// returns the writer to give the UART and the drain's handle. With `seccomp`, the thread
/// confines itself (and `sink` runs under its filter).
#[cfg(test)]
pub fn buffered(
    sink: Box<dyn io::Write + Send>,
    capacity: usize,
    seccomp: bool,
) -> io::Result<(loft_devices::serial::ConsoleOut, ConsoleDrain)> {
    let (out, drain) = buffer(capacity);
    drain.start(sink, seccomp)?;
    Ok((out, drain))
}

/// A buffer of `capacity` bytes for the UART's output: the writer to give the UART, and the
/// drain's handle, whose [`ConsoleDrain::start`] starts the thread that empties it (once the VM
/// is built: until then output waits in the buffer).
pub fn buffer(capacity: usize) -> (loft_devices::serial::ConsoleOut, ConsoleDrain) {
    let shared = Arc::new(Shared {
        capacity,
        pending: Mutex::new(Pending::default()),
        changed: std::sync::Condvar::new(),
        dropped: std::sync::atomic::AtomicU64::new(0),
    });
    (
        Box::new(BufferedConsole(shared.clone())),
        ConsoleDrain(shared),
    )
}

impl ConsoleDrain {
    /// Starts the `loft-console` thread that drains the buffer into `sink`. With `seccomp`, the
    /// thread confines itself (and `sink` runs under its filter).
    pub fn start(&self, mut sink: Box<dyn io::Write + Send>, seccomp: bool) -> io::Result<()> {
        let drain = self.0.clone();
        std::thread::Builder::new()
            .name("loft-console".into())
            .spawn(move || {
                if let Err(e) = seccomp::confine_if(seccomp, ThreadKind::Console) {
                    log::error!("{e}: the guest's console output is lost");
                    lock(&drain.pending).drained = true;
                    drain.changed.notify_all();
                    return;
                }
                let mut chunk = Vec::with_capacity(64 << 10);
                loop {
                    let closed = {
                        let mut p = lock(&drain.pending);
                        while p.bytes.is_empty() && !p.closed {
                            p = drain.changed.wait(p).unwrap_or_else(|e| e.into_inner());
                        }
                        let n = p.bytes.len().min(chunk.capacity());
                        chunk.clear();
                        chunk.extend(p.bytes.drain(..n));
                        p.closed && p.bytes.is_empty()
                    };
                    let failed = !chunk.is_empty()
                        && sink.write_all(&chunk).and_then(|_| sink.flush()).is_err();
                    lock(&drain.pending).written += 1;
                    drain.changed.notify_all();
                    if failed {
                        // The writer is gone (a closed pipe): nothing more can be shown.
                        let mut p = lock(&drain.pending);
                        let lost = p.bytes.len() as u64;
                        p.bytes.clear();
                        drain.dropped.fetch_add(
                            lost + chunk.len() as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                    }
                    if closed {
                        break;
                    }
                }
                lock(&drain.pending).drained = true;
                drain.changed.notify_all();
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod buffered_tests {
    use super::*;
    use std::io::Write;

    /// A writer that blocks until released, like a pipe nobody reads.
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl io::Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut open = lock(&self.0 .0);
            while !*open {
                open = self.0 .1.wait(open).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_writer_never_blocks_the_uart_and_what_did_not_fit_is_counted() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let (mut uart, drain) =
            buffered(Box::new(Stuck(gate.clone())), CONSOLE_BUFFER, false).unwrap();
        let started = std::time::Instant::now();
        let line = vec![b'x'; 4096];
        for _ in 0..(3 * CONSOLE_BUFFER / line.len()) {
            uart.write_all(&line).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the UART side waited"
        );
        let dropped = drain.dropped();
        assert!(dropped >= (CONSOLE_BUFFER as u64), "{dropped}");
        drop(uart);
        drain.finish(Duration::from_millis(50)); // bounded while the writer is stuck
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drain.finish(Duration::from_secs(5));
        assert!(lock(&drain.0.pending).drained);
    }

    #[test]
    fn everything_reaches_a_writer_that_keeps_up_in_order() {
        let out = Arc::new(Mutex::new(Vec::new()));
        struct Into(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Into {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                lock(&self.0).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut uart, drain) =
            buffered(Box::new(Into(out.clone())), CONSOLE_BUFFER, false).unwrap();
        let mut expected = Vec::new();
        for i in 0..1000u32 {
            let line = format!("line {i}\n");
            uart.write_all(line.as_bytes()).unwrap();
            expected.extend_from_slice(line.as_bytes());
        }
        drop(uart);
        drain.finish(Duration::from_secs(5));
        assert_eq!(drain.dropped(), 0);
        assert!(*lock(&out) == expected, "output reordered or lost");
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
