//! `auth = { type = "static", tokens = "FILE" }`: a TOML file of token hashes.
//!
//! ```toml
//! [[token]]
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! user = "alice"
//! team = "data-eng"          # optional
//! environment = "prod"       # optional
//! groups = ["analysts"]      # optional
//! ```
//!
//! The file holds SHA-256 digests, never tokens (`printf %s "$TOKEN" | sha256sum`). A
//! presented token is hashed and compared with every entry in constant time.

use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{AuthError, Identity, clean_name};

#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    sha256: String,
    user: String,
    team: Option<String>,
    environment: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// The loaded token file.
#[derive(Default)]
pub struct StaticTokens {
    entries: Vec<([u8; 32], Identity)>,
}

/// Most entries a token file may hold.
const MAX_ENTRIES: usize = 100_000;

impl StaticTokens {
    pub fn load(path: &Path) -> Result<StaticTokens, StaticError> {
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| StaticError::Read {
            path: p.clone(),
            source,
        })?;
        let invalid = |message: String| StaticError::Invalid {
            path: p.clone(),
            message,
        };
        if meta.len() > 64 << 20 {
            return Err(invalid(format!("{} bytes, more than 64 MiB", meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|source| StaticError::Read {
            path: p.clone(),
            source,
        })?;
        let file: File = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if file.token.len() > MAX_ENTRIES {
            return Err(invalid(format!("more than {MAX_ENTRIES} tokens")));
        }
        let mut entries = Vec::with_capacity(file.token.len());
        for (i, e) in file.token.into_iter().enumerate() {
            let at = |field: &str, what: &str| invalid(format!("token[{i}].{field}: {what}"));
            let mut digest = [0u8; 32];
            let hex = e.sha256.trim().to_ascii_lowercase();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(at(
                    "sha256",
                    "not 64 hex digits (printf %s \"$TOKEN\" | sha256sum)",
                ));
            }
            for (j, d) in digest.iter_mut().enumerate() {
                *d = u8::from_str_radix(&hex[2 * j..2 * j + 2], 16).expect("checked hex");
            }
            let name = |field: &str, v: String| {
                clean_name(&v).ok_or_else(|| at(field, "1-256 characters, no control characters"))
            };
            let identity = Identity {
                user: name("user", e.user)?,
                team: e.team.map(|t| name("team", t)).transpose()?,
                environment: e.environment.map(|t| name("environment", t)).transpose()?,
                groups: e
                    .groups
                    .into_iter()
                    .map(|g| name("groups", g))
                    .collect::<Result<_, _>>()?,
                via: "static",
                expires_at: None,
            };
            entries.push((digest, identity));
        }
        Ok(StaticTokens { entries })
    }

    /// The identity of `token`; every entry is compared, in constant time.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found: Option<&Identity> = None;
        for (d, id) in &self.entries {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(id);
            }
        }
        found.cloned().ok_or_else(|| {
            AuthError::new("unknown_token", "the token is not in the static token file")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn a_token_maps_to_its_identity_and_others_are_refused() {
        let hash = hex(&Sha256::digest(b"s3cret"));
        let f = file(&format!(
            "[[token]]\nsha256 = \"{hash}\"\nuser = \"alice\"\nteam = \"data\"\ngroups = [\"eng\"]\n"
        ));
        let t = StaticTokens::load(f.path()).unwrap();
        let id = t.verify("s3cret").unwrap();
        assert_eq!(
            (id.user.as_str(), id.team.as_deref()),
            ("alice", Some("data"))
        );
        assert_eq!(id.groups, vec!["eng".to_string()]);
        let e = t.verify("other").unwrap_err();
        assert_eq!(e.reason, "unknown_token");
        assert!(!e.message.contains("other"));
    }

    #[test]
    fn a_bad_file_says_which_entry_and_field() {
        let f = file("[[token]]\nsha256 = \"xyz\"\nuser = \"a\"\n");
        let e = StaticTokens::load(f.path()).err().unwrap().to_string();
        assert!(e.contains("token[0].sha256"), "{e}");
        let f = file("[[token]]\nsha = \"x\"\n");
        let e = StaticTokens::load(f.path()).err().unwrap().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
}
