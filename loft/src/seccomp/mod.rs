//! seccomp filters, one per kind of thread loft starts.
//!
//! Each of loft's threads confines itself with a seccomp-bpf filter before it does its work: a
//! vCPU thread before its first `KVM_RUN`, the VMM thread once it has started the vCPU and disk
//! threads (so it needs no `clone`), a disk thread before it serves its queue, a loader thread
//! before it reads the kernel or the initramfs, the console thread before it writes the guest's
//! output. A
//! filter allows the system calls that kind of thread makes and nothing else; `ioctl` only with
//! the request numbers it uses, `socket` only for Unix sockets, `mmap` and `mprotect` never with
//! `PROT_EXEC`. No loft thread may `execve`, `fork` or `clone`; only the VMM thread may open files
//! (snapshots) or create sockets (vsock).
//!
//! Filters are on by default ([`crate::VmBuilder::seccomp`] and `loft run --seccomp off` turn
//! them off). In the library they apply to loft's own threads only, never to the thread that
//! calls [`crate::VmBuilder::start`] or any other thread of the embedding program. What runs on
//! loft's threads on the embedder's behalf runs under their filters: console writers and
//! callbacks run on the `loft-console` thread (they may write to open files and sockets, lock
//! and allocate, not open files or sockets), and the embedder's logger gets the `log` records of
//! loft's threads on those threads.
//!
//! # A forbidden system call
//!
//! The process ends: a filtered thread that makes a system call outside its list gets `SIGSYS`
//! (`SECCOMP_RET_TRAP`), whose handler writes one line to stderr with the thread and the call,
//!
//! ```text
//! loft: error: seccomp: thread loft-vcpu0 made a forbidden system call 59 (execve)
//! ```
//!
//! and exits the process with [`VIOLATION_EXIT_CODE`] (159, what a shell reports for a process
//! killed by SIGSYS). The handler uses only `write(2)` and `exit_group(2)`, which every filter
//! allows. It is installed when a VM with filters is built, unless the process already has a
//! `SIGSYS` handler (a program with seccomp filters of its own); the filters then kill the
//! process at once instead (`SECCOMP_RET_KILL_PROCESS`, Firecracker's choice), without a message
//! (the kernel's audit log, `dmesg`, names the call).
//!
//! # The lists
//!
//! [`ThreadKind::syscalls`] has each kind's list, and `docs/seccomp.md` shows them all with
//! why each call is there (a unit test keeps it in step with the code). Every kind allows:
//! the memory calls of the allocator and of thread exit (`brk`, `mmap`, `mprotect`, `munmap`,
//! `mremap`, `madvise`), `futex`, `clock_gettime` (where the vDSO clock is unusable, and CPU-time
//! clocks), `getrandom` (hash map seeds), `write` (log lines, panics, the message above; plus
//! each kind's own writes), `rt_sigreturn` (signal handlers: the vCPU kick, the `loft` command's
//! SIGTERM handler), `rt_sigprocmask` and `sigaltstack` (thread exit), `exit` and `exit_group`.

mod api;
mod blk;
mod command;
mod console;
mod ioctls;
mod loader;
mod vcpu;
mod vmm;
mod watcher;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use ioctls::Ioctl;

/// The exit code of a process whose loft thread made a forbidden system call: 128 + SIGSYS, as
/// a shell reports a process killed by SIGSYS.
pub const VIOLATION_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// The kinds of threads loft starts, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// `loft-vmm`: the event loop (devices, snapshots, stopping).
    Vmm,
    /// `loft-vcpuN`: one vCPU.
    Vcpu,
    /// `loft-load`: copies the kernel or the initramfs into guest memory.
    Loader,
    /// `loft-console`: writes the guest's console output to the host's writer.
    Console,
    /// The `loft` command's signal watcher: stops the VM when SIGTERM, SIGINT or SIGHUP come.
    SignalWatcher,
    /// `loft-blkN`: serves one disk's queue (disk image I/O, `fdatasync`).
    BlockWorker,
    /// `loft-api`: the control API's thread (reads requests on its socket, writes answers).
    Api,
    /// The `loft` command's main thread once its VM runs: waits for it, runs `-- CMD` through
    /// the agent, restores the terminal.
    Command,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 8] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::BlockWorker,
        ThreadKind::Loader,
        ThreadKind::Console,
        ThreadKind::SignalWatcher,
        ThreadKind::Api,
        ThreadKind::Command,
    ];

    /// The thread's name, or what it is when it has none of its own.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "loft-vmm",
            ThreadKind::Vcpu => "loft-vcpuN",
            ThreadKind::Loader => "loft-load",
            ThreadKind::Console => "loft-console",
            ThreadKind::SignalWatcher => "signal watcher",
            ThreadKind::BlockWorker => "loft-blkN",
            ThreadKind::Api => "loft-api",
            ThreadKind::Command => "loft (main thread)",
        }
    }

    /// Its place in [`ThreadKind::ALL`] (and among the compiled filters).
    fn index(self) -> usize {
        match self {
            ThreadKind::Vmm => 0,
            ThreadKind::Vcpu => 1,
            ThreadKind::BlockWorker => 2,
            ThreadKind::Loader => 3,
            ThreadKind::Console => 4,
            ThreadKind::SignalWatcher => 5,
            ThreadKind::Api => 6,
            ThreadKind::Command => 7,
        }
    }

    /// The system calls this kind's filter allows (some only with certain arguments), sorted
    /// by name.
    pub fn syscalls(self) -> Vec<Syscall> {
        let mut all = common();
        all.extend(match self {
            ThreadKind::Vmm => vmm::syscalls(),
            ThreadKind::Vcpu => vcpu::syscalls(),
            ThreadKind::Loader => loader::syscalls(),
            ThreadKind::Console => console::syscalls(),
            ThreadKind::SignalWatcher => watcher::syscalls(),
            ThreadKind::BlockWorker => blk::syscalls(),
            ThreadKind::Api => api::syscalls(),
            ThreadKind::Command => command::syscalls(),
        });
        all.sort_by_key(|s| s.name);
        all
    }
}

/// A system call a filter allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Syscall {
    /// Its number on x86_64.
    pub nr: i64,
    /// Its name.
    pub name: &'static str,
    /// With which arguments.
    pub only: Only,
    /// Why the thread needs it.
    pub why: &'static str,
}

impl Syscall {
    fn new(nr: i64, name: &'static str, only: Only, why: &'static str) -> Self {
        Self {
            nr,
            name,
            only,
            why,
        }
    }

    /// `socket` for Unix sockets only.
    fn unix_socket(why: &'static str) -> Self {
        let only = Only::ArgEquals {
            arg: 0,
            value: libc::AF_UNIX as u64,
            what: "AF_UNIX",
        };
        Self::new(libc::SYS_socket, "socket", only, why)
    }
}

/// Which arguments a [`Syscall`] is allowed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Only {
    /// Any.
    Any,
    /// `ioctl` with one of these requests.
    Ioctls(&'static [Ioctl]),
    /// Argument `arg` (from 0) equal to `value`.
    ArgEquals {
        /// The argument's index.
        arg: u8,
        /// Its value.
        value: u64,
        /// The value's name.
        what: &'static str,
    },
    /// Argument `arg` (from 0) without the bits of `mask`.
    ArgWithout {
        /// The argument's index.
        arg: u8,
        /// The bits that must be clear.
        mask: u64,
        /// The bits' name.
        what: &'static str,
    },
}

impl std::fmt::Display for Only {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Only::Any => Ok(()),
            Only::Ioctls(list) => {
                let names: Vec<_> = list.iter().map(|i| i.name).collect();
                write!(f, "{}", names.join(", "))
            }
            Only::ArgEquals { arg, what, .. } => write!(f, "argument {arg} = {what}"),
            Only::ArgWithout { arg, what, .. } => write!(f, "argument {arg} without {what}"),
        }
    }
}

/// `fcntl(fd, F_GETFD)`: how the Rust standard library, built with debug assertions, checks that
/// an fd is open before it closes it.
const CHECK_FD_OPEN: Only = Only::ArgEquals {
    arg: 1,
    value: libc::F_GETFD as u64,
    what: "F_GETFD",
};

/// What every kind of thread needs: the Rust standard library's and the C library's own calls.
fn common() -> Vec<Syscall> {
    let any = |nr, name, why| Syscall::new(nr, name, Only::Any, why);
    let no_exec = Only::ArgWithout {
        arg: 2,
        mask: libc::PROT_EXEC as u64,
        what: "PROT_EXEC",
    };
    vec![
        any(libc::SYS_brk, "brk", "the allocator"),
        Syscall::new(
            libc::SYS_mmap,
            "mmap",
            no_exec.clone(),
            "the allocator; never executable memory",
        ),
        Syscall::new(
            libc::SYS_mprotect,
            "mprotect",
            no_exec,
            "the allocator's arenas; never executable memory",
        ),
        any(
            libc::SYS_munmap,
            "munmap",
            "the allocator; the thread's signal stack at exit; guest memory at the end",
        ),
        any(libc::SYS_mremap, "mremap", "the allocator"),
        any(
            libc::SYS_madvise,
            "madvise",
            "the allocator; the C library frees a finished thread's stack",
        ),
        any(
            libc::SYS_futex,
            "futex",
            "locks, condition variables, joining threads",
        ),
        any(
            libc::SYS_clock_gettime,
            "clock_gettime",
            "time, where the vDSO cannot tell it; CPU-time clocks for the boot timer",
        ),
        any(libc::SYS_getrandom, "getrandom", "hash map seeds"),
        any(
            libc::SYS_write,
            "write",
            "log lines and panics on stderr, the seccomp message; eventfds, TAP frames, console output",
        ),
        any(
            libc::SYS_rt_sigreturn,
            "rt_sigreturn",
            "returns from signal handlers (the vCPU kick; the loft command's SIGTERM handler)",
        ),
        any(
            libc::SYS_rt_sigprocmask,
            "rt_sigprocmask",
            "the C library blocks signals while a thread exits",
        ),
        any(
            libc::SYS_sigaltstack,
            "sigaltstack",
            "the Rust runtime drops a thread's signal stack at exit",
        ),
        any(libc::SYS_exit, "exit", "thread exit"),
        any(
            libc::SYS_exit_group,
            "exit_group",
            "process exit, also after a forbidden system call",
        ),
    ]
}

/// Names of the system calls the trap message may have to name: every call in a list (those
/// allowed only with certain arguments can be refused) and the usual forbidden ones. A signal
/// handler cannot allocate, so this is a static table.
static SYSCALL_NAMES: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_open, "open"),
    (libc::SYS_close, "close"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_access, "access"),
    (libc::SYS_pipe, "pipe"),
    (libc::SYS_select, "select"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_sendfile, "sendfile"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_truncate, "truncate"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_chdir, "chdir"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_link, "link"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_chown, "chown"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_mknod, "mknod"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_arch_prctl, "arch_prctl"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_reboot, "reboot"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_epoll_create, "epoll_create"),
    (libc::SYS_getdents, "getdents"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_timerfd_create, "timerfd_create"),
    (libc::SYS_eventfd, "eventfd"),
    (libc::SYS_timerfd_settime, "timerfd_settime"),
    (libc::SYS_timerfd_gettime, "timerfd_gettime"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_preadv, "preadv"),
    (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_prlimit64, "prlimit64"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_openat2, "openat2"),
];

/// The name of system call `nr`, when [`SYSCALL_NAMES`] has it.
fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| *name)
}

/// Errors setting up or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter could not be compiled (a bug in loft's lists).
    #[error("cannot compile the seccomp filter of the {kind} thread: {reason}")]
    Compile {
        /// Whose filter.
        kind: &'static str,
        /// seccompiler's complaint.
        reason: String,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of the {kind} thread (turn filters off to run on this host)")]
    Install {
        /// Whose filter.
        kind: &'static str,
        /// The kernel's error.
        source: seccompiler::Error,
    },
}

/// The compiled filters, one per [`ThreadKind`] in [`ThreadKind::ALL`] order.
type Programs = Vec<BpfProgram>;

/// Compiled once per process, on the first [`prepare`].
static PROGRAMS: OnceLock<Result<Programs, (&'static str, String)>> = OnceLock::new();

/// Whether loft's SIGSYS handler is installed (decided once, with the filters' action).
static TRAP_HANDLER: AtomicBool = AtomicBool::new(false);

/// Installs the SIGSYS handler when nothing else handles SIGSYS, and compiles the filters, once
/// per process. Called on the thread that builds a VM with filters, so that a failure is an
/// error of the build, and the threads that confine themselves later only install a ready
/// program.
pub(crate) fn prepare() -> Result<(), SeccompError> {
    let compiled = PROGRAMS.get_or_init(|| {
        let trap = install_trap_handler();
        TRAP_HANDLER.store(trap, Ordering::Relaxed);
        let action = if trap {
            SeccompAction::Trap
        } else {
            SeccompAction::KillProcess
        };
        ThreadKind::ALL
            .iter()
            .map(|kind| compile(*kind, action.clone()).map_err(|e| (kind.name(), e)))
            .collect()
    });
    match compiled {
        Ok(_) => Ok(()),
        Err((kind, reason)) => Err(SeccompError::Compile {
            kind,
            reason: reason.clone(),
        }),
    }
}

/// Confines the calling thread with the filter of `kind`, for good: it and the threads it starts
/// afterwards can make only the system calls of that kind's list. The `loft` command calls it on
/// its signal watcher; loft calls it on its own threads.
pub fn confine_current_thread(kind: ThreadKind) -> Result<(), SeccompError> {
    prepare()?;
    let Some(Ok(programs)) = PROGRAMS.get() else {
        unreachable!("prepare succeeded")
    };
    set_label(kind);
    seccompiler::apply_filter(&programs[kind.index()]).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

/// [`confine_current_thread`] when `on`.
pub(crate) fn confine_if(on: bool, kind: ThreadKind) -> Result<(), SeccompError> {
    if on {
        confine_current_thread(kind)
    } else {
        Ok(())
    }
}

/// `kind`'s filter as a BPF program: its list allowed, anything else `mismatch`.
fn compile(kind: ThreadKind, mismatch: SeccompAction) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in kind.syscalls() {
        let chain = rules_of(&call.only).map_err(|e| format!("{}: {e}", call.name))?;
        if rules.insert(call.nr, chain).is_some() {
            return Err(format!("{} is listed twice", call.name));
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// The seccompiler rules for a call's argument condition (none: any arguments).
fn rules_of(only: &Only) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let rule = |arg, op, value| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    match only {
        Only::Any => Ok(Vec::new()),
        // The kernel reads an ioctl's request as an unsigned int: compare those 32 bits.
        Only::Ioctls(list) => list
            .iter()
            .map(|i| rule(1, SeccompCmpOp::Eq, i.nr))
            .collect(),
        Only::ArgEquals { arg, value, .. } => Ok(vec![rule(*arg, SeccompCmpOp::Eq, *value)?]),
        Only::ArgWithout { arg, mask, .. } => {
            Ok(vec![rule(*arg, SeccompCmpOp::MaskedEq(*mask), 0)?])
        }
    }
}

// The trap handler.

/// Longest thread label kept for the message.
const LABEL_MAX: usize = 24;

thread_local! {
    /// The confined thread's name, for the trap message: plain bytes, readable from a signal
    /// handler (no lazy initialisation, no destructor).
    static LABEL: Cell<([u8; LABEL_MAX], usize)> = const { Cell::new(([0; LABEL_MAX], 0)) };
}

fn set_label(kind: ThreadKind) {
    let current = std::thread::current();
    let name = current.name().unwrap_or(kind.name()).as_bytes();
    let mut label = [0; LABEL_MAX];
    let len = name.len().min(LABEL_MAX);
    label[..len].copy_from_slice(&name[..len]);
    LABEL.with(|l| l.set((label, len)));
}

/// Serialises the check-and-install of the handler with other loft code doing the same.
static SIGACTION: Mutex<()> = Mutex::new(());

/// Installs [`on_sigsys`] for SIGSYS unless the process already handles (or ignores) SIGSYS.
/// Returns whether loft's handler is the one installed.
fn install_trap_handler() -> bool {
    let _guard = SIGACTION.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: an all-zero sigaction is a valid value to be filled in.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads the current action into `old`, valid for the call.
    if unsafe { libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut old) } != 0 {
        return false;
    }
    if old.sa_sigaction == on_sigsys as *const () as usize {
        return true;
    }
    if old.sa_sigaction != libc::SIG_DFL {
        log::debug!("seccomp: SIGSYS already has a handler; a forbidden call kills the process");
        return false;
    }
    // SAFETY: as above.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_sigsys as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `new` is a valid action whose handler only makes async-signal-safe calls.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: as above; `new` lives for the call.
    unsafe { libc::sigaction(libc::SIGSYS, &new, std::ptr::null_mut()) == 0 }
}

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: i32 = 1;

/// Where `siginfo_t` keeps a SIGSYS's system call number (`si_syscall`, after `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

/// The SIGSYS handler: one line on stderr naming the thread and the call, then the process ends
/// with [`VIOLATION_EXIT_CODE`]. Only `write(2)` and `_exit(2)`.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let mut msg = Message::new();
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    msg.push(b"loft: error: seccomp: thread ");
    let (label, len) = LABEL.with(|l| l.get());
    if len == 0 {
        msg.push(b"?");
    } else {
        msg.push(&label[..len]);
    }
    if code == SYS_SECCOMP {
        // SAFETY: for a seccomp SIGSYS, si_syscall is an int at this offset of the siginfo_t
        // (the `_sigsys` member of its union), which is 128 bytes long.
        let nr = unsafe {
            *info
                .cast::<u8>()
                .add(SI_SYSCALL_OFFSET)
                .cast::<libc::c_int>()
        };
        msg.push(b" made a forbidden system call ");
        msg.push_decimal(i64::from(nr));
        if let Some(name) = syscall_name(i64::from(nr)) {
            msg.push(b" (");
            msg.push(name.as_bytes());
            msg.push(b")");
        }
        if i64::from(nr) == libc::SYS_ioctl && !ctx.is_null() {
            // SAFETY: the third argument of an SA_SIGINFO handler is the interrupted context,
            // a ucontext_t; its RSI held the system call's second argument.
            let request = unsafe {
                (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize]
            };
            msg.push(b" with request ");
            msg.push_hex(request as u64 & 0xffff_ffff);
        }
    } else {
        msg.push(b" got SIGSYS");
    }
    msg.push(b"\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid for its length.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

/// A line built on the stack (a signal handler cannot allocate).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn new() -> Self {
        Self {
            buf: [0; 256],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_decimal(&mut self, v: i64) {
        if v < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut n = v.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, mut v: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// The lists as Markdown, for `docs/seccomp.md`.
#[cfg(test)]
fn markdown() -> String {
    let mut out = String::new();
    for kind in ThreadKind::ALL {
        let calls = kind.syscalls();
        out.push_str(&format!(
            "### {} ({} system calls)\n\n| system call | only with | why |\n| --- | --- | --- |\n",
            kind.name(),
            calls.len()
        ));
        for c in calls {
            let only = c.only.to_string();
            out.push_str(&format!("| `{}` | {} | {} |\n", c.name, only, c.why));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
