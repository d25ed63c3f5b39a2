//! `--direct-io`: volumes are written with O_DIRECT, past the host's page
//! cache, and hold the same bytes as without it.
//!
//! The daemon runs under `strace -f -y` tracing `openat`: with the flag,
//! each volume is opened for writing with O_DIRECT (by qemu-img, which
//! writes both formats then); without it, never. Ignoring the flag, or
//! streaming a raw image through the page cache anyway, fails the test.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of `trace` that open `volume` for writing with O_DIRECT.
fn direct_opens<'a>(trace: &'a str, volume: &str) -> Vec<&'a str> {
    let quoted = format!("\"{volume}\"");
    trace
        .lines()
        .filter(|l| l.contains("openat(") && l.contains(&quoted))
        .filter(|l| l.contains("O_DIRECT") && (l.contains("O_WRONLY") || l.contains("O_RDWR")))
        .collect()
}

/// A 1 GiB volume file that a previous tenant left data in, at its start
/// and at its end (where a backup GPT would be).
fn stale_volume(path: &std::path::Path) {
    let f = File::create(path).unwrap();
    f.set_len(GIB).unwrap();
    f.write_all_at(&[0xAA; 4096], 0).unwrap();
    f.write_all_at(&[0xAA; 4096], GIB - 4096).unwrap();
}

/// Runs a raw job and a qcow2 job into new volumes and a qcow2 job into a
/// stale reused one; returns the trace and the volume paths.
fn provision_three(name: &str, extra: &[&str]) -> (String, Vec<std::path::PathBuf>) {
    let dir = TestDir::new(name);
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    let img = build_fs_image(images.root(), "base", 41);
    fs::create_dir_all(dir.join("volumes")).unwrap();
    stale_volume(&dir.join("volumes").join("vm-reused"));
    let traced = Traced::start(&dir, &pki, "openat,execve", extra);
    let api = Api::mtls(&traced.daemon, &pki);
    let jobs = [
        (img.raw_name(), "vm-raw", "raw"),
        (img.qcow2_name(), "vm-qcow2", "qcow2"),
        (img.qcow2_name(), "vm-reused", "qcow2"),
    ];
    let mut volumes = Vec::new();
    for (image, volume, kind) in &jobs {
        let id = api.submit(&serde_json::json!({
            "image_url": images.url(image),
            "volume_name": volume,
            "volume_size_gb": 1,
            "image_type": kind,
        }));
        let status = api.wait_final(&id, JOB_TIMEOUT);
        assert_eq!(status["status"], "completed", "{volume}: {status:#}");
        let path = traced.daemon.volume(volume);
        // Every volume holds the disk, and zeros after it: the reused
        // one's stale bytes at both ends are gone.
        assert_volume_holds(&path, &img.raw, GIB);
        volumes.push(path.canonicalize().unwrap());
    }
    (traced.finish(), volumes)
}

#[test]
fn direct_io_writes_every_volume_with_o_direct_and_the_same_bytes() {
    if !have_strace("direct_io_writes_every_volume_with_o_direct_and_the_same_bytes") {
        return;
    }
    let (trace, volumes) = provision_three("direct-io", &["--direct-io"]);
    assert!(trace.contains("O_DIRECT"), "the trace is complete");
    let children = traced_children(&trace);
    for volume in &volumes {
        let shown = volume.display().to_string();
        let opens = direct_opens(&trace, &shown);
        assert!(!opens.is_empty(), "{shown} was never opened with O_DIRECT for writing");
        for line in opens {
            let pid = line.split_whitespace().next().unwrap_or_default();
            assert!(children.contains(pid), "qemu-img writes it, not the daemon: {line}");
        }
    }
}

#[test]
fn without_the_flag_no_volume_is_opened_with_o_direct() {
    if !have_strace("without_the_flag_no_volume_is_opened_with_o_direct") {
        return;
    }
    let (trace, volumes) = provision_three("buffered-io", &[]);
    for volume in &volumes {
        let shown = volume.display().to_string();
        assert!(trace.contains(&shown), "the trace shows {shown} at all");
        let opens = direct_opens(&trace, &shown);
        assert!(opens.is_empty(), "{shown} opened with O_DIRECT without the flag: {opens:#?}");
    }
}
