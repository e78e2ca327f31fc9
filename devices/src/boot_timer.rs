//! A port the guest writes to at boot milestones, so loft can time them.
//!
//! The project's guest kernel, booted with `loft_boot_timer=PORT`, writes byte 1 to the port
//! the moment it hands over to init; its `/init` writes byte 2 once user space runs. Each
//! milestone's first write is recorded; later writes and other values are ignored, so a guest
//! cannot move a milestone or grow any state.
//!
//! Snapshots: [`BootTimer::save`] keeps which milestones were reached (their times belong to
//! the process that booted the guest); a timer restored from that state ignores them, so a
//! restored guest does not record them again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::bus::{lock, BusDevice};

/// The port loft puts the boot timer at.
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// One port.
pub const BOOT_TIMER_PORT_LEN: u64 = 1;
/// Byte the kernel writes when it starts init.
pub const KERNEL_INIT: u8 = 1;
/// Byte the guest's init writes once user space runs.
pub const USER_INIT: u8 = 2;

/// When a milestone happened: the wall clock, and the VMM process's CPU time then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Wall clock.
    pub at: Instant,
    /// CPU time of the VMM process.
    pub cpu: Duration,
}

/// When the guest reached each milestone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestMilestones {
    /// The kernel handed over to init.
    pub kernel_init: Option<Stamp>,
    /// Init reached user space.
    pub user_init: Option<Stamp>,
}

/// The saved state of the boot timer: which milestones the guest already reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimerState {
    /// The kernel handed over to init.
    pub kernel_init: bool,
    /// Init reached user space.
    pub user_init: bool,
}

/// The boot-timer port.
pub struct BootTimer {
    milestones: Arc<Mutex<GuestMilestones>>,
    cpu_clock: fn() -> Duration,
    /// Milestones reached before a snapshot this timer was restored from: not recorded again.
    reached: BootTimerState,
}

impl BootTimer {
    /// A timer recording into `milestones`, reading the process CPU time from `cpu_clock`.
    pub fn new(milestones: Arc<Mutex<GuestMilestones>>, cpu_clock: fn() -> Duration) -> Self {
        Self::restore(milestones, cpu_clock, &BootTimerState::default())
    }

    /// A timer as [`BootTimer::new`] makes, that ignores the milestones `state` says were
    /// reached before the snapshot.
    pub fn restore(
        milestones: Arc<Mutex<GuestMilestones>>,
        cpu_clock: fn() -> Duration,
        state: &BootTimerState,
    ) -> Self {
        Self {
            milestones,
            cpu_clock,
            reached: *state,
        }
    }

    /// Which milestones were reached, here or before the snapshot this timer was restored
    /// from.
    pub fn save(&self) -> BootTimerState {
        let m = lock(&self.milestones);
        BootTimerState {
            kernel_init: self.reached.kernel_init || m.kernel_init.is_some(),
            user_init: self.reached.user_init || m.user_init.is_some(),
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.len() != 1 {
            return;
        }
        let now = Stamp {
            at: Instant::now(),
            cpu: (self.cpu_clock)(),
        };
        let mut m = lock(&self.milestones);
        let slot = match data[0] {
            KERNEL_INIT if !self.reached.kernel_init => &mut m.kernel_init,
            USER_INIT if !self.reached.user_init => &mut m.user_init,
            _ => return,
        };
        slot.get_or_insert(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_write_of_each_milestone_only() {
        let m = Arc::new(Mutex::new(GuestMilestones::default()));
        let mut t = BootTimer::new(m.clone(), || Duration::from_millis(7));
        t.write(0, &[9]);
        t.write(0, &[KERNEL_INIT, 0]);
        assert_eq!(*m.lock().unwrap(), GuestMilestones::default());
        t.write(0, &[KERNEL_INIT]);
        let first = m.lock().unwrap().kernel_init.unwrap();
        t.write(0, &[KERNEL_INIT]);
        assert_eq!(m.lock().unwrap().kernel_init, Some(first));
        assert!(m.lock().unwrap().user_init.is_none());
        t.write(0, &[USER_INIT]);
        let user = m.lock().unwrap().user_init.unwrap();
        assert!(user.at >= first.at);
        assert_eq!(user.cpu, Duration::from_millis(7));
    }

    #[test]
    fn restored_timer_does_not_record_reached_milestones_again() {
        let m = Arc::new(Mutex::new(GuestMilestones::default()));
        let mut t = BootTimer::new(m.clone(), || Duration::ZERO);
        assert_eq!(t.save(), BootTimerState::default());
        t.write(0, &[KERNEL_INIT]);
        let state = t.save();
        assert_eq!(
            state,
            BootTimerState {
                kernel_init: true,
                user_init: false
            }
        );
        let json = serde_json::to_string(&state).unwrap();
        let back: BootTimerState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let m2 = Arc::new(Mutex::new(GuestMilestones::default()));
        let mut r = BootTimer::restore(m2.clone(), || Duration::ZERO, &back);
        r.write(0, &[KERNEL_INIT]);
        assert!(m2.lock().unwrap().kernel_init.is_none(), "recorded twice");
        r.write(0, &[USER_INIT]);
        assert!(m2.lock().unwrap().user_init.is_some());
        assert_eq!(
            r.save(),
            BootTimerState {
                kernel_init: true,
                user_init: true
            }
        );
    }
}
