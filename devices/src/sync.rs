//! Locking shared by the devices and the VMM.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering it if a thread panicked while holding it: a device's (or the VMM's)
/// state stays usable (at worst the guest sees a failed request), and the VMM must not die
/// with the thread.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
