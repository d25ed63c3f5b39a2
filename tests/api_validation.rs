//! The API's answers to bad requests: each gets a 400 whose `details` names
//! the field and the problem, and none of them creates a job. Every
//! response, good or bad, carries an `X-Request-ID`.

mod common;

use std::collections::HashSet;
use std::fs;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// One bad request: what is sent and what the 400 must say.
struct Case {
    label: &'static str,
    body: Vec<u8>,
    code: &'static str,
    /// Substrings `details` must contain.
    details: Vec<String>,
}

fn case(label: &'static str, body: Value, details: &[&str]) -> Case {
    Case {
        label,
        body: body.to_string().into_bytes(),
        code: "invalid_request",
        details: details.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn invalid_provision_requests_get_a_precise_400_and_create_no_job() {
    // One worker: jobs run in order, so once the barrier job at the end has
    // completed, any job a bad request had wrongly created has run too.
    let h = Harness::start("validation", &["--workers", "1"]);
    build_tiny_qcow2(&h.image_dir().join("probe.qcow2"));
    build_tiny_qcow2(&h.image_dir().join("barrier.qcow2"));
    let good = json!({
        "image_url": h.images.url("probe.qcow2"),
        "volume_name": "vm-probe",
        "volume_size_gb": 1,
        "image_type": "qcow2",
        "correlation_id": "corr-invalid",
    });
    let without = |field: &str| {
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove(field);
        v
    };
    let with = |field: &str, value: Value| with_field(good.clone(), field, value);
    let size_msg = "volume_size_gb must be a whole number from 1 to";
    let url = h.images.url("probe.qcow2").replacen("http://", "http://user:secret@", 1);

    let cases = vec![
        Case {
            label: "malformed JSON",
            body: br#"{"image_url": "http://h/a.qcow2", "volume_name": "#.to_vec(),
            code: "invalid_json",
            details: vec!["request body is not valid JSON".into()],
        },
        Case {
            label: "empty body",
            body: Vec::new(),
            code: "invalid_json",
            details: vec!["not valid JSON".into()],
        },
        case("not an object", json!([good.clone()]), &["must be a JSON object"]),
        case("missing image_url", without("image_url"), &["missing field image_url"]),
        case("missing volume_name", without("volume_name"), &["missing field volume_name"]),
        case(
            "missing volume_size_gb",
            without("volume_size_gb"),
            &["missing field volume_size_gb"],
        ),
        case("null volume_name", with("volume_name", Value::Null), &["missing field volume_name"]),
        case(
            "image_url a bool",
            with("image_url", json!(true)),
            &["image_url must be a string, got a boolean"],
        ),
        case(
            "volume_name a number",
            with("volume_name", json!(7)),
            &["volume_name must be a string, got a number"],
        ),
        case("volume_size_gb a string", with("volume_size_gb", json!("50")), &[size_msg, "\"50\""]),
        case("image_type a number", with("image_type", json!(2)), &["image_type must be a string"]),
        case(
            "correlation_id an object",
            with("correlation_id", json!({})),
            &["correlation_id must be a string"],
        ),
        case(
            "unknown image_type",
            with("image_type", json!("vmdk")),
            &["image_type must be \"qcow2\" or \"raw\"", "vmdk"],
        ),
        case(
            "image_type in capitals",
            with("image_type", json!("QCOW2")),
            &["image_type", "QCOW2"],
        ),
        case("size 0", with("volume_size_gb", json!(0)), &[size_msg, "got 0"]),
        case("size negative", with("volume_size_gb", json!(-5)), &[size_msg, "got -5"]),
        case("size fractional", with("volume_size_gb", json!(1.5)), &[size_msg, "got 1.5"]),
        case("size absurd", with("volume_size_gb", json!(1_000_000_000u64)), &[size_msg]),
        case("size past u64", with("volume_size_gb", json!(1e30)), &[size_msg]),
        // The daemon calls this "not a valid URL" rather than naming the
        // scheme rule; either way it is refused and names the field.
        case("file URL", with("image_url", json!("file:///etc/passwd")), &["image_url"]),
        case(
            "file URL with a host",
            with("image_url", json!("file://localhost/etc/passwd")),
            &["image_url", "http:// or https://"],
        ),
        case(
            "ftp URL",
            with("image_url", json!("ftp://127.0.0.1/probe.qcow2")),
            &["image_url", "http:// or https://"],
        ),
        case("credentials in URL", with("image_url", json!(url)), &["image_url", "credentials"]),
        case(
            "URL without a file",
            with("image_url", json!(h.images.url(""))),
            &["image_url", "file"],
        ),
        case(
            "name ..",
            with("volume_name", json!("..")),
            &["volume_name \"..\"", "must not start with"],
        ),
        case("name .", with("volume_name", json!(".")), &["volume_name \".\""]),
        case(
            "name a/b",
            with("volume_name", json!("a/b")),
            &["volume_name \"a/b\"", "only letters, digits"],
        ),
        case("name ../x", with("volume_name", json!("../x")), &["volume_name \"../x\""]),
        case(
            "name -x",
            with("volume_name", json!("-x")),
            &["volume_name \"-x\"", "must not start with '-'"],
        ),
        case(
            "name a b",
            with("volume_name", json!("a b")),
            &["volume_name \"a b\"", "only letters, digits"],
        ),
        case(
            "name with a control char",
            with("volume_name", json!("a\u{1}b")),
            &["volume_name", "only letters, digits"],
        ),
        case(
            "name with a newline",
            with("volume_name", json!("a\nb")),
            &["volume_name", "only letters, digits"],
        ),
        case("name empty", with("volume_name", json!("")), &["volume_name", "1 to 127 bytes"]),
        case(
            "name 128 bytes",
            with("volume_name", json!("a".repeat(128))),
            &["volume_name", "1 to 127 bytes"],
        ),
        case(
            "name non-ASCII",
            with("volume_name", json!("vm-é")),
            &["volume_name", "only letters, digits"],
        ),
        case(
            "image_sha256 short",
            with("image_sha256", json!("abc123")),
            &["image_sha256 must be 64 hexadecimal digits"],
        ),
        case("unknown field", with("volume_size", json!(1)), &["unknown field \"volume_size\""]),
        case(
            "correlation_id with a control char",
            with("correlation_id", json!("a\u{7}b")),
            &["correlation_id", "control characters"],
        ),
    ];

    for c in &cases {
        let reply = h.api.provision_raw(&c.body);
        let details = reply.expect_error(400, c.code);
        for want in &c.details {
            assert!(
                details.contains(want.as_str()),
                "{}: details {details:?} lack {want:?}",
                c.label
            );
        }
        // The caller's label comes back when the body had a usable one.
        let body: Option<Value> = serde_json::from_slice(&c.body).ok();
        if body.as_ref().and_then(|b| b.get("correlation_id")) == Some(&json!("corr-invalid")) {
            assert_eq!(reply.body["correlation_id"], "corr-invalid", "{}: {reply:#?}", c.label);
        }
    }

    // A body over 64 KiB is refused from its Content-Length, before it is
    // read. The head is sent alone (as curl does with Expect: 100-continue);
    // the test below covers a client that sends the body at once.
    let reply = raw_https(&h.daemon, &h.pki, &oversized_head(70 * 1024));
    assert_eq!(reply.status, 400, "{reply:#?}");
    let body = reply.json();
    assert_eq!(body["error"], "body_too_large", "{reply:#?}");
    assert!(body["details"].as_str().unwrap().contains("65536"), "{reply:#?}");
    assert!(reply.header("x-request-id").is_some(), "{reply:#?}");

    // The barrier: a valid request with a 127-byte name (the longest allowed).
    let longest = "b".repeat(127);
    let mut barrier = h.request("barrier.qcow2", &longest, 1, "qcow2");
    barrier["correlation_id"] = json!("barrier");
    let id = h.api.submit(&barrier);
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");

    assert_eq!(h.images.gets("probe.qcow2.sha256"), 0, "a refused request started a job");
    assert_eq!(h.images.gets("probe.qcow2"), 0, "a refused request started a job");
    assert_eq!(list_dir(&h.daemon.volume_dir), vec![longest], "only the barrier made a volume");
}

/// A provision request head announcing a body of `len` bytes.
fn oversized_head(len: usize) -> Vec<u8> {
    format!(
        "POST /api/v1/provision HTTP/1.1\r\nHost: localhost\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes()
}

/// A client that writes its whole request before reading (ureq, and many
/// simple HTTP clients) must get the documented 400 as well. The daemon
/// answers from the head; it once closed the connection with the body
/// still unread, so the kernel reset it and the client saw a broken pipe
/// instead of the 400, about half the time.
#[test]
fn oversized_body_sent_whole_still_gets_the_400() {
    let h = Harness::start("body-too-large-whole", &[]);
    let body = json!({"correlation_id": "x".repeat(70 * 1024)}).to_string();
    let mut outcomes = Vec::new();
    for _ in 0..20 {
        // A fresh client each time: a new connection, as a script would.
        let api = Api::mtls(&h.daemon, &h.pki);
        outcomes.push(match api.try_request("POST", "/api/v1/provision", Some(body.as_bytes())) {
            Ok(r) => format!("{} {}", r.status, r.body["error"]),
            Err(e) => format!("transport error: {e}"),
        });
    }
    let bad: Vec<_> = outcomes.iter().filter(|o| *o != "400 \"body_too_large\"").collect();
    assert!(bad.is_empty(), "{} of 20 requests did not get the 400: {bad:?}", bad.len());
}

#[test]
fn busy_volume_gets_409_and_a_full_queue_gets_503_without_creating_jobs() {
    // One worker and room for one waiting job.
    let h = Harness::start("busy-and-full", &["--workers", "1", "--queue", "1"]);
    let img = build_fs_image(h.image_dir(), "base", 31);
    h.images
        .set_slow(&img.qcow2_name(), Slow { chunk: 64 * 1024, delay: Duration::from_millis(100) });
    build_tiny_qcow2(&h.image_dir().join("tiny.qcow2"));

    let running = h.api.submit(&h.request(&img.qcow2_name(), "vm-a", 1, "qcow2"));
    h.api.wait_until(&running, JOB_TIMEOUT, "running", |s| s["status"] == "running");

    // The same volume again while its job is active.
    let mut again = h.request("tiny.qcow2", "vm-a", 1, "qcow2");
    again["correlation_id"] = json!("corr-busy");
    let reply = h.api.provision(&again);
    let details = reply.expect_error(409, "volume_busy");
    assert!(details.contains("vm-a") && details.contains(&running), "{details}");
    assert_eq!(reply.body["correlation_id"], "corr-busy");

    // One job fits in the queue, the next does not.
    let queued = h.api.submit(&h.request("tiny.qcow2", "vm-b", 1, "qcow2"));
    assert_eq!(h.api.status(&queued).body["status"], "pending");
    let reply = h.api.provision(&h.request("tiny.qcow2", "vm-c", 1, "qcow2"));
    let details = reply.expect_error(503, "queue_full");
    assert!(details.contains("--queue"), "the operator is told what to raise: {details}");

    // Let everything finish: only the accepted jobs ever ran.
    h.api.cancel(&running);
    assert_eq!(h.api.wait_final(&running, JOB_TIMEOUT)["status"], "cancelled");
    assert_eq!(h.api.wait_final(&queued, JOB_TIMEOUT)["status"], "completed");
    assert_eq!(list_dir(&h.daemon.volume_dir), vec!["vm-b".to_string()]);
    // vm-a is free again once its job has ended.
    let id = h.api.submit(&h.request("tiny.qcow2", "vm-a", 1, "qcow2"));
    assert_eq!(h.api.wait_final(&id, JOB_TIMEOUT)["status"], "completed");
}

#[test]
fn chunked_request_body_gets_411() {
    let h = Harness::start("chunked", &[]);
    let head = "POST /api/v1/provision HTTP/1.1\r\nHost: localhost\r\n\
                Transfer-Encoding: chunked\r\n\r\n";
    let reply = raw_https(&h.daemon, &h.pki, head.as_bytes());
    assert_eq!(reply.status, 411, "{reply:#?}");
    assert_eq!(reply.json()["error"], "length_required", "{reply:#?}");
    assert!(reply.header("x-request-id").is_some(), "{reply:#?}");
}

#[test]
fn every_response_carries_a_request_id() {
    let dir = TestDir::new("request-id");
    let pki = Pki::create(&dir);
    let tokens = dir.join("tokens");
    fs::write(&tokens, format!("ci:sha256:{}\n", "0".repeat(64))).unwrap();
    let h = Harness::start_in(dir, pki, &Auth { client_ca: true, tokens: Some(tokens) }, &[]);
    let img = build_fs_image(h.image_dir(), "base", 21);
    h.images
        .set_slow(&img.qcow2_name(), Slow { chunk: 64 * 1024, delay: Duration::from_millis(100) });

    // Every reply below goes through Api::try_request, which itself fails
    // the test on a missing X-Request-ID; here we also check the statuses
    // and that no two replies share an id.
    let seen = std::cell::RefCell::new(HashSet::new());
    let unique = |what: &str, id: &str| {
        assert!(seen.borrow_mut().insert(id.to_string()), "{what}: request id {id} was used twice");
    };
    let check = |what: &str, reply: Reply, status: u16| {
        assert_eq!(reply.status, status, "{what}: {reply:#?}");
        unique(what, reply.request_id().unwrap());
    };

    check("health", h.api.request("GET", "/health", None), 200);
    let provision = h.api.provision(&h.request(&img.qcow2_name(), "vm-rid", 1, "qcow2"));
    let job = provision.body["job_id"].as_str().unwrap().to_string();
    check("provision", provision, 202);
    h.api.wait_until(&job, JOB_TIMEOUT, "running", |s| s["status"] == "running");
    check("status", h.api.status(&job), 200);
    check("cancel", h.api.cancel(&job), 204);
    h.api.wait_final(&job, JOB_TIMEOUT);
    check("cancel finished", h.api.cancel(&job), 409);
    check("unknown job", h.api.status(&uuid::Uuid::new_v4().to_string()), 404);
    check("bad job id", h.api.status("nope"), 400);
    check("unknown route", h.api.request("GET", "/api/v2/nothing", None), 404);
    check("wrong method", h.api.request("PUT", "/api/v1/provision", Some(b"{}")), 405);
    check("invalid body", h.api.provision_raw(b"{"), 400);
    let too_large = raw_https(&h.daemon, &h.pki, &oversized_head(65 * 1024));
    assert_eq!(too_large.status, 400, "{too_large:#?}");
    unique("body too large", too_large.header("x-request-id").expect("X-Request-ID on a refusal"));
    let anonymous = Api::new(h.daemon.base_url(), h.pki.tls(None));
    check("no credentials", anonymous.request("GET", "/health", None), 401);
    let wrong = Api::new(h.daemon.base_url(), h.pki.tls(None)).with_header("X-API-Token", "wrong");
    check("wrong token", wrong.request("GET", "/api/v1/status/nope", None), 401);
}
