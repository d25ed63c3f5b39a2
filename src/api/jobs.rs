//! `GET /api/v1/jobs[?status=S][&correlation_id=C][&limit=N]`: the jobs
//! the daemon knows, newest first.

use serde::Serialize;

use crate::error::ApiError;
use crate::http::{Ctx, Failure, Reply, Req};
use crate::jobs::{JobView, Status};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Serialize)]
struct Jobs {
    jobs: Vec<JobView>,
}

pub fn handle(ctx: &Ctx, req: &Req) -> Result<Reply, Failure> {
    let status = match req.param("status") {
        None => None,
        Some(text) => Some(Status::parse(&text).ok_or_else(|| {
            ApiError::invalid_request(format!(
                "status {text:?} is not one of pending, running, completed, failed, cancelled"
            ))
        })?),
    };
    let limit = match req.param("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => {
            text.parse().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                ApiError::invalid_request(format!(
                    "limit must be a whole number from 1 to {MAX_LIMIT}"
                ))
            })?
        }
    };
    let correlation_id = req.param("correlation_id");
    let jobs = ctx.table.list(status, correlation_id.as_deref(), limit);
    Ok(Reply::json(200, &Jobs { jobs }))
}
