//! The one table of routes: (method, path) → handler.

use super::{Ctx, Failure, Reply, Req};
use crate::api::{cancel, health, provision, status};
use crate::error::ApiError;

pub fn route(ctx: &Ctx, req: &Req) -> Result<Reply, Failure> {
    let (method, path) = (req.method, req.path);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["api", "v1", "provision"]) => provision::handle(ctx, req),
        ("GET", ["api", "v1", "status", id]) => status::handle(ctx, id),
        ("DELETE", ["api", "v1", "cancel", id]) => cancel::handle(ctx, id),
        ("GET", ["health"]) => Ok(health::handle(ctx)),
        (_, ["api", "v1", "provision"])
        | (_, ["api", "v1", "status", _])
        | (_, ["api", "v1", "cancel", _])
        | (_, ["health"]) => {
            Err(ApiError::method_not_allowed(format!("{method} is not allowed on {path}")).into())
        }
        _ => Err(ApiError::not_found(format!("no route for {method} {path}")).into()),
    }
}

/// A job id from a path segment.
pub fn job_id(text: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(text).map_err(|_| {
        let shown: String = text.chars().filter(|c| !c.is_control()).take(64).collect();
        ApiError::invalid_request(format!("{shown:?} is not a job id (a UUID)"))
    })
}
