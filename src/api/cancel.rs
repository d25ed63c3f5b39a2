//! `DELETE /api/v1/cancel/{job_id}`: 204 for a pending or running job (a
//! running one ends `cancelled` once its worker has rolled it back), 409
//! for a finished one, 404 for an unknown one.

use crate::http::routes::job_id;
use crate::http::{Ctx, Failure, Reply};

pub fn handle(ctx: &Ctx, id: &str) -> Result<Reply, Failure> {
    let id = job_id(id)?;
    ctx.table
        .cancel(id)
        .map_err(|error| Failure { error, correlation_id: ctx.table.correlation_id(id) })?;
    log::info!("job={} cancel requested", &id.simple().to_string()[..8]);
    Ok(Reply::empty(204))
}
