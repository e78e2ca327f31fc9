//! The control API (`loft --api-sock`), driven with curl as Firecracker's users drive
//! Firecracker: its getting-started sequence boots the guest; pause, resume, exec, bad requests;
//! a snapshot made over the API loads into a fresh `loft --api-sock` process.
//!
//! The comparison of status codes with Firecracker itself runs only when `FIRECRACKER` names
//! its binary (see `same_status_codes_as_firecracker`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, guest_file, BootSlot, BOOT_TIMEOUT};
use crate::snapshot::{agent_snapshot, scratch};

/// A `loft --api-sock` process, its console in a file; killed when dropped.
struct ApiLoft {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl ApiLoft {
    fn start(name: &str) -> Self {
        common::require_kvm();
        let sock = scratch(&format!("{name}.sock"));
        let log = scratch(&format!("{name}.log"));
        let _ = std::fs::remove_file(&sock);
        let out = std::fs::File::create(&log).unwrap();
        let child = common::loft()
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start loft --api-sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no API socket: {}", read(&log));
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, sock, log }
    }

    /// curl METHOD PATH [BODY]: the status code and the body.
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.sock)
            .args(["-X", method, &format!("http://localhost{path}")])
            .args(["-H", "Content-Type: application/json"]);
        if let Some(b) = body {
            cmd.args(["--data-binary", b]);
        }
        let out = cmd
            .output()
            .expect("curl (scripts/install-deps.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn expect(&self, method: &str, path: &str, body: Option<&str>, want: u16) -> String {
        let (code, answer) = self.curl(method, path, body);
        assert_eq!(
            code,
            want,
            "{method} {path} {body:?}: {answer}\nconsole: {}",
            tail(&self.log)
        );
        answer
    }

    fn console(&self) -> String {
        read(&self.log)
    }

    fn wait_console(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.console().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} within {timeout:?}: {}",
                tail(&self.log)
            );
            assert!(
                self.child_alive(),
                "loft ended before {text:?}: {}",
                tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the process still runs (it is not reaped before the drop: a zombie has ended).
    fn child_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .is_ok_and(|s| !s.contains(") Z "))
    }

    fn ticks(&self) -> usize {
        self.console()
            .lines()
            .filter(|l| l.trim_start().starts_with("tick-"))
            .count()
    }
}

impl Drop for ApiLoft {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).to_string()
}

fn tail(p: &Path) -> String {
    let text = read(p);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The guest's command: prints `tick-N` every second.
const TICKER: &str = r#"i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done"#;

#[test]
fn getting_started_sequence_over_curl_then_pause_resume_exec_and_bad_requests() {
    let _slot = BootSlot::acquire();
    let api = ApiLoft::start("getting-started");
    let (k, i) = (guest_file("vmlinux"), guest_file("initramfs.cpio"));
    let disk = scratch("api-data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    // Wrong order, before anything is configured.
    let e = api.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        400,
    );
    assert!(e.contains("without kernel configuration"), "{e}");
    api.expect("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 400);
    let s = api.expect("GET", "/", None, 200);
    assert!(s.contains("Not started"), "{s}");

    // Firecracker's getting-started sequence.
    let boot = serde_json::json!({
        "kernel_image_path": k,
        "initrd_path": i,
        "boot_args": format!("console=ttyS0 guest_cmd=\"{TICKER}\""),
    });
    api.expect("PUT", "/boot-source", Some(&boot.to_string()), 204);
    let drive = serde_json::json!({
        "drive_id": "data", "path_on_host": disk, "is_root_device": false, "is_read_only": false,
    });
    api.expect("PUT", "/drives/data", Some(&drive.to_string()), 204);
    api.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":256}"#),
        204,
    );
    let m = api.expect("GET", "/machine-config", None, 200);
    assert!(m.contains(r#""mem_size_mib":256"#), "{m}");

    // Bad requests before the start change nothing.
    let e = api.expect(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":1,"mem_size_mib":512,"no_such_field":1}"#),
        400,
    );
    assert!(e.contains("unknown field `no_such_field`"), "{e}");
    api.expect("PUT", "/machine-config", Some(r#"{"vcpu_count": 1,"#), 400);
    api.expect("PUT", "/balloon", Some(r#"{"amount_mib":1}"#), 400);
    let big = format!(r#"{{"kernel_image_path":"{}"}}"#, "x".repeat(60_000));
    let (code, e) = api.curl("PUT", "/boot-source", Some(&big));
    assert_eq!(code, 413, "{e}");
    silent_client_times_out(&api.sock);

    api.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        204,
    );
    api.wait_console("tick-2", BOOT_TIMEOUT);
    let m = api.expect("GET", "/machine-config", None, 200);
    assert!(
        m.contains(r#""mem_size_mib":256"#),
        "the bad PUT changed it: {m}"
    );
    api.expect("PUT", "/boot-source", Some(&boot.to_string()), 400);
    api.expect(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
        400,
    );

    // Pause: the ticking stops; resume: it goes on.
    api.expect("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204);
    assert!(api.expect("GET", "/", None, 200).contains("Paused"));
    std::thread::sleep(Duration::from_secs(1));
    let n1 = api.ticks();
    std::thread::sleep(Duration::from_secs(4));
    let n2 = api.ticks();
    assert_eq!(n1, n2, "ticks while paused");
    silent_client_times_out(&api.sock);
    api.expect("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#), 204);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.ticks() <= n2 {
        assert!(Instant::now() < deadline, "no tick after resume");
        std::thread::sleep(Duration::from_millis(200));
    }

    // loft's own endpoints.
    let out = api.expect(
        "PUT",
        "/loft/exec",
        Some(r#"{"args":["/bin/sh","-c","echo out; echo err >&2; exit 3"],"timeout":120}"#),
        200,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            v["exit_code"].as_i64(),
            v["stdout"].as_str(),
            v["stderr"].as_str()
        ),
        (Some(3), Some("out\n"), Some("err\n")),
        "{out}"
    );
    let t = api.expect("GET", "/loft/boot-times", None, 200);
    assert!(t.contains("user_init"), "{t}");
    api.expect("GET", "/loft/console", None, 200);
    api.expect("PUT", "/loft/exec", Some(r#"{"args":"sh"}"#), 400);
    assert!(api.child_alive(), "{}", tail(&api.log));
}

/// A client that connects and never sends gets a 408 within the read timeout, and the API
/// answers the next client.
fn silent_client_times_out(sock: &Path) {
    let started = Instant::now();
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[test]
fn snapshot_over_the_api_loads_into_a_fresh_process() {
    let snap = agent_snapshot();
    let _slot = BootSlot::acquire();
    let marker = format!("api-marker-{}", std::process::id());
    let dir2 = scratch("api-snapshot");
    {
        let a = ApiLoft::start("snap-a");
        let load = serde_json::json!({ "snapshot_path": snap.dir, "resume_vm": true });
        a.expect("PUT", "/snapshot/load", Some(&load.to_string()), 204);
        let exec = serde_json::json!({
            "args": ["/bin/sh", "-c", format!("echo {marker} > /tmp/api-marker")],
            "timeout": 120,
        });
        a.expect("PUT", "/loft/exec", Some(&exec.to_string()), 200);
        let create = serde_json::json!({
            "snapshot_path": dir2, "mem_file_path": dir2.join("memory"),
        });
        // Firecracker's rule: only a paused VM is snapshotted.
        a.expect("PUT", "/snapshot/create", Some(&create.to_string()), 400);
        a.expect("PATCH", "/vm", Some(r#"{"state":"Paused"}"#), 204);
        a.expect("PUT", "/snapshot/create", Some(&create.to_string()), 204);
        a.expect("PUT", "/snapshot/load", Some(&load.to_string()), 400);
    }
    let b = ApiLoft::start("snap-b");
    b.expect(
        "PUT",
        "/boot-source",
        Some(&serde_json::json!({ "kernel_image_path": guest_file("vmlinux") }).to_string()),
        204,
    );
    let load = serde_json::json!({ "snapshot_path": dir2, "resume_vm": true });
    let e = b.expect("PUT", "/snapshot/load", Some(&load.to_string()), 400);
    assert!(e.contains("after configuring"), "{e}");
    drop(b);
    let c = ApiLoft::start("snap-c");
    let load = serde_json::json!({
        "snapshot_path": dir2,
        "mem_backend": { "backend_type": "File", "backend_path": dir2.join("memory") },
        "resume_vm": true,
    });
    c.expect("PUT", "/snapshot/load", Some(&load.to_string()), 204);
    assert!(c.expect("GET", "/", None, 200).contains("Running"));
    let out = c.expect(
        "PUT",
        "/loft/exec",
        Some(r#"{"args":["cat","/tmp/api-marker"],"timeout":120}"#),
        200,
    );
    assert!(out.contains(&marker), "{out}");
}

/// The same requests to Firecracker and to loft get the same status codes. Skipped, loudly,
/// without `FIRECRACKER` naming a Firecracker binary.
#[test]
fn same_status_codes_as_firecracker() {
    let Some(fc) = std::env::var_os("FIRECRACKER") else {
        eprintln!(
            "SKIPPED: same_status_codes_as_firecracker compares nothing: set FIRECRACKER to a \
             Firecracker binary"
        );
        return;
    };
    let k = guest_file("vmlinux");
    let requests: Vec<(&str, &str, Option<String>)> = vec![
        ("GET", "/", None),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#.into()),
        ),
        (
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path":"/nonexistent"}"#.into()),
        ),
        (
            "PUT",
            "/boot-source",
            Some(format!(r#"{{"kernel_image_path":"{}"}}"#, k.display())),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128}"#.into()),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":1,"mem_size_mib":128,"x":1}"#.into()),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1,"#.into()),
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":0,"mem_size_mib":128}"#.into()),
        ),
        ("GET", "/machine-config", None),
        (
            "PUT",
            "/drives/a",
            Some(r#"{"drive_id":"b","path_on_host":"/x","is_root_device":false}"#.into()),
        ),
        ("PATCH", "/vm", Some(r#"{"state":"Paused"}"#.into())),
        (
            "PUT",
            "/actions",
            Some(r#"{"action_type":"SendCtrlAltDel"}"#.into()),
        ),
        ("GET", "/nowhere", None),
    ];
    let loft = ApiLoft::start("compare-loft");
    let fc_sock = scratch("compare-fc.sock");
    let _ = std::fs::remove_file(&fc_sock);
    let mut fc_child = Command::new(&fc)
        .arg("--api-sock")
        .arg(&fc_sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start FIRECRACKER");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fc_sock.exists() {
        assert!(Instant::now() < deadline, "Firecracker made no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let fc_api = ApiLoft {
        child: Command::new("true").spawn().unwrap(),
        sock: fc_sock,
        log: scratch("compare-fc.log"),
    };
    let mut differ = Vec::new();
    for (m, p, b) in &requests {
        let (a, _) = loft.curl(m, p, b.as_deref());
        let (f, fbody) = fc_api.curl(m, p, b.as_deref());
        if a != f {
            differ.push(format!("{m} {p}: loft {a}, Firecracker {f} ({fbody})"));
        }
    }
    let _ = fc_child.kill();
    let _ = fc_child.wait();
    assert!(differ.is_empty(), "{differ:#?}");
}
