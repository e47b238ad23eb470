//! Who an RPC comes from: the frontend's `auth` (a bearer token, checked once per connection
//! and token, again when it expires or the auth file changes), else the mTLS client
//! certificate. A refusal is UNAUTHENTICATED naming the check that failed, counted in
//! `sclb_auth_failures_total` and written to the audit log, never with the token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::rpc::Refusal;
use super::*;
use crate::auth::Identity;

/// A token this connection has shown, and what it proved.
pub(super) struct AuthCached {
    token: String,
    generation: u64,
    identity: Arc<Identity>,
    until: Instant,
}

/// How long a checked token is trusted without a new check (bounded by its expiry).
const CACHE_FOR: Duration = Duration::from_secs(60);

/// The identity of the client sending `headers`, or `None` when the frontend asks for none.
pub(super) async fn authenticate(
    cx: &Conn,
    g: &crate::config::GrpcConfig,
    headers: &http::HeaderMap,
) -> Result<Option<Arc<Identity>>, Refusal> {
    if g.auth.is_none() {
        return Ok(cx.tls_identity.clone());
    }
    let refuse = |e: crate::auth::AuthError| {
        cx.shared.auth.failed(&cx.frontend, e.reason);
        info!(
            target: "sclb::audit",
            client = %cx.peer,
            frontend = %cx.frontend,
            reason = e.reason,
            "authentication failed: {}",
            e.message
        );
        (
            "unauthenticated",
            Status::new(
                Code::Unauthenticated,
                format!("sclb: authentication failed: {}", e.message),
            ),
        )
    };
    let Some(fa) = cx.shared.auth.get(&cx.frontend) else {
        return Err(refuse(crate::auth::AuthError::new(
            "not_loaded",
            "this frontend's token file or keys are not loaded",
        )));
    };
    let token = crate::auth::bearer(headers.get(header::AUTHORIZATION)).map_err(refuse)?;
    let generation = fa.generation.load(Relaxed);
    if let Some(c) = &*cx.auth_cache.lock()
        && c.generation == generation
        && Instant::now() < c.until
        && bool::from(subtle::ConstantTimeEq::ct_eq(
            c.token.as_bytes(),
            token.as_bytes(),
        ))
    {
        return Ok(Some(c.identity.clone()));
    }
    // Boxed: a check may fetch keys over HTTP, a large future that every RPC's future would
    // otherwise carry (and copy) though a connection checks its token once.
    let identity = Arc::new(Box::pin(fa.check(token)).await.map_err(refuse)?);
    let mut until = Instant::now() + CACHE_FOR;
    if let Some(exp) = identity.expires_at {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        until = until.min(Instant::now() + Duration::from_secs(exp.saturating_sub(now)));
    }
    *cx.auth_cache.lock() = Some(AuthCached {
        token: token.to_string(),
        generation,
        identity: identity.clone(),
        until,
    });
    Ok(Some(identity))
}
