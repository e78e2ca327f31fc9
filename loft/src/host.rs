//! What kind of KVM this host offers, and what a guest needs to live on it.

use std::path::Path;

/// The KVM implementation behind `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Hardware virtualization with Intel VMX.
    Vmx,
    /// Hardware virtualization with AMD SVM.
    Svm,
    /// `kvm_pvm`, the Pagetable-based Virtual Machine: KVM without hardware virtualization,
    /// which runs unmodified guests partly through its instruction emulator.
    Pvm,
    /// None of the above could be told.
    Unknown,
}

impl KvmFlavour {
    /// Looks at the loaded modules and the CPU flags.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"), Path::new("/proc/cpuinfo"))
    }

    fn detect_in(modules: &Path, cpuinfo: &Path) -> Self {
        if modules.join("kvm_pvm").exists() {
            return KvmFlavour::Pvm;
        }
        let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
        let has = |flag: &str| {
            flags
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == flag))
        };
        if has("vmx") {
            KvmFlavour::Vmx
        } else if has("svm") {
            KvmFlavour::Svm
        } else {
            KvmFlavour::Unknown
        }
    }

    /// The name used in logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            KvmFlavour::Vmx => "vmx",
            KvmFlavour::Svm => "svm",
            KvmFlavour::Pvm => "kvm_pvm",
            KvmFlavour::Unknown => "unknown",
        }
    }

    /// Kernel command-line parameters the guest needs on this host. On kvm_pvm, the guest kernel
    /// must not use instructions KVM's emulator cannot run (masking them through CPUID does not
    /// work there: the guest still sees them).
    pub fn guest_cmdline(self) -> Option<&'static str> {
        match self {
            KvmFlavour::Pvm => Some(PVM_GUEST_PARAMS),
            _ => None,
        }
    }
}

/// The clearcpuid list, as a literal so that both constants below are built from it.
macro_rules! pvm_clearcpuid {
    () => {
        "clearcpuid=cx16,popcnt,rdrand,rdseed,fsgsbase,invpcid,pcid,umip,movbe,smap,smep,xsave,\
xsaveopt,avx,avx2,bmi1,bmi2,erms,fsrm,la57,rdpid,rtm,hle,mpx,pku,ospke"
    };
}

/// What a guest on kvm_pvm needs: `clearcpuid=…` with the CPU features it must not use
/// (several were seen to kill the guest with an emulation failure: cx16, xsave, popcnt; the
/// rest are masked as a precaution), and `kvm_pvm_host=1`, which tells the
/// project's guest kernel (firmware patch 0004) to skip an FWAIT the host cannot emulate. Other
/// kernels pass the unknown `key=value` on to init's environment, harmlessly.
pub const PVM_GUEST_PARAMS: &str = concat!(pvm_clearcpuid!(), " kvm_pvm_host=1");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_each_flavour_from_files() {
        let dir = std::env::temp_dir().join(format!("loft-host-{}", std::process::id()));
        let modules = dir.join("modules");
        std::fs::create_dir_all(&modules).unwrap();
        let cpuinfo = dir.join("cpuinfo");
        std::fs::write(&cpuinfo, "processor : 0\nflags : fpu vme svm sse\n").unwrap();
        assert_eq!(KvmFlavour::detect_in(&modules, &cpuinfo), KvmFlavour::Svm);
        std::fs::write(&cpuinfo, "flags : fpu vmx\n").unwrap();
        assert_eq!(KvmFlavour::detect_in(&modules, &cpuinfo), KvmFlavour::Vmx);
        std::fs::write(&cpuinfo, "flags : fpu vmxx\n").unwrap();
        assert_eq!(
            KvmFlavour::detect_in(&modules, &cpuinfo),
            KvmFlavour::Unknown
        );
        std::fs::create_dir(modules.join("kvm_pvm")).unwrap();
        assert_eq!(KvmFlavour::detect_in(&modules, &cpuinfo), KvmFlavour::Pvm);
        let pvm = KvmFlavour::Pvm.guest_cmdline().unwrap();
        assert!(pvm.starts_with(pvm_clearcpuid!()), "{pvm}");
        assert!(pvm.ends_with(" kvm_pvm_host=1"), "{pvm}");
        assert!(KvmFlavour::Vmx.guest_cmdline().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
