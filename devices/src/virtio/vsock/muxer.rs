//! The host side of the device: Unix sockets in Firecracker's convention, multiplexed over the
//! guest's connections.
//!
//! - Host-initiated: a process connects to the listening socket and writes `CONNECT <port>\n`.
//!   The guest gets a REQUEST from an ephemeral host port (from 2^30 up) to `port`; on its
//!   RESPONSE the process reads `OK <host port>\n`, then the stream carries the connection. A
//!   RST (no listener in the guest), or no answer within [`REQUEST_TIMEOUT`], closes the stream.
//! - Guest-initiated: a REQUEST to host port P connects to the Unix socket `<path>_P`; a
//!   RESPONSE goes back, or a RST when nobody listens there.
//!
//! Every stream is non-blocking and watched in the muxer's own epoll set, whose fd the device
//! registers with the VMM's event loop. That keeps stream registration out of the event
//! manager (streams come and go on packet handling and device reset, where no `EventOps` is at
//! hand), and epoll tokens are never reused, so an event for a stream closed earlier in the same
//! batch is recognized as stale.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Key, State};
use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM,
};
use super::VsockError;

/// Most connections at once, host handshakes included.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a host-initiated REQUEST waits for the guest's RESPONSE.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing connection waits for the other side before it is reset.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// First ephemeral host port for host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// RST answers to guest packets that match no connection, held until the guest gives RX
/// buffers; at this many the device stops taking TX packets.
const MAX_PENDING_RSTS: usize = 256;
/// Events handled per call; the rest come back through the level-triggered epoll fd.
const EVENT_BATCH: usize = 64;
/// Connections accepted per listener event.
const ACCEPT_BATCH: usize = 64;
/// Pause after the listener fails (out of file descriptors) before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 2;

/// A host stream that connected to the listening socket and has not finished its
/// `CONNECT <port>\n` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: [u8; MAX_CONNECT_LINE],
    len: usize,
}

/// The host end of all connections.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Device and inode of the socket file we bound, to remove it on drop only if it is ours.
    uds_ino: Option<(u64, u64)>,
    listener: UnixListener,
    listener_resume: Option<Instant>,
    epoll: Epoll,
    timer: TimerFd,
    timer_dirty: bool,
    conns: HashMap<Key, Connection>,
    /// Epoll token of each connection.
    ids: HashMap<u64, Key>,
    handshakes: HashMap<u64, Handshake>,
    next_id: u64,
    last_local_port: u32,
    /// RST answers that belong to no connection.
    rsts: VecDeque<Header>,
    /// Connections with something for the guest, in turn.
    rx_ready: VecDeque<Key>,
    /// The guest has no RX buffer for what is waiting: stop reading host streams.
    rx_starved: bool,
    pub(super) max_connections: usize,
    pub(super) request_timeout: Duration,
    pub(super) shutdown_timeout: Duration,
}

impl Muxer {
    /// Binds the listening socket at `uds_path` (a stale socket file there is removed first).
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        match std::fs::symlink_metadata(&uds_path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(&uds_path).map_err(|source| VsockError::RemoveStale {
                    path: uds_path.clone(),
                    source,
                })?;
            }
            _ => {}
        }
        let bind_err = |source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        };
        let listener = UnixListener::bind(&uds_path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let uds_ino = std::fs::symlink_metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));

        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Self {
            guest_cid,
            uds_path,
            uds_ino,
            listener,
            listener_resume: None,
            epoll,
            timer,
            timer_dirty: false,
            conns: HashMap::new(),
            ids: HashMap::new(),
            handshakes: HashMap::new(),
            next_id: FIRST_STREAM_TOKEN,
            last_local_port: FIRST_LOCAL_PORT - 1,
            rsts: VecDeque::new(),
            rx_ready: VecDeque::new(),
            rx_starved: false,
            max_connections: MAX_CONNECTIONS,
            request_timeout: REQUEST_TIMEOUT,
            shutdown_timeout: SHUTDOWN_TIMEOUT,
        })
    }

    /// Path of the listening socket.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The epoll fd to watch for readability: some host stream, the listener or the timer has
    /// something.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Open connections (any state) and host handshakes.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    #[cfg(test)]
    pub(super) fn connection(&self, local: u32, peer: u32) -> Option<&Connection> {
        self.conns.get(&Key { local, peer })
    }

    /// True when RST answers pile up: the device stops taking TX packets until the guest
    /// gives RX buffers.
    pub fn rx_full(&self) -> bool {
        self.rsts.len() >= MAX_PENDING_RSTS
    }

    /// True when something waits for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.rsts.is_empty() || !self.rx_ready.is_empty()
    }

    /// Whether the guest ran out of RX buffers with packets waiting. While it has, host streams
    /// are not watched for reading.
    pub fn set_rx_starved(&mut self, starved: bool) {
        if self.rx_starved == starved {
            return;
        }
        self.rx_starved = starved;
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.touch(key);
        }
    }

    /// Drops every connection (device reset): their host streams are closed, the guest is told
    /// nothing. Host handshakes and the listener stay.
    pub fn reset(&mut self) {
        for (_, mut conn) in self.conns.drain() {
            conn.close(&self.epoll);
        }
        self.ids.clear();
        self.rsts.clear();
        self.rx_ready.clear();
        self.rx_starved = false;
        self.timer_dirty = true;
    }

    /// Handles what the host streams, the listener and the timer report (without waiting).
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("vsock: epoll_wait failed: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let set = ev.event_set();
            match ev.data() {
                LISTENER_TOKEN => self.accept(),
                TIMER_TOKEN => self.timer_expired(),
                id => {
                    if let Some(&key) = self.ids.get(&id) {
                        self.stream_event(key, set);
                    } else if self.handshakes.contains_key(&id) {
                        self.handshake_event(id);
                    }
                    // Otherwise: a stream closed earlier in this batch.
                }
            }
        }
    }

    /// Re-arms the timer if deadlines changed. Call after each round of work.
    pub fn sync(&mut self) {
        if !mem::take(&mut self.timer_dirty) {
            return;
        }
        let next = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.listener_resume)
            .min();
        let r = match next {
            Some(t) => {
                let wait = t.saturating_duration_since(Instant::now());
                // A zero duration would disarm the timer.
                self.timer.reset(wait.max(Duration::from_millis(1)), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            warn!("vsock: cannot arm the timer: {e}");
        }
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: pause rather than spin on a listener
                    // that stays readable.
                    warn!("vsock: accept on {} failed: {e}", self.uds_path.display());
                    self.pause_listener(ACCEPT_RETRY);
                    return;
                }
            };
            if self.connection_count() >= self.max_connections {
                info!("vsock: too many connections, host connection refused");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                debug!("vsock: cannot make a host stream non-blocking: {e}");
                continue;
            }
            let id = self.new_id();
            let ev = EpollEvent::new(EventSet::IN, id);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
            {
                warn!("vsock: cannot watch a host stream: {e}");
                continue;
            }
            self.handshakes.insert(
                id,
                Handshake {
                    stream,
                    line: [0; MAX_CONNECT_LINE],
                    len: 0,
                },
            );
        }
    }

    /// Stops taking host connections for at most `limit`: they wait in the listening socket's
    /// backlog, their `CONNECT` line unread, until the limit passes or
    /// [`Muxer::resume_listener`] is called.
    pub fn pause_listener(&mut self, limit: Duration) {
        let fd = self.listener.as_raw_fd();
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        self.listener_resume = Some(Instant::now() + limit);
        self.timer_dirty = true;
    }

    /// Takes host connections again at once, if paused.
    pub fn resume_listener(&mut self) {
        if self.listener_resume.take().is_none() {
            return;
        }
        self.timer_dirty = true;
        let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
        {
            warn!("vsock: cannot watch the listener again: {e}");
            self.listener_resume = Some(Instant::now() + ACCEPT_RETRY);
        }
    }

    fn timer_expired(&mut self) {
        let _ = self.timer.wait();
        self.timer_dirty = true;
        let now = Instant::now();
        if self.listener_resume.is_some_and(|t| t <= now) {
            self.resume_listener();
        }
        let expired: Vec<Key> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|t| t <= now))
            .map(|c| c.key)
            .collect();
        for key in expired {
            debug!("vsock: connection {key:?} timed out");
            self.kill(key);
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so that data the host sends right
    /// after it stays in the stream for the connection.
    fn handshake_event(&mut self, id: u64) {
        let Some(hs) = self.handshakes.get_mut(&id) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match hs.stream.read(&mut byte) {
                Ok(0) => break Err("closed"),
                Ok(_) if byte[0] == b'\n' => break parse_connect(&hs.line[..hs.len]),
                Ok(_) if hs.len == MAX_CONNECT_LINE => break Err("line too long"),
                Ok(_) => {
                    hs.line[hs.len] = byte[0];
                    hs.len += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("vsock: read from host stream failed: {e}");
                    break Err("read failed");
                }
            }
        };
        let Some(hs) = self.handshakes.remove(&id) else {
            return;
        };
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                debug!("vsock: host connection dropped before connecting: {why}");
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    hs.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                return;
            }
        };
        let Some(key) = self.alloc_local_port(port) else {
            warn!("vsock: no free host port for a connection to guest port {port}");
            return;
        };
        let deadline = Instant::now() + self.request_timeout;
        let conn = Connection::local(id, hs.stream, key, EventSet::IN, deadline);
        self.insert(conn);
    }

    fn alloc_local_port(&mut self, peer: u32) -> Option<Key> {
        for _ in 0..=self.max_connections {
            self.last_local_port = match self.last_local_port {
                u32::MAX => FIRST_LOCAL_PORT,
                p => p + 1,
            };
            let key = Key {
                local: self.last_local_port,
                peer,
            };
            if !self.conns.contains_key(&key) {
                return Some(key);
            }
        }
        None
    }

    fn insert(&mut self, conn: Connection) {
        let key = conn.key;
        self.ids.insert(conn.id, key);
        self.conns.insert(key, conn);
        self.touch(key);
    }

    /// Forgets a connection, closing its host stream.
    fn remove(&mut self, key: Key) {
        if let Some(mut conn) = self.conns.remove(&key) {
            conn.close(&self.epoll);
            self.ids.remove(&conn.id);
            if conn.queued {
                self.rx_ready.retain(|k| *k != key);
            }
            if conn.deadline.is_some() {
                self.timer_dirty = true;
            }
        }
    }

    /// Closes the host stream and has a RST sent to the guest (unless the guest never heard of
    /// the connection).
    fn kill(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state
            == (State::LocalInit {
                request_sent: false,
            })
        {
            self.remove(key);
            return;
        }
        conn.kill(&self.epoll);
        self.touch(key);
    }

    /// Brings a connection's epoll registration, RX turn and deadline up to date after a change.
    fn touch(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            conn.kill(&self.epoll);
        }
        if conn.closing() && conn.deadline.is_none() {
            conn.set_deadline(Some(Instant::now() + self.shutdown_timeout));
        }
        let want = conn.interest(self.rx_starved);
        if let Err(e) = conn.set_interest(&self.epoll, want) {
            warn!("vsock: cannot watch a host stream: {e}");
            conn.kill(&self.epoll);
        }
        if mem::take(&mut conn.deadline_changed) {
            self.timer_dirty = true;
        }
        if !conn.queued && conn.has_rx_work() {
            conn.queued = true;
            self.rx_ready.push_back(key);
        }
    }

    fn stream_event(&mut self, key: Key, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let trouble = EventSet::ERROR | EventSet::HANG_UP;
        if set.contains(EventSet::HANG_UP) {
            conn.hup = true;
        }
        if set.intersects(EventSet::OUT | trouble) && conn.pending_len() > 0 {
            if let Err(why) = conn.flush() {
                debug!("vsock: connection {key:?} reset: {why}");
                self.kill(key);
                return;
            }
        }
        if set.intersects(EventSet::IN | trouble) && conn.interest(false).contains(EventSet::IN) {
            conn.readable = true;
        }
        self.touch(key);
    }

    /// The next packet for the guest, its payload read into `buf` (the room in the guest's
    /// buffer). RSTs first, then each connection in turn.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<(Header, usize)> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some((rst, 0));
        }
        for _ in 0..self.rx_ready.len() {
            let key = self.rx_ready.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            if conn.state == State::Killed {
                let rst = conn.rst(self.guest_cid);
                self.remove(key);
                return Some((rst, 0));
            }
            match conn.next_packet(self.guest_cid, buf) {
                Ok(Some(pkt)) => {
                    self.touch(key);
                    return Some(pkt);
                }
                Ok(None) => self.touch(key),
                Err(why) => {
                    debug!("vsock: connection {key:?} reset: {why}");
                    self.kill(key);
                }
            }
        }
        None
    }

    /// Queues a RST answering `hdr` (never for a RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        if self.rsts.len() >= MAX_PENDING_RSTS {
            debug!("vsock: too many RSTs waiting, one dropped");
            return;
        }
        self.rsts.push_back(Header {
            src_cid: hdr.dst_cid,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    /// Resets whatever `hdr` belongs to: its connection, or just the sender.
    pub fn reject(&mut self, hdr: &Header) {
        if hdr.src_cid != self.guest_cid || hdr.op == OP_RST {
            return;
        }
        let key = Key::of(hdr);
        if hdr.dst_cid == HOST_CID && self.conns.contains_key(&key) {
            self.kill(key);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// A packet from the guest, with its payload.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            debug!(
                "vsock: packet from CID {} (the guest is {}) dropped",
                hdr.src_cid, self.guest_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID {
            debug!("vsock: packet for unknown CID {} refused", hdr.dst_cid);
            self.reply_rst(hdr);
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            debug!("vsock: packet of socket type {} refused", hdr.type_);
            self.reject(hdr);
            return;
        }
        let key = Key::of(hdr);
        match hdr.op {
            OP_REQUEST => self.guest_request(hdr),
            OP_RST => self.remove(key),
            op => {
                let Some(conn) = self.conns.get_mut(&key) else {
                    debug!("vsock: op {op} for unknown connection {key:?} refused");
                    self.reply_rst(hdr);
                    return;
                };
                if conn.state == State::Killed {
                    // Its RST is on the way.
                    return;
                }
                conn.update_peer_credit(hdr);
                let r = match op {
                    OP_RESPONSE => conn.recv_response(),
                    OP_RW => conn.recv_rw(payload),
                    OP_SHUTDOWN => conn.recv_shutdown(hdr.flags),
                    OP_CREDIT_UPDATE => conn.recv_credit_update(),
                    OP_CREDIT_REQUEST => conn.recv_credit_request(),
                    _ => Err("unknown operation"),
                };
                match r {
                    Ok(()) => self.touch(key),
                    Err(why) => {
                        debug!("vsock: connection {key:?} reset: {why}");
                        self.kill(key);
                    }
                }
            }
        }
    }

    /// The guest connects to host port `dst_port`: to the Unix socket `<path>_<dst_port>`.
    fn guest_request(&mut self, hdr: &Header) {
        debug_assert_eq!(hdr.op, OP_REQUEST);
        let key = Key::of(hdr);
        if let Some(conn) = self.conns.get(&key) {
            if conn.state == State::Killed {
                // The guest is done with it and reuses its port.
                self.remove(key);
            } else {
                debug!("vsock: REQUEST for the open connection {key:?}: reset");
                self.kill(key);
                return;
            }
        }
        if self.connection_count() >= self.max_connections {
            info!("vsock: too many connections, guest connection refused");
            self.reply_rst(hdr);
            return;
        }
        let path = port_path(&self.uds_path, hdr.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.reply_rst(hdr);
                return;
            }
        };
        let id = self.new_id();
        self.insert(Connection::peer(id, stream, hdr));
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Remove the socket file, unless something else was bound there since.
        let ours = std::fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.uds_ino {
            let _ = std::fs::remove_file(&self.uds_path);
        }
    }
}

/// `CONNECT <port>` (any case, surrounding blanks allowed).
fn parse_connect(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "not UTF-8")?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(cmd), Some(port), None) if cmd.eq_ignore_ascii_case("connect") => {
            port.parse().map_err(|_| "bad port")
        }
        _ => Err("not a CONNECT line"),
    }
}

/// `<path>_<port>`: where guest connections to host port `port` go.
pub fn port_path(path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd, no memory passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects a non-blocking stream to the Unix socket at `path`. Never waits: a listener whose
/// backlog is full refuses at once (`EAGAIN`), as one that is not there does.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes, read during the call.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect(b"connect 4294967295\r"), Ok(u32::MAX));
        assert_eq!(parse_connect(b"  Connect   7 "), Ok(7));
        assert!(parse_connect(b"CONNECT").is_err());
        assert!(parse_connect(b"CONNECT 4294967296").is_err());
        assert!(parse_connect(b"CONNECT -1").is_err());
        assert!(parse_connect(b"CONNECT 1 2").is_err());
        assert!(parse_connect(b"LISTEN 1").is_err());
        assert!(parse_connect(b"CONNECT \xff").is_err());
    }

    #[test]
    fn port_paths() {
        assert_eq!(
            port_path(Path::new("/run/v.sock"), 52),
            PathBuf::from("/run/v.sock_52")
        );
    }

    #[test]
    fn connect_refuses_without_blocking() {
        let long = PathBuf::from(format!("/tmp/{}", "x".repeat(200)));
        assert_eq!(
            connect_nonblocking(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let missing = Path::new("/nonexistent-loft-dir/sock");
        assert!(connect_nonblocking(missing).is_err());
    }
}
