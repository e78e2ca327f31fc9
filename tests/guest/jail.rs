//! `loft run --jail`: once the VM is built, loft runs as the jail's uid and gid, with no
//! capabilities, `no_new_privs`, and an empty root of its own, on every thread; the guest still
//! boots, its agent still runs commands (through the vsock socket bound into the jail), and
//! nothing is left behind in the temporary directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common;

const NOBODY: &str = "65534";

/// `key:` of a /proc status file, its words.
fn field<'a>(status: &'a str, key: &str) -> Vec<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
        .split_whitespace()
        .collect()
}

/// Asserts every thread of `pid` is jailed: the ids, no capabilities, `no_new_privs`, and
/// under a seccomp filter.
fn assert_jailed(pid: u32) {
    let mut tasks = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue; // ended meanwhile
        };
        let name = field(&status, "Name").join(" ");
        let what = format!("thread {name} ({})\n{status}", t.display());
        assert_eq!(field(&status, "Uid"), [NOBODY; 4], "{what}");
        assert_eq!(field(&status, "Gid"), [NOBODY; 4], "{what}");
        assert_eq!(field(&status, "Groups"), Vec::<&str>::new(), "{what}");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            let v = field(&status, cap);
            assert!(v[0].bytes().all(|b| b == b'0'), "{cap}: {what}");
        }
        assert_eq!(field(&status, "NoNewPrivs"), ["1"], "{what}");
        assert_eq!(field(&status, "Seccomp"), ["2"], "{what}");
        tasks += 1;
    }
    assert!(tasks >= 4, "only {tasks} threads in loft");
}

/// What loft `pid` made in the temporary directory (its sockets' directory, its jail).
fn leftovers(pid: u32) -> Vec<PathBuf> {
    let prefixes = [format!("loft-{pid}-"), format!("loft-jail-{pid}-")];
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().to_string_lossy().into_owned();
            prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
                .then(|| e.path())
        })
        .collect()
}

/// The root of `pid` as the host sees it: the jail directory's path, not `/`.
fn root_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/root")).unwrap()
}

/// One boot: a command through the agent, jailed. While it runs, every thread is checked;
/// its output and exit code come back; the jail directory is gone at once, and the sockets'
/// directory when loft ends.
#[test]
fn a_jailed_loft_runs_commands_as_nobody_without_capabilities_or_the_hosts_root() {
    common::require_kvm();
    let _slot = common::BootSlot::acquire();
    let mut child = common::loft()
        .args(["run", "--jail", "--uid", NOBODY, "--gid", NOBODY, "--"])
        .args(["/bin/sh", "-c", "echo hi; sleep 8; echo bye; exit 3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    while line.is_empty() {
        if out.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            let _ = child.kill();
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("jailed loft ended before its command ran: {err}");
        }
    }
    assert_eq!(line, "hi\n");

    assert_jailed(pid);
    let root = root_of(pid);
    assert_ne!(root, Path::new("/"), "loft still has the host's root");
    assert!(
        root.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("loft-jail-"),
        "{root:?}"
    );
    assert!(!root.exists(), "the jail directory {root:?} was left");

    // The command goes on, and its code is loft's.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(rest, "bye\n", "{err}");
    assert_eq!(status.code(), Some(3), "{err}");
    assert_eq!(leftovers(pid), Vec::<PathBuf>::new());
}

/// One boot with the console on stdout and `--jail-dir`: the guest reaches user space, the
/// process's root is that directory, which is left in place, empty.
#[test]
fn a_jailed_console_boot_reaches_user_space_in_the_given_jail_dir() {
    common::require_kvm();
    let dir = std::env::temp_dir().join(format!("loft-jailtest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _slot = common::BootSlot::acquire();
    let mut child = common::loft()
        .args([
            "run",
            "--jail",
            "--uid",
            NOBODY,
            "--gid",
            NOBODY,
            "--jail-dir",
        ])
        .arg(&dir)
        .args(["--cmdline", r#"guest_cmd="sleep 600""#])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = Instant::now() + common::BOOT_TIMEOUT;
    while !line.contains("GUEST-INIT-READY") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            let _ = child.kill();
            panic!("jailed guest did not reach user space: {:?}", child.wait());
        }
    }
    assert_jailed(pid);
    assert_eq!(root_of(pid), std::fs::canonicalize(&dir).unwrap());

    // SAFETY: a signal to our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    // Drained, so that loft never waits on a full pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "jailed loft did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = drain.join();
    assert!(dir.is_dir(), "--jail-dir must be left in place");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{dir:?}");
    std::fs::remove_dir(&dir).unwrap();
    assert_eq!(leftovers(pid), Vec::<PathBuf>::new());
}

/// A restore (of the suite's shared agent snapshot) runs jailed too: the snapshot's memory
/// file and state are read before the jail, and the post-restore sync needs no file.
#[test]
fn a_jailed_restore_runs_commands() {
    use crate::snapshot::{agent_snapshot, disk_copy};
    common::require_kvm();
    let disk = disk_copy("jail-restore.img");
    let mut cmd = common::loft();
    cmd.arg("run")
        .arg("--restore")
        .arg(&agent_snapshot().dir)
        .arg("--disk")
        .arg(&disk)
        .args(["--jail", "--uid", NOBODY, "--gid", NOBODY, "--"])
        .args(["/bin/sh", "-c", "echo restored; exit 4"]);
    let o = common::run(cmd, Duration::from_secs(120));
    assert_eq!(o.stdout, "restored\n", "{}", o.tail());
    assert_eq!(o.code, Some(4), "{}", o.tail());
}
