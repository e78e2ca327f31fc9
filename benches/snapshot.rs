//! Snapshot benchmark: what a snapshot costs to take and to restore, for a small and a large
//! guest, with snapshot.json (every run) and snapshot.md (medians, min–max) as results.
//!
//! ```sh
//! cargo bench --bench snapshot -- [--runs N] [--memory 128M,4G] [--out DIR] [--timeout SECS]
//! ```
//!
//! 1. Creating: per size, the library boots the bundled guest, waits for its agent, then times
//!    N × `VmHandle::snapshot` and one `snapshot_and_stop`; the memory file's apparent and
//!    allocated sizes.
//! 2. Restore → first guest byte: per size, `loft snapshot create --when-console` snapshots a
//!    guest printing `tick N` in a loop; then N interleaved runs of `loft run --restore DIR`,
//!    spawn → first byte / first `tick ` on stdout. Firecracker's snapshot load of the same
//!    guest too, when `FIRECRACKER` names a binary.
//! 3. In-process: N interleaved runs of `Snapshot::open` → `restore_from(..).start()` →
//!    `exec(["true"])` on the agent-ready snapshots of step 1.

#[path = "snapshot/create.rs"]
mod create;
#[path = "snapshot/fc_api.rs"]
mod fc_api;
#[path = "snapshot/firecracker.rs"]
mod firecracker;
#[path = "snapshot/first_byte.rs"]
mod first_byte;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/host.rs"]
mod host;
#[path = "snapshot/in_process.rs"]
mod in_process;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/measure.rs"]
mod measure;
#[path = "snapshot/report.rs"]
mod report;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/stats.rs"]
mod stats;
#[path = "snapshot/tick.rs"]
mod tick;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/timer.rs"]
mod timer;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/vm.rs"]
mod vm;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use create::Size;
use first_byte::Target;
use host::{guest_dir, host_info, show, utc_now, REPO};
use report::{Config, Report, Skipped};

const LOFT_BIN: &str = env!("CARGO_BIN_EXE_loft");

const USAGE: &str = "\
usage: cargo bench --bench snapshot -- [--runs N] [--memory SIZES] [--out DIR] [--timeout SECS]

  --runs N        runs of each timed step, interleaved across sizes (default 5)
  --memory SIZES  comma-separated guest memory sizes (default 128M,4G)
  --out DIR       where snapshot.json, snapshot.md and logs/ go (default target/bench/snapshot)
  --timeout SECS  time limit of one guest boot (default 600); a restore gets 60 s

Each size costs two cold boots (one through the library, one through `loft snapshot create`).
On a nested kvm_pvm host a 128M guest boots in ~0.5-1 min and a 4G one in ~2-4 min (its
kernel initializes 4 GiB of page structures), so the default run takes ~10-15 min, nearly
all of it booting; the timed restores take seconds.

environment: LOFT_GUEST_DIR (guest kernel + initramfs), LOFT_BIN (loft binary),
             FIRECRACKER (a firecracker binary for its snapshot load; skipped without it)";

struct Args {
    runs: usize,
    sizes: Vec<Size>,
    out: PathBuf,
    timeout: f64,
}

fn parse_sizes(list: &str) -> Result<Vec<Size>, String> {
    let mut v = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let m: loft::MemSize = word
            .parse()
            .map_err(|e| format!("--memory: '{word}': {e}"))?;
        v.push(Size {
            label: m.to_string(),
            bytes: m.bytes(),
        });
    }
    if v.is_empty() {
        return Err("--memory names no size".into());
    }
    Ok(v)
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 5,
        sizes: parse_sizes("128M,4G")?,
        out: Path::new(REPO).join("target/bench/snapshot"),
        timeout: 600.0,
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
                a.runs = value("--runs")?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            "--memory" => a.sizes = parse_sizes(&value("--memory")?)?,
            "--out" => a.out = PathBuf::from(value("--out")?),
            "--timeout" => {
                a.timeout = value("--timeout")?
                    .parse()
                    .ok()
                    .filter(|t: &f64| *t > 0.0)
                    .ok_or("--timeout needs a positive number of seconds")?
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

pub fn on_disk(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("snapshot bench: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snapshot bench: {e}");
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

    let host = host_info();
    let started_utc = utc_now();
    let gdir = guest_dir();
    let loft = std::env::var_os("LOFT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LOFT_BIN));
    let boot_timeout = Duration::from_secs_f64(args.timeout);
    let restore_timeout = Duration::from_secs(60);
    let mut notes: Vec<String> = Vec::new();
    let mut skipped: Vec<Skipped> = Vec::new();
    let mut commands = BTreeMap::new();
    if !Path::new("/dev/kvm").exists() {
        notes.push("/dev/kvm is missing: every VM step fails".into());
    }
    eprintln!(
        "snapshot bench: sizes {}, {} runs; guest {}; host {} / {} / {}; load {}",
        args.sizes
            .iter()
            .map(|s| s.label.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        args.runs,
        gdir.display(),
        host.cpu,
        host.kernel,
        host.kvm_flavour,
        host.load_avg
    );

    let sampler = host::BusySampler::start(Duration::from_secs(10));
    // 1. creating, through the library (the snapshots are the in-process step's)
    let mut creates = Vec::new();
    for size in &args.sizes {
        eprintln!(
            "snapshot bench: {}: boot, wait for the agent, snapshot",
            size.label
        );
        let c = create::create(
            &gdir,
            size,
            &work.join(format!("agent-{}", size.label)),
            args.runs,
            boot_timeout,
        );
        if let Some(e) = &c.error {
            eprintln!("snapshot bench: {}: FAILED: {e}", size.label);
        }
        creates.push(c);
    }

    // 2. the ticking guests' snapshots, loft's and Firecracker's
    let mut setup = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    for size in &args.sizes {
        let dir = work.join(format!("tick-{}", size.label));
        let s = tick::snapshot(
            &loft,
            &gdir,
            size,
            &dir,
            boot_timeout,
            &logs.join(format!("tick-{}-create.log", size.label)),
        );
        let name = format!("loft-{}", size.label);
        commands.insert(format!("{name} snapshot"), s.command.clone());
        if s.ok {
            let t = Target::Loft {
                name: name.clone(),
                dir,
            };
            commands.insert(name, show(&t.prepare(&loft, &work, 0).0));
            targets.push(t);
        } else {
            eprintln!(
                "snapshot bench: {name}: no snapshot: {}",
                s.error.as_deref().unwrap_or("?")
            );
        }
        setup.push(s);
    }
    let fc_name = format!("firecracker-{}M", vm::GUEST_MEM_MIB);
    match firecracker::prepare(&fc_name, &gdir, &work, &logs, boot_timeout) {
        None => {
            eprintln!("snapshot bench: {fc_name}: skipped: FIRECRACKER is not set");
            skipped.push(Skipped {
                runner: fc_name,
                reason: "FIRECRACKER is not set to a firecracker binary".into(),
            });
        }
        Some(p) => {
            notes.push(firecracker::note(&fc_name));
            match p.snapshot {
                Ok((fc, snap)) => {
                    commands.insert(
                        fc_name.clone(),
                        format!(
                            "{} --api-sock SOCK; PUT /snapshot/load resume_vm=true",
                            fc.display()
                        ),
                    );
                    targets.push(Target::Firecracker {
                        name: fc_name,
                        fc,
                        snap,
                    });
                }
                Err(e) => eprintln!("snapshot bench: {fc_name}: no snapshot: {e}"),
            }
            setup.push(p.setup);
        }
    }

    // 3. restore → first byte, interleaved
    let mut first_bytes = Vec::new();
    for round in 1..=args.runs {
        for t in &targets {
            let r = first_byte::run(t, &loft, &work, round, restore_timeout, out);
            let f = |x: Option<f64>| x.map_or("–".to_string(), stats::fmt_num);
            eprintln!(
                "[{round}/{}] {:<17} {} first byte {} ms, first tick {} ms, restored {} ms{}",
                args.runs,
                r.runner,
                if r.ok { "ok    " } else { "FAILED" },
                f(r.first_byte_ms),
                f(r.tick_ms),
                f(r.boot_timer
                    .as_ref()
                    .and_then(|b| b.get("restored"))
                    .map(|m| m.wall_ms)),
                r.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("\n      error: {e}")),
            );
            first_bytes.push(r);
        }
    }

    // 4. in-process restore → exec, interleaved
    let mut in_proc = Vec::new();
    for round in 1..=args.runs {
        for c in creates.iter().filter(|c| c.ok) {
            let dir = work.join(format!("agent-{}", c.memory));
            let r = in_process::run(&c.memory, &dir, round, restore_timeout);
            let f = |x: Option<f64>| x.map_or("–".to_string(), stats::fmt_num);
            eprintln!(
                "[{round}/{}] in-process {:<6} {} open {} ms, start {} ms, exec {} ms{}",
                args.runs,
                r.memory,
                if r.ok { "ok    " } else { "FAILED" },
                f(r.open_ms),
                f(r.start_ms),
                f(r.exec_ms),
                r.error
                    .as_ref()
                    .map_or(String::new(), |e| format!("\n      error: {e}")),
            );
            in_proc.push(r);
        }
    }
    let busy = sampler.finish();
    let _ = std::fs::remove_dir_all(&work);

    notes.push(
        "the snapshot files live in the output directory's work/ (removed at the end); the \
         memory file is written with holes for zero pages and synced before it is renamed \
         into place"
            .into(),
    );
    let rep = Report {
        host,
        config: Config {
            runs: args.runs,
            sizes: args.sizes.iter().map(|s| s.label.clone()).collect(),
            guest_dir: gdir.display().to_string(),
            loft_bin: loft.display().to_string(),
            tick_cmd: tick::TICK_CMD.into(),
            tick_marker: tick::TICK_MARKER.into(),
            timeout_s: args.timeout,
            commands,
            started_utc,
        },
        create: creates,
        setup,
        first_byte: first_bytes,
        in_process: in_proc,
        skipped,
        notes,
        busy,
    };
    let json = out.join("snapshot.json");
    report::write_json(&json, &rep)?;
    let md = report::markdown(&rep);
    let md_path = out.join("snapshot.md");
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    println!("\n{md}");
    eprintln!(
        "snapshot bench: wrote {}, {}",
        json.display(),
        md_path.display()
    );
    Ok(())
}
