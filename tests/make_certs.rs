//! `scripts/make-certs.sh`: a CA, a server and a client certificate that
//! openssl verifies against that CA, and a CA whose name is its own, so
//! that a certificate from another run is refused as unknown rather than
//! as a bad signature.

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

#[test]
fn help_prints_the_usage_and_succeeds() {
    for name in ["make-certs.sh", "install.sh", "fleet-provision.sh"] {
        let out = run_any(Command::new(script(name)).arg("--help"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help: {}", output_text(&out));
        assert!(text.starts_with("Usage: scripts/"), "{name} --help printed {text:?}");
    }
}
