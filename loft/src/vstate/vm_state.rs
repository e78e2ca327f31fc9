//! The KVM state of the VM itself, for snapshots: the in-kernel PICs and IOAPIC, the PIT and
//! the kvmclock.

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, VmFd};
use serde::{Deserialize, Serialize};

/// Everything KVM holds about a VM besides its vCPUs and memory.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock, in guest nanoseconds (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// The host's wall-clock time when the clock was read, in nanoseconds since the Unix epoch:
    /// KVM's own reading when it gave one (`KVM_CLOCK_REALTIME`), else loft's.
    pub saved_at_ns: u64,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip is a union without Debug: its contents are left out.
        f.debug_struct("VmState")
            .field("pit", &self.pit)
            .field("clock", &self.clock)
            .field("saved_at_ns", &self.saved_at_ns)
            .finish_non_exhaustive()
    }
}

/// How the guest's clock goes on after a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockMode {
    /// From the saved value, as if no time had passed (the guest's wall clock then lags by the
    /// time the snapshot was kept, until something corrects it).
    Continue,
    /// From the saved value plus the host wall-clock time that passed since the save: the
    /// guest's clocks are right at once (through `KVM_CLOCK_REALTIME` when KVM has it).
    AdvanceByWallTime,
}

/// Errors saving or restoring the VM's state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A `KVM_GET_*` ioctl failed.
    #[error("cannot save the VM's {what}")]
    Get {
        /// The state being read.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A `KVM_SET_*` ioctl failed.
    #[error("cannot restore the VM's {what}")]
    Set {
        /// The state being set.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn get(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Get { what, source }
}

fn set(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Set { what, source }
}

fn irqchip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(get(what))?;
    Ok(chip)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Reads the VM's state. The vCPUs must be paused, or the state read is already stale.
pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
    let pic_master = irqchip(vm, KVM_IRQCHIP_PIC_MASTER, "master PIC")?;
    let pic_slave = irqchip(vm, KVM_IRQCHIP_PIC_SLAVE, "slave PIC")?;
    let ioapic = irqchip(vm, KVM_IRQCHIP_IOAPIC, "IOAPIC")?;
    let pit = vm.get_pit2().map_err(get("PIT"))?;
    let clock = vm.get_clock().map_err(get("kvmclock"))?;
    let saved_at_ns = if clock.flags & KVM_CLOCK_REALTIME != 0 {
        clock.realtime
    } else {
        now_ns()
    };
    Ok(VmState {
        pic_master,
        pic_slave,
        ioapic,
        pit,
        clock,
        saved_at_ns,
    })
}

/// Sets `state` on `vm` (created as [`super::vm::create`] does, with its irqchip and PIT), the
/// guest's clock going on from the saved value.
#[cfg(test)]
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    restore_with_clock(vm, state, ClockMode::Continue)
}

/// Sets `state` on `vm`, the guest's clock going on as `clock` says.
pub fn restore_with_clock(
    vm: &VmFd,
    state: &VmState,
    clock: ClockMode,
) -> Result<(), VmStateError> {
    // The chip ids come from loft, not from the file: each state goes to its own chip.
    for (mut chip, id, what) in [
        (state.pic_master, KVM_IRQCHIP_PIC_MASTER, "master PIC"),
        (state.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "slave PIC"),
        (state.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
    ] {
        chip.chip_id = id;
        vm.set_irqchip(&chip).map_err(set(what))?;
    }
    vm.set_pit2(&state.pit).map_err(set("PIT"))?;
    restore_clock(vm, state, clock)
}

/// Whether this KVM advances a restored clock by the wall time itself (`KVM_CLOCK_REALTIME` in
/// what `KVM_CAP_ADJUST_CLOCK` reports: Linux 5.16 and later, when the host clock is TSC-based).
pub fn kvm_clock_realtime(vm: &VmFd) -> bool {
    let flags = vm.check_extension_int(Cap::AdjustClock);
    flags > 0 && (flags as u32) & KVM_CLOCK_REALTIME != 0
}

/// Sets the kvmclock from `state.clock` as `mode` says.
pub fn restore_clock(vm: &VmFd, state: &VmState, mode: ClockMode) -> Result<(), VmStateError> {
    // Only the value (and the realtime pairing, when asked) is set: the other flags KVM
    // reports are not settable, and values from the file never reach the flags.
    let mut data = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    if mode == ClockMode::AdvanceByWallTime {
        if state.clock.flags & KVM_CLOCK_REALTIME != 0 && kvm_clock_realtime(vm) {
            // KVM adds the wall time since `realtime` itself, at the moment it sets the clock.
            data.flags = KVM_CLOCK_REALTIME;
            data.realtime = state.clock.realtime;
        } else {
            data.clock = data
                .clock
                .saturating_add(now_ns().saturating_sub(state.saved_at_ns));
        }
    }
    vm.set_clock(&data).map_err(set("kvmclock"))
}
