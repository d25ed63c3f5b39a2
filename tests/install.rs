//! `scripts/install.sh` into a scratch root (`--root`): every file where it
//! belongs with its mode, a second run that changes nothing and leaves an
//! edited options file alone, and `--uninstall` that keeps the operator's
//! options, state and configuration. The unit is checked with
//! `systemd-analyze verify` when that is installed.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const NAME: &str = "libvirt-volume-provisioner";

/// `install.sh ARGS` installing the binary Cargo built for this test run.
fn install_sh(args: &[&str]) -> Command {
    let mut cmd = Command::new(script("install.sh"));
    cmd.args(args).env("LVP_BINARY", BIN);
    cmd
}

/// Runs install.sh and returns its stdout, panicking with everything on a
/// failure.
fn install(args: &[&str]) -> String {
    String::from_utf8(run(&mut install_sh(args)).stdout).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode()
        & 0o7777
}

#[track_caller]
fn assert_file(path: &Path, want_mode: u32, same_as: &Path) {
    assert!(path.is_file(), "{} was not installed", path.display());
    assert_eq!(mode(path), want_mode, "mode of {}", path.display());
    assert!(
        fs::read(path).unwrap() == fs::read(same_as).unwrap(),
        "{} differs from {}",
        path.display(),
        same_as.display()
    );
}

/// Where install.sh puts each thing under `root` with the default prefix.
struct Layout {
    bin: PathBuf,
    man: PathBuf,
    unit: PathBuf,
    opts: PathBuf,
    dist: PathBuf,
    state: PathBuf,
    config: PathBuf,
}

impl Layout {
    fn new(root: &Path) -> Layout {
        Layout {
            bin: root.join(format!("usr/local/bin/{NAME}")),
            man: root.join(format!("usr/local/share/man/man8/{NAME}.8")),
            unit: root.join(format!("etc/systemd/system/{NAME}.service")),
            opts: root.join(format!("etc/default/{NAME}")),
            dist: root.join(format!("etc/default/{NAME}.dist")),
            state: root.join(format!("var/lib/{NAME}")),
            config: root.join(format!("etc/{NAME}")),
        }
    }
}

/// (inode, mtime in ns) of a file, to tell whether a run rewrote it.
fn stamp(path: &Path) -> (u64, i128) {
    let m = fs::metadata(path).unwrap();
    (m.ino(), m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128)
}

#[test]
fn install_is_idempotent_keeps_edited_options_and_uninstalls_cleanly() {
    let dir = TestDir::new("install");
    let root = dir.join("root");
    let root_arg = root.display().to_string();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let at = Layout::new(&root);

    // First run: everything appears, with its mode.
    let out = install(&["--root", &root_arg, "--no-build"]);
    assert_file(&at.bin, 0o755, Path::new(BIN));
    assert_file(&at.man, 0o644, &repo.join(format!("man/{NAME}.8")));
    assert_file(&at.unit, 0o644, &script(&format!("{NAME}.service")));
    assert_file(&at.opts, 0o644, &script(&format!("{NAME}.default")));
    assert!(!at.dist.exists(), "no .dist beside a freshly installed options file");
    for d in [&at.state, &at.config] {
        assert!(d.is_dir(), "{} was not created", d.display());
        assert_eq!(mode(d), 0o750, "mode of {}", d.display());
    }
    // Not the live system: no systemctl, and the next steps are printed.
    assert!(out.contains("next steps:") && out.contains("systemctl daemon-reload"), "{out}");
    assert!(!out.contains("ran        systemctl"), "{out}");
    verify_unit(&dir, &at);

    // The operator edits the options; a second run rewrites nothing, keeps
    // the edit and puts the new example beside it.
    let edited = format!(
        "{}LVP_OPTS=\"--backend dir --volume-dir /srv/vols\"\n",
        fs::read_to_string(&at.opts).unwrap()
    );
    fs::write(&at.opts, &edited).unwrap();
    let before: Vec<_> = [&at.bin, &at.man, &at.unit, &at.opts].map(|p| stamp(p)).into();
    let out = install(&["--root", &root_arg, "--no-build"]);
    let after: Vec<_> = [&at.bin, &at.man, &at.unit, &at.opts].map(|p| stamp(p)).into();
    assert_eq!(before, after, "the second run rewrote a file it need not:\n{out}");
    assert_eq!(fs::read_to_string(&at.opts).unwrap(), edited, "the edited options changed");
    assert_file(&at.dist, 0o644, &script(&format!("{NAME}.default")));
    assert!(out.contains("not overwritten"), "{out}");
    for p in [&at.bin, &at.man, &at.unit] {
        assert!(out.contains(&format!("unchanged  {}", p.display())), "{out}");
    }

    // A third run has nothing at all to do.
    let dist_before = stamp(&at.dist);
    let out = install(&["--root", &root_arg, "--no-build"]);
    assert!(out.contains("nothing to change"), "{out}");
    assert_eq!(stamp(&at.dist), dist_before);

    // An existing directory keeps the mode its owner gave it.
    fs::set_permissions(&at.config, fs::Permissions::from_mode(0o700)).unwrap();
    install(&["--root", &root_arg, "--no-build"]);
    assert_eq!(mode(&at.config), 0o700);

    // Uninstall: our files go, the operator's stay, and it says so.
    fs::write(at.config.join("server.key"), "not really a key\n").unwrap();
    fs::write(at.state.join("journal"), "{}\n").unwrap();
    let out = install(&["--root", &root_arg, "--uninstall"]);
    for p in [&at.bin, &at.man, &at.unit, &at.dist] {
        assert!(!p.exists(), "{} is still there after --uninstall", p.display());
    }
    assert_eq!(fs::read_to_string(&at.opts).unwrap(), edited, "--uninstall touched the options");
    assert!(at.config.join("server.key").is_file() && at.state.join("journal").is_file());
    for kept in [&at.opts, &at.state, &at.config] {
        assert!(out.contains(&format!("kept       {}", kept.display())), "{out}");
    }
    // And again: nothing left to remove is not an error.
    let out = install(&["--root", &root_arg, "--uninstall"]);
    assert!(out.contains(&format!("absent     {}", at.bin.display())), "{out}");
}

#[test]
fn prefix_moves_the_binary_and_the_units_exec_start() {
    let dir = TestDir::new("install-prefix");
    let root = dir.join("root");
    // A trailing slash on --root must not matter.
    let root_arg = format!("{}/", root.display());
    install(&["--root", &root_arg, "--prefix", "/opt/lvp", "--no-build"]);
    let bin = root.join(format!("opt/lvp/bin/{NAME}"));
    assert_file(&bin, 0o755, Path::new(BIN));
    assert!(root.join(format!("opt/lvp/share/man/man8/{NAME}.8")).is_file());
    let unit = fs::read_to_string(root.join(format!("etc/systemd/system/{NAME}.service"))).unwrap();
    assert!(
        unit.lines().any(|l| l == format!("ExecStart=/opt/lvp/bin/{NAME} serve $LVP_OPTS")),
        "ExecStart= not moved to the prefix:\n{unit}"
    );
    assert!(!unit.contains("/usr/local/bin"), "{unit}");
    install(&["--root", &root_arg, "--prefix", "/opt/lvp", "--uninstall"]);
    assert!(!bin.exists());
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [&["--bogus"][..], &["--prefix", "relative/dir"], &["--root"]] {
        let out = run_any(&mut install_sh(args));
        assert_eq!(out.status.code(), Some(2), "install.sh {args:?}:\n{}", output_text(&out));
        assert!(!out.stderr.is_empty(), "install.sh {args:?} says nothing");
    }
}

/// Runs `systemd-analyze verify` on the installed unit, pointed at the
/// installed binary and options file (it checks that ExecStart= exists and
/// that Documentation= names a man page it can find).
fn verify_unit(dir: &TestDir, at: &Layout) {
    if !have_command("systemd-analyze") {
        assert!(std::env::var_os("CI").is_none(), "systemd-analyze is missing (CI is set)");
        eprintln!("skipping systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let unit = fs::read_to_string(&at.unit).unwrap();
    let exec = format!("ExecStart=/usr/local/bin/{NAME} ");
    let env = format!("EnvironmentFile=/etc/default/{NAME}");
    assert!(unit.contains(&exec) && unit.contains(&env), "{unit}");
    let local = unit
        .replace(&exec, &format!("ExecStart={} ", at.bin.display()))
        .replace(&env, &format!("EnvironmentFile={}", at.opts.display()));
    let check = dir.mkdir("verify").join(format!("{NAME}.service"));
    fs::write(&check, local).unwrap();
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify");
    if have_command("man") {
        cmd.env("MANPATH", at.man.parent().unwrap().parent().unwrap());
    } else {
        cmd.arg("--man=no");
    }
    let out = run_any(cmd.arg(&check));
    assert!(out.status.success(), "systemd-analyze verify failed:\n{}", output_text(&out));
    // verify exits 0 on some warnings; it must have printed none.
    assert!(out.stderr.is_empty() && out.stdout.is_empty(), "{}", output_text(&out));
}
