//! seccomp filters on running VMs (restores of the shared agent snapshot: milliseconds): every
//! thread loft starts is confined (`Seccomp: 2` in its /proc status), the thread that started
//! the VM is not, and a confined VM still runs commands, takes snapshots and stops.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common;
use crate::snapshot::{agent_snapshot, disk_copy, restore_agent_snapshot, scratch};
use loft::{ExecRequest, ExitStatus, StopReason};

/// A task's name, seccomp mode (0 none, 2 filter) and number of filters.
#[derive(Debug)]
struct Task {
    comm: String,
    mode: u32,
    filters: u32,
}

fn status_field(status: &str, key: &str) -> u32 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
}

fn task(dir: &std::path::Path) -> Option<Task> {
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let status = std::fs::read_to_string(dir.join("status")).ok()?;
    Some(Task {
        comm: comm.trim().to_string(),
        mode: status_field(&status, "Seccomp:"),
        filters: status_field(&status, "Seccomp_filters:"),
    })
}

/// The tasks of process `pid` ("self": this one).
fn tasks(pid: &str) -> Vec<Task> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| task(&t.ok()?.path()))
        .collect()
}

fn assert_confined(t: &Task, all: &[Task]) {
    assert!(
        t.mode == 2 && t.filters >= 1,
        "{} is not confined: {t:?}\nall tasks: {all:#?}",
        t.comm
    );
}

#[test]
fn a_library_vms_threads_are_confined_the_callers_thread_is_not() {
    common::require_kvm();
    let disk = disk_copy("seccomp-lib.img");
    // Alone: no other VM's threads are starting (and not yet confined) while they are counted.
    let _vms = common::only_in_process_vms();
    let vm = restore_agent_snapshot(&disk);
    let out = vm
        .exec(&ExecRequest::new(["/bin/sh", "-c", "echo confined"]))
        .unwrap();
    assert_eq!(out.stdout, b"confined\n", "{out:?}");

    let all = tasks("self");
    // Process mode's `loft-spawner` (there when an isolated VM was started in this process)
    // forks and execs the child `loft`: it cannot take a filter its child would inherit, and
    // runs nothing else (docs/seccomp.md).
    let loft: Vec<&Task> = all
        .iter()
        .filter(|t| t.comm.starts_with("loft-") && t.comm != "loft-spawner")
        .collect();
    assert!(
        ["loft-vmm", "loft-vcpu0", "loft-blk0"]
            .iter()
            .all(|name| loft.iter().any(|t| t.comm == *name)),
        "{all:#?}"
    );
    for t in loft {
        assert_confined(t, &all);
    }
    let me = task(std::path::Path::new("/proc/thread-self")).unwrap();
    assert_eq!(
        me.mode, 0,
        "the thread that started the VM is filtered: {me:?}"
    );

    // A snapshot under the filters (files written by the VMM thread, vCPU state saved on the
    // vCPU threads), and the VM runs on after it.
    let dir = scratch("seccomp-snapshot");
    let info = vm.snapshot(&dir).expect("snapshot under seccomp");
    assert_eq!(info.cpus, 1);
    let out = vm
        .exec(&ExecRequest::new(["/bin/sh", "-c", "echo after; exit 3"]))
        .unwrap();
    assert_eq!(
        (out.stdout.as_slice(), out.status),
        (&b"after\n"[..], ExitStatus::Code(3))
    );
    assert_eq!(vm.kill().unwrap(), StopReason::Stopped);
}

/// `loft run --restore … -- sh -c 'echo ready; sleep 3'` with `--seccomp on|off`, waited for
/// until its command runs (its threads are all up then).
fn cli_restore(seccomp: &str, disk: &std::path::Path) -> (Child, Vec<Task>) {
    let mut child = common::loft()
        .arg("run")
        .arg("--restore")
        .arg(&agent_snapshot().dir)
        .arg("--disk")
        .arg(disk)
        .args([
            "--seccomp",
            seccomp,
            "--",
            "/bin/sh",
            "-c",
            "echo ready; sleep 3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while line.trim() != "ready" {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "loft --seccomp {seccomp} ended before its command ran: {:?}",
                child.wait()
            );
        }
    }
    let all = tasks(&child.id().to_string());
    (child, all)
}

#[test]
fn the_loft_commands_threads_are_confined_unless_seccomp_is_off() {
    common::require_kvm();
    let disk = disk_copy("seccomp-cli.img");
    let (mut child, all) = cli_restore("on", &disk);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for name in ["loft-vmm", "loft-vcpu0", "loft-blk0"] {
        let t = all
            .iter()
            .find(|t| t.comm == name)
            .unwrap_or_else(|| panic!("{all:#?}"));
        assert_confined(t, &all);
    }
    // The main thread (waiting for the command's output) and its signal watcher, both named
    // "loft", are confined too.
    let unnamed: Vec<&Task> = all.iter().filter(|t| t.comm == "loft").collect();
    assert_eq!(unnamed.len(), 2, "{all:#?}");
    for t in unnamed {
        assert_confined(t, &all);
    }

    let (mut child, all) = cli_restore("off", &disk);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(all.iter().all(|t| t.mode == 0), "{all:#?}");
}
