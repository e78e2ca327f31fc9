//! `/proc/PID/smaps` parsing: how much a VMM process has resident outside the guest's RAM.
//! Pure functions (also compiled into tests/guest, which runs the unit tests below).

/// One mapping of a smaps file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// The path column: empty for an anonymous mapping, `[heap]`, a file, `/dev/shm/x (deleted)`…
    pub path: String,
    /// The `Rss:` line, KiB.
    pub rss_kib: u64,
}

impl Mapping {
    pub fn size(&self) -> u64 {
        self.end - self.start
    }
}

/// `start-end` of a mapping header line (`55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0 [heap]`).
fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let (a, b) = range.split_once('-')?;
    let start = u64::from_str_radix(a, 16).ok()?;
    let end = u64::from_str_radix(b, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 || end < start {
        return None;
    }
    // offset, device, inode, then the path (which may contain spaces)
    let rest: Vec<&str> = fields.skip(3).collect();
    Some(Mapping {
        start,
        end,
        path: rest.join(" "),
        rss_kib: 0,
    })
}

/// All mappings of a smaps text, with their `Rss`.
pub fn parse(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Rss:") {
            if let Some(m) = out.last_mut() {
                let kib = rest.trim().trim_end_matches("kB").trim();
                m.rss_kib = kib.parse().unwrap_or(0);
            }
        } else if let Some(m) = header(line) {
            out.push(m);
        }
    }
    out
}

/// Which mapping is the guest's RAM.
#[derive(Clone, Copy, Debug)]
pub enum GuestRam<'a> {
    /// An anonymous mapping of exactly this many bytes (loft, Firecracker).
    Anonymous(u64),
    /// A file mapping whose path contains this text, of this many bytes (QEMU's
    /// memory-backend-file).
    File(&'a str, u64),
}

/// The guest RAM mapping among `maps`: the one of the guest's size that matches the rule (the
/// most resident one if several do); failing that any mapping of exactly the guest's size; failing
/// that, for anonymous RAM, the smallest anonymous mapping that is larger (the kernel may have
/// merged the guest RAM with a neighbour).
pub fn guest_mapping<'m>(maps: &'m [Mapping], ram: GuestRam<'_>) -> Option<&'m Mapping> {
    let most_resident = |it: &mut dyn Iterator<Item = &'m Mapping>| it.max_by_key(|m| m.rss_kib);
    let (size, exact) = match ram {
        GuestRam::Anonymous(size) => (
            size,
            most_resident(
                &mut maps
                    .iter()
                    .filter(|m| m.size() == size && m.path.is_empty()),
            ),
        ),
        GuestRam::File(hint, size) => (
            size,
            most_resident(
                &mut maps
                    .iter()
                    .filter(|m| m.size() == size && !hint.is_empty() && m.path.contains(hint)),
            ),
        ),
    };
    exact
        .or_else(|| most_resident(&mut maps.iter().filter(|m| m.size() == size)))
        .or_else(|| match ram {
            GuestRam::Anonymous(_) => maps
                .iter()
                .filter(|m| m.path.is_empty() && m.size() > size)
                .min_by_key(|m| m.size()),
            GuestRam::File(..) => None,
        })
}

/// The VMM's own resident memory: the sum of `Rss` over all mappings except the guest RAM
/// mapping; `None` when that mapping cannot be found (then the number would mean nothing).
pub fn vmm_overhead_kib(text: &str, ram: GuestRam<'_>) -> Option<u64> {
    let maps = parse(text);
    let guest = guest_mapping(&maps, ram)?;
    let total: u64 = maps.iter().map(|m| m.rss_kib).sum();
    Some(total - guest.rss_kib)
}

// cargo builds this harness=false bench with cfg(test) but without #[test] functions
#[cfg(test)]
#[allow(unused_imports, dead_code)]
mod tests {
    use super::*;

    /// A trimmed smaps of a VMM with 128 MiB of anonymous guest RAM (0x8000000 bytes), of which
    /// 20000 KiB are resident.
    const LOFT: &str = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234                       /work/target/release/loft
Size:                132 kB
Rss:                 120 kB
Pss:                 120 kB
VmFlags: rd mr mw me dw sd
55d0c0a21000-55d0c0c00000 r-xp 00021000 08:01 1234                       /work/target/release/loft
Size:               1916 kB
Rss:                1500 kB
VmFlags: rd ex mr mw me dw sd
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  64 kB
VmFlags: rd wr mr mw me ac sd
7f1200000000-7f1208000000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               20000 kB
Anonymous:         20000 kB
VmFlags: rd wr mr mw me nr sd
7f1208000000-7f1208800000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                  16 kB
VmFlags: rd wr mr mw me ac sd
7f1210000000-7f1210001000 rw-s 00000000 00:0e 77                         anon_inode:kvm-vcpu:0
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd wr sh mr mw me ms sd
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn parses_mappings_and_rss() {
        let maps = parse(LOFT);
        assert_eq!(maps.len(), 7);
        assert_eq!(maps[0].path, "/work/target/release/loft");
        assert_eq!(maps[0].rss_kib, 120);
        assert_eq!(maps[3].path, "");
        assert_eq!(maps[3].size(), 128 << 20);
        assert_eq!(maps[3].rss_kib, 20000);
        assert_eq!(maps[5].path, "anon_inode:kvm-vcpu:0");
    }

    #[test]
    fn overhead_excludes_the_anonymous_guest_mapping() {
        let total = 120 + 1500 + 64 + 20000 + 16 + 4 + 12;
        assert_eq!(
            vmm_overhead_kib(LOFT, GuestRam::Anonymous(128 << 20)),
            Some(total - 20000)
        );
    }

    #[test]
    fn overhead_of_a_file_backed_guest_and_missing_guest() {
        let qemu = "\
7f0000000000-7f0008000000 rw-s 00000000 00:19 42                         /dev/shm/loft-bench-1-2 (deleted)
Rss:               30000 kB
7f0008000000-7f0008001000 ---p 00000000 00:00 0 
Rss:                   0 kB
7f0010000000-7f0018000000 rw-p 00000000 00:00 0 
Rss:                 100 kB
564000000000-564000100000 r-xp 00000000 08:01 9 /usr/bin/qemu-system-x86_64
Rss:                5000 kB
";
        // the file mapping is the guest, not the anonymous one of the same size
        assert_eq!(
            vmm_overhead_kib(qemu, GuestRam::File("/dev/shm/loft-bench-1-2", 128 << 20)),
            Some(5100)
        );
        // no mapping of the guest's size: no number
        assert_eq!(vmm_overhead_kib(qemu, GuestRam::Anonymous(256 << 20)), None);
        assert_eq!(vmm_overhead_kib("", GuestRam::Anonymous(128 << 20)), None);
    }

    #[test]
    fn a_merged_anonymous_guest_mapping_is_still_found() {
        let merged = "\
7f1200000000-7f1208200000 rw-p 00000000 00:00 0 
Rss:               20100 kB
7f1300000000-7f1310000000 rw-p 00000000 00:00 0 
Rss:                   8 kB
55d0c0a21000-55d0c0c00000 r-xp 00021000 08:01 1234 /loft
Rss:                1500 kB
";
        assert_eq!(
            vmm_overhead_kib(merged, GuestRam::Anonymous(128 << 20)),
            Some(1508)
        );
    }
}
