//! `libvirt-volume-provisioner client` against the real daemon: what it
//! prints on stdout and stderr, and its exit status, for each command and
//! each way a request can go wrong.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Longest a client command may run before the test gives up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// What one client run printed, and its exit status.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// stdout as JSON.
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    #[track_caller]
    fn expect(&self, code: i32) -> &Run {
        assert_eq!(self.code, code, "expected exit status {code}: {self:#?}");
        self
    }

    /// The one line on stdout, which must be a job id.
    #[track_caller]
    fn job_id(&self) -> String {
        self.expect(0);
        let id = self.stdout.trim_end_matches('\n');
        assert!(!id.contains('\n'), "one line expected: {self:#?}");
        uuid_like(id);
        id.to_string()
    }
}

#[track_caller]
fn uuid_like(id: &str) {
    let groups: Vec<usize> = id.split('-').map(str::len).collect();
    assert_eq!(groups, [8, 4, 4, 4, 12], "{id:?} is not a UUID");
}

/// Runs the client with `args` and `env` (no `$LVP_URL`/`$LVP_TOKEN`
/// from the outside), killing it after [`CLIENT_TIMEOUT`].
fn client_env(args: &[String], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.arg("client")
        .args(args)
        .env_remove("LVP_URL")
        .env_remove("LVP_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {BIN}: {e}"));
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("client {args:?} still running after {CLIENT_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Run {
        code: status.code().expect("client exited, not killed"),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn client(args: &[String]) -> Run {
    client_env(args, &[])
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `--url`, `--ca`, `--cert`, `--key` for the harness's daemon and client
/// certificate, then `rest`.
fn mtls_args(h: &Harness, rest: &[&str]) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let mut args = vec![
        "--url".to_string(),
        h.daemon.base_url(),
        "--ca".into(),
        p(&h.pki.ca_cert),
        "--cert".into(),
        p(&h.pki.client_cert),
        "--key".into(),
        p(&h.pki.client_key),
    ];
    args.extend(strings(rest));
    args
}

/// `client provision` arguments for `image` in the harness's image server.
fn provision_args(h: &Harness, image: &str, volume: &str, rest: &[&str]) -> Vec<String> {
    let url = h.images.url(image);
    let mut args = vec!["provision", "--image-url", &url, "--volume-name", volume];
    args.extend(["--volume-size-gb", "1"]);
    args.extend(rest);
    mtls_args(h, &args)
}

/// Requests for `GET /api/v1/status/<id>` in the daemon's log.
fn status_requests(h: &Harness, id: &str) -> usize {
    let needle = format!("GET /api/v1/status/{id} ");
    h.daemon.log_text().lines().filter(|l| l.contains(&needle)).count()
}

#[test]
fn provision_wait_completes_and_the_volume_holds_the_image() {
    let h = Harness::start("client-provision", &[]);
    let img = build_fs_image(h.image_dir(), "base", 21);
    let run = client(&provision_args(
        &h,
        &img.qcow2_name(),
        "vm-client",
        &["--image-type", "qcow2", "--correlation-id", "corr-client-1", "--wait"],
    ));
    run.expect(0);
    let job = run.json();
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["correlation_id"], "corr-client-1");
    assert_eq!(job["progress"]["percent"], 100);
    uuid_like(job["job_id"].as_str().unwrap());
    // stderr is a pipe here: plain step lines, the last one the end.
    let id = job["job_id"].as_str().unwrap();
    let steps: Vec<&str> = run.stderr.lines().collect();
    assert!(!steps.is_empty(), "{run:#?}");
    for line in &steps {
        assert!(line.starts_with(&format!("job {id} ")), "unexpected stderr line {line:?}");
    }
    assert!(steps.last().unwrap().contains(" completed "), "{run:#?}");
    assert!(!run.stderr.contains('\r'), "no progress bar when stderr is not a terminal");

    let expected = qcow2_to_raw(&img.qcow2);
    assert_volume_holds(&h.daemon.volume("vm-client"), &expected, GIB);
}

#[test]
fn provision_status_and_jobs_show_the_same_job() {
    let h = Harness::start("client-status-jobs", &[]);
    let img = build_fs_image(h.image_dir(), "base", 22);
    // qcow2 by the daemon's default: no --image-type.
    let id = client(&provision_args(
        &h,
        &img.qcow2_name(),
        "vm-status",
        &["--correlation-id", "corr-jobs"],
    ))
    .job_id();

    let waited = client(&mtls_args(&h, &["status", &id, "--wait"]));
    waited.expect(0);
    assert_eq!(waited.json()["status"], "completed");

    let shown = client(&mtls_args(&h, &["status", &id]));
    shown.expect(0);
    let job = shown.json();
    assert_eq!((job["job_id"].as_str(), job["status"].as_str()), (Some(&*id), Some("completed")));
    assert!(shown.stdout.contains("\n  \"job_id\""), "status is pretty-printed: {shown:#?}");

    // A second job, so the list has an order to keep.
    let second = client(&provision_args(&h, &img.qcow2_name(), "vm-status-2", &["--wait"]));
    second.expect(0);
    let second = second.json()["job_id"].as_str().unwrap().to_string();

    let jobs = client(&mtls_args(&h, &["jobs"]));
    jobs.expect(0);
    let lines: Vec<&str> = jobs.stdout.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(header, ["JOB", "ID", "STATUS", "STAGE", "PERCENT", "VOLUME", "CORRELATION"]);
    assert_eq!(lines.len(), 3, "{jobs:#?}");
    // Newest first.
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..5], [&*second, "completed", "finalizing", "100%", "vm-status-2"]);
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row, [&*id, "completed", "finalizing", "100%", "vm-status", "corr-jobs"]);

    let by_corr = client(&mtls_args(&h, &["jobs", "--correlation-id", "corr-jobs"]));
    by_corr.expect(0);
    assert_eq!(by_corr.stdout.lines().count(), 2, "{by_corr:#?}");
    assert!(by_corr.stdout.lines().nth(1).unwrap().starts_with(&*id));
    let none = client(&mtls_args(&h, &["jobs", "--status", "failed"]));
    none.expect(0);
    assert_eq!(none.stdout.lines().count(), 1, "only the header: {none:#?}");

    // Unknown and malformed ids.
    let unknown = client(&mtls_args(&h, &["status", "550e8400-e29b-41d4-a716-446655440000"]));
    unknown.expect(1);
    assert!(unknown.stderr.starts_with("libvirt-volume-provisioner: not_found: "), "{unknown:#?}");
    assert!(unknown.stdout.is_empty());
    let malformed = client(&mtls_args(&h, &["status", "42"]));
    malformed.expect(2);
    assert!(malformed.stderr.contains("\"42\" is not a UUID"), "{malformed:#?}");
}

#[test]
fn cancel_stops_a_running_job_and_then_answers_job_finished() {
    let h = Harness::start("client-cancel", &[]);
    let img = build_fs_image(h.image_dir(), "base", 23);
    let slow = img.qcow2_name();
    // Several seconds of download, so the job is still running at cancel.
    h.images.set_slow(&slow, Slow { chunk: 64 * 1024, delay: Duration::from_millis(100) });
    let id = client(&provision_args(&h, &slow, "vm-cancel", &[])).job_id();
    h.api.wait_until(&id, Duration::from_secs(30), "downloading", |s| {
        s["progress"]["stage"] == "downloading" || is_final(s)
    });

    let cancel = client(&mtls_args(&h, &["cancel", &id]));
    cancel.expect(0);
    assert_eq!((cancel.stdout.as_str(), cancel.stderr.as_str()), ("", ""));

    let waited = client(&mtls_args(&h, &["status", &id, "--wait"]));
    waited.expect(1);
    assert_eq!(waited.json()["status"], "cancelled", "{waited:#?}");
    assert!(
        waited.stderr.contains(&format!("libvirt-volume-provisioner: job {id} cancelled: ")),
        "{waited:#?}"
    );

    let again = client(&mtls_args(&h, &["cancel", &id]));
    again.expect(1);
    assert!(again.stderr.starts_with("libvirt-volume-provisioner: job_finished: "), "{again:#?}");
    let unknown = client(&mtls_args(&h, &["cancel", "550e8400-e29b-41d4-a716-446655440000"]));
    unknown.expect(1);
    assert!(unknown.stderr.starts_with("libvirt-volume-provisioner: not_found: "), "{unknown:#?}");
}

#[test]
fn a_failed_job_makes_provision_wait_exit_1_with_its_error() {
    let h = Harness::start("client-failed", &[]);
    let run = client(&provision_args(&h, "no-such-image.qcow2", "vm-fail", &["--wait"]));
    run.expect(1);
    let job = run.json();
    assert_eq!(job["status"], "failed", "{job:#}");
    let error = job["error"].as_str().expect("a failed job has an error");
    assert!(error.contains("404"), "{error}");
    let id = job["job_id"].as_str().unwrap();
    let last = run.stderr.lines().last().unwrap();
    assert_eq!(last, format!("libvirt-volume-provisioner: job {id} failed: {error}"));
}

#[test]
fn api_errors_print_the_code_and_details() {
    let h = Harness::start("client-api-error", &[]);
    let run = client(&provision_args(&h, "x.qcow2", "-bad-name", &[]));
    run.expect(1);
    assert!(run.stdout.is_empty(), "{run:#?}");
    let line = run.stderr.trim_end();
    assert!(line.starts_with("libvirt-volume-provisioner: invalid_request: "), "{run:#?}");
    assert!(line.contains("volume_name"), "the details say which field: {line}");
    assert_eq!(run.stderr.lines().count(), 1);
}

#[test]
fn a_repeated_idempotency_key_gives_the_same_job() {
    let h = Harness::start("client-idempotency", &[]);
    let img = build_fs_image(h.image_dir(), "base", 24);
    let args = provision_args(&h, &img.qcow2_name(), "vm-idem", &["--idempotency-key", "key-1"]);
    let first = client(&args).job_id();
    let second = client(&args).job_id();
    assert_eq!(first, second);
    h.api.wait_final(&first, Duration::from_secs(60));
}

#[test]
fn a_token_client_works_with_token_file_or_lvp_token() {
    let dir = TestDir::new("client-token");
    let pki = Pki::create(&dir);
    let tokens = dir.join("tokens");
    let out = run(Command::new(BIN).args(["token", "new", "ci", "--tokens"]).arg(&tokens));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let token_file = dir.join("ci.token");
    fs::write(&token_file, format!("{token}\nignored second line\n")).unwrap();
    let wrong_file = dir.join("wrong.token");
    fs::write(&wrong_file, "not-the-token\n").unwrap();
    let auth = Auth { client_ca: false, tokens: Some(tokens) };
    let h = Harness::start_in(dir, pki, &auth, &[]);
    let img = build_fs_image(h.image_dir(), "base", 25);

    let url = h.daemon.base_url();
    let ca = h.pki.ca_cert.display().to_string();
    let with = |auth: &[&str], rest: &[&str]| {
        let mut args = strings(&["--url", &url, "--ca", &ca]);
        args.extend(strings(auth));
        args.extend(strings(rest));
        args
    };
    let image_url = h.images.url(&img.qcow2_name());
    let provision = [
        "provision",
        "--image-url",
        &image_url,
        "--volume-name",
        "vm-token",
        "--volume-size-gb",
        "1",
        "--wait",
    ];
    let token_path = token_file.display().to_string();
    let ok = client(&with(&["--token-file", &token_path], &provision));
    ok.expect(0);
    assert_eq!(ok.json()["status"], "completed");
    assert_volume_holds(&h.daemon.volume("vm-token"), &qcow2_to_raw(&img.qcow2), GIB);

    // The same token from the environment, and the URL too.
    let id = ok.json()["job_id"].as_str().unwrap().to_string();
    let env = client_env(
        &strings(&["--ca", &ca, "status", &id]),
        &[("LVP_TOKEN", &token), ("LVP_URL", &url)],
    );
    env.expect(0);
    assert_eq!(env.json()["status"], "completed");

    // A wrong token and no token: the daemon's 401, as an API error.
    let wrong = client(&with(&["--token-file", &wrong_file.display().to_string()], &["jobs"]));
    wrong.expect(1);
    assert!(wrong.stderr.starts_with("libvirt-volume-provisioner: unauthorized: "), "{wrong:#?}");
    let none = client(&with(&[], &["status", &id]));
    none.expect(1);
    assert!(none.stderr.starts_with("libvirt-volume-provisioner: unauthorized: "), "{none:#?}");

    let unreadable = client(&with(&["--token-file", "/nonexistent/token"], &["jobs"]));
    unreadable.expect(2);
    assert!(unreadable.stderr.contains("--token-file /nonexistent/token: cannot read file"));

    for r in [&ok, &env, &wrong, &none] {
        assert!(!r.stdout.contains(&token) && !r.stderr.contains(&token), "token printed: {r:#?}");
    }
}

#[test]
fn a_wrong_ca_or_a_missing_certificate_fails_the_handshake_with_exit_3() {
    let h = Harness::start("client-wrong-ca", &[]);
    let p = |p: &Path| p.display().to_string();
    let url = h.daemon.base_url();

    let wrong_ca = client(&strings(&[
        "--url",
        &url,
        "--ca",
        &p(&h.pki.other_ca_cert),
        "--cert",
        &p(&h.pki.client_cert),
        "--key",
        &p(&h.pki.client_key),
        "jobs",
    ]));
    wrong_ca.expect(3);
    let line = wrong_ca.stderr.trim_end();
    assert!(
        line.starts_with(&format!("libvirt-volume-provisioner: TLS handshake with {url} failed: "))
    );
    assert!(line.contains("UnknownIssuer"), "{wrong_ca:#?}");

    // A new user's first try: the daemon's private CA not given at all.
    let no_ca = client(&strings(&[
        "--url",
        &url,
        "--cert",
        &p(&h.pki.client_cert),
        "--key",
        &p(&h.pki.client_key),
        "jobs",
    ]));
    no_ca.expect(3);
    assert!(no_ca.stderr.contains("UnknownIssuer"), "{no_ca:#?}");
    assert!(
        no_ca
            .stderr
            .trim_end()
            .ends_with("(pass --ca with the CA that signed the daemon's certificate)"),
        "{no_ca:#?}"
    );

    let no_cert = client(&strings(&["--url", &url, "--ca", &p(&h.pki.ca_cert), "jobs"]));
    no_cert.expect(3);
    assert!(no_cert.stderr.contains("TLS handshake"), "{no_cert:#?}");
    assert!(no_cert.stderr.contains("CertificateRequired"), "{no_cert:#?}");
    assert_eq!(h.images.requests(), 0);
}

#[test]
fn bad_usage_exits_2_and_no_daemon_exits_3() {
    let dir = TestDir::new("client-usage");
    let pki = Pki::create(&dir);
    let p = |p: &Path| p.display().to_string();
    let free = format!("https://127.0.0.1:{}", free_port());

    let refused = client(&strings(&["--url", &free, "--ca", &p(&pki.ca_cert), "jobs"]));
    refused.expect(3);
    assert!(
        refused
            .stderr
            .starts_with(&format!("libvirt-volume-provisioner: cannot connect to {free}: ")),
        "{refused:#?}"
    );

    let cases: &[(&[&str], &str)] = &[
        (&["--url", "localhost:8080", "jobs"], "--url \"localhost:8080\" must start with"),
        (&["--url", "https://u:p@h:1", "jobs"], "must not carry a user name or password"),
        (&["--ca", "/nonexistent/ca.pem", "jobs"], "--ca /nonexistent/ca.pem: cannot read file"),
        (&["--cert", "/nonexistent/c.pem", "--key", "/x", "jobs"], "--cert /nonexistent/c.pem"),
        (&["--cert", "c.pem", "jobs"], "--cert needs --key"),
        (&["cancel", "not-a-job"], "job id \"not-a-job\" is not a UUID"),
        (&["cache", "purge", "abc"], "is not a SHA-256"),
    ];
    for (args, words) in cases {
        let mut all = strings(&["--url", &free]);
        if args[0] == "--url" {
            all.clear();
        }
        all.extend(strings(args));
        let r = client(&all);
        r.expect(2);
        assert!(r.stderr.starts_with("libvirt-volume-provisioner: "), "{r:#?}");
        assert!(r.stderr.contains(words), "{args:?} should say {words:?}: {r:#?}");
    }
    // Slips the argument parser catches are usage errors too, never the
    // "job failed" status 1 a script would take for a real failure.
    for args in [&["--bogus", "jobs"][..], &["provision", "--volume-name", "v"], &["cancel"]] {
        let r = client(&strings(args));
        assert_eq!(r.code, 2, "{args:?}: {r:#?}");
        assert!(!r.stderr.is_empty(), "{args:?} says what is wrong: {r:#?}");
    }
    // Client options after the command: argh refuses them, and the hint
    // says where they go.
    let late = client(&strings(&["jobs", "--ca", &p(&pki.ca_cert)]));
    late.expect(2);
    assert!(late.stderr.contains("Unrecognized argument: --ca"), "{late:#?}");
    assert!(
        late.stderr.contains(
            "hint: client options (--url, --ca, --cert, --key, --token-file) go before the command"
        ),
        "{late:#?}"
    );
    // A PEM file with no key in it.
    let r = client(&strings(&[
        "--url",
        &free,
        "--cert",
        &p(&pki.client_cert),
        "--key",
        &p(&pki.client_cert),
        "jobs",
    ]));
    r.expect(2);
    assert!(r.stderr.contains("no private key in file"), "{r:#?}");
}

#[test]
fn cache_list_prefetch_and_purge() {
    let h = Harness::start("client-cache", &[]);
    let img = build_fs_image(h.image_dir(), "base", 26);
    let sha = sha256_file(&img.qcow2);

    let empty = client(&mtls_args(&h, &["cache", "list"]));
    empty.expect(0);
    let header: Vec<&str> = empty.stdout.lines().next().unwrap().split("  ").collect();
    assert_eq!(header, ["SHA256", "SIZE", "LAST USED", "IN USE", "SOURCE"]);
    assert_eq!(empty.stdout.lines().count(), 1, "{empty:#?}");

    let url = h.images.url(&img.qcow2_name());
    let fetched = client(&mtls_args(
        &h,
        &["cache", "prefetch", "--image-url", &url, "--image-sha256", &sha, "--wait"],
    ));
    fetched.expect(0);
    assert_eq!(fetched.json()["status"], "completed", "{fetched:#?}");
    assert_eq!(h.images.gets(&img.qcow2_name()), 1);

    let listed = client(&mtls_args(&h, &["cache", "list"]));
    listed.expect(0);
    let rows: Vec<&str> = listed.stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{listed:#?}");
    let row: Vec<&str> = rows[0].split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(row[0], sha);
    assert_eq!(row[3], "no", "nothing uses the entry: {row:?}");
    assert_eq!(row[4], url);

    // A prefetch without --wait prints the job id.
    let again = client(&mtls_args(&h, &["cache", "prefetch", "--image-url", &url])).job_id();
    h.api.wait_final(&again, Duration::from_secs(60));

    let purged = client(&mtls_args(&h, &["cache", "purge", &sha]));
    purged.expect(0);
    assert_eq!((purged.stdout.as_str(), purged.stderr.as_str()), ("", ""));
    let after = client(&mtls_args(&h, &["cache", "list"]));
    after.expect(0);
    assert_eq!(after.stdout.lines().count(), 1, "{after:#?}");
    let gone = client(&mtls_args(&h, &["cache", "purge", &sha]));
    gone.expect(1);
    assert!(gone.stderr.starts_with("libvirt-volume-provisioner: not_found: "), "{gone:#?}");
}

/// A job of several seconds followed with `--wait` takes a request per
/// step, not a request every half second.
#[test]
fn following_a_job_long_polls_instead_of_spinning() {
    let h = Harness::start("client-long-poll", &[]);
    let img = build_fs_image(h.image_dir(), "base", 27);
    let slow = img.qcow2_name();
    // About 6 s of download (4 MB at 64 KiB per 100 ms): a client polling
    // every half second would send a dozen requests.
    h.images.set_slow(&slow, Slow { chunk: 64 * 1024, delay: Duration::from_millis(100) });
    let started = Instant::now();
    let run = client(&provision_args(&h, &slow, "vm-poll", &["--wait"]));
    let took = started.elapsed();
    run.expect(0);
    let id = run.json()["job_id"].as_str().unwrap().to_string();
    let requests = status_requests(&h, &id);
    assert!(took > Duration::from_secs(5), "the job was meant to be slow: {took:?}");
    // queued → downloading → inspecting → creating_volume → converting →
    // finalizing → completed: at most 7 answers (6 seen here), and one
    // spare.
    assert!(requests <= 8, "{requests} status requests in {took:?}: the client spins");
}
