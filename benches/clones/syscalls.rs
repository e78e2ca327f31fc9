//! Where a restore's time goes in the kernel: `strace -f -T -tt loft run --restore DIR -- true`,
//! and the syscalls between `KVM_CREATE_VM` and the first `KVM_RUN`, summed by kind (an ioctl
//! by its request). strace slows every syscall a little; the big ones stand out anyway.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Traced {
    pub round: usize,
    /// `execve` → `KVM_CREATE_VM`: process start, arguments, the state file read and checked.
    pub exec_to_create_vm_ms: Option<f64>,
    /// `KVM_CREATE_VM` → the first `KVM_RUN`: the restore itself.
    pub create_vm_to_run_ms: Option<f64>,
    /// Time inside syscalls in that window, by kind, ms (largest first).
    pub top: Vec<(String, f64, usize)>,
    pub error: Option<String>,
}

/// `HH:MM:SS.micros` → seconds since midnight.
fn stamp(s: &str) -> Option<f64> {
    let mut p = s.split(':');
    let h: f64 = p.next()?.parse().ok()?;
    let m: f64 = p.next()?.parse().ok()?;
    let sec: f64 = p.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

/// One strace line: its pid, time, syscall kind (`None` for a resumed call, named by its
/// unfinished start), its duration (seconds) when it has one.
fn line(l: &str) -> Option<(String, f64, Option<String>, Option<f64>)> {
    // `PID HH:MM:SS.micros call…`, the pid padded to a width of 5
    let (pid, rest) = l.trim_start().split_once(' ')?;
    let (at, rest) = rest.trim_start().split_once(' ')?;
    let pid = pid.to_string();
    let t = stamp(at)?;
    let rest = rest.trim_start();
    let kind = if rest.starts_with("<... ") {
        None
    } else {
        let call = rest.split('(').next()?.to_string();
        Some(if call == "ioctl" {
            let req = rest
                .split_once('(')
                .map(|x| x.1)
                .and_then(|a| a.split(", ").nth(1))
                .and_then(|r| r.split([' ', ',', ')']).next())
                .filter(|r| r.starts_with("KVM_"))
                .unwrap_or_default();
            if req.is_empty() {
                "ioctl".to_string()
            } else {
                format!("ioctl {req}")
            }
        } else {
            call
        })
    };
    let dur = l
        .rsplit_once('<')
        .and_then(|(_, d)| d.strip_suffix('>'))
        .and_then(|d| d.parse().ok());
    Some((pid, t, kind, dur))
}

/// Sums an strace text (see the module).
pub fn analyse(text: &str, round: usize) -> Traced {
    let mut t = Traced {
        round,
        ..Traced::default()
    };
    // (time, kind, duration): a resumed call takes the kind of its pid's unfinished one
    let mut pending: BTreeMap<String, String> = BTreeMap::new();
    let mut lines: Vec<(f64, String, Option<f64>)> = Vec::new();
    for raw in text.lines() {
        let Some((pid, at, kind, dur)) = line(raw) else {
            continue;
        };
        let kind = match kind {
            Some(k) => {
                if raw.ends_with("<unfinished ...>") {
                    pending.insert(pid, k.clone());
                }
                k
            }
            None => pending.remove(&pid).unwrap_or_else(|| "?".into()),
        };
        lines.push((at, kind, dur));
    }
    let exec = lines.iter().find(|l| l.1 == "execve").map(|l| l.0);
    let create = lines.iter().position(|l| l.1 == "ioctl KVM_CREATE_VM");
    let run = lines.iter().position(|l| l.1 == "ioctl KVM_RUN");
    let (Some(c), Some(r)) = (create, run) else {
        t.error = Some("no KVM_CREATE_VM or KVM_RUN in the trace".into());
        return t;
    };
    t.exec_to_create_vm_ms = exec.map(|e| (lines[c].0 - e) * 1e3);
    t.create_vm_to_run_ms = Some((lines[r].0 - lines[c].0) * 1e3);
    let mut by: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for l in &lines[c..r] {
        if let Some(d) = l.2 {
            let e = by.entry(l.1.clone()).or_default();
            e.0 += d * 1e3;
            e.1 += 1;
        }
    }
    let mut top: Vec<(String, f64, usize)> = by.into_iter().map(|(k, v)| (k, v.0, v.1)).collect();
    top.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    top.truncate(6);
    t.top = top;
    t
}

/// Runs one traced restore; `None` without strace.
pub fn trace(loft: &Path, dir: &Path, out: &Path, round: usize) -> Option<Traced> {
    let strace = crate::host::which("strace")?;
    let file = out.join(format!("strace-restore-{round}.txt"));
    let status = Command::new(strace)
        .args(["-f", "-T", "-tt", "-o"])
        .arg(&file)
        .arg(loft)
        .arg("run")
        .arg("--restore")
        .arg(dir)
        .args(["--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let mut t = match std::fs::read_to_string(&file) {
        Ok(text) => analyse(&text, round),
        Err(e) => Traced {
            round,
            error: Some(format!("{}: {e}", file.display())),
            ..Traced::default()
        },
    };
    if let Ok(s) = status {
        if !s.success() && t.error.is_none() {
            t.error = Some(format!("the traced restore ended with {s}"));
        }
    }
    Some(t)
}

// cargo builds this harness=false bench with cfg(test) but without #[test] functions
#[cfg(test)]
#[allow(unused_imports, dead_code)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_restore_window() {
        let text = "\
1491  18:19:44.958653 execve(\"/loft\", [\"loft\"], 0x7ffe /* 35 vars */) = 0 <0.000149>
1491  18:19:44.976021 ioctl(3, KVM_CREATE_VM, 0) = 5 <0.000146>
1491  18:19:44.976311 ioctl(5, KVM_SET_USER_MEMORY_REGION, {slot=0}) = 0 <0.008456>
1491  18:19:44.986000 mmap(NULL, 4096, PROT_READ, MAP_SHARED, 7, 0) = 0x7f00 <0.000010>
1493  18:19:44.987746 clone3({flags=CLONE_VM}, 88 <unfinished ...>
1493  18:19:44.987808 <... clone3 resumed> => {parent_tid=[1495]}, 88) = 1495 <0.000056>
1495  18:19:44.988413 ioctl(19, KVM_RUN <unfinished ...>
1495  18:19:44.998413 ioctl(19, KVM_RUN, 0) = 0 <0.000500>
";
        let t = analyse(text, 1);
        assert!((t.create_vm_to_run_ms.unwrap() - 12.392).abs() < 1e-6);
        assert!((t.exec_to_create_vm_ms.unwrap() - 17.368).abs() < 1e-6);
        assert_eq!(t.top[0].0, "ioctl KVM_SET_USER_MEMORY_REGION");
        assert!((t.top[0].1 - 8.456).abs() < 1e-9);
        assert!(t.top.iter().any(|x| x.0 == "clone3"));
    }
}
