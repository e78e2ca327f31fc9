//! Process mode (`VmBuilder::isolated`): VMs in child `loft` processes driven over the control
//! API; and `SendCtrlAltDel` (`PUT /actions`, `VmHandle::ctrl_alt_del`) ending a restored guest
//! with a reboot. All restores of the shared agent snapshot: no boot.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use loft::{ExecRequest, ExitStatus, Snapshot, StopReason, VmBuilder, VmHandle};

use crate::common;
use crate::snapshot::{agent_snapshot, disk_copy, scratch};

/// Longest a restore + first exec may take on a loaded host.
const READY: Duration = Duration::from_secs(120);

fn restore_isolated(snapshot: &Snapshot, disk: &Path, explicit_binary: bool) -> VmHandle {
    let b = VmBuilder::new()
        .disk(disk, false)
        .capture_console()
        .agent_timeout(READY)
        .restore_from(snapshot.clone());
    let b = if explicit_binary {
        b.isolated_with(env!("CARGO_BIN_EXE_loft"))
    } else {
        b.isolated() // found beside the test binary: target/*/loft
    };
    b.start()
        .unwrap_or_else(|e| panic!("isolated restore: {e}"))
}

fn sh(vm: &VmHandle, script: &str) -> String {
    let out = vm
        .exec(&ExecRequest::new(["/bin/sh", "-c", script]))
        .unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn three_isolated_vms_run_their_own_commands_die_alone_and_leave_no_child() {
    common::require_kvm();
    let snap = agent_snapshot();
    let snapshot = Snapshot::open(&snap.dir).unwrap();
    let names = ["iso-a", "iso-b", "iso-c"];
    let disks: Vec<_> = names
        .iter()
        .map(|n| disk_copy(&format!("{n}.img")))
        .collect();
    let vms: Vec<VmHandle> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| restore_isolated(&snapshot, d, i == 0))
        .collect();
    let pids: Vec<u32> = vms
        .iter()
        .map(|v| v.process_id().expect("a child pid"))
        .collect();
    assert_ne!(pids[0], pids[1]);
    assert_ne!(pids[1], pids[2]);
    for pid in &pids {
        assert_ne!(*pid, std::process::id());
    }
    // Each guest writes its name to its own disk and says its clone id.
    let ids: Vec<String> = std::thread::scope(|s| {
        let runs: Vec<_> = vms
            .iter()
            .zip(names)
            .map(|(vm, name)| {
                s.spawn(move || {
                    sh(
                        vm,
                        &format!("printf {name} > /dev/vda && sync && cat /run/loft/clone-id"),
                    )
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(id.trim(), vms[i].clone_id(), "{ids:?}");
    }
    assert!(
        ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
        "{ids:?}"
    );
    for (disk, name) in disks.iter().zip(names) {
        let bytes = std::fs::read(disk).unwrap();
        assert!(
            bytes.starts_with(name.as_bytes()),
            "{} starts with {:?}",
            disk.display(),
            String::from_utf8_lossy(&bytes[..16])
        );
    }
    // The middle child is killed from outside: its handle sees a stop, the others go on.
    // SAFETY: kill with a pid of our own unreaped child.
    assert_eq!(unsafe { libc::kill(pids[1] as i32, libc::SIGKILL) }, 0);
    let reason = vms[1]
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("the killed child is seen as a stop");
    assert_eq!(
        reason,
        StopReason::ProcessDied {
            code: None,
            signal: Some(libc::SIGKILL)
        }
    );
    assert!(!reason.is_clean());
    assert!(vms[1].exec(&ExecRequest::new(["true"])).is_err());
    assert_eq!(sh(&vms[0], "echo still here"), "still here\n");
    assert_eq!(sh(&vms[2], "echo still here"), "still here\n");
    // Pause, resume and boot times go over the API.
    vms[0].pause().unwrap();
    vms[0].resume().unwrap();
    assert!(vms[0].boot_times().restored.is_some());
    // One stops on request; the last is only dropped.
    assert_eq!(vms[0].kill().unwrap(), StopReason::Stopped);
    drop(vms);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} is left (running or unreaped)"
        );
    }
}

#[test]
fn an_isolated_vm_is_snapshotted_and_its_console_captured() {
    common::require_kvm();
    let snap = agent_snapshot();
    let snapshot = Snapshot::open(&snap.dir).unwrap();
    let vm = restore_isolated(&snapshot, &disk_copy("iso-snap.img"), true);
    sh(&vm, "echo iso-console-mark > /dev/console");
    let dir = scratch("iso-snapshot");
    let info = vm.snapshot_and_stop(&dir).unwrap();
    assert_eq!(info.cpus, 1);
    assert!(vm.is_finished());
    let text = String::from_utf8_lossy(&vm.console_output()).into_owned();
    assert!(text.contains("iso-console-mark"), "console: {text}");
    // The snapshot an isolated VM made restores in this process.
    let again = VmBuilder::new()
        .disk(disk_copy("iso-snap2.img"), false)
        .agent_timeout(READY)
        .restore_from(Snapshot::open(&dir).unwrap())
        .start()
        .unwrap();
    assert_eq!(sh(&again, "echo back"), "back\n");
}

#[test]
fn ctrl_alt_del_reboots_an_isolated_restored_guest() {
    common::require_kvm();
    let snap = agent_snapshot();
    let snapshot = Snapshot::open(&snap.dir).unwrap();
    let vm = restore_isolated(&snapshot, &disk_copy("iso-cad.img"), true);
    vm.wait_for_agent().unwrap();
    vm.ctrl_alt_del().unwrap();
    let reason = vm.wait_timeout(Duration::from_secs(90)).unwrap();
    assert_eq!(reason, Some(StopReason::GuestReset));
}

/// One request over the API socket: the status code.
fn put(sock: &Path, path: &str, body: &str) -> u16 {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn send_ctrl_alt_del_over_the_api_reboots_the_guest_and_loft_exits_0() {
    common::require_kvm();
    let snap = agent_snapshot();
    let sock = scratch("cad.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = common::loft()
        .arg("run")
        .arg("--restore")
        .arg(&snap.dir)
        .arg("--disk")
        .arg(disk_copy("cad.img"))
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + READY;
    // The restored guest answers its agent first: then its keyboard driver is surely running.
    let exec = r#"{"args": ["true"]}"#;
    while !sock.exists() || put(&sock, "/loft/exec", exec) != 200 {
        assert!(Instant::now() < deadline, "loft never answered");
        assert!(child.try_wait().unwrap().is_none(), "loft ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        put(&sock, "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
        204
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("loft did not exit after SendCtrlAltDel");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!sock.exists(), "the API socket is removed at exit");
}

#[test]
fn a_jailed_isolated_vm_runs_as_the_jails_user_and_dies_with_its_handle() {
    common::require_kvm();
    let snap = agent_snapshot();
    let vm = VmBuilder::new()
        .disk(disk_copy("iso-jail.img"), false)
        .agent_timeout(READY)
        .restore_from(Snapshot::open(&snap.dir).unwrap())
        .jail(loft::Jail::new(65534, 65534))
        .isolated_with(env!("CARGO_BIN_EXE_loft"))
        .start()
        .unwrap_or_else(|e| panic!("jailed isolated restore: {e}"));
    let pid = vm.process_id().unwrap();
    assert_eq!(sh(&vm, "echo jailed"), "jailed\n");
    // The child took the jail's ids (this test process keeps its own: it may have threads).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["65534"; 4],
        "{uid}"
    );
    drop(vm);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn an_isolated_vm_boots_the_bundled_guest_with_its_options_and_streams_exec_output() {
    common::require_kvm();
    let _slot = common::BootSlot::acquire();
    let vm = VmBuilder::new()
        .kernel(common::guest_file("vmlinux"))
        .initrd(common::guest_file("initramfs.cpio"))
        .cpus(2)
        .memory_mib(160)
        .cmdline("iso_boot_mark=1")
        .agent_timeout(common::BOOT_TIMEOUT)
        .capture_console()
        .isolated_with(env!("CARGO_BIN_EXE_loft"))
        .start()
        .unwrap_or_else(|e| panic!("isolated boot: {e}"));
    let mut streamed = Vec::new();
    let status = vm
        .exec_streaming(
            &ExecRequest::new([
                "/bin/sh",
                "-c",
                "nproc; grep -o iso_boot_mark=1 /proc/cmdline",
            ]),
            |b| streamed.extend_from_slice(b),
            |_| {},
        )
        .unwrap_or_else(|e| {
            panic!(
                "exec: {e}\n{}",
                String::from_utf8_lossy(&vm.console_output())
            )
        });
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(String::from_utf8_lossy(&streamed), "2\niso_boot_mark=1\n");
    let times = vm.boot_times();
    assert!(
        times.vm_built.is_some() && times.user_init.is_some(),
        "{times}"
    );
    assert!(String::from_utf8_lossy(&vm.console_output()).contains("Linux version"));
    assert_eq!(vm.kill().unwrap(), StopReason::Stopped);
}

#[test]
fn a_child_that_cannot_build_its_vm_is_an_error_with_its_words() {
    let e = VmBuilder::new()
        .kernel("/nonexistent/vmlinux")
        .isolated_with(env!("CARGO_BIN_EXE_loft"))
        .start()
        .err()
        .expect("no VM from a missing kernel");
    let text = e.to_string();
    assert!(text.contains("ended before it was ready"), "{text}");
    assert!(text.contains("/nonexistent/vmlinux"), "{text}");
    let e = VmBuilder::new()
        .isolated_with("/nonexistent/loft")
        .start()
        .err()
        .expect("no VM without a loft binary");
    assert!(e.to_string().contains("/nonexistent/loft"), "{e}");
}
