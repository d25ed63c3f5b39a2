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

/// Open connections by remote address, for the per-address cap.
#[derive(Default)]
struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// Takes a slot for `ip` unless it already holds `cap`.
    fn take(&self, ip: IpAddr, cap: usize) -> bool {
        let mut open = self.open.lock().unwrap();
        let held = open.entry(ip).or_default();
        if *held >= cap {
            return false;
        }
        *held += 1;
        true
    }

    fn give_back(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap();
        if let Some(held) = open.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// What a connection holds until it ends: a slot under the cap (or a
/// refusal slot), and its address's slot when it was admitted.
struct Slots {
    counter: Arc<AtomicUsize>,
    address: Option<(Arc<PerAddress>, IpAddr)>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::SeqCst);
        if let Some((table, ip)) = &self.address {
            table.give_back(*ip);
        }
    }
}

impl FrontDoor {
    /// Accepts connections on the calling thread until `stop` is set;
    /// then closes the listener. Open connections run on until they end.
    pub fn run(self, stop: &AtomicBool) {
        let open = Arc::new(AtomicUsize::new(0));
        let refusing = Arc::new(AtomicUsize::new(0));
        let per_address = Arc::new(PerAddress::default());
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
            // Two caps: one address may hold at most `max_per_address`
            // connections, so that one party cannot fill the global cap
            // and keep everyone else out. Known limitation: the address is
            // the whole IP; a party with many addresses (an IPv6 /64, or
            // several hosts) still counts as many.
            let ip = remote.ip();
            let refusal = if !per_address.take(ip, self.max_per_address) {
                Some(ApiError::too_many_connections_from(ip, self.max_per_address))
            } else if open.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
                open.fetch_sub(1, Ordering::SeqCst);
                per_address.give_back(ip);
                Some(ApiError::too_many_connections())
            } else {
                None
            };
            let slots = match refusal {
                None => Slots {
                    counter: Arc::clone(&open),
                    address: Some((Arc::clone(&per_address), ip)),
                },
                Some(busy) => {
                    if refusing.fetch_add(1, Ordering::SeqCst) >= MAX_REFUSING_CONNECTIONS {
                        refusing.fetch_sub(1, Ordering::SeqCst);
                        log::debug!(
                            "closing connection from {remote} at once ({}): {} more being refused",
                            busy.details,
                            MAX_REFUSING_CONNECTIONS
                        );
                        if self.tls.is_none() {
                            let _ = stream.set_nonblocking(true);
                            let _ = (&stream).write_all(&bridge::reject_response(&busy));
                        }
                        drop(stream);
                        continue;
                    }
                    log::debug!("refusing connection from {remote} with 503: {}", busy.details);
                    let slots = Slots { counter: Arc::clone(&refusing), address: None };
                    self.serve(stream, remote, Some(busy), slots);
                    continue;
                }
            };
            self.serve(stream, remote, None, slots);
        }
    }

    /// Runs the connection on a thread of its own, which gives `slots`
    /// back when it ends.
    fn serve(&self, stream: TcpStream, remote: SocketAddr, refuse: Option<ApiError>, slots: Slots) {
        let bridge = Bridge {
            client: stream,
            remote,
            tls: self.tls.clone(),
            backend: self.backend,
            peers: Arc::clone(&self.peers),
            limits: self.limits,
            refuse,
        };
        let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
            bridge.run();
            drop(slots);
        });
        if let Err(e) = spawned {
            // The closure, and the slots in it, were dropped with the error.
            log::warn!("cannot start a thread for {remote}: {e}");
        }
    }
}
