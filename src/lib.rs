//! loft: a KVM micro-VM monitor that boots a Linux guest in milliseconds.
//!
//! The crate is both the `loft` command and a library. Building blocks, in the order a VM is
//! made: [`config`] (what the user asked for), [`loader`] (kernel, initrd, command line),
//! [`arch`] (the x86_64 memory map and boot structures), [`vstate`] (the KVM VM, its memory and
//! vCPUs), [`vmm`] (devices, the event loop, running and stopping).

pub mod agent_client;
pub mod arch;
pub mod boot_timer;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod host;
pub mod loader;
pub mod sandbox;
pub mod stop;
pub mod vmm;
pub mod vstate;

pub use boot_timer::{BootTimes, Timeline};
pub use config::{DiskConfig, MemSize, NetConfig, VmConfig, VsockConfig};
pub use host::KvmFlavour;
pub use sandbox::{VmBuilder, VmHandle};
pub use stop::StopReason;
pub use vmm::Vmm;

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
    #[error("disk {}: {source}", path.display())]
    Disk {
        /// The image file.
        path: std::path::PathBuf,
        /// Why.
        source: loft_devices::virtio::block::BlockError,
    },
    /// A network interface could not be set up.
    #[error("--net tap={tap}: {source}")]
    Net {
        /// The TAP device name.
        tap: String,
        /// Why.
        source: loft_devices::virtio::net::NetError,
    },
    /// The vsock device could not be set up.
    #[error("--vsock uds={}: {source}", uds.display())]
    Vsock {
        /// The Unix socket path.
        uds: std::path::PathBuf,
        /// Why.
        source: loft_devices::virtio::vsock::VsockError,
    },
    /// A device could not be placed.
    #[error(transparent)]
    DeviceManager(#[from] device_manager::DeviceManagerError),
    /// Devices could not be placed.
    #[error("cannot set up devices: {0}")]
    Devices(String),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// The VM's result was already collected by an earlier wait.
    #[error("the VM's result was already collected")]
    AlreadyWaited,
    /// The VM was started without the agent channel.
    #[error("this VM has no guest agent channel (built with without_agent)")]
    NoAgent,
    /// The VM stopped before its agent answered.
    #[error("the VM stopped before its guest agent answered")]
    AgentGone,
    /// Talking to the guest agent failed.
    #[error("guest agent: {0}")]
    Agent(#[from] agent_client::AgentError),
    /// The VMM thread panicked (a bug in loft).
    #[error("the VMM thread panicked")]
    VmmPanicked,
    /// A host resource (thread, eventfd, stdin) failed.
    #[error("cannot {what}: {source}")]
    Host {
        /// What loft was doing.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}
