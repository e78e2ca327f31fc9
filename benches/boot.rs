//! Boot-time benchmark: the same workload as a micro-VM (loft with the ELF and the bzImage
//! kernel, QEMU microvm, Firecracker when `FIRECRACKER` names a binary) and as a container
//! (crun, runc, unshare+chroot), interleaved run by run, with boot.json, boot.md and boot.svg
//! as results. `--workload cmd` times "fresh environment → command output" instead: `loft run
//! -- echo`, `loft run --restore DIR -- echo` (a snapshot made once before the runs), and crun
//! and runc running `echo`, with cmd.json, cmd.md and cmd.svg as results.
//!
//! ```sh
//! cargo bench --bench boot -- [--workload boot|cmd] [--runs N] [--out DIR] [--only NAME,...]
//!                             [--timeout SECS]
//! ```
//!
//! Every runner prints its workload's marker on stdout and exits. Per run: ready_ms (spawn →
//! marker), exit_ms (spawn → reaped), peak_rss_kib and cpu_ms (wait4 rusage of the child),
//! vmm_overhead_kib (VMMs: RSS outside guest RAM, from /proc/PID/smaps right after the marker),
//! and loft's `--boot-timer` phases.

#[path = "boot/cmd_snapshot.rs"]
mod cmd_snapshot;
#[path = "boot/host.rs"]
mod host;
#[path = "boot/measure.rs"]
mod measure;
#[path = "boot/report.rs"]
mod report;
#[path = "boot/runners.rs"]
mod runners;
#[path = "boot/smaps.rs"]
mod smaps;
#[path = "boot/stats.rs"]
mod stats;
#[path = "boot/timer.rs"]
mod timer;
#[path = "boot/vm.rs"]
mod vm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use host::{guest_dir, host_info, utc_now, REPO};
use report::{Config, Report, Run, Skipped};
use runners::{Kind, Setup, Workload};

/// The loft binary cargo built for this bench (bench profile = release settings).
const LOFT_BIN: &str = env!("CARGO_BIN_EXE_loft");

const USAGE: &str = "\
usage: cargo bench --bench boot -- [--workload boot|cmd] [--runs N] [--out DIR] [--only NAME,...]
                                   [--timeout SECS]

  --workload W    boot (default): every runner comes up and prints GUEST-INIT-READY; runners
                    loft-elf, loft-bzimage, qemu-microvm, firecracker, crun, runc, unshare+chroot;
                    a run of the whole set takes hours on a nested kvm_pvm host (guest boots of
                    1-3 min each)
                  cmd: fresh environment -> output of `echo LOFT-BENCH-CMD-OUTPUT`; runners
                    loft-cold-cmd (`loft run -- echo ...`), loft-restore-cmd (`loft run --restore
                    DIR -- echo ...`, DIR made once first by `loft snapshot create`), crun-cmd,
                    runc-cmd; on a kvm_pvm host ~1 min per round of cold boot + ~1 min for the
                    snapshot, so 5 runs take ~6-10 min
  --runs N        runs per runner, interleaved (default 10 for boot, 5 for cmd)
  --out DIR       where WORKLOAD.json, .md, .svg and logs/ go (default target/bench/WORKLOAD)
  --only NAMES    comma-separated runners of one workload (which then needs no --workload);
                  aliases: loft (loft-elf,loft-bzimage), qemu, unshare, cmd (every cmd runner)
  --timeout SECS  time limit of one run (default 300 for VMs, 30 for containers)

environment: LOFT_GUEST_DIR (guest kernel + initramfs), LOFT_BIN (loft binary),
             FIRECRACKER (a firecracker binary; the runner is skipped without it)";

struct Args {
    workload: Workload,
    runs: usize,
    out: PathBuf,
    only: Vec<Kind>,
    timeout: Option<f64>,
}

fn parse_args() -> Result<Args, String> {
    let mut workload: Option<Workload> = None;
    let mut only: Option<Vec<Kind>> = None;
    let mut out: Option<PathBuf> = None;
    let mut runs: Option<usize> = None;
    let mut a = Args {
        workload: Workload::Boot,
        runs: 10,
        out: PathBuf::new(),
        only: Vec::new(),
        timeout: None,
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
            "--runs" => {
                runs = Some(
                    value("--runs")?
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| "--runs needs a positive number".to_string())?,
                )
            }
            "--workload" => workload = Some(Workload::parse(&value("--workload")?)?),
            "--out" => out = Some(PathBuf::from(value("--out")?)),
            "--only" => only = Some(Kind::parse_list(&value("--only")?)?),
            "--timeout" => {
                a.timeout = Some(
                    value("--timeout")?
                        .parse()
                        .ok()
                        .filter(|t: &f64| *t > 0.0)
                        .ok_or_else(|| {
                            "--timeout needs a positive number of seconds".to_string()
                        })?,
                )
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
    // the runners say the workload; both workloads' runners at once would mix two tables
    a.workload = match (&only, workload) {
        (Some(kinds), w) => {
            let first = kinds[0].workload();
            if let Some(k) = kinds.iter().find(|k| k.workload() != w.unwrap_or(first)) {
                return Err(format!(
                    "--only: {} is a runner of the {} workload, not of {}; run the workloads \
                     separately",
                    k.name(),
                    k.workload().name(),
                    w.unwrap_or(first).name()
                ));
            }
            first
        }
        (None, w) => w.unwrap_or(Workload::Boot),
    };
    a.only = only.unwrap_or_else(|| a.workload.kinds());
    a.runs = runs.unwrap_or(match a.workload {
        Workload::Boot => 10,
        Workload::Cmd => 5,
    });
    a.out = out.unwrap_or_else(|| Path::new(REPO).join("target/bench").join(a.workload.name()));
    Ok(a)
}

/// scripts/oci-bundle.sh OUT_DIR.
fn build_bundle(dir: &Path) -> Result<PathBuf, String> {
    let script = Path::new(REPO).join("scripts/oci-bundle.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(dir.to_path_buf())
}

/// Removes QEMU RAM files (`/dev/shm/loft-bench-PID-…`) left by a bench that no longer runs.
fn remove_stale_shm() {
    let Ok(dir) = std::fs::read_dir("/dev/shm") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("loft-bench-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn tail(bytes: &[u8], lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let v: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn one_run(kind: Kind, setup: &Setup, round: usize, timeout: Duration, out_dir: &Path) -> Run {
    let mut run = Run {
        runner: kind.name().to_string(),
        round,
        ok: false,
        ready_ms: None,
        exit_ms: None,
        peak_rss_kib: None,
        cpu_ms: None,
        vmm_overhead_kib: None,
        boot_timer: None,
        status: None,
        error: None,
        log: None,
    };
    let prepared = match runners::prepare(kind, setup, round) {
        Ok(p) => p,
        Err(e) => {
            run.error = Some(e);
            return run;
        }
    };
    let shown = host::show(&prepared.cmd);
    let marker = kind.workload().markers()[0];
    let o = measure::run(
        prepared.cmd,
        kind.workload().markers(),
        timeout,
        prepared.ram.is_some(),
        prepared.stdin_pipe,
    );
    // one marker given, one time back
    let ready = o.marks[0];
    let finished = o.exit.is_some() && !o.timed_out;
    for c in &prepared.cleanup {
        c.run(finished);
    }
    run.ready_ms = ready.map(ms);
    run.exit_ms = o.exit.map(ms);
    run.peak_rss_kib = o.peak_rss_kib;
    run.cpu_ms = o.cpu.map(ms);
    run.status = o.status.clone();
    if let (Some(ram), Some(text)) = (&prepared.ram, &o.smaps) {
        run.vmm_overhead_kib = smaps::vmm_overhead_kib(text, ram.as_guest_ram());
    }
    if kind.is_loft() {
        run.boot_timer = timer::parse(&String::from_utf8_lossy(&o.stderr));
    }
    run.error = if let Some(e) = o.spawn_error {
        Some(e)
    } else if o.timed_out {
        Some(format!(
            "timed out after {} s {}; last output: {}",
            timeout.as_secs_f64(),
            if ready.is_some() {
                "after the marker"
            } else {
                "without the marker"
            },
            tail(&o.stdout, 1)
        ))
    } else if ready.is_none() {
        Some(format!(
            "no {marker} on stdout ({}); stderr: {}",
            o.status.as_deref().unwrap_or("?"),
            tail(&o.stderr, 3)
        ))
    } else if !o.success {
        Some(format!(
            "{} after the marker; stderr: {}",
            o.status.as_deref().unwrap_or("?"),
            tail(&o.stderr, 3)
        ))
    } else {
        None
    };
    run.ok = run.error.is_none();
    // keep every run's output
    let rel = format!("logs/{}-{round}.log", kind.name());
    let mut log = format!("$ {shown}\n# status: {:?}\n==== stdout\n", o.status).into_bytes();
    log.extend_from_slice(&o.stdout);
    log.extend_from_slice(b"\n==== stderr\n");
    log.extend_from_slice(&o.stderr);
    if std::fs::write(out_dir.join(&rel), log).is_ok() {
        run.log = Some(rel);
    }
    run
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("boot bench: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("boot bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: Args) -> Result<(), String> {
    let out = &args.out;
    let logs = out.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let work = out.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;

    remove_stale_shm();
    let host = host_info();
    let kvm_pvm = host.kvm_flavour == "kvm_pvm";
    let mut notes: Vec<String> = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();

    // the guest
    let gdir = guest_dir();
    let vm_requested = args.only.iter().any(|k| k.is_vm());
    if vm_requested && !Path::new("/dev/kvm").exists() {
        notes.push("/dev/kvm is missing: every VM run fails".into());
    }

    // loft
    let loft = std::env::var_os("LOFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LOFT_BIN));
    let loft_boot_timer = Command::new(&loft)
        .args(["run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--boot-timer"));
    if args.only.iter().any(|k| k.is_loft()) && !loft_boot_timer {
        notes.push(format!(
            "{} has no --boot-timer flag: loft ran without it, no phases recorded",
            loft.display()
        ));
    }

    // the command line loft gives the guest (without its boot-timer port), for QEMU/Firecracker
    let cmdline = vm::guest_cmdline();

    // Firecracker only when asked for through FIRECRACKER
    let firecracker = std::env::var_os("FIRECRACKER")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let mut kinds = args.only.clone();
    if kinds.contains(&Kind::Firecracker) && firecracker.is_none() {
        kinds.retain(|k| *k != Kind::Firecracker);
        skipped.push(Skipped {
            runner: Kind::Firecracker.name().into(),
            reason: "FIRECRACKER is not set to a firecracker binary".into(),
        });
    }

    // the OCI bundle
    let containers = kinds
        .iter()
        .any(|k| k.runtime().is_some() || *k == Kind::Unshare);
    let bundle_dir = Path::new(REPO).join("target/bench/oci");
    let bundle = if containers {
        eprintln!(
            "boot bench: OCI bundle: scripts/oci-bundle.sh {}",
            bundle_dir.display()
        );
        build_bundle(&bundle_dir)
    } else {
        Err("not needed".into())
    };
    if let (true, Err(e)) = (containers, &bundle) {
        notes.push(format!("no OCI bundle, every container run fails: {e}"));
    }
    let cmd_bundle = match &bundle {
        Ok(b) if args.workload == Workload::Cmd => runners::cmd_bundle(b, &work.join("oci-cmd")),
        Ok(_) => Err("not needed".into()),
        Err(e) => Err(e.clone()),
    };

    let mut setup = Setup {
        vmlinux: gdir.join("vmlinux"),
        bzimage: gdir.join("bzImage"),
        initrd: gdir.join("initramfs.cpio"),
        loft: loft.clone(),
        loft_boot_timer,
        kvm_pvm,
        cmdline: cmdline.clone(),
        qemu: host::which("qemu-system-x86_64"),
        firecracker,
        bundle: bundle.clone(),
        cmd_bundle: cmd_bundle.clone(),
        cmd_snapshot: Err("not made".into()),
        work: work.clone(),
        tag: format!("loft-bench-{}", std::process::id()),
    };
    if kinds.contains(&Kind::Qemu) {
        notes.push(if kvm_pvm {
            "qemu-microvm on kvm_pvm: `-cpu host,-arch-capabilities` (plain `-cpu host` cannot set \
             MSR 0x10a) and guest RAM from a /dev/shm memory-backend-file (THP-backed RAM makes \
             the guest hit an FWAIT KVM's emulator cannot run)"
                .into()
        } else {
            "qemu-microvm: `-cpu host`, default (anonymous) guest RAM".into()
        });
    }
    if kinds.contains(&Kind::Crun) || kinds.contains(&Kind::CrunCmd) {
        notes.push(
            "crun is timed including `unshare -m sh -c 'umount /sys/fs/cgroup/unified; exec crun \
             …'` (crun 1.8 refuses a hybrid cgroup host)"
                .into(),
        );
    }
    if kinds.iter().any(|k| k.is_vm()) {
        notes.push(
        "vmm_overhead_kib = the sum of Rss over the VMM's mappings except the guest RAM mapping \
         (loft/Firecracker: the anonymous mapping of the guest's size; loft-restore-cmd: its \
         private mapping of the snapshot's memory file; QEMU: its memory-backend mapping), from \
         /proc/PID/smaps read right after the marker"
            .into(),
        );
    }

    if args.workload == Workload::Cmd {
        notes.push(format!(
            "crun-cmd and runc-cmd run the bundle {} (`echo` as the process, the boot workload's \
             busybox rootfs by absolute path)",
            cmd_bundle
                .as_ref()
                .map_or_else(Clone::clone, |p| p.display().to_string())
        ));
    }

    let timeout_vm = args.timeout.unwrap_or(300.0);
    let timeout_ct = args.timeout.unwrap_or(30.0);
    // loft-restore-cmd's snapshot, once, before the runs
    let snapshot_dir = work.join("cmd-snapshot");
    let mut cmd_snapshot = None;
    if kinds.contains(&Kind::LoftRestoreCmd) {
        let (info, dir) = cmd_snapshot::create(
            &setup,
            &snapshot_dir,
            Duration::from_secs_f64(timeout_vm),
            &logs.join("snapshot-create.log"),
        );
        eprintln!(
            "boot bench: snapshot {}",
            match (&dir, info.create_ms) {
                (Ok(d), Some(t)) =>
                    format!("{} made in {} s", d.display(), stats::fmt_num(t / 1e3)),
                (Err(e), _) => e.clone(),
                (Ok(d), None) => d.display().to_string(),
            }
        );
        setup.cmd_snapshot = dir;
        cmd_snapshot = Some(info);
    }

    let mut commands = BTreeMap::new();
    for k in &kinds {
        if let Ok(p) = runners::prepare(*k, &setup, 0) {
            commands.insert(k.name().to_string(), host::show(&p.cmd));
            for c in &p.cleanup {
                if let runners::Cleanup::RemoveFile(f) = c {
                    let _ = std::fs::remove_file(f);
                }
            }
        }
    }
    let config = Config {
        workload: args.workload.name().to_string(),
        runs: args.runs,
        runners: kinds.iter().map(|k| k.name().to_string()).collect(),
        timeout_vm_s: timeout_vm,
        timeout_container_s: timeout_ct,
        guest_dir: gdir.display().to_string(),
        guest_cmdline: cmdline,
        guest_mem_mib: vm::GUEST_MEM_MIB,
        loft_bin: loft.display().to_string(),
        loft_boot_timer,
        oci_bundle: bundle.as_ref().ok().map(|p| p.display().to_string()),
        commands,
        cmd_snapshot,
        started_utc: utc_now(),
    };
    eprintln!(
        "boot bench: {} × {} runs, interleaved; guest {}; host {} / {} / {}",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        args.runs,
        gdir.display(),
        host.cpu,
        host.kernel,
        host.kvm_flavour
    );

    // A B C A B C …: machine drift hits every runner alike
    let sampler = host::BusySampler::start(Duration::from_secs(10));
    let mut runs: Vec<Run> = Vec::new();
    for round in 1..=args.runs {
        for k in &kinds {
            let timeout = Duration::from_secs_f64(if k.is_vm() { timeout_vm } else { timeout_ct });
            let r = one_run(*k, &setup, round, timeout, out);
            let f = |x: Option<f64>| x.map_or("–".to_string(), stats::fmt_num);
            eprintln!(
                "[{round}/{}] {:<15} {} ready {} ms, exit {} ms, rss {} KiB, cpu {} ms{}{}",
                args.runs,
                r.runner,
                if r.ok { "ok    " } else { "FAILED" },
                f(r.ready_ms),
                f(r.exit_ms),
                r.peak_rss_kib.map_or("–".into(), |x| x.to_string()),
                f(r.cpu_ms),
                r.vmm_overhead_kib
                    .map_or(String::new(), |x| format!(", vmm overhead {x} KiB")),
                r.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("\n      error: {e}")),
            );
            runs.push(r);
        }
    }
    let busy = sampler.finish();
    if let Some(own) = measure::own_peak_rss_kib() {
        notes.push(format!(
            "peak RSS is wait4's ru_maxrss, which Linux never reports below the spawning \
             process's own peak RSS (the child carries the bench's memory until its exec): this \
             bench's own peak RSS was {own} KiB, so a figure at or near it (the containers') is \
             an upper bound"
        ));
    }
    let _ = std::fs::remove_dir_all(&snapshot_dir);
    let _ = std::fs::remove_dir_all(work.join("oci-cmd"));
    let _ = std::fs::remove_dir(&work);

    let summary = report::summarize(&kinds, &runs, args.workload);
    let rep = Report {
        host,
        config,
        runs,
        summary,
        skipped,
        notes,
        busy,
    };
    let stem = args.workload.name();
    let json = out.join(format!("{stem}.json"));
    report::write_json(&json, &rep)?;
    let md = report::markdown(&rep);
    let md_path = out.join(format!("{stem}.md"));
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let svg = out.join(format!("{stem}.svg"));
    if let Err(e) = report::write_svg(&svg, &rep) {
        eprintln!("boot bench: plot failed: {e}");
    }
    println!("\n{md}");
    eprintln!(
        "boot bench: wrote {}, {}, {}",
        json.display(),
        md_path.display(),
        svg.display()
    );
    Ok(())
}
