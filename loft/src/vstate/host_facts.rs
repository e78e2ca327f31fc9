//! What a snapshot depends on in its host: the CPU, the TSC frequency and the kind of KVM. A
//! snapshot records them; a restore compares them with the host it runs on first, to refuse
//! with a clear reason rather than fail halfway or run a guest on a CPU it was not made for.

use kvm_bindings::CpuId;
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

use super::vcpu_state;
use crate::arch::x86_64::cpuid;
use crate::host::KvmFlavour;

/// The host facts a snapshot depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// The CPU vendor string (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: String,
    /// The CPU family.
    pub family: u32,
    /// The CPU model.
    pub model: u32,
    /// The CPU stepping.
    pub stepping: u32,
    /// The TSC frequency a vCPU gets, in kHz, when KVM can tell.
    pub tsc_khz: Option<u32>,
    /// Whether KVM can run a vCPU's TSC at another frequency (`KVM_CAP_TSC_CONTROL`).
    pub tsc_scaling: bool,
    /// The KVM flavour ([`KvmFlavour::name`]): `vmx`, `svm`, `kvm_pvm`.
    pub kvm: String,
}

impl std::fmt::Display for HostFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} family {:#x} model {:#x} stepping {}, ",
            self.vendor, self.family, self.model, self.stepping
        )?;
        match self.tsc_khz {
            Some(khz) => write!(f, "TSC {khz} kHz")?,
            None => write!(f, "TSC frequency unknown")?,
        }
        if self.tsc_scaling {
            write!(f, " (scalable)")?;
        }
        write!(f, ", KVM {}", self.kvm)
    }
}

/// Errors finding the host facts, or a snapshot's host not matching this one.
#[derive(Debug, thiserror::Error)]
pub enum CompatError {
    /// KVM could not be asked.
    #[error("cannot ask KVM for the host's {what}")]
    Kvm {
        /// What was asked.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM's CPUID has no vendor or signature leaf.
    #[error("KVM's CPUID does not say which CPU this is")]
    NoSignature,
    /// Another CPU vendor.
    #[error("the snapshot was taken on a {saved} CPU, this host's is {current}")]
    Vendor {
        /// The snapshot's.
        saved: String,
        /// This host's.
        current: String,
    },
    /// Another CPU family or model: its CPUID may offer what this CPU lacks.
    #[error(
        "the snapshot was taken on CPU family {:#x} model {:#x}, this host's is family {:#x} model \
         {:#x}", saved.0, saved.1, current.0, current.1
    )]
    CpuModel {
        /// The snapshot's family and model.
        saved: (u32, u32),
        /// This host's.
        current: (u32, u32),
    },
    /// Another kind of KVM.
    #[error("the snapshot was taken on {saved} KVM, this host's is {current}")]
    Flavour {
        /// The snapshot's.
        saved: String,
        /// This host's.
        current: String,
    },
    /// A TSC frequency that differs more than KVM tolerates, on a KVM that cannot scale it.
    #[error(
        "the snapshot's TSC ran at {saved_khz} kHz, this host's runs at {current_khz} kHz and its \
         KVM cannot scale the TSC"
    )]
    TscFrequency {
        /// The snapshot's.
        saved_khz: u32,
        /// This host's.
        current_khz: u32,
    },
}

impl HostFacts {
    /// This host's facts from KVM's supported CPUID, with a TSC frequency already known (or
    /// `None`: [`check_compatible`] then leaves the TSC to the vCPU restore, which checks it
    /// too), without a scratch VM.
    pub fn from_cpuid(kvm: &Kvm, cpuid: &CpuId, tsc_khz: Option<u32>) -> Result<Self, CompatError> {
        let sig = cpuid::signature(cpuid.as_slice()).ok_or(CompatError::NoSignature)?;
        Ok(Self {
            vendor: sig.vendor,
            family: sig.family,
            model: sig.model,
            stepping: sig.stepping,
            tsc_khz,
            tsc_scaling: kvm.check_extension(Cap::TscControl),
            kvm: KvmFlavour::detect().name().to_owned(),
        })
    }
}

/// Whether a snapshot taken on `saved` can be restored on `current`: the same CPU vendor,
/// family and model (the stepping may differ), the same KVM flavour, and a TSC frequency KVM
/// tolerates or can scale to. The first mismatch is the error.
pub fn check_compatible(saved: &HostFacts, current: &HostFacts) -> Result<(), CompatError> {
    if saved.vendor != current.vendor {
        return Err(CompatError::Vendor {
            saved: saved.vendor.clone(),
            current: current.vendor.clone(),
        });
    }
    if (saved.family, saved.model) != (current.family, current.model) {
        return Err(CompatError::CpuModel {
            saved: (saved.family, saved.model),
            current: (current.family, current.model),
        });
    }
    if saved.kvm != current.kvm {
        return Err(CompatError::Flavour {
            saved: saved.kvm.clone(),
            current: current.kvm.clone(),
        });
    }
    if let (Some(saved_khz), Some(current_khz)) = (saved.tsc_khz, current.tsc_khz) {
        let tolerated = vcpu_state::tsc_within_tolerance(
            saved_khz,
            current_khz,
            vcpu_state::tsc_tolerance_ppm(),
        );
        if !tolerated && !current.tsc_scaling {
            return Err(CompatError::TscFrequency {
                saved_khz,
                current_khz,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> HostFacts {
        HostFacts {
            vendor: "GenuineIntel".into(),
            family: 6,
            model: 0x8f,
            stepping: 8,
            tsc_khz: Some(2_300_000),
            tsc_scaling: false,
            kvm: "kvm_pvm".into(),
        }
    }

    #[test]
    fn the_same_host_and_another_stepping_are_compatible() {
        check_compatible(&facts(), &facts()).unwrap();
        let other_stepping = HostFacts {
            stepping: 3,
            ..facts()
        };
        check_compatible(&facts(), &other_stepping).unwrap();
        let close_tsc = HostFacts {
            tsc_khz: Some(2_300_100),
            ..facts()
        };
        check_compatible(&facts(), &close_tsc).unwrap();
    }

    #[test]
    fn each_mismatch_has_its_error() {
        let amd = HostFacts {
            vendor: "AuthenticAMD".into(),
            ..facts()
        };
        let e = check_compatible(&facts(), &amd).unwrap_err();
        assert!(matches!(e, CompatError::Vendor { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "the snapshot was taken on a GenuineIntel CPU, this host's is AuthenticAMD"
        );
        let model = HostFacts {
            model: 0x6a,
            ..facts()
        };
        let e = check_compatible(&facts(), &model).unwrap_err();
        assert!(matches!(e, CompatError::CpuModel { .. }), "{e:?}");
        assert!(e.to_string().contains("model 0x8f"), "{e}");
        let vmx = HostFacts {
            kvm: "vmx".into(),
            ..facts()
        };
        let e = check_compatible(&facts(), &vmx).unwrap_err();
        assert!(matches!(e, CompatError::Flavour { .. }), "{e:?}");
        let slow = HostFacts {
            tsc_khz: Some(2_000_000),
            ..facts()
        };
        let e = check_compatible(&facts(), &slow).unwrap_err();
        assert!(
            matches!(
                e,
                CompatError::TscFrequency {
                    saved_khz: 2_300_000,
                    current_khz: 2_000_000
                }
            ),
            "{e:?}"
        );
        // A KVM that scales the TSC takes any frequency.
        let scaling = HostFacts {
            tsc_scaling: true,
            ..slow
        };
        check_compatible(&facts(), &scaling).unwrap();
    }

    #[test]
    fn facts_print_on_one_line() {
        assert_eq!(
            facts().to_string(),
            "GenuineIntel family 0x6 model 0x8f stepping 8, TSC 2300000 kHz, KVM kvm_pvm"
        );
    }

    #[test]
    fn facts_survive_serde() {
        let f = facts();
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<HostFacts>(&json).unwrap(), f);
    }
}
