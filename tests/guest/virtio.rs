//! virtio-blk and virtio-net over virtio-mmio, end to end: real KVM, the real guest kernel, real
//! image files and real TAP devices.
//!
//! Boots are slow on the nested kvm_pvm hosts used here (minutes under load, the guest kernel
//! running largely in KVM's instruction emulator), so there are two boots, one after the other,
//! each checking several things:
//! - boot A: ext4 root on /dev/vda; the guest writes to a second disk (/dev/vdb) and fails to
//!   write to a read-only third one (/dev/vdc); the test then checks both image files on the host.
//! - boot B: the guest reads back what A wrote, compared with the host file; and, in a private
//!   network namespace, virtio-net on a TAP: the MAC, an HTTP download from a server in the
//!   namespace, a line sent to a listener there.
//!
//! Errors opening devices need no boot: loft opens them before the VM runs.
//!
//! The guest prints each result on a line starting with a key (`ROOT `, `WRITES `, ...) whose
//! values come from `$var` expansions, or as `md5sum` output lines: the kernel's own echo of the
//! command line cannot be mistaken for them. Guest commands start few processes: each costs
//! seconds of guest time on a loaded kvm_pvm host.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::netns::{http_responder, line_sink, NetNs, TcpServer};
use crate::common::{
    self, assert_one_line_error, guest_dir, guest_file, BootSlot, Outcome, BOOT_TIMEOUT,
};

const MIB: usize = 1 << 20;

/// A scratch directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("loft-virtio-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private, writable copy of the guest's ext4 root image: `rootfs.ext4`, or `rootfs.ext4.gz`
/// unpacked.
fn rootfs_copy(scratch: &Scratch) -> PathBuf {
    let dest = scratch.path("rootfs.ext4");
    let dir = guest_dir();
    let plain = dir.join("rootfs.ext4");
    if plain.is_file() {
        std::fs::copy(&plain, &dest).unwrap();
        return dest;
    }
    let gz = dir.join("rootfs.ext4.gz");
    assert!(
        gz.is_file(),
        "no root image: neither {} nor {}",
        plain.display(),
        gz.display()
    );
    let out = std::fs::File::create(&dest).unwrap();
    let status = Command::new("gunzip")
        .arg("-c")
        .arg(&gz)
        .stdout(out)
        .status()
        .expect("run gunzip");
    assert!(status.success(), "gunzip {} failed", gz.display());
    dest
}

/// Bytes that differ from run to run and are not all the same (xorshift64*).
fn random_bytes(len: usize, salt: u64) -> Vec<u8> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ salt | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A short token unique to this run, for markers.
fn token(salt: u64) -> String {
    random_bytes(6, salt)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The MD5 of `data` as `md5sum` prints it (the guest has busybox `md5sum`).
fn md5_hex(data: &[u8]) -> String {
    common::host_digest("md5sum", data)
}

fn cmdline(guest_cmd: &str) -> String {
    assert!(
        !guest_cmd.contains('"'),
        "the kernel command line cannot carry nested double quotes"
    );
    format!("guest_cmd=\"{guest_cmd}\"")
}

/// Runs a boot (holding a boot slot), once more if the first attempt timed out before the guest
/// kernel even probed the virtio disks.
///
/// That stall is the host's, not loft's: on a loaded kvm_pvm host the guest kernel runs in
/// KVM's instruction emulator, and while it still ticks periodically (HZ=250, before it switches
/// to high-resolution timers at the end of the early initcalls) one timer tick can take longer
/// than 4 ms of host time, so the guest does nothing but handle ticks (traced: all emulated
/// instructions in tick_periodic's callees). Nothing this file tests has run by then: the guest
/// touched no disk and no network, so the retry starts from the same state.
fn boot_guest(what: &str, command: impl Fn() -> Command) -> Outcome {
    common::require_kvm();
    let _slot = BootSlot::acquire();
    let first = common::run(command(), BOOT_TIMEOUT);
    let stalled_early = first.timed_out && !first.stdout.contains("virtio_blk");
    if !stalled_early {
        return first;
    }
    eprintln!(
        "{what}: the guest stalled before probing its virtio devices (after {:?}; last console \
line: {:?}); booting it once more",
        first.elapsed,
        first.stdout.lines().last().unwrap_or("")
    );
    let second = common::run(command(), BOOT_TIMEOUT);
    Outcome {
        elapsed: first.elapsed + second.elapsed,
        ..second
    }
}

/// The guest ran its command to the end and loft exited 0.
fn assert_guest_ran(o: &Outcome) {
    o.assert_clean_exit();
    assert!(
        o.stdout.contains("GUEST-INIT-READY"),
        "the guest never reached init\n{}",
        o.tail()
    );
    assert!(
        o.stdout.contains("GUEST-CMD-EXIT=0"),
        "the guest command did not finish with status 0\n{}",
        o.tail()
    );
}

/// `key=value` pairs of the first stdout line starting with `tag ` (a line the guest printed).
fn report(o: &Outcome, tag: &str) -> Vec<(String, String)> {
    let prefix = format!("{tag} ");
    let line = o
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("the guest printed no {tag:?} line\n{}", o.tail()));
    line[prefix.len()..]
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value(o: &Outcome, tag: &str, key: &str) -> String {
    report(o, tag)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("the guest's {tag} line has no {key}=\n{}", o.tail()))
}

/// The checksum on the guest's `md5sum` output line for `file` (`<32 hex digits>  <file>`).
fn md5_of_file(o: &Outcome, file: &str) -> String {
    o.stdout
        .lines()
        .filter_map(|l| l.trim_end().strip_suffix(file)?.strip_suffix("  "))
        .find(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("the guest printed no md5sum of {file}\n{}", o.tail()))
        .to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Where boot A writes on the data disk: a 1 MiB copy of the read-only disk at 3 MiB (16 x 64 KiB
/// blocks), and a marker padded to one sector at sector 4097 (not 4 KiB-aligned).
const COPY_OFFSET: usize = 3 * MIB;
const MARK_SECTOR: usize = 4097;
const DATA_DISK_LEN: usize = 8 * MIB;
const RO_DISK_LEN: usize = MIB;

/// Boot A: root on /dev/vda, a data disk written by the guest, a read-only disk it cannot write.
/// Boot B: a second boot reads the data disk back, and uses a NIC on a TAP.
#[test]
fn blk_root_data_readonly_then_readback_and_net() {
    let started = Instant::now();
    let kernel = guest_file("vmlinux");
    let scratch = Scratch::new("blk");
    let root = rootfs_copy(&scratch);
    let data = scratch.path("data.img");
    std::fs::write(&data, vec![0u8; DATA_DISK_LEN]).unwrap();
    let ro = scratch.path("ro.img");
    let ro_contents = random_bytes(RO_DISK_LEN, 1);
    std::fs::write(&ro, &ro_contents).unwrap();
    let mark = format!("LOFT-MARK-{}", token(2));

    // Boot A: shell builtins read mountinfo and sysfs; three `dd`s write. mountinfo fields: id
    // parent major:minor root mountpoint options [optional fields] - fstype source superoptions.
    let guest_a = format!(
        "while read -r a b dev c mp opts rest; do [ x$mp = x/ ] && break; done </proc/self/mountinfo; \
fs=${{rest#*- }}; \
read vda </sys/block/vda/dev; read sb </sys/block/vdb/size; read sc </sys/block/vdc/size; \
read ro </sys/block/vdc/ro; read rwb </sys/block/vdb/ro; \
echo ROOT dev=$dev type=${{fs%% *}} opts=$opts vda=$vda; \
echo DISKS vdb_sectors=$sb vdc_sectors=$sc vdb_ro=$rwb vdc_ro=$ro; \
read t0 x </proc/uptime; \
dd if=/dev/vdc of=/dev/vdb bs=64k seek={seek} count=16 conv=fsync; c=$?; \
echo {mark} >/tmp/mark; dd if=/tmp/mark of=/dev/vdb bs=512 seek={MARK_SECTOR} conv=sync,fsync; m=$?; \
dd if=/dev/zero of=/dev/vdc bs=512 count=1 conv=fsync; w=$?; \
read t1 x </proc/uptime; \
echo WRITES copy=$c mark=$m rowrite=$w t0=$t0 t1=$t1",
        seek = COPY_OFFSET / (64 << 10),
    );
    let ro_arg = format!("{},readonly", path_str(&ro));
    let cl = cmdline(&guest_a);
    let a = boot_guest("boot A", || {
        let mut cmd = common::loft();
        cmd.args([
            "run",
            "--kernel",
            path_str(&kernel),
            "--root",
            path_str(&root),
            "--disk",
            path_str(&data),
            "--disk",
            &ro_arg,
            "--cmdline",
            &cl,
        ]);
        cmd
    });
    eprintln!("boot A (root + data + read-only disk): {:?}", a.elapsed);
    assert_guest_ran(&a);
    eprintln!(
        "boot A: the guest's writes ran from {} s to {} s of its uptime",
        value(&a, "WRITES", "t0"),
        value(&a, "WRITES", "t1")
    );

    // 1. `/` is the ext4 image on /dev/vda, mounted read-write.
    let root_dev = value(&a, "ROOT", "dev");
    assert_eq!(
        value(&a, "ROOT", "type"),
        "ext4",
        "/ is not ext4\n{}",
        a.tail()
    );
    assert_eq!(
        root_dev,
        value(&a, "ROOT", "vda"),
        "/ is not mounted from /dev/vda\n{}",
        a.tail()
    );
    assert!(
        value(&a, "ROOT", "opts").split(',').any(|o| o == "rw"),
        "/ is not mounted read-write\n{}",
        a.tail()
    );
    assert!(
        a.stdout.contains(&format!(
            "VFS: Mounted root (ext4 filesystem) on device {root_dev}"
        )),
        "the kernel did not report mounting the ext4 root from {root_dev}\n{}",
        a.tail()
    );
    // The disks are in command-line order, with the image sizes as capacities.
    assert_eq!(
        value(&a, "DISKS", "vdb_sectors"),
        (DATA_DISK_LEN / 512).to_string(),
        "/dev/vdb should be the 8 MiB data disk\n{}",
        a.tail()
    );
    assert_eq!(
        value(&a, "DISKS", "vdc_sectors"),
        (RO_DISK_LEN / 512).to_string(),
        "/dev/vdc should be the 1 MiB read-only disk\n{}",
        a.tail()
    );

    // 3. The read-only disk: the guest is told, its write fails, the file is untouched.
    assert_eq!(
        value(&a, "DISKS", "vdc_ro"),
        "1",
        "the guest does not see /dev/vdc as read-only\n{}",
        a.tail()
    );
    assert_eq!(
        value(&a, "DISKS", "vdb_ro"),
        "0",
        "the data disk must be writable\n{}",
        a.tail()
    );
    assert_ne!(
        value(&a, "WRITES", "rowrite"),
        "0",
        "writing to the read-only disk succeeded in the guest\n{}",
        a.tail()
    );
    let ro_after = std::fs::read(&ro).unwrap();
    assert!(
        ro_after == ro_contents,
        "the read-only disk image changed on the host (md5 {} -> {})",
        md5_hex(&ro_contents),
        md5_hex(&ro_after)
    );

    // 2. What the guest wrote is in the host file, where it wrote it, and nothing else is.
    assert_eq!(
        value(&a, "WRITES", "copy"),
        "0",
        "dd to /dev/vdb failed\n{}",
        a.tail()
    );
    assert_eq!(
        value(&a, "WRITES", "mark"),
        "0",
        "writing the marker failed\n{}",
        a.tail()
    );
    let disk = std::fs::read(&data).unwrap();
    assert_eq!(disk.len(), DATA_DISK_LEN, "the data image changed size");
    let copied = &disk[COPY_OFFSET..COPY_OFFSET + RO_DISK_LEN];
    assert!(
        copied == &ro_contents[..],
        "the 1 MiB the guest copied is not at offset {COPY_OFFSET} of the host file \
(md5 there {}, expected {})",
        md5_hex(copied),
        md5_hex(&ro_contents)
    );
    let mut sector = mark.clone().into_bytes();
    sector.push(b'\n');
    sector.resize(512, 0);
    let at = MARK_SECTOR * 512;
    assert_eq!(
        String::from_utf8_lossy(&disk[at..at + 512]),
        String::from_utf8_lossy(&sector),
        "the marker sector is not at byte {at} of the host file"
    );
    let stray = disk.iter().enumerate().position(|(i, &b)| {
        b != 0
            && !(COPY_OFFSET..COPY_OFFSET + RO_DISK_LEN).contains(&i)
            && !(at..at + 512).contains(&i)
    });
    assert_eq!(stray, None, "bytes written outside the two regions");

    // Boot B, in a private network namespace with a TAP, a web server and a listener: the
    // data disk read back by a new guest matches the host file; then the network.
    let net = NetSetup::new();
    let guest_b = format!(
        "read t0 x </proc/uptime; \
dd if=/dev/vdb of=/tmp/copy bs=64k skip={skip} count=16 2>/dev/null; \
dd if=/dev/vdb of=/tmp/mark bs=512 skip={MARK_SECTOR} count=1 2>/dev/null; \
read -r mk </tmp/mark; echo MARKREAD $mk; \
read t1 x </proc/uptime; \
{net}; \
md5sum /tmp/copy /tmp/mark /tmp/blob; \
read t2 x </proc/uptime; echo TIMES t0=$t0 t1=$t1 t2=$t2",
        skip = COPY_OFFSET / (64 << 10),
        net = net.guest_cmd
    );
    let cl = cmdline(&guest_b);
    let net_arg = format!("tap={TAP},mac={GUEST_MAC}");
    let b = boot_guest("boot B", || {
        let mut cmd = net.ns.command(env!("CARGO_BIN_EXE_loft"));
        cmd.env("LOFT_LOG", "info").args([
            "run",
            "--kernel",
            path_str(&kernel),
            "--root",
            path_str(&root),
            "--disk",
            path_str(&data),
            "--net",
            &net_arg,
            "--cmdline",
            &cl,
        ]);
        cmd
    });
    eprintln!("boot B (read-back + network): {:?}", b.elapsed);
    assert_guest_ran(&b);
    eprintln!(
        "boot B: the guest read back from {} s, used the network from {} s, done at {} s",
        value(&b, "TIMES", "t0"),
        value(&b, "TIMES", "t1"),
        value(&b, "TIMES", "t2")
    );
    let host_copy = &disk[COPY_OFFSET..COPY_OFFSET + RO_DISK_LEN];
    assert_eq!(
        md5_of_file(&b, "/tmp/copy"),
        md5_hex(host_copy),
        "the guest read back other bytes at offset {COPY_OFFSET} than the host file holds\n{}",
        b.tail()
    );
    assert_eq!(
        md5_of_file(&b, "/tmp/mark"),
        md5_hex(&disk[at..at + 512]),
        "the guest read back another sector {MARK_SECTOR} than the host file holds\n{}",
        b.tail()
    );
    assert!(
        b.stdout
            .lines()
            .any(|l| l.trim_end() == format!("MARKREAD {mark}")),
        "the guest did not read the marker {mark} back\n{}",
        b.tail()
    );
    net.check(&b);
    eprintln!("block + net test: {:?}", started.elapsed());
}

const TAP: &str = "ltap0";
const GUEST_MAC: &str = "02:00:00:aa:bb:cc";
const HTTP_PORT: u16 = 8080;
const SINK_PORT: u16 = 9090;

/// A network namespace with a TAP for the guest, an HTTP server that serves random bytes and a
/// listener that records one line; and the guest commands that use them.
struct NetSetup {
    guest_ip: Ipv4Addr,
    blob: Arc<Vec<u8>>,
    path: String,
    upload: String,
    guest_cmd: String,
    // Dropped in this order: the servers stop, then the namespace (and its TAP) goes.
    http: TcpServer,
    sink: TcpServer,
    ns: NetNs,
}

impl NetSetup {
    fn new() -> Self {
        let subnet = 20 + (std::process::id() % 200) as u8;
        let host_ip = Ipv4Addr::new(10, 200, subnet, 1);
        let guest_ip = Ipv4Addr::new(10, 200, subnet, 2);
        let ns = NetNs::new("virtio");
        ns.add_tap(TAP, &format!("{host_ip}/24"));
        // The servers outlive the boot, then stop by themselves.
        let lifetime = BOOT_TIMEOUT + Duration::from_secs(60);
        let blob = Arc::new(random_bytes(256 * 1024, 3));
        let http = TcpServer::spawn(
            ns.bind_tcp(SocketAddr::from((host_ip, HTTP_PORT))),
            lifetime,
            http_responder(blob.clone()),
        );
        let sink = TcpServer::spawn(
            ns.bind_tcp(SocketAddr::from((host_ip, SINK_PORT))),
            lifetime,
            line_sink(),
        );
        let path = format!("/blob-{}", token(4));
        let upload = format!("LOFT-NET-{}", token(5));
        // One process per step: ifconfig (not two `ip`s), nc reads a file (no `echo |`).
        let guest_cmd = format!(
            "echo {upload} >/tmp/up; \
ifconfig eth0 {guest_ip} netmask 255.255.255.0 up; \
read mac </sys/class/net/eth0/address; echo NIC mac=$mac; \
wget -q -O /tmp/blob http://{host_ip}:{HTTP_PORT}{path}; w=$?; \
nc -w 60 {host_ip} {SINK_PORT} </tmp/up; n=$?; \
echo NET wget=$w nc=$n"
        );
        Self {
            guest_ip,
            blob,
            path,
            upload,
            guest_cmd,
            http,
            sink,
            ns,
        }
    }

    /// The guest's NIC had the MAC given, downloaded the served bytes intact and sent its line.
    fn check(&self, o: &Outcome) {
        let guest = std::net::IpAddr::V4(self.guest_ip);
        assert_eq!(
            value(o, "NIC", "mac"),
            GUEST_MAC,
            "the guest's NIC does not have the MAC given with --net\n{}",
            o.tail()
        );
        assert_eq!(
            value(o, "NET", "wget"),
            "0",
            "wget from the host failed\n{}",
            o.tail()
        );
        assert_eq!(
            md5_of_file(o, "/tmp/blob"),
            md5_hex(&self.blob),
            "the guest downloaded different bytes than the host served\n{}",
            o.tail()
        );
        let gets = self.http.connections();
        assert_eq!(
            gets.len(),
            1,
            "the HTTP server should have had one request\n{}",
            o.tail()
        );
        assert_eq!(
            gets[0].peer.ip(),
            guest,
            "the request did not come from the guest's address"
        );
        let head = String::from_utf8_lossy(&gets[0].received);
        assert!(
            head.starts_with(&format!("GET {} HTTP/1.", self.path)),
            "unexpected request: {head:?}"
        );
        assert_eq!(
            value(o, "NET", "nc"),
            "0",
            "nc to the host failed\n{}",
            o.tail()
        );
        let sent = self.sink.connections();
        assert_eq!(
            sent.len(),
            1,
            "the listener should have had one connection\n{}",
            o.tail()
        );
        assert_eq!(
            sent[0].peer.ip(),
            guest,
            "the line did not come from the guest"
        );
        assert_eq!(
            String::from_utf8_lossy(&sent[0].received),
            format!("{}\n", self.upload),
            "the listener did not receive the guest's line\n{}",
            o.tail()
        );
    }
}

/// Devices that cannot be opened: one clear line, before any guest runs.
#[test]
fn unopenable_tap_and_disk_fail_with_one_line() {
    common::require_kvm();
    let kernel = guest_file("vmlinux");
    let quick = Duration::from_secs(60);
    let ns = NetNs::new("err");
    ns.add_tun("ltun0");
    let loft_in_ns = |args: &[&str]| {
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_loft"));
        cmd.env("LOFT_LOG", "info")
            .args(["run", "--kernel", path_str(&kernel)])
            .args(args);
        common::run(cmd, quick)
    };

    // An existing interface that is not a TUN/TAP device.
    let o = loft_in_ns(&["--net", "tap=lo"]);
    assert_one_line_error(&o, &["tap=lo", "TAP lo", "Invalid argument"]);
    // A TUN device (layer 3) where a TAP is needed.
    let o = loft_in_ns(&["--net", "tap=ltun0"]);
    assert_one_line_error(&o, &["tap=ltun0", "TAP ltun0", "Invalid argument"]);
    // The same TAP twice: the second open finds it busy.
    let o = loft_in_ns(&["--net", "tap=ldup0", "--net", "tap=ldup0"]);
    assert_one_line_error(&o, &["tap=ldup0", "busy"]);

    let loft = |args: &[&str]| {
        let mut cmd = common::loft();
        cmd.args(["run", "--kernel", path_str(&kernel)]).args(args);
        common::run(cmd, quick)
    };
    let o = loft(&["--disk", "/nonexistent.img"]);
    assert_one_line_error(&o, &["/nonexistent.img", "No such file"]);
    let o = loft(&["--disk", "/nonexistent/ro.img,readonly"]);
    assert_one_line_error(&o, &["/nonexistent/ro.img", "No such file"]);
    let o = loft(&["--root", "/nonexistent/root.ext4"]);
    assert_one_line_error(&o, &["/nonexistent/root.ext4", "No such file"]);
    // A directory cannot be a read-write disk.
    let scratch = Scratch::new("err");
    let o = loft(&["--disk", path_str(&scratch.0)]);
    assert_one_line_error(&o, &[path_str(&scratch.0), "directory"]);
}

/// A directory cannot be a read-only disk either (its read-only open succeeds and its "size"
/// would be 2^63 - 1: loft must look at what it opened).
#[test]
fn directory_as_readonly_disk_is_refused() {
    common::require_kvm();
    let kernel = guest_file("vmlinux");
    let scratch = Scratch::new("dir");
    let arg = format!("{},readonly", path_str(&scratch.0));
    // Should it boot after all, it holds a slot, and the timeout fails the test.
    let _slot = BootSlot::acquire();
    let mut cmd = common::loft();
    cmd.args(["run", "--kernel", path_str(&kernel), "--disk", &arg]);
    let o = common::run(cmd, Duration::from_secs(60));
    assert_one_line_error(&o, &[path_str(&scratch.0), "directory"]);
}
