//! The `loft` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use loft::boot_timer::{self, Timeline};
use loft::config::{self, DiskConfig, MemSize, NetConfig, VmConfig, VsockConfig};
use loft::console::RawTerminal;
use loft::Vmm;

/// Boot a Linux guest in a KVM micro-VM.
#[derive(Parser, Debug)]
#[command(name = "loft", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest with its serial console on this terminal; exits when the guest does.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage [default: the guest built by firmware/build.sh]
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio archive) [default: the bundled initramfs when --kernel is not given]
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line; words after " -- " are passed to the guest's init
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = config::DEFAULT_CPUS)]
    cpus: u32,
    /// Guest memory, e.g. 256M or 1G (a bare number is MiB)
    #[arg(long, value_name = "SIZE", default_value = "128M")]
    memory: MemSize,
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
    /// convention: connect, write "CONNECT <port>")
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<VsockConfig>,
    /// At exit, print one line to stderr with the wall and CPU milliseconds (since loft started)
    /// at which the VM was built, first entered, the guest reached init and user space, asked
    /// to stop, and loft was done
    #[arg(long)]
    boot_timer: bool,
}

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

fn vm_config(args: RunArgs) -> Result<VmConfig, loft::Error> {
    let (kernel, initrd) = match args.kernel {
        Some(k) => (k, args.initrd),
        // The bundled initramfs would take precedence over a --root disk: leave it out then.
        None => {
            let (k, bundled_initrd) = config::bundled_guest()?;
            let default_initrd = if args.root.is_some() {
                None
            } else {
                bundled_initrd
            };
            (k, args.initrd.or(default_initrd))
        }
    };
    let mut disks = Vec::new();
    let mut cmdline = args.cmdline;
    if let Some(root) = args.root {
        disks.push(DiskConfig {
            path: root,
            read_only: false,
        });
        cmdline = format!("root=/dev/vda rw {cmdline}");
    }
    disks.extend(args.disk);
    if std::io::stdin().is_terminal() {
        // A person is at the console: the bundled guest's init gives them a shell when there is
        // no command to run.
        cmdline.push_str(" loft_shell=1");
    }
    Ok(VmConfig {
        initrd,
        cmdline,
        disks,
        nets: args.net,
        vsock: args.vsock,
        cpus: args.cpus,
        memory: args.memory,
        ..VmConfig::new(kernel)
    })
}

fn run(args: RunArgs) -> Result<loft::StopReason, loft::Error> {
    let print_times = args.boot_timer;
    let config = vm_config(args)?;
    let timeline = Arc::new(Timeline::new(boot_timer::process_start()));
    let mut vmm = Vmm::build_with_timeline(&config, Box::new(std::io::stdout()), timeline.clone())?;
    let _terminal = RawTerminal::enable_on_stdin().map_err(|source| loft::Error::Host {
        what: "put the terminal in raw mode",
        source,
    })?;
    vmm.attach_stdin()?;
    install_terminate_handlers();
    let result = vmm.run(&|| INTERRUPTED.load(Ordering::Acquire));
    if print_times {
        eprintln!("loft-boot-timer: {}", timeline.times());
    }
    result
}

/// Prints an error with its causes on one line.
fn report(e: &dyn std::error::Error) {
    let mut line = format!("loft: error: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    eprintln!("{line}");
}

fn main() -> ExitCode {
    boot_timer::process_start();
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
    match cli.command {
        Command::Run(args) => match run(args) {
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
