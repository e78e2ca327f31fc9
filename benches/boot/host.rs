//! Facts about the host and the guest a bench runs with (shared by the boot and blk benches).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// The repository (the loft crate's manifest directory).
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

#[derive(Debug, Serialize)]
pub struct Host {
    pub cpu: String,
    pub kernel: String,
    pub kvm_flavour: String,
    pub loft_commit: String,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn host_info() -> Host {
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|x| x.1.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(REPO)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c}-dirty")
            } else {
                c
            }
        }
        None => "unknown".into(),
    };
    Host {
        cpu: format!("{model} ({cpus} CPUs)"),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        kvm_flavour: loft::KvmFlavour::detect().name().to_string(),
        loft_commit: commit,
    }
}

/// LOFT_GUEST_DIR, else <repo>/target/guest when it has vmlinux + initramfs.cpio, else the
/// prebuilt <repo>/../shared/guest.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOFT_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let built = Path::new(REPO).join("target/guest");
    if built.join("vmlinux").is_file() && built.join("initramfs.cpio").is_file() {
        return built;
    }
    Path::new(REPO).join("../shared/guest")
}

pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A printable form of a command (for the report).
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
