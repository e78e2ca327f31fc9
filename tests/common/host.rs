//! What a test needs of the host whether it runs the `loft` binary or the library: KVM, and a
//! count of loft's own threads.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

/// Fails the test (never skips it) when this host cannot run VMs.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    assert!(
        kvm.exists(),
        "/dev/kvm is not available on this host: this test boots a real guest and cannot run here"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        panic!("/dev/kvm cannot be opened ({e}): this test boots a real guest and cannot run here");
    }
}

/// Threads of this process that loft started (`loft-vmm`, `loft-vcpuN`, `loft-load`): zero when no
/// VM runs or is being built.
/// Counting them by name keeps the test harness's own threads out of the count.
pub fn loft_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("loft-"))
        .count()
}

/// [`loft_threads`] once `done` holds for it, or after 2 s: a thread takes its name a moment
/// after it starts, and a joined thread can still be listed in /proc/self/task for a moment
/// while the kernel finishes its exit (a leaked thread never goes).
pub fn loft_threads_when(done: impl Fn(usize) -> bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let n = loft_threads();
        if done(n) || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`loft_threads`] once it is down to zero, or after 2 s (see [`loft_threads_when`]).
pub fn loft_threads_after_exit() -> usize {
    loft_threads_when(|n| n == 0)
}

/// VMs running inside this test process. A test that counts loft's threads or this process's
/// fds takes it exclusively, so no other test's VM is counted; a test that starts VMs in this
/// process takes it shared. (VMs in `loft` child processes need neither.)
pub static IN_PROCESS_VMS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Starts VMs in this process beside other such tests.
pub fn in_process_vms() -> std::sync::RwLockReadGuard<'static, ()> {
    IN_PROCESS_VMS.read().unwrap_or_else(|e| e.into_inner())
}

/// Alone among the tests that start VMs in this process.
pub fn only_in_process_vms() -> std::sync::RwLockWriteGuard<'static, ()> {
    IN_PROCESS_VMS.write().unwrap_or_else(|e| e.into_inner())
}
