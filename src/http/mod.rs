//! The HTTP side: tiny_http on a private loopback socket, a few handler
//! threads, JSON replies.
//!
//! Supported: HTTP/1.1 (and 1.0) with keep-alive; JSON request and response
//! bodies only; request bodies up to 64 KiB with a Content-Length; the
//! routes in [`routes`]. Every response carries `X-Request-ID`. Not
//! supported: chunked request bodies, compression, HTTP/2, CORS.
//! Connection limits, deadlines and header-size limits live in the front
//! door, before tiny_http.

pub mod routes;

use std::io::Read;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use tiny_http::{Header, Response, Server};

use crate::auth;
use crate::error::ApiError;
use crate::frontdoor::framing::MAX_BODY_BYTES;
use crate::frontdoor::peers::PeerTable;
use crate::jobs::queue::Queue;
use crate::jobs::table::JobTable;
use crate::tokens::TokenSet;

/// What handlers share.
pub struct Ctx {
    pub table: Arc<JobTable>,
    pub queue: Queue,
    pub peers: Arc<PeerTable>,
    pub tokens: Option<TokenSet>,
}

/// A handler's answer before it becomes a tiny_http response.
pub struct Reply {
    pub status: u16,
    pub body: Option<Vec<u8>>,
}

impl Reply {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Reply {
        Reply { status, body: Some(serde_json::to_vec(value).expect("reply serializes")) }
    }

    pub fn empty(status: u16) -> Reply {
        Reply { status, body: None }
    }
}

/// An error answer, with the correlation id to echo when one is known.
pub struct Failure {
    pub error: ApiError,
    pub correlation_id: Option<String>,
}

impl From<ApiError> for Failure {
    fn from(error: ApiError) -> Failure {
        Failure { error, correlation_id: None }
    }
}

impl From<Failure> for Reply {
    fn from(f: Failure) -> Reply {
        Reply { status: f.error.status, body: Some(f.error.body(f.correlation_id.as_deref())) }
    }
}

/// Starts `threads` handler threads (`http-N`) taking requests from `server`.
pub fn start(server: Arc<Server>, ctx: Arc<Ctx>, threads: usize) -> Vec<JoinHandle<()>> {
    (1..=threads)
        .map(|n| {
            let server = Arc::clone(&server);
            let ctx = Arc::clone(&ctx);
            thread::Builder::new()
                .name(format!("http-{n}"))
                .spawn(move || {
                    for request in server.incoming_requests() {
                        handle(&ctx, request);
                    }
                })
                .expect("spawn http thread")
        })
        .collect()
}

fn handle(ctx: &Ctx, mut request: tiny_http::Request) {
    let started = Instant::now();
    let request_id = uuid::Uuid::new_v4().to_string();
    let method = request.method().as_str().to_string();
    let path = request.url().split('?').next().unwrap_or("").to_string();
    let identity =
        auth::identify(&ctx.peers, ctx.tokens.as_ref(), request.remote_addr(), request.headers());
    let reply = match &identity {
        Err(e) => Reply::from(Failure::from(e.clone())),
        Ok(_) => match read_body(&mut request) {
            Ok(body) => match routes::route(ctx, &method, &path, &body) {
                Ok(reply) => reply,
                Err(failure) => failure.into(),
            },
            Err(e) => Failure::from(e).into(),
        },
    };
    let status = reply.status;
    let mut response = match reply.body {
        Some(body) => {
            Response::from_data(body).with_header(header("Content-Type", "application/json"))
        }
        None => Response::from_data(Vec::new()),
    }
    .with_status_code(status)
    .with_header(header("X-Request-ID", &request_id));
    if status == 401 {
        response = response.with_header(header("WWW-Authenticate", "Bearer"));
    }
    let caller = match &identity {
        Ok(id) => id.to_string(),
        Err(_) => "unauthenticated".to_string(),
    };
    let remote = request
        .remote_addr()
        .and_then(|a| ctx.peers.get(a))
        .map(|p| p.remote.to_string())
        .unwrap_or_else(|| "local".into());
    if let Err(e) = request.respond(response) {
        log::debug!("req={} could not send the reply: {e}", &request_id[..8]);
    }
    log::info!(
        "req={} peer={caller} from={remote} {method} {path} {status} {}ms",
        &request_id[..8],
        started.elapsed().as_millis()
    );
}

fn read_body(request: &mut tiny_http::Request) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::invalid_request(format!("could not read the request body: {e}")))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::body_too_large(MAX_BODY_BYTES));
    }
    Ok(body)
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

/// The standard reason phrase for the statuses we send.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}
