//! The filters, tried for real: each case runs in a child process (this test binary again, with
//! [`CHILD`] set), whose confined thread makes one system call. A forbidden call must end the
//! child with the trap's message and exit code; an allowed one must let it go on.

use std::path::PathBuf;
use std::process::{Command, Output};

use super::*;

/// `KIND:CALL` for the child: confine a thread as KIND, then make CALL.
const CHILD: &str = "LOFT_SECCOMP_TEST_CHILD";

/// What a child prints when its confined thread survived the call.
const SURVIVED: &str = "seccomp-test: survived";

fn kind_named(name: &str) -> ThreadKind {
    match name {
        "vmm" => ThreadKind::Vmm,
        "vcpu" => ThreadKind::Vcpu,
        "loader" => ThreadKind::Loader,
        "console" => ThreadKind::Console,
        "watcher" => ThreadKind::SignalWatcher,
        "blk" => ThreadKind::BlockWorker,
        "api" => ThreadKind::Api,
        "command" => ThreadKind::Command,
        other => panic!("no thread kind {other}"),
    }
}

const KINDS: [&str; 8] = [
    "vmm", "vcpu", "blk", "loader", "console", "watcher", "api", "command",
];

/// TUNSETIFF, which no loft thread may use (TAP devices are opened before the VM runs).
const TUNSETIFF: u64 = 0x4004_54ca;
/// KVM_SET_REGS, which only the thread building a VM uses.
const KVM_SET_REGS: u64 = 0x4090_ae82;

/// Makes the system call `call` names (on the confined thread).
fn make(call: &str) {
    match call {
        "execve" => {
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: a plain system call on constants or on memory that outlives it.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        "fork" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: a plain system call on constants or on memory that outlives it.
                unsafe { libc::_exit(0) };
            }
        }
        "openat" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
            eprintln!("open: {fd}");
        }
        "socket_unix" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            eprintln!("socket: {fd}");
        }
        "socket_inet" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            eprintln!("socket: {fd}");
        }
        "mmap_exec" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            eprintln!("mmap: {p:?}");
        }
        "ioctl_kvm_run" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let r = unsafe { libc::ioctl(-1, ioctls::KVM_RUN.nr as _, 0) };
            eprintln!("ioctl: {r}");
        }
        "ioctl_kvm_set_regs" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let r = unsafe { libc::ioctl(-1, KVM_SET_REGS as _, 0) };
            eprintln!("ioctl: {r}");
        }
        "ioctl_tunsetiff" => {
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let r = unsafe { libc::ioctl(-1, TUNSETIFF as _, 0) };
            eprintln!("ioctl: {r}");
        }
        "everyday" => {
            // What every thread does: allocate, lock, read clocks, seed a hash map, log.
            let v: Vec<u64> = (0..1 << 20).collect();
            let m = Mutex::new(v.len());
            let mut h = std::collections::HashMap::new();
            h.insert(*m.lock().unwrap(), std::time::Instant::now());
            // SAFETY: a plain system call on constants or on memory that outlives it.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            // SAFETY: a plain system call on constants or on memory that outlives it.
            unsafe { libc::munmap(p, 4096) };
            eprintln!("allocated, locked, mapped: {}", h.len());
        }
        "disk_io" => {
            // What a disk worker does with fds opened before it was confined: wait on an
            // eventfd, read it, pwrite, pread and fdatasync an image.
            let path = std::env::var("LOFT_SECCOMP_TEST_FILE").unwrap();
            FILE.with(|f| {
                use std::os::unix::fs::FileExt;
                let f = f.borrow();
                let (file, evt) = f.as_ref().expect("opened before confinement");
                evt.write(1).unwrap();
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(evt),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd, alive for the call.
                assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
                assert_eq!(evt.read().unwrap(), 1);
                file.write_all_at(b"worker", 512).unwrap();
                let mut back = [0u8; 6];
                file.read_exact_at(&mut back, 512).unwrap();
                assert_eq!(&back, b"worker");
                file.sync_data().unwrap();
            });
            eprintln!("disk I/O on {path}: done");
        }
        "timerfd" => {
            // SAFETY: a plain system call on constants.
            let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, 0) };
            eprintln!("timerfd: {fd}");
        }
        other => panic!("no call {other}"),
    }
}

thread_local! {
    /// The image and eventfd a "disk_io" child opens before its thread is confined.
    static FILE: std::cell::RefCell<Option<(std::fs::File, vmm_sys_util::eventfd::EventFd)>> =
        const { std::cell::RefCell::new(None) };
}

/// The child's side: a thread confined as the kind named in [`CHILD`] makes the call; it exits
/// normally (under its filter) when the call was allowed. Does nothing in a normal test run.
#[test]
fn child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (kind, call) = spec.split_once(':').expect("KIND:CALL");
    let (kind, call) = (kind_named(kind), call.to_owned());
    prepare().unwrap();
    let survived = std::thread::Builder::new()
        .name("seccomp-test".into())
        .spawn(move || {
            if call == "disk_io" {
                let path = std::env::var("LOFT_SECCOMP_TEST_FILE").unwrap();
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .unwrap();
                let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
                FILE.with(|f| *f.borrow_mut() = Some((file, evt)));
            }
            confine_current_thread(kind).unwrap();
            make(&call);
        })
        .unwrap()
        .join()
        .is_ok();
    if survived {
        eprintln!("{SURVIVED}");
    }
}

fn run_child(kind: &str, call: &str) -> Output {
    let image = std::env::temp_dir().join(format!(
        "loft-seccomp-test-{}-{kind}-{call}.img",
        std::process::id()
    ));
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["seccomp::tests::child", "--exact", "--nocapture"])
        .env(CHILD, format!("{kind}:{call}"))
        .env("LOFT_SECCOMP_TEST_FILE", &image)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&image);
    out
}

fn assert_dies(kind: &str, call: &str, name: &str) {
    let out = run_child(kind, call);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(VIOLATION_EXIT_CODE),
        "{kind} thread making {call}: {:?}\n{stderr}",
        out.status
    );
    let line = "loft: error: seccomp: thread seccomp-test made a forbidden system call";
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(line) && l.contains(name)),
        "{kind} thread making {call}: no message naming {name}:\n{stderr}"
    );
}

fn assert_survives(kind: &str, call: &str) {
    let out = run_child(kind, call);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains(SURVIVED),
        "{kind} thread making {call}: {:?}\n{stderr}",
        out.status
    );
}

#[test]
fn no_thread_may_execve_or_fork() {
    for kind in KINDS {
        assert_dies(kind, "execve", "(execve)");
        assert_dies(kind, "fork", "(clone)");
    }
}

#[test]
fn every_thread_may_allocate_lock_log_and_exit() {
    for kind in KINDS {
        assert_survives(kind, "everyday");
    }
}

#[test]
fn only_the_vmm_thread_may_open_files_or_unix_sockets() {
    assert_survives("vmm", "openat");
    assert_survives("vmm", "socket_unix");
    assert_dies("vmm", "socket_inet", "(socket)");
    for kind in ["vcpu", "blk", "loader", "console", "watcher"] {
        assert_dies(kind, "openat", "(openat)");
        assert_dies(kind, "socket_unix", "(socket)");
    }
}

#[test]
fn ioctls_are_limited_to_each_threads_requests() {
    assert_survives("vcpu", "ioctl_kvm_run");
    assert_dies(
        "vcpu",
        "ioctl_kvm_set_regs",
        "(ioctl) with request 0x4090ae82",
    );
    assert_dies("vcpu", "ioctl_tunsetiff", "(ioctl) with request 0x400454ca");
    assert_dies("vmm", "ioctl_kvm_run", "(ioctl) with request 0xae80");
    assert_dies("vmm", "ioctl_tunsetiff", "(ioctl)");
    assert_dies("loader", "ioctl_kvm_run", "(ioctl)");
    assert_dies("console", "ioctl_kvm_run", "(ioctl)");
    assert_dies("watcher", "ioctl_kvm_run", "(ioctl)");
    assert_dies("blk", "ioctl_kvm_run", "(ioctl)");
    assert_dies("api", "ioctl_kvm_run", "(ioctl)");
}

#[test]
fn the_api_thread_may_not_open_files_or_make_sockets() {
    assert_dies("api", "socket_unix", "(socket)");
    assert_dies("api", "execve", "(execve)");
}

#[test]
fn the_command_thread_may_reach_its_agent_but_not_the_network_or_kvm() {
    assert_survives("command", "socket_unix");
    assert_dies("command", "socket_inet", "(socket)");
    assert_dies("command", "ioctl_kvm_run", "(ioctl) with request 0xae80");
    assert_dies("command", "ioctl_tunsetiff", "(ioctl)");
}

#[test]
fn every_kind_has_its_own_place_among_the_filters() {
    assert_eq!(KINDS.len(), ThreadKind::ALL.len());
    for (i, kind) in ThreadKind::ALL.into_iter().enumerate() {
        assert_eq!(kind.index(), i, "{kind:?}");
        assert_eq!(kind_named(KINDS[i]), kind);
    }
}

#[test]
fn a_disk_worker_may_do_disk_io_and_wait_but_nothing_else() {
    assert_survives("blk", "disk_io");
    assert_dies("blk", "socket_unix", "(socket)");
    assert_dies("blk", "timerfd", "(timerfd_create)");
}

#[test]
fn no_thread_may_map_executable_memory() {
    for kind in KINDS {
        assert_dies(kind, "mmap_exec", "(mmap)");
    }
}

#[test]
fn every_filter_compiles_both_ways() {
    for kind in ThreadKind::ALL {
        for action in [SeccompAction::Trap, SeccompAction::KillProcess] {
            let program = compile(kind, action).unwrap();
            assert!(
                program.len() < 4096,
                "{kind:?}: {} instructions",
                program.len()
            );
        }
    }
}

#[test]
fn every_listed_call_has_its_name_in_the_trap_table() {
    for kind in ThreadKind::ALL {
        for call in kind.syscalls() {
            assert_eq!(
                syscall_name(call.nr),
                Some(call.name),
                "{kind:?}: {}",
                call.name
            );
        }
    }
    let mut numbers: Vec<i64> = SYSCALL_NAMES.iter().map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), SYSCALL_NAMES.len(), "a number twice");
}

#[test]
fn messages_are_built_without_allocating() {
    let mut m = Message::new();
    m.push(b"call ");
    m.push_decimal(59);
    m.push(b" ");
    m.push_decimal(-1);
    m.push(b" ");
    m.push_hex(0xae80);
    m.push(b" ");
    m.push_hex(0);
    assert_eq!(&m.buf[..m.len], b"call 59 -1 0xae80 0x0");
    let mut long = Message::new();
    for _ in 0..100 {
        long.push(b"0123456789");
    }
    assert_eq!(long.len, long.buf.len());
}

/// `docs/seccomp.md` shows the lists as the code has them: run with `LOFT_BLESS=1` to rewrite
/// its generated part after changing a list.
#[test]
fn docs_show_the_lists_the_code_has() {
    const BEGIN: &str = "<!-- generated by `LOFT_BLESS=1 cargo test -p loft seccomp`: begin -->\n";
    const END: &str = "<!-- generated: end -->\n";
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/seccomp.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (head, rest) = doc.split_once(BEGIN).expect("begin marker");
    let (current, tail) = rest.split_once(END).expect("end marker");
    let wanted = markdown();
    if current != wanted {
        if std::env::var_os("LOFT_BLESS").is_some() {
            std::fs::write(&path, format!("{head}{BEGIN}{wanted}{END}{tail}")).unwrap();
        } else {
            panic!(
                "{} is out of date: run `LOFT_BLESS=1 cargo test -p loft seccomp`",
                path.display()
            );
        }
    }
}
