//! Runs one command and measures it: spawn → the first stdout byte, spawn → the first stdout
//! containing each marker, spawn → exit, `wait4` rusage (peak RSS, CPU), and optionally the
//! child's smaps right after the first marker.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What one run gave.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Spawn → each marker's first appearance on stdout, in the order the markers were given
    /// (capped at the exit time).
    pub marks: Vec<Option<Duration>>,
    /// Spawn → the first byte on stdout (capped at the exit time).
    pub first_byte: Option<Duration>,
    /// Spawn → the child was reaped.
    pub exit: Option<Duration>,
    /// The child's exit code, or the signal that killed it, as text (`exit 0`, `signal 9`).
    pub status: Option<String>,
    /// True when the child exited with code 0.
    pub success: bool,
    /// The run hit its time limit and was killed.
    pub timed_out: bool,
    /// `ru_maxrss` of `wait4`, KiB. Linux counts the spawning process's own peak RSS into it
    /// (the child carries the bench's memory until its exec), so it is never below
    /// [`own_peak_rss_kib`] of the bench at the spawn.
    pub peak_rss_kib: Option<u64>,
    /// The child's own peak RSS (`VmHWM` of /proc/PID/status) right after the first marker,
    /// KiB: unlike `peak_rss_kib`, nothing of the bench's.
    pub hwm_at_marker_kib: Option<u64>,
    /// `ru_utime + ru_stime` of `wait4`.
    pub cpu: Option<Duration>,
    /// `/proc/PID/smaps` of the child, read right after the first marker appeared.
    pub smaps: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command could not be started.
    pub spawn_error: Option<String>,
    /// [`Options::on_spawn`] failed (the child was killed then).
    pub hook_error: Option<String>,
}

/// What [`run_with`] does besides timing.
#[derive(Default)]
pub struct Options {
    /// Read `/proc/PID/smaps` of the child right after the first marker.
    pub sample_smaps: bool,
    /// Give the child an open, empty pipe as stdin instead of /dev/null.
    pub stdin_pipe: bool,
    /// Send this signal to the child once the first marker appeared (for a child that would
    /// run on forever, like a restored guest printing in a loop).
    pub signal_at_marker: Option<libc::c_int>,
    /// Runs on a thread of its own right after the spawn, with the child's pid (e.g. to drive
    /// the child's API socket); an error kills the child and is kept in
    /// [`Outcome::hook_error`].
    pub on_spawn: Option<SpawnHook>,
}

/// See [`Options::on_spawn`].
pub type SpawnHook = Box<dyn FnOnce(u32) -> Result<(), String> + Send>;

enum Event {
    Marker,
    Exited(Instant, libc::c_int, libc::rusage),
    WaitFailed(std::io::Error),
    HookFailed(String),
}

/// What a pipe reader gives back: every byte, when each marker first showed up, and when the
/// first byte came.
type PipeText = (Vec<u8>, Vec<Option<Instant>>, Option<Instant>);

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// Reaps `pid` with `wait4`, retrying on EINTR.
fn wait4(pid: libc::pid_t) -> Result<(libc::c_int, libc::rusage), std::io::Error> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: plain syscall with pointers to locals.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            return Ok((status, ru));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn describe(status: libc::c_int) -> (String, bool) {
    if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        (format!("exit {code}"), code == 0)
    } else if libc::WIFSIGNALED(status) {
        (format!("signal {}", libc::WTERMSIG(status)), false)
    } else {
        (format!("status {status:#x}"), false)
    }
}

/// Reads a pipe to its end, noting the first byte and the moment each marker first shows up;
/// the first marker also sends `Event::Marker`.
fn read_pipe(
    mut pipe: impl Read,
    markers: &[&'static str],
    events: mpsc::Sender<Event>,
) -> PipeText {
    let mut buf = Vec::new();
    let mut first: Option<Instant> = None;
    let mut seen: Vec<Option<Instant>> = vec![None; markers.len()];
    let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
    let mut chunk = [0u8; 8192];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                first.get_or_insert(now);
                let from = buf.len().saturating_sub(longest);
                buf.extend_from_slice(&chunk[..n]);
                for (i, m) in markers.iter().enumerate() {
                    let m = m.as_bytes();
                    if seen[i].is_none() && buf[from..].windows(m.len()).any(|w| w == m) {
                        seen[i] = Some(now);
                        if i == 0 {
                            let _ = events.send(Event::Marker);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    (buf, seen, first)
}

/// `VmHWM` of /proc/`pid`/status, KiB.
fn vm_hwm_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// This process's peak RSS so far, KiB.
pub fn own_peak_rss_kib() -> Option<u64> {
    vm_hwm_kib("self")
}

fn kill_group(pid: libc::pid_t) {
    // SAFETY: signals to our own child's process group and to the child.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Runs `cmd` (in its own process group) until it exits or `timeout` passes (then the whole
/// group is killed), timing each of `markers` on its stdout.
pub fn run(
    cmd: Command,
    markers: &'static [&'static str],
    timeout: Duration,
    sample_smaps: bool,
    stdin_pipe: bool,
) -> Outcome {
    let opts = Options {
        sample_smaps,
        stdin_pipe,
        ..Options::default()
    };
    run_with(cmd, markers, timeout, opts)
}

/// [`run`] with every option.
pub fn run_with(
    mut cmd: Command,
    markers: &'static [&'static str],
    timeout: Duration,
    opts: Options,
) -> Outcome {
    // stdin: /dev/null, or (for a VMM that must poll its stdin) a pipe that stays open and empty
    cmd.stdin(if opts.stdin_pipe {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut out = Outcome::default();
    let t0 = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            out.spawn_error = Some(format!("cannot run {:?}: {e}", cmd.get_program()));
            return out;
        }
    };
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel::<Event>();
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let (otx, orx) = mpsc::channel::<PipeText>();
    let (etx, erx) = mpsc::channel::<PipeText>();
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = otx.send(read_pipe(stdout, markers, tx));
        });
    }
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = etx.send(read_pipe(stderr, &[], tx));
        });
    }
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let _ = tx.send(match wait4(pid) {
                Ok((status, ru)) => Event::Exited(Instant::now(), status, ru),
                Err(e) => Event::WaitFailed(e),
            });
        });
    }
    if let Some(hook) = opts.on_spawn {
        let tx = tx.clone();
        thread::spawn(move || {
            if let Err(e) = hook(pid as u32) {
                let _ = tx.send(Event::HookFailed(e));
            }
        });
    }
    drop(tx);
    // held open until the child is gone
    let _stdin = child.stdin.take();
    // `child` is never waited through std: the wait4 thread reaps it.
    drop(child);

    let deadline = t0 + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = if out.timed_out {
            // killed: the exit follows at once
            rx.recv_timeout(Duration::from_secs(30))
        } else {
            rx.recv_timeout(left)
        };
        match ev {
            Ok(Event::Marker) => {
                out.hwm_at_marker_kib = vm_hwm_kib(&pid.to_string());
                if opts.sample_smaps {
                    out.smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok();
                }
                if let Some(sig) = opts.signal_at_marker {
                    // SAFETY: a signal to our own child, not yet reaped (the wait4 thread
                    // reports its exit through this loop).
                    unsafe { libc::kill(pid, sig) };
                }
            }
            Ok(Event::HookFailed(e)) => {
                out.hook_error = Some(e);
                kill_group(pid);
            }
            Ok(Event::Exited(at, status, ru)) => {
                out.exit = Some(at - t0);
                let (text, ok) = describe(status);
                out.status = Some(text);
                out.success = ok;
                out.peak_rss_kib = Some(ru.ru_maxrss as u64);
                out.cpu = Some(tv(ru.ru_utime) + tv(ru.ru_stime));
                break;
            }
            Ok(Event::WaitFailed(e)) => {
                out.status = Some(format!("wait4 failed: {e}"));
                kill_group(pid);
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) if !out.timed_out => {
                out.timed_out = true;
                kill_group(pid);
            }
            Err(_) => {
                out.status = Some("child did not exit after SIGKILL".into());
                break;
            }
        }
    }
    // Pipes close when every process holding them is gone; a straggler (e.g. a container process
    // that outlived its runtime) gets a few seconds, then its group is killed.
    let grace = Duration::from_secs(5);
    let (stdout, seen, first) = orx.recv_timeout(grace).unwrap_or_else(|_| {
        kill_group(pid);
        orx.recv_timeout(grace).unwrap_or_default()
    });
    // Marker times come from the reader itself: a short-lived child may be reaped before the
    // marker event was handled above. A marker was in the pipe before the child exited, so a
    // reader scheduled late is capped at the exit time.
    let t_exit = out.exit;
    let capped = |at: Instant| {
        let t = at - t0;
        t_exit.map_or(t, |exit| t.min(exit))
    };
    out.first_byte = first.map(capped);
    out.marks = (0..markers.len())
        .map(|i| {
            let at = seen.get(i).copied().flatten()?;
            Some(capped(at))
        })
        .collect();
    out.stdout = stdout;
    out.stderr = erx.recv_timeout(grace).unwrap_or_default().0;
    out
}
