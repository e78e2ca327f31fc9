//! The timeline of a run: when loft built the VM, first entered the guest, when the guest reached
//! init (from the boot-timer port), asked to stop, and when loft was done; wall time and the
//! process's CPU time at each.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loft_devices::boot_timer::GuestMilestones;
use loft_devices::sync::lock;

/// A moment: wall time since the timeline's origin, and the process's CPU time then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    /// Wall time since the origin.
    pub wall: Duration,
    /// User + system CPU time of this process (all threads) at that moment.
    pub cpu: Duration,
}

/// Process CPU time so far (all threads).
pub fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// The phases of one run. A phase that was not reached is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootTimes {
    /// The VM is built: memory, kernel, devices, vCPUs.
    pub vm_built: Option<Mark>,
    /// vCPU 0 is about to enter the guest for the first time.
    pub first_entry: Option<Mark>,
    /// The guest kernel handed over to init.
    pub kernel_init: Option<Mark>,
    /// The guest's init runs in user space.
    pub user_init: Option<Mark>,
    /// The guest (or the host) asked the VM to stop.
    pub stop_request: Option<Mark>,
    /// loft stopped the VM and is done.
    pub exit: Option<Mark>,
    /// The VM was restored from a snapshot (it is then never "built" and its guest boots no
    /// more: `vm_built`, `kernel_init` and `user_init` stay unset).
    pub restored: Option<Mark>,
}

impl fmt::Display for BootTimes {
    /// `vm_built=W/C first_entry=W/C …`, W and C in milliseconds, `-` for phases not reached.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let phases = [
            ("vm_built", self.vm_built),
            ("first_entry", self.first_entry),
            ("kernel_init", self.kernel_init),
            ("user_init", self.user_init),
            ("stop_request", self.stop_request),
            ("exit", self.exit),
        ];
        let phases = if self.restored.is_some() {
            let mut with = phases.to_vec();
            with.insert(1, ("restored", self.restored));
            with
        } else {
            phases.to_vec()
        };
        for (i, (name, mark)) in phases.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match mark {
                Some(m) => write!(
                    f,
                    "{name}={:.3}/{:.3}",
                    m.wall.as_secs_f64() * 1e3,
                    m.cpu.as_secs_f64() * 1e3
                )?,
                None => write!(f, "{name}=-")?,
            }
        }
        Ok(())
    }
}

/// Collects the marks of one run as they happen, from any thread.
#[derive(Debug)]
pub struct Timeline {
    origin: Instant,
    times: Mutex<BootTimes>,
    /// Filled by the guest through the boot-timer port.
    pub guest: Arc<Mutex<GuestMilestones>>,
}

impl Timeline {
    /// A timeline whose origin is `origin` (the process start, for the CLI).
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            times: Mutex::new(BootTimes::default()),
            guest: Arc::new(Mutex::new(GuestMilestones::default())),
        }
    }

    fn mark_at(&self, at: Instant, cpu: Duration) -> Mark {
        Mark {
            wall: at.saturating_duration_since(self.origin),
            cpu,
        }
    }

    /// Records a phase once; later calls keep the first mark.
    pub fn mark(&self, phase: fn(&mut BootTimes) -> &mut Option<Mark>) {
        let m = self.mark_at(Instant::now(), process_cpu());
        let mut t = lock(&self.times);
        phase(&mut t).get_or_insert(m);
    }

    /// All marks so far.
    pub fn times(&self) -> BootTimes {
        let mut t = *lock(&self.times);
        let g = *lock(&self.guest);
        t.kernel_init = g.kernel_init.map(|s| self.mark_at(s.at, s.cpu));
        t.user_init = g.user_init.map(|s| self.mark_at(s.at, s.cpu));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_reached_and_missing_phases() {
        let t = BootTimes {
            vm_built: Some(Mark {
                wall: Duration::from_micros(1500),
                cpu: Duration::from_micros(250),
            }),
            ..Default::default()
        };
        assert_eq!(
            t.to_string(),
            "vm_built=1.500/0.250 first_entry=- kernel_init=- user_init=- stop_request=- exit=-"
        );
    }

    #[test]
    fn marks_once_and_merges_guest_milestones() {
        let tl = Timeline::new(Instant::now());
        tl.mark(|t| &mut t.vm_built);
        let first = tl.times().vm_built.unwrap();
        std::thread::sleep(Duration::from_millis(2));
        tl.mark(|t| &mut t.vm_built);
        assert_eq!(tl.times().vm_built, Some(first));
        assert!(tl.times().kernel_init.is_none());
        tl.guest.lock().unwrap().kernel_init = Some(loft_devices::boot_timer::Stamp {
            at: Instant::now(),
            cpu: process_cpu(),
        });
        let k = tl.times().kernel_init.unwrap();
        assert!(k.wall >= first.wall);
    }
}
