//! The ioctl request numbers the filters let through, computed as the kernel's `_IO*` macros
//! do (and as kvm-ioctls does, whose own constants are private).

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};

/// An ioctl request a filter allows, with its name for the docs and the trap message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ioctl {
    /// The request number (the second argument of `ioctl(2)`).
    pub nr: u64,
    /// Its name in the kernel's headers.
    pub name: &'static str,
}

const NONE: u64 = 0;
const WRITE: u64 = 1;
const READ: u64 = 2;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u64, ty: u32, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr
}

const fn io(nr: u64) -> u64 {
    ioc(NONE, KVMIO, nr, 0)
}

const fn ior(nr: u64, size: usize) -> u64 {
    ioc(READ, KVMIO, nr, size)
}

const fn iowr(nr: u64, size: usize) -> u64 {
    ioc(READ | WRITE, KVMIO, nr, size)
}

macro_rules! ioctl {
    ($name:ident = $value:expr) => {
        pub const $name: Ioctl = Ioctl {
            nr: $value,
            name: stringify!($name),
        };
    };
}

// System (/dev/kvm) and VM ioctls.
ioctl!(KVM_CHECK_EXTENSION = io(0x03));
ioctl!(KVM_GET_SUPPORTED_CPUID = iowr(0x05, size_of::<kvm_cpuid2>()));
ioctl!(KVM_GET_IRQCHIP = iowr(0x62, size_of::<kvm_irqchip>()));
ioctl!(KVM_GET_CLOCK = ior(0x7c, size_of::<kvm_clock_data>()));
ioctl!(KVM_GET_PIT2 = ior(0x9f, size_of::<kvm_pit_state2>()));

// vCPU ioctls.
ioctl!(KVM_RUN = io(0x80));
ioctl!(KVM_GET_REGS = ior(0x81, size_of::<kvm_regs>()));
ioctl!(KVM_GET_SREGS = ior(0x83, size_of::<kvm_sregs>()));
ioctl!(KVM_GET_MSRS = iowr(0x88, size_of::<kvm_msrs>()));
ioctl!(KVM_GET_FPU = ior(0x8c, size_of::<kvm_fpu>()));
ioctl!(KVM_GET_LAPIC = ior(0x8e, size_of::<kvm_lapic_state>()));
ioctl!(KVM_GET_CPUID2 = iowr(0x91, size_of::<kvm_cpuid2>()));
ioctl!(KVM_GET_MP_STATE = ior(0x98, size_of::<kvm_mp_state>()));
ioctl!(KVM_GET_VCPU_EVENTS = ior(0x9f, size_of::<kvm_vcpu_events>()));
ioctl!(KVM_GET_DEBUGREGS = ior(0xa1, size_of::<kvm_debugregs>()));
ioctl!(KVM_GET_TSC_KHZ = io(0xa3));
ioctl!(KVM_GET_XSAVE = ior(0xa4, size_of::<kvm_xsave>()));
ioctl!(KVM_GET_XCRS = ior(0xa6, size_of::<kvm_xcrs>()));
ioctl!(KVM_KVMCLOCK_CTRL = io(0xad));

// Generic file ioctls.
ioctl!(FIONBIO = libc::FIONBIO);

// Terminal ioctls (tcgetattr, tcsetattr).
ioctl!(TCGETS = libc::TCGETS);
ioctl!(TCSETS = libc::TCSETS);
ioctl!(TCSETSW = libc::TCSETSW);
ioctl!(TCSETSF = libc::TCSETSF);
ioctl!(TIOCGWINSZ = libc::TIOCGWINSZ);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // Values from <linux/kvm.h> as strace prints them on x86_64.
        assert_eq!(KVM_RUN.nr, 0xae80);
        assert_eq!(KVM_CHECK_EXTENSION.nr, 0xae03);
        assert_eq!(KVM_GET_REGS.nr, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS.nr, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS.nr, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC.nr, 0x8400_ae8e);
        assert_eq!(KVM_GET_XSAVE.nr, 0x9000_aea4);
        assert_eq!(KVM_GET_IRQCHIP.nr, 0xc208_ae62);
        assert_eq!(KVM_GET_PIT2.nr, 0x8070_ae9f);
        assert_eq!(KVM_GET_VCPU_EVENTS.nr, 0x8040_ae9f);
        assert_eq!(KVM_KVMCLOCK_CTRL.nr, 0xaead);
        assert_eq!(FIONBIO.nr, 0x5421);
    }
}
