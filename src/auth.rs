//! Who is calling: the verified client certificate's subject, or the name
//! of a valid API token. Tokens are read from `Authorization: Bearer …` or
//! `X-API-Token: …`; they are never logged.

use std::fmt;
use std::net::SocketAddr;

use crate::error::ApiError;
use crate::frontdoor::peers::PeerTable;
use crate::tokens::TokenSet;

/// An authenticated caller, as logs name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Certificate(String),
    Token(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Certificate(subject) => write!(f, "cert:{subject}"),
            Identity::Token(name) => write!(f, "token:{name}"),
        }
    }
}

/// Decides who sent a request that tiny_http saw coming from `bridge_addr`.
pub fn identify(
    peers: &PeerTable,
    tokens: Option<&TokenSet>,
    bridge_addr: Option<&SocketAddr>,
    headers: &[tiny_http::Header],
) -> Result<Identity, ApiError> {
    // A connection without an entry did not come through the front door
    // (someone connected to the private socket): no certificate for it.
    let peer = bridge_addr.and_then(|a| peers.get(a));
    if let Some(subject) = peer.as_ref().and_then(|p| p.subject.clone()) {
        return Ok(Identity::Certificate(subject));
    }
    let Some(tokens) = tokens else {
        return Err(ApiError::unauthorized("a client certificate is required"));
    };
    let presented = presented_token(headers).ok_or_else(|| {
        ApiError::unauthorized(
            "no client certificate and no API token (Authorization: Bearer or X-API-Token)",
        )
    })?;
    match tokens.verify(presented) {
        Some(name) => Ok(Identity::Token(name.to_string())),
        None => Err(ApiError::unauthorized("invalid API token")),
    }
}

fn presented_token(headers: &[tiny_http::Header]) -> Option<&str> {
    for h in headers {
        let value = h.value.as_str().trim();
        if h.field.equiv("Authorization") {
            let (scheme, token) = value.split_once(' ')?;
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
                return Some(token.trim());
            }
        } else if h.field.equiv("X-API-Token") && !value.is_empty() {
            return Some(value);
        }
    }
    None
}
