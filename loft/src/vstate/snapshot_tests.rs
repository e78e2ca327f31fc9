//! Snapshot tests on real KVM: tiny guests in long mode, paused, saved, and restored into a
//! second VM. They need `/dev/kvm` and fail (not skip) without it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Cap, Kvm, VmFd};
use loft_devices::{Bus, BusDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::control::{ControlError, VcpuControl};
use super::vcpu::{self, Vcpu, VcpuContext, VcpuError};
use super::vcpu_state::{self, VcpuState, VcpuStateError};
use super::vm_state::{self, ClockMode, VmState};
use super::{memory, vm};
use crate::arch::x86_64::msrs::{self, MsrError};
use crate::arch::x86_64::regs::EntryPoint;
use crate::boot_timer::Timeline;
use crate::stop::StopNotifier;

const MEM_SIZE: u64 = 32 << 20;
const CODE: u64 = 0x10_0000;
const COUNTER: u64 = 0x20_0000;
/// Where the guest points kvmclock, steal time, PV EOI and async PF.
const PV_AREA: u64 = 0x30_0000;
/// The port the counter guest writes its counter to.
const TICK_PORT: u16 = 0x510;
/// The port whose reads the probe device answers.
const PROBE_PORT: u16 = 0x520;
/// An address in the identity map but outside RAM: an MMIO exit.
const PROBE_MMIO: u64 = 0x3000_0000;
const PROBE_VALUE: u32 = 0x5a5a_1234;
const TIMEOUT: Duration = Duration::from_secs(2);

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;
const MSR_KVM_PV_EOI_EN: u32 = 0x4b56_4d04;
const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;

/// The MSRs the counter guest writes itself, with their values.
/// (TSC_AUX is left out: a guest write of it faults on kvm_pvm, whose CPUID has no RDTSCP.)
const GUEST_MSRS: [(u32, u64); 10] = [
    (MSR_STAR, 0x0023_0010_0000_0000),
    (MSR_LSTAR, 0xffff_ffff_8100_0000),
    (MSR_CSTAR, 0xffff_ffff_8100_1000),
    (MSR_SYSCALL_MASK, 0x4_7700),
    (MSR_KERNEL_GS_BASE, 0xffff_8880_0000_0000),
    (MSR_KVM_SYSTEM_TIME_NEW, PV_AREA | 1),
    (MSR_KVM_STEAL_TIME, (PV_AREA + 0x1000) | 1),
    (MSR_KVM_PV_EOI_EN, (PV_AREA + 0x2000) | 1),
    (MSR_KVM_ASYNC_PF_INT, 0xec),
    // Enabled, delivered as an interrupt.
    (MSR_KVM_ASYNC_PF_EN, (PV_AREA + 0x3000) | 1 | 8),
];

fn open_kvm() -> Kvm {
    vm::open_kvm(Path::new("/dev/kvm")).unwrap_or_else(|e| {
        panic!("the snapshot tests need KVM at /dev/kvm and cannot run without it: {e}")
    })
}

/// x86_64 machine code, with labels for short jumps.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn here(&self) -> usize {
        self.0.len()
    }
    /// A short jump (opcode `op`: 0xeb jmp, 0x75 jnz) back to `target`.
    fn jump_back(&mut self, op: u8, target: usize) -> &mut Self {
        let rel = target as isize - (self.here() as isize + 2);
        self.bytes(&[op, i8::try_from(rel).unwrap() as u8])
    }
    /// wrmsr of `value` into `index`.
    fn wrmsr(&mut self, index: u32, value: u64) -> &mut Self {
        self.bytes(&[0xb9]).bytes(&index.to_le_bytes()); // mov ecx, index
        self.bytes(&[0xb8]).bytes(&(value as u32).to_le_bytes()); // mov eax, lo
        self.bytes(&[0xba])
            .bytes(&((value >> 32) as u32).to_le_bytes()); // mov edx, hi
        self.bytes(&[0x0f, 0x30])
    }
}

/// Writes its MSRs, then counts forever: `inc qword [COUNTER]; inc r12`, and every 4096
/// counts an `out TICK_PORT, eax` with the count.
fn counter_guest() -> Vec<u8> {
    let mut a = Asm::default();
    for (index, value) in GUEST_MSRS {
        a.wrmsr(index, value);
    }
    a.bytes(&[0x48, 0xc7, 0xc7])
        .bytes(&(COUNTER as u32).to_le_bytes()); // mov rdi, COUNTER
    let top = a.here();
    a.bytes(&[0x48, 0xff, 0x07]) // inc qword [rdi]
        .bytes(&[0x49, 0xff, 0xc4]) // inc r12
        .bytes(&[0x48, 0x8b, 0x07]) // mov rax, [rdi]
        .bytes(&[0xa9, 0xff, 0x0f, 0x00, 0x00]) // test eax, 0xfff
        .jump_back(0x75, top) // jnz top
        .bytes(&[0x66, 0xba])
        .bytes(&TICK_PORT.to_le_bytes()) // mov dx, TICK_PORT
        .bytes(&[0xef]) // out dx, eax
        .jump_back(0xeb, top);
    a.0
}

/// Reads the probe port, then the probe MMIO address, then spins. Returns the code and the
/// offsets just after each read.
fn probe_guest() -> (Vec<u8>, usize, usize) {
    let mut a = Asm::default();
    a.bytes(&[0x66, 0xba])
        .bytes(&PROBE_PORT.to_le_bytes()) // mov dx, PROBE_PORT
        .bytes(&[0xed]); // in eax, dx
    let after_pio = a.here();
    a.bytes(&[0x48, 0x89, 0xc3]) // mov rbx, rax
        .bytes(&[0x8b, 0x04, 0x25])
        .bytes(&(PROBE_MMIO as u32).to_le_bytes()); // mov eax, [PROBE_MMIO]
    let after_mmio = a.here();
    let spin = a.here();
    a.jump_back(0xeb, spin);
    (a.0, after_pio, after_mmio)
}

/// `cli; hlt`, then spins if ever woken.
fn halt_guest() -> Vec<u8> {
    vec![0xfa, 0xf4, 0xeb, 0xfe]
}

/// Records the values written to the tick port.
#[derive(Default)]
struct Ticks(Vec<u32>);

impl BusDevice for Ticks {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _: u64, data: &[u8]) {
        let mut raw = [0u8; 4];
        raw[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
        self.0.push(u32::from_le_bytes(raw));
    }
}

/// Answers reads with PROBE_VALUE and asks for a pause in the same breath, so that the vCPU
/// sees the pause request with the read still pending in KVM.
struct Probe {
    control: Arc<VcpuControl>,
    reads: Arc<AtomicU32>,
}

impl BusDevice for Probe {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let value = PROBE_VALUE.to_le_bytes();
        for (d, v) in data.iter_mut().zip(value.iter().cycle()) {
            *d = *v;
        }
        self.control.request_pause();
    }
    fn write(&mut self, _: u64, _: &[u8]) {}
}

/// A VM of the tests: KVM fd, memory, buses and the vCPU control.
struct TestVm {
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    stop: Arc<AtomicBool>,
    notifier: Arc<StopNotifier>,
    control: Arc<VcpuControl>,
    timeline: Arc<Timeline>,
    cpuid: kvm_bindings::CpuId,
    thread: Option<JoinHandle<()>>,
}

impl TestVm {
    /// A VM with `mem` registered, one vCPU's control, and the buses built by `buses` (given
    /// the control, for devices that pause).
    fn new(mem: GuestMemoryMmap, buses: impl FnOnce(&Arc<VcpuControl>) -> (Bus, Bus)) -> Self {
        vcpu::install_kick_handler().unwrap();
        let kvm = open_kvm();
        let vm = vm::create(&kvm).unwrap();
        vm::register_memory(&vm, &mem).unwrap();
        let control = VcpuControl::new(&kvm, 1);
        let (pio, mmio) = buses(&control);
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        Self {
            kvm,
            vm,
            mem,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            stop: Arc::new(AtomicBool::new(false)),
            notifier: Arc::new(StopNotifier::new().unwrap()),
            control,
            timeline: Arc::new(Timeline::new(Instant::now())),
            cpuid,
            thread: None,
        }
    }

    fn ctx(&self) -> VcpuContext<'_> {
        VcpuContext {
            vm: &self.vm,
            mem: &self.mem,
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            stop: self.stop.clone(),
            notifier: self.notifier.clone(),
            base_cpuid: &self.cpuid,
            tsc_deadline: self.kvm.check_extension(Cap::TscDeadlineTimer),
            count: 1,
            timeline: self.timeline.clone(),
            control: self.control.clone(),
        }
    }

    /// A booted vCPU 0 entering `code` (loaded at CODE) in long mode.
    fn boot_vcpu(&self, code: &[u8]) -> Vcpu {
        self.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        Vcpu::new(&self.ctx(), 0, EntryPoint::Linux64(CODE)).unwrap()
    }

    fn start(&mut self, vcpu: Vcpu) {
        self.thread = Some(std::thread::spawn(move || vcpu.run()));
    }

    fn counter(&self) -> u64 {
        self.mem.read_obj(GuestAddress(COUNTER)).unwrap()
    }

    fn wait_for_counter(&self, above: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.counter();
            if c > above {
                return c;
            }
            let ended = self.thread.as_ref().is_some_and(|t| t.is_finished());
            assert!(
                Instant::now() < deadline && !ended,
                "the guest's counter stayed at {c}, not above {above} (vCPU thread ended: \
                 {ended}, stop reason: {})",
                self.notifier.reason()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops the vCPU thread through the stop flag alone (no resume), as the VMM does.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + TIMEOUT;
        while !thread.is_finished() {
            assert!(Instant::now() < deadline, "the vCPU thread did not stop");
            use vmm_sys_util::signal::Killable;
            let _ = thread.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        thread.join().unwrap();
    }

    /// Guest RAM, region by region.
    fn copy_memory(&self) -> Vec<(GuestAddress, Vec<u8>)> {
        self.mem
            .iter()
            .map(|r| {
                let mut bytes = vec![0u8; r.len() as usize];
                self.mem.read_slice(&mut bytes, r.start_addr()).unwrap();
                (r.start_addr(), bytes)
            })
            .collect()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.stop();
        }
    }
}

fn memory_from(copy: &[(GuestAddress, Vec<u8>)]) -> GuestMemoryMmap {
    let mem = memory::create(MEM_SIZE).unwrap();
    for (at, bytes) in copy {
        mem.write_slice(bytes, *at).unwrap();
    }
    mem
}

fn no_buses(_: &Arc<VcpuControl>) -> (Bus, Bus) {
    (Bus::new(), Bus::new())
}

fn tick_buses(ticks: &Arc<Mutex<Ticks>>) -> impl FnOnce(&Arc<VcpuControl>) -> (Bus, Bus) {
    let ticks = ticks.clone();
    move |_| {
        let mut pio = Bus::new();
        pio.insert(ticks, u64::from(TICK_PORT), 1).unwrap();
        (pio, Bus::new())
    }
}

fn json_roundtrip_vcpu(state: &VcpuState) -> VcpuState {
    let json = serde_json::to_string(state).unwrap();
    let back: VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    back
}

fn json_roundtrip_vm(state: &VmState) -> VmState {
    let json = serde_json::to_string(state).unwrap();
    let back: VmState = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), json);
    back
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    msrs::find(&state.msrs, index)
}

/// A vCPU's state, saved right after boot set-up, for tests that only need a valid state.
fn fresh_state() -> (TestVm, VcpuState) {
    let vm = TestVm::new(memory::create(MEM_SIZE).unwrap(), no_buses);
    let vcpu = vm.boot_vcpu(&halt_guest());
    let state = vcpu.save_state().unwrap();
    (vm, state)
}

fn restore_into_fresh_vm(state: &VcpuState) -> Result<Vcpu, VcpuError> {
    let vm = TestVm::new(memory::create(MEM_SIZE).unwrap(), no_buses);
    let r = Vcpu::restore(&vm.ctx(), 0, state);
    drop(vm);
    r
}

#[test]
fn vcpu_and_vm_state_survive_serde_and_a_restore() {
    let (vm, state) = fresh_state();
    let vm_state = vm_state::save(&vm.vm).unwrap();
    let state2 = json_roundtrip_vcpu(&state);
    assert_eq!(state2.regs, state.regs);
    assert_eq!(state2.sregs, state.sregs);
    assert_eq!(state2.msrs, state.msrs);
    assert_eq!(state2.cpuid, state.cpuid);
    assert_eq!(state2.lapic, state.lapic);
    assert_eq!(state2.fpu, state.fpu);
    assert_eq!(state2.tsc_khz, state.tsc_khz);
    let vm_state2 = json_roundtrip_vm(&vm_state);
    assert_eq!(vm_state2.pit, vm_state.pit);

    // Into a second VM: what is read back is what was saved.
    let other = TestVm::new(memory::create(MEM_SIZE).unwrap(), no_buses);
    vm_state::restore(&other.vm, &vm_state2).unwrap();
    let vcpu = Vcpu::restore(&other.ctx(), 0, &state2).unwrap();
    let again = vcpu.save_state().unwrap();
    assert_eq!(again.regs, state.regs);
    assert_eq!(again.sregs, state.sregs);
    assert_eq!(again.lapic.regs[..0x300], state.lapic.regs[..0x300]);
    assert_eq!(again.cpuid, state.cpuid);
    assert_eq!(again.mp_state, state.mp_state);
    assert_eq!(again.fpu, state.fpu);
    let vm_again = vm_state::save(&other.vm).unwrap();
    assert_eq!(
        serde_json::to_string(&vm_again.ioapic).unwrap(),
        serde_json::to_string(&vm_state.ioapic).unwrap()
    );
    assert_eq!(
        serde_json::to_string(&vm_again.pic_master).unwrap(),
        serde_json::to_string(&vm_state.pic_master).unwrap()
    );
    // The clock went on from the saved value, not from the second VM's own.
    assert!(vm_again.clock.clock >= vm_state.clock.clock);
    assert!(
        vm_again.clock.clock - vm_state.clock.clock < 1_000_000_000,
        "clock jumped from {} to {}",
        vm_state.clock.clock,
        vm_again.clock.clock
    );
}

#[test]
fn a_counting_guest_goes_on_counting_in_a_second_vm() {
    let ticks_a = Arc::new(Mutex::new(Ticks::default()));
    let mut a = TestVm::new(memory::create(MEM_SIZE).unwrap(), tick_buses(&ticks_a));
    let vcpu = a.boot_vcpu(&counter_guest());
    a.start(vcpu);
    a.wait_for_counter(3 * 4096);

    a.control.pause_all(TIMEOUT).unwrap();
    assert!(a.control.is_paused());
    let at_pause = a.counter();
    let saved = a.control.save_all(TIMEOUT).unwrap();
    assert_eq!(saved.len(), 1);
    let vm_saved = vm_state::save(&a.vm).unwrap();
    let memory_copy = a.copy_memory();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(a.counter(), at_pause, "a paused guest must not count");
    // A second save while paused gives the same registers.
    let saved_again = a.control.save_all(TIMEOUT).unwrap();
    assert_eq!(saved_again[0].regs, saved[0].regs);

    let state = json_roundtrip_vcpu(&saved[0]);
    let vm_state = json_roundtrip_vm(&vm_saved);
    let r12 = state.regs.r12;
    assert!(
        r12 == at_pause || r12 + 1 == at_pause,
        "r12 {r12} counts with the memory counter {at_pause}"
    );
    for (index, value) in GUEST_MSRS {
        eprintln!(
            "MSR {index:#x}: guest wrote {value:#x}, saved {:#x?}",
            msr(&state, index)
        );
    }
    assert!(msr(&state, msrs::MSR_IA32_TSC).is_some());

    // Resume A, then stop it: it is independent of what was saved.
    a.control.resume_all();
    a.wait_for_counter(at_pause + 4096);
    a.stop();

    let ticks_b = Arc::new(Mutex::new(Ticks::default()));
    let mut b = TestVm::new(memory_from(&memory_copy), tick_buses(&ticks_b));
    assert_eq!(b.counter(), at_pause);
    vm_state::restore(&b.vm, &vm_state).unwrap();
    let vcpu = Vcpu::restore(&b.ctx(), 0, &state).unwrap();
    let restored = vcpu.save_state().unwrap();
    assert_eq!(
        restored.regs, state.regs,
        "general registers at the restore point"
    );
    assert_eq!(
        restored.sregs, state.sregs,
        "special registers at the restore point"
    );
    assert_eq!(restored.xcrs, state.xcrs);
    assert_eq!(restored.fpu, state.fpu);
    assert_eq!(restored.debug_regs, state.debug_regs);
    assert_eq!(restored.mp_state.mp_state, KVM_MP_STATE_RUNNABLE);
    for e in &state.msrs {
        let now = msr(&restored, e.index);
        if now != Some(e.data) && e.index != msrs::MSR_IA32_TSC {
            eprintln!(
                "MSR {:#x}: saved {:#x}, reads {now:#x?} after restore",
                e.index, e.data
            );
        }
    }
    for (index, value) in GUEST_MSRS {
        assert_eq!(
            msr(&restored, index),
            msr(&state, index),
            "MSR {index:#x} (guest wrote {value:#x})"
        );
    }
    // The guest has kvmclock on: KVM_KVMCLOCK_CTRL must be taken now.
    eprintln!(
        "KVM_KVMCLOCK_CTRL with kvmclock on: {:?}",
        vcpu_kvmclock_ctrl(&vcpu)
    );

    b.start(vcpu);
    let later = b.wait_for_counter(at_pause + 2 * 4096);
    assert!(later > at_pause);
    b.control.pause_all(TIMEOUT).unwrap();
    let b_state = b.control.save_all(TIMEOUT).unwrap();
    let b_count = b.counter();
    assert!(
        b_state[0].regs.r12 + 1 >= b_count && b_state[0].regs.r12 > at_pause,
        "r12 went on from {r12}: {} (counter {b_count})",
        b_state[0].regs.r12
    );
    let ticks = ticks_b.lock().unwrap().0.clone();
    assert!(!ticks.is_empty());
    assert!(
        ticks.iter().all(|&t| u64::from(t) > at_pause),
        "the second VM counted from {at_pause}, not from 0: {ticks:?}"
    );
    b.control.resume_all();
    b.stop();
}

fn vcpu_kvmclock_ctrl(vcpu: &Vcpu) -> Result<(), kvm_ioctls::Error> {
    vcpu.fd().kvmclock_ctrl()
}

#[test]
fn a_pause_right_after_a_read_exit_completes_the_read() {
    let reads = Arc::new(AtomicU32::new(0));
    let (code, after_pio, after_mmio) = probe_guest();
    let buses = {
        let reads = reads.clone();
        move |control: &Arc<VcpuControl>| {
            let probe = || {
                Arc::new(Mutex::new(Probe {
                    control: control.clone(),
                    reads: reads.clone(),
                }))
            };
            let mut pio = Bus::new();
            pio.insert(probe(), u64::from(PROBE_PORT), 4).unwrap();
            let mut mmio = Bus::new();
            mmio.insert(probe(), PROBE_MMIO, 0x1000).unwrap();
            (pio, mmio)
        }
    };
    let mut vm = TestVm::new(memory::create(MEM_SIZE).unwrap(), buses);
    let vcpu = vm.boot_vcpu(&code);
    vm.start(vcpu);
    let wait_for_reads = |n| {
        let deadline = Instant::now() + TIMEOUT;
        while reads.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the guest never made read {n}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };

    // The port read asked for the pause.
    wait_for_reads(1);
    vm.control.pause_all(TIMEOUT).unwrap();
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    let state = &vm.control.save_all(TIMEOUT).unwrap()[0];
    assert_eq!(state.regs.rip, CODE + after_pio as u64, "RIP past the IN");
    assert_eq!(
        state.regs.rax as u32, PROBE_VALUE,
        "the value read is in EAX"
    );

    // Then the MMIO read asks for the next one.
    vm.control.resume_all();
    wait_for_reads(2);
    vm.control.pause_all(TIMEOUT).unwrap();
    let state = &vm.control.save_all(TIMEOUT).unwrap()[0];
    assert_eq!(reads.load(Ordering::SeqCst), 2, "the read is not repeated");
    assert_eq!(state.regs.rip, CODE + after_mmio as u64, "RIP past the MOV");
    assert_eq!(state.regs.rax as u32, PROBE_VALUE);
    assert_eq!(state.regs.rbx as u32, PROBE_VALUE);
    vm.control.resume_all();
}

#[test]
fn a_halted_vcpu_pauses_and_a_paused_one_stops() {
    let mut vm = TestVm::new(memory::create(MEM_SIZE).unwrap(), no_buses);
    let vcpu = vm.boot_vcpu(&halt_guest());
    vm.start(vcpu);
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    vm.control.pause_all(TIMEOUT).unwrap();
    assert!(t.elapsed() < TIMEOUT);
    let state = &vm.control.save_all(TIMEOUT).unwrap()[0];
    assert_eq!(state.regs.rip, CODE + 2, "halted after the HLT");
    // Stop while paused: the thread ends without a resume.
    vm.stop();
    assert!(matches!(
        vm.control.save_all(TIMEOUT),
        Err(ControlError::NotPaused) | Err(ControlError::Exited { id: 0 })
    ));
    let e = vm.control.pause_all(TIMEOUT).unwrap_err();
    assert!(matches!(e, ControlError::Exited { id: 0 }), "{e:?}");
}

#[test]
fn a_vcpu_that_never_runs_fails_the_pause_in_time() {
    let vm = TestVm::new(memory::create(MEM_SIZE).unwrap(), no_buses);
    let _vcpu = vm.boot_vcpu(&halt_guest());
    let t = Instant::now();
    let e = vm
        .control
        .pause_all(Duration::from_millis(100))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(e, ControlError::PauseTimeout { id: 0, .. }),
        "{e:?}"
    );
    assert_eq!(e.to_string(), "vCPU 0 did not pause within 100ms");
    assert!(!vm.control.is_paused());
    assert!(matches!(
        vm.control.save_all(TIMEOUT),
        Err(ControlError::NotPaused)
    ));
}

#[test]
fn a_restore_refuses_an_msr_kvm_does_not_take() {
    let (_vm, mut state) = fresh_state();
    let unknown = kvm_bindings::kvm_msr_entry {
        index: 0x1234_5678,
        data: 1,
        ..Default::default()
    };
    state.msrs.insert(1, unknown);
    let e = restore_into_fresh_vm(&state)
        .err()
        .expect("restore must fail");
    match &e {
        VcpuError::Restore {
            id: 0,
            source: VcpuStateError::SetMsrs(MsrError::Refused { index, data: 1 }),
        } => assert_eq!(*index, 0x1234_5678),
        other => panic!("wrong error: {other:?}"),
    }
    assert_eq!(e.to_string(), "cannot restore the state of vCPU 0");
    let cause = std::error::Error::source(&e).unwrap();
    assert_eq!(cause.to_string(), "cannot restore the MSRs");
    assert_eq!(
        std::error::Error::source(cause).unwrap().to_string(),
        "KVM refused MSR 0x12345678 = 0x1"
    );
}

#[test]
fn a_restore_refuses_counts_and_sizes_past_the_limits() {
    let (_vm, state) = fresh_state();
    let mut many_cpuid = state.clone();
    many_cpuid.cpuid = vec![state.cpuid[0]; KVM_MAX_CPUID_ENTRIES + 1];
    assert!(matches!(
        restore_into_fresh_vm(&many_cpuid),
        Err(VcpuError::Restore {
            source: VcpuStateError::TooManyCpuidEntries { .. },
            ..
        })
    ));
    let mut many_msrs = state.clone();
    many_msrs.msrs = vec![state.msrs[0]; msrs::MAX_SAVED_MSRS + 1];
    assert!(matches!(
        restore_into_fresh_vm(&many_msrs),
        Err(VcpuError::Restore {
            source: VcpuStateError::SetMsrs(MsrError::TooMany { .. }),
            ..
        })
    ));
    let mut short_xsave = state.clone();
    short_xsave.fpu = vcpu_state::FpuState::Xsave(vec![0; 5]);
    let r = restore_into_fresh_vm(&short_xsave);
    assert!(
        matches!(
            r,
            Err(VcpuError::Restore {
                source: VcpuStateError::XsaveSize { words: 5 } | VcpuStateError::FpuKind { .. },
                ..
            })
        ),
        "{:?}",
        r.err()
    );
    // A state from a file: whatever the bytes, deserializing does not panic.
    let json = serde_json::to_string(&state).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    value["lapic"] = serde_json::json!([1, 2, 3]);
    let short: VcpuState = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(short.lapic.regs[0], 1);
    assert_eq!(
        short.lapic.regs[3], 0,
        "a short structure is padded with zeros"
    );
    value["regs"] = serde_json::json!(vec![0xff; 4000]);
    assert!(serde_json::from_value::<VcpuState>(value).is_err());
}

#[test]
fn a_restore_refuses_another_tsc_frequency_kvm_cannot_scale() {
    let (vm, mut state) = fresh_state();
    let host = state.tsc_khz.expect("KVM tells the TSC frequency");
    state.tsc_khz = Some(host / 2);
    let scaling = vm.kvm.check_extension(Cap::TscControl);
    let r = restore_into_fresh_vm(&state);
    if scaling {
        r.unwrap();
    } else {
        match r {
            Err(VcpuError::Restore {
                source:
                    VcpuStateError::TscFrequency {
                        saved_khz,
                        host_khz,
                    },
                ..
            }) => assert_eq!((saved_khz, host_khz), (host / 2, host)),
            other => panic!("wrong result: {:?}", other.err()),
        }
    }
    // Within KVM's tolerance: taken.
    state.tsc_khz = Some(host + 1);
    restore_into_fresh_vm(&state).unwrap();
}

#[test]
fn the_clock_can_be_restored_advanced_by_the_wall_time() {
    let (vm, _) = fresh_state();
    let mut saved = vm_state::save(&vm.vm).unwrap();
    eprintln!(
        "KVM_GET_CLOCK flags {:#x}, KVM_CAP_ADJUST_CLOCK {:#x}",
        saved.clock.flags,
        vm.vm.check_extension_int(Cap::AdjustClock)
    );
    // As if it had been saved 5 s ago.
    saved.saved_at_ns -= 5_000_000_000;
    saved.clock.realtime = saved.clock.realtime.saturating_sub(5_000_000_000);
    let other = TestVm::new(memory::create(MEM_SIZE).unwrap(), no_buses);
    vm_state::restore_with_clock(&other.vm, &saved, ClockMode::AdvanceByWallTime).unwrap();
    let now = other.vm.get_clock().unwrap().clock;
    let ahead = now.saturating_sub(saved.clock.clock);
    assert!(
        (5_000_000_000..6_000_000_000).contains(&ahead),
        "the clock is {ahead} ns past the saved value, not 5 s"
    );
    vm_state::restore_with_clock(&other.vm, &saved, ClockMode::Continue).unwrap();
    let now = other.vm.get_clock().unwrap().clock;
    assert!(now.saturating_sub(saved.clock.clock) < 1_000_000_000);
}
