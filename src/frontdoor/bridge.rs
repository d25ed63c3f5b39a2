//! One client connection: TLS handshake with a deadline, then a byte bridge
//! to tiny_http's private loopback socket, with request framing checked on
//! the way in.
//!
//! Both sockets are non-blocking and driven from one thread with poll(2),
//! so a connection costs one thread and never more, and a stalled client
//! is dropped when its deadline passes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection};

use super::framing::Framer;
use super::peers::{Peer, PeerTable};
use crate::error::ApiError;
use crate::logging::remote_line;

/// Bytes buffered in either direction before we stop reading more from the
/// sender: enough for a request or a status reply, small per connection.
const BUFFER_LIMIT: usize = 64 * 1024;

/// How long a refused request's remaining bytes are read and dropped
/// after the answer, and how many at most, before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 16 << 20;

/// How the log names a request whose bytes come in too slowly.
const SLOW_REQUEST: &str = "request that arrives too slowly";

/// Handshake deadline for a connection accepted past the cap only to be
/// told so: short, since all it gets is the refusal.
const REFUSAL_HANDSHAKE: Duration = Duration::from_secs(3);

/// Deadlines for one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Time allowed from accept to a completed TLS handshake.
    pub handshake: Duration,
    /// Time a connection may pass with no byte in either direction.
    pub idle: Duration,
    /// Time a request may take to arrive whole from its first byte (never
    /// more than `idle`). Short, because a client that trickles a request
    /// holds a connection slot before it has proved who it is.
    pub request: Duration,
}

/// Everything a connection thread needs to serve one client.
pub struct Bridge {
    pub client: TcpStream,
    pub remote: SocketAddr,
    pub tls: Option<Arc<ServerConfig>>,
    pub backend: SocketAddr,
    pub peers: Arc<PeerTable>,
    pub limits: Limits,
    /// Answer this instead of serving: the connection came past the cap.
    /// Over TLS the handshake is completed first, so that the client reads
    /// a 503 it understands instead of a bare close.
    pub refuse: Option<ApiError>,
    /// What the connection holds under the front door's caps: given back
    /// before the client's socket is closed, so that a client that
    /// reconnects at once finds its slot free.
    pub held: Option<Box<dyn Send>>,
}

struct State {
    client: TcpStream,
    /// The client's address, for log lines.
    remote: SocketAddr,
    tls: Option<ServerConnection>,
    backend: Option<TcpStream>,
    bridge_addr: Option<SocketAddr>,
    framer: Framer,
    /// Plaintext waiting to be written to tiny_http.
    to_backend: Vec<u8>,
    /// Bytes waiting to be written to the client (plain HTTP only; with TLS
    /// they go straight into rustls' buffer).
    to_client: Vec<u8>,
    client_eof: bool,
    /// The client's end of input was passed on to tiny_http.
    backend_write_shut: bool,
    backend_eof: bool,
    /// A framing error was answered: flush the answer, then close.
    closing: bool,
    /// After the answer went out: until when the rest of the client's
    /// request is read and thrown away before the socket is closed.
    linger_until: Option<Instant>,
    /// Client bytes thrown away while closing.
    discarded: usize,
    /// The answer to give once the handshake is done, instead of serving.
    refuse: Option<ApiError>,
    /// When tiny_http last sent bytes of a reply.
    last_reply_bytes: Option<Instant>,
}

impl Bridge {
    /// Serves the connection until either side closes, a deadline passes or
    /// the client breaks the rules. Never panics on client input.
    pub fn run(self) {
        let Bridge { client, remote, tls, backend, peers, mut limits, refuse, held } = self;
        if refuse.is_some() {
            limits.handshake = limits.handshake.min(REFUSAL_HANDSHAKE);
            limits.idle = limits.idle.min(REFUSAL_HANDSHAKE);
        }
        if client.set_nonblocking(true).is_err() {
            return;
        }
        let _ = client.set_nodelay(true);
        let tls = match tls.map(ServerConnection::new).transpose() {
            Ok(tls) => tls,
            Err(e) => {
                log::warn!("cannot start TLS for {remote}: {e}");
                return;
            }
        };
        let mut st = State {
            client,
            remote,
            tls,
            backend: None,
            bridge_addr: None,
            framer: Framer::default(),
            to_backend: Vec::new(),
            to_client: Vec::new(),
            client_eof: false,
            backend_write_shut: false,
            backend_eof: false,
            closing: false,
            linger_until: None,
            discarded: 0,
            refuse,
            last_reply_bytes: None,
        };
        if let Some(tls) = st.tls.as_mut() {
            // Backpressure is applied by polling, not by rustls' limit.
            tls.set_buffer_limit(None);
        } else if st.refuse.is_some() {
            st.send_refusal();
        } else if let Err(e) = st.connect_backend(backend, &peers, Peer { remote, subject: None }) {
            log::error!("cannot reach the HTTP workers at {backend}: {e}");
            return;
        }
        let started = Instant::now();
        let mut last_activity = started;
        let mut request_started: Option<Instant> = None;
        // Set once a slow request has been answered 408: until when the
        // answer may take to go out before the connection is cut anyway.
        let mut answered_by: Option<Instant> = None;
        // A pipelining client may start its next request while the reply
        // to the one before is still to come (a long `?wait=`); a 408 then
        // would come first and read as the answer to that one. So the next
        // request's clock runs only once a reply has begun since the last
        // request was passed on whole, and it restarts while reply bytes
        // flow. Known limitation: only the last request passed on is
        // tracked; with several unanswered ones, the first reply starts
        // the clock.
        let mut passed_on = 0;
        let mut awaiting_since: Option<Instant> = None;
        loop {
            let handshaking = st.tls.as_ref().is_some_and(|t| t.is_handshaking());
            if st.framer.completed() > passed_on {
                passed_on = st.framer.completed();
                awaiting_since = Some(Instant::now());
            }
            if awaiting_since.is_some_and(|t| st.last_reply_bytes.is_some_and(|r| r >= t)) {
                awaiting_since = None;
            }
            match (st.framer.mid_request(), request_started) {
                (true, None) => request_started = Some(Instant::now()),
                (false, Some(_)) => request_started = None,
                _ => {}
            }
            if let Some(t) = request_started.as_mut() {
                if awaiting_since.is_some() {
                    *t = Instant::now();
                } else if let Some(r) = st.last_reply_bytes {
                    *t = (*t).max(r);
                }
            }
            // Known limitation: these deadlines cover what the client sends.
            // A client that reads its reply a byte at a time keeps the
            // connection for as long as bytes move.
            let (deadline, what) = if let Some(t) = answered_by {
                (t, "request answered 408")
            } else if handshaking {
                (started + limits.handshake, "TLS handshake")
            } else {
                match request_started {
                    Some(t)
                        if t + limits.request.min(limits.idle) < last_activity + limits.idle =>
                    {
                        (t + limits.request.min(limits.idle), SLOW_REQUEST)
                    }
                    _ => (last_activity + limits.idle, "idle connection"),
                }
            };
            let now = Instant::now();
            if now >= deadline && what == SLOW_REQUEST && !st.closing {
                // Tell the client why, then close as after any refusal
                // (reading and dropping what it still sends, for a while).
                if let Some(note) = remote_line() {
                    log::info!(
                        "closing {what} from {remote}: its deadline passed; answered 408{note}"
                    );
                }
                st.answer_and_close(&ApiError::request_timeout(limits.request.min(limits.idle)));
                answered_by = Some(now + 2 * LINGER);
                continue;
            }
            if now >= deadline {
                // An idle keep-alive connection closing is routine; a
                // stalled handshake or request is worth an audit line.
                if what == "idle connection" {
                    log::debug!("closing {what} from {remote}: its deadline passed");
                } else if let Some(note) = remote_line() {
                    log::info!("closing {what} from {remote}: its deadline passed{note}");
                }
                break;
            }
            match st.step(deadline - now, remote, backend, &peers) {
                Ok(true) => last_activity = Instant::now(),
                Ok(false) => {}
                Err(Done) => break,
            }
        }
        if let Some(addr) = st.bridge_addr {
            peers.remove(&addr);
        }
        if let Some(b) = &st.backend {
            let _ = b.shutdown(Shutdown::Both);
        }
        drop(held);
        let _ = st.client.shutdown(Shutdown::Both);
    }
}

/// The connection is over (closed, broken or refused).
struct Done;

impl State {
    fn connect_backend(
        &mut self,
        backend: SocketAddr,
        peers: &PeerTable,
        peer: Peer,
    ) -> io::Result<()> {
        let stream = TcpStream::connect(backend)?;
        stream.set_nonblocking(true)?;
        let _ = stream.set_nodelay(true);
        let addr = stream.local_addr()?;
        // Registered before a single byte is forwarded, so the handler
        // always finds the peer of the request it serves.
        peers.insert(addr, peer);
        self.bridge_addr = Some(addr);
        self.backend = Some(stream);
        Ok(())
    }

    fn client_wants_write(&self) -> bool {
        match &self.tls {
            Some(tls) => tls.wants_write(),
            None => !self.to_client.is_empty(),
        }
    }

    /// One round of poll and I/O. Returns whether any byte moved.
    fn step(
        &mut self,
        timeout: Duration,
        remote: SocketAddr,
        backend_addr: SocketAddr,
        peers: &PeerTable,
    ) -> Result<bool, Done> {
        let read_client = !self.client_eof
            && self.to_backend.len() < BUFFER_LIMIT
            && self.tls.as_ref().is_none_or(|t| t.wants_read());
        let write_client = self.client_wants_write();
        let backend_open = self.backend.is_some() && !self.closing;
        let read_backend = backend_open && !self.backend_eof && !self.client_wants_write();
        let write_backend = backend_open && !self.to_backend.is_empty();

        if self.closing && !write_client {
            // Closing at once with unread request bytes would make the
            // kernel reset the connection, and a client still sending its
            // body would get the reset instead of our answer. So: stop
            // writing, read and drop what the client still sends, then
            // close (RFC 9112 section 9.6).
            let now = Instant::now();
            match self.linger_until {
                None => {
                    let _ = self.client.shutdown(Shutdown::Write);
                    self.linger_until = Some(now + LINGER);
                }
                Some(until) if now >= until || self.client_eof || self.discarded > LINGER_BYTES => {
                    return Err(Done);
                }
                Some(_) => {}
            }
        }
        if self.backend_eof && !write_client && self.to_client.is_empty() {
            if let Some(tls) = self.tls.as_mut() {
                tls.send_close_notify();
                let _ = tls.write_tls(&mut self.client);
            }
            return Err(Done);
        }
        if self.client_eof {
            // The client finished sending (or left). Pass that on once its
            // last request is forwarded, and relay the replies until
            // tiny_http closes; if the client is really gone, the next
            // write to it fails and ends the connection.
            match &self.backend {
                None => return Err(Done),
                Some(b) if self.to_backend.is_empty() && !self.backend_write_shut => {
                    let _ = b.shutdown(Shutdown::Write);
                    self.backend_write_shut = true;
                }
                Some(_) => {}
            }
        }

        let mut fds = [
            pollfd(&self.client, read_client, write_client),
            match &self.backend {
                Some(b) if backend_open => pollfd(b, read_backend, write_backend),
                _ => libc::pollfd { fd: -1, events: 0, revents: 0 },
            },
        ];
        let ms = timeout.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of two initialised pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(Done) };
        }
        if n == 0 {
            return Ok(false);
        }
        let ready = |fd: &libc::pollfd, ev| fd.revents & (ev | libc::POLLHUP | libc::POLLERR) != 0;
        let mut moved = false;

        if read_client && ready(&fds[0], libc::POLLIN) {
            moved |= self.read_client(remote, backend_addr, peers)?;
        }
        if read_backend && ready(&fds[1], libc::POLLIN) {
            moved |= self.read_backend()?;
        }
        if ready(&fds[1], libc::POLLOUT) && write_backend {
            moved |= self.write_backend()?;
        }
        // Always try to flush toward the client: a read above may have
        // queued handshake messages or a reply.
        moved |= self.write_client()?;
        Ok(moved)
    }

    fn read_client(
        &mut self,
        remote: SocketAddr,
        backend_addr: SocketAddr,
        peers: &PeerTable,
    ) -> Result<bool, Done> {
        let mut buf = [0u8; 16 * 1024];
        let Some(tls) = self.tls.as_mut() else {
            return match self.client.read(&mut buf) {
                Ok(0) => {
                    self.client_eof = true;
                    Ok(true)
                }
                Ok(n) => {
                    self.frame(&buf[..n]);
                    Ok(true)
                }
                Err(e) if would_block(&e) => Ok(false),
                Err(_) => Err(Done),
            };
        };
        let was_handshaking = tls.is_handshaking();
        match tls.read_tls(&mut self.client) {
            Ok(0) => {
                self.client_eof = true;
                return Ok(true);
            }
            Ok(_) => {}
            Err(e) if would_block(&e) => return Ok(false),
            Err(_) => return Err(Done),
        }
        if let Err(e) = tls.process_new_packets() {
            // Send the alert rustls queued (e.g. unknown CA), then close.
            if let Some(note) = remote_line() {
                log::info!("TLS handshake with {remote} failed: {e}{note}");
            }
            let _ = tls.write_tls(&mut self.client);
            return Err(Done);
        }
        if was_handshaking && !tls.is_handshaking() && self.refuse.is_some() {
            self.send_refusal();
            let _ = self.write_client();
            return Ok(true);
        }
        if was_handshaking && !tls.is_handshaking() {
            let subject =
                tls.peer_certificates().and_then(|certs| certs.first()).map(super::tls::subject_of);
            let peer = Peer { remote, subject };
            if let Err(e) = self.connect_backend(backend_addr, peers, peer) {
                log::error!("cannot reach the HTTP workers at {backend_addr}: {e}");
                return Err(Done);
            }
        }
        let tls = self.tls.as_mut().expect("tls present");
        let mut plain = Vec::new();
        loop {
            match tls.reader().read(&mut buf) {
                Ok(0) => {
                    self.client_eof = true;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if would_block(&e) => break,
                Err(_) => return Err(Done),
            }
        }
        if !plain.is_empty() {
            self.frame(&plain);
        }
        Ok(true)
    }

    /// Checks client bytes and queues what may go to tiny_http; a framing
    /// error is answered by the front door itself and ends the connection.
    fn frame(&mut self, bytes: &[u8]) {
        if self.closing {
            self.discarded += bytes.len();
            return;
        }
        if let Err(err) = self.framer.feed(bytes, &mut self.to_backend) {
            // Info, not warn, and within the budget: any client can
            // cause it at will.
            if let Some(note) = remote_line() {
                log::info!(
                    "front door refused a request from {}: {} {}: {}{note}",
                    self.remote,
                    err.status,
                    err.code,
                    err.details
                );
            }
            self.to_backend.clear();
            self.answer_and_close(&err);
        }
    }

    /// Queues the refusal this connection was accepted for and starts
    /// closing; no byte of the client's goes to tiny_http.
    fn send_refusal(&mut self) {
        let Some(err) = self.refuse.take() else { return };
        self.answer_and_close(&err);
    }

    /// Queues `err` as the connection's last reply and starts closing.
    fn answer_and_close(&mut self, err: &ApiError) {
        self.closing = true;
        let reply = reject_response(err);
        match self.tls.as_mut() {
            Some(tls) => {
                let _ = tls.writer().write_all(&reply);
                tls.send_close_notify();
            }
            None => self.to_client.extend_from_slice(&reply),
        }
    }

    fn read_backend(&mut self) -> Result<bool, Done> {
        let mut buf = [0u8; 64 * 1024];
        let backend = self.backend.as_mut().expect("backend connected");
        match backend.read(&mut buf) {
            Ok(0) => {
                self.backend_eof = true;
                Ok(true)
            }
            Ok(n) => {
                self.last_reply_bytes = Some(Instant::now());
                match self.tls.as_mut() {
                    Some(tls) => tls.writer().write_all(&buf[..n]).map_err(|_| Done)?,
                    None => self.to_client.extend_from_slice(&buf[..n]),
                }
                Ok(true)
            }
            Err(e) if would_block(&e) => Ok(false),
            Err(_) => {
                self.backend_eof = true;
                Ok(true)
            }
        }
    }

    fn write_backend(&mut self) -> Result<bool, Done> {
        let backend = self.backend.as_mut().expect("backend connected");
        match backend.write(&self.to_backend) {
            Ok(n) => {
                self.to_backend.drain(..n);
                Ok(n > 0)
            }
            Err(e) if would_block(&e) => Ok(false),
            Err(_) => Err(Done),
        }
    }

    fn write_client(&mut self) -> Result<bool, Done> {
        let mut moved = false;
        match self.tls.as_mut() {
            Some(tls) => {
                while tls.wants_write() {
                    match tls.write_tls(&mut self.client) {
                        Ok(0) => break,
                        Ok(_) => moved = true,
                        Err(e) if would_block(&e) => break,
                        Err(_) => return Err(Done),
                    }
                }
            }
            None => {
                while !self.to_client.is_empty() {
                    match self.client.write(&self.to_client) {
                        Ok(0) => break,
                        Ok(n) => {
                            self.to_client.drain(..n);
                            moved = true;
                        }
                        Err(e) if would_block(&e) => break,
                        Err(_) => return Err(Done),
                    }
                }
            }
        }
        Ok(moved)
    }
}

fn pollfd(stream: &TcpStream, read: bool, write: bool) -> libc::pollfd {
    let mut events = 0;
    if read {
        events |= libc::POLLIN;
    }
    if write {
        events |= libc::POLLOUT;
    }
    libc::pollfd { fd: stream.as_raw_fd(), events, revents: 0 }
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

/// A complete HTTP response for a request the front door refuses itself.
pub fn reject_response(err: &ApiError) -> Vec<u8> {
    let body = err.body(None);
    // A full daemon tells the client when to come back, as the HTTP side does.
    let retry = if err.status == 503 { "Retry-After: 5\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         X-Request-ID: {}\r\n{retry}Connection: close\r\n\r\n",
        err.status,
        crate::http::reason_phrase(err.status),
        body.len(),
        uuid::Uuid::new_v4(),
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}
