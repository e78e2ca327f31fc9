//! loft's `--boot-timer` line:
//! `loft-boot-timer: vm_built=W/C first_entry=W/C kernel_init=W/C user_init=W/C stop_request=W/C exit=W/C`
//! (W = wall ms since loft's start, C = loft's CPU ms then; `-` = phase not reached).
//! Pure functions (also compiled into tests/guest, which runs the unit tests below).

use std::collections::BTreeMap;

use serde::Serialize;

/// The line's prefix.
pub const PREFIX: &str = "loft-boot-timer:";

/// The phases, in the order loft prints them.
pub const PHASES: [&str; 6] = [
    "vm_built",
    "first_entry",
    "kernel_init",
    "user_init",
    "stop_request",
    "exit",
];

/// One phase: wall ms since loft's start and loft's CPU ms at that moment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Mark {
    pub wall_ms: f64,
    pub cpu_ms: f64,
}

/// The phases of one run, in loft's order; `None` = not reached.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BootTimer {
    pub vm_built: Option<Mark>,
    pub first_entry: Option<Mark>,
    pub kernel_init: Option<Mark>,
    pub user_init: Option<Mark>,
    pub stop_request: Option<Mark>,
    pub exit: Option<Mark>,
    /// Phases this bench does not know (a newer loft), kept as they came.
    #[serde(flatten)]
    pub other: BTreeMap<String, Option<Mark>>,
}

impl BootTimer {
    /// A phase by name.
    pub fn get(&self, phase: &str) -> Option<Mark> {
        match phase {
            "vm_built" => self.vm_built,
            "first_entry" => self.first_entry,
            "kernel_init" => self.kernel_init,
            "user_init" => self.user_init,
            "stop_request" => self.stop_request,
            "exit" => self.exit,
            other => self.other.get(other).copied().flatten(),
        }
    }

    fn slot(&mut self, phase: &str) -> &mut Option<Mark> {
        match phase {
            "vm_built" => &mut self.vm_built,
            "first_entry" => &mut self.first_entry,
            "kernel_init" => &mut self.kernel_init,
            "user_init" => &mut self.user_init,
            "stop_request" => &mut self.stop_request,
            "exit" => &mut self.exit,
            other => self.other.entry(other.to_string()).or_default(),
        }
    }
}

fn mark(value: &str) -> Option<Mark> {
    let (w, c) = value.split_once('/')?;
    Some(Mark {
        wall_ms: w.trim().parse().ok()?,
        cpu_ms: c.trim().parse().ok()?,
    })
}

/// The last `loft-boot-timer:` line of loft's stderr, parsed; `None` when there is none (a loft
/// without `--boot-timer`, or one that died first). Malformed values count as not reached.
pub fn parse(stderr: &str) -> Option<BootTimer> {
    let line = stderr
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(PREFIX))?;
    let mut t = BootTimer::default();
    for word in line.split_whitespace() {
        if let Some((name, value)) = word.split_once('=') {
            *t.slot(name) = mark(value);
        }
    }
    Some(t)
}

// cargo builds this harness=false bench with cfg(test) but without #[test] functions
#[cfg(test)]
#[allow(unused_imports, dead_code)]
mod tests {
    use super::*;

    #[test]
    fn parses_reached_and_missing_phases() {
        let err = "some log line\n\
            loft-boot-timer: vm_built=1.500/0.250 first_entry=2.000/0.300 kernel_init=12000.5/11000.25 \
            user_init=- stop_request=- exit=20000/19000.5\n";
        let t = parse(err).unwrap();
        assert_eq!(
            t.vm_built,
            Some(Mark {
                wall_ms: 1.5,
                cpu_ms: 0.25
            })
        );
        assert_eq!(t.kernel_init.unwrap().cpu_ms, 11000.25);
        assert_eq!(t.user_init, None);
        assert_eq!(t.stop_request, None);
        assert_eq!(t.get("exit").unwrap().wall_ms, 20000.0);
        assert!(t.other.is_empty());
    }

    #[test]
    fn absent_line_and_unknown_phases() {
        assert_eq!(parse("loft: guest stopped\n"), None);
        let t = parse("loft-boot-timer: vm_built=1/1 new_phase=3/2 exit=x/1").unwrap();
        assert_eq!(t.get("new_phase").unwrap().wall_ms, 3.0);
        assert_eq!(t.exit, None);
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            json.starts_with("{\"vm_built\":{\"wall_ms\":1.0,\"cpu_ms\":1.0},\"first_entry\":null")
        );
        assert!(json.contains("\"new_phase\":{\"wall_ms\":3.0,\"cpu_ms\":2.0}"));
    }
}
