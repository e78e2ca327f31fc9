//! Emulated devices for the loft micro-VM monitor.
//!
//! Every device here sits behind the guest: whatever the guest writes to a device (port I/O,
//! MMIO, virtio descriptors) is untrusted input. Devices never panic on it; a malformed request
//! gets an error status or marks the device as failed, and the VMM goes on.
//!
//! Devices are reached through a [`bus::Bus`]: the VMM keeps one bus for port I/O and one for
//! MMIO, and forwards each vCPU exit to the device whose range holds the address.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod sync;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
