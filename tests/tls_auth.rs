//! Who may talk to the daemon: a client certificate from the client CA, or
//! (only when tokens are configured) a valid API token; and the set-ups the
//! daemon refuses to start with.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Asserts a request fails at the TLS level with `alert`, the alert the
/// daemon sends when it refuses the handshake.
#[track_caller]
fn assert_refused_at_handshake(api: &Api, alert: &str) {
    match api.try_request("GET", "/health", None) {
        Ok(reply) => panic!("expected the handshake to be refused, got {reply:#?}"),
        Err(e) => assert!(e.to_string().contains(alert), "expected TLS alert {alert}, got: {e}"),
    }
}

/// Mints a token with the daemon's own `token new` subcommand.
fn mint_token(tokens: &Path, name: &str) -> String {
    let out = run(Command::new(BIN).args(["token", "new", name, "--tokens"]).arg(tokens));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.len() >= 32, "token new printed {token:?}");
    token
}

#[test]
fn mutual_tls_admits_only_certificates_from_the_client_ca() {
    let h = Harness::start("mtls-only", &[]);
    let base = h.daemon.base_url();

    // The test client's certificate works.
    let reply = h.api.request("GET", "/health", None);
    assert_eq!((reply.status, &reply.body["status"]), (200, &Value::from("healthy")));

    // No certificate: refused in the handshake, before any HTTP.
    let anonymous = Api::new(base.clone(), h.pki.tls(None));
    assert_refused_at_handshake(&anonymous, "CertificateRequired");
    // A token does not help when tokens are not configured.
    let with_token = Api::new(base.clone(), h.pki.tls(None)).with_header("X-API-Token", "anything");
    assert_refused_at_handshake(&with_token, "CertificateRequired");
    // A certificate from another CA: refused as an unknown issuer.
    let rogue = Api::new(base, h.pki.tls(Some(h.pki.other_client())));
    assert_refused_at_handshake(&rogue, "UnknownCA");
    let body = h.request("never.qcow2", "vm-rogue", 1, "qcow2").to_string();
    assert!(rogue.try_request("POST", "/api/v1/provision", Some(body.as_bytes())).is_err());

    assert_eq!(h.images.requests(), 0, "no refused client got a job started");
    assert!(h.daemon.log_text().contains("peer sent no certificates"), "the daemon says why");
}

/// TCP ports `pid` listens on, from `/proc` (its socket inodes matched
/// against `/proc/net/tcp`).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            let l = l.display().to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A is LISTEN; field 9 is the socket inode.
            (f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)))
                .then(|| u16::from_str_radix(f[1].rsplit(':').next().unwrap(), 16).unwrap())
        })
        .collect()
}

/// tiny_http listens on a private loopback port behind the front door. A
/// local process that connects there directly skips TLS, so it must be
/// treated as a client with no certificate.
#[test]
fn direct_connection_to_the_private_port_is_unauthenticated() {
    let h = Harness::start("private-port", &[]);
    let public = h.daemon.addr.port();
    let private: Vec<u16> =
        listening_ports(h.daemon.pid()).into_iter().filter(|p| *p != public).collect();
    assert_eq!(private.len(), 1, "expected one private port besides {public}: {private:?}");

    let body = h.request("never.qcow2", "vm-direct", 1, "qcow2").to_string();
    for (method, path, body) in
        [("GET", "/health", ""), ("POST", "/api/v1/provision", body.as_str())]
    {
        let mut s = TcpStream::connect(("127.0.0.1", private[0])).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "{method} {path} on the private port: {answer}"
        );
        assert!(answer.contains("\"unauthorized\""), "{answer}");
    }
    assert_eq!(h.images.requests(), 0, "no job was started");
}

#[test]
fn tokens_admit_clients_without_a_certificate() {
    let dir = TestDir::new("tokens");
    let pki = Pki::create(&dir);
    let tokens = dir.join("tokens");
    // A hand-written hashed line, then one minted by the daemon itself.
    let manual = "manual-token-0123456789abcdef0123456789";
    let digest: String =
        Sha256::digest(manual.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&tokens, format!("# test tokens\nops:sha256:{digest}\n")).unwrap();
    let minted = mint_token(&tokens, "ci");
    assert!(!fs::read_to_string(&tokens).unwrap().contains(&minted), "tokens are stored hashed");

    let auth = Auth { client_ca: true, tokens: Some(tokens) };
    let h = Harness::start_in(dir, pki, &auth, &[]);
    let base = h.daemon.base_url();
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));

    // Bearer token, no certificate: a whole provision goes through.
    let bearer = Api::new(base.clone(), h.pki.tls(None))
        .with_header("Authorization", &format!("Bearer {minted}"));
    let id = bearer.submit(&h.request("tiny.qcow2", "vm-token", 1, "qcow2"));
    assert_eq!(bearer.wait_final(&id, JOB_TIMEOUT)["status"], "completed");

    // X-API-Token works too.
    let header = Api::new(base.clone(), h.pki.tls(None)).with_header("X-API-Token", manual);
    let reply = header.status(&id);
    assert_eq!((reply.status, &reply.body["job_id"]), (200, &Value::from(id.as_str())));

    // A certificate from the client CA still works without a token.
    assert_eq!(h.api.status(&id).status, 200);

    // Wrong tokens and no token: 401 with the error body, and no job.
    let requests_before = h.images.requests();
    let probe = h.request("tiny.qcow2", "vm-denied", 1, "qcow2").to_string();
    let cases = [
        ("Authorization", "Bearer wrong-token".to_string(), "invalid API token"),
        ("X-API-Token", format!("{minted}x"), "invalid API token"),
        ("Authorization", format!("Bearer {digest}"), "invalid API token"),
    ];
    for (name, value, want) in &cases {
        let api = Api::new(base.clone(), h.pki.tls(None)).with_header(name, value);
        for (method, path, body) in
            [("GET", "/health", None), ("POST", "/api/v1/provision", Some(probe.as_bytes()))]
        {
            let reply = api.request(method, path, body);
            let details = reply.expect_error(401, "unauthorized");
            assert!(details.contains(want), "{name}: {value} → {details}");
            assert_eq!(
                reply.headers.get("www-authenticate").map(|v| v.to_str().unwrap()),
                Some("Bearer")
            );
        }
    }
    let anonymous = Api::new(base.clone(), h.pki.tls(None));
    let reply = anonymous.request("POST", "/api/v1/provision", Some(probe.as_bytes()));
    let details = reply.expect_error(401, "unauthorized");
    assert!(details.contains("no client certificate and no API token"), "{details}");
    assert_eq!(h.images.requests(), requests_before, "a refused request started no job");
    assert!(!h.daemon.volume("vm-denied").exists());

    // A certificate from another CA is refused even though tokens are on,
    // and even with a valid token.
    let rogue = Api::new(base, h.pki.tls(Some(h.pki.other_client())))
        .with_header("Authorization", &format!("Bearer {minted}"));
    assert_refused_at_handshake(&rogue, "UnknownCA");
}

/// Replaces the value after `flag` in a `serve` argument list.
fn set_arg(args: &mut [String], flag: &str, value: &Path) {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
    args[i + 1] = value.display().to_string();
}

#[test]
fn daemon_refuses_to_start_without_authentication_or_with_bad_tls_files() {
    let dir = TestDir::new("refuse-start");
    let pki = Pki::create(&dir);
    // Nothing listens there: the daemon must stop before it gets that far.
    let port = free_port();

    // Neither --client-ca nor --tokens.
    let args = Daemon::args(&dir, &pki, &Auth { client_ca: false, tokens: None }, port);
    let (status, stderr) = serve_expecting_exit(&args);
    assert!(!status.success(), "{status}");
    assert!(stderr.contains("--client-ca") && stderr.contains("--tokens"), "{stderr}");

    // A certificate file that does not exist.
    let mut args = Daemon::args(&dir, &pki, &Auth::mtls(), port);
    let missing = dir.join("pki/missing.pem");
    set_arg(&mut args, "--tls-cert", &missing);
    let (status, stderr) = serve_expecting_exit(&args);
    assert!(!status.success(), "{status}");
    assert!(
        stderr.contains("--tls-cert") && stderr.contains(&missing.display().to_string()),
        "{stderr}"
    );

    // A key that is valid but belongs to another certificate.
    let mut args = Daemon::args(&dir, &pki, &Auth::mtls(), port);
    set_arg(&mut args, "--tls-key", &pki.client_key);
    let (status, stderr) = serve_expecting_exit(&args);
    assert!(!status.success(), "{status}");
    assert!(stderr.contains("--tls-key") && stderr.contains("does not match"), "{stderr}");

    // A tokens file without a usable token.
    let mut args =
        Daemon::args(&dir, &pki, &Auth { client_ca: false, tokens: Some(dir.join("t")) }, port);
    fs::write(dir.join("t"), "# nobody\n").unwrap();
    set_arg(&mut args, "--tokens", &dir.join("t"));
    let (status, stderr) = serve_expecting_exit(&args);
    assert!(!status.success(), "{status}");
    assert!(stderr.contains("--tokens"), "{stderr}");
}
