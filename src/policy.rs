//! Source policy: which image URLs a job may name, and which addresses a
//! download may connect to.
//!
//! Two checks, both against the same [`SourcePolicy`]:
//!
//! 1. **URL prefixes** (`--allow-source`, repeatable). When any are given, an
//!    `image_url` must start with one of them; the API refuses the rest with
//!    400 at submission, and the downloader refuses a redirect that leaves
//!    them. No prefixes means every http(s) URL may be named.
//! 2. **Denied networks** (`--deny-network`, repeatable, on top of the
//!    link-local defaults that hold cloud metadata services). Checked on the
//!    addresses a host name resolves to, after resolution and before any
//!    connection is opened, by [`PolicyResolver`], which ureq calls for every
//!    connection it makes, redirect hops included. `--allow-network` punches
//!    a hole for an address the operator really means to reach.
//!
//! This module does not open connections; `fetch.rs` wires the resolver into
//! its ureq agent and checks each redirect hop's URL here.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;

/// Networks refused unless the operator allows them: IPv4 and IPv6
/// link-local, where cloud metadata services (169.254.169.254) answer.
pub const DEFAULT_DENIED: &[&str] = &["169.254.0.0/16", "fe80::/10"];

/// An IP network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// `10.0.0.0/8`, `fe80::/10`, or a bare address (a /32 or /128).
    pub fn parse(text: &str) -> Result<Net, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr =
            addr.trim().parse().map_err(|_| format!("{text:?} is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix =
            match prefix {
                None => max,
                Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                    format!("{text:?} has a prefix length that is not 0 to {max}")
                })?,
            };
        Ok(Net { addr, prefix })
    }

    /// Whether `ip` lies in this network. An IPv4-mapped IPv6 address
    /// (`::ffff:169.254.169.254`) counts as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why the policy refused a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// The URL starts with none of the `--allow-source` prefixes.
    NotAllowed { url: String },
    /// The URL's path climbs out of its prefix with `.` or `..` segments.
    DotSegments { url: String },
    /// A host name resolved to an address in a denied network.
    DeniedAddress { host: String, addr: IpAddr, net: Net },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::NotAllowed { url } => {
                write!(f, "{url} is outside the allowed sources (--allow-source)")
            }
            PolicyError::DotSegments { url } => write!(
                f,
                "{url} has '.' or '..' path segments, which could leave an allowed prefix"
            ),
            PolicyError::DeniedAddress { host, addr, net } => {
                if host.trim_matches(['[', ']']) == addr.to_string() {
                    write!(f, "{addr} is in the denied network {net}")?;
                } else {
                    write!(f, "{host} resolves to {addr}, in the denied network {net}")?;
                }
                write!(f, "; refusing to connect (--allow-network {addr} allows it)")
            }
        }
    }
}

impl std::error::Error for PolicyError {}

/// The checked policy: allowed URL prefixes and networks, denied networks.
#[derive(Debug, Clone, Default)]
pub struct SourcePolicy {
    allow_prefixes: Vec<String>,
    deny: Vec<Net>,
    allow_nets: Vec<Net>,
}

impl SourcePolicy {
    /// Builds the policy from the flags' values; the default denied
    /// networks are always included. Each bad value is one problem.
    pub fn new(
        allow_prefixes: &[String],
        deny: &[String],
        allow_nets: &[String],
    ) -> Result<SourcePolicy, Vec<String>> {
        let mut problems = Vec::new();
        for p in allow_prefixes {
            let ok = p.parse::<Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some_and(|a| !a.host().is_empty())
            });
            if !ok {
                problems.push(format!(
                    "--allow-source {p:?} is not an http:// or https:// URL prefix with a host"
                ));
            }
        }
        let mut nets = |flag: &str, values: &[String]| -> Vec<Net> {
            values
                .iter()
                .filter_map(|v| match Net::parse(v) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        problems.push(format!("{flag}: {e}"));
                        None
                    }
                })
                .collect()
        };
        let mut denied: Vec<Net> =
            DEFAULT_DENIED.iter().map(|d| Net::parse(d).expect("default networks parse")).collect();
        denied.extend(nets("--deny-network", deny));
        let allow_nets = nets("--allow-network", allow_nets);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(SourcePolicy { allow_prefixes: allow_prefixes.to_vec(), deny: denied, allow_nets })
    }

    /// Whether `url` may be named as a source (and followed as a redirect).
    pub fn check_url(&self, url: &str) -> Result<(), PolicyError> {
        if self.allow_prefixes.is_empty() {
            return Ok(());
        }
        let shown = crate::fetch::redact(url);
        if has_dot_segments(url) {
            return Err(PolicyError::DotSegments { url: shown });
        }
        if self.allow_prefixes.iter().any(|p| prefix_matches(p, url)) {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed { url: shown })
        }
    }

    /// Whether a connection to `addr` (which `host` resolved to) may be made.
    pub fn check_addr(&self, host: &str, addr: IpAddr) -> Result<(), PolicyError> {
        if self.allow_nets.iter().any(|n| n.contains(addr)) {
            return Ok(());
        }
        match self.deny.iter().find(|n| n.contains(addr)) {
            Some(net) => {
                Err(PolicyError::DeniedAddress { host: host.to_string(), addr, net: *net })
            }
            None => Ok(()),
        }
    }

    /// Resolves `host:port` with the system resolver and checks every
    /// address. Used for a target a proxy will connect to: we never connect
    /// to it ourselves, but refuse it all the same when our own resolver
    /// says it lies in a denied network. A name we cannot resolve is left
    /// to the proxy.
    ///
    /// Known limitation: the proxy resolves the name again and may get
    /// another answer (or resolve a name we cannot); what it then connects
    /// to is outside this check.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), PolicyError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(addrs) = (bare, port).to_socket_addrs() else {
            log::debug!("{host} does not resolve here; the proxy resolves it");
            return Ok(());
        };
        addrs.into_iter().try_for_each(|a| self.check_addr(host, a.ip()))
    }

    /// The allowed prefixes, for the start-up log.
    pub fn allowed_summary(&self) -> String {
        if self.allow_prefixes.is_empty() {
            "any http(s) URL".into()
        } else {
            format!("only under {}", self.allow_prefixes.join(", "))
        }
    }

    /// The denied networks, defaults first, for the start-up log.
    pub fn denied(&self) -> &[Net] {
        &self.deny
    }
}

/// A prefix that is only an origin (`https://h:9000`) must be followed by
/// the path, so that `https://h` does not admit `https://h.evil.example`;
/// any other prefix is matched as text.
fn prefix_matches(prefix: &str, url: &str) -> bool {
    let Some(rest) = url.strip_prefix(prefix) else {
        return false;
    };
    let origin_only = prefix.split_once("://").is_some_and(|(_, after)| !after.contains('/'));
    !origin_only || rest.is_empty() || rest.starts_with(['/', '?', '#'])
}

/// Whether the URL's path has a `.` or `..` segment, spelled plainly or
/// percent-encoded: a server would resolve it, a prefix check would not.
fn has_dot_segments(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let path = path.split_once("://").map(|(_, p)| p).unwrap_or(path);
    let lowered = path.to_ascii_lowercase().replace("%2e", ".");
    lowered.split('/').skip(1).any(|seg| seg == "." || seg == "..")
}

/// ureq's resolver with the denied networks checked on every answer. A
/// name that resolves to any denied address is refused outright, rather
/// than quietly connecting to its other addresses. Proxies the operator
/// configured are exempt: they are reached on the operator's word.
#[derive(Debug)]
pub struct PolicyResolver {
    pub policy: Arc<SourcePolicy>,
    /// `host:port` of each configured proxy.
    pub exempt: Vec<String>,
    inner: DefaultResolver,
}

impl PolicyResolver {
    pub fn new(policy: Arc<SourcePolicy>, exempt: Vec<String>) -> PolicyResolver {
        PolicyResolver { policy, exempt, inner: DefaultResolver::default() }
    }
}

impl Resolver for PolicyResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let addrs = self.inner.resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        let port =
            uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        if self.exempt.iter().any(|e| *e == format!("{host}:{port}")) {
            return Ok(addrs);
        }
        for a in addrs.iter() {
            let a: &SocketAddr = a;
            if let Err(e) = self.policy.check_addr(host, a.ip()) {
                return Err(ureq::Error::Io(io::Error::new(io::ErrorKind::PermissionDenied, e)));
            }
        }
        Ok(addrs)
    }
}

/// The policy refusal inside a ureq error, if that is what it is.
pub fn refusal(e: &ureq::Error) -> Option<&PolicyError> {
    match e {
        ureq::Error::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref::<PolicyError>()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str], allow_nets: &[&str]) -> SourcePolicy {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        SourcePolicy::new(&v(allow), &v(deny), &v(allow_nets)).unwrap()
    }

    #[test]
    fn test_networks() {
        let n = Net::parse("169.254.0.0/16").unwrap();
        assert!(n.contains("169.254.169.254".parse().unwrap()));
        assert!(n.contains("::ffff:169.254.169.254".parse().unwrap()));
        assert!(!n.contains("169.255.0.1".parse().unwrap()));
        let v6 = Net::parse("fe80::/10").unwrap();
        assert!(v6.contains("fe80::1".parse().unwrap()));
        assert!(v6.contains("febf::1".parse().unwrap()));
        assert!(!v6.contains("fec0::1".parse().unwrap()));
        assert!(Net::parse("127.0.0.2").unwrap().contains("127.0.0.2".parse().unwrap()));
        assert!(!Net::parse("127.0.0.2").unwrap().contains("127.0.0.1".parse().unwrap()));
        assert!(Net::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(Net::parse("10.0.0.0/33").is_err());
        assert!(Net::parse("nonsense").is_err());
    }

    #[test]
    fn test_denied_by_default_and_allowed_back() {
        let p = policy(&[], &[], &[]);
        assert!(p.check_addr("metadata", "169.254.169.254".parse().unwrap()).is_err());
        assert!(p.check_addr("x", "fe80::1".parse().unwrap()).is_err());
        assert!(p.check_addr("x", "127.0.0.1".parse().unwrap()).is_ok());
        let p = policy(&[], &["127.0.0.2/32"], &["169.254.10.0/24"]);
        let e = p.check_addr("h", "127.0.0.2".parse().unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "h resolves to 127.0.0.2, in the denied network 127.0.0.2/32; refusing to connect \
             (--allow-network 127.0.0.2 allows it)"
        );
        let e = p.check_addr("127.0.0.2", "127.0.0.2".parse().unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("127.0.0.2 is in the denied network 127.0.0.2/32;"));
        assert!(p.check_addr("h", "169.254.10.5".parse().unwrap()).is_ok());
        assert!(p.check_addr("h", "169.254.11.5".parse().unwrap()).is_err());
    }

    #[test]
    fn test_prefixes() {
        let p = policy(&["https://minio.example.com", "http://h/images/"], &[], &[]);
        assert!(p.check_url("https://minio.example.com/a.qcow2").is_ok());
        assert!(p.check_url("https://minio.example.com.evil.net/a.qcow2").is_err());
        assert!(p.check_url("https://minio.example.com:9000/a.qcow2").is_err());
        assert!(p.check_url("http://h/images/a.raw").is_ok());
        assert!(p.check_url("http://h/other/a.raw").is_err());
        assert_eq!(
            p.check_url("http://h/images/../secret/a.raw"),
            Err(PolicyError::DotSegments { url: "http://h/images/../secret/a.raw".into() })
        );
        assert!(p.check_url("http://h/images/%2E%2e/secret/a.raw").is_err());
        assert_eq!(
            p.check_url("http://other/a?sig=1").unwrap_err().to_string(),
            "http://other/a?… is outside the allowed sources (--allow-source)"
        );
        // No prefixes: everything may be named.
        assert!(policy(&[], &[], &[]).check_url("http://anything/x").is_ok());
    }

    #[test]
    fn test_bad_flags_are_each_reported() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let errs =
            SourcePolicy::new(&v(&["ftp://x/"]), &v(&["10.0.0.0/40"]), &v(&["nope"])).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
