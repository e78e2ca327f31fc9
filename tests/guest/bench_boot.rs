//! The boot benchmark (benches/boot.rs): one real run of
//! `cargo bench --bench boot -- --runs 1 --only loft-elf,unshare` whose boot.json is checked.
//!
//! The real run boots a guest with loft: it needs /dev/kvm and takes minutes on a nested
//! kvm_pvm host (plus a release build of loft when the bench was not built yet).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::BootSlot;

/// One guest boot (60–150 s here, 600 s at most by the limit the test gives the bench), and a
/// release build should the bench need one after all.
const LIMIT: Duration = Duration::from_secs(40 * 60);

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// `cargo bench --bench boot -- ARGS`, with this test's environment (so the same
/// CARGO_TARGET_DIR); returns (exit code, stdout, stderr).
fn bench(args: &[&str]) -> (Option<i32>, String, String) {
    let dir = std::env::temp_dir().join(format!(
        "bench-boot-test-{}-{}",
        std::process::id(),
        args.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(cargo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["bench", "--bench", "boot", "--"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("cannot run cargo bench");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cargo bench --bench boot did not finish in {LIMIT:?}; stderr so far:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (status.code(), out, err)
}

fn num(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"))
}

#[test]
fn bench_boots_loft_and_a_container_and_writes_its_results() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test boots a real guest with loft and needs KVM \
         (it is never skipped)"
    );
    // Compile the bench (a release build of loft) before taking a boot slot, so that other
    // tests' guests boot meanwhile.
    let build = Command::new(cargo())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["bench", "--bench", "boot", "--no-run"])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run cargo bench --no-run");
    assert!(
        build.status.success(),
        "cargo bench --bench boot --no-run failed\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let _slot = BootSlot::acquire();
    let out: PathBuf = std::env::temp_dir().join(format!("bench-boot-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (code, stdout, stderr) = bench(&[
        "--runs",
        "1",
        "--only",
        "loft-elf,unshare",
        // a guest boot takes 60-150 s on a nested kvm_pvm host, more when the machine is busy
        "--timeout",
        "600",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        code,
        Some(0),
        "cargo bench failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    let text = std::fs::read_to_string(out.join("boot.json"))
        .unwrap_or_else(|e| panic!("no boot.json: {e}\n--- stderr\n{stderr}"));
    let j: Value = serde_json::from_str(&text).expect("boot.json is JSON");
    let log_of = |run: &Value| -> String {
        run["log"]
            .as_str()
            .and_then(|l| std::fs::read_to_string(out.join(l)).ok())
            .unwrap_or_default()
    };

    // host
    for field in ["cpu", "kernel", "kvm_flavour", "loft_commit"] {
        let v = j["host"][field].as_str().unwrap_or_default();
        assert!(!v.is_empty(), "host.{field} missing: {}", j["host"]);
    }
    assert!(
        ["kvm_pvm", "vmx", "svm", "unknown"].contains(&j["host"]["kvm_flavour"].as_str().unwrap()),
        "host.kvm_flavour: {}",
        j["host"]["kvm_flavour"]
    );

    // one run per runner, both ok, every number positive
    let runs = j["runs"].as_array().expect("runs is an array");
    assert_eq!(runs.len(), 2, "one run per runner: {runs:#?}");
    for name in ["loft-elf", "unshare+chroot"] {
        let mine: Vec<&Value> = runs.iter().filter(|r| r["runner"] == name).collect();
        assert_eq!(mine.len(), 1, "runs of {name}: {runs:#?}");
        let r = mine[0];
        assert_eq!(
            r["ok"],
            Value::Bool(true),
            "{name} failed: {}\n{}",
            r["error"],
            log_of(r)
        );
        for field in ["ready_ms", "exit_ms", "peak_rss_kib", "cpu_ms"] {
            assert!(num(&r[field], field) > 0.0, "{name}.{field} = {}", r[field]);
        }
        assert!(
            num(&r["exit_ms"], "exit_ms") >= num(&r["ready_ms"], "ready_ms"),
            "{name}: exit before ready: {r}"
        );
    }
    let loft = runs.iter().find(|r| r["runner"] == "loft-elf").unwrap();
    let overhead = num(&loft["vmm_overhead_kib"], "vmm_overhead_kib");
    assert!(
        overhead > 0.0 && overhead < num(&loft["peak_rss_kib"], "peak_rss_kib"),
        "loft's VMM overhead {overhead} KiB vs peak RSS {}",
        loft["peak_rss_kib"]
    );
    if j["config"]["loft_boot_timer"] == Value::Bool(true) {
        assert!(
            loft["boot_timer"].is_object(),
            "loft knows --boot-timer but no phases were parsed: {}",
            log_of(loft)
        );
    }
    let unshare = runs
        .iter()
        .find(|r| r["runner"] == "unshare+chroot")
        .unwrap();
    assert!(unshare["vmm_overhead_kib"].is_null());
    assert!(unshare["boot_timer"].is_null());

    // summary
    let summary = j["summary"].as_array().expect("summary is an array");
    assert_eq!(summary.len(), 2, "{summary:#?}");
    for s in summary {
        assert_eq!(s["failed_runs"], Value::from(0), "failed_runs in {s}");
        assert_eq!(s["ok_runs"], Value::from(1), "ok_runs in {s}");
        for field in ["ready_ms", "exit_ms", "peak_rss_kib", "cpu_ms"] {
            for k in ["median", "min", "max"] {
                assert!(num(&s[field][k], field) > 0.0, "{field}.{k} in {s}");
            }
        }
    }
    let loft_sum = summary.iter().find(|s| s["runner"] == "loft-elf").unwrap();
    assert_eq!(num(&loft_sum["ratio_to_loft"], "ratio_to_loft"), 1.0);

    // the other outputs
    let md = std::fs::read_to_string(out.join("boot.md")).expect("boot.md");
    assert!(
        md.contains("| loft-elf |") && md.contains("| unshare+chroot |"),
        "{md}"
    );
    assert!(
        stdout.contains("| loft-elf |"),
        "the table is printed: {stdout}"
    );
    let svg = std::fs::read_to_string(out.join("boot.svg")).expect("boot.svg");
    assert!(
        svg.contains("<svg") && svg.contains("loft-elf"),
        "boot.svg: {svg}"
    );

    // an unknown runner name is a clear error
    let (code, _, stderr) = bench(&["--only", "loft,bogus"]);
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("unknown runner 'bogus'"), "{stderr}");

    let _ = std::fs::remove_dir_all(&out);
}
