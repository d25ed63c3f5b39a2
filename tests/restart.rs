//! A daemon restart (an upgrade, a crash, a host reboot) in the middle of
//! the work. DESIGN.md makes this a fixed decision: job transitions go to a
//! journal in the state directory, so that after a restart `status` still
//! answers for old jobs and an interrupted job is marked failed with what
//! it half did undone.

mod common;

use std::time::Duration;

use common::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn kill9_during_the_write_keeps_job_status_and_undoes_the_interrupted_job() {
    let mut h = Harness::start("restart", &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    build_slow_write_qcow2(&h.image_dir().join("slow-write.qcow2"), 1);

    let done = h.api.submit(&h.request("tiny.qcow2", "vm-done", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&done, JOB_TIMEOUT)["status"], "completed");
    let busy = h.api.submit(&h.request("slow-write.qcow2", "vm-busy", 1, "qcow2"));
    h.api.wait_until(&busy, JOB_TIMEOUT, "bytes written", |s| {
        s["progress"]["stage"] == "converting"
            && s["progress"]["bytes_processed"].as_u64() > Some(0)
    });

    h.daemon.kill9();
    h.daemon = Daemon::start(&h.dir, &h.pki, &Auth::mtls(), &[]);
    h.api = Api::mtls(&h.daemon, &h.pki);

    let reply = h.api.status(&done);
    assert_eq!(reply.status, 200, "a finished job is still known after a restart: {reply:#?}");
    assert_eq!(reply.body["status"], "completed");
    let reply = h.api.status(&busy);
    assert_eq!(reply.status, 200, "an interrupted job is still known after a restart: {reply:#?}");
    assert_eq!(reply.body["status"], "failed", "an interrupted job is marked failed: {reply:#?}");
    let error = reply.body["error"].as_str().unwrap_or_default();
    assert!(error.contains("daemon restarted"), "the error says why: {error}");
    assert!(error.contains("removed"), "the error says what was undone: {error}");
    assert!(!h.daemon.volume("vm-busy").exists(), "the half-written volume it created is removed");
    assert!(h.daemon.volume("vm-done").exists());
}
