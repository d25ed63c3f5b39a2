//! The checked runtime configuration, built from the raw command line.
//!
//! Every problem found is reported, one sentence each, naming the flag, so
//! an operator fixes them all in one go. Checks that need the host (files
//! readable, qemu-img present, volume group present, directories writable)
//! run here, at start, rather than on the first job.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::LevelFilter;
use rustls::ServerConfig;

use crate::cli::Serve;
use crate::frontdoor;
use crate::tokens::TokenSet;
use crate::volume::dir::DirBackend;
use crate::volume::lvm::LvmBackend;
use crate::volume::VolumeBackend;
use crate::write::{direct_io_probe, IoMode};

/// Upper bounds that catch typos (a worker count of 2000) early.
const MAX_WORKERS: usize = 64;
const MAX_QUEUE: usize = 100_000;
const MAX_CONNECTIONS: usize = 10_000;

pub struct Config {
    pub listen: SocketAddr,
    pub tls: Option<Arc<ServerConfig>>,
    pub tokens: Option<TokenSet>,
    pub backend: Box<dyn VolumeBackend>,
    pub cache_dir: PathBuf,
    pub state_dir: PathBuf,
    pub workers: usize,
    pub queue: usize,
    pub require_digest: bool,
    pub keep_tail: bool,
    pub io: IoMode,
    pub http_threads: usize,
    pub public_metrics: bool,
    pub public_health: bool,
    pub libvirt_pool: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub download_timeout: Duration,
    pub retry: crate::fetch::RetryPolicy,
    pub retention: crate::jobs::table::Retention,
    pub shutdown_grace: Duration,
    pub cache_max_bytes: Option<u64>,
    pub verify_cache: bool,
    pub auth_summary: String,
    /// Settings that work but probably do not do what was meant; `serve`
    /// logs them at warn, `check` prints them.
    pub warnings: Vec<String>,
    /// Where downloads may go and whom they trust (policy, roots, proxies,
    /// S3 signing); `stall` and `retry` are filled from the fields above.
    pub sources: SourceSettings,
}

/// The checked `--allow-source` … `--s3-credentials` flags.
pub struct SourceSettings {
    pub policy: Arc<crate::policy::SourcePolicy>,
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub proxies: crate::fetch::Proxies,
    pub signer: Option<crate::s3::S3Signer>,
}

impl SourceSettings {
    /// One line for the start-up log: no credentials, no secrets.
    pub fn summary(&self) -> String {
        let denied: Vec<String> = self.policy.denied().iter().map(|n| n.to_string()).collect();
        let signed = match &self.signer {
            Some(s) => format!("S3 signing for {}", s.endpoints().join(", ")),
            None => "no S3 signing".into(),
        };
        format!(
            "image sources: {}; denied networks {}; {}; {} trusted CA certificates; {signed}",
            self.policy.allowed_summary(),
            denied.join(", "),
            self.proxies.summary(),
            self.roots.len(),
        )
    }

    fn from_cli(cli: &Serve, problems: &mut Vec<String>) -> Option<SourceSettings> {
        let before = problems.len();
        let policy = crate::policy::SourcePolicy::new(
            &cli.allow_source,
            &cli.deny_network,
            &cli.allow_network,
        )
        .map_err(|p| problems.extend(p))
        .ok();
        let roots = crate::fetch::load_roots(cli.source_ca.as_deref().map(Path::new))
            .map_err(|p| problems.push(p))
            .ok();
        let proxies =
            crate::fetch::Proxies::configure(cli.proxy.as_deref(), cli.no_proxy.as_deref())
                .map_err(|p| problems.push(p))
                .ok();
        if cli.s3_region.is_empty()
            || !cli.s3_region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            problems.push(format!(
                "--s3-region {:?} is not a region name such as us-east-1",
                cli.s3_region
            ));
        }
        let creds = match &cli.s3_credentials {
            Some(path) => crate::s3::Credentials::from_file(Path::new(path))
                .map(Some)
                .map_err(|e| problems.push(format!("--s3-credentials {e}")))
                .ok()
                .flatten(),
            None => crate::s3::Credentials::from_env(),
        };
        let signer = match (cli.s3_endpoint.is_empty(), creds) {
            (true, _) => {
                if cli.s3_credentials.is_some() {
                    problems.push(
                        "--s3-credentials needs --s3-endpoint: which origins to sign for".into(),
                    );
                }
                None
            }
            (false, None) => {
                if cli.s3_credentials.is_none() {
                    problems.push(
                        "--s3-endpoint needs credentials: --s3-credentials FILE, or \
                         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
                            .into(),
                    );
                }
                None
            }
            (false, Some(creds)) => {
                crate::s3::S3Signer::new(&cli.s3_endpoint, &cli.s3_region, creds)
                    .map_err(|e| problems.push(e))
                    .ok()
            }
        };
        if problems.len() > before {
            return None;
        }
        Some(SourceSettings { policy: Arc::new(policy?), roots: roots?, proxies: proxies?, signer })
    }
}

/// Parses `--log-level` on its own, so logging can start before the rest
/// is checked.
pub fn log_level(text: &str) -> Result<LevelFilter, String> {
    match text.to_ascii_lowercase().as_str() {
        "error" => Ok(LevelFilter::Error),
        "warn" | "warning" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        other => {
            Err(format!("--log-level {other:?} is not one of error, warn, info, debug, trace"))
        }
    }
}

impl Config {
    /// Checks everything; on failure returns every problem found.
    pub fn from_cli(cli: &Serve) -> Result<Config, Vec<String>> {
        let mut problems = Vec::new();
        let mut note = |r: Result<(), String>| {
            if let Err(e) = r {
                problems.push(e);
            }
        };

        let listen = cli.listen.parse::<SocketAddr>().map_err(|_| {
            format!("--listen {:?} is not an address:port such as 0.0.0.0:8080", cli.listen)
        });
        note(listen.as_ref().map(|_| ()).map_err(Clone::clone));
        note(log_level(&cli.log_level).map(|_| ()));
        note(range("--workers", cli.workers, 1, MAX_WORKERS));
        note(range("--queue", cli.queue, 1, MAX_QUEUE));
        note(range("--max-connections", cli.max_connections, 1, MAX_CONNECTIONS));
        note(range(
            "--max-connections-per-address",
            cli.max_connections_per_address,
            1,
            MAX_CONNECTIONS,
        ));
        note(range("--handshake-timeout", cli.handshake_timeout as usize, 1, 3600));
        note(range("--idle-timeout", cli.idle_timeout as usize, 1, 86_400));
        note(range("--request-timeout", cli.request_timeout as usize, 1, 3600));
        note(range("--download-timeout", cli.download_timeout as usize, 1, 86_400));
        note(range("--http-threads", cli.http_threads, 2, 256));
        note(range("--download-retries", cli.download_retries as usize, 0, 100));
        note(range("--retry-delay", cli.retry_delay as usize, 0, 3600));
        note(range("--keep-jobs", cli.keep_jobs, 1, 10_000_000));
        note(range("--keep-job-hours", cli.keep_job_hours as usize, 1, 24 * 3650));
        note(range("--shutdown-grace", cli.shutdown_grace as usize, 0, 86_400));
        if let Some(gb) = cli.cache_max_gb {
            note(range("--cache-max-gb", gb as usize, 1, 1 << 20));
        }

        let tokens = match &cli.tokens {
            Some(path) => match TokenSet::load(Path::new(path)) {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(format!("--tokens: {}", crate::error::chain(&e)));
                    None
                }
            },
            None => None,
        };
        if cli.client_ca.is_none() && cli.tokens.is_none() {
            problems.push(
                "no way to authenticate clients: give --client-ca (mutual TLS), --tokens, or both"
                    .into(),
            );
        }
        let tls = if cli.plain_http {
            if cli.tokens.is_none() && cli.client_ca.is_some() {
                problems.push(
                    "--plain-http cannot check client certificates: give --tokens as well".into(),
                );
            }
            if cli.tls_cert.is_some() || cli.tls_key.is_some() {
                problems.push("--plain-http conflicts with --tls-cert/--tls-key".into());
            }
            None
        } else {
            match (&cli.tls_cert, &cli.tls_key) {
                (Some(cert), Some(key)) => match frontdoor::tls::server_config(
                    Path::new(cert),
                    Path::new(key),
                    cli.client_ca.as_deref().map(Path::new),
                    cli.tokens.is_some(),
                ) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                },
                _ => {
                    problems.push(
                        "--tls-cert and --tls-key are required (or --plain-http for development)"
                            .into(),
                    );
                    None
                }
            }
        };

        let cache_dir = PathBuf::from(&cli.cache_dir);
        let state_dir = PathBuf::from(&cli.state_dir);
        let mut note = |r: Result<(), String>| {
            if let Err(e) = r {
                problems.push(e);
            }
        };
        note(writable_dir("--cache-dir", &cache_dir));
        note(writable_dir("--state-dir", &state_dir));
        note(qemu_img_present());

        if cli.thin_pool.is_some() && cli.backend != "lvm" {
            problems.push(format!(
                "--thin-pool needs --backend lvm: it names a thin pool in --volume-group, and \
                 --backend {} has none",
                cli.backend
            ));
        }
        let backend: Option<Box<dyn VolumeBackend>> = match cli.backend.as_str() {
            "lvm" => match &cli.volume_group {
                None => {
                    problems.push("--backend lvm needs --volume-group".into());
                    None
                }
                Some(vg) => match LvmBackend::open(vg, cli.thin_pool.as_deref()) {
                    Ok(b) => Some(Box::new(b)),
                    Err(e) => {
                        problems.push(e);
                        None
                    }
                },
            },
            "dir" => match &cli.volume_dir {
                None => {
                    problems.push("--backend dir needs --volume-dir".into());
                    None
                }
                Some(dir) => {
                    let dir = PathBuf::from(dir);
                    // A volume named like a cache entry or the journal would
                    // overwrite it: the directories must differ.
                    let same_as = |other: &PathBuf| {
                        fs::canonicalize(&dir)
                            .ok()
                            .is_some_and(|d| fs::canonicalize(other).ok().is_some_and(|o| o == d))
                    };
                    let clash = [("--cache-dir", &cache_dir), ("--state-dir", &state_dir)]
                        .into_iter()
                        .find(|(_, other)| same_as(other));
                    if let Some((flag, _)) = clash {
                        problems.push(format!("--volume-dir must not be the {flag}"));
                        None
                    } else {
                        let direct_io_works = |()| match cli.direct_io {
                            true => direct_io_probe(&dir),
                            false => Ok(()),
                        };
                        match writable_dir("--volume-dir", &dir).and_then(direct_io_works).and_then(
                            |()| {
                                DirBackend::new(&dir)
                                    .map_err(|e| format!("--volume-dir {}: {e}", dir.display()))
                            },
                        ) {
                            Ok(b) => Some(Box::new(b)),
                            Err(e) => {
                                problems.push(e);
                                None
                            }
                        }
                    }
                }
            },
            other => {
                problems.push(format!("--backend {other:?} is not lvm or dir"));
                None
            }
        };

        let sources = SourceSettings::from_cli(cli, &mut problems);

        if !problems.is_empty() {
            return Err(problems);
        }
        let auth_summary = match (cli.client_ca.is_some(), tokens.is_some()) {
            (true, true) => "client certificate or API token",
            (true, false) => "client certificate required",
            (false, _) => "API token required",
        }
        .to_string();
        let mut warnings = Vec::new();
        // With mutual TLS alone a client without a certificate fails the
        // handshake, before any path is read: the probes cannot be public.
        let certificate_required = cli.client_ca.is_some() && tokens.is_none() && !cli.plain_http;
        for (set, flag) in
            [(cli.public_health, "--public-health"), (cli.public_metrics, "--public-metrics")]
        {
            if set && certificate_required {
                warnings.push(format!(
                    "{flag} has no effect with --client-ca alone: a client without a \
                     certificate fails the TLS handshake first (add --tokens to let it connect)"
                ));
            }
        }
        Ok(Config {
            listen: listen.expect("checked above"),
            tls,
            tokens,
            backend: backend.expect("checked above"),
            cache_dir,
            state_dir,
            workers: cli.workers,
            queue: cli.queue,
            require_digest: cli.require_digest,
            keep_tail: cli.keep_tail,
            io: if cli.direct_io { IoMode::Direct } else { IoMode::Buffered },
            http_threads: cli.http_threads,
            public_metrics: cli.public_metrics,
            public_health: cli.public_health,
            libvirt_pool: cli.libvirt_pool.clone(),
            max_connections: cli.max_connections,
            max_connections_per_address: cli.max_connections_per_address,
            handshake_timeout: Duration::from_secs(cli.handshake_timeout),
            idle_timeout: Duration::from_secs(cli.idle_timeout),
            request_timeout: Duration::from_secs(cli.request_timeout),
            download_timeout: Duration::from_secs(cli.download_timeout),
            retry: crate::fetch::RetryPolicy {
                retries: cli.download_retries,
                first_delay: Duration::from_secs(cli.retry_delay),
            },
            retention: crate::jobs::table::Retention {
                max_finished: cli.keep_jobs,
                max_age: Duration::from_secs(cli.keep_job_hours * 3600),
            },
            shutdown_grace: Duration::from_secs(cli.shutdown_grace),
            cache_max_bytes: cli.cache_max_gb.map(|gb| gb << 30),
            verify_cache: cli.verify_cache,
            auth_summary,
            warnings,
            sources: sources.expect("checked above"),
        })
    }
}

fn range(flag: &str, value: usize, lo: usize, hi: usize) -> Result<(), String> {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(format!("{flag} {value} is out of range ({lo} to {hi})"))
    }
}

/// Creates `dir` if needed and proves we can write a file in it.
fn writable_dir(flag: &str, dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir)
        .map_err(|e| format!("{flag} {}: cannot create directory ({e})", dir.display()))?;
    let probe = dir.join(format!(".lvp-write-test-{}", std::process::id()));
    fs::write(&probe, b"")
        .and_then(|()| fs::remove_file(&probe))
        .map_err(|e| format!("{flag} {}: directory is not writable ({e})", dir.display()))
}

fn qemu_img_present() -> Result<(), String> {
    crate::cmd::run(&["qemu-img".to_string(), "--version".to_string()])
        .map(|_| ())
        .map_err(|e| format!("qemu-img is required: {e} (install qemu-utils)"))
}
