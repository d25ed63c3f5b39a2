//! The raw command line, as argh parses it. The doc comments here are the
//! `--help` text; the man page (`man/libvirt-volume-provisioner.8`) carries
//! the detail. Checking values (files exist, numbers in range) is the job of
//! `config.rs`, not of this module.

use argh::FromArgs;

/// Fill libvirt/KVM VM disks from cached base images over an HTTPS API.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// print the program's version and exit
    #[argh(switch)]
    pub version: bool,

    // Optional only so that `--version` alone parses; main refuses a
    // command line with neither.
    #[argh(subcommand)]
    pub command: Option<Command>,
}

/// Options `client` takes before its command, named in the hint for one
/// given after it.
const CLIENT_OPTIONS: [&str; 5] = ["--url", "--ca", "--cert", "--key", "--token-file"];

/// Hints for a command line argh refused, from its error text `output`:
/// a client option written after the client's command, and a
/// `--flag=value` (argh takes only `--flag value`).
pub fn usage_hints(program: &str, args: &[&str], output: &str) -> Vec<String> {
    let mut hints = Vec::new();
    let unknown = output
        .lines()
        .filter_map(|l| l.strip_prefix("Unrecognized argument: "))
        .map(|a| a.trim().trim_matches('"'));
    for arg in unknown {
        let (flag, value) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value)),
            _ => (arg, None),
        };
        if args.first() == Some(&"client") && CLIENT_OPTIONS.contains(&flag) {
            let command = args.get(1).filter(|c| !c.starts_with('-')).unwrap_or(&"<command>");
            hints.push(format!(
                "hint: client options ({}) go before the command: {program} client {flag} ... {command} ...",
                CLIENT_OPTIONS.join(", ")
            ));
        }
        if let Some(value) = value {
            hints.push(format!(
                "hint: write `{flag} {value}`, not `{arg}`: a value follows its flag as the next argument"
            ));
        }
    }
    hints
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start; size is irrelevant
pub enum Command {
    Serve(Serve),
    Token(Token),
    Check(Check),
    Client(Client),
}

/// Run the provisioning daemon.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "serve")]
pub struct Serve {
    /// address and port to listen on (default 0.0.0.0:8080)
    #[argh(option, default = "String::from(\"0.0.0.0:8080\")")]
    pub listen: String,

    /// PEM file with the server certificate chain
    #[argh(option)]
    pub tls_cert: Option<String>,

    /// PEM file with the server's private key
    #[argh(option)]
    pub tls_key: Option<String>,

    /// PEM file with the CA that signs client certificates (enables mutual TLS)
    #[argh(option)]
    pub client_ca: Option<String>,

    /// tokens file (name:sha256:<hex> lines); enables token authentication
    #[argh(option)]
    pub tokens: Option<String>,

    /// serve plain HTTP without TLS (development only; tokens required)
    #[argh(switch)]
    pub plain_http: bool,

    /// volume backend: lvm or dir (default lvm)
    #[argh(option, default = "String::from(\"lvm\")")]
    pub backend: String,

    /// LVM volume group that holds the volumes (lvm backend)
    #[argh(option)]
    pub volume_group: Option<String>,

    /// thin pool in --volume-group for new volumes, made thin (lvm backend)
    #[argh(option)]
    pub thin_pool: Option<String>,

    /// directory that holds the volumes as raw files (dir backend)
    #[argh(option)]
    pub volume_dir: Option<String>,

    /// image cache directory (default /var/lib/libvirt/images)
    #[argh(option, default = "String::from(\"/var/lib/libvirt/images\")")]
    pub cache_dir: String,

    /// state directory (default /var/lib/libvirt-volume-provisioner)
    #[argh(option, default = "String::from(\"/var/lib/libvirt-volume-provisioner\")")]
    pub state_dir: String,

    /// number of jobs that run at once (default 2)
    #[argh(option, default = "2")]
    pub workers: usize,

    /// number of jobs that may wait for a worker (default 64)
    #[argh(option, default = "64")]
    pub queue: usize,

    /// log level: error, warn, info, debug or trace (default info)
    #[argh(option, default = "String::from(\"info\")")]
    pub log_level: String,

    /// fail jobs whose image has no digest (no image_sha256 and no sidecar)
    #[argh(switch)]
    pub require_digest: bool,

    /// leave a volume's old bytes after the image's end instead of zeroing them
    #[argh(switch)]
    pub keep_tail: bool,

    /// write volumes with O_DIRECT, past the page cache (slower; see the man page)
    #[argh(switch)]
    pub direct_io: bool,

    /// most client connections open at once (default 128)
    #[argh(option, default = "128")]
    pub max_connections: usize,

    /// most client connections open at once from one IP address (default 32)
    #[argh(option, default = "32")]
    pub max_connections_per_address: usize,

    /// seconds a client has to finish the TLS handshake (default 10)
    #[argh(option, default = "10")]
    pub handshake_timeout: u64,

    /// seconds a connection may stay silent before it is closed (default 60)
    #[argh(option, default = "60")]
    pub idle_timeout: u64,

    /// seconds a request may take to arrive whole from its first byte (default 10)
    #[argh(option, default = "10")]
    pub request_timeout: u64,

    /// seconds without a byte before an image download fails (default 60)
    #[argh(option, default = "60")]
    pub download_timeout: u64,

    /// retries of a failed download: resets, stalls, 5xx (default 4)
    #[argh(option, default = "4")]
    pub download_retries: u32,

    /// seconds before the first download retry, doubled each time (default 1)
    #[argh(option, default = "1")]
    pub retry_delay: u64,

    /// finished jobs kept answerable by status (default 10000)
    #[argh(option, default = "10000")]
    pub keep_jobs: usize,

    /// hours a finished job stays answerable by status (default 168)
    #[argh(option, default = "168")]
    pub keep_job_hours: u64,

    /// seconds running jobs may finish after SIGTERM before they are
    /// cancelled and rolled back (default 60)
    #[argh(option, default = "60")]
    pub shutdown_grace: u64,

    /// largest total size of cached images in GiB; least recently used
    /// entries are evicted past it (default: no limit)
    #[argh(option)]
    pub cache_max_gb: Option<u64>,

    /// re-hash a cache entry before each use instead of checking its size
    #[argh(switch)]
    pub verify_cache: bool,

    /// threads answering HTTP requests, including held ?wait= requests (default 16)
    #[argh(option, default = "16")]
    pub http_threads: usize,

    /// answer /metrics without authentication
    #[argh(switch)]
    pub public_metrics: bool,

    /// answer /health, /healthz, /livez and /readyz without authentication
    #[argh(switch)]
    pub public_health: bool,

    /// libvirt storage pool to refresh (virsh pool-refresh) after a volume
    /// is created or removed
    #[argh(option)]
    pub libvirt_pool: Option<String>,

    /// URL prefix image_url must start with (repeatable); outside every
    /// prefix a submission gets 400 (default: any http or https URL)
    #[argh(option)]
    pub allow_source: Vec<String>,

    /// network (CIDR) downloads may not connect to, after name resolution
    /// (repeatable; 169.254.0.0/16 and fe80::/10 are always denied)
    #[argh(option)]
    pub deny_network: Vec<String>,

    /// network (CIDR) downloads may reach even inside a denied network
    /// (repeatable)
    #[argh(option)]
    pub allow_network: Vec<String>,

    /// PEM bundle of CAs trusted for https image sources, beside the
    /// system's roots (a private MinIO's CA)
    #[argh(option)]
    pub source_ca: Option<String>,

    /// forward proxy for image downloads (http://host:port), or "none";
    /// overrides HTTPS_PROXY and HTTP_PROXY
    #[argh(option)]
    pub proxy: Option<String>,

    /// comma-separated hosts, domains or networks downloaded without the
    /// proxy; overrides NO_PROXY
    #[argh(option)]
    pub no_proxy: Option<String>,

    /// origin of an S3-compatible endpoint whose image URLs are signed with
    /// AWS Signature V4 (repeatable), e.g. https://minio.example.com:9000
    #[argh(option)]
    pub s3_endpoint: Vec<String>,

    /// region in the S3 signatures (default us-east-1)
    #[argh(option, default = "String::from(\"us-east-1\")")]
    pub s3_region: String,

    /// file with the S3 access key and secret (AWS credentials-file form);
    /// default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    #[argh(option)]
    pub s3_credentials: Option<String>,
}

/// Check a configuration and this host without starting the daemon.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check")]
pub struct Check {
    /// the serve command line to check, after `--`, e.g.
    /// `check -- --backend dir --volume-dir /srv/vols ...`
    #[argh(positional, greedy)]
    pub serve_args: Vec<String>,
}

/// Talk to a running daemon: provision, status, cancel, jobs, cache.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "client")]
pub struct Client {
    /// daemon URL (default https://localhost:8080, or $LVP_URL)
    #[argh(option)]
    pub url: Option<String>,

    /// CA certificate that signed the daemon's certificate (PEM)
    #[argh(option)]
    pub ca: Option<String>,

    /// client certificate for mutual TLS (PEM)
    #[argh(option)]
    pub cert: Option<String>,

    /// private key of --cert (PEM)
    #[argh(option)]
    pub key: Option<String>,

    /// file holding an API token (else the token itself in $LVP_TOKEN)
    #[argh(option)]
    pub token_file: Option<String>,

    #[argh(subcommand)]
    pub command: ClientCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum ClientCommand {
    Provision(ClientProvision),
    Status(ClientStatus),
    Cancel(ClientCancel),
    Jobs(ClientJobs),
    Cache(ClientCache),
}

/// Start a provisioning job; with --wait, follow it to the end.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "provision")]
pub struct ClientProvision {
    /// image URL (http or https)
    #[argh(option)]
    pub image_url: String,

    /// volume name (LV name or file name in the volume directory)
    #[argh(option)]
    pub volume_name: String,

    /// volume size in GiB
    #[argh(option)]
    pub volume_size_gb: u64,

    /// image format: qcow2 or raw (default qcow2)
    #[argh(option)]
    pub image_type: Option<String>,

    /// label echoed in status and logs
    #[argh(option)]
    pub correlation_id: Option<String>,

    /// expected SHA-256 of the image
    #[argh(option)]
    pub image_sha256: Option<String>,

    /// idempotency key, so a retried command never starts a second job
    #[argh(option)]
    pub idempotency_key: Option<String>,

    /// wait for the job to end, showing progress; exit 0 only if it completed
    #[argh(switch)]
    pub wait: bool,
}

/// Show a job; with --wait, follow it to the end.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct ClientStatus {
    /// job id
    #[argh(positional)]
    pub job_id: String,

    /// wait for the job to end, showing progress; exit 0 only if it completed
    #[argh(switch)]
    pub wait: bool,
}

/// Cancel a pending or running job.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cancel")]
pub struct ClientCancel {
    /// job id
    #[argh(positional)]
    pub job_id: String,
}

/// List jobs, newest first.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "jobs")]
pub struct ClientJobs {
    /// only jobs with this status
    #[argh(option)]
    pub status: Option<String>,

    /// only jobs with this correlation id
    #[argh(option)]
    pub correlation_id: Option<String>,
}

/// List, prefetch or purge cached images.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cache")]
pub struct ClientCache {
    #[argh(subcommand)]
    pub command: CacheCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum CacheCommand {
    List(CacheList),
    Prefetch(CachePrefetch),
    Purge(CachePurge),
}

/// List cache entries.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "list")]
pub struct CacheList {}

/// Download an image into the cache without provisioning anything.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "prefetch")]
pub struct CachePrefetch {
    /// image URL (http or https)
    #[argh(option)]
    pub image_url: String,

    /// expected SHA-256 of the image
    #[argh(option)]
    pub image_sha256: Option<String>,

    /// wait for the download to end
    #[argh(switch)]
    pub wait: bool,
}

/// Delete a cache entry that no job needs.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "purge")]
pub struct CachePurge {
    /// SHA-256 of the entry
    #[argh(positional)]
    pub sha256: String,
}

/// Manage API tokens.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "token")]
pub struct Token {
    #[argh(subcommand)]
    pub command: TokenCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum TokenCommand {
    New(TokenNew),
}

/// Mint a token: print it once and append its SHA-256 to the tokens file.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "new")]
pub struct TokenNew {
    /// name the token is known by in logs (letters, digits, . _ -)
    #[argh(positional)]
    pub name: String,

    /// tokens file to append to (created with mode 0600 if missing)
    #[argh(option)]
    pub tokens: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::from_args(&["libvirt-volume-provisioner"], args).map_err(|e| e.output)
    }

    fn serve(args: &[&str]) -> Serve {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        match parse(&all).unwrap().command {
            Some(Command::Serve(s)) => s,
            other => panic!("expected serve, got {other:?}"),
        }
    }

    #[test]
    fn test_serve_defaults() {
        let s = serve(&[]);
        assert_eq!(s.listen, "0.0.0.0:8080");
        assert_eq!(s.backend, "lvm");
        assert_eq!(s.cache_dir, "/var/lib/libvirt/images");
        assert_eq!(s.state_dir, "/var/lib/libvirt-volume-provisioner");
        assert_eq!((s.workers, s.queue), (2, 64));
        assert_eq!(s.log_level, "info");
        assert!(!s.plain_http && !s.require_digest);
        assert_eq!((s.max_connections, s.handshake_timeout, s.idle_timeout), (128, 10, 60));
        assert_eq!(s.request_timeout, 10);
        assert_eq!(s.download_timeout, 60);
        assert_eq!((s.download_retries, s.retry_delay), (4, 1));
        assert_eq!((s.keep_jobs, s.keep_job_hours, s.shutdown_grace), (10_000, 168, 60));
        assert_eq!((s.cache_max_gb, s.verify_cache), (None, false));
        assert_eq!(s.thin_pool, None, "plain LVs unless a thin pool is named");
    }

    #[test]
    fn test_serve_every_flag_parses() {
        let s = serve(&[
            "--listen",
            "127.0.0.1:9",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--client-ca",
            "ca",
            "--tokens",
            "t",
            "--plain-http",
            "--backend",
            "dir",
            "--volume-group",
            "vg",
            "--thin-pool",
            "pool",
            "--volume-dir",
            "vd",
            "--cache-dir",
            "cd",
            "--state-dir",
            "sd",
            "--workers",
            "3",
            "--queue",
            "4",
            "--log-level",
            "debug",
            "--require-digest",
            "--max-connections",
            "5",
            "--handshake-timeout",
            "6",
            "--idle-timeout",
            "7",
            "--download-timeout",
            "8",
            "--download-retries",
            "9",
            "--retry-delay",
            "10",
            "--keep-jobs",
            "11",
            "--keep-job-hours",
            "12",
            "--shutdown-grace",
            "13",
            "--cache-max-gb",
            "14",
            "--verify-cache",
        ]);
        assert_eq!((s.download_retries, s.retry_delay), (9, 10));
        assert_eq!((s.keep_jobs, s.keep_job_hours, s.shutdown_grace), (11, 12, 13));
        assert_eq!((s.cache_max_gb, s.verify_cache), (Some(14), true));
        assert_eq!(s.listen, "127.0.0.1:9");
        assert_eq!(s.tls_cert.as_deref(), Some("c"));
        assert_eq!(s.tls_key.as_deref(), Some("k"));
        assert_eq!(s.client_ca.as_deref(), Some("ca"));
        assert_eq!(s.tokens.as_deref(), Some("t"));
        assert!(s.plain_http && s.require_digest);
        assert_eq!(s.backend, "dir");
        assert_eq!(s.volume_group.as_deref(), Some("vg"));
        assert_eq!(s.thin_pool.as_deref(), Some("pool"));
        assert_eq!(s.volume_dir.as_deref(), Some("vd"));
        assert_eq!((s.cache_dir.as_str(), s.state_dir.as_str()), ("cd", "sd"));
        assert_eq!((s.workers, s.queue, s.max_connections), (3, 4, 5));
        assert_eq!((s.handshake_timeout, s.idle_timeout, s.download_timeout), (6, 7, 8));
        assert_eq!(s.log_level, "debug");
    }

    #[test]
    fn test_source_flags_parse_and_repeat() {
        let s = serve(&[
            "--allow-source",
            "https://a/",
            "--allow-source",
            "https://b/",
            "--deny-network",
            "127.0.0.2/32",
            "--allow-network",
            "169.254.1.0/24",
            "--source-ca",
            "ca.pem",
            "--proxy",
            "http://127.0.0.1:3128",
            "--no-proxy",
            "localhost",
            "--s3-endpoint",
            "https://minio:9000",
            "--s3-region",
            "eu-west-1",
            "--s3-credentials",
            "creds",
        ]);
        assert_eq!(s.allow_source, ["https://a/", "https://b/"]);
        assert_eq!((s.deny_network.len(), s.allow_network.len()), (1, 1));
        assert_eq!(s.source_ca.as_deref(), Some("ca.pem"));
        assert_eq!(s.proxy.as_deref(), Some("http://127.0.0.1:3128"));
        assert_eq!(s.no_proxy.as_deref(), Some("localhost"));
        assert_eq!(s.s3_endpoint, ["https://minio:9000"]);
        assert_eq!(
            (s.s3_region.as_str(), s.s3_credentials.as_deref()),
            ("eu-west-1", Some("creds"))
        );
        let d = serve(&[]);
        assert!(d.allow_source.is_empty() && d.s3_endpoint.is_empty());
        assert_eq!(d.s3_region, "us-east-1");
    }

    #[test]
    fn test_bad_number_is_rejected() {
        let err = parse(&["serve", "--workers", "two"]).unwrap_err();
        assert!(err.contains("--workers"), "{err}");
    }

    #[test]
    fn test_token_new_parses() {
        match parse(&["token", "new", "ci", "--tokens", "/tmp/t"]).unwrap().command {
            Some(Command::Token(Token { command: TokenCommand::New(t) })) => {
                assert_eq!((t.name.as_str(), t.tokens.as_str()), ("ci", "/tmp/t"));
            }
            other => panic!("expected token new, got {other:?}"),
        }
    }

    #[test]
    fn test_version_parses_without_a_command() {
        let cli = parse(&["--version"]).unwrap();
        assert!(cli.version && cli.command.is_none());
        assert!(!parse(&["serve"]).unwrap().version);
    }

    #[test]
    fn test_usage_hints() {
        let hints = |args: &[&str]| {
            let output = parse(args).unwrap_err();
            usage_hints("lvp", args, &output)
        };
        let h = hints(&["client", "jobs", "--ca", "ca.crt"]);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h[0].contains("(--url, --ca, --cert, --key, --token-file) go before"), "{h:?}");
        let h = hints(&["serve", "--backend=dir"]);
        assert_eq!(h, ["hint: write `--backend dir`, not `--backend=dir`: a value follows its flag as the next argument"]);
        assert_eq!(hints(&["client", "jobs", "--url=https://h:1"]).len(), 2);
        assert!(hints(&["serve", "--bogus"]).is_empty());
        assert!(hints(&["serve", "--workers", "two"]).is_empty());
    }

    /// Every long flag in this file must be documented in the man page.
    #[test]
    fn test_every_flag_is_in_the_man_page() {
        let man = include_str!("../man/libvirt-volume-provisioner.8");
        let flags = long_flags(include_str!("cli.rs"));
        assert!(flags.len() >= 20, "the flag scan found only {flags:?}");
        let missing: Vec<&String> = flags
            .iter()
            // roff escapes dashes: \-\-flag\-name
            .filter(|f| !man.contains(&f.replace('-', "\\-")))
            .collect();
        assert!(missing.is_empty(), "flags missing from the man page: {missing:?}");
    }

    /// The `--flag` of every `#[argh(option …)]` or `#[argh(switch …)]`
    /// field, however rustfmt wrapped the attribute.
    fn long_flags(src: &str) -> Vec<String> {
        let mut flags = Vec::new();
        let mut attr: Option<String> = None;
        let mut is_flag = false;
        for line in src.lines().map(str::trim) {
            if let Some(text) = attr.as_mut() {
                text.push_str(line);
            } else if line.starts_with("#[argh(") {
                attr = Some(line.to_string());
            }
            if let Some(text) = attr.take_if(|t| t.ends_with(")]")) {
                is_flag = text.contains("option") || text.contains("switch");
                continue;
            }
            if attr.is_none() && is_flag {
                if let Some(name) = line.strip_prefix("pub ").and_then(|f| f.split(':').next()) {
                    flags.push(format!("--{}", name.replace('_', "-")));
                    is_flag = false;
                }
            }
        }
        flags
    }
}
