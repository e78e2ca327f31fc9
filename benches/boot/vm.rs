//! What both benches give every VM: its memory, the guest command line, and QEMU microvm's
//! options, so that loft and QEMU are compared on the same terms everywhere.

use std::path::Path;
use std::process::Command;

/// Guest memory of every VM runner, MiB.
pub const GUEST_MEM_MIB: u64 = 128;
/// The kernel command line every VMM gives the guest (loft builds its own; this is the same
/// text, loft's `build_cmdline` without loft's boot-timer port): the i8042 options included,
/// so that every guest skips the same probes (QEMU's and Firecracker's i8042 would answer them,
/// and the guest would spend its time on work loft's guest does not do).
pub const BASE_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// [`BASE_CMDLINE`] plus what this host's KVM needs, as loft adds it.
pub fn guest_cmdline() -> String {
    match loft::KvmFlavour::detect().guest_cmdline() {
        Some(extra) => format!("{BASE_CMDLINE} {extra}"),
        None => BASE_CMDLINE.to_string(),
    }
}

/// `qemu-system-x86_64 -M microvm` with 1 vCPU and [`GUEST_MEM_MIB`], the serial port on stdio
/// and an i8042 with `-no-reboot`, so that the guest's reboot ends QEMU. On kvm_pvm the guest's
/// RAM is the file `shm` (the caller removes it afterwards).
pub fn qemu_microvm(qemu: &Path, kvm_pvm: bool, shm: &Path) -> Command {
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm,acpi=off", "-enable-kvm"]);
    if kvm_pvm {
        // kvm_pvm: MSR 0x10a cannot be set, and THP-backed RAM makes the guest hit an FWAIT
        // KVM's emulator cannot run: back RAM with a /dev/shm file instead.
        cmd.args(["-cpu", "host,-arch-capabilities"]);
        cmd.args([
            "-object",
            &format!(
                "memory-backend-file,id=ram,size={GUEST_MEM_MIB}M,mem-path={},share=on",
                shm.display()
            ),
            "-machine",
            "memory-backend=ram",
        ]);
    } else {
        cmd.args(["-cpu", "host"]);
    }
    cmd.args(["-m", &GUEST_MEM_MIB.to_string(), "-smp", "1"]);
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"]);
    cmd.args(["-no-reboot", "-serial", "stdio", "-device", "i8042"]);
    cmd
}
