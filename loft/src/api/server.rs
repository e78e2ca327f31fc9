//! The HTTP/1.1 side of the control API: the Unix socket, one request per connection, read
//! within bounds and a deadline, parsed with `httparse`.
//!
//! `httparse` (the request-line and header parser under `hyper`) is the whole HTTP dependency:
//! zero dependencies of its own, no allocation, no I/O, no threads, so the API thread stays
//! small enough for a short seccomp list. Firecracker's own `micro_http` is not on crates.io,
//! and `tiny_http` brings a thread pool and TLS hooks this API does not need. What a control
//! socket needs on top is a few dozen lines here: bounded reads, a deadline, `Content-Length`
//! bodies, `Expect: 100-continue` (curl sends it for bodies over 1 KiB) and `Connection: close`
//! answers (every client of Firecracker's API copes with one request per connection).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Most bytes of a request line and headers.
pub const MAX_HEAD: usize = 8 << 10;
/// Most bytes of a request body: Firecracker's default payload limit.
pub const MAX_BODY: usize = 51_200;
/// How long a client has to send its whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// HTTP methods the API knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// Anything else (`POST`, `DELETE`, …).
    Other,
}

impl Method {
    fn parse(m: &str) -> Self {
        match m {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            _ => Method::Other,
        }
    }

    /// Its name, as in a request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Other => "OTHER",
        }
    }
}

/// A request read from a client.
#[derive(Debug)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Its path, without a query string.
    pub path: String,
    /// Its body (empty when it has none).
    pub body: Vec<u8>,
}

/// An answer: a status and an optional JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The JSON body, if any.
    pub body: Option<serde_json::Value>,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// `200 OK` with `body`.
    pub fn ok(body: serde_json::Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    /// `status` with Firecracker's error body, `{"fault_message": …}`.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(serde_json::json!({ "fault_message": message.into() })),
        }
    }

    /// The fault message, when this is an error.
    pub fn fault_message(&self) -> Option<&str> {
        self.body.as_ref()?.get("fault_message")?.as_str()
    }
}

/// Why a request could not be read. Each has the answer the client gets, when it can get one.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection failed, or closed before a whole request came.
    #[error("the client's connection failed")]
    Io(#[source] io::Error),
    /// The client did not send a whole request within [`READ_TIMEOUT`].
    #[error("the client sent no whole request within {READ_TIMEOUT:?}")]
    Timeout,
    /// The request line or headers are malformed or too long.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The body is longer than [`MAX_BODY`].
    #[error("Request payload with size {0} is larger than the limit of {MAX_BODY} allowed by the server.")]
    TooLarge(usize),
}

impl HttpError {
    /// What the client is told, when anything.
    pub fn response(&self) -> Option<Response> {
        match self {
            HttpError::Io(_) => None,
            HttpError::Timeout => Some(Response::fault(408, self.to_string())),
            HttpError::Malformed(_) => Some(Response::fault(400, self.to_string())),
            HttpError::TooLarge(_) => Some(Response::fault(413, self.to_string())),
        }
    }
}

/// Reads one request from `stream`, within [`MAX_HEAD`], [`MAX_BODY`] and [`READ_TIMEOUT`].
pub fn read_request(stream: &mut UnixStream) -> Result<Request, HttpError> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    // The head.
    let (method, path, head_len, body_len, expect_continue) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = Method::parse(req.method.unwrap_or(""));
                let target = req.path.unwrap_or("/");
                let path = target.split('?').next().unwrap_or("/").to_string();
                let mut body_len = 0usize;
                let mut expect = false;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        body_len = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                            .ok_or_else(|| HttpError::Malformed("bad Content-Length".into()))?;
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Err(HttpError::Malformed(
                            "chunked bodies are not supported; send Content-Length".into(),
                        ));
                    } else if h.name.eq_ignore_ascii_case("expect") {
                        expect = h.value.eq_ignore_ascii_case(b"100-continue");
                    }
                }
                break (method, path, len, body_len, expect);
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Err(HttpError::Malformed(format!(
                    "the request line and headers exceed {MAX_HEAD} bytes"
                )))
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(HttpError::Malformed(e.to_string())),
        }
        let room = (MAX_HEAD + 1)
            .saturating_sub(buf.len())
            .clamp(1, chunk.len());
        let n = read_some(stream, &mut chunk[..room], deadline)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    if body_len > MAX_BODY {
        return Err(HttpError::TooLarge(body_len));
    }
    let mut body: Vec<u8> = buf[head_len..].to_vec();
    if body.len() < body_len && expect_continue {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(HttpError::Io)?;
    }
    while body.len() < body_len {
        let want = (body_len - body.len()).min(chunk.len());
        let n = read_some(stream, &mut chunk[..want], deadline)?;
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(body_len);
    Ok(Request { method, path, body })
}

/// One read, failing at `deadline` or at the end of the stream.
fn read_some(
    stream: &mut UnixStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<usize, HttpError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HttpError::Timeout);
        }
        stream.set_read_timeout(Some(left)).map_err(HttpError::Io)?;
        match stream.read(buf) {
            Ok(0) => {
                return Err(HttpError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection mid-request",
                )))
            }
            Ok(n) => return Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// Writes `response` and says the connection ends with it.
pub fn write_response(stream: &mut UnixStream, response: &Response) -> io::Result<()> {
    let reason = match response.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        _ => "",
    };
    let body = response
        .body
        .as_ref()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nServer: loft\r\nConnection: close\r\n",
        response.status
    );
    if response.status != 204 {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    if response.status != 204 {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(raw: &[u8]) -> Result<Request, HttpError> {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(raw).unwrap();
        drop(b);
        read_request(&mut a)
    }

    #[test]
    fn reads_a_request_with_a_body() {
        let r = roundtrip(b"PUT /machine-config?x=1 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\n{}{}extra").unwrap();
        assert_eq!(r.method, Method::Put);
        assert_eq!(r.path, "/machine-config");
        assert_eq!(r.body, b"{}{}");
        let r = roundtrip(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(
            (r.method, r.path.as_str(), r.body.len()),
            (Method::Get, "/", 0)
        );
    }

    #[test]
    fn refuses_oversized_malformed_and_truncated_requests() {
        let big = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let e = roundtrip(big.as_bytes()).unwrap_err();
        assert_eq!(e.response().unwrap().status, 413);
        let e = roundtrip(b"NOT HTTP\r\n\r\n").unwrap_err();
        assert_eq!(e.response().unwrap().status, 400);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD * 2));
        let e = roundtrip(long.as_bytes()).unwrap_err();
        assert_eq!(e.response().unwrap().status, 400);
        let e = roundtrip(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}").unwrap_err();
        assert!(e.response().is_none(), "{e}");
        let e = roundtrip(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            .unwrap_err();
        assert_eq!(e.response().unwrap().status, 400);
    }

    #[test]
    fn a_silent_client_times_out() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let started = Instant::now();
        let e = read_request(&mut a).unwrap_err();
        assert!(matches!(e, HttpError::Timeout), "{e}");
        assert!(started.elapsed() >= READ_TIMEOUT);
        assert_eq!(e.response().unwrap().status, 408);
    }

    #[test]
    fn writes_responses() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write_response(&mut a, &Response::fault(400, "no")).unwrap();
        write_response(&mut a, &Response::no_content()).unwrap();
        drop(a);
        let mut s = String::new();
        b.read_to_string(&mut s).unwrap();
        assert!(s.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{s}");
        assert!(
            s.contains("Content-Length: 22\r\n\r\n{\"fault_message\":\"no\"}HTTP/1.1 204"),
            "{s}"
        );
    }
}
