//! `GET /api/v1/status/{job_id}[?wait=N]`: a copy of the job as it is now.
//!
//! With `wait=N` (0 to 300 seconds) the answer is held until the job's
//! status or stage changes, or N seconds pass, so a script needs no sleep
//! loop. Held requests occupy HTTP threads, so at most all but two of
//! them hold at once; past that the answer comes at once, which a polling
//! client handles like any other.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::error::ApiError;
use crate::http::routes::job_id;
use crate::http::{Ctx, Failure, Reply, Req};

/// Longest hold a client may ask for.
const MAX_WAIT_SECS: u64 = 300;

/// HTTP threads always left free for requests that do not wait.
const THREADS_KEPT_FREE: usize = 2;

pub fn handle(ctx: &Ctx, req: &Req, id: &str) -> Result<Reply, Failure> {
    let id = job_id(id)?;
    let wait = match req.param("wait") {
        None => 0,
        Some(text) => {
            text.parse::<u64>().ok().filter(|w| *w <= MAX_WAIT_SECS).ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "wait must be a whole number of seconds from 0 to {MAX_WAIT_SECS}"
                ))
            })?
        }
    };
    let not_found = || ApiError::not_found(format!("no job {id}"));
    let limit = ctx.http_threads.saturating_sub(THREADS_KEPT_FREE);
    let view = if wait > 0 && ctx.waiting.fetch_add(1, Ordering::SeqCst) < limit {
        let view = ctx.table.wait_for_change(id, Duration::from_secs(wait));
        ctx.waiting.fetch_sub(1, Ordering::SeqCst);
        view
    } else {
        if wait > 0 {
            ctx.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        ctx.table.view(id)
    };
    Ok(Reply::json(200, &view.ok_or_else(not_found)?))
}
