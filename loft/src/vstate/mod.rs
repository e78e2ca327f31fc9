//! KVM state: the VM file descriptor with its memory, and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
