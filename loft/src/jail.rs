//! The jail: once a VM is built (every file, device and socket it needs is open), the process
//! confines itself before the guest runs — new mount, IPC and UTS namespaces, an empty
//! read-only root of its own, no capabilities, `no_new_privs`, and an unprivileged uid and gid.
//! The root is a tmpfs mounted over the jail directory in the new mount namespace; loft
//! pivots into it, detaches the host's tree, and then enters (chroot) the jail directory's own
//! path inside it, so that `/proc/PID/root` names the jail directory. `docs/jail.md` says what
//! it does step by step, and what still works inside.
//!
//! Namespaces, capabilities, `no_new_privs` and the filesystem root belong to a thread, and a
//! thread passes them on to the threads it starts. So the jail is entered while the process has
//! exactly one thread, and every thread of the VM is started afterwards: the whole process is
//! confined. A program with threads of its own cannot be jailed (see [`JailError::Threads`]).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

/// Where [`crate::VmBuilder::jail`] confines the process: the uid and gid it takes, and the
/// directory that becomes its (empty) root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// The user id the process runs as once jailed (not 0).
    pub uid: u32,
    /// The group id the process runs as once jailed (not 0); it keeps no supplementary groups.
    pub gid: u32,
    /// The directory the new root is mounted on. `None`: a fresh private directory in the
    /// temporary directory, removed as soon as the jail is entered. A directory given here is
    /// created when missing and left in place (nothing is ever written to it: the root is a
    /// tmpfs mounted over it in the process's own mount namespace).
    pub dir: Option<PathBuf>,
}

impl Jail {
    /// A jail that runs the process as `uid`:`gid`, rooted in a fresh private directory.
    pub fn new(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            gid,
            dir: None,
        }
    }

    /// Roots the jail in `dir` instead of a fresh directory (see [`Jail::dir`]).
    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }
}

/// Why the process could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The process lacks the privileges the jail needs.
    #[error(
        "jail: entering the jail needs root (capabilities CAP_SYS_ADMIN, CAP_SETUID, \
         CAP_SETGID, CAP_SETPCAP and CAP_CHOWN); run loft as root, or without the jail"
    )]
    NotPrivileged,
    /// uid or gid 0 asked for.
    #[error("jail: the jail's {0} must not be 0 (root); choose an unprivileged id such as 65534")]
    RootId(&'static str),
    /// The process has other threads, which the jail would not confine.
    #[error(
        "jail: the process has {0} threads; the jail confines a process that has one thread \
         (the jail is for the loft command and single-purpose programs: start no thread before \
         VmBuilder::start)"
    )]
    Threads(usize),
    /// The jail's root directory could not be made.
    #[error("jail: cannot prepare the jail directory {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A directory could not be made reachable inside the jail.
    #[error("jail: cannot bind {} into the jail", path.display())]
    Bind {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A step of entering the jail failed.
    #[error("jail: cannot {what}")]
    Step {
        /// The step.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// After all steps, the process still holds something it should have given up.
    #[error("jail: the process still {0} after entering the jail")]
    Incomplete(&'static str),
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { what, source }
}

/// `Err(last OS error)` when a libc call returned -1.
fn check(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path holds a NUL byte"))
}

const CAP_CHOWN: u32 = 0;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_ADMIN: u32 = 21;
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// This thread's effective, permitted and inheritable capability sets (64 bits each).
fn capabilities() -> io::Result<[u64; 3]> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (the version 3 layout) into `data`, which has room for
    // them, and reads the header; both outlive the call.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) })?;
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
    Ok([
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ])
}

/// Empties this thread's effective, permitted and inheritable capability sets.
fn clear_capabilities() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData (the version 3 layout) from memory that
    // outlives the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) })
}

/// Checks what can be checked before a VM is built: the ids, and that this process has the
/// capabilities entering the jail needs.
pub(crate) fn check_can_enter(jail: &Jail) -> Result<(), JailError> {
    if jail.uid == 0 {
        return Err(JailError::RootId("uid"));
    }
    if jail.gid == 0 {
        return Err(JailError::RootId("gid"));
    }
    let [effective, ..] = capabilities().map_err(step("read the process's capabilities"))?;
    let needed = [
        CAP_SYS_ADMIN,
        CAP_SETUID,
        CAP_SETGID,
        CAP_SETPCAP,
        CAP_CHOWN,
    ];
    if needed.iter().any(|c| effective & (1 << c) == 0) {
        return Err(JailError::NotPrivileged);
    }
    Ok(())
}

/// How many threads this process has (`Threads:` in `/proc/self/status`).
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// Waits (briefly) until this process has one thread: threads that were just joined (the
/// loaders) may still be leaving the kernel.
fn wait_for_one_thread() -> Result<(), JailError> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        let n = thread_count().map_err(step("count the process's threads"))?;
        if n == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(JailError::Threads(n));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `path` made absolute with `.` and `..` resolved through the filesystem (the directories must
/// exist), so that it names the same directory inside the jail.
fn resolved(path: &Path) -> io::Result<PathBuf> {
    std::fs::canonicalize(path)
}

/// `inner` (absolute) placed under `root`.
fn under(root: &Path, inner: &Path) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in inner.components() {
        if let Component::Normal(c) = c {
            p.push(c);
        }
    }
    p
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(|s| CString::new(s).expect("no NUL"));
    let data = data.map(|s| CString::new(s).expect("no NUL"));
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string alive for the call.
    let ret = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(ret.into())
}

/// A fresh directory only root may enter, for the jail's root.
fn fresh_dir() -> Result<PathBuf, JailError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut random = [0u8; 8];
    let dir = std::env::temp_dir();
    crate::sandbox::getrandom(&mut random).map_err(step("read random bytes"))?;
    let path = dir.join(format!(
        "loft-jail-{}-{:016x}",
        std::process::id(),
        u64::from_le_bytes(random)
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|source| JailError::Dir {
            path: path.clone(),
            source,
        })?;
    resolved(&path).map_err(|source| JailError::Dir { path, source })
}

/// Confines this process, which must have one thread: see the module's documentation. Each
/// directory of `binds` (absolute, resolved) is bind-mounted into the new root at its own path,
/// so that Unix sockets in it keep their paths.
pub(crate) fn enter(jail: &Jail, binds: &[PathBuf]) -> Result<(), JailError> {
    check_can_enter(jail)?;
    wait_for_one_thread()?;
    let (root, created) = match &jail.dir {
        Some(dir) => {
            let err = |source| JailError::Dir {
                path: dir.clone(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            (resolved(dir).map_err(err)?, false)
        }
        None => (fresh_dir()?, true),
    };
    let result = enter_at(jail, &root, created, binds);
    if result.is_err() && created {
        // Still outside: the directory is ours to remove (a failure inside removed it already,
        // or cannot reach it any more).
        let _ = std::fs::remove_dir(&root);
    }
    result
}

fn enter_at(jail: &Jail, root: &Path, created: bool, binds: &[PathBuf]) -> Result<(), JailError> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare takes flags only; one thread, so the whole process gets the namespaces.
    check(unsafe { libc::unshare(flags) }.into())
        .map_err(step("enter new mount, IPC and UTS namespaces"))?;
    // Nothing done to mounts from here on reaches the host's namespace, nor the other way.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("make the mounts private to the jail"))?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("mode=0755,size=1m,nr_inodes=1024"),
    )
    .map_err(|source| JailError::Dir {
        path: root.to_path_buf(),
        source,
    })?;
    // The process's root will be the jail directory's own path inside the tmpfs (a chroot
    // there, below): /proc/PID/root then names the jail directory, not a bare `/`.
    let inner = under(root, root);
    std::fs::create_dir_all(&inner).map_err(|source| JailError::Dir {
        path: root.to_path_buf(),
        source,
    })?;
    for dir in binds {
        let target = under(&inner, dir);
        let err = |source| JailError::Bind {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&target).map_err(err)?;
        mount(Some(dir), &target, None, libc::MS_BIND, None).map_err(err)?;
    }
    let old = root.join("old-root");
    std::fs::create_dir(&old).map_err(step("make the old root's mount point"))?;
    let (new_c, old_c) = (
        cstr(root).map_err(step("pivot the root"))?,
        cstr(&old).map_err(step("pivot the root"))?,
    );
    // SAFETY: both arguments are NUL-terminated paths alive for the call.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) })
        .map_err(step("pivot the root into the jail"))?;
    std::env::set_current_dir("/").map_err(step("enter the jail's root"))?;
    let old = Path::new("/old-root");
    if created {
        // The directory under the tmpfs is no mount point any more in this namespace (the
        // tmpfs is `/` now), and never was in the host's: it goes.
        std::fs::remove_dir(under(old, root)).map_err(|source| JailError::Dir {
            path: root.to_path_buf(),
            source,
        })?;
    }
    let old_c = cstr(old).map_err(step("detach the old root"))?;
    // SAFETY: a NUL-terminated path alive for the call.
    check(unsafe { libc::umount2(old_c.as_ptr(), libc::MNT_DETACH) }.into())
        .map_err(step("detach the old root"))?;
    std::fs::remove_dir(old).map_err(step("remove the old root's mount point"))?;
    // Nothing is to be written to the root itself (the bound directories stay writable).
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(step("make the jail's root read-only"))?;
    let inner_c = cstr(root).map_err(step("enter the jail directory"))?;
    // SAFETY: a NUL-terminated path alive for the call.
    check(unsafe { libc::chroot(inner_c.as_ptr()) }.into())
        .map_err(step("enter the jail directory"))?;
    std::env::set_current_dir("/").map_err(step("enter the jail directory"))?;
    drop_privileges(jail)
}

/// Every capability out of the bounding set, then the ids (which empties the permitted and
/// effective sets), then the inheritable and ambient sets, then `no_new_privs`.
fn drop_privileges(jail: &Jail) -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break; // past the last capability this kernel knows
            }
            return Err(step("drop the capability bounding set")(e));
        }
    }
    // SAFETY: setgroups with an empty list reads no memory.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }.into())
        .map_err(step("drop the supplementary groups"))?;
    // Changing ids clears the parent-death signal: keep it (a child loft of the library's
    // process mode must still die with its parent).
    let mut death_signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int into `death_signal`.
    unsafe {
        libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut death_signal as *mut libc::c_int,
        )
    };
    // SAFETY: integer arguments only (one thread: no other thread keeps the old ids).
    check(unsafe { libc::setresgid(jail.gid, jail.gid, jail.gid) }.into())
        .map_err(step("set the group id"))?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(jail.uid, jail.uid, jail.uid) }.into())
        .map_err(step("set the user id"))?;
    if death_signal != 0 {
        // SAFETY: prctl with integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) }.into())
            .map_err(step("keep the parent-death signal"))?;
    }
    clear_capabilities().map_err(step("clear the capability sets"))?;
    // SAFETY: prctl with integer arguments only.
    let ambient = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    check(ambient.into()).map_err(step("clear the ambient capabilities"))?;
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())
        .map_err(step("set no_new_privs"))?;
    verify(jail)
}

/// Checks the result: the ids, empty capability sets.
fn verify(jail: &Jail) -> Result<(), JailError> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three ids into the locals.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }.into())
        .map_err(step("read the user ids"))?;
    if [r, e, s] != [jail.uid; 3] {
        return Err(JailError::Incomplete("has another user id"));
    }
    // SAFETY: getresgid writes three ids into the locals.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) }.into())
        .map_err(step("read the group ids"))?;
    if [r, e, s] != [jail.gid; 3] {
        return Err(JailError::Incomplete("has another group id"));
    }
    if capabilities().map_err(step("read the capabilities"))? != [0; 3] {
        return Err(JailError::Incomplete("holds capabilities"));
    }
    // SAFETY: prctl with integer arguments only.
    let bounded = unsafe { libc::prctl(libc::PR_CAPBSET_READ, CAP_SYS_ADMIN as libc::c_ulong) };
    if bounded != 0 {
        return Err(JailError::Incomplete(
            "has CAP_SYS_ADMIN in its bounding set",
        ));
    }
    Ok(())
}

/// The directory of a Unix socket `path`, resolved, and `path` through it: the directory to
/// bind into the jail, and the path that names the socket inside the jail and out. `path`
/// unchanged when its directory cannot be resolved (the socket's bind then reports it).
pub(crate) fn socket_path(path: &Path) -> (Option<PathBuf>, PathBuf) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (resolved(parent), path.file_name()) {
        (Ok(dir), Some(name)) => {
            let full = dir.join(name);
            (Some(dir), full)
        }
        _ => (None, path.to_path_buf()),
    }
}

/// `chown` through a path (the socket files loft created, so that the jailed process may
/// connect to them and remove them).
pub(crate) fn give(path: &Path, jail: &Jail) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(jail.uid), Some(jail.gid)).map_err(|source| {
        JailError::Bind {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_under_the_root_at_the_same_place() {
        assert_eq!(
            under(Path::new("/j"), Path::new("/tmp/loft-1/x")),
            PathBuf::from("/j/tmp/loft-1/x")
        );
    }

    #[test]
    fn socket_paths_are_resolved_through_their_directory() {
        let (dir, path) = socket_path(Path::new("/tmp/./v.sock"));
        let tmp = std::fs::canonicalize("/tmp").unwrap();
        assert_eq!(dir.as_deref(), Some(tmp.as_path()));
        assert_eq!(path, tmp.join("v.sock"));
        let (dir, path) = socket_path(Path::new("/nonexistent-dir/v.sock"));
        assert_eq!(
            (dir, path),
            (None, PathBuf::from("/nonexistent-dir/v.sock"))
        );
    }

    #[test]
    fn root_ids_are_refused() {
        assert!(matches!(
            check_can_enter(&Jail::new(0, 1)),
            Err(JailError::RootId("uid"))
        ));
        assert!(matches!(
            check_can_enter(&Jail::new(1, 0)),
            Err(JailError::RootId("gid"))
        ));
    }
}
