//! loft as a sandbox library: start a micro-VM, run commands in it, stop it.
//!
//! ```sh
//! cargo run --release --example sandbox            # the bundled guest (firmware/build.sh)
//! cargo run --release --example sandbox -- 20      # and time 20 runs of `true`
//! ```
//!
//! Prints the time from `start()` to the first command's result and, with a count, the median
//! round trip of `exec("true")` in the running VM.

use std::time::{Duration, Instant};

use loft::ExecRequest;
use loft::VmBuilder;

fn main() -> Result<(), loft::Error> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);

    let start = Instant::now();
    let vm = VmBuilder::new().memory_mib(256).capture_console().start()?;
    println!("start() returned after {:?}", start.elapsed());

    let out = vm.exec(&ExecRequest::new([
        "/bin/sh",
        "-c",
        "echo hello from $(uname -n); echo oops >&2; exit 3",
    ]))?;
    println!(
        "first exec result after {:?} (from start())",
        start.elapsed()
    );
    println!(
        "  status {}, stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    if rounds > 0 {
        let mut times: Vec<Duration> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                vm.exec(&ExecRequest::new(["true"])).map(|o| {
                    assert!(o.status.success(), "true failed: {}", o.status);
                    t.elapsed()
                })
            })
            .collect::<Result<_, _>>()?;
        times.sort();
        println!(
            "exec(\"true\") round trip over {rounds} runs: median {:?}, min {:?}, max {:?}",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }

    let reason = vm.kill()?;
    println!("VM stopped: {reason}; boot times: {}", vm.boot_times());
    Ok(())
}
