//! Snapshots: a running VM saved to a directory, and restored from it in milliseconds.
//!
//! A snapshot directory holds two files:
//! - `memory`: guest RAM, region after region, sparse (pages of zeros are holes), mapped
//!   `MAP_PRIVATE` at restore: nothing is copied, pages load on first touch, the guest's writes
//!   stay private, and any number of VMs may map one file at once. It is never rewritten in
//!   place: a new snapshot into the same directory replaces it by rename.
//! - `state`: everything else (host facts, the memory layout, each vCPU's KVM state, the
//!   interrupt controllers and clock, each device), in the self-checking format of
//!   `snapshot::file`.
//!
//! `docs/snapshot.md` describes the format and its limits.

pub mod file;
pub mod memory;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device_manager::DevicesState;
use crate::vstate::host_facts::HostFacts;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;
use crate::Error;
pub use file::StateFileError;
pub use memory::{MemRegion, SnapshotMemoryError};

/// Name of the memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state";

/// What a VM was made of, as far as restoring (and `loft snapshot inspect`) needs to know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The kernel it booted (for information: restoring does not read it).
    pub kernel: PathBuf,
    /// The kernel command line it booted with (for information).
    pub cmdline: String,
    /// The vsock port of the guest agent, when the VM was started with one.
    pub agent_port: Option<u32>,
}

/// The whole `state` file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The loft that wrote it.
    pub loft_version: String,
    /// When it was written, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The host it was taken on, as far as restoring depends on it.
    pub host: HostFacts,
    /// What the VM was made of.
    pub machine: MachineConfig,
    /// Guest RAM in the memory file.
    pub memory: Vec<MemRegion>,
    /// Interrupt controllers, PIT, clock.
    pub vm: VmState,
    /// Every vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// Every device.
    pub devices: DevicesState,
}

impl SnapshotState {
    /// Checks what can be checked without the host: counts and sizes that must agree.
    fn check(&self) -> Result<(), SnapshotError> {
        let bad = |what: &'static str| Err(SnapshotError::Inconsistent(what));
        if self.machine.cpus == 0 || self.vcpus.len() != self.machine.cpus as usize {
            return bad("its vCPU count does not match its vCPU states");
        }
        if memory::total_size(&self.memory) != self.machine.memory {
            return bad("its memory layout does not add up to its memory size");
        }
        Ok(())
    }
}

/// Errors opening, taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The state file is missing, damaged or of another format.
    #[error("cannot read the snapshot's state")]
    State(#[from] StateFileError),
    /// The memory file is missing, too short, or cannot be written or mapped.
    #[error("cannot use the snapshot's memory")]
    Memory(#[from] SnapshotMemoryError),
    /// The state contradicts itself.
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// The snapshot directory cannot be created.
    #[error("cannot create the snapshot directory {}", .0.display())]
    Dir(PathBuf, #[source] std::io::Error),
    /// A restore option contradicts the snapshot.
    #[error("{what} cannot change at restore: the snapshot has {saved}, not {given}")]
    Contradicts {
        /// The option.
        what: &'static str,
        /// What the snapshot has.
        saved: String,
        /// What was given.
        given: String,
    },
    /// The snapshot was taken on a host this one cannot stand in for.
    #[error("the snapshot cannot be restored on this host")]
    Host(#[source] crate::vstate::host_facts::CompatError),
    /// KVM refused the VM's saved interrupt controllers, PIT or clock, or could not give them.
    #[error("cannot save or restore the VM's interrupt controllers, PIT or clock")]
    VmState(#[source] crate::vstate::vm_state::VmStateError),
    /// The vCPUs could not be paused or saved.
    #[error("cannot pause and save the vCPUs")]
    Vcpus(#[source] crate::vstate::control::ControlError),
    /// A device could not be saved.
    #[error("cannot save the devices")]
    Devices(#[source] crate::device_manager::DeviceManagerError),
    /// A boot-only option was given at restore.
    #[error(
        "{0} cannot be given with a snapshot to restore: the snapshot already holds the guest"
    )]
    BootOnly(&'static str),
}

/// A snapshot opened from its directory: the state read and checked, the memory file found.
/// Cheap to clone; restoring does not change it, so one snapshot may be restored many times.
#[derive(Clone, Debug)]
pub struct Snapshot {
    dir: PathBuf,
    state: Arc<SnapshotState>,
}

impl Snapshot {
    /// Opens the snapshot in `dir`: reads and checks its `state` file and checks that its
    /// `memory` file covers the memory the state describes.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, Error> {
        let dir = dir.as_ref().to_path_buf();
        let state: SnapshotState =
            file::read(&dir.join(STATE_FILE)).map_err(SnapshotError::State)?;
        state.check()?;
        let mem = dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&mem)
            .map_err(|source| {
                SnapshotError::Memory(SnapshotMemoryError::Io {
                    what: "open",
                    path: mem.clone(),
                    source,
                })
            })?
            .len();
        if len < state.machine.memory {
            return Err(SnapshotError::Memory(SnapshotMemoryError::TooShort {
                path: mem,
                len,
                needed: state.machine.memory,
            })
            .into());
        }
        Ok(Self {
            dir,
            state: Arc::new(state),
        })
    }

    /// The snapshot's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest context id of the saved vsock device, if the VM has one.
    pub(crate) fn vsock_cid(&self) -> Option<u64> {
        use loft_devices::virtio::VirtioDeviceState as D;
        self.state
            .devices
            .virtio
            .iter()
            .find_map(|d| match &d.device {
                D::Vsock(v) => Some(v.guest_cid),
                _ => None,
            })
    }

    /// What the snapshot holds.
    pub fn info(&self) -> SnapshotInfo {
        let s = &self.state;
        let on_disk = std::fs::metadata(self.dir.join(MEMORY_FILE))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks() * 512
            })
            .unwrap_or(0);
        SnapshotInfo {
            dir: self.dir.clone(),
            loft_version: s.loft_version.clone(),
            created_unix_ms: s.created_unix_ms,
            cpus: s.machine.cpus,
            memory: s.machine.memory,
            memory_on_disk: on_disk,
            kernel: s.machine.kernel.clone(),
            agent_port: s.machine.agent_port,
            devices: s
                .devices
                .virtio
                .iter()
                .map(|d| describe_device(&d.device))
                .collect(),
            host: s.host.to_string(),
        }
    }

    /// Restores the VM with every default: a fresh vsock socket for its agent, the saved disk
    /// images and TAP devices, the console discarded. [`crate::VmBuilder::restore_from`] takes
    /// options.
    pub fn restore(&self) -> Result<crate::VmHandle, Error> {
        crate::VmBuilder::new().restore_from(self.clone()).start()
    }

    pub(crate) fn state(&self) -> &SnapshotState {
        &self.state
    }

    pub(crate) fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

fn describe_device(d: &loft_devices::virtio::VirtioDeviceState) -> String {
    use loft_devices::virtio::VirtioDeviceState as D;
    match d {
        D::Block(b) => format!(
            "virtio-blk {} ({} MiB{})",
            b.path.display(),
            b.capacity / 2048,
            if b.read_only { ", read-only" } else { "" }
        ),
        D::Net(n) => format!(
            "virtio-net tap={}",
            n.tap_name.as_deref().unwrap_or("(none)")
        ),
        D::Vsock(v) => format!("virtio-vsock cid={}", v.guest_cid),
    }
}

/// What a snapshot holds, as `loft snapshot inspect` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its directory.
    pub dir: PathBuf,
    /// The loft that wrote it.
    pub loft_version: String,
    /// When, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// What the memory file takes on disk, in bytes.
    pub memory_on_disk: u64,
    /// The kernel the VM booted.
    pub kernel: PathBuf,
    /// The guest agent's vsock port, when the VM has one.
    pub agent_port: Option<u32>,
    /// Its virtio devices, one line each.
    pub devices: Vec<String>,
    /// The host facts it depends on.
    pub host: String,
}

impl fmt::Display for SnapshotInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        writeln!(f, "snapshot:   {}", self.dir.display())?;
        writeln!(f, "loft:       {}", self.loft_version)?;
        writeln!(
            f,
            "created:    {} ms after the Unix epoch",
            self.created_unix_ms
        )?;
        writeln!(f, "vcpus:      {}", self.cpus)?;
        writeln!(
            f,
            "memory:     {:.0} MiB, {:.1} MiB on disk",
            mib(self.memory),
            mib(self.memory_on_disk)
        )?;
        writeln!(f, "kernel:     {}", self.kernel.display())?;
        match self.agent_port {
            Some(p) => writeln!(f, "agent:      vsock port {p}")?,
            None => writeln!(f, "agent:      none")?,
        }
        for d in &self.devices {
            writeln!(f, "device:     {d}")?;
        }
        write!(f, "host:       {}", self.host)
    }
}
