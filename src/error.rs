//! The API's error type and the table of stable error codes.
//!
//! Every failure a client can see becomes an [`ApiError`]: an HTTP status, a
//! stable machine code (part of the API contract, pinned by a test below) and
//! a human sentence. Internal errors are typed per module; [`chain`] flattens
//! one into the sentence used both for the log line and the `details` field.

use std::error::Error as StdError;
use std::fmt;

use serde::Serialize;

/// An error answered to an API client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub details: String,
}

/// The JSON body of every error response.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    pub error: &'a str,
    pub details: &'a str,
    pub correlation_id: Option<&'a str>,
}

impl ApiError {
    fn new(status: u16, code: &'static str, details: impl Into<String>) -> Self {
        ApiError { status, code, details: details.into() }
    }

    /// The request body is not valid JSON.
    pub fn invalid_json(details: impl Into<String>) -> Self {
        Self::new(400, "invalid_json", details)
    }

    /// A field is missing, of the wrong type or out of range.
    pub fn invalid_request(details: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", details)
    }

    /// The request body is larger than the API accepts.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(400, "body_too_large", format!("request body is larger than {limit} bytes"))
    }

    /// No client certificate and no valid token.
    pub fn unauthorized(details: impl Into<String>) -> Self {
        Self::new(401, "unauthorized", details)
    }

    /// Unknown path or job id.
    pub fn not_found(details: impl Into<String>) -> Self {
        Self::new(404, "not_found", details)
    }

    /// The path exists but not with this method.
    pub fn method_not_allowed(details: impl Into<String>) -> Self {
        Self::new(405, "method_not_allowed", details)
    }

    /// The job already reached a final state and cannot be cancelled.
    pub fn job_finished(details: impl Into<String>) -> Self {
        Self::new(409, "job_finished", details)
    }

    /// The `Idempotency-Key` was used before with a different request.
    pub fn idempotency_conflict(details: impl Into<String>) -> Self {
        Self::new(409, "idempotency_conflict", details)
    }

    /// A cache entry to purge is needed by an active job.
    pub fn entry_in_use(details: impl Into<String>) -> Self {
        Self::new(409, "entry_in_use", details)
    }

    /// Another pending or running job already targets this volume.
    pub fn volume_busy(details: impl Into<String>) -> Self {
        Self::new(409, "volume_busy", details)
    }

    /// The request used chunked transfer encoding or gave no length.
    pub fn length_required(details: impl Into<String>) -> Self {
        Self::new(411, "length_required", details)
    }

    /// The request did not arrive whole within the front door's deadline.
    pub fn request_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            408,
            "request_timeout",
            format!(
                "the request did not arrive whole within {} s of its first byte",
                limit.as_secs()
            ),
        )
    }

    /// The request head did not end within the front door's limit.
    pub fn header_too_large(limit: usize) -> Self {
        Self::new(431, "header_too_large", format!("request head is larger than {limit} bytes"))
    }

    /// The front door holds its maximum of open connections.
    pub fn too_many_connections() -> Self {
        Self::new(503, "too_many_connections", "too many open connections; retry shortly")
    }

    /// The per-address cap, for one address that holds many connections.
    pub fn too_many_connections_from(remote: std::net::IpAddr, cap: usize) -> Self {
        Self::new(
            503,
            "too_many_connections",
            format!(
                "too many open connections from {remote} ({cap} at most); close some, \
                 or retry shortly"
            ),
        )
    }

    /// Something on our side broke; the details say what.
    pub fn internal(details: impl Into<String>) -> Self {
        Self::new(500, "internal", details)
    }

    /// The daemon is stopping and takes no new jobs.
    pub fn shutting_down() -> Self {
        Self::new(503, "shutting_down", "the daemon is shutting down; retry on restart")
    }

    /// The job queue is full; the client should retry later.
    pub fn queue_full(details: impl Into<String>) -> Self {
        Self::new(503, "queue_full", details)
    }

    /// The JSON body of this error.
    pub fn body(&self, correlation_id: Option<&str>) -> Vec<u8> {
        let body = ErrorBody { error: self.code, details: &self.details, correlation_id };
        serde_json::to_vec(&body).expect("error body serializes")
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.details)
    }
}

/// Joins an error and its sources with `": "`, skipping a source whose text
/// its wrapper already ends with (some libraries repeat their cause).
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes and statuses are part of the API contract: changing one
    /// breaks scripts that match on them.
    #[test]
    fn test_codes_and_statuses_are_stable() {
        let table = [
            (ApiError::invalid_json(""), 400, "invalid_json"),
            (ApiError::invalid_request(""), 400, "invalid_request"),
            (ApiError::body_too_large(1), 400, "body_too_large"),
            (ApiError::unauthorized(""), 401, "unauthorized"),
            (ApiError::not_found(""), 404, "not_found"),
            (ApiError::method_not_allowed(""), 405, "method_not_allowed"),
            (ApiError::job_finished(""), 409, "job_finished"),
            (ApiError::idempotency_conflict(""), 409, "idempotency_conflict"),
            (ApiError::volume_busy(""), 409, "volume_busy"),
            (ApiError::entry_in_use(""), 409, "entry_in_use"),
            (ApiError::length_required(""), 411, "length_required"),
            (ApiError::header_too_large(1), 431, "header_too_large"),
            (ApiError::too_many_connections(), 503, "too_many_connections"),
            (ApiError::queue_full(""), 503, "queue_full"),
        ];
        for (err, status, code) in table {
            assert_eq!((err.status, err.code), (status, code));
        }
    }

    #[test]
    fn test_body_shape() {
        let body = ApiError::not_found("no job 1").body(Some("c-1"));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "not_found");
        assert_eq!(v["details"], "no job 1");
        assert_eq!(v["correlation_id"], "c-1");
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("create volume vg0/a")
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn test_chain_joins_sources() {
        let err = Outer(std::io::Error::other("no space left"));
        assert_eq!(chain(&err), "create volume vg0/a: no space left");
    }
}
