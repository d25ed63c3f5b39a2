//! `Idempotency-Key`: a client that retries a provision (its connection
//! dropped before the answer, say) must get the job it already started,
//! not a second one, even across a daemon restart; the same key with
//! another request is a client bug and gets 409. `correlation_id` is only
//! a label: jobs may share it.

mod common;

use std::thread;
use std::time::Duration;

use common::*;
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[track_caller]
fn assert_replayed(reply: &Reply, id: &str) {
    assert_eq!(reply.status, 200, "a replay answers 200: {reply:#?}");
    assert_eq!(reply.body["job_id"], id, "a replay names the first job: {reply:#?}");
    let replayed = reply.headers.get("idempotent-replayed").and_then(|v| v.to_str().ok());
    assert_eq!(replayed, Some("true"), "{reply:#?}");
}

#[track_caller]
fn assert_conflict(reply: &Reply, key: &str, id: &str) {
    let details = reply.expect_error(409, "idempotency_conflict");
    assert!(details.contains(key) && details.contains(id), "names key and job: {details}");
}

#[test]
fn repeated_request_with_one_key_makes_one_job_even_after_a_restart() {
    let mut h = Harness::start("idempotency", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let key = "provision-vm-7-attempt";
    let api = Api::mtls(&h.daemon, &h.pki).with_header("Idempotency-Key", key);
    let body = h.request("tiny.qcow2", "vm-idem", 1, "qcow2");

    let first = api.provision(&body);
    assert_eq!(first.status, 202, "{first:#?}");
    assert!(first.headers.get("idempotent-replayed").is_none(), "{first:#?}");
    let id = first.body["job_id"].as_str().unwrap().to_string();
    assert_replayed(&api.provision(&body), &id);
    // The same request written differently is the same request.
    let pretty = serde_json::to_string_pretty(&json!({
        "volume_size_gb": 1,
        "image_type": "qcow2",
        "volume_name": "vm-idem",
        "image_url": h.images.url("tiny.qcow2"),
    }))
    .unwrap();
    assert_replayed(&api.provision_raw(pretty.as_bytes()), &id);
    // The same key with another request.
    let other = with_field(body.clone(), "volume_size_gb", json!(2));
    assert_conflict(&api.provision(&other), key, &id);

    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
    // Once the job has ended, a replay still names it and starts nothing.
    assert_replayed(&api.provision(&body), &id);
    assert_eq!(h.images.gets("tiny.qcow2"), 1, "one job ran");
    assert_eq!(list_dir(&h.daemon.volume_dir), ["vm-idem"]);

    h.daemon.kill9();
    h.restart(&[]);
    let api = Api::mtls(&h.daemon, &h.pki).with_header("Idempotency-Key", key);
    assert_replayed(&api.provision(&body), &id);
    assert_conflict(&api.provision(&other), key, &id);
    assert_eq!(h.api.status(&id).body["status"], "completed");
    assert_eq!(h.images.gets("tiny.qcow2"), 1, "still one job");
}

#[test]
fn concurrent_retries_with_one_key_make_one_job() {
    let h = Harness::start("idempotency-race", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let api = Api::mtls(&h.daemon, &h.pki).with_header("Idempotency-Key", "race-key");
    let body = h.request("tiny.qcow2", "vm-race", 1, "qcow2");

    let replies: Vec<Reply> = thread::scope(|s| {
        let tasks: Vec<_> = (0..8).map(|_| s.spawn(|| api.provision(&body))).collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let accepted: Vec<&Reply> = replies.iter().filter(|r| r.status == 202).collect();
    assert_eq!(accepted.len(), 1, "exactly one submission makes the job: {replies:#?}");
    let id = accepted[0].body["job_id"].as_str().unwrap();
    for r in replies.iter().filter(|r| r.status != 202) {
        assert_replayed(r, id);
    }
    assert_eq!(h.api.wait_final(id, JOB_TIMEOUT)["status"], "completed");
    assert_eq!(h.images.gets("tiny.qcow2"), 1);
}

#[test]
fn jobs_sharing_a_correlation_id_are_all_accepted() {
    let h = Harness::start("correlation-shared", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let ids: Vec<String> = ["vm-root", "vm-data"]
        .iter()
        .map(|volume| {
            let body = h.request("tiny.qcow2", volume, 1, "qcow2");
            h.api.submit(&with_field(body, "correlation_id", json!("terraform-apply-42")))
        })
        .collect();
    assert_ne!(ids[0], ids[1], "two jobs");
    for id in &ids {
        let status = h.api.wait_final(id, JOB_TIMEOUT);
        assert_eq!(status["status"], "completed", "{status:#}");
        assert_eq!(status["correlation_id"], "terraform-apply-42");
    }
    assert_eq!(list_dir(&h.daemon.volume_dir), ["vm-data", "vm-root"]);
}
