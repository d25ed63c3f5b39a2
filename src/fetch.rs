//! Image downloads with ureq: streaming to a file while hashing, and the
//! `<image_url>.sha256` sidecar.
//!
//! Bytes are written to the caller's file exactly as the server sends them
//! (no content decoding) and hashed on the way, so the file is never read
//! back to be verified. The stall timeout bounds the wait for each read: a
//! server that stops sending fails the download instead of hanging a worker.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Read size for downloads: large enough to keep syscalls and hashing
/// efficient, small enough that cancel is noticed quickly.
const CHUNK: usize = 256 * 1024;

/// Largest sidecar we read: a `sha256sum` listing of many files.
const SIDECAR_LIMIT: u64 = 64 * 1024;

#[derive(Debug)]
pub enum FetchError {
    /// The server answered with an HTTP error status.
    Status { url: String, code: u16 },
    /// The connection failed, timed out or broke mid-body.
    Transport { url: String, source: ureq::Error },
    /// Writing the downloaded bytes to the cache file failed.
    Write { source: io::Error },
    /// The server broke the transfer in a way HTTP allows (short body,
    /// wrong range).
    Broken { url: String, reason: String },
    /// The sidecar file exists but holds no usable digest.
    Sidecar { url: String, reason: String },
    /// The job was cancelled during the download.
    Cancelled,
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Status { url, code } => write!(f, "GET {url} answered HTTP {code}"),
            FetchError::Transport { url, .. } => write!(f, "GET {url} failed"),
            FetchError::Write { .. } => write!(f, "writing the download to the cache failed"),
            FetchError::Broken { url, reason } => write!(f, "GET {url}: {reason}"),
            FetchError::Sidecar { url, reason } => write!(f, "digest file {url}: {reason}"),
            FetchError::Cancelled => write!(f, "download cancelled"),
        }
    }
}

impl std::error::Error for FetchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FetchError::Transport { source, .. } => Some(source),
            FetchError::Write { source } => Some(source),
            _ => None,
        }
    }
}

/// What a finished download produced.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub sha256: String,
    pub bytes: u64,
}

pub struct Fetcher {
    agent: ureq::Agent,
    retry: RetryPolicy,
}

impl Fetcher {
    /// `stall` is the longest wait for any single read from the server.
    pub fn new(stall: Duration, retry: RetryPolicy) -> Fetcher {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(stall))
            .max_redirects(5)
            .user_agent(concat!("libvirt-volume-provisioner/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Fetcher { agent, retry }
    }

    /// The expected digest from `<image_url>.sha256`, or `None` when the
    /// server has no such file (404, 403 or 410).
    pub fn sidecar_digest(&self, image_url: &str) -> Result<Option<String>, FetchError> {
        let url = sidecar_url(image_url);
        let shown = redact(&url);
        let resp = self
            .agent
            .get(&url)
            .call()
            .map_err(|source| FetchError::Transport { url: shown.clone(), source })?;
        match resp.status().as_u16() {
            200..=299 => {}
            403 | 404 | 410 => return Ok(None),
            code => return Err(FetchError::Status { url: shown, code }),
        }
        let mut text = String::new();
        resp.into_body()
            .into_with_config()
            .limit(SIDECAR_LIMIT)
            .reader()
            .read_to_string(&mut text)
            .map_err(|e| FetchError::Sidecar { url: shown.clone(), reason: e.to_string() })?;
        let name = file_name(image_url);
        parse_sidecar(&text, name)
            .map(Some)
            .map_err(|reason| FetchError::Sidecar { url: shown, reason })
    }

    /// Streams `url` into `out`, hashing as it goes. `progress` gets the
    /// bytes so far and the total when the server announced one.
    ///
    /// Connection errors, resets, stalls and 5xx answers are retried with
    /// doubling delays. After a drop mid-body the download resumes with a
    /// `Range` request pinned by `If-Range` to the object's strong ETag or
    /// Last-Modified; a server that ignores the range, or an object that
    /// changed, answers 200 and the download starts over. The digest of
    /// what ends up in `out` is the only verdict that counts.
    pub fn download(
        &self,
        url: &str,
        out: &mut File,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<Downloaded, FetchError> {
        let mut state = Transfer {
            url,
            shown: redact(url),
            hasher: Sha256::new(),
            done: 0,
            total: None,
            validator: None,
        };
        let mut failures = 0u32;
        loop {
            let before = state.done;
            match self.attempt(&mut state, out, cancel, progress) {
                Ok(()) => {
                    let sha256 = crate::tokens::hex(&state.hasher.finalize());
                    return Ok(Downloaded { sha256, bytes: state.done });
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => {
                    // Count only failures in a row: a long download on a
                    // flaky link may drop many times and still finish.
                    failures = if state.done > before { 1 } else { failures + 1 };
                    if failures > self.retry.retries {
                        return Err(e);
                    }
                    let delay = self.retry.delay(failures);
                    let how = if state.done > 0 && state.validator.is_some() {
                        format!("resuming at byte {}", state.done)
                    } else {
                        "starting over".to_string()
                    };
                    log::warn!(
                        "{}; retry {failures} of {} in {}s, {how}",
                        crate::error::chain(&e),
                        self.retry.retries,
                        delay.as_secs_f32()
                    );
                    sleep_unless_cancelled(delay, cancel)?;
                }
            }
        }
    }

    /// One GET of the image, from `state.done` on when resuming.
    fn attempt(
        &self,
        st: &mut Transfer,
        out: &mut File,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<(), Attempt> {
        if cancel.load(Ordering::Relaxed) {
            return Err(Attempt::Fatal(FetchError::Cancelled));
        }
        let resuming = st.done > 0 && st.validator.is_some();
        if st.done > 0 && !resuming {
            st.restart(out)?;
        }
        let mut request = self.agent.get(st.url);
        if let (true, Some(validator)) = (resuming, &st.validator) {
            request = request
                .header("Range", format!("bytes={}-", st.done))
                .header("If-Range", validator.as_str());
        }
        let resp = request.call().map_err(|source| {
            let retry = is_transient(&source);
            let e = FetchError::Transport { url: st.shown.clone(), source };
            if retry {
                Attempt::Retry(e)
            } else {
                Attempt::Fatal(e)
            }
        })?;
        let code = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers().get(name).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string())
        };
        let length = header("content-length").and_then(|v| v.parse::<u64>().ok());
        match code {
            206 if resuming => {
                match header("content-range").as_deref().and_then(parse_content_range) {
                    Some((start, size)) if start == st.done => {
                        log::info!("{}: resumed at byte {start}", st.shown);
                        st.total = size.or(st.total);
                    }
                    _ => {
                        // A range we did not ask for: trust nothing, start over.
                        st.validator = None;
                        return Err(Attempt::Retry(FetchError::Broken {
                            url: st.shown.clone(),
                            reason: "server answered a different byte range than asked".into(),
                        }));
                    }
                }
            }
            200..=299 => {
                if resuming {
                    log::info!("{}: server sent the whole object again; starting over", st.shown);
                    st.restart(out)?;
                }
                st.total = length;
                st.validator = header("etag")
                    .filter(|e| !e.starts_with("W/"))
                    .or_else(|| header("last-modified"));
            }
            408 | 429 | 500..=599 => {
                return Err(Attempt::Retry(FetchError::Status { url: st.shown.clone(), code }))
            }
            _ => return Err(Attempt::Fatal(FetchError::Status { url: st.shown.clone(), code })),
        }
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        progress(st.done, st.total);
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(Attempt::Fatal(FetchError::Cancelled));
            }
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let source = ureq::Error::Io(e);
                    let url = st.shown.clone();
                    return Err(Attempt::Retry(FetchError::Transport { url, source }));
                }
            };
            st.hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|source| Attempt::Fatal(FetchError::Write { source }))?;
            st.done += n as u64;
            progress(st.done, st.total);
        }
        if let Some(total) = st.total {
            if st.done < total {
                let reason = format!("connection closed at byte {} of {total}", st.done);
                return Err(Attempt::Retry(FetchError::Broken { url: st.shown.clone(), reason }));
            }
        }
        Ok(())
    }
}

/// How failed downloads are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first failure, in a row without progress.
    pub retries: u32,
    /// Wait before the first retry; doubled for each further one.
    pub first_delay: Duration,
}

impl RetryPolicy {
    /// Longest wait between two attempts.
    const MAX_DELAY: Duration = Duration::from_secs(60);

    fn delay(&self, failure: u32) -> Duration {
        let factor = 1u32 << failure.saturating_sub(1).min(16);
        (self.first_delay * factor).min(Self::MAX_DELAY)
    }
}

/// A download in progress, across attempts.
struct Transfer<'a> {
    url: &'a str,
    shown: String,
    hasher: Sha256,
    done: u64,
    total: Option<u64>,
    /// Strong ETag or Last-Modified of the object, for `If-Range`.
    validator: Option<String>,
}

impl Transfer<'_> {
    /// Throws away what was downloaded so far.
    fn restart(&mut self, out: &mut File) -> Result<(), Attempt> {
        let write = |source| Attempt::Fatal(FetchError::Write { source });
        out.set_len(0).map_err(write)?;
        out.seek(SeekFrom::Start(0)).map_err(write)?;
        self.hasher = Sha256::new();
        self.done = 0;
        self.total = None;
        Ok(())
    }
}

enum Attempt {
    /// Worth trying again: the network or the server may recover.
    Retry(FetchError),
    /// Trying again would give the same answer.
    Fatal(FetchError),
}

impl From<Attempt> for FetchError {
    fn from(a: Attempt) -> FetchError {
        match a {
            Attempt::Retry(e) | Attempt::Fatal(e) => e,
        }
    }
}

/// Whether a ureq error is one a later attempt may not meet.
fn is_transient(e: &ureq::Error) -> bool {
    matches!(
        e,
        ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Protocol(_)
    )
}

fn sleep_unless_cancelled(delay: Duration, cancel: &AtomicBool) -> Result<(), FetchError> {
    let until = std::time::Instant::now() + delay;
    while std::time::Instant::now() < until {
        if cancel.load(Ordering::Relaxed) {
            return Err(FetchError::Cancelled);
        }
        std::thread::sleep(Duration::from_millis(50).min(delay));
    }
    Ok(())
}

/// `bytes START-END/SIZE` → (START, SIZE); SIZE may be `*`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let size = if size == "*" { None } else { Some(size.parse().ok()?) };
    Some((start.parse().ok()?, size))
}

/// `<image_url>.sha256`, added to the path: a query string (a presigned
/// URL's signature) is not carried over, since it would not cover the
/// sidecar object anyway.
pub fn sidecar_url(image_url: &str) -> String {
    let base = image_url.split(['?', '#']).next().unwrap_or(image_url);
    format!("{base}.sha256")
}

/// The URL without its query string, for logs and errors: presigned URLs
/// carry credentials there.
pub fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

/// The last path segment of a URL: the image's file name.
pub fn file_name(url: &str) -> &str {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or(path)
}

/// Reads a digest file: a bare hex digest, `sha256sum` output (one or two
/// spaces, or ` *` for binary mode) or BSD `SHA256 (name) = hex` lines. Of
/// several lines, the one naming `image_name` counts.
pub fn parse_sidecar(text: &str, image_name: &str) -> Result<String, String> {
    let mut entries: Vec<(String, Option<String>)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("SHA256 (") {
            if let Some((name, hex)) = rest.rsplit_once(") = ") {
                entries.push((hex.trim().to_string(), Some(base_name(name).to_string())));
                continue;
            }
        }
        let mut parts = line.splitn(2, [' ', '\t']);
        let hex = parts.next().unwrap_or_default().to_string();
        let name = parts
            .next()
            .map(|n| n.trim_start_matches([' ', '\t']).trim_start_matches('*'))
            .filter(|n| !n.is_empty())
            .map(|n| base_name(n).to_string());
        entries.push((hex, name));
    }
    let chosen = match entries.as_slice() {
        [] => return Err("holds no digest".into()),
        [(hex, _)] => hex,
        many => match many.iter().find(|(_, n)| n.as_deref() == Some(image_name)) {
            Some((hex, _)) => hex,
            None => return Err(format!("lists no digest for {image_name}")),
        },
    };
    normalize_sha256(chosen).ok_or_else(|| format!("{chosen:?} is not a SHA-256 hex digest"))
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Lower-case 64-digit hex, or `None` when `text` is not a SHA-256 digest.
pub fn normalize_sha256(text: &str) -> Option<String> {
    let t = text.trim();
    (t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit())).then(|| t.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn test_sidecar_forms() {
        let up = D.to_ascii_uppercase();
        for text in [
            D.to_string(),
            format!("{D}\n"),
            format!("{up}\r\n"),
            format!("{D}  disk.qcow2\n"),
            format!("{D} disk.qcow2"),
            format!("{D} *disk.qcow2\r\n"),
            format!("{D}  /build/out/disk.qcow2   \n"),
            format!("SHA256 (disk.qcow2) = {D}\n"),
        ] {
            assert_eq!(parse_sidecar(&text, "disk.qcow2").as_deref(), Ok(D), "{text:?}");
        }
    }

    /// A sidecar listing a whole directory must pick the image's own line,
    /// not the first one.
    #[test]
    fn sidecar_with_several_files_picks_the_image() {
        let other = "0".repeat(64);
        let text = format!("{other}  other.qcow2\n{D}  disk.qcow2\n");
        assert_eq!(parse_sidecar(&text, "disk.qcow2").as_deref(), Ok(D));
        assert_eq!(
            parse_sidecar(&text, "missing.qcow2").unwrap_err(),
            "lists no digest for missing.qcow2"
        );
    }

    #[test]
    fn test_bad_sidecars() {
        assert_eq!(parse_sidecar("", "x").unwrap_err(), "holds no digest");
        assert!(parse_sidecar("abc123  x", "x").unwrap_err().contains("not a SHA-256"));
        assert!(parse_sidecar("<html>not found</html>", "x").is_err());
    }

    #[test]
    fn test_content_range_and_backoff() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
        let p = RetryPolicy { retries: 9, first_delay: Duration::from_secs(1) };
        let delays: Vec<u64> = (1..=8).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn test_urls() {
        assert_eq!(sidecar_url("http://h/a/b.qcow2"), "http://h/a/b.qcow2.sha256");
        assert_eq!(sidecar_url("https://h/b.qcow2?X-Sig=1"), "https://h/b.qcow2.sha256");
        assert_eq!(redact("https://h/b?X-Amz-Signature=s"), "https://h/b?…");
        assert_eq!(file_name("https://h/a/b.qcow2?x=1"), "b.qcow2");
    }
}
