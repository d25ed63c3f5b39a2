//! `DELETE /api/v1/cancel/{id}`: a running write is stopped and rolled back,
//! a queued job never starts, and the status codes follow the job's state.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn cancel_during_the_write_stops_it_and_removes_the_volume() {
    let h = Harness::start("cancel-write", &[]);
    // 1 GiB of non-zero data in a sub-MiB download: the download is quick
    // and qemu-img then spends seconds writing (about 3 s here), which is
    // when we cancel.
    let image = h.image_dir().join("slow-write.qcow2");
    build_slow_write_qcow2(&image, 1);
    let volume = h.daemon.volume("vm-cancel");

    let id = h.api.submit(&h.request("slow-write.qcow2", "vm-cancel", 1, "qcow2"));
    // Wait until qemu-img has reported written bytes: the write is under
    // way, not merely about to start.
    let writing = h.api.wait_until(&id, JOB_TIMEOUT, "bytes written", |s| {
        s["status"] == "running"
            && s["progress"]["stage"] == "converting"
            && s["progress"]["bytes_processed"].as_u64() > Some(0)
            || is_final(s)
    });
    assert_eq!(writing["status"], "running", "job ended before it could be cancelled: {writing:#}");
    assert!(volume.exists(), "the job has created its volume before writing it");

    let reply = h.api.cancel(&id);
    assert_eq!(reply.status, 204, "{reply:#?}");
    assert!(reply.text.is_empty(), "204 has no body: {:?}", reply.text);

    let last = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(last["status"], "cancelled", "{last:#}");
    assert_eq!(last["progress"]["stage"], "converting", "it stopped in the write stage: {last:#}");
    assert!(last["progress"]["percent"].as_u64().unwrap() < 100, "{last:#}");
    assert!(!volume.exists(), "the volume this job created must be removed");
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new());
    let left = processes_using(&volume);
    assert!(left.is_empty(), "processes still using the volume after cancel: {left:?}");
}

#[test]
fn cancel_answers_by_job_state_and_a_cancelled_queued_job_never_runs() {
    // One worker, so a second job waits in the queue behind the first.
    let h = Harness::start("cancel-rules", &["--workers", "1"]);
    let img = build_fs_image(h.image_dir(), "base", 7);
    let slow_name = img.qcow2_name();
    // ~4 MB at 64 KiB per 100 ms: several seconds, so the job is caught
    // while downloading.
    h.images.set_slow(&slow_name, Slow { chunk: 64 * 1024, delay: Duration::from_millis(100) });

    let mut a = h.request(&slow_name, "vm-a", 1, "qcow2");
    a["correlation_id"] = json!("corr-a");
    let a = h.api.submit(&a);
    h.api.wait_until(&a, JOB_TIMEOUT, "bytes downloaded", |s| {
        s["status"] == "running"
            && s["progress"]["stage"] == "downloading"
            && s["progress"]["bytes_processed"].as_u64() > Some(0)
    });

    // B waits in the queue: cancelling it is immediate.
    let b = h.api.submit(&h.request(&slow_name, "vm-b", 1, "qcow2"));
    let b_status = h.api.status(&b).body;
    assert_eq!(b_status["status"], "pending", "{b_status:#}");
    let reply = h.api.cancel(&b);
    assert_eq!(reply.status, 204, "cancel of a pending job: {reply:#?}");
    let b_status = h.api.status(&b).body;
    assert_eq!(b_status["status"], "cancelled", "a pending job is cancelled at once: {b_status:#}");

    // A is running: 204, then it ends cancelled with nothing left behind.
    let reply = h.api.cancel(&a);
    assert_eq!(reply.status, 204, "cancel of a running job: {reply:#?}");
    let a_final = h.api.wait_final(&a, JOB_TIMEOUT);
    assert_eq!(a_final["status"], "cancelled", "{a_final:#}");
    assert_eq!(a_final["progress"]["stage"], "downloading", "{a_final:#}");
    assert_eq!(
        cache_files(&h.daemon.cache_dir),
        Vec::<String>::new(),
        "a cancelled download leaves no .part file and no entry"
    );

    // A job queued after B runs to completion, so the worker has passed B.
    build_tiny_qcow2(&h.image_dir().join("small.qcow2"));
    let mut c = h.request("small.qcow2", "vm-c", 1, "qcow2");
    c["correlation_id"] = json!("corr-c");
    let c = h.api.submit(&c);
    assert_eq!(h.api.wait_final(&c, JOB_TIMEOUT)["status"], "completed");
    let b_status = h.api.status(&b).body;
    assert_eq!(b_status["status"], "cancelled", "{b_status:#}");
    assert_eq!(b_status["started_at"], Value::Null, "a cancelled queued job never starts");
    assert!(!h.daemon.volume("vm-a").exists() && !h.daemon.volume("vm-b").exists());

    // Finished jobs (cancelled or completed) cannot be cancelled: 409.
    for (id, corr, state) in [(&a, "corr-a", "cancelled"), (&c, "corr-c", "completed")] {
        let reply = h.api.cancel(id);
        let details = reply.expect_error(409, "job_finished");
        assert!(details.contains(state), "409 details name the state {state}: {details}");
        assert_eq!(reply.body["correlation_id"], corr, "{reply:#?}");
    }
    assert_eq!(h.api.status(&c).body["status"], "completed", "a refused cancel changes nothing");

    let unknown = uuid::Uuid::new_v4().to_string();
    let reply = h.api.cancel(&unknown);
    let details = reply.expect_error(404, "not_found");
    assert!(details.contains(&unknown), "{details}");

    let reply = h.api.cancel("not-a-uuid");
    let details = reply.expect_error(400, "invalid_request");
    assert!(details.contains("not-a-uuid") && details.contains("UUID"), "{details}");
}

/// Jobs for the same image share one download. Cancelling the job that
/// runs it must not fail the one waiting for it: that one takes over.
#[test]
fn cancelling_the_job_that_downloads_does_not_fail_the_job_waiting_for_it() {
    let h = Harness::start("cancel-leader", &[]);
    let img = build_fs_image(h.image_dir(), "base", 41);
    let name = img.qcow2_name();
    // ~4 MB at 256 KiB per 100 ms: about 1.6 s per download.
    h.images.set_slow(&name, Slow { chunk: 256 * 1024, delay: Duration::from_millis(100) });

    let leader = h.api.submit(&h.request(&name, "vm-leader", 1, "qcow2"));
    h.api.wait_until(&leader, JOB_TIMEOUT, "bytes downloaded", |s| {
        s["progress"]["bytes_processed"].as_u64() > Some(0)
    });
    let follower = h.api.submit(&h.request(&name, "vm-follower", 1, "qcow2"));
    // A waiting job shows the progress of the download it waits for.
    h.api.wait_until(&follower, JOB_TIMEOUT, "the follower waiting", |s| {
        s["progress"]["stage"] == "downloading"
            && s["progress"]["bytes_processed"].as_u64() > Some(0)
    });
    assert_eq!(h.images.gets(&name), 1, "the second job waits for the first one's download");

    assert_eq!(h.api.cancel(&leader).status, 204);
    assert_eq!(h.api.wait_final(&leader, JOB_TIMEOUT)["status"], "cancelled");
    let last = h.api.wait_final(&follower, JOB_TIMEOUT);
    assert_eq!(last["status"], "completed", "{last:#}");
    assert_volume_holds(&h.daemon.volume("vm-follower"), &img.raw, GIB);
    assert!(!h.daemon.volume("vm-leader").exists());
    let cache = cache_files(&h.daemon.cache_dir);
    assert_eq!(cache, vec![format!("{}.img", sha256_file(&img.qcow2))], "no .part left: {cache:?}");
}
