//! Block benchmark: a guest with its root on virtio-blk (the project's ext4 image) and a second,
//! empty virtio-blk disk, under loft and under QEMU microvm with the same kernel, images and
//! command line, interleaved run by run.
//!
//! ```sh
//! cargo bench --bench blk -- [--runs N] [--out DIR] [--timeout SECS]
//! ```
//!
//! Per run: spawn → the kernel's `VFS: Mounted root` line (root mounted), spawn →
//! `GUEST-INIT-READY` (the rootfs's /sbin/init), spawn → exit, and the guest's own busybox `dd`
//! figures for 64 MiB written to and read back from the second disk with O_DIRECT (the write
//! ends with an fsync, i.e. a virtio FLUSH). Results: blk.json (raw runs) and blk.md (medians).

#[path = "blk/guest.rs"]
mod guest;
#[allow(dead_code)] // shared with the boot and snapshot benches
#[path = "boot/host.rs"]
mod host;
#[allow(dead_code)] // shared with the boot and snapshot benches
#[path = "boot/measure.rs"]
mod measure;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/stats.rs"]
mod stats;
#[path = "boot/vm.rs"]
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use serde::Serialize;

use guest::{dd_figures, guest_cmd, DATA_DISK_SECTORS};
use host::{guest_dir, host_info, show, utc_now, which, Host, REPO};
use stats::{fmt_num, fmt_ratio, fmt_spread, Spread};
use vm::{guest_cmdline, qemu_microvm, GUEST_MEM_MIB};

const LOFT_BIN: &str = env!("CARGO_BIN_EXE_loft");
const USAGE: &str = "\
usage: cargo bench --bench blk -- [--runs N] [--out DIR] [--timeout SECS]

  --runs N        runs per runner, interleaved (default 5)
  --out DIR       where blk.json, blk.md and logs/ go (default target/bench/blk)
  --timeout SECS  time limit of one run (default 600)

environment: LOFT_GUEST_DIR (vmlinux + rootfs.ext4), LOFT_BIN (loft binary)";

const MARKERS: &[&str] = &["VFS: Mounted root", "GUEST-INIT-READY", "GUEST-CMD-EXIT="];
const RUNNERS: [&str; 2] = ["loft", "qemu-microvm"];

struct Args {
    runs: usize,
    out: PathBuf,
    timeout: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 5,
        out: Path::new(REPO).join("target/bench/blk"),
        timeout: 600.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value\n\n{USAGE}"));
        match arg.as_str() {
            "--runs" => {
                a.runs = value("--runs")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            "--out" => a.out = PathBuf::from(value("--out")?),
            "--timeout" => {
                a.timeout = value("--timeout")?
                    .parse()
                    .ok()
                    .filter(|t: &f64| *t > 0.0)
                    .ok_or("--timeout needs a positive number of seconds")?
            }
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

#[derive(Debug, Serialize)]
struct Run {
    runner: String,
    round: usize,
    ok: bool,
    root_mounted_ms: Option<f64>,
    ready_ms: Option<f64>,
    exit_ms: Option<f64>,
    /// dd inside the guest, device path: bytes moved / time the disk was busy.
    write_mib_s: Option<f64>,
    read_mib_s: Option<f64>,
    /// dd inside the guest, 64 MiB / wall time around the dd (its process start included).
    write_wall_mib_s: Option<f64>,
    read_wall_mib_s: Option<f64>,
    peak_rss_kib: Option<u64>,
    error: Option<String>,
    log: String,
}

#[derive(Debug, Serialize)]
struct Summary {
    runner: String,
    ok: usize,
    failed: usize,
    root_mounted_ms: Option<Spread>,
    ready_ms: Option<Spread>,
    exit_ms: Option<Spread>,
    write_mib_s: Option<Spread>,
    read_mib_s: Option<Spread>,
    write_wall_mib_s: Option<Spread>,
    read_wall_mib_s: Option<Spread>,
}

#[derive(Debug, Serialize)]
struct Report {
    host: Host,
    started_utc: String,
    guest_cmdline: String,
    commands: Vec<String>,
    runs: Vec<Run>,
    summary: Vec<Summary>,
}

struct Files {
    root: PathBuf,
    data: PathBuf,
}

/// A fresh copy of the root image and an empty data disk for one run.
fn fresh_disks(work: &Path, rootfs: &Path, runner: &str) -> Result<Files, String> {
    let root = work.join(format!("{runner}-root.ext4"));
    let data = work.join(format!("{runner}-data.img"));
    std::fs::copy(rootfs, &root).map_err(|e| format!("copy {}: {e}", rootfs.display()))?;
    let _ = std::fs::remove_file(&data);
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(DATA_DISK_SECTORS * 512))
        .map_err(|e| format!("{}: {e}", data.display()))?;
    Ok(Files { root, data })
}

fn command(runner: &str, s: &Setup, f: &Files) -> Result<Command, String> {
    let user = format!("guest_cmd=\"{}\"", guest_cmd());
    if runner == "loft" {
        let mut c = Command::new(&s.loft);
        c.arg("run")
            .arg("--kernel")
            .arg(&s.vmlinux)
            .arg("--memory")
            .arg(format!("{GUEST_MEM_MIB}M"))
            .arg("--root")
            .arg(&f.root)
            .arg("--disk")
            .arg(&f.data)
            .arg("--cmdline")
            .arg(user);
        return Ok(c);
    }
    let qemu = s
        .qemu
        .as_ref()
        .ok_or("qemu-system-x86_64 is not installed (scripts/install-deps.sh)")?;
    let mut c = qemu_microvm(qemu, s.kvm_pvm, &s.shm);
    for (id, file) in [("root", &f.root), ("data", &f.data)] {
        c.arg("-drive").arg(format!(
            "id={id},file={},format=raw,if=none",
            file.display()
        ));
        c.args(["-device", &format!("virtio-blk-device,drive={id}")]);
    }
    c.arg("-kernel").arg(&s.vmlinux);
    c.arg("-append")
        .arg(format!("{} root=/dev/vda rw {user}", s.cmdline));
    Ok(c)
}

struct Setup {
    loft: PathBuf,
    qemu: Option<PathBuf>,
    vmlinux: PathBuf,
    rootfs: PathBuf,
    kvm_pvm: bool,
    /// loft's base command line for the guest (QEMU gets it too).
    cmdline: String,
    shm: PathBuf,
    work: PathBuf,
}

fn one_run(runner: &str, s: &Setup, round: usize, timeout: Duration, out: &Path) -> Run {
    let log = format!("logs/{runner}-{round}.log");
    let mut run = Run {
        runner: runner.into(),
        round,
        ok: false,
        root_mounted_ms: None,
        ready_ms: None,
        exit_ms: None,
        write_mib_s: None,
        read_mib_s: None,
        write_wall_mib_s: None,
        read_wall_mib_s: None,
        peak_rss_kib: None,
        error: None,
        log: log.clone(),
    };
    let cmd = match fresh_disks(&s.work, &s.rootfs, runner).and_then(|f| command(runner, s, &f)) {
        Ok(c) => c,
        Err(e) => {
            run.error = Some(e);
            return run;
        }
    };
    let shown = show(&cmd);
    let o = measure::run(cmd, MARKERS, timeout, false, false);
    let _ = std::fs::remove_file(&s.shm);
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    run.root_mounted_ms = ms(o.marks[0]);
    run.ready_ms = ms(o.marks[1]);
    run.exit_ms = ms(o.exit);
    run.peak_rss_kib = o.peak_rss_kib;
    let text = String::from_utf8_lossy(&o.stdout);
    let (w, r) = (
        dd_figures(&text, "BLK-WRITE"),
        dd_figures(&text, "BLK-READ"),
    );
    run.write_mib_s = w.map(|f| f.device_mib_s);
    run.read_mib_s = r.map(|f| f.device_mib_s);
    run.write_wall_mib_s = w.map(|f| f.wall_mib_s);
    run.read_wall_mib_s = r.map(|f| f.wall_mib_s);
    run.error = if let Some(e) = o.spawn_error {
        Some(e)
    } else if o.timed_out {
        Some(format!("timed out after {} s", timeout.as_secs_f64()))
    } else if !o.success {
        Some(format!(
            "{} (see {log})",
            o.status.as_deref().unwrap_or("?")
        ))
    } else if !text.contains("GUEST-CMD-EXIT=0") || run.write_mib_s.is_none() {
        Some(format!("the guest's dd did not finish (see {log})"))
    } else if run.read_mib_s.is_none() || run.root_mounted_ms.is_none() {
        Some(format!(
            "no read figure or no root-mounted line (see {log})"
        ))
    } else {
        None
    };
    run.ok = run.error.is_none();
    let mut bytes = format!("$ {shown}\n# status: {:?}\n==== stdout\n", o.status).into_bytes();
    bytes.extend_from_slice(&o.stdout);
    bytes.extend_from_slice(b"\n==== stderr\n");
    bytes.extend_from_slice(&o.stderr);
    let _ = std::fs::write(out.join(&log), bytes);
    run
}

fn summarize(runs: &[Run]) -> Vec<Summary> {
    RUNNERS
        .iter()
        .map(|name| {
            let mine: Vec<&Run> = runs.iter().filter(|r| r.runner == *name).collect();
            let good: Vec<&&Run> = mine.iter().filter(|r| r.ok).collect();
            let col = |f: fn(&Run) -> Option<f64>| {
                stats::spread(&good.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            Summary {
                runner: name.to_string(),
                ok: good.len(),
                failed: mine.len() - good.len(),
                root_mounted_ms: col(|r| r.root_mounted_ms),
                ready_ms: col(|r| r.ready_ms),
                exit_ms: col(|r| r.exit_ms),
                write_mib_s: col(|r| r.write_mib_s),
                read_mib_s: col(|r| r.read_mib_s),
                write_wall_mib_s: col(|r| r.write_wall_mib_s),
                read_wall_mib_s: col(|r| r.read_wall_mib_s),
            }
        })
        .collect()
}

fn markdown(r: &Report) -> String {
    let base = r.summary.iter().find(|s| s.runner == "loft");
    let med = |s: Option<Spread>| s.map(|s| s.median);
    let ratio = |v: Option<Spread>, b: Option<Spread>| {
        stats::ratio(med(v), med(b)).map_or("–".into(), fmt_ratio)
    };
    let mut md = format!(
        "Host: {} · kernel {} · {} · loft {} · {} runs each, interleaved, started {}\n\n\
         | runner | ok/failed | root mounted, s | ratio | init ready, s | exit, s | \
         dd write, MiB/s | ratio | dd read, MiB/s | ratio | write / read incl. dd start, MiB/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        r.host.cpu,
        r.host.kernel,
        r.host.kvm_flavour,
        r.host.loft_commit,
        r.runs.iter().filter(|x| x.runner == "loft").count(),
        r.started_utc
    );
    let secs = |s: Option<Spread>| {
        fmt_spread(s.map(|s| Spread {
            median: s.median / 1e3,
            min: s.min / 1e3,
            max: s.max / 1e3,
        }))
    };
    for s in &r.summary {
        let b = |f: fn(&Summary) -> Option<Spread>| base.and_then(f);
        md += &format!(
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            s.runner,
            s.ok,
            s.failed,
            secs(s.root_mounted_ms),
            ratio(s.root_mounted_ms, b(|x| x.root_mounted_ms)),
            secs(s.ready_ms),
            secs(s.exit_ms),
            fmt_spread(s.write_mib_s),
            ratio(s.write_mib_s, b(|x| x.write_mib_s)),
            fmt_spread(s.read_mib_s),
            ratio(s.read_mib_s, b(|x| x.read_mib_s)),
            fmt_spread(s.write_wall_mib_s),
            fmt_spread(s.read_wall_mib_s),
        );
    }
    md += "\nMedians with min–max. Ratios are runner ÷ loft (time: above 1 = slower than loft; \
           MiB/s: above 1 = faster than loft). dd: 64 MiB inside the guest, bs=1M, O_DIRECT, the \
           write with conv=fsync (a virtio FLUSH); MiB/s = bytes the disk moved over the time it \
           was busy (the guest's /sys/block/*/stat, io_ticks), the last column over the guest's \
           wall time around the dd, whose process start costs seconds on a kvm_pvm host.\n";
    for (i, c) in r.commands.iter().enumerate() {
        md += &format!("\n{}: `{c}`\n", RUNNERS[i]);
    }
    md
}

fn main() -> ExitCode {
    match parse_args().and_then(bench) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blk bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: Args) -> Result<(), String> {
    let out = &args.out;
    let work = out.join("work");
    std::fs::create_dir_all(out.join("logs")).map_err(|e| format!("{}: {e}", out.display()))?;
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let host = host_info();
    let gdir = guest_dir();
    let s = Setup {
        loft: std::env::var_os("LOFT_BIN").map_or(PathBuf::from(LOFT_BIN), PathBuf::from),
        qemu: which("qemu-system-x86_64"),
        vmlinux: gdir.join("vmlinux"),
        rootfs: gdir.join("rootfs.ext4"),
        kvm_pvm: host.kvm_flavour == "kvm_pvm",
        cmdline: guest_cmdline(),
        shm: PathBuf::from(format!("/dev/shm/loft-blk-{}", std::process::id())),
        work: work.clone(),
    };
    for f in [&s.vmlinux, &s.rootfs] {
        if !f.is_file() {
            return Err(format!(
                "{} is missing (firmware/build.sh builds it)",
                f.display()
            ));
        }
    }
    let mut commands = Vec::new();
    for r in RUNNERS {
        let f = Files {
            root: work.join(format!("{r}-root.ext4")),
            data: work.join(format!("{r}-data.img")),
        };
        commands.push(command(r, &s, &f).map_or_else(|e| e, |c| show(&c)));
    }
    eprintln!(
        "blk bench: {} × {} runs, interleaved; guest {}; {} / {}",
        RUNNERS.join(", "),
        args.runs,
        gdir.display(),
        host.cpu,
        host.kvm_flavour
    );
    let started_utc = utc_now();
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut runs = Vec::new();
    for round in 1..=args.runs {
        for r in RUNNERS {
            let run = one_run(r, &s, round, timeout, out);
            let f = |x: Option<f64>, div: f64| x.map_or("–".into(), |v| fmt_num(v / div));
            eprintln!(
                "[{round}/{}] {r:<13} {} root mounted {} s, ready {} s, exit {} s, write {} \
                 MiB/s, read {} MiB/s{}",
                args.runs,
                if run.ok { "ok    " } else { "FAILED" },
                f(run.root_mounted_ms, 1e3),
                f(run.ready_ms, 1e3),
                f(run.exit_ms, 1e3),
                f(run.write_mib_s, 1.0),
                f(run.read_mib_s, 1.0),
                run.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("\n      error: {e}")),
            );
            runs.push(run);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let summary = summarize(&runs);
    let rep = Report {
        host,
        started_utc,
        guest_cmdline: s.cmdline.clone(),
        commands,
        runs,
        summary,
    };
    let json = out.join("blk.json");
    std::fs::write(
        &json,
        serde_json::to_vec_pretty(&rep).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", json.display()))?;
    let md = markdown(&rep);
    std::fs::write(out.join("blk.md"), &md).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("\n{md}");
    eprintln!("blk bench: wrote {} and blk.md", json.display());
    Ok(())
}
