//! A minimal HTTP/1.1 client for Firecracker's API socket: one JSON request, one response.
//!
//! It follows Firecracker's documented API (a Unix socket, `PUT`/`PATCH` with JSON bodies, `204
//! No Content` on success), and was tried against Firecracker v1.17.0-dev.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Connects to `sock` as soon as Firecracker listens there, polling until `deadline`.
fn connect(sock: &Path, deadline: Instant) -> Result<UnixStream, String> {
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to {}: {e}", sock.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_micros(500)),
        }
    }
}

/// `METHOD path` with `body` on Firecracker's API socket `sock` (waiting for it to appear
/// until `deadline`); Ok when the answer is a 2xx, else the status line and body.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &serde_json::Value,
    deadline: Instant,
) -> Result<(), String> {
    let what = format!("{method} {path}");
    let mut s = connect(sock, deadline)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    s.set_read_timeout(Some(left))
        .map_err(|e| format!("{what}: {e}"))?;
    let body = body.to_string();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{what}: cannot send: {e}"))?;

    // the head, up to the blank line
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("{what}: no answer: {e}"))?;
        if n == 0 {
            return Err(format!("{what}: connection closed before an answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status_line = head.lines().next().unwrap_or("").trim().to_string();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{what}: not an HTTP answer: {status_line:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    // the body (Firecracker's errors say why in it)
    while buf.len() < head_end + length {
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("{what}: body cut short: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(format!(
            "{what}: {status_line}: {}",
            String::from_utf8_lossy(&buf[head_end..]).trim()
        ))
    }
}
