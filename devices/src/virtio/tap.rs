//! A host TAP interface: Ethernet frames with a virtio-net header, one per read or write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_short, c_uint};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

/// Length of the virtio-net header on every frame (`virtio_net_hdr_v1`, VIRTIO_F_VERSION_1).
pub const VNET_HDR_LEN: usize = 12;

const TUNTAP: c_uint = 0x54;
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_ior_nr!(TUNGETVNETHDRSZ, TUNTAP, 215, c_int);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

const IFNAMSIZ: usize = 16;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags, then padding to 40 bytes.
#[repr(C)]
#[derive(Debug, Default)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: c_short,
    _pad: [u8; 22],
}

/// Errors from opening a TAP interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long (15 bytes at most) or holds a NUL.
    #[error("invalid TAP interface name {0:?}: 1 to 15 bytes, no NUL")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun for TAP {name}")]
    OpenTun {
        /// Requested interface name.
        name: String,
        /// OS error.
        source: io::Error,
    },
    /// An ioctl configuring the interface failed.
    #[error("cannot set up TAP {name} ({op})")]
    Ioctl {
        /// Requested interface name.
        name: String,
        /// The ioctl that failed.
        op: &'static str,
        /// OS error.
        source: io::Error,
    },
}

/// An open, non-blocking TAP interface with 12-byte virtio-net headers and no offloads.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) the TAP interface `name`. A `%d` in the name lets the
    /// kernel pick a number; [`Tap::name`] tells the result.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.to_owned(),
                source,
            })?;
        let ioctl_err = |op| TapError::Ioctl {
            name: name.to_owned(),
            op,
            source: io::Error::last_os_error(),
        };

        let mut ifr = IfReq::default();
        ifr.name[..bytes.len()].copy_from_slice(bytes);
        ifr.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as c_short;
        // SAFETY: `file` is an open /dev/net/tun; TUNSETIFF reads and writes a `struct ifreq`,
        // which `IfReq` lays out in full (40 bytes), and the reference is valid for the call.
        if unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifr) } < 0 {
            return Err(ioctl_err("TUNSETIFF"));
        }

        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, valid for the call.
        if unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) } < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ"));
        }

        // No checksum or segmentation offloads: the guest is not offered any either.
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe { vmm_sys_util::ioctl::ioctl_with_val(&file, TUNSETOFFLOAD(), 0) } < 0 {
            return Err(ioctl_err("TUNSETOFFLOAD"));
        }

        let len = ifr.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&ifr.name[..len]).into_owned();
        Ok(Self { file, name })
    }

    /// Name of the interface, as the kernel gave it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtio-net header length the kernel uses on this interface.
    pub fn vnet_hdr_len(&self) -> io::Result<usize> {
        let mut len: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one `int` through the pointer, valid for the call.
        if unsafe { ioctl_with_mut_ref(&self.file, TUNGETVNETHDRSZ(), &mut len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(len as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl super::net::NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        for name in ["", "a-name-that-is-too-long", "nul\0"] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, TapError::InvalidName(_)), "{err}");
        }
    }

    /// Needs root and /dev/net/tun (the project's dev and CI machines have both): fails with
    /// the OS error rather than passing silently when the TAP cannot be created.
    #[test]
    fn opens_a_real_tap_with_vnet_headers() {
        let tap = Tap::open("lofttest%d")
            .unwrap_or_else(|e| panic!("cannot create a TAP (root and /dev/net/tun needed): {e}"));
        assert!(tap.name().starts_with("lofttest"), "{}", tap.name());
        assert_eq!(tap.vnet_hdr_len().unwrap(), VNET_HDR_LEN);
    }
}
