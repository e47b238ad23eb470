//! The objects every watch of a source has reported, turned into servers, and what to hand
//! over: a `Reset` after every complete (re)list, single `Upsert`s and `Remove`s in between,
//! nothing before every watch has listed once.
//!
//! Between lists, where one object makes at most one server (pods, SparkConnects), what an
//! event changes is worked out from the objects it touched alone: a watch of N objects costs
//! per event what that event touches, not N. SparkApplications (an application and its driver
//! pod) and EndpointSlices (an endpoint may sit in two slices) are joins: for them the servers
//! are worked out again from every object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use kube::runtime::watcher::Event;

use super::objects::{Object, PodInfo};
use crate::config::{KubernetesDiscovery, KubernetesKind, PortRef};
use crate::discovery::{Discovered, Update};

/// One watch's objects: the committed set, and the one being listed.
#[derive(Default)]
struct Store {
    objects: BTreeMap<String, Object>,
    listing: Option<BTreeMap<String, Object>>,
    synced: bool,
}

/// What one event changes.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Change {
    /// After a complete (re)list: the whole set.
    pub(super) reset: Option<Update>,
    pub(super) updates: Vec<Update>,
    /// One line per server added, drained or removed.
    pub(super) log: Vec<String>,
}

impl Change {
    /// The log line for server `d`, handed over before as `old`, if it says anything new.
    fn note(&mut self, old: Option<&Discovered>, d: &Discovered) {
        match old {
            None if d.draining => self.log.push(format!(
                "server {} ({}) discovered, terminating: DRAIN",
                d.name, d.addr
            )),
            None => self
                .log
                .push(format!("server {} ({}) discovered", d.name, d.addr)),
            Some(old) if d.draining && !old.draining => self.log.push(format!(
                "server {} ({}) is terminating: DRAIN, its pinned clients may finish",
                d.name, d.addr
            )),
            _ => {}
        }
    }
}

/// The objects every watch of a source has reported, and the servers last handed over.
pub(super) struct View {
    kind: KubernetesKind,
    port: PortRef,
    /// Name servers `namespace/name` when more than one namespace is watched.
    qualify: bool,
    stores: Vec<Store>,
    /// The servers handed over, by uid; `None` before the first complete list.
    sent: Option<BTreeMap<String, Discovered>>,
    /// Pods and SparkConnects: the uid of the server each object (watch, key) made, among
    /// those handed over.
    made: HashMap<(usize, String), String>,
    /// Objects added, changed or deleted since the last hand-over: (watch, key).
    touched: BTreeSet<(usize, String)>,
}

/// What one event did to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Part of a list still under way: nothing to hand over yet.
    Pending,
    /// An object was added, changed or removed.
    Changed,
    /// A watch completed a (re)list.
    Listed,
}

impl View {
    pub(super) fn new(s: &KubernetesDiscovery, watches: usize) -> Self {
        View {
            kind: s.kind,
            port: s.port.clone(),
            qualify: s.namespaces.len() != 1,
            stores: (0..watches).map(|_| Store::default()).collect(),
            sent: None,
            made: HashMap::new(),
            touched: BTreeSet::new(),
        }
    }

    /// Whether one object makes at most one server, on its own.
    fn one_to_one(&self) -> bool {
        matches!(
            self.kind,
            KubernetesKind::Pods | KubernetesKind::SparkConnects
        )
    }

    /// Whether every watch has listed at least once.
    pub(super) fn synced(&self) -> bool {
        self.stores.iter().all(|s| s.synced)
    }

    /// Applies watch `i`'s event; returns what to hand over, if anything changed.
    #[cfg(test)]
    pub(super) fn event(&mut self, i: usize, event: Event<Object>) -> Option<Change> {
        match self.apply(i, event) {
            Step::Pending => None,
            Step::Changed => self.changes(false),
            Step::Listed => self.changes(true),
        }
    }

    /// Records watch `i`'s event. What it changes is worked out by [`View::changes`], once for
    /// all the events that arrived together.
    pub(super) fn apply(&mut self, i: usize, event: Event<Object>) -> Step {
        let store = &mut self.stores[i];
        match event {
            Event::Init => {
                store.listing = Some(BTreeMap::new());
                Step::Pending
            }
            Event::InitApply(o) => {
                store.listing.get_or_insert_default().insert(o.key(), o);
                Step::Pending
            }
            Event::InitDone => {
                store.objects = store.listing.take().unwrap_or_default();
                store.synced = true;
                Step::Listed
            }
            Event::Apply(o) => {
                let key = o.key();
                store.objects.insert(key.clone(), o);
                self.touched.insert((i, key));
                Step::Changed
            }
            Event::Delete(o) => {
                let key = o.key();
                store.objects.remove(&key);
                self.touched.insert((i, key));
                Step::Changed
            }
        }
    }

    /// What the objects now describe, against what was last handed over; `listed`: a watch
    /// completed a (re)list since, so the whole set is handed over.
    pub(super) fn changes(&mut self, listed: bool) -> Option<Change> {
        if !self.synced() {
            return None;
        }
        let touched = std::mem::take(&mut self.touched);
        if !listed && self.sent.is_some() && self.one_to_one() {
            return self.changes_of(touched);
        }
        let (want, made) = self.desired();
        let first = self.sent.is_none();
        let before = self.sent.take().unwrap_or_default();
        let mut change = Change::default();
        for (uid, d) in &want {
            change.note(before.get(uid), d);
            if before.get(uid) != Some(d) {
                change.updates.push(Update::Upsert(d.clone()));
            }
        }
        for (uid, d) in &before {
            if !want.contains_key(uid) {
                change
                    .log
                    .push(format!("server {} ({}) is gone: removed", d.name, d.addr));
                change.updates.push(Update::Remove(uid.clone()));
            }
        }
        if listed || first {
            change.updates.clear();
            change.reset = Some(Update::Reset(want.values().cloned().collect()));
        } else if change.updates.is_empty() {
            self.sent = Some(before);
            self.made = made;
            return None;
        }
        self.sent = Some(want);
        self.made = made;
        Some(change)
    }

    /// Between lists, for pods and SparkConnects: what the `touched` objects change, against
    /// what was handed over (the same lines and updates as working it out from every object).
    fn changes_of(&mut self, touched: BTreeSet<(usize, String)>) -> Option<Change> {
        let mut sent = self.sent.take().unwrap_or_default();
        let known = |uid: &str| sent.contains_key(uid);
        // What each touched object makes now, judged against what was handed over before.
        let now: Vec<((usize, String), Option<Discovered>)> = touched
            .into_iter()
            .map(|(i, key)| {
                let d = self.stores[i]
                    .objects
                    .get(&key)
                    .and_then(|o| self.server_of(o, &known));
                ((i, key), d)
            })
            .collect();
        let made_now: BTreeSet<&str> = now
            .iter()
            .filter_map(|(_, d)| d.as_ref().map(|d| d.uid.as_str()))
            .collect();
        let mut change = Change::default();
        // Gone first: a uid that another object makes now is upserted after.
        for (object, _) in &now {
            if let Some(uid) = self.made.get(object)
                && !made_now.contains(uid.as_str())
                && let Some(d) = sent.remove(uid)
            {
                change
                    .log
                    .push(format!("server {} ({}) is gone: removed", d.name, d.addr));
                change.updates.push(Update::Remove(uid.clone()));
            }
        }
        for (object, d) in now {
            let Some(d) = d else {
                self.made.remove(&object);
                continue;
            };
            let old = sent.get(&d.uid);
            change.note(old, &d);
            self.made.insert(object, d.uid.clone());
            if old != Some(&d) {
                change.updates.push(Update::Upsert(d.clone()));
                sent.insert(d.uid.clone(), d);
            }
        }
        self.sent = Some(sent);
        (!change.updates.is_empty()).then_some(change)
    }

    fn server_name(&self, namespace: &str, name: &str) -> String {
        if self.qualify {
            format!("{namespace}/{name}")
        } else {
            name.to_string()
        }
    }

    /// The servers every object gives now, worked out from all of them.
    #[cfg(test)]
    pub(super) fn desired_servers(&self) -> BTreeMap<String, Discovered> {
        self.desired().0
    }

    /// The server one object makes on its own (pods and SparkConnects), if any; `known`: the
    /// uids handed over (a terminating one that served keeps serving while it drains).
    fn server_of(&self, o: &Object, known: &impl Fn(&str) -> bool) -> Option<Discovered> {
        match o {
            Object::Pod(p) if self.kind == KubernetesKind::Pods => {
                p.server(self.server_name(&p.namespace, &p.name), known)
            }
            Object::Connect(c) if self.kind == KubernetesKind::SparkConnects => {
                let ip = c.ip?;
                // A new server pod (a restart) is a new server: its sessions are gone.
                let uid = format!(
                    "{}/{}",
                    c.uid,
                    c.pod.clone().unwrap_or_else(|| ip.to_string())
                );
                let draining = c.terminating && known(&uid);
                if !c.ready && !draining {
                    return None;
                }
                // A SparkConnect reports an IP only: the port is the configured number.
                let PortRef::Number(port) = self.port else {
                    return None;
                };
                Some(Discovered {
                    name: self.server_name(&c.namespace, &c.name),
                    uid,
                    addr: SocketAddr::new(ip, port),
                    draining: c.terminating,
                })
            }
            _ => None,
        }
    }

    /// The servers the committed objects describe, by uid; for pods and SparkConnects, also
    /// which object made each.
    fn desired(
        &self,
    ) -> (
        BTreeMap<String, Discovered>,
        HashMap<(usize, String), String>,
    ) {
        let known = |uid: &str| self.sent.as_ref().is_some_and(|s| s.contains_key(uid));
        let mut out = BTreeMap::new();
        let mut made = HashMap::new();
        let objects = self.stores.iter().flat_map(|s| s.objects.values());
        match self.kind {
            KubernetesKind::Pods | KubernetesKind::SparkConnects => {
                for (i, store) in self.stores.iter().enumerate() {
                    for (key, o) in &store.objects {
                        if let Some(d) = self.server_of(o, &known) {
                            made.insert((i, key.clone()), d.uid.clone());
                            out.insert(d.uid.clone(), d);
                        }
                    }
                }
            }
            KubernetesKind::SparkApplications => {
                let pods: BTreeMap<String, &PodInfo> = self
                    .stores
                    .iter()
                    .flat_map(|s| s.objects.values())
                    .filter_map(|o| match o {
                        Object::Pod(p) => Some((format!("{}/{}", p.namespace, p.name), p)),
                        _ => None,
                    })
                    .collect();
                for o in objects {
                    let Object::App(app) = o else { continue };
                    let Some(pod) = pods.get(&format!("{}/{}", app.namespace, app.driver)) else {
                        continue;
                    };
                    let name = self.server_name(&app.namespace, &app.name);
                    if let Some(mut d) = pod.server(name, known) {
                        d.draining |= app.terminating;
                        out.insert(d.uid.clone(), d);
                    }
                }
            }
            KubernetesKind::EndpointSlices => {
                for o in objects {
                    let Object::Slice(s) = o else { continue };
                    let Ok(port) = s.port else { continue };
                    for e in &s.endpoints {
                        let (uid, name) = match &e.target {
                            Some((uid, name)) => (uid.clone(), name.clone()),
                            None => (format!("{}/{}", s.uid, e.ip), e.ip.to_string()),
                        };
                        let draining = e.terminating && e.serving;
                        let active = e.ready && !e.terminating;
                        if !active && !draining {
                            continue;
                        }
                        let d = Discovered {
                            name: self.server_name(&s.namespace, &name),
                            uid: uid.clone(),
                            addr: SocketAddr::new(e.ip, port),
                            draining,
                        };
                        // During a reshuffle an endpoint can sit in two slices: ready wins.
                        match out.get(&uid) {
                            Some(Discovered {
                                draining: false, ..
                            }) => {}
                            _ => {
                                out.insert(uid, d);
                            }
                        }
                    }
                }
            }
        }
        (out, made)
    }
}
