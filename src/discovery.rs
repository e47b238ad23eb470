//! Servers that come from somewhere other than the config file (a Kubernetes watch), fed in as
//! [`Update`]s through [`crate::Shared::discovery_update`].
//!
//! A discovery source only says which servers exist; everything else — pins, health, drains,
//! counters, checkers — is handled exactly as for servers listed in the file, because an update
//! rebuilds the snapshot through the same path as a reload. A source that fails keeps the last
//! servers it reported: it sends nothing until it knows better.
//!
//! [`sync_sources`] keeps one task per backend whose config declares a source (see
//! [`kubernetes`]), in [`Registry`]'s list of running sources: at start, and after each reload,
//! where an unchanged source keeps running and a removed or changed one is stopped.

pub mod kubernetes;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::KubernetesDiscovery;

/// One discovered server (a driver pod, an endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Shown as the server name (e.g. the pod or application name).
    pub name: String,
    /// Stable identity (e.g. the pod's uid): a new uid is a new server, with no pins.
    pub uid: String,
    pub addr: SocketAddr,
    /// Terminating: takes no new clients; pinned clients may finish (DRAIN).
    pub draining: bool,
}

/// A change reported by a discovery source for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The complete current set (after a list or relist).
    Reset(Vec<Discovered>),
    /// Added or changed.
    Upsert(Discovered),
    /// Gone, by uid.
    Remove(String),
}

/// The health of a discovery source, for `show info`, the stats page and metrics.
#[derive(Debug, Clone, Default)]
pub struct SourceStatus {
    /// What is watched, e.g. "kubernetes pods in namespace spark, port 15002".
    pub source: String,
    /// e.g. "watching", "relisting", "unreachable", "forbidden".
    pub state: String,
    pub servers: usize,
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// The last complete (re)list.
    pub last_sync: Option<SystemTime>,
}

/// Discovered servers per backend, each source's status, and the running sources.
#[derive(Default)]
pub struct Registry {
    servers: Mutex<HashMap<String, BTreeMap<String, Discovered>>>,
    status: Mutex<BTreeMap<String, SourceStatus>>,
    /// The running source of each backend that has one. Also serialises delivery against
    /// stopping (see [`deliver`]).
    sources: Mutex<HashMap<String, Running>>,
}

/// A running source: what it was started with, and what stops it.
struct Running {
    settings: KubernetesDiscovery,
    stop: CancellationToken,
}

impl Registry {
    /// Applies an update; returns whether the set of servers changed.
    pub fn apply(&self, backend: &str, update: Update) -> bool {
        let mut all = self.servers.lock().unwrap();
        let set = all.entry(backend.to_string()).or_default();
        let before = set.clone();
        match update {
            Update::Reset(list) => {
                *set = list.into_iter().map(|d| (d.uid.clone(), d)).collect();
            }
            Update::Upsert(d) => {
                set.insert(d.uid.clone(), d);
            }
            Update::Remove(uid) => {
                set.remove(&uid);
            }
        }
        let n = set.len();
        let changed = *set != before;
        drop(all);
        self.status
            .lock()
            .unwrap()
            .entry(backend.to_string())
            .or_default()
            .servers = n;
        changed
    }

    /// The discovered servers of a backend, in uid order.
    pub fn servers(&self, backend: &str) -> Vec<Discovered> {
        self.servers
            .lock()
            .unwrap()
            .get(backend)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Updates a source's status.
    pub fn set_status(&self, backend: &str, f: impl FnOnce(&mut SourceStatus)) {
        f(self
            .status
            .lock()
            .unwrap()
            .entry(backend.to_string())
            .or_default());
    }

    pub fn statuses(&self) -> BTreeMap<String, SourceStatus> {
        self.status.lock().unwrap().clone()
    }

    /// Drops a backend's status (its source is gone).
    fn forget_status(&self, backend: &str) {
        self.status.lock().unwrap().remove(backend);
    }
}

/// Starts (or, after a reload, restarts) the discovery sources that the running config
/// declares. Sources for backends whose discovery settings did not change keep running; a
/// changed source is restarted and keeps its servers until its first list replaces them; a
/// removed source takes its servers with it (their live connections drain).
pub fn sync_sources(shared: &Arc<Shared>) {
    let snap = shared.state.snapshot();
    let wanted: HashMap<&str, &KubernetesDiscovery> = snap
        .config
        .backends
        .iter()
        .filter_map(|b| b.discovery.as_ref().map(|d| (b.name.as_str(), d)))
        .collect();
    let registry = &shared.state.discovered;
    let mut gone = Vec::new();
    {
        let mut running = registry.sources.lock().unwrap();
        running.retain(|backend, r| {
            let keep = wanted.get(backend.as_str()) == Some(&&r.settings) && !r.stop.is_cancelled();
            if !keep {
                r.stop.cancel();
                tracing::info!(backend = %backend, "discovery source stopped");
                if !wanted.contains_key(backend.as_str()) {
                    gone.push(backend.clone());
                }
            }
            keep
        });
        if shared.stop_background.is_cancelled() {
            return;
        }
        for (backend, settings) in wanted {
            if running.contains_key(backend) {
                continue;
            }
            let stop = shared.stop_background.child_token();
            tracing::info!(backend = %backend, "discovery source started: {}", kubernetes::describe(settings));
            kubernetes::spawn(shared, backend.to_string(), settings.clone(), stop.clone());
            running.insert(
                backend.to_string(),
                Running {
                    settings: settings.clone(),
                    stop,
                },
            );
        }
    }
    for backend in gone {
        shared.discovery_update(&backend, Update::Reset(Vec::new()));
        registry.forget_status(&backend);
    }
}

/// Hands a source's update over unless the source has been stopped: checked and applied under
/// the lock that stopping takes, so a stopped source can never bring its servers back.
fn deliver(shared: &Arc<Shared>, backend: &str, stop: &CancellationToken, update: Update) {
    let _running = shared.state.discovered.sources.lock().unwrap();
    if !stop.is_cancelled() {
        shared.discovery_update(backend, update);
    }
}
