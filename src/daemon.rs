//! Wiring: cache, backend, job table, workers, tiny_http on a private
//! loopback socket, and the front door on the public address.

use std::net::TcpListener;
use std::sync::Arc;

use crate::cache::Cache;
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::frontdoor::bridge::Limits;
use crate::frontdoor::peers::PeerTable;
use crate::frontdoor::FrontDoor;
use crate::http::{self, Ctx};
use crate::jobs::pipeline::Pipeline;
use crate::jobs::queue::Queue;
use crate::jobs::table::JobTable;

/// Threads answering HTTP requests. Handlers never block on I/O beyond
/// reading a small body, so a few serve many connections.
const HTTP_THREADS: usize = 4;

/// Runs the daemon until the process is stopped. Returns only on a fatal
/// start-up error.
pub fn run(config: Config) -> Result<(), String> {
    let cache = Cache::open(&config.cache_dir)
        .map_err(|e| format!("--cache-dir {}: {e}", config.cache_dir.display()))?;
    let table = Arc::new(JobTable::default());
    let pipeline = Arc::new(Pipeline {
        table: Arc::clone(&table),
        cache,
        backend: config.backend,
        fetcher: Fetcher::new(config.download_timeout),
        require_digest: config.require_digest,
        keep_tail: config.keep_tail,
    });
    let backend_kind = pipeline.backend.kind();
    let (queue, _workers) = Queue::start(config.workers, config.queue, Arc::clone(&pipeline));

    let server = tiny_http::Server::http("127.0.0.1:0")
        .map_err(|e| format!("cannot open the private HTTP socket on 127.0.0.1: {e}"))?;
    let backend_addr =
        server.server_addr().to_ip().ok_or("the private HTTP socket has no IP address")?;
    let server = Arc::new(server);
    let peers = Arc::new(PeerTable::default());
    let ctx = Arc::new(Ctx { table, queue, peers: Arc::clone(&peers), tokens: config.tokens });
    let _http = http::start(server, ctx, HTTP_THREADS);

    let listener = TcpListener::bind(config.listen)
        .map_err(|e| format!("--listen {}: cannot listen ({e})", config.listen))?;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    if config.tls.is_none() {
        log::warn!("serving plain HTTP (--plain-http): for development only; tokens cross the network in clear");
    }
    log::info!(
        "listening on {scheme}://{} ({}); backend {backend_kind}; cache {}; state {}; {} workers, queue {}",
        listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        config.auth_summary,
        config.cache_dir.display(),
        config.state_dir.display(),
        config.workers,
        config.queue,
    );
    FrontDoor {
        listener,
        tls: config.tls,
        backend: backend_addr,
        peers,
        limits: Limits { handshake: config.handshake_timeout, idle: config.idle_timeout },
        max_connections: config.max_connections,
    }
    .run();
    Ok(())
}
