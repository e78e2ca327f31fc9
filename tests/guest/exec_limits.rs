//! Bounds on `exec`: a command that runs too long or prints too much is killed, the caller gets
//! a typed error at once, and the VM goes on. Uses a restore of the shared agent snapshot.

use std::time::{Duration, Instant};

use super::snapshot::{agent_snapshot, disk_copy};
use crate::common;
use loft::{ExecRequest, ExitStatus, Snapshot, VmBuilder};

#[test]
fn a_command_past_its_timeout_or_its_output_limit_is_killed_and_the_vm_goes_on() {
    let disk = disk_copy("limits.img");
    let _vms = common::in_process_vms();
    let vm = VmBuilder::new()
        .disk(&disk, false)
        .restore_from(Snapshot::open(&agent_snapshot().dir).unwrap())
        .start()
        .expect("restore");
    // The first exec after a restore also syncs the guest: keep that out of the timings.
    let warm = vm.exec(&ExecRequest::new(["true"])).unwrap();
    assert_eq!(warm.status, ExitStatus::Code(0));

    let started = Instant::now();
    let err = vm
        .exec(&ExecRequest::new(["sleep", "30"]).timeout(Duration::from_secs(1)))
        .expect_err("sleep 30 with a 1 s timeout");
    let took = started.elapsed();
    assert!(
        matches!(err, loft::Error::ExecTimeout(d) if d == Duration::from_secs(1)),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(2), "the timeout took {took:?}");

    let err = vm
        .exec(&ExecRequest::new(["head", "-c", "3000000", "/dev/zero"]).output_limit(1 << 20))
        .expect_err("3 MB of output with a 1 MiB limit");
    assert!(
        matches!(err, loft::Error::Agent(loft::error::AgentError::OutputTooLarge { limit }) if limit == 1 << 20),
        "{err:?}"
    );

    // Both commands are gone, and the VM takes commands as before.
    let ps = vm
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "sleep 1; ps | grep -c '[s]leep 30'; echo still-here",
        ]))
        .unwrap();
    let text = String::from_utf8_lossy(&ps.stdout);
    assert_eq!(text, "0\nstill-here\n", "{text}");
    vm.kill().unwrap();
}
