//! KVM state: the VM file descriptor with its memory, and the vCPUs; for snapshots, the saved
//! state of both, pausing the vCPUs to save it, and the host facts a snapshot depends on.

pub mod control;
pub mod host_facts;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;

#[cfg(test)]
mod snapshot_tests;
