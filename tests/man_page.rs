//! The man page renders without a single warning. (That every flag in
//! src/cli.rs is documented in it is checked by a unit test there.)

use std::process::Command;

#[test]
fn man_page_renders_without_warnings() {
    let page = concat!(env!("CARGO_MANIFEST_DIR"), "/man/libvirt-volume-provisioner.8");
    let out = match Command::new("man").args(["--warnings", "-E", "UTF-8", "-l", page]).output() {
        Ok(out) => out,
        Err(e) => {
            assert!(std::env::var("CI").is_err(), "man missing in CI: .ci/run installs man-db");
            eprintln!("skipping man_page_renders_without_warnings: cannot run man ({e})");
            return;
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "man failed: {stderr}");
    assert!(stderr.trim().is_empty(), "man page warnings:\n{stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    for section in ["SYNOPSIS", "OPTIONS", "API", "FILES", "EXIT STATUS", "SIGNALS", "EXAMPLES"] {
        assert!(text.contains(section), "the page lacks a {section} section");
    }
}
