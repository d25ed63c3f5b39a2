//! What an operator relies on besides provisioning: metrics, health probes,
//! long-poll status, the job list, cache administration and the log.

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The value of the first metric line that starts with `series`.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_requests_jobs_cache_and_bytes() {
    let h = Harness::start("metrics", &[]);
    let img = build_fs_image(h.image_dir(), "base", 21);
    let id = h.api.submit(&h.request(&img.qcow2_name(), "vm-m", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
    let id = h.api.submit(&h.request(&img.qcow2_name(), "vm-n", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");

    let base = h.daemon.base_url();
    let (code, text) = get_text(&base, h.pki.tls(Some(h.pki.client())), "/metrics", None);
    assert_eq!(code, 200, "{text}");
    let want = [
        ("lvp_jobs_finished_total{status=\"completed\"}", 2.0),
        ("lvp_jobs{status=\"completed\"}", 2.0),
        ("lvp_jobs{status=\"running\"}", 0.0),
        ("lvp_jobs{status=\"pending\"}", 0.0),
        ("lvp_http_requests_total{endpoint=\"provision\",method=\"POST\",code=\"202\"}", 2.0),
        ("lvp_cache_misses_total", 1.0),
        ("lvp_cache_hits_total", 1.0),
        ("lvp_cache_entries", 1.0),
        ("lvp_cache_bytes", fs::metadata(&img.qcow2).unwrap().len() as f64),
        ("lvp_downloaded_bytes_total", fs::metadata(&img.qcow2).unwrap().len() as f64),
        ("lvp_written_bytes_total", 2.0 * fs::metadata(&img.raw).unwrap().len() as f64),
        ("lvp_stage_duration_seconds_count{stage=\"converting\"}", 2.0),
        ("lvp_stage_duration_seconds_count{stage=\"downloading\"}", 2.0),
    ];
    for (series, value) in want {
        assert_eq!(metric(&text, series), Some(value), "{series} in:\n{text}");
    }
}

#[test]
fn metrics_need_authentication_unless_public() {
    for public in [false, true] {
        let dir = TestDir::new(if public { "metrics-public" } else { "metrics-private" });
        let pki = Pki::create(&dir);
        let tokens = dir.join("tokens");
        let token = String::from_utf8(
            run(Command::new(BIN).args(["token", "new", "ops", "--tokens"]).arg(&tokens)).stdout,
        )
        .unwrap();
        let auth = Auth { client_ca: false, tokens: Some(tokens) };
        let extra: &[&str] = if public { &["--public-metrics"] } else { &[] };
        let h = Harness::start_in(dir, pki, &auth, extra);
        let base = h.daemon.base_url();
        let (code, _) = get_text(&base, h.pki.tls(None), "/metrics", None);
        assert_eq!(code, if public { 200 } else { 401 }, "public={public}");
        let bearer = format!("Bearer {}", token.trim());
        let (code, text) =
            get_text(&base, h.pki.tls(None), "/metrics", Some(("Authorization", &bearer)));
        assert_eq!(code, 200);
        assert!(text.contains("# TYPE lvp_http_requests counter"), "{text}");
        // The API itself stays closed either way.
        let (code, _) = get_text(&base, h.pki.tls(None), "/api/v1/jobs", None);
        assert_eq!(code, 401);
    }
}

#[test]
fn probes_answer_and_readyz_names_what_is_broken() {
    let h = Harness::start("probes", &[]);
    for path in ["/health", "/healthz", "/livez"] {
        let reply = h.api.request("GET", path, None);
        assert_eq!((reply.status, &reply.body), (200, &json!({"status": "healthy"})), "{path}");
    }
    let reply = h.api.request("GET", "/readyz", None);
    assert_eq!((reply.status, &reply.body), (200, &json!({"status": "ready"})));

    // Take the volume directory away, as a failed mount would.
    fs::rename(&h.daemon.volume_dir, h.dir.join("volumes-gone")).unwrap();
    let reply = h.api.request("GET", "/readyz", None);
    assert_eq!(reply.status, 503, "{reply:#?}");
    assert_eq!(reply.body["status"], "not_ready");
    let reasons = reply.body["reasons"].to_string();
    assert!(reasons.contains("volume directory"), "{reasons}");
    assert_eq!(h.api.request("GET", "/livez", None).status, 200, "liveness is not readiness");
    fs::rename(h.dir.join("volumes-gone"), &h.daemon.volume_dir).unwrap();
    assert_eq!(h.api.request("GET", "/readyz", None).status, 200);
}

#[test]
fn status_wait_holds_until_the_job_moves() {
    let h = Harness::start("wait", &[]);
    let img = build_fs_image(h.image_dir(), "base", 22);
    // About two seconds of download, so the job sits in one stage a while.
    h.images
        .set_slow(&img.qcow2_name(), Slow { chunk: 256 * 1024, delay: Duration::from_millis(150) });
    let id = h.api.submit(&h.request(&img.qcow2_name(), "vm-w", 1, "qcow2"));
    h.api.wait_until(&id, JOB_TIMEOUT, "downloading", |s| s["progress"]["stage"] == "downloading");

    let started = Instant::now();
    let reply = h.api.request("GET", &format!("/api/v1/status/{id}?wait=30"), None);
    let held = started.elapsed();
    assert_eq!(reply.status, 200);
    assert_ne!(reply.body["progress"]["stage"], "downloading", "answered on a change: {reply:#?}");
    assert!(held > Duration::from_millis(300), "the answer was held ({held:?})");
    assert!(held < Duration::from_secs(25), "the answer came with the change ({held:?})");

    let last = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(last["status"], "completed");
    let started = Instant::now();
    let reply = h.api.request("GET", &format!("/api/v1/status/{id}?wait=30"), None);
    assert_eq!(reply.body["status"], "completed");
    assert!(started.elapsed() < Duration::from_secs(2), "a finished job is answered at once");

    for bad in ["abc", "301", "-1"] {
        let reply = h.api.request("GET", &format!("/api/v1/status/{id}?wait={bad}"), None);
        reply.expect_error(400, "invalid_request");
    }
}

#[test]
fn job_list_filters_by_status_and_correlation_id() {
    let h = Harness::start("jobs", &[]);
    let img = build_fs_image(h.image_dir(), "base", 23);
    let mut ids = Vec::new();
    for (volume, corr) in [("vm-1", "batch-a"), ("vm-2", "batch-a"), ("vm-3", "batch-b")] {
        let mut body = h.request(&img.qcow2_name(), volume, 1, "qcow2");
        body["correlation_id"] = json!(corr);
        let id = h.api.submit(&body);
        assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
        ids.push(id);
    }
    let bad = h.api.submit(&h.request("missing.qcow2", "vm-4", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&bad, JOB_TIMEOUT)["status"], "failed");

    let list = |query: &str| -> Vec<String> {
        let reply = h.api.request("GET", &format!("/api/v1/jobs{query}"), None);
        assert_eq!(reply.status, 200, "{reply:#?}");
        reply.body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        list(""),
        vec![bad.clone(), ids[2].clone(), ids[1].clone(), ids[0].clone()],
        "newest first"
    );
    assert_eq!(list("?correlation_id=batch-a"), vec![ids[1].clone(), ids[0].clone()]);
    assert_eq!(list("?status=failed"), vec![bad.clone()]);
    assert_eq!(list("?status=completed&correlation_id=batch-b"), vec![ids[2].clone()]);
    assert_eq!(list("?limit=1"), vec![bad]);
    h.api.request("GET", "/api/v1/jobs?status=done", None).expect_error(400, "invalid_request");
}

#[test]
fn cache_can_be_listed_prefetched_and_purged() {
    let h = Harness::start("cache-admin", &["--workers", "1"]);
    let img = build_fs_image(h.image_dir(), "base", 24);
    let sha = sha256_file(&img.qcow2);
    let url = h.images.url(&img.qcow2_name());

    let reply = h.api.provision_path("/api/v1/cache/prefetch", &json!({"image_url": url}));
    assert_eq!(reply.status, 202, "{reply:#?}");
    let job = reply.body["job_id"].as_str().unwrap().to_string();
    let done = h.api.wait_final(&job, JOB_TIMEOUT);
    assert_eq!(done["status"], "completed", "{done:#}");
    assert_eq!(done["kind"], "prefetch");
    assert_eq!(done["volume_name"], Value::Null);
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new(), "a prefetch makes no volume");

    let entries = h.api.request("GET", "/api/v1/cache", None).body["entries"].clone();
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries:#}");
    assert_eq!(entries[0]["sha256"], sha);
    assert_eq!(entries[0]["source"], url);
    assert_eq!(entries[0]["size"], fs::metadata(&img.qcow2).unwrap().len());
    assert_eq!(entries[0]["in_use"], false);
    assert!(entries[0]["last_used"].is_string());

    // The rollout after a prefetch downloads nothing more.
    let id = h.api.submit(&h.request(&img.qcow2_name(), "vm-after", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(
        (status["status"].clone(), status["cache_hit"].clone()),
        (json!("completed"), json!(true))
    );
    assert_eq!(h.images.gets(&img.qcow2_name()), 1);

    // An entry a queued job needs cannot be purged.
    let other = build_fs_image(h.image_dir(), "slow", 25);
    h.images.set_slow(
        &other.qcow2_name(),
        Slow { chunk: 256 * 1024, delay: Duration::from_millis(200) },
    );
    let blocker = h.api.submit(&h.request(&other.qcow2_name(), "vm-blocker", 1, "qcow2"));
    let mut needs = h.request(&img.qcow2_name(), "vm-needs", 1, "qcow2");
    needs["image_sha256"] = json!(sha);
    let waiting = h.api.submit(&needs);
    assert_eq!(h.api.status(&waiting).body["status"], "pending");
    h.api
        .request("DELETE", &format!("/api/v1/cache/{sha}"), None)
        .expect_error(409, "entry_in_use");
    for id in [&blocker, &waiting] {
        assert_eq!(h.api.wait_final(id, JOB_TIMEOUT)["status"], "completed");
    }

    let reply = h.api.request("DELETE", &format!("/api/v1/cache/{sha}"), None);
    assert_eq!(reply.status, 204, "{reply:#?}");
    assert!(!h.daemon.cache_dir.join(format!("{sha}.img")).exists());
    assert!(!h.daemon.cache_dir.join(format!("{sha}.json")).exists());
    h.api.request("DELETE", &format!("/api/v1/cache/{sha}"), None).expect_error(404, "not_found");
    h.api
        .request("DELETE", "/api/v1/cache/not-a-digest", None)
        .expect_error(400, "invalid_request");
}

#[test]
fn log_has_a_line_per_request_and_per_stage_and_no_secrets() {
    let h = Harness::start("logs", &[]);
    let img = build_fs_image(h.image_dir(), "base", 26);
    let mut body = h.request(&img.qcow2_name(), "vm-log", 1, "qcow2");
    body["correlation_id"] = json!("corr-log");
    let reply = h.api.provision(&body);
    let id = reply.body["job_id"].as_str().unwrap().to_string();
    let request_id = reply.request_id().unwrap().to_string();
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
    let log = h.daemon.log_text();

    let request_line = log
        .lines()
        .find(|l| l.contains(&format!("req={}", &request_id[..8])))
        .unwrap_or_else(|| panic!("no line for request {request_id}:\n{log}"));
    for part in ["peer=cert:CN=test-client", "POST /api/v1/provision 202", "ms"] {
        assert!(request_line.contains(part), "{part:?} missing from {request_line:?}");
    }
    let job = &id.replace('-', "")[..8];
    for stage in ["downloading", "inspecting", "creating_volume", "converting", "finalizing"] {
        let line = log
            .lines()
            .find(|l| {
                l.contains(&format!("job={job}")) && l.contains(&format!("stage={stage}: done in"))
            })
            .unwrap_or_else(|| panic!("no end-of-stage line for {stage}:\n{log}"));
        assert!(
            line.contains("corr=corr-log") && line.contains("vol=") && line.contains("bytes"),
            "{line}"
        );
    }
    assert!(!log.contains("PRIVATE KEY"));
}
