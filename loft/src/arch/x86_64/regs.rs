//! The initial vCPU state for each boot protocol: general registers, segments and control
//! registers (with a GDT and, for the 64-bit protocol, identity-mapped page tables), FPU and the
//! local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout;

/// Errors setting up the initial vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory refused a write.
    #[error("cannot write the GDT or page tables to guest memory")]
    Write(#[from] GuestMemoryError),
    /// A KVM ioctl failed.
    #[error("cannot set vCPU {what}")]
    Kvm {
        /// The state being set.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64(u64),
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh(u64),
}

const X86_CR0_PE: u64 = 1;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Builds a GDT entry from flags (access byte + granularity nibble), base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Decodes a GDT entry at `index` into the segment register KVM wants.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The GDT for an entry point: null, code, data, TSS.
pub fn gdt_for(entry: EntryPoint) -> [u64; 4] {
    let code = match entry {
        EntryPoint::Linux64(_) => 0xa09b, // 64-bit code, present, readable, accessed
        EntryPoint::Pvh(_) => 0xc09b,     // 32-bit code, 4 KiB granularity
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff), // data, read/write, accessed
        gdt_entry(0x808b, 0, 0xfffff), // busy 32-bit TSS
    ]
}

/// Identity-maps the first GiB with 2 MiB pages, enough for the kernel's early 64-bit code.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    mem.write_obj(layout::PDPT_ADDR | 0x03, GuestAddress(layout::PML4_ADDR))?;
    mem.write_obj(layout::PD_ADDR | 0x03, GuestAddress(layout::PDPT_ADDR))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PD_ADDR + i * 8))?;
    }
    Ok(())
}

/// Sets segments and control registers for `entry`, writing the GDT (and page tables for the
/// 64-bit protocol) to guest memory.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: EntryPoint,
) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    let gdt = gdt_for(entry);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match entry {
        EntryPoint::Linux64(_) => {
            write_page_tables(mem)?;
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

/// Sets the general registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: EntryPoint) -> Result<(), RegsError> {
    let regs = match entry {
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: layout::BOOT_STACK_TOP,
            rbp: layout::BOOT_STACK_TOP,
            rsi: layout::ZERO_PAGE_ADDR,
            ..Default::default()
        },
        EntryPoint::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: layout::PVH_INFO_ADDR,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(kvm("registers"))
}

/// Puts the FPU in its power-on state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (b, r) in raw.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Wires LINT0 to the 8259 (ExtINT) and LINT1 to NMI, as the MP table says.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    set_delivery_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_delivery_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = gdt_for(EntryPoint::Linux64(0));
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.base, cs.limit, cs.selector), (0, 0xffff_ffff, 8));
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, 16));
        let pvh_cs = segment_from_gdt(gdt_for(EntryPoint::Pvh(0))[1], 1);
        assert_eq!((pvh_cs.l, pvh_cs.db, pvh_cs.limit), (0, 1, 0xffff_ffff));
        let tr = segment_from_gdt(gdt[3], 3);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn gdt_entry_packs_base_and_limit() {
        let e = gdt_entry(0xc093, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, (0xabcde << 12) | 0xfff);
        assert_eq!(s.selector, 40);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPT_ADDR);
        let pd511: u64 = mem
            .read_obj(GuestAddress(layout::PD_ADDR + 511 * 8))
            .unwrap();
        assert_eq!(pd511, (511 << 21) | 0x83);
    }

    #[test]
    fn lint_delivery_modes_are_patched_in_place() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x10u8 as std::os::raw::c_char;
        regs[APIC_LVT0 + 1] = 0x01; // some other mode
        regs[APIC_LVT0 + 2] = 0x01; // mask bit (bit 16) must survive
        set_delivery_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
