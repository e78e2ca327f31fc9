//! A thread per disk: serves one [`Block`]'s queue away from the VMM's event loop.
//!
//! A disk request can move a whole disk, and a FLUSH is an `fdatasync` that may take seconds
//! on a busy host: done on the event loop, they would hold up everything else there (stop,
//! console, network, vsock). Instead each disk has a worker thread (`loft-blkN` in loft) that
//!
//! - waits (`poll(2)`) on the queue's notification `EventFd` (the KVM ioeventfd) and on its own
//!   control `EventFd`;
//! - on a notification, locks the device and runs [`Block::process_queue_with`], which looks at
//!   the stop and pause flags between requests (and at the stop flag between the 64 KiB steps
//!   of a request), and interrupts the guest through the irqfd as before;
//! - on its start, looks at the queue once: a restored device may have requests the guest made
//!   before the snapshot (the restored transport also writes the notification `EventFd`).
//!
//! # Snapshots: no request in flight
//!
//! A request is taken from the ring, done and answered under the device's lock, so whoever
//! holds that lock sees none half done. That is not enough for a snapshot: between the moment
//! the VMM saves the device (queue positions) and the moment it has written guest memory, the
//! worker could take more requests the guest made before its vCPUs were paused (the ring is
//! full of them under load), write their data and used-ring entries into the memory being
//! saved and their data onto the disk, and the restored device would then run them a second
//! time over a used ring that is ahead of it. So [`BlockWorker::pause`] (called with the vCPUs
//! paused) sets the pause flag and then takes and releases the lock: that waits for the request
//! under way, and the worker, which reads the flag under the lock before each request, takes
//! none after it until [`BlockWorker::resume`]. The guest cannot add work meanwhile (its vCPUs
//! are paused), and a pause never abandons a request, so the saved queue positions, the used
//! ring in memory and the disk agree.
//!
//! # Stopping
//!
//! [`BlockWorker::stop`] sets the stop flag and wakes the worker; [`BlockWorker::join_until`]
//! waits for it until a deadline. A worker inside one long system call (a `pwrite` into a
//! throttled page cache, an `fdatasync` of gigabytes) cannot be interrupted, and the VMM does
//! not wait for it: past the deadline the worker is detached. It owns everything it touches
//! (the `Arc`'d device: the image file and its lock, the guest memory mapping, the eventfds;
//! none of them is the VMM's last reference), so it finishes that call, sees the stop flag,
//! answers nothing more and ends, and the device, its file (the image's lock is released when
//! it is closed) and the guest memory are freed then. The guest is gone by then: a request it
//! never saw complete needs no answer, and every FLUSH it did see complete had its `fdatasync`
//! return first. In a program that embeds loft the process goes on meanwhile, so reopening the
//! same image read-write may fail as locked until the worker has ended; when the process exits
//! first, the kernel ends the worker once its system call returns.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Block, Halt};
use crate::sync::lock;

/// What the VMM tells a worker: stop, pause, and the `EventFd` that wakes it to look.
struct Control {
    stop: AtomicBool,
    paused: AtomicBool,
    evt: EventFd,
}

impl Halt for Control {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn paused(&self) -> bool {
        self.stopping() || self.paused.load(Ordering::SeqCst)
    }
}

impl Control {
    fn wake(&self) {
        if let Err(e) = self.evt.write(1) {
            // Only an overflowing counter fails, and then the worker is awake already.
            debug!("virtio-blk: cannot wake the worker: {e}");
        }
    }
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError<E: std::error::Error + 'static> {
    /// The thread (or its eventfds) could not be created.
    #[error("cannot start the disk's worker thread")]
    Spawn(#[source] io::Error),
    /// The thread's start-up hook (loft: its seccomp filter) failed; the thread has ended.
    #[error("the disk's worker thread could not start")]
    Start(#[source] E),
}

/// The thread that serves one disk's queue (see the module docs).
pub struct BlockWorker {
    control: Arc<Control>,
    device: Arc<Mutex<Block>>,
    handle: Option<JoinHandle<()>>,
    name: String,
}

impl BlockWorker {
    /// Starts a thread named `name` that serves `device`'s queue. It runs `start` first (loft
    /// installs the thread's seccomp filter there), and this returns once `start` has returned:
    /// its error, if any, is this call's and the thread has ended.
    pub fn spawn<E>(
        device: Arc<Mutex<Block>>,
        name: String,
        start: impl FnOnce() -> Result<(), E> + Send + 'static,
    ) -> Result<Self, WorkerError<E>>
    where
        E: std::error::Error + Send + 'static,
    {
        let queue = lock(&device).queue_event().map_err(WorkerError::Spawn)?;
        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Spawn)?,
        });
        let (ready, started) = std::sync::mpsc::sync_channel(1);
        let handle = {
            let (device, control) = (device.clone(), control.clone());
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    let result = start();
                    let ok = result.is_ok();
                    let _ = ready.send(result);
                    if ok {
                        serve(&device, &control, &queue);
                    }
                })
                .map_err(WorkerError::Spawn)?
        };
        match started.recv() {
            Ok(Ok(())) => Ok(Self {
                control,
                device,
                handle: Some(handle),
                name,
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(WorkerError::Start(e))
            }
            Err(_) => {
                // `start` panicked.
                let _ = handle.join();
                Err(WorkerError::Spawn(io::Error::other(
                    "the worker thread panicked as it started",
                )))
            }
        }
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Makes the worker take no new request, and returns once the request under way (if any)
    /// is done and answered. For a snapshot, with the vCPUs paused: until [`BlockWorker::resume`]
    /// the queue, the used ring and the disk do not change.
    pub fn pause(&self) {
        self.control.paused.store(true, Ordering::SeqCst);
        // The worker reads the flag under this lock before each request: once we had it, it
        // has finished its request and will see the flag before it takes another.
        drop(lock(&self.device));
    }

    /// Lets a paused worker go on; it looks at the queue at once (a notification may have come,
    /// or been consumed, while it was paused).
    pub fn resume(&self) {
        self.control.paused.store(false, Ordering::SeqCst);
        self.control.wake();
    }

    /// Tells the worker to stop: it gives up between two requests, or between two steps of
    /// one, and ends. Returns at once.
    pub fn stop(&self) {
        self.control.stop.store(true, Ordering::SeqCst);
        self.control.wake();
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        match &self.handle {
            Some(h) => h.is_finished(),
            None => true,
        }
    }

    /// Waits until `deadline` for the thread to end (call [`BlockWorker::stop`] first). Returns
    /// false, and leaves the thread to end on its own (see the module docs), when it is still
    /// inside a system call then.
    pub fn join_until(mut self, deadline: Instant) -> bool {
        let Some(handle) = self.handle.take() else {
            return true;
        };
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if handle.join().is_err() {
            error!("virtio-blk: {} panicked", self.name);
        }
        true
    }
}

impl Drop for BlockWorker {
    /// A worker nobody joins (the VMM failed or panicked) must not wait forever.
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops every worker, then waits for them until `timeout` has passed; returns the names of
/// those left running inside a system call.
pub fn stop_all(workers: Vec<BlockWorker>, timeout: Duration) -> Vec<String> {
    for w in &workers {
        w.stop();
    }
    let deadline = Instant::now() + timeout;
    let mut left = Vec::new();
    for w in workers {
        let name = w.name.clone();
        if !w.join_until(deadline) {
            left.push(name);
        }
    }
    left
}

/// The worker's loop.
fn serve(device: &Mutex<Block>, control: &Control, queue: &EventFd) {
    // Requests made before the worker started (a restored device) are looked at at once.
    let mut look = true;
    loop {
        if control.stopping() {
            return;
        }
        if look && !control.paused() {
            lock(device).process_queue_with(control);
        }
        // While paused, the queue's notifications wait in their EventFd.
        let watch_queue = !control.paused();
        match wait(queue, &control.evt, watch_queue) {
            Ok(()) => look = true,
            Err(e) => {
                // poll(2) fails only on bad arguments or without memory; retry after a pause
                // rather than spin.
                warn!("virtio-blk: the worker cannot wait for requests: {e}");
                std::thread::sleep(Duration::from_millis(10));
                look = true;
            }
        }
    }
}

/// Waits for `control` (and `queue` when `watch_queue`) to be signalled, and reads those that
/// were.
fn wait(queue: &EventFd, control: &EventFd, watch_queue: bool) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: queue.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let n: libc::nfds_t = if watch_queue { 2 } else { 1 };
    // SAFETY: `fds` is an array of `n` (at most its length) valid pollfd entries, alive and
    // not otherwise borrowed during the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(())
        } else {
            Err(e)
        };
    }
    // Non-blocking eventfds: a read that finds nothing (WouldBlock) is harmless.
    if fds[0].revents != 0 {
        let _ = control.read();
    }
    if watch_queue && fds[1].revents != 0 {
        let _ = queue.read();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
