//! `libvirt-volume-provisioner check -- <serve flags>`: one line per
//! finding, exit 0 without errors and 1 with any, and no daemon started.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::*;
use rcgen::{CertificateParams, DnType, KeyPair};

const DAY: Duration = Duration::from_secs(86_400);

/// Runs `check -- <args>`; returns its exit status and stdout lines. A
/// check that printed anything on stderr fails the test.
fn check(args: &[String]) -> (i32, Vec<String>) {
    let out = Command::new(BIN)
        .arg("check")
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {BIN} check: {e}"));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "check wrote to stderr: {stderr}\nstdout:\n{stdout}");
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    for l in &lines {
        assert!(
            l.starts_with("ok: ") || l.starts_with("warn: ") || l.starts_with("error: "),
            "unexpected line {l:?} in\n{stdout}"
        );
    }
    (out.status.code().expect("check exited, not killed"), lines)
}

/// The `serve` flags the harness would start a daemon with, without the
/// leading `serve`.
fn serve_flags(dir: &TestDir, pki: &Pki, port: u16) -> Vec<String> {
    let mut args = Daemon::args(dir, pki, &Auth::mtls(), port);
    assert_eq!(args.remove(0), "serve");
    args
}

/// Replaces the value of `flag` in `args`.
fn set(args: &mut [String], flag: &str, value: &Path) {
    let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
    args[at + 1] = value.display().to_string();
}

fn lines_starting<'a>(lines: &'a [String], prefix: &str) -> Vec<&'a String> {
    lines.iter().filter(|l| l.starts_with(prefix)).collect()
}

/// A self-signed server certificate for localhost valid from `from` to
/// `until`, written with its key to `<dir>/<name>.pem` and `.key`.
fn server_cert(dir: &Path, name: &str, from: SystemTime, until: SystemTime) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.not_before = from.into();
    params.not_after = until.into();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    fs::write(&cert_path, cert.pem()).unwrap();
    fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

#[test]
fn check_passes_a_good_config_without_binding_or_leaving_files() {
    let dir = TestDir::new("check-good");
    let pki = Pki::create(&dir);
    // Hold the listen port: check must not need it.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let (code, lines) = check(&serve_flags(&dir, &pki, port));
    assert_eq!(code, 0, "{lines:#?}");
    assert!(lines_starting(&lines, "error: ").is_empty(), "{lines:#?}");
    // The held port is only a warning: checking a new configuration while
    // the daemon still runs is what an operator does before a restart.
    let warnings = lines_starting(&lines, "warn: ");
    assert_eq!(warnings.len(), 1, "{lines:#?}");
    assert!(warnings[0].contains(&format!("--listen 127.0.0.1:{port}: the address is in use")));
    let text = lines.join("\n");
    for words in [
        format!("ok: serve settings are valid (listen 127.0.0.1:{port}, backend dir,"),
        "ok: qemu-img found".to_string(),
        format!(
            "ok: --tls-cert {}: certificate \"CN=localhost\" valid until",
            pki.server_cert.display()
        ),
        format!(
            "ok: --client-ca {}: certificate \"CN=lvp test CA\" valid until",
            pki.ca_cert.display()
        ),
    ] {
        assert!(text.contains(&words), "missing {words:?} in\n{text}");
    }
    // The directories exist now (as serve would make them), and are empty.
    for sub in ["volumes", "cache", "state"] {
        assert_eq!(list_dir(&dir.join(sub)), Vec::<String>::new(), "{sub} left files behind");
    }
    drop(held);
}

#[test]
fn check_warns_that_a_running_daemon_holds_the_directories_and_the_port() {
    let dir = TestDir::new("check-running");
    let pki = Pki::create(&dir);
    let daemon = Daemon::start(&dir, &pki, &Auth::mtls(), &[]);
    let port = daemon.base_url().rsplit(':').next().unwrap().parse().unwrap();
    let (code, lines) = check(&serve_flags(&dir, &pki, port));
    assert_eq!(code, 0, "warnings only: {lines:#?}");
    let warnings = lines_starting(&lines, "warn: ");
    let text = lines.join("\n");
    for words in [
        format!("--state-dir {} is in use by a running daemon", dir.join("state").display()),
        format!("--cache-dir {} is in use by a running daemon", dir.join("cache").display()),
        format!("--listen 127.0.0.1:{port}: the address is in use"),
    ] {
        assert!(text.contains(&words), "missing {words:?} in\n{text}");
    }
    assert_eq!(warnings.len(), 3, "{lines:#?}");
    drop(daemon);
    // With the daemon gone, nothing is in use.
    let (code, lines) = check(&serve_flags(&dir, &pki, port));
    assert_eq!((code, lines_starting(&lines, "warn: ").len()), (0, 0), "{lines:#?}");
}

#[test]
fn check_reports_each_problem_of_a_bad_config_on_its_own_line() {
    let dir = TestDir::new("check-bad");
    let pki = Pki::create(&dir);
    let mut args = serve_flags(&dir, &pki, free_port());
    // 1. a certificate file that does not exist
    let missing = dir.join("pki/missing.pem");
    set(&mut args, "--tls-cert", &missing);
    // 2. no way to authenticate clients
    let at = args.iter().position(|a| a == "--client-ca").unwrap();
    args.drain(at..at + 2);
    // 3. a volume directory that is a file
    let not_a_dir = dir.join("volumes-file");
    fs::write(&not_a_dir, "").unwrap();
    set(&mut args, "--volume-dir", &not_a_dir);

    let (code, lines) = check(&args);
    assert_eq!(code, 1, "{lines:#?}");
    let errors = lines_starting(&lines, "error: ");
    assert_eq!(errors.len(), 3, "one line per problem: {lines:#?}");
    let expected = [
        format!("--tls-cert {}", missing.display()),
        "no way to authenticate clients".to_string(),
        format!("--volume-dir {}", not_a_dir.display()),
    ];
    for words in &expected {
        assert_eq!(
            errors.iter().filter(|e| e.contains(words.as_str())).count(),
            1,
            "exactly one error about {words:?}: {lines:#?}"
        );
    }
    // What is fine is still said to be fine.
    assert!(lines.iter().any(|l| l.starts_with("ok: qemu-img found")), "{lines:#?}");
}

#[test]
fn volume_dir_may_be_neither_the_cache_nor_the_state_dir() {
    let dir = TestDir::new("check-dirs-clash");
    let pki = Pki::create(&dir);
    let args = serve_flags(&dir, &pki, free_port());
    let value = |flag: &str| {
        let at = args.iter().position(|a| a == flag).unwrap();
        PathBuf::from(&args[at + 1])
    };
    for flag in ["--state-dir", "--cache-dir"] {
        let mut clash = args.clone();
        let shared = value(flag);
        fs::create_dir_all(&shared).unwrap();
        set(&mut clash, "--volume-dir", &shared);
        let (code, lines) = check(&clash);
        assert_eq!(code, 1, "{lines:#?}");
        let want = format!("error: --volume-dir must not be the {flag}");
        assert!(lines.iter().any(|l| l.starts_with(&want)), "{want}: {lines:#?}");
    }
}

#[test]
fn public_probes_with_mutual_tls_alone_are_a_warning() {
    let dir = TestDir::new("check-public-mtls");
    let pki = Pki::create(&dir);
    let mut args = serve_flags(&dir, &pki, free_port());
    args.push("--public-health".into());
    let (code, lines) = check(&args);
    assert_eq!(code, 0, "a warning alone does not fail the check: {lines:#?}");
    let warns = lines_starting(&lines, "warn: ");
    assert_eq!(warns.len(), 1, "{lines:#?}");
    assert!(warns[0].starts_with("warn: --public-health has no effect with --client-ca alone"));
}

#[test]
fn check_reports_unparseable_serve_flags() {
    let (code, lines) = check(&["--workers".to_string(), "two".to_string()]);
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("error: serve flags: ") && lines[0].contains("--workers"));

    // argh takes no `--flag=value`: the check says how to write it.
    let (code, lines) = check(&["--backend=dir".to_string()]);
    assert_eq!(code, 1);
    assert!(
        lines.iter().any(|l| l.contains("hint: write `--backend dir`, not `--backend=dir`")),
        "{lines:#?}"
    );
}

#[test]
fn check_warns_about_a_certificate_expiring_within_30_days() {
    let dir = TestDir::new("check-expiring");
    let pki = Pki::create(&dir);
    let now = SystemTime::now();
    let (cert, key) = server_cert(&dir.join("pki"), "soon", now - DAY, now + 10 * DAY);
    let mut args = serve_flags(&dir, &pki, free_port());
    set(&mut args, "--tls-cert", &cert);
    set(&mut args, "--tls-key", &key);

    let (code, lines) = check(&args);
    assert_eq!(code, 0, "a warning alone does not fail the check: {lines:#?}");
    let warns = lines_starting(&lines, "warn: ");
    assert_eq!(warns.len(), 1, "{lines:#?}");
    let w = warns[0];
    assert!(w.starts_with(&format!("warn: --tls-cert {}: certificate \"CN=soon\"", cert.display())));
    assert!(w.contains("expires on ") && w.contains("in 10 days"), "{w}");
    assert!(lines.iter().any(|l| l.starts_with("ok: --client-ca ")), "{lines:#?}");
}

#[test]
fn check_refuses_an_expired_or_not_yet_valid_certificate() {
    let dir = TestDir::new("check-expired");
    let pki = Pki::create(&dir);
    let now = SystemTime::now();
    for (name, from, until, words) in [
        ("old", now - 40 * DAY, now - DAY, "expired on "),
        ("future", now + DAY, now + 400 * DAY, "is not valid before "),
    ] {
        let (cert, key) = server_cert(&dir.join("pki"), name, from, until);
        let mut args = serve_flags(&dir, &pki, free_port());
        set(&mut args, "--tls-cert", &cert);
        set(&mut args, "--tls-key", &key);
        let (code, lines) = check(&args);
        assert_eq!(code, 1, "{lines:#?}");
        let errors = lines_starting(&lines, "error: ");
        assert_eq!(errors.len(), 1, "{lines:#?}");
        assert!(errors[0].contains(&format!("certificate \"CN={name}\" {words}")), "{lines:#?}");
    }
}

/// Serve flags given without `--` used to fail with argh's bare
/// "Unrecognized argument" and status 1, the status of a failed check.
#[test]
fn serve_flags_without_the_separator_are_a_usage_error_with_a_hint() {
    let out = Command::new(BIN)
        .args(["check", "--backend", "dir"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {BIN} check: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Unrecognized argument: --backend"), "{stderr}");
    assert!(stderr.contains("check -- --backend"), "the hint shows the separator: {stderr}");
}

/// `--thin-pool` names a pool in the LVM volume group; with the dir
/// backend there is none, and saying so beats ignoring the flag.
#[test]
fn check_refuses_a_thin_pool_without_the_lvm_backend() {
    let dir = TestDir::new("check-thin-pool-dir");
    let pki = Pki::create(&dir);
    let mut args = serve_flags(&dir, &pki, free_port());
    args.extend(["--thin-pool".to_string(), "pool".to_string()]);
    let (code, lines) = check(&args);
    assert_eq!(code, 1, "{lines:#?}");
    let errors = lines_starting(&lines, "error: ");
    assert_eq!(errors.len(), 1, "{lines:#?}");
    assert!(
        errors[0].starts_with("error: --thin-pool needs --backend lvm: it names a thin pool in"),
        "{lines:#?}"
    );
}
