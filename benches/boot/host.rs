//! Facts about the host and the guest a bench runs with (shared by the boot and blk benches).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// The repository (the loft crate's manifest directory).
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug, Serialize)]
pub struct Host {
    pub cpu: String,
    pub kernel: String,
    pub kvm_flavour: String,
    pub loft_commit: String,
    /// 1, 5 and 15-minute load averages when the bench started (`/proc/loadavg`).
    pub load_avg: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn host_info() -> Host {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(REPO)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        None => "unknown".into(),
    };
    Host {
        cpu: format!("{model} ({cpus} CPUs)"),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        kvm_flavour: loft::KvmFlavour::detect().name().to_string(),
        loft_commit: commit,
        load_avg: load_avg(),
    }
}

/// The 1, 5 and 15-minute load averages, e.g. `1.50 1.41 1.45`.
pub fn load_avg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ppid(pid: &str) -> Option<u32> {
    // /proc/PID/stat: "pid (comm) state ppid …"; comm may hold spaces and parentheses
    let stat = read(&format!("/proc/{pid}/stat"));
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// VMs that others run now: `loft-vmm` threads (one per loft VM, CLI or library) and QEMU
/// processes, outside this process and its children.
pub fn others_vms() -> usize {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid.parse::<u32>().map_or(true, |p| p == me) || ppid(&pid) == Some(me) {
            continue;
        }
        if read(&format!("/proc/{pid}/comm")).starts_with("qemu-system") {
            n += 1;
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        n += tasks
            .flatten()
            .filter(|t| read(&t.path().join("comm").to_string_lossy()).trim() == "loft-vmm")
            .count();
    }
    n
}

/// How busy the machine was while a bench ran, from samples taken every few seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Busy {
    pub samples: usize,
    pub load_1m_min: f64,
    pub load_1m_mean: f64,
    pub load_1m_max: f64,
    /// Others' VMs ([`others_vms`]) at once: the most, and on average.
    pub others_vms_max: usize,
    pub others_vms_mean: f64,
}

/// Samples the 1-minute load average and [`others_vms`] on a thread of its own.
pub struct BusySampler {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Vec<(f64, usize)>>,
}

impl BusySampler {
    /// Samples now, then every `every` until [`BusySampler::finish`].
    pub fn start(every: std::time::Duration) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut v = Vec::new();
            let mut last = false;
            loop {
                let load = read("/proc/loadavg")
                    .split_whitespace()
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(f64::NAN);
                v.push((load, others_vms()));
                if last {
                    return v;
                }
                // woken by finish(): one last sample
                last = !matches!(
                    stopped.recv_timeout(every),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
            }
        });
        BusySampler { stop, thread }
    }

    /// Takes a last sample and sums them up.
    pub fn finish(self) -> Busy {
        let _ = self.stop.send(());
        let v = self.thread.join().unwrap_or_default();
        if v.is_empty() {
            return Busy::default();
        }
        let n = v.len() as f64;
        let loads = v.iter().map(|x| x.0);
        Busy {
            samples: v.len(),
            load_1m_min: loads.clone().fold(f64::INFINITY, f64::min),
            load_1m_mean: loads.clone().sum::<f64>() / n,
            load_1m_max: loads.fold(f64::NEG_INFINITY, f64::max),
            others_vms_max: v.iter().map(|x| x.1).max().unwrap_or(0),
            others_vms_mean: v.iter().map(|x| x.1 as f64).sum::<f64>() / n,
        }
    }
}

/// One sentence on how busy the machine was, for a report.
pub fn load_note(host: &Host, busy: &Busy) -> String {
    format!(
        "machine load while the bench ran ({} samples): 1-minute load average {:.1}–{:.1} \
         (mean {:.1}) on {}; VMs of others (loft VMs in other processes, QEMU) running at the \
         same time: up to {}, {:.1} on average. Load avg at the start: {}. On a busy machine \
         every number stretches, guest boots most.",
        busy.samples,
        busy.load_1m_min,
        busy.load_1m_max,
        busy.load_1m_mean,
        host.cpu,
        busy.others_vms_max,
        busy.others_vms_mean,
        host.load_avg
    )
}

/// LOFT_GUEST_DIR, else <repo>/target/guest when it has vmlinux + initramfs.cpio, else the
/// prebuilt <repo>/../shared/guest.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOFT_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let built = Path::new(REPO).join("target/guest");
    if built.join("vmlinux").is_file() && built.join("initramfs.cpio").is_file() {
        return built;
    }
    Path::new(REPO).join("../shared/guest")
}

pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A printable form of a command (for the report).
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
