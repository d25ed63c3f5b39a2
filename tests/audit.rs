//! The audit trail, read from the real daemon's log: every request names
//! its caller (certificate subject or token name, never the token), the
//! remote address and the outcome; failed authentication names the reason
//! and the remote address, at info, so nobody outside can flood warn or
//! error.

mod common;

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn mint_token(tokens: &std::path::Path, name: &str) -> String {
    let out = run(Command::new(BIN).args(["token", "new", name, "--tokens"]).arg(tokens));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The log lines that contain every one of `words`.
fn lines_with<'a>(log: &'a str, words: &[&str]) -> Vec<&'a str> {
    log.lines().filter(|l| words.iter().all(|w| l.contains(w))).collect()
}

#[track_caller]
fn assert_one_line(log: &str, words: &[&str]) -> String {
    let found = lines_with(log, words);
    assert!(!found.is_empty(), "no log line with {words:?}:\n{log}");
    found[0].to_string()
}

#[test]
fn every_request_is_audited_with_its_caller_and_outcome() {
    let dir = TestDir::new("audit");
    let pki = Pki::create(&dir);
    let tokens = dir.join("tokens");
    fs::write(&tokens, "").unwrap();
    let secret = mint_token(&tokens, "ci-pipeline");
    let auth = Auth { client_ca: true, tokens: Some(tokens) };
    let h = Harness::start_in(dir, pki, &auth, &[]);
    let base = h.daemon.base_url();
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));

    // A job submitted with a token, and its status read with a certificate.
    let ci = Api::new(base.clone(), h.pki.tls(None))
        .with_header("Authorization", &format!("Bearer {secret}"));
    let id = ci.submit(&h.request("tiny.qcow2", "vm-audit", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
    // A 404 for a job that does not exist, with a certificate.
    let missing = "00000000-0000-4000-8000-000000000000";
    assert_eq!(h.api.status(missing).status, 404);
    // Failed authentication: a wrong token, and no credentials at all.
    let wrong = Api::new(base.clone(), h.pki.tls(None))
        .with_header("Authorization", "Bearer not-the-token-0000");
    assert_eq!(wrong.request("GET", "/api/v1/jobs", None).status, 401);
    let nobody = Api::new(base.clone(), h.pki.tls(None));
    assert_eq!(nobody.request("DELETE", &format!("/api/v1/cancel/{id}"), None).status, 401);
    // A certificate from another CA fails in the handshake.
    let rogue = Api::new(base, h.pki.tls(Some(h.pki.other_client())));
    assert!(rogue.try_request("GET", "/health", None).is_err());
    // A request the front door refuses itself.
    let mut tls = tls_connect(&h.daemon, &h.pki);
    tls.write_all(b"POST /api/v1/provision HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    tls.flush().unwrap();
    drop(tls);
    // A connection straight to nowhere useful: plain bytes on the TLS port.
    let mut plain = TcpStream::connect(h.daemon.addr).unwrap();
    plain.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
    drop(plain);
    std::thread::sleep(Duration::from_millis(500));

    let log = h.daemon.log_text();
    let short = &id[..8];
    // The submission: the token's name, the outcome and the job it made.
    let line = assert_one_line(
        &log,
        &["peer=token:ci-pipeline", "from=127.0.0.1:", "POST /api/v1/provision 202", short],
    );
    assert!(line.contains(&format!("job={id}")), "{line}");
    assert!(line.contains(" INFO") || line.contains("[INFO]"), "{line}");
    // Reads with the certificate name its subject.
    assert_one_line(&log, &["peer=cert:CN=test-client", &format!("/api/v1/status/{id} 200")]);
    assert_one_line(&log, &["peer=cert:CN=test-client", &format!("/api/v1/status/{missing} 404")]);
    // Authentication failures: reason and remote address.
    assert_one_line(
        &log,
        &[
            "peer=unauthenticated",
            "from=127.0.0.1:",
            "GET /api/v1/jobs 401",
            "auth_failure=\"invalid API token\"",
        ],
    );
    assert_one_line(
        &log,
        &["peer=unauthenticated", "DELETE /api/v1/cancel/", "401", "no client certificate"],
    );
    assert_one_line(&log, &["TLS handshake with 127.0.0.1:", "failed", "UnknownIssuer"]);
    assert_one_line(&log, &["front door refused a request from 127.0.0.1:", "411"]);
    assert_one_line(&log, &["TLS handshake with 127.0.0.1:", "failed", "corrupt message"]);

    // The token itself appears nowhere, nor does any bearer header.
    assert!(!log.contains(&secret), "the token was logged");
    assert!(!log.contains("not-the-token-0000"), "a presented token was logged");
    // What a remote party caused stays below warn.
    for l in log.lines() {
        let remote_caused = l.contains("TLS handshake with")
            || l.contains("front door refused")
            || l.contains("peer=unauthenticated");
        if remote_caused {
            assert!(!l.contains("WARN") && !l.contains("ERROR"), "at warn or error: {l}");
        }
    }
}

/// A flood of failed authentication is logged within a budget (20 lines a
/// second), and the first line after it says how many were dropped; the
/// metrics still count every request, and authenticated requests in the
/// middle of the flood are all audited.
#[test]
fn failed_authentication_lines_are_rate_limited_and_counted() {
    let dir = TestDir::new("audit-flood");
    let pki = Pki::create(&dir);
    let tokens = dir.join("tokens");
    fs::write(&tokens, "").unwrap();
    mint_token(&tokens, "ci");
    let auth = Auth { client_ca: true, tokens: Some(tokens) };
    let h = Harness::start_in(dir, pki, &auth, &[]);
    let wrong = Api::new(h.daemon.base_url(), h.pki.tls(None))
        .with_header("Authorization", "Bearer not-the-token-0000");
    const FLOOD: usize = 200;
    let started = std::time::Instant::now();
    let missing = "00000000-0000-4000-8000-000000000000";
    for i in 0..FLOOD {
        assert_eq!(wrong.request("GET", "/api/v1/jobs", None).status, 401);
        if i % 50 == 0 {
            assert_eq!(h.api.status(missing).status, 404);
        }
    }
    let seconds = started.elapsed().as_secs_f64().ceil() as usize + 1;
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(wrong.request("GET", "/api/v1/jobs", None).status, 401);
    std::thread::sleep(Duration::from_millis(300));

    let log = h.daemon.log_text();
    let logged = lines_with(&log, &["peer=unauthenticated", "auth_failure="]).len();
    assert!(logged >= 20, "the budget is used, not silenced: {logged} lines");
    assert!(
        logged <= 20 * (seconds + 1) && logged < FLOOD,
        "{logged} failure lines for {FLOOD} failures in about {seconds} s"
    );
    let after = assert_one_line(&log, &["auth_failure=", "earlier lines caused by clients"]);
    assert!(after.contains("were not logged: over 20 a second"), "{after}");
    // Every authenticated request is still audited.
    let audited = lines_with(&log, &["peer=cert:CN=test-client", missing, "404"]).len();
    assert_eq!(audited, FLOOD / 50);
    // And the metrics count every failure, logged or not.
    let (_, metrics) =
        get_text(&h.daemon.base_url(), h.pki.tls(Some(h.pki.client())), "/metrics", None);
    let line = format!(
        "lvp_http_requests_total{{endpoint=\"jobs\",method=\"GET\",code=\"401\"}} {}",
        FLOOD + 1
    );
    assert!(metrics.contains(&line), "no {line:?} in:\n{metrics}");
}

/// A client's method is its own invention: control characters in it
/// (terminal escapes that would rewrite what an operator sees in `tail -f`)
/// never reach the log, and it does not become a metrics label.
#[test]
fn control_characters_in_the_method_do_not_reach_the_log() {
    let h = Harness::start("audit-method", &[]);
    let forged =
        b"G\x1b]0;pwned\x07\x1b[2K\rFAKE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let reply = raw_https(&h.daemon, &h.pki, forged);
    assert!(reply.status >= 400, "{reply:#?}");
    std::thread::sleep(Duration::from_millis(300));
    let log = h.daemon.log_text();
    let line = assert_one_line(&log, &["G_]0;pwned__[2K_FAKE /health"]);
    for c in ['\x1b', '\x07', '\r'] {
        assert!(!log.contains(c), "a raw {c:?} in the log: {line:?}");
    }
    let (_, metrics) =
        get_text(&h.daemon.base_url(), h.pki.tls(Some(h.pki.client())), "/metrics", None);
    assert!(!metrics.contains("pwned"), "{metrics}");
}
