//! Bad user input gets one clear line on stderr and a non-zero exit, never a panic.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{assert_one_line_error, guest_file, loft, run, Outcome};

const QUICK: Duration = Duration::from_secs(60);

fn loft_run(args: &[&str]) -> Outcome {
    let mut cmd = loft();
    cmd.arg("run").args(args);
    run(cmd, QUICK)
}

fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loft-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

#[test]
fn missing_kernel() {
    let o = loft_run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&o, &["/nonexistent/vmlinux", "no such file"]);
}

#[test]
fn unreadable_kernel_is_a_directory() {
    let o = loft_run(&["--kernel", "/tmp"]);
    assert_one_line_error(&o, &["/tmp", "directory"]);
}

#[test]
fn file_that_is_not_a_kernel() {
    let junk = temp_file("junk.bin", b"this is a text file, not a kernel\n");
    let o = loft_run(&["--kernel", junk.to_str().unwrap()]);
    assert_one_line_error(&o, &["junk.bin", "not a kernel image"]);
}

#[test]
fn corrupt_elf_kernel() {
    // A real ELF header cut off before its program headers.
    let vmlinux = std::fs::read(guest_file("vmlinux")).unwrap();
    let cut = temp_file("cut-vmlinux", &vmlinux[..100]);
    let o = loft_run(&["--kernel", cut.to_str().unwrap()]);
    assert_one_line_error(&o, &["cut-vmlinux", "corrupt ELF"]);
}

#[test]
fn missing_initrd() {
    let k = guest_file("vmlinux");
    let o = loft_run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd.cpio",
    ]);
    assert_one_line_error(&o, &["/nonexistent/initrd.cpio", "no such file"]);
}

#[test]
fn zero_cpus() {
    let k = guest_file("vmlinux");
    let o = loft_run(&["--kernel", k.to_str().unwrap(), "--cpus", "0"]);
    assert_one_line_error(&o, &["--cpus 0"]);
}

#[test]
fn more_cpus_than_kvm_allows() {
    common::require_kvm();
    let k = guest_file("vmlinux");
    let o = loft_run(&["--kernel", k.to_str().unwrap(), "--cpus", "5000"]);
    assert_one_line_error(&o, &["--cpus 5000", "at most"]);
}

#[test]
fn memory_too_small_for_kernel_and_initrd() {
    let k = guest_file("vmlinux");
    let i = guest_file("initramfs.cpio");
    let o = loft_run(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--memory",
        "16M",
    ]);
    assert_one_line_error(&o, &["--memory 16M", "too small", "at least"]);
}

#[test]
fn malformed_memory_size() {
    let o = loft_run(&["--memory", "12X"]);
    assert_one_line_error(&o, &["12X"]);
}

#[test]
fn unknown_flag() {
    let o = loft_run(&["--frobnicate"]);
    assert_one_line_error(&o, &["--frobnicate"]);
    assert_eq!(o.code, Some(2));
}

#[test]
fn kvm_device_missing() {
    let k = guest_file("vmlinux");
    let mut cmd = loft();
    cmd.env("LOFT_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--kernel", k.to_str().unwrap()]);
    let o = run(cmd, QUICK);
    assert_one_line_error(&o, &["/nonexistent/kvm", "KVM is not available"]);
}

#[test]
fn kvm_device_not_accessible() {
    // A path that exists but is not a KVM device node.
    let k = guest_file("vmlinux");
    let mut cmd = loft();
    cmd.env("LOFT_KVM_DEVICE", "/dev/null")
        .args(["run", "--kernel", k.to_str().unwrap()]);
    let o = run(cmd, QUICK);
    assert_one_line_error(&o, &["/dev/null"]);
}

#[test]
fn no_kernel_and_no_bundled_guest() {
    let mut cmd = loft();
    cmd.env("LOFT_GUEST_DIR", "/nonexistent/guest").arg("run");
    let o = run(cmd, QUICK);
    assert_one_line_error(
        &o,
        &[
            "no --kernel given",
            "/nonexistent/guest",
            "firmware/build.sh",
        ],
    );
}

#[test]
fn command_line_too_long() {
    let k = guest_file("vmlinux");
    let long = "x".repeat(3000);
    let o = loft_run(&["--kernel", k.to_str().unwrap(), "--cmdline", &long]);
    assert_one_line_error(&o, &["command line", "2047"]);
}

#[test]
fn help_and_version_succeed() {
    let mut cmd = loft();
    cmd.arg("--version");
    let o = run(cmd, QUICK);
    assert_eq!(o.code, Some(0));
    assert!(o.stdout.starts_with("loft "), "{}", o.stdout);
    let mut cmd = loft();
    cmd.args(["run", "--help"]);
    let o = run(cmd, QUICK);
    assert_eq!(o.code, Some(0));
    for flag in ["--kernel", "--initrd", "--cmdline", "--cpus", "--memory"] {
        assert!(o.stdout.contains(flag), "help lacks {flag}: {}", o.stdout);
    }
}

#[test]
fn jail_ids_without_jail_and_jail_without_ids() {
    for flag in ["--uid", "--gid"] {
        let o = loft_run(&[flag, "65534"]);
        assert_one_line_error(&o, &[flag, "--jail"]);
    }
    let o = loft_run(&["--jail-dir", "/tmp/nowhere"]);
    assert_one_line_error(&o, &["--jail-dir", "--jail"]);
    let o = loft_run(&["--jail", "--uid", "65534"]);
    assert_one_line_error(&o, &["--jail", "--gid"]);
    let o = loft_run(&["--jail"]);
    assert_one_line_error(&o, &["--jail", "--uid", "--gid"]);
    let o = loft_run(&["--jail", "--uid", "0", "--gid", "65534"]);
    assert_one_line_error(&o, &["uid", "must not be 0"]);
}

#[test]
fn jail_without_root() {
    // Not root: an unprivileged user, or root without capabilities when setpriv cannot switch.
    let mut cmd = std::process::Command::new("setpriv");
    if nix_is_root() {
        cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_loft"))
        .env("LOFT_LOG", "info")
        .args(["run", "--jail", "--uid", "65534", "--gid", "65534"]);
    let o = run(cmd, QUICK);
    if o.code == Some(127) || o.stderr.contains("setpriv:") {
        eprintln!("skipped: setpriv cannot run loft here: {}", o.stderr);
        return;
    }
    assert_one_line_error(&o, &["jail", "needs root"]);
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
