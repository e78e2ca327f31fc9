//! What a VM is made of, as the user asked for it, checked before anything is built.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Default number of vCPUs.
pub const DEFAULT_CPUS: u32 = 1;
/// Default guest memory.
pub const DEFAULT_MEMORY: MemSize = MemSize(128 << 20);

/// Errors in a VM configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A memory size that does not parse.
    #[error("invalid memory size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    BadSize(String),
    /// A memory size that is not a whole number of pages.
    #[error("invalid memory size '{0}': must be a multiple of 4 KiB")]
    UnalignedSize(String),
    /// Zero vCPUs.
    #[error("--cpus 0: a VM needs at least one vCPU")]
    NoCpus,
    /// More vCPUs than KVM or the MP table allow.
    #[error("--cpus {asked}: this host allows at most {max} vCPUs per VM")]
    TooManyCpus {
        /// What was asked for.
        asked: u32,
        /// The limit.
        max: u32,
    },
    /// A `--disk` that does not parse.
    #[error("invalid --disk '{0}': expected PATH or PATH,readonly")]
    BadDisk(String),
    /// A `--net` that does not parse.
    #[error("invalid --net '{0}': expected tap=NAME[,mac=aa:bb:cc:dd:ee:ff] (NAME at most 15 characters)")]
    BadNet(String),
    /// A `--vsock` that does not parse.
    #[error("invalid --vsock '{0}': expected cid=N,uds=PATH with N at least 3")]
    BadVsock(String),
    /// No kernel given and no bundled guest.
    #[error("no --kernel given and no guest kernel (vmlinux) in {} (build one with firmware/build.sh, install one with scripts/install.sh, or set LOFT_GUEST_DIR)", show_dirs(.0))]
    NoDefaultKernel(Vec<PathBuf>),
}

fn show_dirs(dirs: &[PathBuf]) -> String {
    let shown: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    shown.join(", ")
}

/// A virtio-blk disk: `PATH[,readonly]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// The guest sees a read-only disk and the file is never written.
    pub read_only: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ConfigError::BadDisk(s.into()))?;
        let mut read_only = false;
        for opt in parts {
            match opt {
                "readonly" | "ro" => read_only = true,
                _ => return Err(ConfigError::BadDisk(s.into())),
            }
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A virtio-net interface backed by a host TAP device: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP device name on the host.
    pub tap: String,
    /// The guest NIC's MAC address; one is made up when absent.
    pub mac: Option<[u8; 6]>,
}

/// A virtio-vsock device: `cid=N,uds=PATH`. The host side is a Unix socket at `uds`, in
/// Firecracker's convention (connect, write `CONNECT <port>\n`; guest connections to port P
/// reach `<uds>_<P>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Where loft listens for host connections.
    pub uds: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadVsock(s.into());
        let mut cid = None;
        let mut uds = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("cid", n)) => cid = Some(n.parse::<u64>().map_err(|_| bad())?),
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => return Err(bad()),
            }
        }
        Ok(Self {
            cid: cid.filter(|c| *c >= 3).ok_or_else(bad)?,
            uds: uds.ok_or_else(bad)?,
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadNet(s.into());
        let mut tap = None;
        let mut mac = None;
        for opt in s.split(',') {
            match opt.split_once('=') {
                Some(("tap", name)) if !name.is_empty() && name.len() < 16 => {
                    tap = Some(name.to_string())
                }
                Some(("mac", m)) => mac = Some(parse_mac(m).ok_or_else(bad)?),
                _ => return Err(bad()),
            }
        }
        Ok(Self {
            tap: tap.ok_or_else(bad)?,
            mac,
        })
    }
}

/// A size in bytes, parsed from `128M`, `1G`, `512MiB`, `4096K` or a plain number of MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemSize(pub u64);

impl MemSize {
    /// Size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("T", 1 << 40),
            ("G", 1 << 30),
            ("M", 1 << 20),
            ("K", 1 << 10),
        ];
        for (suffix, unit) in UNITS {
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for MemSize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadSize(s.to_owned());
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(digits_end);
        if num.is_empty() {
            return Err(bad());
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        let shift = match suffix.trim().to_ascii_uppercase().as_str() {
            // A bare number is MiB, as for QEMU's -m.
            "" | "M" | "MB" | "MIB" => 20,
            "K" | "KB" | "KIB" => 10,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(bad()),
        };
        let bytes = n.checked_mul(1u64 << shift).ok_or_else(bad)?;
        if bytes == 0 {
            return Err(bad());
        }
        if bytes % 4096 != 0 {
            return Err(ConfigError::UnalignedSize(s.to_owned()));
        }
        Ok(MemSize(bytes))
    }
}

/// Everything needed to build a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest kernel: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    pub initrd: Option<PathBuf>,
    /// The user's part of the kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM.
    pub memory: MemSize,
    /// Disks, in order: the first is /dev/vda.
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in order: the first is eth0.
    pub nets: Vec<NetConfig>,
    /// A host↔guest socket channel.
    pub vsock: Option<VsockConfig>,
    /// The KVM device.
    pub kvm_device: PathBuf,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            cpus: DEFAULT_CPUS,
            memory: DEFAULT_MEMORY,
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            kvm_device: default_kvm_device(),
        }
    }
}

/// `/dev/kvm`, or what `LOFT_KVM_DEVICE` names.
pub fn default_kvm_device() -> PathBuf {
    std::env::var_os("LOFT_KVM_DEVICE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/kvm"))
}

/// The places the bundled guest may be, in the order they are tried: `LOFT_GUEST_DIR` alone when
/// it is set; else an installed guest beside the executable (`BIN/../share/loft/guest`, as
/// `scripts/install.sh` lays it out), a build tree's `target/guest` seen from the executable
/// (`target/release/loft`, `target/debug/deps/…`), `/usr/local/share/loft/guest`, and, in
/// development builds only, the source tree's `target/guest`.
pub fn guest_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("LOFT_GUEST_DIR") {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    let exe = std::env::current_exe().ok();
    let bin = exe.as_deref().and_then(|e| e.parent());
    if let Some(prefix) = bin.and_then(|b| b.parent()) {
        dirs.push(prefix.join("share/loft/guest"));
        dirs.push(prefix.join("guest"));
        if let Some(target) = prefix.parent() {
            dirs.push(target.join("guest"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/share/loft/guest"));
    #[cfg(debug_assertions)]
    dirs.push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
    dirs.dedup();
    dirs
}

/// The bundled guest's kernel and initramfs from the first of `dirs` that has a kernel
/// (`vmlinux`); the initramfs (`initramfs.cpio`) is optional.
pub fn bundled_guest_in(dirs: &[PathBuf]) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    let dir = dirs
        .iter()
        .find(|d| d.join("vmlinux").is_file())
        .ok_or_else(|| ConfigError::NoDefaultKernel(dirs.to_vec()))?;
    let kernel = dir.join("vmlinux");
    let initrd = dir.join("initramfs.cpio");
    Ok((kernel, initrd.is_file().then_some(initrd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_and_without_units() {
        let p = |s: &str| s.parse::<MemSize>().map(|m| m.bytes());
        assert_eq!(p("256M"), Ok(256 << 20));
        assert_eq!(p("256"), Ok(256 << 20));
        assert_eq!(p("1G"), Ok(1 << 30));
        assert_eq!(p("4g"), Ok(4 << 30));
        assert_eq!(p("512MiB"), Ok(512 << 20));
        assert_eq!(p("2GB"), Ok(2 << 30));
        assert_eq!(p("65536K"), Ok(64 << 20));
        assert_eq!(p("1T"), Ok(1 << 40));
    }

    #[test]
    fn rejects_malformed_sizes() {
        for s in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "0",
            "0M",
            "99999999999999999999G",
            "1 G B",
        ] {
            assert!(s.parse::<MemSize>().is_err(), "{s:?} should not parse");
        }
        assert_eq!(
            "3K".parse::<MemSize>(),
            Err(ConfigError::UnalignedSize("3K".into()))
        );
    }

    #[test]
    fn parses_disks_and_nets() {
        assert_eq!(
            "a.img,readonly".parse::<DiskConfig>(),
            Ok(DiskConfig {
                path: "a.img".into(),
                read_only: true
            })
        );
        assert_eq!(
            "/x/b.img".parse::<DiskConfig>().map(|d| d.read_only),
            Ok(false)
        );
        assert!(",readonly".parse::<DiskConfig>().is_err());
        assert!("a.img,rw".parse::<DiskConfig>().is_err());
        assert_eq!(
            "tap=tap0,mac=02:00:00:00:00:0a".parse::<NetConfig>(),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([2, 0, 0, 0, 0, 0x0a])
            })
        );
        assert_eq!("tap=t".parse::<NetConfig>().map(|n| n.mac), Ok(None));
        for bad in [
            "",
            "tap=",
            "mac=02:00:00:00:00:01",
            "tap=t,mac=02:00:00:00:00",
            "tap=t,mac=zz:00:00:00:00:01",
            "tap=a23456789012345678",
            "tap=t,x=1",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_vsock() {
        assert_eq!(
            "cid=3,uds=/tmp/v.sock".parse::<VsockConfig>(),
            Ok(VsockConfig {
                cid: 3,
                uds: "/tmp/v.sock".into()
            })
        );
        for bad in [
            "",
            "cid=2,uds=/x",
            "cid=3",
            "uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn displays_in_the_largest_whole_unit() {
        assert_eq!(MemSize(128 << 20).to_string(), "128M");
        assert_eq!(MemSize(4 << 30).to_string(), "4G");
        assert_eq!(MemSize(1536 << 20).to_string(), "1536M");
        assert_eq!(MemSize(4096).to_string(), "4K");
    }
}
