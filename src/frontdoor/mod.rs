//! The front door: every client connection passes through here before
//! tiny_http sees a byte.
//!
//! 1. The acceptor thread (`frontdoor`) takes a connection from the public
//!    listener. Past [`Limits`]' connection cap it is closed at once.
//! 2. A connection thread runs the rustls handshake against the deadline;
//!    a client certificate is verified against the client CA here.
//! 3. Once the handshake is done it opens a loopback connection to
//!    tiny_http's private socket and records the verified peer under that
//!    connection's local address (see [`peers`]).
//! 4. It bridges bytes both ways, checking request heads and body lengths
//!    on the way in ([`framing`]) and closing idle connections.
//!
//! With `--plain-http` the same steps run without the handshake.

pub mod bridge;
pub mod framing;
pub mod peers;
pub mod tls;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use rustls::ServerConfig;

use crate::error::ApiError;
use bridge::{Bridge, Limits};
use peers::PeerTable;

pub struct FrontDoor {
    pub listener: TcpListener,
    pub tls: Option<Arc<ServerConfig>>,
    pub backend: SocketAddr,
    pub peers: Arc<PeerTable>,
    pub limits: Limits,
    pub max_connections: usize,
}

impl FrontDoor {
    /// Accepts connections forever on the calling thread.
    pub fn run(self) {
        let open = Arc::new(AtomicUsize::new(0));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    continue;
                }
            };
            let remote = match stream.peer_addr() {
                Ok(a) => a,
                Err(_) => continue,
            };
            if open.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
                open.fetch_sub(1, Ordering::SeqCst);
                log::debug!("refusing connection from {remote}: {} open", self.max_connections);
                if self.tls.is_none() {
                    // Plain HTTP can be told why; a TLS client just sees the close.
                    let busy = ApiError::too_many_connections();
                    let _ = stream.set_nonblocking(true);
                    let _ = (&stream).write_all(&bridge::reject_response(&busy));
                }
                drop(stream);
                continue;
            }
            let bridge = Bridge {
                client: stream,
                remote,
                tls: self.tls.clone(),
                backend: self.backend,
                peers: Arc::clone(&self.peers),
                limits: self.limits,
            };
            let counter = Arc::clone(&open);
            let spawned = thread::Builder::new().name("conn".into()).spawn(move || {
                bridge.run();
                counter.fetch_sub(1, Ordering::SeqCst);
            });
            if let Err(e) = spawned {
                open.fetch_sub(1, Ordering::SeqCst);
                log::warn!("cannot start a thread for {remote}: {e}");
            }
        }
    }
}
