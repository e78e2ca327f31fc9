//! Model-specific registers: the ones every vCPU boots with, and the ones a snapshot saves and
//! sets again.

use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_MSR_ENTRIES};
use kvm_ioctls::VcpuFd;

/// The time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// The TSC-deadline timer's deadline, in guest TSC cycles (0: disarmed).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_KVM_WALL_CLOCK: u32 = 0x11;
const MSR_KVM_SYSTEM_TIME: u32 = 0x12;
const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
const MSR_MTRR_FIX_64K: u32 = 0x250;
const MSR_MTRR_FIX_16K: [u32; 2] = [0x258, 0x259];
const MSR_MTRR_FIX_4K_FIRST: u32 = 0x268;
const MSR_IA32_CR_PAT: u32 = 0x277;
const MSR_TSC_AUX: u32 = 0xc000_0103;
/// KVM's paravirtual MSRs: wall clock, kvmclock, async page faults, steal time, PV EOI, poll
/// control, async-PF interrupt and acknowledgement, migration control (`0x4b564d00` to `08`).
const MSR_KVM_PV_FIRST: u32 = 0x4b56_4d00;
const MSR_KVM_PV_COUNT: u32 = 9;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs every vCPU starts with: syscall entry points cleared, TSC at 0, fast strings on and
/// write-back as the default memory type.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// The boot MSRs as the FAM structure `KVM_SET_MSRS` takes.
pub fn boot_msrs() -> Msrs {
    // The list is a fixed handful of entries, far below the FAM wrapper's limit.
    Msrs::from_entries(&boot_msr_entries()).expect("boot MSR list fits in kvm_msrs")
}

/// The most MSRs a snapshot may hold: four times what one `KVM_GET_MSRS` takes, several times
/// what any KVM lists. A saved state with more is refused rather than fed to KVM.
pub const MAX_SAVED_MSRS: usize = 4 * KVM_MAX_MSR_ENTRIES;

/// Errors reading or writing a vCPU's MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// More MSRs than a snapshot may hold.
    #[error("{count} MSRs is more than loft saves or restores ({MAX_SAVED_MSRS})")]
    TooMany {
        /// How many there were.
        count: usize,
    },
    /// `KVM_GET_MSRS` failed as a whole.
    #[error("KVM_GET_MSRS failed")]
    Get(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` failed as a whole.
    #[error("KVM_SET_MSRS failed")]
    Set(#[source] kvm_ioctls::Error),
    /// `KVM_SET_MSRS` stopped at an MSR it did not accept.
    #[error("KVM refused MSR {index:#x} = {data:#x}")]
    Refused {
        /// The first MSR not set.
        index: u32,
        /// The value it was to get.
        data: u64,
    },
}

/// MSRs a snapshot saves even when `KVM_GET_MSR_INDEX_LIST` leaves them out (kvm_pvm lists
/// neither TSC_AUX nor the MTRRs, and loft itself sets MTRRdefType at boot): the MTRRs, TSC_AUX,
/// PAT, the TSC and its deadline, TSC_ADJUST, the syscall MSRs loft sets at boot and every
/// KVM paravirtual MSR. Those the vCPU cannot read are dropped when saving.
fn always_saved() -> impl Iterator<Item = u32> {
    let mtrr_var = MSR_MTRR_PHYS_BASE0..MSR_MTRR_PHYS_BASE0 + 16;
    let mtrr_fixed = std::iter::once(MSR_MTRR_FIX_64K)
        .chain(MSR_MTRR_FIX_16K)
        .chain(MSR_MTRR_FIX_4K_FIRST..MSR_MTRR_FIX_4K_FIRST + 8);
    [
        MSR_IA32_TSC,
        MSR_IA32_TSC_ADJUST,
        MSR_IA32_TSC_DEADLINE,
        MSR_KVM_WALL_CLOCK,
        MSR_KVM_SYSTEM_TIME,
        MSR_IA32_CR_PAT,
        MSR_MTRR_DEF_TYPE,
        MSR_TSC_AUX,
        MSR_IA32_MISC_ENABLE,
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_LSTAR,
        MSR_CSTAR,
        MSR_SYSCALL_MASK,
        MSR_KERNEL_GS_BASE,
    ]
    .into_iter()
    .chain(MSR_KVM_PV_FIRST..MSR_KVM_PV_FIRST + MSR_KVM_PV_COUNT)
    .chain(mtrr_var)
    .chain(mtrr_fixed)
}

/// The MSRs a snapshot saves, in the order they are set again: KVM's index list and
/// [`always_saved`], each once, the TSC first (KVM derives other clock state from it) and the
/// TSC deadline last (it only takes once the TSC and the LAPIC's timer mode are in place).
pub fn to_save(index_list: &[u32]) -> Vec<u32> {
    let mut seen = std::collections::HashSet::new();
    let mut list = vec![MSR_IA32_TSC];
    seen.insert(MSR_IA32_TSC);
    seen.insert(MSR_IA32_TSC_DEADLINE);
    for index in index_list.iter().copied().chain(always_saved()) {
        if seen.insert(index) {
            list.push(index);
        }
    }
    list.push(MSR_IA32_TSC_DEADLINE);
    list
}

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// Reads the MSRs `indices` from `vcpu`, in chunks `KVM_GET_MSRS` takes. `KVM_GET_MSRS` stops at
/// the first MSR it cannot read: that one is left out (and named in the second list) and the
/// read goes on after it.
pub fn read(vcpu: &VcpuFd, indices: &[u32]) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), MsrError> {
    if indices.len() > MAX_SAVED_MSRS {
        return Err(MsrError::TooMany {
            count: indices.len(),
        });
    }
    let mut read = Vec::with_capacity(indices.len());
    let mut unreadable = Vec::new();
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<_> = rest
            .iter()
            .take(KVM_MAX_MSR_ENTRIES)
            .map(|&i| entry(i, 0))
            .collect();
        let mut msrs =
            Msrs::from_entries(&chunk).map_err(|_| MsrError::TooMany { count: chunk.len() })?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(MsrError::Get)?
            .min(chunk.len());
        read.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            unreadable.push(chunk[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok((read, unreadable))
}

/// Writes `entries` to `vcpu` in order, in chunks `KVM_SET_MSRS` takes. Every one must be taken:
/// the first KVM refuses is the error.
pub fn write(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    if entries.len() > MAX_SAVED_MSRS {
        return Err(MsrError::TooMany {
            count: entries.len(),
        });
    }
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs =
            Msrs::from_entries(chunk).map_err(|_| MsrError::TooMany { count: chunk.len() })?;
        let n = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
        if let Some(refused) = chunk.get(n) {
            return Err(MsrError::Refused {
                index: refused.index,
                data: refused.data,
            });
        }
    }
    Ok(())
}

/// The value of `index` in `entries`, if there.
pub fn find(entries: &[kvm_msr_entry], index: u32) -> Option<u64> {
    entries.iter().find(|e| e.index == index).map(|e| e.data)
}
