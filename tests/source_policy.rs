//! Source policy through the real daemon: `--allow-source` prefixes refuse
//! a submission with 400, denied networks are refused after resolution and
//! before any connection (proved on 127.0.0.2 with a listener that must see
//! nothing), every redirect hop is checked, and `--allow-network` overrides
//! a denied network. No traffic leaves 127.0.0.0/8.

mod common;

use std::fs;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A daemon started after its image server, so its flags can name the
/// server's port.
fn start(name: &str, extra: &dyn Fn(&ImageServer) -> Vec<String>) -> Harness {
    let dir = TestDir::new(name);
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    let extra = extra(&images);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let daemon = Daemon::start(&dir, &pki, &Auth::mtls(), &extra);
    let api = Api::mtls(&daemon, &pki);
    Harness { api, daemon, images, pki, dir }
}

fn raw_job(url: &str, volume: &str) -> Value {
    json!({"image_url": url, "volume_name": volume, "volume_size_gb": 1, "image_type": "raw",
           "image_sha256": "ab".repeat(32)})
}

#[track_caller]
fn assert_failed_with(status: &Value, words: &[&str]) -> String {
    assert_eq!(status["status"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap_or_default().to_string();
    for w in words {
        assert!(error.contains(w), "error should mention {w:?}: {error}");
    }
    error
}

#[test]
fn allow_list_refuses_other_sources_at_submission_and_on_redirect() {
    let h = start("policy-allow", &|images| vec!["--allow-source".into(), images.url("ok-")]);
    fs::write(h.image_dir().join("ok-image.raw"), pseudo_random(MIB as usize, 3)).unwrap();
    fs::write(h.image_dir().join("other.raw"), pseudo_random(MIB as usize, 4)).unwrap();

    // Outside the prefix: 400 at submission, for a provision and a prefetch.
    let reply = h.api.provision(&h.request("other.raw", "vm-other", 1, "raw"));
    let details = reply.expect_error(400, "invalid_request");
    assert!(details.contains("outside the allowed sources"), "{details}");
    let prefetch = h.api.request(
        "POST",
        "/api/v1/cache/prefetch",
        Some(json!({"image_url": h.images.url("other.raw")}).to_string().as_bytes()),
    );
    prefetch.expect_error(400, "invalid_request");
    // A path that climbs out of the prefix is refused too.
    let sneaky = h.images.url("ok-/../other.raw");
    h.api.provision(&raw_job(&sneaky, "vm-sneaky")).expect_error(400, "invalid_request");
    assert_eq!(h.images.requests(), 0, "nothing was fetched for refused submissions");

    // Inside it: the job runs.
    let id = h.api.submit(&h.request("ok-image.raw", "vm-ok", 1, "raw"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");

    // A redirect from inside the allowed prefixes to outside them is not
    // followed: the redirector is allowed, where it points is not.
    drop(h);
    let target_dir = TestDir::new("policy-allow-target");
    let target = ImageServer::start(&target_dir.mkdir("images"));
    fs::write(target.root().join("other.raw"), b"not to be fetched").unwrap();
    let redirector = Listener::redirect_to(&target.url("other.raw"));
    let h = start("policy-allow-redirect", &|_| vec!["--allow-source".into(), redirector.url("")]);
    let id = h.api.submit(&raw_job(&redirector.url("ok.raw"), "vm-redirected"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed_with(
        &status,
        &["downloading", "outside the allowed sources", "other.raw", "redirected there by"],
    );
    assert!(redirector.connections() >= 1, "the first hop was requested");
    assert_eq!(target.requests(), 0, "the redirect target was never contacted");
}

#[test]
fn denied_network_is_never_connected_to_even_through_a_redirect() {
    // 127.0.0.0/8 denied, 127.0.0.1 explicitly allowed back: the image
    // server works, 127.0.0.2 is refused.
    let h = start("policy-deny", &|_| {
        vec![
            "--deny-network".into(),
            "127.0.0.0/8".into(),
            "--allow-network".into(),
            "127.0.0.1/32".into(),
        ]
    });
    let forbidden = Listener::start("127.0.0.2", None);

    // 1. Named directly.
    let id = h.api.submit(&raw_job(&forbidden.url("x.raw"), "vm-direct"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    let error = assert_failed_with(
        &status,
        &["downloading", "127.0.0.2", "denied network 127.0.0.0/8", "refusing to connect"],
    );
    assert_eq!(forbidden.connections(), 0, "something connected to 127.0.0.2: {error}");

    // 2. Through a redirect from an allowed address: the hop is checked.
    let redirector = Listener::redirect_to(&forbidden.url("x.raw"));
    let id = h.api.submit(&raw_job(&redirector.url("start.raw"), "vm-redirect"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed_with(
        &status,
        &["downloading", "127.0.0.2", "denied network", "redirected there by", "start.raw"],
    );
    assert!(redirector.connections() >= 1, "the allowed first hop was requested");
    assert_eq!(forbidden.connections(), 0, "the redirect reached 127.0.0.2");

    // 3. The explicitly allowed address still works.
    fs::write(h.image_dir().join("fine.raw"), pseudo_random(MIB as usize, 5)).unwrap();
    let id = h.api.submit(&h.request("fine.raw", "vm-fine", 1, "raw"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}");
    assert_eq!(forbidden.connections(), 0);
    assert!(h.daemon.log_text().contains("denied networks 169.254.0.0/16, fe80::/10, 127.0.0.0/8"));
}

#[test]
fn bad_policy_flags_stop_the_daemon_at_start() {
    let dir = TestDir::new("policy-flags");
    let pki = Pki::create(&dir);
    let mut args = Daemon::args(&dir, &pki, &Auth::mtls(), free_port());
    args.extend(
        ["--allow-source", "ftp://x/", "--deny-network", "10.0.0.0/99", "--allow-network", "x"]
            .map(String::from),
    );
    let (status, log) = serve_expecting_exit(&args);
    assert_eq!(status.code(), Some(2), "{log}");
    for word in ["--allow-source \"ftp://x/\"", "--deny-network", "--allow-network"] {
        assert!(log.contains(word), "{word} should be reported: {log}");
    }
}

/// A host name is checked on what it resolves to: `localhost` is refused
/// when loopback is denied, and the listener behind it sees nothing.
#[test]
fn host_names_are_checked_after_resolution() {
    let h = start("policy-names", &|_| {
        ["--deny-network", "127.0.0.0/8", "--deny-network", "::1/128"].map(String::from).to_vec()
    });
    let listener = Listener::start("127.0.0.1", None);
    let url = format!("http://localhost:{}/x.raw", listener.addr.port());
    let id = h.api.submit(&raw_job(&url, "vm-localhost"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    assert_failed_with(&status, &["downloading", "localhost resolves to", "denied network"]);
    assert_eq!(listener.connections(), 0, "something connected to localhost");
}

/// The default denied networks (link-local, where cloud metadata answers)
/// hold through a proxy too: the daemon refuses before it asks the proxy
/// to connect. The "proxy" here is a loopback listener that never
/// forwards, so even a broken check sends nothing beyond 127.0.0.0/8.
#[test]
fn metadata_addresses_are_refused_by_default_even_through_a_proxy() {
    let proxy = Listener::start("127.0.0.1", None);
    let proxy_url = format!("http://{}", proxy.addr);
    let h = start("policy-metadata", &|_| vec!["--proxy".into(), proxy_url.clone()]);
    for (url, volume, net) in [
        ("http://169.254.169.254/latest/disk.raw", "vm-metadata", "169.254.0.0/16"),
        ("http://[fe80::a9fe:a9fe]/disk.raw", "vm-link-local6", "fe80::/10"),
    ] {
        let id = h.api.submit(&raw_job(url, volume));
        let status = h.api.wait_final(&id, JOB_TIMEOUT);
        assert_failed_with(&status, &["downloading", &format!("denied network {net}")]);
    }
    assert_eq!(proxy.connections(), 0, "the proxy was asked to reach a link-local address");
}

#[test]
fn redirect_to_a_url_with_credentials_is_not_followed() {
    // A submitted image_url may not carry user:password@; a hop may not
    // either, or the daemon would send them as Basic auth to the target.
    let h = start("policy-redirect-userinfo", &|_| vec![]);
    let target = Listener::start("127.0.0.1", None);
    let location = target.url("x.raw").replacen("http://", "http://user:s3cret@", 1);
    let redirector = Listener::redirect_to(&location);
    let id = h.api.submit(&raw_job(&redirector.url("start.raw"), "vm-userinfo"));
    let status = h.api.wait_final(&id, JOB_TIMEOUT);
    let error = assert_failed_with(&status, &["downloading", "refusing a redirect", "credentials"]);
    assert!(!error.contains("s3cret"), "the password is in the error: {error}");
    assert!(redirector.connections() >= 1, "the first hop was requested");
    assert_eq!(target.connections(), 0, "the credentialed target was contacted");
    assert!(!h.daemon.volume("vm-userinfo").exists());
}
