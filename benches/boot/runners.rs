//! The runners: what each one runs, and what its numbers cover.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::which;
use crate::smaps::GuestRam;
use crate::vm::{qemu_microvm, GUEST_MEM_MIB};

/// What every runner prints on stdout once its workload is up.
pub const MARKER: &str = "GUEST-INIT-READY";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    LoftElf,
    LoftBzimage,
    Qemu,
    Firecracker,
    Crun,
    Runc,
    Unshare,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::LoftElf,
        Kind::LoftBzimage,
        Kind::Qemu,
        Kind::Firecracker,
        Kind::Crun,
        Kind::Runc,
        Kind::Unshare,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::LoftElf => "loft-elf",
            Kind::LoftBzimage => "loft-bzimage",
            Kind::Qemu => "qemu-microvm",
            Kind::Firecracker => "firecracker",
            Kind::Crun => "crun",
            Kind::Runc => "runc",
            Kind::Unshare => "unshare+chroot",
        }
    }

    pub fn is_vm(self) -> bool {
        matches!(
            self,
            Kind::LoftElf | Kind::LoftBzimage | Kind::Qemu | Kind::Firecracker
        )
    }

    pub fn is_loft(self) -> bool {
        matches!(self, Kind::LoftElf | Kind::LoftBzimage)
    }

    /// What `peak_rss_kib` and `cpu_ms` (wait4's rusage of the spawned child) cover.
    pub fn measures(self) -> &'static str {
        match self {
            Kind::LoftElf | Kind::LoftBzimage => {
                "the loft process (guest RAM pages it touched included)"
            }
            Kind::Qemu => "the QEMU process (guest RAM pages in /dev/shm it touched included)",
            Kind::Firecracker => "the firecracker process (guest RAM pages it touched included)",
            Kind::Crun => {
                "unshare -m → sh → crun (one exec chain, one pid; timed as a whole) and the \
                 container process crun reaps: RSS = the largest of them, CPU = their sum"
            }
            Kind::Runc => {
                "runc and the runc-init/container process it reaps: RSS = the largest, CPU = the sum"
            }
            Kind::Unshare => {
                "unshare and its forked chroot → sh: RSS = the largest, CPU = the sum"
            }
        }
    }

    /// `--only` names: the runner names, `loft` (both loft runners) and `unshare`.
    pub fn parse_list(list: &str) -> Result<Vec<Kind>, String> {
        let mut out: Vec<Kind> = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let kinds: Vec<Kind> = match word {
                "loft" => vec![Kind::LoftElf, Kind::LoftBzimage],
                "unshare" | "chroot" => vec![Kind::Unshare],
                "qemu" => vec![Kind::Qemu],
                w => match Kind::ALL.iter().find(|k| k.name() == w) {
                    Some(k) => vec![*k],
                    None => {
                        return Err(format!(
                            "unknown runner '{w}' in --only; known: {}, and the aliases loft \
                             (= loft-elf,loft-bzimage), qemu, unshare",
                            Kind::ALL.map(Kind::name).join(", ")
                        ))
                    }
                },
            };
            for k in kinds {
                if !out.contains(&k) {
                    out.push(k);
                }
            }
        }
        if out.is_empty() {
            return Err("--only names no runner".into());
        }
        // always in the canonical order
        out.sort_by_key(|k| Kind::ALL.iter().position(|a| a == k));
        Ok(out)
    }
}

/// Which mapping of a VMM is the guest's RAM.
#[derive(Clone, Debug)]
pub enum Ram {
    Anonymous(u64),
    File(String, u64),
}

impl Ram {
    pub fn as_guest_ram(&self) -> GuestRam<'_> {
        match self {
            Ram::Anonymous(n) => GuestRam::Anonymous(*n),
            Ram::File(p, n) => GuestRam::File(p, *n),
        }
    }
}

/// Everything the runners need, found once before the first run.
#[derive(Debug)]
pub struct Setup {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
    pub loft: PathBuf,
    /// The loft binary knows `--boot-timer`.
    pub loft_boot_timer: bool,
    pub kvm_pvm: bool,
    /// The guest command line for QEMU and Firecracker.
    pub cmdline: String,
    pub qemu: Option<PathBuf>,
    pub firecracker: Option<PathBuf>,
    /// The OCI bundle, or why there is none.
    pub bundle: Result<PathBuf, String>,
    /// Scratch files (Firecracker configs).
    pub work: PathBuf,
    pub tag: String,
}

/// One run's command, its guest RAM (VMs), and what to clean up afterwards.
pub struct Prepared {
    pub cmd: Command,
    pub ram: Option<Ram>,
    pub cleanup: Vec<Cleanup>,
    /// Give the child an open, empty pipe as stdin instead of /dev/null (Firecracker registers
    /// its stdin with epoll, which /dev/null refuses).
    pub stdin_pipe: bool,
}

pub enum Cleanup {
    RemoveFile(PathBuf),
    /// `RUNTIME delete -f ID` (only needed when the run did not finish by itself).
    DeleteContainer(&'static str, String),
}

impl Cleanup {
    pub fn run(&self, finished: bool) {
        match self {
            Cleanup::RemoveFile(p) => {
                let _ = std::fs::remove_file(p);
            }
            Cleanup::DeleteContainer(rt, id) if !finished => {
                let _ = Command::new(rt)
                    .args(["delete", "-f", id])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
            Cleanup::DeleteContainer(..) => {}
        }
    }
}

fn need(path: &Path, what: &str) -> Result<(), String> {
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("{what} {} is missing", path.display()))
    }
}

/// The command for run `iter` of `kind`, or why it cannot run.
pub fn prepare(kind: Kind, s: &Setup, iter: usize) -> Result<Prepared, String> {
    let id = format!("{}-{iter}", s.tag);
    let guest_bytes = GUEST_MEM_MIB << 20;
    match kind {
        Kind::LoftElf | Kind::LoftBzimage => {
            let kernel = if kind == Kind::LoftElf {
                &s.vmlinux
            } else {
                &s.bzimage
            };
            need(&s.loft, "loft binary")?;
            need(kernel, "guest kernel")?;
            need(&s.initrd, "guest initramfs")?;
            let mut cmd = Command::new(&s.loft);
            cmd.arg("run")
                .arg("--kernel")
                .arg(kernel)
                .arg("--initrd")
                .arg(&s.initrd)
                .arg("--memory")
                .arg(format!("{GUEST_MEM_MIB}M"));
            if s.loft_boot_timer {
                cmd.arg("--boot-timer");
            }
            Ok(Prepared {
                cmd,
                ram: Some(Ram::Anonymous(guest_bytes)),
                cleanup: vec![],
                stdin_pipe: false,
            })
        }
        Kind::Qemu => {
            let qemu = s
                .qemu
                .as_ref()
                .ok_or("qemu-system-x86_64 is not installed (scripts/install-deps.sh)")?;
            need(&s.vmlinux, "guest kernel")?;
            need(&s.initrd, "guest initramfs")?;
            let shm = PathBuf::from(format!("/dev/shm/{id}-qemu"));
            let mut cmd = qemu_microvm(qemu, s.kvm_pvm, &shm);
            let (ram, cleanup) = if s.kvm_pvm {
                let ram = Ram::File(shm.display().to_string(), guest_bytes);
                (ram, vec![Cleanup::RemoveFile(shm)])
            } else {
                (Ram::Anonymous(guest_bytes), vec![])
            };
            cmd.arg("-kernel").arg(&s.vmlinux);
            cmd.arg("-initrd").arg(&s.initrd);
            cmd.arg("-append").arg(&s.cmdline);
            Ok(Prepared {
                cmd,
                ram: Some(ram),
                cleanup,
                stdin_pipe: false,
            })
        }
        Kind::Firecracker => {
            let fc = s.firecracker.as_ref().ok_or("FIRECRACKER is not set")?;
            need(&s.vmlinux, "guest kernel")?;
            need(&s.initrd, "guest initramfs")?;
            let config = serde_json::json!({
                "boot-source": {
                    "kernel_image_path": s.vmlinux,
                    "initrd_path": s.initrd,
                    "boot_args": s.cmdline,
                },
                "drives": [],
                "machine-config": { "vcpu_count": 1, "mem_size_mib": GUEST_MEM_MIB, "smt": false },
            });
            let path = s.work.join(format!("{id}-firecracker.json"));
            std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json"))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            let mut cmd = Command::new(fc);
            cmd.arg("--no-api").arg("--config-file").arg(&path);
            Ok(Prepared {
                cmd,
                ram: Some(Ram::Anonymous(guest_bytes)),
                cleanup: vec![Cleanup::RemoveFile(path)],
                stdin_pipe: true,
            })
        }
        Kind::Crun | Kind::Runc => {
            let rt = if kind == Kind::Crun { "crun" } else { "runc" };
            let bin = which(rt)
                .ok_or_else(|| format!("{rt} is not installed (scripts/install-deps.sh)"))?;
            let bundle = s.bundle.as_ref().map_err(Clone::clone)?;
            let cmd = if kind == Kind::Crun {
                // crun 1.8 refuses a hybrid cgroup host ("cgroups in hybrid mode not
                // supported"): run it in a private mount namespace without the cgroup2 mount.
                let mut c = Command::new("unshare");
                c.args(["-m", "sh", "-c"]).arg(format!(
                    "umount /sys/fs/cgroup/unified 2>/dev/null; exec {} run --bundle {} {id}",
                    bin.display(),
                    bundle.display()
                ));
                c
            } else {
                let mut c = Command::new(&bin);
                c.arg("run").arg("--bundle").arg(bundle).arg(&id);
                c
            };
            Ok(Prepared {
                cmd,
                ram: None,
                cleanup: vec![Cleanup::DeleteContainer(rt, id)],
                stdin_pipe: false,
            })
        }
        Kind::Unshare => {
            let bundle = s.bundle.as_ref().map_err(Clone::clone)?;
            let rootfs = bundle.join("rootfs");
            let mut cmd = Command::new("unshare");
            cmd.arg("-fpmnui")
                .arg(format!("--mount-proc={}", rootfs.join("proc").display()))
                .arg("chroot")
                .arg(&rootfs)
                .args(["/bin/sh", "-c", &format!("echo {MARKER}")]);
            Ok(Prepared {
                cmd,
                ram: None,
                cleanup: vec![],
                stdin_pipe: false,
            })
        }
    }
}
