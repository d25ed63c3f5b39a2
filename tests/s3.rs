//! Private buckets: image and sidecar GETs signed with AWS Signature V4,
//! against moto's S3 server with request authentication on (it verifies
//! every signature and refuses a wrong secret), started here on loopback by
//! `tests/fixtures/s3_server.py`. `.ci/run` installs moto from PyPI.
//!
//! moto with authentication on cannot serve presigned URLs (it wants an
//! `Authorization` header), so presigned URLs are tested on the plain image
//! server, which records what each GET carried.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// A moto S3 server holding one private bucket, stopped on drop.
struct Bucket {
    child: Child,
    port: u16,
    access_key: String,
    secret: String,
}

impl Bucket {
    /// `None` (after saying why) when moto is not installed and CI is not
    /// set; CI installs it, so there a missing moto fails the test.
    fn start(test: &str, files: &[&Path]) -> Option<Bucket> {
        let ok = Command::new("python3")
            .args(["-c", "import moto.server, boto3"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(std::env::var_os("CI").is_none(), "{test}: moto[server] is not installed");
            eprintln!(
                "skipping {test}: moto[server] is not installed (pip install 'moto[server]')"
            );
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/s3_server.py");
        // The port is free when we look; another process may take it before
        // moto binds it, so try a few.
        for _ in 0..3 {
            let port = free_port();
            let mut child = Command::new("python3")
                .arg(&script)
                .arg(port.to_string())
                .arg("images")
                .args(files)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto");
            let stdout = child.stdout.take().unwrap();
            let line =
                BufReader::new(stdout).lines().map_while(Result::ok).find(|l| l.starts_with('{'));
            let Some(line) = line else {
                let _ = child.kill();
                let _ = child.wait();
                continue;
            };
            let v: Value = serde_json::from_str(&line).unwrap();
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            return Some(Bucket { child, port, access_key: s("access_key"), secret: s("secret") });
        }
        panic!(
            "{test}: tests/fixtures/s3_server.py did not start moto (run it by hand to see why)"
        );
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self, key: &str) -> String {
        format!("{}/images/{key}", self.endpoint())
    }
}

impl Drop for Bucket {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job(url: &str, volume: &str) -> Value {
    json!({"image_url": url, "volume_name": volume, "volume_size_gb": 1, "image_type": "raw"})
}

#[test]
fn signed_downloads_from_a_private_bucket() {
    let dir = TestDir::new("s3-signed");
    let pki = Pki::create(&dir);
    let images = dir.mkdir("images");
    let image = images.join("disk.raw");
    fs::write(&image, pseudo_random(3 * MIB as usize, 21)).unwrap();
    let digest = write_sidecar(&image);
    let sidecar = images.join("disk.raw.sha256");
    let Some(bucket) = Bucket::start("signed_downloads_from_a_private_bucket", &[&image, &sidecar])
    else {
        return;
    };

    // Good credentials, from a file: the image and its sidecar are fetched
    // with signatures the server checks.
    let creds = dir.join("s3-credentials");
    fs::write(
        &creds,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            bucket.access_key, bucket.secret
        ),
    )
    .unwrap();
    fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let creds_arg = creds.display().to_string();
    let endpoint = bucket.endpoint();
    let daemon = Daemon::start(
        &dir,
        &pki,
        &Auth::mtls(),
        &["--s3-endpoint", &endpoint, "--s3-credentials", &creds_arg],
    );
    let api = Api::mtls(&daemon, &pki);
    let id = api.submit(&job(&bucket.url("disk.raw"), "vm-signed"));
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}\n{}", daemon.log_text());
    assert_eq!(status["image_sha256"], digest.as_str(), "the digest came from the signed sidecar");
    assert_volume_holds(&daemon.volume("vm-signed"), &image, GIB);
    assert!(!daemon.log_text().contains(&bucket.secret), "the secret reached the log");
    assert!(!daemon.log_text().contains("readable by other users"), "mode 0600 is private");

    drop(daemon);

    // The same key with a wrong secret, from the environment this time:
    // the bucket refuses the signature and the job says so.
    // Change the last character to one it is not, so the secret really differs.
    let (head, last) = bucket.secret.split_at(bucket.secret.len() - 1);
    let wrong = format!("{head}{}", if last == "x" { "y" } else { "x" });
    assert_ne!(wrong, bucket.secret);
    let other = TestDir::new("s3-wrong-secret");
    let daemon = Daemon::start_env(
        &other,
        &pki,
        &["--s3-endpoint", &endpoint],
        &[("AWS_ACCESS_KEY_ID", &bucket.access_key), ("AWS_SECRET_ACCESS_KEY", &wrong)],
    );
    let api = Api::mtls(&daemon, &pki);
    let id = api.submit(&job(&bucket.url("disk.raw"), "vm-refused"));
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("the bucket refused the credentials"), "{error}");
    assert!(error.contains("SignatureDoesNotMatch"), "{error}");
    assert!(!error.contains(&wrong), "the secret is in the error: {error}");
    // And with the digest given, so no sidecar is read, the image GET
    // itself is refused the same way.
    let mut body = job(&bucket.url("disk.raw"), "vm-refused-2");
    body["image_sha256"] = Value::from(digest.clone());
    let id = api.submit(&body);
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "failed", "{status:#}");
    assert!(status["error"].as_str().unwrap().contains("the bucket refused the credentials"));
    assert!(!daemon.volume("vm-refused-2").exists());
}

#[test]
fn s3_endpoint_without_credentials_is_a_start_up_error() {
    let dir = TestDir::new("s3-no-creds");
    let pki = Pki::create(&dir);
    let mut args = Daemon::args(&dir, &pki, &Auth::mtls(), free_port());
    args.extend(["--s3-endpoint".to_string(), "http://127.0.0.1:9".to_string()]);
    let out = Command::new(BIN)
        .args(&args)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("--s3-endpoint needs credentials"), "{text}");
}

/// A presigned URL (a query string) on a signing endpoint goes out
/// untouched, with no `Authorization` of ours beside its own signature,
/// and its sidecar is read from the object path, signed.
#[test]
fn presigned_url_is_fetched_untouched_and_its_sidecar_signed() {
    let dir = TestDir::new("s3-presigned");
    let pki = Pki::create(&dir);
    let images = ImageServer::start(&dir.mkdir("images"));
    let image = images.root().join("disk.raw");
    fs::write(&image, pseudo_random(MIB as usize, 22)).unwrap();
    let digest = write_sidecar(&image);
    let origin = images.url("").trim_end_matches('/').to_string();
    let daemon = Daemon::start_env(
        &dir,
        &pki,
        &["--s3-endpoint", &origin, "--s3-region", "eu-central-1"],
        &[("AWS_ACCESS_KEY_ID", "AKIDTEST"), ("AWS_SECRET_ACCESS_KEY", "test-secret")],
    );
    let api = Api::mtls(&daemon, &pki);
    let presigned = images.url(
        "disk.raw?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=OTHER%2F20260101&X-Amz-Signature=abc",
    );
    let id = api.submit(&job(&presigned, "vm-presigned"));
    let status = api.wait_final(&id, JOB_TIMEOUT);
    assert_eq!(status["status"], "completed", "{status:#}\n{}", daemon.log_text());
    assert_eq!(status["image_sha256"], digest.as_str(), "the sidecar was found and read");

    let image_gets = images.get_log("disk.raw");
    assert_eq!(image_gets.len(), 1, "{image_gets:?}");
    assert!(image_gets[0].query, "the query string was kept: {image_gets:?}");
    assert_eq!(image_gets[0].authorization, None, "a presigned GET got a second signature");
    let sidecar_gets = images.get_log("disk.raw.sha256");
    assert_eq!(sidecar_gets.len(), 1, "sidecar from the object path: {sidecar_gets:?}");
    assert!(!sidecar_gets[0].query, "no query carried over to the sidecar");
    let auth = sidecar_gets[0].authorization.as_deref().unwrap_or_default();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
            && auth.contains("/eu-central-1/s3/aws4_request")
            && auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date"),
        "the sidecar GET is signed for the region: {auth:?}"
    );
    assert!(!auth.contains("test-secret"));
}
