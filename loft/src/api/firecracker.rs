//! The Firecracker-compatible part of the control API: the same paths, JSON bodies, status codes
//! and `{"fault_message": …}` errors as Firecracker's published API description (its swagger
//! file), for the subset loft implements. Bodies are parsed strictly (`deny_unknown_fields`, as
//! Firecracker does); fields loft cannot honour are refused with a 400 that says so, never
//! ignored.
//!
//! Snapshots are loft's own format: `snapshot_path` names a snapshot directory (as
//! `loft snapshot create` writes it), whose guest memory is the file `memory` in it; a
//! `mem_file_path` must name that file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::server::{Method, Response};
use super::Action;

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel_image_path: PathBuf,
    /// An initramfs.
    pub initrd_path: Option<PathBuf>,
    /// Kernel command line (loft puts its own parameters first).
    pub boot_args: Option<String>,
}

/// `PUT /drives/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Its id (the path's).
    pub drive_id: String,
    /// Boot from it: it becomes `/dev/vda` with `root=/dev/vda`.
    pub is_root_device: bool,
    /// Refused (loft boots a root device by its name).
    pub partuuid: Option<String>,
    /// `Unsafe` or `Writeback` (loft always passes the guest's flushes on).
    pub cache_type: Option<String>,
    /// Read-only for the guest.
    pub is_read_only: Option<bool>,
    /// The image file.
    pub path_on_host: Option<PathBuf>,
    /// Refused (no rate limiting in loft).
    pub rate_limiter: Option<serde_json::Value>,
    /// `Sync` or `Async`: loft's disks have an I/O thread of their own either way.
    pub io_engine: Option<String>,
    /// Refused (no vhost-user).
    pub socket: Option<String>,
}

/// `PUT /network-interfaces/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Its id (the path's).
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub guest_mac: Option<String>,
    /// Refused (loft does not offer VIRTIO_NET_F_MTU).
    pub mtu: Option<u32>,
    /// Refused (no rate limiting in loft).
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Refused (no rate limiting in loft).
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /machine-config`, and what `GET /machine-config` answers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// vCPUs, 1 to 32.
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Only `false`: loft has no SMT topology.
    #[serde(default)]
    pub smt: bool,
    /// Only `false`: loft has no diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Only `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Only `None`.
    #[serde(default)]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfiguration {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: Some("None".into()),
        }
    }
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The host side's Unix socket.
    pub uds_path: PathBuf,
    /// Deprecated in Firecracker; accepted and ignored.
    pub vsock_id: Option<String>,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceActionInfo {
    action_type: ActionType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmState {
    state: VmStateName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
enum VmStateName {
    Paused,
    Resumed,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Must be `snapshot_path` + `/memory` (loft's format).
    pub mem_file_path: PathBuf,
    /// The snapshot directory.
    pub snapshot_path: PathBuf,
    /// Only `Full`.
    pub snapshot_type: Option<String>,
}

/// A memory backend of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// Only `File`.
    pub backend_type: String,
    /// The memory file.
    pub backend_path: PathBuf,
}

/// A TAP device for a restored NIC.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface (loft's NICs are taken in order; the id only has to be unique).
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// A new host socket for a restored vsock device.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new socket path.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The snapshot directory.
    pub snapshot_path: PathBuf,
    /// Must be `snapshot_path` + `/memory` when given.
    pub mem_file_path: Option<PathBuf>,
    /// A `File` backend on `snapshot_path` + `/memory`, when given.
    pub mem_backend: Option<MemBackend>,
    /// Only `false`.
    pub enable_diff_snapshots: Option<bool>,
    /// Only `false`.
    pub track_dirty_pages: Option<bool>,
    /// Run the guest at once (else it is paused right after the restore).
    pub resume_vm: Option<bool>,
    /// New TAP devices for the saved NICs.
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// A new host socket for the saved vsock device.
    pub vsock_override: Option<VsockOverride>,
    /// Accepted: loft sets the guest's wall clock at the first agent request after a restore.
    pub clock_realtime: Option<bool>,
    /// Only `Snapshot` or `None`.
    pub huge_pages: Option<String>,
}

/// Firecracker's paths that loft does not implement.
const UNSUPPORTED: &[&str] = &[
    "/balloon",
    "/cpu-config",
    "/pmem",
    "/logger",
    "/metrics",
    "/mmds",
    "/entropy",
    "/serial",
    "/hotplug",
    "/vm/config",
];

fn bad(message: impl Into<String>) -> Response {
    Response::fault(400, message)
}

fn unsupported(what: impl std::fmt::Display) -> Response {
    bad(format!("{what} is not supported by loft."))
}

/// Parses a JSON body strictly, with Firecracker's message for what is wrong.
pub(super) fn json<T: serde::de::DeserializeOwned>(
    method: Method,
    body: &[u8],
) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(bad(format!("Empty {} request.", method.as_str())));
    }
    serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// Firecracker's rule for resource ids.
fn checked_id(id: &str) -> Result<&str, Response> {
    if id.is_empty() {
        return Err(bad("The ID cannot be empty."));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad(
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(id)
}

fn same_id(path_id: &str, body_id: &str) -> Result<(), Response> {
    if path_id != body_id {
        return Err(bad(
            "The id from the path does not match the id from the body!",
        ));
    }
    Ok(())
}

/// A MAC address `aa:bb:cc:dd:ee:ff`.
pub(super) fn parse_mac(text: &str) -> Result<[u8; 6], Response> {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.split(':').collect();
    let invalid = || bad(format!("Invalid MAC address: {text}"));
    if parts.len() != 6 {
        return Err(invalid());
    }
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    Ok(mac)
}

/// The memory file of loft's snapshot in `dir`.
pub(super) fn memory_file(dir: &Path) -> PathBuf {
    dir.join("memory")
}

/// Parses a request for a Firecracker path into what to do, or the error answer.
pub fn parse(method: Method, path: &str, body: &[u8]) -> Result<Action, Response> {
    let trimmed = path.trim_end_matches('/');
    let (head, id) = match trimmed.strip_prefix("/drives/") {
        Some(id) => ("/drives/", Some(id)),
        None => match trimmed.strip_prefix("/network-interfaces/") {
            Some(id) => ("/network-interfaces/", Some(id)),
            None => (if trimmed.is_empty() { "/" } else { trimmed }, None),
        },
    };
    match (method, head) {
        (Method::Get, "/") => Ok(Action::Describe),
        (Method::Get, "/version") => Ok(Action::Version),
        (Method::Put, "/boot-source") => Ok(Action::BootSource(json(method, body)?)),
        (Method::Put, "/drives/") => {
            let id = checked_id(id.unwrap_or(""))?;
            let drive: Drive = json(method, body)?;
            same_id(id, &drive.drive_id)?;
            if drive.partuuid.is_some() {
                return Err(unsupported("A drive's partuuid"));
            }
            if drive.rate_limiter.is_some() {
                return Err(unsupported("A drive's rate_limiter"));
            }
            if drive.socket.is_some() {
                return Err(unsupported("A vhost-user drive (socket)"));
            }
            if let Some(c) = drive.cache_type.as_deref() {
                if c != "Unsafe" && c != "Writeback" {
                    return Err(bad(format!("Unknown cache_type {c:?}.")));
                }
            }
            if let Some(e) = drive.io_engine.as_deref() {
                if e != "Sync" && e != "Async" {
                    return Err(bad(format!("Unknown io_engine {e:?}.")));
                }
            }
            if drive.path_on_host.is_none() {
                return Err(bad("A virtio-block drive needs path_on_host."));
            }
            Ok(Action::Drive(drive))
        }
        (Method::Put, "/network-interfaces/") => {
            let id = checked_id(id.unwrap_or(""))?;
            let net: NetworkInterface = json(method, body)?;
            same_id(id, &net.iface_id)?;
            if net.mtu.is_some() {
                return Err(unsupported("A network interface's mtu"));
            }
            if net.rx_rate_limiter.is_some() || net.tx_rate_limiter.is_some() {
                return Err(unsupported("A network interface's rate limiter"));
            }
            if let Some(mac) = &net.guest_mac {
                parse_mac(mac)?;
            }
            Ok(Action::Net(net))
        }
        (Method::Get, "/machine-config") => Ok(Action::GetMachineConfig),
        (Method::Put, "/machine-config") => {
            let m: MachineConfiguration = json(method, body)?;
            if m.vcpu_count == 0 || m.vcpu_count > 32 {
                return Err(bad(
                    "The vCPU number is invalid! The number of vCPUs must be between 1 and 32.",
                ));
            }
            if m.mem_size_mib == 0 {
                return Err(bad("The memory size (MiB) is invalid."));
            }
            if m.smt {
                return Err(unsupported("SMT (smt: true)"));
            }
            if m.track_dirty_pages {
                return Err(unsupported("Dirty page tracking (diff snapshots)"));
            }
            if m.cpu_template.as_deref().is_some_and(|t| t != "None") {
                return Err(unsupported("A CPU template"));
            }
            if m.huge_pages.as_deref().is_some_and(|h| h != "None") {
                return Err(unsupported("Huge pages"));
            }
            Ok(Action::MachineConfig(m))
        }
        (Method::Put, "/vsock") => {
            let v: Vsock = json(method, body)?;
            if v.guest_cid < 3 {
                return Err(bad("The guest CID must be 3 or more."));
            }
            Ok(Action::Vsock(v))
        }
        (Method::Put, "/actions") => {
            let a: InstanceActionInfo = json(method, body)?;
            match a.action_type {
                ActionType::InstanceStart => Ok(Action::Start),
                ActionType::SendCtrlAltDel => Ok(Action::CtrlAltDel),
                ActionType::FlushMetrics => Err(unsupported("The FlushMetrics action (metrics)")),
            }
        }
        (Method::Patch, "/vm") => {
            let v: VmState = json(method, body)?;
            Ok(match v.state {
                VmStateName::Paused => Action::Pause,
                VmStateName::Resumed => Action::Resume,
            })
        }
        (Method::Put, "/snapshot/create") => {
            let p: SnapshotCreateParams = json(method, body)?;
            if p.snapshot_type.as_deref().is_some_and(|t| t != "Full") {
                return Err(unsupported("A diff snapshot"));
            }
            if p.mem_file_path != memory_file(&p.snapshot_path) {
                return Err(bad(format!(
                    "loft writes its own snapshot format: snapshot_path names a directory and \
                     mem_file_path must be the file memory in it ({}).",
                    memory_file(&p.snapshot_path).display()
                )));
            }
            Ok(Action::SnapshotCreate(p))
        }
        (Method::Put, "/snapshot/load") => {
            let p: SnapshotLoadParams = json(method, body)?;
            let mem = memory_file(&p.snapshot_path);
            if let Some(m) = &p.mem_backend {
                if m.backend_type != "File" {
                    return Err(unsupported(format!(
                        "The {:?} memory backend",
                        m.backend_type
                    )));
                }
                if p.mem_file_path.is_some() {
                    return Err(bad(
                        "Only one of mem_file_path and mem_backend may be given.",
                    ));
                }
            }
            let given = p
                .mem_file_path
                .as_ref()
                .or(p.mem_backend.as_ref().map(|m| &m.backend_path));
            if given.is_some_and(|g| *g != mem) {
                return Err(bad(format!(
                    "loft loads its own snapshot format: snapshot_path names a directory and the \
                     memory file must be the file memory in it ({}).",
                    mem.display()
                )));
            }
            if p.enable_diff_snapshots == Some(true) || p.track_dirty_pages == Some(true) {
                return Err(unsupported("Dirty page tracking (diff snapshots)"));
            }
            if p.huge_pages
                .as_deref()
                .is_some_and(|h| h != "Snapshot" && h != "None")
            {
                return Err(unsupported("Huge pages"));
            }
            Ok(Action::SnapshotLoad(p))
        }
        (Method::Patch, "/drives/")
        | (Method::Patch, "/network-interfaces/")
        | (Method::Patch, "/machine-config") => Err(unsupported(format!(
            "Firecracker's {} {}",
            method.as_str(),
            path
        ))),
        _ if UNSUPPORTED
            .iter()
            .any(|p| head == *p || head.starts_with(&format!("{p}/"))) =>
        {
            Err(unsupported(format!(
                "Firecracker's {} {}",
                method.as_str(),
                path
            )))
        }
        _ => Err(bad(format!(
            "Invalid request method and/or path: {} {}.",
            method.as_str(),
            path
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &str, body: &str) -> Result<Action, Response> {
        parse(Method::Put, path, body.as_bytes())
    }

    fn fault(r: Result<Action, Response>) -> (u16, String) {
        let e = r.unwrap_err();
        (e.status, e.fault_message().unwrap_or("").to_string())
    }

    #[test]
    fn the_getting_started_sequence_parses() {
        let a = put(
            "/boot-source",
            r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0 reboot=k panic=1 pci=off"}"#,
        )
        .unwrap();
        assert!(matches!(a, Action::BootSource(b) if b.kernel_image_path == Path::new("/k")));
        let a = put(
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/r.ext4","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap();
        assert!(matches!(a, Action::Drive(d) if d.is_root_device));
        let a = put(
            "/network-interfaces/net1",
            r#"{"iface_id":"net1","guest_mac":"06:00:AC:10:00:02","host_dev_name":"tap0"}"#,
        )
        .unwrap();
        assert!(matches!(a, Action::Net(_)));
        let a = put("/machine-config", r#"{"vcpu_count":2,"mem_size_mib":1024}"#).unwrap();
        assert!(matches!(a, Action::MachineConfig(m) if m.vcpu_count == 2));
        assert!(matches!(
            put("/actions", r#"{"action_type":"InstanceStart"}"#),
            Ok(Action::Start)
        ));
        assert!(matches!(
            put("/actions", r#"{"action_type":"SendCtrlAltDel"}"#),
            Ok(Action::CtrlAltDel)
        ));
        assert!(matches!(
            parse(Method::Patch, "/vm", br#"{"state":"Paused"}"#),
            Ok(Action::Pause)
        ));
        assert!(matches!(parse(Method::Get, "/", b""), Ok(Action::Describe)));
    }

    #[test]
    fn unknown_fields_malformed_json_and_empty_bodies_are_400() {
        let (s, m) = fault(put(
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256,"no_such_field":1}"#,
        ));
        assert_eq!(s, 400);
        assert!(m.contains("unknown field `no_such_field`"), "{m}");
        let (s, m) = fault(put("/machine-config", r#"{"vcpu_count": 1,"#));
        assert_eq!(s, 400);
        assert!(
            m.starts_with("An error occurred when deserializing the json body"),
            "{m}"
        );
        assert_eq!(
            fault(put("/boot-source", "")),
            (400, "Empty PUT request.".into())
        );
        let (s, _) = fault(put("/actions", r#"{"action_type":"Explode"}"#));
        assert_eq!(s, 400);
    }

    #[test]
    fn ids_values_and_unsupported_things_are_checked() {
        let (s, m) = fault(put(
            "/drives/a",
            r#"{"drive_id":"b","path_on_host":"/x","is_root_device":false}"#,
        ));
        assert_eq!(s, 400);
        assert!(m.contains("does not match"), "{m}");
        let (_, m) = fault(put(
            "/drives/a-b",
            r#"{"drive_id":"a-b","path_on_host":"/x","is_root_device":false}"#,
        ));
        assert!(m.contains("alphanumeric"), "{m}");
        let (_, m) = fault(put(
            "/machine-config",
            r#"{"vcpu_count":0,"mem_size_mib":1}"#,
        ));
        assert!(m.contains("vCPU number is invalid"), "{m}");
        let (_, m) = fault(put(
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":true}"#,
        ));
        assert!(m.contains("not supported by loft"), "{m}");
        let (_, m) = fault(put(
            "/network-interfaces/n",
            r#"{"iface_id":"n","host_dev_name":"t","guest_mac":"zz"}"#,
        ));
        assert!(m.contains("Invalid MAC"), "{m}");
        for (method, path) in [
            (Method::Put, "/balloon"),
            (Method::Get, "/balloon/statistics"),
            (Method::Put, "/mmds/config"),
            (Method::Put, "/logger"),
            (Method::Patch, "/drives/rootfs"),
            (Method::Get, "/vm/config"),
        ] {
            let (s, m) = fault(parse(method, path, b"{}"));
            assert_eq!(s, 400);
            assert!(
                m.contains(path) && m.contains("not supported by loft"),
                "{m}"
            );
        }
        let (s, m) = fault(parse(Method::Get, "/nowhere", b""));
        assert_eq!(s, 400);
        assert_eq!(m, "Invalid request method and/or path: GET /nowhere.");
        let (s, _) = fault(parse(Method::Other, "/actions", b""));
        assert_eq!(s, 400);
    }

    #[test]
    fn snapshots_are_loft_directories() {
        assert!(matches!(
            put(
                "/snapshot/create",
                r#"{"snapshot_path":"/s","mem_file_path":"/s/memory"}"#
            ),
            Ok(Action::SnapshotCreate(_))
        ));
        let (s, m) = fault(put(
            "/snapshot/create",
            r#"{"snapshot_path":"/s","mem_file_path":"/elsewhere"}"#,
        ));
        assert_eq!(s, 400);
        assert!(m.contains("/s/memory"), "{m}");
        assert!(matches!(
            put("/snapshot/load", r#"{"snapshot_path":"/s","resume_vm":true}"#),
            Ok(Action::SnapshotLoad(p)) if p.resume_vm == Some(true)
        ));
        let (_, m) = fault(put(
            "/snapshot/load",
            r#"{"snapshot_path":"/s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"}}"#,
        ));
        assert!(m.contains("not supported by loft"), "{m}");
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02").unwrap(),
            [6, 0, 0xac, 0x10, 0, 2]
        );
        assert!(parse_mac("06:00:ac:10:00").is_err());
        assert!(parse_mac("06:00:ac:10:00:0g").is_err());
    }
}
