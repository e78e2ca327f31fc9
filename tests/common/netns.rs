//! A private network namespace for tests that need TAP devices and host-side servers, removed
//! (with everything in it) when the guard is dropped, also when the test fails.
//!
//! Commands run in it through `ip netns exec`; sockets are bound in it from a helper thread that
//! joins it with `setns` (a socket stays in the namespace it was created in), so the servers are
//! plain threads of the test that stop by themselves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A network namespace, deleted on drop.
pub struct NetNs {
    name: String,
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetNs {
    /// Creates the namespace `loft-<tag>-<pid>` with its loopback up. Needs root.
    pub fn new(tag: &str) -> Self {
        let name = format!("loft-{tag}-{}", std::process::id());
        // A namespace left by an earlier process with the same pid (killed before cleanup).
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace, panicking when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Creates the TAP device `tap` in the namespace, with `addr` (CIDR) on it, and brings it up.
    pub fn add_tap(&self, tap: &str, addr: &str) {
        self.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        self.ip(&["addr", "add", addr, "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
    }

    /// Creates a TUN (layer 3, not TAP) device `name` in the namespace.
    pub fn add_tun(&self, name: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tun"]);
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Binds a TCP listener inside the namespace.
    pub fn bind_tcp(&self, addr: SocketAddr) -> TcpListener {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns =
                std::fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
            // SAFETY: `ns` is an open namespace file; setns only changes this helper thread's
            // network namespace, and the thread ends right after binding.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {path}: {e}"))
        })
        .join()
        .expect("the thread binding in the namespace panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its TAP devices too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// What a [`TcpServer`] saw on one connection.
#[derive(Clone, Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// What the client sent (for HTTP: the request head).
    pub received: Vec<u8>,
}

/// A TCP server thread: accepts until stopped (on drop) or until its deadline, handing each
/// connection to a handler, and records what each client sent.
pub struct TcpServer {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Connection>>>,
    thread: Option<JoinHandle<()>>,
}

/// How long one client may take to send its request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

impl TcpServer {
    /// Serves `listener` until dropped or `lifetime` has passed. `handle` reads what it needs
    /// from the client, answers, and returns what it read.
    pub fn spawn(
        listener: TcpListener,
        lifetime: Duration,
        handle: impl Fn(&mut TcpStream) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let thread = {
            let stop = stop.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + lifetime;
                while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((mut stream, peer)) => {
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                            let received = handle(&mut stream);
                            seen.lock().unwrap().push(Connection { peer, received });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            })
        };
        Self {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// The connections served so far.
    pub fn connections(&self) -> Vec<Connection> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads until `end` has been received, the client stops sending, or `limit` bytes.
pub fn read_until(stream: &mut TcpStream, end: &[u8], limit: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < limit && !got.windows(end.len()).any(|w| w == end) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got
}

/// A handler for [`TcpServer::spawn`]: a minimal HTTP/1.0 server answering every request with
/// `body`, returning the request head.
pub fn http_responder(body: Arc<Vec<u8>>) -> impl Fn(&mut TcpStream) -> Vec<u8> + Send + 'static {
    move |stream| {
        let head = read_until(stream, b"\r\n\r\n", 64 * 1024);
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(reply.as_bytes());
        let _ = stream.write_all(&body);
        let _ = stream.flush();
        head
    }
}

/// A handler for [`TcpServer::spawn`]: reads one line (or until the client closes) and closes.
pub fn line_sink() -> impl Fn(&mut TcpStream) -> Vec<u8> + Send + 'static {
    |stream| read_until(stream, b"\n", 64 * 1024)
}
