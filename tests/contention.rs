//! Many jobs at once: a fleet of VMs created from one new image must cost
//! one download, and two requests racing for one volume must never both
//! get it.

mod common;

use std::thread;
use std::time::Duration;

use common::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn twenty_concurrent_jobs_for_one_uncached_image_share_one_download() {
    let h = Harness::start("twenty", &["--workers", "20", "--queue", "64"]);
    let img = build_fs_image(h.image_dir(), "base", 71);
    let name = img.qcow2_name();
    // ~4 MB at 128 KiB per 100 ms: about 3 s, so every job starts while
    // the download runs.
    h.images.set_slow(&name, Slow { chunk: 128 * 1024, delay: Duration::from_millis(100) });

    let volumes: Vec<String> = (0..20).map(|i| format!("vm-fleet-{i:02}")).collect();
    let ids: Vec<String> = thread::scope(|s| {
        let tasks: Vec<_> = volumes
            .iter()
            .map(|v| s.spawn(|| h.api.submit(&h.request(&name, v, 1, "qcow2"))))
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });

    let digest = sha256_file(&img.qcow2);
    for (id, volume) in ids.iter().zip(&volumes) {
        let status = h.api.wait_final(id, JOB_TIMEOUT);
        assert_eq!(status["status"], "completed", "{status:#}");
        // No job found a finished entry: each one led or joined the one
        // download while it ran.
        assert_eq!(status["cache_hit"], false, "the jobs overlapped: {status:#}");
        assert_eq!(status["image_sha256"], digest.as_str(), "{status:#}");
        assert_volume_holds(&h.daemon.volume(volume), &img.raw, GIB);
    }
    assert_eq!(h.images.gets(&name), 1, "twenty jobs, one GET of the image");
    assert_eq!(cache_files(&h.daemon.cache_dir), [format!("{digest}.img")], "one entry, no .part");
    assert_eq!(list_dir(&h.daemon.volume_dir), volumes);
}

#[test]
fn racing_jobs_for_one_volume_get_one_acceptance_and_volume_busy() {
    let h = Harness::start("volume-race", &[]);
    let img = build_fs_image(h.image_dir(), "base", 72);
    let name = img.qcow2_name();
    // Slow enough that the accepted job is still active when the last
    // racer arrives.
    h.images.set_slow(&name, Slow { chunk: 256 * 1024, delay: Duration::from_millis(100) });

    let replies: Vec<Reply> = thread::scope(|s| {
        let tasks: Vec<_> = (0..10)
            .map(|_| s.spawn(|| h.api.provision(&h.request(&name, "vm-contended", 1, "qcow2"))))
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let accepted: Vec<&Reply> = replies.iter().filter(|r| r.status == 202).collect();
    assert_eq!(accepted.len(), 1, "exactly one job gets the volume: {replies:#?}");
    let id = accepted[0].body["job_id"].as_str().unwrap();
    for r in replies.iter().filter(|r| r.status != 202) {
        let details = r.expect_error(409, "volume_busy");
        assert!(details.contains("vm-contended") && details.contains(id), "{details}");
    }

    let status = h.api.wait_final(id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_volume_holds(&h.daemon.volume("vm-contended"), &img.raw, GIB);
    assert_eq!(h.images.gets(&name), 1, "only the accepted job downloaded");
}

#[test]
fn full_queue_answers_503_with_retry_after_and_loses_no_accepted_job() {
    let h = Harness::start("queue-full", &["--workers", "1", "--queue", "1"]);
    let img = build_fs_image(h.image_dir(), "base", 73);
    let name = img.qcow2_name();
    h.images.set_slow(&name, Slow { chunk: 256 * 1024, delay: Duration::from_millis(100) });

    let running = h.api.submit(&h.request(&name, "vm-running", 1, "qcow2"));
    h.api.wait_until(&running, Duration::from_secs(30), "running", |s| s["status"] == "running");
    let queued = h.api.submit(&h.request(&name, "vm-queued", 1, "qcow2"));

    let refused = h.api.provision(&h.request(&name, "vm-refused", 1, "qcow2"));
    let details = refused.expect_error(503, "queue_full");
    assert!(!details.is_empty());
    let retry_after = refused.headers.get("retry-after").expect("Retry-After on 503");
    assert!(retry_after.to_str().unwrap().parse::<u64>().unwrap() > 0, "{retry_after:?}");

    for (id, volume) in [(&running, "vm-running"), (&queued, "vm-queued")] {
        let status = h.api.wait_final(id, JOB_TIMEOUT);
        assert_eq!(status["status"], "completed", "{status:#}");
        assert_volume_holds(&h.daemon.volume(volume), &img.raw, GIB);
    }
    assert!(!h.daemon.volume("vm-refused").exists(), "a refused submission touches nothing");
}
