//! The front door: every client connection passes through here before
//! tiny_http sees a byte.
//!
//! 1. The acceptor thread (`frontdoor`) takes a connection from the public
//!    listener. Past the connection cap, or past the cap for its remote
//!    address, it is answered 503 `too_many_connections` (over TLS after a
//!    short handshake), and past [`MAX_REFUSING_CONNECTIONS`] more it is
//!    closed at once.
//! 2. A connection thread runs the rustls handshake against the deadline;
//!    a client certificate is verified against the client CA here.
//! 3. Once the handshake is done it opens a loopback connection to
//!    tiny_http's private socket and records the verified peer under that
//!    connection's local address (see [`peers`]).
//! 4. It bridges bytes both ways, checking request heads and body lengths
//!    on the way in ([`framing`]), closing idle connections and those
//!    whose request does not arrive whole within the idle timeout of its
//!    first byte (a client trickling a byte at a time).
//!
//! With `--plain-http` the same steps run without the handshake.

pub mod bridge;
pub mod framing;
pub mod peers;
pub mod tls;

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rustls::ServerConfig;

use crate::error::ApiError;
use crate::logging::remote_line;
use bridge::{Bridge, Limits};
use peers::PeerTable;

/// Connections past the cap that are still served a 503 over a completed
/// handshake (with a short deadline); past these, the excess is closed at
/// once. Each costs a thread for at most a few seconds.
pub const MAX_REFUSING_CONNECTIONS: usize = 32;

/// How often the acceptor looks at the stop flag while idle.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

/// Waits until `listener` has a connection or `timeout` passes.
fn wait_readable(listener: &TcpListener, timeout: Duration) {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; the result only decides whether to loop.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
}

pub struct FrontDoor {
    pub listener: TcpListener,
    pub tls: Option<Arc<ServerConfig>>,
    pub backend: SocketAddr,
    pub peers: Arc<PeerTable>,
    pub limits: Limits,
    pub max_connections: usize,
    /// The cap for one remote IP address (`--max-connections-per-address`).
    pub max_per_address: usize,
}

/// How long a connection over its address's cap waits for one of that
/// address's connections to end before it is refused: a client that opens
/// its next connection the moment the last reply arrives is often a step
/// ahead of the thread that is still closing the old one.
const ADDRESS_GRACE: Duration = Duration::from_millis(250);

/// The two caps and their counts, shared by the acceptor and the
/// connection threads.
struct Admission {
    max_connections: usize,
    max_per_address: usize,
    /// Connections admitted.
    open: AtomicUsize,
    /// Connections being refused.
    refusing: AtomicUsize,
    /// Admitted connections by remote address.
    by_address: Mutex<HashMap<IpAddr, usize>>,
}

/// Which cap a connection is over.
#[derive(Debug, Clone, Copy)]
enum Over {
    Address(IpAddr),
    All,
}

impl Over {
    fn answer(self, admission: &Admission) -> ApiError {
        match self {
            Over::Address(ip) => ApiError::too_many_connections_from(ip, admission.max_per_address),
            Over::All => ApiError::too_many_connections(),
        }
    }
}

/// A slot held until the connection ends: admitted (counted under both
/// caps) or being refused.
struct Slot {
    admission: Arc<Admission>,
    admitted: Option<IpAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let a = &self.admission;
        match self.admitted {
            Some(ip) => {
                a.open.fetch_sub(1, Ordering::SeqCst);
                a.give_back(ip);
            }
            None => {
                a.refusing.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Admission {
    /// Admits a connection from `ip` under both caps, or says which one
    /// it is over. Two caps: one address may hold at most
    /// `max_per_address`, so that one party cannot fill the global cap and
    /// keep everyone else out. Known limitation: the address is the whole
    /// IP; a party with many addresses (an IPv6 /64, several hosts) still
    /// counts as many.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Over> {
        {
            let mut by_address = self.by_address.lock().unwrap();
            let held = by_address.entry(ip).or_default();
            if *held >= self.max_per_address {
                return Err(Over::Address(ip));
            }
            *held += 1;
        }
        if self.open.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::SeqCst);
            self.give_back(ip);
            return Err(Over::All);
        }
        Ok(Slot { admission: Arc::clone(self), admitted: Some(ip) })
    }

    /// A refusal slot, unless [`MAX_REFUSING_CONNECTIONS`] are taken.
    fn refusal(self: &Arc<Self>) -> Option<Slot> {
        if self.refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING_CONNECTIONS {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot { admission: Arc::clone(self), admitted: None })
    }

    fn give_back(&self, ip: IpAddr) {
        let mut by_address = self.by_address.lock().unwrap();
        if let Some(held) = by_address.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                by_address.remove(&ip);
            }
        }
    }
}

impl FrontDoor {
    /// Accepts connections on the calling thread until `stop` is set;
    /// then closes the listener. Open connections run on until they end.
    pub fn run(self, stop: &AtomicBool) {
        let admission = Arc::new(Admission {
            max_connections: self.max_connections,
            max_per_address: self.max_per_address,
            open: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            by_address: Mutex::new(HashMap::new()),
        });
        if let Err(e) = self.listener.set_nonblocking(true) {
            log::error!("cannot make the listener non-blocking: {e}");
            return;
        }
        while !stop.load(Ordering::SeqCst) {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_readable(&self.listener, ACCEPT_POLL);
                    continue;
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let remote = match stream.peer_addr() {
                Ok(a) => a,
                Err(_) => continue,
            };
            let over = match admission.admit(remote.ip()) {
                Ok(slot) => {
                    self.serve(stream, remote, Ok(slot));
                    continue;
                }
                Err(over) => over,
            };
            let Some(refusal) = admission.refusal() else {
                let busy = over.answer(&admission);
                if let Some(note) = remote_line() {
                    log::info!(
                        "closing connection from {remote} at once ({}): {} more being refused{note}",
                        busy.details,
                        MAX_REFUSING_CONNECTIONS
                    );
                }
                if self.tls.is_none() {
                    let _ = stream.set_nonblocking(true);
                    let _ = (&stream).write_all(&bridge::reject_response(&busy));
                }
                continue;
            };
            self.serve(stream, remote, Err((over, refusal, Arc::clone(&admission))));
        }
    }

    /// Runs the connection on a thread of its own, which gives its slot
    /// back when it ends. A connection over its address's cap first waits
    /// up to [`ADDRESS_GRACE`] for a slot there, and is refused (with a
    /// 503 naming the cap) if none comes free.
    fn serve(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
        admitted: Result<Slot, (Over, Slot, Arc<Admission>)>,
    ) {
        let mut bridge = Bridge {
            client: stream,
            remote,
            tls: self.tls.clone(),
            backend: self.backend,
            peers: Arc::clone(&self.peers),
            limits: self.limits,
            refuse: None,
            held: None,
        };
        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            let slot = match admitted {
                Ok(slot) => slot,
                Err((over, refusal, admission)) => match wait_for_slot(&admission, remote, over) {
                    Ok(slot) => slot,
                    Err(over) => {
                        let busy = over.answer(&admission);
                        if let Some(note) = remote_line() {
                            log::info!(
                                "refusing connection from {remote} with 503: {}{note}",
                                busy.details
                            );
                        }
                        bridge.refuse = Some(busy);
                        refusal
                    }
                },
            };
            bridge.held = Some(Box::new(slot));
            bridge.run();
        });
        if let Err(e) = spawned {
            // The closure, and the slots in it, were dropped with the error.
            log::warn!("cannot start a thread for {remote}: {e}");
        }
    }
}

/// Tries to admit a connection refused for its address's cap again, for
/// up to [`ADDRESS_GRACE`]; one refused by the global cap is not retried.
fn wait_for_slot(admission: &Arc<Admission>, remote: SocketAddr, over: Over) -> Result<Slot, Over> {
    if matches!(over, Over::All) {
        return Err(over);
    }
    let deadline = std::time::Instant::now() + ADDRESS_GRACE;
    let mut last = over;
    while std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
        match admission.admit(remote.ip()) {
            Ok(slot) => return Ok(slot),
            Err(e) => last = e,
        }
    }
    Err(last)
}
