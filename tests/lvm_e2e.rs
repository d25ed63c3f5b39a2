//! The LVM backend end to end, against a real volume group. It runs only
//! where device-mapper exists and `LVP_TEST_VG` names a volume group the
//! test may create and remove logical volumes in; elsewhere it says why it
//! skipped. (The development machines and CI have no device-mapper; there
//! `scripts/lvm-vm-test.sh` runs the daemon against real LVM inside a qemu
//! VM, and src/volume/lvm.rs tests the real `lvs`/`vgs` output.)

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

/// Why this machine cannot run the test, if it cannot.
fn skip_reason() -> Option<String> {
    // The device node may exist while the kernel has no driver behind it;
    // the kernel lists the driver in /proc/misc when it has one.
    let misc = std::fs::read_to_string("/proc/misc").unwrap_or_default();
    if !misc.contains("device-mapper") {
        return Some("no device-mapper in this kernel (not in /proc/misc)".into());
    }
    match std::env::var("LVP_TEST_VG") {
        Ok(vg) if !vg.is_empty() => None,
        _ => Some("LVP_TEST_VG does not name a volume group to test in".into()),
    }
}

#[test]
fn lvm_volume_holds_the_image_and_carries_our_tags() {
    if let Some(reason) = skip_reason() {
        eprintln!(
            "skipping lvm_volume_holds_the_image_and_carries_our_tags: {reason}; \
             scripts/lvm-vm-test.sh covers the LVM backend in a VM instead"
        );
        return;
    }
    let vg = std::env::var("LVP_TEST_VG").unwrap();
    let dir = TestDir::new("lvm-e2e");
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    let image = build_fs_image(images.root(), "lvm", 7);
    let daemon = Daemon::start_with(&dir, &[], &|port| {
        let mut args = Daemon::args(&dir, &pki, &Auth::mtls(), port);
        let at = args.iter().position(|a| a == "--backend").unwrap();
        args.splice(
            at..at + 4,
            ["--backend".into(), "lvm".into(), "--volume-group".into(), vg.clone()],
        );
        args
    });
    let api = Api::mtls(&daemon, &pki);
    let lv = format!("lvp-e2e-{}", std::process::id());
    let body = serde_json::json!({
        "image_url": images.url(&image.qcow2_name()),
        "volume_name": lv,
        "volume_size_gb": 1,
        "image_type": "qcow2",
    });
    let id = api.submit(&body);
    let status = api.wait_final(&id, Duration::from_secs(120));
    assert_eq!(status["status"], "completed", "{status:#}");

    let device = format!("/dev/{vg}/{lv}");
    let disk = std::fs::read(&image.raw).unwrap();
    let mut held = vec![0u8; disk.len()];
    std::io::Read::read_exact(&mut std::fs::File::open(&device).unwrap(), &mut held).unwrap();
    assert!(held == disk, "the LV must start with the image's disk");

    let out =
        run(Command::new("lvs").args(["--noheadings", "-o", "lv_tags"]).arg(format!("{vg}/{lv}")));
    let tags = String::from_utf8_lossy(&out.stdout);
    assert!(tags.contains("libvirt-volume-provisioner"), "tags: {tags}");
    assert!(tags.contains(&format!("lvp-job-{id}")), "tags: {tags}");
    run(Command::new("lvremove").args(["--yes"]).arg(format!("{vg}/{lv}")));
}
