//! Probes and metrics:
//! - `GET /health`, `/healthz`, `/livez`: the daemon is up and answering;
//! - `GET /readyz`: 200 when the backend, the cache directory and qemu-img
//!   are usable, else 503 with the reasons;
//! - `GET /metrics`: Prometheus text format.

use serde_json::json;

use crate::http::{Ctx, Reply};
use crate::jobs::Status;

pub fn live(_ctx: &Ctx) -> Reply {
    Reply::json(200, &json!({"status": "healthy"}))
}

pub fn ready(ctx: &Ctx) -> Reply {
    let mut reasons = Vec::new();
    if let Err(e) = ctx.pipeline.backend.check() {
        reasons.push(e);
    }
    if let Err(e) = ctx.pipeline.cache.check_writable() {
        reasons.push(format!("cache directory not writable: {e}"));
    }
    if let Err(e) = crate::cmd::run(&["qemu-img".to_string(), "--version".to_string()]) {
        reasons.push(format!("qemu-img not usable: {e}"));
    }
    if reasons.is_empty() {
        Reply::json(200, &json!({"status": "ready"}))
    } else {
        Reply::json(503, &json!({"status": "not_ready", "reasons": reasons}))
    }
}

pub fn metrics(ctx: &Ctx) -> Reply {
    let m = &ctx.metrics;
    let counts = ctx.table.counts();
    for status in
        [Status::Pending, Status::Running, Status::Completed, Status::Failed, Status::Cancelled]
    {
        let labels = crate::metrics::StatusLabels { status: status.as_str().to_string() };
        m.jobs.get_or_create(&labels).set(*counts.get(&status).unwrap_or(&0) as i64);
    }
    let entries = ctx.pipeline.cache.entries();
    m.cache_entries.set(entries.len() as i64);
    m.cache_bytes.set(entries.iter().map(|e| e.size).sum());
    // prometheus-client writes OpenMetrics text (a counter's TYPE line names
    // the family, its samples end in `_total`), so say that it is.
    Reply::text(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", m.encode())
}
