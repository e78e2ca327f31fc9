//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! the IOAPIC and the legacy IRQ routing.
//!
//! The table is serialized by hand into little-endian bytes (no `repr(C)` transmutes), then
//! written at [`layout::MPTABLE_ADDR`](super::layout::MPTABLE_ADDR), where the kernel's scan of
//! the first KiB of the EBDA finds the floating pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout;

/// Highest APIC id the table can name for a CPU: ids are 8 bits, 0xff is broadcast, and the
/// IOAPIC takes the id after the last CPU.
pub const MAX_CPUS: u32 = 254;
/// Number of IOAPIC input pins (GSIs 0..23).
pub const IOAPIC_PINS: u8 = 24;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 9) | 1; // APIC, FPU
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table can describe.
    #[error("{0} vCPUs: the MP table describes at most {MAX_CPUS}")]
    TooManyCpus(u32),
    /// Guest memory refused the write.
    #[error("cannot write the MP table to guest memory")]
    Write(#[from] GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Serializes the whole MP table (floating pointer followed by the configuration table) for a
/// guest with `num_cpus` vCPUs, to be placed at guest address `base`.
pub fn build(num_cpus: u32, base: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ n arrives on IOAPIC pin n, with the bus's default polarity and trigger.
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0 of every local APIC is the 8259's ExtINT, LINT1 is NMI.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&table_len.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"LOFT    ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // 16 bytes, rev 1.4, checksum, features
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build(num_cpus, layout::MPTABLE_ADDR)?;
    mem.write_slice(&bytes, GuestAddress(layout::MPTABLE_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        for cpus in [1, 2, 64, MAX_CPUS] {
            let t = build(cpus, 0x9fc00).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(table_addr, 0x9fc10);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as u32;
            assert_eq!(count, cpus + 2 + 24 + 2);
        }
    }

    #[test]
    fn lists_every_cpu_with_one_bootstrap_and_the_ioapic_after_them() {
        let t = build(3, 0x9fc00).unwrap();
        let entries = &t[16 + HEADER_LEN..];
        let cpus: Vec<_> = entries.chunks(20).take(3).collect();
        for (i, c) in cpus.iter().enumerate() {
            assert_eq!(c[0], ENTRY_PROCESSOR);
            assert_eq!(c[1] as usize, i);
            assert_eq!(c[3] & 2 != 0, i == 0, "only CPU 0 is the BSP");
        }
        let ioapic = &entries[60 + 8..60 + 16];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 3);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            0xfec0_0000
        );
    }

    #[test]
    fn refuses_zero_or_too_many_cpus() {
        assert!(build(0, 0).is_err());
        assert!(build(MAX_CPUS + 1, 0).is_err());
    }

    #[test]
    fn fits_in_the_reserved_hole_below_1mib() {
        let t = build(MAX_CPUS, layout::MPTABLE_ADDR).unwrap();
        assert!(layout::MPTABLE_ADDR + t.len() as u64 <= layout::HIMEM_START);
    }
}
