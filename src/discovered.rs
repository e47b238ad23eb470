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

/// What a batch of updates changed in a backend's discovered servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    Nothing,
    /// These uids were added, changed or removed.
    Servers(Vec<String>),
    /// A reset replaced the set.
    All,
}

/// Discovered servers per backend, and each source's status.
#[derive(Default)]
pub struct Registry {
    servers: Mutex<HashMap<String, BTreeMap<String, Discovered>>>,
    status: Mutex<BTreeMap<String, SourceStatus>>,
}

impl Registry {
    /// Applies a source's updates, in order; says what changed. Each update costs what it
    /// touches (a reset: the whole set), not the size of the set.
    pub fn apply(&self, backend: &str, updates: Vec<Update>) -> Changed {
        let mut all = self.servers.lock();
        let set = all.entry(backend.to_string()).or_default();
        let (mut touched, mut reset) = (Vec::new(), false);
        for update in updates {
            match update {
                Update::Reset(list) => {
                    let new: BTreeMap<String, Discovered> =
                        list.into_iter().map(|d| (d.uid.clone(), d)).collect();
                    if *set != new {
                        *set = new;
                        reset = true;
                    }
                }
                Update::Upsert(d) => {
                    if set.get(&d.uid) != Some(&d) {
                        touched.push(d.uid.clone());
                        set.insert(d.uid.clone(), d);
                    }
                }
                Update::Remove(uid) => {
                    if set.remove(&uid).is_some() {
                        touched.push(uid);
                    }
                }
            }
        }
        let n = set.len();
        drop(all);
        self.status
            .lock()
            .entry(backend.to_string())
            .or_default()
            .servers = n;
        if reset {
            Changed::All
        } else if touched.is_empty() {
            Changed::Nothing
        } else {
            touched.sort_unstable();
            touched.dedup();
            Changed::Servers(touched)
        }
    }

    /// A backend's discovered server `uid`, if it has one.
    pub fn get(&self, backend: &str, uid: &str) -> Option<Discovered> {
        self.servers.lock().get(backend)?.get(uid).cloned()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, last: u8, draining: bool) -> Discovered {
        Discovered {
            name: format!("pod-{uid}"),
            uid: uid.into(),
            addr: SocketAddr::from(([10, 0, 0, last], 15002)),
            draining,
        }
    }

    #[test]
    fn a_batch_of_updates_applies_in_order_and_says_whether_anything_changed() {
        let r = Registry::default();
        let reset = || vec![Update::Reset(vec![pod("a", 1, false)])];
        assert_eq!(r.apply("be", reset()), Changed::All);
        // The same again: nothing changed, no rebuild.
        let nothing = Changed::Nothing;
        assert_eq!(
            r.apply("be", vec![Update::Upsert(pod("a", 1, false))]),
            nothing
        );
        assert_eq!(
            r.apply("be", vec![Update::Remove("nobody".into())]),
            nothing
        );
        assert_eq!(r.apply("be", reset()), nothing);
        // A burst: one added, one changed, one removed, in order; each uid said once.
        assert_eq!(
            r.apply(
                "be",
                vec![
                    Update::Upsert(pod("b", 2, false)),
                    Update::Upsert(pod("c", 3, false)),
                    Update::Upsert(pod("a", 1, true)),
                    Update::Remove("b".into()),
                ]
            ),
            Changed::Servers(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(r.servers("be"), vec![pod("a", 1, true), pod("c", 3, false)]);
        assert_eq!(r.statuses()["be"].servers, 2);
    }
}
