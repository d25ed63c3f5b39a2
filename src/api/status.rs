//! `GET /api/v1/status/{job_id}`: a copy of the job as it is now.

use crate::error::ApiError;
use crate::http::routes::job_id;
use crate::http::{Ctx, Failure, Reply};

pub fn handle(ctx: &Ctx, id: &str) -> Result<Reply, Failure> {
    let id = job_id(id)?;
    let view = ctx.table.view(id).ok_or_else(|| ApiError::not_found(format!("no job {id}")))?;
    Ok(Reply::json(200, &view))
}
