//! Cache administration:
//! - `GET /api/v1/cache`: every entry with its digest, source, size, last
//!   use and whether an active job needs it;
//! - `POST /api/v1/cache/prefetch`: a job that only downloads and verifies
//!   an image into the cache, ahead of a fleet rollout (202 + job id);
//! - `DELETE /api/v1/cache/{sha256}`: removes an entry no job needs (204;
//!   409 `entry_in_use`; 404).

use serde::Serialize;

use crate::error::ApiError;
use crate::http::{Ctx, Failure, Reply, Req};
use crate::jobs::table::Submitted;

#[derive(Serialize)]
struct Entry {
    sha256: String,
    source: String,
    size: u64,
    last_used: String,
    in_use: bool,
}

#[derive(Serialize)]
struct Entries {
    entries: Vec<Entry>,
}

#[derive(Serialize)]
struct Accepted {
    job_id: crate::jobs::JobId,
}

/// Whether an active job may need entry `sha256` (by digest, or by the
/// URL it came from for jobs whose digest is not known yet).
fn in_use(ctx: &Ctx, sha256: &str, source: &str) -> bool {
    let (digests, urls) = ctx.table.images_in_use();
    digests.iter().any(|d| d == sha256)
        || urls.iter().any(|u| !source.is_empty() && crate::fetch::redact(u) == source)
}

pub fn list(ctx: &Ctx) -> Result<Reply, Failure> {
    let entries = ctx
        .pipeline
        .cache
        .entries()
        .into_iter()
        .map(|e| Entry {
            in_use: in_use(ctx, &e.sha256, &e.source),
            last_used: humantime::format_rfc3339_seconds(e.last_used).to_string(),
            sha256: e.sha256,
            source: e.source,
            size: e.size,
        })
        .collect();
    Ok(Reply::json(200, &Entries { entries }))
}

pub fn prefetch(ctx: &Ctx, req: &Req) -> Result<Reply, Failure> {
    if ctx.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::shutting_down().into());
    }
    let request = crate::api::parse_prefetch(req.body)?;
    crate::api::provision::check_source(ctx, &request.image_url)?;
    match ctx.table.insert(request, None)? {
        Submitted::New(id) | Submitted::Existing(id) => {
            if !ctx.queue.try_push(id) {
                ctx.table.discard(id);
                return Err(ApiError::queue_full(
                    "the job queue is full; retry later or raise --queue",
                )
                .into());
            }
            Ok(Reply::json(202, &Accepted { job_id: id }))
        }
    }
}

pub fn purge(ctx: &Ctx, sha256: &str) -> Result<Reply, Failure> {
    let sha = crate::fetch::normalize_sha256(sha256).ok_or_else(|| {
        ApiError::invalid_request("the cache entry id must be a SHA-256 (64 hex digits)")
    })?;
    let source = ctx
        .pipeline
        .cache
        .entries()
        .into_iter()
        .find(|e| e.sha256 == sha)
        .map(|e| e.source)
        .ok_or_else(|| ApiError::not_found(format!("no cache entry {sha}")))?;
    if in_use(ctx, &sha, &source) {
        return Err(ApiError::entry_in_use(format!(
            "cache entry {sha} is needed by a pending or running job; purge it later"
        ))
        .into());
    }
    match ctx.pipeline.cache.purge(&sha) {
        Ok(true) => Ok(Reply::empty(204)),
        Ok(false) => Err(ApiError::not_found(format!("no cache entry {sha}")).into()),
        Err(e) => Err(ApiError::internal(format!("remove cache entry {sha}: {e}")).into()),
    }
}
