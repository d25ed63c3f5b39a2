//! AWS Signature Version 4 for GETs from private S3-compatible buckets
//! (AWS S3, MinIO, Ceph RGW).
//!
//! A URL is signed when its origin (scheme, host, port) is one of the
//! configured `--s3-endpoint`s and it has no query string: a URL with a
//! query is taken to be presigned and is fetched untouched. The signature
//! goes in the `Authorization` header and covers `host`,
//! `x-amz-content-sha256`, `x-amz-date` (and `x-amz-security-token` with
//! temporary credentials); `Range`/`If-Range` on a resumed download stay
//! unsigned, which SigV4 allows.
//!
//! Credentials come from a file (`--s3-credentials`) or the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`),
//! never from a command-line value, which `ps` would show to every user.

use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::tokens::hex;

/// SHA-256 of an empty body: what a GET sends.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An access key pair, with the session token of temporary credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key: String,
    pub secret: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret never reaches a log line, even at debug.
        write!(f, "Credentials {{ access_key: {:?}, secret: <hidden> }}", self.access_key)
    }
}

impl Credentials {
    /// Reads a credentials file: the AWS shared-credentials form
    /// (`aws_access_key_id = …` under `[default]`, or outside any section),
    /// or `AWS_ACCESS_KEY_ID=…` lines as an environment file would hold.
    pub fn from_file(path: &Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                log::warn!(
                    "--s3-credentials {}: readable by other users (mode {:o}); chmod 600 it",
                    path.display(),
                    meta.permissions().mode() & 0o777
                );
            }
        }
        Credentials::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    fn parse(text: &str) -> Result<Credentials, String> {
        let (mut key, mut secret, mut token) = (None, None, None);
        let mut section: Option<String> = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.trim().to_string());
                continue;
            }
            if section.as_deref().is_some_and(|s| s != "default") {
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                return Err(format!("line {line:?} is not name = value"));
            };
            let name = name.trim().trim_start_matches("export ").trim().to_ascii_lowercase();
            let value = value.trim().trim_matches('"').to_string();
            match name.as_str() {
                "aws_access_key_id" => key = Some(value),
                "aws_secret_access_key" => secret = Some(value),
                "aws_session_token" => token = Some(value),
                _ => {}
            }
        }
        match (key, secret) {
            (Some(access_key), Some(secret)) if !access_key.is_empty() && !secret.is_empty() => {
                Ok(Credentials { access_key, secret, session_token: token })
            }
            _ => Err("holds no aws_access_key_id and aws_secret_access_key".into()),
        }
    }

    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and
    /// `AWS_SESSION_TOKEN`), or `None` when they are not both set.
    pub fn from_env() -> Option<Credentials> {
        let get = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Some(Credentials {
            access_key: get("AWS_ACCESS_KEY_ID")?,
            secret: get("AWS_SECRET_ACCESS_KEY")?,
            session_token: get("AWS_SESSION_TOKEN"),
        })
    }
}

/// Signs GETs for the configured endpoints.
#[derive(Debug, Clone)]
pub struct S3Signer {
    /// Origins, normalised by [`origin`].
    endpoints: Vec<String>,
    region: String,
    creds: Credentials,
}

impl S3Signer {
    /// `endpoints` are URLs whose origin is kept (a path is ignored).
    pub fn new(endpoints: &[String], region: &str, creds: Credentials) -> Result<S3Signer, String> {
        let endpoints = endpoints
            .iter()
            .map(|e| {
                origin(e).ok_or_else(|| {
                    format!("--s3-endpoint {e:?} is not an http:// or https:// URL with a host")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(S3Signer { endpoints, region: region.to_string(), creds })
    }

    /// The endpoint origins, for the start-up log.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Whether `url` is one this signer signs: an endpoint's origin and no
    /// query string (a presigned URL carries its own signature there).
    ///
    /// Known limitation: the origin must match exactly, so each
    /// virtual-hosted bucket host needs an `--s3-endpoint` of its own.
    pub fn applies(&self, url: &str) -> bool {
        !url.contains('?') && origin(url).is_some_and(|o| self.endpoints.contains(&o))
    }

    /// The headers that sign a GET of `url` at time `now`, `Host` first.
    pub fn sign_get(&self, url: &str, now: SystemTime) -> Vec<(&'static str, String)> {
        let uri: ureq::http::Uri = url.parse().expect("checked URL");
        let host = host_header(&uri);
        let amz_date = amz_date(now);
        let mut headers: Vec<(&'static str, String)> = vec![
            ("host", host),
            ("x-amz-content-sha256", EMPTY_SHA256.to_string()),
            ("x-amz-date", amz_date.clone()),
        ];
        if let Some(t) = &self.creds.session_token {
            headers.push(("x-amz-security-token", t.clone()));
        }
        let signable: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let auth = authorization(
            &self.creds,
            &Scope { date: &amz_date[..8], region: &self.region, service: "s3" },
            "GET",
            &canonical_path(uri.path()),
            "",
            &signable,
            EMPTY_SHA256,
            &amz_date,
        );
        headers.push(("authorization", auth));
        headers
    }
}

/// `scheme://host[:port]`, lower case, without the scheme's default port.
pub fn origin(url: &str) -> Option<String> {
    let uri: ureq::http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = uri.authority()?;
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    let default = if scheme == "https" { 443 } else { 80 };
    Some(match authority.port_u16() {
        Some(p) if p != default => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// The `Host` header we send (and sign): the host, and the port unless it
/// is the scheme's default.
fn host_header(uri: &ureq::http::Uri) -> String {
    let authority = uri.authority().expect("checked URL");
    let default = if uri.scheme_str() == Some("https") { 443 } else { 80 };
    match authority.port_u16() {
        Some(p) if p != default => format!("{}:{p}", authority.host()),
        _ => authority.host().to_string(),
    }
}

/// `YYYYMMDD'T'HHMMSS'Z'`.
fn amz_date(now: SystemTime) -> String {
    humantime::format_rfc3339_seconds(now).to_string().replace(['-', ':'], "")
}

/// The path as S3 canonicalises it: each byte outside RFC 3986's
/// unreserved set percent-encoded once, `/` kept. The URL's own
/// percent-escapes are decoded first, so they are not encoded twice.
fn canonical_path(path: &str) -> String {
    let raw = percent_decode(if path.is_empty() { "/" } else { path });
    let mut out = String::with_capacity(raw.len());
    for b in raw {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let pair = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .filter(|p| p.bytes().all(|c| c.is_ascii_hexdigit()))
                .unwrap_or("");
            if let Ok(b) = u8::from_str_radix(pair, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// The credential scope: date, region, service.
struct Scope<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

/// The `Authorization` header value for one request. `headers` are the
/// signed ones, with lower-case names; their order does not matter.
#[allow(clippy::too_many_arguments)]
fn authorization(
    creds: &Credentials,
    scope: &Scope,
    method: &str,
    canonical_uri: &str,
    canonical_query: &str,
    headers: &[(&str, &str)],
    payload_sha256: &str,
    amz_date: &str,
) -> String {
    let mut sorted: Vec<(String, String)> = headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect();
    sorted.sort();
    let signed: Vec<&str> = sorted.iter().map(|(n, _)| n.as_str()).collect();
    let signed = signed.join(";");
    let mut canonical = format!("{method}\n{canonical_uri}\n{canonical_query}\n");
    for (n, v) in &sorted {
        canonical.push_str(&format!("{n}:{v}\n"));
    }
    canonical.push_str(&format!("\n{signed}\n{payload_sha256}"));
    let scope_text = format!("{}/{}/{}/aws4_request", scope.date, scope.region, scope.service);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope_text}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let signature = hex(&signing_mac(&creds.secret, scope, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope_text}, SignedHeaders={signed}, Signature={signature}",
        creds.access_key
    )
}

/// HMAC of `data` under the key derived from the secret and the scope.
fn signing_mac(secret: &str, scope: &Scope, data: &[u8]) -> Vec<u8> {
    let mut key = format!("AWS4{secret}").into_bytes();
    for part in [scope.date, scope.region, scope.service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    hmac(&key, data)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The `<Code>` of an S3 XML error body, if it has one.
pub fn error_code(body: &str) -> Option<String> {
    let start = body.find("<Code>")? + "<Code>".len();
    let len = body[start..].find("</Code>")?;
    let code = body[start..start + len].trim();
    (!code.is_empty() && code.len() < 100 && code.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| code.to_string())
}

/// Whether an S3 error code says the credentials themselves were refused,
/// as opposed to the object being missing or forbidden to a valid caller.
pub fn is_credential_error(code: &str) -> bool {
    matches!(
        code,
        "SignatureDoesNotMatch"
            | "InvalidAccessKeyId"
            | "InvalidClientTokenId"
            | "InvalidToken"
            | "ExpiredToken"
            | "TokenRefreshRequired"
            | "AuthorizationHeaderMalformed"
            | "RequestTimeTooSkewed"
            | "InvalidSecurity"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "GET Object" example of AWS's SigV4 documentation for S3
    /// (header-based authentication): bucket `examplebucket`, object
    /// `test.txt`, first 10 bytes, 2013-05-24, us-east-1.
    #[test]
    fn test_aws_published_get_object_vector() {
        let creds = Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        };
        let auth = authorization(
            &creds,
            &Scope { date: "20130524", region: "us-east-1", service: "s3" },
            "GET",
            "/test.txt",
            "",
            &[
                ("Host", "examplebucket.s3.amazonaws.com"),
                ("Range", "bytes=0-9"),
                ("x-amz-content-sha256", EMPTY_SHA256),
                ("x-amz-date", "20130524T000000Z"),
            ],
            EMPTY_SHA256,
            "20130524T000000Z",
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn test_which_urls_are_signed() {
        let creds = Credentials { access_key: "k".into(), secret: "s".into(), session_token: None };
        let s = S3Signer::new(&["https://MinIO.example.com:443/".into()], "eu-1", creds).unwrap();
        assert!(s.applies("https://minio.example.com/images/a.qcow2"));
        assert!(s.applies("https://minio.example.com:443/images/a.qcow2"));
        assert!(!s.applies("https://minio.example.com/images/a.qcow2?X-Amz-Signature=x"));
        assert!(!s.applies("http://minio.example.com/images/a.qcow2"));
        assert!(!s.applies("https://minio.example.com:9000/images/a.qcow2"));
        assert!(!s.applies("https://other.example.com/images/a.qcow2"));
        let h = s.sign_get("https://minio.example.com/images/a.qcow2", SystemTime::UNIX_EPOCH);
        assert_eq!(h[0], ("host", "minio.example.com".to_string()));
        assert_eq!(h[2], ("x-amz-date", "19700101T000000Z".to_string()));
        assert!(h[3].1.starts_with("AWS4-HMAC-SHA256 Credential=k/19700101/eu-1/s3/aws4_request"));
    }

    #[test]
    fn test_canonical_path() {
        assert_eq!(canonical_path("/b/a b.qcow2"), "/b/a%20b.qcow2");
        assert_eq!(canonical_path("/b/a%20b.qcow2"), "/b/a%20b.qcow2");
        assert_eq!(canonical_path("/b/x+y~z"), "/b/x%2By~z");
        assert_eq!(canonical_path(""), "/");
    }

    #[test]
    fn test_credentials_file_forms() {
        let want =
            Credentials { access_key: "AK".into(), secret: "SK".into(), session_token: None };
        for text in [
            "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
            "AWS_ACCESS_KEY_ID=AK\nAWS_SECRET_ACCESS_KEY=\"SK\"\n",
            "export AWS_ACCESS_KEY_ID=AK\nexport AWS_SECRET_ACCESS_KEY=SK\n",
            "[other]\naws_access_key_id = X\n[default]\naws_access_key_id=AK\naws_secret_access_key=SK",
        ] {
            assert_eq!(Credentials::parse(text), Ok(want.clone()), "{text:?}");
        }
        assert!(Credentials::parse("[default]\naws_access_key_id = AK\n").is_err());
        assert!(!format!("{want:?}").contains("SK"));
    }

    #[test]
    fn test_error_codes() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code></Error>";
        assert_eq!(error_code(body).as_deref(), Some("SignatureDoesNotMatch"));
        assert!(is_credential_error("InvalidAccessKeyId"));
        assert!(!is_credential_error("NoSuchKey"));
        assert_eq!(error_code("<html>"), None);
    }
}
