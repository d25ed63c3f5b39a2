//! A daemon restart (an upgrade, a crash, a host reboot) in the middle of
//! the work. DESIGN.md makes this a fixed decision: job transitions go to a
//! journal in the state directory, so that after a restart `status` still
//! answers for old jobs and an interrupted job is marked failed with what
//! it half did undone. SIGTERM drains: running jobs get a grace period to
//! finish, then are cancelled and rolled back.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until no process mentions `volume` on its command line: a
/// qemu-img orphaned by a killed daemon must not go on writing.
#[track_caller]
fn assert_nothing_writes(volume: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_using(volume);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes still using {}: {left:?}", volume.display());
        thread::sleep(Duration::from_millis(50));
    }
}

/// The cache entry names for these image files, sorted as `cache_files`.
fn entries(images: &[&Path]) -> Vec<String> {
    let mut names: Vec<String> = images.iter().map(|p| format!("{}.img", sha256_file(p))).collect();
    names.sort();
    names
}

#[track_caller]
fn wait_writing(h: &Harness, id: &str) -> Value {
    let s = h.api.wait_until(id, JOB_TIMEOUT, "bytes written", |s| {
        s["progress"]["stage"] == "converting"
            && s["progress"]["bytes_processed"].as_u64() > Some(0)
            || is_final(s)
    });
    assert_eq!(s["status"], "running", "the job ended before the test could interrupt it: {s:#}");
    s
}

#[test]
fn kill9_during_the_download_fails_the_job_and_the_next_one_downloads_afresh() {
    let mut h = Harness::start("kill9-download", &[]);
    let tiny = h.image_dir().join("tiny.qcow2");
    build_tiny_qcow2(&tiny);
    let img = build_fs_image(h.image_dir(), "base", 61);
    let name = img.qcow2_name();
    // ~4 MB at 64 KiB per 100 ms: seconds, so the kill lands mid-download.
    h.images.set_slow(&name, Slow { chunk: 64 * 1024, delay: Duration::from_millis(100) });

    let done = h.api.submit(&h.request("tiny.qcow2", "vm-done", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&done, JOB_TIMEOUT)["status"], "completed");
    let busy = h.api.submit(&h.request(&name, "vm-busy", 1, "qcow2"));
    h.api.wait_until(&busy, JOB_TIMEOUT, "bytes downloaded", |s| {
        s["progress"]["stage"] == "downloading"
            && s["progress"]["bytes_processed"].as_u64() > Some(0)
    });
    let parts: Vec<String> =
        cache_files(&h.daemon.cache_dir).into_iter().filter(|n| n.ends_with(".part")).collect();
    assert_eq!(parts.len(), 1, "the download is under way in a .part file: {parts:?}");

    h.daemon.kill9();
    h.restart(&[]);

    let reply = h.api.status(&done);
    assert_eq!(reply.status, 200, "a finished job is still known after a restart: {reply:#?}");
    assert_eq!(reply.body["status"], "completed");
    let reply = h.api.status(&busy);
    assert_eq!(reply.status, 200, "an interrupted job is still known after a restart: {reply:#?}");
    assert_eq!(reply.body["status"], "failed", "an interrupted job is marked failed: {reply:#?}");
    let error = reply.body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("downloading:"), "the error names the stage: {error}");
    assert!(error.contains("daemon restarted"), "the error says why: {error}");
    assert!(error.contains("partial download"), "the error says what was undone: {error}");
    assert_eq!(
        cache_files(&h.daemon.cache_dir),
        entries(&[&tiny]),
        "the partial download is gone and did not become an entry"
    );
    assert_eq!(list_dir(&h.daemon.volume_dir), ["vm-done"], "the interrupted job made no volume");

    // The volume is free again, and the image comes down whole.
    h.images.serve_normally(&name);
    let again = h.api.submit(&h.request(&name, "vm-busy", 1, "qcow2"));
    let last = h.api.wait_final(&again, JOB_TIMEOUT);
    assert_eq!(last["status"], "completed", "{last:#}");
    assert_eq!(last["cache_hit"], false, "{last:#}");
    assert_eq!(h.images.gets(&name), 2, "downloaded afresh");
    assert_volume_holds(&h.daemon.volume("vm-busy"), &img.raw, GIB);
    assert_eq!(cache_files(&h.daemon.cache_dir), entries(&[&tiny, &img.qcow2]));
}

#[test]
fn kill9_during_the_write_keeps_job_status_and_undoes_the_interrupted_job() {
    let mut h = Harness::start("kill9-write", &[]);
    let tiny = h.image_dir().join("tiny.qcow2");
    build_tiny_qcow2(&tiny);
    let slow = h.image_dir().join("slow-write.qcow2");
    build_slow_write_qcow2(&slow, 1);
    let volume = h.daemon.volume("vm-busy");

    let done = h.api.submit(&h.request("tiny.qcow2", "vm-done", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&done, JOB_TIMEOUT)["status"], "completed");
    let busy = h.api.submit(&h.request("slow-write.qcow2", "vm-busy", 1, "qcow2"));
    wait_writing(&h, &busy);
    assert!(volume.exists(), "the job has created its volume");

    h.daemon.kill9();
    h.restart(&[]);

    let reply = h.api.status(&done);
    assert_eq!(reply.status, 200, "a finished job is still known after a restart: {reply:#?}");
    assert_eq!(reply.body["status"], "completed");
    let reply = h.api.status(&busy);
    assert_eq!(reply.status, 200, "an interrupted job is still known after a restart: {reply:#?}");
    assert_eq!(reply.body["status"], "failed", "an interrupted job is marked failed: {reply:#?}");
    let error = reply.body["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("converting:"), "the error names the stage: {error}");
    assert!(error.contains("daemon restarted"), "the error says why: {error}");
    assert!(error.contains("removed"), "the error says what was undone: {error}");
    assert!(!volume.exists(), "the half-written volume it created is removed");
    assert!(h.daemon.volume("vm-done").exists());
    assert_nothing_writes(&volume);
    // The download had finished before the write: its entry is sound and
    // stays; there is no .part file.
    assert_eq!(cache_files(&h.daemon.cache_dir), entries(&[&tiny, &slow]));

    let again = h.api.submit(&h.request("slow-write.qcow2", "vm-busy", 1, "qcow2"));
    let last = h.api.wait_final(&again, JOB_TIMEOUT);
    assert_eq!(last["status"], "completed", "{last:#}");
    assert_eq!(last["cache_hit"], true, "the entry stored before the crash is used: {last:#}");
    assert_eq!(h.images.gets("slow-write.qcow2"), 1);
    assert_volume_holds_qcow2(&volume, &slow, GIB);
}

#[test]
fn sigterm_lets_a_running_job_finish_within_the_grace_period() {
    let mut h = Harness::start("drain-finish", &["--shutdown-grace", "30"]);
    let slow = h.image_dir().join("slow-write.qcow2");
    build_slow_write_qcow2(&slow, 1);

    let id = h.api.submit(&h.request("slow-write.qcow2", "vm-drain", 1, "qcow2"));
    wait_writing(&h, &id);
    let exit = h.daemon.stop_within(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0), "a drained daemon exits with status 0: {exit:?}");

    h.restart(&[]);
    let status = h.api.status(&id).body;
    assert_eq!(
        status["status"], "completed",
        "the job finished before the daemon exited: {status:#}"
    );
    assert!(status.get("error").is_none(), "{status:#}");
    assert_volume_holds_qcow2(&h.daemon.volume("vm-drain"), &slow, GIB);
}

#[test]
fn sigterm_without_grace_cancels_running_and_pending_jobs_and_rolls_back() {
    let mut h = Harness::start("drain-cancel", &["--shutdown-grace", "0", "--workers", "1"]);
    let slow = h.image_dir().join("slow-write.qcow2");
    build_slow_write_qcow2(&slow, 1);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let volume = h.daemon.volume("vm-running");

    let running = h.api.submit(&h.request("slow-write.qcow2", "vm-running", 1, "qcow2"));
    wait_writing(&h, &running);
    let pending = h.api.submit(&h.request("tiny.qcow2", "vm-pending", 1, "qcow2"));
    assert_eq!(h.api.status(&pending).body["status"], "pending", "one worker, and it is busy");
    assert!(volume.exists());

    let exit = h.daemon.stop();
    assert_eq!(exit.code(), Some(0), "a drained daemon exits with status 0: {exit:?}");
    assert!(!volume.exists(), "the cancelled job's volume is removed before the daemon exits");
    assert_nothing_writes(&volume);

    h.restart(&[]);
    let status = h.api.status(&running).body;
    assert_eq!(status["status"], "cancelled", "{status:#}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("converting:") && error.contains("removed"), "{error}");
    assert!(error.contains("shut down"), "the error blames the shutdown, not a caller: {error}");
    let status = h.api.status(&pending).body;
    assert_eq!(status["status"], "cancelled", "{status:#}");
    assert_eq!(status["started_at"], Value::Null, "a pending job never starts: {status:#}");
    assert!(status["error"].as_str().unwrap_or_default().contains("shut down"), "{status:#}");
    assert_eq!(list_dir(&h.daemon.volume_dir), Vec::<String>::new());
}

#[test]
fn second_daemon_on_the_same_state_dir_refuses_to_start() {
    let h = Harness::start("dir-locks", &[]);
    let args = Daemon::args(&h.dir, &h.pki, &Auth::mtls(), free_port());
    let (exit, stderr) = serve_expecting_exit(&args);
    assert_eq!(exit.code(), Some(3), "a runtime failure at start: {stderr}");
    assert!(stderr.contains("--state-dir"), "names the flag: {stderr}");
    assert!(stderr.contains(&h.daemon.state_dir.display().to_string()), "and the dir: {stderr}");

    // Its own state directory, but the same cache: refused too.
    let mut args = args;
    let at = args.iter().position(|a| a == "--state-dir").unwrap();
    args[at + 1] = h.dir.join("state-2").display().to_string();
    let (exit, stderr) = serve_expecting_exit(&args);
    assert_eq!(exit.code(), Some(3), "{stderr}");
    assert!(stderr.contains("--cache-dir"), "names the flag: {stderr}");

    // The first daemon is unharmed.
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let id = h.api.submit(&h.request("tiny.qcow2", "vm-first", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
}

#[test]
fn only_the_newest_finished_jobs_are_kept_across_a_restart() {
    let mut h = Harness::start("retention", &["--keep-jobs", "2"]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let ids: Vec<String> = (0..4)
        .map(|i| {
            let id = h.api.submit(&h.request("tiny.qcow2", &format!("vm-{i}"), 1, "qcow2"));
            assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
            id
        })
        .collect();

    let check = |h: &Harness, when: &str| {
        for old in &ids[..2] {
            let details = h.api.status(old).expect_error(404, "not_found");
            assert!(details.contains(old.as_str()), "{when}: {details}");
        }
        for new in &ids[2..] {
            let reply = h.api.status(new);
            assert_eq!(reply.status, 200, "{when}: the 2 newest are kept: {reply:#?}");
            assert_eq!(reply.body["status"], "completed", "{when}");
        }
    };
    check(&h, "before the restart");
    h.daemon.kill9();
    h.restart(&["--keep-jobs", "2"]);
    check(&h, "after the restart");
}
