//! Getting the guest's kernel, initrd and command line into guest memory.
//!
//! Kernels are probed before anything is loaded, so that a file that is not a kernel, or a guest
//! too small to hold it, gets a clear error naming the problem rather than a loader failure.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::boot_params::InitrdPlacement;
use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::EntryPoint;

/// Guest RAM the kernel needs beyond its image and the initrd to get going.
const MIN_FREE_RAM: u64 = 16 << 20;
const MIB: u64 = 1 << 20;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const MAX_PROGRAM_HEADERS: u16 = 128;
/// Offset of the setup header's `HdrS` signature in a bzImage.
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;

/// Errors loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel file is not there.
    #[error("kernel {0}: no such file")]
    KernelMissing(PathBuf),
    /// The initrd file is not there.
    #[error("initrd {0}: no such file")]
    InitrdMissing(PathBuf),
    /// A boot file cannot be read.
    #[error("cannot read {what} {path}")]
    Unreadable {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel {0}: not a kernel image (expected an ELF vmlinux or a bzImage)")]
    NotAKernel(PathBuf),
    /// An ELF or bzImage with inconsistent headers.
    #[error("kernel {path}: corrupt {format} image: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// "ELF" or "bzImage".
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Guest RAM cannot hold the kernel and initrd.
    #[error("--memory {memory}: too small for this guest: the kernel occupies guest memory up to {kernel_end_mib} MiB and the initrd needs {initrd_mib} MiB; use at least {needed_mib}M")]
    MemoryTooSmall {
        /// Guest memory asked for.
        memory: String,
        /// Where the kernel's image ends, MiB.
        kernel_end_mib: u64,
        /// Initrd size, MiB (rounded up).
        initrd_mib: u64,
        /// The least memory that works, MiB.
        needed_mib: u64,
    },
    /// The command line does not fit the kernel's limit.
    #[error("kernel command line is {len} bytes, longer than the {max} the kernel accepts")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit, excluding the NUL.
        max: usize,
    },
    /// A command line with characters the kernel does not take.
    #[error("kernel command line is invalid")]
    CmdlineInvalid(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written to guest memory.
    #[error("cannot write the kernel command line to guest memory")]
    CmdlineWrite(#[source] loader::Error),
    /// linux-loader failed.
    #[error("cannot load kernel {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The loader error.
        source: loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("initrd {path}: {len} bytes do not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The initrd could not be copied to guest memory.
    #[error("cannot copy initrd {path} into guest memory")]
    InitrdLoad {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Kernel image formats loft boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux`.
    Elf,
    /// Compressed `bzImage`.
    BzImage,
}

/// A kernel file, opened and checked.
#[derive(Debug)]
pub struct KernelImage {
    path: PathBuf,
    file: File,
    /// Its format.
    pub format: KernelFormat,
    /// The highest guest address the running kernel occupies.
    pub end: u64,
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Where the vCPU starts.
    pub entry: EntryPoint,
    /// The bzImage's setup header, to seed the zero page.
    pub setup_header: Option<setup_header>,
}

fn open(path: &Path, what: &'static str) -> Result<File, LoaderError> {
    File::open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound if what == "kernel" => LoaderError::KernelMissing(path.into()),
            io::ErrorKind::NotFound => LoaderError::InitrdMissing(path.into()),
            _ => LoaderError::Unreadable {
                what,
                path: path.into(),
                source,
            },
        })
        .and_then(|f| match f.metadata() {
            Ok(m) if m.is_dir() => Err(LoaderError::Unreadable {
                what,
                path: path.into(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "is a directory"),
            }),
            _ => Ok(f),
        })
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// The end of the highest PT_LOAD segment of a 64-bit x86 ELF, from its headers.
fn elf_end<R: Read + Seek>(f: &mut R, head: &[u8]) -> Result<u64, String> {
    if head.len() < 64 {
        return Err("truncated ELF header".into());
    }
    if head[4] != 2 || head[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if le16(head, 0x12) != EM_X86_64 {
        return Err(format!(
            "built for machine {} (not x86_64)",
            le16(head, 0x12)
        ));
    }
    let phoff = le64(head, 0x20);
    let phentsize = le16(head, 0x36);
    let phnum = le16(head, 0x38);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PROGRAM_HEADERS {
        return Err(format!(
            "bad program headers ({phnum} of {phentsize} bytes)"
        ));
    }
    let mut phdrs = vec![0u8; usize::from(phnum) * 56];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut phdrs))
        .map_err(|_| "program headers lie past the end of the file".to_string())?;
    let mut end = 0u64;
    for ph in phdrs.chunks_exact(56) {
        if le32(ph, 0) != PT_LOAD {
            continue;
        }
        let seg_end = le64(ph, 0x18)
            .checked_add(le64(ph, 0x28))
            .ok_or("segment address overflows")?;
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err("no loadable segment".into());
    }
    Ok(end)
}

/// The memory a bzImage needs: its protected-mode part at 1 MiB and the decompressed kernel at
/// `pref_address` with `init_size` bytes.
fn bzimage_end(head: &[u8], file_len: u64) -> Result<u64, String> {
    if head.len() < 0x268 {
        return Err("truncated setup header".into());
    }
    let version = le16(head, 0x206);
    if version < 0x020a {
        return Err(format!("boot protocol {version:#x} is older than 2.10"));
    }
    let setup_sects = u64::from(head[0x1f1].max(4));
    let pm_size = file_len
        .checked_sub((setup_sects + 1) * 512)
        .ok_or("shorter than its setup code")?;
    let pref_address = le64(head, 0x258);
    let init_size = u64::from(le32(head, 0x260));
    let decompressed = pref_address
        .checked_add(init_size)
        .ok_or("pref_address + init_size overflows")?;
    Ok((layout::HIMEM_START + pm_size).max(decompressed))
}

/// Opens and checks a kernel image.
pub fn probe_kernel(path: &Path) -> Result<KernelImage, LoaderError> {
    let mut file = open(path, "kernel")?;
    let unreadable = |source| LoaderError::Unreadable {
        what: "kernel",
        path: path.into(),
        source,
    };
    let file_len = file.metadata().map_err(unreadable)?.len();
    let mut head = Vec::with_capacity(0x400);
    (&mut file)
        .take(0x400)
        .read_to_end(&mut head)
        .map_err(unreadable)?;
    let corrupt = |format, reason| LoaderError::Corrupt {
        path: path.into(),
        format,
        reason,
    };
    let (format, end) = if head.starts_with(ELF_MAGIC) {
        let end = elf_end(&mut file, &head).map_err(|r| corrupt("ELF", r))?;
        (KernelFormat::Elf, end)
    } else if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(b"HdrS") {
        let end = bzimage_end(&head, file_len).map_err(|r| corrupt("bzImage", r))?;
        (KernelFormat::BzImage, end)
    } else {
        return Err(LoaderError::NotAKernel(path.into()));
    };
    Ok(KernelImage {
        path: path.into(),
        file,
        format,
        end,
    })
}

/// Opens an initrd and returns it with its size.
pub fn open_initrd(path: &Path) -> Result<(File, u64), LoaderError> {
    let file = open(path, "initrd")?;
    let len = file
        .metadata()
        .map_err(|source| LoaderError::Unreadable {
            what: "initrd",
            path: path.into(),
            source,
        })?
        .len();
    Ok((file, len))
}

/// `v` rounded up to a multiple of `a`, saturating: a crafted kernel's footprint can end near
/// `u64::MAX`, and that must read as "needs too much memory", not wrap around to a small size.
fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a).saturating_mul(a)
}

/// Checks that `mem_size` bytes of RAM hold a kernel ending at `kernel_end`, an initrd of
/// `initrd_len` bytes and room to run.
pub fn check_memory(mem_size: u64, kernel_end: u64, initrd_len: u64) -> Result<(), LoaderError> {
    let low_ram = mem_size.min(layout::MMIO_GAP_START);
    let needed = align_up(kernel_end, 2 * MIB)
        .saturating_add(align_up(initrd_len, 4096))
        .saturating_add(MIN_FREE_RAM);
    if low_ram < needed {
        return Err(LoaderError::MemoryTooSmall {
            memory: crate::config::MemSize(mem_size).to_string(),
            kernel_end_mib: kernel_end.div_ceil(MIB),
            initrd_mib: initrd_len.div_ceil(MIB),
            needed_mib: needed.div_ceil(MIB),
        });
    }
    Ok(())
}

/// Loads the kernel and says how to enter it.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    image: &mut KernelImage,
) -> Result<LoadedKernel, LoaderError> {
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let result = match image.format {
        KernelFormat::Elf => Elf::load(mem, None, &mut image.file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut image.file, himem),
    }
    .map_err(|source| LoaderError::Load {
        path: image.path.clone(),
        source,
    })?;
    let entry = match (image.format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(pvh)) => EntryPoint::Pvh(pvh.0),
        (KernelFormat::Elf, _) => EntryPoint::Linux64(result.kernel_load.0),
        // The 64-bit entry of a bzImage sits 0x200 past its protected-mode start.
        (KernelFormat::BzImage, _) => EntryPoint::Linux64(result.kernel_load.0 + 0x200),
    };
    Ok(LoadedKernel {
        entry,
        setup_header: result.setup_header,
    })
}

/// Copies the initrd to the top of low RAM (below 2 GiB), page aligned, above `kernel_end`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
    len: u64,
    kernel_end: u64,
) -> Result<InitrdPlacement, LoaderError> {
    let top = crate::vstate::memory::low_ram_end(mem).min(layout::INITRD_ADDR_MAX + 1);
    let addr = top
        .checked_sub(len)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= align_up(kernel_end, 4096))
        .ok_or_else(|| LoaderError::InitrdTooLarge {
            path: path.into(),
            len,
        })?;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| LoaderError::Unreadable {
            what: "initrd",
            path: path.into(),
            source,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len as usize)
        .map_err(|source| LoaderError::InitrdLoad {
            path: path.into(),
            source,
        })?;
    Ok(InitrdPlacement { addr, size: len })
}

/// Builds the kernel command line: loft's own parameters first (console, how to reboot, what
/// this host needs, loft's devices), then the user's, with the user's init arguments (after
/// ` -- `) last.
pub fn build_cmdline(
    user: &str,
    host: Option<&str>,
    devices: &[String],
) -> Result<Cmdline, LoaderError> {
    let (user_kernel, user_init) = match user.split_once(" -- ") {
        Some((k, i)) => (k.trim(), Some(i.trim())),
        None if user.trim_start().starts_with("-- ") => ("", Some(user.trim_start()[3..].trim())),
        None => (user.trim(), None),
    };
    let mut parts: Vec<&str> = Vec::new();
    if !user_kernel
        .split_whitespace()
        .any(|w| w.starts_with("console="))
    {
        parts.push("console=ttyS0");
    }
    // loft stops when the guest reboots: reboot=k makes Linux pulse the i8042 reset line, and
    // panic=-1 turns a panic into that reboot instead of a hang. The i8042 has a keyboard (for
    // Ctrl-Alt-Del) and no mouse port: Linux is told not to probe for one, nor the keyboard.
    parts.push("reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd");
    parts.extend(host);
    parts.extend(devices.iter().map(String::as_str));
    if !user_kernel.is_empty() {
        parts.push(user_kernel);
    }
    let mut text = parts.join(" ");
    if let Some(init) = user_init.filter(|i| !i.is_empty()) {
        text.push_str(" -- ");
        text.push_str(init);
    }
    let max = layout::CMDLINE_MAX_LEN - 1;
    if text.len() > max {
        return Err(LoaderError::CmdlineTooLong {
            len: text.len(),
            max,
        });
    }
    Cmdline::try_from(&text, layout::CMDLINE_MAX_LEN).map_err(LoaderError::CmdlineInvalid)
}

/// Writes `cmdline` where the boot structures say it is; returns its length in bytes (without
/// the terminating NUL).
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, LoaderError> {
    let text = cmdline.as_cstring().map_err(LoaderError::CmdlineInvalid)?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline)
        .map_err(LoaderError::CmdlineWrite)?;
    log::debug!("kernel command line: {}", text.to_string_lossy());
    Ok(text.as_bytes().len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn a_segment_ending_near_the_top_of_the_address_space_is_too_big_not_a_panic() {
        let near_top = u64::MAX - 0x1000;
        let img = elf_header(62, 1, &[(PT_LOAD, near_top, 0x800)]);
        let end = elf_end(&mut Cursor::new(&img), &img).unwrap();
        assert_eq!(end, near_top + 0x800);
        assert!(matches!(
            check_memory(128 * MIB, end, 0),
            Err(LoaderError::MemoryTooSmall { .. })
        ));
        assert!(matches!(
            check_memory(u64::MAX, end, u64::MAX),
            Err(LoaderError::MemoryTooSmall { .. })
        ));
        // And one whose end does not fit in 64 bits at all.
        let img = elf_header(62, 1, &[(PT_LOAD, u64::MAX - 4, 16)]);
        assert!(elf_end(&mut Cursor::new(&img), &img).is_err());
    }

    fn elf_header(machine: u16, phnum: u16, segs: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = 2;
        b[5] = 1;
        b[0x12..0x14].copy_from_slice(&machine.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        for (ty, paddr, memsz) in segs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&ty.to_le_bytes());
            ph[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
            ph[0x28..0x30].copy_from_slice(&memsz.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn elf_footprint_is_the_highest_load_segment() {
        let img = elf_header(
            62,
            3,
            &[
                (1, 0x100_0000, 0x80_0000),
                (4, 0, 0x9999_9999),
                (1, 0x200_0000, 0x10_0000),
            ],
        );
        assert_eq!(elf_end(&mut Cursor::new(&img), &img), Ok(0x210_0000));
    }

    #[test]
    fn corrupt_elves_are_rejected_with_a_reason() {
        let arm = elf_header(183, 1, &[(1, 0x100_0000, 0x1000)]);
        assert!(elf_end(&mut Cursor::new(&arm), &arm)
            .unwrap_err()
            .contains("not x86_64"));
        let truncated = elf_header(62, 2, &[(1, 0x100_0000, 0x1000)]);
        assert!(elf_end(&mut Cursor::new(&truncated), &truncated)
            .unwrap_err()
            .contains("past the end"));
        let overflow = elf_header(62, 1, &[(1, u64::MAX, 2)]);
        assert!(elf_end(&mut Cursor::new(&overflow), &overflow).is_err());
        let no_load = elf_header(62, 1, &[(4, 0, 0x1000)]);
        assert!(elf_end(&mut Cursor::new(&no_load), &no_load)
            .unwrap_err()
            .contains("no loadable"));
        assert!(elf_end(&mut Cursor::new(&[0u8; 10]), &[0u8; 10]).is_err());
    }

    #[test]
    fn bzimage_footprint_covers_the_decompressed_kernel() {
        let mut h = vec![0u8; 0x400];
        h[0x1f1] = 27;
        h[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        h[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        h[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
        assert_eq!(bzimage_end(&h, 2 << 20), Ok(0x300_0000));
        h[0x206..0x208].copy_from_slice(&0x0200u16.to_le_bytes());
        assert!(bzimage_end(&h, 2 << 20).is_err());
    }

    #[test]
    fn memory_check_names_the_least_that_works() {
        assert!(check_memory(128 * MIB, 0x1c1_6000 + 0x100_0000, 2 * MIB).is_ok());
        match check_memory(32 * MIB, 0x2c1_6000, 2 * MIB) {
            Err(LoaderError::MemoryTooSmall {
                needed_mib,
                kernel_end_mib,
                ..
            }) => {
                assert_eq!(kernel_end_mib, 45);
                assert_eq!(needed_mib, 46 + 2 + 16);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cmdline_puts_loft_parts_first_and_init_args_last() {
        let devs = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let c = build_cmdline(
            "quiet foo=bar -- /bin/sh -c x",
            Some("clearcpuid=xsave"),
            &devs,
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd clearcpuid=xsave virtio_mmio.device=4K@0xd0000000:5 quiet foo=bar -- /bin/sh -c x"
        );
        let c = build_cmdline("console=hvc0", None, &[]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd console=hvc0"
        );
    }

    #[test]
    fn cmdline_too_long_is_a_clear_error() {
        let long = "x".repeat(3000);
        match build_cmdline(&long, None, &[]) {
            Err(LoaderError::CmdlineTooLong { len, max: 2047 }) => assert!(len > 3000),
            other => panic!("{other:?}"),
        }
    }
}
