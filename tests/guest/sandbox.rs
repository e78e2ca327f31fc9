//! Sandbox essentials on a real guest: files in and out, spawned processes with stdin, signals
//! and a terminal, commands as an unprivileged user with rlimits, and the agent refusing a
//! request of another protocol version. Each test restores the shared agent snapshot
//! ([`restore_agent_snapshot`]) instead of booting.

use std::time::{Duration, Instant};

use super::snapshot::{disk_copy, restore_agent_snapshot};
use crate::common;
use loft::error::AgentError;
use loft::{ExecRequest, ExitStatus, FileError, FileType, ProcessOutput, Resource};

const MIB: usize = 1 << 20;

fn sha256_hex(data: &[u8]) -> String {
    common::host_digest("sha256sum", data)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .unwrap();
    data
}

#[test]
fn five_mib_go_in_and_out_intact_and_file_errors_are_typed() {
    let disk = disk_copy("files.img");
    let _vms = common::in_process_vms();
    let vm = restore_agent_snapshot(&disk);
    let data = random_bytes(5 * MIB);
    let want = sha256_hex(&data);
    vm.write_file("/tmp/in/data.bin", &data, 0o640).unwrap();
    let back = vm.read_file("/tmp/in/data.bin", 5 * MIB as u64).unwrap();
    assert_eq!(sha256_hex(&back), want, "the 5 MiB read back differ");
    let out = vm
        .exec(&ExecRequest::new(["sha256sum", "/tmp/in/data.bin"]))
        .unwrap();
    let guest = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        guest.split_whitespace().next(),
        Some(want.as_str()),
        "{out:?}"
    );

    let entries = vm.list_dir("/tmp/in").unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].name, "data.bin");
    assert_eq!(entries[0].size, 5 * MIB as u64);
    assert_eq!(entries[0].mode, 0o640);
    assert_eq!(entries[0].file_type, FileType::File);

    let kind = |r: Result<Vec<u8>, loft::Error>| r.unwrap_err().file_error();
    assert_eq!(
        kind(vm.read_file("/tmp/missing", 10)),
        Some(FileError::NotFound)
    );
    assert_eq!(
        kind(vm.read_file("/tmp", 10)),
        Some(FileError::IsADirectory)
    );
    assert_eq!(
        kind(vm.read_file("/tmp/in/data.bin", MIB as u64)),
        Some(FileError::TooLarge)
    );
    let e = vm.remove("/tmp/in", false).unwrap_err();
    assert_eq!(e.file_error(), Some(FileError::NotEmpty), "{e:?}");
    vm.remove("/tmp/in", true).unwrap();
    assert_eq!(
        kind(vm.read_file("/tmp/in/data.bin", 10)),
        Some(FileError::NotFound)
    );
}

/// Reads output until `want` shows up in what came (or the deadline passes).
fn read_until(p: &mut loft::Process, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    while !seen.contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {want:?} within {within:?}; got {seen:?}"
        );
        match p.read_output(Some(left)) {
            Ok(Some(ProcessOutput::Stdout(d) | ProcessOutput::Stderr(d))) => {
                seen.push_str(&String::from_utf8_lossy(&d))
            }
            Ok(None) => panic!("ended before {want:?}; got {seen:?}"),
            Err(AgentError::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
    }
    seen
}

#[test]
fn spawned_processes_take_stdin_signals_a_terminal_and_die_with_their_handle() {
    let disk = disk_copy("spawn.img");
    let _vms = common::in_process_vms();
    let vm = restore_agent_snapshot(&disk);
    let long = Duration::from_secs(60);

    // Two at once: a cat that echoes, and a sleep.
    let mut cat = vm.spawn(&ExecRequest::new(["cat"])).unwrap();
    let mut sleep = vm.spawn(&ExecRequest::new(["sleep", "100"])).unwrap();
    let mut rtts = Vec::new();
    for i in 0..6 {
        let byte = [b'a' + i];
        let t = Instant::now();
        cat.write_stdin(&byte).unwrap();
        read_until(&mut cat, std::str::from_utf8(&byte).unwrap(), long);
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // The first includes cat's own start in the guest (benches/sandbox.rs measures).
    eprintln!("1-byte stdin echo round trips, ms: {rtts:.1?}");
    cat.close_stdin().unwrap();
    assert_eq!(cat.wait_timeout(long).unwrap(), Some(ExitStatus::Code(0)));

    let t = Instant::now();
    assert_eq!(sleep.wait_timeout(Duration::from_secs(1)).unwrap(), None);
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "wait_timeout(1 s) took {waited:?}"
    );
    sleep.signal(libc::SIGTERM).unwrap();
    assert_eq!(
        sleep.wait_timeout(long).unwrap(),
        Some(ExitStatus::Signal(libc::SIGTERM))
    );

    // A terminal of the size asked, resized on request.
    let mut sh = vm
        .spawn(&ExecRequest::new(["/bin/sh"]).pty(30, 100))
        .unwrap();
    sh.write_stdin(b"tty; stty size\n").unwrap();
    let seen = read_until(&mut sh, "30 100", long);
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    sh.resize(40, 120).unwrap();
    sh.write_stdin(b"stty size\n").unwrap();
    let seen = read_until(&mut sh, "40 120", long);
    // ^D (what closing a terminal's input sends) ends the shell when it reads a new line: at
    // its prompt, not while stty runs.
    if !seen.trim_end().ends_with('#') {
        read_until(&mut sh, "# ", long);
    }
    sh.close_stdin().unwrap();
    assert_eq!(sh.wait_timeout(long).unwrap(), Some(ExitStatus::Code(0)));

    // A handle dropped kills its command; a detached one lives on.
    let killed = vm
        .spawn(&ExecRequest::shell("sleep 1; echo > /tmp/killed-lived"))
        .unwrap();
    drop(killed);
    let detached = vm
        .spawn(&ExecRequest::shell("sleep 3; echo > /tmp/detached-lived").detach())
        .unwrap();
    drop(detached);
    let deadline = Instant::now() + long;
    while vm.read_file("/tmp/detached-lived", 10).is_err() {
        assert!(
            Instant::now() < deadline,
            "the detached command did not finish"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let e = vm.read_file("/tmp/killed-lived", 10).unwrap_err();
    assert_eq!(e.file_error(), Some(FileError::NotFound), "{e:?}");

    let missing = vm
        .spawn(&ExecRequest::new(["/no/such/program"]))
        .unwrap_err();
    assert!(
        matches!(&missing, loft::Error::Agent(e) if e.is_not_found()),
        "{missing:?}"
    );
}

#[test]
fn an_unprivileged_user_cannot_write_root_s_files_and_rlimits_hold() {
    let disk = disk_copy("user.img");
    let _vms = common::in_process_vms();
    let vm = restore_agent_snapshot(&disk);
    let out = vm
        .exec(
            &ExecRequest::shell(
                "id -u; id -g; echo x > /home/loft/ok && echo home-ok; echo x > /root/no",
            )
            .user(1000, 1000),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, "1000\n1000\nhome-ok\n", "{out:?}");
    assert_ne!(out.status, ExitStatus::Code(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    let open_fd9 = ExecRequest::shell("exec 9</dev/null && echo opened");
    let free = vm.exec(&open_fd9).unwrap();
    assert_eq!(free.stdout, b"opened\n", "{free:?}");
    let limited = vm
        .exec(&open_fd9.clone().rlimit(Resource::OpenFiles, 8, 8))
        .unwrap();
    assert_ne!(limited.status, ExitStatus::Code(0), "{limited:?}");
    assert!(limited.stdout.is_empty(), "{limited:?}");
    let shown = vm
        .exec(
            &ExecRequest::shell("ulimit -n")
                .rlimit(Resource::OpenFiles, 8, 8)
                .user(1000, 1000),
        )
        .unwrap();
    assert_eq!(shown.stdout, b"8\n", "{shown:?}");
}

#[test]
fn the_agent_refuses_a_request_of_a_newer_protocol_version() {
    use std::io::{Read, Write};
    let disk = disk_copy("version.img");
    let uds = super::snapshot::scratch("version.vsock");
    let _ = std::fs::remove_file(&uds);
    let _vms = common::in_process_vms();
    let vm = loft::VmBuilder::new()
        .disk(&disk, false)
        .vsock(loft::AGENT_CID, &uds)
        .capture_console()
        .restore_from(loft::Snapshot::open(&super::snapshot::agent_snapshot().dir).unwrap())
        .start()
        .expect("restore");
    vm.wait_for_agent().unwrap();
    let mut s =
        loft_agent::client::connect(&uds, loft::AGENT_PORT, Some(Duration::from_secs(60))).unwrap();
    // A ListDir frame of the next version.
    let mut frame = vec![0x07, 2, 0, 0, 0];
    frame.extend_from_slice(&[loft_agent::PROTOCOL_VERSION + 1, 0]);
    s.write_all(&frame).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(answer.first(), Some(&0x85), "an Error frame: {text:?}");
    assert_eq!(&answer[5..9], &loft_agent::EPROTO.to_le_bytes(), "{text:?}");
    assert!(text.contains("protocol version mismatch"), "{text:?}");
    assert!(
        text.contains(&format!("version {}", loft_agent::PROTOCOL_VERSION + 1)),
        "{text:?}"
    );
}

fn restore_cli(disk: &std::path::Path) -> std::process::Command {
    let mut cmd = common::loft();
    cmd.arg("run")
        .arg("--restore")
        .arg(&super::snapshot::agent_snapshot().dir)
        .arg("--disk")
        .arg(disk);
    cmd
}

#[test]
fn cli_copies_files_in_before_and_out_after_the_command() {
    let disk = disk_copy("cli-copy.img");
    let input = super::snapshot::scratch("cli-in.bin");
    let output = super::snapshot::scratch("cli-out.bin");
    let data = random_bytes(MIB + 12345);
    std::fs::write(&input, &data).unwrap();
    let _ = std::fs::remove_file(&output);
    let mut cmd = restore_cli(&disk);
    cmd.arg("--copy-in")
        .arg(format!("{}:/tmp/w/in.bin", input.display()))
        .arg("--copy-out")
        .arg(format!("/tmp/w/out.bin:{}", output.display()))
        .args([
            "--",
            "/bin/sh",
            "-c",
            "sha256sum /tmp/w/in.bin; cp /tmp/w/in.bin /tmp/w/out.bin; exit 3",
        ]);
    let o = common::run(cmd, Duration::from_secs(120));
    assert_eq!(o.code, Some(3), "{}", o.tail());
    assert!(o.stdout.starts_with(&sha256_hex(&data)), "{}", o.tail());
    assert!(
        std::fs::read(&output).unwrap() == data,
        "the copied-out file differs"
    );

    // A guest file that is not there: one error line naming it, exit 1, no host file.
    let missing = super::snapshot::scratch("cli-missing.bin");
    let mut cmd = restore_cli(&disk);
    cmd.arg("--copy-out")
        .arg(format!("/tmp/nothing-here:{}", missing.display()))
        .args(["--", "true"]);
    let o = common::run(cmd, Duration::from_secs(120));
    assert_eq!(o.code, Some(1), "{}", o.tail());
    let last = o.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("loft: error: "), "{}", o.tail());
    assert!(
        last.contains("/tmp/nothing-here") && last.contains("No such file"),
        "{last}"
    );
    assert!(!missing.exists());
}

/// A tmux session, killed when dropped.
struct Tmux(String);

impl Tmux {
    fn pane(&self) -> String {
        let out = std::process::Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_for(&self, what: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.pane().lines().any(|l| l.contains(what)) {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in:\n{}",
                self.pane()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn keys(&self, keys: &[&str]) {
        let ok = std::process::Command::new("tmux")
            .args(["send-keys", "-t", &self.0])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(ok.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .status();
    }
}

#[test]
fn cli_it_gives_an_interactive_shell_and_restores_the_terminal() {
    let disk = disk_copy("cli-it.img");
    let dir = super::snapshot::scratch("tty");
    std::fs::create_dir_all(&dir).unwrap();
    let loft = env!("CARGO_BIN_EXE_loft");
    let script = format!(
        "cd {dir}; stty -g > before; '{loft}' run --restore {snap} --disk {disk} -it -- /bin/sh; \
         echo EXITED-$?; stty -g > after; sleep 600",
        dir = dir.display(),
        snap = super::snapshot::agent_snapshot().dir.display(),
        disk = disk.display(),
    );
    let session = Tmux(format!("loft-test-{}", std::process::id()));
    let started = std::process::Command::new("tmux")
        .args([
            "new-session",
            "-d",
            "-x",
            "100",
            "-y",
            "30",
            "-s",
            &session.0,
            &script,
        ])
        .status()
        .expect("tmux (scripts/install-deps.sh installs it)");
    assert!(started.success());
    let long = Duration::from_secs(120);
    // The guest shell's prompt, on a terminal of the pane's size.
    session.wait_for("/ #", long);
    session.keys(&["stty size; echo typed-$((6*7))", "Enter"]);
    session.wait_for("typed-42", long);
    assert!(session.pane().contains("30 100"), "{}", session.pane());
    session.keys(&["C-d"]);
    session.wait_for("EXITED-0", long);
    let (before, after) = (dir.join("before"), dir.join("after"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !after.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        std::fs::read_to_string(&before).unwrap(),
        std::fs::read_to_string(&after).unwrap(),
        "the terminal's settings after loft run -it differ from before"
    );
}
