//! Clones: boot the bundled guest once, snapshot it when its agent answers, then restore that
//! snapshot N times at once in this process and run a command in each clone.
//!
//! ```sh
//! cargo run --release -p loft --example clones -- [N] [SNAPSHOT_DIR]
//! ```
//!
//! With an existing SNAPSHOT_DIR (from `loft snapshot create` or an earlier run) the boot is
//! skipped. Each clone gets its own vsock socket, fresh randomness and a clone id; the guest
//! memory they do not write is shared through the page cache of the snapshot's memory file.

use std::path::PathBuf;
use std::time::Instant;

use loft::{ExecRequest, Snapshot, VmBuilder};

fn main() -> Result<(), loft::Error> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("loft-clones-example"));
    if !dir.join("state").is_file() {
        let t = Instant::now();
        let vm = VmBuilder::new().memory_mib(256).start()?;
        vm.wait_for_agent()?;
        let info = vm.snapshot_and_stop(&dir)?;
        println!("booted and snapshotted in {:.1?}:\n{info}\n", t.elapsed());
    }
    let snapshot = Snapshot::open(&dir)?;
    let t = Instant::now();
    let clones = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(|| snapshot.restore())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("restore thread"))
            .collect::<Result<Vec<_>, _>>()
    })?;
    println!("{n} clones restored in {:.1?}", t.elapsed());
    std::thread::scope(|s| {
        for (i, vm) in clones.iter().enumerate() {
            s.spawn(move || {
                let t = Instant::now();
                let cmd = ExecRequest::new([
                    "/bin/sh",
                    "-c",
                    "cat /run/loft/clone-id; head -c 8 /dev/urandom | od -An -tx1",
                ]);
                match vm.exec(&cmd) {
                    Ok(out) => print!(
                        "clone {i} ({:.1?}): {}",
                        t.elapsed(),
                        String::from_utf8_lossy(&out.stdout).replace('\n', " ") + "\n"
                    ),
                    Err(e) => println!("clone {i}: {e}"),
                }
            });
        }
    });
    Ok(())
}
