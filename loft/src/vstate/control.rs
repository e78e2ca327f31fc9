//! Pausing, saving and resuming a VM's vCPU threads.
//!
//! One [`VcpuControl`] per VM is shared by the VMM and every vCPU thread. The VMM asks for a
//! pause; each vCPU thread, kicked out of `KVM_RUN`, first completes the MMIO or port access the
//! guest may be waiting for, then reports itself paused and parks. While all are paused the VMM
//! may ask for their state, which each thread reads from its own vCPU; then it resumes them.
//! A stop (the VM's stop flag) ends a parked thread as it ends a running one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;

use super::vcpu::kick_signal;
use super::vcpu_state::{SaveSpec, VcpuState, VcpuStateError};

/// How often a vCPU thread that has not paused yet is kicked again (a kick that lands just
/// before the thread enters `KVM_RUN` is lost).
const KICK_INTERVAL: Duration = Duration::from_millis(10);

/// How often a parked vCPU thread looks at the VM's stop flag, which is set without telling
/// this control.
const PARK_POLL: Duration = Duration::from_millis(10);

/// Errors pausing the vCPUs or saving their state.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A vCPU did not pause in time; the others were resumed.
    #[error("vCPU {id} did not pause within {timeout:?}")]
    PauseTimeout {
        /// The first vCPU that did not pause.
        id: u8,
        /// How long the VMM waited.
        timeout: Duration,
    },
    /// A vCPU thread has ended (the VM is stopping): it cannot pause or save.
    #[error("vCPU {id} has stopped")]
    Exited {
        /// The vCPU.
        id: u8,
    },
    /// State can only be saved while every vCPU is paused.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// A vCPU did not save its state in time.
    #[error("vCPU {id} did not save its state within {timeout:?}")]
    SaveTimeout {
        /// The first vCPU that did not answer.
        id: u8,
        /// How long the VMM waited.
        timeout: Duration,
    },
    /// A vCPU could not read its state.
    #[error("cannot save the state of vCPU {id}")]
    Save {
        /// The vCPU.
        id: u8,
        /// Why.
        #[source]
        source: VcpuStateError,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Phase {
    /// The thread has not started running the vCPU.
    #[default]
    NotStarted,
    Running,
    Paused,
    /// The thread has ended.
    Exited,
}

#[derive(Default)]
struct Slot {
    phase: Phase,
    /// The thread running the vCPU, while it runs it.
    thread: Option<libc::pthread_t>,
    save_wanted: bool,
    saved: Option<Result<VcpuState, VcpuStateError>>,
}

struct Shared {
    request: Request,
    vcpus: Vec<Slot>,
}

/// Pause, save and resume for the vCPUs of one VM.
pub struct VcpuControl {
    spec: SaveSpec,
    /// Set while a pause is asked for: what a vCPU thread checks before each `KVM_RUN`.
    pause: AtomicBool,
    shared: Mutex<Shared>,
    changed: Condvar,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("pause", &self.pause)
            .finish_non_exhaustive()
    }
}

impl VcpuControl {
    /// The control of a VM with `count` vCPUs, saving what `kvm` offers.
    pub fn new(kvm: &Kvm, count: u8) -> Arc<Self> {
        Self::with_spec(SaveSpec::new(kvm), count)
    }

    /// The control of a VM with `count` vCPUs, saving what `spec` says.
    pub fn with_spec(spec: SaveSpec, count: u8) -> Arc<Self> {
        Arc::new(Self {
            spec,
            pause: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                request: Request::Run,
                vcpus: (0..count).map(|_| Slot::default()).collect(),
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, Shared>, at_most: Duration) -> MutexGuard<'a, Shared> {
        self.changed
            .wait_timeout(guard, at_most)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// What a vCPU's state is saved with.
    pub fn spec(&self) -> &SaveSpec {
        &self.spec
    }

    /// Asks every vCPU to pause and kicks the running ones, without waiting.
    pub fn request_pause(&self) {
        let mut shared = self.lock();
        shared.request = Request::Pause;
        self.pause.store(true, Ordering::Release);
        kick_running(&mut shared);
    }

    /// Pauses every vCPU: returns once all are parked, with any MMIO or port access they were
    /// in completed. Fails (and resumes those that paused) when a vCPU has not paused within
    /// `timeout` or has stopped. Does nothing more when they are already paused.
    pub fn pause_all(&self, timeout: Duration) -> Result<(), ControlError> {
        let deadline = Instant::now() + timeout;
        self.request_pause();
        let mut shared = self.lock();
        loop {
            if shared.request != Request::Pause {
                // Resumed from another thread meanwhile: the pause is off.
                let id = first(&shared, |s| s.phase != Phase::Paused);
                return Err(ControlError::PauseTimeout { id, timeout });
            }
            if let Some(id) = find(&shared, |s| s.phase == Phase::Exited) {
                self.cancel(&mut shared);
                return Err(ControlError::Exited { id });
            }
            if shared.vcpus.iter().all(|s| s.phase == Phase::Paused) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let id = first(&shared, |s| s.phase != Phase::Paused);
                self.cancel(&mut shared);
                return Err(ControlError::PauseTimeout { id, timeout });
            }
            shared = self.wait(shared, KICK_INTERVAL.min(deadline - now));
            kick_running(&mut shared);
        }
    }

    /// Whether every vCPU is paused.
    #[cfg(test)]
    pub fn is_paused(&self) -> bool {
        let shared = self.lock();
        shared.request == Request::Pause && shared.vcpus.iter().all(|s| s.phase == Phase::Paused)
    }

    /// Has every paused vCPU read its state on its own thread and returns the states, in vCPU
    /// order. Only while paused ([`pause_all`](Self::pause_all)); the vCPUs stay paused.
    pub fn save_all(&self, timeout: Duration) -> Result<Vec<VcpuState>, ControlError> {
        let deadline = Instant::now() + timeout;
        let mut shared = self.lock();
        if shared.request != Request::Pause || shared.vcpus.iter().any(|s| s.phase != Phase::Paused)
        {
            return Err(ControlError::NotPaused);
        }
        for slot in &mut shared.vcpus {
            slot.save_wanted = true;
            slot.saved = None;
        }
        self.changed.notify_all();
        loop {
            if let Some(id) = find(&shared, |s| s.phase == Phase::Exited) {
                return Err(ControlError::Exited { id });
            }
            if shared.request != Request::Pause {
                return Err(ControlError::NotPaused);
            }
            if shared.vcpus.iter().all(|s| s.saved.is_some()) {
                let mut states = Vec::with_capacity(shared.vcpus.len());
                for (id, slot) in shared.vcpus.iter_mut().enumerate() {
                    match slot.saved.take() {
                        Some(Ok(state)) => states.push(state),
                        Some(Err(source)) => {
                            return Err(ControlError::Save {
                                id: id as u8,
                                source,
                            })
                        }
                        None => unreachable!("every slot was checked to hold a result"),
                    }
                }
                return Ok(states);
            }
            let now = Instant::now();
            if now >= deadline {
                let id = first(&shared, |s| s.saved.is_none());
                for slot in &mut shared.vcpus {
                    slot.save_wanted = false;
                }
                return Err(ControlError::SaveTimeout { id, timeout });
            }
            shared = self.wait(shared, deadline - now);
        }
    }

    /// Lets every vCPU run again (nothing happens when none is paused).
    pub fn resume_all(&self) {
        let mut shared = self.lock();
        self.cancel(&mut shared);
    }

    fn cancel(&self, shared: &mut Shared) {
        shared.request = Request::Run;
        self.pause.store(false, Ordering::Release);
        for slot in &mut shared.vcpus {
            slot.save_wanted = false;
            slot.saved = None;
        }
        self.changed.notify_all();
    }

    /// vCPU thread: whether a pause is asked for.
    pub(crate) fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// vCPU thread: records that vCPU `id` runs on the calling thread, until the returned guard
    /// is dropped (when the thread stops running it).
    pub(crate) fn register(self: &Arc<Self>, id: u8) -> Registration {
        let mut shared = self.lock();
        if let Some(slot) = shared.vcpus.get_mut(usize::from(id)) {
            slot.phase = Phase::Running;
            // SAFETY: pthread_self has no preconditions and always succeeds.
            slot.thread = Some(unsafe { libc::pthread_self() });
        }
        if shared.request == Request::Pause {
            // Asked before this thread was there to be kicked: it will see the flag anyway.
            self.pause.store(true, Ordering::Release);
        }
        Registration {
            control: self.clone(),
            id,
        }
    }

    /// vCPU thread: reports vCPU `id` paused and parks until resumed (returns true) or until
    /// `stop` is set (returns false). While parked, reads its state with `save` when asked.
    pub(crate) fn park(
        &self,
        id: u8,
        stop: &AtomicBool,
        mut save: impl FnMut() -> Result<VcpuState, VcpuStateError>,
    ) -> bool {
        let index = usize::from(id);
        let mut shared = self.lock();
        if index >= shared.vcpus.len() {
            return true;
        }
        shared.vcpus[index].phase = Phase::Paused;
        self.changed.notify_all();
        loop {
            if stop.load(Ordering::Acquire) {
                shared.vcpus[index].phase = Phase::Running;
                return false;
            }
            if shared.request == Request::Run {
                shared.vcpus[index].phase = Phase::Running;
                self.changed.notify_all();
                return true;
            }
            if shared.vcpus[index].save_wanted {
                shared.vcpus[index].save_wanted = false;
                drop(shared);
                let result = save();
                shared = self.lock();
                shared.vcpus[index].saved = Some(result);
                self.changed.notify_all();
                continue;
            }
            shared = self.wait(shared, PARK_POLL);
        }
    }
}

/// Kicks every vCPU thread that runs and has not paused.
fn kick_running(shared: &mut Shared) {
    for slot in &shared.vcpus {
        if slot.phase != Phase::Running {
            continue;
        }
        if let Some(thread) = slot.thread {
            // SAFETY: `thread` is a live thread: it recorded itself in `register` and clears the
            // record (under the lock held here) before it stops running the vCPU. The kick
            // signal's handler does nothing but interrupt KVM_RUN.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

fn find(shared: &Shared, pred: impl Fn(&Slot) -> bool) -> Option<u8> {
    shared.vcpus.iter().position(pred).map(|i| i as u8)
}

fn first(shared: &Shared, pred: impl Fn(&Slot) -> bool) -> u8 {
    find(shared, pred).unwrap_or(0)
}

/// Held by a vCPU thread while it runs its vCPU; dropping it marks the vCPU's thread ended.
pub(crate) struct Registration {
    control: Arc<VcpuControl>,
    id: u8,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut shared = self.control.lock();
        if let Some(slot) = shared.vcpus.get_mut(usize::from(self.id)) {
            slot.phase = Phase::Exited;
            slot.thread = None;
        }
        self.control.changed.notify_all();
    }
}
