//! Guest RAM: anonymous host mappings laid out as [`layout::ram_ranges`] says.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map the memory.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// Requested size.
        size: u64,
        /// The mapping error.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `size` bytes of guest RAM.
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    // No MADV_HUGEPAGE on guest RAM: on kvm_pvm hosts, huge-page backing sends guest kernel
    // code through KVM's instruction emulator often enough to hit instructions it cannot run
    // (an FWAIT in fpu__drop, measured), and it did not make boots faster there.
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })
}

/// End of the RAM range that starts at 0 (the RAM below the MMIO gap).
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|r| r.start_addr().0 == 0)
        .map_or(0, |r| r.len())
}
