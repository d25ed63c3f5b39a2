//! Helpers shared by the integration tests, which drive the real daemon
//! binary over real sockets:
//!
//! - [`TestDir`]: a unique directory under Cargo's target tmpdir, kept when
//!   the test fails so its daemon log and volumes can be read.
//! - [`Pki`]: a test CA, server and client certificates made with rcgen at
//!   test time, plus an unrelated CA with its own client certificate.
//! - [`ImageServer`]: an HTTP server that serves a directory with ETags and
//!   ranges, logs every GET with its `Range` headers, and can misbehave per
//!   file: trickle slowly, answer 500, hang up mid-body, ignore `Range`, or
//!   stall.
//! - [`Daemon`]: `libvirt-volume-provisioner serve` on a free loopback port,
//!   killed and reaped on drop, its log printed when the test fails.
//! - [`Api`]: a ureq client with the test CA as its only root.
//! - Image builders that use the real `mkfs.ext4` and `qemu-img`.
//!
//! Every helper panics with the whole story (command, stderr, daemon log)
//! instead of returning errors: a test is a script, and the first surprise
//! ends it.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

/// The daemon under test, as Cargo built it for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_libvirt-volume-provisioner");

/// How long the daemon may take to open its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-request limit for the API client, so a hung daemon fails the test
/// instead of hanging the suite.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often `wait_*` polls the status endpoint.
const POLL: Duration = Duration::from_millis(25);

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------- TestDir

/// A fresh directory for one test, removed on drop only if the test passed
/// (set `LVP_KEEP_TEST_DIRS=1` to keep it anyway).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
        let unique = format!(
            "{name}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lvp-it").join(unique);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Creates `rel` (and its parents) and returns its path.
    pub fn mkdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("test failed; keeping {} for a look", self.path.display());
        } else if std::env::var_os("LVP_KEEP_TEST_DIRS").is_some() {
            eprintln!("LVP_KEEP_TEST_DIRS is set; keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------- PKI

/// PEM files for a test CA, a server certificate for `localhost` and
/// `127.0.0.1`, a client certificate (CN=test-client), and an unrelated CA
/// with its own client certificate (CN=rogue-client).
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca_cert: PathBuf,
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn issue(&self, cn: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Pki {
    /// Makes the certificates and writes them under `dir/pki`.
    pub fn create(dir: &TestDir) -> Pki {
        let pki = dir.mkdir("pki");
        let write = |name: &str, pem: &str| {
            let p = pki.join(name);
            fs::write(&p, pem).unwrap();
            p
        };
        let ca = Ca::new("lvp test CA");
        let (server_pem, server_key) =
            ca.issue("localhost", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
        let (client_pem, client_key) =
            ca.issue("test-client", &[], ExtendedKeyUsagePurpose::ClientAuth);
        let other = Ca::new("unrelated CA");
        let (other_pem, other_key) =
            other.issue("rogue-client", &[], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca_cert: write("ca.pem", &ca.cert.pem()),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key),
            other_ca_cert: write("other-ca.pem", &other.cert.pem()),
            other_client_cert: write("other-client.pem", &other_pem),
            other_client_key: write("other-client.key", &other_key),
        }
    }

    /// A TLS client config that trusts the test CA and presents `client`,
    /// a (certificate, key) pair of PEM files, when given.
    pub fn tls(&self, client: Option<(&Path, &Path)>) -> TlsConfig {
        let ca = Certificate::from_pem(&fs::read(&self.ca_cert).unwrap()).unwrap();
        let cert = client.map(|(cert, key)| {
            let cert = Certificate::from_pem(&fs::read(cert).unwrap()).unwrap();
            let key = PrivateKey::from_pem(&fs::read(key).unwrap()).unwrap();
            ClientCert::new_with_certs(&[cert], key)
        });
        TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[ca])).client_cert(cert).build()
    }

    pub fn client(&self) -> (&Path, &Path) {
        (&self.client_cert, &self.client_key)
    }

    pub fn other_client(&self) -> (&Path, &Path) {
        (&self.other_client_cert, &self.other_client_key)
    }
}

// ---------------------------------------------------------------- ImageServer

/// How a slow path is served: `chunk` bytes, then a pause of `delay`.
#[derive(Clone, Copy, Debug)]
pub struct Slow {
    pub chunk: usize,
    pub delay: Duration,
}

/// How the server treats one path. The default serves the file whole and
/// at once, with a strong ETag, honouring `Range` and `If-Range`.
#[derive(Clone, Copy, Debug, Default)]
struct Behaviour {
    slow: Option<Slow>,
    /// Answer 500 to this many GETs before serving the file.
    fail_first: usize,
    /// On the first GET, close the connection after this many body bytes
    /// (the announced Content-Length stays the whole length).
    drop_first_after: Option<u64>,
    /// Answer 200 with the whole file whatever `Range` says.
    ignore_range: bool,
    /// Send the response head, then nothing, until the server is dropped.
    stall: bool,
    /// Send no Content-Length: the body ends when the connection closes.
    no_length: bool,
}

/// One GET as the server saw it.
#[derive(Clone, Debug)]
pub struct Get {
    pub path: String,
    /// The `Range` header, as sent.
    pub range: Option<String>,
    /// The `If-Range` header, as sent.
    pub if_range: Option<String>,
    /// The status the server answered with.
    pub status: u16,
    /// The `Authorization` header, as sent (an S3 signature, say).
    pub authorization: Option<String>,
    /// Whether the request target had a query string.
    pub query: bool,
}

#[derive(Default)]
struct ServerState {
    gets: Mutex<Vec<Get>>,
    requests: AtomicUsize,
    behaviours: Mutex<HashMap<String, Behaviour>>,
    /// Set on drop, so slow and stalled responses end.
    stopping: AtomicBool,
}

/// A plain HTTP/1.1 server on 127.0.0.1 serving the files of one
/// directory, one thread per connection and one request per connection
/// (`Connection: close`). Written on a bare socket rather than on an HTTP
/// library because the tests need what a library will not do on purpose:
/// hang up in the middle of a body, or stall after the head.
pub struct ImageServer {
    state: Arc<ServerState>,
    root: PathBuf,
    addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
}

impl ImageServer {
    pub fn start(root: &Path) -> ImageServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("start image server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState::default());
        let thread = {
            let (state, root) = (Arc::clone(&state), root.to_owned());
            thread::Builder::new()
                .name("image-server".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if state.stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        let (state, root) = (Arc::clone(&state), root.clone());
                        thread::spawn(move || serve_connection(stream, &root, &state));
                    }
                })
                .unwrap()
        };
        ImageServer { state, root: root.to_owned(), addr, thread: Some(thread) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `http://127.0.0.1:<port>/<name>`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// GET requests seen for `/<name>`.
    pub fn gets(&self, name: &str) -> usize {
        self.get_log(name).len()
    }

    /// The GET requests seen for `/<name>`, in order.
    pub fn get_log(&self, name: &str) -> Vec<Get> {
        let key = key(name);
        self.state.gets.lock().unwrap().iter().filter(|g| g.path == key).cloned().collect()
    }

    /// Every request seen, any method, any path.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The strong ETag the server sends for `/<name>`.
    pub fn etag(&self, name: &str) -> String {
        etag(&fs::metadata(self.root.join(name)).unwrap())
    }

    fn behave(&self, name: &str, change: impl FnOnce(&mut Behaviour)) {
        change(self.state.behaviours.lock().unwrap().entry(key(name)).or_default());
    }

    /// Serves `/<name>` `chunk` bytes at a time with a pause before each.
    pub fn set_slow(&self, name: &str, slow: Slow) {
        self.behave(name, |b| b.slow = Some(slow));
    }

    /// Answers the first `n` GETs of `/<name>` with a 500.
    pub fn fail_first(&self, name: &str, n: usize) {
        self.behave(name, |b| b.fail_first = n);
    }

    /// Hangs up the first GET of `/<name>` after `bytes` bytes of its body.
    pub fn drop_first_after(&self, name: &str, bytes: u64) {
        self.behave(name, |b| b.drop_first_after = Some(bytes));
    }

    /// Answers every GET of `/<name>` with 200 and the whole file, as a
    /// server without range support does.
    pub fn ignore_range(&self, name: &str) {
        self.behave(name, |b| b.ignore_range = true);
    }

    /// Sends the head of every answer for `/<name>`, then no byte more.
    pub fn stall(&self, name: &str) {
        self.behave(name, |b| b.stall = true);
    }

    /// Serves `/<name>` without a Content-Length, ending the body by
    /// closing the connection, as some servers and proxies do.
    pub fn omit_length(&self, name: &str) {
        self.behave(name, |b| b.no_length = true);
    }

    /// A URL that reaches `/<name>` through `hops` redirects (302), each
    /// to a different path: `/hop/<n>/<name>` sends to `/hop/<n-1>/<name>`
    /// and `/hop/0/<name>` to `/<name>`.
    pub fn redirecting_url(&self, name: &str, hops: usize) -> String {
        self.url(&format!("hop/{}/{name}", hops - 1))
    }

    /// Serves `/<name>` normally again.
    pub fn serve_normally(&self, name: &str) {
        self.state.behaviours.lock().unwrap().remove(&key(name));
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees `stopping`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The request path for a file name.
fn key(name: &str) -> String {
    format!("/{}", name.trim_start_matches('/'))
}

fn etag(meta: &fs::Metadata) -> String {
    let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("\"{:x}-{mtime:x}\"", meta.len())
}

/// Reads a request head (up to the blank line); `None` if the client
/// hung up or sent something that is not one.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&buf[..n]);
        if head.len() > 64 * 1024 {
            return None;
        }
    }
    String::from_utf8(head).ok()
}

/// `bytes=START-` or `bytes=START-END` → START.
fn range_start(value: &str) -> Option<u64> {
    let (start, _end) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    start.trim().parse().ok()
}

fn serve_connection(mut stream: TcpStream, root: &Path, state: &ServerState) {
    use std::io::Write;

    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let Some(head) = read_head(&mut stream) else { return };
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_string();
    let target = request_line.next().unwrap_or("/");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let path = target.split('?').next().unwrap_or("/").to_string();
    if let Some((n, rest)) = path.strip_prefix("/hop/").and_then(|p| p.split_once('/')) {
        let next = match n.parse::<usize>() {
            Ok(0) => format!("/{rest}"),
            Ok(n) => format!("/hop/{}/{rest}", n - 1),
            Err(_) => "/".to_string(),
        };
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {next}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = stream.write_all(head.as_bytes());
        return;
    }
    let behaviour = state.behaviours.lock().unwrap().get(&path).copied().unwrap_or_default();

    let rel = path.trim_start_matches('/');
    let file = if rel.is_empty() || rel.split('/').any(|s| s == "..") {
        None
    } else {
        File::open(root.join(rel)).ok().filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
    };
    let meta = file.as_ref().map(|f| f.metadata().unwrap());
    let len = meta.as_ref().map_or(0, |m| m.len());
    let tag = meta.as_ref().map(etag).unwrap_or_default();
    let (range, if_range) = (header("range"), header("if-range"));
    // A range is honoured when its validator (if any) names this version
    // of the file, as RFC 9110 says.
    let start = match (&range, behaviour.ignore_range) {
        (Some(r), false) if if_range.as_ref().is_none_or(|v| *v == tag) => {
            range_start(r).filter(|&s| s < len)
        }
        _ => None,
    };

    let nth = if method == "GET" {
        let mut gets = state.gets.lock().unwrap();
        let nth = gets.iter().filter(|g| g.path == path).count();
        let status = match (&file, start) {
            (None, _) => 404,
            _ if nth < behaviour.fail_first => 500,
            (_, Some(_)) => 206,
            _ => 200,
        };
        gets.push(Get {
            authorization: header("authorization"),
            query: target.contains('?'),
            path: path.clone(),
            range: range.clone(),
            if_range: if_range.clone(),
            status,
        });
        nth
    } else {
        0
    };

    let reply = |stream: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
            body.len()
        );
        let _ = stream.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = stream.write_all(body);
        }
    };
    match file {
        None => reply(&mut stream, "404 Not Found", "", b"not found"),
        Some(_) if method != "GET" && method != "HEAD" => {
            reply(&mut stream, "405 Method Not Allowed", "", b"")
        }
        Some(_) if method == "GET" && nth < behaviour.fail_first => {
            reply(&mut stream, "500 Internal Server Error", "", b"injected failure")
        }
        Some(mut file) => {
            let from = start.unwrap_or(0);
            let mut head = match start {
                Some(s) => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {s}-{}/{len}\r\n",
                    len - 1
                ),
                None => "HTTP/1.1 200 OK\r\n".to_string(),
            };
            // A Content-Length as an object store sends, never chunked.
            if !behaviour.no_length {
                head.push_str(&format!("Content-Length: {}\r\n", len - from));
            }
            head.push_str(&format!("ETag: {tag}\r\n"));
            if !behaviour.ignore_range {
                head.push_str("Accept-Ranges: bytes\r\n");
            }
            head.push_str("Connection: close\r\n\r\n");
            if stream.write_all(head.as_bytes()).is_err() || method == "HEAD" {
                return;
            }
            if behaviour.stall {
                while !state.stopping.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
                return;
            }
            let limit = match behaviour.drop_first_after {
                Some(n) if nth == 0 => n.min(len - from),
                _ => len - from,
            };
            file.seek(SeekFrom::Start(from)).unwrap();
            if send_body(&mut stream, &mut file, limit, behaviour.slow, state).is_err() {
                return;
            }
        }
    }
    // Hang up gracefully: the client reads everything sent, then EOF.
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut sink = [0u8; 1024];
    while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
}

/// Copies `limit` bytes of `file` to the client, paced by `slow`.
fn send_body(
    stream: &mut TcpStream,
    file: &mut File,
    limit: u64,
    slow: Option<Slow>,
    state: &ServerState,
) -> io::Result<()> {
    use std::io::Write;

    let chunk = slow.map_or(256 * 1024, |s| s.chunk);
    let mut buf = vec![0u8; chunk];
    let mut left = limit;
    while left > 0 {
        if state.stopping.load(Ordering::SeqCst) {
            return Err(io::Error::other("image server stopping"));
        }
        if let Some(slow) = slow {
            thread::sleep(slow.delay);
        }
        let want = left.min(chunk as u64) as usize;
        file.read_exact(&mut buf[..want])?;
        stream.write_all(&buf[..want])?;
        left -= want as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------- Daemon

/// How the daemon authenticates clients.
#[derive(Clone, Debug)]
pub struct Auth {
    /// Pass `--client-ca` (mutual TLS).
    pub client_ca: bool,
    /// Pass `--tokens <file>`.
    pub tokens: Option<PathBuf>,
}

impl Auth {
    pub fn mtls() -> Auth {
        Auth { client_ca: true, tokens: None }
    }
}

/// A running `libvirt-volume-provisioner serve`.
pub struct Daemon {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub volume_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Daemon {
    /// The `serve` arguments for a daemon on `port` whose directories live
    /// in `dir`, before any extra argument.
    pub fn args(dir: &TestDir, pki: &Pki, auth: &Auth, port: u16) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--backend".into(),
            "dir".into(),
            "--volume-dir".into(),
            p(&dir.join("volumes")),
            "--cache-dir".into(),
            p(&dir.join("cache")),
            "--state-dir".into(),
            p(&dir.join("state")),
            "--tls-cert".into(),
            p(&pki.server_cert),
            "--tls-key".into(),
            p(&pki.server_key),
        ];
        if auth.client_ca {
            args.extend(["--client-ca".into(), p(&pki.ca_cert)]);
        }
        if let Some(tokens) = &auth.tokens {
            args.extend(["--tokens".into(), p(tokens)]);
        }
        args
    }

    /// Starts the daemon and waits until its port accepts connections.
    pub fn start(dir: &TestDir, pki: &Pki, auth: &Auth, extra: &[&str]) -> Daemon {
        Daemon::start_with(dir, extra, &|port| Daemon::args(dir, pki, auth, port))
    }

    /// Starts the daemon with the arguments `args` makes for a port, then
    /// `extra`.
    pub fn start_with(dir: &TestDir, extra: &[&str], args: &dyn Fn(u16) -> Vec<String>) -> Daemon {
        Daemon::start_with_env(dir, extra, args, &[])
    }

    /// Like [`Daemon::start`], with `env` set in the daemon's environment
    /// (proxy variables, AWS credentials).
    pub fn start_env(dir: &TestDir, pki: &Pki, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_env(dir, extra, &|port| Daemon::args(dir, pki, &Auth::mtls(), port), env)
    }

    /// [`Daemon::start_with`] with extra environment variables.
    pub fn start_with_env(
        dir: &TestDir,
        extra: &[&str],
        args: &dyn Fn(u16) -> Vec<String>,
        env: &[(&str, &str)],
    ) -> Daemon {
        Daemon::start_program(dir, BIN, extra, args, env)
    }

    /// Starts `program` (the daemon, or a wrapper such as strace whose
    /// `args` end with the daemon's command line) and waits for the port.
    pub fn start_program(
        dir: &TestDir,
        program: &str,
        extra: &[&str],
        args: &dyn Fn(u16) -> Vec<String>,
        env: &[(&str, &str)],
    ) -> Daemon {
        // The port is free when we look and taken by the daemon a moment
        // later; another process may win that race, so retry a few times.
        for attempt in 1..=3 {
            let port = free_port();
            let mut args = args(port);
            args.extend(extra.iter().map(|s| s.to_string()));
            let log = dir.join(format!("daemon-{port}.log"));
            let log_file = File::create(&log).unwrap();
            let child = Command::new(program)
                .args(&args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().unwrap())
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
            let mut daemon = Daemon {
                child: Some(child),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                log,
                volume_dir: dir.join("volumes"),
                cache_dir: dir.join("cache"),
                state_dir: dir.join("state"),
            };
            match daemon.wait_ready() {
                Ok(()) => return daemon,
                Err(why) => {
                    let text = daemon.log_text();
                    if attempt < 3 && text.contains("cannot listen") {
                        continue;
                    }
                    panic!(
                        "daemon did not start: {why}\nargs: {args:?}\n--- daemon log ---\n{text}"
                    );
                }
            }
        }
        unreachable!()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Err(format!("it exited with {status}"));
            }
            // The port alone is not proof: another test's server may hold
            // it, while this daemon fails to bind it and exits. The daemon
            // logs "listening on" only once it holds the port.
            if self.log_text().contains("listening on ")
                && TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("port {} not open after {START_TIMEOUT:?}", self.addr));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn volume(&self, name: &str) -> PathBuf {
        self.volume_dir.join(name)
    }

    /// Stops the daemon as `systemctl stop` would (SIGTERM), killing it if
    /// it is still running 10 s later, and returns how it exited.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_within(START_TIMEOUT)
    }

    /// Sends SIGTERM and waits up to `patience` for the daemon to exit,
    /// then kills it (SIGKILL). Returns how it exited: a signal, not a
    /// status, when it had to be killed.
    pub fn stop_within(&mut self, patience: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL, as the OOM killer or a crash would,
    /// and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "--- daemon log {} ---\n{}--- end of daemon log ---",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `libvirt-volume-provisioner serve <args>` expecting it to refuse to
/// start; returns its exit status and stderr. Panics if it is still running
/// after the start timeout (it started after all).
pub fn serve_expecting_exit(args: &[String]) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("daemon started although it should have refused: {args:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

// ---------------------------------------------------------------- API client

/// Whether a status JSON shows a job that has ended.
pub fn is_final(status: &Value) -> bool {
    matches!(status["status"].as_str(), Some("completed" | "failed" | "cancelled"))
}

/// One HTTP answer: status, JSON body (`Value::Null` when empty) and headers.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub text: String,
    pub headers: ureq::http::HeaderMap,
}

impl Reply {
    pub fn request_id(&self) -> Option<&str> {
        self.headers.get("x-request-id").and_then(|v| v.to_str().ok())
    }

    /// Asserts this is an API error with `status` and `code`, and returns
    /// its `details`.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) -> String {
        assert_eq!(
            (self.status, self.body["error"].as_str()),
            (status, Some(code)),
            "expected {status} {code}, got {self:#?}"
        );
        let obj = self.body.as_object().expect("error body is an object");
        for field in ["error", "details", "correlation_id"] {
            assert!(obj.contains_key(field), "error body lacks {field:?}: {}", self.text);
        }
        self.body["details"].as_str().expect("details is a string").to_string()
    }
}

/// The daemon's HTTPS API, from one client identity.
pub struct Api {
    agent: ureq::Agent,
    base: String,
    headers: Vec<(String, String)>,
}

impl Api {
    pub fn new(base: String, tls: TlsConfig) -> Api {
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .build()
            .into();
        Api { agent, base, headers: Vec::new() }
    }

    /// The normal client: test CA as root, the test client certificate.
    pub fn mtls(daemon: &Daemon, pki: &Pki) -> Api {
        Api::new(daemon.base_url(), pki.tls(Some(pki.client())))
    }

    /// Adds a header to every request this client sends.
    pub fn with_header(mut self, name: &str, value: &str) -> Api {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends one request. `Err` is a transport failure (refused handshake,
    /// reset connection), never an HTTP status.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Reply, ureq::Error> {
        let url = format!("{}{path}", self.base);
        let mut resp = match (method, body) {
            ("GET", _) => self.with_headers(self.agent.get(&url)).call()?,
            ("DELETE", _) => self.with_headers(self.agent.delete(&url)).call()?,
            ("POST", body) => self
                .with_headers(self.agent.post(&url))
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default())?,
            ("PUT", body) => self
                .with_headers(self.agent.put(&url))
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_default())?,
            _ => panic!("unsupported method {method}"),
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.body_mut().read_to_string()?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{method} {path} answered {status} with a non-JSON body ({e}): {text:?}")
            })
        };
        let reply = Reply { status, body, text, headers };
        // Every answer, success or error, must carry a request id.
        assert!(
            reply.request_id().is_some_and(|id| !id.is_empty()),
            "{method} {path} answered {status} without X-Request-ID: {reply:#?}"
        );
        Ok(reply)
    }

    fn with_headers<B>(&self, mut req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req
    }

    #[track_caller]
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.try_request(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path} failed at the transport level: {e}"))
    }

    /// POSTs a JSON body to `path` (the cache prefetch endpoint, say).
    #[track_caller]
    pub fn provision_path(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    #[track_caller]
    pub fn provision(&self, body: &Value) -> Reply {
        self.request("POST", "/api/v1/provision", Some(body.to_string().as_bytes()))
    }

    #[track_caller]
    pub fn provision_raw(&self, body: &[u8]) -> Reply {
        self.request("POST", "/api/v1/provision", Some(body))
    }

    /// Provisions and returns the job id, asserting the 202.
    #[track_caller]
    pub fn submit(&self, body: &Value) -> String {
        let r = self.provision(body);
        assert_eq!(r.status, 202, "provision {body} was not accepted: {r:#?}");
        r.body["job_id"].as_str().expect("job_id in 202 body").to_string()
    }

    #[track_caller]
    pub fn status(&self, id: &str) -> Reply {
        self.request("GET", &format!("/api/v1/status/{id}"), None)
    }

    #[track_caller]
    pub fn cancel(&self, id: &str) -> Reply {
        self.request("DELETE", &format!("/api/v1/cancel/{id}"), None)
    }

    /// Polls until the job is completed, failed or cancelled; returns its
    /// final status JSON.
    #[track_caller]
    pub fn wait_final(&self, id: &str, timeout: Duration) -> Value {
        self.wait_until(id, timeout, "a final status", is_final)
    }

    /// Polls the job's status until `done` holds; returns that status.
    #[track_caller]
    pub fn wait_until(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.status(id);
            assert_eq!(r.status, 200, "status of {id}: {r:#?}");
            if done(&r.body) {
                return r.body;
            }
            if Instant::now() > deadline {
                panic!(
                    "job {id} did not reach {what} within {timeout:?}; last status: {:#}",
                    r.body
                );
            }
            thread::sleep(POLL);
        }
    }
}

/// A GET over `tls`, with one header if given, whose body is text (the
/// metrics): its status and body.
pub fn get_text(
    base: &str,
    tls: ureq::tls::TlsConfig,
    path: &str,
    header: Option<(&str, &str)>,
) -> (u16, String) {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().tls_config(tls).http_status_as_error(false).build().into();
    let mut req = agent.get(&format!("{base}{path}"));
    if let Some((name, value)) = header {
        req = req.header(name, value);
    }
    let mut resp = req.call().unwrap();
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap())
}

/// A reply read off the wire by [`raw_https`].
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `bytes` as they are over a TLS connection with the test client
/// certificate, then reads the answer until the daemon closes. For what an
/// HTTP client would not send: a head alone that announces a large body
/// (as curl's `Expect: 100-continue` does), or chunked framing.
pub fn raw_https(daemon: &Daemon, pki: &Pki, bytes: &[u8]) -> RawReply {
    raw_exchange(tls_connect(daemon, pki), bytes)
}

/// [`raw_https`] over a TLS connection the caller made (from another
/// source address, say).
pub fn raw_exchange(
    mut tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    bytes: &[u8],
) -> RawReply {
    use std::io::Write;

    tls.write_all(bytes).unwrap();
    tls.flush().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    // Until EOF, or an error once the daemon hangs up (it may close
    // without a TLS close_notify after refusing a request).
    while let Ok(n) = tls.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) =
        text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP reply: {text:?}"));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok());
    let status = status.unwrap_or_else(|| panic!("bad status line: {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawReply { status, headers, body: body.to_string() }
}

/// A TLS connection to the daemon with the handshake done, presenting the
/// test client certificate: for tests that then misbehave at the HTTP
/// level (trickle a request, stall).
pub fn tls_connect(
    daemon: &Daemon,
    pki: &Pki,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_handshake(TcpStream::connect(daemon.addr).unwrap(), pki)
}

/// A TCP connection to `to` from the loopback address `from` (such as
/// 127.0.0.2), for tests of what the daemon does per client address.
pub fn connect_from(from: std::net::Ipv4Addr, to: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else { panic!("an IPv4 daemon address") };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket we own; the addresses live on this stack for
    // the duration of each call, with their true length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(from, 0);
        let rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind {from}: {}", io::Error::last_os_error());
        let remote = sockaddr(*to.ip(), to.port());
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "connect {to} from {from}: {}", io::Error::last_os_error());
        stream
    }
}

/// Runs the TLS handshake with the test client certificate over `tcp`.
pub fn tls_handshake(
    mut tcp: TcpStream,
    pki: &Pki,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&pki.ca_cert).unwrap()).unwrap();
    let chain = vec![CertificateDer::from_pem_file(&pki.client_cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(&pki.client_key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    tcp.set_read_timeout(Some(REQUEST_TIMEOUT)).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap_or_else(|e| panic!("TLS handshake: {e}"));
    }
    rustls::StreamOwned::new(conn, tcp)
}

// ---------------------------------------------------------------- Harness

/// The daemon run under `strace -f -y -qq`, tracing `syscalls` into a file,
/// with the directories and arguments of [`Daemon::start`] (mutual TLS).
/// strace's child is the daemon: [`Traced::finish`] stops the daemon
/// itself (a SIGTERM to strace would only detach it and leave it running)
/// and returns the trace; dropping it early kills the daemon.
pub struct Traced {
    pub daemon: Daemon,
    tracee: i32,
    trace: PathBuf,
}

impl Traced {
    pub fn start(dir: &TestDir, pki: &Pki, syscalls: &str, extra: &[&str]) -> Traced {
        let trace = dir.join("strace.txt");
        assert!(!trace.exists(), "one traced daemon a test directory");
        let trace_arg = trace.display().to_string();
        let filter = format!("trace={syscalls}");
        let daemon = Daemon::start_program(
            dir,
            "strace",
            extra,
            &|port| {
                let mut argv: Vec<String> =
                    ["-f", "-y", "-qq", "-s", "65536", "-e", &filter, "-o", &trace_arg, BIN]
                        .map(String::from)
                        .into();
                argv.extend(Daemon::args(dir, pki, &Auth::mtls(), port));
                argv
            },
            &[],
        );
        let tracee = tracee_of(daemon.pid()).expect("strace has started the daemon");
        Traced { daemon, tracee, trace }
    }

    /// Stops the daemon, waits for strace, and returns the trace.
    pub fn finish(mut self) -> String {
        // SAFETY: kill(2) on the daemon strace started for this test.
        unsafe { libc::kill(self.tracee, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{}", self.tracee)).exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.daemon.stop();
        fs::read_to_string(&self.trace).unwrap()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid and a signal; harmless once it exited.
        unsafe { libc::kill(self.tracee, libc::SIGKILL) };
    }
}

/// The first child of process `pid` (for strace: the program it traces).
fn tracee_of(pid: u32) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().ok();
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The pids in an `strace -f` trace (traced with `execve`) that ran
/// another program than the daemon: its qemu-img children.
pub fn traced_children(trace: &str) -> std::collections::HashSet<String> {
    let daemon = Path::new(BIN).file_name().unwrap().to_str().unwrap();
    trace
        .lines()
        .filter(|l| l.contains("execve(") && !l.contains(daemon))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

/// A test directory, certificates, an image server and a daemon with a
/// client. Fields drop top to bottom: the daemon stops before the
/// directory it writes into is removed.
pub struct Harness {
    pub api: Api,
    pub daemon: Daemon,
    pub images: ImageServer,
    pub pki: Pki,
    pub dir: TestDir,
}

impl Harness {
    /// A mutual-TLS daemon with `extra` arguments.
    pub fn start(name: &str, extra: &[&str]) -> Harness {
        Harness::start_with_auth(name, &Auth::mtls(), extra)
    }

    pub fn start_with_auth(name: &str, auth: &Auth, extra: &[&str]) -> Harness {
        let dir = TestDir::new(name);
        let pki = Pki::create(&dir);
        Harness::start_in(dir, pki, auth, extra)
    }

    /// Starts in a directory the test has already prepared (a tokens file,
    /// say).
    pub fn start_in(dir: TestDir, pki: Pki, auth: &Auth, extra: &[&str]) -> Harness {
        let images = ImageServer::start(&dir.mkdir("images"));
        let daemon = Daemon::start(&dir, &pki, auth, extra);
        let api = Api::mtls(&daemon, &pki);
        Harness { api, daemon, images, pki, dir }
    }

    /// Starts a mutual-TLS daemon with `extra` arguments on the directories
    /// of the previous one (state, cache, volumes), which must have been
    /// stopped or killed, and points `api` at it.
    pub fn restart(&mut self, extra: &[&str]) {
        assert!(self.daemon.child.is_none(), "stop or kill the daemon before a restart");
        self.daemon = Daemon::start(&self.dir, &self.pki, &Auth::mtls(), extra);
        self.api = Api::mtls(&self.daemon, &self.pki);
    }

    /// Where images served by the image server are written.
    pub fn image_dir(&self) -> &Path {
        self.images.root()
    }

    /// A provision request body for `image` (a file in the image dir).
    pub fn request(&self, image: &str, volume: &str, size_gb: u64, image_type: &str) -> Value {
        json!({
            "image_url": self.images.url(image),
            "volume_name": volume,
            "volume_size_gb": size_gb,
            "image_type": image_type,
        })
    }
}

// ---------------------------------------------------------------- commands

/// Runs a command, panicking with its stdout and stderr if it fails.
#[track_caller]
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The SHA-256 of a file, hex, by `sha256sum`.
pub fn sha256_file(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// Writes `<image>.sha256` in `sha256sum` format and returns the digest.
pub fn write_sidecar(image: &Path) -> String {
    let digest = sha256_file(image);
    let name = image.file_name().unwrap().to_string_lossy();
    fs::write(image.with_file_name(format!("{name}.sha256")), format!("{digest}  {name}\n"))
        .unwrap();
    digest
}

// ---------------------------------------------------------------- images

/// A small ext4 filesystem image with real files, as raw and as
/// compressed qcow2 holding the same disk.
pub struct FsImage {
    /// `<name>.raw`: the filesystem, 64 MiB.
    pub raw: PathBuf,
    /// `<name>.qcow2`: the same disk, `qemu-img convert -c`.
    pub qcow2: PathBuf,
}

impl FsImage {
    pub fn raw_name(&self) -> String {
        self.raw.file_name().unwrap().to_string_lossy().into_owned()
    }

    pub fn qcow2_name(&self) -> String {
        self.qcow2.file_name().unwrap().to_string_lossy().into_owned()
    }
}

/// Builds `<dir>/<name>.raw` and `<dir>/<name>.qcow2` (with `.sha256`
/// sidecars) from a directory of text files and a few MiB of pseudo-random
/// data; `seed` makes the content of different images differ.
pub fn build_fs_image(dir: &Path, name: &str, seed: u64) -> FsImage {
    let scratch = dir.parent().unwrap().join(format!("{name}-src"));
    let src = scratch.join("rootfs");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/hostname"), format!("{name}\n")).unwrap();
    fs::write(src.join("etc/motd"), "provisioned by an integration test\n".repeat(50)).unwrap();
    let mut readme = String::new();
    for i in 0..2000 {
        readme.push_str(&format!("line {i} of image {name} seed {seed}\n"));
    }
    fs::write(src.join("README.txt"), readme).unwrap();
    fs::create_dir_all(src.join("data")).unwrap();
    fs::write(src.join("data/random.bin"), pseudo_random(3 * MIB as usize, seed)).unwrap();
    fs::write(src.join("data/more.bin"), pseudo_random(MIB as usize / 2, seed ^ 0xabcdef)).unwrap();

    let raw = dir.join(format!("{name}.raw"));
    let qcow2 = dir.join(format!("{name}.qcow2"));
    run(Command::new("mkfs.ext4").arg("-q").arg("-d").arg(&src).arg(&raw).arg("64M"));
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2));
    write_sidecar(&raw);
    write_sidecar(&qcow2);
    let _ = fs::remove_dir_all(&scratch);
    FsImage { raw, qcow2 }
}

/// Deterministic bytes that do not compress (xorshift64*).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A qcow2 of `size` bytes (a multiple of 64 KiB) whose every byte is
/// `pattern`, zstd-compressed: a few hundred KiB per GiB to download, and
/// every byte real data to write. With a `.sha256` sidecar.
pub fn build_filled_qcow2(path: &Path, size: u64, pattern: u8) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "compression_type=zstd"])
        .arg(path)
        .arg(size.to_string()));
    // One qemu-io write may not exceed 2 GiB minus a sector: write 1 GiB
    // at a time. `-t unsafe` skips the flush at exit, which is most of the
    // time otherwise.
    let mut off = 0;
    while off < size {
        let len = (size - off).min(GIB);
        run(Command::new("qemu-io")
            .args(["-t", "unsafe", "-f", "qcow2", "-c"])
            .arg(format!("write -c -P {pattern:#04x} {off} {len}"))
            .arg(path));
        off += len;
    }
    write_sidecar(path);
}

/// A qcow2 whose write into a volume takes seconds (about 3 s per GiB
/// here) while its download takes milliseconds.
pub fn build_slow_write_qcow2(path: &Path, size_gib: u64) {
    build_filled_qcow2(path, size_gib * GIB, 0x5a);
}

/// The disk a qcow2 holds, as a raw file next to it (for comparisons).
pub fn qcow2_to_raw(qcow2: &Path) -> PathBuf {
    let raw = qcow2.with_extension("expected.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(qcow2)
        .arg(&raw));
    raw
}

/// A compressed qcow2 whose first compressed cluster is garbage: its
/// header and tables are sound (the daemon's header reader and
/// `qemu-img check` pass it), but `qemu-img convert` fails to inflate the
/// data. For jobs that must fail while writing, after the volume exists.
/// Without a sidecar.
pub fn build_bad_data_qcow2(path: &Path) {
    let text = path.with_extension("src.raw");
    fs::write(&text, b"compressible line of text\n".repeat(120_000)).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"])
        .arg(&text)
        .arg(path));
    fs::remove_file(&text).unwrap();
    let mut bytes = fs::read(path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&bytes, l2);
    assert!(entry & (1 << 62) != 0, "the first cluster is compressed");
    // 64 KiB clusters: the host offset is in the low 54 bits.
    let host = (entry & ((1 << 54) - 1)) as usize;
    bytes[host..host + 64].fill(0xff);
    fs::write(path, &bytes).unwrap();
}

/// A tiny empty qcow2 (16 MiB virtual) with its sidecar, for jobs that
/// must simply complete.
pub fn build_tiny_qcow2(path: &Path) {
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(path).arg("16M"));
    write_sidecar(path);
}

// ---------------------------------------------------------------- checks

/// Asserts that `volume` starts with exactly the bytes of `image` and reads
/// as zeros after them, comparing here and with `qemu-img compare`. Past
/// the image's end only the volume's data extents are read: holes read as
/// zeros by definition, and a 1 GiB sparse volume would otherwise cost
/// seconds per check.
#[track_caller]
pub fn assert_volume_holds(volume: &Path, image: &Path, volume_size: u64) {
    let vlen = fs::metadata(volume).unwrap_or_else(|e| panic!("{}: {e}", volume.display())).len();
    assert_eq!(vlen, volume_size, "volume {} has the wrong size", volume.display());
    let ilen = fs::metadata(image).unwrap().len();
    let mut v = File::open(volume).unwrap();
    let mut i = File::open(image).unwrap();
    let mut vb = vec![0u8; MIB as usize];
    let mut ib = vec![0u8; MIB as usize];
    let zeros = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < vlen.min(ilen) {
        let n = (vlen.min(ilen) - off).min(MIB) as usize;
        v.read_exact(&mut vb[..n]).unwrap();
        i.read_exact(&mut ib[..n]).unwrap();
        // Slice equality is a memcmp, fast even in a debug build.
        if vb[..n] != ib[..n] {
            let at = (0..n).find(|&k| vb[k] != ib[k]).unwrap();
            panic!(
                "volume {} differs from image {} at byte {}",
                volume.display(),
                image.display(),
                off + at as u64
            );
        }
        off += n as u64;
    }
    for (start, end) in data_extents(&v, ilen.min(vlen), vlen) {
        v.seek(SeekFrom::Start(start)).unwrap();
        let mut off = start;
        while off < end {
            let n = (end - off).min(MIB) as usize;
            v.read_exact(&mut vb[..n]).unwrap();
            if vb[..n] != zeros[..n] {
                let at = (0..n).find(|&k| vb[k] != 0).unwrap();
                panic!(
                    "volume {} holds non-zero byte {:#04x} at {} past the image end ({ilen})",
                    volume.display(),
                    vb[at],
                    off + at as u64
                );
            }
            off += n as u64;
        }
    }
    // And qemu-img's own opinion: identical, the extra tail reading as zeros.
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw"])
        .arg(image)
        .arg(volume));
}

/// Asserts that `volume` holds the disk inside the qcow2 `image` and reads
/// as zeros after it, by `qemu-img compare`: for images of a GiB or more,
/// where a raw copy to compare with would cost as much again.
#[track_caller]
pub fn assert_volume_holds_qcow2(volume: &Path, image: &Path, volume_size: u64) {
    let vlen = fs::metadata(volume).unwrap_or_else(|e| panic!("{}: {e}", volume.display())).len();
    assert_eq!(vlen, volume_size, "volume {} has the wrong size", volume.display());
    run(Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(volume));
}

/// Processes whose command line mentions `path` (a qemu-img still writing
/// the volume, say).
pub fn processes_using(path: &Path) -> Vec<String> {
    let needle = path.display().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// The `[start, end)` ranges of `file` between `from` and `len` that hold
/// data, by `SEEK_DATA`/`SEEK_HOLE` (a file system without them reports
/// one extent: everything).
fn data_extents(file: &File, from: u64, len: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut off = from;
    while off < len {
        // SAFETY: lseek on a descriptor we own; it only moves the offset.
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data from here to the end.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { (hole as u64).min(len) };
        extents.push((data as u64, end));
        off = end;
    }
    extents
}

/// The names in a directory, sorted; empty when it does not exist.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

/// The image files in a cache directory, sorted: entries (`<sha>.img`) and
/// temporary downloads (`.lvp-<job>.part`), without the entries' `.json`
/// records, the records being rewritten (`.lvp-<sha>.json.part`, which the
/// background flush thread may still hold just after a job completes) and
/// the daemon's lock file.
pub fn cache_files(dir: &Path) -> Vec<String> {
    let record = |n: &str| n.ends_with(".json") || n.ends_with(".json.part");
    list_dir(dir).into_iter().filter(|n| n != ".lvp-lock" && !record(n)).collect()
}

/// Whether `needle` occurs anywhere in the file at `path`.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    assert!(!needle.is_empty());
    let mut f = File::open(path).unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        let mut window = std::mem::take(&mut carry);
        window.extend_from_slice(&buf[..n]);
        if window.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = needle.len().saturating_sub(1).min(window.len());
        carry = window[window.len() - keep..].to_vec();
    }
}

/// A request body as JSON, for tests that change one field.
pub fn with_field(mut body: Value, field: &str, value: Value) -> Value {
    body[field] = value;
    body
}

// ---------------------------------------------------------------- scripts

/// `scripts/<name>` in this repository.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name)
}

/// Whether `name` is a command on `PATH` (or in /usr/sbin, /sbin).
pub fn have_command(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .any(|dir| dir.join(name).is_file())
}

/// Whether strace is here for a test that traces the daemon; when it is
/// not, says that `test` is skipped (and fails under CI, which installs it).
pub fn have_strace(test: &str) -> bool {
    if have_command("strace") {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "strace is missing, and CI must have it");
    eprintln!("skipping {test}: no strace");
    false
}

/// Runs a command to the end and returns its output whatever its exit
/// status, for tests that expect a failure; `output_text` shows it.
#[track_caller]
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// A command's exit status, stdout and stderr, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------- listeners

/// A TCP listener that counts the connections it accepts and records every
/// byte clients send. With a `reply`, it answers each request head with
/// that text (a redirect, say) and closes; without one it only listens,
/// which is how a test proves that nothing connected to an address.
pub struct Listener {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
    stopping: Arc<AtomicBool>,
}

impl Listener {
    /// Listens on `ip` (any loopback address, such as 127.0.0.2).
    pub fn start(ip: &str, reply: Option<String>) -> Listener {
        let listener = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let (c, r, s) = (Arc::clone(&connections), Arc::clone(&received), Arc::clone(&stopping));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, reply) = (Arc::clone(&r), reply.clone());
                thread::spawn(move || {
                    use std::io::Write;
                    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    r.lock().unwrap().extend_from_slice(&head);
                    if let Some(reply) = reply {
                        let _ = stream.write_all(reply.as_bytes());
                    }
                });
            }
        });
        Listener { addr, connections, received, stopping }
    }

    /// A listener on 127.0.0.1 that answers every request with a 302 to
    /// `location`.
    pub fn redirect_to(location: &str) -> Listener {
        let reply = format!(
            "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        Listener::start("127.0.0.1", Some(reply))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{path}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// A TCP relay on 127.0.0.1 that forwards every connection to `target`
/// and records, byte for byte, what clients sent through it: put in front
/// of a proxy, it shows what that proxy received.
pub struct Relay {
    pub addr: SocketAddr,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&sent);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(upstream) = TcpStream::connect(target) else { continue };
                let recorded = Arc::clone(&recorded);
                let (mut c_read, mut u_write) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                thread::spawn(move || {
                    use std::io::Write;
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = c_read.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                        if u_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut u_read, mut c_write) = (upstream, client);
                thread::spawn(move || {
                    let _ = io::copy(&mut u_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay { addr, sent }
    }

    /// Everything clients sent through the relay so far.
    pub fn sent(&self) -> Vec<u8> {
        self.sent.lock().unwrap().clone()
    }
}
