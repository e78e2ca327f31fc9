//! Shared helpers for tests that run the `loft` binary and boot real guests.
#![allow(dead_code)]

pub mod host;
pub mod netns;
pub mod tiny_kernel;

pub use host::*;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How many guests may boot at once in one test binary (tests/guest holds every test that boots
/// a Linux guest): the machines here have 2 cores, and a boot keeps one busy.
const MAX_CONCURRENT_BOOTS: usize = 2;

static SLOTS: Mutex<usize> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

/// Holds one of the boot slots while alive.
pub struct BootSlot;

impl BootSlot {
    pub fn acquire() -> Self {
        let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= MAX_CONCURRENT_BOOTS {
            used = SLOT_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        BootSlot
    }
}

impl Drop for BootSlot {
    fn drop(&mut self) {
        *SLOTS.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        SLOT_FREED.notify_one();
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The guest to boot: `LOFT_GUEST_DIR`, else the one `firmware/build.sh` built, else the
/// prebuilt one in `../shared/guest`. Panics with what to do when there is none.
pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOFT_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let candidates = [
        repo_root().join("target/guest"),
        repo_root().join("../shared/guest"),
    ];
    for dir in &candidates {
        if dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file() {
            return dir.clone();
        }
    }
    panic!(
        "no guest to boot: looked in {:?}; run firmware/build.sh (or set LOFT_GUEST_DIR)",
        candidates
    );
}

pub fn guest_file(name: &str) -> PathBuf {
    let p = guest_dir().join(name);
    assert!(p.is_file(), "guest file {} is missing", p.display());
    p
}

/// What a finished `loft` run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Outcome {
    /// Asserts the run ended by itself with exit status 0.
    pub fn assert_clean_exit(&self) {
        assert!(
            !self.timed_out,
            "loft timed out after {:?}\n{}",
            self.elapsed,
            self.tail()
        );
        assert_eq!(self.code, Some(0), "loft failed\n{}", self.tail());
    }

    /// The end of both streams, for failure messages.
    pub fn tail(&self) -> String {
        let last = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- stdout (tail) ---\n{}\n--- stderr ---\n{}",
            last(&self.stdout),
            last(&self.stderr)
        )
    }

    /// The value of `key=` on the first stdout line that has it.
    pub fn field(&self, key: &str) -> Option<String> {
        self.stdout.lines().find_map(|l| {
            let at = l.find(key)?;
            let rest = &l[at + key.len()..];
            Some(rest.split_whitespace().next().unwrap_or("").to_string())
        })
    }
}

/// Asserts a clean failure: non-zero exit, exactly one stderr line, which mentions every needle.
pub fn assert_one_line_error(o: &Outcome, needles: &[&str]) {
    assert!(!o.timed_out, "loft hung on bad input\n{}", o.tail());
    assert_ne!(o.code, Some(0), "bad input must fail\n{}", o.tail());
    assert!(o.code.is_some(), "loft died from a signal\n{}", o.tail());
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line, got:\n{}",
        o.stderr
    );
    let line = lines[0];
    assert!(line.starts_with("loft: error: "), "unexpected line: {line}");
    for n in needles {
        assert!(
            line.contains(n),
            "error line {line:?} does not mention {n:?}"
        );
    }
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(
            !o.stderr.contains(bad),
            "panic text in stderr: {}",
            o.stderr
        );
    }
    assert!(
        o.stdout.is_empty(),
        "nothing should reach the console: {}",
        o.stdout
    );
}

/// The digest `tool` (`md5sum`, `sha256sum`: the guest's busybox has both) prints for `data`,
/// computed by the host's tool.
pub fn host_digest(tool: &str, data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(tool)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {tool} on the host: {e}"));
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{tool} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

pub fn loft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loft"));
    c.env("LOFT_LOG", "info");
    c
}

/// Runs `cmd` with no stdin, capturing its output, killing it after `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loft");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for loft") {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for killed loft");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// Boots the guest with `args` (after `run`), holding a boot slot.
pub fn boot(args: &[&str], timeout: Duration) -> Outcome {
    require_kvm();
    let _slot = BootSlot::acquire();
    let mut cmd = loft();
    cmd.arg("run").args(args);
    run(cmd, timeout)
}

/// Generous: a boot to user space takes 15–60 s on the nested kvm_pvm hosts used here, more
/// under load, and the bzImage decompressor adds ~30 s there.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
