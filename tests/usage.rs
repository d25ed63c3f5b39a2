//! The top-level command line as a new user meets it: `--version`, no
//! command at all, and a `--flag=value` that argh does not take.

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_libvirt-volume-provisioner");

fn lvp(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {BIN} {args:?}: {e}"))
}

fn text(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `--version` used to fail with "Unrecognized argument".
#[test]
fn version_prints_the_package_version_and_exits_0() {
    let out = lvp(&["--version"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, format!("libvirt-volume-provisioner {}\n", env!("CARGO_PKG_VERSION")));
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn no_command_is_a_usage_error_naming_the_commands() {
    let out = lvp(&[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("serve, token, check or client"), "{stderr}");
}

/// argh takes no `--flag=value`; its bare "Unrecognized argument:
/// --backend=dir" left the user to guess why.
#[test]
fn a_flag_written_with_equals_gets_a_hint() {
    let out = lvp(&["serve", "--backend=dir"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Unrecognized argument: --backend=dir"), "{stderr}");
    assert!(stderr.contains("hint: write `--backend dir`, not `--backend=dir`"), "{stderr}");
}
