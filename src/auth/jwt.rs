//! `auth = { type = "jwt", keys = "FILE", ... }`: signed tokens (JWS compact form) checked
//! against keys from a JWKS document or a PEM public key (or an HMAC secret, only when an
//! HS* algorithm is named in `algorithms`). `type = "oidc"` checks tokens the same way, with
//! a key set fetched from the issuer ([`super::oidc`], [`JwtKeys::from_issuer`]).
//!
//! Checks, in order, each a reason of its own: the header parses (`malformed`), its `alg` is
//! allowed (`algorithm`), a key fits its `kid` and `alg` (`unknown_key`), the signature
//! (`signature`), `exp` (`expired`, required), `nbf` (`not_yet_valid`), `iss` (`issuer`), `aud`
//! (`audience`), then the user claim (`claims`).

use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::Value;

use super::{AuthError, Identity, clean_name};
use crate::config::{JwtConfig, KeySource};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// Which family of algorithms a key serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
    Hmac,
}

fn family(a: Algorithm) -> Family {
    use Algorithm::*;
    match a {
        HS256 | HS384 | HS512 => Family::Hmac,
        ES256 | ES384 => Family::Ec,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        EdDSA => Family::Ed,
    }
}

struct Key {
    kid: Option<String>,
    family: Family,
    key: DecodingKey,
}

/// The loaded keys.
pub struct JwtKeys {
    keys: Vec<Key>,
}

impl JwtKeys {
    /// No keys: every token is `unknown_key` (an OIDC issuer not reached yet).
    pub fn empty() -> JwtKeys {
        JwtKeys { keys: Vec::new() }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// An issuer's key set (`jwks_uri`): keys this sclb cannot use (another `kty`, `use` =
    /// `enc`, a symmetric key, a malformed entry) are skipped, as a relying party must, since
    /// issuers publish keys for other purposes beside the signing ones. At most 256 keys.
    pub fn from_issuer(body: &[u8], cfg: &JwtConfig) -> Result<JwtKeys, String> {
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set =
            serde_json::from_slice(body).map_err(|e| format!("the key set is not a JWKS: {e}"))?;
        let mut keys = Vec::new();
        for v in set.keys.into_iter().take(256) {
            let Ok(jwk) = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(v) else {
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let fam = match jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                AlgorithmParameters::OctetKey(_) => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(&jwk) else {
                continue;
            };
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                family: fam,
                key,
            });
        }
        if !keys
            .iter()
            .any(|k| cfg.algorithms.iter().any(|a| family(*a) == k.family))
        {
            return Err("the key set holds no key for any of the allowed algorithms".into());
        }
        Ok(JwtKeys { keys })
    }

    /// Keys from the file `keys = "..."` names.
    pub fn load(cfg: &JwtConfig) -> Result<JwtKeys, KeysError> {
        let KeySource::File(path) = &cfg.keys else {
            return Ok(JwtKeys::empty());
        };
        let path: &Path = path;
        let p = path.display().to_string();
        let invalid = |message: String| KeysError::Invalid {
            path: p.clone(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|source| KeysError::Read {
            path: p.clone(),
            source,
        })?;
        if meta.len() > 4 << 20 {
            return Err(invalid(format!("{} bytes, more than 4 MiB", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|source| KeysError::Read {
            path: p.clone(),
            source,
        })?;
        let hmac_named = cfg.algorithms.iter().any(|a| family(*a) == Family::Hmac);
        let text = String::from_utf8_lossy(&bytes);
        let keys = if text.trim_start().starts_with('{') {
            let set: JwkSet =
                serde_json::from_str(&text).map_err(|e| invalid(format!("not a JWKS: {e}")))?;
            let mut keys = Vec::new();
            for (i, jwk) in set.keys.iter().enumerate() {
                let fam = match jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Family::Rsa,
                    AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                    AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                    AlgorithmParameters::OctetKey(_) if hmac_named => Family::Hmac,
                    // A symmetric key in a key set is only used when HMAC is asked for.
                    AlgorithmParameters::OctetKey(_) => continue,
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| invalid(format!("keys[{i}]: not a usable key: {e}")))?;
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    family: fam,
                    key,
                });
            }
            keys
        } else if text.contains("-----BEGIN") {
            let pem = bytes.as_slice();
            let (family, key) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (Family::Rsa, k)
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (Family::Ec, k)
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (Family::Ed, k)
            } else {
                return Err(invalid(
                    "no RSA, EC or Ed25519 public key in this PEM file".into(),
                ));
            };
            vec![Key {
                kid: None,
                family,
                key,
            }]
        } else if hmac_named {
            let secret = text.trim();
            if secret.len() < 32 {
                return Err(invalid("an HMAC secret must be at least 32 bytes".into()));
            }
            vec![Key {
                kid: None,
                family: Family::Hmac,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }]
        } else {
            return Err(invalid(
                "neither a JWKS document nor a PEM public key (an HMAC secret needs an HS* algorithm in algorithms)".into(),
            ));
        };
        if !keys
            .iter()
            .any(|k| cfg.algorithms.iter().any(|a| family(*a) == k.family))
        {
            return Err(invalid(
                "no key here serves any of the allowed algorithms".into(),
            ));
        }
        Ok(JwtKeys { keys })
    }

    /// Checks `token` and reads its identity.
    pub fn verify(&self, token: &str, cfg: &JwtConfig) -> Result<Identity, AuthError> {
        let header = decode_header(token)
            .map_err(|_| AuthError::new("malformed", "the token is not a JWT (header)"))?;
        if !cfg.algorithms.contains(&header.alg) {
            return Err(AuthError::new(
                "algorithm",
                format!("the token's algorithm {:?} is not allowed", header.alg),
            ));
        }
        let fam = family(header.alg);
        let candidates: Vec<&Key> = self
            .keys
            .iter()
            .filter(|k| k.family == fam)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::new(
                "unknown_key",
                "no key fits the token's kid and algorithm",
            ));
        }
        let mut v = Validation::new(header.alg);
        v.leeway = cfg.leeway.as_secs();
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        match &cfg.issuer {
            Some(iss) => {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            None => v.iss = None,
        }
        match &cfg.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        let mut last = None;
        for k in candidates {
            match decode::<Value>(token, &k.key, &v) {
                Ok(data) => return identity(&data.claims, cfg),
                Err(e) => {
                    let signature =
                        matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature);
                    last = Some(e);
                    // Another key with the same kid-less family may still verify it.
                    if !signature {
                        break;
                    }
                }
            }
        }
        Err(refusal(last.expect("at least one candidate was tried")))
    }
}

fn refusal(e: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind::*;
    match e.kind() {
        InvalidSignature => AuthError::new("signature", "the token's signature does not verify"),
        ExpiredSignature => AuthError::new("expired", "the token has expired (exp)"),
        ImmatureSignature => AuthError::new("not_yet_valid", "the token is not valid yet (nbf)"),
        InvalidIssuer => AuthError::new(
            "issuer",
            "the token's issuer (iss) is not the one configured",
        ),
        InvalidAudience => AuthError::new(
            "audience",
            "the token's audience (aud) is not the one configured",
        ),
        MissingRequiredClaim(c) => AuthError::new(
            "claims",
            format!(
                "the token has no {} claim",
                crate::config::reader::bounded(c)
            ),
        ),
        InvalidAlgorithm => {
            AuthError::new("algorithm", "the token's algorithm does not fit its key")
        }
        _ => AuthError::new("malformed", "the token is not a well-formed JWT"),
    }
}

/// A claim as a name: a string, or the first string of an array.
fn claim(claims: &Value, name: &str) -> Option<String> {
    match claims.get(name)? {
        Value::String(s) => clean_name(s),
        Value::Array(a) => a.iter().find_map(|v| v.as_str()).and_then(clean_name),
        _ => None,
    }
}

fn identity(claims: &Value, cfg: &JwtConfig) -> Result<Identity, AuthError> {
    let c = &cfg.claims;
    let user = claim(claims, &c.user).ok_or_else(|| {
        AuthError::new(
            "claims",
            format!(
                "the token has no usable user claim {} (1-256 characters)",
                crate::config::reader::bounded(&c.user)
            ),
        )
    })?;
    let groups = match claims.get(&c.groups) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().and_then(clean_name))
            .take(256)
            .collect(),
        Some(Value::String(s)) => clean_name(s).into_iter().collect(),
        _ => Vec::new(),
    };
    Ok(Identity {
        user,
        team: claim(claims, &c.team),
        environment: claim(claims, &c.environment),
        groups,
        via: match cfg.keys {
            KeySource::File(_) => "jwt",
            KeySource::Oidc(_) => "oidc",
        },
        expires_at: claims
            .get("exp")
            .and_then(Value::as_u64)
            .map(|e| e.saturating_add(cfg.leeway.as_secs())),
    })
}
