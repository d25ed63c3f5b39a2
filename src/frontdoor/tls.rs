//! The rustls `ServerConfig`: server certificate and key, and the client CA
//! verifier. Client certificates are optional only when API tokens are
//! configured; without tokens the handshake itself demands one.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Builds the TLS configuration. Every error names the flag and the file.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    tokens_configured: bool,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(ring::default_provider());
    let chain = load_certs(cert, "--tls-cert")?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key {}: no usable PEM private key ({e})", key.display()))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS protocol setup failed: {e}"))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs(ca, "--client-ca")? {
                roots.add(c).map_err(|e| {
                    format!("--client-ca {}: certificate not usable as a CA ({e})", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            // Without a certificate a client can still authenticate with a
            // token, but only when tokens exist; otherwise the handshake fails.
            let verifier =
                if tokens_configured { verifier.allow_unauthenticated() } else { verifier };
            let verifier =
                verifier.build().map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key_der).map_err(|e| {
        format!("--tls-key {} does not match --tls-cert {} ({e})", key.display(), cert.display())
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn load_certs(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: cannot read PEM file ({e})", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {}: bad PEM certificate ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{flag} {}: no certificate in file", path.display()));
    }
    Ok(certs)
}

/// The subject of a DER client certificate, as `CN=…,O=…`, for logs and
/// audit. Falls back to a fixed text for a certificate that does not parse
/// (rustls already verified it, so this only affects the label).
pub fn subject_of(cert: &CertificateDer<'_>) -> String {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, parsed)) => {
            let subject = parsed.subject();
            let cn = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok());
            match cn {
                Some(cn) => format!("CN={cn}"),
                None => subject.to_string(),
            }
        }
        Err(_) => "unparsed-certificate".to_string(),
    }
}
