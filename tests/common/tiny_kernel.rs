//! Tiny test "kernels": a few bytes of x86_64 code in an ELF, entered in long mode through the
//! 64-bit boot protocol. They boot in milliseconds, so VMM behaviour (exits, lifecycle, leaks)
//! can be tested many times over without a real kernel.

use std::path::PathBuf;

/// Where the code is loaded and entered.
const LOAD_ADDR: u64 = 0x10_0000;

/// Code that writes `text` to COM1 (0x3f8) and then asks for a reset (out 0x64, 0xfe).
pub fn print_and_reset(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to hlt
    code
}

/// Code that spins forever without ever exiting to the VMM.
pub fn spin_forever() -> Vec<u8> {
    vec![0xeb, 0xfe] // jmp .
}

/// A minimal ELF64 executable with `code` as its only loadable segment.
pub fn elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code_off = 0x1000u64;
    let mut b = vec![0u8; code_off as usize];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2; // 64-bit
    b[5] = 1; // little-endian
    b[6] = 1; // version
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    b[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    b[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    b[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut b[EHDR..EHDR + PHDR];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&code_off.to_le_bytes());
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    b.extend_from_slice(code);
    b
}

/// Writes an ELF with `code` to a fresh file named `name` and returns its path.
pub fn write(name: &str, code: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loft-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, elf(code)).unwrap();
    path
}
