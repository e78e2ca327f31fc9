//! Process mode ([`crate::VmBuilder::isolated`]): the VM runs in a child `loft` process of its
//! own, jailed when the builder has a jail, and the [`crate::VmHandle`] drives it over the
//! control API (`docs/api.md`) on a Unix socket in the handle's private directory.
//!
//! **How the child is configured.** The child is started as `loft run --api-sock SOCK [flags]`
//! (or `loft run --restore DIR --api-sock SOCK [flags]`), the flags derived from the builder,
//! rather than as a bare `loft --api-sock SOCK` configured with `PUT /boot-source`, `/drives`,
//! `/machine-config`, `/vsock` and `InstanceStart`. That is the simpler and more robust of the
//! two: one exec carries the whole configuration, so there is no half-configured child to
//! clean up when the third of five requests fails; the flags go through the same
//! [`crate::VmBuilder`] defaults in the child as in-process (the bundled guest, `--root` as
//! `/dev/vda`, the agent's `loft_agent=` parameter); and `--jail` is only reachable through
//! `loft run` (the jail is entered after the VM is built, with the build's files open). The API
//! socket answering `GET /` means the child has built the VM and serves it.
//!
//! **Talking to the guest.** The handle names the child's vsock socket (`--vsock
//! cid=N,uds=PRIVATE/vsock`, in the handle's private directory, which a jailed child sees at
//! the same path), so [`crate::VmHandle::exec`] and `exec_streaming` talk to the guest agent
//! directly, streaming as in-process, and the post-restore clock/entropy/clone-id sync is the
//! parent's, as in-process. Everything else goes over the API: `PATCH /vm` (pause, resume),
//! `PUT /actions` (`SendCtrlAltDel`), `PUT /snapshot/create`, `GET /loft/boot-times`,
//! `GET /loft/console`.
//!
//! **Console.** The child's stdout (its guest's console) is a pipe read by a thread of the
//! handle's into the builder's console destination.
//!
//! **Life and death.** The child is forked from one long-lived `loft-spawner` thread (the
//! parent-death signal fires when the *thread* that forked dies, not the process), and gets
//! `PR_SET_PDEATHSIG = SIGKILL`: it dies with the embedding process. A dropped handle kills the
//! child (SIGKILL) and reaps it. [`crate::VmHandle::stop`] sends SIGTERM, on which `loft run`
//! stops its VM and exits. The child reports why its VM stopped on a pipe (`LOFT_STOP_FD`, one
//! line: the [`StopReason`]'s `Debug` form); a child that ends without writing it (killed, or
//! crashed) is [`StopReason::ProcessDied`].

use std::ffi::OsString;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use loft_devices::sync::lock;

use crate::api::client::{self, ClientError};
use crate::boot_timer::{BootTimes, Mark};
use crate::sandbox::Done;
use crate::{Error, StopReason};

/// How long a child has to build its VM and answer on its API socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one API request may take (a snapshot writes the guest's memory).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long [`IsolatedVm::kill`] waits for the child to stop on SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(10);
/// Most bytes of the child's stderr kept for error messages.
const STDERR_KEPT: usize = 8 << 10;

/// Errors of process mode.
#[derive(Debug, thiserror::Error)]
pub enum IsolatedError {
    /// No `loft` binary to run.
    #[error(
        "no loft binary for the isolated VM (give one with VmBuilder::isolated_with or \
         LOFT_BIN); looked for {}",
        list(.0)
    )]
    NoBinary(Vec<PathBuf>),
    /// The child could not be started.
    #[error("cannot start {}", .binary.display())]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The child ended before it served its API.
    #[error("the VM's loft process ended before it was ready ({status}): {stderr}")]
    Exited {
        /// How it ended.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The child did not serve its API in time.
    #[error("the VM's loft process did not answer on its API socket within {0:?}")]
    NotReady(Duration),
    /// The child answered a request with an error.
    #[error("the VM's loft process refused {request} ({status}): {message}")]
    Refused {
        /// The request.
        request: String,
        /// The HTTP status code.
        status: u16,
        /// Its `fault_message`.
        message: String,
    },
    /// A request got no answer.
    #[error("the VM's loft process did not answer {request}")]
    Api {
        /// The request.
        request: String,
        /// Why.
        #[source]
        source: ClientError,
    },
    /// A host resource for the child (a pipe, a thread) could not be made.
    #[error("cannot {what}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The builder asks for something process mode does not do.
    #[error("an isolated VM cannot have {0}")]
    Unsupported(&'static str),
}

fn list(paths: &[PathBuf]) -> String {
    let names: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

/// Where the `loft` binary is: `explicit`, else `LOFT_BIN`, else beside the current executable
/// or, from a build tree's `target/*/deps` or `target/*/examples`, in `target/*`; then in
/// development builds, the source tree's `target/{debug,release}`.
pub fn find_binary(explicit: Option<&Path>) -> Result<PathBuf, IsolatedError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(IsolatedError::NoBinary(vec![p.to_path_buf()]))
        };
    }
    if let Some(p) = std::env::var_os("LOFT_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(IsolatedError::NoBinary(vec![p]))
        };
    }
    let mut tried = Vec::new();
    let exe = std::env::current_exe().ok();
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        tried.push(dir.join("loft"));
        if let Some(up) = dir.parent() {
            tried.push(up.join("loft"));
        }
    }
    #[cfg(debug_assertions)]
    {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        tried.push(target.join("debug/loft"));
        tried.push(target.join("release/loft"));
    }
    tried.dedup();
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(IsolatedError::NoBinary(tried))
}

/// A child to start: the command, and the write end of its stop-reason pipe (made
/// inheritable in the child only).
struct SpawnJob {
    command: Command,
    stop_fd: i32,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Starts `command` from the `loft-spawner` thread, which lives as long as the process: the
/// child's parent-death signal is tied to the thread that forks it.
fn spawn(command: Command, stop_fd: i32) -> io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("loft-spawner".into())
            .spawn(move || {
                for mut job in rx {
                    let _ = job.reply.send(spawn_here(&mut job.command, job.stop_fd));
                }
            });
        if let Err(e) = started {
            log::error!("cannot start the loft-spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply, answer) = mpsc::channel();
    lock(spawner)
        .send(SpawnJob {
            command,
            stop_fd,
            reply,
        })
        .map_err(|_| io::Error::other("the loft-spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the loft-spawner thread is gone"))?
}

fn spawn_here(command: &mut Command, stop_fd: i32) -> io::Result<Child> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, fcntl) on its own state.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent died before the prctl: nobody would kill this child.
            if libc::getppid() != parent {
                return Err(io::Error::other("the parent is gone"));
            }
            // The stop-reason pipe survives the exec (in this child only).
            let flags = libc::fcntl(stop_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(stop_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// A pipe, both ends close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the reaper learns, for [`IsolatedVm::collect`].
#[derive(Default)]
struct Ended {
    reaped: bool,
    reason: Option<StopReason>,
}

/// The child `loft` of an isolated VM.
pub(crate) struct IsolatedVm {
    pid: u32,
    api: PathBuf,
    ended: Arc<Mutex<Ended>>,
    pub(crate) done: Arc<Done>,
    stop_asked: Arc<AtomicBool>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    collected: Mutex<bool>,
    last_times: Mutex<BootTimes>,
    last_dropped: Mutex<u64>,
}

impl IsolatedVm {
    /// Starts `binary` with `args` (after `run`), its console going to `console`, and waits
    /// until it serves its API on `api`.
    pub(crate) fn start(
        binary: &Path,
        args: Vec<OsString>,
        api: PathBuf,
        mut console: Box<dyn Write + Send>,
    ) -> Result<Self, IsolatedError> {
        let host = |what| move |source| IsolatedError::Host { what, source };
        let (stop_read, stop_write) = pipe().map_err(host("make the stop-reason pipe"))?;
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--api-sock")
            .arg(&api)
            .args(args)
            .env("LOFT_STOP_FD", stop_write.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("LOFT_LOG").is_none() {
            command.env("LOFT_LOG", "warn");
        }
        let mut child =
            spawn(command, stop_write.as_raw_fd()).map_err(|source| IsolatedError::Spawn {
                binary: binary.to_path_buf(),
                source,
            })?;
        drop(stop_write);
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let ended = Arc::new(Mutex::new(Ended::default()));
        let done = Arc::new(Done::default());
        let stop_asked = Arc::new(AtomicBool::new(false));
        let kept = Arc::new(Mutex::new(Vec::new()));
        let console_thread = stdout.map(|mut out| {
            std::thread::Builder::new()
                .name("loft-iso-console".into())
                .spawn(move || {
                    let mut buf = [0u8; 16 << 10];
                    while let Ok(n) = out.read(&mut buf) {
                        if n == 0 || console.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = console.flush();
                    // Drains the rest, so that the child never blocks on a full pipe.
                    let _ = io::copy(&mut out, &mut io::sink());
                })
        });
        let console_thread = console_thread
            .transpose()
            .map_err(host("start the console thread"))?;
        let stderr_thread = stderr
            .map(|err| {
                let kept = kept.clone();
                std::thread::Builder::new()
                    .name("loft-iso-stderr".into())
                    .spawn(move || {
                        for line in io::BufReader::new(err).split(b'\n').map_while(Result::ok) {
                            let line = String::from_utf8_lossy(&line).into_owned();
                            eprintln!("loft[{pid}]: {line}");
                            let mut kept = lock(&kept);
                            kept.extend_from_slice(line.as_bytes());
                            kept.push(b'\n');
                            if kept.len() > STDERR_KEPT {
                                let excess = kept.len() - STDERR_KEPT;
                                kept.drain(..excess);
                            }
                        }
                    })
            })
            .transpose()
            .map_err(host("start the stderr thread"))?;
        let reaper = {
            let (ended, done, stop_asked) = (ended.clone(), done.clone(), stop_asked.clone());
            std::thread::Builder::new()
                .name("loft-iso-reaper".into())
                .spawn(move || {
                    wait_exited(pid);
                    for t in [console_thread, stderr_thread].into_iter().flatten() {
                        let _ = t.join();
                    }
                    let mut said = String::new();
                    let _ = std::fs::File::from(stop_read).read_to_string(&mut said);
                    let mut e = lock(&ended);
                    let status = child.wait().ok();
                    e.reaped = true;
                    e.reason = Some(match said.lines().next() {
                        Some(line) if !line.trim().is_empty() => parse_reason(line.trim()),
                        _ if stop_asked.load(Ordering::Acquire) => StopReason::Stopped,
                        _ => StopReason::ProcessDied {
                            code: status.and_then(|s| s.code()),
                            signal: status.and_then(|s| s.signal()),
                        },
                    });
                    drop(e);
                    done.finish();
                })
                .map_err(host("start the reaper thread"))?
        };
        let vm = IsolatedVm {
            pid,
            api,
            ended,
            done,
            stop_asked,
            reaper: Mutex::new(Some(reaper)),
            collected: Mutex::new(false),
            last_times: Mutex::new(BootTimes::default()),
            last_dropped: Mutex::new(0),
        };
        // Ready once the API answers: the child has built (or restored) the VM by then.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if vm.done.wait(Some(Duration::ZERO)) {
                // The reaper has joined the stderr thread: what the child said is all there.
                let ended = lock(&vm.ended);
                let status = ended
                    .reason
                    .as_ref()
                    .map_or_else(|| "no status".into(), ToString::to_string);
                return Err(IsolatedError::Exited {
                    status,
                    stderr: String::from_utf8_lossy(&lock(&kept)).trim().to_owned(),
                });
            }
            if vm.api.exists() {
                if let Ok(r) = client::request(&vm.api, "GET", "/", None, REQUEST_TIMEOUT) {
                    if r.status == 200 {
                        return Ok(vm);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(IsolatedError::NotReady(READY_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to the child unless it has been reaped (its pid may be another's then).
    fn signal(&self, signal: i32) {
        let ended = lock(&self.ended);
        if !ended.reaped {
            // SAFETY: kill has no memory effects; the pid is our unreaped child's.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Asks the child to stop its VM and exit.
    pub(crate) fn stop(&self) {
        self.stop_asked.store(true, Ordering::Release);
        self.signal(libc::SIGTERM);
    }

    /// Stops the child, forcibly when it does not stop on SIGTERM in time.
    pub(crate) fn kill(&self) {
        self.stop();
        if !self.done.wait(Some(TERM_GRACE)) {
            self.signal(libc::SIGKILL);
        }
    }

    /// Why the VM stopped, once (later: [`Error::AlreadyWaited`]).
    pub(crate) fn collect(&self) -> Result<StopReason, Error> {
        self.done.wait(None);
        let mut collected = lock(&self.collected);
        if *collected {
            return Err(Error::AlreadyWaited);
        }
        *collected = true;
        Ok(lock(&self.ended)
            .reason
            .clone()
            .unwrap_or(StopReason::Stopped))
    }

    /// Whether the handle has already collected the reason.
    pub(crate) fn collected(&self) -> bool {
        *lock(&self.collected)
    }

    /// Sends a request and checks its answer's status; returns the body.
    pub(crate) fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Vec<u8>, Error> {
        if self.done.wait(Some(Duration::ZERO)) {
            return Err(Error::NotRunning);
        }
        let request = format!("{method} {path}");
        let reply = client::request(&self.api, method, path, body.as_ref(), REQUEST_TIMEOUT)
            .map_err(|source| {
                if self.done.wait(Some(Duration::from_millis(100))) {
                    Error::NotRunning
                } else {
                    IsolatedError::Api {
                        request: request.clone(),
                        source,
                    }
                    .into()
                }
            })?;
        if (200..300).contains(&reply.status) {
            Ok(reply.body)
        } else {
            Err(IsolatedError::Refused {
                request,
                status: reply.status,
                message: reply.message(),
            }
            .into())
        }
    }

    /// `PATCH /vm` to `state` (`Paused`, `Resumed`).
    pub(crate) fn set_state(&self, state: &str) -> Result<(), Error> {
        self.call("PATCH", "/vm", Some(serde_json::json!({ "state": state })))
            .map(drop)
    }

    /// Whether the child's VM is paused.
    pub(crate) fn paused(&self) -> Result<bool, Error> {
        let body = self.call("GET", "/", None)?;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        Ok(v.get("state").and_then(|s| s.as_str()) == Some("Paused"))
    }

    /// The child's boot times (the last ones known once it is gone).
    pub(crate) fn boot_times(&self) -> BootTimes {
        if let Ok(body) = self.call("GET", "/loft/boot-times", None) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                let mark = |name: &str| {
                    let m = v.get(name)?;
                    Some(Mark {
                        wall: Duration::from_secs_f64(m.get("wall_ms")?.as_f64()? / 1e3),
                        cpu: Duration::from_secs_f64(m.get("cpu_ms")?.as_f64()? / 1e3),
                    })
                };
                *lock(&self.last_times) = BootTimes {
                    vm_built: mark("vm_built"),
                    first_entry: mark("first_entry"),
                    kernel_init: mark("kernel_init"),
                    user_init: mark("user_init"),
                    stop_request: mark("stop_request"),
                    exit: mark("exit"),
                    restored: mark("restored"),
                };
            }
        }
        *lock(&self.last_times)
    }

    /// Console bytes the child dropped (the last count known once it is gone).
    pub(crate) fn console_bytes_dropped(&self) -> u64 {
        if let Ok(body) = self.call("GET", "/loft/console", None) {
            if let Some(n) = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("bytes_dropped")?.as_u64())
            {
                *lock(&self.last_dropped) = n;
            }
        }
        *lock(&self.last_dropped)
    }
}

impl Drop for IsolatedVm {
    fn drop(&mut self) {
        self.stop_asked.store(true, Ordering::Release);
        self.signal(libc::SIGKILL);
        if let Some(reaper) = lock(&self.reaper).take() {
            let _ = reaper.join();
        }
    }
}

/// Waits until `pid` has exited, without reaping it (the reaper reaps it under the lock that
/// [`IsolatedVm::signal`] takes, so that no signal goes to a reused pid).
fn wait_exited(pid: u32) {
    loop {
        // SAFETY: waitid writes into the zeroed siginfo_t it is given.
        let r = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// A [`StopReason`] from the `Debug` form a child wrote; the failures that carry details come
/// back as [`StopReason::VcpuError`] with that text.
fn parse_reason(text: &str) -> StopReason {
    match text {
        "GuestReset" => StopReason::GuestReset,
        "GuestShutdown" => StopReason::GuestShutdown,
        "Halted" => StopReason::Halted,
        "Stopped" => StopReason::Stopped,
        "GuestCrash" => StopReason::GuestCrash,
        other => StopReason::VcpuError {
            cpu: other
                .split("cpu: ")
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
            message: other.to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_come_back_from_their_debug_form() {
        for r in [
            StopReason::GuestReset,
            StopReason::GuestShutdown,
            StopReason::Halted,
            StopReason::Stopped,
            StopReason::GuestCrash,
        ] {
            assert_eq!(parse_reason(&format!("{r:?}")), r);
        }
        let r = StopReason::FailEntry { cpu: 3, reason: 7 };
        match parse_reason(&format!("{r:?}")) {
            StopReason::VcpuError { cpu: 3, message } => assert!(message.contains("FailEntry")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let e = find_binary(Some(Path::new("/nonexistent/loft"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/loft"), "{e}");
        assert!(e.to_string().contains("LOFT_BIN"), "{e}");
    }
}
