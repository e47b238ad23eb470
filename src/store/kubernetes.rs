//! `[global] store = { kind = "kubernetes" }`: gateway sessions recorded as Kubernetes objects,
//! so that every replica of a gateway on Kubernetes routes every session, and a restart, a
//! rollout or the loss of a replica loses none. No CRD, no database:
//!
//! - A session on a driver sclb created (on demand) is recorded on that driver: its
//!   annotations carry the session, its owner, team, environment, frontend and backend, when it
//!   was created and when it was last active.
//! - A session on a static or discovered server is recorded in a `coordination.k8s.io` Lease
//!   per session in the store's namespace, named after the session (`sclb-session-<tag>`),
//!   labelled `app.kubernetes.io/managed-by=sclb` and `app.kubernetes.io/component=spark-session`.
//!   Leases because they are the API's object for small records renewed often (node
//!   heartbeats): nothing mounts or syncs them as it does ConfigMaps, and one RBAC rule covers
//!   these and the reaper's Lease.
//! - Every replica watches both and builds its registry from the watch; a new session costs one
//!   create (bind-if-absent: AlreadyExists means another replica bound it first).
//! - Last activity is written at most once per `activity_interval` per session.
//! - Unclaimed drivers of a warm pool (`sclb.io/pool=ready`) name no session and are not
//!   orphans: the pool's keeper ([`crate::gateway::pool`]) retires them.
//! - Idle and TTL reaping and deleting orphaned drivers run on the holder of the reaper Lease
//!   ([`super::election`]); each delete carries the `resourceVersion` (or uid) the reaper read,
//!   so a reaper that lost its Lease, or read a record before another replica wrote activity to
//!   it, deletes nothing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, Preconditions,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use parking_lot::Mutex;
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::election::Election;
use super::{Binding, Bound, Known, Place, StoreError, StoreMetrics, Synced, now_ms};
use crate::config::KubernetesStore;
use crate::gateway::registry::{EndReason, SessionKey};

/// Annotations of a session record (a driver or a session Lease).
pub mod annotation {
    pub const SESSION: &str = "sclb.io/spark-session";
    pub const USER: &str = "sclb.io/user";
    pub const FRONTEND: &str = "sclb.io/frontend";
    pub const BACKEND: &str = "sclb.io/backend";
    pub const SERVER: &str = "sclb.io/server";
    pub const SERVER_ADDR: &str = "sclb.io/server-addr";
    pub const TEAM: &str = "sclb.io/team";
    pub const ENVIRONMENT: &str = "sclb.io/environment";
    pub const CREATED: &str = "sclb.io/created";
    pub const LAST_ACTIVITY: &str = "sclb.io/last-activity";
    pub const ENDED: &str = "sclb.io/ended";
}

const MANAGED: &str = "app.kubernetes.io/managed-by=sclb";
const SESSION_SELECTOR: &str =
    "app.kubernetes.io/managed-by=sclb,app.kubernetes.io/component=spark-session";
/// Most time one API call may take before the store counts as unreachable.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Longest session or user id recorded (longer ones are bound in this process only).
const MAX_ID: usize = 256;
/// Most writes waiting while the API server is unreachable.
const MAX_WAITING: usize = 100_000;

/// What a watch follows: session Leases, or the drivers of an on-demand frontend.
#[derive(Debug, Clone)]
pub struct Watched {
    pub resource: ApiResource,
    pub namespace: Option<String>,
    /// For drivers: the frontend and backend they serve (when an annotation does not say).
    pub driver_of: Option<(String, String)>,
}

/// The drivers of every on-demand gateway frontend: their backend's discovery kind, in each
/// namespace it watches (all when it names none).
pub fn driver_watches(config: &crate::config::Config) -> Vec<Watched> {
    let mut out = Vec::new();
    for fe in &config.frontends {
        let Some(g) = &fe.grpc else { continue };
        if g.on_demand.is_none() {
            continue;
        }
        let Some(d) = config
            .backends
            .iter()
            .find(|b| b.name == fe.backend)
            .and_then(|b| b.discovery.as_ref())
        else {
            continue;
        };
        let resource = match d.kind {
            crate::config::KubernetesKind::SparkConnects => crate::k8s_api::spark_connects(),
            crate::config::KubernetesKind::SparkApplications => {
                crate::k8s_api::spark_applications()
            }
            _ => continue,
        };
        let namespaces: Vec<Option<String>> = if d.namespaces.is_empty() {
            vec![None]
        } else {
            d.namespaces.iter().cloned().map(Some).collect()
        };
        for namespace in namespaces {
            out.push(Watched {
                resource: resource.clone(),
                namespace,
                driver_of: Some((fe.name.clone(), fe.backend.clone())),
            });
        }
    }
    out
}

/// One object, by kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ObjKey {
    watch: usize,
    namespace: String,
    name: String,
}

#[derive(Debug, Clone)]
struct Rec {
    obj: ObjKey,
    rv: String,
    uid: String,
    created_ms: i64,
    /// `None`: a driver labelled managed-by=sclb that names no session (an orphan, unless it
    /// is an unclaimed member of a warm pool).
    session: Option<Known>,
    /// An unclaimed member of a warm pool (its keeper retires it, not the orphan reaper).
    pool: bool,
    ended: Option<EndReason>,
}

#[derive(Default)]
struct Index {
    objects: HashMap<ObjKey, Rec>,
    by_session: HashMap<SessionKey, ObjKey>,
    /// Per watch, the objects of a relist in progress.
    listing: HashMap<usize, HashMap<ObjKey, Rec>>,
    /// Sessions whose record is new or changed since the last sync.
    dirty: HashSet<SessionKey>,
    /// Sessions whose record was deleted, and why.
    gone: Vec<(SessionKey, EndReason)>,
}

impl Index {
    fn apply(&mut self, r: Rec) {
        if let Some(s) = &r.session {
            self.dirty.insert(s.key.clone());
            self.by_session.insert(s.key.clone(), r.obj.clone());
        }
        self.objects.insert(r.obj.clone(), r);
    }

    fn delete(&mut self, obj: &ObjKey, last: Option<&Rec>) {
        let Some(r) = self.objects.remove(obj) else {
            return;
        };
        if let Some(s) = &r.session {
            if self.by_session.get(&s.key) == Some(obj) {
                self.by_session.remove(&s.key);
            }
            let reason = last.and_then(|l| l.ended).or(r.ended);
            self.gone
                .push((s.key.clone(), reason.unwrap_or(EndReason::Killed)));
        }
    }

    fn find(&self, key: &SessionKey) -> Option<&Rec> {
        self.by_session.get(key).and_then(|o| self.objects.get(o))
    }
}

pub struct KubeStore {
    cfg: KubernetesStore,
    client: kube::Client,
    watched: Vec<Watched>,
    pub metrics: StoreMetrics,
    election: Election,
    up: AtomicBool,
    index: Mutex<Index>,
    /// Activity not yet written (ms since the Unix epoch), and when each session's was last.
    activity: Mutex<HashMap<SessionKey, i64>>,
    written: Mutex<HashMap<SessionKey, Instant>>,
    /// Ends to write, with how many syncs they waited for their record to be seen.
    ends: Mutex<Vec<(SessionKey, EndReason, u8)>>,
    /// Sessions bound here while the API server was unreachable.
    unwritten: Mutex<Vec<(SessionKey, Binding)>>,
    /// How many watches have listed once; all of them: the registry can be trusted.
    listed: tokio::sync::watch::Sender<usize>,
    listed_once: Mutex<HashSet<usize>>,
}

/// The Lease recording a session on a static or discovered server.
pub fn lease_name(key: &SessionKey) -> String {
    format!(
        "sclb-session-{}",
        crate::gateway::ondemand::session_tag(key)
    )
}

fn ms_text(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn parse_ms(s: &str) -> Option<i64> {
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

/// This replica's name in the reaper Lease: the pod's name where Kubernetes says it, else the
/// host's, with the process id (two sclb on one host are two replicas).
fn identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "sclb".into());
    format!("{}-{}", crate::escape::token(&host), std::process::id())
}

impl KubeStore {
    /// The store, its client built (a bad kubeconfig fails the start); the watches and the
    /// election start with [`KubeStore::spawn`].
    pub async fn new(cfg: KubernetesStore, drivers: Vec<Watched>) -> Result<Arc<Self>, String> {
        let client = crate::k8s_api::client_from(cfg.kubeconfig.as_deref()).await?;
        let mut watched = vec![Watched {
            resource: ApiResource::erase::<Lease>(&()),
            namespace: Some(cfg.namespace.clone()),
            driver_of: None,
        }];
        watched.extend(drivers);
        let election = Election::new(
            Api::namespaced(client.clone(), &cfg.namespace),
            cfg.lease.clone(),
            identity(),
            cfg.lease_duration,
        );
        let mut metrics = StoreMetrics::default();
        metrics.registry.register(
            "leader",
            "1 while this replica holds the reaper Lease (kubernetes store).",
            election.gauge.clone(),
        );
        Ok(Arc::new(KubeStore {
            cfg,
            client,
            watched,
            metrics,
            election,
            up: AtomicBool::new(false),
            index: Mutex::default(),
            activity: Mutex::default(),
            written: Mutex::default(),
            ends: Mutex::default(),
            unwritten: Mutex::default(),
            listed: tokio::sync::watch::channel(0).0,
            listed_once: Mutex::default(),
        }))
    }

    /// Starts the watches and the reaper election; they stop with `stop`.
    pub fn spawn(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        for i in 0..self.watched.len() {
            let (me, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = me.watch(i) => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
        let me = self.clone();
        tokio::spawn(async move { me.election.run(stop).await });
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Whether every watch has listed once (before that, a session this replica does not
    /// know may be one the store records).
    pub fn is_listed(&self) -> bool {
        *self.listed.borrow() >= self.watched.len()
    }

    /// Waits, at most `within`, until every watch has listed once (a replica just started
    /// routes a recorded session to its driver, not to a new one).
    pub async fn listed(&self, within: Duration) -> bool {
        let mut rx = self.listed.subscribe();
        let n = self.watched.len();
        tokio::time::timeout(within, rx.wait_for(|v| *v >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn is_leader(&self) -> bool {
        self.election.is_leader()
    }

    pub fn sync_interval(&self) -> Duration {
        self.cfg.sync_interval
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Relaxed);
        self.metrics.set_up(up);
        match (was, up) {
            (true, false) => warn!(
                "session store (Kubernetes API) unreachable: routing known sessions, binding new ones locally"
            ),
            (false, true) => info!("session store (Kubernetes API) watching"),
            _ => {}
        }
    }

    fn api(&self, watch: usize, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            namespace,
            &self.watched[watch].resource,
        )
    }

    /// One API call with the timeout, counted; a call that did not reach the API server marks
    /// the store down.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        let started = std::time::Instant::now();
        let r = match tokio::time::timeout(TIMEOUT, f).await {
            Ok(r) => r,
            Err(_) => Err(kube::Error::Service(
                format!("the API server did not answer within {TIMEOUT:?}").into(),
            )),
        };
        let refused = matches!(&r, Err(kube::Error::Api(_)));
        self.metrics
            .observe(op, started.elapsed().as_secs_f64(), r.is_ok() || refused);
        match &r {
            Ok(_) | Err(kube::Error::Api(_)) => self.set_up(true),
            Err(_) => self.set_up(false),
        }
        r
    }

    /// Follows watch `i` for ever, relisting after errors (with backoff).
    async fn watch(&self, i: usize) {
        let w = &self.watched[i];
        let api: Api<DynamicObject> = match &w.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &w.resource),
            None => Api::all_with(self.client.clone(), &w.resource),
        };
        let selector = if w.driver_of.is_some() {
            MANAGED
        } else {
            SESSION_SELECTOR
        };
        let cfg = watcher::Config::default()
            .labels(selector)
            .timeout(crate::k8s_api::WATCH_TIMEOUT_SECS);
        let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut failing = false;
        while let Some(e) = events.next().await {
            let e = match e {
                Ok(e) => e,
                Err(e) => {
                    if !failing {
                        warn!(
                            "session store: watching {} failed: {}; retrying",
                            w.resource.plural,
                            crate::k8s_api::chain(&e)
                        );
                    }
                    failing = true;
                    self.set_up(false);
                    continue;
                }
            };
            failing = false;
            let mut ix = self.index.lock();
            match e {
                Event::Init => {
                    ix.listing.insert(i, HashMap::new());
                }
                Event::InitApply(o) => {
                    let r = self.record(i, &o);
                    ix.listing.entry(i).or_default().insert(r.obj.clone(), r);
                }
                Event::InitDone => {
                    let listed = ix.listing.remove(&i).unwrap_or_default();
                    let stale: Vec<ObjKey> = ix
                        .objects
                        .keys()
                        .filter(|k| k.watch == i && !listed.contains_key(*k))
                        .cloned()
                        .collect();
                    for k in stale {
                        ix.delete(&k, None);
                    }
                    for (_, r) in listed {
                        ix.apply(r);
                    }
                    drop(ix);
                    self.set_up(true);
                    let n = {
                        let mut once = self.listed_once.lock();
                        once.insert(i);
                        once.len()
                    };
                    self.listed.send_if_modified(|v| {
                        let more = n > *v;
                        *v = n.max(*v);
                        more
                    });
                }
                Event::Apply(o) => ix.apply(self.record(i, &o)),
                Event::Delete(o) => {
                    let r = self.record(i, &o);
                    ix.delete(&r.obj, Some(&r));
                }
            }
        }
    }

    /// A watched object as a record.
    fn record(&self, i: usize, o: &DynamicObject) -> Rec {
        let m = &o.metadata;
        let empty = Default::default();
        let a = m.annotations.as_ref().unwrap_or(&empty);
        let get = |k: &str| a.get(k).cloned();
        let namespace = m.namespace.clone().unwrap_or_default();
        let name = m.name.clone().unwrap_or_default();
        let created_ms = m
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond())
            .unwrap_or_else(now_ms);
        let w = &self.watched[i];
        let session = get(annotation::SESSION).and_then(|id| {
            let key = SessionKey {
                session_id: id,
                user_id: get(annotation::USER).unwrap_or_default(),
            };
            let created = get(annotation::CREATED)
                .and_then(|t| parse_ms(&t))
                .unwrap_or(created_ms);
            let active = get(annotation::LAST_ACTIVITY)
                .and_then(|t| parse_ms(&t))
                .unwrap_or(created);
            let (frontend, backend, place) = match &w.driver_of {
                Some((fe, be)) => (
                    get(annotation::FRONTEND).unwrap_or_else(|| fe.clone()),
                    be.clone(),
                    Place::Driver {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        team: get(annotation::TEAM).unwrap_or_default(),
                        environment: get(annotation::ENVIRONMENT).unwrap_or_default(),
                    },
                ),
                None => (
                    get(annotation::FRONTEND)?,
                    get(annotation::BACKEND)?,
                    Place::Server {
                        name: get(annotation::SERVER)?,
                        addr: get(annotation::SERVER_ADDR)?,
                    },
                ),
            };
            Some(Known {
                key,
                frontend,
                backend,
                place,
                created_ms: created,
                active_ms: active,
            })
        });
        Rec {
            obj: ObjKey {
                watch: i,
                namespace,
                name,
            },
            rv: m.resource_version.clone().unwrap_or_default(),
            uid: m.uid.clone().unwrap_or_default(),
            created_ms,
            session,
            pool: m
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::gateway::pool::LABEL))
                .is_some_and(|v| v == crate::gateway::pool::READY),
            ended: get(annotation::ENDED).map(|r| super::parse_reason(&r)),
        }
    }

    /// A record the registry could not take yet (its server is not in the backend): offered
    /// again at the next sync.
    pub fn again(&self, key: SessionKey) {
        let mut ix = self.index.lock();
        if ix.by_session.contains_key(&key) {
            ix.dirty.insert(key);
        }
    }

    /// The driver recorded for `key`, if the watch has seen one.
    pub fn driver_of(&self, key: &SessionKey) -> Option<Known> {
        let ix = self.index.lock();
        let r = ix.find(key)?;
        let s = r.session.as_ref()?;
        matches!(s.place, Place::Driver { .. }).then(|| s.clone())
    }

    /// Binds a new session on a static or discovered server: its session Lease, created unless
    /// one exists (then that one's binding is the answer).
    pub async fn bind(&self, key: &SessionKey, b: &Binding) -> Result<Bound, StoreError> {
        if let Some(r) = self.index.lock().find(key) {
            if let Some(reason) = r.ended {
                return Ok(Bound::Ended(reason));
            }
            if let Some(s) = &r.session {
                return Ok(theirs(s));
            }
        }
        if key.session_id.len() > MAX_ID || key.user_id.len() > MAX_ID {
            return Err(StoreError::Kube(format!(
                "session or user id longer than {MAX_ID} bytes: not recorded"
            )));
        }
        let api: Api<DynamicObject> = self.api(0, &self.cfg.namespace);
        let name = lease_name(key);
        let now = now_ms();
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/managed-by": "sclb",
                    "app.kubernetes.io/component": "spark-session",
                },
                "annotations": {
                    annotation::SESSION: key.session_id,
                    annotation::USER: key.user_id,
                    annotation::FRONTEND: b.frontend,
                    annotation::BACKEND: b.backend,
                    annotation::SERVER: b.server,
                    annotation::SERVER_ADDR: b.server_addr,
                    annotation::CREATED: ms_text(b.created_ms),
                    annotation::LAST_ACTIVITY: ms_text(now),
                },
            },
            "spec": {},
        }))
        .map_err(|e| StoreError::Kube(e.to_string()))?;
        match self
            .call("bind", api.create(&PostParams::default(), &obj))
            .await
        {
            Ok(_) => {
                self.written.lock().insert(key.clone(), Instant::now());
                Ok(Bound::Ours)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let o = self
                    .call("bind", api.get(&name))
                    .await
                    .map_err(|e| StoreError::Kube(crate::k8s_api::chain(&e)))?;
                let r = self.record(0, &o);
                if let Some(reason) = r.ended {
                    return Ok(Bound::Ended(reason));
                }
                match r.session {
                    Some(s) if s.key == *key => Ok(theirs(&s)),
                    _ => Err(StoreError::Kube(format!(
                        "Lease {name} records another session"
                    ))),
                }
            }
            Err(e) => Err(StoreError::Kube(crate::k8s_api::chain(&e))),
        }
    }

    pub fn bound_locally(&self, key: SessionKey, b: Binding) {
        let mut u = self.unwritten.lock();
        if u.len() < MAX_WAITING && key.session_id.len() <= MAX_ID && key.user_id.len() <= MAX_ID {
            u.push((key, b));
        }
    }

    pub fn ended_here(&self, key: SessionKey, reason: EndReason) {
        let mut e = self.ends.lock();
        if e.len() < MAX_WAITING {
            e.push((key, reason, 0));
        }
    }

    /// Deletes a record, marked with why; with `precondition`, only if it is still the version
    /// read (a reaper's delete). True if it is gone.
    async fn end_record(
        &self,
        r: &Rec,
        reason: EndReason,
        precondition: bool,
    ) -> Result<bool, kube::Error> {
        let api = self.api(r.obj.watch, &r.obj.namespace);
        let mut patch = json!({"metadata": {"annotations": {annotation::ENDED: reason.as_str()}}});
        if precondition {
            // A merge patch that names a resourceVersion is refused (409) if it changed.
            patch["metadata"]["resourceVersion"] = r.rv.clone().into();
        }
        let marked = match self
            .call(
                "end",
                api.patch(&r.obj.name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .await
        {
            Ok(o) => o.metadata.resource_version,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(false),
            Err(e) => return Err(e),
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: if precondition { marked } else { None },
                uid: Some(r.uid.clone()).filter(|u| !u.is_empty()),
            }),
            ..Default::default()
        };
        match self.call("end", api.delete(&r.obj.name, &dp)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The reaper (on the Lease holder only): ends the sessions in `due` whose record is idle
    /// too — older than the cutoff by two activity intervals and a sync, the most another
    /// replica's activity may wait to be written — or over their TTL. The delete carries the
    /// record's resourceVersion: activity written since keeps the session.
    pub async fn end_if_idle(
        &self,
        due: &[(SessionKey, EndReason, i64)],
    ) -> Result<(Vec<SessionKey>, Vec<(SessionKey, i64)>), StoreError> {
        let (mut ended, mut busy) = (Vec::new(), Vec::new());
        let slack = (2 * self.cfg.activity_interval + self.cfg.sync_interval).as_millis() as i64;
        for (key, reason, cutoff) in due {
            if !self.is_leader() {
                break;
            }
            let rec = self.index.lock().find(key).cloned();
            let Some(rec) = rec else {
                // Not recorded (bound while the API server was away): nothing to guard.
                ended.push(key.clone());
                continue;
            };
            let active = rec.session.as_ref().map_or(0, |s| s.active_ms);
            if *reason != EndReason::Ttl && active >= cutoff.saturating_sub(slack) {
                busy.push((key.clone(), active));
                continue;
            }
            match self.end_record(&rec, *reason, true).await {
                Ok(true) => {
                    info!(session = %crate::escape::token(&key.session_id), record = %rec.obj.name, "session record deleted by the reaper ({})", reason.as_str());
                    ended.push(key.clone());
                }
                Ok(false) => {
                    debug!(session = %crate::escape::token(&key.session_id), "session record changed since it was read: kept");
                    busy.push((key.clone(), active));
                }
                Err(e) => return Err(StoreError::Kube(crate::k8s_api::chain(&e))),
            }
        }
        Ok((ended, busy))
    }

    /// The reaper's other work (on the Lease holder only): deletes drivers labelled
    /// managed-by=sclb that name no session once `orphan_grace` has passed since their
    /// creation, and records no replica could place (their server or driver never came) once
    /// idle. `live` says whether the registry holds a session; `limits` gives a frontend's
    /// (idle timeout, max TTL).
    pub async fn housekeep(
        &self,
        live: impl Fn(&SessionKey) -> bool,
        limits: impl Fn(&str) -> (Duration, Duration),
    ) {
        if !self.is_leader() {
            return;
        }
        let now = now_ms();
        let grace = self.cfg.orphan_grace.as_millis() as i64;
        let slack = (2 * self.cfg.activity_interval + self.cfg.sync_interval).as_millis() as i64;
        let stale: Vec<(Rec, EndReason)> = self
            .index
            .lock()
            .objects
            .values()
            .filter_map(|r| match &r.session {
                None if r.pool => None,
                None => (now - r.created_ms >= grace).then(|| (r.clone(), EndReason::Idle)),
                Some(s) if !live(&s.key) => {
                    let (idle, ttl) = limits(&s.frontend);
                    if now - s.created_ms >= ttl.as_millis() as i64 {
                        Some((r.clone(), EndReason::Ttl))
                    } else if now - s.active_ms >= idle.as_millis() as i64 + slack {
                        Some((r.clone(), EndReason::Idle))
                    } else {
                        None
                    }
                }
                Some(_) => None,
            })
            .collect();
        for (r, reason) in stale {
            if !self.is_leader() {
                return;
            }
            let what = match &r.session {
                None => format!(
                    "orphaned driver (labelled managed-by=sclb, no session, older than {:?})",
                    self.cfg.orphan_grace
                ),
                Some(s) => format!(
                    "record of session {} that no replica holds ({})",
                    crate::escape::token(&s.key.session_id),
                    reason.as_str()
                ),
            };
            match self.end_record(&r, reason, true).await {
                Ok(true) => info!(
                    target: "sclb::audit",
                    namespace = %r.obj.namespace,
                    name = %r.obj.name,
                    "deleted {what}: {}/{}",
                    r.obj.namespace,
                    r.obj.name,
                ),
                Ok(false) => debug!(name = %r.obj.name, "{what} changed since read: kept"),
                Err(e) => {
                    debug!(name = %r.obj.name, "cannot delete {what}: {}", crate::k8s_api::chain(&e));
                    return;
                }
            }
        }
    }

    /// Writes what waits (local binds, ends, activity due) and hands over what the watch saw
    /// since the last sync.
    pub async fn sync(&self, activity: Vec<(SessionKey, i64)>) -> Result<Synced, StoreError> {
        let mut out = Synced::default();
        let err = |e: kube::Error| StoreError::Kube(crate::k8s_api::chain(&e));
        // Sessions bound here while the API server was away.
        let unwritten = std::mem::take(&mut *self.unwritten.lock());
        for (i, (key, b)) in unwritten.iter().enumerate() {
            match self.bind(key, b).await {
                Ok(Bound::Ours) => {}
                Ok(Bound::Theirs { binding, .. }) if binding != *b => {
                    self.metrics.conflict();
                    out.moved.push((key.clone(), binding));
                }
                Ok(Bound::Theirs { .. }) => {}
                Ok(Bound::Ended(r)) => out.ended.push((key.clone(), r)),
                Err(e) => {
                    self.unwritten.lock().extend(unwritten[i..].iter().cloned());
                    return Err(e);
                }
            }
        }
        // Ends: the record is deleted (a driver's too: it is the session's).
        let ends = std::mem::take(&mut *self.ends.lock());
        let mut later = Vec::new();
        for (n, (key, reason, waited)) in ends.iter().enumerate() {
            let rec = self.index.lock().find(key).cloned();
            let rec = match rec {
                Some(r) => r,
                // Not seen by the watch yet (created a moment ago): wait a few syncs, then
                // delete it as a session Lease by its name (a driver not seen by then is
                // reaped as a record no replica holds).
                None if *waited < 5 => {
                    later.push((key.clone(), *reason, waited + 1));
                    continue;
                }
                None => match self.lease_rec(key) {
                    Some(r) => r,
                    None => continue,
                },
            };
            if let Err(e) = self.end_record(&rec, *reason, false).await {
                let mut q = self.ends.lock();
                q.extend(ends[n..].iter().cloned());
                q.extend(later);
                return Err(err(e));
            }
            self.written.lock().remove(key);
        }
        self.ends.lock().extend(later);
        self.write_activity(activity).await?;
        let mut ix = self.index.lock();
        let dirty: Vec<SessionKey> = ix.dirty.drain().collect();
        out.known = dirty
            .iter()
            .filter_map(|k| ix.find(k).and_then(|r| r.session.clone()))
            .collect();
        out.ended.append(&mut ix.gone);
        Ok(out)
    }

    /// A record of `key`'s session Lease, to delete it by name.
    fn lease_rec(&self, key: &SessionKey) -> Option<Rec> {
        if key.session_id.len() > MAX_ID || key.user_id.len() > MAX_ID {
            return None;
        }
        Some(Rec {
            obj: ObjKey {
                watch: 0,
                namespace: self.cfg.namespace.clone(),
                name: lease_name(key),
            },
            rv: String::new(),
            uid: String::new(),
            created_ms: 0,
            session: None,
            pool: false,
            ended: None,
        })
    }

    /// Writes last activity, at most once per `activity_interval` per session.
    async fn write_activity(&self, activity: Vec<(SessionKey, i64)>) -> Result<(), StoreError> {
        let due: Vec<(SessionKey, i64)> = {
            let mut waiting = self.activity.lock();
            for (k, at) in activity {
                let e = waiting.entry(k).or_insert(at);
                *e = (*e).max(at);
            }
            let written = self.written.lock();
            let due: Vec<SessionKey> = waiting
                .keys()
                .filter(|k| {
                    written
                        .get(*k)
                        .is_none_or(|w| w.elapsed() >= self.cfg.activity_interval)
                })
                .cloned()
                .collect();
            due.into_iter()
                .filter_map(|k| waiting.remove(&k).map(|a| (k, a)))
                .collect()
        };
        for (n, (key, at)) in due.iter().enumerate() {
            let rec = self.index.lock().find(key).cloned();
            let Some(rec) = rec else {
                // Not recorded (yet): its record's creation wrote its activity.
                continue;
            };
            // Nothing newer than the record says (within the clocks' rounding).
            if rec
                .session
                .as_ref()
                .is_some_and(|s| s.active_ms + 1000 >= *at)
            {
                continue;
            }
            let api = self.api(rec.obj.watch, &rec.obj.namespace);
            let patch =
                json!({"metadata": {"annotations": {annotation::LAST_ACTIVITY: ms_text(*at)}}});
            match self
                .call(
                    "activity",
                    api.patch(
                        &rec.obj.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    ),
                )
                .await
            {
                Ok(_) => {
                    self.written.lock().insert(key.clone(), Instant::now());
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    let mut w = self.activity.lock();
                    for (k, a) in &due[n..] {
                        w.entry(k.clone()).or_insert(*a);
                    }
                    return Err(StoreError::Kube(crate::k8s_api::chain(&e)));
                }
            }
        }
        Ok(())
    }

    /// Hands the reaper Lease over on a graceful stop.
    pub async fn release_lease(&self) {
        self.election.release().await;
    }
}

fn theirs(s: &Known) -> Bound {
    let (server, server_addr) = match &s.place {
        Place::Server { name, addr } => (name.clone(), addr.clone()),
        Place::Driver {
            namespace, name, ..
        } => (format!("{namespace}/{name}"), String::new()),
    };
    Bound::Theirs {
        binding: Binding {
            backend: s.backend.clone(),
            frontend: s.frontend.clone(),
            server,
            server_addr,
            created_ms: s.created_ms,
        },
        active_ms: s.active_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_through_annotations() {
        let t = 1_796_000_000_123;
        assert_eq!(parse_ms(&ms_text(t)), Some(t));
        assert_eq!(parse_ms("yesterday"), None);
    }

    #[test]
    fn a_lease_name_is_a_dns_label_derived_from_the_session() {
        let k = |id: &str| SessionKey {
            session_id: id.into(),
            user_id: "alice".into(),
        };
        let n = lease_name(&k("5c1b0000-0000-4000-8000-000000000001"));
        assert!(crate::config::is_dns_label(&n), "{n}");
        assert_eq!(n, lease_name(&k("5c1b0000-0000-4000-8000-000000000001")));
        assert_ne!(n, lease_name(&k("other")));
    }
}
