//! `scripts/make-certs.sh`: a CA, a server and a client certificate that
//! openssl verifies against that CA, and a CA whose name is its own, so
//! that a certificate from another run is refused as unknown rather than
//! as a bad signature. With `--ca-dir`, an existing CA signs a second
//! host's server certificate and another client certificate, and is left
//! as it was.

mod common;

use std::process::Command;

use common::*;

fn make_certs(out: &std::path::Path) {
    run(Command::new(script("make-certs.sh")).arg("localhost").arg(out));
}

fn subject(cert: &std::path::Path) -> String {
    let out = run(Command::new("openssl").args(["x509", "-noout", "-subject", "-in"]).arg(cert));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `openssl verify -CAfile ca cert`: its exit status and output.
fn verify(ca: &std::path::Path, cert: &std::path::Path) -> (bool, String) {
    let out = run_any(Command::new("openssl").arg("verify").arg("-CAfile").arg(ca).arg(cert));
    (out.status.success(), output_text(&out))
}

#[test]
fn each_run_makes_a_ca_of_its_own_name_that_signs_its_certificates() {
    let dir = TestDir::new("make-certs");
    let (a, b) = (dir.join("a"), dir.join("b"));
    make_certs(&a);
    make_certs(&b);
    for leaf in ["server.crt", "client.crt"] {
        let (ok, text) = verify(&a.join("ca.crt"), &a.join(leaf));
        assert!(ok, "{leaf} does not verify against its CA: {text}");
    }
    let (sa, sb) = (subject(&a.join("ca.crt")), subject(&b.join("ca.crt")));
    assert!(sa.contains("libvirt-volume-provisioner CA localhost"), "{sa}");
    assert_ne!(sa, sb, "two runs made CAs of one name");
    let (ok, text) = verify(&a.join("ca.crt"), &b.join("client.crt"));
    assert!(!ok && text.contains("unable to get local issuer"), "{text}");

    // A second run into the same directory keeps the CA.
    let again = run_any(Command::new(script("make-certs.sh")).arg("localhost").arg(&a));
    assert!(!again.status.success(), "{}", output_text(&again));
    assert_eq!(subject(&a.join("ca.crt")), sa);
}

/// The script could once only make a new CA, so a second hypervisor (or a
/// second client) could not get a certificate from the first one's CA.
#[test]
fn an_existing_ca_signs_a_second_host_and_a_second_client_and_stays_as_it_was() {
    let dir = TestDir::new("make-certs-ca-dir");
    let (first, second) = (dir.join("hv1"), dir.join("hv2"));
    make_certs(&first);
    let ca_before = (
        std::fs::read(first.join("ca.crt")).unwrap(),
        std::fs::read(first.join("ca.key")).unwrap(),
    );
    let sign = || {
        run_any(
            Command::new(script("make-certs.sh"))
                .arg("--ca-dir")
                .arg(&first)
                .args(["--client-name", "ci-runner", "hv2.example.com"])
                .arg(&second),
        )
    };
    let out = sign();
    assert!(out.status.success(), "{}", output_text(&out));

    for leaf in ["server.crt", "ci-runner.crt"] {
        let (ok, text) = verify(&first.join("ca.crt"), &second.join(leaf));
        assert!(ok, "{leaf} does not verify against the first host's CA: {text}");
    }
    assert!(subject(&second.join("server.crt")).contains("CN = hv2.example.com"));
    assert!(subject(&second.join("ci-runner.crt")).contains("CN = ci-runner"));
    // The CA was only read: same bytes, and its key was not copied along.
    let ca_after = (
        std::fs::read(first.join("ca.crt")).unwrap(),
        std::fs::read(first.join("ca.key")).unwrap(),
    );
    assert!(ca_before == ca_after, "the CA in {} was replaced", first.display());
    assert_eq!(std::fs::read(second.join("ca.crt")).unwrap(), ca_before.0);
    assert!(!second.join("ca.key").exists(), "ca.key was copied to the host's directory");

    // A second run would replace the keys it made: it refuses instead.
    let key = std::fs::read(second.join("server.key")).unwrap();
    let again = sign();
    assert!(!again.status.success(), "{}", output_text(&again));
    assert!(output_text(&again).contains("already exists"), "{}", output_text(&again));
    assert_eq!(std::fs::read(second.join("server.key")).unwrap(), key);
}

#[test]
fn help_prints_the_usage_and_succeeds() {
    for name in ["make-certs.sh", "install.sh", "fleet-provision.sh"] {
        let out = run_any(Command::new(script(name)).arg("--help"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help: {}", output_text(&out));
        assert!(text.starts_with("Usage: scripts/"), "{name} --help printed {text:?}");
    }
}

#[test]
fn no_key_is_written_over_a_file_or_through_a_link_and_the_ca_dir_is_only_read() {
    let dir = TestDir::new("make-certs-refusals");
    let certs = |args: &[&std::path::Path]| {
        run_any(Command::new(script("make-certs.sh")).args(args.iter().map(|p| p.as_os_str())))
    };

    // An existing server key in a directory without a CA stays as it is.
    let kept = dir.mkdir("kept");
    std::fs::write(kept.join("server.key"), "KEEP\n").unwrap();
    let out = certs(&[std::path::Path::new("localhost"), &kept]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("server.key already exists"), "{}", output_text(&out));
    assert_eq!(std::fs::read_to_string(kept.join("server.key")).unwrap(), "KEEP\n");

    // A dangling link is not followed to write a key somewhere else.
    let ca = dir.mkdir("ca");
    make_certs(&ca);
    let linked = dir.mkdir("linked");
    let target = ca.join("planted.key");
    std::os::unix::fs::symlink(&target, linked.join("server.key")).unwrap();
    let out = certs(&[std::path::Path::new("--ca-dir"), &ca, std::path::Path::new("h2"), &linked]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(output_text(&out).contains("is a symbolic link"), "{}", output_text(&out));
    assert!(!target.exists(), "a key was written through the link");

    // OUTDIR may not be the CA directory itself.
    let before = std::fs::read(ca.join("ca.key")).unwrap();
    let out = certs(&[
        std::path::Path::new("--ca-dir"),
        &ca,
        std::path::Path::new("--client-name"),
        std::path::Path::new("ci"),
        &ca,
    ]);
    assert!(!out.status.success(), "{}", output_text(&out));
    assert!(!ca.join("ci.key").exists(), "a key was written into the CA directory");
    assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), before);
}
