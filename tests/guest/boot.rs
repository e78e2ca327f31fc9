//! Boot real guests and check what they report from user space.
//!
//! Each boot checks several things at once (boots are slow on the nested hosts used here). The
//! guest's /init runs `guest_cmd` and prints the results; the kernel's own log line with the
//! command line cannot be mistaken for them, because there the `$(...)` are not expanded.

use crate::common::{self, boot, guest_file, Outcome};

/// For boots that take minutes on a nested kvm_pvm host: bzImage's decompressor runs largely in
/// KVM's instruction emulator (3-6 min measured here), and a 4 GiB guest spends ~4 min setting
/// up its memory map there (it was at 291 s, just before user space, in one CI check).
const SLOW_BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);

/// A guest command that prints what the tests check, on one line.
const REPORT: &str = "echo REPORT cpus=$(grep -c ^processor /proc/cpuinfo) \
memkb=$(awk '/MemTotal/{print $2}' /proc/meminfo) \
marker=$(grep -o loft_marker=[a-z0-9]* /proc/cmdline)";

fn cmdline(marker: &str) -> String {
    format!("loft_marker={marker} guest_cmd=\"{REPORT}\"")
}

fn report_field(o: &Outcome, key: &str) -> String {
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with("REPORT "))
        .unwrap_or_else(|| panic!("the guest printed no REPORT line\n{}", o.tail()));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("REPORT line {line:?} lacks {key}"))
        .to_string()
}

fn assert_reached_user_space(o: &Outcome) {
    o.assert_clean_exit();
    assert!(
        o.stdout.contains("GUEST-INIT-READY"),
        "no init ready marker\n{}",
        o.tail()
    );
    assert!(
        o.stdout.contains("GUEST-CMD-EXIT=0"),
        "guest command failed\n{}",
        o.tail()
    );
    // The initramfs was found and unpacked: init ran from it, and the kernel freed it.
    assert!(
        o.stdout.contains("Freeing initrd memory"),
        "initrd not used\n{}",
        o.tail()
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(
            o.stderr.matches("host KVM is kvm_pvm").count(),
            1,
            "loft should say once that it adapted to kvm_pvm\n{}",
            o.stderr
        );
    }
}

fn mem_kib(o: &Outcome) -> u64 {
    report_field(o, "memkb")
        .parse()
        .expect("MemTotal is a number")
}

/// The ELF kernel with 2 vCPUs and 4 GiB: SMP bring-up, the memory map around the 32-bit MMIO
/// gap, the initramfs and the command line, in one boot.
#[test]
fn elf_kernel_with_two_cpus_4g_initrd_and_cmdline() {
    let kernel = guest_file("vmlinux");
    let initrd = guest_file("initramfs.cpio");
    let cl = cmdline("elf2cpu4g");
    let o = boot(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "4G",
            "--cmdline",
            &cl,
        ],
        SLOW_BOOT_TIMEOUT,
    );
    assert_reached_user_space(&o);
    assert_eq!(
        report_field(&o, "cpus"),
        "2",
        "the guest must bring up both vCPUs"
    );
    assert!(
        o.stdout
            .contains("smpboot: Total of 2 processors activated")
            || o.stdout.contains("Brought up 1 node, 2 CPUs"),
        "the kernel must report 2 CPUs\n{}",
        o.tail()
    );
    assert_eq!(
        report_field(&o, "marker"),
        "loft_marker=elf2cpu4g",
        "the command line must reach the guest"
    );
    // 4 GiB of RAM, of which 1 GiB above the 4 GiB line: the guest sees about 4 GiB in all.
    let kib = mem_kib(&o);
    assert!(
        (3900 * 1024..4096 * 1024).contains(&kib),
        "MemTotal {kib} KiB for a 4G guest"
    );
    assert!(
        o.stdout
            .contains("BIOS-e820: [mem 0x0000000100000000-0x000000013fffffff] usable"),
        "the e820 map must put the last GiB above 4 GiB\n{}",
        o.tail()
    );
}

/// The bzImage kernel (16-bit setup header, 64-bit entry) to user space, with 512 MiB.
#[test]
fn bzimage_kernel_with_512m_boots_to_user_space() {
    let kernel = guest_file("bzImage");
    let initrd = guest_file("initramfs.cpio");
    let cl = cmdline("bzimage");
    let o = boot(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--memory",
            "512M",
            "--cmdline",
            &cl,
        ],
        SLOW_BOOT_TIMEOUT,
    );
    assert_reached_user_space(&o);
    assert_eq!(report_field(&o, "cpus"), "1");
    assert_eq!(report_field(&o, "marker"), "loft_marker=bzimage");
    // MemTotal is RAM minus what the kernel keeps for itself: a little under 512 MiB.
    let kib = mem_kib(&o);
    assert!(
        (440 * 1024..512 * 1024).contains(&kib),
        "MemTotal {kib} KiB for a 512M guest"
    );
}

/// The console path and the exit path, in milliseconds: a tiny kernel prints on COM1 and pulses
/// the i8042 reset line.
#[test]
fn tiny_guest_output_reaches_stdout_and_its_reset_ends_loft() {
    common::require_kvm();
    let kernel = common::tiny_kernel::write(
        "hello.elf",
        &common::tiny_kernel::print_and_reset(b"tiny guest says hi\n"),
    );
    let mut cmd = common::loft();
    cmd.args([
        "run",
        "--boot-timer",
        "--memory",
        "32M",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let o = common::run(cmd, std::time::Duration::from_secs(60));
    o.assert_clean_exit();
    assert_eq!(o.stdout, "tiny guest says hi\n");
    let timer = o
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("loft-boot-timer: "))
        .unwrap_or_else(|| panic!("no boot-timer line\n{}", o.stderr));
    for phase in ["vm_built=", "first_entry=", "stop_request=", "exit="] {
        let value = timer
            .split_whitespace()
            .find_map(|w| w.strip_prefix(phase))
            .unwrap();
        let wall: f64 = value
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|_| panic!("{timer}"));
        assert!(wall > 0.0, "{phase} in {timer}");
    }
    // The tiny kernel is not Linux: it never reaches init.
    assert!(timer.contains("kernel_init=- user_init=-"), "{timer}");

    // --console off: the same run, nothing on stdout, the same clean end.
    let mut cmd = common::loft();
    cmd.args(["run", "--console", "off", "--memory", "32M", "--kernel"])
        .arg(&kernel);
    let o = common::run(cmd, std::time::Duration::from_secs(60));
    o.assert_clean_exit();
    assert_eq!(o.stdout, "", "--console off printed the guest's output");
}
