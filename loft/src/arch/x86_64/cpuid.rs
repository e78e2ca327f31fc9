//! Per-vCPU CPUID: what KVM supports, with each vCPU's APIC id and the VM's topology filled in
//! and the hypervisor bit set, so the guest finds KVM (kvm-clock) and brings up every vCPU.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_POWER_MGMT: u32 = 0x8000_0007;
const LEAF_AMD_ADDR_SIZES: u32 = 0x8000_0008;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EDX_INVARIANT_TSC: u32 = 1 << 8;

/// Adjusts `cpuid` (as returned by `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_id` of `cpu_count`.
/// `tsc_deadline` says whether KVM's in-kernel LAPIC offers the TSC-deadline timer.
pub fn adjust(cpuid: &mut CpuId, cpu_id: u8, cpu_count: u8, tsc_deadline: bool) {
    // Bits of the APIC id that number the cores in the package.
    let core_bits = u32::BITS - (u32::from(cpu_count).saturating_sub(1)).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx =
                    (entry.ebx & 0xffff) | (u32::from(cpu_count) << 16) | (u32::from(cpu_id) << 24);
                entry.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1.
                entry.eax = (entry.eax & 0x03ff_ffff) | ((u32::from(cpu_count) - 1) << 26);
            }
            LEAF_PERFMON => {
                // No virtual PMU: the guest must not program counters KVM may not back.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                entry.edx = u32::from(cpu_id);
                match entry.index {
                    0 => {
                        // SMT level: one thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        // Core level: every vCPU is a core of one package.
                        entry.eax = core_bits;
                        entry.ebx = u32::from(cpu_count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    n => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = n;
                    }
                }
            }
            LEAF_POWER_MGMT => {
                // No invariant TSC (as QEMU's default): with it, Linux demotes kvm-clock below
                // the raw TSC clocksource, which is unreliable across vCPUs and migrations.
                entry.edx &= !EDX_INVARIANT_TSC;
            }
            LEAF_AMD_ADDR_SIZES => {
                entry.ecx = (entry.ecx & !0xff) | (u32::from(cpu_count) - 1);
            }
            _ => {}
        }
    }
}

/// Who made a CPU and which one it is, as CPUID leaves 0 and 1 say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSignature {
    /// The vendor string: `GenuineIntel`, `AuthenticAMD`, ...
    pub vendor: String,
    /// The family, with the extended family added as the SDM says.
    pub family: u32,
    /// The model, with the extended model added as the SDM says.
    pub model: u32,
    /// The stepping.
    pub stepping: u32,
}

/// Decodes vendor, family, model and stepping from CPUID entries (leaves 0 and 1, index 0).
pub fn signature(entries: &[kvm_cpuid_entry2]) -> Option<CpuSignature> {
    let leaf = |function: u32| {
        entries
            .iter()
            .find(|e| e.function == function && e.index == 0)
    };
    let vendor_leaf = leaf(0)?;
    let mut vendor = Vec::with_capacity(12);
    for reg in [vendor_leaf.ebx, vendor_leaf.edx, vendor_leaf.ecx] {
        vendor.extend_from_slice(&reg.to_le_bytes());
    }
    let eax = leaf(LEAF_FEATURES)?.eax;
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let mut model = (eax >> 4) & 0xf;
    if base_family == 0x6 || base_family == 0xf {
        model |= ((eax >> 16) & 0xf) << 4;
    }
    Some(CpuSignature {
        vendor: String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_owned(),
        family,
        model,
        stepping: eax & 0xf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn sets_apic_id_topology_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[
            entry(1, 0),
            entry(4, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0xa, 0),
            kvm_cpuid_entry2 {
                function: 0x8000_0007,
                edx: 0x100,
                ..Default::default()
            },
        ])
        .unwrap();
        adjust(&mut c, 3, 4, true);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3, "initial APIC id");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "other bits kept");
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].eax >> 26, 3);
        assert_eq!((e[2].ebx, e[2].edx), (1, 3));
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx, e[3].edx), (2, 4, 0x201, 3));
        assert_eq!((e[4].ebx, e[4].ecx), (0, 2));
        assert_eq!(e[5].eax, 0);
        assert_eq!(e[6].edx, 0, "no invariant TSC");
    }

    #[test]
    fn signature_decodes_vendor_family_model_stepping() {
        let vendor = kvm_cpuid_entry2 {
            function: 0,
            ebx: u32::from_le_bytes(*b"Genu"),
            edx: u32::from_le_bytes(*b"ineI"),
            ecx: u32::from_le_bytes(*b"ntel"),
            ..Default::default()
        };
        // Family 6, extended model 8, model 0xf, stepping 8: a Sapphire Rapids (0x8f).
        let leaf1 = kvm_cpuid_entry2 {
            function: 1,
            eax: 0x0008_06f8,
            ..Default::default()
        };
        let sig = signature(&[vendor, leaf1]).unwrap();
        assert_eq!(sig.vendor, "GenuineIntel");
        assert_eq!((sig.family, sig.model, sig.stepping), (6, 0x8f, 8));
        // AMD family 0x19: base family 0xf plus extended family 0xa.
        let zen = kvm_cpuid_entry2 {
            function: 1,
            eax: 0x00a0_0f11,
            ..Default::default()
        };
        let sig = signature(&[vendor, zen]).unwrap();
        assert_eq!((sig.family, sig.model, sig.stepping), (0x19, 1, 1));
        assert_eq!(signature(&[leaf1]), None, "no leaf 0");
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        c.as_mut_slice()[0].edx = EDX_HTT;
        adjust(&mut c, 0, 1, false);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(c.as_slice()[0].ecx & ECX_TSC_DEADLINE, 0);
    }
}
