//! What the agent does to the guest on a `Sync` request (after a snapshot restore): set the
//! wall clock, reseed the kernel RNG, store the clone id. The protocol side is [`SyncRequest`];
//! the order of the steps and the answer are described in [the crate's docs](crate).
//!
//! The steps go through [`SyncOps`], so that the connection handler can be tested with a fake:
//! a test must not set the test machine's clock or feed its RNG. The binary uses
//! [`LinuxGuest`], which needs root (`CAP_SYS_TIME`, `CAP_SYS_ADMIN`).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Frame, SyncRequest, MAX_SYNC_ENTROPY};

/// The directory the clone id is stored in.
pub const RUN_DIR: &str = "/run/loft";
/// The clone id's file in [`RUN_DIR`]: the id and a newline, absent when the latest `Sync`
/// had no id.
pub const CLONE_ID_FILE: &str = "clone-id";

/// The side effects of a `Sync`, one method per step. Each returns the OS error that made it
/// fail.
pub trait SyncOps: Send + Sync {
    /// Sets `CLOCK_REALTIME` to `realtime` since the Unix epoch.
    fn set_clock(&self, realtime: Duration) -> io::Result<()>;
    /// Adds `entropy` to the kernel's input pool, credited as 8 bits per byte.
    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()>;
    /// Makes the kernel's CRNG reseed from its input pool now.
    fn reseed(&self) -> io::Result<()>;
    /// Stores the clone id for guest programs to read, or removes the stored one (`None`).
    fn set_clone_id(&self, clone_id: Option<&str>) -> io::Result<()>;
}

/// The steps of a `Sync`, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Clock,
    Entropy,
    Reseed,
    CloneId,
}

impl Step {
    const ALL: [Step; 4] = [Step::Clock, Step::Entropy, Step::Reseed, Step::CloneId];

    fn what(self) -> &'static str {
        match self {
            Step::Clock => "set the clock",
            Step::Entropy => "add entropy",
            Step::Reseed => "reseed the RNG",
            Step::CloneId => "store the clone id",
        }
    }

    fn run(self, req: &SyncRequest, ops: &dyn SyncOps) -> io::Result<()> {
        match self {
            Step::Clock => ops.set_clock(req.realtime),
            Step::Entropy => ops.add_entropy(&req.entropy),
            Step::Reseed => ops.reseed(),
            Step::CloneId => ops.set_clone_id(req.clone_id.as_deref()),
        }
    }
}

/// Two `Sync`s at once run one after the other (their clone ids cannot interleave).
static SYNC_LOCK: Mutex<()> = Mutex::new(());

/// Runs every step of `req` (a failed step does not stop the later ones) and returns the
/// answer: `Synced`, or `Error` with the errno of the first failed step (0 if it had none) and
/// a message naming every failed step.
pub fn apply(req: &SyncRequest, ops: &dyn SyncOps) -> Frame {
    let _serial = match SYNC_LOCK.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut errno = None;
    let mut failed = Vec::new();
    for step in Step::ALL {
        if let Err(e) = step.run(req, ops) {
            errno.get_or_insert(e.raw_os_error().unwrap_or(0));
            failed.push(format!("cannot {}: {e}", step.what()));
        }
    }
    match errno {
        None => Frame::Synced,
        Some(errno) => Frame::Error {
            errno,
            message: format!("sync failed: {}", failed.join("; ")),
        },
    }
}

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])`: add bytes to the input pool and credit them.
/// The generic ioctl encoding (x86, arm, riscv): direction (write = 1) << 30, argument size
/// << 16, type << 8, number.
const RNDADDENTROPY: u32 = (1 << 30) | (8 << 16) | ((b'R' as u32) << 8) | 0x03;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`: reseed the CRNG from the input pool (Linux 4.17+).
const RNDRESEEDCRNG: u32 = ((b'R' as u32) << 8) | 0x07;

/// `struct rand_pool_info` with room for the largest entropy a `Sync` carries: the kernel
/// reads the two counts, then `buf_size` bytes of `buf`.
#[repr(C)]
struct RandPoolInfo {
    /// Bits of entropy to credit.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; MAX_SYNC_ENTROPY],
}

/// The real steps, for the agent running as root in a Linux guest.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    run_dir: PathBuf,
}

impl Default for LinuxGuest {
    fn default() -> Self {
        LinuxGuest {
            run_dir: PathBuf::from(RUN_DIR),
        }
    }
}

impl LinuxGuest {
    /// Stores the clone id in `run_dir` instead of [`RUN_DIR`].
    pub fn with_run_dir(run_dir: impl Into<PathBuf>) -> Self {
        LinuxGuest {
            run_dir: run_dir.into(),
        }
    }

    /// Where the clone id is stored.
    pub fn clone_id_path(&self) -> PathBuf {
        self.run_dir.join(CLONE_ID_FILE)
    }
}

fn urandom() -> io::Result<File> {
    // The RND ioctls check CAP_SYS_ADMIN, not how the device was opened.
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/urandom")
}

/// A raw system call's result: the error in `errno` when it returned -1, else the value.
/// Allocates nothing, so it may run between fork and exec.
pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn einval(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

impl SyncOps for LinuxGuest {
    fn set_clock(&self, realtime: Duration) -> io::Result<()> {
        let tv_sec = libc::time_t::try_from(realtime.as_secs())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let ts = libc::timespec {
            tv_sec,
            // Below 1e9: fits any c_long.
            tv_nsec: realtime.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `ts` is a valid timespec that outlives the call; clock_settime only reads it.
        check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
    }

    fn add_entropy(&self, entropy: &[u8]) -> io::Result<()> {
        let n = entropy.len();
        if n > MAX_SYNC_ENTROPY {
            return Err(einval("too much entropy"));
        }
        let mut info = RandPoolInfo {
            // At most 4096 bits: fits.
            entropy_count: (n * 8) as libc::c_int,
            buf_size: n as libc::c_int,
            buf: [0; MAX_SYNC_ENTROPY],
        };
        info.buf[..n].copy_from_slice(entropy);
        let dev = urandom()?;
        // SAFETY: RNDADDENTROPY reads a `struct rand_pool_info` (RandPoolInfo has its layout)
        // and then `buf_size` <= MAX_SYNC_ENTROPY bytes of its `buf`, all inside `info`, which
        // outlives the call; the kernel keeps no pointer to it. `dev` is an open descriptor.
        check(unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                RNDADDENTROPY as _,
                &info as *const RandPoolInfo,
            )
        })
        .map(drop)
    }

    fn reseed(&self) -> io::Result<()> {
        let dev = urandom()?;
        // SAFETY: RNDRESEEDCRNG takes no argument and touches no memory of ours; `dev` is an
        // open descriptor.
        check(unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG as _) }).map(drop)
    }

    fn set_clone_id(&self, clone_id: Option<&str>) -> io::Result<()> {
        let path = self.clone_id_path();
        let Some(id) = clone_id else {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.run_dir)?;
        // Written aside and renamed over: a reader sees the old id or the new one, whole.
        let tmp = self.run_dir.join(format!(".{CLONE_ID_FILE}.tmp"));
        write_new(&tmp, format!("{id}\n").as_bytes())?;
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

/// Writes `bytes` to `path` (mode 0644), replacing a file but not following a symlink there.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(bytes)
}

/// A recording [`SyncOps`] for tests: it changes nothing on the machine.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

    /// One call to a [`SyncOps`] method, with its arguments.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Call {
        Clock(Duration),
        Entropy(Vec<u8>),
        Reseed,
        CloneId(Option<String>),
    }

    /// Records every call; the steps in `fail` fail with their errno.
    #[derive(Debug, Default)]
    pub(crate) struct Recorder {
        pub(crate) calls: Mutex<Vec<Call>>,
        pub(crate) fail: Vec<(Step, i32)>,
    }

    impl Recorder {
        pub(crate) fn failing(fail: &[(Step, i32)]) -> Self {
            Recorder {
                fail: fail.to_vec(),
                ..Default::default()
            }
        }

        pub(crate) fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }

        fn record(&self, step: Step, call: Call) -> io::Result<()> {
            self.calls.lock().unwrap().push(call);
            match self.fail.iter().find(|(s, _)| *s == step) {
                Some((_, errno)) => Err(io::Error::from_raw_os_error(*errno)),
                None => Ok(()),
            }
        }
    }

    impl SyncOps for Recorder {
        fn set_clock(&self, realtime: Duration) -> io::Result<()> {
            self.record(Step::Clock, Call::Clock(realtime))
        }
        fn add_entropy(&self, entropy: &[u8]) -> io::Result<()> {
            self.record(Step::Entropy, Call::Entropy(entropy.to_vec()))
        }
        fn reseed(&self) -> io::Result<()> {
            self.record(Step::Reseed, Call::Reseed)
        }
        fn set_clone_id(&self, clone_id: Option<&str>) -> io::Result<()> {
            self.record(Step::CloneId, Call::CloneId(clone_id.map(str::to_string)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{Call, Recorder};
    use super::*;

    fn request(clone_id: Option<&str>) -> SyncRequest {
        SyncRequest {
            realtime: Duration::new(1_700_000_000, 123_456_789),
            entropy: (0..64).collect(),
            clone_id: clone_id.map(str::to_string),
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From <linux/random.h> on x86_64.
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
        assert_eq!(std::mem::size_of::<RandPoolInfo>(), 8 + MAX_SYNC_ENTROPY);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }

    #[test]
    fn every_step_runs_in_order_with_the_request() {
        let ops = Recorder::default();
        assert_eq!(apply(&request(Some("c-1")), &ops), Frame::Synced);
        assert_eq!(
            ops.calls(),
            [
                Call::Clock(Duration::new(1_700_000_000, 123_456_789)),
                Call::Entropy((0..64).collect()),
                Call::Reseed,
                Call::CloneId(Some("c-1".into())),
            ]
        );
        let ops = Recorder::default();
        assert_eq!(apply(&request(None), &ops), Frame::Synced);
        assert_eq!(ops.calls()[3], Call::CloneId(None));
    }

    #[test]
    fn failed_steps_do_not_stop_the_others() {
        let ops = Recorder::failing(&[(Step::Clock, libc::EPERM), (Step::Reseed, libc::ENODATA)]);
        match apply(&request(Some("x")), &ops) {
            Frame::Error { errno, message } => {
                assert_eq!(errno, libc::EPERM);
                assert!(message.contains("set the clock"), "{message}");
                assert!(message.contains("reseed"), "{message}");
                assert!(!message.contains("entropy"), "{message}");
            }
            f => panic!("{f:?}"),
        }
        assert_eq!(ops.calls().len(), 4);
        let ops = Recorder::failing(&[(Step::CloneId, libc::EROFS)]);
        assert!(matches!(
            apply(&request(Some("x")), &ops),
            Frame::Error { errno, .. } if errno == libc::EROFS
        ));
    }

    /// The clone id step for real, in a scratch directory (the other steps are never run by
    /// tests: they would change the test machine).
    #[test]
    fn clone_id_is_written_replaced_and_removed() {
        let dir = std::env::temp_dir().join(format!("loft-agent-run-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let guest = LinuxGuest::with_run_dir(dir.join("loft"));
        let path = guest.clone_id_path();
        guest.set_clone_id(Some("first")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "first\n");
        guest.set_clone_id(Some("clone.2_b-c")).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "clone.2_b-c\n");
        let names: Vec<_> = fs::read_dir(dir.join("loft"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [CLONE_ID_FILE], "temporary file left behind");
        guest.set_clone_id(None).unwrap();
        assert!(!path.exists());
        // Removing what is not there is fine.
        guest.set_clone_id(None).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_paths() {
        assert_eq!(
            LinuxGuest::default().clone_id_path(),
            Path::new("/run/loft/clone-id")
        );
    }
}
