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
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use tiny_http::{Header, Response, Server};

use crate::auth;
use crate::error::ApiError;
use crate::frontdoor::framing::MAX_BODY_BYTES;
use crate::frontdoor::peers::PeerTable;
use crate::jobs::pipeline::Pipeline;
use crate::jobs::queue::Queue;
use crate::jobs::table::JobTable;
use crate::metrics::Metrics;
use crate::tokens::TokenSet;

/// What handlers share.
pub struct Ctx {
    pub table: Arc<JobTable>,
    pub queue: Queue,
    pub peers: Arc<PeerTable>,
    pub tokens: Option<TokenSet>,
    /// Set on SIGTERM: no new jobs are accepted.
    pub shutting_down: AtomicBool,
    pub pipeline: Arc<Pipeline>,
    pub metrics: Arc<Metrics>,
    /// `/metrics` answers without authentication (`--public-metrics`).
    pub public_metrics: bool,
    /// Health probes answer without authentication (`--public-health`).
    pub public_health: bool,
    /// Requests held by `?wait=` right now.
    pub waiting: AtomicUsize,
    pub http_threads: usize,
}

/// A request as handlers see it.
pub struct Req<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The query string, without `?`; empty when there is none.
    pub query: &'a str,
    pub headers: &'a [Header],
    pub body: &'a [u8],
}

impl Req<'_> {
    /// The first value of query parameter `name`, percent-decoding `%XX`
    /// and `+`.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
}

/// A handler's answer before it becomes a tiny_http response.
pub struct Reply {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

impl Reply {
    pub fn json(status: u16, value: &impl serde::Serialize) -> Reply {
        let body = serde_json::to_vec(value).expect("reply serializes");
        Reply { status, body: Some(body), content_type: JSON, headers: Vec::new() }
    }

    pub fn empty(status: u16) -> Reply {
        Reply { status, body: None, content_type: JSON, headers: Vec::new() }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Reply {
        Reply { status, body: Some(body.into_bytes()), content_type, headers: Vec::new() }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
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

const JSON: &str = "application/json";

/// Decodes `%XX` escapes and `+` in a query value; bad escapes stay as
/// they are.
fn percent_decode(text: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a 503 tells a client to wait before retrying.
const RETRY_AFTER_SECS: u32 = 5;

impl From<Failure> for Reply {
    fn from(f: Failure) -> Reply {
        let body = f.error.body(f.correlation_id.as_deref());
        let reply = Reply {
            status: f.error.status,
            body: Some(body),
            content_type: JSON,
            headers: Vec::new(),
        };
        match f.error.status {
            401 => reply.with_header("WWW-Authenticate", "Bearer"),
            503 => reply.with_header("Retry-After", RETRY_AFTER_SECS.to_string()),
            _ => reply,
        }
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
    // The method is any token the client sent: cleaned for the log, and
    // counted in the metrics only when it is one we know.
    let method = request.method().as_str().to_string();
    let shown_method = clean_for_log(&method);
    let url = request.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let public = (ctx.public_health && routes::is_health_probe(path))
        || (ctx.public_metrics && path == "/metrics");
    let identity =
        auth::identify(&ctx.peers, ctx.tokens.as_ref(), request.remote_addr(), request.headers());
    // Looked up now: a client that leaves before its reply (a long
    // `?wait=`) takes its entry in the peer table with it.
    let remote = request
        .remote_addr()
        .and_then(|a| ctx.peers.get(a))
        .map(|p| p.remote.to_string())
        .unwrap_or_else(|| "local".into());
    let reply = match (&identity, public) {
        (Err(e), false) => Reply::from(Failure::from(e.clone())),
        _ => match read_body(&mut request) {
            Ok(body) => {
                let headers = request.headers();
                let req = Req { method: &method, path, query, headers, body: &body };
                routes::route(ctx, &req).unwrap_or_else(Reply::from)
            }
            Err(e) => Failure::from(e).into(),
        },
    };
    let status = reply.status;
    let reply_job_id = reply
        .body
        .as_deref()
        .filter(|_| reply.content_type == JSON)
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .and_then(|v| v.get("job_id").and_then(|j| j.as_str()).map(str::to_string));
    ctx.metrics.request(routes::endpoint_label(path), &method, status);
    let mut response = match reply.body {
        Some(body) => {
            Response::from_data(body).with_header(header("Content-Type", reply.content_type))
        }
        None => Response::from_data(Vec::new()),
    }
    .with_status_code(status)
    .with_header(header("X-Request-ID", &request_id));
    for (name, value) in &reply.headers {
        response = response.with_header(header(name, value));
    }
    let job = audit_job(status, reply_job_id.as_deref());
    // `tail` ends the audit line; `None` when the line is not logged.
    let (caller, tail) = match &identity {
        Ok(id) => (clean_for_log(&id.to_string()), Some(String::new())),
        // A public probe needs no identity: not an authentication failure.
        Err(_) if public => ("anonymous".to_string(), Some(String::new())),
        // Anyone who reaches the port can cause these: they share the
        // budget of lines clients cause (`None`: over it, not logged).
        Err(e) => (
            "unauthenticated".to_string(),
            crate::logging::remote_line()
                .map(|note| format!(" auth_failure={:?}{note}", e.details)),
        ),
    };
    if let Err(e) = request.respond(response) {
        log::debug!("req={} could not send the reply: {e}", &request_id[..8]);
    }
    // The audit line: who (certificate subject or token name, never the
    // token), from where, what, and the outcome. At info, also for failed
    // authentication, within the budget for lines clients cause.
    // The reply is out before this write. (Moving log writes to a thread
    // of their own was measured and made no difference; README, Speed.)
    if let Some(tail) = tail {
        log::info!(
            "req={} peer={caller} from={remote} {shown_method} {} {status} {}ms{job}{tail}",
            &request_id[..8],
            clean_for_log(path),
            started.elapsed().as_millis()
        );
    }
}

/// ` job=<id>` for a reply that names a job the request created or acted on.
fn audit_job(status: u16, job: Option<&str>) -> String {
    match job {
        Some(id) if status < 300 => format!(" job={}", clean_for_log(id)),
        _ => String::new(),
    }
}

/// Text from a client (a path, a certificate's subject) made safe for one
/// log line: control characters and spaces replaced, at most 200
/// characters.
pub fn clean_for_log(text: &str) -> String {
    let mut out: String =
        text.chars().take(200).map(|c| if c.is_control() || c == ' ' { '_' } else { c }).collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    out
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
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_text_is_one_line_and_bounded() {
        assert_eq!(clean_for_log("/a b\nreq=forged"), "/a_b_req=forged");
        let long = "x".repeat(500);
        assert_eq!(clean_for_log(&long).chars().count(), 201);
        assert_eq!(audit_job(202, Some("j1")), " job=j1");
        assert_eq!(audit_job(404, Some("j1")), "");
    }
}
