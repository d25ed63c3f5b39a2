//! `--cache-max-gb`: past the limit, the least recently used entries are
//! evicted after a download, but never one that a pending or running job
//! needs, and no more than it takes to get under the limit.

mod common;

use std::fs::File;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets a cache entry's last use (eviction reads it from the mtime).
fn set_last_use(entry: &Path, ago: Duration) {
    let f = File::options().write(true).open(entry).unwrap();
    f.set_modified(SystemTime::now() - ago).unwrap();
}

#[test]
fn least_recently_used_entry_no_job_needs_is_evicted_and_the_others_stay() {
    let h = Harness::start("evict", &["--cache-max-gb", "1", "--workers", "1"]);
    let cache = h.daemon.cache_dir.clone();
    let hour = Duration::from_secs(3600);
    let image = |name: &str, pattern: u8| {
        let path = h.image_dir().join(name);
        build_filled_qcow2(&path, 4 * MIB, pattern);
        format!("{}.img", sha256_file(&path))
    };
    let reused = image("reused.qcow2", 0x11);
    let fresh = image("fresh.qcow2", 0x22);
    image("blocker.qcow2", 0x33);

    // `reused`: downloaded long ago, then used again just now.
    let id = h.api.submit(&h.request("reused.qcow2", "vm-first", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
    set_last_use(&cache.join(&reused), 5 * hour);
    let id = h.api.submit(&h.request("reused.qcow2", "vm-again", 1, "qcow2"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!((&status["status"], &status["cache_hit"]), (&json!("completed"), &json!(true)));

    // Two 600 MiB entries from an earlier run. A daemon built for tests
    // hashes at some 25 MB/s, so downloading 1.2 GiB would take most of a
    // minute; sparse files of that length cost nothing, and eviction goes
    // by length. No job reads their bytes.
    let stale = format!("{}.img", "a".repeat(64));
    let needed_digest = "b".repeat(64);
    let needed = format!("{needed_digest}.img");
    for (name, ago) in [(&stale, 2 * hour), (&needed, 3 * hour)] {
        File::create(cache.join(name)).unwrap().set_len(600 * MIB).unwrap();
        set_last_use(&cache.join(name), ago);
    }

    // With one worker: `fresh` downloads slowly while `blocker` (which
    // never gets its image) and then `waiting` queue behind it, so that
    // `waiting`, which needs the oldest entry, is pending when `fresh`
    // lands and the cache goes over 1 GiB.
    h.images.set_slow("fresh.qcow2", Slow { chunk: 16 * 1024, delay: Duration::from_millis(100) });
    h.images.stall("blocker.qcow2");
    let fresh_job = h.api.submit(&h.request("fresh.qcow2", "vm-fresh", 1, "qcow2"));
    let blocker = h.api.submit(&h.request("blocker.qcow2", "vm-blocker", 1, "qcow2"));
    let waiting = h.api.submit(&with_field(
        h.request("elsewhere.qcow2", "vm-waiting", 1, "qcow2"),
        "image_sha256",
        json!(needed_digest),
    ));
    assert_eq!(h.api.status(&waiting).body["status"], "pending");
    let status = h.api.wait_final(&fresh_job, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_eq!(h.api.status(&waiting).body["status"], "pending", "still needs its entry");

    let mut want = vec![fresh.clone(), needed.clone(), reused.clone()];
    want.sort();
    // (The stalled blocker has a .part file, which is not an entry.)
    let entries: Vec<String> =
        cache_files(&cache).into_iter().filter(|n| n.ends_with(".img")).collect();
    assert_eq!(
        entries, want,
        "the stale entry is evicted; the older one a pending job needs, the recently \
         reused one and the new one stay"
    );

    for id in [&waiting, &blocker] {
        assert_eq!(h.api.cancel(id).status, 204);
    }
    assert_eq!(h.api.status(&waiting).body["status"], "cancelled");
}

/// Provisions `image` into `volume` and returns the final status.
fn provision(h: &Harness, image: &str, volume: &str) -> serde_json::Value {
    let id = h.api.submit(&h.request(image, volume, 1, "qcow2"));
    h.api.wait_final(&id, JOB_TIMEOUT)
}

#[test]
fn truncated_entry_is_never_used_and_the_image_is_fetched_again() {
    let h = Harness::start("trust-size", &[]);
    let img = build_fs_image(h.image_dir(), "base", 81);
    let name = img.qcow2_name();
    let entry = h.daemon.cache_dir.join(format!("{}.img", sha256_file(&img.qcow2)));
    assert_eq!(provision(&h, &name, "vm-one")["status"], "completed");

    // As a full disk or a careless operator might leave it.
    let len = std::fs::metadata(&entry).unwrap().len();
    File::options().write(true).open(&entry).unwrap().set_len(len / 2).unwrap();

    let status = provision(&h, &name, "vm-two");
    assert_eq!((&status["status"], &status["cache_hit"]), (&json!("completed"), &json!(false)));
    assert_eq!(h.images.gets(&name), 2, "the damaged entry sent the job back to the source");
    assert_volume_holds(&h.daemon.volume("vm-two"), &img.raw, GIB);
    assert_eq!(sha256_file(&entry), sha256_file(&img.qcow2), "the entry is whole again");
}

#[test]
fn verify_cache_catches_an_entry_changed_in_place() {
    let h = Harness::start("trust-digest", &["--verify-cache"]);
    let img = build_fs_image(h.image_dir(), "base", 82);
    let name = img.qcow2_name();
    let entry = h.daemon.cache_dir.join(format!("{}.img", sha256_file(&img.qcow2)));
    assert_eq!(provision(&h, &name, "vm-one")["status"], "completed");

    // Same length, one byte changed: only the digest can tell.
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entry, &bytes).unwrap();

    let status = provision(&h, &name, "vm-two");
    assert_eq!((&status["status"], &status["cache_hit"]), (&json!("completed"), &json!(false)));
    assert_eq!(h.images.gets(&name), 2, "the changed entry sent the job back to the source");
    assert_volume_holds(&h.daemon.volume("vm-two"), &img.raw, GIB);
    assert!(h.daemon.log_text().contains("damaged"), "the operator is told");
}
