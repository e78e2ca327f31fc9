//! The `loft` command.

mod api;
mod copy;
mod interactive;
mod terminal;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use loft::seccomp::ThreadKind;
use loft::{
    DiskConfig, ExecRequest, ExitStatus, Jail, MemSize, NetConfig, Snapshot, VmBuilder, VmHandle,
    VsockConfig,
};
use terminal::RawTerminal;

/// Boot a Linux guest in a KVM micro-VM.
#[derive(Parser, Debug)]
#[command(name = "loft", version, about, propagate_version = true)]
struct Cli {
    /// Serve the control API (Firecracker's, where it fits; docs/api.md) on this Unix socket
    /// and wait for a VM to be configured and started through it
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest with its serial console on this terminal; exits when the guest does.
    Run(Box<RunArgs>),
    /// Save a running guest to a directory, or say what a saved one holds.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Boot a guest, wait until its agent answers (or the console prints TEXT), save it to DIR
    /// and stop it.
    Create(Box<CreateArgs>),
    /// Print what the snapshot in DIR holds.
    Inspect {
        /// The snapshot directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// Where the snapshot goes (created when missing; an older snapshot there is replaced).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// Take the snapshot when the guest's console prints a line holding TEXT (the kernel's echo
    /// of its command line aside), instead of when its agent answers.
    #[arg(long, value_name = "TEXT")]
    when_console: Option<String>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Restore the guest saved in DIR (by `loft snapshot create`) instead of booting one: it
    /// continues where it was. --disk, --net and --vsock may name new host resources;
    /// other VM options must match the snapshot.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Also serve the control API on this Unix socket while the guest runs (docs/api.md)
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    #[command(flatten)]
    vm: VmArgs,
    /// Once the VM is built, confine loft before the guest runs: new mount, IPC and UTS
    /// namespaces, an empty root, no capabilities, no_new_privs, and the ids of --uid and --gid
    /// (needs root; docs/jail.md)
    #[arg(long)]
    jail: bool,
    /// The user id loft runs as in the jail (with --jail)
    #[arg(long, value_name = "N")]
    uid: Option<u32>,
    /// The group id loft runs as in the jail (with --jail)
    #[arg(long, value_name = "N")]
    gid: Option<u32>,
    /// The directory the jail's root is mounted on (with --jail; created when missing and left
    /// in place) [default: a fresh directory in $TMPDIR, removed at once]
    #[arg(long, value_name = "DIR")]
    jail_dir: Option<PathBuf>,
    /// The guest's serial console on loft's stdout (on), or dropped (off: for benchmarks that
    /// time with --boot-timer, as Firecracker users turn its serial off)
    #[arg(
        long,
        value_name = "on|off",
        default_value = "on",
        value_parser = on_off(),
        action = clap::ArgAction::Set
    )]
    console: bool,
    /// At exit, print one line to stderr with the wall and CPU milliseconds (since loft started)
    /// at which the VM was built, first entered, the guest reached init and user space, asked
    /// to stop, and loft was done
    #[arg(long)]
    boot_timer: bool,
    /// Copy the host file HOST to the guest path GUEST (absolute; parent directories are
    /// created) before the command runs (repeatable; with -- CMD)
    #[arg(long, value_name = "HOST:GUEST", value_parser = copy::parse_in)]
    copy_in: Vec<copy::Copy>,
    /// Copy the guest file GUEST to the host path HOST after the command ended, whatever its
    /// exit code (repeatable; with -- CMD)
    #[arg(long, value_name = "GUEST:HOST", value_parser = copy::parse_out)]
    copy_out: Vec<copy::Copy>,
    /// Keep stdin open: what loft reads on its stdin is the command's stdin (with -- CMD)
    #[arg(short, long)]
    interactive: bool,
    /// Run the command on a terminal in the guest, this terminal in raw mode meanwhile
    /// (with -- CMD; -it for an interactive shell)
    #[arg(short, long)]
    tty: bool,
    /// Run this command in the guest (through its agent) instead of showing its console:
    /// its stdout and stderr become loft's, and loft exits with its exit code
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

/// What the VM is made of.
#[derive(Args, Debug)]
struct VmArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage [default: the guest built by firmware/build.sh]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive) [default: the bundled initramfs when --kernel is not given]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line; words after " -- " are passed to the guest's init
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Number of vCPUs [default: 1]
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Guest memory, e.g. 256M or 1G (a bare number is MiB) [default: 128M]
    #[arg(long, value_name = "SIZE")]
    memory: Option<MemSize>,
    /// A raw disk image as a virtio-blk disk (repeatable; the first disk is /dev/vda)
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<DiskConfig>,
    /// Boot from this ext4 image: the first disk, with root=/dev/vda rw
    #[arg(long, value_name = "PATH")]
    root: Option<PathBuf>,
    /// A virtio-net interface on a host TAP device (repeatable)
    #[arg(long, value_name = "tap=NAME[,mac=MAC]")]
    net: Vec<NetConfig>,
    /// A virtio-vsock device; host connections go through the Unix socket PATH (Firecracker's
    /// convention: connect, write "CONNECT PORT")
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<VsockConfig>,
    /// seccomp filters on loft's threads: each may make only the system calls it needs, and a
    /// forbidden one ends loft (docs/seccomp.md)
    #[arg(
        long,
        value_name = "on|off",
        default_value = "on",
        value_parser = on_off(),
        action = clap::ArgAction::Set
    )]
    seccomp: bool,
}

/// `on` or `off`, as a bool.
fn on_off() -> impl clap::builder::TypedValueParser<Value = bool> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["on", "off"]).map(|v| v == "on")
}

/// The VM `args` describe. The defaults (the bundled guest, `--root` as the first disk with
/// `root=/dev/vda rw`) are the library's, so `loft run` and an embedder get the same VM.
fn vm_builder(args: &VmArgs, started: Instant) -> VmBuilder {
    let mut b = VmBuilder::new()
        .cmdline(&args.cmdline)
        .times_from(started)
        .seccomp(args.seccomp);
    if let Some(n) = args.cpus {
        b = b.cpus(n);
    }
    if let Some(m) = args.memory {
        b = b.memory(m);
    }
    if let Some(k) = &args.kernel {
        b = b.kernel(k);
    }
    if let Some(i) = &args.initrd {
        b = b.initrd(i);
    }
    if let Some(r) = &args.root {
        b = b.rootfs(r);
    }
    for d in &args.disk {
        b = b.disk(&d.path, d.read_only);
    }
    for n in &args.net {
        b = b.net(&n.tap, n.mac);
    }
    if let Some(v) = &args.vsock {
        b = b.vsock(v.cid, &v.uds);
    }
    b
}

/// Set by SIGTERM, SIGINT and SIGHUP; polled by [`stop_on_signal`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Release);
}

fn install_terminate_handlers() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { signal(sig, SigHandler::Handler(on_terminate)) } {
            log::warn!("cannot handle {sig}: {e}");
        }
    }
}

/// With `seccomp`, confines the calling thread as `kind` (a failure is logged: the thread runs
/// on unconfined).
fn confine(seccomp: bool, kind: ThreadKind) {
    if seccomp {
        if let Err(e) = loft::seccomp::confine_current_thread(kind) {
            log::warn!("{e}");
        }
    }
}

/// Runs `body` while a watcher thread stops `vm` when a terminating signal arrives (a signal
/// handler cannot take the locks stopping needs). With `seccomp`, the watcher confines itself,
/// and so does the calling thread (the command's main thread) before `body`, for good.
fn stop_on_signal<T>(vm: &VmHandle, seccomp: bool, body: impl FnOnce() -> T) -> T {
    install_terminate_handlers();
    let finished = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            confine(seccomp, ThreadKind::SignalWatcher);
            while !finished.load(Ordering::Acquire) {
                if INTERRUPTED.load(Ordering::Acquire) {
                    vm.stop();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // From here on this thread waits for the VM, talks to its agent and cleans up: it
        // confines itself too (the threads it needed are started).
        confine(seccomp, ThreadKind::Command);
        let r = body();
        finished.store(true, Ordering::Release);
        r
    })
}

/// The jail `--jail`, `--uid`, `--gid` and `--jail-dir` ask for, or what is wrong with them.
fn jail_of(args: &RunArgs) -> Result<Option<Jail>, String> {
    if !args.jail {
        for (given, flag) in [
            (args.uid.is_some(), "--uid"),
            (args.gid.is_some(), "--gid"),
            (args.jail_dir.is_some(), "--jail-dir"),
        ] {
            if given {
                return Err(format!("{flag} is only for the jail: add --jail"));
            }
        }
        return Ok(None);
    }
    let (Some(uid), Some(gid)) = (args.uid, args.gid) else {
        return Err(
            "--jail needs both --uid N and --gid N (the ids loft runs as in the jail, \
                    e.g. 65534)"
                .into(),
        );
    };
    let jail = Jail::new(uid, gid);
    Ok(Some(match &args.jail_dir {
        Some(dir) => jail.in_dir(dir),
        None => jail,
    }))
}

/// The first of the options that only go with `-- CMD` given in `args`.
fn command_only(args: &RunArgs) -> Option<&'static str> {
    [
        (!args.copy_in.is_empty(), "--copy-in"),
        (!args.copy_out.is_empty(), "--copy-out"),
        (args.interactive, "--interactive (-i)"),
        (args.tty, "--tty (-t)"),
    ]
    .into_iter()
    .find_map(|(given, flag)| given.then_some(flag))
}

/// The VM `loft run` starts: `args.vm` booted, or restored from `--restore DIR`, jailed with
/// `--jail`.
fn run_builder(args: &RunArgs, started: Instant) -> Result<VmBuilder, loft::Error> {
    let mut builder = vm_builder(&args.vm, started);
    // Checked in main.
    if let Ok(Some(jail)) = jail_of(args) {
        builder = builder.jail(jail);
    }
    Ok(match &args.restore {
        Some(dir) => builder.restore_from(Snapshot::open(dir)?),
        None => builder,
    })
}

/// `loft run … -- CMD ARGS`: boots (or restores) the guest, runs the command through the guest
/// agent with its output on loft's stdout and stderr, stops the guest, and returns the
/// command's exit code.
fn run_command(args: RunArgs, started: Instant) -> Result<u8, loft::Error> {
    let vm = run_builder(&args, started)?.capture_console().start()?;
    if args.tty {
        interactive::install_resize_handler();
    }
    let result = stop_on_signal(&vm, args.vm.seccomp, || {
        for c in &args.copy_in {
            vm.copy_in(&c.host, &c.guest)?;
        }
        let status = if args.interactive || args.tty {
            interactive::run(&vm, args.command.clone(), args.interactive, args.tty)?
        } else {
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            vm.exec_streaming(
                &ExecRequest::new(args.command.clone()),
                |b| {
                    let _ = out.write_all(b).and_then(|_| out.flush());
                },
                |b| {
                    let _ = err.write_all(b).and_then(|_| err.flush());
                },
            )?
        };
        for c in &args.copy_out {
            vm.copy_out(&c.guest, &c.host)?;
        }
        Ok(status)
    });
    let _ = vm.kill();
    if args.boot_timer {
        eprintln!("loft-boot-timer: {}", vm.boot_times());
    }
    match result {
        Ok(ExitStatus::Code(c)) => Ok(c.clamp(0, 255) as u8),
        Ok(ExitStatus::Signal(n)) => Ok((128 + n).clamp(0, 255) as u8),
        Err(loft::Error::Agent(e)) if e.is_not_found() => {
            eprintln!("loft: error: {e}");
            Ok(127)
        }
        // A --copy-in or --copy-out that failed: the error names the file; the console has
        // nothing to add.
        Err(e) if e.file_error().is_some() => Err(e),
        Err(e) => {
            // Without the command's output, the guest's console says what went wrong.
            let console = vm.console_output();
            let text = String::from_utf8_lossy(&console);
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            for line in tail.iter().rev() {
                eprintln!("guest console: {line}");
            }
            Err(e)
        }
    }
}

/// `loft run`: the guest's console on this terminal until the guest stops.
fn run(args: RunArgs, started: Instant) -> Result<loft::StopReason, loft::Error> {
    let mut builder = run_builder(&args, started)?.stdin_console();
    if args.console {
        builder = builder.console_writer(std::io::stdout());
    }
    if args.restore.is_none() && args.api_sock.is_none() {
        builder = builder.without_agent();
    }
    // Before the VM: a socket path in use is refused before anything boots.
    let server = args
        .api_sock
        .as_ref()
        .map(|p| api::bind(p, args.vm.seccomp))
        .transpose()?;
    if args.restore.is_none() && std::io::stdin().is_terminal() {
        // A person is at the console: the bundled guest's init gives them a shell when there is
        // no command to run.
        builder = builder.cmdline("loft_shell=1");
    }
    let vm = builder.start()?;
    let _terminal = RawTerminal::enable_on_stdin().map_err(|source| loft::Error::Host {
        what: "put the terminal in raw mode",
        source,
    })?;
    let (vm, result) = match &server {
        Some(server) => api::serve_running(server, vm),
        None => {
            let result = stop_on_signal(&vm, args.vm.seccomp, || vm.wait());
            (vm, result)
        }
    };
    if args.boot_timer {
        eprintln!("loft-boot-timer: {}", vm.boot_times());
    }
    let dropped = vm.console_bytes_dropped();
    if dropped > 0 {
        eprintln!(
            "loft: {dropped} bytes of guest console output were dropped: stdout did not keep up"
        );
    }
    result
}

/// `loft snapshot create DIR …`: boots the guest, waits until it is ready (its agent answers, or
/// the console prints the text asked for), saves it to DIR and stops it.
fn snapshot_create(args: CreateArgs, started: Instant) -> Result<(), loft::Error> {
    let mut builder = vm_builder(&args.vm, started);
    let seen = std::sync::Arc::new(ConsoleWatch::new(args.when_console.clone()));
    if args.when_console.is_some() {
        let watch = seen.clone();
        builder = builder.console_callback(move |bytes| watch.feed(bytes));
    } else {
        builder = builder.capture_console();
    }
    let vm = builder.start()?;
    let ready = stop_on_signal(&vm, args.vm.seccomp, || match &args.when_console {
        Some(_) => seen.wait(&vm),
        None => vm.wait_for_agent().map(|()| true),
    })?;
    if !ready {
        let reason = vm.wait()?;
        return Err(loft::Error::StoppedBeforeReady(reason));
    }
    let info = vm.snapshot_and_stop(&args.dir)?;
    println!("{info}");
    Ok(())
}

/// Watches the console for a line holding a text. The kernel's echoes of its own command line
/// (which holds the guest command that will print the text) do not count.
struct ConsoleWatch {
    text: Option<String>,
    state: std::sync::Mutex<(Vec<u8>, bool)>,
}

/// Longest console line kept whole; the text is looked for in the last part of longer ones.
const WATCH_LINE_MAX: usize = 4096;

impl ConsoleWatch {
    fn new(text: Option<String>) -> Self {
        Self {
            text,
            state: std::sync::Mutex::new((Vec::new(), false)),
        }
    }

    fn feed(&self, bytes: &[u8]) {
        let Some(text) = &self.text else { return };
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (line, seen) = &mut *guard;
        for &b in bytes {
            if b != b'\n' {
                line.push(b);
                if line.len() > WATCH_LINE_MAX {
                    line.drain(..line.len() - WATCH_LINE_MAX / 2);
                }
                continue;
            }
            let l = String::from_utf8_lossy(line);
            // "Command line: …", "Kernel command line: …", "Unknown kernel command line
            // parameters …": the kernel repeating what it was given.
            if l.contains(text.as_str()) && !l.to_ascii_lowercase().contains("command line") {
                *seen = true;
            }
            line.clear();
        }
    }

    /// Waits until the text was seen (true) or the VM stopped (false).
    fn wait(&self, vm: &VmHandle) -> Result<bool, loft::Error> {
        loop {
            if self.state.lock().unwrap_or_else(|e| e.into_inner()).1 {
                return Ok(true);
            }
            if vm.is_finished() {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Prints an error and its chain of causes on one line: `loft: error: what: why: …`. Each
/// error's message leaves its cause out, so nothing is said twice.
fn report(e: &dyn std::error::Error) {
    eprintln!("loft: error: {}", loft::error::chain(e));
}

fn main() -> ExitCode {
    let started = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().filter_or("LOFT_LOG", "info"))
        .format_target(false)
        .format_timestamp(None)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first line names the problem and the value.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("loft: error: {first} (see 'loft --help')");
            return ExitCode::from(2);
        }
    };
    let command = match (cli.command, &cli.api_sock) {
        (Some(c), None) => c,
        (None, Some(path)) => return api::serve_only(path, started, report),
        (Some(_), Some(_)) => {
            eprintln!("loft: error: --api-sock goes after `run` when a command is given (see 'loft --help')");
            return ExitCode::from(2);
        }
        (None, None) => {
            eprintln!("loft: error: a command (run, snapshot) or --api-sock PATH is required (see 'loft --help')");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Snapshot(SnapshotCommand::Create(args)) => match snapshot_create(*args, started) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
        Command::Snapshot(SnapshotCommand::Inspect { dir }) => {
            match Snapshot::open(&dir).map(|s| s.info()) {
                Ok(info) => {
                    println!("{info}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) if jail_of(&args).is_err() => {
            if let Err(e) = jail_of(&args) {
                eprintln!("loft: error: {e}");
            }
            ExitCode::from(2)
        }
        Command::Run(args) if args.command.is_empty() && command_only(&args).is_some() => {
            let flag = command_only(&args).unwrap_or_default();
            eprintln!(
                "loft: error: {flag} works on a command run through the guest agent: add -- CMD"
            );
            ExitCode::from(2)
        }
        Command::Run(args) if args.api_sock.is_some() && !args.command.is_empty() => {
            eprintln!(
                "loft: error: --api-sock serves a running guest: it cannot be used with -- CMD"
            );
            ExitCode::from(2)
        }
        Command::Run(args) if !args.command.is_empty() => match run_command(*args, started) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => match run(*args, started) {
            Ok(reason) if reason.is_clean() => {
                log::debug!("guest stopped: {reason}");
                ExitCode::SUCCESS
            }
            Ok(reason) => {
                eprintln!("loft: error: {reason}");
                ExitCode::FAILURE
            }
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
    }
}
