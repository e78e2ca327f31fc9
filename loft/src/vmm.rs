//! The VMM: builds a VM from a [`VmConfig`], runs its vCPU threads and its event loop, and stops
//! everything when the guest (or the host) says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::Killable;

use crate::boot_timer::Timeline;
use crate::builder::sys;
use crate::console::ConsoleInput;
use crate::device_manager::LegacyDevices;
use crate::event_loop::{EventLoop, StopWatch};
use crate::stop::{StopNotifier, StopReason};
use crate::vstate::vcpu::{self, Vcpu};
use crate::Error;

/// How long the VMM keeps kicking vCPU threads before it gives up on joining them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A VM built and ready to run (see [`crate::builder`]).
pub struct Vmm {
    // Field order is drop order: vCPUs before the VM, the VM before its memory.
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) event_loop: EventLoop,
    pub(crate) notifier: Arc<StopNotifier>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) legacy: LegacyDevices,
    pub(crate) vm: VmFd,
    pub(crate) kvm: Kvm,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) timeline: Arc<Timeline>,
}

impl Vmm {
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
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for (i, vcpu) in self.vcpus.drain(..).enumerate() {
            let handle = std::thread::Builder::new()
                .name(format!("loft-vcpu{i}"))
                .spawn(move || vcpu.run())
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
        let result = loop {
            match self.event_loop.run_with_timeout(250) {
                Ok(_) => {}
                Err(e) => break Err(Error::EventLoop(e)),
            }
            if interrupted() {
                self.notifier.notify(StopReason::Stopped);
            }
            if fired.load(Ordering::Acquire) {
                break Ok(self.notifier.reason());
            }
        };
        stop_vcpus(&self.stop, handles);
        self.timeline.mark(|t| &mut t.exit);
        result
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
