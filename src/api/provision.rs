//! `POST /api/v1/provision`: validate, record a pending job, queue it,
//! answer 202 with its id. Nothing slow happens on this thread.

use serde::Serialize;

use crate::error::ApiError;
use crate::http::{Ctx, Failure, Reply};
use crate::jobs::JobId;

#[derive(Serialize)]
struct Accepted {
    job_id: JobId,
}

pub fn handle(ctx: &Ctx, body: &[u8]) -> Result<Reply, Failure> {
    let correlation_id = peek_correlation_id(body);
    let fail = |error: ApiError| Failure { error, correlation_id: correlation_id.clone() };
    let request = super::parse_provision(body).map_err(fail)?;
    let id = ctx.table.insert(request).map_err(fail)?;
    if !ctx.queue.try_push(id) {
        ctx.table.discard(id);
        return Err(fail(ApiError::queue_full(
            "the job queue is full; retry later or raise --queue",
        )));
    }
    Ok(Reply::json(202, &Accepted { job_id: id }))
}

/// The correlation id of a body that may not validate, to echo in errors.
fn peek_correlation_id(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let id = value.get("correlation_id")?.as_str()?;
    Some(crate::jobs::clean_label(id))
}
