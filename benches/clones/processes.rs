//! Clones as separate processes: N × `loft run --restore DIR -- /bin/sh -c 'echo ready; exec
//! sleep 3600'`, each measured from its own `/proc/PID/smaps_rollup` once its guest command
//! printed `ready` (the one exec reached the guest's user space and its output the host), then
//! all stopped with SIGTERM. A process that is ready is parked (its threads under
//! `SCHED_IDLE`) until all are, as in-process clones are.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::mem::{self, Rollup};
use crate::report::{Density, Idle, MemPoint};
use crate::Floor;

/// The guest command of every clone process: one exec that stays.
pub const GUEST_CMD: [&str; 3] = ["/bin/sh", "-c", "echo ready; exec sleep 3600"];
const MARKER: &[u8] = b"ready";

/// The command line of one clone process.
pub fn command(loft: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(loft);
    cmd.arg("run").arg("--restore").arg(dir).arg("--");
    cmd.args(GUEST_CMD);
    cmd
}

/// One clone process.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Proc {
    pub index: usize,
    pub pid: u32,
    /// spawn → `ready` on its stdout.
    pub ready_ms: Option<f64>,
    pub rollup: Option<Rollup>,
    pub idle_cpu_ms: Option<f64>,
    pub error: Option<String>,
}

enum Ev {
    Ready(usize, Instant),
    Closed(usize, String),
}

fn stderr_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn signal_group(pid: u32, sig: libc::c_int) {
    // SAFETY: a signal to our own child's process group (made with process_group(0)).
    unsafe { libc::kill(-(pid as libc::pid_t), sig) };
}

#[allow(clippy::too_many_arguments)]
pub fn density(
    loft: &Path,
    dir: &Path,
    n: usize,
    jobs: usize,
    timeout: Duration,
    idle: Duration,
    settle: Duration,
    floor: &Floor,
    logs: &Path,
) -> Density {
    let mut d = Density::new("processes", n);
    d.before = MemPoint::now(None);
    let (tx, rx) = mpsc::channel::<Ev>();
    let mut children: Vec<Child> = Vec::new();
    let mut procs: Vec<Proc> = Vec::new();
    let mut spawned_at: Vec<Instant> = Vec::new();
    let mut in_flight = 0usize;
    let t0 = Instant::now();
    let deadline = t0 + timeout;
    let mut ready = 0usize;
    let mut done = 0usize;
    loop {
        // start more while fewer than `jobs` are on their way to `ready`
        while in_flight < jobs && children.len() < n && d.stopped_early.is_none() {
            if let Err(e) = floor.check() {
                d.stopped_early = Some(e);
                break;
            }
            let i = children.len();
            let err_path = logs.join(format!("processes-{n}-{i}.stderr"));
            let mut cmd = command(loft, dir);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(
                    std::fs::File::create(&err_path)
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null()),
                )
                .process_group(0);
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    d.stopped_early = Some(format!("cannot run {}: {e}", loft.display()));
                    break;
                }
            };
            let mut stdout = child.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut seen = false;
                loop {
                    match stdout.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            buf.extend_from_slice(&chunk[..k]);
                            if !seen && buf.windows(MARKER.len()).any(|w| w == MARKER) {
                                seen = true;
                                let _ = tx.send(Ev::Ready(i, Instant::now()));
                            }
                        }
                    }
                }
                let _ = tx.send(Ev::Closed(i, String::from_utf8_lossy(&buf).into_owned()));
            });
            procs.push(Proc {
                index: i,
                pid: child.id(),
                ..Proc::default()
            });
            spawned_at.push(Instant::now());
            children.push(child);
            in_flight += 1;
        }
        if done == children.len() && (children.len() == n || d.stopped_early.is_some()) {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ev::Ready(i, at)) => {
                procs[i].ready_ms = Some((at - spawned_at[i]).as_secs_f64() * 1e3);
                // parked until all are ready (see in_process::density)
                mem::park(mem::tids(&procs[i].pid.to_string()), true);
                ready += 1;
                done += 1;
                in_flight -= 1;
            }
            Ok(Ev::Closed(i, out)) => {
                if procs[i].ready_ms.is_none() && procs[i].error.is_none() {
                    let status = children[i]
                        .wait()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    procs[i].error = Some(format!(
                        "clone process {i} ended before `ready` ({status}); stdout {out:?}; \
                         stderr: {}",
                        stderr_tail(&logs.join(format!("processes-{n}-{i}.stderr")))
                    ));
                    done += 1;
                    in_flight -= 1;
                } else if procs[i].ready_ms.is_some() {
                    procs[i].error = Some(format!("clone process {i} ended after `ready`"));
                }
            }
            Err(_) => {
                d.stopped_early = Some(format!(
                    "{} of {} clone processes not ready within {:?}",
                    children.len() - ready,
                    children.len(),
                    timeout
                ));
                break;
            }
        }
    }
    d.ready_s = Some(t0.elapsed().as_secs_f64());
    std::thread::sleep(settle);
    let live = |p: &Proc| p.ready_ms.is_some() && p.error.is_none();
    for p in procs.iter_mut().filter(|p| live(p)) {
        p.rollup = mem::rollup(&p.pid.to_string());
    }
    d.after = MemPoint::now(None);
    for p in &procs {
        mem::park(mem::tids(&p.pid.to_string()), false);
    }
    // idle: each process's CPU time over the window
    let cpu0: Vec<Option<f64>> = procs.iter().map(|p| mem::proc_cpu_ms(p.pid)).collect();
    let ti = Instant::now();
    std::thread::sleep(idle);
    let window = ti.elapsed();
    let mut idle_total = 0.0;
    let mut idle_n = 0;
    for (p, c0) in procs.iter_mut().zip(cpu0) {
        if let (true, Some(a), Some(b)) = (live(p), c0, mem::proc_cpu_ms(p.pid)) {
            p.idle_cpu_ms = Some(b - a);
            idle_total += b - a;
            idle_n += 1;
        }
    }
    d.idle = Some(Idle::new(idle_n, window, idle_total));
    let rollups: Vec<Rollup> = procs.iter().filter_map(|p| p.rollup).collect();
    d.ready = rollups.len();
    d.processes_rollup = Some(Rollup::sum(&rollups));
    d.finish();
    d.errors = procs.iter().filter_map(|p| p.error.clone()).collect();
    d.to_exec_ms = procs.iter().filter_map(|p| p.ready_ms).collect();
    // stop them all: SIGTERM (loft stops its VM and exits), SIGKILL after 15 s
    let tk = Instant::now();
    for c in &children {
        signal_group(c.id(), libc::SIGTERM);
    }
    let kill_deadline = tk + Duration::from_secs(15);
    for c in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= kill_deadline => {
                    signal_group(c.id(), libc::SIGKILL);
                    let _ = c.wait();
                    d.errors
                        .push(format!("pid {} ignored SIGTERM for 15 s: killed", c.id()));
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    d.kill_s = Some(tk.elapsed().as_secs_f64());
    d.after_kill_mem_available_kib = mem::mem_available_kib();
    d.processes = procs;
    d
}
