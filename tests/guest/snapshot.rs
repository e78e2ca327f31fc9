//! Snapshots of real guests: `loft snapshot create`, `loft snapshot inspect`, `loft run
//! --restore` and the library's `snapshot` / `restore_from`.
//!
//! One boot serves most of them: [`agent_snapshot`] boots the guest with a data disk through the
//! library, writes and syncs a line to that disk through the agent, and snapshots it. Every
//! test then restores that snapshot (each on its own copy of the data disk) instead of booting.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{self, assert_one_line_error, guest_file, BootSlot, BOOT_TIMEOUT};
use loft::{ExecRequest, ExitStatus, Snapshot, StopReason, VmBuilder, VmHandle};

/// How long a restore and one command may take: restoring is milliseconds, but a guest process
/// costs seconds on kvm_pvm hosts, more when the machine is busy.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the guest wrote and synced to its data disk before the snapshot.
const DISK_LINE: &str = "synced-before-snapshot";

pub struct AgentSnapshot {
    pub dir: PathBuf,
    pub disk: PathBuf,
    /// The guest's uptime (seconds) right before the snapshot.
    pub uptime: f64,
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loft-snaptest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The agent-ready snapshot, made once by whichever test needs it first.
pub fn agent_snapshot() -> &'static AgentSnapshot {
    static SNAP: OnceLock<AgentSnapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        common::require_kvm();
        let _slot = BootSlot::acquire();
        let _vms = common::in_process_vms();
        let disk = scratch("data.img");
        std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
        let vm = VmBuilder::new()
            .kernel(guest_file("vmlinux"))
            .initrd(guest_file("initramfs.cpio"))
            .disk(&disk, false)
            .agent_timeout(BOOT_TIMEOUT)
            .capture_console()
            .start()
            .expect("start the VM to snapshot");
        let out = vm
            .exec(&ExecRequest::new([
                "/bin/sh",
                "-c",
                &format!("printf {DISK_LINE} > /dev/vda && sync"),
            ]))
            .unwrap_or_else(|e| {
                panic!(
                    "exec before the snapshot: {e}\n{}",
                    String::from_utf8_lossy(&vm.console_output())
                )
            });
        assert_eq!(out.status, ExitStatus::Code(0), "{out:?}");
        let up = vm.exec(&ExecRequest::new(["cat", "/proc/uptime"])).unwrap();
        let uptime = uptime_of(&up.stdout);
        let dir = scratch("agent-snapshot");
        let info = vm.snapshot_and_stop(&dir).expect("snapshot");
        assert_eq!(info.cpus, 1);
        assert!(
            info.memory_on_disk < info.memory,
            "the memory file is sparse: {info:?}"
        );
        AgentSnapshot { dir, disk, uptime }
    })
}

/// The first number of `/proc/uptime`.
pub fn uptime_of(proc_uptime: &[u8]) -> f64 {
    String::from_utf8_lossy(proc_uptime)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "not /proc/uptime: {:?}",
                String::from_utf8_lossy(proc_uptime)
            )
        })
}

/// A fresh copy of the snapshot's data disk, for one restore.
pub fn disk_copy(name: &str) -> PathBuf {
    let copy = scratch(name);
    std::fs::copy(&agent_snapshot().disk, &copy).unwrap();
    copy
}

/// The agent snapshot restored in this process on `disk` (a [`disk_copy`]), its console
/// captured. Take the in-process VM lock first.
pub fn restore_agent_snapshot(disk: &Path) -> VmHandle {
    VmBuilder::new()
        .disk(disk, false)
        .capture_console()
        .restore_from(Snapshot::open(&agent_snapshot().dir).unwrap())
        .start()
        .expect("restore")
}

fn restore_cli(disk: &Path, command: &str) -> common::Outcome {
    let mut cmd = common::loft();
    cmd.arg("run")
        .arg("--restore")
        .arg(&agent_snapshot().dir)
        .arg("--disk")
        .arg(disk)
        .args(["--", "/bin/sh", "-c", command]);
    common::run(cmd, RESTORE_TIMEOUT)
}

#[test]
fn the_synced_disk_write_is_on_the_host_file_when_the_snapshot_is_taken() {
    let snap = agent_snapshot();
    let bytes = std::fs::read(&snap.disk).unwrap();
    assert!(
        bytes.starts_with(DISK_LINE.as_bytes()),
        "host disk starts with {:?}",
        String::from_utf8_lossy(&bytes[..32])
    );
}

#[test]
fn cli_restore_runs_a_command_with_its_streams_and_exit_code() {
    let disk = disk_copy("cli.img");
    let o = restore_cli(&disk, "echo out; echo err >&2; exit 7");
    assert!(!o.timed_out, "loft timed out\n{}", o.tail());
    assert_eq!(o.stdout, "out\n", "{}", o.tail());
    assert!(o.stderr.lines().any(|l| l == "err"), "{}", o.tail());
    assert_eq!(o.code, Some(7), "{}", o.tail());
    eprintln!("restore + exec took {:?}", o.elapsed);
}

#[test]
fn inspect_says_what_the_snapshot_holds() {
    let mut cmd = common::loft();
    cmd.args(["snapshot", "inspect"]).arg(&agent_snapshot().dir);
    let o = common::run(cmd, Duration::from_secs(30));
    assert_eq!(o.code, Some(0), "{}", o.tail());
    for needle in [
        "vcpus:      1",
        "memory:     128 MiB",
        "agent:      vsock port 52",
        "virtio-blk",
        "virtio-vsock cid=3",
        "host:",
    ] {
        assert!(o.stdout.contains(needle), "no {needle:?} in\n{}", o.stdout);
    }
}

#[test]
fn restores_get_fresh_randomness_the_host_clock_and_their_own_clone_id() {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let probe = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; cat /run/loft/clone-id";
    let mut seen = Vec::new();
    for i in 0..2 {
        let disk = disk_copy(&format!("rand{i}.img"));
        let before = now();
        let o = restore_cli(&disk, probe);
        let after = now();
        assert_eq!(o.code, Some(0), "{}", o.tail());
        let lines: Vec<&str> = o.stdout.lines().collect();
        assert_eq!(lines.len(), 3, "{}", o.tail());
        let guest_time: f64 = lines[1].parse().unwrap();
        assert!(
            guest_time >= before - 2.0 && guest_time <= after + 2.0,
            "guest clock {guest_time} is not within 2 s of the host's ({before}..{after})"
        );
        seen.push((lines[0].to_string(), lines[2].to_string()));
    }
    assert_ne!(
        seen[0].0, seen[1].0,
        "two restores read the same random bytes"
    );
    assert_eq!(seen[0].0.len(), 32);
    assert_ne!(seen[0].1, seen[1].1, "two restores got the same clone id");
}

#[test]
fn library_restore_reads_back_the_disk_and_runs_several_execs() {
    let disk = disk_copy("lib.img");
    let _vms = common::in_process_vms();
    let snapshot = Snapshot::open(&agent_snapshot().dir).unwrap();
    let started = Instant::now();
    let vm = VmBuilder::new()
        .disk(&disk, false)
        .capture_console()
        .restore_from(snapshot)
        .start()
        .expect("restore");
    let restored_in = started.elapsed();
    let times = vm.boot_times();
    assert!(times.restored.is_some(), "{times}");
    assert!(
        times.vm_built.is_none() && times.kernel_init.is_none(),
        "{times}"
    );
    let read = vm
        .exec(&ExecRequest::new([
            "head",
            "-c",
            &DISK_LINE.len().to_string(),
            "/dev/vda",
        ]))
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&read.stdout), DISK_LINE);
    for n in 0..3 {
        let out = vm
            .exec(&ExecRequest::new([
                "/bin/sh",
                "-c",
                &format!("echo exec-{n}; exit {n}"),
            ]))
            .unwrap();
        assert_eq!(out.stdout, format!("exec-{n}\n").as_bytes());
        assert_eq!(out.status, ExitStatus::Code(n));
    }
    // A write after the restore reaches this clone's disk copy, not the snapshot's disk.
    let out = vm
        .exec(&ExecRequest::new([
            "/bin/sh",
            "-c",
            "printf restored-write > /dev/vda && sync",
        ]))
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(vm.kill().unwrap(), StopReason::Stopped);
    assert!(std::fs::read(&disk).unwrap().starts_with(b"restored-write"));
    assert!(std::fs::read(&agent_snapshot().disk)
        .unwrap()
        .starts_with(DISK_LINE.as_bytes()));
    eprintln!("in-process restore took {restored_in:?}");
}

#[test]
fn damaged_snapshots_are_refused_with_one_line() {
    let good = &agent_snapshot().dir;
    let state = std::fs::read(good.join("state")).unwrap();
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: [(&str, Damage); 4] = [
        (
            "truncated",
            Box::new(|d: &Path| {
                std::fs::write(d.join("state"), &state[..state.len() / 2]).unwrap()
            }),
        ),
        (
            "flipped",
            Box::new(|d: &Path| {
                let mut s = state.clone();
                let mid = s.len() / 2;
                s[mid] ^= 0xff;
                std::fs::write(d.join("state"), s).unwrap()
            }),
        ),
        (
            "no memory",
            Box::new(|d: &Path| std::fs::remove_file(d.join("memory")).unwrap()),
        ),
        (
            "short memory",
            Box::new(|d: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("memory"))
                    .unwrap();
                f.set_len(1 << 20).unwrap();
            }),
        ),
    ];
    for (name, damage) in cases {
        let dir = scratch(&format!("bad-{}", name.replace(' ', "-")));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(good.join("state"), dir.join("state")).unwrap();
        std::fs::copy(good.join("memory"), dir.join("memory")).unwrap();
        damage(&dir);
        let mut cmd = common::loft();
        cmd.arg("run")
            .arg("--restore")
            .arg(&dir)
            .args(["--", "true"]);
        let o = common::run(cmd, Duration::from_secs(30));
        assert_one_line_error(&o, &["snapshot"]);
    }
}

#[test]
fn a_ticking_guest_goes_on_from_where_it_was_snapshotted() {
    common::require_kvm();
    let dir = scratch("tick");
    {
        let _slot = BootSlot::acquire();
        let mut cmd = common::loft();
        cmd.args(["snapshot", "create"])
            .arg(&dir)
            .arg("--kernel")
            .arg(guest_file("vmlinux"))
            .arg("--initrd")
            .arg(guest_file("initramfs.cpio"))
            .args(["--when-console", "tick-3", "--cmdline"])
            .arg(r#"guest_cmd="i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done""#);
        let o = common::run(cmd, BOOT_TIMEOUT);
        assert_eq!(o.code, Some(0), "snapshot create failed\n{}", o.tail());
    }
    let mut cmd = common::loft();
    cmd.arg("run").arg("--restore").arg(&dir);
    let o = common::run(cmd, Duration::from_secs(8));
    let ticks: Vec<&str> = o
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("tick-"))
        .collect();
    assert!(
        matches!(ticks.first(), Some(&"tick-4") | Some(&"tick-5")),
        "the restored loop did not go on from tick-3: {ticks:?}\n{}",
        o.tail()
    );
    assert!(
        !o.stdout.contains("Linux version"),
        "the guest booted again\n{}",
        o.tail()
    );
}

#[test]
fn a_writable_disk_serves_one_restore_at_a_time_unless_each_gets_its_own_copy() {
    let shared = disk_copy("shared.img");
    let _vms = common::in_process_vms();
    let snapshot = Snapshot::open(&agent_snapshot().dir).unwrap();
    let restore = |disk: &Path| {
        VmBuilder::new()
            .disk(disk, false)
            .restore_from(snapshot.clone())
            .start()
    };
    let first = restore(&shared).expect("first restore");
    let started = Instant::now();
    match restore(&shared) {
        Err(e @ loft::Error::Disk { .. }) => {
            let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(text.contains(shared.to_str().unwrap()), "{text}");
            assert!(text.contains("in use by another VM"), "{text}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a second restore on the same writable image was accepted"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    // With its own copy, a second restore runs beside the first, and each writes its own.
    let own = disk_copy("own.img");
    let second = restore(&own).expect("second restore on its own copy");
    for (vm, word) in [(&first, "first"), (&second, "second")] {
        let out = vm
            .exec(&ExecRequest::new([
                "/bin/sh",
                "-c",
                &format!("printf {word} > /dev/vda && sync"),
            ]))
            .unwrap();
        assert_eq!(out.status, ExitStatus::Code(0));
    }
    first.kill().unwrap();
    second.kill().unwrap();
    assert!(std::fs::read(&shared).unwrap().starts_with(b"first"));
    assert!(std::fs::read(&own).unwrap().starts_with(b"second"));
}
