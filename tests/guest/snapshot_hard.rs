//! The hard snapshot case: a 2-vCPU, 1 GiB guest snapshotted while a `dd` in it writes a data
//! disk and host connections to its agent are open, by a process that is then SIGKILLed; a
//! fresh process restores it more than 20 s later, and the guest carries on as if nothing had
//! happened.
//!
//! The snapshotting process is this test binary itself, run again as a child with only
//! [`snapshotting_child`] selected: it boots the guest through the library, starts a streaming
//! exec and opens an idle agent connection, waits until the guest's `dd` is well under way,
//! takes a [`loft::VmHandle::snapshot`] (the VM keeps running), checks that the VM goes on
//! (the exec keeps streaming and completes, the idle connection still answers), and waits to
//! be killed. The parent SIGKILLs it while its VM still runs, waits until 20 s have passed
//! since the snapshot, and restores it in-process on the same disk images: the `dd` finishes,
//! the disk holds exactly what a run without a snapshot writes, the guest's clock is the
//! host's, and both vCPUs run commands.
//!
//! The disk the `dd` writes is a sequence of numbered lines (`seq -w`), so every 8 bytes are
//! different: a write lost, replayed at another place or torn shows in the comparison with the
//! content the host computes. The snapshotted VM goes on writing the same disk until it is
//! killed; it writes the same bytes at the same places as the restored one will, so the end
//! result does not depend on when the kill lands.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{self, guest_file, BootSlot};
use loft::{ExecRequest, ExitStatus, Snapshot, VmBuilder, VmHandle};

/// Set (to the work directory) in the child's environment: only then does
/// [`snapshotting_child`] do anything.
const CHILD_ENV: &str = "LOFT_SNAPSHOT_HARD_DIR";
/// The child's name in this test binary.
const CHILD_TEST: &str = "snapshot_hard::snapshotting_child";
/// The guest's vsock context id (the one the library gives VMs with an agent).
const GUEST_CID: u64 = 3;
/// The prefix of the lines the child reports on.
const CHILD_SAYS: &str = "hard-child: ";

/// Lines `seq -w 0 1048575` writes: 7 digits and a newline each.
const LINES: usize = 1 << 20;
/// Bytes the `dd` writes to the data disk: 8 MiB. Data moves slowly within a guest on kvm_pvm
/// hosts (`seq` makes well under 1 MiB/s of lines when the machine is busy, and a restored
/// guest's first touch of each page costs host page faults), so the disk is small.
const DATA_LEN: usize = LINES * 8;
/// The data disk: larger than the data, so its end stays zeros.
const DISK_LEN: usize = 9 << 20;
/// The unit in which the host compares the disk.
const BLOCK: usize = 1 << 20;
/// What the guest's device must have written before the guest says the `dd` runs: 1 MiB.
const RUNNING_SECTORS: u32 = 1 << 11;
/// How long after the snapshot the restore comes.
const KEPT_FOR: Duration = Duration::from_secs(20);
/// How long the child's guest may take to boot and run its agent's first command: a boot takes
/// 20-35 s on an idle kvm_pvm host, minutes when the machine is busy with other guests (a 1 GiB
/// guest sets up its memory map slowly there).
const BOOT_AND_EXEC_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the restored guest may take to finish the `dd` and checksum the disk.
const RESTORED_WORK_TIMEOUT: Duration = Duration::from_secs(180);

/// The guest's command (run by its `/init`): once the host's exec has created `/tmp/go`, write
/// the numbered lines to `/dev/vdb` in the background, 64 KiB at a time with `O_DIRECT` (so the
/// device gets a request for every block as the `dd` goes, not all at a final flush), say
/// `DD-RUNNING` once the device has written 1 MiB, and wait for ever (for the agent: the guest
/// would reboot when this command ends). When the `dd` ends, its status goes to `/tmp/dd-rc`
/// and the console says `DD-DONE`. (The markers are split by empty single quotes in the
/// command, so that the kernel printing its command line does not print them.)
fn guest_cmd() -> String {
    format!(
        "while [ ! -e /tmp/go ]; do sleep 0.2; done; \
         {{ seq -w 0 {last} | dd of=/dev/vdb bs=64k iflag=fullblock oflag=direct conv=fsync 2>/tmp/dd-err; \
         echo $? > /tmp/dd-rc; echo DD-DO''NE; }} & \
         w=0; while [ $w -lt {RUNNING_SECTORS} ]; do read -r _ _ _ _ _ _ w _ < /sys/block/vdb/stat; done; \
         echo DD-RUN''NING sectors=$w; wait",
        last = LINES - 1
    )
}

/// The streaming exec open across the snapshot: lets the guest's `dd` start, then ticks until
/// `/tmp/stop-ticks` exists.
const TICKER: &str = "touch /tmp/go; i=0; while [ ! -e /tmp/stop-ticks ]; do echo tick-$i; \
                      i=$((i+1)); sleep 0.3; done; echo ticks-done";

/// What the data disk holds once the `dd` is done: the numbered lines, then zeros.
fn expected_disk() -> Vec<u8> {
    let mut disk = vec![0u8; DISK_LEN];
    for (i, line) in disk[..DATA_LEN].chunks_exact_mut(8).enumerate() {
        let mut n = i;
        for d in line[..7].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        line[7] = b'\n';
    }
    disk
}

/// How many of the blocks holding data are as the finished `dd` leaves them, of how many.
fn blocks_done(disk: &[u8], expected: &[u8]) -> (usize, usize) {
    let blocks = DATA_LEN.div_ceil(BLOCK);
    let done = (0..blocks)
        .filter(|b| {
            let r = b * BLOCK..((b + 1) * BLOCK).min(DISK_LEN);
            disk.get(r.clone()) == Some(&expected[r])
        })
        .count();
    (done, blocks)
}

struct Work {
    dir: PathBuf,
}

impl Work {
    fn vda(&self) -> PathBuf {
        self.dir.join("vda.img")
    }
    fn vdb(&self) -> PathBuf {
        self.dir.join("vdb.img")
    }
    fn snapshot(&self) -> PathBuf {
        self.dir.join("snapshot")
    }
    /// The vsock socket: in the temporary directory, as a Unix socket path is short.
    fn uds(&self) -> PathBuf {
        let name = self.dir.file_name().unwrap().to_string_lossy().into_owned();
        std::env::temp_dir().join(format!("{name}.vsock"))
    }
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls `cond` every 20 ms until it holds; false when `timeout` passed first.
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A VM's console, kept in memory and in a file (for a look after a failure).
#[derive(Clone)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    /// A console that also goes to `path`, and the builder option to give the VM.
    fn to_file(path: &Path) -> (Self, impl FnMut(&[u8]) + Send + 'static) {
        let kept = Console(Arc::new(Mutex::new(Vec::new())));
        let mut file = std::fs::File::create(path).unwrap();
        let sink = kept.clone();
        (kept, move |b: &[u8]| {
            sink.0.lock().unwrap().extend_from_slice(b);
            let _ = file.write_all(b);
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn tail(&self) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// What the guest says about itself when a command hangs: its processes (pid, name, state,
/// parent, group, last CPU), the data disk's requests in flight, its interrupts.
const DIAGNOSE: &str = "cat /proc/loadavg; ls /tmp; cat /sys/block/vdb/inflight; \
     grep -E 'CPU|virtio|LOC|RES|CAL|TLB' /proc/interrupts; \
     for s in /proc/[0-9]*/stat; do l=; read -r l < $s && echo $l; done | cut -d' ' -f1-5,39";

/// Runs `body`, stopping `vm` when it takes longer than `timeout` (an exec into a hung guest
/// would wait for ever): the exec then fails, and the test with it. Before it stops the VM, it
/// asks the guest what it is doing ([`DIAGNOSE`]) and prints the answer.
fn with_deadline<T>(vm: &VmHandle, timeout: Duration, body: impl FnOnce() -> T) -> T {
    let done = Mutex::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if *done.lock().unwrap() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("no answer within {timeout:?}: asking the guest what it does");
            let (tx, rx) = mpsc::channel();
            s.spawn(move || {
                let _ = tx.send(vm.exec(&ExecRequest::new(["/bin/sh", "-c", DIAGNOSE])));
            });
            match rx.recv_timeout(Duration::from_secs(90)) {
                Ok(Ok(out)) => eprintln!(
                    "--- the guest ---\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                other => eprintln!("the guest did not say: {other:?}"),
            }
            vm.stop();
        });
        let r = body();
        *done.lock().unwrap() = true;
        r
    })
}

/// A raw connection to the guest agent through the vsock socket (Firecracker's handshake).
fn connect_agent(uds: &Path) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(format!("CONNECT {}\n", loft::AGENT_PORT).as_bytes())
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).expect("read the CONNECT answer");
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    assert!(line.starts_with("OK "), "CONNECT answered {line:?}");
    s
}

/// Runs `argv` over a raw agent connection: its stdout and exit code.
fn exec_raw(s: &mut UnixStream, argv: &[&str]) -> (String, i32) {
    let payload = ExecRequest::new(argv.iter().copied())
        .encode(false)
        .unwrap();
    let mut frame = vec![0x01];
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    s.write_all(&frame).expect("send an exec request");
    let mut stdout = Vec::new();
    loop {
        let mut header = [0u8; 5];
        s.read_exact(&mut header).expect("read a frame header");
        let len = u32::from_le_bytes(header[1..].try_into().unwrap()) as usize;
        assert!(len <= 1 << 20, "frame of {len} bytes");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("read a frame");
        match header[0] {
            0x81 => stdout.extend_from_slice(&body),
            // Stderr, and Started (the command's pid).
            0x82 | 0x8a => {}
            0x83 => {
                let code = i32::from_le_bytes(body[..4].try_into().unwrap());
                return (String::from_utf8_lossy(&stdout).into_owned(), code);
            }
            kind => panic!(
                "agent frame {kind:#x}: {:?}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

/// Not a test: the process that takes the snapshot, started (and killed) by
/// [`a_vm_snapshotted_mid_dd_by_a_process_then_sigkilled_is_restored_20s_later`]. Run alone it
/// does nothing.
#[test]
#[ignore = "the snapshotting child process of snapshot_hard's test, which runs it"]
fn snapshotting_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        eprintln!("{CHILD_TEST} only runs as the child of the snapshot_hard test");
        return;
    };
    // A failure must end this process: the streaming exec would keep it waiting.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(101);
    }));
    let work = Work {
        dir: PathBuf::from(dir),
    };
    let say = |what: &str| println!("{CHILD_SAYS}{what}");
    let (console, sink) = Console::to_file(&work.dir.join("console-snapshotted.log"));
    let booted = Instant::now();
    let vm = VmBuilder::new()
        .kernel(guest_file("vmlinux"))
        .initrd(guest_file("initramfs.cpio"))
        .cpus(2)
        .memory_mib(1024)
        .disk(work.vda(), false)
        .disk(work.vdb(), false)
        .vsock(GUEST_CID, work.uds())
        .cmdline(format!("guest_cmd=\"{}\"", guest_cmd()))
        .agent_timeout(BOOT_AND_EXEC_TIMEOUT)
        .console_callback(sink)
        .start()
        .expect("start the VM");
    let ticks = Mutex::new(String::new());
    let tick_lines = || {
        ticks
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("tick-"))
            .count()
    };
    std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            vm.exec_streaming(
                &ExecRequest::new(["/bin/sh", "-c", TICKER]),
                |b| ticks.lock().unwrap().push_str(&String::from_utf8_lossy(b)),
                |_| {},
            )
        });
        assert!(
            wait_until(BOOT_AND_EXEC_TIMEOUT, || tick_lines() > 0),
            "the guest never ran the ticking exec\n{}",
            console.tail()
        );
        say(&format!("booted in {:?}", booted.elapsed()));
        let mut idle = connect_agent(&work.uds());
        assert!(
            wait_until(Duration::from_secs(180), || {
                console.text().contains("DD-RUNNING")
            }),
            "the guest's dd did not get going\n{}",
            console.tail()
        );
        assert!(
            !console.text().contains("DD-DONE"),
            "the dd finished before the snapshot\n{}",
            console.tail()
        );
        let ticks_before = tick_lines();
        let started = Instant::now();
        let info = vm.snapshot(work.snapshot()).expect("snapshot");
        let took = started.elapsed();
        let disk = std::fs::read(work.vdb()).unwrap();
        let (done, blocks) = blocks_done(&disk, &expected_disk());
        say(&format!(
            "snapshot cpus={} memory={} memory_on_disk={} took_ms={} ticks_before={ticks_before}",
            info.cpus,
            info.memory,
            info.memory_on_disk,
            took.as_millis()
        ));
        say(&format!("blocks-at-snapshot={done}/{blocks}"));
        say("SNAPSHOT-TAKEN");

        // The VM goes on: the exec that streamed across the snapshot streams on, then ends.
        assert!(
            wait_until(Duration::from_secs(60), || tick_lines() > ticks_before),
            "the exec streamed nothing after the snapshot\n{}",
            console.tail()
        );
        let stop = vm
            .exec(&ExecRequest::new(["touch", "/tmp/stop-ticks"]))
            .expect("exec after the snapshot");
        assert_eq!(stop.status, ExitStatus::Code(0));
        let status = ticker.join().unwrap().expect("the ticking exec");
        assert_eq!(status, ExitStatus::Code(0));
        let out = ticks.lock().unwrap().clone();
        let expected: Vec<String> = (0..tick_lines())
            .map(|i| format!("tick-{i}"))
            .chain(["ticks-done".to_string()])
            .collect();
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            expected,
            "the ticks lost or repeated output"
        );
        say(&format!("ticks={}", tick_lines()));
        // The connection that sat idle across the snapshot still reaches the agent.
        let (idle_out, idle_code) = exec_raw(&mut idle, &["echo", "idle-connection-ok"]);
        assert_eq!((idle_out.as_str(), idle_code), ("idle-connection-ok\n", 0));
        say("CHILD-DONE");
        // Killed here, its VM still running.
        std::thread::sleep(Duration::from_secs(300));
        panic!("the parent test never killed this process");
    });
}

/// The snapshotting child process, and what it said so far.
struct Child {
    process: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Child {
    /// Runs [`snapshotting_child`] in a new process of this test binary, on `work`.
    fn spawn(work: &Work) -> Self {
        let mut process = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, &work.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the child");
        let (tx, lines) = mpsc::channel();
        let stdout = process.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut stderr = process.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Self {
            process,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for the child's report `what` (a line of [`CHILD_SAYS`] then `what`…) and returns
    /// it without the prefix; fails the test when the child's output ends or `timeout` passes
    /// first.
    fn expect(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                self.fail(&format!("the child never said {what:?}"));
            };
            self.seen.push(line.clone());
            // The harness's "test … ... " may come first on the line.
            if let Some(said) = line.split_once(CHILD_SAYS).map(|(_, said)| said) {
                if said.starts_with(what) {
                    return said.to_string();
                }
            }
        }
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        panic!(
            "{what}\n--- child stdout ---\n{}\n--- child stderr ---\n{}",
            self.seen.join("\n"),
            stderr.unwrap_or_default()
        );
    }
}

/// The value of `key=` in a line of `key=value` words.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn a_vm_snapshotted_mid_dd_by_a_process_then_sigkilled_is_restored_20s_later() {
    common::require_kvm();
    let test_started = Instant::now();
    let work = Work {
        dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("loft-snapshot-hard-{}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&work.dir);
    std::fs::create_dir_all(&work.dir).unwrap();
    std::fs::File::create(work.vda())
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    std::fs::File::create(work.vdb())
        .unwrap()
        .set_len(DISK_LEN as u64)
        .unwrap();
    let expected = expected_disk();

    // The child boots the guest and snapshots it mid-dd; it is SIGKILLed while its VM runs.
    let slot = BootSlot::acquire();
    let mut child = Child::spawn(&work);
    let booted_line = child.expect("booted", BOOT_AND_EXEC_TIMEOUT + Duration::from_secs(10));
    let snapshot_line = child.expect(
        "snapshot ",
        BOOT_AND_EXEC_TIMEOUT + Duration::from_secs(200),
    );
    let blocks_line = child.expect("blocks-at-snapshot=", Duration::from_secs(10));
    child.expect("SNAPSHOT-TAKEN", Duration::from_secs(10));
    let snapshot_taken = Instant::now();
    child.expect("CHILD-DONE", Duration::from_secs(180));
    child.process.kill().expect("SIGKILL the child");
    let status = child.process.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the child was not running when killed: {status:?}"
    );
    drop(slot);
    eprintln!(
        "child: {booted_line}; {}; {}; killed {:?} after the snapshot",
        snapshot_line,
        blocks_line,
        snapshot_taken.elapsed()
    );
    assert_eq!(field(&snapshot_line, "cpus"), "2");
    assert_eq!(field(&snapshot_line, "memory"), (1u64 << 30).to_string());
    // The dd was under way: the device had written part of the data, not all of it.
    let (done, blocks) = field(&blocks_line, "blocks-at-snapshot")
        .split_once('/')
        .unwrap();
    let (done, blocks): (usize, usize) = (done.parse().unwrap(), blocks.parse().unwrap());
    assert!(
        done > 0 && done < blocks,
        "the dd was not in flight at the snapshot: {done} of {blocks} blocks written"
    );

    // A fresh process (this one has never run the VM) restores it 20 s later.
    std::thread::sleep(KEPT_FOR.saturating_sub(snapshot_taken.elapsed()));
    let snapshot = Snapshot::open(work.snapshot()).expect("open the snapshot");
    let info = snapshot.info();
    assert_eq!((info.cpus, info.memory), (2, 1 << 30), "{info}");
    assert_eq!(info.devices.len(), 3, "{info}");
    let _slot = BootSlot::acquire();
    let kept = snapshot_taken.elapsed();
    let restore_started = Instant::now();
    let (console, sink) = Console::to_file(&work.dir.join("console-restored.log"));
    let vm = VmBuilder::new()
        .disk(work.vda(), false)
        .disk(work.vdb(), false)
        // The killed process left its socket file behind: the restore takes the path over.
        .vsock(GUEST_CID, work.uds())
        .agent_timeout(Duration::from_secs(60))
        .console_callback(sink)
        .restore_from(snapshot)
        .start()
        .expect("restore");
    assert!(vm.boot_times().restored.is_some());
    // The first request after a restore syncs the guest's clock and RNG through the agent.
    with_deadline(&vm, Duration::from_secs(120), || vm.wait_for_agent())
        .unwrap_or_else(|e| panic!("the restored agent: {e:?}\n{}", console.tail()));
    let synced_in = restore_started.elapsed();
    let run = |what: &str, timeout: Duration, script: &str| -> String {
        let streamed = Mutex::new(String::new());
        let keep = |b: &[u8]| {
            streamed
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(b))
        };
        let status = with_deadline(&vm, timeout, || {
            vm.exec_streaming(&ExecRequest::new(["/bin/sh", "-c", script]), keep, keep)
        });
        let out = streamed.into_inner().unwrap();
        match status {
            Ok(ExitStatus::Code(0)) => out,
            other => panic!(
                "{what} after the restore (the agent synced after {synced_in:?}): {other:?}\n\
                 --- its output ---\n{out}\n--- console ---\n{}",
                console.tail()
            ),
        }
    };
    // The dd goes on and finishes by itself.
    let out = run(
        "the dd",
        RESTORED_WORK_TIMEOUT,
        "while [ ! -e /tmp/dd-rc ]; do sleep 0.2; done; cat /tmp/dd-rc /tmp/dd-err",
    );
    let finished_in = restore_started.elapsed();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"0"), "the dd failed:\n{out}");
    let records = format!("{}+0 records out", DATA_LEN / (64 << 10));
    assert!(
        lines.contains(&records.as_str()),
        "the dd did not write {records}:\n{out}"
    );
    // Both vCPUs run processes.
    let out = run(
        "a process on each vCPU",
        RESTORED_WORK_TIMEOUT,
        "for c in 0 1; do taskset -c $c cut -d' ' -f39 /proc/self/stat; done",
    );
    assert_eq!(out, "0\n1\n", "processes pinned to vCPU 0 and 1 ran on");
    // The guest reads what the host file holds (checked below).
    let out = run("sha256sum", RESTORED_WORK_TIMEOUT, "sha256sum /dev/vdb");
    let guest_sum = out
        .trim_end()
        .strip_suffix("  /dev/vdb")
        .unwrap_or_else(|| panic!("no checksum in\n{out}"))
        .to_string();

    // The guest's clock is the host's.
    let before = now_unix();
    let date = with_deadline(&vm, Duration::from_secs(60), || {
        vm.exec(&ExecRequest::new(["date", "+%s"]))
    })
    .expect("date");
    let after = now_unix();
    let guest_time: f64 = String::from_utf8_lossy(&date.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("date said {date:?}"));
    assert!(
        guest_time >= before.floor() - 2.0 && guest_time <= after + 2.0,
        "the guest's clock {guest_time} is not within 2 s of the host's ({before}..{after})"
    );
    let console = console.text();
    assert!(
        console.contains("DD-DONE"),
        "the restored guest did not finish the dd itself:\n{console}"
    );
    assert!(
        !console.contains("GUEST-INIT-READY"),
        "the guest booted again:\n{console}"
    );
    vm.kill().expect("stop the restored VM");

    // The disk is exactly what the dd writes, in the host file and as the guest read it.
    let disk = std::fs::read(work.vdb()).unwrap();
    let (done, blocks) = blocks_done(&disk, &expected);
    assert_eq!(disk.len(), DISK_LEN);
    assert!(
        disk == expected,
        "the data disk differs from what the dd writes: {done} of {blocks} data blocks right, \
         the rest of the disk {}",
        if disk[DATA_LEN..] == expected[DATA_LEN..] {
            "right"
        } else {
            "wrong"
        }
    );
    let host_sum = Command::new("sha256sum").arg(work.vdb()).output().unwrap();
    let host_sum = String::from_utf8_lossy(&host_sum.stdout);
    assert_eq!(
        host_sum.split_whitespace().next(),
        Some(guest_sum.as_str()),
        "the guest read another disk than the host file holds"
    );
    eprintln!(
        "restored {kept:?} after the snapshot; the dd finished {finished_in:?} \
         after the restore (agent synced after {synced_in:?}); whole test {:?}",
        test_started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&work.dir);
    let _ = std::fs::remove_file(work.uds());
}
