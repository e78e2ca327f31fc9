//! `--copy-in HOST:GUEST` and `--copy-out GUEST:HOST`.

use std::path::PathBuf;

/// A file to copy between the host and the guest.
#[derive(Debug, Clone)]
pub struct Copy {
    /// The host path.
    pub host: PathBuf,
    /// The guest path (absolute).
    pub guest: String,
}

fn checked(host: &str, guest: &str) -> Result<Copy, String> {
    if host.is_empty() {
        return Err("the host path is empty".into());
    }
    if !guest.starts_with('/') {
        return Err(format!("the guest path {guest:?} is not absolute"));
    }
    Ok(Copy {
        host: host.into(),
        guest: guest.into(),
    })
}

/// `HOST:GUEST`: split at the last `:` before a `/` (the guest path is absolute, a host path may
/// hold a colon).
pub fn parse_in(s: &str) -> Result<Copy, String> {
    let (host, guest) = s
        .rmatch_indices(":/")
        .next()
        .map(|(i, _)| (&s[..i], &s[i + 1..]))
        .ok_or_else(|| format!("{s:?} is not HOST:GUEST with an absolute GUEST path"))?;
    checked(host, guest)
}

/// `GUEST:HOST`: split at the first `:` (the guest path is absolute and should hold none).
pub fn parse_out(s: &str) -> Result<Copy, String> {
    let (guest, host) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not GUEST:HOST"))?;
    checked(host, guest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_parse() {
        let c = parse_in("/tmp/a:b.bin:/in/x").unwrap();
        assert_eq!(
            (c.host.to_str().unwrap(), c.guest.as_str()),
            ("/tmp/a:b.bin", "/in/x")
        );
        let c = parse_out("/out/y:rel/y").unwrap();
        assert_eq!(
            (c.host.to_str().unwrap(), c.guest.as_str()),
            ("rel/y", "/out/y")
        );
        assert!(parse_in("a:b").is_err());
        assert!(parse_in(":/x").is_err());
        assert!(parse_out("x:/h").is_err());
        assert!(parse_out("/x").is_err());
        assert!(parse_out("/x:").is_err());
    }
}
