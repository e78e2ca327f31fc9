//! A minimal HTTP/1.1 client for the control API, over a Unix socket: one request per
//! connection (the server answers `Connection: close`), the response head parsed with
//! `httparse` as the server parses requests. Used by the library's process mode
//! ([`crate::isolated`]) to drive a child `loft`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Most bytes of a response read (the API's answers are small JSON documents).
const MAX_RESPONSE: usize = 1 << 20;

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached, written or read.
    #[error("the API socket {path}")]
    Io {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The answer is not an HTTP response loft's server would send.
    #[error("a malformed API response: {0}")]
    Malformed(String),
}

/// An answer: its status code and body.
#[derive(Debug)]
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The body (JSON, or empty for 204).
    pub body: Vec<u8>,
}

impl Reply {
    /// The `fault_message` of an error answer, or the body as text.
    pub fn message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// Sends `method path` with an optional JSON `body` to the API on `sock` and reads the answer,
/// each socket operation bounded by `timeout`.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Reply, ClientError> {
    let io_err = |source| ClientError::Io {
        path: sock.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(sock).map_err(io_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut message = head.into_bytes();
    message.extend_from_slice(body.as_bytes());
    stream.write_all(&message).map_err(io_err)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut raw)
        .map_err(io_err)?;
    parse(&raw)
}

/// Parses one whole response (the connection closed after it).
fn parse(raw: &[u8]) -> Result<Reply, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Malformed(
                "the response ended in its head".into(),
            ))
        }
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = response
        .code
        .ok_or_else(|| ClientError::Malformed("no status code".into()))?;
    let length = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| {
            std::str::from_utf8(h.value)
                .ok()?
                .trim()
                .parse::<usize>()
                .ok()
        });
    let rest = &raw[head_len..];
    let body = match length {
        Some(n) if n > rest.len() => {
            return Err(ClientError::Malformed(format!(
                "the body ended after {} of {n} bytes",
                rest.len()
            )))
        }
        Some(n) => rest[..n].to_vec(),
        None => rest.to_vec(),
    };
    Ok(Reply { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_and_its_fault_message() {
        let r = parse(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 25\r\nConnection: close\r\n\r\n\
              {\"fault_message\":\"nope\"}\n",
        )
        .unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.message(), "nope");
        let r = parse(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!((r.status, r.body.len()), (204, 0));
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").is_err());
        assert!(parse(b"HTTP/1.1 200").is_err());
    }
}
