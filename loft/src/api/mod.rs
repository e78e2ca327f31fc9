//! A control API over a Unix socket: HTTP/1.1 with JSON bodies, speaking Firecracker's API where
//! it fits (`firecracker`) and loft's own under `/loft/` (`loft_endpoints`). `docs/api.md` has
//! the endpoint table.
//!
//! [`ApiServer::bind`] creates the socket (mode 0600; refused when another process serves on
//! that path) and starts the `loft-api` thread, which accepts one connection at a time, reads
//! one request within bounds and a deadline (`server`), parses and checks it, and hands what to
//! do to the thread that calls [`ApiServer::serve`]. That thread — the `loft` command's main
//! thread — configures, starts, pauses, snapshots and stops the VM through the library's
//! [`VmHandle`], so the API thread itself only reads, parses and writes: it confines itself
//! with the `loft-api` seccomp filter ([`crate::seccomp::ThreadKind::Api`]) before it accepts
//! anything. No request is ever handled on a vCPU thread.

pub(crate) mod client;
mod firecracker;
mod loft_endpoints;
mod server;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::seccomp::{self, ThreadKind};
use crate::{Error, Snapshot, StopReason, VmBuilder, VmHandle};

pub use server::{Method, Response, MAX_BODY, READ_TIMEOUT};

use firecracker::{BootSource, Drive, MachineConfiguration, NetworkInterface, Vsock};

/// Errors creating the API socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process serves the API on this path.
    #[error("the API socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// Something that is not a socket is at the path.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// The socket could not be created.
    #[error("cannot create the API socket {}", path.display())]
    Bind {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API thread could not be started.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// What a request asks for, parsed and checked on the API thread.
#[derive(Debug)]
pub enum Action {
    /// `GET /`.
    Describe,
    /// `GET /version`.
    Version,
    /// `PUT /boot-source`.
    BootSource(BootSource),
    /// `PUT /drives/{id}`.
    Drive(Drive),
    /// `PUT /network-interfaces/{id}`.
    Net(NetworkInterface),
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    MachineConfig(MachineConfiguration),
    /// `PUT /vsock`.
    Vsock(Vsock),
    /// `PUT /actions` `InstanceStart`.
    Start,
    /// `PUT /actions` `SendCtrlAltDel`.
    CtrlAltDel,
    /// `PATCH /vm` `Paused`.
    Pause,
    /// `PATCH /vm` `Resumed`.
    Resume,
    /// `PUT /snapshot/create`.
    SnapshotCreate(firecracker::SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    SnapshotLoad(firecracker::SnapshotLoadParams),
    /// `PUT /loft/exec`.
    Exec(loft_endpoints::ExecBody),
    /// `GET /loft/boot-times`.
    BootTimes,
    /// `GET /loft/console`.
    Console,
}

/// Parses one request into what to do, or the error answer.
pub fn parse(method: Method, path: &str, body: &[u8]) -> Result<Action, Response> {
    if path == "/loft" || path.starts_with("/loft/") {
        loft_endpoints::parse(method, path, body)
    } else {
        firecracker::parse(method, path, body)
    }
}

/// A request handed from the API thread to the serving thread, with where its answer goes.
struct Call {
    action: Action,
    reply: mpsc::Sender<Response>,
}

/// The API socket and its thread. Dropping it stops the thread and removes the socket.
pub struct ApiServer {
    path: PathBuf,
    /// The socket's inode, so that only this socket is removed at the end.
    ino: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// The listener and the sender of calls until [`ApiServer::serve`] starts the thread.
    unstarted: std::sync::Mutex<Option<(UnixListener, mpsc::Sender<Call>)>>,
    seccomp: bool,
    calls: mpsc::Receiver<Call>,
}

impl ApiServer {
    /// Creates the socket at `path` (mode 0600); [`ApiServer::serve`] starts the `loft-api`
    /// thread, confined by its seccomp filter when `seccomp`. Clients that connect before wait
    /// in the socket's backlog. (The thread is not started here: `loft run --jail --api-sock`
    /// binds before the VM is built and jailed, and the jail takes a process with one thread;
    /// nor can a request reach a main thread that is still building the VM, and may fail.) A
    /// stale socket nobody listens on is replaced; a path where another process listens, or
    /// that is not a socket, is refused.
    pub fn bind(path: impl Into<PathBuf>, seccomp: bool) -> Result<Self, ApiError> {
        let path = path.into();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::NotASocket(path));
            }
            if UnixStream::connect(&path).is_ok() {
                return Err(ApiError::InUse(path));
            }
            let _ = std::fs::remove_file(&path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.clone(),
            source,
        };
        // The socket is created 0600: no moment where another user could connect.
        // SAFETY: umask has no preconditions; the old mask is put back just after.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(bind_err)?;
        let meta = std::fs::metadata(&path).map_err(bind_err)?;
        if seccomp {
            crate::seccomp::prepare().map_err(|e| ApiError::Thread(std::io::Error::other(e)))?;
        }
        let (tx, calls) = mpsc::channel();
        Ok(Self {
            path,
            ino: (meta.dev(), meta.ino()),
            stop: Arc::new(AtomicBool::new(false)),
            thread: std::sync::Mutex::new(None),
            unstarted: std::sync::Mutex::new(Some((listener, tx))),
            seccomp,
            calls,
        })
    }

    /// Starts the `loft-api` thread, once.
    fn start_thread(&self) -> Result<(), ApiError> {
        use loft_devices::sync::lock;
        let Some((listener, tx)) = lock(&self.unstarted).take() else {
            return Ok(());
        };
        let (stop, seccomp) = (self.stop.clone(), self.seccomp);
        let thread = std::thread::Builder::new()
            .name("loft-api".into())
            .spawn(move || api_thread(listener, stop, tx, seccomp))
            .map_err(ApiError::Thread)?;
        *lock(&self.thread) = Some(thread);
        Ok(())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests on the calling thread until the VM stops or `interrupted` says so (polled
    /// a few times a second; the VM is then stopped). `vm` is the VM already running, if any
    /// (`loft run --api-sock`); otherwise the API configures and starts one, from
    /// `new_vm()` (the console and timing options) plus what the requests say, and leaves it
    /// in `vm`. Returns why the VM stopped, or `None` when none ever ran.
    pub fn serve(
        &self,
        vm: &mut Option<VmHandle>,
        new_vm: &mut dyn FnMut() -> VmBuilder,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<Option<StopReason>, Error> {
        self.start_thread()?;
        let mut ctl = Controller {
            config: Pending::default(),
            paused: false,
        };
        loop {
            if let Some(handle) = vm.as_ref() {
                if handle.is_finished() {
                    return handle.wait().map(Some);
                }
                if interrupted() {
                    return handle.kill().map(Some);
                }
            } else if interrupted() {
                return Ok(None);
            }
            match self.calls.recv_timeout(Duration::from_millis(100)) {
                Ok(call) => {
                    let answer = ctl.handle(call.action, vm, new_vm);
                    let _ = call.reply.send(answer);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                // The API thread ended (it only does at the end): go on without requests.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// How often the API thread looks at its stop flag while no client comes.
const ACCEPT_POLL_MS: i32 = 200;

/// The `loft-api` thread: one connection at a time, one request each.
fn api_thread(listener: UnixListener, stop: Arc<AtomicBool>, tx: mpsc::Sender<Call>, sc: bool) {
    if let Err(e) = seccomp::confine_if(sc, ThreadKind::Api) {
        log::error!("API thread: {e}; the API is not served");
        return;
    }
    while !stop.load(Ordering::Acquire) {
        let mut fds = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut fds, 1, ACCEPT_POLL_MS) };
        if n <= 0 {
            continue;
        }
        match listener.accept() {
            Ok((mut stream, _)) => {
                let answer = match server::read_request(&mut stream) {
                    Ok(req) => match parse(req.method, &req.path, &req.body) {
                        Ok(action) => ask(&tx, action),
                        Err(r) => Some(r),
                    },
                    Err(e) => {
                        log::debug!("API: {e}");
                        e.response()
                    }
                };
                if let Some(a) = answer {
                    if let Err(e) = server::write_response(&mut stream, &a) {
                        log::debug!("API: cannot answer: {e}");
                    }
                }
            }
            Err(e) => log::debug!("API: accept: {e}"),
        }
    }
}

/// Hands `action` to the serving thread and waits for its answer.
fn ask(tx: &mpsc::Sender<Call>, action: Action) -> Option<Response> {
    let (reply, answer) = mpsc::channel();
    if tx.send(Call { action, reply }).is_err() {
        return Some(Response::fault(400, "The VMM is shutting down."));
    }
    Some(
        answer
            .recv()
            .unwrap_or_else(|_| Response::fault(400, "The VMM is shutting down.")),
    )
}

/// Firecracker's configuration so far, before `InstanceStart`.
#[derive(Default)]
struct Pending {
    boot: Option<BootSource>,
    drives: Vec<Drive>,
    nets: Vec<NetworkInterface>,
    machine: MachineConfiguration,
    vsock: Option<Vsock>,
    /// Anything configured (a snapshot may then not be loaded).
    touched: bool,
}

struct Controller {
    config: Pending,
    paused: bool,
}

fn bad(message: impl Into<String>) -> Response {
    Response::fault(400, message)
}

/// Checks that a file the VM will need can be opened.
fn readable(path: &Path, what: &str) -> Result<(), Response> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| bad(format!("The {what} file cannot be opened: {e}")))
}

const PRE_BOOT: &str = "The requested operation is not supported before starting the microVM.";
const POST_BOOT: &str = "The requested operation is not supported after starting the microVM.";

impl Controller {
    fn handle(
        &mut self,
        action: Action,
        vm: &mut Option<VmHandle>,
        new_vm: &mut dyn FnMut() -> VmBuilder,
    ) -> Response {
        match (action, vm.as_ref()) {
            (Action::Describe, vm) => {
                let state = match (vm, self.paused) {
                    (None, _) => "Not started",
                    (Some(_), true) => "Paused",
                    (Some(_), false) => "Running",
                };
                Response::ok(serde_json::json!({
                    "id": "loft",
                    "state": state,
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "loft",
                }))
            }
            (Action::Version, _) => Response::ok(serde_json::json!({
                "firecracker_version": env!("CARGO_PKG_VERSION"),
            })),
            (Action::GetMachineConfig, _) => match serde_json::to_value(&self.config.machine) {
                Ok(v) => Response::ok(v),
                Err(e) => Response::fault(500, e.to_string()),
            },
            (
                Action::BootSource(_)
                | Action::Drive(_)
                | Action::Net(_)
                | Action::MachineConfig(_)
                | Action::Vsock(_)
                | Action::Start
                | Action::SnapshotLoad(_),
                Some(_),
            ) => bad(POST_BOOT),
            (
                Action::CtrlAltDel
                | Action::Pause
                | Action::Resume
                | Action::SnapshotCreate(_)
                | Action::Exec(_)
                | Action::BootTimes
                | Action::Console,
                None,
            ) => bad(PRE_BOOT),
            (Action::BootSource(b), None) => {
                if let Err(r) = readable(&b.kernel_image_path, "kernel") {
                    return r;
                }
                if let Some(i) = &b.initrd_path {
                    if let Err(r) = readable(i, "initrd") {
                        return r;
                    }
                }
                self.config.boot = Some(b);
                self.config.touched = true;
                Response::no_content()
            }
            (Action::Drive(d), None) => {
                if let Some(p) = &d.path_on_host {
                    if let Err(r) = readable(p, "drive") {
                        return r;
                    }
                }
                let drives = &mut self.config.drives;
                if d.is_root_device
                    && drives
                        .iter()
                        .any(|o| o.is_root_device && o.drive_id != d.drive_id)
                {
                    return bad("A root block device already exists!");
                }
                match drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    Some(o) => *o = d,
                    None => drives.push(d),
                }
                self.config.touched = true;
                Response::no_content()
            }
            (Action::Net(n), None) => {
                let nets = &mut self.config.nets;
                if nets
                    .iter()
                    .any(|o| o.host_dev_name == n.host_dev_name && o.iface_id != n.iface_id)
                {
                    return bad(format!(
                        "The host device {} is already used by another interface.",
                        n.host_dev_name
                    ));
                }
                match nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
                    Some(o) => *o = n,
                    None => nets.push(n),
                }
                self.config.touched = true;
                Response::no_content()
            }
            (Action::MachineConfig(m), None) => {
                self.config.machine = MachineConfiguration {
                    huge_pages: Some("None".into()),
                    ..m
                };
                self.config.touched = true;
                Response::no_content()
            }
            (Action::Vsock(v), None) => {
                self.config.vsock = Some(v);
                self.config.touched = true;
                Response::no_content()
            }
            (Action::Start, None) => match self.builder(new_vm()).and_then(|b| {
                b.start().map_err(|e| {
                    bad(format!(
                        "Failed to start microVM: {}",
                        crate::error::chain(&e)
                    ))
                })
            }) {
                Ok(handle) => {
                    *vm = Some(handle);
                    self.paused = false;
                    Response::no_content()
                }
                Err(r) => r,
            },
            (Action::SnapshotLoad(p), None) => {
                if self.config.touched {
                    return bad(
                        "Loading a microVM snapshot not allowed after configuring boot-specific \
                         resources.",
                    );
                }
                let snapshot = match Snapshot::open(&p.snapshot_path) {
                    Ok(s) => s,
                    Err(e) => {
                        return bad(format!("Load snapshot error: {}", crate::error::chain(&e)))
                    }
                };
                let mut b = new_vm().restore_from(snapshot);
                for n in p.network_overrides.iter().flatten() {
                    b = b.net(&n.host_dev_name, None);
                }
                if let Some(v) = &p.vsock_override {
                    // The CID must match the saved one: take it from the snapshot.
                    match Snapshot::open(&p.snapshot_path)
                        .ok()
                        .and_then(|s| s.vsock_cid())
                    {
                        Some(cid) => b = b.vsock(cid, &v.uds_path),
                        None => return bad("The snapshot has no vsock device to override."),
                    }
                }
                match b.start() {
                    Ok(handle) => {
                        let resume = p.resume_vm.unwrap_or(false);
                        self.paused = false;
                        if !resume {
                            match handle.pause() {
                                Ok(()) => self.paused = true,
                                Err(e) => log::warn!("cannot pause the restored VM: {e}"),
                            }
                        }
                        *vm = Some(handle);
                        Response::no_content()
                    }
                    Err(e) => bad(format!("Load snapshot error: {}", crate::error::chain(&e))),
                }
            }
            (Action::CtrlAltDel, Some(h)) => match h.ctrl_alt_del() {
                Ok(()) => Response::no_content(),
                Err(e) => bad(crate::error::chain(&e)),
            },
            (Action::Pause, Some(h)) => match h.pause() {
                Ok(()) => {
                    self.paused = true;
                    Response::no_content()
                }
                Err(e) => bad(format!(
                    "Failed to pause the microVM: {}",
                    crate::error::chain(&e)
                )),
            },
            (Action::Resume, Some(h)) => match h.resume() {
                Ok(()) => {
                    self.paused = false;
                    Response::no_content()
                }
                Err(e) => bad(format!(
                    "Failed to resume the microVM: {}",
                    crate::error::chain(&e)
                )),
            },
            (Action::SnapshotCreate(p), Some(h)) => {
                if !self.paused {
                    return bad(
                        "Cannot create a snapshot of a running microVM: pause it first \
                         (PATCH /vm {\"state\": \"Paused\"}).",
                    );
                }
                match h.snapshot(&p.snapshot_path) {
                    Ok(_) => Response::no_content(),
                    Err(e) => bad(format!(
                        "Create snapshot error: {}",
                        crate::error::chain(&e)
                    )),
                }
            }
            (Action::Exec(e), Some(h)) => match h.exec(&e.request()) {
                Ok(out) => loft_endpoints::exec_response(&out),
                Err(e) => bad(format!("exec: {}", crate::error::chain(&e))),
            },
            (Action::BootTimes, Some(h)) => loft_endpoints::boot_times_response(&h.boot_times()),
            (Action::Console, Some(h)) => Response::ok(serde_json::json!({
                "bytes_dropped": h.console_bytes_dropped(),
            })),
        }
    }

    /// The VM the configuration describes, on top of `base`.
    fn builder(&self, base: VmBuilder) -> Result<VmBuilder, Response> {
        let c = &self.config;
        let boot = c
            .boot
            .as_ref()
            .ok_or_else(|| bad("Cannot start microvm without kernel configuration."))?;
        let mut b = base
            .kernel(&boot.kernel_image_path)
            .cpus(u32::from(c.machine.vcpu_count))
            .memory_mib(c.machine.mem_size_mib);
        if let Some(i) = &boot.initrd_path {
            b = b.initrd(i);
        }
        // The root device first: it is /dev/vda.
        let mut drives: Vec<&Drive> = c.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(c.drives.iter().filter(|d| !d.is_root_device));
        for d in &drives {
            if let Some(p) = &d.path_on_host {
                b = b.disk(p, d.is_read_only.unwrap_or(false));
            }
        }
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let mode = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            b = b.cmdline(format!("root=/dev/vda {mode}"));
        }
        if let Some(args) = &boot.boot_args {
            b = b.cmdline(args);
        }
        for n in &c.nets {
            let mac = match &n.guest_mac {
                Some(m) => Some(firecracker::parse_mac(m)?),
                None => None,
            };
            b = b.net(&n.host_dev_name, mac);
        }
        if let Some(v) = &c.vsock {
            b = b.vsock(u64::from(v.guest_cid), &v.uds_path);
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn request(path: &Path, raw: &str) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn socket_is_private_refused_when_in_use_and_removed_at_the_end() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("loft-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server = ApiServer::bind(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(matches!(
            ApiServer::bind(&path, false),
            Err(ApiError::InUse(_))
        ));
        // Requests that need no VM are answered by a serving thread.
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let p2 = path.clone();
        let client = std::thread::spawn(move || {
            let a = request(&p2, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let b = request(
                &p2,
                "PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"action_type\":\"InstanceStart\"}",
            );
            let c = request(&p2, "GET /machine-config HTTP/1.1\r\n\r\n");
            done_tx.send(()).unwrap();
            (a, b, c)
        });
        let mut vm = None;
        let result = server.serve(&mut vm, &mut VmBuilder::new, &|| done_rx.try_recv().is_ok());
        assert!(matches!(result, Ok(None)));
        let (a, b, c) = client.join().unwrap();
        assert!(
            a.starts_with("HTTP/1.1 200") && a.contains("\"Not started\""),
            "{a}"
        );
        assert!(
            b.starts_with("HTTP/1.1 400") && b.contains("without kernel configuration"),
            "{b}"
        );
        assert!(c.contains("\"mem_size_mib\":128"), "{c}");
        drop(server);
        assert!(!path.exists());
        // A file that is not a socket is left alone.
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            ApiServer::bind(&path, false),
            Err(ApiError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
