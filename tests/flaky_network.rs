//! Image servers that misbehave the way real ones do: a connection that
//! drops mid-body, a server without range support, 500s that pass, and a
//! server that stops sending. A download that can finish must finish,
//! resuming where it can, and end in exactly one sound cache entry; one
//! that cannot must fail in bounded time and leave nothing behind.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the first GET is cut: past the first read buffer, at an odd
/// offset, so that a resume from the wrong byte shows in the digest.
const CUT_AT: u64 = MIB + 12_345;

/// Asserts the job completed from a fresh download of `image`, the cache
/// holds exactly one entry, named by and holding `image`'s digest, and the
/// volume holds the disk `raw`.
#[track_caller]
fn assert_completed_with_one_entry(h: &Harness, status: &Value, img: &FsImage, volume: &str) {
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_eq!(status["cache_hit"], false, "{status:#}");
    let digest = sha256_file(&img.qcow2);
    assert_eq!(status["image_sha256"], digest.as_str(), "{status:#}");
    let cache = cache_files(&h.daemon.cache_dir);
    assert_eq!(cache, vec![format!("{digest}.img")], "one entry and no .part file");
    assert_eq!(sha256_file(&h.daemon.cache_dir.join(&cache[0])), digest, "the entry is sound");
    assert_volume_holds(&h.daemon.volume(volume), &img.raw, GIB);
}

#[test]
fn dropped_connection_is_resumed_with_range_and_if_range() {
    let h = Harness::start("drop-resume", &["--retry-delay", "0"]);
    let img = build_fs_image(h.image_dir(), "base", 21);
    let name = img.qcow2_name();
    assert!(std::fs::metadata(&img.qcow2).unwrap().len() > 2 * CUT_AT, "the cut is mid-body");
    h.images.drop_first_after(&name, CUT_AT);

    let id = h.api.submit(&h.request(&name, "vm-resume", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_completed_with_one_entry(&h, &status, &img, "vm-resume");

    let gets = h.images.get_log(&name);
    assert_eq!(gets.len(), 2, "one cut GET and one resume: {gets:#?}");
    assert_eq!((gets[0].status, gets[0].range.as_deref()), (200, None), "{gets:#?}");
    let range = format!("bytes={CUT_AT}-");
    assert_eq!(gets[1].range.as_deref(), Some(range.as_str()), "resumes at the cut: {gets:#?}");
    let etag = h.images.etag(&name);
    assert_eq!(gets[1].if_range.as_deref(), Some(etag.as_str()), "pinned to the ETag: {gets:#?}");
    assert_eq!(gets[1].status, 206, "the server sent only the rest: {gets:#?}");
}

#[test]
fn server_that_ignores_range_is_downloaded_again_from_the_start() {
    let h = Harness::start("drop-no-range", &["--retry-delay", "0"]);
    let img = build_fs_image(h.image_dir(), "base", 22);
    let name = img.qcow2_name();
    h.images.drop_first_after(&name, CUT_AT);
    h.images.ignore_range(&name);

    let id = h.api.submit(&h.request(&name, "vm-restart", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    // Appending the whole object to the part already downloaded would
    // give a wrong digest and fail the job: completing proves it started over.
    assert_completed_with_one_entry(&h, &status, &img, "vm-restart");

    let gets = h.images.get_log(&name);
    assert_eq!(gets.len(), 2, "{gets:#?}");
    assert!(gets[1].range.is_some(), "the daemon asked for the rest: {gets:#?}");
    assert_eq!(gets[1].status, 200, "and got the whole object: {gets:#?}");
}

#[test]
fn server_errors_that_pass_are_retried() {
    let h = Harness::start("retry-500", &["--retry-delay", "0"]);
    let img = build_fs_image(h.image_dir(), "base", 23);
    let name = img.qcow2_name();
    h.images.fail_first(&name, 2);

    let id = h.api.submit(&h.request(&name, "vm-500", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_completed_with_one_entry(&h, &status, &img, "vm-500");
    let statuses: Vec<u16> = h.images.get_log(&name).iter().map(|g| g.status).collect();
    assert_eq!(statuses, [500, 500, 200]);
}

#[test]
fn server_errors_that_persist_fail_the_job_after_the_retries() {
    let h = Harness::start("retry-500-forever", &["--retry-delay", "0", "--download-retries", "2"]);
    let img = build_fs_image(h.image_dir(), "base", 24);
    let name = img.qcow2_name();
    h.images.fail_first(&name, usize::MAX);

    let id = h.api.submit(&h.request(&name, "vm-500", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap();
    assert!(error.starts_with("downloading:") && error.contains("500"), "{error}");
    assert_eq!(h.images.gets(&name), 3, "the first try and two retries");
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new(), "nothing cached");
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new(), "no volume");
}

#[test]
fn stalled_server_is_retried_then_fails_in_bounded_time() {
    let h = Harness::start(
        "stall-retries",
        &["--download-timeout", "1", "--download-retries", "2", "--retry-delay", "0"],
    );
    let img = build_fs_image(h.image_dir(), "base", 25);
    let name = img.qcow2_name();
    // The head arrives, then not one byte of the body, ever.
    h.images.stall(&name);

    let started = Instant::now();
    let id = h.api.submit(&h.request(&name, "vm-stall", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    let took = started.elapsed();
    assert_eq!(status["status"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap();
    assert!(error.starts_with("downloading:"), "{error}");
    assert!(error.contains(&name) && error.contains("timeout"), "names URL and timeout: {error}");
    let gets = h.images.get_log(&name);
    assert_eq!(gets.len(), 3, "the first try and two retries: {gets:#?}");
    assert!(gets.iter().all(|g| g.range.is_none()), "nothing to resume from: {gets:#?}");
    // Three stalls of the 1 s limit each, no more.
    assert!(took >= Duration::from_secs(3), "each try waited out the limit: {took:?}");
    assert!(took < Duration::from_secs(10), "failed in bounded time, took {took:?}");
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new(), "no .part left");
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new(), "no volume");
}

#[test]
fn server_without_content_length_is_read_to_the_end() {
    let h = Harness::start("no-length", &[]);
    let img = build_fs_image(h.image_dir(), "base", 24);
    let name = img.qcow2_name();
    h.images.omit_length(&name);

    let id = h.api.submit(&h.request(&name, "vm-no-length", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_completed_with_one_entry(&h, &status, &img, "vm-no-length");
    assert_eq!(h.images.gets(&name), 1, "{:#?}", h.images.get_log(&name));
}

#[test]
fn redirects_are_followed_up_to_a_bound_and_a_longer_chain_fails() {
    let h = Harness::start("redirects", &["--retry-delay", "0"]);
    let img = build_fs_image(h.image_dir(), "base", 25);
    let name = img.qcow2_name();
    let request = |url: String, volume: &str| {
        let mut body = h.request(&name, volume, 1, "qcow2");
        body["image_url"] = url.into();
        body
    };

    let id = h.api.submit(&request(h.images.redirecting_url(&name, 3), "vm-three-hops"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_completed_with_one_entry(&h, &status, &img, "vm-three-hops");

    // A chain longer than any object store needs: the job fails, naming
    // the cause, and neither a volume nor a second cache entry appears.
    let long = format!("longer-{name}");
    std::fs::copy(&img.qcow2, h.image_dir().join(&long)).unwrap();
    std::fs::write(h.image_dir().join(format!("{long}.sha256")), "0".repeat(64)).unwrap();
    let id = h.api.submit(&request(h.images.redirecting_url(&long, 20), "vm-many-hops"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.to_lowercase().contains("redirect"), "names the redirects: {status:#}");
    assert_eq!(h.images.gets(&long), 0, "the end of the chain was never reached");
    assert!(!h.daemon.volume("vm-many-hops").exists(), "no volume for a failed download");
    assert_eq!(cache_files(&h.daemon.cache_dir).len(), 1, "only the first image is cached");
}
