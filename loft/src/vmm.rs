//! The VMM: builds a VM from a [`VmConfig`], runs its vCPU threads and its event loop, and stops
//! everything when the guest (or the host) says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VmFd};
use loft_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT, BOOT_TIMER_PORT_LEN};
use loft_devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use loft_devices::serial::{ConsoleOut, SerialConsole, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use loft_devices::virtio::block::Block;
use loft_devices::virtio::net::Net;
use loft_devices::virtio::vsock::Vsock;
use loft_devices::virtio::VirtioMmioDevice;
use loft_devices::Bus;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::arch::x86_64::regs::EntryPoint;
use crate::arch::x86_64::{boot_params, layout, mptable};
use crate::boot_timer::{self, Timeline};
use crate::config::{ConfigError, VmConfig};
use crate::console::ConsoleInput;
use crate::device_manager::DeviceManager;
use crate::host::KvmFlavour;
use crate::loader;
use crate::stop::{StopNotifier, StopReason};
use crate::vstate::vcpu::{self, Vcpu, VcpuContext};
use crate::vstate::{memory, vm};
use crate::Error;

/// The subscriber type of loft's event loop.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How long the VMM keeps kicking vCPU threads before it gives up on joining them.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A VM built and ready to run.
pub struct Vmm {
    // Field order is drop order: vCPUs before the VM, the VM before its memory.
    vcpus: Vec<Vcpu>,
    event_manager: EventManager<Subscriber>,
    notifier: Arc<StopNotifier>,
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    serial: Arc<Mutex<SerialConsole>>,
    _vm: VmFd,
    _kvm: Kvm,
    _mem: GuestMemoryMmap,
    timeline: Arc<Timeline>,
}

/// Wakes the event loop when a stop is requested.
struct StopWatch {
    notifier: Arc<StopNotifier>,
    fired: Arc<AtomicBool>,
    timeline: Arc<Timeline>,
}

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.notifier.event(), EventSet::IN)) {
            log::error!("cannot watch the stop event: {e}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.notifier.event().read();
        self.timeline.mark(|t| &mut t.stop_request);
        self.fired.store(true, Ordering::Release);
    }
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Vm(vm::VmError::Kvm { what, source })
}

impl Vmm {
    /// Builds the VM: checks the inputs, loads the guest, creates devices and vCPUs. Nothing
    /// runs yet. The guest's console output goes to `console`; the run's phases are recorded in
    /// `timeline`.
    pub fn build_with_timeline(
        config: &VmConfig,
        console: ConsoleOut,
        timeline: Arc<Timeline>,
    ) -> Result<Self, Error> {
        if config.cpus == 0 {
            return Err(ConfigError::NoCpus.into());
        }
        let mut kernel = loader::probe_kernel(&config.kernel)?;
        let mut initrd = match &config.initrd {
            Some(path) => Some((path, loader::open_initrd(path)?)),
            None => None,
        };
        let initrd_len = initrd.as_ref().map_or(0, |(_, (_, len))| *len);
        let mem_size = config.memory.bytes();
        loader::check_memory(mem_size, kernel.end, initrd_len)?;

        let kvm = vm::open_kvm(&config.kvm_device)?;
        let max_cpus = (kvm.get_max_vcpus() as u32).min(mptable::MAX_CPUS);
        if config.cpus > max_cpus {
            return Err(ConfigError::TooManyCpus {
                asked: config.cpus,
                max: max_cpus,
            }
            .into());
        }
        let flavour = KvmFlavour::detect();
        let mem = memory::create(mem_size)?;
        // Copying the kernel and the initramfs into fresh guest memory (page faults, mostly) is
        // the bulk of start-up: each gets a thread, and this one sets up the VM meanwhile. The
        // two images land in disjoint ranges (the initramfs goes above the kernel's end).
        let (vm_fd, loaded, initrd_at) = std::thread::scope(|s| -> Result<_, Error> {
            let kernel_end = kernel.end;
            let loader = || std::thread::Builder::new().name("loft-load".into());
            let initrd_job = match initrd.as_mut() {
                Some((path, (file, len))) => {
                    let mem = &mem;
                    Some(
                        loader()
                            .spawn_scoped(s, move || {
                                loader::load_initrd(mem, path, file, *len, kernel_end)
                            })
                            .map_err(sys("start a loader thread"))?,
                    )
                }
                None => None,
            };
            let kernel_job = loader()
                .spawn_scoped(s, || loader::load_kernel(&mem, &mut kernel))
                .map_err(sys("start a loader thread"))?;
            let vm_fd = vm::create(&kvm).and_then(|fd| {
                vm::register_memory(&fd, &mem)?;
                Ok(fd)
            });
            /// A loader thread's result (a panic there is a bug: it goes on here).
            fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            }
            let loaded = join(kernel_job);
            let initrd_at = initrd_job.map(join).transpose();
            Ok((vm_fd?, loaded?, initrd_at?))
        })?;
        let mut event_manager =
            EventManager::<Subscriber>::new().map_err(|e| Error::EventLoop(e.to_string()))?;
        let mut devices = DeviceManager::new();
        add_virtio_devices(config, &vm_fd, &mem, &mut event_manager, &mut devices)?;

        let host_params = flavour.guest_cmdline();
        let mut loft_params = vec![format!("loft_boot_timer={BOOT_TIMER_PORT:#x}")];
        loft_params.extend_from_slice(devices.cmdline_entries());
        let cmdline = loader::build_cmdline(&config.cmdline, host_params, &loft_params)?;
        let cmdline_text = cmdline
            .as_cstring()
            .map_err(|e| loader::LoaderError::CmdlineInvalid(e.to_string()))?
            .into_string()
            .unwrap_or_default();
        linux_loader::loader::load_cmdline(&mem, GuestAddress(layout::CMDLINE_ADDR), &cmdline)
            .map_err(|e| loader::LoaderError::CmdlineInvalid(e.to_string()))?;
        mptable::setup(&mem, config.cpus)?;
        let map = layout::memory_map(mem_size);
        match loaded.entry {
            EntryPoint::Pvh(_) => boot_params::write_pvh_start_info(&mem, initrd_at, &map)?,
            EntryPoint::Linux64(_) => {
                let params = boot_params::build_zero_page(
                    loaded.setup_header,
                    cmdline_text.len() + 1,
                    initrd_at,
                    &map,
                )?;
                boot_params::write_zero_page(&mem, &params)?;
            }
        }

        let notifier = Arc::new(StopNotifier::new().map_err(sys("create the stop event"))?);
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(sys("create the serial IRQ"))?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("connect the serial IRQ"))?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, console)));
        let reset_evt = notifier
            .event()
            .try_clone()
            .map_err(sys("clone the stop event"))?;
        let mut pio = Bus::new();
        pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)
            .and_then(|_| {
                pio.insert(
                    Arc::new(Mutex::new(I8042::new(reset_evt))),
                    I8042_PORT,
                    I8042_PORT_LEN,
                )
            })
            .map_err(|e| Error::Devices(e.to_string()))?;
        let boot_timer = BootTimer::new(timeline.guest.clone(), boot_timer::process_cpu);
        pio.insert(
            Arc::new(Mutex::new(boot_timer)),
            BOOT_TIMER_PORT,
            BOOT_TIMER_PORT_LEN,
        )
        .map_err(|e| Error::Devices(e.to_string()))?;
        let mmio = devices.into_bus();

        let fired = Arc::new(AtomicBool::new(false));
        event_manager.add_subscriber(Arc::new(Mutex::new(StopWatch {
            notifier: notifier.clone(),
            fired: fired.clone(),
            timeline: timeline.clone(),
        })));

        vcpu::install_kick_handler()?;
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report its CPUID"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = VcpuContext {
            vm: &vm_fd,
            mem: &mem,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            stop: stop.clone(),
            notifier: notifier.clone(),
            base_cpuid: &base_cpuid,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            count: config.cpus as u8,
            timeline: timeline.clone(),
        };
        let vcpus = (0..config.cpus as u8)
            .map(|id| Vcpu::new(&ctx, id, loaded.entry))
            .collect::<Result<Vec<_>, _>>()?;
        if host_params.is_some() {
            log::info!(
                "host KVM is {}: added its guest kernel parameters (clearcpuid=...) to the command line",
                flavour.name()
            );
        }
        log::debug!(
            "VM built: {} vCPUs, {}, entry {:?}, cmdline: {cmdline_text}",
            config.cpus,
            config.memory,
            loaded.entry
        );

        timeline.mark(|t| &mut t.vm_built);
        Ok(Self {
            timeline,
            vcpus,
            event_manager,
            notifier,
            stop,
            fired,
            serial,
            _vm: vm_fd,
            _kvm: kvm,
            _mem: mem,
        })
    }

    /// Something that stops this VM from another thread.
    pub fn stop_handle(&self) -> Arc<StopNotifier> {
        self.notifier.clone()
    }

    /// Feeds stdin to the guest's console.
    pub fn attach_stdin(&mut self) -> Result<(), Error> {
        let input = ConsoleInput::from_stdin(self.serial.clone(), self.notifier.clone())
            .map_err(sys("read stdin"))?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(input)));
        Ok(())
    }

    /// Runs the VM until it stops, and returns why. `interrupted` is polled a few times a second
    /// so that a signal handler (which cannot take locks) can stop the VM.
    pub fn run(mut self, interrupted: &dyn Fn() -> bool) -> Result<StopReason, Error> {
        let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(self.vcpus.len());
        for (i, vcpu) in self.vcpus.drain(..).enumerate() {
            let handle = std::thread::Builder::new()
                .name(format!("loft-vcpu{i}"))
                .spawn(move || vcpu.run())
                .map_err(sys("start a vCPU thread"));
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.notifier.notify(StopReason::Stopped);
                    stop_vcpus(&self.stop, handles);
                    return Err(e);
                }
            }
        }
        let result = loop {
            match self.event_manager.run_with_timeout(250) {
                Ok(_) => {}
                Err(e) => break Err(Error::EventLoop(e.to_string())),
            }
            if interrupted() {
                self.notifier.notify(StopReason::Stopped);
            }
            if self.stop_requested() {
                break Ok(self.notifier.reason());
            }
        };
        stop_vcpus(&self.stop, handles);
        self.timeline.mark(|t| &mut t.exit);
        result
    }

    fn stop_requested(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// Creates the disks and network interfaces the config asks for, in order.
fn add_virtio_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    event_manager: &mut EventManager<Subscriber>,
    devices: &mut DeviceManager,
) -> Result<(), Error> {
    let virtio = |e: loft_devices::virtio::Error| Error::Devices(e.to_string());
    for disk in &config.disks {
        let block = Block::new(&disk.path, disk.read_only).map_err(|source| Error::Disk {
            path: disk.path.clone(),
            source,
        })?;
        let dev = VirtioMmioDevice::new(block, mem.clone()).map_err(virtio)?;
        devices.add_virtio(vm, event_manager, dev)?;
    }
    for net in &config.nets {
        let nic = Net::new(&net.tap, net.mac).map_err(|source| Error::Net {
            tap: net.tap.clone(),
            source,
        })?;
        let dev = VirtioMmioDevice::new(nic, mem.clone()).map_err(virtio)?;
        devices.add_virtio(vm, event_manager, dev)?;
    }
    if let Some(vsock) = &config.vsock {
        let dev = Vsock::new(vsock.cid, &vsock.uds).map_err(|source| Error::Vsock {
            uds: vsock.uds.clone(),
            source,
        })?;
        let dev = VirtioMmioDevice::new(dev, mem.clone()).map_err(virtio)?;
        devices.add_virtio(vm, event_manager, dev)?;
    }
    Ok(())
}

/// Stops every vCPU thread: sets the flag, then kicks each thread out of KVM_RUN until it ends.
fn stop_vcpus(stop: &AtomicBool, handles: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    let mut pending = handles;
    while !pending.is_empty() {
        pending.retain(|h| {
            if h.is_finished() {
                return false;
            }
            let _ = h.kill(vcpu::kick_signal());
            true
        });
        if pending.iter().all(|h| h.is_finished()) {
            break;
        }
        if Instant::now() > deadline {
            log::error!(
                "{} vCPU thread(s) did not stop; leaving them behind",
                pending.len()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for h in pending {
        let _ = h.join();
    }
}
