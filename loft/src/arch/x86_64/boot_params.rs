//! The structures that tell the kernel where its command line, initrd and RAM are: the Linux
//! zero page (`boot_params`, 64-bit boot protocol) and the PVH `hvm_start_info`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{self, MemoryMapEntry};

/// Errors writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The memory map has more entries than the structure can carry.
    #[error("the guest memory map has {0} entries, more than the boot protocol carries")]
    TooManyMemoryMapEntries(usize),
    /// Guest memory refused a write.
    #[error("cannot write boot structures to guest memory")]
    Write(#[from] GuestMemoryError),
}

/// Where the initrd was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// `HdrS`, the boot protocol header signature.
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// Boot sector signature.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "Undefined" boot loader id: loft is not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Minimum kernel alignment (CONFIG_PHYSICAL_ALIGN default).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Builds the zero page for the Linux 64-bit boot protocol. `setup` is the bzImage's setup
/// header when there is one; an ELF kernel gets a header built from scratch.
pub fn build_zero_page(
    setup: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    map: &[MemoryMapEntry],
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(BootParamsError::TooManyMemoryMapEntries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page to its place in guest memory.
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootParamsError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_ADDR))?;
    Ok(())
}

/// Writes the PVH start info, the module list (the initrd) and the memory map.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    map: &[MemoryMapEntry],
) -> Result<(), BootParamsError> {
    if map.len() > layout::PVH_MEMMAP_MAX {
        return Err(BootParamsError::TooManyMemoryMapEntries(map.len()));
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_ADDR;
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(layout::PVH_MODLIST_ADDR))?;
    }
    for (i, e) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        let at =
            layout::PVH_MEMMAP_ADDR + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))?;
    }
    mem.write_obj(info, GuestAddress(layout::PVH_INFO_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::memory_map;

    const MIB: u64 = 1 << 20;

    #[test]
    fn zero_page_for_elf_describes_cmdline_initrd_and_e820() {
        let map = memory_map(4096 * MIB);
        let initrd = InitrdPlacement {
            addr: 0x7000_0000,
            size: 0x20_0000,
        };
        let p = build_zero_page(None, 42, Some(initrd), &map).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x7000_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x20_0000);
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!(
            ({ last.addr }, { last.size }, { last.r#type }),
            (1 << 32, 1 << 30, 1)
        );
    }

    #[test]
    fn zero_page_keeps_bzimage_header_fields() {
        let hdr = setup_header {
            version: 0x20f,
            kernel_alignment: 0x20_0000,
            init_size: 0x123_0000,
            ..Default::default()
        };
        let p = build_zero_page(Some(hdr), 10, None, &memory_map(128 * MIB)).unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ p.hdr.init_size }, 0x123_0000);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn pvh_start_info_round_trips_through_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let map = memory_map(16 * MIB);
        let initrd = InitrdPlacement {
            addr: 0xf0_0000,
            size: 0x1000,
        };
        write_pvh_start_info(&mem, Some(initrd), &map).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, map.len());
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0xf0_0000, 0x1000));
        let e: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!(
            (e.addr, e.size, e.type_),
            (HIMEM_START_FOR_TEST, 15 * MIB, 1)
        );
    }

    const HIMEM_START_FOR_TEST: u64 = layout::HIMEM_START;
}
