//! One stream connection between a guest port and a host Unix stream: its state, the credit
//! accounting both ways, and the guest's bytes waiting for the host to read them.
//!
//! Credit, as the spec defines it: each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it has consumed) in every packet; a sender keeps
//! `tx_cnt - peer_fwd_cnt <= peer_buf_alloc`.
//!
//! - Host to guest: `rx_cnt` counts the payload bytes sent to the guest; a read from the host
//!   stream is never larger than the guest's free credit.
//! - Guest to host: payload is written to the host stream at once; what the stream does not take
//!   waits in `pending`, which never holds more than [`BUF_ALLOC`] bytes. `fwd_cnt` counts the
//!   bytes written to the stream, so `recv_cnt - fwd_cnt == pending.len()`, and advertising
//!   [`BUF_ALLOC`] is honest: a guest that respects it never overflows `pending`. One that does
//!   not is reset.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use log::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer advertised to the guest for each connection: the most guest data held for a
/// host stream that does not read.
pub const BUF_ALLOC: u32 = 64 * 1024;
/// The guest is sent a CREDIT_UPDATE when the credit it knows of drops below this and at least
/// this much more has been freed since it was last told.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Ports of a connection, which identify it: `local` on the host (CID 2), `peer` in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub local: u32,
    pub peer: u32,
}

impl Key {
    /// The connection a guest packet belongs to.
    pub fn of(hdr: &Header) -> Self {
        Self {
            local: hdr.dst_port,
            peer: hdr.src_port,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host process asked for a guest port: REQUEST sent to the guest (or about to be),
    /// waiting for its RESPONSE.
    LocalInit {
        /// The REQUEST went out.
        request_sent: bool,
    },
    /// The guest asked and the host socket accepted: RESPONSE about to go out.
    PeerInit,
    /// Data flows.
    Established,
    /// Over: the host stream is closed and a RST is to be sent, after which it is forgotten.
    Killed,
}

/// A protocol or I/O failure that ends the connection with a RST.
pub type Fatal = &'static str;

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// Token of the stream in the muxer's epoll set; never reused.
    pub id: u64,
    pub key: Key,
    pub state: State,
    /// Closed (None) once killed.
    stream: Option<UnixStream>,
    /// Events the stream is registered for (empty: not in the epoll set).
    registered: EventSet,
    /// In the muxer's list of connections with something for the guest.
    pub queued: bool,
    /// When to give up waiting (for a RESPONSE, or for the guest to finish a shutdown).
    pub deadline: Option<Instant>,
    /// `deadline` changed since the muxer last looked.
    pub deadline_changed: bool,

    // Guest to host.
    pending: VecDeque<u8>,
    recv_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    need_credit_update: bool,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    /// The host stream's write side was shut down (the guest will send nothing more).
    write_shut: bool,

    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    rx_cnt: u32,
    /// The stream reported readable and has not returned `WouldBlock` since.
    pub readable: bool,
    /// The stream reported a hang-up: the host closed it both ways.
    pub hup: bool,
    /// The host stream returned end-of-file.
    local_eof: bool,
    /// SHUTDOWN flags to send to the guest.
    shutdown_to_send: u32,
    /// A CREDIT_REQUEST went out since the guest last gave credit.
    credit_requested: bool,
}

impl Connection {
    fn new(id: u64, stream: UnixStream, key: Key, state: State) -> Self {
        Self {
            id,
            key,
            state,
            stream: Some(stream),
            registered: EventSet::empty(),
            queued: false,
            deadline: None,
            deadline_changed: false,
            pending: VecDeque::new(),
            recv_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            need_credit_update: false,
            peer_shutdown: 0,
            write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: false,
            hup: false,
            local_eof: false,
            shutdown_to_send: 0,
            credit_requested: false,
        }
    }

    /// A host-initiated connection (the host sent `CONNECT <peer>`), registered for `registered`.
    pub fn local(
        id: u64,
        stream: UnixStream,
        key: Key,
        registered: EventSet,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(
            id,
            stream,
            key,
            State::LocalInit {
                request_sent: false,
            },
        );
        c.registered = registered;
        c.set_deadline(Some(deadline));
        c
    }

    /// A guest-initiated connection whose host socket is connected; `hdr` is the guest's
    /// REQUEST.
    pub fn peer(id: u64, stream: UnixStream, hdr: &Header) -> Self {
        let mut c = Self::new(id, stream, Key::of(hdr), State::PeerInit);
        c.update_peer_credit(hdr);
        c
    }

    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        if self.deadline != deadline {
            self.deadline = deadline;
            self.deadline_changed = true;
        }
    }

    /// Credit the guest has left for us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes of guest data waiting for the host stream.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Takes the guest's credit information from one of its packets.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    fn can_read(&self) -> bool {
        self.state == State::Established
            && self.stream.is_some()
            && !self.local_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// True when the guest should be sent something: a control packet, or data that is
    /// waiting and that it has credit for.
    pub fn has_rx_work(&self) -> bool {
        match self.state {
            State::Killed | State::PeerInit => true,
            State::LocalInit { request_sent } => !request_sent,
            State::Established => {
                self.shutdown_to_send != 0
                    || self.need_credit_update
                    || (self.can_read()
                        && self.readable
                        && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    /// The events to watch on the stream: readable while the guest can take data and it is not
    /// known to be readable yet; writable while guest data waits.
    pub fn interest(&self, rx_starved: bool) -> EventSet {
        let mut ev = EventSet::empty();
        if self.can_read() && !self.readable && self.peer_credit() > 0 && !rx_starved {
            ev |= EventSet::IN;
        }
        if self.stream.is_some() && !self.pending.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Registers the stream in `epoll` for `want` (removes it when `want` is empty: a stream
    /// that is in the set always reports hang-ups, which would wake the loop for nothing).
    pub fn set_interest(&mut self, epoll: &Epoll, want: EventSet) -> io::Result<()> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        if want == self.registered {
            return Ok(());
        }
        let fd = stream.as_raw_fd();
        let event = EpollEvent::new(want, self.id);
        let op = if self.registered.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        let r = epoll.ctl(op, fd, event);
        // A failed delete leaves nothing to undo: the fd is closed soon or re-added later.
        if r.is_ok() || want.is_empty() {
            self.registered = want;
        }
        r
    }

    /// Closes the host stream (out of the epoll set first) and marks the connection for a RST.
    pub fn kill(&mut self, epoll: &Epoll) {
        let _ = self.set_interest(epoll, EventSet::empty());
        self.stream = None;
        self.pending = VecDeque::new();
        self.state = State::Killed;
        self.set_deadline(None);
    }

    /// Closes the host stream for good (the connection is being forgotten).
    pub fn close(&mut self, epoll: &Epoll) {
        let _ = self.set_interest(epoll, EventSet::empty());
        self.stream = None;
    }

    /// True when both directions are finished and everything reached the host: the guest
    /// shut down both ways, or the host sent end-of-file and the guest will send nothing more.
    pub fn finished(&self) -> bool {
        self.state == State::Established
            && self.pending.is_empty()
            && (self.peer_shutdown == SHUTDOWN_BOTH
                || (self.local_eof && self.peer_shutdown & SHUTDOWN_SEND != 0))
    }

    fn header(&mut self, guest_cid: u64, op: u16, len: usize, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.need_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local,
            dst_port: self.key.peer,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The RST that ends a killed connection.
    pub fn rst(&mut self, guest_cid: u64) -> Header {
        self.header(guest_cid, OP_RST, 0, 0)
    }

    /// The next packet for the guest, its payload read into `buf` (whose length is the room in
    /// the guest's buffer): `Ok(None)` when there is nothing to send now.
    pub fn next_packet(
        &mut self,
        guest_cid: u64,
        buf: &mut [u8],
    ) -> Result<Option<(Header, usize)>, Fatal> {
        match self.state {
            State::Killed => return Ok(Some((self.rst(guest_cid), 0))),
            State::LocalInit {
                request_sent: false,
            } => {
                self.state = State::LocalInit { request_sent: true };
                return Ok(Some((self.header(guest_cid, OP_REQUEST, 0, 0), 0)));
            }
            State::LocalInit { .. } => return Ok(None),
            State::PeerInit => {
                self.state = State::Established;
                return Ok(Some((self.header(guest_cid, OP_RESPONSE, 0, 0), 0)));
            }
            State::Established => {}
        }
        if self.shutdown_to_send != 0 {
            let flags = std::mem::take(&mut self.shutdown_to_send);
            return Ok(Some((self.header(guest_cid, OP_SHUTDOWN, 0, flags), 0)));
        }
        if self.need_credit_update {
            return Ok(Some((self.header(guest_cid, OP_CREDIT_UPDATE, 0, 0), 0)));
        }
        if !self.can_read() || !self.readable {
            return Ok(None);
        }
        let credit = self.peer_credit() as usize;
        if credit == 0 {
            if self.credit_requested {
                return Ok(None);
            }
            self.credit_requested = true;
            return Ok(Some((self.header(guest_cid, OP_CREDIT_REQUEST, 0, 0), 0)));
        }
        let max = buf.len().min(credit);
        if max == 0 {
            return Ok(None);
        }
        let Some(mut stream) = self.stream.as_ref() else {
            return Ok(None);
        };
        loop {
            match stream.read(&mut buf[..max]) {
                Ok(0) => {
                    // End of file: the host will send nothing more. When it closed the stream
                    // both ways, the guest is told it will not be read either, and gets a while
                    // to finish before the connection is reset.
                    // (Once our write side is shut, a hang-up says nothing of the host's.)
                    self.local_eof = true;
                    self.hup = !self.write_shut && (self.hup || hung_up(stream));
                    let mut flags = SHUTDOWN_SEND;
                    if self.hup {
                        flags |= SHUTDOWN_RCV;
                    }
                    return Ok(Some((self.header(guest_cid, OP_SHUTDOWN, 0, flags), 0)));
                }
                Ok(n) => {
                    self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                    return Ok(Some((self.header(guest_cid, OP_RW, n, 0), n)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("vsock: read from host stream failed: {e}");
                    return Err("host stream read failed");
                }
            }
        }
    }

    /// True while the connection is winding down and waits for the guest (to reset it after the
    /// host closed its stream both ways) or for the host (to read what the guest sent before
    /// shutting down both ways): the muxer gives it a deadline.
    pub fn closing(&self) -> bool {
        self.state == State::Established
            && (self.peer_shutdown == SHUTDOWN_BOTH || (self.local_eof && self.hup))
    }

    /// The guest accepted our REQUEST: tell the host process which local port it got.
    pub fn recv_response(&mut self) -> Result<(), Fatal> {
        if self.state != (State::LocalInit { request_sent: true }) {
            return Err("unexpected RESPONSE");
        }
        let Some(stream) = self.stream.as_ref() else {
            return Err("no host stream");
        };
        let line = format!("OK {}\n", self.key.local);
        // The stream is fresh and nothing was written to it yet: the line fits its buffer.
        match send(stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(_) => return Err("short write of the OK line"),
            Err(e) => {
                debug!("vsock: cannot write the OK line: {e}");
                return Err("cannot write the OK line");
            }
        }
        self.state = State::Established;
        self.set_deadline(None);
        Ok(())
    }

    /// Stream data from the guest: to the host stream, what does not fit into `pending`.
    pub fn recv_rw(&mut self, payload: &[u8]) -> Result<(), Fatal> {
        if self.state != State::Established {
            return Err("data before the connection is established");
        }
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return Err("data after SHUTDOWN(SEND)");
        }
        if self.pending.len() + payload.len() > BUF_ALLOC as usize {
            return Err("credit overrun");
        }
        self.recv_cnt = self.recv_cnt.wrapping_add(payload.len() as u32);
        let mut rest = payload;
        if self.pending.is_empty() {
            let Some(stream) = &self.stream else {
                return Err("no host stream");
            };
            let n = write_some(stream, rest)?;
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            rest = &rest[n..];
        }
        self.pending.extend(rest);
        self.check_credit_update();
        Ok(())
    }

    /// Moves waiting guest data to the host stream (it reported writable).
    pub fn flush(&mut self) -> Result<(), Fatal> {
        let Some(stream) = &self.stream else {
            return Ok(());
        };
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let want = front.len();
            let n = write_some(stream, front)?;
            self.pending.drain(..n);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            if n < want {
                break;
            }
        }
        if self.pending.is_empty() {
            // Give the memory back: most connections rarely need the buffer.
            self.pending = VecDeque::new();
        }
        self.after_flush();
        self.check_credit_update();
        Ok(())
    }

    /// Once guest data is all out and the guest will send no more, the host sees end-of-file.
    fn after_flush(&mut self) {
        if self.pending.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            if let Some(stream) = &self.stream {
                if let Err(e) = stream.shutdown(Shutdown::Write) {
                    debug!("vsock: cannot shut down the host stream's write side: {e}");
                }
            }
        }
    }

    /// Tells the guest about freed buffer space once it is running short.
    fn check_credit_update(&mut self) {
        let unannounced = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let known_free =
            BUF_ALLOC.saturating_sub(self.recv_cnt.wrapping_sub(self.last_fwd_cnt_sent));
        if known_free < CREDIT_UPDATE_THRESHOLD && unannounced >= CREDIT_UPDATE_THRESHOLD {
            self.need_credit_update = true;
        }
    }

    /// The guest will send and/or receive no more.
    pub fn recv_shutdown(&mut self, flags: u32) -> Result<(), Fatal> {
        if self.state != State::Established {
            return Err("SHUTDOWN before the connection is established");
        }
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        self.after_flush();
        Ok(())
    }

    /// CREDIT_UPDATE (the credit itself was taken already).
    pub fn recv_credit_update(&mut self) -> Result<(), Fatal> {
        if self.state != State::Established {
            return Err("CREDIT_UPDATE before the connection is established");
        }
        Ok(())
    }

    /// CREDIT_REQUEST: answer with a CREDIT_UPDATE.
    pub fn recv_credit_request(&mut self) -> Result<(), Fatal> {
        if self.state != State::Established {
            return Err("CREDIT_REQUEST before the connection is established");
        }
        self.need_credit_update = true;
        Ok(())
    }
}

/// Writes to `stream` as much of `data` as it takes without blocking.
fn write_some(stream: &UnixStream, data: &[u8]) -> Result<usize, Fatal> {
    let mut done = 0;
    while done < data.len() {
        match send(stream, &data[done..]) {
            Ok(0) => return Err("host stream write returned 0"),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("vsock: write to host stream failed: {e}");
                return Err("host stream write failed");
            }
        }
    }
    Ok(done)
}

/// True when the stream is shut down both ways (the host process closed it, rather than only
/// shutting down its write side).
fn hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

/// `write` without SIGPIPE: a host process that went away must not kill the VMM (the Rust
/// runtime ignores SIGPIPE in a binary, but a program embedding loft may not).
fn send(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of `data.len()` bytes during the call.
    let r = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}
