//! Stopping a VM whose guest keeps its disk busy: `dd` of 2000 MiB onto a 2 GiB sparse image
//! on the host's real filesystem. Disk requests run on the disk's own `loft-blkN` thread, never
//! on the event loop, so a stop (`VmHandle::kill`, SIGTERM to `loft run`) must end the VM
//! within a second whatever the disk is doing; a worker inside one long `pwrite` or
//! `fdatasync` is left to end on its own.
//!
//! One boot (minutes here) makes a snapshot of the idle guest, then kills its `dd`; the other
//! runs restore that snapshot (milliseconds) over fresh sparse images: a few more library
//! kills, and a few SIGTERMs to `loft run --restore`. Every latency is printed; the assertion
//! allows [`STOP_BOUND`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::{self, guest_file, BootSlot, BOOT_TIMEOUT};
use loft::{ExecRequest, Snapshot, StopReason, VmBuilder, VmHandle};

const DISK_LEN: u64 = 2 << 30;
/// What the guest must have written to the image before the stop: the disk is busy then. Data
/// moves slowly within a guest on the nested kvm_pvm hosts used here (from a few MiB/s down to
/// well under 1 MiB/s when the machine is busy), hence not more.
const LOADED: u64 = 8 << 20;
/// The stop must take less than a second; the test allows a little more for a loaded host
/// (the figures measured are printed).
const STOP_BOUND: Duration = Duration::from_millis(1500);
/// Restored runs measured per interface.
const RUNS: usize = 2;
/// Every write goes to the device at once (O_DIRECT), and the last one is flushed.
const DD: &str = "dd if=/dev/zero of=/dev/vda bs=1M count=2000 oflag=direct conv=fsync";

/// A directory under the target dir (the host's real filesystem, not a tmpfs), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("loft-disk-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A fresh 2 GiB sparse image.
    fn image(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(DISK_LEN).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes of the image the host filesystem has allocated: what the guest has written so far.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Waits until the guest has written [`LOADED`] bytes to `image`; `gone` says whether the VM
/// ended early (then the test fails with `why()`).
fn wait_for_load(image: &Path, gone: &mut dyn FnMut() -> bool, why: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while allocated(image) < LOADED {
        assert!(!gone(), "the VM ended before its dd got going\n{}", why());
        assert!(
            Instant::now() < deadline,
            "the guest wrote only {} MiB in 10 minutes\n{}",
            allocated(image) >> 20,
            why()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn console_tail(vm: &VmHandle) -> String {
    let out = String::from_utf8_lossy(&vm.console_output()).into_owned();
    let tail: Vec<char> = out.chars().rev().take(3000).collect();
    tail.into_iter().rev().collect()
}

/// Runs the guest's `dd` through the agent on a thread of `scope`, waits until it has written
/// [`LOADED`] bytes, kills the VM and returns how long `kill` took.
fn kill_under_load(vm: &VmHandle, image: &Path) -> Duration {
    std::thread::scope(|s| {
        let dd = s.spawn(|| vm.exec(&ExecRequest::new(["/bin/sh", "-c", DD])));
        // Should the test fail, the VM stops, its exec returns and the scope can end.
        let _stop = StopOnDrop(vm);
        wait_for_load(image, &mut || vm.is_finished(), &|| console_tail(vm));
        let written = allocated(image);
        let started = Instant::now();
        let reason = vm.kill();
        let took = started.elapsed();
        assert_eq!(reason.unwrap(), StopReason::Stopped, "{}", console_tail(vm));
        eprintln!(
            "disk load: VmHandle::kill() with {} MiB written took {took:?}",
            written >> 20
        );
        // The agent's connection ends with the VM.
        let _ = dd.join().unwrap();
        took
    })
}

struct StopOnDrop<'a>(&'a VmHandle);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// `loft run --restore SNAPSHOT --disk IMAGE -- sh -c DD`, its output to the test's.
fn cli_restore(snapshot: &Path, image: &Path) -> Child {
    common::loft()
        .arg("run")
        .arg("--restore")
        .arg(snapshot)
        .arg("--disk")
        .arg(image)
        .args(["--", "/bin/sh", "-c", DD])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// SIGTERMs `child` once its guest has written [`LOADED`] bytes; returns how long it took to
/// exit.
fn sigterm_under_load(child: Child, image: &Path) -> Duration {
    /// Kills the child should the test fail.
    struct Reaped(Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut reaped = Reaped(child);
    let child = &mut reaped.0;
    wait_for_load(image, &mut || child.try_wait().unwrap().is_some(), &|| {
        String::from("(loft's stderr is above)")
    });
    let written = allocated(image);
    let started = Instant::now();
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let deadline = started + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loft run was still running 30 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = started.elapsed();
    eprintln!(
        "disk load: loft run exited ({status}) {took:?} after SIGTERM with {} MiB written",
        written >> 20
    );
    took
}

fn summary(what: &str, times: &[Duration]) {
    let ms: Vec<String> = times
        .iter()
        .map(|t| format!("{:.0}", t.as_secs_f64() * 1000.0))
        .collect();
    eprintln!(
        "disk load: {what} stop latencies (ms): {}; max {:?}",
        ms.join(", "),
        times.iter().max().unwrap()
    );
}

#[test]
fn a_vm_with_a_busy_disk_stops_within_a_second() {
    common::require_kvm();
    let scratch = Scratch::new();
    let snapshot = scratch.0.join("snapshot");

    // The boot: an idle guest's snapshot, then a kill under load.
    let booted = {
        let _slot = BootSlot::acquire();
        let _vms = common::in_process_vms();
        let image = scratch.image("boot.img");
        let vm = VmBuilder::new()
            .kernel(guest_file("vmlinux"))
            .initrd(guest_file("initramfs.cpio"))
            .disk(&image, false)
            // The boot alone can take minutes on a busy 2-core host.
            .agent_timeout(2 * BOOT_TIMEOUT)
            .capture_console()
            .start()
            .expect("boot");
        vm.wait_for_agent()
            .unwrap_or_else(|e| panic!("no agent: {e}\n{}", console_tail(&vm)));
        vm.snapshot(&snapshot).expect("snapshot of the idle guest");
        kill_under_load(&vm, &image)
    };

    // Restores: more kills through the library, then SIGTERMs to `loft run`.
    let mut kills = vec![booted];
    {
        let _vms = common::in_process_vms();
        for i in 0..RUNS {
            let image = scratch.image(&format!("lib{i}.img"));
            let vm = VmBuilder::new()
                .disk(&image, false)
                .capture_console()
                .restore_from(Snapshot::open(&snapshot).unwrap())
                .start()
                .expect("restore");
            kills.push(kill_under_load(&vm, &image));
        }
    }
    let mut sigterms = Vec::new();
    for i in 0..RUNS {
        let image = scratch.image(&format!("cli{i}.img"));
        sigterms.push(sigterm_under_load(cli_restore(&snapshot, &image), &image));
    }
    summary("VmHandle::kill()", &kills);
    summary("SIGTERM to loft run", &sigterms);
    for t in kills.iter().chain(&sigterms) {
        assert!(
            *t < STOP_BOUND,
            "a stop under disk load took {t:?} (bound {STOP_BOUND:?})"
        );
    }
}
