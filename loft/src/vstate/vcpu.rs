//! A vCPU: its initial state, and the thread that runs it and answers its exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use kvm_bindings::{
    CpuId, KVM_EXIT_INTERNAL_ERROR, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use loft_devices::Bus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::control::VcpuControl;
use super::vcpu_state::{self, VcpuState, VcpuStateError};
use crate::arch::x86_64::{cpuid, msrs, regs};
use crate::boot_timer::Timeline;
use crate::stop::{StopNotifier, StopReason};

/// How many `KVM_RUN`s a pausing vCPU may take to complete a pending MMIO or port access (a
/// string or page-crossing access can need several exits): past that it runs on and pauses on
/// a later kick.
const MAX_COMPLETION_RUNS: u32 = 64;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM refused to create the vCPU.
    #[error("cannot create vCPU {id}")]
    Create {
        /// vCPU index.
        id: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM refused the CPUID.
    #[error("cannot set CPUID of vCPU {id}")]
    Cpuid {
        /// vCPU index.
        id: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM refused the MSRs.
    #[error("cannot set MSRs of vCPU {id}")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// Registers, segments, FPU or LAPIC.
    #[error("cannot set the initial state of vCPU {id}")]
    Regs {
        /// vCPU index.
        id: u8,
        /// The cause.
        source: regs::RegsError,
    },
    /// A saved state could not be given to the vCPU.
    #[error("cannot restore the state of vCPU {id}")]
    Restore {
        /// vCPU index.
        id: u8,
        /// The cause.
        source: VcpuStateError,
    },
    /// The kick signal could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR, and the vCPU loop then looks at
    // its stop flag.
}

/// Installs the (process-wide) kick handler once.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal);
    });
    result
}

/// A vCPU ready to run.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    stop: Arc<AtomicBool>,
    notifier: Arc<StopNotifier>,
    control: Arc<VcpuControl>,
    unknown_accesses: u32,
    timeline: Option<Arc<Timeline>>,
}

/// What one `KVM_RUN` came to.
enum Outcome {
    /// An exit was handled: run again.
    Handled,
    /// `KVM_RUN` was interrupted (the kick signal, or `immediate_exit`).
    Interrupted,
    /// The VM must stop.
    Stop(StopReason),
}

/// What the VM shares with each of its vCPUs.
pub struct VcpuContext<'a> {
    /// The VM.
    pub vm: &'a VmFd,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Set when the vCPUs must stop.
    pub stop: Arc<AtomicBool>,
    /// Where a vCPU reports why the VM must stop.
    pub notifier: Arc<StopNotifier>,
    /// What KVM supports, before per-vCPU changes.
    pub base_cpuid: &'a CpuId,
    /// Whether the LAPIC offers the TSC-deadline timer.
    pub tsc_deadline: bool,
    /// Number of vCPUs in the VM.
    pub count: u8,
    /// Where vCPU 0 marks its first entry into the guest.
    pub timeline: Arc<Timeline>,
    /// Pause, save and resume, shared with the VMM.
    pub control: Arc<VcpuControl>,
}

impl Vcpu {
    /// Creates vCPU `id` and gives it CPUID, MSRs, FPU and LAPIC state. The boot vCPU (0) also
    /// gets registers for `entry`; the others wait for the guest's INIT/SIPI.
    pub fn new(ctx: &VcpuContext<'_>, id: u8, entry: regs::EntryPoint) -> Result<Self, VcpuError> {
        let fd = ctx
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let mut cpuid = ctx.base_cpuid.clone();
        cpuid::adjust(&mut cpuid, id, ctx.count, ctx.tsc_deadline);
        fd.set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        let wanted = msrs::boot_msrs();
        let set = fd
            .set_msrs(&wanted)
            .map_err(|source| VcpuError::Msrs { id, source })?;
        if set != wanted.as_slice().len() {
            log::debug!(
                "vCPU {id}: KVM took {set} of {} boot MSRs",
                wanted.as_slice().len()
            );
        }
        let r = |source| VcpuError::Regs { id, source };
        regs::setup_fpu(&fd).map_err(r)?;
        regs::setup_lint(&fd).map_err(r)?;
        if id == 0 {
            regs::setup_sregs(ctx.mem, &fd, entry).map_err(r)?;
            regs::setup_regs(&fd, entry).map_err(r)?;
        }
        Ok(Self::with_fd(ctx, id, fd))
    }

    /// Creates vCPU `id` with a saved state instead of the boot state. Guest memory must be
    /// registered with the VM already, and `state` must come from vCPU `id` of the saved VM.
    // Called by the VMM's restore path, which is being written.
    pub fn restore(ctx: &VcpuContext<'_>, id: u8, state: &VcpuState) -> Result<Self, VcpuError> {
        let fd = ctx
            .vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        vcpu_state::restore(&fd, ctx.vm, state)
            .map_err(|source| VcpuError::Restore { id, source })?;
        Ok(Self::with_fd(ctx, id, fd))
    }

    fn with_fd(ctx: &VcpuContext<'_>, id: u8, fd: VcpuFd) -> Self {
        Self {
            id,
            fd,
            pio: ctx.pio.clone(),
            mmio: ctx.mmio.clone(),
            mem: ctx.mem.clone(),
            stop: ctx.stop.clone(),
            notifier: ctx.notifier.clone(),
            control: ctx.control.clone(),
            unknown_accesses: 0,
            timeline: (id == 0).then(|| ctx.timeline.clone()),
        }
    }

    fn note_unknown(&mut self, what: &str, addr: u64) {
        // The guest decides how often this happens: log the first few, then stay quiet.
        const LOGGED: u32 = 8;
        self.unknown_accesses = self.unknown_accesses.saturating_add(1);
        if self.unknown_accesses <= LOGGED {
            log::debug!("vCPU {}: {what} {addr:#x} has no device (ignored)", self.id);
        }
        if self.unknown_accesses == LOGGED {
            log::debug!(
                "vCPU {}: further accesses without a device are not logged",
                self.id
            );
        }
    }

    /// Runs the vCPU until the VM stops, pausing whenever its [`VcpuControl`] asks. Every way
    /// out but the stop flag reports a reason to the notifier.
    pub fn run(mut self) {
        let control = self.control.clone();
        let _running = control.register(self.id);
        if let Some(t) = self.timeline.take() {
            t.mark(|t| &mut t.first_entry);
        }
        loop {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if control.pause_requested() {
                if let Err(reason) = self.pause(&control) {
                    self.notifier.notify(reason);
                    return;
                }
                continue;
            }
            if let Outcome::Stop(reason) = self.run_once() {
                self.notifier.notify(reason);
                return;
            }
        }
    }

    /// Pauses this vCPU: completes any MMIO or port access the guest waits for, then parks
    /// until resumed or stopped, saving its state when asked. An error is a reason to stop the
    /// VM that came up while completing the access.
    fn pause(&mut self, control: &VcpuControl) -> Result<(), StopReason> {
        if !self.complete_pending_io()? {
            log::warn!(
                "vCPU {}: access still pending after {MAX_COMPLETION_RUNS} runs; pausing later",
                self.id
            );
            return Ok(());
        }
        let stop = self.stop.clone();
        let resumed = control.park(self.id, &stop, || self.save_state());
        if resumed {
            // The guest was stopped for a while: tell its kvmclock, as after a restore.
            vcpu_state::notify_paused(&self.fd);
        }
        Ok(())
    }

    /// Completes an MMIO or port access left pending by the last exit: after a read exit, the
    /// value only reaches the guest's register when `KVM_RUN` is entered again. With
    /// `immediate_exit` set, `KVM_RUN` completes it and returns EINTR without running guest
    /// code. Returns false when the vCPU kept exiting for more accesses.
    fn complete_pending_io(&mut self) -> Result<bool, StopReason> {
        self.fd.set_kvm_immediate_exit(1);
        let mut result = Ok(false);
        for _ in 0..MAX_COMPLETION_RUNS {
            match self.run_once() {
                Outcome::Handled => {}
                Outcome::Interrupted => {
                    result = Ok(true);
                    break;
                }
                Outcome::Stop(reason) => {
                    result = Err(reason);
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// The KVM vCPU, for tests.
    #[cfg(test)]
    pub(super) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Reads this vCPU's state (on its own thread, while paused).
    pub fn save_state(&self) -> Result<VcpuState, VcpuStateError> {
        vcpu_state::save(&self.fd, self.control.spec())
    }

    /// One `KVM_RUN` and the handling of its exit.
    fn run_once(&mut self) -> Outcome {
        let id = self.id;
        let mut unknown = None;
        let reason = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        unknown = Some(("port read", u64::from(port)));
                    }
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    if !self.pio.write(u64::from(port), data) {
                        unknown = Some(("port write", u64::from(port)));
                    }
                    None
                }
                VcpuExit::MmioRead(addr, data) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                        unknown = Some(("MMIO read", addr));
                    }
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if !self.mmio.write(addr, data) {
                        unknown = Some(("MMIO write", addr));
                    }
                    None
                }
                VcpuExit::Hlt => Some(StopReason::Halted),
                VcpuExit::Shutdown => Some(StopReason::GuestShutdown),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_RESET => Some(StopReason::GuestReset),
                    KVM_SYSTEM_EVENT_SHUTDOWN => Some(StopReason::GuestShutdown),
                    KVM_SYSTEM_EVENT_CRASH => Some(StopReason::GuestCrash),
                    other => Some(StopReason::VcpuError {
                        cpu: id,
                        message: format!("unhandled KVM system event {other}"),
                    }),
                },
                VcpuExit::InternalError => Some(StopReason::InternalError {
                    cpu: id,
                    suberror: 0,
                    rip: 0,
                    code: Vec::new(),
                }),
                VcpuExit::FailEntry(reason, _) => Some(StopReason::FailEntry { cpu: id, reason }),
                VcpuExit::Intr => return Outcome::Interrupted,
                other => Some(StopReason::VcpuError {
                    cpu: id,
                    message: format!("unexpected KVM exit {other:?}"),
                }),
            },
            Err(e) if e.errno() == libc::EINTR => return Outcome::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => None,
            Err(e) => Some(StopReason::VcpuError {
                cpu: id,
                message: format!("KVM_RUN failed: {e}"),
            }),
        };
        if let Some((what, addr)) = unknown {
            self.note_unknown(what, addr);
        }
        match reason {
            Some(StopReason::InternalError { .. }) => Outcome::Stop(self.internal_error()),
            Some(other) => Outcome::Stop(other),
            None => Outcome::Handled,
        }
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR`: the suberror, RIP and the instruction bytes there.
    fn internal_error(&mut self) -> StopReason {
        let run = self.fd.get_kvm_run();
        let suberror = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: KVM filled the `internal` member of the exit union for this exit reason,
            // and both fields read are plain integers valid for any bit pattern.
            unsafe { run.__bindgen_anon_1.internal.suberror }
        } else {
            0
        };
        let (rip, code) = match self.fd.get_regs() {
            Ok(regs) => (regs.rip, self.code_at(regs.rip)),
            Err(_) => (0, Vec::new()),
        };
        StopReason::InternalError {
            cpu: self.id,
            suberror,
            rip,
            code,
        }
    }

    /// Up to 16 bytes of guest code at the linear address `rip`, found by walking the guest's
    /// page tables (KVM_TRANSLATE is not offered everywhere).
    fn code_at(&self, rip: u64) -> Vec<u8> {
        let Ok(sregs) = self.fd.get_sregs() else {
            return Vec::new();
        };
        let linear = sregs.cs.base.wrapping_add(rip);
        let gpa = if sregs.cr0 & (1 << 31) == 0 {
            Some(linear & 0xffff_ffff)
        } else {
            translate(&self.mem, sregs.cr3, linear)
        };
        let mut code = vec![0u8; 16];
        match gpa.map(|a| self.mem.read_slice(&mut code, GuestAddress(a))) {
            Some(Ok(())) => code,
            _ => Vec::new(),
        }
    }
}

/// Walks 4-level x86_64 page tables rooted at `cr3` for `linear`.
fn translate(mem: &GuestMemoryMmap, cr3: u64, linear: u64) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR_MASK;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (linear >> shift) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & 1 == 0 {
            return None;
        }
        let huge = entry & (1 << 7) != 0;
        if level == 0 || (huge && level <= 2) {
            let page_mask = (1u64 << shift) - 1;
            return Some((entry & ADDR_MASK & !page_mask) | (linear & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_walk_finds_2mib_and_4kib_pages_and_stops_at_holes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (pml4, pdpt, pd, pt) = (0x1000u64, 0x2000u64, 0x3000u64, 0x4000u64);
        mem.write_obj(pdpt | 3, GuestAddress(pml4)).unwrap();
        mem.write_obj(pd | 3, GuestAddress(pdpt)).unwrap();
        // PD[0]: 2 MiB page at 0x200000; PD[1]: 4 KiB page table.
        mem.write_obj(0x20_0000u64 | 0x83, GuestAddress(pd))
            .unwrap();
        mem.write_obj(pt | 3, GuestAddress(pd + 8)).unwrap();
        mem.write_obj(0x5000u64 | 3, GuestAddress(pt + 3 * 8))
            .unwrap();
        assert_eq!(translate(&mem, pml4, 0x1234), Some(0x20_1234));
        assert_eq!(translate(&mem, pml4, 0x20_3456), Some(0x5456));
        assert_eq!(
            translate(&mem, pml4, 0x20_4000),
            None,
            "PT entry 4 not present"
        );
        assert_eq!(
            translate(&mem, pml4, 1 << 39),
            None,
            "PML4 entry 1 not present"
        );
        // A CR3 outside guest memory is a failed read, not a crash.
        assert_eq!(translate(&mem, 0xffff_f000, 0), None);
    }
}
