//! The results: WORKLOAD.json (raw runs + summary), WORKLOAD.md (table of medians), WORKLOAD.svg
//! (plot), for the boot and the cmd workload.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::runners::{Kind, Workload};
use crate::stats::{self, fmt_num, fmt_spread, Spread};
use crate::timer::{BootTimer, PHASES};

pub use crate::host::Host;

/// How the benchmark was run.
#[derive(Debug, Serialize)]
pub struct Config {
    /// `boot` or `cmd`.
    pub workload: String,
    pub runs: usize,
    pub runners: Vec<String>,
    pub timeout_vm_s: f64,
    pub timeout_container_s: f64,
    pub guest_dir: String,
    pub guest_cmdline: String,
    pub guest_mem_mib: u64,
    pub loft_bin: String,
    pub loft_boot_timer: bool,
    pub oci_bundle: Option<String>,
    /// One example command per runner.
    pub commands: BTreeMap<String, String>,
    /// The snapshot loft-restore-cmd restores, made once before the runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd_snapshot: Option<CmdSnapshot>,
    pub started_utc: String,
}

/// `loft snapshot create` for loft-restore-cmd: how it went and what it made.
#[derive(Debug, Serialize)]
pub struct CmdSnapshot {
    pub command: String,
    pub ok: bool,
    /// Spawn → exit of `loft snapshot create` (a boot to the agent, then the save).
    pub create_ms: Option<f64>,
    /// Apparent size of the memory file.
    pub memory_bytes: Option<u64>,
    /// Blocks the memory file has on disk.
    pub memory_on_disk_bytes: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub runner: String,
    /// 1-based round of the interleaved loop.
    pub round: usize,
    pub ok: bool,
    pub ready_ms: Option<f64>,
    pub exit_ms: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub cpu_ms: Option<f64>,
    /// VMMs only: RSS outside the guest RAM mapping, right after the marker.
    pub vmm_overhead_kib: Option<u64>,
    pub boot_timer: Option<BootTimer>,
    /// `exit 0`, `signal 9`, …
    pub status: Option<String>,
    /// Why the run failed.
    pub error: Option<String>,
    /// stdout + stderr of the run, relative to the output directory.
    pub log: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub runner: String,
    pub ok_runs: usize,
    pub failed_runs: usize,
    pub ready_ms: Option<Spread>,
    pub exit_ms: Option<Spread>,
    pub peak_rss_kib: Option<Spread>,
    pub cpu_ms: Option<Spread>,
    pub vmm_overhead_kib: Option<Spread>,
    /// Median ready_ms over loft-elf's median ready_ms.
    pub ratio_to_loft: Option<f64>,
    /// Boot workload, other runners: in how many interleaved rounds loft-elf's ready_ms was
    /// below this runner's, and how many rounds both completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loft_ahead_pairs: Option<(usize, usize)>,
    /// cmd workload: median ready_ms over each base runner's (loft-cold-cmd, crun-cmd).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ready_ratio_to: BTreeMap<String, f64>,
    /// What peak_rss_kib and cpu_ms cover for this runner.
    pub measures: String,
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
    pub runs: Vec<Run>,
    pub summary: Vec<Summary>,
    pub skipped: Vec<Skipped>,
    pub notes: Vec<String>,
    /// How busy the machine was meanwhile.
    pub busy: crate::host::Busy,
}

fn spread_of<T: Copy + Into<f64>>(
    runs: &[&Run],
    field: impl Fn(&Run) -> Option<T>,
) -> Option<Spread> {
    let v: Vec<f64> = runs
        .iter()
        .filter_map(|r| field(r))
        .map(Into::into)
        .collect();
    stats::spread(&v)
}

fn kib(x: Option<u64>) -> Option<f64> {
    x.map(|v| v as f64)
}

/// One summary row per runner (in `kinds` order), statistics over ok runs only.
pub fn summarize(kinds: &[Kind], runs: &[Run], workload: Workload) -> Vec<Summary> {
    let mut rows: Vec<Summary> = kinds
        .iter()
        .map(|k| {
            let all: Vec<&Run> = runs.iter().filter(|r| r.runner == k.name()).collect();
            let ok: Vec<&Run> = all.iter().copied().filter(|r| r.ok).collect();
            Summary {
                runner: k.name().to_string(),
                ok_runs: ok.len(),
                failed_runs: all.len() - ok.len(),
                ready_ms: spread_of(&ok, |r| r.ready_ms),
                exit_ms: spread_of(&ok, |r| r.exit_ms),
                peak_rss_kib: spread_of(&ok, |r| kib(r.peak_rss_kib)),
                cpu_ms: spread_of(&ok, |r| r.cpu_ms),
                vmm_overhead_kib: spread_of(&ok, |r| kib(r.vmm_overhead_kib)),
                ratio_to_loft: None,
                loft_ahead_pairs: None,
                ready_ratio_to: BTreeMap::new(),
                measures: k.measures().to_string(),
            }
        })
        .collect();
    let base = rows
        .iter()
        .find(|s| s.runner == Kind::LoftElf.name())
        .and_then(|s| s.ready_ms)
        .map(|s| s.median);
    for r in &mut rows {
        r.ratio_to_loft = stats::ratio(r.ready_ms.map(|s| s.median), base);
    }
    let ready_by_round = |name: &str| -> Vec<(usize, f64)> {
        runs.iter()
            .filter(|r| r.runner == name && r.ok)
            .filter_map(|r| Some((r.round, r.ready_ms?)))
            .collect()
    };
    if workload == Workload::Boot {
        let loft = ready_by_round(Kind::LoftElf.name());
        for r in rows.iter_mut().filter(|r| r.runner != Kind::LoftElf.name()) {
            r.loft_ahead_pairs = Some(stats::ahead_in_pairs(&loft, &ready_by_round(&r.runner)));
        }
    }
    if workload == Workload::Cmd {
        let median_of = |rows: &[Summary], k: Kind| {
            rows.iter()
                .find(|s| s.runner == k.name())
                .and_then(|s| s.ready_ms)
                .map(|s| s.median)
        };
        for base in workload.ratio_bases() {
            let b = median_of(&rows, *base);
            for r in &mut rows {
                if let Some(x) = stats::ratio(r.ready_ms.map(|s| s.median), b) {
                    r.ready_ratio_to.insert(base.name().to_string(), x);
                }
            }
        }
    }
    rows
}

/// The boot-timer phases seen in `runs`, in loft's order: [`PHASES`], with `restored` after
/// `vm_built` when a restore was timed, and phases this bench does not know at the end.
fn phase_columns(runs: &[Run]) -> Vec<String> {
    let mut cols: Vec<String> = PHASES.iter().map(|p| p.to_string()).collect();
    for t in runs.iter().filter_map(|r| r.boot_timer.as_ref()) {
        for name in t.other.keys() {
            if !cols.contains(name) {
                if name == "restored" {
                    cols.insert(1, name.clone());
                } else {
                    cols.push(name.clone());
                }
            }
        }
    }
    cols
}

/// Median wall/CPU ms of each boot-timer phase over a runner's ok runs.
fn phase_medians(runs: &[Run], runner: &str, phases: &[String]) -> Option<Vec<(f64, f64, usize)>> {
    let timers: Vec<&BootTimer> = runs
        .iter()
        .filter(|r| r.runner == runner && r.ok)
        .filter_map(|r| r.boot_timer.as_ref())
        .collect();
    if timers.is_empty() {
        return None;
    }
    Some(
        phases
            .iter()
            .map(|p| {
                let marks: Vec<_> = timers.iter().filter_map(|t| t.get(p)).collect();
                let w: Vec<f64> = marks.iter().map(|m| m.wall_ms).collect();
                let c: Vec<f64> = marks.iter().map(|m| m.cpu_ms).collect();
                (
                    stats::median(&w).unwrap_or(f64::NAN),
                    stats::median(&c).unwrap_or(f64::NAN),
                    marks.len(),
                )
            })
            .collect(),
    )
}

fn workload_of(r: &Report) -> Workload {
    Workload::parse(&r.config.workload).unwrap_or(Workload::Boot)
}

/// The title and the paragraph saying what was timed.
fn intro(r: &Report) -> (String, String) {
    match workload_of(r) {
        Workload::Boot => (
            "loft boot benchmark".into(),
            format!(
                "Workload: the VMs boot the guest in `{}` (`vmlinux`, or `bzImage` for \
                 loft-bzimage, + `initramfs.cpio`; {} MiB, 1 vCPU) to `GUEST-INIT-READY` on the \
                 serial console, then reboot, which ends the VMM; the containers run `/bin/sh -c \
                 'echo GUEST-INIT-READY'` in the same busybox tree. ready = spawn → marker on \
                 stdout, exit = spawn → reaped. Medians of the ok runs (min–max).",
                r.config.guest_dir, r.config.guest_mem_mib
            ),
        ),
        Workload::Cmd => {
            let snap = match &r.config.cmd_snapshot {
                Some(c) if c.ok => format!(
                    " loft-restore-cmd's snapshot was made once before the runs by `{}`: {} s \
                     (a cold boot to the guest agent, then the save), memory file {} MiB \
                     allocated of {} MiB.",
                    c.command,
                    c.create_ms.map_or("–".into(), |x| fmt_num(x / 1e3)),
                    c.memory_on_disk_bytes
                        .map_or("–".into(), |x| fmt_num(x as f64 / (1 << 20) as f64)),
                    c.memory_bytes.map_or("–".into(), |x| (x >> 20).to_string()),
                ),
                Some(c) => format!(
                    " `{}` failed: {}.",
                    c.command,
                    c.error.as_deref().unwrap_or("?")
                ),
                None => String::new(),
            };
            (
                "loft command benchmark: fresh environment → command output".into(),
                format!(
                    "Workload: a fresh environment runs `echo {}` and its output comes back on \
                     stdout. loft-cold-cmd: `loft run -- echo …` boots the guest in `{}` \
                     (`vmlinux` + `initramfs.cpio`, {} MiB, 1 vCPU) and runs the command \
                     through the guest agent; loft-restore-cmd: `loft run --restore DIR -- echo \
                     …` restores a snapshot of that guest taken once its agent answered, then \
                     the same; crun-cmd / runc-cmd: the OCI runtime runs `echo` in the same \
                     busybox tree as the boot workload's containers. Either way the environment \
                     is gone at exit. ready = spawn → the output on stdout, exit = spawn → \
                     reaped. Medians of the ok runs (min–max).{snap}",
                    crate::runners::CMD_MARKER,
                    r.config.guest_dir,
                    r.config.guest_mem_mib
                ),
            )
        }
    }
}

pub fn markdown(r: &Report) -> String {
    let workload = workload_of(r);
    let (title, intro) = intro(r);
    let mut s = String::new();
    s.push_str(&format!("# {title}\n\n"));
    s.push_str(&format!(
        "Host: {} · Linux {} · KVM {} · loft {} · {} runs per runner, interleaved · {}\n\n",
        r.host.cpu,
        r.host.kernel,
        r.host.kvm_flavour,
        r.host.loft_commit,
        r.config.runs,
        r.config.started_utc
    ));
    s.push_str(&intro);
    s.push_str("\n\n");
    let bases = workload.ratio_bases();
    let ready = match workload {
        Workload::Boot => "ready ms",
        Workload::Cmd => "output ms",
    };
    let ratio_heads: Vec<String> = bases
        .iter()
        .map(|b| format!("{} ÷ {}", ready.trim_end_matches(" ms"), b.name()))
        .collect();
    s.push_str(&format!(
        "| runner | ok | failed | {ready} | exit ms | peak RSS KiB | CPU ms | VMM overhead KiB | {} |\n",
        ratio_heads.join(" | ")
    ));
    s.push_str(&format!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |{}\n",
        " ---: |".repeat(bases.len())
    ));
    for row in &r.summary {
        let ratios: Vec<String> = match workload {
            Workload::Boot => vec![row.ratio_to_loft],
            Workload::Cmd => bases
                .iter()
                .map(|b| row.ready_ratio_to.get(b.name()).copied())
                .collect(),
        }
        .into_iter()
        .map(|x| x.map(stats::fmt_ratio).unwrap_or_else(|| "–".into()))
        .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.runner,
            row.ok_runs,
            row.failed_runs,
            fmt_spread(row.ready_ms),
            fmt_spread(row.exit_ms),
            fmt_spread(row.peak_rss_kib),
            fmt_spread(row.cpu_ms),
            fmt_spread(row.vmm_overhead_kib),
            ratios.join(" | "),
        ));
    }
    for sk in &r.skipped {
        s.push_str(&format!(
            "| {} | – | – | skipped: {} | | | | |{}\n",
            sk.runner,
            sk.reason,
            " |".repeat(bases.len())
        ));
    }
    let pairs: Vec<String> = r
        .summary
        .iter()
        .filter_map(|row| {
            let (ahead, n) = row.loft_ahead_pairs?;
            let verdict = match n {
                0 => "no pair to compare",
                n if n < 10 => "too few pairs for a verdict (10 or more)",
                n if ahead * 10 >= n * 8 => "ahead (≥ 8 in 10)",
                n if ahead * 10 <= n * 2 => "behind (≤ 2 in 10)",
                _ => "neither ahead nor behind",
            };
            Some(format!(
                "- loft-elf reached the marker first in {ahead} of {n} interleaved pairs against {}: {verdict}\n",
                row.runner
            ))
        })
        .collect();
    if !pairs.is_empty() {
        s.push_str("\nSign test, pair by pair (the same round of the interleaved loop):\n\n");
        s.push_str(&pairs.concat());
    }

    let failed: Vec<&Run> = r.runs.iter().filter(|x| !x.ok).collect();
    if !failed.is_empty() {
        s.push_str("\nFailed runs:\n\n");
        for f in failed {
            s.push_str(&format!(
                "- {} round {}: {}{}\n",
                f.runner,
                f.round,
                f.error.as_deref().unwrap_or("failed"),
                f.log
                    .as_ref()
                    .map(|l| format!(" (log: {l})"))
                    .unwrap_or_default()
            ));
        }
    }

    let loft_rows: Vec<&Summary> = r
        .summary
        .iter()
        .filter(|x| x.runner.starts_with("loft-"))
        .collect();
    if !loft_rows.is_empty() {
        s.push_str(
            "\n## loft boot-timer phases\n\nMedian wall ms since loft's start / loft's CPU ms at \
             that moment (`--boot-timer`), ok runs.\n\n",
        );
        if r.config.loft_boot_timer {
            let phases = phase_columns(&r.runs);
            s.push_str(&format!("| runner | {} |\n", phases.join(" | ")));
            s.push_str(&format!("| --- |{}\n", " ---: |".repeat(phases.len())));
            for row in loft_rows {
                match phase_medians(&r.runs, &row.runner, &phases) {
                    Some(ph) => {
                        let cells: Vec<String> = ph
                            .iter()
                            .map(|(w, c, n)| {
                                if *n == 0 {
                                    "–".to_string()
                                } else {
                                    format!("{} / {}", fmt_num(*w), fmt_num(*c))
                                }
                            })
                            .collect();
                        s.push_str(&format!("| {} | {} |\n", row.runner, cells.join(" | ")));
                    }
                    None => s.push_str(&format!(
                        "| {} | {}{} |\n",
                        row.runner,
                        if row.ok_runs == 0 {
                            "no ok run"
                        } else {
                            "no boot-timer line"
                        },
                        " | –".repeat(phases.len() - 1)
                    )),
                }
            }
        } else {
            s.push_str("This loft binary has no `--boot-timer` flag: no phases were recorded.\n");
        }
    }

    s.push_str("\n## What the numbers cover\n\n");
    for row in &r.summary {
        s.push_str(&format!(
            "- {}: peak RSS and CPU (wait4 rusage) = {}.\n",
            row.runner, row.measures
        ));
    }
    for n in &r.notes {
        s.push_str(&format!("- {n}\n"));
    }
    s.push_str(&format!("- {}\n", crate::host::load_note(&r.host, &r.busy)));
    s
}

pub fn write_json(path: &Path, r: &Report) -> Result<(), String> {
    let text = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// One horizontal strip of points per runner on a log time axis, medians marked.
pub fn write_svg(path: &Path, r: &Report) -> Result<(), String> {
    use plotters::prelude::*;

    let names: Vec<&str> = r.summary.iter().map(|s| s.runner.as_str()).collect();
    let n = names.len().max(1) as i32;
    let oks: Vec<f64> = r
        .runs
        .iter()
        .filter(|x| x.ok)
        .filter_map(|x| x.ready_ms)
        .filter(|x| *x > 0.0)
        .collect();
    let (lo, hi) = if oks.is_empty() {
        (1.0, 10.0)
    } else {
        let min = oks.iter().copied().fold(f64::INFINITY, f64::min);
        let max = oks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        // whole decades around the data
        (
            10f64.powf((min * 0.9).log10().floor()),
            10f64.powf((max * 1.1).log10().ceil()),
        )
    };
    // runner i is drawn at y = n-1-i: the first runner on top
    let y_of = |i: usize| n - 1 - i as i32;

    let height = 130 + 55 * n as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let marker = workload_of(r).markers()[0];
    let caption = format!(
        "spawn → {marker}, {} runs/runner ({}; {})",
        r.config.runs, r.host.kvm_flavour, r.host.loft_commit
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(170)
        .build_cartesian_2d((lo..hi).log_scale(), -1i32..n)
        .map_err(|e| err(&e))?;
    let label_names = names.clone();
    let y_label = move |y: &i32| -> String {
        let i = n - 1 - *y;
        if *y < 0 || i < 0 {
            return String::new();
        }
        let i = i as usize;
        let failed = r.summary.get(i).map_or(0, |s| s.failed_runs);
        match (label_names.get(i), failed) {
            (Some(name), 0) => name.to_string(),
            (Some(name), f) => format!("{name} ({f} failed)"),
            (None, _) => String::new(),
        }
    };
    let x_label = |x: &f64| -> String {
        // 3 significant digits, no trailing zeros
        let short = |v: f64| {
            let t = fmt_num(v);
            if t.contains('.') {
                t.trim_end_matches('0').trim_end_matches('.').to_string()
            } else {
                t
            }
        };
        if *x >= 1000.0 {
            format!("{} s", short(*x / 1000.0))
        } else {
            format!("{} ms", short(*x))
        }
    };
    chart
        .configure_mesh()
        .x_desc(format!("time from spawn to {marker} (log scale)"))
        .y_labels(n as usize + 2)
        .y_label_formatter(&y_label)
        .x_label_formatter(&x_label)
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;

    let vm_color = RGBColor(31, 119, 180);
    let ct_color = RGBColor(214, 39, 40);
    let is_vm = |runner: &str| {
        Kind::ALL
            .iter()
            .find(|k| k.name() == runner)
            .is_some_and(|k| k.is_vm())
    };
    let points = |vm: bool| {
        let names = names.clone();
        r.runs
            .iter()
            .filter(move |x| x.ok && is_vm(&x.runner) == vm)
            .filter_map(move |x| {
                let i = names.iter().position(|n| *n == x.runner)?;
                Some((x.ready_ms?, y_of(i)))
            })
            .collect::<Vec<_>>()
    };
    for (vm, color, label) in [
        (true, vm_color, "micro-VM run"),
        (false, ct_color, "container run"),
    ] {
        let pts = points(vm);
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(
                pts.into_iter()
                    .map(move |p| Circle::new(p, 5, color.mix(0.55).filled())),
            )
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| Circle::new((x, y), 5, color.mix(0.55).filled()));
    }
    let medians: Vec<(f64, i32)> = r
        .summary
        .iter()
        .enumerate()
        .filter_map(|(i, s)| Some((s.ready_ms?.median, y_of(i))))
        .collect();
    if !medians.is_empty() {
        chart
            .draw_series(medians.into_iter().map(|(m, y)| {
                EmptyElement::at((m, y))
                    + PathElement::new(vec![(0, -16), (0, 16)], BLACK.stroke_width(3))
                    + Text::new(
                        x_label(&m),
                        (5, -30),
                        ("sans-serif", 13).into_font().color(&BLACK),
                    )
            }))
            .map_err(|e| err(&e))?
            .label("median")
            .legend(|(x, y)| PathElement::new(vec![(x, y - 7), (x, y + 7)], BLACK.stroke_width(3)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
