//! The start-up cost of process mode (`VmBuilder::isolated`) over in-process: restores of one
//! snapshot, timed from `start()` to the first `exec(["true"])` result, the two modes
//! interleaved, and the median (min–max) of each; and of `start()` alone (until the handle is
//! returned: for process mode, the child is running and answers on its API socket).
//!
//! `cargo run --release --example isolated_startup -- SNAPSHOT_DIR DISK [ROUNDS]`: `DISK` is
//! copied for each restore (the snapshot's data disk, when it has one; `-` for none). The
//! `loft` binary is found as the library finds it (`LOFT_BIN`, or beside this example in
//! `target/*`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use loft::{ExecRequest, Snapshot, VmBuilder};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: isolated_startup SNAPSHOT_DIR DISK|- [ROUNDS]";
    let dir = PathBuf::from(args.next().ok_or(usage)?);
    let disk = args.next().ok_or(usage)?;
    let rounds: usize = args.next().map_or(Ok(10), |n| n.parse())?;
    let snapshot = Snapshot::open(&dir)?;
    let scratch = std::env::temp_dir().join(format!("loft-iso-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut starts: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        // Interleaved, the order swapped every round.
        for k in 0..2 {
            let isolated = (round + k) % 2 == 1;
            let mut b = VmBuilder::new().restore_from(snapshot.clone());
            if disk != "-" {
                let copy = scratch.join(format!("disk-{round}-{k}.img"));
                std::fs::copy(&disk, &copy)?;
                b = b.disk(&copy, false);
            }
            if isolated {
                b = b.isolated();
            }
            let t = Instant::now();
            let vm = b.start()?;
            let started = t.elapsed();
            let out = vm.exec(&ExecRequest::new(["true"]))?;
            let took = t.elapsed();
            assert!(out.status.success(), "{out:?}");
            drop(vm);
            let mode = if isolated { "isolated" } else { "in-process" };
            println!(
                "round {round} {mode:10} {:8.1} ms (start() {:.1} ms)",
                ms(took),
                ms(started)
            );
            times[isolated as usize].push(took);
            starts[isolated as usize].push(started);
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let [t0, t1] = &mut times;
    let [s0, s1] = &mut starts;
    for (what, t) in [
        ("in-process start..exec", t0),
        ("isolated   start..exec", t1),
        ("in-process start()", s0),
        ("isolated   start()", s1),
    ] {
        t.sort();
        println!(
            "{what:22}: median {:.1} ms (min {:.1}, max {:.1}) over {}",
            ms(t[t.len() / 2]),
            ms(t[0]),
            ms(t[t.len() - 1]),
            t.len()
        );
    }
    let added_start =
        starts[1][starts[1].len() / 2].as_secs_f64() - starts[0][starts[0].len() / 2].as_secs_f64();
    println!(
        "added to start() by process mode (difference of medians): {:.1} ms",
        added_start * 1e3
    );
    let added_total =
        times[1][times[1].len() / 2].as_secs_f64() - times[0][times[0].len() / 2].as_secs_f64();
    println!(
        "added to start..exec by process mode (difference of medians): {:.1} ms",
        added_total * 1e3
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
