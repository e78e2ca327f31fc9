//! Every test that boots a real Linux guest, in one test binary.
//!
//! cargo runs test binaries one after another, so guests booted from separate binaries never
//! overlap and a 2-core machine sits half idle through minutes-long boots. Here they share one
//! process and one [`common::BootSlot`] pool: two guests boot at any time, whichever module
//! they come from.
//!
//! The benches' pure parts (statistics, smaps parsing, the boot-timer line, the blk bench's
//! guest output) are compiled in too, so their unit tests run with the suite.

#[path = "../common/mod.rs"]
mod common;

mod agent_peers;
mod api;
mod bench_boot;
mod boot;
mod clones;
mod console;
mod disk_load;
mod exec;
mod exec_limits;
mod isolated;
mod jail;
mod sandbox;
mod seccomp;
mod snapshot;
mod snapshot_hard;
mod virtio;

#[allow(dead_code)]
#[path = "../../benches/blk/guest.rs"]
mod blk_guest;
#[allow(dead_code)]
#[path = "../../benches/boot/smaps.rs"]
mod smaps;
#[allow(dead_code)]
#[path = "../../benches/boot/stats.rs"]
mod stats;
#[allow(dead_code)]
#[path = "../../benches/boot/timer.rs"]
mod timer;
