//! Sandbox benchmark: file transfer through the guest agent, in and out, and the round trip of a
//! 1-byte stdin echo through a spawned `cat`, in one booted guest.
//!
//! ```sh
//! cargo bench --bench sandbox            # prints a Markdown table
//! ```
//!
//! The library boots the bundled guest (256 MiB), waits for its agent, then five times: writes
//! 5 MiB of random bytes to `/tmp/bench.bin` with `write_file` and reads them back with
//! `read_file` (checked equal), and echoes one byte through `cat` (after a warm-up byte that
//! includes `cat`'s start). Medians with min–max.

#[allow(dead_code)] // shared with the boot bench
#[path = "boot/host.rs"]
mod host;
#[allow(dead_code)] // shared with the boot bench
#[path = "boot/stats.rs"]
mod stats;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use loft::{ExecRequest, ProcessOutput, VmBuilder};

const RUNS: usize = 5;
const SIZE: usize = 5 << 20;

/// Samples of one bench: MiB/s in, MiB/s out, echo milliseconds.
struct Samples {
    ins: Vec<f64>,
    outs: Vec<f64>,
    echoes: Vec<f64>,
}

fn measure() -> Result<Samples, loft::Error> {
    let dir = host::guest_dir();
    let vm = VmBuilder::new()
        .kernel(dir.join("vmlinux"))
        .initrd(dir.join("initramfs.cpio"))
        .memory_mib(256)
        .capture_console()
        .start()?;
    vm.wait_for_agent()?;
    let mut data = vec![0u8; SIZE];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .expect("host randomness");
    let mib = SIZE as f64 / f64::from(1 << 20);
    let (mut ins, mut outs, mut echoes) = (Vec::new(), Vec::new(), Vec::new());
    let mut cat = vm.spawn(&ExecRequest::new(["cat"]))?;
    for run in 0..=RUNS {
        let byte = [b'a' + run as u8];
        let t = Instant::now();
        cat.write_stdin(&byte)?;
        while !matches!(
            cat.read_output(Some(Duration::from_secs(60)))?,
            Some(ProcessOutput::Stdout(_))
        ) {}
        if run > 0 {
            echoes.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    for _ in 0..RUNS {
        let t = Instant::now();
        vm.write_file("/tmp/bench.bin", &data, 0o644)?;
        ins.push(mib / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let back = vm.read_file("/tmp/bench.bin", SIZE as u64)?;
        outs.push(mib / t.elapsed().as_secs_f64());
        assert!(back == data, "the bytes read back differ");
    }
    let _ = vm.kill();
    Ok(Samples { ins, outs, echoes })
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; nothing else is taken.
    let h = host::host_info();
    let Samples { ins, outs, echoes } = match measure() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("sandbox bench: {}", loft::error::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Host: {} · kernel {} · {} · loft {} · load {} · {RUNS} runs, medians (min–max)\n",
        h.cpu, h.kernel, h.kvm_flavour, h.loft_commit, h.load_avg
    );
    println!("| measure | value |\n|---|---|");
    println!(
        "| write_file 5 MiB, MiB/s | {} |",
        stats::fmt_spread(stats::spread(&ins))
    );
    println!(
        "| read_file 5 MiB, MiB/s | {} |",
        stats::fmt_spread(stats::spread(&outs))
    );
    println!(
        "| 1-byte stdin echo through `cat`, ms | {} |",
        stats::fmt_spread(stats::spread(&echoes))
    );
    ExitCode::SUCCESS
}
