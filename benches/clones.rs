//! Clones benchmark: how many restores of one agent-ready snapshot fit in memory and how fast
//! they come, with clones.json (every measurement) and clones.md (tables) as results.
//!
//! ```sh
//! cargo bench --bench clones -- [--counts 1,10,50] [--threads 1,10] [--runs N] [--out DIR]
//! ```
//!
//! 1. Setup: the library boots the bundled guest (256 MiB), waits for its agent, measures it
//!    idle, and snapshots it with `snapshot_and_stop`; one warm-up clone.
//! 2. Restore alone: `Snapshot::open` + `restore_from(..).start()` + `kill`, no exec, on one
//!    thread and on the most threads of `--threads`.
//! 3. Where one clone's time goes: open, start, sync, first and second `exec(["true"])`, idle,
//!    kill, with the process's CPU time and page faults per phase.
//! 4. Throughput: restore → sync → `exec(["true"])` → kill in a loop on each thread count.
//! 5. Density, per N of `--counts`: N clones in this process, each after one `exec(["true"])`
//!    (PSS/RSS from /proc/self/smaps_rollup before and after); then N `loft run --restore`
//!    processes, each after its one guest command printed `ready` (the sum of their
//!    smaps_rollup); the host's MemAvailable before and after; all killed before the next step.

#[allow(dead_code)] // shared with the boot bench
#[path = "boot/host.rs"]
mod host;
#[path = "clones/in_process.rs"]
mod in_process;
#[path = "clones/mem.rs"]
mod mem;
#[path = "clones/processes.rs"]
mod processes;
#[path = "clones/report.rs"]
mod report;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/stats.rs"]
mod stats;
#[path = "clones/syscalls.rs"]
mod syscalls;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use host::{guest_dir, host_info, show, utc_now, REPO};
use report::{Config, Report, Setup};

const LOFT_BIN: &str = env!("CARGO_BIN_EXE_loft");

const USAGE: &str = "\
usage: cargo bench --bench clones -- [--counts 1,10,50] [--threads 1,10] [--runs N]
                                     [--clones N] [--restores N] [--jobs N] [--memory MIB]
                                     [--snapshot DIR] [--steps LIST] [--out DIR]
                                     [--min-available GIB] [--idle SECS] [--timeout SECS]
                                     [--clone-timeout SECS]

  --counts LIST     clones alive at once in the density steps (default 1,10,50)
  --threads LIST    thread counts of the throughput step (default 1,10)
  --runs N          runs of the restore-alone, one-clone and throughput steps (default 1)
  --clones N        clones per thread count and run in the throughput step, split among
                    the threads, at least 2 per thread (default 10)
  --restores N      restores per run in the restore-alone step (default 30)
  --jobs N          clones started at once in the density steps (default 1: on 2 cores
                    two at once took longer than one after the other)
  --memory MIB      guest memory of the snapshot (default 256)
  --snapshot DIR    use this agent-ready snapshot instead of booting one
  --steps LIST      any of restore,syscalls,anatomy,throughput,in-process,
                    processes (default all)
  --out DIR         where clones.json, clones.md and logs/ go (default target/bench/clones)
  --min-available GIB  start no clone while the host's MemAvailable is below this (default 4)
  --idle SECS       how long idle clones are watched for their CPU use (default 3)
  --timeout SECS    time limit of the boot and of a processes density step (default 600)
  --clone-timeout SECS  time limit of an in-process clone's sync and of its exec (default 120)

Time: on a nested kvm_pvm host (2 cores, busy with others' VMs) where a clone's first
command costs 1-2 s of CPU alone and several times that when clones run at once, the
default run takes ~15-18 min: the boot ~1-2.5 min, the 10-thread throughput ~3 min, the
N=50 density steps ~4-6 min each; the rest takes ~2 min. --snapshot DIR saves the boot;
--counts 1,10 --threads 1,4 takes ~5 min.

environment: LOFT_GUEST_DIR (guest kernel + initramfs), LOFT_BIN (loft binary)";

const STEPS: [&str; 6] = [
    "restore",
    "syscalls",
    "anatomy",
    "throughput",
    "in-process",
    "processes",
];

struct Args {
    counts: Vec<usize>,
    threads: Vec<usize>,
    runs: usize,
    clones: usize,
    restores: usize,
    jobs: usize,
    memory_mib: u64,
    snapshot: Option<PathBuf>,
    steps: Vec<String>,
    out: PathBuf,
    min_available_gib: f64,
    idle: f64,
    timeout: f64,
    clone_timeout: f64,
}

fn parse_list(flag: &str, list: &str) -> Result<Vec<usize>, String> {
    let v: Vec<usize> = list
        .split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag}: '{w}' is not a positive number"))
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(format!("{flag} names nothing"));
    }
    Ok(v)
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .ok()
        .filter(|x| *x > T::default())
        .ok_or_else(|| format!("{flag} needs a positive number, not '{v}'"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        counts: vec![1, 10, 50],
        threads: vec![1, 10],
        runs: 1,
        clones: 10,
        restores: 30,
        jobs: 1,
        memory_mib: 256,
        snapshot: None,
        steps: STEPS.iter().map(|s| s.to_string()).collect(),
        out: Path::new(REPO).join("target/bench/clones"),
        min_available_gib: 4.0,
        idle: 3.0,
        timeout: 600.0,
        clone_timeout: 120.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value\n\n{USAGE}"))
        };
        match flag.as_str() {
            "--counts" => a.counts = parse_list("--counts", &value("--counts")?)?,
            "--threads" => a.threads = parse_list("--threads", &value("--threads")?)?,
            "--runs" => a.runs = positive("--runs", &value("--runs")?)?,
            "--clones" => a.clones = positive("--clones", &value("--clones")?)?,
            "--restores" => a.restores = positive("--restores", &value("--restores")?)?,
            "--jobs" => a.jobs = positive("--jobs", &value("--jobs")?)?,
            "--memory" => a.memory_mib = positive("--memory", &value("--memory")?)?,
            "--snapshot" => a.snapshot = Some(PathBuf::from(value("--snapshot")?)),
            "--steps" => {
                let v = value("--steps")?;
                a.steps = v.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = a.steps.iter().find(|s| !STEPS.contains(&s.as_str())) {
                    return Err(format!("--steps: unknown step '{bad}'\n\n{USAGE}"));
                }
            }
            "--out" => a.out = PathBuf::from(value("--out")?),
            "--min-available" => {
                a.min_available_gib = value("--min-available")?
                    .parse()
                    .ok()
                    .filter(|x: &f64| *x >= 0.0)
                    .ok_or("--min-available needs a number of GiB")?
            }
            "--idle" => a.idle = positive("--idle", &value("--idle")?)?,
            "--timeout" => a.timeout = positive("--timeout", &value("--timeout")?)?,
            "--clone-timeout" => {
                a.clone_timeout = positive("--clone-timeout", &value("--clone-timeout")?)?
            }
            // cargo bench appends --bench to a harness=false bench's arguments
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'\n\n{USAGE}")),
        }
    }
    Ok(a)
}

/// No clone is started while the host's MemAvailable is below this.
pub struct Floor {
    pub kib: u64,
}

impl Floor {
    pub fn check(&self) -> Result<(), String> {
        match mem::mem_available_kib() {
            Some(k) if k < self.kib => Err(format!(
                "MemAvailable {:.2} GiB is below the floor of {:.2} GiB",
                k as f64 / 1048576.0,
                self.kib as f64 / 1048576.0
            )),
            _ => Ok(()),
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("clones bench: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clones bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Boots the guest, waits for its agent, watches it idle, snapshots it into `dir`.
fn boot_and_snapshot(
    gdir: &Path,
    args: &Args,
    dir: &Path,
    setup: &mut Setup,
) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    let t0 = Instant::now();
    let vm = loft::VmBuilder::new()
        .guest_dir(gdir)
        .memory_mib(args.memory_mib)
        .agent_timeout(Duration::from_secs_f64(args.timeout))
        .start()
        .map_err(|e| format!("boot: {}", loft::error::chain(&e)))?;
    vm.wait_for_agent()
        .map_err(|e| format!("boot: agent: {}", loft::error::chain(&e)))?;
    setup.boot_to_agent_ms = Some(ms(t0.elapsed()));
    eprintln!(
        "clones bench: booted to the agent in {:.1} s; watching it idle for {} s",
        t0.elapsed().as_secs_f64(),
        args.idle
    );
    setup.booted_idle = Some(in_process::idle_self(1, Duration::from_secs_f64(args.idle)));
    let t = Instant::now();
    vm.snapshot_and_stop(dir)
        .map_err(|e| format!("snapshot_and_stop: {}", loft::error::chain(&e)))?;
    setup.snapshot_and_stop_ms = Some(ms(t.elapsed()));
    setup.booted = true;
    Ok(())
}

fn bench(args: Args) -> Result<(), String> {
    let started = Instant::now();
    let out = &args.out;
    let logs = out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let work = out.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;

    let host = host_info();
    let started_utc = utc_now();
    let gdir = guest_dir();
    let loft = std::env::var_os("LOFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LOFT_BIN));
    let timeout = Duration::from_secs_f64(args.timeout);
    let clone_timeout = Duration::from_secs_f64(args.clone_timeout);
    let idle = Duration::from_secs_f64(args.idle);
    let settle = Duration::from_secs(1);
    let floor = Floor {
        kib: (args.min_available_gib * 1048576.0) as u64,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let step = |name: &str| args.steps.iter().any(|s| s == name);
    let mut notes: Vec<String> = Vec::new();
    eprintln!(
        "clones bench: counts {:?}, threads {:?}, {} runs; guest {}; host {} / {} / {}; load {}; \
         MemAvailable {:.1} GiB",
        args.counts,
        args.threads,
        args.runs,
        gdir.display(),
        host.cpu,
        host.kernel,
        host.kvm_flavour,
        host.load_avg,
        mem::mem_available_kib().unwrap_or(0) as f64 / 1048576.0
    );
    let sampler = host::BusySampler::start(Duration::from_secs(10));

    // 1. the snapshot
    let mut setup = Setup {
        memory_mib: args.memory_mib,
        ..Setup::default()
    };
    let dir = match &args.snapshot {
        Some(d) => d.clone(),
        None => work.join("snapshot"),
    };
    setup.snapshot_dir = dir.display().to_string();
    if args.snapshot.is_none() {
        eprintln!(
            "clones bench: booting a {} MiB guest to its agent (1-2.5 min here)",
            args.memory_mib
        );
        if let Err(e) = boot_and_snapshot(&gdir, &args, &dir, &mut setup) {
            setup.error = Some(e);
        }
    }
    let snapshot = match loft::Snapshot::open(&dir) {
        Ok(s) => {
            let info = s.info();
            setup.memory_mib = info.memory >> 20;
            Some(s)
        }
        Err(e) => {
            setup.error.get_or_insert_with(|| {
                format!("open {}: {}", dir.display(), loft::error::chain(&e))
            });
            None
        }
    };
    let meta = std::fs::metadata(dir.join("memory")).ok();
    setup.memory_file_bytes = meta.as_ref().map(|m| m.len());
    setup.memory_on_disk_bytes = meta.as_ref().map(|m| m.blocks() * 512);

    let mut restore_alone = Vec::new();
    let mut anatomy = Vec::new();
    let mut traced = Vec::new();
    let mut throughput = Vec::new();
    let mut density = Vec::new();
    let max_threads = args.threads.iter().copied().max().unwrap_or(1);
    if let Some(snapshot) = &snapshot {
        let w = in_process::cycle(snapshot, clone_timeout, 0);
        eprintln!(
            "clones bench: warm-up clone: restore → exec {} ms{}",
            w.to_exec_ms.map_or("–".into(), stats::fmt_num),
            w.error
                .as_ref()
                .map_or(String::new(), |e| format!(", error: {e}"))
        );
        setup.warmup = Some(w);

        for round in 1..=args.runs {
            if step("restore") {
                let mut thread_counts = vec![1];
                if max_threads > 1 {
                    thread_counts.push(max_threads);
                }
                for t in thread_counts {
                    let per = args.restores.div_ceil(t);
                    let a = in_process::restore_alone(&dir, t, per, clone_timeout, round);
                    eprintln!(
                        "[{round}/{}] restore alone, {t} thread(s): {} ok, start {} ms, \
                         open {} ms, kill {} ms{}",
                        args.runs,
                        a.ok,
                        stats::fmt_spread(stats::spread(&a.start_ms)),
                        stats::fmt_spread(stats::spread(&a.open_ms)),
                        stats::fmt_spread(stats::spread(&a.kill_ms)),
                        a.errors
                            .first()
                            .map_or(String::new(), |e| format!(", error: {e}"))
                    );
                    restore_alone.push(a);
                }
            }
            if step("syscalls") {
                for _ in 0..3 {
                    match syscalls::trace(&loft, &dir, &logs, traced.len() + 1) {
                        None => {
                            eprintln!("clones bench: no strace: the syscalls step is skipped");
                            break;
                        }
                        Some(t) => {
                            eprintln!(
                                "[{round}/{}] traced restore: KVM_CREATE_VM → KVM_RUN {} ms; {}{}",
                                args.runs,
                                t.create_vm_to_run_ms.map_or("–".into(), stats::fmt_num),
                                t.top
                                    .iter()
                                    .map(|(k, ms, n)| format!("{k} {ms:.2} ms ×{n}"))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                t.error
                                    .as_ref()
                                    .map_or(String::new(), |e| format!(", error: {e}"))
                            );
                            traced.push(t);
                        }
                    }
                }
            }
            if step("anatomy") {
                let a = in_process::anatomy(&dir, clone_timeout, idle, round);
                eprintln!(
                    "[{round}/{}] one clone: {}{}",
                    args.runs,
                    a.phases
                        .iter()
                        .map(|p| format!("{} {:.1} ms (CPU {:.1})", p.name, p.wall_ms, p.cpu_ms))
                        .collect::<Vec<_>>()
                        .join(", "),
                    a.error
                        .as_ref()
                        .map_or(String::new(), |e| format!(", error: {e}"))
                );
                anatomy.push(a);
            }
            if step("throughput") {
                for &t in &args.threads {
                    let per = args.clones.div_ceil(t).max(2);
                    let r = in_process::throughput(snapshot, t, per, clone_timeout, &floor, round);
                    eprintln!(
                        "[{round}/{}] throughput, {t} thread(s): {}/{} ok in {:.1} s = {:.2} \
                         clones/s, CPU {} ms/clone{}",
                        args.runs,
                        r.ok,
                        r.clones,
                        r.wall_s,
                        r.clones_per_s,
                        r.cpu_ms_per_clone.map_or("–".into(), stats::fmt_num),
                        r.runs
                            .iter()
                            .find_map(|x| x.error.as_ref())
                            .map_or(String::new(), |e| format!(", error: {e}"))
                    );
                    throughput.push(r);
                }
            }
        }

        for &n in &args.counts {
            if step("in-process") {
                let d = in_process::density(
                    snapshot,
                    n,
                    args.jobs,
                    clone_timeout,
                    idle,
                    settle,
                    &floor,
                );
                log_density(&d);
                density.push(d);
                std::thread::sleep(settle);
            }
            if step("processes") {
                let d = processes::density(
                    &loft, &dir, n, args.jobs, timeout, idle, settle, &floor, &logs,
                );
                log_density(&d);
                density.push(d);
                std::thread::sleep(settle);
            }
        }
    }
    let busy = sampler.finish();
    if args.snapshot.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }

    let mut commands = BTreeMap::new();
    commands.insert(
        "processes".to_string(),
        show(&processes::command(&loft, Path::new("DIR"))),
    );
    commands.insert(
        "in-process".to_string(),
        "Snapshot::open(DIR); VmBuilder::new().restore_from(snapshot.clone()).start(); \
         wait_for_agent(); exec(&ExecRequest::new([\"true\"]))"
            .to_string(),
    );
    notes.push(format!(
        "the density steps start {} clone(s) at a time (--jobs) and measure {} s after the last \
         one is ready; no clone is started while MemAvailable is below {} GiB \
         (--min-available). A clone that ran its exec is parked (its threads under SCHED_IDLE) \
         until all N are ready: an idle clone's guest ticks cost a good part of a core here, \
         and 49 of them would starve the 50th clone's exec; all are back under SCHED_OTHER for \
         the idle window, which therefore shows what N idle clones take when they may",
        args.jobs,
        settle.as_secs(),
        args.min_available_gib
    ));
    notes.push(
        "in-process PSS counts each page once for the process however many clones map it, so \
         the delta is what the clones added; a page of the snapshot's memory file that only \
         one clone maps is its full size there. processes: the page cache pages of the memory \
         file (and the loft binary) are split among the processes mapping them"
            .into(),
    );
    notes.push(format!(
        "an in-process clone whose sync or first exec takes longer than {} s (--clone-timeout) \
         counts as failed and is killed. A guest whose vCPU gets less CPU than its periodic \
         100 Hz tick costs (the idle figures below: a good part of a core on a nested kvm_pvm \
         host) makes next to no progress, so many clones at once on few busy cores can take \
         minutes each",
        args.clone_timeout
    ));
    notes.push(
        "the load average counts runnable threads: parked clones' vCPU threads are runnable \
         while their guests' ticks wait, so during the N=50 steps most of it is this bench's \
         own parked clones, not other users"
            .into(),
    );
    notes.push(
        "MemAvailable is host-wide: other users' VMs starting and stopping move it by a few \
         hundred MiB on their own, so a drop smaller than that (or a negative one) says little"
            .into(),
    );
    notes.push(
        "MemAvailable counts clean page cache as available, so the clones' shared file pages \
         barely move it: its drop is their private (written) pages, page tables and the \
         kernel's per-VM memory (KVM's shadow/EPT page tables, vCPU state), which PSS does \
         not show"
            .into(),
    );
    let rep = Report {
        host,
        mem_total_kib: mem::mem_total_kib(),
        host_cores: cores,
        config: Config {
            counts: args.counts.clone(),
            threads: args.threads.clone(),
            runs: args.runs,
            clones_per_thread_count: args.clones,
            restores: args.restores,
            jobs: args.jobs,
            idle_s: args.idle,
            settle_s: settle.as_secs_f64(),
            min_available_gib: args.min_available_gib,
            timeout_s: args.timeout,
            clone_timeout_s: args.clone_timeout,
            loft_bin: loft.display().to_string(),
            guest_dir: gdir.display().to_string(),
            commands,
            started_utc,
        },
        setup,
        restore_alone,
        anatomy,
        traced,
        throughput,
        density,
        notes,
        busy,
        duration_s: started.elapsed().as_secs_f64(),
    };
    let json = out.join("clones.json");
    report::write_json(&json, &rep)?;
    let md = report::markdown(&rep);
    let md_path = out.join("clones.md");
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    println!("\n{md}");
    eprintln!(
        "clones bench: wrote {}, {} in {:.1} min",
        json.display(),
        md_path.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn log_density(d: &report::Density) {
    let f = |k: Option<f64>| k.map_or("–".into(), |k| stats::fmt_num(k / 1024.0));
    eprintln!(
        "density {} N={}: {} ready in {} s; PSS {} MiB, RSS {} MiB, PSS/clone {} MiB, \
         MemAvailable drop {} MiB, idle {} % core/clone{}{}",
        d.mode,
        d.n,
        d.ready,
        d.ready_s.map_or("–".into(), stats::fmt_num),
        f(d.total.map(|t| t.pss_kib as f64)),
        f(d.total.map(|t| t.rss_kib as f64)),
        f(d.pss_per_clone_kib),
        f(d.mem_available_drop_kib.map(|k| k as f64)),
        d.idle
            .as_ref()
            .and_then(|i| i.pct_core_per_clone)
            .map_or("–".into(), stats::fmt_num),
        d.stopped_early
            .as_ref()
            .map_or(String::new(), |e| format!("; stopped early: {e}")),
        d.errors.first().map_or(String::new(), |e| format!(
            "; {} error(s): {e}",
            d.errors.len()
        ))
    );
}
