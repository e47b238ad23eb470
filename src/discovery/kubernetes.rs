//! Kubernetes discovery: a backend's servers from a watch on pods, EndpointSlices,
//! SparkApplications or SparkConnects.
//!
//! One task per backend ([`spawn`]) runs a kube-runtime watcher per namespace and watched kind
//! (list, then watch from the list's resourceVersion with bookmarks), each in its own small
//! task (`pump`). The backend task keeps a `View` of the objects they report, turns them
//! into [`super::Discovered`] servers, and hands the changes to
//! [`crate::control`]: a `Reset` after every complete (re)list, `Upsert` and
//! `Remove` for single events in between. Events that arrive together (up to [`BATCH`]) are
//! handed over as one change: the servers are rebuilt once per burst, not once per event.
//!
//! Faults never take servers away: a watch that fails (API server down, 403, 410 Gone, dropped
//! stream) sends nothing; it pauses with backoff and lists again, and the last known servers
//! keep serving meanwhile. Only a successful list or a watch event changes them. Every fault is
//! logged, counted and shown in the source's [`super::SourceStatus`].

use std::hash::BuildHasher;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

mod objects;
mod view;

use objects::{AppInfo, ConnectInfo, Object, PodInfo, SliceInfo};
use view::{Step, View};

/// Most watch events applied as one change.
const BATCH: usize = 4096;

/// Shortest time between two hand-overs while events keep coming (see the run loop).
const COALESCE: Duration = Duration::from_millis(50);

use super::Update;
use crate::Shared;
use crate::config::{KubernetesDiscovery, KubernetesKind, PortRef};
use crate::k8s_api::{chain, client, spark_applications, spark_connects};

/// Starts the discovery task of `backend`; it runs until `stop` is cancelled.
pub fn spawn(
    shared: &Arc<Shared>,
    backend: String,
    settings: KubernetesDiscovery,
    stop: CancellationToken,
) {
    let span = info_span!("discovery", backend = %backend, kind = %settings.kind);
    let source = Source {
        shared: Arc::downgrade(shared),
        backend,
        stop,
    };
    tokio::spawn(run(source, settings).instrument(span));
}

/// A one-line description of a source, for `show info` and the stats page.
pub fn describe(s: &KubernetesDiscovery) -> String {
    let mut out = format!("kubernetes {}", s.kind);
    match s.namespaces.as_slice() {
        [] => out.push_str(" in all namespaces"),
        [one] => out.push_str(&format!(" in namespace {one}")),
        many => out.push_str(&format!(" in namespaces {}", many.join(","))),
    }
    if let Some(sel) = &s.selector {
        out.push_str(&format!(", selector {sel}"));
    }
    out.push_str(&format!(", port {}", s.port));
    out
}

/// Where the task reports to. Holds the process weakly: a dropped process stops its sources.
struct Source {
    shared: Weak<Shared>,
    backend: String,
    stop: CancellationToken,
}

impl Source {
    fn status(&self, f: impl FnOnce(&mut super::SourceStatus)) {
        if let Some(shared) = self.shared.upgrade()
            && !self.stop.is_cancelled()
        {
            shared.state.discovered.set_status(&self.backend, f);
        }
    }

    fn deliver(&self, updates: Vec<Update>) {
        if let Some(shared) = self.shared.upgrade() {
            super::deliver(&shared, &self.backend, &self.stop, updates);
        }
    }

    /// Records a fault; logs it when it differs from the previous one.
    fn fault(&self, state: &str, message: String) {
        let mut repeated = false;
        self.status(|s| {
            repeated = s.last_error.as_deref() == Some(message.as_str()) && s.state == state;
            s.state = state.to_string();
            s.errors += 1;
            s.last_error = Some(message.clone());
            s.last_error_at = Some(SystemTime::now());
        });
        if repeated {
            debug!("{message}");
        } else {
            warn!("{message}; the last known servers keep serving");
        }
    }
}

async fn run(source: Source, settings: KubernetesDiscovery) {
    source.status(|s| {
        s.source = describe(&settings);
        s.state = "connecting".into();
    });
    let client = loop {
        match client(&settings).await {
            Ok(c) => break c,
            Err(e) => source.fault(
                "no client",
                format!("cannot build a Kubernetes client: {e}"),
            ),
        }
        tokio::select! {
            _ = source.stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    };
    let watches = watches(&settings);
    let (tx, mut rx) = mpsc::channel(64);
    for (i, w) in watches.iter().enumerate() {
        let pump = pump(
            i,
            w.clone(),
            client.clone(),
            settings.clone(),
            tx.clone(),
            source.stop.clone(),
        );
        tokio::spawn(pump.in_current_span());
    }
    drop(tx);
    source.status(|s| s.state = "listing".into());
    let mut view = View::new(&settings, watches.len());
    let mut failing = vec![false; watches.len()];
    let mut batch = Vec::with_capacity(BATCH);
    let now = tokio::time::Instant::now();
    let mut last_handover = now.checked_sub(COALESCE).unwrap_or(now);
    loop {
        let first = tokio::select! {
            biased;
            _ = source.stop.cancelled() => return,
            item = rx.recv() => match item {
                Some(item) => item,
                None => return,
            },
        };
        if source.shared.strong_count() == 0 {
            return; // the load balancer is gone
        }
        // The events already queued are applied together: a burst (a relist, a deployment
        // rolling many pods) rebuilds the servers once, not once per event. Within
        // `COALESCE` of the last hand-over, the events of that window wait for its end and go
        // together: an isolated event is handed over at once, a stream of them at most every
        // `COALESCE`, so rebuilding costs less per event the more events there are.
        batch.push(first);
        let window = tokio::time::sleep_until(last_handover + COALESCE);
        tokio::pin!(window);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) if window.is_elapsed() => break,
                Err(_) => tokio::select! {
                    biased;
                    _ = source.stop.cancelled() => return,
                    item = rx.recv() => match item {
                        Some(item) => batch.push(item),
                        None => return,
                    },
                    _ = &mut window => break,
                },
            }
        }
        let (mut changed, mut listed) = (false, false);
        for (i, item) in batch.drain(..) {
            let event = match item {
                Ok(event) => event,
                Err(e) => {
                    failing[i] = true;
                    let (state, message) = explain(&e, &watches[i]);
                    source.fault(state, message);
                    continue;
                }
            };
            if matches!(event, Event::InitDone) && failing[i] {
                failing[i] = false;
                info!("{}: listed again, the watch works", watches[i].what());
            }
            match view.apply(i, event) {
                Step::Pending => {}
                Step::Changed => changed = true,
                Step::Listed => (changed, listed) = (true, true),
            }
        }
        if changed && let Some(change) = view.changes(listed) {
            for line in &change.log {
                info!("{line}");
            }
            source.deliver(change.reset.into_iter().chain(change.updates).collect());
            last_handover = tokio::time::Instant::now();
        }
        if listed && view.synced() {
            let healthy = !failing.iter().any(|f| *f);
            source.status(|s| {
                if healthy {
                    s.state = "watching".into();
                }
                s.last_sync = Some(SystemTime::now());
            });
        }
    }
}

/// How long one watch request lasts before it is renewed (the API server ends it).
const WATCH_TIMEOUT_SECS: u32 = crate::k8s_api::WATCH_TIMEOUT_SECS;

/// One watch: a kind of object in one namespace (or all).
#[derive(Debug, Clone)]
struct Watch {
    role: Role,
    namespace: Option<String>,
    selector: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Pods,
    Slices,
    Apps,
    /// The driver pods of SparkApplications.
    DriverPods,
    Connects,
}

impl Role {
    /// The resource, as RBAC names it.
    fn resource(self) -> &'static str {
        match self {
            Role::Pods | Role::DriverPods => "pods",
            Role::Slices => "endpointslices.discovery.k8s.io",
            Role::Apps => "sparkapplications.sparkoperator.k8s.io",
            Role::Connects => "sparkconnects.sparkoperator.k8s.io",
        }
    }
}

impl Watch {
    fn what(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} in namespace \"{ns}\"", self.role.resource()),
            None => format!("{} in all namespaces", self.role.resource()),
        }
    }

    /// The watcher's events, each object reduced to an [`Object`].
    fn stream(
        &self,
        client: Client,
        port: &PortRef,
    ) -> futures::stream::BoxStream<'static, Result<Event<Object>, watcher::Error>> {
        let mut config = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
        if let Some(sel) = &self.selector {
            config = config.labels(sel);
        }
        let port = port.clone();
        match self.role {
            Role::Pods | Role::DriverPods => {
                let api: Api<Pod> = self.api(client);
                reduce(watcher::watcher(api, config), move |p| {
                    Object::Pod(PodInfo::from_pod(&p, &port))
                })
            }
            Role::Slices => {
                let api: Api<EndpointSlice> = self.api(client);
                reduce(watcher::watcher(api, config), move |s| {
                    Object::Slice(SliceInfo::from_slice(&s, &port))
                })
            }
            Role::Apps => {
                let ar = spark_applications();
                let api = self.dynamic_api(client, &ar);
                reduce(watcher::watcher(api, config), |o| {
                    Object::App(AppInfo::from_object(&o))
                })
            }
            Role::Connects => {
                let ar = spark_connects();
                let api = self.dynamic_api(client, &ar);
                reduce(watcher::watcher(api, config), |o| {
                    Object::Connect(ConnectInfo::from_object(&o))
                })
            }
        }
    }

    fn api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }

    fn dynamic_api(&self, client: Client, ar: &ApiResource) -> Api<DynamicObject> {
        match &self.namespace {
            Some(ns) => Api::namespaced_with(client, ns, ar),
            None => Api::all_with(client, ar),
        }
    }
}

/// Maps a watcher's objects through `f`.
fn reduce<K: Send + 'static>(
    s: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    f: impl Fn(K) -> Object + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<Event<Object>, watcher::Error>> {
    s.map(move |r| {
        r.map(|e| match e {
            Event::Apply(k) => Event::Apply(f(k)),
            Event::Delete(k) => Event::Delete(f(k)),
            Event::Init => Event::Init,
            Event::InitApply(k) => Event::InitApply(f(k)),
            Event::InitDone => Event::InitDone,
        })
    })
    .boxed()
}

/// The watches a source needs: its kind in each namespace, plus the driver pods for
/// SparkApplications.
fn watches(s: &KubernetesDiscovery) -> Vec<Watch> {
    let namespaces: Vec<Option<String>> = if s.namespaces.is_empty() {
        vec![None]
    } else {
        s.namespaces.iter().cloned().map(Some).collect()
    };
    let mut out = Vec::new();
    for ns in namespaces {
        let main = |role| Watch {
            role,
            namespace: ns.clone(),
            selector: s.selector.clone(),
        };
        match s.kind {
            KubernetesKind::Pods => out.push(main(Role::Pods)),
            KubernetesKind::EndpointSlices => out.push(main(Role::Slices)),
            KubernetesKind::SparkConnects => out.push(main(Role::Connects)),
            KubernetesKind::SparkApplications => {
                out.push(main(Role::Apps));
                out.push(Watch {
                    role: Role::DriverPods,
                    namespace: ns.clone(),
                    selector: Some("spark-role=driver".into()),
                });
            }
        }
    }
    out
}

type Item = (usize, Result<Event<Object>, watcher::Error>);

/// Runs watch `i` and forwards what it reports. After an error it pauses (backoff), then starts
/// over with a fresh list, as client-go's reflector does: a recovered watch proves itself with
/// a complete list, which also relists after an expired resourceVersion (410 Gone) however the
/// API server reports it.
async fn pump(
    i: usize,
    w: Watch,
    client: Client,
    settings: KubernetesDiscovery,
    tx: mpsc::Sender<Item>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let mut events = w.stream(client.clone(), &settings.port);
        loop {
            let item = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                item = events.next() => match item {
                    Some(item) => item,
                    None => break,
                },
            };
            let failed = item.is_err();
            if matches!(item, Ok(Event::InitDone)) {
                backoff = Backoff::default();
            }
            if tx.send((i, item)).await.is_err() {
                return;
            }
            if failed {
                break;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Exponential backoff with jitter between failed attempts: 0.5 s doubling to 10 s.
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(Duration::from_secs(10));
        // ±20% jitter, so that many sources do not retry in step.
        let r = std::collections::hash_map::RandomState::new().hash_one(SystemTime::now());
        d.mul_f64(0.8 + (r % 1000) as f64 / 2500.0)
    }
}

/// A watcher error in an operator's words, and the source state it leaves.
fn explain(e: &watcher::Error, w: &Watch) -> (&'static str, String) {
    let (verb, err) = match e {
        watcher::Error::InitialListFailed(err) => ("list", err),
        watcher::Error::WatchStartFailed(err) | watcher::Error::WatchFailed(err) => ("watch", err),
        watcher::Error::WatchError(status) => {
            return if status.code == 410 {
                (
                    "relisting",
                    format!(
                        "watch of {}: resourceVersion expired (410 Gone: {}); listing again",
                        w.what(),
                        status.message
                    ),
                )
            } else if status.code == 403 {
                ("forbidden", forbidden("watch", w, &status.message))
            } else {
                (
                    "error",
                    format!(
                        "watch of {}: the API server sent an error ({} {}: {})",
                        w.what(),
                        status.code,
                        status.reason,
                        status.message
                    ),
                )
            };
        }
        watcher::Error::NoResourceVersion => {
            return (
                "error",
                format!("{}: the API server sent no resourceVersion", w.what()),
            );
        }
    };
    match err {
        kube::Error::Api(status) if status.code == 403 => {
            ("forbidden", forbidden(verb, w, &status.message))
        }
        kube::Error::Api(status) if status.code == 401 => (
            "unauthorized",
            format!(
                "cannot {verb} {}: the API server refused the credentials (401 Unauthorized: {})",
                w.what(),
                status.message
            ),
        ),
        kube::Error::Api(status)
            if status.code == 404 && matches!(w.role, Role::Apps | Role::Connects) =>
        {
            (
                "error",
                format!(
                    "cannot {verb} {}: the API server does not serve them (404): is the spark-operator CRD installed?",
                    w.what()
                ),
            )
        }
        kube::Error::Api(status) if status.code == 410 => (
            "relisting",
            format!(
                "watch of {}: resourceVersion expired (410 Gone: {}); listing again",
                w.what(),
                status.message
            ),
        ),
        kube::Error::Api(status) => (
            "error",
            format!(
                "cannot {verb} {}: {} {}: {}",
                w.what(),
                status.code,
                status.reason,
                status.message
            ),
        ),
        other => (
            "unreachable",
            format!(
                "cannot {verb} {}: API server unreachable: {}",
                w.what(),
                chain(other)
            ),
        ),
    }
}

/// An RBAC denial, naming what to grant.
fn forbidden(verb: &str, w: &Watch, message: &str) -> String {
    let scope = match &w.namespace {
        Some(ns) => format!("in namespace \"{ns}\" (a Role there)"),
        None => "in all namespaces (a ClusterRole)".to_string(),
    };
    format!(
        "RBAC: forbidden to {verb} {}: grant get, list and watch on {} {scope}; the API server said: {message}",
        w.what(),
        w.role.resource()
    )
}

#[cfg(test)]
mod tests;
