//! A port the guest writes to at boot milestones, so loft can time them.
//!
//! The project's guest kernel, booted with `loft_boot_timer=PORT`, writes byte 1 to the port
//! the moment it hands over to init; its `/init` writes byte 2 once user space runs. Each
//! milestone's first write is recorded; later writes and other values are ignored, so a guest
//! cannot move a milestone or grow any state.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// The boot-timer port.
pub struct BootTimer {
    milestones: Arc<Mutex<GuestMilestones>>,
    cpu_clock: fn() -> Duration,
}

impl BootTimer {
    /// A timer recording into `milestones`, reading the process CPU time from `cpu_clock`.
    pub fn new(milestones: Arc<Mutex<GuestMilestones>>, cpu_clock: fn() -> Duration) -> Self {
        Self {
            milestones,
            cpu_clock,
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
            KERNEL_INIT => &mut m.kernel_init,
            USER_INIT => &mut m.user_init,
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
}
