//! `scripts/fleet-provision.sh` against the real daemon: a fleet over
//! mutual TLS, a rerun that picks up the same jobs instead of writing the
//! volumes again, a fleet where one volume's image is missing, a fleet
//! over an API token that never shows on a command line, and a volume
//! that runs out of time and has its job cancelled.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// What the script needs besides the daemon.
fn missing_tools() -> Option<String> {
    let missing: Vec<&str> =
        ["curl", "jq", "qemu-img", "mkfs.ext4"].into_iter().filter(|t| !have_command(t)).collect();
    (!missing.is_empty()).then(|| format!("missing {}", missing.join(", ")))
}

macro_rules! skip_without_tools {
    ($test:literal) => {
        if let Some(reason) = missing_tools() {
            // .ci/run installs them: in CI a missing tool is a failure.
            assert!(std::env::var_os("CI").is_none(), "{}: {reason} (CI is set)", $test);
            eprintln!("skipping {}: {reason}", $test);
            return;
        }
    };
}

/// fleet-provision.sh with the daemon's URL and CA, over mutual TLS.
fn fleet_mtls(h: &Harness) -> Command {
    let mut cmd = fleet_base(h);
    cmd.arg("--cert").arg(&h.pki.client_cert).arg("--key").arg(&h.pki.client_key);
    cmd
}

fn fleet_base(h: &Harness) -> Command {
    let mut cmd = Command::new(script("fleet-provision.sh"));
    cmd.arg("--url").arg(h.daemon.base_url()).arg("--cacert").arg(&h.pki.ca_cert);
    cmd.env_remove("LVP_URL").stdin(Stdio::null());
    cmd
}

/// One row of the summary table.
#[derive(Debug)]
struct Row {
    job_id: String,
    status: String,
    cache_hit: String,
    error: String,
}

/// The summary table on stdout, by volume name.
fn summary(out: &Output) -> HashMap<String, Row> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("VOLUME "));
    let header = lines.next().unwrap_or_else(|| panic!("no summary:\n{}", output_text(out)));
    assert!(header.split_whitespace().eq([
        "VOLUME",
        "JOB_ID",
        "STATUS",
        "CACHE_HIT",
        "SECONDS",
        "ERROR"
    ]
    .into_iter()));
    let mut rows = HashMap::new();
    // Columns are padded with spaces; the error, last, may hold spaces too.
    // The table ends at the first line whose second column is no job id.
    for line in lines {
        let mut parts = line.split_whitespace();
        let (Some(volume), Some(job_id), Some(status), Some(cache_hit), Some(_secs)) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            break;
        };
        if !(job_id == "-" || job_id.len() == 36) {
            break;
        }
        let row = Row {
            job_id: job_id.into(),
            status: status.into(),
            cache_hit: cache_hit.into(),
            error: parts.collect::<Vec<_>>().join(" "),
        };
        rows.insert(volume.to_string(), row);
    }
    rows
}

/// Asserts a 1 GiB `volume` holds the disk `raw` and zeros after it:
/// byte by byte when `fully` (a few seconds per GiB in a debug build),
/// else by size and `qemu-img compare`, which checks the same thing from
/// the files' allocation maps in milliseconds.
#[track_caller]
fn assert_holds(volume: &Path, raw: &Path, fully: bool) {
    if fully {
        assert_volume_holds(volume, raw, GIB);
    } else {
        assert_eq!(fs::metadata(volume).unwrap().len(), GIB, "size of {}", volume.display());
        run(Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(raw)
            .arg(volume));
    }
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "expected exit {code}:\n{}", output_text(out));
}

#[test]
fn fleet_over_mutual_tls_completes_reruns_idempotently_and_reports_a_missing_image() {
    skip_without_tools!(
        "fleet_over_mutual_tls_completes_reruns_idempotently_and_reports_a_missing_image"
    );
    let h = Harness::start("fleet-mtls", &["--workers", "3"]);
    let image = build_fs_image(h.image_dir(), "fleet", 11);
    let url = h.images.url(&image.qcow2_name());
    let names: Vec<String> = (1..=5).map(|i| format!("vm-{i}")).collect();

    let fleet = || {
        let mut cmd = fleet_mtls(&h);
        cmd.args(["--image-url", &url, "--image-type", "qcow2", "--size-gb", "1"])
            .args(["--prefix", "vm", "--count", "5", "--parallel", "3", "--timeout", "60"])
            .args(["--correlation-prefix", "it-fleet"]);
        cmd
    };
    let started = Instant::now();
    let out = run_any(&mut fleet());
    eprintln!("fleet of 5: {:?}", started.elapsed());
    assert_exit(&out, 0);
    let rows = summary(&out);
    assert_eq!(rows.len(), 5, "{}", output_text(&out));
    for name in &names {
        let row = rows.get(name).unwrap_or_else(|| panic!("{name} not in:\n{}", output_text(&out)));
        assert_eq!((row.status.as_str(), row.error.as_str()), ("completed", "-"), "{row:?}");
        assert!(["true", "false"].contains(&row.cache_hit.as_str()), "{row:?}");
        // The daemon agrees, and knows the job by the script's correlation id.
        let status = h.api.status(&row.job_id).body;
        assert_eq!(status["status"], "completed");
        assert_eq!(status["volume_name"], name.as_str());
        assert_eq!(status["correlation_id"], format!("it-fleet-{name}"));
        assert_holds(&h.daemon.volume(name), &image.raw, name == "vm-1");
    }
    // One download for the whole fleet.
    assert_eq!(h.images.gets(&image.qcow2_name()), 1);
    assert!(String::from_utf8_lossy(&out.stdout).contains("all 5 volume(s) completed"));

    // The same command again: the same jobs answer, nothing is written.
    let stamps: Vec<_> = names
        .iter()
        .map(|n| fs::metadata(h.daemon.volume(n)).unwrap().modified().unwrap())
        .collect();
    let again = run_any(&mut fleet());
    assert_exit(&again, 0);
    let rows2 = summary(&again);
    for (name, stamp) in names.iter().zip(&stamps) {
        assert_eq!(rows2[name].job_id, rows[name].job_id, "{name} got a second job");
        assert_eq!(rows2[name].status, "completed");
        assert_eq!(fs::metadata(h.daemon.volume(name)).unwrap().modified().unwrap(), *stamp);
    }
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("started by an earlier run"), "{stderr}");

    // One volume names an image that does not exist: it fails, the others
    // complete, the exit status says so and the summary names it.
    let missing = h.images.url("missing.qcow2");
    let out = run_any(
        fleet_mtls(&h)
            .args(["--image-url", &url, "--size-gb", "1", "--parallel", "2"])
            .args(["--correlation-prefix", "it-mixed", "ok-1"])
            .arg(format!("bad-2={missing}"))
            .arg("ok-3"),
    );
    assert_exit(&out, 1);
    let rows = summary(&out);
    assert_eq!(rows.len(), 3, "{}", output_text(&out));
    assert_eq!(rows["ok-1"].status, "completed");
    assert_eq!(rows["ok-3"].status, "completed");
    let bad = &rows["bad-2"];
    assert_eq!(bad.status, "failed", "{}", output_text(&out));
    assert!(bad.error.contains("404"), "the error says why: {bad:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 of 3 volume(s) failed: bad-2"),
        "{}",
        output_text(&out)
    );
    assert!(!h.daemon.volume("bad-2").exists());
}

#[test]
fn fleet_with_a_token_file_keeps_the_token_off_command_lines() {
    skip_without_tools!("fleet_with_a_token_file_keeps_the_token_off_command_lines");
    let dir = TestDir::new("fleet-token");
    let pki = Pki::create(&dir);
    let tokens = dir.join("tokens");
    let out = run(Command::new(BIN).args(["token", "new", "fleet", "--tokens"]).arg(&tokens));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.len() >= 32, "token new printed {token:?}");
    let token_file = dir.join("fleet.token");
    fs::write(&token_file, format!("{token}\n")).unwrap();
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();

    let auth = Auth { client_ca: false, tokens: Some(tokens) };
    let h = Harness::start_in(dir, pki, &auth, &[]);
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));
    let url = h.images.url("tiny.qcow2");

    let mut child = fleet_base(&h)
        .arg("--token-file")
        .arg(&token_file)
        .args(["--image-url", &url, "--size-gb", "1", "--prefix", "tok", "--count", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, no process on the machine may carry the token in its
    // arguments (curl, jq, the script's own subshells).
    let pid = child.id();
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (read_all(stdout), read_all(stderr));
    let mut scans = 0;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        scans += 1;
        if let Some(culprit) = command_line_holding(&token) {
            let _ = child.kill();
            panic!("the token is in the command line of {culprit}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let (stdout, stderr) = (readers.0.join().unwrap(), readers.1.join().unwrap());
    let out = Output { status, stdout, stderr };
    eprintln!("scanned /proc {scans} times while pid {pid} ran");
    assert_exit(&out, 0);
    let rows = summary(&out);
    for name in ["tok-1", "tok-2", "tok-3"] {
        assert_eq!(rows[name].status, "completed", "{}", output_text(&out));
        assert!(h.daemon.volume(name).is_file());
    }
    let all = output_text(&out);
    assert!(!all.contains(&token), "the token was printed:\n{all}");
    // The daemon saw the token, not a certificate.
    assert!(h.daemon.log_text().contains("token:fleet"), "{}", h.daemon.log_text());

    // A wrong token fails once, at the health check, before any job.
    let wrong = h.dir.join("wrong.token");
    fs::write(&wrong, "not-the-token-0123456789abcdef0123456789\n").unwrap();
    let out = run_any(fleet_base(&h).arg("--token-file").arg(&wrong).args([
        "--image-url",
        &url,
        "--size-gb",
        "1",
        "never-1",
    ]));
    assert_exit(&out, 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", output_text(&out));
    assert!(!h.daemon.volume("never-1").exists());
}

/// Reads a pipe to its end on a thread, so the child never blocks on it.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        pipe.read_to_end(&mut buf).unwrap();
        buf
    })
}

/// The pid and command line of a process whose arguments contain `needle`.
fn command_line_holding(needle: &str) -> Option<String> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may be gone by the time we read it.
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else { continue };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if line.contains(needle) {
            return Some(format!("pid {}: {line}", name.to_string_lossy()));
        }
    }
    None
}

#[test]
fn a_volume_past_its_timeout_is_cancelled_and_counted_failed() {
    skip_without_tools!("a_volume_past_its_timeout_is_cancelled_and_counted_failed");
    let h = Harness::start("fleet-timeout", &[]);
    build_tiny_qcow2(&h.image_dir().join("fast.qcow2"));
    // Another image than fast.qcow2, or its job would be a cache hit.
    let slow_image = h.image_dir().join("slow.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&slow_image).arg("32M"));
    write_sidecar(&slow_image);
    // About 200 KiB at 2 KiB per 100 ms: some 10 s, well past a 3 s timeout.
    h.images.set_slow("slow.qcow2", Slow { chunk: 2048, delay: Duration::from_millis(100) });

    let started = Instant::now();
    let out = run_any(
        fleet_mtls(&h)
            .args(["--image-url", &h.images.url("fast.qcow2"), "--size-gb", "1"])
            .args(["--timeout", "3", "fast-1"])
            .arg(format!("slow-1={}", h.images.url("slow.qcow2"))),
    );
    let took = started.elapsed();
    assert_exit(&out, 1);
    assert!(took < Duration::from_secs(8), "the script waited {took:?} past a 3 s timeout");
    let rows = summary(&out);
    assert_eq!(rows["fast-1"].status, "completed", "{}", output_text(&out));
    let slow = &rows["slow-1"];
    assert_eq!(slow.status, "timed-out", "{}", output_text(&out));
    assert!(slow.error.contains("cancelled"), "{slow:?}");
    // The daemon was told: the job ends cancelled and leaves no volume.
    let last = h.api.wait_final(&slow.job_id, Duration::from_secs(30));
    assert_eq!(last["status"], "cancelled", "{last:#}");
    assert!(!h.daemon.volume("slow-1").exists());
    assert!(Path::new(&h.daemon.volume("fast-1")).is_file());
}

#[test]
fn usage_errors_exit_2_without_touching_the_daemon() {
    let cases: &[&[&str]] = &[
        &["--image-url", "http://x/i.qcow2", "--size-gb", "1", "vm-1"], // no --url
        &["--url", "https://h:8080", "--size-gb", "1", "--image-url", "http://x/i", "vm-1"], // no auth
        &["--url", "https://h:8080", "--token-file", "/dev/null", "--size-gb", "0", "vm-1"],
        &["--url", "https://h:8080", "--token-file", "/dev/null", "--size-gb", "1", "vm-1"], // no image
        &[
            "--url",
            "https://h:8080",
            "--token-file",
            "/dev/null",
            "--size-gb",
            "1",
            "--image-url",
            "http://x/i",
            "--prefix",
            "vm",
        ], // --prefix without --count
        &[
            "--url",
            "https://h:8080",
            "--token-file",
            "/dev/null",
            "--size-gb",
            "1",
            "--image-url",
            "http://x/i",
            "../etc",
        ], // not a volume name
        &[
            "--url",
            "https://h:8080",
            "--token-file",
            "/dev/null",
            "--size-gb",
            "1",
            "--image-url",
            "http://x/i",
            "vm-1",
            "vm-1",
        ], // twice
        &["--bogus"],
    ];
    for args in cases {
        let out =
            run_any(Command::new(script("fleet-provision.sh")).args(*args).env_remove("LVP_URL"));
        assert_exit(&out, 2);
        assert!(!out.stderr.is_empty(), "{args:?} says nothing");
    }
}
