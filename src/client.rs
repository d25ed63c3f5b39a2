//! `client`: speaks the daemon's HTTPS API with the operator's certificates
//! or token, so that no curl recipe is needed. It owns the command-line
//! side only (requests, output, exit status); what the answers mean is the
//! daemon's business.
//!
//! Where it connects: `--url`, else `$LVP_URL`, else [`DEFAULT_URL`]. How
//! it proves who it is: `--cert`/`--key` (mutual TLS) and/or a token from
//! `--token-file` (first line) or `$LVP_TOKEN`, sent as
//! `Authorization: Bearer`. The token is never printed. Without `--ca` the
//! daemon's certificate must chain to a public root (webpki-roots).
//!
//! Output: answers that scripts read go to stdout (a job id, the job JSON,
//! a table); progress and errors go to stderr. An API error is printed as
//! `libvirt-volume-provisioner: <code>: <details>`.
//!
//! Exit statuses: 0 success; 1 the daemon answered with an error, or a
//! followed job ended failed or cancelled; 2 bad usage or configuration (a
//! bad URL, an unreadable certificate or token file, a malformed job id);
//! 3 no answer (connection refused, TLS handshake failed, timeout).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ureq::http::Uri;
use ureq::tls::{ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use crate::cli::{CacheCommand, Client, ClientCommand};

/// Where the client connects when neither `--url` nor `$LVP_URL` is set.
const DEFAULT_URL: &str = "https://localhost:8080";

/// Exit statuses; the module doc and the man page say what each means.
const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_CONNECT: u8 = 3;

/// How long a TCP connect may take before the daemon counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one answer may take, on top of any `?wait=` the client asked
/// for; a daemon slower than this is treated as unreachable.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The `?wait=` used to follow a job when stderr is not a terminal: the
/// daemon answers at each status or stage change, so long polls cost
/// nothing and miss nothing.
const FOLLOW_WAIT_SECS: u64 = 30;

/// The `?wait=` used when drawing a progress bar: the daemon does not end
/// a long poll when only the percentage moves, so a 30 s poll would freeze
/// the bar between stages.
const BAR_WAIT_SECS: u64 = 1;

/// The shortest gap between two status requests while following. A daemon
/// that ignores `?wait=` answers at once; this keeps the client from
/// spinning on it.
const MIN_POLL_GAP: Duration = Duration::from_millis(500);

/// Connection failures tolerated while following a job (a daemon restart),
/// and the pause between attempts.
const FOLLOW_RETRIES: u32 = 5;
const FOLLOW_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// The largest answer read. A job list at the daemon's default
/// `--keep-jobs` of 10000 comes near ureq's 10 MB default.
const MAX_ANSWER_BYTES: u64 = 128 << 20;

/// Width of the progress bar, in characters between the brackets.
const BAR_WIDTH: usize = 24;

/// Why a client command did not succeed; each kind has its exit status.
#[derive(Debug)]
enum ClientError {
    /// The command line or a file it names is unusable (exit 2).
    Usage(String),
    /// No answer from the daemon: refused, TLS failure, timeout (exit 3).
    Connect(String),
    /// The daemon answered with its error body (exit 1).
    Api { code: String, details: String },
    /// The daemon answered something outside the API contract (exit 1).
    Unexpected(String),
}

impl ClientError {
    fn exit_status(&self) -> u8 {
        match self {
            ClientError::Usage(_) => EXIT_USAGE,
            ClientError::Connect(_) => EXIT_CONNECT,
            ClientError::Api { .. } | ClientError::Unexpected(_) => EXIT_FAILED,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Usage(m) | ClientError::Connect(m) | ClientError::Unexpected(m) => {
                f.write_str(m)
            }
            ClientError::Api { code, details } => write!(f, "{code}: {details}"),
        }
    }
}

/// Runs one `client` command; the exit status is as the module doc says.
pub fn run(client: Client) -> ExitCode {
    match run_command(client) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("libvirt-volume-provisioner: {}", printable(&e.to_string()));
            ExitCode::from(e.exit_status())
        }
    }
}

fn run_command(client: Client) -> Result<u8, ClientError> {
    let session = Session::open(&client)?;
    match client.command {
        ClientCommand::Provision(p) => {
            let mut body = json!({
                "image_url": p.image_url,
                "volume_name": p.volume_name,
                "volume_size_gb": p.volume_size_gb,
            });
            // Only what was given: the daemon refuses unknown fields and
            // fills in its own defaults.
            for (field, value) in [
                ("image_type", p.image_type),
                ("correlation_id", p.correlation_id),
                ("image_sha256", p.image_sha256),
            ] {
                if let Some(v) = value {
                    body[field] = Value::from(v);
                }
            }
            let opts = Opts {
                body: Some(&body),
                idempotency_key: p.idempotency_key.as_deref(),
                ..Opts::default()
            };
            let answer = session.send(Method::Post, "/api/v1/provision", opts)?;
            let id = job_id_of(&answer, "provision")?;
            start_or_follow(&session, &id, p.wait)
        }
        ClientCommand::Status(s) => {
            check_job_id(&s.job_id)?;
            if s.wait {
                return follow_to_end(&session, &s.job_id);
            }
            let job = session.status(&s.job_id, None)?;
            print_json(&job);
            Ok(0)
        }
        ClientCommand::Cancel(c) => {
            check_job_id(&c.job_id)?;
            let path = format!("/api/v1/cancel/{}", c.job_id);
            session.send(Method::Delete, &path, Opts::default())?;
            Ok(0)
        }
        ClientCommand::Jobs(j) => {
            let mut query = Vec::new();
            if let Some(s) = &j.status {
                query.push(("status", s.as_str()));
            }
            if let Some(c) = &j.correlation_id {
                query.push(("correlation_id", c.as_str()));
            }
            let opts = Opts { query: &query, ..Opts::default() };
            let answer = session.send(Method::Get, "/api/v1/jobs", opts)?;
            let jobs = list_of(&answer, "jobs")?;
            print!("{}", jobs_table(jobs));
            Ok(0)
        }
        ClientCommand::Cache(c) => match c.command {
            CacheCommand::List(_) => {
                let answer = session.send(Method::Get, "/api/v1/cache", Opts::default())?;
                let entries = list_of(&answer, "entries")?;
                print!("{}", cache_table(entries));
                Ok(0)
            }
            CacheCommand::Prefetch(p) => {
                let mut body = json!({ "image_url": p.image_url });
                if let Some(sha) = p.image_sha256 {
                    body["image_sha256"] = Value::from(sha);
                }
                let opts = Opts { body: Some(&body), ..Opts::default() };
                let answer = session.send(Method::Post, "/api/v1/cache/prefetch", opts)?;
                let id = job_id_of(&answer, "prefetch")?;
                start_or_follow(&session, &id, p.wait)
            }
            CacheCommand::Purge(p) => {
                check_sha256(&p.sha256)?;
                let path = format!("/api/v1/cache/{}", p.sha256.to_ascii_lowercase());
                session.send(Method::Delete, &path, Opts::default())?;
                Ok(0)
            }
        },
    }
}

/// Without `--wait`, prints the new job's id; with it, follows the job.
fn start_or_follow(session: &Session, id: &str, wait: bool) -> Result<u8, ClientError> {
    if wait {
        follow_to_end(session, id)
    } else {
        println!("{id}");
        Ok(0)
    }
}

/// Follows a job until it ends, prints its final JSON on stdout and
/// returns 0 only when it completed.
fn follow_to_end(session: &Session, id: &str) -> Result<u8, ClientError> {
    // SAFETY: isatty only inspects a descriptor number.
    let tty = unsafe { libc::isatty(2) } == 1;
    let mut shown = ProgressView::new(tty);
    let result = follow(session, id, &mut shown);
    shown.finish();
    let job = result?;
    print_json(&job);
    match str_field(&job["status"]) {
        "completed" => Ok(0),
        status => {
            let why = job["error"].as_str().unwrap_or("no error given");
            eprintln!("libvirt-volume-provisioner: job {id} {status}: {}", printable(why));
            Ok(EXIT_FAILED)
        }
    }
}

fn follow(session: &Session, id: &str, shown: &mut ProgressView) -> Result<Value, ClientError> {
    let wait = if shown.tty { BAR_WAIT_SECS } else { FOLLOW_WAIT_SECS };
    let mut job = session.status(id, None)?;
    let mut failures = 0;
    loop {
        shown.update(&job);
        if is_final(&job) {
            return Ok(job);
        }
        let asked = Instant::now();
        let next = match session.status(id, Some(wait)) {
            Ok(next) => {
                failures = 0;
                next
            }
            Err(ClientError::Connect(why)) if failures < FOLLOW_RETRIES => {
                failures += 1;
                shown.interrupt();
                eprintln!(
                    "libvirt-volume-provisioner: {}; retrying ({failures} of {FOLLOW_RETRIES})",
                    printable(&why)
                );
                thread::sleep(FOLLOW_RETRY_PAUSE);
                continue;
            }
            Err(e) => return Err(e),
        };
        let elapsed = asked.elapsed();
        if same_step(&job, &next) && elapsed < MIN_POLL_GAP {
            thread::sleep(MIN_POLL_GAP - elapsed);
        }
        job = next;
    }
}

fn is_final(job: &Value) -> bool {
    matches!(str_field(&job["status"]), "completed" | "failed" | "cancelled")
}

/// Whether two snapshots show the same status and stage: what ends a long
/// poll early. A percentage alone does not.
fn same_step(a: &Value, b: &Value) -> bool {
    a["status"] == b["status"] && a["progress"]["stage"] == b["progress"]["stage"]
}

// ---------------------------------------------------------------- session

#[derive(Clone, Copy, Debug)]
enum Method {
    Get,
    Post,
    Delete,
}

impl Method {
    fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// The daemon's address and the agent that carries our identity. Holds the
/// token, so it deliberately has no `Debug`.
struct Session {
    agent: ureq::Agent,
    base: String,
    authorization: Option<String>,
}

impl Session {
    fn open(client: &Client) -> Result<Session, ClientError> {
        let env_url = std::env::var("LVP_URL").ok().filter(|u| !u.trim().is_empty());
        let base = base_url(client.url.as_deref(), env_url.as_deref())?;
        let tls = tls_config(client)?;
        let token = match &client.token_file {
            Some(path) => Some(token_from_file(path)?),
            None => match std::env::var("LVP_TOKEN") {
                Ok(t) if !t.trim().is_empty() => Some(check_token(t.trim(), "$LVP_TOKEN")?),
                _ => None,
            },
        };
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            // A redirect would carry the request (and maybe the token)
            // somewhere else; the API never redirects.
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("libvirt-volume-provisioner/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Session { agent, base, authorization: token.map(|t| format!("Bearer {t}")) })
    }

    /// `GET /api/v1/status/{id}`, optionally held by the daemon for up to
    /// `wait` seconds.
    fn status(&self, id: &str, wait: Option<u64>) -> Result<Value, ClientError> {
        let path = format!("/api/v1/status/{id}");
        let answer = self.send(Method::Get, &path, Opts { hold: wait, ..Opts::default() })?;
        if !answer.body.is_object() {
            return Err(unexpected(Method::Get, &path, answer.status, "not a job object"));
        }
        Ok(answer.body)
    }

    /// Sends one request. A 2xx answer comes back with its JSON body (null
    /// when empty); anything else becomes a [`ClientError`].
    fn send(&self, method: Method, path: &str, opts: Opts<'_>) -> Result<Answer, ClientError> {
        let url = format!("{}{path}", self.base);
        let hold_text = opts.hold.map(|h| h.to_string());
        let mut query = opts.query.to_vec();
        if let Some(h) = &hold_text {
            query.push(("wait", h.as_str()));
        }
        let timeout = Some(ANSWER_TIMEOUT + Duration::from_secs(opts.hold.unwrap_or(0)));
        let auth = self.authorization.as_deref();
        let result = match method {
            Method::Get | Method::Delete => {
                let mut req = match method {
                    Method::Get => self.agent.get(&url),
                    _ => self.agent.delete(&url),
                };
                req = req.query_pairs(query.iter().copied());
                if let Some(a) = auth {
                    req = req.header("Authorization", a);
                }
                req.header("Accept", "application/json")
                    .config()
                    .timeout_global(timeout)
                    .build()
                    .call()
            }
            Method::Post => {
                let mut req = self.agent.post(&url).query_pairs(query.iter().copied());
                if let Some(a) = auth {
                    req = req.header("Authorization", a);
                }
                if let Some(key) = opts.idempotency_key {
                    req = req.header("Idempotency-Key", key);
                }
                let text = opts.body.map(Value::to_string).unwrap_or_default();
                req.header("Accept", "application/json")
                    .header("Content-Type", "application/json")
                    .config()
                    .timeout_global(timeout)
                    .build()
                    .send(text.as_bytes())
            }
        };
        let mut response = result.map_err(|e| transport_error(e, &self.base))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| transport_error(e, &self.base))?;
        let parsed: Option<Value> = if text.trim().is_empty() {
            Some(Value::Null)
        } else {
            serde_json::from_str(&text).ok()
        };
        if (200..300).contains(&status) {
            let body = parsed.ok_or_else(|| {
                unexpected(method, path, status, &format!("body is not JSON: {}", snippet(&text)))
            })?;
            return Ok(Answer { status, body });
        }
        match parsed.as_ref().and_then(|b| b["error"].as_str().map(|c| (c, b))) {
            Some((code, b)) => Err(ClientError::Api {
                code: code.to_string(),
                details: b["details"].as_str().unwrap_or("(no details)").to_string(),
            }),
            None => Err(unexpected(method, path, status, &snippet(&text))),
        }
    }
}

/// What a request carries besides its method and path.
#[derive(Default)]
struct Opts<'a> {
    query: &'a [(&'a str, &'a str)],
    body: Option<&'a Value>,
    idempotency_key: Option<&'a str>,
    /// Seconds the daemon may hold the answer (`?wait=`).
    hold: Option<u64>,
}

struct Answer {
    status: u16,
    body: Value,
}

fn unexpected(method: Method, path: &str, status: u16, what: &str) -> ClientError {
    ClientError::Unexpected(format!(
        "unexpected answer to {} {path}: HTTP {status}: {what}",
        method.as_str()
    ))
}

/// The first 200 characters of a body, on one line.
fn snippet(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out: String = one_line.chars().take(200).collect();
    if one_line.chars().count() > 200 {
        out.push('…');
    }
    if out.is_empty() {
        out.push_str("(empty body)");
    }
    out
}

/// Sorts a ureq failure into "cannot reach the daemon" (exit 3) or "the
/// URL itself is wrong" (exit 2).
fn transport_error(e: ureq::Error, base: &str) -> ClientError {
    match e {
        ureq::Error::BadUri(why) => ClientError::Usage(format!("URL {base} is not usable ({why})")),
        ureq::Error::Io(io) if tls_cause(&io).is_some() => {
            handshake_failed(base, tls_cause(&io).expect("checked above"))
        }
        ureq::Error::Rustls(tls) => handshake_failed(base, &tls),
        ureq::Error::Tls(why) => ClientError::Connect(format!("TLS with {base} failed: {why}")),
        ureq::Error::Io(io) => ClientError::Connect(format!("cannot connect to {base}: {io}")),
        ureq::Error::HostNotFound => {
            ClientError::Connect(format!("cannot connect to {base}: host not found"))
        }
        ureq::Error::Timeout(t) => {
            ClientError::Connect(format!("no answer from {base} in time ({t} timed out)"))
        }
        ureq::Error::Protocol(why) if base.starts_with("http://") => ClientError::Connect(format!(
            "{base} did not answer in HTTP ({why}); does it want https://?"
        )),
        other => ClientError::Connect(format!("request to {base} failed: {other}")),
    }
}

/// A failed handshake; when the daemon's certificate chains to no CA we
/// trust, the likely fix (a private CA not given with `--ca`) is added.
fn handshake_failed(base: &str, tls: &rustls::Error) -> ClientError {
    let hint = match tls {
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => {
            " (pass --ca with the CA that signed the daemon's certificate)"
        }
        _ => "",
    };
    ClientError::Connect(format!("TLS handshake with {base} failed: {tls}{hint}"))
}

/// The rustls error inside an I/O error, which is how a refused handshake
/// reaches us.
fn tls_cause(io: &io::Error) -> Option<&rustls::Error> {
    io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

// ---------------------------------------------------------------- settings

/// The daemon URL without a trailing slash, from `--url`, `$LVP_URL` or
/// the default, in that order.
fn base_url(flag: Option<&str>, env: Option<&str>) -> Result<String, ClientError> {
    let (text, source) = match (flag, env) {
        (Some(u), _) => (u, "--url"),
        (None, Some(u)) => (u, "$LVP_URL"),
        (None, None) => (DEFAULT_URL, "the default URL"),
    };
    let text = text.trim();
    let bad = |why: &str| ClientError::Usage(format!("{source} {text:?} {why}"));
    let uri: Uri = text.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => return Err(bad("must start with https:// or http://")),
    }
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("must not carry a user name or password"));
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(bad("must not have a query or fragment"));
    }
    Ok(text.trim_end_matches('/').to_string())
}

fn tls_config(client: &Client) -> Result<TlsConfig, ClientError> {
    let mut builder = TlsConfig::builder();
    if let Some(ca) = &client.ca {
        let (certs, _) = read_pem("--ca", ca)?;
        if certs.is_empty() {
            return Err(ClientError::Usage(format!("--ca {ca}: no certificate in file")));
        }
        builder = builder.root_certs(RootCerts::new_with_certs(&certs));
    }
    match (&client.cert, &client.key) {
        (Some(cert), Some(key)) => {
            let (chain, _) = read_pem("--cert", cert)?;
            if chain.is_empty() {
                return Err(ClientError::Usage(format!("--cert {cert}: no certificate in file")));
            }
            let (_, keys) = read_pem("--key", key)?;
            let key_der = keys.into_iter().next().ok_or_else(|| {
                ClientError::Usage(format!("--key {key}: no private key in file"))
            })?;
            builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key_der)));
        }
        (None, None) => {}
        (Some(_), None) => return Err(ClientError::Usage("--cert needs --key".into())),
        (None, Some(_)) => return Err(ClientError::Usage("--key needs --cert".into())),
    }
    Ok(builder.build())
}

type PemContents = (Vec<ureq::tls::Certificate<'static>>, Vec<PrivateKey<'static>>);

/// The certificates and private keys in a PEM file.
fn read_pem(flag: &str, path: &str) -> Result<PemContents, ClientError> {
    let bytes = fs::read(path)
        .map_err(|e| ClientError::Usage(format!("{flag} {path}: cannot read file ({e})")))?;
    let (mut certs, mut keys) = (Vec::new(), Vec::new());
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(PemItem::PrivateKey(k)) => keys.push(k),
            Ok(_) => {}
            Err(e) => {
                return Err(ClientError::Usage(format!("{flag} {path}: bad PEM file ({e})")));
            }
        }
    }
    Ok((certs, keys))
}

fn token_from_file(path: &str) -> Result<String, ClientError> {
    let text = fs::read_to_string(path)
        .map_err(|e| ClientError::Usage(format!("--token-file {path}: cannot read file ({e})")))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(ClientError::Usage(format!("--token-file {path}: first line holds no token")));
    }
    check_token(token, &format!("--token-file {path}"))
}

/// A token must fit in a header; the error never repeats it.
fn check_token(token: &str, source: &str) -> Result<String, ClientError> {
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token.to_string())
    } else {
        Err(ClientError::Usage(format!(
            "{source}: the token holds spaces or characters an HTTP header cannot carry"
        )))
    }
}

fn check_job_id(id: &str) -> Result<(), ClientError> {
    uuid::Uuid::parse_str(id)
        .map(|_| ())
        .map_err(|_| ClientError::Usage(format!("job id {:?} is not a UUID", printable(id))))
}

fn check_sha256(sha: &str) -> Result<(), ClientError> {
    if sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ClientError::Usage(format!(
            "cache entry {:?} is not a SHA-256 (64 hex digits)",
            printable(sha)
        )))
    }
}

// ---------------------------------------------------------------- output

fn job_id_of(answer: &Answer, what: &str) -> Result<String, ClientError> {
    answer.body["job_id"].as_str().map(str::to_string).ok_or_else(|| {
        ClientError::Unexpected(format!(
            "unexpected answer to {what}: HTTP {}: no job_id in {}",
            answer.status,
            snippet(&answer.body.to_string())
        ))
    })
}

fn list_of<'a>(answer: &'a Answer, field: &str) -> Result<&'a Vec<Value>, ClientError> {
    answer.body[field].as_array().ok_or_else(|| {
        ClientError::Unexpected(format!(
            "unexpected answer: HTTP {}: no {field:?} list in {}",
            answer.status,
            snippet(&answer.body.to_string())
        ))
    })
}

fn print_json(value: &Value) {
    let text = serde_json::to_string_pretty(value).expect("a JSON value always serializes");
    println!("{text}");
}

fn str_field(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Text from the daemon made safe for a terminal: control characters
/// (escape sequences) become `?`.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// A table cell: the string itself, a number, or `-` when absent.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => printable(s),
        other => printable(&other.to_string()),
    }
}

fn jobs_table(jobs: &[Value]) -> String {
    let rows = jobs
        .iter()
        .map(|j| {
            let volume =
                if j["volume_name"].is_string() { &j["volume_name"] } else { &j["volume_path"] };
            let percent = match j["progress"]["percent"].as_u64() {
                Some(p) => format!("{p}%"),
                None => "-".to_string(),
            };
            vec![
                cell(&j["job_id"]),
                cell(&j["status"]),
                cell(&j["progress"]["stage"]),
                percent,
                cell(volume),
                cell(&j["correlation_id"]),
            ]
        })
        .collect();
    table(&["JOB ID", "STATUS", "STAGE", "PERCENT", "VOLUME", "CORRELATION"], rows)
}

fn cache_table(entries: &[Value]) -> String {
    let rows = entries
        .iter()
        .map(|e| {
            let size = match e["size"].as_u64() {
                Some(n) => human_bytes(n),
                None => cell(&e["size"]),
            };
            let in_use = match &e["in_use"] {
                Value::Bool(true) => "yes".to_string(),
                Value::Bool(false) => "no".to_string(),
                Value::Number(n) if n.as_u64() == Some(0) => "no".to_string(),
                Value::Number(n) => format!("yes ({n})"),
                other => cell(other),
            };
            vec![cell(&e["sha256"]), size, cell(&e["last_used"]), in_use, cell(&e["source"])]
        })
        .collect();
    table(&["SHA256", "SIZE", "LAST USED", "IN USE", "SOURCE"], rows)
}

/// Left-aligned columns two spaces apart, a header line first; the last
/// column is not padded, so lines carry no trailing blanks.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units with one decimal, as `ls -lh` would.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Shows a followed job on stderr: a bar redrawn in place on a terminal,
/// else one line per status or stage change.
struct ProgressView {
    tty: bool,
    last: Option<(String, String)>,
    /// A bar is drawn and the cursor sits at its end.
    bar_open: bool,
}

impl ProgressView {
    fn new(tty: bool) -> ProgressView {
        ProgressView { tty, last: None, bar_open: false }
    }

    fn update(&mut self, job: &Value) {
        let step = (
            str_field(&job["status"]).to_string(),
            str_field(&job["progress"]["stage"]).to_string(),
        );
        let mut err = io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[K{}", bar_line(job));
            let _ = err.flush();
            self.bar_open = true;
        } else if self.last.as_ref() != Some(&step) {
            let _ = writeln!(err, "{}", step_line(job));
        }
        self.last = Some(step);
    }

    /// Ends the bar's line so that other text can follow.
    fn interrupt(&mut self) {
        if self.bar_open {
            eprintln!();
            self.bar_open = false;
        }
    }

    fn finish(&mut self) {
        self.interrupt();
    }
}

/// `job <id> <status> <stage> <percent>%`, the line printed per step when
/// stderr is not a terminal.
fn step_line(job: &Value) -> String {
    let percent = job["progress"]["percent"].as_u64().unwrap_or(0);
    format!(
        "job {} {} {} {percent}%",
        cell(&job["job_id"]),
        cell(&job["status"]),
        cell(&job["progress"]["stage"])
    )
}

/// `<short id> <stage> [#####-----]  45%  1.2 GiB / 2.0 GiB`, under 80
/// columns for every stage name.
fn bar_line(job: &Value) -> String {
    let percent = job["progress"]["percent"].as_u64().unwrap_or(0).min(100);
    let filled = (percent as usize * BAR_WIDTH) / 100;
    let bar = format!("{}{}", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled));
    let id: String = cell(&job["job_id"]).chars().take(8).collect();
    let stage = match str_field(&job["status"]) {
        "running" => cell(&job["progress"]["stage"]),
        other => printable(other),
    };
    let done = job["progress"]["bytes_processed"].as_u64();
    let total = job["progress"]["bytes_total"].as_u64();
    let bytes = match (done, total) {
        (Some(d), Some(t)) => format!("  {} / {}", human_bytes(d), human_bytes(t)),
        (Some(d), None) if d > 0 => format!("  {}", human_bytes(d)),
        _ => String::new(),
    };
    format!("{id} {stage:<15} [{bar}] {percent:>3}%{bytes}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_base_url_sources_and_defaults() {
        assert_eq!(base_url(None, None).unwrap(), "https://localhost:8080");
        assert_eq!(base_url(None, Some("https://hv1:9/")).unwrap(), "https://hv1:9");
        assert_eq!(base_url(Some("http://a:1"), Some("https://b:2")).unwrap(), "http://a:1");
    }

    #[test]
    fn test_bad_urls_are_usage_errors() {
        for bad in ["localhost:8080", "ftp://x", "https://", "https://u:p@h:1", "https://h/?a=1"] {
            let e = base_url(Some(bad), None).unwrap_err();
            assert!(matches!(e, ClientError::Usage(_)), "{bad}: {e:?}");
            assert!(e.to_string().starts_with("--url"), "{e}");
        }
        let e = base_url(None, Some("nope")).unwrap_err();
        assert!(e.to_string().starts_with("$LVP_URL \"nope\""), "{e}");
    }

    #[test]
    fn test_token_check_never_repeats_the_token() {
        assert_eq!(check_token("abc.DEF-123", "x").unwrap(), "abc.DEF-123");
        let e = check_token("secret with space", "$LVP_TOKEN").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(e.exit_status(), EXIT_USAGE);
    }

    #[test]
    fn test_ids_and_digests_are_checked_locally() {
        assert!(check_job_id("550e8400-e29b-41d4-a716-446655440000").is_ok());
        assert!(check_job_id("42").is_err());
        assert!(check_sha256(&"ab".repeat(32)).is_ok());
        assert!(check_sha256(&"zz".repeat(32)).is_err());
        assert!(check_sha256("abc").is_err());
    }

    #[test]
    fn test_exit_statuses() {
        let api = ClientError::Api { code: "not_found".into(), details: "no job x".into() };
        assert_eq!((api.exit_status(), api.to_string().as_str()), (1, "not_found: no job x"));
        assert_eq!(ClientError::Connect("x".into()).exit_status(), 3);
        assert_eq!(ClientError::Unexpected("x".into()).exit_status(), 1);
    }

    #[test]
    fn test_table_aligns_columns_without_trailing_blanks() {
        let t = table(
            &["A", "BB", "C"],
            vec![
                vec!["xxx".into(), "y".into(), "".into()],
                vec!["1".into(), "2".into(), "3".into()],
            ],
        );
        assert_eq!(t, "A    BB  C\nxxx  y\n1    2   3\n");
    }

    #[test]
    fn test_jobs_table_row() {
        let job = json!({
            "job_id": "550e8400-e29b-41d4-a716-446655440000",
            "status": "running",
            "progress": {"stage": "downloading", "percent": 45},
            "volume_name": "vm-1",
            "correlation_id": "corr\u{1b}[31m",
        });
        let t = jobs_table(&[job]);
        let row = t.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "550e8400-e29b-41d4-a716-446655440000",
                "running",
                "downloading",
                "45%",
                "vm-1",
                "corr?[31m"
            ]
        );
    }

    #[test]
    fn test_cache_table_row() {
        let e = json!({"sha256": "ab", "source": "http://x/i.qcow2", "size": 3 << 20,
                       "last_used": "2026-01-02T03:04:05Z", "in_use": false});
        let t = cache_table(&[e]);
        assert_eq!(
            t.lines().nth(1).unwrap().split("  ").filter(|s| !s.is_empty()).collect::<Vec<_>>(),
            ["ab", "3.0 MiB", "2026-01-02T03:04:05Z", "no", "http://x/i.qcow2"]
        );
    }

    #[test]
    fn test_human_bytes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(2 << 30), "2.0 GiB");
    }

    #[test]
    fn test_progress_lines() {
        let job = json!({
            "job_id": "550e8400-e29b-41d4-a716-446655440000",
            "status": "running",
            "progress": {"stage": "creating_volume", "percent": 50,
                         "bytes_processed": 1 << 30, "bytes_total": 2u64 << 30},
        });
        assert_eq!(
            step_line(&job),
            "job 550e8400-e29b-41d4-a716-446655440000 running creating_volume 50%"
        );
        let bar = bar_line(&job);
        assert_eq!(
            bar,
            "550e8400 creating_volume [############------------]  50%  1.0 GiB / 2.0 GiB"
        );
        assert!(bar.chars().count() < 80);
    }
}
