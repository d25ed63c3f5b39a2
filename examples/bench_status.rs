//! The status-latency client of `scripts/bench.sh`: how fast the daemon
//! answers `GET /api/v1/status/<id>` over mutual TLS while a job runs.
//!
//! Two modes, each printing one JSON object on standard output:
//!
//! - `keepalive`: one TLS connection, kept alive, sends a request every
//!   1/`--rate` seconds on a fixed schedule. Latency is counted from the
//!   moment a request was *due*, not from when it was sent, so a slow
//!   answer also charges the requests queued behind it (no coordinated
//!   omission). Prints p50, p99 and max, and the same from the actual send.
//! - `handshakes`: a new TCP connection and a full mutual-TLS handshake
//!   (resumption off) for every request, one after another, as fast as the
//!   daemon takes them. Prints handshakes per second.
//!
//! Both run until the file named by `--until` exists, or `--max-secs`.
//!
//! ```text
//! cargo run --release --example bench_status -- keepalive \
//!     --addr 127.0.0.1:8080 --ca ca.crt --cert client.crt --key client.key \
//!     --path /api/v1/status/<id> --rate 500 --until target/bench/stop
//! ```
//!
//! It unwraps freely: a failed setup ends the run with a panic, and a
//! failed request is counted in `errors` and ends the run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

struct Args {
    mode: String,
    addr: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    path: String,
    rate: f64,
    until: Option<PathBuf>,
    max_secs: f64,
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mode = it.next().expect("mode: keepalive or handshakes");
    let mut args = Args {
        mode,
        addr: String::new(),
        ca: PathBuf::new(),
        cert: PathBuf::new(),
        key: PathBuf::new(),
        path: "/health".into(),
        rate: 500.0,
        until: None,
        max_secs: 60.0,
    };
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => args.addr = value,
            "--ca" => args.ca = value.into(),
            "--cert" => args.cert = value.into(),
            "--key" => args.key = value.into(),
            "--path" => args.path = value,
            "--rate" => args.rate = value.parse().expect("--rate is a number"),
            "--until" => args.until = Some(value.into()),
            "--max-secs" => args.max_secs = value.parse().expect("--max-secs is a number"),
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

fn tls_config(args: &Args) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&args.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> =
        CertificateDer::pem_file_iter(&args.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&args.key).unwrap();
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    // Every handshake in `handshakes` mode must be a full one.
    config.resumption = Resumption::disabled();
    Arc::new(config)
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn connect(args: &Args, config: &Arc<ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(&args.addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(Arc::clone(config), name).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    // Drive the handshake to its end before any request is timed.
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// Sends one GET and reads the whole answer. Returns the status code.
fn request(tls: &mut Tls, path: &str, close: bool, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let connection = if close { "close" } else { "keep-alive" };
    let head =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: {connection}\r\n\r\n");
    tls.write_all(head.as_bytes())?;
    tls.flush()?;
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let (head_end, body_len) = loop {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while buf.len() < head_end + body_len {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = std::str::from_utf8(&buf[9..12]).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok(status)
}

fn should_stop(args: &Args, start: Instant) -> bool {
    start.elapsed().as_secs_f64() >= args.max_secs
        || args.until.as_deref().is_some_and(Path::exists)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn keepalive(args: &Args, config: &Arc<ClientConfig>) {
    let mut tls = connect(args, config);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut from_due = Vec::new();
    let mut from_send = Vec::new();
    let (mut errors, mut not_ok) = (0u64, 0u64);
    let mut buf = Vec::new();
    let start = Instant::now();
    let mut due = start;
    while !should_stop(args, start) {
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        match request(&mut tls, &args.path, false, &mut buf) {
            Ok(200) => {}
            Ok(_) => not_ok += 1,
            Err(e) => {
                eprintln!("bench_status: request failed: {e}");
                errors += 1;
                break;
            }
        }
        let done = Instant::now();
        from_due.push((done - due).as_secs_f64() * 1e3);
        from_send.push((done - sent).as_secs_f64() * 1e3);
        due += interval;
    }
    let secs = start.elapsed().as_secs_f64();
    from_due.sort_by(f64::total_cmp);
    from_send.sort_by(f64::total_cmp);
    println!(
        "{{\"mode\":\"keepalive\",\"requests\":{},\"secs\":{secs:.3},\"rate\":{},\
         \"p50_ms\":{:.3},\"p99_ms\":{:.3},\"max_ms\":{:.3},\
         \"send_p50_ms\":{:.3},\"send_p99_ms\":{:.3},\"not_ok\":{not_ok},\"errors\":{errors}}}",
        from_due.len(),
        args.rate,
        percentile(&from_due, 50.0),
        percentile(&from_due, 99.0),
        from_due.last().copied().unwrap_or(f64::NAN),
        percentile(&from_send, 50.0),
        percentile(&from_send, 99.0),
    );
}

fn handshakes(args: &Args, config: &Arc<ClientConfig>) {
    let mut buf = Vec::new();
    let (mut count, mut errors, mut not_ok) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    while !should_stop(args, start) {
        let mut tls = connect(args, config);
        match request(&mut tls, &args.path, true, &mut buf) {
            Ok(200) => count += 1,
            Ok(_) => not_ok += 1,
            Err(e) => {
                eprintln!("bench_status: request failed: {e}");
                errors += 1;
                break;
            }
        }
        tls.conn.send_close_notify();
        let _ = tls.conn.complete_io(&mut tls.sock);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"handshakes\",\"handshakes\":{count},\"secs\":{secs:.3},\
         \"per_sec\":{:.1},\"not_ok\":{not_ok},\"errors\":{errors}}}",
        count as f64 / secs
    );
}

fn main() {
    let args = parse_args();
    let config = tls_config(&args);
    match args.mode.as_str() {
        "keepalive" => keepalive(&args, &config),
        "handshakes" => handshakes(&args, &config),
        other => panic!("unknown mode {other}: keepalive or handshakes"),
    }
}
