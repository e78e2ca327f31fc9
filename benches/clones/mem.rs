//! What the kernel says about memory and CPU: `/proc/PID/smaps_rollup`, `/proc/meminfo`,
//! `/proc/PID/stat` and this process's rusage.

use serde::Serialize;

/// The totals of `/proc/PID/smaps_rollup`, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rollup {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
    pub private_dirty_kib: u64,
    pub anonymous_kib: u64,
}

impl Rollup {
    /// `self - base`, field by field (a field that shrank gives 0).
    pub fn minus(&self, base: &Rollup) -> Rollup {
        Rollup {
            rss_kib: self.rss_kib.saturating_sub(base.rss_kib),
            pss_kib: self.pss_kib.saturating_sub(base.pss_kib),
            pss_anon_kib: self.pss_anon_kib.saturating_sub(base.pss_anon_kib),
            pss_file_kib: self.pss_file_kib.saturating_sub(base.pss_file_kib),
            private_dirty_kib: self
                .private_dirty_kib
                .saturating_sub(base.private_dirty_kib),
            anonymous_kib: self.anonymous_kib.saturating_sub(base.anonymous_kib),
        }
    }

    /// The sum of several processes' rollups.
    pub fn sum<'a>(it: impl IntoIterator<Item = &'a Rollup>) -> Rollup {
        it.into_iter().fold(Rollup::default(), |a, r| Rollup {
            rss_kib: a.rss_kib + r.rss_kib,
            pss_kib: a.pss_kib + r.pss_kib,
            pss_anon_kib: a.pss_anon_kib + r.pss_anon_kib,
            pss_file_kib: a.pss_file_kib + r.pss_file_kib,
            private_dirty_kib: a.private_dirty_kib + r.private_dirty_kib,
            anonymous_kib: a.anonymous_kib + r.anonymous_kib,
        })
    }
}

/// A `Name:   1234 kB` line's number.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// Parses a smaps_rollup text; `None` without an `Rss` line.
pub fn parse_rollup(text: &str) -> Option<Rollup> {
    Some(Rollup {
        rss_kib: kib_field(text, "Rss")?,
        pss_kib: kib_field(text, "Pss").unwrap_or(0),
        pss_anon_kib: kib_field(text, "Pss_Anon").unwrap_or(0),
        pss_file_kib: kib_field(text, "Pss_File").unwrap_or(0),
        private_dirty_kib: kib_field(text, "Private_Dirty").unwrap_or(0),
        anonymous_kib: kib_field(text, "Anonymous").unwrap_or(0),
    })
}

/// `/proc/PID/smaps_rollup` (`pid` may be `self`).
pub fn rollup(pid: &str) -> Option<Rollup> {
    parse_rollup(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

/// `MemAvailable` of `/proc/meminfo`, KiB.
pub fn mem_available_kib() -> Option<u64> {
    kib_field(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable",
    )
}

/// `MemTotal` of `/proc/meminfo`, KiB.
pub fn mem_total_kib() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal")
}

/// User + system CPU time of process `pid` so far (`/proc/PID/stat`), ms.
pub fn proc_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat.rsplit_once(')')?.1.split_whitespace();
    // after the comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    // utime stime
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 * 1e3 / hz)
}

/// This process's CPU time (all threads, user + system) and minor page faults so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub cpu_ms: f64,
    pub minflt: u64,
    pub majflt: u64,
}

impl Usage {
    pub fn now() -> Usage {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
        Usage {
            cpu_ms: ms(ru.ru_utime) + ms(ru.ru_stime),
            minflt: ru.ru_minflt as u64,
            majflt: ru.ru_majflt as u64,
        }
    }

    pub fn since(&self, earlier: &Usage) -> Usage {
        Usage {
            cpu_ms: self.cpu_ms - earlier.cpu_ms,
            minflt: self.minflt.saturating_sub(earlier.minflt),
            majflt: self.majflt.saturating_sub(earlier.majflt),
        }
    }
}

/// The thread ids of process `pid` (`self` for this one).
pub fn tids(pid: &str) -> std::collections::BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The name of thread `tid` of this process.
pub fn comm(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Puts threads under `SCHED_IDLE` (they run only when nothing else on the host wants the CPU)
/// or back under `SCHED_OTHER`; threads that are gone are skipped.
pub fn park(tids: impl IntoIterator<Item = u32>, idle: bool) {
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    for tid in tids {
        // SAFETY: a plain syscall on a thread id with a valid sched_param.
        unsafe { libc::sched_setscheduler(tid as libc::pid_t, policy, &param) };
    }
}

// cargo builds this harness=false bench with cfg(test) but without #[test] functions
#[cfg(test)]
#[allow(unused_imports, dead_code)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_rollup() {
        let text = "\
5566e248f000-7ffdfbd31000 ---p 00000000 00:00 0                          [rollup]
Rss:               20640 kB
Pss:               17871 kB
Pss_Dirty:          1704 kB
Pss_Anon:           1696 kB
Pss_File:          16175 kB
Private_Dirty:      1704 kB
Anonymous:          1696 kB
";
        let r = parse_rollup(text).unwrap();
        assert_eq!(r.rss_kib, 20640);
        assert_eq!(r.pss_kib, 17871);
        assert_eq!(r.pss_anon_kib, 1696);
        assert_eq!(r.pss_file_kib, 16175);
        assert_eq!(r.private_dirty_kib, 1704);
        assert_eq!(parse_rollup("nothing"), None);
    }
}
