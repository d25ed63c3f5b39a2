//! End to end on the `dir` backend: a provisioned volume holds exactly the
//! image's disk, the status says so, and a second job for the same image is
//! served from the cache without downloading it again.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The fields of a completed job that do not depend on the image type.
#[track_caller]
fn assert_completed(h: &Harness, status: &Value, id: &str, volume: &str) {
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_eq!(status["job_id"], id);
    assert!(status.get("error").is_none(), "a completed job has no error: {status:#}");
    assert_eq!(status["progress"]["percent"], 100, "{status:#}");
    assert_eq!(status["progress"]["stage"], "finalizing", "{status:#}");
    assert_eq!(status["volume_name"], volume);

    let volume_path = status["volume_path"].as_str().expect("volume_path is set");
    assert_eq!(
        Path::new(volume_path).canonicalize().unwrap(),
        h.daemon.volume(volume).canonicalize().unwrap(),
        "volume_path names the volume file"
    );

    let image_path = Path::new(status["image_path"].as_str().expect("image_path is set"));
    assert!(image_path.is_file(), "image_path {} must exist", image_path.display());
    assert_eq!(
        image_path.parent().unwrap().canonicalize().unwrap(),
        h.daemon.cache_dir.canonicalize().unwrap(),
        "image_path must be in the cache dir"
    );
    for stamp in ["created_at", "started_at", "finished_at"] {
        assert!(status[stamp].is_string(), "{stamp} is set: {status:#}");
    }
}

/// What a poller saw: stages in pipeline order and a percent that never
/// goes backwards.
#[track_caller]
fn assert_progress_moves_forward(seen: &[Value]) {
    const ORDER: &[&str] = &[
        "queued",
        "downloading",
        "inspecting",
        "creating_volume",
        "converting",
        "copying",
        "finalizing",
    ];
    let rank = |p: &Value| {
        let stage = p["stage"].as_str().unwrap();
        ORDER.iter().position(|s| *s == stage).unwrap_or_else(|| panic!("unknown stage {stage}"))
    };
    for pair in seen.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(rank(a) <= rank(b), "stage went backwards: {a} then {b}");
        assert!(
            a["percent"].as_u64() <= b["percent"].as_u64(),
            "percent went backwards: {a} then {b}"
        );
    }
}

#[test]
fn qcow2_volume_holds_the_image_disk_and_zeros_after_it() {
    let h = Harness::start("qcow2-content", &[]);
    let img = build_fs_image(h.image_dir(), "base", 1);
    let digest = sha256_file(&img.qcow2);

    let mut body = h.request(&img.qcow2_name(), "vm-qcow2", 1, "qcow2");
    body["correlation_id"] = json!("provision-vm-001");
    let reply = h.api.provision(&body);
    assert_eq!(reply.status, 202, "{reply:#?}");
    let id = reply.body["job_id"].as_str().unwrap().to_string();
    uuid::Uuid::parse_str(&id).expect("job_id is a UUID");

    let mut seen = Vec::new();
    let status = h.api.wait_until(&id, JOB_TIMEOUT, "a final status", |s| {
        seen.push(s["progress"].clone());
        is_final(s)
    });
    assert_completed(&h, &status, &id, "vm-qcow2");
    assert_progress_moves_forward(&seen);
    assert_eq!(status["correlation_id"], "provision-vm-001");
    assert_eq!(status["cache_hit"], false);
    assert_eq!(status["image_type"], "qcow2");
    assert_eq!(status["image_sha256"], digest.as_str());
    // Progress at the end covers the whole disk, as in the usage examples.
    assert_eq!(
        status["progress"]["bytes_processed"], status["progress"]["bytes_total"],
        "{status:#}"
    );
    assert_eq!(status["progress"]["bytes_total"], 64 * MIB, "{status:#}");
    // The cache keeps the image as downloaded (still compressed qcow2),
    // under its digest.
    let cached = Path::new(status["image_path"].as_str().unwrap());
    assert_eq!(cached.file_name().unwrap().to_string_lossy(), format!("{digest}.img"));
    assert_eq!(sha256_file(cached), digest);

    assert_volume_holds(&h.daemon.volume("vm-qcow2"), &img.raw, GIB);
}

#[test]
fn raw_volume_holds_the_image_disk_and_zeros_after_it() {
    let h = Harness::start("raw-content", &[]);
    let img = build_fs_image(h.image_dir(), "base", 2);

    // No correlation_id: the job id stands in for it.
    let id = h.api.submit(&h.request(&img.raw_name(), "vm-raw", 1, "raw"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_completed(&h, &status, &id, "vm-raw");
    assert_eq!(status["correlation_id"], id.as_str(), "correlation_id defaults to the job id");
    assert_eq!(status["image_type"], "raw");
    assert_eq!(status["cache_hit"], false);

    assert_volume_holds(&h.daemon.volume("vm-raw"), &img.raw, GIB);
}

#[test]
fn second_job_for_the_same_image_is_a_cache_hit_without_download() {
    let h = Harness::start("cache-hit", &[]);
    let img = build_fs_image(h.image_dir(), "base", 3);
    let name = img.qcow2_name();

    let first = h.api.submit(&h.request(&name, "vm-a", 1, "qcow2"));
    let first = h.api.wait_final(&first, JOB_TIMEOUT);
    assert_eq!(first["status"], "completed", "{first:#}");
    assert_eq!(first["cache_hit"], false);
    assert_eq!(h.images.gets(&name), 1);

    let second = h.api.submit(&h.request(&name, "vm-b", 1, "qcow2"));
    let second = h.api.wait_final(&second, JOB_TIMEOUT);
    assert_eq!(second["status"], "completed", "{second:#}");
    assert_eq!(second["cache_hit"], true, "{second:#}");
    assert_eq!(second["image_path"], first["image_path"], "both jobs use one cache entry");
    assert_eq!(h.images.gets(&name), 1, "the image must be downloaded exactly once");
    assert!(h.images.gets(&format!("{name}.sha256")) >= 1, "the digest comes from the sidecar");

    // One entry in the cache, no leftovers, and both volumes hold the disk.
    let cache = cache_files(&h.daemon.cache_dir);
    assert_eq!(cache, vec![format!("{}.img", sha256_file(&img.qcow2))], "cache dir: {cache:?}");
    assert_volume_holds(&h.daemon.volume("vm-a"), &img.raw, GIB);
    assert_volume_holds(&h.daemon.volume("vm-b"), &img.raw, GIB);
}

#[test]
fn concurrent_jobs_for_the_same_image_share_one_download() {
    let h = Harness::start("shared-download", &[]);
    let img = build_fs_image(h.image_dir(), "base", 4);
    let name = img.qcow2_name();
    // Slow enough that the second job arrives mid-download (~1.6 s).
    h.images.set_slow(&name, Slow { chunk: 256 * 1024, delay: Duration::from_millis(100) });

    let a = h.api.submit(&h.request(&name, "vm-a", 1, "qcow2"));
    h.api.wait_until(&a, JOB_TIMEOUT, "bytes downloaded", |s| {
        s["progress"]["bytes_processed"].as_u64() > Some(0)
    });
    let b = h.api.submit(&h.request(&name, "vm-b", 1, "qcow2"));
    for id in [&a, &b] {
        let status = h.api.wait_final(id, JOB_TIMEOUT);
        assert_eq!(status["status"], "completed", "{status:#}");
        // Not a cache hit for either: the second job joined the download
        // while it ran, it did not find a finished entry.
        assert_eq!(status["cache_hit"], false, "{status:#}");
    }
    assert_eq!(h.images.gets(&name), 1, "two concurrent jobs, one download");
    assert_volume_holds(&h.daemon.volume("vm-a"), &img.raw, GIB);
    assert_volume_holds(&h.daemon.volume("vm-b"), &img.raw, GIB);
}

/// Reprovisioning a VM reuses its volume. Afterwards the volume must hold
/// the new image and nothing of its previous life: the guest can read every
/// block, and the previous content may be another tenant's data. The daemon
/// once wrote only the new image's length and left the old bytes after it.
#[test]
fn reprovisioned_volume_holds_only_the_new_image() {
    let h = Harness::start("reprovision", &[]);
    let old = h.image_dir().join("old.qcow2");
    build_filled_qcow2(&old, 64 * MIB, 0x5a);
    let new = h.image_dir().join("new.qcow2");
    build_filled_qcow2(&new, 16 * MIB, 0x11);
    let new_raw = qcow2_to_raw(&new);

    let first = h.api.submit(&h.request("old.qcow2", "vm-reprovision", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&first, JOB_TIMEOUT)["status"], "completed");
    let second = h.api.submit(&h.request("new.qcow2", "vm-reprovision", 1, "qcow2"));
    let status = h.api.wait_final(&second, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");

    assert_volume_holds(&h.daemon.volume("vm-reprovision"), &new_raw, GIB);
}
