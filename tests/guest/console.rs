//! The guest's console never waits for its reader: with a pipe nobody reads as the console's
//! writer and the guest printing, the VM goes on, output past the buffer is dropped and
//! counted, and the VM stops at once. Uses a restore of the shared agent snapshot.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::snapshot::{agent_snapshot, disk_copy};
use crate::common;
use loft::{ExecRequest, ExitStatus, Snapshot, StopReason, VmBuilder};

#[test]
fn a_console_nobody_reads_neither_stalls_the_guest_nor_its_stop() {
    let disk = disk_copy("console.img");
    let _vms = common::in_process_vms();
    let (reader, writer) = std::io::pipe().unwrap();
    // The smallest pipe, so that it fills after a few KiB (the UART is slow on kvm_pvm hosts).
    // SAFETY: F_SETPIPE_SZ on a pipe we own; no memory is passed.
    let rc = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        rc >= 4096,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    let vm = VmBuilder::new()
        .disk(&disk, false)
        .console_writer(writer)
        .console_buffer(4096)
        .restore_from(Snapshot::open(&agent_snapshot().dir).unwrap())
        .start()
        .expect("restore");
    let flood = vm
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "head -c 100000 /dev/zero | tr '\\0' x > /dev/ttyS0 &",
        ]))
        .unwrap();
    assert_eq!(flood.status, ExitStatus::Code(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.console_bytes_dropped() == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing was dropped: did the guest print?"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The pipe is full and stays full, yet the guest goes on.
    let alive = vm.exec(&ExecRequest::new(["echo", "alive"])).unwrap();
    assert_eq!(alive.stdout, b"alive\n");
    let started = Instant::now();
    assert_eq!(vm.kill().unwrap(), StopReason::Stopped);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "stopping took {took:?}");
    assert!(vm.console_bytes_dropped() > 0);
    drop(reader);
}
