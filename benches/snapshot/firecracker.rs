//! Firecracker's snapshot load, beside loft's restore: the same guest, snapshotted at the same
//! point (its first `tick` line), restored with `PUT /snapshot/load` and `resume_vm: true`.
//!
//! Tried here with Firecracker v1.17.0-dev built from source (`cargo build --release -p
//! firecracker`, glibc target: its build then installs no seccomp filter of its own). It
//! follows Firecracker's documented API (`PATCH /vm` to pause, `PUT /snapshot/create` with
//! `snapshot_path` and `mem_file_path`, `PUT /snapshot/load` with a `File` memory backend).
//! The bench runs it only when `FIRECRACKER` names a binary, and says so loudly when it does
//! not.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fc_api::request;
use crate::measure::SpawnHook;
use crate::report::Setup;
use crate::{on_disk, tick, vm};

/// A Firecracker snapshot: its state and memory files.
#[derive(Clone, Debug)]
pub struct FcSnapshot {
    pub state: PathBuf,
    pub memory: PathBuf,
    /// Spawn → the snapshot written (a boot to the marker, then the save).
    pub create_ms: f64,
}

/// What the guest boots with.
pub struct Guest<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: String,
    pub mem_mib: u64,
}

/// Boots `guest` in Firecracker (config file, API socket kept for the snapshot), waits for
/// `marker` on its serial console, pauses it and snapshots it into `dir`. Firecracker's
/// output goes to `log`.
pub fn take(
    fc: &Path,
    guest: &Guest,
    dir: &Path,
    marker: &str,
    timeout: Duration,
    log: &Path,
) -> Result<FcSnapshot, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let config = json!({
        "boot-source": {
            "kernel_image_path": guest.kernel,
            "initrd_path": guest.initrd,
            "boot_args": guest.cmdline,
        },
        "drives": [],
        "machine-config": { "vcpu_count": 1, "mem_size_mib": guest.mem_mib, "smt": false },
    });
    let cfg = dir.join("config.json");
    std::fs::write(&cfg, serde_json::to_vec_pretty(&config).expect("json"))
        .map_err(|e| format!("cannot write {}: {e}", cfg.display()))?;
    let sock = dir.join("api.sock");
    let snap = FcSnapshot {
        state: dir.join("state"),
        memory: dir.join("memory"),
        create_ms: 0.0,
    };

    let t0 = Instant::now();
    let mut child = Command::new(fc)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        // Firecracker registers its stdin with epoll, which /dev/null refuses
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", fc.display()))?;
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let (seen_tx, seen_rx) = mpsc::channel::<()>();
    let mut stdout = child.stdout.take().expect("piped");
    let reader = {
        let out = out.clone();
        let marker = marker.as_bytes().to_vec();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            let mut told = false;
            while let Ok(n) = stdout.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                o.extend_from_slice(&chunk[..n]);
                if !told && o.windows(marker.len()).any(|w| w == marker) {
                    told = true;
                    let _ = seen_tx.send(());
                }
            }
        })
    };
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });

    let result = (|| {
        seen_rx
            .recv_timeout(timeout)
            .map_err(|_| format!("no {marker:?} on the console within {timeout:?}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        request(
            &sock,
            "PATCH",
            "/vm",
            &json!({ "state": "Paused" }),
            deadline,
        )?;
        request(
            &sock,
            "PUT",
            "/snapshot/create",
            &json!({
                "snapshot_type": "Full",
                "snapshot_path": snap.state,
                "mem_file_path": snap.memory,
            }),
            deadline + Duration::from_secs(60),
        )
    })();
    let create_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let mut text = format!(
        "$ {} --api-sock … --config-file {}\n",
        fc.display(),
        cfg.display()
    );
    text.push_str("==== stdout\n");
    text.push_str(&String::from_utf8_lossy(
        &out.lock().unwrap_or_else(|e| e.into_inner()),
    ));
    text.push_str("\n==== stderr\n");
    text.push_str(&String::from_utf8_lossy(
        &err_reader.join().unwrap_or_default(),
    ));
    let _ = std::fs::write(log, text);
    let _ = std::fs::remove_file(&sock);
    result?;
    Ok(FcSnapshot { create_ms, ..snap })
}

/// One load run: `firecracker --api-sock SOCK`, and the hook that loads `snap` through the
/// socket and resumes the guest as soon as Firecracker listens.
pub fn load(fc: &Path, snap: &FcSnapshot, sock: &Path) -> (Command, SpawnHook) {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(fc);
    // Its log lines would be the first bytes on stdout: the guest's first byte is what counts.
    cmd.arg("--api-sock").arg(sock).args(["--level", "Off"]);
    let body = json!({
        "snapshot_path": snap.state,
        "mem_backend": { "backend_type": "File", "backend_path": snap.memory },
        "resume_vm": true,
    });
    let sock = sock.to_path_buf();
    let hook: SpawnHook = Box::new(move |_pid| {
        let deadline = Instant::now() + Duration::from_secs(30);
        request(&sock, "PUT", "/snapshot/load", &body, deadline)
    });
    (cmd, hook)
}

/// The Firecracker runner's snapshot: what taking it gave (for the report), and the binary and
/// snapshot to load, or why there are none.
pub struct Prepared {
    pub setup: Setup,
    pub snapshot: Result<(PathBuf, FcSnapshot), String>,
}

/// Takes the Firecracker runner's snapshot of the ticking guest in `guest_dir` into
/// `work/fc-tick`, when `FIRECRACKER` names a binary (`None` otherwise).
pub fn prepare(
    name: &str,
    guest_dir: &Path,
    work: &Path,
    logs: &Path,
    timeout: Duration,
) -> Option<Prepared> {
    let fc = PathBuf::from(std::env::var_os("FIRECRACKER").filter(|v| !v.is_empty())?);
    let guest = Guest {
        kernel: &guest_dir.join("vmlinux"),
        initrd: &guest_dir.join("initramfs.cpio"),
        cmdline: format!("{} guest_cmd=\"{}\"", vm::guest_cmdline(), tick::TICK_CMD),
        mem_mib: vm::GUEST_MEM_MIB,
    };
    let taken = take(
        &fc,
        &guest,
        &work.join("fc-tick"),
        tick::TICK_MARKER,
        timeout,
        &logs.join("firecracker-create.log"),
    );
    let setup = Setup {
        name: format!("{name} snapshot"),
        command: format!(
            "{} --api-sock … --config-file …, PATCH /vm Paused, PUT /snapshot/create",
            fc.display()
        ),
        ok: taken.is_ok(),
        create_ms: taken.as_ref().ok().map(|s| s.create_ms),
        memory_on_disk_bytes: taken.as_ref().ok().and_then(|s| on_disk(&s.memory)),
        error: taken.as_ref().err().cloned(),
    };
    Some(Prepared {
        setup,
        snapshot: taken.map(|snap| (fc, snap)),
    })
}

/// What the report says about the runner named `name`.
pub fn note(name: &str) -> String {
    format!(
        "{name}: Firecracker booted with --config-file and an API socket, paused by PATCH /vm \
         and saved by PUT /snapshot/create when its console printed '{}'; each run spawns \
         `firecracker --api-sock SOCK --level Off` (no log lines on stdout: its first byte is \
         the guest's) and sends PUT /snapshot/load with resume_vm: true as soon as the socket \
         accepts",
        tick::TICK_MARKER
    )
}
