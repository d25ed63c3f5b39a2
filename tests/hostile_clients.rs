//! Clients that try to tie the daemon up or trip its parser: stalled TLS
//! handshakes that fill the connection cap, requests trickled a byte at a
//! time, oversized heads, conflicting framing headers, malformed job ids
//! and garbage. The daemon must answer each with a 4xx or drop it by its
//! deadline, keep serving a well-behaved client (or tell it clearly that it
//! is full), and never panic.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Deadlines short enough for a test: the handshake and idle timeouts, in
/// seconds, and the connection cap.
const HANDSHAKE_SECS: u64 = 2;
const IDLE_SECS: u64 = 3;
const MAX_CONNECTIONS: usize = 8;

fn start(name: &str) -> Harness {
    let (hs, idle, max) =
        (HANDSHAKE_SECS.to_string(), IDLE_SECS.to_string(), MAX_CONNECTIONS.to_string());
    Harness::start(
        name,
        &["--handshake-timeout", &hs, "--idle-timeout", &idle, "--max-connections", &max],
    )
}

/// Opens `n` TCP connections that never finish a TLS handshake: half send
/// nothing, half send the first bytes of a ClientHello and stop.
fn stalled_connections(h: &Harness, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(h.daemon.addr).unwrap();
            if i % 2 == 1 {
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
            }
            s
        })
        .collect()
}

/// Whether the daemon has closed `s`: a read returns end of file or a reset
/// within `within`, rather than timing out.
fn closed_by_daemon(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An alert or the refusal; keep reading to the close.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn stalled_handshakes_cannot_lock_out_a_legitimate_client() {
    let h = start("stalled-handshakes");
    assert_eq!(h.api.request("GET", "/health", None).status, 200);

    // 1. The cap is full of stalled handshakes: a new client is told so
    //    with a 503 it can read, at once, not left hanging.
    let mut stalled = stalled_connections(&h, MAX_CONNECTIONS);
    thread::sleep(Duration::from_millis(300));
    let fresh = Api::mtls(&h.daemon, &h.pki);
    let started = Instant::now();
    let reply = fresh.request("GET", "/health", None);
    assert!(started.elapsed() < Duration::from_secs(2), "the refusal took {:?}", started.elapsed());
    let details = reply.expect_error(503, "too_many_connections");
    assert!(details.contains("too many open connections"), "{details}");
    assert!(reply.headers.get("retry-after").is_some(), "{reply:#?}");

    // 2. The stalled ones are dropped once the handshake deadline passes.
    let deadline = Duration::from_secs(HANDSHAKE_SECS + 3);
    for (i, s) in stalled.iter_mut().enumerate() {
        assert!(closed_by_daemon(s, deadline), "stalled connection {i} still open");
    }
    // And the legitimate client is served again.
    assert_eq!(Api::mtls(&h.daemon, &h.pki).request("GET", "/health", None).status, 200);

    // 3. A flood far past the cap and the refusal slots: the excess is
    //    closed at once; a client never waits for longer than a deadline.
    let mut flood = stalled_connections(&h, MAX_CONNECTIONS + 60);
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    match Api::mtls(&h.daemon, &h.pki).try_request("GET", "/health", None) {
        Ok(reply) => {
            reply.expect_error(503, "too_many_connections");
        }
        Err(e) => assert!(
            started.elapsed() < Duration::from_secs(HANDSHAKE_SECS + 2),
            "a refused client waited {:?}: {e}",
            started.elapsed()
        ),
    }
    for s in flood.iter_mut() {
        assert!(closed_by_daemon(s, deadline), "a flooding connection outlived its deadline");
    }
    assert_eq!(Api::mtls(&h.daemon, &h.pki).request("GET", "/health", None).status, 200);
    let log = h.daemon.log_text();
    assert!(log.contains("closing TLS handshake from 127.0.0.1"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// One address cannot fill the connection cap: past its own cap its
/// connections are refused with a 503 that says why, and clients at other
/// addresses are still served.
#[test]
fn one_address_cannot_take_every_connection() {
    let h = Harness::start(
        "per-address",
        &[
            "--handshake-timeout",
            "5",
            "--max-connections",
            &MAX_CONNECTIONS.to_string(),
            "--max-connections-per-address",
            "4",
        ],
    );
    let greedy = Ipv4Addr::new(127, 0, 0, 2);
    let addr = h.daemon.addr;
    // As many stalled handshakes from one address as the whole cap.
    let stalled: Vec<TcpStream> =
        (0..MAX_CONNECTIONS).map(|_| connect_from(greedy, addr)).collect();
    thread::sleep(Duration::from_millis(300));

    // A client at another address is served.
    assert_eq!(h.api.request("GET", "/health", None).status, 200);
    // The greedy address is told what is wrong.
    let get = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let reply = raw_exchange(tls_handshake(connect_from(greedy, addr), &h.pki), get);
    assert_eq!(reply.status, 503, "{reply:#?}");
    assert_eq!(reply.json()["error"], "too_many_connections", "{reply:#?}");
    let details = reply.json()["details"].as_str().unwrap_or_default().to_string();
    assert!(details.contains("from 127.0.0.2 (4 at most)"), "{details}");

    // Once its connections close, it is served again.
    drop(stalled);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = raw_exchange(tls_handshake(connect_from(greedy, addr), &h.pki), get);
        if reply.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "127.0.0.2 still refused: {reply:#?}");
        thread::sleep(Duration::from_millis(100));
    }
}

/// A client at its address's cap that opens its next connection the moment
/// a reply has arrived, as curl in a loop does, is served: the slot of the
/// connection it just left is free by then, or within a short grace.
#[test]
fn a_client_at_its_cap_that_reconnects_at_once_is_served() {
    let h = Harness::start("per-address-reconnect", &["--max-connections-per-address", "1"]);
    let get = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    for i in 0..200 {
        let mut tls = tls_connect(&h.daemon, &h.pki);
        tls.write_all(get).unwrap();
        tls.flush().unwrap();
        // Read the reply as far as its Content-Length says, and leave
        // without waiting for the daemon to close.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let whole = |got: &[u8]| -> bool {
            let text = String::from_utf8_lossy(got);
            let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= len
        };
        while !whole(&got) {
            let n = tls.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "connection {i}: {text}");
    }
}

#[test]
fn requests_trickled_a_byte_at_a_time_are_cut_off() {
    let h = start("slowloris");
    // A handshake, then one byte of request head a second: every byte
    // resets the idle timer, but the request as a whole has a deadline.
    let tls = tls_connect(&h.daemon, &h.pki);
    let cut_after = trickle_until_cut(tls, Duration::from_secs(4 * IDLE_SECS));
    let cut_after = cut_after.expect("a trickled request was never cut off");
    assert!(
        cut_after < Duration::from_secs(IDLE_SECS + 3),
        "cut off only after {cut_after:?} (idle timeout {IDLE_SECS}s)"
    );

    // A connection that completes its handshake and then says nothing is
    // closed after the idle timeout.
    let mut quiet = tls_connect(&h.daemon, &h.pki);
    let started = Instant::now();
    assert!(closed_by_daemon(&mut quiet.sock, Duration::from_secs(IDLE_SECS + 3)));
    assert!(started.elapsed() >= Duration::from_secs(IDLE_SECS - 1));
    assert!(h.daemon.log_text().contains("closing request that arrives too slowly"));
    assert_eq!(h.api.request("GET", "/health", None).status, 200);
}

#[test]
fn a_trickled_request_is_cut_at_the_request_timeout_not_the_idle_timeout() {
    let h = Harness::start(
        "slowloris-request-timeout",
        &["--idle-timeout", "60", "--request-timeout", "2", "--max-connections", "8"],
    );
    let tls = tls_connect(&h.daemon, &h.pki);
    let cut_after = trickle_until_cut(tls, Duration::from_secs(15))
        .expect("a trickled request was not cut off within 15 s");
    assert!(cut_after < Duration::from_secs(5), "cut off only after {cut_after:?}");
    assert_eq!(h.api.request("GET", "/health", None).status, 200);

    // A head that stops halfway is answered 408, which says why, before
    // the connection closes; so is a body shorter than its Content-Length.
    let started = Instant::now();
    let reply = raw_https(&h.daemon, &h.pki, b"GET /health HTTP/1.1\r\nHost: localhost\r\n");
    assert_eq!(reply.status, 408, "{reply:#?}");
    assert_eq!(reply.json()["error"], "request_timeout", "{reply:#?}");
    assert!(reply.body.contains("within 2 s of its first byte"), "{reply:#?}");
    assert!(started.elapsed() < Duration::from_secs(6), "answered after {:?}", started.elapsed());
    let short_body = b"POST /api/v1/provision HTTP/1.1\r\nHost: localhost\r\n\
        Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"image_url\":";
    let reply = raw_https(&h.daemon, &h.pki, short_body);
    assert_eq!((reply.status, reply.json()["error"].clone()), (408, "request_timeout".into()));
    let jobs = h.api.request("GET", "/api/v1/jobs", None);
    assert_eq!(jobs.body["jobs"], serde_json::json!([]), "no job from a request that never came");
}

/// A pipelining client that starts its next request while the reply to a
/// long `?wait=` is still to come gets that reply first, and the 408 for
/// the unfinished request only after it: replies keep their order.
#[test]
fn a_pending_reply_is_not_overtaken_by_the_408_of_a_pipelined_request() {
    let h = Harness::start(
        "pipelined-408",
        &["--workers", "1", "--request-timeout", "2", "--idle-timeout", "60"],
    );
    // One worker, busy for a while with a slow download: the next job
    // stays pending, and a `?wait=` on it is answered when the wait ends.
    let img = build_fs_image(h.image_dir(), "slow", 61);
    h.images
        .set_slow(&img.qcow2_name(), Slow { chunk: 64 * 1024, delay: Duration::from_millis(200) });
    h.api.submit(&h.request(&img.qcow2_name(), "vm-busy", 1, "qcow2"));
    let pending = h.api.submit(&h.request(&img.qcow2_name(), "vm-pending", 1, "qcow2"));
    assert_eq!(h.api.status(&pending).body["status"], "pending");

    let pipelined = format!(
        "GET /api/v1/status/{pending}?wait=4 HTTP/1.1\r\nHost: localhost\r\n\r\n\
         GET /health HTTP/1.1\r\nHost: localhost\r\n"
    );
    let started = Instant::now();
    let reply = raw_https(&h.daemon, &h.pki, pipelined.as_bytes());
    assert_eq!(reply.status, 200, "the first reply is the status: {reply:#?}");
    assert_eq!(reply.body.matches("HTTP/1.1 ").count(), 1, "then one more reply: {reply:#?}");
    assert!(reply.body.contains("HTTP/1.1 408"), "the second is the 408: {reply:#?}");
    assert!(reply.body.contains("request_timeout"), "{reply:#?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(4), "the wait was served whole ({took:?})");
    assert!(took < Duration::from_secs(15), "and the 408 came after it ({took:?})");
}

/// Sends a request head one byte every 0.7 s, which keeps the connection
/// from ever being idle, until the daemon hangs up or `limit` passes.
/// Returns how long the daemon took to hang up.
fn trickle_until_cut(
    mut tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    limit: Duration,
) -> Option<Duration> {
    let head = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    let started = Instant::now();
    for (i, b) in head.iter().cycle().enumerate() {
        if tls.write_all(&[*b]).and_then(|()| tls.flush()).is_err() {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        // Every few bytes, see whether the daemon has hung up.
        if i % 2 == 1 {
            tls.sock.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 512];
            let gone = match tls.sock.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            tls.sock.set_nonblocking(false).unwrap();
            if gone {
                return Some(started.elapsed());
            }
        }
        thread::sleep(Duration::from_millis(700));
    }
    unreachable!("cycle never ends")
}

/// Sends `bytes` over a fresh TLS connection and returns the status code
/// of the reply, or `None` if the daemon closed without one.
fn status_of(h: &Harness, bytes: &[u8]) -> Option<u16> {
    let mut tls = tls_connect(&h.daemon, &h.pki);
    tls.write_all(bytes).ok()?;
    tls.flush().ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(n) = tls.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if got.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next()?.split(' ').nth(1)?.parse().ok()
}

#[test]
fn malformed_requests_get_4xx_and_the_daemon_stays_up() {
    let h = start("malformed");
    let big = "a".repeat(20 * 1024);
    let long_id = "f".repeat(5000);
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "oversized header",
            format!("GET /health HTTP/1.1\r\nX-Big: {big}\r\n\r\n").into_bytes(),
            431,
        ),
        (
            "many small headers",
            format!("GET /health HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(4000)).into_bytes(),
            431,
        ),
        (
            "Content-Length with Transfer-Encoding",
            b"POST /api/v1/provision HTTP/1.1\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            411,
        ),
        (
            "Transfer-Encoding first, then Content-Length",
            b"POST /api/v1/provision HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\
              Content-Length: 5\r\n\r\n0\r\n\r\n"
                .to_vec(),
            411,
        ),
        (
            "two Content-Lengths",
            b"POST /api/v1/provision HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
                .to_vec(),
            400,
        ),
        (
            "Content-Length list",
            b"POST /api/v1/provision HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "huge Content-Length",
            b"POST /api/v1/provision HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"
                .to_vec(),
            400,
        ),
        ("job id that is not a UUID", get("/api/v1/status/not-a-job").into_bytes(), 400),
        ("job id with escapes", get("/api/v1/status/%00%ff%0a").into_bytes(), 400),
        ("job id with dots", get("/api/v1/status/..%2F..%2Fetc%2Fpasswd").into_bytes(), 400),
        ("5000-byte job id", get(&format!("/api/v1/status/{long_id}")).into_bytes(), 400),
        (
            "cancel of a malformed id",
            format!("DELETE /api/v1/cancel/{long_id} HTTP/1.1\r\nConnection: close\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "invalid JSON body",
            b"POST /api/v1/provision HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{\"a\":"
                .to_vec(),
            400,
        ),
    ];
    for (label, bytes, want) in &cases {
        assert_eq!(status_of(&h, bytes), Some(*want), "{label}");
    }
    // Garbage that is not HTTP at all: a 4xx or a close, never a crash.
    for garbage in [
        b"\x00\x01\x02\x03\r\n\r\n".to_vec(),
        b"GET\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nX-\xff\xfe: \xc3\x28\r\n\r\n".to_vec(),
        b"\r\n\r\n\r\n\r\n".to_vec(),
    ] {
        if let Some(status) = status_of(&h, &garbage) {
            assert!((400..500).contains(&status), "{garbage:?} got {status}");
        }
    }
    let reply = h.api.request("GET", "/api/v1/status/not-a-job", None);
    let details = reply.expect_error(400, "invalid_request");
    assert!(details.contains("not a job id"), "{details}");

    // Still alive, still serving, and no panic anywhere in its log.
    assert_eq!(h.api.request("GET", "/health", None).status, 200);
    let log = h.daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("front door refused a request from 127.0.0.1"), "{log}");
}
