//! Image downloads with ureq: streaming to a [`Sink`] while hashing, and the
//! `<image_url>.sha256` sidecar.
//!
//! Bytes go to the caller's sink exactly as the server sends them (no
//! content decoding) and are hashed on the way, so nothing is read back to
//! be verified. One thread receives; a helper thread hashes (SHA-NI where
//! the CPU has it: sha2 detects it at run time) and stores, so the two
//! overlap. The stall timeout bounds the wait for each read: a server that
//! stops sending fails the download instead of hanging a worker.
//!
//! Every GET goes through [`Fetcher::get`], which follows redirects itself
//! (ureq's own following is off) so that each hop is checked against the
//! source policy, signed for S3 only when that hop's origin is a configured
//! endpoint, and sent through the proxy that hop's scheme calls for. The
//! agent's resolver ([`crate::policy::PolicyResolver`]) refuses denied
//! networks after name resolution and before any connection. TLS trusts the
//! system's roots plus the `--source-ca` bundle.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use ureq::http::Uri;

use crate::policy::{PolicyError, PolicyResolver, SourcePolicy};
use crate::s3::S3Signer;

/// Read size for downloads: large enough to keep syscalls and hashing
/// efficient, small enough that cancel is noticed quickly.
const CHUNK: usize = 256 * 1024;

/// Download buffers in flight between the receiving thread and the one
/// that hashes and stores: enough to keep both busy, 1 MiB in all.
const BUFFERS: usize = 4;

/// Largest sidecar we read: a `sha256sum` listing of many files.
const SIDECAR_LIMIT: u64 = 64 * 1024;

/// Redirects followed for one GET: enough for a CDN or a bucket alias,
/// few enough that a loop fails fast.
const MAX_REDIRECTS: usize = 5;

/// Largest S3 error body we read to find its `<Code>`.
const ERROR_BODY_LIMIT: u64 = 16 * 1024;

#[derive(Debug)]
pub enum FetchError {
    /// The server answered with an HTTP error status.
    Status { url: String, code: u16 },
    /// The connection failed, timed out or broke mid-body.
    Transport { url: String, source: ureq::Error },
    /// Writing the downloaded bytes failed: to the cache file, or for a raw
    /// image to the new volume (which may be too small).
    Write { source: io::Error },
    /// The server broke the transfer in a way HTTP allows (short body,
    /// wrong range).
    Broken { url: String, reason: String },
    /// The sidecar file exists but holds no usable digest.
    Sidecar { url: String, reason: String },
    /// The job was cancelled during the download.
    Cancelled,
    /// The source policy refused the URL, a redirect hop or an address.
    /// `via` is the URL that redirected to the refused one.
    Refused { source: PolicyError, via: Option<String> },
    /// The TLS handshake failed: an unknown CA (see `--source-ca`), a
    /// name mismatch, an expired certificate.
    Tls { url: String, host: String, reason: String },
    /// A signed request was refused by the bucket for its credentials:
    /// wrong secret, unknown key, wrong region, or a skewed clock.
    Credentials { url: String, code: u16, s3_code: Option<String> },
    /// A redirect we will not follow: no Location, too many, https to http.
    Redirect { url: String, reason: String },
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Status { url, code } => write!(f, "GET {url} answered HTTP {code}"),
            FetchError::Transport { url, .. } => write!(f, "GET {url} failed"),
            FetchError::Write { .. } => write!(f, "storing the downloaded bytes failed"),
            FetchError::Broken { url, reason } => write!(f, "GET {url}: {reason}"),
            FetchError::Sidecar { url, reason } => write!(f, "digest file {url}: {reason}"),
            FetchError::Cancelled => write!(f, "download cancelled"),
            FetchError::Refused { source, via: None } => write!(f, "source policy: {source}"),
            FetchError::Refused { source, via: Some(via) } => {
                write!(f, "source policy: {source} (redirected there by {via})")
            }
            FetchError::Tls { url, host, reason } => {
                write!(f, "GET {url}: TLS with {host} failed: {reason}")?;
                if reason.contains("UnknownIssuer") {
                    write!(f, " (is its CA in the system roots or --source-ca?)")?;
                }
                Ok(())
            }
            FetchError::Credentials { url, code, s3_code } => {
                let why = s3_code.as_deref().map(|c| format!(" {c}")).unwrap_or_default();
                write!(
                    f,
                    "GET {url}: the bucket refused the credentials (HTTP {code}{why}); \
                     check the key and secret (--s3-credentials or AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY), --s3-region and the host's clock"
                )
            }
            FetchError::Redirect { url, reason } => write!(f, "GET {url}: {reason}"),
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

/// Where downloaded bytes go: the cache's temporary file, and for a raw
/// image possibly a new volume as well (see [`crate::write::VolumeTee`]).
pub trait Sink {
    /// The server announced `len` bytes in all; a sink that cannot take
    /// that many refuses here, before any byte arrives.
    fn expect(&mut self, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Takes `data`, the bytes of the image from `offset` on. Offsets only
    /// grow, and follow one another, until a [`Sink::reset`].
    fn put(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Forgets every byte so far: the download starts over.
    fn reset(&mut self) -> io::Result<()>;
    /// The download ended whole at `len` bytes.
    fn finish(&mut self, len: u64) -> io::Result<()>;
}

/// A file that takes a download and leaves every all-zero block of
/// [`SPARSE_BLOCK`] bytes as a hole: a raw image, mostly zeros, then costs
/// its data in writes and in the flush, not its whole length. Reads see
/// the same bytes either way.
pub struct SparseFile {
    pub file: File,
}

/// The granularity of holes in a [`SparseFile`]: a multiple of every
/// common file system block size.
pub const SPARSE_BLOCK: usize = 64 * 1024;

impl Sink for SparseFile {
    fn put(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        write_skipping_zeros(&self.file, offset, data)
    }

    fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)
    }

    fn finish(&mut self, len: u64) -> io::Result<()> {
        // A trailing hole needs the length set; set it always.
        self.file.set_len(len)
    }
}

/// Writes `data` at `offset` in `file`, skipping the all-zero blocks of
/// [`SPARSE_BLOCK`] bytes (counted from `offset`) and merging the rest into
/// as few writes as possible. Only for a file whose skipped range already
/// reads as zeros.
pub fn write_skipping_zeros(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    for block in data.chunks(SPARSE_BLOCK) {
        let zero = is_zero(block);
        match (zero, run_start) {
            (true, Some(start)) => {
                file.write_all_at(&data[start..at], offset + start as u64)?;
                run_start = None;
            }
            (false, None) => run_start = Some(at),
            _ => {}
        }
        at += block.len();
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

/// Whether every byte of `buf` is zero. ORs 64-byte groups together so the
/// compiler can use vector registers.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut groups = buf.chunks_exact(64);
    for group in &mut groups {
        let mut acc = 0u64;
        for word in group.chunks_exact(8) {
            acc |= u64::from_ne_bytes(word.try_into().unwrap());
        }
        if acc != 0 {
            return false;
        }
    }
    groups.remainder().iter().all(|&b| b == 0)
}

/// What a finished download produced.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub sha256: String,
    pub bytes: u64,
}

/// Everything that decides where downloads go and whom they trust.
pub struct FetchOptions {
    /// The longest wait for any single read from the server.
    pub stall: Duration,
    pub retry: RetryPolicy,
    pub policy: Arc<SourcePolicy>,
    /// Trusted roots for https sources: the system's and `--source-ca`.
    pub roots: Vec<CertificateDer<'static>>,
    pub proxies: Proxies,
    pub signer: Option<S3Signer>,
}

pub struct Fetcher {
    agent: ureq::Agent,
    retry: RetryPolicy,
    policy: Arc<SourcePolicy>,
    proxies: Proxies,
    signer: Option<S3Signer>,
}

/// One answered GET, after redirects.
struct Answer {
    resp: ureq::http::Response<ureq::Body>,
    /// The URL that answered, redacted for messages.
    shown: String,
    /// Whether the request that got this answer was signed.
    signed: bool,
}

impl Fetcher {
    pub fn new(opts: FetchOptions) -> Fetcher {
        let roots: Vec<ureq::tls::Certificate<'static>> = opts
            .roots
            .iter()
            .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(opts.stall))
            // We follow redirects ourselves, checking each hop.
            .max_redirects(0)
            // Chosen per request by `Proxies::for_url`; ureq's own reading
            // of the environment would use one proxy for both schemes.
            .proxy(None)
            .tls_config(tls)
            .user_agent(concat!("libvirt-volume-provisioner/", env!("CARGO_PKG_VERSION")))
            .build();
        let resolver = PolicyResolver::new(Arc::clone(&opts.policy), opts.proxies.authorities());
        let agent = ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::new(),
            resolver,
        );
        Fetcher {
            agent,
            retry: opts.retry,
            policy: opts.policy,
            proxies: opts.proxies,
            signer: opts.signer,
        }
    }

    /// The source policy, for the API's check at submission.
    pub fn policy(&self) -> &SourcePolicy {
        &self.policy
    }

    /// GET `url` with `extra` headers, following up to [`MAX_REDIRECTS`]
    /// redirects. Each hop is checked against the source policy before it
    /// is requested; the resolver checks its addresses before connecting.
    fn get(&self, url: &str, extra: &[(&'static str, String)]) -> Result<Answer, FetchError> {
        let mut current = url.to_string();
        let mut via: Option<String> = None;
        for hop in 0..=MAX_REDIRECTS {
            let shown = redact(&current);
            let refused = |source| FetchError::Refused { source, via: via.clone() };
            self.policy.check_url(&current).map_err(refused)?;
            let uri: Uri = current.parse().map_err(|_| FetchError::Redirect {
                url: shown.clone(),
                reason: "not a valid URL".into(),
            })?;
            let host = uri.host().unwrap_or_default().to_string();
            let proxy = self.proxies.for_url(&uri).cloned();
            if let Some(p) = &proxy {
                log::debug!("{shown}: through the proxy {}:{}", p.host(), p.port());
                // The proxy connects, not we: check what the name means here.
                let port = uri.port_u16().unwrap_or(default_port(&uri));
                self.policy.check_name(&host, port).map_err(refused)?;
            }
            let mut request = self.agent.get(&current);
            for (name, value) in extra {
                request = request.header(*name, value);
            }
            let signer = self.signer.as_ref().filter(|s| s.applies(&current));
            if let Some(s) = signer {
                for (name, value) in s.sign_get(&current, SystemTime::now()) {
                    request = request.header(name, value);
                }
            }
            let resp =
                request.config().proxy(proxy).build().call().map_err(|source| {
                    match classify(&shown, &host, source) {
                        FetchError::Refused { source, .. } => refused(source),
                        other => other,
                    }
                })?;
            let code = resp.status().as_u16();
            if !matches!(code, 301 | 302 | 303 | 307 | 308) {
                return Ok(Answer { resp, shown, signed: signer.is_some() });
            }
            let redirect = |reason: String| FetchError::Redirect { url: shown.clone(), reason };
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| redirect(format!("HTTP {code} redirect without a Location")))?;
            if hop == MAX_REDIRECTS {
                return Err(redirect(format!("more than {MAX_REDIRECTS} redirects")));
            }
            let next = join_url(&current, location.trim());
            if !next.starts_with("http://") && !next.starts_with("https://") {
                return Err(redirect(format!("refusing a redirect to {}", redact(&next))));
            }
            // The same rule as for a submitted image_url: credentials in a
            // URL would be sent as Basic auth to whoever the hop names.
            let with_userinfo = next
                .parse::<Uri>()
                .ok()
                .and_then(|u| u.authority().map(|a| a.as_str().contains('@')))
                .unwrap_or(true);
            if with_userinfo {
                return Err(redirect(format!(
                    "refusing a redirect to {} (credentials in a URL, or not a valid URL)",
                    redact_userinfo(&redact(&next))
                )));
            }
            if current.starts_with("https:") && !next.starts_with("https:") {
                return Err(redirect(format!(
                    "refusing a redirect from https to {}",
                    redact(&next)
                )));
            }
            log::info!("{shown}: HTTP {code}, redirected to {}", redact(&next));
            via = Some(shown);
            current = next;
        }
        unreachable!("the loop returns by its last hop")
    }

    /// The expected digest from `<image_url>.sha256`, or `None` when the
    /// server has no such file (404, 403 or 410).
    pub fn sidecar_digest(&self, image_url: &str) -> Result<Option<String>, FetchError> {
        let url = sidecar_url(image_url);
        let Answer { resp, shown, signed } = self.get(&url, &[])?;
        match resp.status().as_u16() {
            200..=299 => {}
            code @ (401 | 403) if signed => {
                // A missing object answers 403 to a caller without list
                // rights; only a refusal of the credentials is an error.
                let s3_code = s3_error_code(resp);
                if s3_code.as_deref().is_some_and(crate::s3::is_credential_error) || code == 401 {
                    return Err(FetchError::Credentials { url: shown, code, s3_code });
                }
                return Ok(None);
            }
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
        out: &mut (dyn Sink + Send),
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
                    out.finish(state.done).map_err(|source| FetchError::Write { source })?;
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
        out: &mut (dyn Sink + Send),
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
        let mut extra = Vec::new();
        if let (true, Some(validator)) = (resuming, &st.validator) {
            extra.push(("Range", format!("bytes={}-", st.done)));
            extra.push(("If-Range", validator.clone()));
        }
        let Answer { resp, signed, .. } = self.get(st.url, &extra).map_err(|e| match &e {
            FetchError::Transport { source, .. } if is_transient(source) => Attempt::Retry(e),
            _ => Attempt::Fatal(e),
        })?;
        let code = resp.status().as_u16();
        if signed && matches!(code, 401 | 403) {
            let s3_code = s3_error_code(resp);
            let url = st.shown.clone();
            return Err(Attempt::Fatal(FetchError::Credentials { url, code, s3_code }));
        }
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
        if let Some(total) = st.total {
            out.expect(total).map_err(|source| Attempt::Fatal(FetchError::Write { source }))?;
        }
        let mut reader = resp.into_body().into_reader();
        progress(st.done, st.total);
        // Two threads: this one receives, a helper hashes and stores, so
        // SHA-256 and the writes overlap the network instead of following
        // it. Buffers go round between them; at most BUFFERS are in flight.
        let (full_tx, full_rx) = crossbeam_channel::bounded::<(Vec<u8>, usize)>(BUFFERS);
        let (empty_tx, empty_rx) = crossbeam_channel::bounded::<Vec<u8>>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = empty_tx.send(vec![0u8; CHUNK]);
        }
        let (shown, st_total) = (st.shown.clone(), st.total);
        let mut received = st.done;
        let (outcome, taken) = std::thread::scope(|scope| {
            let consumer = scope.spawn(|| -> Result<(), Attempt> {
                for (buf, n) in full_rx {
                    st.take(out, &buf[..n])?;
                    let _ = empty_tx.send(buf);
                }
                Ok(())
            });
            let outcome = (|| -> Result<(), Attempt> {
                let mut ended = false;
                while !ended {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(Attempt::Fatal(FetchError::Cancelled));
                    }
                    // The helper stopped (a write failed): it says why.
                    let Ok(mut buf) = empty_rx.recv() else { return Ok(()) };
                    // Fill the whole buffer (or reach the end), so that the
                    // sink sees CHUNK-aligned blocks and can leave whole
                    // zero blocks as holes.
                    let mut n = 0;
                    let mut failed = None;
                    while n < buf.len() {
                        match reader.read(&mut buf[n..]) {
                            Ok(0) => {
                                ended = true;
                                break;
                            }
                            Ok(got) => n += got,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    // Keep what arrived whole: a resume starts after it.
                    if n > 0 && full_tx.send((buf, n)).is_err() {
                        return Ok(());
                    }
                    received += n as u64;
                    progress(received, st_total);
                    if let Some(e) = failed {
                        let source = ureq::Error::Io(e);
                        let url = shown.clone();
                        return Err(Attempt::Retry(FetchError::Transport { url, source }));
                    }
                }
                Ok(())
            })();
            drop(full_tx);
            let taken = consumer.join().expect("the hashing thread does not panic");
            (outcome, taken)
        });
        // A failed write outranks what the receiving side saw.
        taken?;
        outcome?;
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
    /// Hashes `data`, the bytes that follow `done`, and hands them to `out`.
    fn take(&mut self, out: &mut (dyn Sink + Send), data: &[u8]) -> Result<(), Attempt> {
        self.hasher.update(data);
        out.put(self.done, data).map_err(|source| Attempt::Fatal(FetchError::Write { source }))?;
        self.done += data.len() as u64;
        Ok(())
    }

    /// Throws away what was downloaded so far.
    fn restart(&mut self, out: &mut (dyn Sink + Send)) -> Result<(), Attempt> {
        out.reset().map_err(|source| Attempt::Fatal(FetchError::Write { source }))?;
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

/// The typed error for a failed call: a policy refusal from the resolver,
/// a TLS failure naming the host and rustls's reason, or plain transport.
fn classify(shown: &str, host: &str, source: ureq::Error) -> FetchError {
    if let Some(refusal) = crate::policy::refusal(&source) {
        return FetchError::Refused { source: refusal.clone(), via: None };
    }
    let tls = match &source {
        ureq::Error::Rustls(e) => Some(e.to_string()),
        ureq::Error::Tls(e) => Some(e.to_string()),
        ureq::Error::Io(io) => {
            io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).map(|e| e.to_string())
        }
        _ => None,
    };
    match tls {
        Some(reason) => FetchError::Tls { url: shown.to_string(), host: host.to_string(), reason },
        None => FetchError::Transport { url: shown.to_string(), source },
    }
}

/// The S3 `<Code>` of an error answer, read from a bounded body.
fn s3_error_code(resp: ureq::http::Response<ureq::Body>) -> Option<String> {
    let mut text = String::new();
    resp.into_body()
        .into_with_config()
        .limit(ERROR_BODY_LIMIT)
        .reader()
        .read_to_string(&mut text)
        .ok()?;
    crate::s3::error_code(&text)
}

fn default_port(uri: &Uri) -> u16 {
    if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    }
}

/// `location` resolved against `base`, as a browser would for the common
/// forms: absolute, scheme-relative, absolute path, relative path.
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    if let Some(auth_path) = location.strip_prefix("//") {
        return format!("{scheme}://{auth_path}");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}");
    }
    let path = rest[authority.len()..].split(['?', '#']).next().unwrap_or("");
    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    format!("{scheme}://{authority}{dir}/{location}")
}

/// Forward proxies for image downloads, one per scheme, and the hosts
/// reached directly. From `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (or
/// their lower-case forms), unless `--proxy`/`--no-proxy` override them.
/// ureq tunnels both schemes with CONNECT, so an https source's headers
/// (signatures included) reach the proxy only inside TLS.
#[derive(Debug, Clone, Default)]
pub struct Proxies {
    pub http: Option<ureq::Proxy>,
    pub https: Option<ureq::Proxy>,
    /// `NO_PROXY` entries: host names (a leading `.` or `*.` matches
    /// subdomains too), IP addresses or networks, or `*` for all.
    pub no_proxy: Vec<String>,
}

impl Proxies {
    /// From the flags when given, else from the environment. `--proxy none`
    /// turns proxies off whatever the environment says.
    pub fn configure(flag: Option<&str>, no_proxy_flag: Option<&str>) -> Result<Proxies, String> {
        let env = |names: &[&str]| {
            names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
        };
        let parse = |what: &str, text: &str| -> Result<ureq::Proxy, String> {
            let text = text.trim();
            let scheme_ok = !text.contains("://")
                || text.starts_with("http://")
                || text.starts_with("https://");
            if !scheme_ok {
                return Err(format!(
                    "{what} {:?}: only http:// and https:// proxies are supported",
                    redact_userinfo(text)
                ));
            }
            ureq::Proxy::new(text)
                .map_err(|e| format!("{what} {:?} is not a proxy URL: {e}", redact_userinfo(text)))
        };
        let (http, https) = match flag {
            Some("none") => (None, None),
            Some(p) => {
                let p = parse("--proxy", p)?;
                (Some(p.clone()), Some(p))
            }
            None => {
                let http = env(&["http_proxy", "HTTP_PROXY"])
                    .map(|v| parse("HTTP_PROXY", &v))
                    .transpose()?;
                let https = env(&["https_proxy", "HTTPS_PROXY"])
                    .map(|v| parse("HTTPS_PROXY", &v))
                    .transpose()?;
                (http, https)
            }
        };
        let no_proxy = match no_proxy_flag {
            Some(v) => v.to_string(),
            None => env(&["no_proxy", "NO_PROXY"]).unwrap_or_default(),
        };
        let no_proxy = no_proxy
            .split(',')
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty())
            .collect();
        Ok(Proxies { http, https, no_proxy })
    }

    /// The proxy a request for `uri` goes through, if any.
    pub fn for_url(&self, uri: &Uri) -> Option<&ureq::Proxy> {
        let proxy = match uri.scheme_str() {
            Some("https") => self.https.as_ref(),
            _ => self.http.as_ref(),
        }?;
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_ascii_lowercase();
        (!self.no_proxy.iter().any(|e| no_proxy_matches(e, &host))).then_some(proxy)
    }

    /// `host:port` of every configured proxy, which the resolver lets
    /// through whatever the denied networks say.
    fn authorities(&self) -> Vec<String> {
        [&self.http, &self.https]
            .into_iter()
            .flatten()
            .map(|p| format!("{}:{}", p.host(), p.port()))
            .collect()
    }

    /// One line for the start-up log, without proxy credentials.
    pub fn summary(&self) -> String {
        let show = |p: &Option<ureq::Proxy>| {
            p.as_ref()
                .map(|p| format!("{}:{}", p.host(), p.port()))
                .unwrap_or_else(|| "direct".into())
        };
        let mut s = format!("http via {}, https via {}", show(&self.http), show(&self.https));
        if !self.no_proxy.is_empty() && (self.http.is_some() || self.https.is_some()) {
            s.push_str(&format!(", direct for {}", self.no_proxy.join(",")));
        }
        s
    }
}

/// Whether one `NO_PROXY` entry covers `host`.
fn no_proxy_matches(entry: &str, host: &str) -> bool {
    if entry == "*" {
        return true;
    }
    if let (Ok(net), Ok(ip)) = (crate::policy::Net::parse(entry), host.parse()) {
        return net.contains(ip);
    }
    let entry = entry.trim_start_matches("*.").trim_start_matches('.');
    // Like curl: `example.com` covers the domain and its subdomains.
    let entry = entry.split(':').next().unwrap_or(entry);
    host == entry || host.ends_with(&format!(".{entry}"))
}

/// A proxy URL with any `user:password@` replaced, for messages.
fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        (None, Some(at)) => format!("…@{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// The roots an https source is checked against: the system's CA bundle
/// (as `rustls-native-certs` finds it; `SSL_CERT_FILE` is honoured) and
/// every certificate in `extra`, the `--source-ca` bundle.
pub fn load_roots(extra: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = found.certs;
    if roots.is_empty() {
        log::warn!(
            "no system CA certificates found ({}); https sources are trusted only through --source-ca",
            found.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
        );
    }
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                format!("--source-ca {}: cannot read PEM certificates ({e})", path.display())
            })?;
        if certs.is_empty() {
            return Err(format!("--source-ca {}: holds no PEM certificate", path.display()));
        }
        roots.extend(certs);
    }
    Ok(roots)
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

    use std::fs;

    const D: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn test_is_zero() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 200]));
        for at in [0, 63, 64, 130, 199] {
            let mut b = [0u8; 200];
            b[at] = 1;
            assert!(!is_zero(&b), "a one at {at} is seen");
        }
    }

    /// The sparse sink keeps every byte and leaves zero blocks unallocated.
    #[test]
    fn test_sparse_file_holds_the_bytes_with_holes() {
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(format!("lvp-sparse-{}", std::process::id()));
        let file = File::options().create(true).truncate(true).read(true).write(true).open(&path);
        let mut sink = SparseFile { file: file.unwrap() };
        let block = SPARSE_BLOCK;
        let mut data = vec![0u8; 64 * block];
        data[3 * block + 5] = 7; // one block of data in 64
        data[40 * block..41 * block].fill(9);
        // Offsets that are not block multiples, as a resumed download has.
        let (a, b) = data.split_at(10 * block + 123);
        sink.put(0, a).unwrap();
        sink.put(a.len() as u64, b).unwrap();
        sink.finish(data.len() as u64).unwrap();
        assert_eq!(fs::read(&path).unwrap(), data);
        let allocated = fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 4 * block as u64, "{allocated} bytes allocated for 2 data blocks");
        sink.reset().unwrap();
        sink.put(0, b"abc").unwrap();
        sink.finish(3).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abc", "reset forgets the earlier bytes");
        fs::remove_file(&path).unwrap();
    }

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

    #[test]
    fn test_redirect_locations() {
        let b = "https://h:9/a/b/c.qcow2?x=1";
        assert_eq!(join_url(b, "http://o/x"), "http://o/x");
        assert_eq!(join_url(b, "//o/x"), "https://o/x");
        assert_eq!(join_url(b, "/x/y"), "https://h:9/x/y");
        assert_eq!(join_url(b, "d.qcow2"), "https://h:9/a/b/d.qcow2");
        assert_eq!(join_url("http://h", "d"), "http://h/d");
    }

    #[test]
    fn test_no_proxy_entries() {
        assert!(no_proxy_matches("example.com", "example.com"));
        assert!(no_proxy_matches("example.com", "s3.example.com"));
        assert!(no_proxy_matches(".example.com", "s3.example.com"));
        assert!(no_proxy_matches("*.example.com", "s3.example.com"));
        assert!(!no_proxy_matches("example.com", "badexample.com"));
        assert!(no_proxy_matches("127.0.0.0/8", "127.0.0.5"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("10.0.0.1", "127.0.0.1"));
        let p = Proxies {
            http: Some(ureq::Proxy::new("http://127.0.0.1:3128").unwrap()),
            https: None,
            no_proxy: vec!["localhost".into()],
        };
        assert!(p.for_url(&"http://images/x".parse().unwrap()).is_some());
        assert!(p.for_url(&"http://localhost/x".parse().unwrap()).is_none());
        assert!(p.for_url(&"https://images/x".parse().unwrap()).is_none());
        assert_eq!(redact_userinfo("http://u:p@proxy:3128"), "http://…@proxy:3128");
    }
}
