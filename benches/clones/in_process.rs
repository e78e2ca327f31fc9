//! Clones in the bench's own process: restore alone, restore → first `exec(["true"])` in a loop
//! on 1..T threads, the phases of one clone, and N clones alive at once (density).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use loft::{ExecRequest, ExitStatus, Snapshot, VmBuilder, VmHandle};
use serde::Serialize;

use crate::mem::{self, Usage};
use crate::report::{Density, Idle, MemPoint};
use crate::Floor;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One clone's life in a loop: restore, sync, first exec, kill.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CloneRun {
    pub thread: usize,
    pub ok: bool,
    /// `VmBuilder::restore_from(..).start()` returning.
    pub restore_ms: Option<f64>,
    /// `wait_for_agent`: the agent answers and the guest's clock, entropy and clone id are set.
    pub sync_ms: Option<f64>,
    /// `exec(["true"])` after the sync.
    pub exec_ms: Option<f64>,
    /// restore → the first exec's result (`restore_ms + sync_ms + exec_ms`).
    pub to_exec_ms: Option<f64>,
    /// `kill` + drop of the handle.
    pub kill_ms: Option<f64>,
    pub error: Option<String>,
}

fn start(snapshot: &Snapshot, timeout: Duration) -> Result<VmHandle, loft::Error> {
    VmBuilder::new()
        .agent_timeout(timeout)
        .restore_from(snapshot.clone())
        .start()
}

/// `true` in the guest, given at most `timeout` (the host gives up then; a guest starved of CPU
/// may make no progress at all, see the report).
fn exec_true(vm: &VmHandle, timeout: Duration) -> Result<(), String> {
    let out = vm
        .exec(&ExecRequest::new(["true"]).timeout(timeout))
        .map_err(|e| format!("exec: {}", loft::error::chain(&e)))?;
    match out.status {
        ExitStatus::Code(0) => Ok(()),
        s => Err(format!("`true` ended with {s:?}")),
    }
}

/// Restores one clone and runs its first `true`; the handle is returned alive.
fn restore_and_exec(
    snapshot: &Snapshot,
    timeout: Duration,
    r: &mut CloneRun,
) -> Result<VmHandle, String> {
    let t0 = Instant::now();
    let vm =
        start(snapshot, timeout).map_err(|e| format!("restore: {}", loft::error::chain(&e)))?;
    let t1 = Instant::now();
    r.restore_ms = Some(ms(t1 - t0));
    vm.wait_for_agent()
        .map_err(|e| format!("sync: {}", loft::error::chain(&e)))?;
    let t2 = Instant::now();
    r.sync_ms = Some(ms(t2 - t1));
    exec_true(&vm, timeout)?;
    let t3 = Instant::now();
    r.exec_ms = Some(ms(t3 - t2));
    r.to_exec_ms = Some(ms(t3 - t0));
    Ok(vm)
}

fn kill(vm: VmHandle) -> (f64, Option<String>) {
    let t = Instant::now();
    let killed = vm.kill();
    drop(vm);
    (
        ms(t.elapsed()),
        killed
            .err()
            .map(|e| format!("kill: {}", loft::error::chain(&e))),
    )
}

/// One full cycle: restore, sync, exec, kill.
pub fn cycle(snapshot: &Snapshot, timeout: Duration, thread: usize) -> CloneRun {
    let mut r = CloneRun {
        thread,
        ..CloneRun::default()
    };
    match restore_and_exec(snapshot, timeout, &mut r) {
        Ok(vm) => {
            let (k, err) = kill(vm);
            r.kill_ms = Some(k);
            r.ok = err.is_none();
            r.error = err;
        }
        Err(e) => r.error = Some(e),
    }
    r
}

/// Clones restored and exec'd from `threads` threads, `per_thread` each, every clone killed
/// after its exec.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Throughput {
    pub round: usize,
    pub threads: usize,
    pub clones: usize,
    pub ok: usize,
    /// The first restore → the last kill.
    pub wall_s: f64,
    /// ok clones ÷ wall (kills included).
    pub clones_per_s: f64,
    /// This process's CPU time over the step ÷ ok clones.
    pub cpu_ms_per_clone: Option<f64>,
    /// The host's 1-minute load average right after.
    pub load_after: String,
    pub stopped_early: Option<String>,
    pub runs: Vec<CloneRun>,
}

pub fn throughput(
    snapshot: &Snapshot,
    threads: usize,
    per_thread: usize,
    timeout: Duration,
    floor: &Floor,
    round: usize,
) -> Throughput {
    let runs = Mutex::new(Vec::new());
    let stop: Mutex<Option<String>> = Mutex::new(None);
    let u0 = Usage::now();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (runs, stop) = (&runs, &stop);
            s.spawn(move || {
                for _ in 0..per_thread {
                    if stop.lock().unwrap().is_some() {
                        return;
                    }
                    if let Err(e) = floor.check() {
                        *stop.lock().unwrap() = Some(e);
                        return;
                    }
                    let r = cycle(snapshot, timeout, t);
                    runs.lock().unwrap().push(r);
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let cpu = Usage::now().since(&u0).cpu_ms;
    let runs = runs.into_inner().unwrap();
    let ok = runs.iter().filter(|r| r.ok).count();
    Throughput {
        round,
        threads,
        clones: runs.len(),
        ok,
        wall_s: wall,
        clones_per_s: ok as f64 / wall,
        cpu_ms_per_clone: (ok > 0).then(|| cpu / ok as f64),
        load_after: crate::host::load_avg(),
        stopped_early: stop.into_inner().unwrap(),
        runs,
    }
}

/// Restores without an exec: `Snapshot::open`, `start()` (and loft's own `restored` mark within
/// it), then `kill`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreAlone {
    pub round: usize,
    pub threads: usize,
    pub ok: usize,
    pub wall_s: f64,
    /// `Snapshot::open` (state file read and checked), once per restore.
    pub open_ms: Vec<f64>,
    /// `VmBuilder::restore_from(snapshot).start()` returning.
    pub start_ms: Vec<f64>,
    /// start() called → loft's `restored` mark (memory mapped, KVM VM, devices and vCPUs
    /// restored); the rest of start() is the VMM thread's spawn and the handle.
    pub restored_mark_ms: Vec<f64>,
    /// This process's CPU time per restore (open + start + kill).
    pub cpu_ms_per_restore: Option<f64>,
    pub kill_ms: Vec<f64>,
    pub errors: Vec<String>,
}

pub fn restore_alone(
    dir: &std::path::Path,
    threads: usize,
    per_thread: usize,
    timeout: Duration,
    round: usize,
) -> RestoreAlone {
    let out = Mutex::new(RestoreAlone {
        round,
        threads,
        ..RestoreAlone::default()
    });
    let u0 = Usage::now();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let out = &out;
            s.spawn(move || {
                for _ in 0..per_thread {
                    let ta = Instant::now();
                    let snapshot = match Snapshot::open(dir) {
                        Ok(s) => s,
                        Err(e) => {
                            out.lock().unwrap().errors.push(loft::error::chain(&e));
                            continue;
                        }
                    };
                    let tb = Instant::now();
                    let vm = VmBuilder::new()
                        .agent_timeout(timeout)
                        .times_from(tb)
                        .restore_from(snapshot)
                        .start();
                    let tc = Instant::now();
                    match vm {
                        Ok(vm) => {
                            let mark = vm.boot_times().restored.map(|m| ms(m.wall));
                            let (k, err) = kill(vm);
                            let mut o = out.lock().unwrap();
                            o.open_ms.push(ms(tb - ta));
                            o.start_ms.push(ms(tc - tb));
                            o.restored_mark_ms.extend(mark);
                            o.kill_ms.push(k);
                            match err {
                                Some(e) => o.errors.push(e),
                                None => o.ok += 1,
                            }
                        }
                        Err(e) => out.lock().unwrap().errors.push(loft::error::chain(&e)),
                    }
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let cpu = Usage::now().since(&u0).cpu_ms;
    let mut o = out.into_inner().unwrap();
    o.wall_s = wall;
    o.cpu_ms_per_restore = (o.ok > 0).then(|| cpu / o.ok as f64);
    o
}

/// Where one clone's time goes: wall, this process's CPU and page faults per phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    pub name: String,
    pub wall_ms: f64,
    pub cpu_ms: f64,
    pub minor_faults: u64,
    pub major_faults: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Anatomy {
    pub round: usize,
    pub phases: Vec<Phase>,
    /// Idle after the exec: this process's CPU over the window (the one clone's vCPU, mostly).
    pub idle: Option<Idle>,
    pub error: Option<String>,
}

/// One clone, alone in the process: open, start, sync, first `true`, second `true`, idle,
/// kill, each phase's wall and CPU time and page faults.
pub fn anatomy(dir: &std::path::Path, timeout: Duration, idle: Duration, round: usize) -> Anatomy {
    let mut a = Anatomy {
        round,
        ..Anatomy::default()
    };
    let mut last = (Instant::now(), Usage::now());
    fn mark(a: &mut Anatomy, last: &mut (Instant, Usage), name: &str) {
        let now = (Instant::now(), Usage::now());
        let u = now.1.since(&last.1);
        a.phases.push(Phase {
            name: name.into(),
            wall_ms: ms(now.0 - last.0),
            cpu_ms: u.cpu_ms,
            minor_faults: u.minflt,
            major_faults: u.majflt,
        });
        *last = now;
    }
    let result = (|| -> Result<(), String> {
        let snapshot = Snapshot::open(dir).map_err(|e| loft::error::chain(&e))?;
        mark(&mut a, &mut last, "Snapshot::open");
        let vm = start(&snapshot, timeout)
            .map_err(|e| format!("restore: {}", loft::error::chain(&e)))?;
        mark(&mut a, &mut last, "start() (restore)");
        vm.wait_for_agent()
            .map_err(|e| format!("sync: {}", loft::error::chain(&e)))?;
        mark(&mut a, &mut last, "wait_for_agent (sync)");
        exec_true(&vm, timeout)?;
        mark(&mut a, &mut last, "first exec(true)");
        exec_true(&vm, timeout)?;
        mark(&mut a, &mut last, "second exec(true)");
        a.idle = Some(idle_self(1, idle));
        last = (Instant::now(), Usage::now());
        let (_, err) = kill(vm);
        mark(&mut a, &mut last, "kill + drop");
        err.map_or(Ok(()), Err)
    })();
    a.error = result.err();
    a
}

/// This process's CPU time over `window`, per clone of `n`.
pub fn idle_self(n: usize, window: Duration) -> Idle {
    let u0 = Usage::now();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let cpu = Usage::now().since(&u0).cpu_ms;
    Idle::new(n, t0.elapsed(), cpu)
}

/// N clones restored in this process (`jobs` at a time), each after its first `exec(true)`;
/// the process's PSS and RSS and the host's MemAvailable before and after; then all killed.
/// A clone that ran its exec is parked (its threads under `SCHED_IDLE`) until all are ready,
/// so that the idle clones' guest ticks do not starve the next clones' execs; all are back
/// under `SCHED_OTHER` for the idle window.
pub fn density(
    snapshot: &Snapshot,
    n: usize,
    jobs: usize,
    timeout: Duration,
    idle: Duration,
    settle: Duration,
    floor: &Floor,
) -> Density {
    let mut d = Density::new("in-process", n);
    d.before = MemPoint::now(Some("self"));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let stopped: Mutex<Option<String>> = Mutex::new(None);
    let alive: Mutex<Vec<VmHandle>> = Mutex::new(Vec::new());
    let parked: Mutex<Vec<u32>> = Mutex::new(Vec::new());
    let runs: Mutex<Vec<CloneRun>> = Mutex::new(Vec::new());
    // one start() at a time, to tell which threads it made (a restore takes ~10 ms)
    let starting = Mutex::new(());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..jobs.min(n).max(1) {
            let (next, stop, stopped, alive, parked, runs, starting) =
                (&next, &stop, &stopped, &alive, &parked, &runs, &starting);
            s.spawn(move || loop {
                if stop.load(Ordering::Acquire) || next.fetch_add(1, Ordering::AcqRel) >= n {
                    return;
                }
                if let Err(e) = floor.check() {
                    stop.store(true, Ordering::Release);
                    stopped.lock().unwrap().get_or_insert(e);
                    return;
                }
                let mut r = CloneRun {
                    thread: t,
                    ..CloneRun::default()
                };
                let result = (|| -> Result<(VmHandle, Vec<u32>), String> {
                    let t0 = Instant::now();
                    let (vm, threads) = {
                        let _one = starting.lock().unwrap();
                        let before = mem::tids("self");
                        let vm = start(snapshot, timeout)
                            .map_err(|e| format!("restore: {}", loft::error::chain(&e)))?;
                        // the VMM thread spawns the vCPU threads: wait for them (a second
                        // at most)
                        let vcpus = snapshot.info().cpus as usize;
                        let deadline = Instant::now() + Duration::from_secs(1);
                        let made = loop {
                            let made: Vec<u32> =
                                mem::tids("self").difference(&before).copied().collect();
                            let running = made
                                .iter()
                                .filter(|t| mem::comm(**t).starts_with("loft-vcpu"))
                                .count();
                            if running >= vcpus || Instant::now() >= deadline {
                                break made;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        };
                        (vm, made)
                    };
                    let t1 = Instant::now();
                    r.restore_ms = Some(ms(t1 - t0));
                    vm.wait_for_agent()
                        .map_err(|e| format!("sync: {}", loft::error::chain(&e)))?;
                    let t2 = Instant::now();
                    r.sync_ms = Some(ms(t2 - t1));
                    exec_true(&vm, timeout)?;
                    let t3 = Instant::now();
                    r.exec_ms = Some(ms(t3 - t2));
                    r.to_exec_ms = Some(ms(t3 - t0));
                    Ok((vm, threads))
                })();
                match result {
                    Ok((vm, threads)) => {
                        r.ok = true;
                        mem::park(threads.iter().copied(), true);
                        parked.lock().unwrap().extend(threads);
                        alive.lock().unwrap().push(vm);
                    }
                    Err(e) => r.error = Some(e),
                }
                runs.lock().unwrap().push(r);
            });
        }
    });
    d.ready_s = Some(t0.elapsed().as_secs_f64());
    let alive = alive.into_inner().unwrap();
    d.ready = alive.len();
    d.stopped_early = stopped.into_inner().unwrap();
    std::thread::sleep(settle);
    d.after = MemPoint::now(Some("self"));
    mem::park(parked.into_inner().unwrap(), false);
    d.idle = Some(idle_self(alive.len(), idle));
    d.finish();
    let runs = runs.into_inner().unwrap();
    d.errors = runs.iter().filter_map(|r| r.error.clone()).collect();
    d.to_exec_ms = runs.iter().filter_map(|r| r.to_exec_ms).collect();
    let tk = Instant::now();
    // every clone asked to stop at once, then each killed and dropped (joined)
    for vm in &alive {
        vm.stop();
    }
    for vm in alive {
        let (_, err) = kill(vm);
        d.errors.extend(err);
    }
    d.kill_s = Some(tk.elapsed().as_secs_f64());
    d.after_kill_mem_available_kib = mem::mem_available_kib();
    d
}
