//! Servers that discovery sources reported, per backend, and each source's status: part of the
//! running state ([`crate::state::State`] merges them into every snapshot). The sources that
//! fill it live in [`crate::discovery`].

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::SystemTime;

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

/// Discovered servers per backend, and each source's status.
#[derive(Default)]
pub struct Registry {
    servers: Mutex<HashMap<String, BTreeMap<String, Discovered>>>,
    status: Mutex<BTreeMap<String, SourceStatus>>,
}

impl Registry {
    /// Applies an update; returns whether the set of servers changed.
    pub fn apply(&self, backend: &str, update: Update) -> bool {
        let mut all = self.servers.lock();
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
            .entry(backend.to_string())
            .or_default()
            .servers = n;
        changed
    }

    /// The discovered servers of a backend, in uid order.
    pub fn servers(&self, backend: &str) -> Vec<Discovered> {
        self.servers
            .lock()
            .get(backend)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Updates a source's status.
    pub fn set_status(&self, backend: &str, f: impl FnOnce(&mut SourceStatus)) {
        f(self.status.lock().entry(backend.to_string()).or_default());
    }

    pub fn statuses(&self) -> BTreeMap<String, SourceStatus> {
        self.status.lock().clone()
    }

    /// Drops a backend's status (its source is gone).
    pub fn forget_status(&self, backend: &str) {
        self.status.lock().remove(backend);
    }
}
