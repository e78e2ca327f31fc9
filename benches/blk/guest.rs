//! The blk bench's guest side: the command the guest runs and the parsing of its output. Pure
//! functions (also compiled into tests/guest, which runs the unit tests below).

/// The data disk: larger than the 64 MiB written, and of a size no root image has, so the guest
/// finds it by size whatever order a VMM gives its disks.
pub const DATA_DISK_SECTORS: u64 = 80 * 2048;

/// What the guest runs: find the data disk, write 64 MiB to it with O_DIRECT and an fsync
/// (a virtio FLUSH), read it back with O_DIRECT. Around each `dd` it samples /proc/uptime and
/// the disk's /sys/block/*/stat with shell builtins (no extra processes) and prints
/// `BLK-WRITE u0 u1 : stat0 : stat1` (and `BLK-READ …`). No double quotes: it travels as
/// guest_cmd="..." on the kernel command line.
pub fn guest_cmd() -> String {
    let dd = |name: &str, args: &str| {
        format!(
            "read u0 _ < /proc/uptime; read s0 < $S; dd {args}; read u1 _ < /proc/uptime; \
             read s1 < $S; echo {name} $u0 $u1 : $s0 : $s1; "
        )
    };
    format!(
        "D=; for b in /sys/block/vd*; do read n < $b/size; [ $n = {DATA_DISK_SECTORS} ] && \
         D=${{b##*/}}; done; S=/sys/block/$D/stat; echo BLK-DEV=$D; {}{}echo BLK-DONE",
        dd(
            "BLK-WRITE",
            "if=/dev/zero of=/dev/$D bs=1M count=64 oflag=direct conv=fsync"
        ),
        dd(
            "BLK-READ",
            "if=/dev/$D of=/dev/null bs=1M count=64 iflag=direct"
        ),
    )
}

/// Throughput of one `dd` from its `BLK-…` line, MiB/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdFigures {
    /// Bytes the disk moved (the stat's sector count) over the time it was busy (io_ticks):
    /// the device path alone, without the guest's process start.
    pub device_mib_s: f64,
    /// 64 MiB over the guest's wall time around the whole `dd` (process start included).
    pub wall_mib_s: f64,
}

/// Parses the `section` line (`BLK-WRITE` or `BLK-READ`) of the guest's output.
pub fn dd_figures(out: &str, section: &str) -> Option<DdFigures> {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix(section)?.strip_prefix(' '))?;
    let mut parts = line.split(':');
    let times: Vec<f64> = parts
        .next()?
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let stat = |p: Option<&str>| -> Option<Vec<u64>> {
        p?.split_whitespace().map(|x| x.parse().ok()).collect()
    };
    let (s0, s1) = (stat(parts.next())?, stat(parts.next())?);
    let [u0, u1] = times[..] else { return None };
    // /sys/block/*/stat: [2] sectors read, [6] sectors written, [9] io_ticks (ms busy)
    let field = |i: usize| s1.get(i)?.checked_sub(*s0.get(i)?);
    let sectors = field(2)? + field(6)?;
    let busy_s = field(9)? as f64 / 1e3;
    let wall_s = u1 - u0;
    let mib = |bytes: f64| bytes / (1u64 << 20) as f64;
    (sectors > 0 && busy_s > 0.0 && wall_s > 0.0).then(|| DdFigures {
        device_mib_s: mib(sectors as f64 * 512.0) / busy_s,
        wall_mib_s: 64.0 / wall_s,
    })
}

// cargo builds this harness=false bench with cfg(test) but without #[test] functions
#[cfg(test)]
#[allow(unused_imports, dead_code)]
mod tests {
    use super::*;

    #[test]
    fn dd_figures_from_the_guest_lines() {
        // 131072 sectors = 64 MiB in 2000 ms busy, 2.5 s wall; then a read in 500 ms / 1 s
        let out = "BLK-DEV=vdb\n64+0 records in\n\
                   BLK-WRITE 40.10 42.60 : 0 0 0 0 0 0 0 0 0 100 0 : 0 0 0 0 64 0 131072 1900 0 2100 1900\n\
                   BLK-READ 43.00 44.00 : 0 0 0 0 64 0 131072 1900 0 2100 1900 : \
                   64 0 131072 400 64 0 131072 1900 0 2600 2300\nBLK-DONE\n";
        let w = dd_figures(out, "BLK-WRITE").unwrap();
        assert!((w.device_mib_s - 32.0).abs() < 1e-9, "{w:?}");
        assert!((w.wall_mib_s - 25.6).abs() < 1e-9, "{w:?}");
        let r = dd_figures(out, "BLK-READ").unwrap();
        assert!((r.device_mib_s - 128.0).abs() < 1e-9, "{r:?}");
        assert!((r.wall_mib_s - 64.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn dd_figures_reject_broken_lines() {
        for out in [
            "BLK-NOPE 1 2 : 0 : 0",
            "BLK-WRITE 1 2 : 0 0 0 0 0 0 0 0 0 0 : 0 0 0 0 0 0 0 0 0 0",
            "BLK-WRITE 1 : 0 0 0 0 0 0 8 0 0 0 : 0 0 0 0 0 0 16 0 0 10",
            "BLK-WRITE 1 2 : 0 0 0 0 0 0 16 0 0 10 : 0 0 0 0 0 0 8 0 0 20",
            "BLK-WRITE 1 2 : x : y",
            "BLK-WRITE 1 2 : 0 0 0",
        ] {
            assert_eq!(dd_figures(out, "BLK-WRITE"), None, "{out}");
        }
    }

    #[test]
    fn guest_cmd_fits_the_kernel_command_line() {
        let c = guest_cmd();
        assert!(!c.contains('"'), "{c}");
        assert!(c.contains(&DATA_DISK_SECTORS.to_string()));
    }
}
