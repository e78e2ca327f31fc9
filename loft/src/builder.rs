//! Builds a VM in named phases: check the configuration, create the KVM VM and its memory
//! (loading the guest meanwhile), attach the devices, write the boot structures, create the
//! vCPUs. Each phase is a function of its own, so that restoring a VM from a snapshot reuses the
//! ones it shares with a boot.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VmFd};
use loft_devices::boot_timer::BOOT_TIMER_PORT;
use loft_devices::serial::ConsoleOut;
use loft_devices::virtio::block::Block;
use loft_devices::virtio::net::Net;
use loft_devices::virtio::vsock::Vsock;
use loft_devices::virtio::VirtioMmioDevice;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::boot_params::InitrdPlacement;
use crate::arch::x86_64::regs::EntryPoint;
use crate::arch::x86_64::{boot_params, layout, mptable};
use crate::boot_timer::Timeline;
use crate::config::{default_kvm_device, ConfigError, VmConfig};
use crate::device_manager::{
    DeviceManager, DeviceManagerError, DeviceOverrides, DevicesState, LegacyDevices,
};
use crate::event_loop::EventLoop;
use crate::host::KvmFlavour;
use crate::loader::{self, KernelImage, LoadedKernel};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, MachineConfig, Snapshot, SnapshotError};
use crate::stop::StopNotifier;
use crate::vmm::{Vmm, VmmParts};
use crate::vstate::control::VcpuControl;
use crate::vstate::host_facts::{self, HostFacts};
use crate::vstate::vcpu::{self, Vcpu, VcpuContext};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::{self, ClockMode};
use crate::vstate::{memory, vm};
use crate::Error;

/// Builds a VM that boots `config`'s kernel. Nothing runs yet; the guest's console output goes
/// to `console`, and the phases are recorded in `timeline`. With `seccomp`, the loader threads
/// confine themselves with their filter.
pub fn build_microvm_for_boot(
    config: &VmConfig,
    machine: MachineConfig,
    console: ConsoleOut,
    timeline: Arc<Timeline>,
    seccomp: bool,
) -> Result<Vmm, Error> {
    let mut guest = check_config(config)?;
    let kvm = open_kvm(config)?;
    let mem = memory::create(config.memory.bytes())?;
    let (vm, loaded, initrd_at) = create_vm_while_loading(&kvm, &mem, &mut guest, seccomp)?;
    let mut a = Assembly::new(kvm, vm, mem, console, None, timeline)?;
    attach_virtio_devices(config, &a.vm, &a.mem, &mut a.event_loop, &mut a.devices)?;
    let flavour = KvmFlavour::detect();
    write_boot_structures(config, &a.mem, &a.devices, flavour, &loaded, initrd_at)?;
    if flavour.guest_cmdline().is_some() {
        log::info!(
            "host KVM is {}: added its guest kernel parameters (clearcpuid=...) to the command line",
            flavour.name()
        );
    }
    let vmm = a.finish(machine, VcpuInit::Boot(loaded.entry))?;
    vmm.timeline().mark(|t| &mut t.vm_built);
    Ok(vmm)
}

/// Builds a VM that continues where `snapshot` was taken: its memory mapped from the snapshot's
/// memory file, the interrupt controllers, clock, devices and vCPUs set from its state. The
/// host resources come from `overrides` where it names them, else from the snapshot.
pub fn build_microvm_from_snapshot(
    snapshot: &Snapshot,
    overrides: &DeviceOverrides,
    console: ConsoleOut,
    timeline: Arc<Timeline>,
) -> Result<Vmm, Error> {
    let state = snapshot.state();
    let machine = state.machine.clone();
    let kvm = open_kvm_for(&default_kvm_device(), machine.cpus)?;
    host_facts::check_compatible(&state.host, &host_facts(&kvm, None)?)
        .map_err(SnapshotError::Host)?;
    let mem = snapshot::memory::map(&snapshot.memory_path(), machine.memory, &state.memory)
        .map_err(SnapshotError::Memory)?;
    let vm = create_vm(&kvm, &mem)?;
    vm_state::restore_with_clock(&vm, &state.vm, ClockMode::Continue)
        .map_err(SnapshotError::VmState)?;
    let mut a = Assembly::new(kvm, vm, mem, console, Some(&state.devices), timeline)?;
    a.devices.restore_virtio(
        &a.vm,
        &a.mem,
        &mut a.event_loop,
        &state.devices.virtio,
        overrides,
    )?;
    let vmm = a.finish(machine, VcpuInit::Restore(&state.vcpus))?;
    vmm.timeline().mark(|t| &mut t.restored);
    Ok(vmm)
}

/// A VM being put together, boot and restore alike: KVM, the VM and its memory, the event loop,
/// the stop event, and the devices so far.
struct Assembly {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    event_loop: EventLoop,
    notifier: Arc<StopNotifier>,
    devices: DeviceManager,
    legacy: LegacyDevices,
    timeline: Arc<Timeline>,
}

impl Assembly {
    /// Phase 3a: the event loop, the stop event, and the legacy devices (the console UART, the
    /// i8042 whose reset line writes the stop event, the boot timer) on the port-I/O bus — as
    /// new, or as `saved` left them.
    fn new(
        kvm: Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
        console: ConsoleOut,
        saved: Option<&DevicesState>,
        timeline: Arc<Timeline>,
    ) -> Result<Self, Error> {
        let event_loop = EventLoop::new().map_err(Error::EventLoop)?;
        let notifier = Arc::new(StopNotifier::new().map_err(sys("create the stop event"))?);
        let reset_evt = notifier
            .event()
            .try_clone()
            .map_err(sys("clone the stop event"))?;
        let legacy = LegacyDevices::new(&vm, console, reset_evt, &timeline, saved)?;
        let mut devices = DeviceManager::new();
        devices.add_legacy(&legacy)?;
        Ok(Self {
            kvm,
            vm,
            mem,
            event_loop,
            notifier,
            devices,
            legacy,
            timeline,
        })
    }

    /// Phase 5: the vCPUs (see [`create_vcpus`]), and the VMM that runs them.
    fn finish(self, machine: MachineConfig, init: VcpuInit<'_>) -> Result<Vmm, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let control = VcpuControl::new(&self.kvm, machine.cpus as u8);
        let shared = VcpuShared {
            devices: &self.devices,
            notifier: &self.notifier,
            stop: &stop,
            timeline: &self.timeline,
            control: &control,
        };
        let vcpus = create_vcpus(machine.cpus, &self.kvm, &self.vm, &self.mem, &shared, init)?;
        Ok(Vmm::new(VmmParts {
            vcpus,
            event_loop: self.event_loop,
            notifier: self.notifier,
            stop,
            control,
            legacy: self.legacy,
            devices: self.devices,
            vm: self.vm,
            kvm: self.kvm,
            mem: self.mem,
            machine,
            timeline: self.timeline,
        }))
    }
}

/// What KVM supports of CPUID on this host, asked once per process (about a millisecond each
/// time here).
fn supported_cpuid(kvm: &Kvm) -> Result<&'static CpuId, Error> {
    static CPUID: OnceLock<CpuId> = OnceLock::new();
    if let Some(c) = CPUID.get() {
        return Ok(c);
    }
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report its CPUID"))?;
    Ok(CPUID.get_or_init(|| cpuid))
}

/// This host's facts, with the TSC frequency the VM's vCPUs have (`None` at restore, where
/// each vCPU's restore checks its TSC frequency itself).
pub fn host_facts(kvm: &Kvm, tsc_khz: Option<u32>) -> Result<HostFacts, Error> {
    HostFacts::from_cpuid(kvm, supported_cpuid(kvm)?, tsc_khz)
        .map_err(|e| SnapshotError::Host(e).into())
}

/// The guest's kernel and initrd, opened and measured.
struct GuestImages<'a> {
    kernel: KernelImage,
    initrd: Option<(&'a std::path::Path, std::fs::File, u64)>,
}

/// Phase 1: everything about the configuration that can be checked before KVM is touched, so
/// that user mistakes are reported first: vCPU count, kernel format and footprint, initrd,
/// memory size against both.
fn check_config(config: &VmConfig) -> Result<GuestImages<'_>, Error> {
    if config.cpus == 0 {
        return Err(ConfigError::NoCpus.into());
    }
    let kernel = loader::probe_kernel(&config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => {
            let (file, len) = loader::open_initrd(path)?;
            Some((path.as_path(), file, len))
        }
        None => None,
    };
    let initrd_len = initrd.as_ref().map_or(0, |(_, _, len)| *len);
    loader::check_memory(config.memory.bytes(), kernel.end, initrd_len)?;
    Ok(GuestImages { kernel, initrd })
}

/// Opens KVM and checks the vCPU count against what it (and the MP table) allow.
fn open_kvm(config: &VmConfig) -> Result<Kvm, Error> {
    open_kvm_for(&config.kvm_device, config.cpus)
}

fn open_kvm_for(device: &std::path::Path, cpus: u32) -> Result<Kvm, Error> {
    let kvm = vm::open_kvm(device)?;
    let max_cpus = (kvm.get_max_vcpus() as u32).min(mptable::MAX_CPUS);
    if cpus > max_cpus {
        return Err(ConfigError::TooManyCpus {
            asked: cpus,
            max: max_cpus,
        }
        .into());
    }
    Ok(kvm)
}

/// Phase 2: the KVM VM with `mem` registered, while the kernel and the initramfs are copied
/// into `mem` on two `loft-load` threads. Copying into fresh guest memory (page faults, mostly)
/// is the bulk of start-up; the two images land in disjoint ranges (the initramfs goes above
/// the kernel's end).
fn create_vm_while_loading(
    kvm: &Kvm,
    mem: &GuestMemoryMmap,
    guest: &mut GuestImages<'_>,
    seccomp: bool,
) -> Result<(VmFd, LoadedKernel, Option<InitrdPlacement>), Error> {
    std::thread::scope(|s| -> Result<_, Error> {
        let kernel_end = guest.kernel.end;
        let loader = || std::thread::Builder::new().name("loft-load".into());
        let initrd_job = match guest.initrd.as_mut() {
            Some((path, file, len)) => {
                let (path, len) = (*path, *len);
                Some(
                    loader()
                        .spawn_scoped(s, move || {
                            seccomp::confine_if(seccomp, ThreadKind::Loader)?;
                            Ok::<_, Error>(loader::load_initrd(mem, path, file, len, kernel_end)?)
                        })
                        .map_err(sys("start a loader thread"))?,
                )
            }
            None => None,
        };
        let kernel = &mut guest.kernel;
        let kernel_job = loader()
            .spawn_scoped(s, move || {
                seccomp::confine_if(seccomp, ThreadKind::Loader)?;
                Ok::<_, Error>(loader::load_kernel(mem, kernel)?)
            })
            .map_err(sys("start a loader thread"))?;
        let vm_fd = create_vm(kvm, mem);
        /// A loader thread's result (a panic there is a bug: it goes on here).
        fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
            h.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }
        let loaded = join(kernel_job);
        let initrd_at = initrd_job.map(join).transpose();
        Ok((vm_fd?, loaded?, initrd_at?))
    })
}

/// The KVM VM (irqchip, PIT, TSS) with `mem` as its memory slots.
pub fn create_vm(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd, Error> {
    let vm_fd = vm::create(kvm)?;
    vm::register_memory(&vm_fd, mem)?;
    Ok(vm_fd)
}

/// Phase 3b: the disks, network interfaces and vsock device the config asks for, in order.
pub fn attach_virtio_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    event_loop: &mut EventLoop,
    devices: &mut DeviceManager,
) -> Result<(), Error> {
    for disk in &config.disks {
        let block = Block::new(&disk.path, disk.read_only).map_err(|source| Error::Disk {
            path: disk.path.clone(),
            source,
        })?;
        devices.add_disk(vm, mem, block)?;
    }
    for net in &config.nets {
        let nic = Net::new(&net.tap, net.mac).map_err(|source| Error::Net {
            tap: net.tap.clone(),
            source,
        })?;
        devices.add_virtio(vm, event_loop, wrap(nic, mem)?)?;
    }
    if let Some(vsock) = &config.vsock {
        let dev = Vsock::new(vsock.cid, &vsock.uds).map_err(|source| Error::Vsock {
            uds: vsock.uds.clone(),
            source,
        })?;
        devices.add_virtio(vm, event_loop, wrap(dev, mem)?)?;
    }
    Ok(())
}

/// A virtio device in its virtio-mmio transport.
fn wrap<D>(device: D, mem: &GuestMemoryMmap) -> Result<VirtioMmioDevice, Error>
where
    D: loft_devices::virtio::VirtioDevice + event_manager::MutEventSubscriber + 'static,
{
    VirtioMmioDevice::new(device, mem.clone()).map_err(|e| DeviceManagerError::Virtio(e).into())
}

/// Phase 4: the kernel command line (the user's, the host's needs, loft's devices), the MP
/// table, and the zero page or PVH start info.
fn write_boot_structures(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    devices: &DeviceManager,
    flavour: KvmFlavour,
    loaded: &LoadedKernel,
    initrd_at: Option<InitrdPlacement>,
) -> Result<(), Error> {
    let mut loft_params = vec![format!("loft_boot_timer={BOOT_TIMER_PORT:#x}")];
    loft_params.extend_from_slice(devices.cmdline_entries());
    let cmdline = loader::build_cmdline(&config.cmdline, flavour.guest_cmdline(), &loft_params)?;
    let cmdline_len = loader::write_cmdline(mem, &cmdline)?;
    mptable::setup(mem, config.cpus)?;
    let map = layout::memory_map(config.memory.bytes());
    match loaded.entry {
        EntryPoint::Pvh(_) => boot_params::write_pvh_start_info(mem, initrd_at, &map)?,
        EntryPoint::Linux64(_) => {
            let params = boot_params::build_zero_page(
                loaded.setup_header,
                cmdline_len + 1,
                initrd_at,
                &map,
            )?;
            boot_params::write_zero_page(mem, &params)?;
        }
    }
    Ok(())
}

/// What every vCPU of a VM shares with the VMM.
struct VcpuShared<'a> {
    /// Where the buses come from.
    devices: &'a DeviceManager,
    notifier: &'a Arc<StopNotifier>,
    stop: &'a Arc<AtomicBool>,
    timeline: &'a Arc<Timeline>,
    control: &'a Arc<VcpuControl>,
}

/// How the vCPUs start: at the kernel's entry, or as a snapshot saved them.
enum VcpuInit<'a> {
    Boot(EntryPoint),
    Restore(&'a [VcpuState]),
}

/// Phase 5: the vCPUs. For a boot, each with its CPUID, MSRs, FPU and LAPIC, and vCPU 0 with
/// registers for the kernel's entry; for a restore, each with its saved state.
fn create_vcpus(
    count: u32,
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    shared: &VcpuShared<'_>,
    init: VcpuInit<'_>,
) -> Result<Vec<Vcpu>, Error> {
    vcpu::install_kick_handler()?;
    let base_cpuid = supported_cpuid(kvm)?;
    let (pio, mmio) = shared.devices.buses();
    let ctx = VcpuContext {
        vm: vm_fd,
        mem,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        stop: shared.stop.clone(),
        notifier: shared.notifier.clone(),
        base_cpuid,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        count: count as u8,
        timeline: shared.timeline.clone(),
        control: shared.control.clone(),
    };
    let vcpus = match init {
        VcpuInit::Boot(entry) => (0..count as u8)
            .map(|id| Vcpu::new(&ctx, id, entry))
            .collect::<Result<Vec<_>, _>>()?,
        VcpuInit::Restore(states) => states
            .iter()
            .enumerate()
            .map(|(id, state)| Vcpu::restore(&ctx, id as u8, state))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(vcpus)
}

pub(crate) fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Vm(vm::VmError::Kvm { what, source })
}
