//! The KVM VM: in-kernel interrupt controllers and PIT, the TSS and identity-map pages, and the
//! guest memory slots.

use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout;

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` is not there.
    #[error(
        "{path} does not exist: KVM is not available on this host (is the kvm module loaded?)"
    )]
    KvmMissing {
        /// The device path.
        path: PathBuf,
    },
    /// `/dev/kvm` is there but cannot be opened.
    #[error("cannot open {path} (does this user have access to it?)")]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// The error from open.
        source: kvm_ioctls::Error,
    },
    /// The device answers, but not as KVM.
    #[error("{path} is not a KVM device (KVM API version {version}, expected 12)")]
    NotKvm {
        /// The device path.
        path: PathBuf,
        /// What it answered.
        version: i32,
    },
    /// A KVM capability loft depends on is missing.
    #[error("KVM lacks a capability loft needs: {0:?}")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What loft was doing.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Opens the KVM device at `path`.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    if !path.exists() {
        return Err(VmError::KvmMissing {
            path: path.to_owned(),
        });
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::KvmOpen {
            path: path.to_owned(),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        }
    })?;
    let kvm = Kvm::new_with_path(c_path).map_err(|source| VmError::KvmOpen {
        path: path.to_owned(),
        source,
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::NotKvm {
            path: path.to_owned(),
            version,
        });
    }
    Ok(kvm)
}

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// Creates a VM with the in-kernel IOAPIC/PIC/LAPIC and PIT.
pub fn create(kvm: &Kvm) -> Result<VmFd, VmError> {
    for cap in [
        Cap::Irqchip,
        Cap::UserMemory,
        Cap::SetTssAddr,
        Cap::Ioeventfd,
        Cap::Irqfd,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    let vm = kvm.create_vm().map_err(ioctl("create a VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(ioctl("set the TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR)
        .map_err(ioctl("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(ioctl("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(ioctl("create the in-kernel PIT"))?;
    Ok(vm)
}

/// Registers every region of `mem` as a KVM memory slot.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::Kvm {
                what: "map guest memory",
                source: kvm_ioctls::Error::new(libc::EFAULT),
            })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range [userspace_addr, +memory_size) is one live mapping owned by
        // `mem`, which the VM keeps (through the Vmm) for as long as the VM fd exists, and slots
        // do not overlap because the regions of a GuestMemoryMmap do not.
        unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("register guest memory"))?;
    }
    Ok(())
}
