//! loft: a KVM micro-VM monitor as a library. Boot a Linux guest, run commands in it through
//! its guest agent, stop it, and keep many such VMs in one process.
//!
//! ```no_run
//! use loft::{ExecRequest, VmBuilder};
//!
//! let mut vm = VmBuilder::new().cpus(1).memory_mib(128).start()?; // the bundled guest
//! let out = vm.exec(&ExecRequest::new(["/bin/sh", "-c", "uname -r; exit 3"]))?;
//! println!("{} {:?}", String::from_utf8_lossy(&out.stdout), out.status);
//! vm.kill()?;
//! # Ok::<(), loft::Error>(())
//! ```
//!
//! The public API is small: [`VmBuilder`] describes a VM and starts it, [`VmHandle`] controls a
//! running one, [`VmConfig`] and its parts are the configuration, [`Error`] (with the causes in
//! [`error`]) is what can go wrong. Everything else is internal.
//!
//! Inside, in the order a VM is made: `config` (what the user asked for), `loader` (kernel,
//! initrd, command line), `arch` (the x86_64 memory map and boot structures), `vstate` (the KVM
//! VM, its memory and vCPUs), `device_manager` (where each device goes), `builder` (the build
//! phases), `vmm` (the event loop, running and stopping), `sandbox` (the handle API).

#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
mod arch;
mod boot_timer;
mod builder;
mod config;
mod console;
mod device_manager;
mod event_loop;
mod host;
pub mod isolated;
mod jail;
mod loader;
mod sandbox;
pub mod seccomp;
mod snapshot;
mod stop;
mod vmm;
mod vstate;

pub use boot_timer::{BootTimes, Mark};
pub use config::{DiskConfig, MemSize, NetConfig, VmConfig, VsockConfig};
pub use host::KvmFlavour;
pub use isolated::IsolatedError;
pub use jail::Jail;
pub use loft_agent::client::{
    DirEntry, ExitStatus, FileError, FileType, Output, Process, ProcessInput, ProcessOutput,
};
pub use loft_agent::{ExecRequest, Resource, DEFAULT_OUTPUT_LIMIT, UNLIMITED};
pub use sandbox::{
    VmBuilder, VmHandle, AGENT_CID, AGENT_PORT, CONSOLE_CAPTURE_LIMIT, DEFAULT_AGENT_TIMEOUT,
};
pub use snapshot::{Snapshot, SnapshotInfo};
pub use stop::StopReason;

/// The causes an [`Error`] carries, one type per part of loft.
pub mod error {
    /// `e` and its chain of causes on one line, `what: why: …`. loft's messages leave their
    /// cause out (it is their `source()`), so nothing is said twice; the `loft` command prints
    /// its errors this way.
    pub fn chain(e: &dyn std::error::Error) -> String {
        let mut line = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            line.push_str(": ");
            line.push_str(&c.to_string());
            cause = c.source();
        }
        line
    }

    pub use crate::api::ApiError;
    pub use crate::arch::x86_64::boot_params::BootParamsError;
    pub use crate::arch::x86_64::mptable::MptableError;
    pub use crate::arch::x86_64::msrs::MsrError;
    pub use crate::config::ConfigError;
    pub use crate::device_manager::DeviceManagerError;
    pub use crate::jail::JailError;
    pub use crate::loader::LoaderError;
    pub use crate::seccomp::SeccompError;
    pub use crate::snapshot::{SnapshotError, SnapshotMemoryError, StateFileError};
    pub use crate::vstate::control::ControlError;
    pub use crate::vstate::host_facts::CompatError;
    pub use crate::vstate::memory::MemoryError;
    pub use crate::vstate::vcpu::VcpuError;
    pub use crate::vstate::vcpu_state::VcpuStateError;
    pub use crate::vstate::vm::VmError;
    pub use crate::vstate::vm_state::VmStateError;
    pub use loft_agent::client::AgentError;
    pub use loft_devices::serial::SerialError;
    pub use loft_devices::virtio::block::BlockError;
    pub use loft_devices::virtio::net::NetError;
    pub use loft_devices::virtio::vsock::VsockError;
    pub use loft_devices::virtio::Error as VirtioError;
}

/// Everything that can go wrong building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// KVM or the VM could not be set up.
    #[error(transparent)]
    Vm(#[from] vstate::vm::VmError),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] vstate::memory::MemoryError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] vstate::vcpu::VcpuError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] arch::x86_64::mptable::MptableError),
    /// The zero page or PVH start info could not be written.
    #[error(transparent)]
    BootParams(#[from] arch::x86_64::boot_params::BootParamsError),
    /// A disk (or the --root image) could not be opened.
    #[error("disk {}", path.display())]
    Disk {
        /// The image file.
        path: std::path::PathBuf,
        /// Why.
        source: loft_devices::virtio::block::BlockError,
    },
    /// A network interface could not be set up.
    #[error("--net tap={tap}")]
    Net {
        /// The TAP device name.
        tap: String,
        /// Why.
        source: loft_devices::virtio::net::NetError,
    },
    /// The vsock device could not be set up.
    #[error("--vsock uds={}", uds.display())]
    Vsock {
        /// The Unix socket path.
        uds: std::path::PathBuf,
        /// Why.
        source: loft_devices::virtio::vsock::VsockError,
    },
    /// A device could not be placed.
    #[error(transparent)]
    DeviceManager(#[from] device_manager::DeviceManagerError),
    /// The event loop failed.
    #[error("the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// A snapshot could not be taken, opened or restored.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// The VM is not running (any more).
    #[error("the VM is not running")]
    NotRunning,
    /// The VM stopped before it was ready to be snapshotted.
    #[error("the VM stopped before it was ready ({0})")]
    StoppedBeforeReady(StopReason),
    /// The VM's result was already collected by an earlier wait.
    #[error("the VM's result was already collected")]
    AlreadyWaited,
    /// The VM was started without the agent channel.
    #[error("this VM has no guest agent channel (built with without_agent)")]
    NoAgent,
    /// The VM stopped before its agent answered.
    #[error("the VM stopped before its guest agent answered")]
    AgentGone,
    /// The command ran past its [`ExecRequest::timeout`] and was killed.
    #[error("the command did not end within {0:?}; it was killed")]
    ExecTimeout(std::time::Duration),
    /// Talking to the guest agent failed.
    #[error("guest agent")]
    Agent(#[from] loft_agent::client::AgentError),
    /// A seccomp filter could not be set up.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The child `loft` process of an isolated VM ([`VmBuilder::isolated`]) could not be
    /// found, started or driven.
    #[error(transparent)]
    Isolated(#[from] isolated::IsolatedError),
    /// The process could not confine itself in its jail ([`VmBuilder::jail`]).
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// The control API's socket or thread could not be set up.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The VMM thread panicked (a bug in loft).
    #[error("the VMM thread panicked")]
    VmmPanicked,
    /// A host resource (thread, eventfd, stdin) failed.
    #[error("cannot {what}")]
    Host {
        /// What loft was doing.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}
