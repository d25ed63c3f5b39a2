//! `completed` means durable: the daemon flushes the volume (fdatasync or
//! fsync on it) before it journals the job as completed, and so before any
//! status can say so.
//!
//! The real daemon runs under `strace -f -y`, which prints every flush
//! and every journal write with the path behind the descriptor, in the
//! order they happened. For each job the test finds the journal writes of
//! its entering `finalizing` (the image is written by then) and of its
//! `completed` record, and requires a finished flush of its volume between
//! the two, by a daemon thread (not by a qemu-img child, which might flush
//! on its own; the flush at the volume's creation does not count either). Removing the flush from `write::finish_volume`
//! makes it fail.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The trace line index where the flush of `volume` by a daemon thread
/// finished, or `None`. Understands strace's split lines
/// (`<unfinished ...>` then `<... fdatasync resumed>`).
fn volume_flushes(lines: &[&str], volume: &str, children: &HashSet<String>) -> Vec<usize> {
    let target = format!("<{volume}>");
    let mut pending: HashSet<String> = HashSet::new();
    let mut done = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let pid = line.split_whitespace().next().unwrap_or_default().to_string();
        if children.contains(&pid) {
            continue;
        }
        let is_flush = line.contains("fdatasync(") || line.contains(" fsync(");
        if is_flush && line.contains(&target) {
            if line.contains("<unfinished ...>") {
                pending.insert(pid);
            } else if line.trim_end().ends_with("= 0") {
                done.push(i);
            }
        } else if (line.contains("<... fdatasync resumed>") || line.contains("<... fsync resumed>"))
            && pending.remove(&pid)
            && line.trim_end().ends_with("= 0")
        {
            done.push(i);
        }
    }
    done
}

/// Runs one job per image type under strace and checks the order.
#[test]
fn volume_is_flushed_before_the_job_is_journaled_completed() {
    if !have_strace("volume_is_flushed_before_the_job_is_journaled_completed") {
        return;
    }
    let dir = TestDir::new("durable");
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    let img = build_fs_image(images.root(), "base", 31);
    let traced = Traced::start(&dir, &pki, "fdatasync,fsync,write,execve", &[]);
    let daemon = &traced.daemon;
    let api = Api::mtls(daemon, &pki);
    let request = |image: &str, volume: &str, kind: &str| {
        serde_json::json!({
            "image_url": images.url(image),
            "volume_name": volume,
            "volume_size_gb": 1,
            "image_type": kind,
        })
    };
    // raw: our own copy (here written while downloading); qcow2: qemu-img.
    let jobs =
        [(img.raw_name(), "vm-durable-raw", "raw"), (img.qcow2_name(), "vm-durable-q", "qcow2")];
    for (image, volume, kind) in &jobs {
        let id = api.submit(&request(image, volume, kind));
        let status = api.wait_final(&id, JOB_TIMEOUT);
        assert_eq!(status["status"], "completed", "{status:#}");
    }
    let text = traced.finish();
    let lines: Vec<&str> = text.lines().collect();
    let children = traced_children(&text);
    assert!(!children.is_empty(), "the trace shows no qemu-img run; is it complete?");
    for (_, volume, _) in &jobs {
        let path = dir.join("volumes").join(volume).canonicalize().unwrap();
        let path = path.display().to_string();
        let journal_write = |what: &str| {
            lines.iter().position(|l| {
                l.contains("jobs.journal>")
                    && l.contains("write(")
                    && l.contains(&format!("\\\"volume_name\\\":\\\"{volume}\\\""))
                    && l.contains(what)
            })
        };
        // The job enters `finalizing` once the image is written (qemu-img
        // has exited, the copy is done): a flush that counts comes after.
        let finalizing = journal_write("\\\"stage\\\":\\\"finalizing\\\"")
            .unwrap_or_else(|| panic!("no journal write of {volume} entering finalizing"));
        let completed = journal_write("\\\"status\\\":\\\"completed\\\"")
            .unwrap_or_else(|| panic!("no journal write of {volume}'s completed record"));
        let flushes = volume_flushes(&lines, &path, &children);
        assert!(
            flushes.iter().any(|&i| finalizing < i && i < completed),
            "{volume}: no flush of {path} by the daemon between the end of the write (line {}) \
             and the completed record (line {}); flushes at lines {flushes:?}",
            finalizing + 1,
            completed + 1
        );
    }
}
