//! The VMM: builds a VM from a [`VmConfig`], runs its vCPU threads and its event loop, and stops
//! everything when the guest (or the host) says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use loft_devices::sync::lock;
use loft_devices::virtio::block::worker::{self as blk_worker, BlockWorker, WorkerError};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot_timer::Timeline;
use crate::builder;
use crate::builder::sys;
use crate::console::ConsoleInput;
use crate::device_manager::{DeviceManager, LegacyDevices};
use crate::event_loop::{EventLoop, StopWatch};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, MachineConfig, SnapshotError, SnapshotInfo, SnapshotState};
use crate::stop::{StopNotifier, StopReason};
use crate::vstate::control::VcpuControl;
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::vm_state;
use crate::Error;

/// How long the VMM keeps kicking vCPU threads before it gives up on joining them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the VMM waits for the disks' worker threads at the end before it leaves those still
/// inside a long `pwrite` or `fdatasync` to end on their own (see
/// `loft_devices::virtio::block::worker`): the VM must stop within a second whatever the disk
/// load.
const DISK_WORKER_STOP_TIMEOUT: Duration = Duration::from_millis(300);

/// A VM built and ready to run (see [`crate::builder`]).
pub struct Vmm {
    // Field order is drop order: vCPUs before the VM, the VM before its memory.
    vcpus: Vec<Vcpu>,
    /// One per disk, started by [`Vmm::run`].
    disk_workers: Vec<BlockWorker>,
    event_loop: EventLoop,
    notifier: Arc<StopNotifier>,
    stop: Arc<AtomicBool>,
    control: Arc<VcpuControl>,
    legacy: LegacyDevices,
    devices: DeviceManager,
    requests: Arc<Requests>,
    vm: VmFd,
    kvm: Kvm,
    mem: GuestMemoryMmap,
    machine: MachineConfig,
    timeline: Arc<Timeline>,
    seccomp: bool,
    /// Paused by [`Request::Pause`] (not by a snapshot): the vCPUs stay parked until resumed.
    paused: bool,
}

/// What the builder hands over to make a [`Vmm`].
pub struct VmmParts {
    /// The vCPUs, not yet running.
    pub vcpus: Vec<Vcpu>,
    /// The event loop, with every device subscribed.
    pub event_loop: EventLoop,
    /// Where a stop is asked for.
    pub notifier: Arc<StopNotifier>,
    /// The vCPUs' stop flag.
    pub stop: Arc<AtomicBool>,
    /// Pauses and saves the vCPUs.
    pub control: Arc<VcpuControl>,
    /// The console, i8042 and boot timer.
    pub legacy: LegacyDevices,
    /// The virtio devices and the buses.
    pub devices: DeviceManager,
    /// The VM.
    pub vm: VmFd,
    /// KVM.
    pub kvm: Kvm,
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// What the VM is made of, for snapshots.
    pub machine: MachineConfig,
    /// The run's phases.
    pub timeline: Arc<Timeline>,
}

/// How long the vCPUs may take to pause, and to save their state, for a snapshot.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Vmm {
    /// A VMM over the parts of a built VM.
    pub fn new(p: VmmParts) -> Self {
        Self {
            vcpus: p.vcpus,
            disk_workers: Vec::new(),
            event_loop: p.event_loop,
            notifier: p.notifier,
            stop: p.stop,
            control: p.control,
            legacy: p.legacy,
            devices: p.devices,
            requests: Arc::new(Requests::default()),
            vm: p.vm,
            kvm: p.kvm,
            mem: p.mem,
            machine: p.machine,
            timeline: p.timeline,
            seccomp: false,
            paused: false,
        }
    }

    /// The run's phases.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// Whether [`Vmm::run`] confines the vCPU threads, the disks' threads and the thread it runs
    /// on with their seccomp filters (off until set: call it only when that thread is one of loft's own).
    pub fn set_seccomp(&mut self, on: bool) {
        self.seccomp = on;
    }

    /// Where another thread asks this VMM for a snapshot.
    pub fn requests(&self) -> Arc<Requests> {
        self.requests.clone()
    }

    /// Something that stops this VM from another thread.
    pub fn stop_handle(&self) -> Arc<StopNotifier> {
        self.notifier.clone()
    }

    /// Feeds stdin to the guest's console.
    pub fn attach_stdin(&mut self) -> Result<(), Error> {
        let input = ConsoleInput::from_stdin(self.legacy.serial.clone(), self.notifier.clone())
            .map_err(sys("read stdin"))?;
        self.event_loop.add_subscriber(Arc::new(Mutex::new(input)));
        Ok(())
    }

    /// Runs the VM until it stops, and returns why. `interrupted` is polled a few times a second
    /// so that a signal handler (which cannot take locks) can stop the VM.
    pub fn run(mut self, interrupted: &dyn Fn() -> bool) -> Result<StopReason, Error> {
        let fired = Arc::new(AtomicBool::new(false));
        self.event_loop
            .add_subscriber(Arc::new(Mutex::new(StopWatch::new(
                self.notifier.clone(),
                fired.clone(),
                self.timeline.clone(),
            ))));
        self.event_loop
            .add_subscriber(Arc::new(Mutex::new(RequestWatch(self.requests.clone()))));
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for (i, vcpu) in self.vcpus.drain(..).enumerate() {
            let (seccomp, notifier) = (self.seccomp, self.notifier.clone());
            let handle = std::thread::Builder::new()
                .name(format!("loft-vcpu{i}"))
                .spawn(move || {
                    // Before the first KVM_RUN.
                    if let Err(e) = seccomp::confine_if(seccomp, ThreadKind::Vcpu) {
                        notifier.notify(StopReason::VcpuError {
                            cpu: i as u8,
                            message: e.to_string(),
                        });
                        return;
                    }
                    vcpu.run()
                })
                .map_err(sys("start a vCPU thread"));
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.notifier.notify(StopReason::Stopped);
                    stop_vcpus(&self.stop, handles);
                    return Err(e);
                }
            }
        }
        // Each disk's queue is served by a thread of its own, so that disk I/O never holds up
        // this loop (stop, console, network, vsock).
        if let Err(e) = self.start_disk_workers() {
            self.notifier.notify(StopReason::Stopped);
            self.stop_disk_workers();
            stop_vcpus(&self.stop, handles);
            return Err(e);
        }
        // Once the vCPU and disk threads are started: this thread starts no other.
        if let Err(e) = seccomp::confine_if(self.seccomp, ThreadKind::Vmm) {
            self.notifier.notify(StopReason::Stopped);
            self.stop_disk_workers();
            stop_vcpus(&self.stop, handles);
            return Err(e.into());
        }
        let result = loop {
            match self.event_loop.run_with_timeout(250) {
                Ok(_) => {}
                Err(e) => break Err(Error::EventLoop(e)),
            }
            if interrupted() {
                self.notifier.notify(StopReason::Stopped);
            }
            for request in self.requests.take() {
                self.serve(request);
            }
            if fired.load(Ordering::Acquire) {
                break Ok(self.notifier.reason());
            }
        };
        // The workers first: they give up between two requests (or two 64 KiB steps of one)
        // while the vCPUs are stopped.
        for w in &self.disk_workers {
            w.stop();
        }
        stop_vcpus(&self.stop, handles);
        self.stop_disk_workers();
        self.timeline.mark(|t| &mut t.exit);
        result
    }

    /// Starts a `loft-blkN` thread for each disk, each confined by its filter when seccomp is
    /// on.
    fn start_disk_workers(&mut self) -> Result<(), Error> {
        for (i, disk) in self.devices.disks().iter().enumerate() {
            let seccomp = self.seccomp;
            let worker = BlockWorker::spawn(disk.clone(), format!("loft-blk{i}"), move || {
                // Before the first request.
                seccomp::confine_if(seccomp, ThreadKind::BlockWorker)
            });
            match worker {
                Ok(w) => self.disk_workers.push(w),
                Err(WorkerError::Spawn(source)) => {
                    return Err(Error::Host {
                        what: "start a disk's worker thread",
                        source,
                    })
                }
                Err(WorkerError::Start(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Stops the disks' threads, waiting at most [`DISK_WORKER_STOP_TIMEOUT`] for them.
    ///
    /// A worker still inside one long system call then (a `pwrite` into a throttled page
    /// cache, an `fdatasync` of gigabytes) is left behind, detached: it holds its own
    /// references to everything it uses (the device with its image file and lock, the guest
    /// memory mapping, its eventfds), so it finishes that call, sees the stop flag, answers
    /// nothing more and ends, freeing them. For `loft run` the process exits meanwhile and the
    /// kernel ends the thread once its call returns; in a program that embeds loft,
    /// `VmHandle::kill` returns at once and the thread ends a little later on its own (until
    /// then the image stays open and locked, and the guest memory mapped).
    fn stop_disk_workers(&mut self) {
        let left = blk_worker::stop_all(
            std::mem::take(&mut self.disk_workers),
            DISK_WORKER_STOP_TIMEOUT,
        );
        if !left.is_empty() {
            log::warn!(
                "{} still in a disk request after {DISK_WORKER_STOP_TIMEOUT:?}; not waiting for it \
                 (it ends on its own when the request returns)",
                left.join(", ")
            );
        }
    }
}

impl Vmm {
    fn serve(&mut self, request: Request) {
        match request {
            Request::Snapshot { dir, stop, reply } => {
                let result = self.snapshot(&dir);
                if !stop || result.is_err() {
                    for w in &self.disk_workers {
                        w.resume();
                    }
                }
                if stop && result.is_ok() {
                    // Nothing may run after the save: the vCPUs stay paused until they stop.
                    self.notifier.notify(StopReason::Stopped);
                } else if !self.paused {
                    self.control.resume_all();
                }
                let _ = reply.send(result);
            }
            Request::Pause { reply } => {
                let result = self.control.pause_all(PAUSE_TIMEOUT);
                self.paused = result.is_ok();
                let _ = reply.send(result.map_err(|e| SnapshotError::Vcpus(e).into()));
            }
            Request::Resume { reply } => {
                self.control.resume_all();
                self.paused = false;
                let _ = reply.send(Ok(()));
            }
            Request::CtrlAltDel { reply } => {
                let result = lock(&self.legacy.i8042).ctrl_alt_del();
                let _ = reply.send(result.map_err(|e| Error::Host {
                    what: "press Ctrl-Alt-Del",
                    source: std::io::Error::new(std::io::ErrorKind::WouldBlock, e),
                }));
            }
        }
    }

    /// Saves the VM to `dir`, on the event-loop thread between events (so no device work of
    /// the event loop is under way), with the vCPUs and the disks' workers paused. Leaves them
    /// paused.
    ///
    /// The vCPUs are paused first, so the guest makes no new request; then each disk's worker
    /// finishes the request under way and takes no other (its queue's position, the used ring
    /// in guest memory and the image stay as saved until the memory is written; see
    /// `loft_devices::virtio::block::worker`). Requests the guest made but no worker took stay
    /// in the rings, saved with the memory, and a restored worker takes them.
    fn snapshot(&mut self, dir: &Path) -> Result<SnapshotInfo, Error> {
        let started = Instant::now();
        self.control
            .pause_all(PAUSE_TIMEOUT)
            .map_err(SnapshotError::Vcpus)?;
        for w in &self.disk_workers {
            w.pause();
        }
        let vcpus = self
            .control
            .save_all(PAUSE_TIMEOUT)
            .map_err(SnapshotError::Vcpus)?;
        let vm = vm_state::save(&self.vm).map_err(SnapshotError::VmState)?;
        let devices = self
            .devices
            .save(&self.legacy)
            .map_err(SnapshotError::Devices)?;
        let host = builder::host_facts(&self.kvm, vcpus.first().and_then(|v| v.tsc_khz))?;
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Dir(dir.into(), e))?;
        let memory = snapshot::memory::layout_of(&self.mem);
        let mem_path = dir.join(snapshot::MEMORY_FILE);
        let mut written = 0;
        snapshot::file::replace_with(&mem_path, |f| {
            written = snapshot::memory::write(&self.mem, &memory, f, &mem_path)
                .map_err(std::io::Error::other)?;
            Ok(())
        })
        .map_err(SnapshotError::State)?;
        let state = SnapshotState {
            loft_version: env!("CARGO_PKG_VERSION").to_string(),
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            host,
            machine: self.machine.clone(),
            memory,
            vm,
            vcpus,
            devices,
        };
        let bytes = snapshot::file::encode(&state).map_err(SnapshotError::State)?;
        snapshot::file::write_atomically(&dir.join(snapshot::STATE_FILE), &bytes)
            .map_err(SnapshotError::State)?;
        log::debug!(
            "snapshot of {} MiB ({} MiB written) in {:?}",
            self.machine.memory >> 20,
            written >> 20,
            started.elapsed()
        );
        Ok(crate::Snapshot::open(dir)?.info())
    }
}

/// A request to the VMM thread.
pub enum Request {
    /// Save the VM to `dir`; stop it afterwards when `stop`.
    Snapshot {
        /// The snapshot directory.
        dir: PathBuf,
        /// Stop the VM after a successful save.
        stop: bool,
        /// Where the result goes.
        reply: mpsc::Sender<Result<SnapshotInfo, Error>>,
    },
    /// Park every vCPU until [`Request::Resume`]; snapshots may be taken meanwhile.
    Pause {
        /// Where the result goes.
        reply: mpsc::Sender<Result<(), Error>>,
    },
    /// Let the vCPUs run again after [`Request::Pause`].
    Resume {
        /// Where the result goes.
        reply: mpsc::Sender<Result<(), Error>>,
    },
    /// Press and release Ctrl-Alt-Del on the i8042 keyboard.
    CtrlAltDel {
        /// Where the result goes.
        reply: mpsc::Sender<Result<(), Error>>,
    },
}

/// Requests waiting for the VMM thread, and the event that wakes it.
pub struct Requests {
    queue: Mutex<Vec<Request>>,
    evt: EventFd,
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            queue: Mutex::new(Vec::new()),
            // An eventfd that cannot be created leaves the VMM to find requests on its next
            // periodic wake-up instead.
            evt: EventFd::new(libc::EFD_NONBLOCK).unwrap_or_else(|_| {
                EventFd::new(0).unwrap_or_else(|e| panic!("no eventfd at all: {e}"))
            }),
        }
    }
}

impl Requests {
    fn take(&self) -> Vec<Request> {
        std::mem::take(&mut *lock(&self.queue))
    }

    /// Asks for a snapshot into `dir` and waits for it. `finished` tells whether the VM has
    /// stopped (then no answer comes).
    pub fn snapshot(
        &self,
        dir: &Path,
        stop: bool,
        finished: impl Fn() -> bool,
    ) -> Result<SnapshotInfo, Error> {
        self.ask(
            |reply| Request::Snapshot {
                dir: dir.into(),
                stop,
                reply,
            },
            finished,
        )
    }

    /// Queues the request `make` builds around its reply channel, wakes the VMM thread and
    /// waits for the answer. `finished` tells whether the VM has stopped (then none comes).
    pub fn ask<T>(
        &self,
        make: impl FnOnce(mpsc::Sender<Result<T, Error>>) -> Request,
        finished: impl Fn() -> bool,
    ) -> Result<T, Error> {
        let (reply, answer) = mpsc::channel();
        lock(&self.queue).push(make(reply));
        let _ = self.evt.write(1);
        loop {
            match answer.recv_timeout(Duration::from_millis(50)) {
                Ok(result) => return result,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::AgentGone),
                Err(mpsc::RecvTimeoutError::Timeout) if finished() => {
                    return Err(Error::NotRunning)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// Wakes the event loop when a request arrives; the loop then serves it.
struct RequestWatch(Arc<Requests>);

impl MutEventSubscriber for RequestWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            log::warn!("cannot watch for requests (they wait for the next wake-up): {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.evt.read();
    }
}

/// Stops every vCPU thread: sets the flag, then kicks each thread out of KVM_RUN until it ends.
fn stop_vcpus(stop: &AtomicBool, handles: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    let mut pending = handles;
    while !pending.is_empty() {
        pending.retain(|h| {
            if h.is_finished() {
                return false;
            }
            let _ = h.kill(vcpu::kick_signal());
            true
        });
        if pending.iter().all(|h| h.is_finished()) {
            break;
        }
        if Instant::now() > deadline {
            log::error!(
                "{} vCPU thread(s) did not stop; leaving them behind",
                pending.len()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for h in pending {
        let _ = h.join();
    }
}
