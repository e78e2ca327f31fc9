//! loft as a library: build a VM, start it, and keep control of it through a handle.
//!
//! Every VM runs on threads of its own (one for its event loop, one per vCPU) with its own file
//! descriptors; many VMs can run at once in one process. When a VM stops, or its handle is
//! dropped, all of them are released.
//!
//! ```no_run
//! use std::time::Duration;
//! use loft::VmBuilder;
//!
//! let mut vm = VmBuilder::new()                     // the bundled guest (firmware/build.sh)
//!     .cpus(2)
//!     .memory_mib(256)
//!     .cmdline(r#"guest_cmd="echo hello from the guest""#)
//!     .capture_console()
//!     .start()?;                                    // returns at once; the guest boots
//! let reason = match vm.wait_timeout(Duration::from_secs(300))? {
//!     Some(reason) => reason,
//!     None => vm.kill()?,                           // still running: stop it now
//! };
//! println!("{reason}: {}", String::from_utf8_lossy(&vm.console_output()));
//! # Ok::<(), loft::Error>(())
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use loft_devices::sync::lock;

use crate::boot_timer::{BootTimes, Timeline};
use crate::builder;
use crate::config::{self, DiskConfig, MemSize, NetConfig, VmConfig, VsockConfig};
use crate::console::ConsoleDrain;
use crate::device_manager::DeviceOverrides;
use crate::jail::{self, Jail};
use crate::snapshot::{MachineConfig, Snapshot, SnapshotError, SnapshotInfo};
use crate::stop::{StopNotifier, StopReason};
use crate::vmm::{Request, Requests};
use crate::Error;
use loft_agent::client::{self as agent_client, AgentError, ExitStatus, Output};
pub use loft_agent::ExecRequest;

mod files;
mod process;

/// Where the guest's console output goes.
enum Console {
    Discard,
    Capture,
    Writer(Mutex<Box<dyn Write + Send>>),
}

/// Describes a VM; [`VmBuilder::start`] builds and starts it.
pub struct VmBuilder {
    guest_dir: Option<PathBuf>,
    stdin_console: bool,
    console_buffer: usize,
    times_from: Option<Instant>,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    rootfs: Option<PathBuf>,
    config: VmConfig,
    cpus_set: bool,
    memory_set: bool,
    console: Console,
    agent: bool,
    agent_timeout: Duration,
    restore: Option<Snapshot>,
    seccomp: bool,
    jail: Option<Jail>,
    /// Process mode: `Some(binary)` (`None` inside: find it).
    isolated: Option<Option<PathBuf>>,
}

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 52;
/// The guest context id of VMs started with the agent.
pub const AGENT_CID: u64 = 3;

/// How long [`VmHandle::exec`] waits for the guest agent by default: boots take 60–150 s on
/// nested kvm_pvm hosts.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(300);

/// A directory only this user may enter, for one VM's Unix sockets (the vsock device's host
/// socket, and the `_PORT` listeners it makes for guest connections), removed with everything
/// in it when dropped. Its name is unpredictable, and it is created, never reused: nobody else
/// can have put a socket or a link there. In a jail, where the directory is a mount point, it is
/// removed through its parent directory, opened before (the second field).
struct PrivateDir(PathBuf, Option<std::os::fd::OwnedFd>);

impl PrivateDir {
    fn new() -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let mut random = [0u8; 8];
        getrandom(&mut random)?;
        let name = format!(
            "loft-{}-{}-{:016x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            u64::from_le_bytes(random)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        // Resolved, so that it has the same path inside a jail.
        match std::fs::canonicalize(&path) {
            Ok(resolved) => Ok(Self(resolved, None)),
            Err(e) => {
                let _ = std::fs::remove_dir(&path);
                Err(e)
            }
        }
    }

    /// Before a jail: the directory becomes the jailed user's (loft must still reach the
    /// sockets in it), and its parent is opened, through which it is removed at the end.
    fn prepare_jail(&mut self, jail: &Jail) -> Result<(), Error> {
        use std::os::unix::fs::OpenOptionsExt;
        jail::give(&self.0, jail)?;
        let parent = self.0.parent().unwrap_or(Path::new("/"));
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(parent)
            .map_err(|source| Error::Host {
                what: "open the temporary directory for the jail",
                source,
            })?;
        self.1 = Some(dir.into());
        Ok(())
    }

    /// The vsock host socket's path in it.
    fn vsock(&self) -> PathBuf {
        self.0.join("vsock")
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // In a jail, the directory is a mount point there (its contents went above): remove it
        // from the host's side.
        if let (Some(parent), Some(name)) = (&self.1, self.0.file_name()) {
            use std::os::fd::AsRawFd;
            use std::os::unix::ffi::OsStrExt;
            if let Ok(name) = std::ffi::CString::new(name.as_bytes()) {
                // SAFETY: an open directory fd and a NUL-terminated name alive for the call.
                unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
            }
        }
    }
}

impl Default for VmBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl VmBuilder {
    /// One vCPU, 128 MiB, the bundled guest's kernel and initramfs, console discarded.
    pub fn new() -> Self {
        Self {
            guest_dir: None,
            stdin_console: false,
            console_buffer: crate::console::CONSOLE_BUFFER,
            times_from: None,
            kernel: None,
            initrd: None,
            rootfs: None,
            config: VmConfig::new(PathBuf::new()),
            cpus_set: false,
            memory_set: false,
            console: Console::Discard,
            agent: true,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            restore: None,
            seccomp: true,
            jail: None,
            isolated: None,
        }
    }

    /// A builder for exactly `config` (its kernel, initrd, disks, …): no bundled defaults.
    pub fn from_config(config: VmConfig) -> Self {
        Self {
            kernel: Some(config.kernel.clone()),
            initrd: config.initrd.clone(),
            config,
            ..Self::new()
        }
    }

    /// Leaves out the guest agent channel (vsock device and `loft_agent=` parameter), for
    /// guests without the agent. [`VmHandle::exec`] then fails.
    pub fn without_agent(mut self) -> Self {
        self.agent = false;
        self
    }

    /// How long [`VmHandle::exec`] waits for the guest agent to answer.
    pub fn agent_timeout(mut self, timeout: Duration) -> Self {
        self.agent_timeout = timeout;
        self
    }

    /// Takes the bundled guest (`vmlinux`, `initramfs.cpio`) from `dir` instead of searching
    /// `LOFT_GUEST_DIR`, the installed guest beside the executable
    /// (`BIN/../share/loft/guest`), a build tree's `target/guest` and
    /// `/usr/local/share/loft/guest`.
    pub fn guest_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.guest_dir = Some(dir.into());
        self
    }

    /// Boots this kernel (ELF vmlinux or bzImage) instead of the bundled one.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Uses this initramfs.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// Boots from this ext4 image as `/dev/vda` (`root=/dev/vda rw`), without an initramfs
    /// unless one is given explicitly.
    pub fn rootfs(mut self, path: impl Into<PathBuf>) -> Self {
        self.rootfs = Some(path.into());
        self
    }

    /// Adds a virtio-blk disk (after the rootfs, if any).
    pub fn disk(mut self, path: impl Into<PathBuf>, read_only: bool) -> Self {
        self.config.disks.push(DiskConfig {
            path: path.into(),
            read_only,
        });
        self
    }

    /// Adds a virtio-net NIC on the host TAP device `tap`.
    pub fn net(mut self, tap: impl Into<String>, mac: Option<[u8; 6]>) -> Self {
        self.config.nets.push(NetConfig {
            tap: tap.into(),
            mac,
        });
        self
    }

    /// Adds a virtio-vsock device with guest context id `cid`, reachable from the host through
    /// the Unix socket `uds` (Firecracker's convention).
    pub fn vsock(mut self, cid: u64, uds: impl Into<PathBuf>) -> Self {
        self.config.vsock = Some(VsockConfig {
            cid,
            uds: uds.into(),
        });
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.config.cpus = cpus;
        self.cpus_set = true;
        self
    }

    /// Guest RAM in MiB.
    pub fn memory_mib(self, mib: u64) -> Self {
        self.memory(MemSize(mib << 20))
    }

    /// Guest RAM.
    pub fn memory(mut self, size: MemSize) -> Self {
        self.config.memory = size;
        self.memory_set = true;
        self
    }

    /// Appends to the kernel command line (words after ` -- ` go to the guest's init).
    pub fn cmdline(mut self, cmdline: impl AsRef<str>) -> Self {
        if !self.config.cmdline.is_empty() {
            self.config.cmdline.push(' ');
        }
        self.config.cmdline.push_str(cmdline.as_ref());
        self
    }

    /// Keeps the console output in memory, for [`VmHandle::console_output`].
    pub fn capture_console(mut self) -> Self {
        self.console = Console::Capture;
        self
    }

    /// Streams the console output to `writer` as the guest writes it. The guest never waits for
    /// `writer`: up to [`VmBuilder::console_buffer`] bytes wait in a buffer, and past that output
    /// is dropped and counted ([`VmHandle::console_bytes_dropped`]).
    pub fn console_writer(mut self, writer: impl Write + Send + 'static) -> Self {
        self.console = Console::Writer(Mutex::new(Box::new(writer)));
        self
    }

    /// Holds at most `bytes` of console output for a writer that does not keep up (default
    /// 1 MiB); past that, output is dropped and counted ([`VmHandle::console_bytes_dropped`]).
    pub fn console_buffer(mut self, bytes: usize) -> Self {
        self.console_buffer = bytes;
        self
    }

    /// Streams the console output to `callback`, a few bytes at a time.
    pub fn console_callback(self, callback: impl FnMut(&[u8]) + Send + 'static) -> Self {
        self.console_writer(CallbackWriter(callback))
    }

    /// Feeds this process's stdin to the guest's serial console (`loft run` does): Ctrl-A x
    /// stops the VM when stdin is a terminal.
    pub fn stdin_console(mut self) -> Self {
        self.stdin_console = true;
        self
    }

    /// Whether loft's threads for this VM confine themselves with seccomp filters (on by
    /// default): each kind of thread may then make only the system calls it needs, and a
    /// forbidden one ends the process (see [`crate::seccomp`]). The thread calling
    /// [`VmBuilder::start`] and the program's other threads are never filtered.
    pub fn seccomp(mut self, on: bool) -> Self {
        self.seccomp = on;
        self
    }

    /// Confines this process in `jail` once the VM is built and before any of its threads
    /// start: new mount, IPC and UTS namespaces, an empty root of its own, no capabilities,
    /// `no_new_privs`, and the jail's uid and gid, for the rest of the process's life
    /// (`docs/jail.md`). Everything the VM needs is opened before (`/dev/kvm`, the guest's
    /// images, disks, TAP devices, sockets), and the directory of the vsock socket is bound
    /// into the jail at its own path. Needs root, and a process with one thread when
    /// [`VmBuilder::start`] is called: the jail is for the `loft` command and programs that run
    /// one VM and nothing else; [`VmBuilder::start`] refuses it otherwise.
    pub fn jail(mut self, jail: Jail) -> Self {
        self.jail = Some(jail);
        self
    }

    /// Runs the VM in a child `loft` process of its own instead of in this one (process mode,
    /// [`crate::isolated`]): `loft run --api-sock` with flags derived from this builder, jailed
    /// with [`VmBuilder::jail`] (the child is jailed, not this process, which may then have any
    /// number of threads), driven over the control API. The same [`VmHandle`] methods work;
    /// [`VmHandle::process_id`] is the child's pid. The child dies with the handle (and with
    /// this process: it has `PR_SET_PDEATHSIG`); a child that ends on its own is a stop
    /// ([`StopReason::ProcessDied`] when it could not say why). The `loft` binary is found in
    /// `LOFT_BIN`, else beside the current executable (or a build tree's `target/*` seen from
    /// `target/*/deps`); see [`VmBuilder::isolated_with`]. Not with
    /// [`VmBuilder::stdin_console`]; [`VmBuilder::times_from`] does not apply (the child counts
    /// from its own start); in a jail, snapshot directories must be reachable from inside it.
    pub fn isolated(mut self) -> Self {
        self.isolated = Some(None);
        self
    }

    /// [`VmBuilder::isolated`], running the `loft` binary at `loft_binary`.
    pub fn isolated_with(mut self, loft_binary: impl Into<PathBuf>) -> Self {
        self.isolated = Some(Some(loft_binary.into()));
        self
    }

    /// Counts [`VmHandle::boot_times`] from `origin` (for example the process's start) instead
    /// of from [`VmBuilder::start`].
    pub fn times_from(mut self, origin: Instant) -> Self {
        self.times_from = Some(origin);
        self
    }

    /// Restores the VM saved in `snapshot` instead of booting one: [`VmBuilder::start`] then
    /// returns a handle to a VM that continues where the snapshot was taken. The console,
    /// agent and timing options apply as for a boot; [`VmBuilder::disk`], [`VmBuilder::net`]
    /// and [`VmBuilder::vsock`] name new host resources for the saved devices, in order (the
    /// guest's side must match: read-only or not, MAC, CID); `cpus` and `memory` must match the
    /// snapshot when given; `kernel`, `initrd`, `rootfs` and `cmdline` are refused. Without
    /// [`VmBuilder::vsock`], a VM with the agent gets a fresh socket, so many restores of one
    /// snapshot can run at once.
    pub fn restore_from(mut self, snapshot: Snapshot) -> Self {
        self.restore = Some(snapshot);
        self
    }

    /// The configuration this builder describes, with the bundled guest filled in; the agent's
    /// vsock socket, when the builder names none, is `agent_uds`.
    fn config(&self, agent_uds: &Path) -> Result<VmConfig, Error> {
        let mut config = self.config.clone();
        let (kernel, bundled_initrd) = match &self.kernel {
            Some(k) => (k.clone(), None),
            None => match &self.guest_dir {
                Some(dir) => config::bundled_guest_in(std::slice::from_ref(dir))?,
                None => config::bundled_guest_in(&config::guest_dirs())?,
            },
        };
        config.kernel = kernel;
        config.initrd = self.initrd.clone().or(if self.rootfs.is_some() {
            None
        } else {
            bundled_initrd
        });
        if let Some(root) = &self.rootfs {
            config.disks.insert(
                0,
                DiskConfig {
                    path: root.clone(),
                    read_only: false,
                },
            );
            config.cmdline = format!("root=/dev/vda rw {}", config.cmdline);
        }
        if self.agent {
            if config.vsock.is_none() {
                config.vsock = Some(VsockConfig {
                    cid: AGENT_CID,
                    uds: agent_uds.to_path_buf(),
                });
            }
            config.cmdline = format!("loft_agent={AGENT_PORT} {}", config.cmdline);
        }
        Ok(config)
    }

    /// Builds the VM and starts it on threads of its own. Returns once the VM is built (all
    /// input checked, guest loaded); the guest then boots in the background.
    pub fn start(self) -> Result<VmHandle, Error> {
        if let Some(binary) = self.isolated.clone() {
            return self.start_isolated(binary.as_deref());
        }
        if let Some(jail) = &self.jail {
            jail::check_can_enter(jail)?;
        }
        if self.seccomp {
            crate::seccomp::prepare()?;
        }
        let captured = Arc::new(Mutex::new(Vec::new()));
        let timeline = Arc::new(Timeline::new(self.times_from.unwrap_or_else(Instant::now)));
        let mut sockets = PrivateDir::new().map_err(|source| Error::Host {
            what: "create a private directory for the VM's sockets",
            source,
        })?;
        // The console's buffer now, its thread once the VM is built (and jailed): the build
        // runs on this thread alone.
        let (out, console) = crate::console::buffer(self.console_buffer);
        // In a jail, socket paths are resolved, so that they name the same files inside it.
        let in_jail = |p: PathBuf| match self.jail {
            Some(_) => jail::socket_path(&p).1,
            None => p,
        };
        let (mut vmm, agent, uds) = match &self.restore {
            Some(snapshot) => {
                let (mut overrides, agent) = self.restore_overrides(snapshot, &sockets)?;
                overrides.vsock_uds = overrides.vsock_uds.map(in_jail);
                let agent = agent.map(in_jail);
                let vmm = builder::build_microvm_from_snapshot(
                    snapshot,
                    &overrides,
                    out,
                    timeline.clone(),
                )?;
                (vmm, agent, overrides.vsock_uds)
            }
            None => {
                let mut config = self.config(&sockets.vsock())?;
                if let Some(v) = &mut config.vsock {
                    v.uds = in_jail(std::mem::take(&mut v.uds));
                }
                let uds = config.vsock.as_ref().map(|v| v.uds.clone());
                let agent = self.agent.then(|| config.vsock.clone()).flatten();
                let meta = MachineConfig {
                    cpus: config.cpus,
                    memory: config.memory.bytes(),
                    kernel: config.kernel.clone(),
                    cmdline: config.cmdline.clone(),
                    agent_port: agent.is_some().then_some(AGENT_PORT),
                };
                let vmm = builder::build_microvm_for_boot(
                    &config,
                    meta,
                    out,
                    timeline.clone(),
                    self.seccomp,
                )?;
                (vmm, agent.map(|v| v.uds), uds)
            }
        };
        if self.stdin_console {
            vmm.attach_stdin()?;
        }
        if let Some(jail) = &self.jail {
            sockets.prepare_jail(jail)?;
            let mut binds = Vec::new();
            if let Some(uds) = &uds {
                // loft made the socket: the jailed process must connect to it and remove it.
                jail::give(uds, jail)?;
                binds.extend(jail::socket_path(uds).0);
            }
            jail::enter(jail, &binds)?;
        }
        // Every thread of the VM starts now: the console's, the VMM's, the vCPUs'.
        console
            .start(self.console_sink(&captured), self.seccomp)
            .map_err(|source| Error::Host {
                what: "start the console thread",
                source,
            })?;
        // The VMM runs on a thread of its own, below.
        vmm.set_seccomp(self.seccomp);
        let stopper = vmm.stop_handle();
        let requests = vmm.requests();
        let done = Arc::new(Done::default());
        let thread = {
            let done = done.clone();
            std::thread::Builder::new()
                .name("loft-vmm".into())
                .spawn(move || {
                    let result = vmm.run(&|| false);
                    done.finish();
                    result
                })
                .map_err(|source| Error::Host {
                    what: "start the VMM thread",
                    source,
                })?
        };
        Ok(VmHandle {
            run: Run::Local(Local {
                stopper,
                requests,
                thread: Mutex::new(Some(thread)),
                done,
                console,
                timeline,
            }),
            captured,
            agent,
            agent_timeout: self.agent_timeout,
            needs_sync: Mutex::new(self.restore.is_some()),
            _sockets: sockets,
            clone_id: next_clone_id(),
        })
    }

    /// [`VmBuilder::start`] in process mode: the child's flags, then the child.
    fn start_isolated(self, binary: Option<&Path>) -> Result<VmHandle, Error> {
        use crate::isolated::{IsolatedError, IsolatedVm};
        use std::ffi::OsString;
        if self.stdin_console {
            return Err(IsolatedError::Unsupported("the stdin console").into());
        }
        let binary = crate::isolated::find_binary(binary)?;
        let sockets = PrivateDir::new().map_err(|source| Error::Host {
            what: "create a private directory for the VM's sockets",
            source,
        })?;
        let mut args: Vec<OsString> = Vec::new();
        let arg = |args: &mut Vec<OsString>, name: &str, value: OsString| {
            args.push(name.into());
            args.push(value);
        };
        arg(
            &mut args,
            "--seccomp",
            if self.seccomp { "on" } else { "off" }.into(),
        );
        if self.cpus_set {
            arg(&mut args, "--cpus", self.config.cpus.to_string().into());
        }
        if self.memory_set {
            arg(
                &mut args,
                "--memory",
                format!("{}K", self.config.memory.bytes() >> 10).into(),
            );
        }
        let vsock = |cid: u64, uds: &Path| {
            let mut v = OsString::from(format!("cid={cid},uds="));
            v.push(uds);
            v
        };
        let mut disks = self.config.disks.clone();
        let agent = match &self.restore {
            Some(snapshot) => {
                // The same checks as in-process, before a process is started.
                let (overrides, agent) = self.restore_overrides(snapshot, &sockets)?;
                arg(&mut args, "--restore", snapshot.dir().into());
                if let (Some(uds), Some(cid)) = (&overrides.vsock_uds, snapshot.vsock_cid()) {
                    arg(&mut args, "--vsock", vsock(cid, uds));
                }
                agent
            }
            None => {
                let (kernel, initrd) = match &self.kernel {
                    Some(k) => (k.clone(), self.initrd.clone()),
                    None => {
                        let (k, bundled) = match &self.guest_dir {
                            Some(dir) => config::bundled_guest_in(std::slice::from_ref(dir))?,
                            None => config::bundled_guest_in(&config::guest_dirs())?,
                        };
                        let initrd = self.initrd.clone().or(if self.rootfs.is_some() {
                            None
                        } else {
                            bundled
                        });
                        (k, initrd)
                    }
                };
                arg(&mut args, "--kernel", kernel.into());
                if let Some(i) = initrd {
                    arg(&mut args, "--initrd", i.into());
                }
                if let Some(r) = &self.rootfs {
                    arg(&mut args, "--root", r.into());
                }
                if !self.config.cmdline.is_empty() {
                    arg(&mut args, "--cmdline", self.config.cmdline.clone().into());
                }
                let v = self.config.vsock.clone().unwrap_or(VsockConfig {
                    cid: AGENT_CID,
                    uds: sockets.vsock(),
                });
                arg(&mut args, "--vsock", vsock(v.cid, &v.uds));
                self.agent.then_some(v.uds)
            }
        };
        for d in disks.drain(..) {
            let mut v = OsString::from(&d.path);
            if d.read_only {
                v.push(",readonly");
            }
            arg(&mut args, "--disk", v);
        }
        for n in &self.config.nets {
            let mut v = format!("tap={}", n.tap);
            if let Some(m) = n.mac {
                v.push_str(&format!(
                    ",mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ));
            }
            arg(&mut args, "--net", v.into());
        }
        if let Some(jail) = &self.jail {
            args.push("--jail".into());
            arg(&mut args, "--uid", jail.uid.to_string().into());
            arg(&mut args, "--gid", jail.gid.to_string().into());
            if let Some(dir) = &jail.dir {
                arg(&mut args, "--jail-dir", dir.into());
            }
            // The jailed child reaches its sockets here.
            jail::give(&sockets.0, jail)?;
        }
        let captured = Arc::new(Mutex::new(Vec::new()));
        let console = self.console_sink(&captured);
        let api = sockets.0.join("api.sock");
        let child = IsolatedVm::start(&binary, args, api, console)?;
        Ok(VmHandle {
            run: Run::Isolated(Box::new(child)),
            captured,
            agent,
            agent_timeout: self.agent_timeout,
            needs_sync: Mutex::new(self.restore.is_some()),
            _sockets: sockets,
            clone_id: next_clone_id(),
        })
    }

    /// Where the console goes, taking the builder's writer (it gets there through the bounded
    /// buffer that keeps a slow writer from stopping the guest: see [`crate::console::buffer`]).
    fn console_sink(&self, captured: &Arc<Mutex<Vec<u8>>>) -> Box<dyn Write + Send> {
        match &self.console {
            Console::Discard => Box::new(io::sink()),
            Console::Capture => Box::new(SharedBuffer(captured.clone())),
            Console::Writer(w) => {
                let mut w = lock(w);
                Box::new(std::mem::replace(&mut *w, Box::new(io::sink())))
            }
        }
    }

    /// The host resources a restored VM gets, checked against the snapshot; and the agent's
    /// socket when the VM has an agent.
    fn restore_overrides(
        &self,
        snapshot: &Snapshot,
        sockets: &PrivateDir,
    ) -> Result<(DeviceOverrides, Option<PathBuf>), Error> {
        use loft_devices::virtio::VirtioDeviceState as D;
        let saved = snapshot.state();
        let m = &saved.machine;
        let contradicts = |what, saved: String, given: String| -> Result<(), Error> {
            if saved == given {
                Ok(())
            } else {
                Err(SnapshotError::Contradicts { what, saved, given }.into())
            }
        };
        if self.kernel.is_some() {
            return Err(SnapshotError::BootOnly("a kernel").into());
        }
        if self.initrd.is_some() {
            return Err(SnapshotError::BootOnly("an initrd").into());
        }
        if self.rootfs.is_some() {
            return Err(SnapshotError::BootOnly("a root filesystem").into());
        }
        if !self.config.cmdline.trim().is_empty() {
            return Err(SnapshotError::BootOnly("a kernel command line").into());
        }
        if self.cpus_set {
            contradicts(
                "the vCPU count",
                m.cpus.to_string(),
                self.config.cpus.to_string(),
            )?;
        }
        if self.memory_set {
            contradicts(
                "the memory size",
                MemSize(m.memory).to_string(),
                self.config.memory.to_string(),
            )?;
        }
        let devices = &saved.devices.virtio;
        let blocks: Vec<_> = devices
            .iter()
            .filter_map(|d| match &d.device {
                D::Block(b) => Some(b),
                _ => None,
            })
            .collect();
        let nets: Vec<_> = devices
            .iter()
            .filter_map(|d| match &d.device {
                D::Net(n) => Some(n),
                _ => None,
            })
            .collect();
        let vsock = devices.iter().find_map(|d| match &d.device {
            D::Vsock(v) => Some(v),
            _ => None,
        });
        contradicts(
            "the number of disks",
            blocks.len().to_string(),
            self.config.disks.len().max(blocks.len()).to_string(),
        )?;
        let mut overrides = DeviceOverrides::default();
        for (given, saved) in self.config.disks.iter().zip(&blocks) {
            contradicts(
                "a disk's read-only setting",
                saved.read_only.to_string(),
                given.read_only.to_string(),
            )?;
            overrides.disks.push(Some(given.path.clone()));
        }
        contradicts(
            "the number of network interfaces",
            nets.len().to_string(),
            self.config.nets.len().max(nets.len()).to_string(),
        )?;
        for (given, saved) in self.config.nets.iter().zip(&nets) {
            if let Some(mac) = given.mac {
                contradicts(
                    "a NIC's MAC address",
                    format!("{:02x?}", saved.mac),
                    format!("{:02x?}", Some(mac)),
                )?;
            }
            overrides.taps.push(Some(given.tap.clone()));
        }
        match (&self.config.vsock, vsock) {
            (Some(given), Some(saved)) => {
                contradicts(
                    "the vsock CID",
                    saved.guest_cid.to_string(),
                    given.cid.to_string(),
                )?;
                overrides.vsock_uds = Some(given.uds.clone());
            }
            (Some(_), None) => {
                return Err(SnapshotError::Contradicts {
                    what: "the vsock device",
                    saved: "none".into(),
                    given: "one".into(),
                }
                .into())
            }
            // A fresh socket, so that restores of one snapshot do not collide.
            (None, Some(_)) => overrides.vsock_uds = Some(sockets.vsock()),
            (None, None) => {}
        }
        let agent = (self.agent && m.agent_port.is_some())
            .then(|| overrides.vsock_uds.clone())
            .flatten();
        Ok((overrides, agent))
    }
}

/// How long a stopped VM's console writer may take nothing before its remaining output is given
/// up on (a writer that keeps taking output gets all of it).
const CONSOLE_FLUSH_TIMEOUT: Duration = Duration::from_millis(300);

/// Fills `buf` from the kernel's random number generator (the system call: no file to open,
/// which works in a jail).
pub(crate) fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

/// A per-VM id the guest agent is told after a restore, so that clones can tell themselves
/// apart: this process's id and a counter.
fn next_clone_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Set once the VMM thread (or an isolated VM's child) is done.
#[derive(Default)]
pub(crate) struct Done {
    finished: Mutex<bool>,
    cond: Condvar,
}

impl Done {
    pub(crate) fn finish(&self) {
        *lock(&self.finished) = true;
        self.cond.notify_all();
    }

    /// Waits until finished or `timeout` passes; returns whether finished.
    pub(crate) fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut finished = lock(&self.finished);
        let deadline = timeout.map(|t| Instant::now() + t);
        while !*finished {
            match deadline {
                None => finished = self.cond.wait(finished).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    finished = self
                        .cond
                        .wait_timeout(finished, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        true
    }
}

/// A running (or stopped) VM.
///
/// Dropping the handle stops the VM and releases its threads and file descriptors.
pub struct VmHandle {
    run: Run,
    needs_sync: Mutex<bool>,
    clone_id: String,
    captured: Arc<Mutex<Vec<u8>>>,
    agent: Option<PathBuf>,
    agent_timeout: Duration,
    // Last: removed once the VM (whose sockets are in it) is gone; see Drop.
    _sockets: PrivateDir,
}

/// Where the VM runs.
enum Run {
    /// On threads of this process.
    Local(Local),
    /// In a child `loft` process ([`VmBuilder::isolated`]).
    Isolated(Box<crate::isolated::IsolatedVm>),
}

/// A VM on threads of this process.
struct Local {
    stopper: Arc<StopNotifier>,
    requests: Arc<Requests>,
    thread: Mutex<Option<JoinHandle<Result<StopReason, Error>>>>,
    done: Arc<Done>,
    console: ConsoleDrain,
    timeline: Arc<Timeline>,
}

impl VmHandle {
    /// Runs a command in the guest through its agent and returns its exit status and output.
    /// Waits for the agent first (the guest may still be booting). Several execs may run at
    /// once, from several threads. A command that runs past [`ExecRequest::timeout`]
    /// ([`Error::ExecTimeout`]) or writes more than [`ExecRequest::output_limit`] to a stream
    /// (64 MiB by default) is killed, and the VM goes on.
    pub fn exec(&self, cmd: &ExecRequest) -> Result<Output, Error> {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let status = self.exec_streaming(
            cmd,
            |b| out.extend_from_slice(b),
            |b| err.extend_from_slice(b),
        )?;
        Ok(Output {
            status,
            stdout: out,
            stderr: err,
        })
    }

    /// Like [`VmHandle::exec`], passing the command's stdout and stderr to the callbacks as they
    /// arrive.
    pub fn exec_streaming(
        &self,
        cmd: &ExecRequest,
        on_stdout: impl FnMut(&[u8]),
        on_stderr: impl FnMut(&[u8]),
    ) -> Result<ExitStatus, Error> {
        self.sync_after_restore()?;
        let stream = self.connect_agent()?;
        agent_client::exec_on_stream(stream, cmd, None, cmd.timeout, on_stdout, on_stderr).map_err(
            |e| match (e, cmd.timeout) {
                (AgentError::Timeout, Some(after)) => Error::ExecTimeout(after),
                (e, _) => Error::Agent(e),
            },
        )
    }

    /// Waits until the guest agent answers (the guest may still be booting), at most the
    /// builder's agent timeout. A restored VM's guest also gets the host's clock and fresh
    /// entropy then.
    pub fn wait_for_agent(&self) -> Result<(), Error> {
        self.sync_after_restore()?;
        self.connect_agent().map(drop)
    }

    /// A connection to the guest agent for a new request, after the post-restore sync.
    fn agent_stream(&self) -> Result<std::os::unix::net::UnixStream, Error> {
        self.sync_after_restore()?;
        self.connect_agent()
    }

    /// A connection to the guest agent, once it listens.
    fn connect_agent(&self) -> Result<std::os::unix::net::UnixStream, Error> {
        let uds = self.agent.as_deref().ok_or(Error::NoAgent)?;
        let deadline = Instant::now() + self.agent_timeout;
        agent_client::connect_when_ready(uds, AGENT_PORT, deadline, &|| self.is_finished()).map_err(
            |e| match e {
                AgentError::Timeout if self.is_finished() => Error::AgentGone,
                e => Error::Agent(e),
            },
        )
    }

    /// Once after a restore, before anything else reaches the agent: sets the guest's wall
    /// clock to the host's (the snapshot may have waited for days) and credits fresh host
    /// entropy with a forced reseed (otherwise every restore of one snapshot would replay the
    /// same random numbers), and tells the guest its clone id (`/run/loft/clone-id`).
    fn sync_after_restore(&self) -> Result<(), Error> {
        let mut needed = lock(&self.needs_sync);
        if !*needed || self.agent.is_none() {
            return Ok(());
        }
        let mut entropy = [0u8; 64];
        getrandom(&mut entropy).map_err(|source| Error::Host {
            what: "read host entropy for the guest",
            source,
        })?;
        let deadline = Instant::now() + self.agent_timeout;
        loop {
            let stream = self.connect_agent()?;
            let result = agent_client::sync_on_stream(
                stream,
                std::time::SystemTime::now(),
                &entropy,
                Some(&self.clone_id),
                Some(self.agent_timeout),
            );
            match result {
                Ok(()) => break,
                // The guest drops the connections it had when it handles the vsock transport
                // reset a restore sends; a connection made just before that is dropped too.
                // Sync says the same thing twice harmlessly: try again.
                Err(AgentError::NoExitStatus | AgentError::Io(_))
                    if Instant::now() < deadline && !self.is_finished() =>
                {
                    log::debug!("agent connection dropped during the post-restore sync; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::Agent(e)),
            }
        }
        *needed = false;
        Ok(())
    }

    /// The id the guest is told after a restore (in `/run/loft/clone-id`), unique in this
    /// process and across processes: the process id and a counter.
    pub fn clone_id(&self) -> &str {
        &self.clone_id
    }

    /// Saves the running VM to `dir` (created when missing; a snapshot already there is
    /// replaced) and lets it run on. The vCPUs are paused meanwhile, device work is finished
    /// first and writable disks are flushed, so the disk files match the saved memory.
    pub fn snapshot(&self, dir: impl AsRef<Path>) -> Result<SnapshotInfo, Error> {
        match &self.run {
            Run::Local(l) => l
                .requests
                .snapshot(dir.as_ref(), false, || self.is_finished()),
            Run::Isolated(c) => isolated_snapshot(c, dir.as_ref(), false),
        }
    }

    /// Like [`VmHandle::snapshot`], then stops the VM (it never runs again after the save).
    pub fn snapshot_and_stop(&self, dir: impl AsRef<Path>) -> Result<SnapshotInfo, Error> {
        let info = match &self.run {
            Run::Local(l) => l
                .requests
                .snapshot(dir.as_ref(), true, || self.is_finished())?,
            Run::Isolated(c) => {
                let info = isolated_snapshot(c, dir.as_ref(), true)?;
                c.stop();
                info
            }
        };
        self.wait()?;
        Ok(info)
    }

    /// Pauses the guest: every vCPU is parked (devices finish what they were doing) until
    /// [`VmHandle::resume`]. Snapshots may be taken while paused; the VM stays paused after.
    pub fn pause(&self) -> Result<(), Error> {
        match &self.run {
            Run::Local(l) => l
                .requests
                .ask(|reply| Request::Pause { reply }, || self.is_finished()),
            Run::Isolated(c) => c.set_state("Paused"),
        }
    }

    /// Lets a paused guest run again (nothing happens when it is not paused).
    pub fn resume(&self) -> Result<(), Error> {
        match &self.run {
            Run::Local(l) => l
                .requests
                .ask(|reply| Request::Resume { reply }, || self.is_finished()),
            Run::Isolated(c) => c.set_state("Resumed"),
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the guest's i8042 keyboard. The project's guest
    /// then reboots, which ends the VM.
    pub fn ctrl_alt_del(&self) -> Result<(), Error> {
        match &self.run {
            Run::Local(l) => l
                .requests
                .ask(|reply| Request::CtrlAltDel { reply }, || self.is_finished()),
            Run::Isolated(c) => c
                .call(
                    "PUT",
                    "/actions",
                    Some(serde_json::json!({"action_type": "SendCtrlAltDel"})),
                )
                .map(drop),
        }
    }

    /// The process id of the child `loft` process an isolated VM runs in
    /// ([`VmBuilder::isolated`]); `None` for a VM in this process.
    pub fn process_id(&self) -> Option<u32> {
        match &self.run {
            Run::Local(_) => None,
            Run::Isolated(c) => Some(c.pid()),
        }
    }

    /// Waits for the VM to stop and says why. After the first call that returns the reason,
    /// later calls return [`Error::AlreadyWaited`].
    pub fn wait(&self) -> Result<StopReason, Error> {
        match &self.run {
            Run::Local(l) => {
                l.done.wait(None);
                l.collect()
            }
            Run::Isolated(c) => c.collect(),
        }
    }

    /// Waits at most `timeout`: `Ok(None)` when the VM is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<StopReason>, Error> {
        match &self.run {
            Run::Local(l) => {
                if lock(&l.thread).is_some() && !l.done.wait(Some(timeout)) {
                    return Ok(None);
                }
                l.collect().map(Some)
            }
            Run::Isolated(c) => {
                if !c.collected() && !c.done.wait(Some(timeout)) {
                    return Ok(None);
                }
                c.collect().map(Some)
            }
        }
    }

    /// Whether the VM has stopped.
    pub fn is_finished(&self) -> bool {
        let done = match &self.run {
            Run::Local(l) => &l.done,
            Run::Isolated(c) => &c.done,
        };
        done.wait(Some(Duration::ZERO))
    }

    /// Asks the VM to stop and returns at once. The vCPUs are stopped wherever they are (loft
    /// guests have no ACPI to shut down gracefully); [`VmHandle::wait`] then says
    /// [`StopReason::Stopped`] unless the guest had already stopped by itself.
    pub fn stop(&self) {
        match &self.run {
            Run::Local(l) => l.stopper.notify(StopReason::Stopped),
            Run::Isolated(c) => c.stop(),
        }
    }

    /// Stops the VM and waits for its threads (or its process) to end.
    pub fn kill(&self) -> Result<StopReason, Error> {
        match &self.run {
            Run::Local(_) => self.stop(),
            Run::Isolated(c) => c.kill(),
        }
        self.wait()
    }

    /// The console output so far (with [`VmBuilder::capture_console`]).
    pub fn console_output(&self) -> Vec<u8> {
        lock(&self.captured).clone()
    }

    /// When the phases of this run happened, counted from [`VmBuilder::start`].
    pub fn boot_times(&self) -> BootTimes {
        match &self.run {
            Run::Local(l) => l.timeline.times(),
            Run::Isolated(c) => c.boot_times(),
        }
    }

    /// Guest console bytes dropped so far because the console's writer did not keep up (the
    /// guest never waits for it: see [`VmBuilder::console_writer`]).
    pub fn console_bytes_dropped(&self) -> u64 {
        match &self.run {
            Run::Local(l) => l.console.dropped(),
            Run::Isolated(c) => c.console_bytes_dropped(),
        }
    }
}

impl Local {
    fn collect(&self) -> Result<StopReason, Error> {
        let thread = lock(&self.thread).take().ok_or(Error::AlreadyWaited)?;
        let result = match thread.join() {
            Ok(result) => result,
            Err(_) => Err(Error::VmmPanicked),
        };
        // The guest's last words reach the writer, unless it blocks (then they are dropped).
        self.console.finish(CONSOLE_FLUSH_TIMEOUT);
        result
    }
}

/// [`VmHandle::snapshot`] of an isolated VM: paused, saved and (unless `keep_paused`, or it
/// was paused already) resumed over the API.
fn isolated_snapshot(
    c: &crate::isolated::IsolatedVm,
    dir: &Path,
    keep_paused: bool,
) -> Result<SnapshotInfo, Error> {
    let dir = std::path::absolute(dir).map_err(|source| Error::Host {
        what: "resolve the snapshot directory",
        source,
    })?;
    let was_paused = c.paused()?;
    if !was_paused {
        c.set_state("Paused")?;
    }
    let saved = c.call(
        "PUT",
        "/snapshot/create",
        Some(serde_json::json!({
            "snapshot_path": dir,
            "mem_file_path": dir.join("memory"),
        })),
    );
    if !was_paused && !keep_paused {
        c.set_state("Resumed")?;
    }
    saved?;
    Ok(Snapshot::open(&dir)?.info())
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        // An isolated VM's child is killed and reaped when `run` is dropped.
        if let Run::Local(l) = &self.run {
            if let Some(thread) = lock(&l.thread).take() {
                l.stopper.notify(StopReason::Stopped);
                let _ = thread.join();
                // The console thread ends once the VM is gone; wait for it (boundedly: a writer
                // that blocks keeps it), so that a dropped handle leaves no thread of loft
                // behind.
                l.console.finish(CONSOLE_FLUSH_TIMEOUT);
            }
        }
    }
}

/// Most console bytes kept in memory: the guest decides how much it prints, so only the last
/// part is kept.
pub const CONSOLE_CAPTURE_LIMIT: usize = 8 << 20;

/// Console output kept in memory, the last [`CONSOLE_CAPTURE_LIMIT`] bytes of it.
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut kept = lock(&self.0);
        kept.extend_from_slice(buf);
        if kept.len() > CONSOLE_CAPTURE_LIMIT {
            let excess = kept.len() - CONSOLE_CAPTURE_LIMIT / 2;
            kept.drain(..excess);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Adapts a callback to `Write`.
struct CallbackWriter<F>(F);

impl<F: FnMut(&[u8]) + Send> Write for CallbackWriter<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (self.0)(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_console_keeps_the_latest_output_within_the_limit() {
        let shared = Arc::new(Mutex::new(Vec::new()));
        let mut buf = SharedBuffer(shared.clone());
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..20 {
            buf.write_all(&chunk).unwrap();
        }
        buf.write_all(b"last words").unwrap();
        let kept = shared.lock().unwrap();
        assert!(kept.len() <= CONSOLE_CAPTURE_LIMIT);
        assert!(kept.ends_with(b"last words"));
    }

    #[test]
    fn builder_fills_in_the_rootfs_as_first_disk() {
        let b = VmBuilder::new()
            .kernel("/k")
            .disk("/d.img", true)
            .rootfs("/root.ext4")
            .cmdline("quiet");
        let c = b.config(Path::new("/private/vsock")).unwrap();
        assert_eq!(c.disks[0].path, PathBuf::from("/root.ext4"));
        assert_eq!(c.disks[1].path, PathBuf::from("/d.img"));
        assert!(c.disks[1].read_only);
        assert_eq!(c.cmdline, "loft_agent=52 root=/dev/vda rw quiet");
        assert_eq!(c.initrd, None);
        let v = c.vsock.unwrap();
        assert_eq!(v.cid, AGENT_CID);
        assert_eq!(v.uds, PathBuf::from("/private/vsock"));
        let c3 = VmBuilder::new()
            .kernel("/k")
            .without_agent()
            .config(Path::new("/private/vsock"))
            .unwrap();
        assert!(c3.vsock.is_none() && !c3.cmdline.contains("loft_agent"));
    }

    #[test]
    fn every_vm_gets_a_private_socket_directory_removed_with_it() {
        use std::os::unix::fs::PermissionsExt;
        let a = PrivateDir::new().unwrap();
        let b = PrivateDir::new().unwrap();
        assert_ne!(a.vsock(), b.vsock());
        let mode = std::fs::metadata(&a.0).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        std::fs::write(a.vsock(), b"x").unwrap();
        let dir = a.0.clone();
        drop(a);
        assert!(!dir.exists());
    }

    #[test]
    fn done_times_out_then_finishes() {
        let d = Done::default();
        assert!(!d.wait(Some(Duration::from_millis(5))));
        d.finish();
        assert!(d.wait(None));
        assert!(d.wait(Some(Duration::ZERO)));
    }
}
