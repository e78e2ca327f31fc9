//! The KVM state of one vCPU, read for a snapshot and set again on restore.
//!
//! Everything in a [`VcpuState`] may come from a file a user hands loft: restoring checks sizes
//! before anything reaches a fixed-size KVM structure, and KVM itself judges the values.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::msrs::{self, MsrError, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};

/// The 32-bit words of the legacy `kvm_xsave` area (`KVM_GET_XSAVE` / `KVM_SET_XSAVE`).
const XSAVE_WORDS: usize = 1024;

/// KVM's default tolerance between a requested and the host's TSC frequency, in parts per
/// million (the kvm module's `tsc_tolerance_ppm`), used when the module does not say.
const DEFAULT_TSC_TOLERANCE_PPM: u64 = 250;

/// What a vCPU's state is saved with: which MSRs to read, and which optional state KVM offers.
/// One per VM, worked out once from `/dev/kvm`.
#[derive(Clone, Debug)]
pub struct SaveSpec {
    /// The MSRs to read, in the order they are set again ([`msrs::to_save`]).
    pub msrs: Vec<u32>,
    /// `KVM_GET_XSAVE` is there (otherwise the legacy FPU state is saved).
    pub xsave: bool,
    /// `KVM_GET_XCRS` is there.
    pub xcrs: bool,
}

impl SaveSpec {
    /// Asks `kvm` which MSRs it has and which state it offers. Without an MSR index list (an
    /// error loft has not seen), the MSRs loft always saves are still tried.
    pub fn new(kvm: &Kvm) -> Self {
        let index_list = match kvm.get_msr_index_list() {
            Ok(list) => list.as_slice().to_vec(),
            Err(e) => {
                log::warn!("KVM gave no MSR index list ({e}): snapshots save a fixed set of MSRs");
                Vec::new()
            }
        };
        Self {
            msrs: msrs::to_save(&index_list),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
        }
    }
}

/// The x87/SSE state as `KVM_GET_FPU` gives it (kvm-bindings has no serde for `kvm_fpu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyFpu {
    /// ST0-ST7 / MM0-MM7.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for LegacyFpu {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&LegacyFpu> for kvm_fpu {
    fn from(f: &LegacyFpu) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The floating-point and vector state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    /// The XSAVE area `KVM_GET_XSAVE` gives, as 32-bit words.
    Xsave(Vec<u32>),
    /// The legacy FPU state, on a KVM without XSAVE.
    Legacy(Box<LegacyFpu>),
}

/// Everything KVM holds about one vCPU, as a snapshot keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs, in the order they are set again (TSC first, TSC deadline last).
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE, AVX... state.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), when KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub vcpu_events: kvm_vcpu_events,
    /// The vCPU's TSC frequency in kHz, when KVM could tell (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: Option<u32>,
}

/// Errors saving or restoring a vCPU's state. The vCPU's index is added by the caller.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A `KVM_GET_*` ioctl failed.
    #[error("cannot save the {what}")]
    Get {
        /// The state being read.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A `KVM_SET_*` ioctl failed.
    #[error("cannot restore the {what}")]
    Set {
        /// The state being set.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading the MSRs failed.
    #[error("cannot save the MSRs")]
    GetMsrs(#[source] MsrError),
    /// Setting the MSRs failed, or KVM did not take one of them.
    #[error("cannot restore the MSRs")]
    SetMsrs(#[source] MsrError),
    /// The saved CPUID has more entries than `KVM_SET_CPUID2` takes.
    #[error("the saved CPUID has {count} entries, more than KVM takes ({KVM_MAX_CPUID_ENTRIES})")]
    TooManyCpuidEntries {
        /// How many there were.
        count: usize,
    },
    /// The saved XSAVE area is not the size `KVM_SET_XSAVE` takes.
    #[error("the saved XSAVE area has {words} 32-bit words, KVM_SET_XSAVE takes {XSAVE_WORDS}")]
    XsaveSize {
        /// Its size in 32-bit words.
        words: usize,
    },
    /// This KVM's XSAVE area is larger than `KVM_SET_XSAVE`'s (dynamically enabled features
    /// such as AMX), which loft does not handle.
    #[error("this KVM's XSAVE area is {bytes} bytes, more than loft handles (4096)")]
    HostXsaveTooLarge {
        /// What `KVM_CAP_XSAVE2` says.
        bytes: i32,
    },
    /// The state has an XSAVE area and this KVM has no XSAVE, or the other way round.
    #[error("the saved FPU state is {saved}, this KVM wants {host}")]
    FpuKind {
        /// What the state holds.
        saved: &'static str,
        /// What this KVM takes.
        host: &'static str,
    },
    /// The state has XCRs and this KVM has no `KVM_SET_XCRS`.
    #[error("the saved state has XCRs and this KVM cannot set them")]
    NoXcrs,
    /// The host's TSC frequency is not the saved one and KVM cannot scale it.
    #[error(
        "the vCPU ran at a TSC frequency of {saved_khz} kHz, this host's is {host_khz} kHz and \
         its KVM cannot scale the TSC"
    )]
    TscFrequency {
        /// The saved frequency.
        saved_khz: u32,
        /// This host's.
        host_khz: u32,
    },
}

fn get(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Get { what, source }
}

fn set(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Set { what, source }
}

/// Reads the state of `vcpu`, which must not be running (call it on the vCPU's own thread while
/// it is paused, after any pending MMIO/PIO access was completed).
pub fn save(vcpu: &VcpuFd, spec: &SaveSpec) -> Result<VcpuState, VcpuStateError> {
    // The order follows what the GET ioctls do: KVM_GET_MP_STATE lets the LAPIC accept pending
    // INIT/SIPI events, which changes other state, so it goes first; KVM_GET_VCPU_EVENTS goes
    // last, after every other read that might queue an event.
    let mp_state = vcpu.get_mp_state().map_err(get("MP state"))?;
    let regs = vcpu.get_regs().map_err(get("registers"))?;
    let sregs = vcpu.get_sregs().map_err(get("special registers"))?;
    let fpu = if spec.xsave {
        FpuState::Xsave(vcpu.get_xsave().map_err(get("XSAVE area"))?.region.to_vec())
    } else {
        FpuState::Legacy(Box::new(LegacyFpu::from(
            &vcpu.get_fpu().map_err(get("FPU"))?,
        )))
    };
    let xcrs = if spec.xcrs {
        Some(vcpu.get_xcrs().map_err(get("XCRs"))?)
    } else {
        None
    };
    let debug_regs = vcpu.get_debug_regs().map_err(get("debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(get("local APIC"))?;
    let tsc_khz = match vcpu.get_tsc_khz() {
        Ok(khz) => Some(khz),
        Err(e) => {
            log::warn!("KVM cannot tell the vCPU's TSC frequency ({e}): saved without it");
            None
        }
    };
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(get("CPUID"))?
        .as_slice()
        .to_vec();
    let (msrs, unreadable) = msrs::read(vcpu, &spec.msrs).map_err(VcpuStateError::GetMsrs)?;
    if !unreadable.is_empty() {
        log::debug!("MSRs this vCPU cannot read, not saved: {unreadable:#x?}");
    }
    let vcpu_events = vcpu.get_vcpu_events().map_err(get("pending events"))?;
    Ok(VcpuState {
        cpuid,
        msrs,
        regs,
        sregs,
        fpu,
        xcrs,
        debug_regs,
        lapic,
        mp_state,
        vcpu_events,
        tsc_khz,
    })
}

/// KVM's tolerance between TSC frequencies, in ppm: what the kvm module says, else its default.
pub fn tsc_tolerance_ppm() -> u64 {
    std::fs::read_to_string("/sys/module/kvm/parameters/tsc_tolerance_ppm")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_TSC_TOLERANCE_PPM)
}

/// Whether two TSC frequencies are within `ppm` of each other (KVM runs a guest asking for a
/// frequency within its tolerance at the host's, unscaled).
pub fn tsc_within_tolerance(saved_khz: u32, host_khz: u32, ppm: u64) -> bool {
    let diff = u64::from(saved_khz.abs_diff(host_khz));
    diff * 1_000_000 <= u64::from(host_khz).saturating_mul(ppm)
}

/// Gives the vCPU the saved TSC frequency: nothing to do when the host's is within KVM's
/// tolerance, `KVM_SET_TSC_KHZ` when KVM can scale the TSC, an error otherwise.
fn restore_tsc_khz(vcpu: &VcpuFd, vm: &VmFd, saved: Option<u32>) -> Result<(), VcpuStateError> {
    let Some(saved_khz) = saved else {
        log::warn!("the snapshot does not say the vCPU's TSC frequency: not checked");
        return Ok(());
    };
    let host_khz = vcpu.get_tsc_khz().map_err(get("TSC frequency"))?;
    if saved_khz == host_khz {
        return Ok(());
    }
    if vm.check_extension(Cap::TscControl) {
        return vcpu.set_tsc_khz(saved_khz).map_err(set("TSC frequency"));
    }
    if tsc_within_tolerance(saved_khz, host_khz, tsc_tolerance_ppm()) {
        return Ok(());
    }
    Err(VcpuStateError::TscFrequency {
        saved_khz,
        host_khz,
    })
}

/// Sets the saved CPUID, refusing more entries than `KVM_SET_CPUID2` takes.
fn restore_cpuid(vcpu: &VcpuFd, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuStateError> {
    let too_many = || VcpuStateError::TooManyCpuidEntries {
        count: entries.len(),
    };
    if entries.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(too_many());
    }
    let cpuid = CpuId::from_entries(entries).map_err(|_| too_many())?;
    vcpu.set_cpuid2(&cpuid).map_err(set("CPUID"))
}

/// Sets XCR0 and the XSAVE area (or the legacy FPU state).
fn restore_fpu(vcpu: &VcpuFd, vm: &VmFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let host_xsave = vm.check_extension(Cap::Xsave);
    if let Some(xcrs) = &state.xcrs {
        if !vm.check_extension(Cap::Xcrs) {
            return Err(VcpuStateError::NoXcrs);
        }
        vcpu.set_xcrs(xcrs).map_err(set("XCRs"))?;
    }
    match &state.fpu {
        FpuState::Xsave(words) => {
            if !host_xsave {
                return Err(VcpuStateError::FpuKind {
                    saved: "an XSAVE area",
                    host: "the legacy FPU state",
                });
            }
            if words.len() != XSAVE_WORDS {
                return Err(VcpuStateError::XsaveSize { words: words.len() });
            }
            // KVM_SET_XSAVE copies KVM_CAP_XSAVE2 bytes (0 when the capability is older than
            // the area's growth): more than the 4096 of kvm_xsave would read past it.
            let host_bytes = vm.check_extension_int(Cap::Xsave2);
            if host_bytes > std::mem::size_of::<kvm_xsave>() as i32 {
                return Err(VcpuStateError::HostXsaveTooLarge { bytes: host_bytes });
            }
            let mut xsave = kvm_xsave::default();
            xsave.region.copy_from_slice(words);
            // SAFETY: KVM reads at most KVM_CAP_XSAVE2 bytes, checked above to be no more than
            // the 4096 of `xsave`, which lives for the whole call.
            unsafe { vcpu.set_xsave(&xsave) }.map_err(set("XSAVE area"))
        }
        FpuState::Legacy(fpu) => {
            if host_xsave {
                log::debug!("restoring a legacy FPU state on a KVM with XSAVE");
            }
            vcpu.set_fpu(&kvm_fpu::from(fpu.as_ref()))
                .map_err(set("FPU"))
        }
    }
}

/// Sets the MSRs: all but the TSC deadline in the saved order (TSC first), then the deadline.
/// Where KVM kept its own TSC instead of the saved one (kvm_pvm has no TSC offset: a vCPU's TSC
/// is the host's), the deadline is moved by as much, so that the timer fires as far ahead of
/// the TSC as it was saved, not at once (the TSC went forward) or ages later (it went back).
fn restore_msrs(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    if state.msrs.len() > msrs::MAX_SAVED_MSRS {
        return Err(VcpuStateError::SetMsrs(MsrError::TooMany {
            count: state.msrs.len(),
        }));
    }
    let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = state
        .msrs
        .iter()
        .partition(|e| e.index == MSR_IA32_TSC_DEADLINE);
    msrs::write(vcpu, &others).map_err(VcpuStateError::SetMsrs)?;
    let Some(mut deadline) = deadline.last().copied() else {
        return Ok(());
    };
    if let Some(saved_tsc) = msrs::find(&others, MSR_IA32_TSC) {
        let (now, _) = msrs::read(vcpu, &[MSR_IA32_TSC]).map_err(VcpuStateError::GetMsrs)?;
        if let Some(now_tsc) = msrs::find(&now, MSR_IA32_TSC) {
            deadline.data = rebase_deadline(deadline.data, saved_tsc, now_tsc, state.tsc_khz);
        }
    }
    msrs::write(vcpu, &[deadline]).map_err(VcpuStateError::SetMsrs)
}

/// The TSC deadline to set when the vCPU's TSC reads `now_tsc` after `saved_tsc` was written:
/// unchanged when KVM took the saved TSC (the two are within a second's cycles), else as far
/// ahead of `now_tsc` as it was of `saved_tsc` (0, disarmed, stays 0; a deadline already passed
/// fires at once).
pub fn rebase_deadline(deadline: u64, saved_tsc: u64, now_tsc: u64, tsc_khz: Option<u32>) -> u64 {
    let second = tsc_khz.map_or(1 << 32, |khz| u64::from(khz) * 1000);
    if deadline == 0 || now_tsc.abs_diff(saved_tsc) <= second {
        return deadline;
    }
    let ahead = deadline.saturating_sub(saved_tsc);
    now_tsc.saturating_add(ahead).max(1)
}

/// Sets every part of `state` on `vcpu`, freshly created in `vm` (with guest memory registered:
/// the kvmclock and other paravirtual MSRs point into it). The order matters: the TSC frequency
/// and CPUID first (they decide which state and MSRs KVM takes), XCR0 before the XSAVE area,
/// special before general registers, the LAPIC before the MSRs (the TSC deadline only takes in
/// TSC-deadline timer mode), and pending events last. Then the guest is told, through kvmclock,
/// that it was stopped, so that it does not take the gap for a soft lockup.
pub fn restore(vcpu: &VcpuFd, vm: &VmFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    restore_tsc_khz(vcpu, vm, state.tsc_khz)?;
    restore_cpuid(vcpu, &state.cpuid)?;
    restore_fpu(vcpu, vm, state)?;
    vcpu.set_sregs(&state.sregs)
        .map_err(set("special registers"))?;
    vcpu.set_regs(&state.regs).map_err(set("registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(set("local APIC"))?;
    restore_msrs(vcpu, state)?;
    vcpu.set_mp_state(state.mp_state).map_err(set("MP state"))?;
    vcpu.set_debug_regs(&state.debug_regs)
        .map_err(set("debug registers"))?;
    vcpu.set_vcpu_events(&state.vcpu_events)
        .map_err(set("pending events"))?;
    notify_paused(vcpu);
    Ok(())
}

/// `KVM_KVMCLOCK_CTRL`: tells a guest with kvmclock that its vCPU was stopped, so that its
/// watchdogs do not report the time it spent stopped as a soft lockup. KVM answers EINVAL when
/// the guest has no kvmclock, which is fine; other errors are logged.
pub fn notify_paused(vcpu: &VcpuFd) {
    match vcpu.kvmclock_ctrl() {
        Ok(()) => {}
        Err(e) if e.errno() == libc::EINVAL => {}
        Err(e) => log::debug!("KVM_KVMCLOCK_CTRL failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_tolerance_is_in_ppm_of_the_host() {
        assert!(tsc_within_tolerance(2_300_000, 2_300_000, 250));
        assert!(tsc_within_tolerance(2_300_575, 2_300_000, 250));
        assert!(!tsc_within_tolerance(2_300_576, 2_300_000, 250));
        assert!(!tsc_within_tolerance(2_000_000, 2_300_000, 250));
        assert!(!tsc_within_tolerance(u32::MAX, 0, u64::MAX));
        assert!(tsc_within_tolerance(u32::MAX, u32::MAX - 1, u64::MAX));
    }

    #[test]
    fn deadline_moves_with_a_tsc_kvm_did_not_take() {
        let khz = Some(1_000_000); // 1e9 cycles a second
                                   // KVM took the TSC: the deadline stays.
        assert_eq!(rebase_deadline(5_000, 1_000, 1_100, khz), 5_000);
        // Disarmed stays disarmed.
        assert_eq!(rebase_deadline(0, 1_000, 50_000_000_000, khz), 0);
        // The TSC jumped ahead by 50 s: the deadline keeps its 4000 cycles of lead.
        assert_eq!(
            rebase_deadline(5_000, 1_000, 50_000_000_000, khz),
            50_000_004_000
        );
        // The TSC went back: same lead, not a deadline ages away.
        assert_eq!(
            rebase_deadline(90_000_000_000, 89_999_999_000, 10_000_000_000, khz),
            10_000_001_000
        );
        // Already passed: fires at once.
        assert_eq!(
            rebase_deadline(500, 1_000, 50_000_000_000, khz),
            50_000_000_000
        );
        assert_eq!(rebase_deadline(u64::MAX, 0, u64::MAX - 1, None), u64::MAX);
    }
}
