//! The snapshot bench's results: snapshot.json (every run) and snapshot.md (medians, min–max).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::host::Host;
use crate::stats::{self, fmt_num, fmt_spread, Spread};
use crate::timer::BootTimer;

#[derive(Debug, Serialize)]
pub struct Config {
    pub runs: usize,
    /// Guest memory sizes, as given to `--memory`.
    pub sizes: Vec<String>,
    pub guest_dir: String,
    pub loft_bin: String,
    /// The guest command of the snapshots restored for the first byte.
    pub tick_cmd: String,
    /// The console text those snapshots were taken at.
    pub tick_marker: String,
    pub timeout_s: f64,
    /// One example command per runner and setup step.
    pub commands: BTreeMap<String, String>,
    pub started_utc: String,
}

/// A snapshot taken through the library: boot, `wait_for_agent`, N × `snapshot` (the VM runs
/// on), then `snapshot_and_stop`.
#[derive(Debug, Default, Serialize)]
pub struct Create {
    pub memory: String,
    pub memory_bytes: u64,
    pub ok: bool,
    pub error: Option<String>,
    /// `start()` → `wait_for_agent()` returned (the cold boot).
    pub boot_to_agent_ms: Option<f64>,
    /// Each `VmHandle::snapshot` (pause, save, files written and synced, resume).
    pub snapshot_ms: Vec<f64>,
    /// `VmHandle::snapshot_and_stop` (the same, then the VM stops and is reaped).
    pub snapshot_and_stop_ms: Option<f64>,
    /// The memory file's apparent size.
    pub memory_file_bytes: Option<u64>,
    /// The memory file's allocated blocks (`st_blocks` × 512).
    pub memory_on_disk_bytes: Option<u64>,
    pub state_file_bytes: Option<u64>,
}

/// A snapshot made by a command before the runs (loft's ticking guests, Firecracker's).
#[derive(Debug, Serialize)]
pub struct Setup {
    pub name: String,
    pub command: String,
    pub ok: bool,
    /// Spawn → done: a cold boot to the marker, then the save.
    pub create_ms: Option<f64>,
    pub memory_on_disk_bytes: Option<u64>,
    pub error: Option<String>,
}

/// One `loft run --restore DIR` (or Firecracker load) of a ticking guest, stopped at its first
/// tick.
#[derive(Debug, Serialize)]
pub struct FirstByteRun {
    pub runner: String,
    pub round: usize,
    pub ok: bool,
    /// Spawn → the first byte on stdout.
    pub first_byte_ms: Option<f64>,
    /// Spawn → the first `tick ` on stdout.
    pub tick_ms: Option<f64>,
    /// Spawn → reaped, after the SIGTERM (loft) or SIGKILL (Firecracker) sent at the tick.
    pub exit_ms: Option<f64>,
    /// The VMM's peak RSS (`VmHWM`) at the first tick, KiB. (wait4's `ru_maxrss` would count
    /// the bench's own memory, guest RAM of its in-process VMs included: Linux carries the
    /// spawner's RSS into the child until its exec.)
    pub hwm_at_tick_kib: Option<u64>,
    /// wait4's CPU time of the VMM, to its exit after the signal.
    pub cpu_ms: Option<f64>,
    /// The first bytes on stdout, to show they are the guest's.
    pub first_output: String,
    pub boot_timer: Option<BootTimer>,
    pub status: Option<String>,
    pub error: Option<String>,
    pub log: Option<String>,
}

/// One in-process restore: `Snapshot::open`, `VmBuilder::restore_from(..).start()`, then
/// `exec(["true"])`, then `kill`.
#[derive(Debug, Default, Serialize)]
pub struct InProcessRun {
    pub memory: String,
    pub round: usize,
    pub ok: bool,
    pub open_ms: Option<f64>,
    pub start_ms: Option<f64>,
    /// `start()` returned → `wait_for_agent()` returned: the agent answered and the guest's
    /// clock and entropy were synced (what the first exec after a restore does first).
    pub sync_ms: Option<f64>,
    /// Then `exec(["true"])` → its result.
    pub exec_ms: Option<f64>,
    /// A second `exec(["true"])` right after: a command in the warm guest.
    pub second_exec_ms: Option<f64>,
    /// open + start + sync + exec: restore → the first command's result.
    pub total_ms: Option<f64>,
    /// `VmHandle::boot_times`: the VM restored, and vCPU 0 first entered, ms after `start()`
    /// was called.
    pub restored_ms: Option<f64>,
    pub first_entry_ms: Option<f64>,
    pub kill_ms: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub runner: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub host: Host,
    pub config: Config,
    pub create: Vec<Create>,
    pub setup: Vec<Setup>,
    pub first_byte: Vec<FirstByteRun>,
    pub in_process: Vec<InProcessRun>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
    /// How busy the machine was meanwhile.
    pub busy: crate::host::Busy,
}

pub fn write_json(path: &Path, r: &Report) -> Result<(), String> {
    let text = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

fn spread<T>(items: &[&T], f: impl Fn(&T) -> Option<f64>) -> Option<Spread> {
    let v: Vec<f64> = items.iter().filter_map(|x| f(x)).collect();
    stats::spread(&v)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("–".into(), |b| fmt_num(b as f64 / (1 << 20) as f64))
}

/// Names in first-seen order.
fn names<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = Vec::new();
    for n in it {
        if !v.contains(&n) {
            v.push(n);
        }
    }
    v
}

fn median_of(runs: &[&FirstByteRun], f: impl Fn(&FirstByteRun) -> Option<f64>) -> Option<f64> {
    spread(runs, f).map(|s| s.median)
}

fn phase(t: &BootTimer, name: &str) -> Option<f64> {
    t.get(name).map(|m| m.wall_ms)
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("# loft snapshot benchmark\n\n");
    s.push_str(&format!(
        "Host: {} · Linux {} · KVM {} · loft {} · {} runs, interleaved · {}\n\n",
        r.host.cpu,
        r.host.kernel,
        r.host.kvm_flavour,
        r.host.loft_commit,
        r.config.runs,
        r.config.started_utc
    ));
    s.push_str(&format!(
        "Guest: `{}` (`vmlinux` + `initramfs.cpio`, 1 vCPU). Medians (min–max).\n",
        r.config.guest_dir
    ));

    s.push_str(
        "\n## Creating a snapshot\n\nThrough the library: `VmBuilder::new().memory_mib(n).start()`, \
         `wait_for_agent()`, then N × `VmHandle::snapshot(dir)` (pause, save the vCPUs, devices \
         and the sparse memory file, sync, rename into place, resume) and one \
         `snapshot_and_stop(dir)`, each timed from the call to its return. The memory file's \
         apparent size is the guest's RAM; on disk it holds only the non-zero pages.\n\n",
    );
    s.push_str(
        "| memory | boot → agent s | snapshot() ms | snapshot_and_stop() ms | memory file MiB | on disk MiB | state KiB |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for c in &r.create {
        if !c.ok {
            s.push_str(&format!(
                "| {} | failed: {} | | | | | |\n",
                c.memory,
                c.error.as_deref().unwrap_or("?")
            ));
            continue;
        }
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            c.memory,
            c.boot_to_agent_ms.map_or("–".into(), |x| fmt_num(x / 1e3)),
            fmt_spread(stats::spread(&c.snapshot_ms)),
            c.snapshot_and_stop_ms.map_or("–".into(), fmt_num),
            mib(c.memory_file_bytes),
            mib(c.memory_on_disk_bytes),
            c.state_file_bytes
                .map_or("–".into(), |b| fmt_num(b as f64 / 1024.0)),
        ));
    }

    s.push_str(&format!(
        "\n## Restore → first guest byte\n\nA guest running `{}` is snapshotted by `loft snapshot \
         create --when-console '{}'` (its first line), so it prints as soon as it runs again. \
         Timed: spawn of `loft run --restore DIR` → the first byte on stdout, and → the first \
         `tick ` line; the bench then sends SIGTERM. Runners interleaved. restored and \
         first_entry are loft's own marks (`--boot-timer`, ms since loft's start): the VM rebuilt \
         from the snapshot, and vCPU 0 entering the guest; first_entry → first byte is the \
         guest's part (its first touches of the mapped memory file included).\n\n",
        r.config.tick_cmd, r.config.tick_marker
    ));
    s.push_str(
        "| runner | ok | failed | first byte ms | first tick ms | restored ms | first_entry ms | first_entry → first byte ms | peak RSS at the tick KiB | CPU ms (to exit) |\n",
    );
    s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let runners = names(r.first_byte.iter().map(|x| x.runner.as_str()));
    let mut medians: Vec<(&str, Option<f64>)> = Vec::new();
    for name in &runners {
        let all: Vec<&FirstByteRun> = r.first_byte.iter().filter(|x| x.runner == *name).collect();
        let ok: Vec<&FirstByteRun> = all.iter().copied().filter(|x| x.ok).collect();
        let bt = |p: &'static str| {
            spread(&ok, move |x| {
                x.boot_timer.as_ref().and_then(|t| phase(t, p))
            })
        };
        medians.push((name, median_of(&ok, |x| x.first_byte_ms)));
        let guest_part = spread(&ok, |x| {
            let entry = x
                .boot_timer
                .as_ref()
                .and_then(|t| phase(t, "first_entry"))?;
            Some(x.first_byte_ms? - entry)
        });
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            name,
            ok.len(),
            all.len() - ok.len(),
            fmt_spread(spread(&ok, |x| x.first_byte_ms)),
            fmt_spread(spread(&ok, |x| x.tick_ms)),
            fmt_spread(bt("restored")),
            fmt_spread(bt("first_entry")),
            fmt_spread(guest_part),
            fmt_spread(spread(&ok, |x| x.hwm_at_tick_kib.map(|v| v as f64))),
            fmt_spread(spread(&ok, |x| x.cpu_ms)),
        ));
    }
    for sk in &r.skipped {
        s.push_str(&format!(
            "| {} | – | – | skipped: {} | | | | | | |\n",
            sk.runner, sk.reason
        ));
    }
    let loft: Vec<&(&str, Option<f64>)> = medians
        .iter()
        .filter(|(n, _)| n.starts_with("loft-"))
        .collect();
    if let (Some(first), Some(last)) = (loft.first(), loft.last()) {
        if loft.len() > 1 {
            s.push_str(&format!(
                "\nFirst byte, {} ÷ {}: {} (the restore maps the memory file, it copies \
                 nothing: the time should not grow with the guest's RAM).\n",
                last.0,
                first.0,
                stats::ratio(last.1, first.1).map_or("–".into(), stats::fmt_ratio)
            ));
        }
    }

    s.push_str(
        "\n## In-process restore → first command\n\nIn the bench's own process, from the \
         agent-ready snapshots above: `Snapshot::open(dir)`, then \
         `VmBuilder::new().restore_from(snapshot).start()`, then `wait_for_agent()` (the agent \
         answers and the guest's clock and entropy are synced, which the first exec after a \
         restore would do first), then `exec([\"true\"])`, then a second `exec([\"true\"])` (the same command in the now \
         warm guest), then `kill()`. restored / \
         first_entry: `VmHandle::boot_times()`, ms after `start()` was called.\n\n",
    );
    s.push_str(
        "| memory | ok | failed | open ms | start() ms | sync ms | exec(true) ms | restore → exec result ms | 2nd exec(true) ms | restored ms | first_entry ms | kill ms |\n",
    );
    s.push_str(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for size in names(r.in_process.iter().map(|x| x.memory.as_str())) {
        let all: Vec<&InProcessRun> = r.in_process.iter().filter(|x| x.memory == size).collect();
        let ok: Vec<&InProcessRun> = all.iter().copied().filter(|x| x.ok).collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            size,
            ok.len(),
            all.len() - ok.len(),
            fmt_spread(spread(&ok, |x| x.open_ms)),
            fmt_spread(spread(&ok, |x| x.start_ms)),
            fmt_spread(spread(&ok, |x| x.sync_ms)),
            fmt_spread(spread(&ok, |x| x.exec_ms)),
            fmt_spread(spread(&ok, |x| x.total_ms)),
            fmt_spread(spread(&ok, |x| x.second_exec_ms)),
            fmt_spread(spread(&ok, |x| x.restored_ms)),
            fmt_spread(spread(&ok, |x| x.first_entry_ms)),
            fmt_spread(spread(&ok, |x| x.kill_ms)),
        ));
    }

    let failed_fb = r.first_byte.iter().filter(|x| !x.ok).map(|x| {
        format!(
            "- {} round {}: {}{}",
            x.runner,
            x.round,
            x.error.as_deref().unwrap_or("failed"),
            x.log
                .as_ref()
                .map(|l| format!(" (log: {l})"))
                .unwrap_or_default()
        )
    });
    let failed_ip = r.in_process.iter().filter(|x| !x.ok).map(|x| {
        format!(
            "- in-process {} round {}: {}",
            x.memory,
            x.round,
            x.error.as_deref().unwrap_or("failed")
        )
    });
    let failed: Vec<String> = failed_fb.chain(failed_ip).collect();
    if !failed.is_empty() {
        s.push_str("\nFailed runs:\n\n");
        for f in failed {
            s.push_str(&f);
            s.push('\n');
        }
    }

    s.push_str("\n## Notes\n\n");
    for st in &r.setup {
        s.push_str(&format!(
            "- {}: `{}`: {}\n",
            st.name,
            st.command,
            if st.ok {
                format!(
                    "{} s (boot to the marker, then the save), memory {} MiB on disk",
                    st.create_ms.map_or("–".into(), |x| fmt_num(x / 1e3)),
                    mib(st.memory_on_disk_bytes)
                )
            } else {
                format!("failed: {}", st.error.as_deref().unwrap_or("?"))
            }
        ));
    }
    for n in &r.notes {
        s.push_str(&format!("- {n}\n"));
    }
    s.push_str(&format!("- {}\n", crate::host::load_note(&r.host, &r.busy)));
    s
}
