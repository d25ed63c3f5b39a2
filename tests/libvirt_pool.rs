//! `--libvirt-pool`: after a volume is created or removed the daemon runs
//! `virsh pool-refresh`, so `virsh vol-list` shows what is there. Tested
//! with the real virsh against libvirt's built-in `test:///default` driver
//! (no libvirtd needed), whose `default-pool` exists in every connection.

mod common;

use std::os::unix::fs::symlink;
use std::process::Command;
use std::time::Duration;

use common::*;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn have_virsh() -> bool {
    Command::new("virsh").arg("--version").output().is_ok_and(|o| o.status.success())
}

#[test]
fn pool_is_refreshed_after_create_and_remove_and_silence_is_announced() {
    if !have_virsh() {
        // CI installs libvirt-clients (.ci/run); a bare machine may not.
        assert!(
            std::env::var("CI").is_err(),
            "virsh missing in CI: .ci/run must install libvirt-clients"
        );
        eprintln!(
            "skipping pool_is_refreshed_after_create_and_remove_and_silence_is_announced: no virsh"
        );
        return;
    }
    // The daemon inherits this: virsh then talks to the test driver.
    std::env::set_var("LIBVIRT_DEFAULT_URI", "test:///default");

    let h = Harness::start("libvirt-pool", &["--libvirt-pool", "default-pool"]);
    let img = build_fs_image(h.image_dir(), "base", 31);
    let id = h.api.submit(&h.request(&img.qcow2_name(), "vm-pool", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
    // A job that creates its volume and then fails removes it again.
    let cut = h.image_dir().join("cut.qcow2");
    build_bad_data_qcow2(&cut);
    write_sidecar(&cut);
    let id = h.api.submit(&h.request("cut.qcow2", "vm-cut", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "failed");

    let log = h.daemon.log_text();
    assert!(log.contains("libvirt pool default-pool is refreshed after volumes change"), "{log}");
    let created = log.matches("refreshed libvirt pool default-pool after creating").count();
    let removed = log.matches("refreshed libvirt pool default-pool after removing").count();
    assert_eq!((created, removed), (2, 1), "{log}");

    // Without the flag, the daemon says once that it does not refresh.
    let quiet = Harness::start("libvirt-no-pool", &[]);
    assert!(quiet.daemon.log_text().contains("no --libvirt-pool"), "{}", quiet.daemon.log_text());

    // With the flag but no virsh on PATH, it says so at start and works on.
    let bin = quiet.dir.mkdir("bin-without-virsh");
    let qemu_img =
        String::from_utf8(run(Command::new("sh").args(["-c", "command -v qemu-img"])).stdout)
            .unwrap();
    symlink(qemu_img.trim(), bin.join("qemu-img")).unwrap();
    let path = std::env::var("PATH").unwrap();
    std::env::set_var("PATH", bin.display().to_string());
    let blind = Harness::start("libvirt-no-virsh", &["--libvirt-pool", "default-pool"]);
    std::env::set_var("PATH", path);
    let log = blind.daemon.log_text();
    assert!(log.contains("--libvirt-pool default-pool: virsh not found"), "{log}");
}
