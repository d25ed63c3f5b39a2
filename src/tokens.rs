//! The API tokens file.
//!
//! One token per line, `name:sha256:<64 hex>`: the file never holds a token
//! in clear. Older files may hold `name:token` lines; they are accepted with
//! a warning and hashed on load, so only digests stay in memory. Blank lines
//! and lines starting with `#` are ignored. A presented token is hashed and
//! compared with every entry in constant time.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Random bytes in a minted token: 256 bits, like the digest that stores it.
const TOKEN_BYTES: usize = 32;

/// The tokens the daemon accepts.
#[derive(Debug, Clone)]
pub struct TokenSet {
    entries: Vec<(String, [u8; 32])>,
}

/// A tokens file that could not be read or used.
#[derive(Debug)]
pub enum TokenError {
    /// The file could not be opened, read or written.
    Io { path: PathBuf, source: io::Error },
    /// A line is neither `name:sha256:<hex>` nor `name:token`.
    Malformed { path: PathBuf, line: usize, reason: &'static str },
    /// The file holds no token at all, so nobody could authenticate.
    Empty { path: PathBuf },
    /// `token new` was given a name that is unusable or already taken.
    BadName { name: String, reason: &'static str },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Io { path, .. } => write!(f, "tokens file {}", path.display()),
            TokenError::Malformed { path, line, reason } => {
                write!(f, "tokens file {} line {line}: {reason}", path.display())
            }
            TokenError::Empty { path } => {
                write!(f, "tokens file {} holds no token", path.display())
            }
            TokenError::BadName { name, reason } => write!(f, "token name {name:?} {reason}"),
        }
    }
}

impl std::error::Error for TokenError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TokenError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl TokenSet {
    /// Loads and checks a tokens file. Legacy clear-text lines are logged
    /// once each, by name, at warn.
    pub fn load(path: &Path) -> Result<TokenSet, TokenError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenError::Io { path: path.to_path_buf(), source })?;
        let set = Self::parse(&text, path)?;
        if set.entries.is_empty() {
            return Err(TokenError::Empty { path: path.to_path_buf() });
        }
        Ok(set)
    }

    fn parse(text: &str, path: &Path) -> Result<TokenSet, TokenError> {
        let mut entries = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                |reason| TokenError::Malformed { path: path.to_path_buf(), line: i + 1, reason };
            let (name, rest) =
                line.split_once(':').ok_or_else(|| bad("expected name:sha256:<hex>"))?;
            check_name(name).map_err(|_| bad("name must be letters, digits, '.', '_' or '-'"))?;
            let digest = match rest.strip_prefix("sha256:") {
                Some(hex) => parse_hex32(hex).ok_or_else(|| bad("sha256 must be 64 hex digits"))?,
                None => {
                    if rest.is_empty() {
                        return Err(bad("empty token"));
                    }
                    log::warn!(
                        "tokens file {} line {}: token {name:?} is stored in clear; \
                         replace it with a hashed line (token new)",
                        path.display(),
                        i + 1
                    );
                    sha256(rest.as_bytes())
                }
            };
            entries.push((name.to_string(), digest));
        }
        Ok(TokenSet { entries })
    }

    /// The name of the token `presented`, if it is one of ours.
    pub fn verify(&self, presented: &str) -> Option<&str> {
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        // Look at every entry, so the time taken does not say which matched.
        for (name, stored) in &self.entries {
            if constant_time_eq(stored, &digest) && found.is_none() {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Mints a token called `name`, appends its hash to `path` (created 0600)
/// and returns the token, which is shown to the operator once.
pub fn mint(path: &Path, name: &str) -> Result<String, TokenError> {
    check_name(name)?;
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => TokenSet::parse(&text, path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => TokenSet { entries: Vec::new() },
        Err(source) => return Err(TokenError::Io { path: path.to_path_buf(), source }),
    };
    if existing.entries.iter().any(|(n, _)| n == name) {
        return Err(TokenError::BadName { name: name.into(), reason: "is already in the file" });
    }
    let mut raw = [0u8; TOKEN_BYTES];
    let io_err = |source| TokenError::Io { path: path.to_path_buf(), source };
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut raw))
        .map_err(io_err)?;
    let token = hex(&raw);
    let line = format!("{name}:sha256:{}\n", hex(&sha256(token.as_bytes())));
    let mut file =
        OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io_err)?;
    file.write_all(line.as_bytes()).and_then(|()| file.sync_all()).map_err(io_err)?;
    Ok(token)
}

fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(TokenError::BadName {
            name: name.into(),
            reason: "must be 1 to 64 letters, digits, '.', '_' or '-'",
        })
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TokenSet, TokenError> {
        TokenSet::parse(text, Path::new("t"))
    }

    #[test]
    fn test_hashed_and_legacy_lines_verify() {
        let hashed = hex(&sha256(b"s3cret"));
        let set = parse(&format!("# ops\n\nci:sha256:{hashed}\nold:plain-token\n")).unwrap();
        assert_eq!(set.verify("s3cret"), Some("ci"));
        assert_eq!(set.verify("plain-token"), Some("old"));
        assert_eq!(set.verify("wrong"), None);
        assert_eq!(set.verify(&hashed), None, "the stored hash is not itself a token");
    }

    #[test]
    fn test_malformed_lines_name_the_line() {
        let err = parse("ok:sha256:abcd\n").unwrap_err();
        assert_eq!(err.to_string(), "tokens file t line 1: sha256 must be 64 hex digits");
        let err = parse("# c\nno-colon-here\n").unwrap_err();
        assert_eq!(err.to_string(), "tokens file t line 2: expected name:sha256:<hex>");
        assert!(parse("bad name:x").is_err());
        assert!(parse("empty:").is_err());
    }

    #[test]
    fn test_mint_appends_hash_only_and_refuses_duplicates() {
        let dir = std::env::temp_dir().join(format!("lvp-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        let _ = std::fs::remove_file(&path);
        let token = mint(&path, "ci").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the token itself must not be stored");
        assert_eq!(TokenSet::load(&path).unwrap().verify(&token), Some("ci"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(mint(&path, "ci").is_err());
        assert!(mint(&path, "has space").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
