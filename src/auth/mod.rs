//! Who a gateway client is: the token of every RPC (`authorization: Bearer`) checked against
//! the frontend's `auth` ([`static_tokens`]: SHA-256 hashes of tokens in a file; [`jwt`]: signed
//! tokens against keys from a PEM or JWKS file, or from an OpenID Connect issuer ([`oidc`])),
//! or the verified client certificate of an mTLS connection ([`crate::tls::peer_identity`]).
//!
//! Owns each frontend's loaded token file or keys, re-read when the file changes (a file that
//! no longer loads keeps the previous one and logs why) or fetched from the issuer, and the
//! `sclb_auth_*` metrics.
//! What leaves is an [`Identity`]; a failure is an [`AuthError`] whose message names the check
//! that failed, never the token.

pub mod https;
pub mod jwt;
mod oidc;
pub mod static_tokens;

pub use jwt::JwtKeys;
pub use static_tokens::StaticTokens;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

use crate::config::{AuthConfig, Config, KeySource};
use crate::tls::{Stamp, stamp};

/// Longest identity (user, team, environment, group) accepted from a token or certificate: it
/// becomes Spark's `user_id`, a log field and a session key.
pub const MAX_NAME: usize = 256;

/// A verified client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Becomes `user_context.user_id` of every request, and owns the sessions it opens.
    pub user: String,
    pub team: Option<String>,
    pub environment: Option<String>,
    pub groups: Vec<String>,
    /// How it was proven: `static`, `jwt`, `oidc` or `mtls`.
    pub via: &'static str,
    /// When the proof stops being valid (a JWT's `exp` plus leeway), in Unix seconds.
    pub expires_at: Option<u64>,
}

/// A name from a token or certificate, if it is usable: 1-256 printable characters.
pub fn clean_name(s: &str) -> Option<String> {
    let ok = !s.is_empty() && s.len() <= MAX_NAME && !s.chars().any(char::is_control);
    ok.then(|| s.to_string())
}

impl Identity {
    pub fn from_certificate(name: &str) -> Option<Identity> {
        Some(Identity {
            user: clean_name(name)?,
            team: None,
            environment: None,
            groups: Vec::new(),
            via: "mtls",
            expires_at: None,
        })
    }
}

/// Why a client was not let in. The reason is a fixed word (the metric's label); the message
/// says which check failed and never quotes the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthError {
    pub reason: &'static str,
    pub message: String,
}

impl AuthError {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        AuthError {
            reason,
            message: message.into(),
        }
    }
}

/// The bearer token of an `authorization` header value.
pub fn bearer(value: Option<&http::HeaderValue>) -> Result<&str, AuthError> {
    let Some(v) = value else {
        return Err(AuthError::new(
            "missing_token",
            "no authorization header (connect with sc://host:port/;token=...)",
        ));
    };
    let v = v
        .to_str()
        .map_err(|_| AuthError::new("malformed", "the authorization header is not ASCII"))?;
    let (scheme, token) = v.split_once(' ').ok_or_else(|| {
        AuthError::new(
            "malformed",
            "the authorization header is not \"Bearer <token>\"",
        )
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::new(
            "malformed",
            "the authorization header is not \"Bearer <token>\"",
        ));
    }
    Ok(token.trim())
}

/// A frontend's loaded token file or keys.
enum Loaded {
    Static(StaticTokens),
    Jwt(JwtKeys),
}

impl Loaded {
    fn load(cfg: &AuthConfig) -> Result<Loaded, String> {
        match cfg {
            AuthConfig::Static { tokens } => StaticTokens::load(tokens)
                .map(Loaded::Static)
                .map_err(|e| e.to_string()),
            AuthConfig::Jwt(j) => JwtKeys::load(j).map(Loaded::Jwt).map_err(|e| e.to_string()),
        }
    }
}

/// One frontend's authenticator.
pub struct FrontendAuth {
    frontend: String,
    settings: AuthConfig,
    /// `type = "oidc"`: where the keys are fetched from.
    issuer: Option<oidc::Issuer>,
    loaded: ArcSwap<Loaded>,
    seen: Mutex<Stamp>,
    /// Bumped on every successful re-read (so connections re-check cached tokens).
    pub generation: std::sync::atomic::AtomicU64,
}

impl FrontendAuth {
    /// The file the tokens or keys are read from (none for an OIDC issuer).
    fn file(&self) -> Option<&std::path::Path> {
        match &self.settings {
            AuthConfig::Static { tokens } => Some(tokens),
            AuthConfig::Jwt(j) => match &j.keys {
                KeySource::File(f) => Some(f),
                KeySource::Oidc(_) => None,
            },
        }
    }

    /// Checks a bearer token; with an OIDC issuer, a token whose key is not cached makes the
    /// keys be fetched again (rate-limited, see [`oidc`]).
    pub async fn check(&self, token: &str) -> Result<Identity, AuthError> {
        let seen = self.generation.load(std::sync::atomic::Ordering::Relaxed);
        match self.verify(token) {
            Err(e) if e.reason == "unknown_key" && self.issuer.is_some() => {
                match self.look_for_key(seen).await {
                    Ok(()) => self.verify(token),
                    Err(why) => Err(AuthError::new(
                        "unknown_key",
                        format!("{}, and {why}", e.message),
                    )),
                }
            }
            r => r,
        }
    }

    /// Checks a bearer token against the keys or tokens loaded now.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > 16 * 1024 {
            return Err(AuthError::new(
                "malformed",
                "the token is longer than 16 KiB",
            ));
        }
        match (&**self.loaded.load(), &self.settings) {
            (Loaded::Static(t), _) => t.verify(token),
            (Loaded::Jwt(k), AuthConfig::Jwt(cfg)) => k.verify(token, cfg),
            (Loaded::Jwt(_), _) => Err(AuthError::new("internal", "auth settings changed")),
        }
    }

    fn refresh(&self, frontend: &str) {
        let Some(file) = self.file() else {
            return;
        };
        let now = stamp(file);
        let mut seen = self.seen.lock();
        if *seen == now {
            return;
        }
        *seen = now;
        drop(seen);
        match Loaded::load(&self.settings) {
            Ok(l) => {
                self.loaded.store(Arc::new(l));
                self.generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(frontend, file = %file.display(), "auth file reloaded");
            }
            Err(e) => warn!(
                frontend,
                "auth file changed but cannot be used, keeping the previous one: {e}"
            ),
        }
    }
}

type FailureLabels = [(&'static str, String); 2];
type FrontendLabel = [(&'static str, String); 1];

/// Every gateway frontend's authenticator, by frontend name; lives across reloads.
pub struct AuthStore {
    by_frontend: Mutex<HashMap<String, Arc<FrontendAuth>>>,
    /// `sclb_auth_failures_total{frontend, reason}`.
    pub failures: Family<FailureLabels, Counter>,
    /// `sclb_auth_keys_refresh_failures_total{frontend}`: failed fetches from an OIDC issuer.
    keys_failures: Family<FrontendLabel, Counter>,
    /// `sclb_auth_keys_last_refresh_timestamp_seconds{frontend}`: the last good fetch.
    keys_last_refresh: Family<FrontendLabel, Gauge>,
    /// Holds the families above, for `/metrics`.
    pub registry: prometheus_client::registry::Registry,
}

impl Default for AuthStore {
    fn default() -> Self {
        let failures = Family::<FailureLabels, Counter>::default();
        let mut registry = prometheus_client::registry::Registry::with_prefix("sclb");
        registry.register(
            "auth_failures",
            "RPCs refused because their token did not authenticate, by frontend and the check that failed.",
            failures.clone(),
        );
        let keys_failures = Family::<FrontendLabel, Counter>::default();
        registry.register(
            "auth_keys_refresh_failures",
            "Fetches of an OIDC issuer's discovery document or keys that failed (the cached keys stay in use).",
            keys_failures.clone(),
        );
        let keys_last_refresh = Family::<FrontendLabel, Gauge>::default();
        registry.register(
            "auth_keys_last_refresh_timestamp_seconds",
            "When the OIDC issuer's keys were last fetched successfully (Unix time).",
            keys_last_refresh.clone(),
        );
        AuthStore {
            by_frontend: Mutex::default(),
            failures,
            keys_failures,
            keys_last_refresh,
            registry,
        }
    }
}

impl AuthStore {
    pub fn get(&self, frontend: &str) -> Option<Arc<FrontendAuth>> {
        self.by_frontend.lock().get(frontend).cloned()
    }

    /// Counts a refused token.
    pub fn failed(&self, frontend: &str, reason: &'static str) {
        self.failures
            .get_or_create(&[
                ("frontend", frontend.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }

    /// Makes the store match `config` (see [`crate::tls::TlsStore::sync`]).
    pub fn sync(&self, config: &Config) {
        let mut map = self.by_frontend.lock();
        let wanted = |name: &str| {
            config
                .frontends
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.grpc.as_ref()?.auth.as_ref())
        };
        map.retain(|name, a| wanted(name) == Some(&a.settings));
        for fe in &config.frontends {
            let Some(settings) = fe.grpc.as_ref().and_then(|g| g.auth.as_ref()) else {
                continue;
            };
            if let Some(a) = map.get(&fe.name) {
                a.refresh(&fe.name);
                continue;
            }
            let issuer = match settings {
                AuthConfig::Jwt(j) => match (&j.keys, &j.issuer) {
                    (KeySource::Oidc(source), Some(url)) => {
                        let label = [("frontend", fe.name.clone())];
                        Some(oidc::Issuer::new(
                            &fe.name,
                            url,
                            source,
                            self.keys_failures.get_or_create(&label).clone(),
                            self.keys_last_refresh.get_or_create(&label).clone(),
                        ))
                    }
                    _ => None,
                },
                AuthConfig::Static { .. } => None,
            };
            let a = Arc::new(FrontendAuth {
                frontend: fe.name.clone(),
                settings: settings.clone(),
                loaded: ArcSwap::from_pointee(match issuer {
                    Some(_) => Loaded::Jwt(JwtKeys::empty()),
                    None => Loaded::Static(StaticTokens::default()),
                }),
                issuer,
                seen: Mutex::new(None),
                generation: Default::default(),
            });
            a.refresh(&fe.name);
            if a.issuer.is_some()
                && let Ok(rt) = tokio::runtime::Handle::try_current()
            {
                rt.spawn(oidc::keep_fresh(Arc::downgrade(&a)));
            }
            map.insert(fe.name.clone(), a);
        }
    }

    /// Re-reads every changed file.
    pub fn refresh(&self) {
        let all: Vec<(String, Arc<FrontendAuth>)> = self
            .by_frontend
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, a) in all {
            a.refresh(&name);
        }
    }
}
