//! Jobs that must fail, and what they must leave behind: nothing in the
//! cache that looks like an entry, no `.part` file, no volume, and an error
//! that names the stage and the cause.

mod common;

use std::fs;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Asserts the job failed in `stage` with an error containing every one of
/// `words`; returns the error.
#[track_caller]
fn assert_failed(status: &Value, stage: &str, words: &[&str]) -> String {
    assert_eq!(status["status"], "failed", "{status:#}");
    assert_eq!(status["progress"]["stage"], stage, "failed in the wrong stage: {status:#}");
    let error = status["error"].as_str().expect("a failed job has an error").to_string();
    assert!(error.starts_with(&format!("{stage}:")), "error names the stage: {error}");
    for w in words {
        assert!(error.contains(w), "error should mention {w:?}: {error}");
    }
    error
}

#[test]
fn wrong_digest_fails_the_job_and_caches_nothing() {
    let h = Harness::start("wrong-digest", &[]);
    let img = build_fs_image(h.image_dir(), "base", 11);
    let real = sha256_file(&img.qcow2);
    let wrong = "0123456789abcdef".repeat(4);

    // 1. The caller's image_sha256 does not match the bytes served.
    let mut body = h.request(&img.qcow2_name(), "vm-digest", 1, "qcow2");
    body["image_sha256"] = Value::from(wrong.clone());
    let id = h.api.submit(&body);
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    let error = assert_failed(&status, "downloading", &["digest mismatch", &wrong, &real]);
    assert_eq!(h.images.gets(&img.qcow2_name()), 1, "the image was downloaded: {error}");
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new());
    assert!(!h.daemon.volume("vm-digest").exists());

    // 2. The published sidecar does not match (a corrupted upload).
    let other = h.image_dir().join("tampered.qcow2");
    fs::copy(&img.qcow2, &other).unwrap();
    fs::write(h.image_dir().join("tampered.qcow2.sha256"), format!("{wrong}  tampered.qcow2\n"))
        .unwrap();
    let id = h.api.submit(&h.request("tampered.qcow2", "vm-tampered", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "downloading", &["digest mismatch", &wrong]);
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new());
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new(), "no volume was created");
    // A bad source is the caller's to fix: a warning, not an operator alert.
    assert_eq!(job_failure_level(&h.daemon.log_text(), &id), "WARN");
}

/// The level of the daemon's "job failed" line for job `id`.
fn job_failure_level(log: &str, id: &str) -> &'static str {
    let line = log
        .lines()
        .find(|l| l.contains(id) && l.contains("job failed after"))
        .unwrap_or_else(|| panic!("no job failed line for {id} in\n{log}"));
    ["ERROR", "WARN", "INFO"].into_iter().find(|lvl| line.contains(lvl)).unwrap_or("?")
}

#[test]
fn missing_image_fails_with_the_404() {
    let h = Harness::start("image-404", &[]);
    let id = h.api.submit(&h.request("no-such-image.qcow2", "vm-404", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "downloading", &["404", "no-such-image.qcow2"]);
    assert_eq!(h.images.gets("no-such-image.qcow2"), 1);
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new());
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new());
}

#[test]
fn image_larger_than_the_volume_fails_at_inspecting_before_any_volume_exists() {
    let h = Harness::start("too-large", &[]);
    let big = h.image_dir().join("big.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&big).arg("2G"));
    write_sidecar(&big);

    let id = h.api.submit(&h.request("big.qcow2", "vm-small", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "inspecting", &["virtual size", &(2 * GIB).to_string()]);
    assert!(!h.daemon.volume("vm-small").exists(), "no volume for a refused image");
    assert_eq!(status["volume_path"], Value::Null, "the volume stage was never reached");

    // The limit is inclusive: the same image fits a 2 GiB volume.
    let id = h.api.submit(&h.request("big.qcow2", "vm-fits", 2, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
}

#[test]
fn backing_file_pointing_at_a_host_file_is_refused() {
    let h = Harness::start("backing-file", &[]);
    // A "host secret" outside anything the daemon serves or owns.
    let pattern = b"HOST-SECRET-7f3a9c-DO-NOT-LEAK!\n";
    let secret = h.dir.mkdir("host").join("secret.raw");
    fs::write(&secret, pattern.repeat((MIB as usize) / pattern.len())).unwrap();

    let evil = h.image_dir().join("evil.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&secret)
        .arg(&evil));
    write_sidecar(&evil);

    let id = h.api.submit(&h.request("evil.qcow2", "vm-evil", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "inspecting", &["backing file", &secret.display().to_string()]);
    assert!(!h.daemon.volume("vm-evil").exists());

    let mut leaked = Vec::new();
    for name in list_dir(&h.daemon.volume_dir) {
        let p = h.daemon.volume_dir.join(&name);
        if p.is_file() && file_contains(&p, pattern) {
            leaked.push(name);
        }
    }
    assert!(leaked.is_empty(), "host file content leaked into {leaked:?}");
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new());
}

#[test]
fn symlink_in_the_volume_dir_is_refused_and_its_target_untouched() {
    let h = Harness::start("symlink", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let target = h.dir.mkdir("host").join("important.raw");
    let content = pseudo_random(MIB as usize, 51);
    fs::write(&target, &content).unwrap();
    fs::create_dir_all(&h.daemon.volume_dir).unwrap();
    std::os::unix::fs::symlink(&target, h.daemon.volume("vm-link")).unwrap();

    let id = h.api.submit(&h.request("tiny.qcow2", "vm-link", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "creating_volume", &["symbolic link"]);
    assert!(fs::read(&target).unwrap() == content, "the link's target must not change");
    assert!(fs::symlink_metadata(h.daemon.volume("vm-link")).unwrap().file_type().is_symlink());
}

#[test]
fn hard_link_in_the_volume_dir_is_refused_and_its_other_name_untouched() {
    let h = Harness::start("hardlink", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let target = h.dir.mkdir("host").join("important.raw");
    let content = pseudo_random(MIB as usize, 52);
    fs::write(&target, &content).unwrap();
    fs::create_dir_all(&h.daemon.volume_dir).unwrap();
    fs::hard_link(&target, h.daemon.volume("vm-hard")).unwrap();

    let id = h.api.submit(&h.request("tiny.qcow2", "vm-hard", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "creating_volume", &["hard links"]);
    assert!(fs::read(&target).unwrap() == content, "the file's other name must not change");
    assert!(h.daemon.volume("vm-hard").exists(), "a file the job did not create stays");
}

#[test]
fn open_volume_is_never_overwritten() {
    let h = Harness::start("open-volume", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let volume = h.daemon.volume("vm-running");
    fs::create_dir_all(&h.daemon.volume_dir).unwrap();
    let marker = b"DATA OF A RUNNING VM";
    {
        let f = fs::File::create(&volume).unwrap();
        f.set_len(GIB).unwrap();
    }
    fs::OpenOptions::new()
        .write(true)
        .open(&volume)
        .map(|mut f| {
            std::io::Write::write_all(&mut f, marker).unwrap();
        })
        .unwrap();

    // A process (standing in for qemu) holds the volume open.
    let held = fs::File::open(&volume).unwrap();
    let id = h.api.submit(&h.request("tiny.qcow2", "vm-running", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "creating_volume", &["is open"]);
    assert!(volume.exists(), "a volume the job did not create is never removed");
    let mut head = vec![0u8; marker.len()];
    std::io::Read::read_exact(&mut fs::File::open(&volume).unwrap(), &mut head).unwrap();
    assert_eq!(head, marker, "the open volume was written");

    // Once it is closed, the volume is reused and written.
    drop(held);
    let id = h.api.submit(&h.request("tiny.qcow2", "vm-running", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_volume_holds(&volume, &qcow2_to_raw(&h.image_dir().join("tiny.qcow2")), GIB);
}

#[test]
fn write_failure_removes_the_volume_the_job_created() {
    let h = Harness::start("write-failure", &[]);
    // Sound tables, damaged data: fails in qemu-img convert, after the
    // volume exists (a truncated image is refused earlier, at inspecting).
    let cut = h.image_dir().join("cut.qcow2");
    build_bad_data_qcow2(&cut);
    write_sidecar(&cut);

    let id = h.api.submit(&h.request("cut.qcow2", "vm-cut", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "converting", &["qemu-img", "removed"]);
    assert!(!h.daemon.volume("vm-cut").exists(), "the half-written volume must be removed");
    // A failed write is the host's business: an error for the operator.
    assert_eq!(job_failure_level(&h.daemon.log_text(), &id), "ERROR");
}

#[test]
fn stalled_download_fails_after_the_download_timeout() {
    // Retries off: each retry would wait out the limit again.
    let h = Harness::start("stalled", &["--download-timeout", "1", "--download-retries", "0"]);
    let img = build_fs_image(h.image_dir(), "base", 13);
    // A server that sends nothing for 5 s: five times the limit.
    h.images.set_slow(&img.qcow2_name(), Slow { chunk: 64 * 1024, delay: Duration::from_secs(5) });

    let started = std::time::Instant::now();
    let id = h.api.submit(&h.request(&img.qcow2_name(), "vm-stalled", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed(&status, "downloading", &[&img.qcow2_name(), "timeout"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed after the 1 s limit, not the 5 s stall"
    );
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new());
    assert!(!h.daemon.volume("vm-stalled").exists());
}

/// A raw image is written into the volume it creates while it downloads
/// (its digest is known only at the end): a mismatch must remove that
/// volume with the rest, so unverified bytes never outlive the job.
#[test]
fn raw_digest_mismatch_removes_the_volume_it_was_streamed_into() {
    let h = Harness::start("raw-mismatch", &[]);
    let img = build_fs_image(h.image_dir(), "base", 17);
    let wrong = "fedcba9876543210".repeat(4);
    let mut body = h.request(&img.raw_name(), "vm-raw-mismatch", 1, "raw");
    body["image_sha256"] = Value::from(wrong.clone());

    let id = h.api.submit(&body);
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    let error = assert_failed(&status, "downloading", &["digest mismatch", &wrong]);
    assert!(
        h.daemon.log_text().contains("into the new volume while downloading"),
        "the image was not streamed into the volume, so this test proves nothing"
    );
    assert!(error.contains("the volume this job created was removed"), "{error}");
    assert!(!h.daemon.volume("vm-raw-mismatch").exists(), "the streamed-into volume is left");
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new());
    assert_eq!(cache_files(&h.daemon.cache_dir), Vec::<String>::new());
}

/// The other half of the rule: a volume that existed before the job is
/// never written before the digest is known, so a mismatch leaves its
/// content exactly as it was.
#[test]
fn raw_digest_mismatch_leaves_a_reused_volume_as_it_was() {
    let h = Harness::start("raw-mismatch-reuse", &[]);
    let img = build_fs_image(h.image_dir(), "base", 19);
    let volume = h.daemon.volume("vm-raw-kept");
    fs::create_dir_all(&h.daemon.volume_dir).unwrap();
    let content = pseudo_random(4 * MIB as usize, 23);
    {
        let f = fs::File::create(&volume).unwrap();
        f.set_len(GIB).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &content, 0).unwrap();
    }
    let before = sha256_file(&volume);
    let mut body = h.request(&img.raw_name(), "vm-raw-kept", 1, "raw");
    body["image_sha256"] = Value::from("00".repeat(32));

    let id = h.api.submit(&body);
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    // The error says the volume was not written, so no operator re-images
    // a disk that is as it was.
    assert_failed(&status, "downloading", &["digest mismatch", "left in place, not written"]);
    assert!(
        !h.daemon.log_text().contains("while downloading"),
        "a reused volume was streamed into"
    );
    assert!(volume.exists(), "a volume the job did not create is never removed");
    assert_eq!(sha256_file(&volume), before, "the reused volume was written");
}
