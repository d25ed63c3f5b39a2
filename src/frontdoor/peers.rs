//! Who is on the other end of each bridged connection.
//!
//! The bridge connects to tiny_http from a fresh loopback socket for every
//! client connection and records the verified peer under that socket's local
//! address, which is what tiny_http reports as the request's remote address.
//! A connection made straight to the private socket has no entry and is
//! treated as unauthenticated.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

/// A client as the front door saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The real remote address of the client.
    pub remote: SocketAddr,
    /// The verified client certificate's subject, when one was presented.
    pub subject: Option<String>,
}

#[derive(Default)]
pub struct PeerTable {
    peers: Mutex<HashMap<SocketAddr, Peer>>,
}

impl PeerTable {
    pub fn insert(&self, bridge_addr: SocketAddr, peer: Peer) {
        self.peers.lock().unwrap().insert(bridge_addr, peer);
    }

    pub fn remove(&self, bridge_addr: &SocketAddr) {
        self.peers.lock().unwrap().remove(bridge_addr);
    }

    pub fn get(&self, bridge_addr: &SocketAddr) -> Option<Peer> {
        self.peers.lock().unwrap().get(bridge_addr).cloned()
    }
}
