//! The shared session store, whichever kind the config chose: the gateway's registry calls
//! these and never a kind's own methods, so that the kinds behave alike.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry as PromRegistry;

use super::kubernetes::KubeStore;
use super::{Binding, Bound, Store, StoreError, Synced};
use crate::gateway::registry::{EndReason, SessionKey};

/// `[global] store` when it is shared by several sclb (`memory` needs none).
#[derive(Clone)]
pub enum SessionStore {
    Postgres(Arc<Store>),
    Kubernetes(Arc<KubeStore>),
}

impl SessionStore {
    /// The PostgreSQL store, for what only it does (L4 pins, `stick.store = "shared"`).
    pub fn postgres(&self) -> Option<&Arc<Store>> {
        match self {
            SessionStore::Postgres(s) => Some(s),
            SessionStore::Kubernetes(_) => None,
        }
    }

    pub fn kubernetes(&self) -> Option<&Arc<KubeStore>> {
        match self {
            SessionStore::Kubernetes(k) => Some(k),
            SessionStore::Postgres(_) => None,
        }
    }

    /// The `sclb_store_*` metrics.
    pub fn metrics(&self) -> &PromRegistry {
        match self {
            SessionStore::Postgres(s) => &s.metrics.registry,
            SessionStore::Kubernetes(k) => &k.metrics.registry,
        }
    }

    pub fn is_up(&self) -> bool {
        match self {
            SessionStore::Postgres(s) => s.is_up(),
            SessionStore::Kubernetes(k) => k.is_up(),
        }
    }

    pub fn sync_interval(&self) -> Duration {
        match self {
            SessionStore::Postgres(s) => s.sync_interval(),
            SessionStore::Kubernetes(k) => k.sync_interval(),
        }
    }

    /// Binds a new session to `b` unless the store has it already: at most one round trip.
    pub async fn bind(&self, key: &SessionKey, b: &Binding) -> Result<Bound, StoreError> {
        match self {
            SessionStore::Postgres(s) => s.bind(key, b).await,
            SessionStore::Kubernetes(k) => k.bind(key, b).await,
        }
    }

    /// A session bound here while the store was unreachable: written when it is back.
    pub fn bound_locally(&self, key: SessionKey, b: Binding) {
        match self {
            SessionStore::Postgres(s) => s.bound_locally(key, b),
            SessionStore::Kubernetes(k) => k.bound_locally(key, b),
        }
    }

    /// A session ended here: written at the next sync.
    pub fn ended_here(&self, key: SessionKey, reason: EndReason) {
        match self {
            SessionStore::Postgres(s) => s.ended_here(key, reason),
            SessionStore::Kubernetes(k) => k.ended_here(key, reason),
        }
    }

    /// Ends the sessions in `due` the store also finds idle (see each kind); returns those
    /// ended and, for the others, the last activity the store knows.
    pub async fn end_if_idle(
        &self,
        due: &[(SessionKey, EndReason, i64)],
    ) -> Result<(Vec<SessionKey>, Vec<(SessionKey, i64)>), StoreError> {
        match self {
            SessionStore::Postgres(s) => s.end_if_idle(due).await,
            SessionStore::Kubernetes(k) => k.end_if_idle(due).await,
        }
    }

    /// Writes what waits, reads what others did.
    pub async fn sync(
        &self,
        since_ms: i64,
        activity: Vec<(SessionKey, i64)>,
    ) -> Result<Synced, StoreError> {
        match self {
            SessionStore::Postgres(s) => s.sync(since_ms, activity).await,
            SessionStore::Kubernetes(k) => k.sync(activity).await,
        }
    }

    /// On the way out: the kubernetes kind hands its reaper Lease over.
    pub async fn stop(&self) {
        if let SessionStore::Kubernetes(k) = self {
            k.release_lease().await;
        }
    }
}
