//! `GET /health`: the daemon is up and answering.

use serde_json::json;

use crate::http::{Ctx, Reply};

pub fn handle(_ctx: &Ctx) -> Reply {
    Reply::json(200, &json!({"status": "healthy"}))
}
