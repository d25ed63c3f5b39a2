//! Trust and reach for image sources, through the real daemon: a forward
//! proxy from Debian's `tinyproxy` on loopback (started here; `.ci/run`
//! installs it) honoured from `HTTP_PROXY`/`HTTPS_PROXY`, bypassed for
//! `NO_PROXY`, overridden by `--proxy`; an https source whose CA comes from
//! `--source-ca`; a TLS failure that names the host and the reason; and,
//! for an https source signed for S3, proof from a byte-recording relay in
//! front of tinyproxy that the proxy saw only the CONNECT line.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// tinyproxy on 127.0.0.1, logging every connection; killed on drop.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Tinyproxy {
    fn start(test: &str, dir: &TestDir) -> Option<Tinyproxy> {
        if !have_command("tinyproxy") {
            assert!(std::env::var_os("CI").is_none(), "{test}: tinyproxy is not installed");
            eprintln!("skipping {test}: tinyproxy is not installed (apt-get install tinyproxy)");
            return None;
        }
        let port = free_port();
        let log = dir.join("tinyproxy.log");
        let conf = dir.join("tinyproxy.conf");
        fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\n\
                 MaxClients 20\nAllow 127.0.0.1\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not open port {port}");
            thread::sleep(Duration::from_millis(20));
        }
        Some(Tinyproxy { child, port, log })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `CONNECT` requests tinyproxy logged, as `host:port` targets.
    fn connects(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split("): CONNECT ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap_or_default().to_string())
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTPS file server on 127.0.0.1 with the test PKI's server
/// certificate; records every request head it decrypted.
struct HttpsFiles {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
}

impl HttpsFiles {
    fn start(pki: &Pki, root: &Path) -> HttpsFiles {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pki.server_cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (recorded, root) = (Arc::clone(&heads), root.to_owned());
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let (config, recorded, root) =
                    (Arc::clone(&config), Arc::clone(&recorded), root.clone());
                thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let path =
                        head.split(' ').nth(1).unwrap_or("/").split('?').next().unwrap_or("/");
                    let file = root.join(path.trim_start_matches('/'));
                    recorded.lock().unwrap().push(head.clone());
                    let reply = match fs::read(&file) {
                        Ok(body) => {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&body);
                            r
                        }
                        Err(_) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec(),
                    };
                    let _ = tls.write_all(&reply);
                    let _ = tls.flush();
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        HttpsFiles { port, heads }
    }

    fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/{name}", self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn job(url: &str, volume: &str) -> Value {
    json!({"image_url": url, "volume_name": volume, "volume_size_gb": 1, "image_type": "raw"})
}

#[track_caller]
fn completes(api: &Api, daemon: &Daemon, url: &str, volume: &str) -> Value {
    let id = api.submit(&job(url, volume));
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}\n{}", daemon.log_text());
    status
}

#[test]
fn http_source_through_the_proxy_from_env_no_proxy_and_flag() {
    let dir = TestDir::new("proxy-http");
    let Some(proxy) =
        Tinyproxy::start("http_source_through_the_proxy_from_env_no_proxy_and_flag", &dir)
    else {
        return;
    };
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    fs::write(images.root().join("a.raw"), pseudo_random(2 * MIB as usize, 31)).unwrap();
    let target = images.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy_url = proxy.url();

    // HTTP_PROXY: the image and its sidecar go through tinyproxy.
    let d = TestDir::new("proxy-http-env");
    let daemon = Daemon::start_env(&d, &pki, &[], &[("HTTP_PROXY", &proxy_url)]);
    let api = Api::mtls(&daemon, &pki);
    completes(&api, &daemon, &images.url("a.raw"), "vm-env");
    let seen = proxy.connects();
    assert_eq!(seen.len(), 2, "sidecar and image through the proxy: {seen:?}");
    assert!(seen.iter().all(|t| *t == target), "{seen:?} should all be {target}");
    assert!(daemon.log_text().contains(&format!("http via 127.0.0.1:{}", proxy.port)));
    drop(daemon);

    // NO_PROXY covers the host: straight to the server.
    let d = TestDir::new("proxy-http-no-proxy");
    let daemon = Daemon::start_env(
        &d,
        &pki,
        &[],
        &[("HTTP_PROXY", &proxy_url), ("NO_PROXY", "localhost,127.0.0.1")],
    );
    let api = Api::mtls(&daemon, &pki);
    let before = images.gets("a.raw");
    completes(&api, &daemon, &images.url("a.raw"), "vm-direct");
    assert_eq!(images.gets("a.raw"), before + 1, "the image was fetched");
    assert_eq!(proxy.connects().len(), 2, "NO_PROXY was not honoured");
    drop(daemon);

    // --proxy overrides a dead proxy in the environment; --proxy none
    // overrides a live one.
    let d = TestDir::new("proxy-http-flag");
    let daemon = Daemon::start_env(
        &d,
        &pki,
        &["--proxy", &proxy_url],
        &[("HTTP_PROXY", "http://127.0.0.1:1")],
    );
    let api = Api::mtls(&daemon, &pki);
    completes(&api, &daemon, &images.url("a.raw"), "vm-flag");
    assert_eq!(proxy.connects().len(), 4, "--proxy was not used");
    drop(daemon);
    let d = TestDir::new("proxy-http-none");
    let daemon = Daemon::start_env(&d, &pki, &["--proxy", "none"], &[("HTTP_PROXY", &proxy_url)]);
    let api = Api::mtls(&daemon, &pki);
    completes(&api, &daemon, &images.url("a.raw"), "vm-none");
    assert_eq!(proxy.connects().len(), 4, "--proxy none still used the proxy");
}

#[test]
fn https_source_signed_for_s3_shows_the_proxy_only_a_connect() {
    let dir = TestDir::new("proxy-https");
    let Some(proxy) =
        Tinyproxy::start("https_source_signed_for_s3_shows_the_proxy_only_a_connect", &dir)
    else {
        return;
    };
    let pki = Pki::create(&dir);
    let root = dir.mkdir("files");
    let image = root.join("disk.raw");
    fs::write(&image, pseudo_random(2 * MIB as usize, 32)).unwrap();
    let digest = write_sidecar(&image);
    let https = HttpsFiles::start(&pki, &root);
    // What reaches tinyproxy, recorded byte for byte on the way.
    let relay = Relay::start(([127, 0, 0, 1], proxy.port).into());
    let relay_url = format!("http://{}", relay.addr);
    let origin = format!("https://127.0.0.1:{}", https.port);
    let ca = pki.ca_cert.display().to_string();
    let (key, secret) = ("AKIDPROXYTEST", "proxy-test-secret-value");
    let daemon = Daemon::start_env(
        &dir,
        &pki,
        &["--source-ca", &ca, "--s3-endpoint", &origin],
        &[
            ("HTTPS_PROXY", &relay_url),
            ("AWS_ACCESS_KEY_ID", key),
            ("AWS_SECRET_ACCESS_KEY", secret),
        ],
    );
    let api = Api::mtls(&daemon, &pki);
    let status = completes(&api, &daemon, &https.url("disk.raw"), "vm-https");
    assert_eq!(status["image_sha256"], digest.as_str());

    // The server got signed requests...
    let heads = https.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for h in &heads {
        assert!(
            h.to_ascii_lowercase().contains("authorization: aws4-hmac-sha256"),
            "unsigned: {h}"
        );
    }
    // ...while the proxy got a CONNECT line and then only TLS records.
    let sent = relay.sent();
    let text = String::from_utf8_lossy(&sent);
    let target = format!("CONNECT 127.0.0.1:{} HTTP/1.1", https.port);
    assert_eq!(text.matches(&target).count(), 2, "{text:?}");
    for secret_thing in
        ["AWS4-HMAC-SHA256", "x-amz-", "X-Amz-", "uthorization", key, secret, "disk.raw"]
    {
        assert!(!text.contains(secret_thing), "the proxy saw {secret_thing:?} in clear");
    }
    assert_eq!(proxy.connects().len(), 2, "tinyproxy itself carried both requests");
}

#[test]
fn tls_failure_names_the_host_and_the_reason() {
    let dir = TestDir::new("tls-unknown-ca");
    let pki = Pki::create(&dir);
    let root = dir.mkdir("files");
    fs::write(root.join("disk.raw"), pseudo_random(MIB as usize, 33)).unwrap();
    let https = HttpsFiles::start(&pki, &root);
    // No --source-ca: the test CA is not among the system roots.
    let daemon = Daemon::start(&dir, &pki, &Auth::mtls(), &[]);
    let api = Api::mtls(&daemon, &pki);
    let mut body = job(&https.url("disk.raw"), "vm-tls");
    body["image_sha256"] = Value::from("cd".repeat(32));
    let id = api.submit(&body);
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap();
    for word in ["TLS with 127.0.0.1 failed", "UnknownIssuer", "--source-ca"] {
        assert!(error.contains(word), "error should mention {word:?}: {error}");
    }
    assert!(https.heads().is_empty(), "no request was sent over the failed handshake");

    // A --source-ca file without certificates stops the daemon at start.
    let empty = dir.join("empty.pem");
    fs::write(&empty, "not a certificate\n").unwrap();
    let mut args = Daemon::args(&dir, &pki, &Auth::mtls(), free_port());
    args.extend(["--source-ca".to_string(), empty.display().to_string()]);
    let (exit, log) = serve_expecting_exit(&args);
    assert_eq!(exit.code(), Some(2), "{log}");
    assert!(log.contains("--source-ca") && log.contains("holds no PEM certificate"), "{log}");
}
