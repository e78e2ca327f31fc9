//! Running commands in real guests through the guest agent (virtio-vsock): the CLI's `--` form
//! and the library's `exec`, several VMs and several execs at once.

use std::time::Duration;

use crate::common::{self, guest_file, BootSlot, BOOT_TIMEOUT};
use loft::ExecRequest;
use loft::{ExitStatus, StopReason, VmBuilder};

/// This process's open fds, less pipes and /dev/null: the tests beside this one spawn loft
/// processes (and so hold pipes for a moment); a VM's own fds (KVM, eventfds, sockets, files)
/// are never either.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            let t = target.to_string_lossy();
            !t.starts_with("pipe:") && t != "/dev/null"
        })
        .count()
}

#[test]
fn cli_runs_a_command_with_separate_streams_and_its_exit_code() {
    common::require_kvm();
    let _slot = BootSlot::acquire();
    let kernel = guest_file("vmlinux");
    let initrd = guest_file("initramfs.cpio");
    let mut cmd = common::loft();
    cmd.args([
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    cmd.args(["--", "/bin/sh", "-c", "echo out; echo err >&2; exit 7"]);
    let o = common::run(cmd, BOOT_TIMEOUT);
    assert!(!o.timed_out, "loft timed out\n{}", o.tail());
    assert_eq!(
        o.stdout,
        "out\n",
        "only the command's stdout reaches stdout\n{}",
        o.tail()
    );
    assert!(
        o.stderr.lines().any(|l| l == "err"),
        "the command's stderr reaches stderr\n{}",
        o.tail()
    );
    assert!(
        !o.stdout.contains("err"),
        "stderr must not be merged into stdout"
    );
    assert_eq!(
        o.code,
        Some(7),
        "loft exits with the command's code\n{}",
        o.tail()
    );
}

#[test]
fn three_vms_each_run_their_own_commands_then_everything_is_released() {
    common::require_kvm();
    // Three guests at once: take every boot slot so no other test boots beside them.
    let _a = BootSlot::acquire();
    let _b = BootSlot::acquire();
    let _alone = common::only_in_process_vms();
    let fds_before = open_fds();
    assert_eq!(
        common::loft_threads_after_exit(),
        0,
        "no VM may run before the test"
    );
    let kernel = guest_file("vmlinux");
    let initrd = guest_file("initramfs.cpio");
    let names = ["one", "two", "three"];
    let vms: Vec<_> = names
        .iter()
        .map(|_| {
            VmBuilder::new()
                .kernel(&kernel)
                .initrd(&initrd)
                .agent_timeout(Duration::from_secs(600))
                .capture_console()
                .start()
                .expect("start VM")
        })
        .collect();
    std::thread::scope(|s| {
        for (vm, name) in vms.iter().zip(names) {
            s.spawn(move || {
                let out = vm
                    .exec(&ExecRequest::new([
                        "/bin/sh",
                        "-c",
                        &format!("echo vm-{name}; echo to-err >&2; exit 3"),
                    ]))
                    .unwrap_or_else(|e| {
                        panic!(
                            "exec in VM {name}: {e}\n{}",
                            String::from_utf8_lossy(&vm.console_output())
                        )
                    });
                assert_eq!(out.status, ExitStatus::Code(3));
                assert_eq!(String::from_utf8_lossy(&out.stdout), format!("vm-{name}\n"));
                assert_eq!(String::from_utf8_lossy(&out.stderr), "to-err\n");
                // Two more at once in the same VM, and one after another.
                std::thread::scope(|inner| {
                    let a = inner.spawn(|| vm.exec(&ExecRequest::new(["echo", "first"])).unwrap());
                    let b = inner.spawn(|| {
                        vm.exec(&ExecRequest::new(["cat", "/proc/sys/kernel/osrelease"]))
                            .unwrap()
                    });
                    assert_eq!(a.join().unwrap().stdout, b"first\n");
                    let b = b.join().unwrap();
                    assert_eq!(b.status, ExitStatus::Code(0));
                    assert!(!b.stdout.is_empty());
                });
                let env = vm
                    .exec(
                        &ExecRequest::new(["/bin/sh", "-c", "echo $GREETING from $(pwd)"])
                            .env("GREETING", "hi")
                            .cwd("/tmp"),
                    )
                    .unwrap();
                assert_eq!(env.stdout, b"hi from /tmp\n");
                let missing = vm.exec(&ExecRequest::new(["/no/such/program"]));
                assert!(missing.is_err() || missing.unwrap().status != ExitStatus::Code(0));
            });
        }
    });
    for vm in vms {
        assert_eq!(vm.kill().unwrap(), StopReason::Stopped);
    }
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
    assert_eq!(
        common::loft_threads_after_exit(),
        0,
        "VM threads outlived their VMs"
    );
}
