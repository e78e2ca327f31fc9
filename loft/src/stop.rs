//! Why a VM stopped, and how its threads tell the VMM.

use std::fmt;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked to reboot (i8042 reset or a KVM reset event): the normal way a loft guest
    /// ends.
    GuestReset,
    /// The guest shut down (triple fault or a KVM shutdown event).
    GuestShutdown,
    /// A vCPU halted with interrupts off and nothing left to wake it.
    Halted,
    /// The host asked the VM to stop.
    Stopped,
    /// The guest crashed (KVM crash event).
    GuestCrash,
    /// KVM could not run the guest (`KVM_EXIT_INTERNAL_ERROR`), e.g. an instruction its
    /// emulator does not handle.
    InternalError {
        /// The vCPU.
        cpu: u8,
        /// KVM's suberror (1 = emulation failure).
        suberror: u32,
        /// The guest's instruction pointer.
        rip: u64,
        /// The bytes at RIP, when they could be read.
        code: Vec<u8>,
    },
    /// The vCPU could not enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// The vCPU.
        cpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// The VM's own `loft` process ([`crate::VmBuilder::isolated`]) ended without saying why
    /// its VM stopped: it was killed (for example SIGKILL from outside), or crashed. Not clean.
    ProcessDied {
        /// Its exit code, when it exited.
        code: Option<i32>,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
    },
    /// A vCPU failed in a way loft does not handle.
    VcpuError {
        /// The vCPU.
        cpu: u8,
        /// What happened.
        message: String,
    },
}

impl StopReason {
    /// Whether this is a normal end of the guest (it asked to stop, or the host stopped it).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            StopReason::GuestReset
                | StopReason::GuestShutdown
                | StopReason::Halted
                | StopReason::Stopped
        )
    }
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::GuestReset => write!(f, "the guest rebooted"),
            StopReason::GuestShutdown => write!(f, "the guest shut down"),
            StopReason::Halted => write!(f, "the guest halted"),
            StopReason::Stopped => write!(f, "stopped by the host"),
            StopReason::ProcessDied {
                signal: Some(signal),
                ..
            } => write!(f, "the VM's loft process was killed by signal {signal}"),
            StopReason::ProcessDied { code, .. } => match code {
                Some(code) => write!(f, "the VM's loft process exited with code {code}"),
                None => write!(f, "the VM's loft process ended"),
            },
            StopReason::GuestCrash => write!(f, "the guest crashed"),
            StopReason::InternalError {
                cpu,
                suberror,
                rip,
                code,
            } => {
                let what = if *suberror == 1 {
                    " (emulation failure)"
                } else {
                    ""
                };
                write!(f, "KVM internal error on vCPU {cpu}: suberror {suberror}{what} at RIP {rip:#x}, code")?;
                if code.is_empty() {
                    write!(f, " unreadable")?;
                }
                for b in code {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            StopReason::FailEntry { cpu, reason } => {
                write!(
                    f,
                    "vCPU {cpu} failed to enter the guest: hardware reason {reason:#x}"
                )
            }
            StopReason::VcpuError { cpu, message } => write!(f, "vCPU {cpu}: {message}"),
        }
    }
}

/// Shared by the vCPUs, the devices and the VMM: the first reason reported wins, and the event
/// wakes the VMM's event loop.
#[derive(Debug)]
pub struct StopNotifier {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
}

impl StopNotifier {
    /// A notifier with a fresh event.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the VMM.
    pub fn notify(&self, reason: StopReason) {
        let mut slot = loft_devices::sync::lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the VMM to stop: {e}");
        }
    }

    /// The event that fires when a stop is requested. A device may write a clone of it directly
    /// (the i8042 does), which counts as [`StopReason::GuestReset`].
    pub fn event(&self) -> &EventFd {
        &self.evt
    }

    /// The recorded reason; a bare write to the event means the guest reset.
    pub fn reason(&self) -> StopReason {
        loft_devices::sync::lock(&self.reason)
            .clone()
            .unwrap_or(StopReason::GuestReset)
    }
}
