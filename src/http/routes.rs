//! The one table of routes: (method, path) → handler.

use super::{Ctx, Failure, Reply, Req};
use crate::api::{cache, cancel, health, jobs, provision, status};
use crate::error::ApiError;

pub fn route(ctx: &Ctx, req: &Req) -> Result<Reply, Failure> {
    let (method, path) = (req.method, req.path);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["api", "v1", "provision"]) => provision::handle(ctx, req),
        ("GET", ["api", "v1", "status", id]) => status::handle(ctx, req, id),
        ("DELETE", ["api", "v1", "cancel", id]) => cancel::handle(ctx, id),
        ("GET", ["api", "v1", "jobs"]) => jobs::handle(ctx, req),
        ("GET", ["api", "v1", "cache"]) => cache::list(ctx),
        ("POST", ["api", "v1", "cache", "prefetch"]) => cache::prefetch(ctx, req),
        ("DELETE", ["api", "v1", "cache", sha]) => cache::purge(ctx, sha),
        ("GET", ["health" | "healthz" | "livez"]) => Ok(health::live(ctx)),
        ("GET", ["readyz"]) => Ok(health::ready(ctx)),
        ("GET", ["metrics"]) => Ok(health::metrics(ctx)),
        (_, ["api", "v1", "provision" | "jobs" | "cache"])
        | (_, ["api", "v1", "status" | "cancel" | "cache", _])
        | (_, ["health" | "healthz" | "livez" | "readyz" | "metrics"]) => {
            Err(ApiError::method_not_allowed(format!("{method} is not allowed on {path}")).into())
        }
        _ => Err(ApiError::not_found(format!("no route for {method} {path}")).into()),
    }
}

/// Paths answered without authentication under `--public-health`.
pub fn is_health_probe(path: &str) -> bool {
    matches!(path, "/health" | "/healthz" | "/livez" | "/readyz")
}

/// The `endpoint` label of the request metric: the route, without ids, so
/// that the number of series stays fixed.
pub fn endpoint_label(path: &str) -> &'static str {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "provision"] => "provision",
        ["api", "v1", "status", _] => "status",
        ["api", "v1", "cancel", _] => "cancel",
        ["api", "v1", "jobs"] => "jobs",
        ["api", "v1", "cache", ..] => "cache",
        ["health" | "healthz" | "livez"] => "live",
        ["readyz"] => "ready",
        ["metrics"] => "metrics",
        _ => "other",
    }
}

/// A job id from a path segment.
pub fn job_id(text: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(text).map_err(|_| {
        let shown: String = text.chars().filter(|c| !c.is_control()).take(64).collect();
        ApiError::invalid_request(format!("{shown:?} is not a job id (a UUID)"))
    })
}
