//! The runners: what each one runs, and what its numbers cover.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::host::which;
use crate::smaps::GuestRam;
use crate::vm::{qemu_microvm, GUEST_MEM_MIB};

/// What every runner of the boot workload prints on stdout once its workload is up.
pub const MARKER: &str = "GUEST-INIT-READY";
/// What every runner of the cmd workload runs `echo` with.
pub const CMD_MARKER: &str = "LOFT-BENCH-CMD-OUTPUT";

/// What the runners do: boot to a marker, or give a command's output in a fresh environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// The guest (or a container) comes up and prints [`MARKER`].
    Boot,
    /// A fresh VM or container runs `echo` [`CMD_MARKER`]; loft's output is the command's.
    Cmd,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Boot => "boot",
            Workload::Cmd => "cmd",
        }
    }

    pub fn parse(word: &str) -> Result<Workload, String> {
        match word {
            "boot" => Ok(Workload::Boot),
            "cmd" => Ok(Workload::Cmd),
            w => Err(format!("unknown workload '{w}'; known: boot, cmd")),
        }
    }

    /// The one marker its runners are timed to.
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            Workload::Boot => &[MARKER],
            Workload::Cmd => &[CMD_MARKER],
        }
    }

    /// Its runners, in the canonical order.
    pub fn kinds(self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| k.workload() == self)
            .collect()
    }

    /// The runners whose median ready time the others are divided by, in table order.
    pub fn ratio_bases(self) -> &'static [Kind] {
        match self {
            Workload::Boot => &[Kind::LoftElf],
            Workload::Cmd => &[Kind::LoftColdCmd, Kind::CrunCmd],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    LoftElf,
    LoftBzimage,
    Qemu,
    Firecracker,
    Crun,
    Runc,
    Unshare,
    LoftColdCmd,
    LoftRestoreCmd,
    CrunCmd,
    RuncCmd,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::LoftElf,
        Kind::LoftBzimage,
        Kind::Qemu,
        Kind::Firecracker,
        Kind::Crun,
        Kind::Runc,
        Kind::Unshare,
        Kind::LoftColdCmd,
        Kind::LoftRestoreCmd,
        Kind::CrunCmd,
        Kind::RuncCmd,
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
            Kind::LoftColdCmd => "loft-cold-cmd",
            Kind::LoftRestoreCmd => "loft-restore-cmd",
            Kind::CrunCmd => "crun-cmd",
            Kind::RuncCmd => "runc-cmd",
        }
    }

    pub fn workload(self) -> Workload {
        match self {
            Kind::LoftColdCmd | Kind::LoftRestoreCmd | Kind::CrunCmd | Kind::RuncCmd => {
                Workload::Cmd
            }
            _ => Workload::Boot,
        }
    }

    pub fn is_vm(self) -> bool {
        matches!(
            self,
            Kind::LoftElf
                | Kind::LoftBzimage
                | Kind::Qemu
                | Kind::Firecracker
                | Kind::LoftColdCmd
                | Kind::LoftRestoreCmd
        )
    }

    pub fn is_loft(self) -> bool {
        matches!(
            self,
            Kind::LoftElf | Kind::LoftBzimage | Kind::LoftColdCmd | Kind::LoftRestoreCmd
        )
    }

    /// A container runtime's runner: the runtime's command name.
    pub fn runtime(self) -> Option<&'static str> {
        match self {
            Kind::Crun | Kind::CrunCmd => Some("crun"),
            Kind::Runc | Kind::RuncCmd => Some("runc"),
            _ => None,
        }
    }

    /// What `peak_rss_kib` and `cpu_ms` (wait4's rusage of the spawned child) cover.
    pub fn measures(self) -> &'static str {
        match self {
            Kind::LoftElf | Kind::LoftBzimage | Kind::LoftColdCmd => {
                "the loft process (guest RAM pages it touched included)"
            }
            Kind::LoftRestoreCmd => {
                "the loft process (the pages of the snapshot's memory file the guest touched \
                 included)"
            }
            Kind::Qemu => "the QEMU process (guest RAM pages in /dev/shm it touched included)",
            Kind::Firecracker => "the firecracker process (guest RAM pages it touched included)",
            Kind::Crun | Kind::CrunCmd => {
                "unshare -m → sh → crun (one exec chain, one pid; timed as a whole) and the \
                 container process crun reaps: RSS = the largest of them, CPU = their sum"
            }
            Kind::Runc | Kind::RuncCmd => {
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
                "cmd" => Workload::Cmd.kinds(),
                w => match Kind::ALL.iter().find(|k| k.name() == w) {
                    Some(k) => vec![*k],
                    None => {
                        return Err(format!(
                            "unknown runner '{w}' in --only; known: {}, and the aliases loft \
                             (= loft-elf,loft-bzimage), qemu, unshare, cmd (= every cmd runner)",
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
    /// The cmd workload's bundle (the same rootfs, `echo CMD_MARKER` as its process), or why
    /// there is none.
    pub cmd_bundle: Result<PathBuf, String>,
    /// The snapshot loft-restore-cmd restores, or why there is none.
    pub cmd_snapshot: Result<PathBuf, String>,
    /// Scratch files (Firecracker configs).
    pub work: PathBuf,
    pub tag: String,
}

/// The cmd workload's OCI bundle in `dir`: `bundle`'s config.json with `echo CMD_MARKER` as the
/// process and `bundle`'s rootfs (by absolute path) as the root, so both workloads run in the
/// same busybox tree.
pub fn cmd_bundle(bundle: &Path, dir: &Path) -> Result<PathBuf, String> {
    let src = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
    let mut config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", src.display()))?;
    config["process"]["args"] = serde_json::json!(["echo", CMD_MARKER]);
    config["root"]["path"] = serde_json::json!(bundle.join("rootfs"));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let dst = dir.join("config.json");
    std::fs::write(&dst, serde_json::to_vec_pretty(&config).expect("json"))
        .map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
    Ok(dir.to_path_buf())
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
        Kind::LoftColdCmd | Kind::LoftRestoreCmd => {
            need(&s.loft, "loft binary")?;
            let mut cmd = Command::new(&s.loft);
            cmd.arg("run");
            let ram = if kind == Kind::LoftColdCmd {
                need(&s.vmlinux, "guest kernel")?;
                need(&s.initrd, "guest initramfs")?;
                cmd.arg("--kernel")
                    .arg(&s.vmlinux)
                    .arg("--initrd")
                    .arg(&s.initrd)
                    .arg("--memory")
                    .arg(format!("{GUEST_MEM_MIB}M"));
                Ram::Anonymous(guest_bytes)
            } else {
                let dir = s.cmd_snapshot.as_ref().map_err(Clone::clone)?;
                cmd.arg("--restore").arg(dir);
                // guest RAM is the snapshot's memory file, mapped privately
                Ram::File(dir.join("memory").display().to_string(), guest_bytes)
            };
            if s.loft_boot_timer {
                cmd.arg("--boot-timer");
            }
            cmd.args(["--", "echo", CMD_MARKER]);
            Ok(Prepared {
                cmd,
                ram: Some(ram),
                cleanup: vec![],
                stdin_pipe: false,
            })
        }
        Kind::Crun | Kind::Runc | Kind::CrunCmd | Kind::RuncCmd => {
            let rt = kind.runtime().expect("a container runtime's runner");
            let bin = which(rt)
                .ok_or_else(|| format!("{rt} is not installed (scripts/install-deps.sh)"))?;
            let bundle = if kind.workload() == Workload::Cmd {
                &s.cmd_bundle
            } else {
                &s.bundle
            };
            let bundle = bundle.as_ref().map_err(Clone::clone)?;
            let cmd = if rt == "crun" {
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
