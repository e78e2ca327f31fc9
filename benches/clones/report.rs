//! What the clones bench keeps: clones.json (every measurement) and clones.md (tables).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::host::{Busy, Host};
use crate::in_process::{Anatomy, CloneRun, RestoreAlone, Throughput};
use crate::mem::{self, Rollup};
use crate::processes::Proc;
use crate::stats::{fmt_num, fmt_spread, spread};

/// The host's memory (and, for one process, its smaps_rollup) at one moment.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MemPoint {
    pub mem_available_kib: Option<u64>,
    pub rollup: Option<Rollup>,
    pub load_avg: String,
    /// VMs of others running then (see host::others_vms).
    pub others_vms: usize,
}

impl MemPoint {
    pub fn now(pid: Option<&str>) -> MemPoint {
        MemPoint {
            mem_available_kib: mem::mem_available_kib(),
            rollup: pid.and_then(mem::rollup),
            load_avg: crate::host::load_avg(),
            others_vms: crate::host::others_vms(),
        }
    }
}

/// CPU time spent by idle clones over a window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Idle {
    pub clones: usize,
    pub window_s: f64,
    pub cpu_ms: f64,
    /// cpu ÷ window ÷ clones, in % of one host core.
    pub pct_core_per_clone: Option<f64>,
}

impl Idle {
    pub fn new(clones: usize, window: Duration, cpu_ms: f64) -> Idle {
        let w = window.as_secs_f64();
        Idle {
            clones,
            window_s: w,
            cpu_ms,
            pct_core_per_clone: (clones > 0 && w > 0.0)
                .then(|| cpu_ms / 1e3 / w / clones as f64 * 100.0),
        }
    }
}

/// N clones alive at once, each after its first exec.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Density {
    /// `in-process` or `processes`.
    pub mode: String,
    pub n: usize,
    /// Clones that got through their exec and were measured.
    pub ready: usize,
    /// Why fewer than `n` were started (MemAvailable floor, time limit).
    pub stopped_early: Option<String>,
    pub before: MemPoint,
    pub after: MemPoint,
    /// In-process: the process's smaps_rollup after − before; processes: the sum over the
    /// clone processes.
    pub total: Option<Rollup>,
    pub pss_per_clone_kib: Option<f64>,
    pub rss_per_clone_kib: Option<f64>,
    /// MemAvailable before − after (KiB; negative when it grew).
    pub mem_available_drop_kib: Option<i64>,
    pub idle: Option<Idle>,
    /// The step's start → every clone after its exec.
    pub ready_s: Option<f64>,
    /// Each clone's restore → exec result (processes: spawn → `ready` on stdout).
    pub to_exec_ms: Vec<f64>,
    pub kill_s: Option<f64>,
    pub after_kill_mem_available_kib: Option<u64>,
    pub processes_rollup: Option<Rollup>,
    pub processes: Vec<Proc>,
    pub errors: Vec<String>,
}

impl Density {
    pub fn new(mode: &str, n: usize) -> Density {
        Density {
            mode: mode.into(),
            n,
            ..Density::default()
        }
    }

    /// Fills the totals from `before`, `after` (and `processes_rollup`).
    pub fn finish(&mut self) {
        self.total = match (
            &self.processes_rollup,
            &self.before.rollup,
            &self.after.rollup,
        ) {
            (Some(p), _, _) => Some(*p),
            (None, Some(b), Some(a)) => Some(a.minus(b)),
            _ => None,
        };
        if self.ready > 0 {
            let n = self.ready as f64;
            self.pss_per_clone_kib = self.total.map(|t| t.pss_kib as f64 / n);
            self.rss_per_clone_kib = self.total.map(|t| t.rss_kib as f64 / n);
        }
        self.mem_available_drop_kib =
            match (self.before.mem_available_kib, self.after.mem_available_kib) {
                (Some(b), Some(a)) => Some(b as i64 - a as i64),
                _ => None,
            };
    }
}

/// The snapshot every clone comes from.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    pub memory_mib: u64,
    pub snapshot_dir: String,
    /// False when an existing snapshot was given with --snapshot.
    pub booted: bool,
    pub boot_to_agent_ms: Option<f64>,
    /// The booted VM, idle after its agent answered (this process's CPU, one VM).
    pub booted_idle: Option<Idle>,
    pub snapshot_and_stop_ms: Option<f64>,
    pub memory_file_bytes: Option<u64>,
    pub memory_on_disk_bytes: Option<u64>,
    /// One restore → exec → kill before anything is measured.
    pub warmup: Option<CloneRun>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Config {
    pub counts: Vec<usize>,
    pub threads: Vec<usize>,
    pub runs: usize,
    pub clones_per_thread_count: usize,
    pub restores: usize,
    pub jobs: usize,
    pub idle_s: f64,
    pub settle_s: f64,
    pub min_available_gib: f64,
    pub timeout_s: f64,
    pub clone_timeout_s: f64,
    pub loft_bin: String,
    pub guest_dir: String,
    pub commands: BTreeMap<String, String>,
    pub started_utc: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub host: Host,
    pub mem_total_kib: Option<u64>,
    pub host_cores: usize,
    pub config: Config,
    pub setup: Setup,
    pub restore_alone: Vec<RestoreAlone>,
    pub anatomy: Vec<Anatomy>,
    /// `strace` of `loft run --restore DIR -- true` (the syscalls step).
    pub traced: Vec<crate::syscalls::Traced>,
    pub throughput: Vec<Throughput>,
    pub density: Vec<Density>,
    pub notes: Vec<String>,
    pub busy: Busy,
    pub duration_s: f64,
}

pub fn write_json(path: &Path, r: &Report) -> Result<(), String> {
    let text = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

fn mib(kib: f64) -> String {
    fmt_num(kib / 1024.0)
}

fn opt(x: Option<f64>) -> String {
    x.map_or("–".into(), fmt_num)
}

fn med(v: &[f64]) -> String {
    fmt_spread(spread(v))
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let c = &r.config;
    let _ = writeln!(s, "# loft clones benchmark\n");
    let _ = writeln!(
        s,
        "Host: {} · {} GiB RAM · Linux {} · KVM {} · loft {} · {} · load average at the start {} \
         · the whole bench took {:.1} min.\n",
        r.host.cpu,
        r.mem_total_kib
            .map_or("?".into(), |k| format!("{:.1}", k as f64 / 1048576.0)),
        r.host.kernel,
        r.host.kvm_flavour,
        r.host.loft_commit,
        c.started_utc,
        r.host.load_avg,
        r.duration_s / 60.0
    );
    let _ = writeln!(
        s,
        "Command: `cargo bench --bench clones -- --counts {} --threads {} --runs {}` (defaults \
         for the rest). Every clone is a restore of one {} MiB, 1-vCPU snapshot taken when the \
         bundled guest's agent answered. Medians (min–max) unless said otherwise.\n",
        join(&c.counts),
        join(&c.threads),
        c.runs,
        r.setup.memory_mib
    );
    let _ = writeln!(s, "{}\n", crate::host::load_note(&r.host, &r.busy));

    // setup
    let st = &r.setup;
    let _ = writeln!(s, "## The snapshot\n");
    if let Some(e) = &st.error {
        let _ = writeln!(s, "**FAILED**: {e}\n");
    }
    let _ = writeln!(
        s,
        "{} · memory file {} MiB, {} MiB on disk · boot to agent {} s · snapshot_and_stop {} ms · \
         warm-up clone (restore → first exec) {} ms.\n",
        if st.booted {
            "booted by the bench"
        } else {
            "given with --snapshot"
        },
        st.memory_file_bytes
            .map_or("?".into(), |b| (b >> 20).to_string()),
        st.memory_on_disk_bytes
            .map_or("?".into(), |b| fmt_num(b as f64 / 1048576.0)),
        opt(st.boot_to_agent_ms.map(|m| m / 1e3)),
        opt(st.snapshot_and_stop_ms),
        opt(st.warmup.as_ref().and_then(|w| w.to_exec_ms)),
    );

    // density
    let _ = writeln!(s, "## Density: N clones alive, each after one exec\n");
    let _ = writeln!(
        s,
        "in-process = N clones restored in the bench process, `exec([\"true\"])` in each; the \
         process's `/proc/self/smaps_rollup` after − before. processes = N × `{}`, measured \
         once each printed `ready`; the sum of their smaps_rollup. MemAvailable drop = \
         `/proc/meminfo` before − after (host-wide: other users' VMs move it too). Idle CPU = \
         the clones' CPU time over {} s with nothing to do, per clone.\n",
        c.commands.get("processes").map_or("", |x| x.as_str()),
        fmt_num(c.idle_s)
    );
    let _ = writeln!(
        s,
        "| mode | N | ready | total PSS MiB | total RSS MiB | PSS/clone MiB | RSS/clone MiB | \
         anon PSS/clone MiB | MemAvailable drop MiB | drop/clone MiB | idle CPU, all N (cores) | \
         idle CPU/clone % core | all ready s | restore → exec ms |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for d in &r.density {
        let per = |x: Option<u64>| {
            x.filter(|_| d.ready > 0)
                .map_or("–".into(), |k| mib(k as f64 / d.ready as f64))
        };
        let _ = writeln!(
            s,
            "| {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            d.mode,
            d.n,
            d.ready,
            if d.stopped_early.is_some() || !d.errors.is_empty() {
                " ⚠"
            } else {
                ""
            },
            d.total.map_or("–".into(), |t| mib(t.pss_kib as f64)),
            d.total.map_or("–".into(), |t| mib(t.rss_kib as f64)),
            d.pss_per_clone_kib.map_or("–".into(), mib),
            d.rss_per_clone_kib.map_or("–".into(), mib),
            per(d.total.map(|t| t.pss_anon_kib)),
            d.mem_available_drop_kib
                .map_or("–".into(), |k| mib(k as f64)),
            d.mem_available_drop_kib
                .filter(|_| d.ready > 0)
                .map_or("–".into(), |k| mib(k as f64 / d.ready as f64)),
            d.idle
                .as_ref()
                .filter(|i| i.window_s > 0.0)
                .map_or("–".into(), |i| fmt_num(i.cpu_ms / 1e3 / i.window_s)),
            d.idle
                .as_ref()
                .and_then(|i| i.pct_core_per_clone)
                .map_or("–".into(), fmt_num),
            opt(d.ready_s),
            med(&d.to_exec_ms),
        );
    }
    let _ = writeln!(s);
    for mode in ["in-process", "processes"] {
        let one = r.density.iter().find(|d| d.mode == mode && d.n == 1);
        let ten = r.density.iter().find(|d| d.mode == mode && d.n == 10);
        if let (Some(one), Some(ten)) = (one, ten) {
            if let (Some(a), Some(b)) = (one.total, ten.total) {
                let ratio = b.pss_kib as f64 / a.pss_kib.max(1) as f64;
                let _ = writeln!(
                    s,
                    "- {mode}: total PSS of 10 clones = {}× one clone's (target ≤ 2×: {}).",
                    fmt_num(ratio),
                    if ratio <= 2.0 { "met" } else { "not met" }
                );
            }
        }
    }
    for d in r.density.iter().filter(|d| d.stopped_early.is_some()) {
        let _ = writeln!(
            s,
            "- {} N={}: stopped early: {}",
            d.mode,
            d.n,
            d.stopped_early.as_deref().unwrap_or("")
        );
    }
    for d in r.density.iter().filter(|d| !d.errors.is_empty()) {
        let _ = writeln!(
            s,
            "- {} N={}: {} error(s), the first: {}",
            d.mode,
            d.n,
            d.errors.len(),
            d.errors[0]
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "MemAvailable at each point. freed by the kill = after the kill − after: what the N \
         clones held, measured over a window of a second or less (the drop before − after spans \
         the whole step, during which other users' VMs come and go).\n"
    );
    let _ = writeln!(
        s,
        "| mode | N | MemAvailable before MiB | after MiB | after the kill MiB | freed by the kill MiB | freed/clone MiB | others' VMs before/after | load before → after | kill s |"
    );
    let _ = writeln!(
        s,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"
    );
    for d in &r.density {
        let m = |k: Option<u64>| k.map_or("–".into(), |k| mib(k as f64));
        let freed = match (d.after_kill_mem_available_kib, d.after.mem_available_kib) {
            (Some(k), Some(a)) => Some(k as i64 - a as i64),
            _ => None,
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {}/{} | {} → {} | {} |",
            d.mode,
            d.n,
            m(d.before.mem_available_kib),
            m(d.after.mem_available_kib),
            m(d.after_kill_mem_available_kib),
            freed.map_or("–".into(), |k| mib(k as f64)),
            freed
                .filter(|_| d.ready > 0)
                .map_or("–".into(), |k| mib(k as f64 / d.ready as f64)),
            d.before.others_vms,
            d.after.others_vms,
            d.before.load_avg,
            d.after.load_avg,
            opt(d.kill_s)
        );
    }
    let _ = writeln!(s);

    // throughput
    let _ = writeln!(
        s,
        "## Throughput: restore → first `exec([\"true\"])` from one process\n"
    );
    let _ = writeln!(
        s,
        "Each thread restores a clone, waits for its agent (the post-restore sync), runs `true`, \
         kills it, and again; {} clones per thread count and run, split among the threads, at \
         least 2 each. clones/s = ok clones ÷ wall \
         (kills included); per core = ÷ {} host cores. The target was ≥ 50 clones/s per core.\n",
        c.clones_per_thread_count, r.host_cores
    );
    let _ = writeln!(
        s,
        "| threads | run | ok/clones | wall s | clones/s | clones/s per core | restore ms | sync ms | first exec ms | restore → exec ms | kill ms | CPU ms/clone | load after |"
    );
    let _ = writeln!(
        s,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for t in &r.throughput {
        let col = |f: fn(&CloneRun) -> Option<f64>| {
            med(&t
                .runs
                .iter()
                .filter(|r| r.ok)
                .filter_map(f)
                .collect::<Vec<_>>())
        };
        let _ = writeln!(
            s,
            "| {} | {} | {}/{}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.threads,
            t.round,
            t.ok,
            t.clones,
            if t.stopped_early.is_some() {
                " ⚠"
            } else {
                ""
            },
            fmt_num(t.wall_s),
            fmt_num(t.clones_per_s),
            fmt_num(t.clones_per_s / r.host_cores.max(1) as f64),
            col(|r| r.restore_ms),
            col(|r| r.sync_ms),
            col(|r| r.exec_ms),
            col(|r| r.to_exec_ms),
            col(|r| r.kill_ms),
            opt(t.cpu_ms_per_clone),
            t.load_after
        );
    }
    if let Some(best) = r
        .throughput
        .iter()
        .map(|t| t.clones_per_s / r.host_cores.max(1) as f64)
        .max_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal))
    {
        let _ = writeln!(
            s,
            "\nBest: {} clones/s per core to the first exec's result (target ≥ 50: {}).",
            fmt_num(best),
            if best >= 50.0 { "met" } else { "not met" }
        );
    }
    for t in &r.throughput {
        if let Some(e) = t.runs.iter().find_map(|r| r.error.as_ref()) {
            let _ = writeln!(
                s,
                "\n- {} threads, run {}: an error: {e}",
                t.threads, t.round
            );
        }
    }
    let _ = writeln!(s);

    // restore alone
    let _ = writeln!(s, "## Restore alone\n");
    let _ = writeln!(
        s,
        "`Snapshot::open(dir)`, then `VmBuilder::new().restore_from(snapshot).start()` returning \
         (the guest then runs on its own thread), then `kill`; no exec. restored mark = start() \
         called → loft's `restored` boot-timer mark (memory mapped, KVM VM, irqchip and clock, \
         devices, vCPUs restored); the rest of start() is the VMM thread's spawn. Target: ≤ 5 ms \
         per restore.\n"
    );
    let _ = writeln!(
        s,
        "| threads | run | ok | open ms | start ms | restored mark ms | kill ms | CPU ms/restore | restores/s (wall, kills included) |"
    );
    let _ = writeln!(
        s,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for a in &r.restore_alone {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            a.threads,
            a.round,
            a.ok,
            med(&a.open_ms),
            med(&a.start_ms),
            med(&a.restored_mark_ms),
            med(&a.kill_ms),
            opt(a.cpu_ms_per_restore),
            fmt_num(a.ok as f64 / a.wall_s.max(1e-9))
        );
    }
    if let Some(one) = r.restore_alone.iter().find(|a| a.threads == 1) {
        if let Some(m) = crate::stats::median(&one.start_ms) {
            let _ = writeln!(
                s,
                "\nOne thread: start() takes {} ms (median; target ≤ 5 ms: {}).",
                fmt_num(m),
                if m <= 5.0 { "met" } else { "not met" }
            );
        }
    }
    for a in r.restore_alone.iter().filter(|a| !a.errors.is_empty()) {
        let _ = writeln!(
            s,
            "\n- {} threads: {} error(s), the first: {}",
            a.threads,
            a.errors.len(),
            a.errors[0]
        );
    }
    let _ = writeln!(s);

    // traced
    if !r.traced.is_empty() {
        let _ = writeln!(s, "## Inside a restore (strace)\n");
        let _ = writeln!(
            s,
            "`strace -f -T -tt loft run --restore DIR -- true`: execve → `KVM_CREATE_VM` (process \
             start, the state file read and checked) and `KVM_CREATE_VM` → the first `KVM_RUN` \
             (the restore), with the syscalls that took the most time in the latter. strace \
             adds a little to every syscall.\n"
        );
        let _ = writeln!(
            s,
            "| run | execve → KVM_CREATE_VM ms | KVM_CREATE_VM → KVM_RUN ms | largest syscalls (ms, count) |"
        );
        let _ = writeln!(s, "| ---: | ---: | ---: | --- |");
        for t in &r.traced {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {}{} |",
                t.round,
                opt(t.exec_to_create_vm_ms),
                opt(t.create_vm_to_run_ms),
                t.top
                    .iter()
                    .map(|(k, ms, n)| format!("{k} {} ×{n}", fmt_num(*ms)))
                    .collect::<Vec<_>>()
                    .join(", "),
                t.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (error: {e})"))
            );
        }
        let _ = writeln!(s);
    }

    // anatomy
    let _ = writeln!(s, "## Where one clone's time goes\n");
    let _ = writeln!(
        s,
        "One clone alone in the process, phase by phase: wall time, the process's CPU time \
         (user + system, all threads: the vCPU's guest time counts as system time here) and its \
         page faults (a guest page the clone touches first is a host page fault on the \
         vCPU thread). Medians over {} run(s).\n",
        r.anatomy.len()
    );
    let _ = writeln!(
        s,
        "| phase | wall ms | CPU ms | minor faults | major faults |"
    );
    let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: |");
    if let Some(first) = r.anatomy.iter().find(|a| a.error.is_none()) {
        for (i, p) in first.phases.iter().enumerate() {
            let col = |f: fn(&crate::in_process::Phase) -> f64| {
                med(&r
                    .anatomy
                    .iter()
                    .filter(|a| a.error.is_none())
                    .filter_map(|a| a.phases.get(i).map(f))
                    .collect::<Vec<_>>())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                p.name,
                col(|p| p.wall_ms),
                col(|p| p.cpu_ms),
                col(|p| p.minor_faults as f64),
                col(|p| p.major_faults as f64)
            );
        }
    }
    for a in r.anatomy.iter().filter(|a| a.error.is_some()) {
        let _ = writeln!(
            s,
            "\n- run {}: {}",
            a.round,
            a.error.as_deref().unwrap_or("")
        );
    }
    let idle_clone: Vec<f64> = r
        .anatomy
        .iter()
        .filter_map(|a| a.idle.as_ref()?.pct_core_per_clone)
        .collect();
    let _ = writeln!(
        s,
        "\nIdle: one restored clone after its execs uses {} % of a core; the VM the snapshot \
         was taken from used {} % while idle after its boot.\n",
        med(&idle_clone),
        st.booted_idle
            .as_ref()
            .and_then(|i| i.pct_core_per_clone)
            .map_or("– (not booted here)".into(), fmt_num)
    );

    if !r.notes.is_empty() {
        let _ = writeln!(s, "## Notes\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Commands\n");
    for (k, v) in &c.commands {
        let _ = writeln!(s, "- {k}: `{v}`");
    }
    s
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
