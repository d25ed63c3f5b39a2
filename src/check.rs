//! `check`: judges a `serve` command line and this host without starting
//! the daemon. It runs the very checks `serve` runs before it listens
//! (`Config::from_cli`), then looks at what `serve` does not: that the
//! host tools answer (qemu-img; vgs for `--backend lvm`; virsh for
//! `--libvirt-pool`), and that the server certificate and the client CA are
//! within their validity (a warning inside [`EXPIRY_WARNING`]).
//!
//! It never binds the port and never starts a worker. The checks it shares
//! with `serve` create missing directories (`--cache-dir`, `--state-dir`,
//! `--volume-dir`) and write and remove a probe file in each, as `serve`
//! would; nothing else is written.
//!
//! Output: one finding per line on stdout, `ok: …`, `warn: …` or
//! `error: …`. Exit status 0 when there is no `error:` line (warnings
//! allowed), 1 otherwise.

use std::fmt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argh::FromArgs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::cli::Serve;
use crate::config::Config;

/// A certificate that expires sooner than this gets a warning: a month
/// leaves time to renew and roll it out.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

const EXIT_PROBLEMS: u8 = 1;

#[derive(Debug, PartialEq)]
enum Finding {
    Ok(String),
    Warn(String),
    Error(String),
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Ok(m) => write!(f, "ok: {m}"),
            Finding::Warn(m) => write!(f, "warn: {m}"),
            Finding::Error(m) => write!(f, "error: {m}"),
        }
    }
}

/// Checks the `serve` flags in `serve_args` (what follows `check --`) and
/// prints the findings; exit status 0 without errors, 1 with any.
pub fn run(serve_args: &[String]) -> ExitCode {
    // Tolerate a pasted `serve …` command line.
    let args: Vec<&str> = match serve_args.split_first() {
        Some((first, rest)) if first == "serve" => rest.iter().map(String::as_str).collect(),
        _ => serve_args.iter().map(String::as_str).collect(),
    };
    let findings = match Serve::from_args(&["serve"], &args) {
        Ok(serve) => check(&serve, now_secs()),
        // `--help` among the serve flags: show serve's help.
        Err(early) if early.status.is_ok() => {
            print!("{}", early.output);
            return ExitCode::SUCCESS;
        }
        Err(early) => {
            let hints = crate::cli::usage_hints("libvirt-volume-provisioner", &args, &early.output);
            early
                .output
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Run "))
                .map(lower_first)
                .chain(hints)
                .map(|l| Finding::Error(format!("serve flags: {l}")))
                .collect()
        }
    };
    for f in &findings {
        println!("{f}");
    }
    if findings.iter().any(|f| matches!(f, Finding::Error(_))) {
        ExitCode::from(EXIT_PROBLEMS)
    } else {
        ExitCode::SUCCESS
    }
}

fn check(serve: &Serve, now: i64) -> Vec<Finding> {
    let mut findings = Vec::new();
    match Config::from_cli(serve) {
        Ok(config) => {
            findings.push(Finding::Ok(format!(
                "serve settings are valid (listen {}, backend {}, {})",
                config.listen,
                config.backend.kind(),
                config.auth_summary
            )));
            findings.extend(config.warnings.iter().cloned().map(Finding::Warn));
            if let Some(pool) = &serve.thin_pool {
                let warnings = config.backend.warnings();
                if warnings.is_empty() {
                    findings.push(Finding::Ok(format!(
                        "--thin-pool {pool} is a thin pool that zeroes new chunks"
                    )));
                }
                findings.extend(warnings.into_iter().map(Finding::Warn));
            }
            findings.push(Finding::Ok(format!(
                "--cache-dir {} is writable",
                config.cache_dir.display()
            )));
            findings.push(Finding::Ok(format!(
                "--state-dir {} is writable",
                config.state_dir.display()
            )));
            // What a running daemon holds: its directories' locks and its
            // port. Checking a new configuration before a restart meets
            // them in use, so that is a warning; each probe lets go at once.
            for (dir, name, flag) in [
                (&config.state_dir, "lock", "--state-dir"),
                (&config.cache_dir, ".lvp-lock", "--cache-dir"),
            ] {
                if let Some(why) = held_lock(&dir.join(name)) {
                    findings.push(Finding::Warn(format!(
                        "{flag} {} is in use by a running daemon ({why}); serve will not \
                         start on it until that daemon stops",
                        dir.display()
                    )));
                }
            }
            match std::net::TcpListener::bind(config.listen) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    findings.push(Finding::Warn(format!(
                        "--listen {}: the address is in use (a running daemon?); serve will not \
                         start there until it is free",
                        config.listen
                    )))
                }
                Err(e) => findings.push(Finding::Error(format!(
                    "--listen {}: cannot listen there ({e})",
                    config.listen
                ))),
            }
        }
        Err(problems) => findings.extend(problems.into_iter().map(Finding::Error)),
    }

    // `serve` checks for qemu-img (and for vgs, through the volume group)
    // too; a problem it already reported is not reported twice.
    let reported = |findings: &[Finding], words: &str| {
        findings.iter().any(|f| matches!(f, Finding::Error(p) if p.contains(words)))
    };
    match tool_version("qemu-img") {
        Ok(v) => findings.push(Finding::Ok(format!("qemu-img found ({v})"))),
        Err(e) if !reported(&findings, "qemu-img") => {
            findings.push(Finding::Error(format!("qemu-img is required: {e} (install qemu-utils)")))
        }
        Err(_) => {}
    }
    if serve.backend == "lvm" {
        match tool_version("vgs") {
            Ok(v) => findings.push(Finding::Ok(format!("lvm tools found ({v})"))),
            Err(e) if !reported(&findings, "lvm tools") => {
                findings.push(Finding::Error(format!("lvm tools not usable: {e} (install lvm2)")))
            }
            Err(_) => {}
        }
    }

    // serve only warns about virsh: a pool that is not refreshed leaves
    // the volumes themselves fine.
    if let Some(pool) = &serve.libvirt_pool {
        match tool_version("virsh") {
            Ok(v) => findings.push(Finding::Ok(format!("virsh found ({v}) for --libvirt-pool"))),
            Err(e) => findings.push(Finding::Warn(format!(
                "--libvirt-pool {pool}: {e}; the pool will not be refreshed \
                 (install libvirt-clients)"
            ))),
        }
    }
    if serve.plain_http {
        findings.push(Finding::Warn(
            "--plain-http serves the API without TLS: for development only".into(),
        ));
    }
    for (flag, path) in [("--tls-cert", &serve.tls_cert), ("--client-ca", &serve.client_ca)] {
        if let Some(path) = path {
            let already = reported(&findings, &format!("{flag} {path}"));
            let found = certificate_findings(flag, Path::new(path), now);
            // An unreadable file is already one of serve's problems.
            findings.extend(found.into_iter().filter(|f| {
                !(already && matches!(f, Finding::Error(m) if m.contains("cannot read")))
            }));
        }
    }
    findings
}

/// The first line `<tool> --version` prints.
fn tool_version(tool: &str) -> Result<String, String> {
    let out =
        crate::cmd::run(&[tool.to_string(), "--version".to_string()]).map_err(|e| e.to_string())?;
    let first = out.stdout.lines().find(|l| !l.trim().is_empty()).unwrap_or(tool);
    Ok(first.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// One finding per certificate in the PEM file at `path`: its validity
/// against `now` (seconds since the epoch).
fn certificate_findings(flag: &str, path: &Path, now: i64) -> Vec<Finding> {
    let shown = path.display();
    let ders: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_file_iter(path).and_then(|it| it.collect()) {
            Ok(ders) => ders,
            Err(e) => {
                return vec![Finding::Error(format!(
                    "{flag} {shown}: cannot read PEM certificates ({e})"
                ))]
            }
        };
    if ders.is_empty() {
        return vec![Finding::Error(format!(
            "{flag} {shown}: cannot read a certificate: none in file"
        ))];
    }
    ders.iter()
        .enumerate()
        .map(|(i, der)| match x509_parser::parse_x509_certificate(der.as_ref()) {
            Ok((_, cert)) => {
                let subject = cert.subject();
                let name = match subject.iter_common_name().next().and_then(|c| c.as_str().ok()) {
                    Some(cn) => format!("CN={cn}"),
                    None => subject.to_string(),
                };
                let what = format!("{flag} {shown}: certificate {name:?}");
                let validity = cert.validity();
                validity_finding(
                    &what,
                    validity.not_before.timestamp(),
                    validity.not_after.timestamp(),
                    now,
                )
            }
            Err(e) => Finding::Error(format!(
                "{flag} {shown}: certificate {} of the file is not valid X.509 ({e})",
                i + 1
            )),
        })
        .collect()
}

/// Judges one validity period; `what` names the certificate.
fn validity_finding(what: &str, not_before: i64, not_after: i64, now: i64) -> Finding {
    let warn_secs = EXPIRY_WARNING.as_secs() as i64;
    if now < not_before {
        Finding::Error(format!("{what} is not valid before {}", date(not_before)))
    } else if now > not_after {
        Finding::Error(format!("{what} expired on {}", date(not_after)))
    } else if not_after - now < warn_secs {
        let secs = not_after - now;
        // Rounded, so that a certificate made "for 10 days" a moment ago
        // says 10, not 9.
        let left = match (secs + 43_200) / 86_400 {
            _ if secs < 86_400 => "in less than a day".to_string(),
            1 => "in 1 day".to_string(),
            n => format!("in {n} days"),
        };
        Finding::Warn(format!("{what} expires on {}, {left}; renew it", date(not_after)))
    } else {
        Finding::Ok(format!("{what} valid until {}", date(not_after)))
    }
}

/// Seconds since the epoch as an RFC 3339 date, UTC.
fn date(secs: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// argh's messages start with a capital; ours do not.
fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Whether another process holds the lock file at `path` (a running
/// daemon), without creating it.
fn held_lock(path: &std::path::Path) -> Option<&'static str> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).open(path).ok()?;
    // SAFETY: flock on a descriptor we own; the lock goes with the file.
    let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
    taken.then_some("its lock is held")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    const NOW: i64 = 1_800_000_000;

    #[test]
    fn test_validity_finding_each_case() {
        let f = |nb, na| validity_finding("--tls-cert c: certificate \"CN=x\"", nb, na, NOW);
        assert!(matches!(f(NOW - DAY, NOW + 365 * DAY), Finding::Ok(_)));
        match f(NOW - DAY, NOW + 10 * DAY + 60) {
            Finding::Warn(m) => assert!(m.contains("in 10 days"), "{m}"),
            other => panic!("{other:?}"),
        }
        match f(NOW - DAY, NOW + 10 * DAY - 60) {
            Finding::Warn(m) => assert!(m.contains("in 10 days; renew it"), "{m}"),
            other => panic!("{other:?}"),
        }
        match f(NOW - DAY, NOW + DAY + 60) {
            Finding::Warn(m) => assert!(m.contains("in 1 day;"), "{m}"),
            other => panic!("{other:?}"),
        }
        match f(NOW - DAY, NOW + 60) {
            Finding::Warn(m) => assert!(m.contains("in less than a day"), "{m}"),
            other => panic!("{other:?}"),
        }
        match f(NOW - 10 * DAY, NOW - DAY) {
            Finding::Error(m) => {
                assert!(m.ends_with(&format!("expired on {}", date(NOW - DAY))), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match f(NOW + DAY, NOW + 365 * DAY) {
            Finding::Error(m) => assert!(m.contains("is not valid before"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_finding_lines() {
        assert_eq!(Finding::Ok("a".into()).to_string(), "ok: a");
        assert_eq!(Finding::Warn("b".into()).to_string(), "warn: b");
        assert_eq!(Finding::Error("c".into()).to_string(), "error: c");
    }

    #[test]
    fn test_date_is_rfc3339() {
        assert_eq!(date(0), "1970-01-01T00:00:00Z");
        assert_eq!(date(NOW), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn test_unreadable_certificate_file() {
        let found = certificate_findings("--tls-cert", Path::new("/nonexistent/c.pem"), NOW);
        assert_eq!(found.len(), 1);
        assert!(
            matches!(&found[0], Finding::Error(m) if m.starts_with("--tls-cert /nonexistent/c.pem: cannot read")),
            "{found:?}"
        );
    }

    #[test]
    fn test_lower_first() {
        assert_eq!(lower_first("Unrecognized argument: --x"), "unrecognized argument: --x");
        assert_eq!(lower_first(""), "");
    }
}
