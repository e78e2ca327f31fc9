//! loft as a library: many VMs in one process, handles, waits, stops, and no leaks.
//!
//! These use tiny test kernels (a few bytes of code, see common/tiny_kernel.rs) so that a VM
//! boots and stops in milliseconds and a hundred cycles take seconds. The test depends on nothing but the `loft` library's public API, which proves that API is enough to
//! embed loft.

#[path = "../../tests/common/host.rs"]
mod host;
#[path = "../../tests/common/tiny_kernel.rs"]
mod tiny_kernel;

use std::time::{Duration, Instant};

use host::require_kvm;
use loft::{StopReason, VmBuilder};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// All tests in this file share the process's fd and thread counts: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn three_vms_at_once_each_with_its_own_console_and_nothing_left_behind() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fds_before = open_fds();
    assert_eq!(
        host::loft_threads_after_exit(),
        0,
        "no VM may run before the test"
    );
    let kernels: Vec<_> = ["alpha", "bravo", "charlie"]
        .iter()
        .map(|name| {
            (
                name,
                tiny_kernel::write(
                    &format!("{name}.elf"),
                    &tiny_kernel::print_and_reset(format!("hello {name}\n").as_bytes()),
                ),
            )
        })
        .collect();
    let mut vms: Vec<_> = kernels
        .iter()
        .map(|(name, k)| {
            (
                name,
                VmBuilder::new()
                    .kernel(k)
                    .memory_mib(32)
                    .capture_console()
                    .start()
                    .unwrap(),
            )
        })
        .collect();
    for (name, vm) in &mut vms {
        let reason = vm
            .wait_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("VM did not stop");
        assert_eq!(reason, StopReason::GuestReset);
        let out = String::from_utf8(vm.console_output()).unwrap();
        assert_eq!(
            out,
            format!("hello {name}\n"),
            "each VM must get only its own console output"
        );
        let times = vm.boot_times();
        assert!(
            times.vm_built.is_some() && times.first_entry.is_some() && times.stop_request.is_some()
        );
        assert!(times.first_entry.unwrap().wall >= times.vm_built.unwrap().wall);
    }
    drop(vms);
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
    assert_eq!(
        host::loft_threads_after_exit(),
        0,
        "VM threads outlived their VMs"
    );
}

#[test]
fn hundred_start_stop_cycles_do_not_grow_fds_threads_or_memory() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = tiny_kernel::write("reset.elf", &tiny_kernel::print_and_reset(b""));
    let cycle = || {
        let vm = VmBuilder::new()
            .kernel(&kernel)
            .memory_mib(32)
            .start()
            .unwrap();
        assert_eq!(vm.wait().unwrap(), StopReason::GuestReset);
    };
    // Warm up allocator caches and lazily created process state before measuring.
    for _ in 0..5 {
        cycle();
    }
    let (fds, rss) = (open_fds(), rss_kib());
    let start = Instant::now();
    for _ in 0..100 {
        cycle();
    }
    let elapsed = start.elapsed();
    assert_eq!(open_fds(), fds, "file descriptors leaked over 100 cycles");
    assert_eq!(
        host::loft_threads_after_exit(),
        0,
        "threads leaked over 100 cycles"
    );
    let grown = rss_kib().saturating_sub(rss);
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB over 100 cycles");
    eprintln!("100 start/stop cycles: {elapsed:?}, RSS growth {grown} KiB");
}

#[test]
fn a_guest_that_never_exits_is_stopped_by_wait_timeout_and_kill_within_a_second() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = tiny_kernel::write("spin.elf", &tiny_kernel::spin_forever());
    let vm = VmBuilder::new()
        .kernel(&kernel)
        .memory_mib(32)
        .start()
        .unwrap();
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(500)).unwrap(),
        None,
        "the spinning guest stopped by itself"
    );
    assert!(!vm.is_finished());
    let start = Instant::now();
    let reason = vm.kill().unwrap();
    let took = start.elapsed();
    assert_eq!(reason, StopReason::Stopped);
    assert!(took < Duration::from_secs(1), "kill took {took:?}");
    assert!(matches!(vm.wait(), Err(loft::Error::AlreadyWaited)));
}

#[test]
fn dropping_a_running_handle_stops_the_vm() {
    require_kvm();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kernel = tiny_kernel::write("spin-drop.elf", &tiny_kernel::spin_forever());
    assert_eq!(host::loft_threads_after_exit(), 0);
    let vm = VmBuilder::new()
        .kernel(&kernel)
        .memory_mib(32)
        .start()
        .unwrap();
    assert!(
        host::loft_threads_when(|n| n > 0) > 0,
        "the VM runs on loft's threads"
    );
    drop(vm);
    assert_eq!(
        host::loft_threads_after_exit(),
        0,
        "VM threads outlived the handle"
    );
}

#[test]
fn bad_configuration_is_a_typed_error_not_a_panic() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let err = VmBuilder::new()
        .kernel("/nonexistent/kernel")
        .start()
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            loft::Error::Loader(loft::error::LoaderError::KernelMissing(_))
        ),
        "{err:?}"
    );
    let kernel = tiny_kernel::write("reset-cpus.elf", &tiny_kernel::print_and_reset(b""));
    let err = VmBuilder::new()
        .kernel(&kernel)
        .cpus(0)
        .start()
        .err()
        .unwrap();
    assert!(
        matches!(err, loft::Error::Config(loft::error::ConfigError::NoCpus)),
        "{err:?}"
    );
}
