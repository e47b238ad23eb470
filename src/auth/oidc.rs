//! `auth = { type = "oidc", issuer = "https://...", ... }`: JWTs checked as with `type =
//! "jwt"`, against the key set the issuer publishes: `<issuer>/.well-known/openid-configuration`
//! names `jwks_uri` (and must name the configured `issuer`, so that a discovery document
//! served by someone else is refused).
//!
//! Owns the fetching of one frontend's keys: once at start, again every `refresh`, and when a
//! token names a `kid` the cached keys lack (a key rotation) but at most once per
//! `min_refresh`, so that tokens with made-up `kid`s cannot make sclb hammer the issuer.
//! Concurrent RPCs with the same new `kid` wait for one fetch. An issuer that cannot be
//! reached keeps the cached keys: a warning when fetching starts failing, an info line when
//! it works again, `sclb_auth_keys_refresh_failures_total{frontend}` for every failed fetch
//! and `sclb_auth_keys_last_refresh_timestamp_seconds{frontend}` for the last good one.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use sha2::Digest;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::https::{Fetcher, Url};
use super::{FrontendAuth, JwtKeys, Loaded};
use crate::config::{AuthConfig, JwtConfig, OidcSource};

/// One frontend's issuer and what is known of its last fetches.
pub(super) struct Issuer {
    issuer: String,
    discovery: Url,
    source: OidcSource,
    fetcher: Fetcher,
    state: tokio::sync::Mutex<FetchState>,
    failures: Counter,
    last_success: Gauge,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    /// The last error, while fetches fail.
    failing: Option<String>,
    /// Failed fetches in a row (the retry backoff).
    failed_in_row: u32,
    /// SHA-256 of the key set in use: an unchanged set is not swapped in.
    in_use: Option<Vec<u8>>,
}

#[derive(serde::Deserialize)]
struct Discovery {
    issuer: String,
    jwks_uri: String,
}

impl Issuer {
    pub(super) fn new(
        frontend: &str,
        issuer: &str,
        source: &OidcSource,
        failures: Counter,
        last_success: Gauge,
    ) -> Issuer {
        let discovery = Url::parse(&format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ))
        // Checked at load; a URL that no longer parses makes every fetch fail and say why.
        .unwrap_or(Url {
            tls: true,
            host: String::new(),
            port: 443,
            path: "/".into(),
        });
        let roots = crate::tls::client::roots(source.ca.as_deref()).unwrap_or_else(|e| {
            warn!(
                frontend,
                "auth.ca cannot be used, the issuer will not verify: {e}"
            );
            rustls::RootCertStore::empty()
        });
        Issuer {
            issuer: issuer.to_string(),
            discovery,
            source: source.clone(),
            fetcher: Fetcher::new(roots, source.timeout),
            state: tokio::sync::Mutex::default(),
            failures,
            last_success,
        }
    }

    /// The discovery document, then the key set it names: (keys, SHA-256 of the key set).
    async fn fetch(&self, cfg: &JwtConfig) -> Result<(JwtKeys, Vec<u8>), String> {
        let body = self
            .fetcher
            .get(&self.discovery)
            .await
            .map_err(|e| e.to_string())?;
        let doc: Discovery = serde_json::from_slice(&body)
            .map_err(|e| format!("the discovery document is not usable: {e}"))?;
        if doc.issuer != self.issuer {
            return Err(format!(
                "the discovery document names issuer \"{}\", not the configured \"{}\"",
                crate::escape::token(&doc.issuer),
                crate::escape::token(&self.issuer)
            ));
        }
        let jwks = Url::parse(&doc.jwks_uri).map_err(|e| format!("jwks_uri: {e}"))?;
        let body = self.fetcher.get(&jwks).await.map_err(|e| e.to_string())?;
        let keys = JwtKeys::from_issuer(&body, cfg)?;
        Ok((keys, sha2::Sha256::digest(&body).to_vec()))
    }

    /// When the next scheduled fetch is due: `refresh` after a good one; after failures,
    /// `min_refresh` doubling up to `refresh`.
    fn next_due(&self, st: &FetchState) -> Option<Instant> {
        let last = st.last_attempt?;
        let wait = if st.failed_in_row == 0 {
            self.source.refresh
        } else {
            let doubled = self
                .source
                .min_refresh
                .saturating_mul(1 << st.failed_in_row.min(16).saturating_sub(1));
            doubled.min(self.source.refresh)
        };
        Some(last + wait)
    }
}

impl FrontendAuth {
    fn jwt_settings(&self) -> Option<&JwtConfig> {
        match &self.settings {
            AuthConfig::Jwt(cfg) => Some(cfg),
            AuthConfig::Static { .. } => None,
        }
    }

    /// After a token whose key the cached set lacks (it was loaded at `seen`): fetches the
    /// keys again, unless another RPC just did (then its keys are used) or the last fetch was
    /// less than `min_refresh` ago. `Err` says why the key cannot be looked for.
    pub(super) async fn look_for_key(&self, seen: u64) -> Result<(), String> {
        let Some(iss) = &self.issuer else {
            return Err("the keys come from a file".into());
        };
        let mut st = iss.state.lock().await;
        if self.generation.load(Relaxed) != seen {
            return Ok(());
        }
        if let Some(t) = st.last_attempt
            && t.elapsed() < iss.source.min_refresh
        {
            return Err(match &st.failing {
                Some(e) => format!("the issuer cannot be reached to look for it ({e})"),
                None => format!(
                    "the issuer's keys, fetched {}s ago, do not hold it (fetched at most once per {:?})",
                    t.elapsed().as_secs(),
                    iss.source.min_refresh
                ),
            });
        }
        self.fetch_keys(iss, &mut st)
            .await
            .map_err(|e| format!("the issuer cannot be reached to look for it ({e})"))
    }

    /// Fetches and swaps in the issuer's keys, logging a change of state once.
    async fn fetch_keys(&self, iss: &Issuer, st: &mut FetchState) -> Result<(), String> {
        let Some(cfg) = self.jwt_settings() else {
            return Ok(());
        };
        st.last_attempt = Some(Instant::now());
        let frontend = &self.frontend;
        match iss.fetch(cfg).await {
            Ok((keys, hash)) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                iss.last_success.set(now.as_secs() as i64);
                st.failed_in_row = 0;
                if let Some(e) = st.failing.take() {
                    info!(frontend, issuer = %iss.issuer, "OIDC issuer reached again (it failed with: {e})");
                }
                if st.in_use.as_deref() != Some(&hash) {
                    info!(frontend, issuer = %iss.issuer, keys = keys.len(), "OIDC keys loaded");
                    self.loaded.store(Arc::new(Loaded::Jwt(keys)));
                    self.generation.fetch_add(1, Relaxed);
                    st.in_use = Some(hash);
                }
                Ok(())
            }
            Err(e) => {
                iss.failures.inc();
                st.failed_in_row = st.failed_in_row.saturating_add(1);
                let cached = match &**self.loaded.load() {
                    Loaded::Jwt(k) => k.len(),
                    Loaded::Static(_) => 0,
                };
                if st.failing.is_none() {
                    warn!(
                        frontend,
                        issuer = %iss.issuer,
                        "cannot fetch keys from the OIDC issuer, keeping the {cached} cached keys: {e}"
                    );
                } else {
                    debug!(frontend, issuer = %iss.issuer, "OIDC issuer still failing: {e}");
                }
                st.failing = Some(e.clone());
                Err(e)
            }
        }
    }
}

/// Fetches `auth`'s keys now and then on schedule, until the frontend's authenticator is
/// dropped (its frontend removed or its settings changed by a reload).
pub(super) async fn keep_fresh(auth: Weak<FrontendAuth>) {
    loop {
        let due = {
            let Some(a) = auth.upgrade() else { return };
            let Some(iss) = &a.issuer else { return };
            let st = iss.state.lock().await;
            iss.next_due(&st)
        };
        if let Some(due) = due {
            tokio::time::sleep_until(due).await;
        }
        let Some(a) = auth.upgrade() else { return };
        let Some(iss) = &a.issuer else { return };
        let mut st = iss.state.lock().await;
        // An on-demand fetch may have run meanwhile: then wait for the new due time.
        if iss.next_due(&st).is_some_and(|d| d > Instant::now()) {
            continue;
        }
        let _ = a.fetch_keys(iss, &mut st).await;
    }
}
