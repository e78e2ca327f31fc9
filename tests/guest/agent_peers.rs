//! The guest agent serves the host alone: a process inside the guest that connects to the
//! agent's port — at the guest's own vsock CID, the local CID or another VM's — gets no command
//! run. Uses a restore of the shared agent snapshot; the in-guest client is
//! `agent/examples/vsock_probe.rs` (built static by `firmware/build-agent.sh`), handed to the
//! guest on its data disk.

use std::os::unix::fs::FileExt;

use super::snapshot::{disk_copy, restore_agent_snapshot};
use crate::common;
use loft::{ExecRequest, ExitStatus, AGENT_PORT};

/// Where on the data disk the probe goes: past what the snapshot's guest wrote there.
const PROBE_OFFSET: u64 = 1 << 20;
/// The agent-ready snapshot's vsock CID (the library's agent CID).
const GUEST_CID: u32 = 3;

#[test]
fn a_connection_to_the_agent_from_inside_the_guest_is_refused() {
    let probe_path = common::repo_root().join("target/agent/vsock_probe");
    let probe = std::fs::read(&probe_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (firmware/build-agent.sh builds it; firmware/build.sh runs that)",
            probe_path.display()
        )
    });
    let disk = disk_copy("agent-peers.img");
    let len = std::fs::metadata(&disk).unwrap().len();
    assert!(
        PROBE_OFFSET + probe.len() as u64 <= len,
        "the probe ({} bytes) does not fit on the {len}-byte data disk",
        probe.len()
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .write_all_at(&probe, PROBE_OFFSET)
        .unwrap();
    let _vms = common::in_process_vms();
    let vm = restore_agent_snapshot(&disk);
    // The guest may hold the disk's old blocks in its page cache: drop them, then read the
    // probe from the device.
    let script = format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; \
         dd if=/dev/vda of=/tmp/probe bs=4096 skip={skip} count={count} 2>/dev/null && \
         chmod +x /tmp/probe && \
         for cid in {GUEST_CID} 1 4 4294967295; do /tmp/probe $cid {AGENT_PORT}; done",
        skip = PROBE_OFFSET / 4096,
        count = probe.len().div_ceil(4096),
    );
    let out = vm
        .exec(&ExecRequest::new(["/bin/sh", "-c", &script]))
        .unwrap_or_else(|e| {
            panic!(
                "exec: {e}\n{}",
                String::from_utf8_lossy(&vm.console_output())
            )
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status,
        ExitStatus::Code(0),
        "stdout {stdout}\nstderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("in-guest attempts on the agent port:\n{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "one answer per CID: {stdout}");
    for line in &lines {
        assert!(
            line.contains(": refused: "),
            "served from inside the guest: {line}"
        );
    }
    // The host is still served on the same agent, after those attempts.
    let host = vm.exec(&ExecRequest::new(["echo", "host-served"])).unwrap();
    assert_eq!(host.stdout, b"host-served\n");
    vm.kill().unwrap();
}
