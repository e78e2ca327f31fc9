//! Clones: many VMs restored from one snapshot at once, in one process or in many, each with
//! its own identity (vsock socket, randomness, clone id, disk copy, TAP in its own network
//! namespace), sharing the snapshot's memory file.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::snapshot::{agent_snapshot, disk_copy, scratch, uptime_of};
use crate::common::netns::{http_responder, NetNs, TcpServer};
use crate::common::{self, guest_file, BootSlot, BOOT_TIMEOUT};
use loft::{ExecRequest, ExitStatus, Snapshot, StopReason, VmBuilder, VmHandle};

/// This process's open fds, less pipes and /dev/null (other tests beside this one spawn loft
/// processes and hold pipes for a moment; a VM's own fds are never either).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            !t.starts_with("pipe:") && t != "/dev/null"
        })
        .count()
}

fn clone_of(snapshot: &Snapshot, name: &str) -> VmHandle {
    VmBuilder::new()
        .disk(disk_copy(name), false)
        .capture_console()
        .restore_from(snapshot.clone())
        .start()
        .unwrap_or_else(|e| panic!("restore clone {name}: {e}"))
}

#[test]
fn three_clones_in_one_process_are_independent_vms() {
    let snap = agent_snapshot();
    let _vms = common::in_process_vms();
    let snapshot = Snapshot::open(&snap.dir).unwrap();
    // Restored from three threads at once; the snapshot itself is dropped while they run.
    let clones: Vec<VmHandle> = std::thread::scope(|s| {
        let handles: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let snapshot = &snapshot;
                s.spawn(move || clone_of(snapshot, &format!("clone-{name}.img")))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    drop(snapshot);
    let outputs: Vec<(String, String, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = clones
            .iter()
            .enumerate()
            .map(|(i, vm)| {
                s.spawn(move || {
                    let out = vm
                        .exec(&ExecRequest::new([
                            "/bin/sh",
                            "-c",
                            &format!(
                                "echo clone-{i}; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; \
                                 echo; cat /proc/uptime; exit {i}"
                            ),
                        ]))
                        .unwrap_or_else(|e| panic!("exec in clone {i}: {e:?}"));
                    assert_eq!(out.status, ExitStatus::Code(i as i32));
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    let lines: Vec<&str> = text.lines().collect();
                    assert_eq!(lines.len(), 3, "{text}");
                    (lines[0].to_string(), lines[1].to_string(), uptime_of(lines[2].as_bytes()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (name, random, uptime)) in outputs.iter().enumerate() {
        assert_eq!(
            name,
            &format!("clone-{i}"),
            "each clone ran its own command"
        );
        assert!(
            *uptime >= snap.uptime && *uptime < snap.uptime + 120.0,
            "clone {i}'s uptime {uptime} does not go on from the snapshot's {}",
            snap.uptime
        );
        for (j, (_, other, _)) in outputs.iter().enumerate().skip(i + 1) {
            assert_ne!(
                random, other,
                "clones {i} and {j} read the same random bytes"
            );
        }
    }
    let ids: Vec<&str> = clones.iter().map(|c| c.clone_id()).collect();
    for (i, vm) in clones.iter().enumerate() {
        let out = vm
            .exec(&ExecRequest::new(["cat", "/run/loft/clone-id"]))
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            ids[i],
            "the guest knows its clone id"
        );
    }
    for vm in clones {
        assert_eq!(vm.kill().unwrap(), StopReason::Stopped);
    }
}

#[test]
fn dropping_twenty_clones_in_any_order_leaves_nothing_behind() {
    let snapshot = Snapshot::open(&agent_snapshot().dir).unwrap();
    let _alone = common::only_in_process_vms();
    let fds_before = open_fds();
    let mut clones: Vec<Option<VmHandle>> = (0..20)
        .map(|i| Some(clone_of(&snapshot, &format!("drop-{i}.img"))))
        .collect();
    assert!(
        common::loft_threads() >= 20,
        "every clone has threads of its own"
    );
    // A fixed shuffle (the same every run, so a failure can be replayed).
    let mut order: Vec<usize> = (0..clones.len()).collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    for i in order {
        drop(clones[i].take());
    }
    assert_eq!(
        common::loft_threads_after_exit(),
        0,
        "clone threads outlived their handles"
    );
    assert_eq!(open_fds(), fds_before, "file descriptors leaked");
}

#[test]
fn clones_in_their_own_network_namespaces_reach_their_own_servers() {
    common::require_kvm();
    // Firecracker's way to clone a VM with a network: every clone keeps the guest's MAC and IP
    // and gets a TAP of the same name in a network namespace of its own.
    let subnet = 100 + (std::process::id() % 100) as u8;
    let host_ip = Ipv4Addr::new(10, 201, subnet, 1);
    let guest_ip = Ipv4Addr::new(10, 201, subnet, 2);
    let dir = scratch("net-snapshot");
    {
        let ns = NetNs::new("clsnap");
        ns.add_tap("tap0", &format!("{host_ip}/24"));
        let _slot = BootSlot::acquire();
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_loft"));
        cmd.args(["snapshot", "create"])
            .arg(&dir)
            .arg("--kernel")
            .arg(guest_file("vmlinux"))
            .arg("--initrd")
            .arg(guest_file("initramfs.cpio"))
            .args(["--net", "tap=tap0,mac=02:00:00:00:0c:01", "--when-console", "NET-UP"])
            .arg("--cmdline")
            .arg(format!(
                r#"guest_cmd="ifconfig eth0 {guest_ip} netmask 255.255.255.0 up; echo NET-UP; sleep 100000""#
            ));
        let o = common::run(cmd, BOOT_TIMEOUT);
        assert_eq!(o.code, Some(0), "snapshot create failed\n{}", o.tail());
    }
    let clones: Vec<(NetNs, TcpServer, String)> = ["one", "two"]
        .iter()
        .map(|name| {
            let ns = NetNs::new(&format!("cl{name}"));
            ns.add_tap("tap0", &format!("{host_ip}/24"));
            let body = format!("served-to-clone-{name}");
            let server = TcpServer::spawn(
                ns.bind_tcp(SocketAddr::from((host_ip, 8080))),
                Duration::from_secs(180),
                http_responder(Arc::new(body.clone().into_bytes())),
            );
            (ns, server, body)
        })
        .collect();
    std::thread::scope(|s| {
        for (ns, server, body) in &clones {
            let dir = &dir;
            s.spawn(move || {
                let mut cmd = ns.command(env!("CARGO_BIN_EXE_loft"));
                cmd.arg("run")
                    .arg("--restore")
                    .arg(dir)
                    .args(["--net", "tap=tap0", "--"])
                    .args(["wget", "-q", "-O", "-", &format!("http://{host_ip}:8080/x")]);
                let o = common::run(cmd, Duration::from_secs(120));
                assert_eq!(o.code, Some(0), "{}", o.tail());
                assert_eq!(
                    o.stdout, *body,
                    "the clone reached another namespace's server"
                );
                let seen = server.connections();
                assert_eq!(seen.len(), 1);
                assert_eq!(seen[0].peer.ip(), std::net::IpAddr::V4(guest_ip));
            });
        }
    });
}
