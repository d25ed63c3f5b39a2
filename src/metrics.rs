//! Prometheus metrics for `GET /metrics`, encoded by `prometheus-client`.
//!
//! Counters and histograms are updated where things happen (requests in
//! the HTTP layer, jobs in the pipeline); gauges that describe state (jobs
//! by status, cache size) are read from the job table and the cache when a
//! scrape arrives, so they can never drift from the truth.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Upper bounds of the stage duration buckets, in seconds: 50 ms to about
/// 8 hours, written out so that the `le` labels read as typed (a computed
/// series prints float noise such as `0.15000000000000003`).
const STAGE_BUCKETS: [f64; 12] =
    [0.05, 0.15, 0.5, 1.5, 5.0, 15.0, 50.0, 150.0, 500.0, 1500.0, 5000.0, 30000.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub jobs_finished: Family<StatusLabels, Counter>,
    pub jobs: Family<StatusLabels, Gauge>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_bytes: Gauge<u64, AtomicU64>,
    pub cache_entries: Gauge,
    pub bytes_downloaded: Counter,
    pub bytes_written: Counter,
    pub stage_seconds: Family<StageLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lvp");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        let jobs_finished = Family::<StatusLabels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final status since start",
            jobs_finished.clone(),
        );
        let jobs = Family::<StatusLabels, Gauge>::default();
        registry.register("jobs", "Jobs the daemon knows, by status", jobs.clone());
        let cache_hits = Counter::default();
        registry.register("cache_hits", "Jobs that found their image cached", cache_hits.clone());
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Jobs that had to download their image",
            cache_misses.clone(),
        );
        let cache_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register("cache_bytes", "Bytes held in cache entries", cache_bytes.clone());
        let cache_entries = Gauge::default();
        registry.register("cache_entries", "Cache entries", cache_entries.clone());
        let bytes_downloaded = Counter::default();
        registry.register("downloaded_bytes", "Image bytes downloaded", bytes_downloaded.clone());
        let bytes_written = Counter::default();
        registry.register(
            "written_bytes",
            "Image bytes written into volumes",
            bytes_written.clone(),
        );
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(STAGE_BUCKETS.iter().copied())
        });
        registry.register(
            "stage_duration_seconds",
            "Time jobs spent in each stage",
            stage_seconds.clone(),
        );
        Metrics {
            registry,
            requests,
            jobs_finished,
            jobs,
            cache_hits,
            cache_misses,
            cache_bytes,
            cache_entries,
            bytes_downloaded,
            bytes_written,
            stage_seconds,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Counts a request. A method outside the usual ones counts as
    /// `other`: the method is the client's to choose, and one label value
    /// each would let a client grow the metrics without end.
    pub fn request(&self, endpoint: &str, method: &str, code: u16) {
        const KNOWN: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
        let method = KNOWN.iter().find(|m| **m == method).copied().unwrap_or("other");
        let labels = RequestLabels {
            endpoint: endpoint.to_string(),
            method: method.to_string(),
            code: code.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
    }

    pub fn job_finished(&self, status: crate::jobs::Status) {
        let labels = StatusLabels { status: status.as_str().to_string() };
        self.jobs_finished.get_or_create(&labels).inc();
    }

    pub fn stage_done(&self, stage: crate::jobs::Stage, seconds: f64) {
        let labels = StageLabels { stage: stage.as_str().to_string() };
        self.stage_seconds.get_or_create(&labels).observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once, the bucket bounds were computed and printed as
    /// `le="0.15000000000000003"`.
    #[test]
    fn stage_buckets_print_as_written() {
        let m = Metrics::default();
        m.stage_done(crate::jobs::Stage::Converting, 0.2);
        let text = m.encode();
        assert!(text.contains("le=\"0.15\""), "{text}");
        assert!(text.contains("le=\"30000.0\""), "{text}");
        for line in text.lines().filter(|l| l.contains("le=\"")) {
            let le = line.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
            assert!(le == "+Inf" || le.len() <= 7, "noisy bucket bound {le:?} in {line}");
        }
    }

    /// Methods a client makes up share one label value.
    #[test]
    fn unknown_methods_count_as_other() {
        let m = Metrics::default();
        for method in ["FOO", "G\u{1b}]0;x\u{7}", "BAR"] {
            m.request("other", method, 405);
        }
        let text = m.encode();
        let line = "lvp_http_requests_total{endpoint=\"other\",method=\"other\",code=\"405\"} 3";
        assert!(text.contains(line), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains("FOO"), "{text}");
    }

    /// The encoder writes OpenMetrics: a counter family's TYPE line names it
    /// without `_total`, its samples carry the suffix, and the text ends
    /// with `# EOF`. The content type /metrics sends relies on that.
    #[test]
    fn counters_are_encoded_as_openmetrics() {
        let m = Metrics::default();
        m.request("status", "GET", 200);
        let text = m.encode();
        assert!(text.contains("# TYPE lvp_http_requests counter\n"), "{text}");
        assert!(
            text.contains(
                "lvp_http_requests_total{endpoint=\"status\",method=\"GET\",code=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
