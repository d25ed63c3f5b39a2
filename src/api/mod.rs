//! The API's request and response types, and the validation that turns a
//! provision request body into a [`JobRequest`] or a precise 400.
//!
//! One file per endpoint holds its handler; this module holds what they
//! share. Validation is strict: unknown fields are refused, so a typo in a
//! script fails loudly instead of being ignored.

pub mod cache;
pub mod cancel;
pub mod health;
pub mod jobs;
pub mod provision;
pub mod status;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Largest volume we accept, in GiB (64 TiB): anything larger is a typo.
pub const MAX_VOLUME_GB: u64 = 64 * 1024;

/// Longest image URL we accept.
const MAX_URL_BYTES: usize = 4096;

/// Longest volume name: LVM's limit for an LV name.
pub const MAX_VOLUME_NAME_BYTES: usize = 127;

/// Longest correlation id: a label, not a document.
const MAX_CORRELATION_BYTES: usize = 256;

/// Substrings LVM reserves for its internal volumes.
const LVM_RESERVED_PARTS: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_imeta", "_iorig", "_mimage", "_mlog",
    "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    Qcow2,
    Raw,
}

impl ImageType {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Qcow2 => "qcow2",
            ImageType::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Fill a volume from an image.
    #[default]
    Provision,
    /// Only bring an image into the cache, ahead of a rollout.
    Prefetch,
}

/// A validated provision (or prefetch) request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    #[serde(default)]
    pub kind: JobKind,
    pub image_url: String,
    /// Empty for a prefetch.
    pub volume_name: String,
    pub volume_size_gb: u64,
    pub image_type: ImageType,
    /// The caller's label, or the job id when none was given.
    pub correlation_id: Option<String>,
    pub image_sha256: Option<String>,
}

impl JobRequest {
    pub fn volume_bytes(&self) -> u64 {
        self.volume_size_gb << 30
    }
}

const FIELDS: &[&str] =
    &["image_url", "volume_name", "volume_size_gb", "image_type", "correlation_id", "image_sha256"];

/// A JSON object whose keys each appear once. serde_json keeps the last
/// of repeated keys; a proxy or a log reader that takes the first would
/// then see another request than the one run, so a repeat is refused.
struct Object(Map<String, Value>);

/// How the error for a repeated key begins.
const REPEATED: &str = "repeated field ";

impl<'de> Deserialize<'de> for Object {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Object, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Object;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<Object, A::Error> {
                let mut map = Map::new();
                while let Some((key, value)) = a.next_entry::<String, Value>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("{REPEATED}{key:?}")));
                    }
                    map.insert(key, value);
                }
                Ok(Object(map))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// Parses a request body that must be one JSON object.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid_json(format!("request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::invalid_request("request body must be a JSON object"));
    }
    match serde_json::from_slice::<Object>(body) {
        Ok(Object(map)) => Ok(map),
        Err(e) => {
            let text = e.to_string();
            let why = text.split(" at line ").next().unwrap_or(&text);
            Err(ApiError::invalid_request(format!("{why}; give each field once")))
        }
    }
}

/// Parses and checks a provision body.
pub fn parse_provision(body: &[u8]) -> Result<JobRequest, ApiError> {
    let obj = parse_object(body)?;
    if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid_request(format!(
            "unknown field {unknown:?}; accepted fields are {}",
            FIELDS.join(", ")
        )));
    }
    let image_url = required_string(&obj, "image_url")?;
    check_image_url(&image_url)?;
    let volume_name = required_string(&obj, "volume_name")?;
    check_volume_name(&volume_name)?;
    let volume_size_gb = match obj.get("volume_size_gb") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_request("missing field volume_size_gb"))
        }
        Some(v) => v.as_u64().filter(|n| (1..=MAX_VOLUME_GB).contains(n)).ok_or_else(|| {
            ApiError::invalid_request(format!(
                "volume_size_gb must be a whole number from 1 to {MAX_VOLUME_GB}, got {v}"
            ))
        })?,
    };
    let image_type = match optional_string(&obj, "image_type")?.as_deref() {
        None | Some("qcow2") => ImageType::Qcow2,
        Some("raw") => ImageType::Raw,
        Some(other) => {
            return Err(ApiError::invalid_request(format!(
                "image_type must be \"qcow2\" or \"raw\", got {other:?}"
            )))
        }
    };
    let correlation_id = optional_string(&obj, "correlation_id")?;
    if let Some(c) = &correlation_id {
        if c.is_empty() || c.len() > MAX_CORRELATION_BYTES || c.chars().any(char::is_control) {
            return Err(ApiError::invalid_request(format!(
                "correlation_id must be 1 to {MAX_CORRELATION_BYTES} bytes without control characters"
            )));
        }
    }
    let image_sha256 = match optional_string(&obj, "image_sha256")? {
        None => None,
        Some(s) => Some(crate::fetch::normalize_sha256(&s).ok_or_else(|| {
            ApiError::invalid_request("image_sha256 must be 64 hexadecimal digits")
        })?),
    };
    Ok(JobRequest {
        kind: JobKind::Provision,
        image_url,
        volume_name,
        volume_size_gb,
        image_type,
        correlation_id,
        image_sha256,
    })
}

const PREFETCH_FIELDS: &[&str] = &["image_url", "image_sha256", "correlation_id"];

/// Parses and checks a prefetch body: `image_url`, optional `image_sha256`
/// and `correlation_id`.
pub fn parse_prefetch(body: &[u8]) -> Result<JobRequest, ApiError> {
    let obj = parse_object(body)?;
    if let Some(unknown) = obj.keys().find(|k| !PREFETCH_FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid_request(format!(
            "unknown field {unknown:?}; accepted fields are {}",
            PREFETCH_FIELDS.join(", ")
        )));
    }
    // The provision checks, on a body with placeholder volume fields.
    let mut probe = obj.clone();
    probe.insert("volume_name".into(), Value::String("prefetch".into()));
    probe.insert("volume_size_gb".into(), Value::from(1));
    let body = serde_json::to_vec(&Value::Object(probe)).expect("json");
    let parsed = parse_provision(&body)?;
    Ok(JobRequest {
        kind: JobKind::Prefetch,
        volume_name: String::new(),
        volume_size_gb: 0,
        ..parsed
    })
}

fn required_string(obj: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => {
            Err(ApiError::invalid_request(format!("missing field {field}")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ApiError::invalid_request(format!(
            "{field} must be a string, got {}",
            type_name(other)
        ))),
    }
}

fn optional_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => required_string(obj, field).map(Some),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An http or https URL with a host and no credentials in it.
pub fn check_image_url(url: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::invalid_request(format!("image_url {why}"));
    if url.len() > MAX_URL_BYTES {
        return Err(bad(&format!("is longer than {MAX_URL_BYTES} bytes")));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("contains spaces or control characters"));
    }
    let uri: ureq::http::Uri = url.parse().map_err(|_| bad("is not a valid URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad("must start with http:// or https://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "must not carry credentials (user:password@); use a presigned URL or server-side credentials",
        ));
    }
    if authority.host().is_empty() {
        return Err(bad("has no host"));
    }
    if crate::fetch::file_name(url).is_empty() {
        return Err(bad("must name a file, not a directory"));
    }
    Ok(())
}

/// A name that is safe as a file name in one directory and that LVM
/// accepts as an LV name.
pub fn check_volume_name(name: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::invalid_request(format!("volume_name {name:?} {why}"));
    if name.is_empty() || name.len() > MAX_VOLUME_NAME_BYTES {
        return Err(bad(&format!("must be 1 to {MAX_VOLUME_NAME_BYTES} bytes long")));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"+_.-".contains(&b)) {
        return Err(bad("may hold only letters, digits and + _ . -"));
    }
    if name.starts_with('-') || name.starts_with('.') {
        return Err(bad("must not start with '-' or '.'"));
    }
    if name.starts_with("snapshot") || name.starts_with("pvmove") {
        return Err(bad("starts with a prefix LVM reserves (snapshot, pvmove)"));
    }
    if let Some(part) = LVM_RESERVED_PARTS.iter().find(|p| name.contains(*p)) {
        return Err(bad(&format!("contains {part:?}, which LVM reserves")));
    }
    Ok(())
}

/// Progress as the status endpoint shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressView {
    pub stage: crate::jobs::Stage,
    pub percent: u8,
    pub bytes_processed: u64,
    pub bytes_total: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"image_url": "https://minio.example.com/images/u.qcow2",
        "volume_name": "vm-root-disk-1", "volume_size_gb": 50, "image_type": "qcow2",
        "correlation_id": "provision-vm-001"}"#;

    fn details(body: &str) -> String {
        parse_provision(body.as_bytes()).unwrap_err().details
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(GOOD).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn test_the_documented_example_is_accepted() {
        let r = parse_provision(GOOD.as_bytes()).unwrap();
        assert_eq!(r.volume_name, "vm-root-disk-1");
        assert_eq!(r.volume_bytes(), 50 << 30);
        assert_eq!(r.image_type, ImageType::Qcow2);
        assert_eq!(r.correlation_id.as_deref(), Some("provision-vm-001"));
    }

    #[test]
    fn test_defaults() {
        let r = parse_provision(
            br#"{"image_url":"http://h/a.img","volume_name":"a","volume_size_gb":1}"#,
        )
        .unwrap();
        assert_eq!(r.image_type, ImageType::Qcow2);
        assert_eq!((r.correlation_id, r.image_sha256), (None, None));
    }

    #[test]
    fn test_bad_bodies_get_precise_details() {
        assert_eq!(parse_provision(b"{").unwrap_err().code, "invalid_json");
        assert_eq!(details("[]"), "request body must be a JSON object");
        assert_eq!(details(r#"{"volume_name":"a","volume_size_gb":1}"#), "missing field image_url");
        assert_eq!(
            details(&with("volume_name", "7")),
            "volume_name must be a string, got a number"
        );
        assert!(details(&with("volume_size_gb", "0")).starts_with("volume_size_gb must be"));
        assert!(details(&with("volume_size_gb", "-5")).starts_with("volume_size_gb must be"));
        assert!(details(&with("volume_size_gb", "1.5")).starts_with("volume_size_gb must be"));
        assert!(details(&with("volume_size_gb", "\"50\"")).starts_with("volume_size_gb must be"));
        assert!(details(&with("volume_size_gb", "1000000")).starts_with("volume_size_gb must be"));
        assert_eq!(
            details(&with("image_type", "\"vmdk\"")),
            "image_type must be \"qcow2\" or \"raw\", got \"vmdk\""
        );
        assert!(details(&with("image_sha256", "\"abc\"")).starts_with("image_sha256"));
        assert!(details(&with("extra", "1")).starts_with("unknown field \"extra\""));
        assert!(details(&with("correlation_id", "\"a\\nb\"")).starts_with("correlation_id"));
        let twice = r#"{"image_url":"http://h/a.img","volume_name":"a","volume_name":"b",
            "volume_size_gb":1}"#;
        assert_eq!(details(twice), "repeated field \"volume_name\"; give each field once");
        let twice = r#"{"image_url":"http://h/a.img","image_url":"http://h/a.img"}"#;
        assert!(parse_prefetch(twice.as_bytes()).unwrap_err().details.starts_with("repeated"));
    }

    #[test]
    fn test_image_urls() {
        for bad in [
            "\"file:///etc/passwd\"",
            "\"ftp://h/a.img\"",
            "\"https://user:pw@h/a.img\"",
            "\"https://h/a b.img\"",
            "\"not a url\"",
            "\"https:///a.img\"",
            "\"https://h/\"",
        ] {
            assert!(details(&with("image_url", bad)).starts_with("image_url"), "{bad}");
        }
        assert!(parse_provision(
            with("image_url", "\"http://10.0.0.1:9000/b/x.raw?sig=1\"").as_bytes()
        )
        .is_ok());
    }

    #[test]
    fn test_volume_names() {
        for bad in [
            "..",
            ".",
            "../etc/x",
            "a/b",
            "-rf",
            "a b",
            "a\u{1}b",
            ".hidden",
            "snapshot1",
            "pvmove0",
            "x_tmeta",
            "x_imeta",
            "x_iorig",
            "é",
        ] {
            assert!(check_volume_name(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(check_volume_name(&"a".repeat(128)).is_err());
        for good in ["vm-root-disk-1", "a", "A.b_c+d", &"a".repeat(127)] {
            assert!(check_volume_name(good).is_ok(), "{good:?} must be accepted");
        }
    }
}
