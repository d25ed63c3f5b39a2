//! `POST /api/v1/provision`: validate, record a pending job in the journal,
//! queue it, answer 202 with its id. Nothing slow happens on this thread
//! but the journal's fdatasync.
//!
//! With an `Idempotency-Key` header, a repeat of the same request answers
//! 200 with the job it started the first time; the same key with a
//! different request answers 409.

use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::error::ApiError;
use crate::http::{Ctx, Failure, Reply, Req};
use crate::jobs::table::Submitted;
use crate::jobs::{Idempotency, JobId};

/// Longest `Idempotency-Key` we accept.
const MAX_KEY_BYTES: usize = 255;

#[derive(Serialize)]
struct Accepted {
    job_id: JobId,
}

pub fn handle(ctx: &Ctx, req: &Req) -> Result<Reply, Failure> {
    let correlation_id = peek_correlation_id(req.body);
    let fail = |error: ApiError| Failure { error, correlation_id: correlation_id.clone() };
    if ctx.shutting_down.load(Ordering::SeqCst) {
        return Err(fail(ApiError::shutting_down()));
    }
    let request = super::parse_provision(req.body).map_err(fail)?;
    check_source(ctx, &request.image_url).map_err(fail)?;
    let idempotency = match req.header("Idempotency-Key") {
        None => None,
        Some(key) => {
            let key = key.trim();
            if key.is_empty()
                || key.len() > MAX_KEY_BYTES
                || !key.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(fail(ApiError::invalid_request(format!(
                    "Idempotency-Key must be 1 to {MAX_KEY_BYTES} printable ASCII characters"
                ))));
            }
            // The validated request, not the raw bytes: the same request
            // with other spacing or field order is the same request.
            let canonical = serde_json::to_vec(&request).expect("request serializes");
            let body_sha256 = crate::tokens::hex(&crate::tokens::sha256(&canonical));
            Some(Idempotency { key: key.to_string(), body_sha256 })
        }
    };
    match ctx.table.insert(request, idempotency).map_err(fail)? {
        Submitted::Existing(id) => {
            Ok(Reply::json(200, &Accepted { job_id: id })
                .with_header("Idempotent-Replayed", "true"))
        }
        Submitted::New(id) => {
            if !ctx.queue.try_push(id) {
                ctx.table.discard(id);
                return Err(fail(ApiError::queue_full(
                    "the job queue is full; retry later or raise --queue",
                )));
            }
            Ok(Reply::json(202, &Accepted { job_id: id }))
        }
    }
}

/// `--allow-source`: a URL outside every allowed prefix is refused at
/// submission, before a job exists. (The downloader checks again, and
/// checks every redirect hop.)
pub fn check_source(ctx: &Ctx, url: &str) -> Result<(), ApiError> {
    ctx.pipeline
        .fetcher
        .policy()
        .check_url(url)
        .map_err(|e| ApiError::invalid_request(format!("image_url: {e}")))
}

/// The correlation id of a body that may not validate, to echo in errors.
fn peek_correlation_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = value.get("correlation_id")?.as_str()?;
    Some(crate::jobs::clean_label(id))
}
