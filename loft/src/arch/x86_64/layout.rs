//! The guest's physical address map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (unused)
//! 0x0000_0500  GDT                      0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start info, module list, memory map
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  page tables (PML4, PDPT, PD: identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA) .. 0x0010_0000 reserved
//! 0x0010_0000  high memory: kernel (ELF at its physical addresses, bzImage at 1 MiB), initrd at
//!              the top of low RAM
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above the gap, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (left empty: the kernel installs its own before enabling interrupts).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Most PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX: usize = (ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
/// Linux `boot_params` (zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Level-3 page table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Level-2 page table (512 x 2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line the x86 kernel accepts, including the NUL (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_LEN: usize = 2048;
/// MP floating pointer + config table, in what a PC calls the EBDA.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// End of conventional memory below 1 MiB that the guest may use.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First address handed to virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS needs three pages in guest physical space that the guest never uses.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// The highest address an initrd may end at (the kernel's `initrd_addr_max` for ELF boots).
pub const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

// The boot stack grows down from between the zero page and the page tables.
const _: () = assert!(BOOT_STACK_TOP > ZERO_PAGE_ADDR + 0x1000 && BOOT_STACK_TOP < PML4_ADDR);

/// The RAM ranges for a guest of `mem_size` bytes: one below the MMIO gap and, when the guest
/// has more than 3 GiB, one above 4 GiB holding the rest.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START),
        ]
    }
}

/// E820 range types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM the OS may use.
    Reserved = 2,
}

/// One entry of the firmware memory map the guest sees (E820 or PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The memory map handed to the guest: RAM below the EBDA, the EBDA/BIOS hole as reserved, RAM
/// from 1 MiB to the MMIO gap (or the end of memory), and RAM above 4 GiB. The MMIO gap itself
/// is left out, so the kernel never puts RAM there.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let ram = |addr, size| MemoryMapEntry {
        addr,
        size,
        kind: E820Type::Ram,
    };
    let mut map = vec![
        ram(0, EBDA_START),
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    for (start, len) in ram_ranges(mem_size) {
        let start = start.0.max(HIMEM_START);
        let end = if start == HIMEM_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push(ram(start, end - start));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_is_one_range() {
        assert_eq!(ram_ranges(128 * MIB), vec![(GuestAddress(0), 128 * MIB)]);
        let map = memory_map(128 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            MemoryMapEntry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram
            }
        );
        assert_eq!(map[1].kind, E820Type::Reserved);
        assert_eq!(map[1].addr + map[1].size, HIMEM_START);
        assert_eq!(
            map[2],
            MemoryMapEntry {
                addr: HIMEM_START,
                size: 127 * MIB,
                kind: E820Type::Ram
            }
        );
    }

    #[test]
    fn exactly_three_gib_fits_below_the_gap() {
        assert_eq!(ram_ranges(3 * GIB).len(), 1);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 * GIB);
        assert_eq!(
            ranges,
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), GIB)]
        );
        let map = memory_map(4 * GIB);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // Everything but the 384 KiB hole below 1 MiB is RAM.
        assert_eq!(ram, 4 * GIB - (HIMEM_START - EBDA_START));
        for e in &map {
            let end = e.addr + e.size;
            assert!(
                end <= MMIO_GAP_START || e.addr >= MMIO_GAP_END,
                "{e:?} overlaps the gap"
            );
        }
        assert_eq!(
            map.last().unwrap(),
            &MemoryMapEntry {
                addr: 4 * GIB,
                size: GIB,
                kind: E820Type::Ram
            }
        );
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut spans = [
            (GDT_ADDR, 0x20),
            (IDT_ADDR, 8),
            (PVH_INFO_ADDR, 0x38),
            (PVH_MODLIST_ADDR, 0x20),
            (PVH_MEMMAP_ADDR, (PVH_MEMMAP_MAX * 24) as u64),
            (ZERO_PAGE_ADDR, 0x1000),
            (PML4_ADDR, 0x1000),
            (PDPT_ADDR, 0x1000),
            (PD_ADDR, 0x1000),
            (CMDLINE_ADDR, CMDLINE_MAX_LEN as u64),
            (MPTABLE_ADDR, HIMEM_START - MPTABLE_ADDR),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }
}
