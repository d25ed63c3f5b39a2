//! Wiring and shutdown: journal replay and recovery, cache, backend,
//! workers, tiny_http on a private loopback socket, the front door on the
//! public address, and the drain on SIGTERM or SIGINT.
//!
//! Shutdown: stop accepting connections and jobs; cancel pending jobs;
//! let running jobs finish for up to `--shutdown-grace`; then cancel them,
//! so their workers roll them back and journal the result; then exit.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::cache::Cache;
use crate::config::Config;
use crate::fetch::{FetchOptions, Fetcher};
use crate::frontdoor::bridge::Limits;
use crate::frontdoor::peers::PeerTable;
use crate::frontdoor::FrontDoor;
use crate::http::{self, Ctx};
use crate::jobs::pipeline::{recover_interrupted, Pipeline};
use crate::jobs::queue::Queue;
use crate::jobs::table::JobTable;
use crate::jobs::Status;
use crate::metrics::Metrics;
use crate::write::IoMode;

/// How long the daemon waits at exit for cache entries still being flushed.
const CACHE_FLUSH_GRACE: Duration = Duration::from_secs(10);

/// How long cancelled jobs get to roll back before the daemon exits anyway.
const ROLLBACK_GRACE: Duration = Duration::from_secs(60);

/// Runs the daemon until SIGTERM or SIGINT has been handled. Returns an
/// error only for a fatal start-up problem.
pub fn run(config: Config) -> Result<(), String> {
    let started = Instant::now();
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    // Two daemons on one state or cache directory would sweep each other's
    // downloads and replay each other's journal: refuse the second.
    // Held until the process exits.
    let _state_lock = lock_dir(&config.state_dir, "lock", "--state-dir")?;
    let _cache_lock = lock_dir(&config.cache_dir, ".lvp-lock", "--cache-dir")?;
    let (table, interrupted) =
        JobTable::open(&config.state_dir, config.retention).map_err(|e| {
            format!("--state-dir {}: cannot read the job journal: {e}", config.state_dir.display())
        })?;
    let table = Arc::new(table);
    let cache = Cache::open(&config.cache_dir)
        .map_err(|e| format!("--cache-dir {}: {e}", config.cache_dir.display()))?;
    if !interrupted.is_empty() {
        log::warn!("{} jobs were interrupted by the last stop; undoing them", interrupted.len());
        recover_interrupted(&table, config.backend.as_ref(), interrupted);
    }
    log::info!("job journal replayed in {} ms", started.elapsed().as_millis());

    log::info!("{}", config.sources.summary());
    let metrics = Arc::new(Metrics::default());
    let pipeline = Arc::new(Pipeline {
        table: Arc::clone(&table),
        cache,
        backend: config.backend,
        fetcher: Fetcher::new(FetchOptions {
            stall: config.download_timeout,
            retry: config.retry,
            policy: Arc::clone(&config.sources.policy),
            roots: config.sources.roots,
            proxies: config.sources.proxies,
            signer: config.sources.signer,
        }),
        require_digest: config.require_digest,
        metrics: Arc::clone(&metrics),
        libvirt: crate::libvirt::PoolRefresher::new(config.libvirt_pool.clone()),
        verify_cache: config.verify_cache,
        cache_max_bytes: config.cache_max_bytes,
        inspected: Default::default(),
        keep_tail: config.keep_tail,
        io: config.io,
    });
    let backend_kind = pipeline.backend.kind();
    let (queue, workers) = Queue::start(config.workers, config.queue, Arc::clone(&pipeline));

    let server = tiny_http::Server::http("127.0.0.1:0")
        .map_err(|e| format!("cannot open the private HTTP socket on 127.0.0.1: {e}"))?;
    let backend_addr =
        server.server_addr().to_ip().ok_or("the private HTTP socket has no IP address")?;
    let server = Arc::new(server);
    let peers = Arc::new(PeerTable::default());
    let ctx = Arc::new(Ctx {
        table: Arc::clone(&table),
        queue,
        peers: Arc::clone(&peers),
        tokens: config.tokens,
        shutting_down: AtomicBool::new(false),
        pipeline: Arc::clone(&pipeline),
        metrics,
        public_metrics: config.public_metrics,
        public_health: config.public_health,
        waiting: std::sync::atomic::AtomicUsize::new(0),
        http_threads: config.http_threads,
    });
    let _http = http::start(server, Arc::clone(&ctx), config.http_threads);

    let listener = TcpListener::bind(config.listen)
        .map_err(|e| format!("--listen {}: cannot listen ({e})", config.listen))?;
    let stop = Arc::new(AtomicBool::new(false));
    watch_signals(Arc::clone(&stop))?;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    if config.tls.is_none() {
        log::warn!(
            "serving plain HTTP (--plain-http): for development only; tokens cross the network in clear"
        );
    }
    log::info!(
        "listening on {scheme}://{} ({}); backend {backend_kind}{}; cache {}; state {}; {} workers, queue {}",
        listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        config.auth_summary,
        if config.io == IoMode::Direct { " (O_DIRECT writes)" } else { "" },
        config.cache_dir.display(),
        config.state_dir.display(),
        config.workers,
        config.queue,
    );
    let door = FrontDoor {
        listener,
        tls: config.tls,
        backend: backend_addr,
        peers,
        limits: Limits {
            handshake: config.handshake_timeout,
            idle: config.idle_timeout,
            request: config.request_timeout,
        },
        max_connections: config.max_connections,
        max_per_address: config.max_connections_per_address,
    };
    door.run(&stop);

    drain(&ctx, config.shutdown_grace);
    // Cache entries are flushed after their job goes on (see cache.rs);
    // give the last ones a moment so the next start need not hash them.
    if !ctx.pipeline.cache.wait_flushed(CACHE_FLUSH_GRACE) {
        log::warn!("cache entries still flushing at exit; they are hashed again before next use");
    }
    // Every job is final and journaled (or reported above); idle workers
    // and HTTP threads end with the process.
    drop(workers);
    log::info!("stopped");
    Ok(())
}

/// Takes an exclusive lock on `<dir>/<name>`, held while the returned
/// file is open.
fn lock_dir(dir: &std::path::Path, name: &str, flag: &str) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let path = dir.join(name);
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(
            |e| format!("{flag} {}: cannot open {} ({e})", dir.display(), path.display()),
        )?;
    // SAFETY: flock on a descriptor we own; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "{flag} {} is in use by another libvirt-volume-provisioner; stop it or use another directory",
            dir.display()
        ));
    }
    Ok(file)
}

/// Sets `stop` on the first SIGTERM or SIGINT.
fn watch_signals(stop: Arc<AtomicBool>) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                log::info!("{name} received: draining");
                stop.store(true, Ordering::SeqCst);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Refuses new jobs, cancels pending ones, waits `grace` for running ones,
/// then cancels those and waits for their rollback.
fn drain(ctx: &Ctx, grace: Duration) {
    ctx.shutting_down.store(true, Ordering::SeqCst);
    log::info!(
        "draining: no new jobs; running jobs get up to {}s (--shutdown-grace) to finish",
        grace.as_secs()
    );
    for (id, status) in ctx.table.active() {
        if status == Status::Pending {
            let _ = ctx.table.cancel_with(id, "the daemon shut down before the job started");
        }
    }
    let running = || ctx.table.active().into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    let deadline = Instant::now() + grace;
    while !running().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let left = running();
    if !left.is_empty() {
        log::warn!(
            "{} jobs still running after the {}s grace period: cancelling and rolling them back",
            left.len(),
            grace.as_secs()
        );
        for id in &left {
            ctx.table.cancel_for_shutdown(*id);
        }
        let deadline = Instant::now() + ROLLBACK_GRACE;
        while !running().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        for id in running() {
            log::error!("job {id} did not finish its rollback; the next start marks it failed and undoes it");
        }
    }
}
