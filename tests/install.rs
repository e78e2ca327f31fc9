//! `scripts/install.sh --prefix DIR` gives a loft that finds its guest from any directory,
//! through the installed layout (`DIR/bin/loft`, `DIR/share/loft/guest`) and nothing compiled
//! in at build time.
//!
//! No guest is booted: `loft run --memory 1M` fails only after it has found and measured the
//! guest's kernel ("too small for this guest"), and with no guest installed it fails saying
//! where it looked.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{assert_one_line_error, run};

fn installed_loft(prefix: &Path) -> Command {
    let mut c = Command::new(prefix.join("bin/loft"));
    c.current_dir("/").env_remove("LOFT_GUEST_DIR");
    c
}

#[test]
fn an_installed_loft_finds_its_guest_from_any_directory() {
    let prefix = std::env::temp_dir().join(format!("loft-install-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&prefix);
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .env(
            "CARGO",
            std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
        )
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/install.sh");
    assert!(
        out.status.success(),
        "install.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(prefix.join("share/loft/guest/vmlinux").is_file());

    let mut cmd = installed_loft(&prefix);
    cmd.args(["run", "--memory", "1M"]);
    let o = run(cmd, Duration::from_secs(60));
    assert_one_line_error(&o, &["--memory 1M", "too small for this guest"]);

    // Without the installed guest it says where it looked: beside the executable, and never
    // the source tree's target/guest (a release build has no path compiled in).
    std::fs::remove_dir_all(prefix.join("share/loft/guest")).unwrap();
    let mut cmd = installed_loft(&prefix);
    cmd.args(["run", "--memory", "1M"]);
    let o = run(cmd, Duration::from_secs(60));
    let looked = prefix.join("share/loft/guest");
    assert_one_line_error(&o, &["no guest kernel", looked.to_str().unwrap()]);
    assert!(
        !o.stderr.contains(env!("CARGO_MANIFEST_DIR")),
        "the installed loft looked in the source tree: {}",
        o.stderr
    );
    std::fs::remove_dir_all(&prefix).unwrap();
}
