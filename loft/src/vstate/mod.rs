//! KVM state: the VM file descriptor with its memory, and the vCPUs; for snapshots, the saved
//! state of both, pausing the vCPUs to save it, and the host facts a snapshot depends on.

// The snapshot parts are called by the VMM's snapshot and restore paths, which are being
// written: until then only the tests call some of them.
#[allow(dead_code)]
pub mod control;
#[allow(dead_code)]
pub mod host_facts;
pub mod memory;
pub mod vcpu;
#[allow(dead_code)]
pub mod vcpu_state;
pub mod vm;
#[allow(dead_code)]
pub mod vm_state;

#[cfg(test)]
mod snapshot_tests;
