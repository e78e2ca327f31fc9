//! `loft-vcpuN`: runs one vCPU (`KVM_RUN` and the exits it returns), saves its state for a
//! snapshot, and emulates the devices the guest touches from it (port I/O and MMIO: the console
//! UART, the i8042, the boot timer, the virtio-mmio transports).

use super::ioctls::*;
use super::{Only, Syscall};

const KVM: &[Ioctl] = &[
    KVM_RUN,
    // The internal-error report reads the registers and the code at RIP.
    KVM_GET_REGS,
    KVM_GET_SREGS,
    // A snapshot saves each vCPU on its own thread, while it is paused.
    KVM_GET_MP_STATE,
    KVM_GET_XSAVE,
    KVM_GET_FPU,
    KVM_GET_XCRS,
    KVM_GET_DEBUGREGS,
    KVM_GET_LAPIC,
    KVM_GET_TSC_KHZ,
    KVM_GET_CPUID2,
    KVM_GET_MSRS,
    KVM_GET_VCPU_EVENTS,
    // Tells the guest's kvmclock it was paused, when a snapshot lets the VM run on.
    KVM_KVMCLOCK_CTRL,
];

pub(super) fn syscalls() -> Vec<Syscall> {
    vec![
        Syscall::new(
            libc::SYS_ioctl,
            "ioctl",
            Only::Ioctls(KVM),
            "KVM_RUN; the state reads of a snapshot and of an internal-error report",
        ),
        Syscall::new(
            libc::SYS_read,
            "read",
            Only::Any,
            "a virtio device reset drains its queue eventfds",
        ),
        Syscall::new(
            libc::SYS_close,
            "close",
            Only::Any,
            "a vsock device reset closes its host streams; the vCPU fd at the end",
        ),
        Syscall::new(
            libc::SYS_fcntl,
            "fcntl",
            super::CHECK_FD_OPEN,
            "the Rust standard library checks that an fd is open before it closes it (debug builds)",
        ),
        Syscall::new(
            libc::SYS_epoll_ctl,
            "epoll_ctl",
            Only::Any,
            "a vsock device reset unwatches its host streams",
        ),
        Syscall::new(
            libc::SYS_timerfd_settime,
            "timerfd_settime",
            Only::Any,
            "a vsock device reset re-arms its timer",
        ),
    ]
}
