//! The gateway's session registry: every live Spark session, the server that holds it, and
//! when it was last active. It is the gateway's stick table — a session's RPCs go where its
//! first one went — and the record the reaper, `show sessions` and `/sessions` read.
//!
//! A session ends when its client releases it (`ReleaseSession`), when it has been idle for
//! `idle_timeout` or alive for `max_ttl`, or when an operator kills it. Its streams are then
//! closed (CANCELLED), one audit line is logged, and the key is remembered for a while, so
//! that a client still using it is told what happened instead of being silently given a new,
//! empty session somewhere else.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as PromRegistry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::quota::{ClientKey, Limits, Quotas, Refused};
use crate::server::ServerId;

/// What a Spark server keys a session by.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub session_id: String,
    /// Empty when the client sent no user id.
    pub user_id: String,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent ReleaseSession (`spark.stop()`).
    Released,
    /// No message either way for `idle_timeout`.
    Idle,
    /// Older than `max_ttl`.
    Ttl,
    /// `kill session` or `DELETE /sessions/{id}`.
    Killed,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Released => "released",
            EndReason::Idle => "idle",
            EndReason::Ttl => "ttl",
            EndReason::Killed => "killed",
        }
    }

    /// What a client still using the session is told.
    pub fn explain(self) -> &'static str {
        match self {
            EndReason::Released => "was released by its client",
            EndReason::Idle => "was closed by sclb after its idle timeout",
            EndReason::Ttl => "was closed by sclb at its maximum lifetime",
            EndReason::Killed => "was killed by an operator",
        }
    }
}

/// Where a session's RPCs go.
#[derive(Debug, Clone)]
pub struct Placement {
    pub server: ServerId,
    pub server_name: Arc<str>,
}

/// Where a session's driver came from, when it is a Kubernetes object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionMeta {
    pub namespace: Option<String>,
    /// The SparkConnect or SparkApplication.
    pub app: Option<String>,
    pub team: Option<String>,
    pub environment: Option<String>,
    /// sclb created the driver for this session, and deletes it when the session ends.
    pub created: bool,
    /// Where that driver lives (the backend's discovery source), to delete it.
    pub source: Option<crate::config::KubernetesDiscovery>,
}

pub struct Session {
    pub key: SessionKey,
    /// Who the session counts against (its creator), for the per-client limits.
    pub client_key: ClientKey,
    pub meta: SessionMeta,
    pub frontend: Arc<str>,
    pub backend: Arc<str>,
    placement: Mutex<Placement>,
    client: Mutex<SocketAddr>,
    pub created: SystemTime,
    born: Instant,
    /// Milliseconds since the registry's epoch.
    last_activity: AtomicU64,
    /// RPCs in flight.
    pub streams: AtomicU64,
    /// RPCs so far.
    pub rpcs: AtomicU64,
    /// `last_activity` as last written to a shared store.
    synced_activity: AtomicU64,
    kill: CancellationToken,
    ended: Mutex<Option<EndReason>>,
    epoch: Instant,
    /// Its entry in the reaper's queue (`Inner::checks`), while it is live.
    queued: Mutex<Option<(Instant, u64)>>,
}

impl Session {
    pub fn placement(&self) -> Placement {
        self.placement.lock().clone()
    }

    pub fn move_to(&self, p: Placement) {
        *self.placement.lock() = p;
    }

    pub fn client(&self) -> SocketAddr {
        *self.client.lock()
    }

    /// Records a message (either way) now.
    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_activity.fetch_max(ms, Relaxed);
    }

    /// Activity another process recorded `idle` ago (from a shared store).
    pub fn seen(&self, idle: Duration) {
        let ms = (self.epoch.elapsed().saturating_sub(idle)).as_millis() as u64;
        self.last_activity.fetch_max(ms, Relaxed);
        self.synced_activity.fetch_max(ms, Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_activity.load(Relaxed)))
    }

    pub fn age(&self) -> Duration {
        self.born.elapsed()
    }

    /// Resolves when the session ends; its streams then close.
    pub fn killed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.kill.clone().cancelled_owned()
    }

    pub fn end_reason(&self) -> Option<EndReason> {
        *self.ended.lock()
    }

    /// Counts one RPC in flight until the guard drops.
    pub fn rpc_started(self: &Arc<Self>, client: SocketAddr) -> RpcGuard {
        self.rpcs.fetch_add(1, Relaxed);
        self.streams.fetch_add(1, Relaxed);
        *self.client.lock() = client;
        self.touch();
        RpcGuard(self.clone())
    }
}

impl Session {
    /// An RPC the server never answered is no history: the session may still move, as one
    /// whose first RPC could not connect does.
    pub fn unanswered(&self) {
        let _ = self
            .rpcs
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

pub struct RpcGuard(Arc<Session>);

impl Drop for RpcGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Relaxed);
        self.0.touch();
    }
}

/// The `spark_connect_*` metrics, named as the gateway design names them.
/// Label sets of static words: counting an RPC allocates nothing.
type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

/// The reasons the gateway counts its own errors under (`spark_connect_proxy_errors_total`).
pub const ERROR_REASONS: [&str; 15] = [
    "bad_header",
    "bad_path",
    "client_timeout",
    "connect_failed",
    "create_failed",
    "no_frontend",
    "not_found",
    "not_ready",
    "on_demand",
    "session_closed",
    "sessions_full",
    "team_full",
    "unimplemented",
    "upstream_failed",
    "upstream_reset",
];

pub struct Metrics {
    pub registry: PromRegistry,
    pub sessions_active: Gauge,
    pub sessions_created: Counter,
    pub sessions_expired: Family<Labels1, Counter>,
    pub requests: Family<Labels2, Counter>,
    pub errors: Family<Labels1, Counter>,
    pub session_duration: Histogram,
    pub message_latency: Family<Labels1, Histogram>,
    /// Handles on `requests{method, code="OK"}` and `message_latency{method}`, by
    /// [`Method::index`]: the series every answered RPC counts in, without a label hash and a
    /// lock per RPC.
    ok_by_method: Vec<Counter>,
    latency_by_method: Vec<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = PromRegistry::with_prefix("spark_connect");
        let sessions_active = Gauge::default();
        let sessions_created = Counter::default();
        let sessions_expired = Family::<Labels1, Counter>::default();
        let requests = Family::<Labels2, Counter>::default();
        let errors = Family::<Labels1, Counter>::default();
        // 1 s .. ~9 h
        let session_duration = Histogram::new(exponential_buckets(1.0, 3.0, 11));
        let message_latency = Family::<Labels1, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "sessions_active",
            "Spark sessions the gateway routes now.",
            sessions_active.clone(),
        );
        registry.register(
            "sessions_created",
            "Spark sessions seen for the first time.",
            sessions_created.clone(),
        );
        registry.register(
            "sessions_expired",
            "Spark sessions ended, by reason (released, idle, ttl, killed).",
            sessions_expired.clone(),
        );
        registry.register(
            "proxy_requests",
            "RPCs forwarded, by method and gRPC status.",
            requests.clone(),
        );
        registry.register(
            "proxy_errors",
            "RPCs sclb answered with an error itself, by reason.",
            errors.clone(),
        );
        registry.register(
            "session_duration_seconds",
            "Lifetime of ended Spark sessions.",
            session_duration.clone(),
        );
        registry.register(
            "message_latency_seconds",
            "Time from an RPC's request to its response headers from the server, by method.",
            message_latency.clone(),
        );
        // Every series a dashboard graphs exists from the start, at zero: a rate() over a
        // series that appears only at its first event misses that event.
        for reason in [
            EndReason::Released,
            EndReason::Idle,
            EndReason::Ttl,
            EndReason::Killed,
        ] {
            let _ = sessions_expired.get_or_create(&[("reason", reason.as_str())]);
        }
        for reason in ERROR_REASONS {
            let _ = errors.get_or_create(&[("reason", reason)]);
        }
        let methods = crate::gateway::decode::Method::ALL;
        let ok_by_method = methods
            .iter()
            .map(|m| {
                requests
                    .get_or_create(&[("method", m.name()), ("code", "OK")])
                    .clone()
            })
            .collect();
        let latency_by_method = methods
            .iter()
            .map(|m| {
                message_latency
                    .get_or_create(&[("method", m.name())])
                    .clone()
            })
            .collect();
        Metrics {
            registry,
            sessions_active,
            sessions_created,
            sessions_expired,
            requests,
            errors,
            session_duration,
            message_latency,
            ok_by_method,
            latency_by_method,
        }
    }
}

impl Metrics {
    pub fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn request(&self, method: &'static str, code: &'static str) {
        self.requests
            .get_or_create(&[("method", method), ("code", code)])
            .inc();
    }

    /// An RPC `method` answered `OK`.
    pub fn request_ok(&self, method: crate::gateway::decode::Method) {
        self.ok_by_method[method.index()].inc();
    }

    pub fn latency(&self, method: crate::gateway::decode::Method, seconds: f64) {
        self.latency_by_method[method.index()].observe(seconds);
    }
}

/// How many ended sessions are remembered, and for how long.
const TOMBSTONES: usize = 100_000;
const TOMBSTONE_TTL: Duration = Duration::from_secs(4 * 3600);

#[derive(Default)]
struct Inner {
    live: HashMap<SessionKey, Arc<Session>>,
    /// Ended sessions: why, when, and the server that held them.
    ended: HashMap<SessionKey, (EndReason, Instant, Placement)>,
    ended_order: VecDeque<(SessionKey, Instant)>,
    /// Live sessions and creation rate per client.
    quotas: Quotas,
    /// Who opened each live session id first: with authentication on, its owner.
    owners: HashMap<String, String>,
    /// The reaper's queue: every live session once, by the earliest time it can be due (its
    /// idle or age limit). A reap looks only at the front, so its cost follows the sessions
    /// that are (nearly) due, not how many are live. Activity moves a session's real deadline
    /// later without touching this (RPCs stay lock-free): a session found not yet due is
    /// queued again at its new deadline.
    checks: BTreeMap<(Instant, u64), Arc<Session>>,
    check_seq: u64,
    /// The (idle, TTL) limits the queued deadlines were computed with, per frontend: a reload
    /// that changes them has every live session looked at again once.
    limits: HashMap<Arc<str>, (Duration, Duration)>,
}

impl Inner {
    /// Makes `s` live and, if it is the first with its id, the id's owner: a session a new
    /// RPC created and one a state file or store put back are owned alike. The next reap
    /// looks at it (its limits are the reaper's to say).
    fn insert_live(&mut self, s: Arc<Session>) {
        self.owners
            .entry(s.key.session_id.clone())
            .or_insert_with(|| s.key.user_id.clone());
        self.queue(&s, Instant::now());
        self.live.insert(s.key.clone(), s);
    }

    /// (Re)queues `s` for the reaper at `at`.
    fn queue(&mut self, s: &Arc<Session>, at: Instant) {
        self.unqueue(s);
        self.check_seq += 1;
        *s.queued.lock() = Some((at, self.check_seq));
        self.checks.insert((at, self.check_seq), s.clone());
    }

    fn unqueue(&mut self, s: &Session) {
        if let Some(k) = s.queued.lock().take() {
            self.checks.remove(&k);
        }
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400))
}

pub struct Registry {
    inner: Mutex<Inner>,
    epoch: Instant,
    pub metrics: Metrics,
    /// Woken when a session starts or ends (the state file saves it).
    pub changed: tokio::sync::Notify,
    /// Sessions ended here, kept for a shared store to write (`None`: no shared store).
    journal: Mutex<Option<Vec<(SessionKey, EndReason)>>>,
    /// How many times the reaper looked at a session (tests show its cost with it).
    looked_at: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        // Activity is kept as ms since the epoch: an epoch in the past lets a restored session
        // keep the idle time it had before a restart (as far back as the machine's uptime).
        let now = Instant::now();
        let epoch = [30 * 86_400, 86_400, 3_600, 60]
            .into_iter()
            .find_map(|s| now.checked_sub(Duration::from_secs(s)))
            .unwrap_or(now);
        Registry {
            inner: Mutex::default(),
            epoch,
            metrics: Metrics::default(),
            changed: tokio::sync::Notify::new(),
            journal: Mutex::new(None),
            looked_at: AtomicU64::new(0),
        }
    }
}

/// What [`Registry::admit`] found.
pub enum Admit {
    /// A live session (maybe just created by this RPC).
    Live { session: Arc<Session>, new: bool },
    /// The session ended; the client must start a new one.
    Ended(EndReason),
    /// `max` sessions are live.
    Full,
    /// The client is at one of its own limits.
    ClientLimit(Refused),
}

/// A session to put back ([`Registry::restore`]).
pub struct Restore {
    pub key: SessionKey,
    pub meta: SessionMeta,
    pub frontend: Arc<str>,
    pub backend: Arc<str>,
    pub placement: Placement,
    pub created: SystemTime,
    pub idle: Duration,
}

/// Identity of a new session.
pub struct NewSession<'a> {
    pub meta: SessionMeta,
    pub frontend: &'a Arc<str>,
    pub backend: &'a str,
    pub client: SocketAddr,
    pub max: usize,
    /// Who it counts against, and that client's limits (`sessions.max_per_client`,
    /// `sessions.rate_per_client`).
    pub client_key: ClientKey,
    pub per_client: Limits,
}

impl Registry {
    /// A live session, or why it ended and where it was; `None` if never seen (or long
    /// forgotten).
    pub fn find(&self, key: &SessionKey) -> Option<Result<Arc<Session>, (EndReason, Placement)>> {
        let inner = self.inner.lock();
        if let Some(s) = inner.live.get(key) {
            return Some(Ok(s.clone()));
        }
        inner.ended.get(key).map(|(r, _, p)| Err((*r, p.clone())))
    }

    /// The user who opened the live session `session_id` (the first, if several users share
    /// the id on a frontend without authentication).
    pub fn owner(&self, session_id: &str) -> Option<String> {
        self.inner.lock().owners.get(session_id).cloned()
    }

    /// Live sessions whose driver sclb created for `team`.
    pub fn created_for_team(&self, team: &str) -> usize {
        self.inner
            .lock()
            .live
            .values()
            .filter(|s| s.meta.created && s.meta.team.as_deref() == Some(team))
            .count()
    }

    /// The live session for `key`, created on `place` (called only for a new session) if there
    /// is none. Two first RPCs racing for one new session agree on one server.
    pub fn admit(
        &self,
        key: &SessionKey,
        new: NewSession<'_>,
        place: impl FnOnce() -> Option<Placement>,
    ) -> Option<Admit> {
        {
            let inner = self.inner.lock();
            if let Some(s) = inner.live.get(key) {
                return Some(Admit::Live {
                    session: s.clone(),
                    new: false,
                });
            }
            if let Some((reason, _, _)) = inner.ended.get(key) {
                return Some(Admit::Ended(*reason));
            }
            if inner.live.len() >= new.max {
                return Some(Admit::Full);
            }
        }
        let placement = place()?;
        let mut inner = self.inner.lock();
        if let Some(s) = inner.live.get(key) {
            return Some(Admit::Live {
                session: s.clone(),
                new: false,
            });
        }
        let client_key = new.client_key;
        if let Err(why) = inner.quotas.take(&client_key, new.per_client) {
            return Some(Admit::ClientLimit(why));
        }
        let s = Arc::new(Session {
            key: key.clone(),
            client_key,
            meta: new.meta,
            frontend: new.frontend.clone(),
            backend: new.backend.into(),
            placement: Mutex::new(placement),
            client: Mutex::new(new.client),
            created: SystemTime::now(),
            born: Instant::now(),
            last_activity: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            streams: AtomicU64::new(0),
            rpcs: AtomicU64::new(0),
            synced_activity: AtomicU64::new(0),
            kill: CancellationToken::new(),
            ended: Mutex::new(None),
            epoch: self.epoch,
            queued: Mutex::new(None),
        });
        inner.insert_live(s.clone());
        self.metrics.sessions_created.inc();
        self.metrics.sessions_active.set(inner.live.len() as i64);
        drop(inner);
        self.changed.notify_one();
        let p = s.placement();
        info!(
            session = %crate::escape::token(&key.session_id),
            user = %crate::escape::token(&key.user_id),
            client = %new.client,
            backend = %new.backend,
            server = %p.server_name,
            "session created"
        );
        Some(Admit::Live {
            session: s,
            new: true,
        })
    }

    /// Puts back a session a state file or store kept, on the server it ran on: `created`
    /// keeps its TTL running from its real start, `idle` its idle time. False if a session
    /// with that key is already live or has ended here since.
    pub fn restore(&self, r: Restore) -> bool {
        let mut inner = self.inner.lock();
        if inner.live.contains_key(&r.key) || inner.ended.contains_key(&r.key) {
            return false;
        }
        let now = Instant::now();
        let age = r.created.elapsed().unwrap_or_default();
        let since_epoch = self.epoch.elapsed().as_millis() as u64;
        let restored_activity =
            since_epoch.saturating_sub(r.idle.as_millis().min(u64::MAX as u128) as u64);
        let s = Arc::new(Session {
            key: r.key.clone(),
            // Counted against nobody: its client is not known until it speaks again.
            client_key: ClientKey::of(SocketAddr::from(([0, 0, 0, 0], 0)), None),
            meta: r.meta,
            frontend: r.frontend,
            backend: r.backend,
            placement: Mutex::new(r.placement),
            client: Mutex::new(SocketAddr::from(([0, 0, 0, 0], 0))),
            created: r.created,
            born: now.checked_sub(age).unwrap_or(now),
            last_activity: AtomicU64::new(restored_activity),
            streams: AtomicU64::new(0),
            rpcs: AtomicU64::new(0),
            // What a store or file said: nothing new to write back.
            synced_activity: AtomicU64::new(restored_activity),
            kill: CancellationToken::new(),
            ended: Mutex::new(None),
            epoch: self.epoch,
            queued: Mutex::new(None),
        });
        inner.insert_live(s);
        self.metrics.sessions_active.set(inner.live.len() as i64);
        true
    }

    /// Ends a session: closes its streams (unless its client released it: what it still has
    /// in flight is its own cleanup), remembers why, logs the audit line. `None` if it had
    /// already ended.
    pub fn end(&self, key: &SessionKey, reason: EndReason) -> Option<Arc<Session>> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let s = inner.live.remove(key)?;
        inner.unqueue(&s);
        inner.quotas.release(&s.client_key);
        if inner.owners.get(&key.session_id) == Some(&key.user_id) {
            inner.owners.remove(&key.session_id);
        }
        inner
            .ended
            .insert(key.clone(), (reason, now, s.placement()));
        inner.ended_order.push_back((key.clone(), now));
        while inner.ended_order.len() > TOMBSTONES
            || inner
                .ended_order
                .front()
                .is_some_and(|(_, at)| at.elapsed() > TOMBSTONE_TTL)
        {
            let Some((k, at)) = inner.ended_order.pop_front() else {
                break;
            };
            if inner.ended.get(&k).is_some_and(|(_, t, _)| *t == at) {
                inner.ended.remove(&k);
            }
        }
        self.metrics.sessions_active.set(inner.live.len() as i64);
        drop(inner);
        self.changed.notify_one();
        if let Some(j) = self.journal.lock().as_mut()
            && j.len() < 1_000_000
        {
            j.push((key.clone(), reason));
        }
        *s.ended.lock() = Some(reason);
        if reason != EndReason::Released {
            s.kill.cancel();
        }
        self.metrics
            .sessions_expired
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
        self.metrics.session_duration.observe(s.age().as_secs_f64());
        let p = s.placement();
        info!(
            target: "sclb::audit",
            session = %crate::escape::token(&key.session_id),
            user = %crate::escape::token(&key.user_id),
            client = %s.client(),
            backend = %s.backend,
            server = %p.server_name,
            age_s = s.age().as_secs(),
            idle_s = s.idle_for().as_secs(),
            rpcs = s.rpcs.load(Relaxed),
            reason = reason.as_str(),
            "session ended: {}",
            reason.explain()
        );
        Some(s)
    }

    /// From now on, keeps the sessions that end for a shared store to write.
    pub fn keep_journal(&self) {
        self.journal.lock().get_or_insert_with(Vec::new);
    }

    /// The sessions ended since the last call.
    pub fn take_journal(&self) -> Vec<(SessionKey, EndReason)> {
        self.journal
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Sessions active since their activity was last written, with when (ms since the Unix
    /// epoch), marked written.
    pub fn activity_to_write(&self) -> Vec<(SessionKey, i64)> {
        let now_wall = crate::store::now_ms();
        let now = self.epoch.elapsed().as_millis() as u64;
        self.inner
            .lock()
            .live
            .values()
            .filter_map(|s| {
                let la = s.last_activity.load(Relaxed);
                let was = s.synced_activity.swap(la, Relaxed);
                (la > was).then(|| (s.key.clone(), now_wall - now.saturating_sub(la) as i64))
            })
            .collect()
    }

    /// Sessions due to end (idle or over their TTL), without ending them; they are looked at
    /// again by the next call unless they end meanwhile. Looks only at the sessions whose
    /// queued deadline has passed (see `Inner::checks`).
    pub fn due(
        &self,
        limits: impl Fn(&str) -> (Duration, Duration),
    ) -> Vec<(SessionKey, EndReason)> {
        let now = Instant::now();
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        if inner.limits.iter().any(|(fe, l)| limits(fe) != *l) {
            inner.limits.clear();
            let all: Vec<Arc<Session>> = inner.live.values().cloned().collect();
            for s in &all {
                inner.queue(s, now);
            }
        }
        let mut out = Vec::new();
        let mut again = Vec::new();
        while let Some(entry) = inner.checks.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let s = entry.remove();
            *s.queued.lock() = None;
            self.looked_at.fetch_add(1, Relaxed);
            let (idle, ttl) = *inner
                .limits
                .entry(s.frontend.clone())
                .or_insert_with(|| limits(&s.frontend));
            let (age, idle_for) = (s.age(), s.idle_for());
            let busy = s.streams.load(Relaxed) > 0;
            let next = if age >= ttl {
                out.push((s.key.clone(), EndReason::Ttl));
                now
            } else if idle_for >= idle && !busy {
                out.push((s.key.clone(), EndReason::Idle));
                now
            } else {
                // A busy session's idle time starts when its last RPC ends: after `idle`.
                let idle_left = idle.checked_sub(idle_for).filter(|_| !busy).unwrap_or(idle);
                later(now, (ttl - age).min(idle_left))
            };
            again.push((s, next));
        }
        for (s, at) in &again {
            inner.queue(s, *at);
        }
        out
    }

    /// How many times the reaper has looked at a session.
    pub fn reaper_looked_at(&self) -> u64 {
        self.looked_at.load(Relaxed)
    }

    /// Ends every live session whose id is `session_id` (any user); returns them.
    pub fn kill(&self, session_id: &str) -> Vec<Arc<Session>> {
        let keys: Vec<SessionKey> = self
            .inner
            .lock()
            .live
            .keys()
            .filter(|k| k.session_id == session_id)
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|k| self.end(k, EndReason::Killed))
            .collect()
    }

    /// Live sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut v: Vec<Arc<Session>> = self.inner.lock().live.values().cloned().collect();
        // Compared in place: a key cloned per comparison cost 1.2 s for 100,000 sessions.
        v.sort_by(|a, b| (a.created, &a.key).cmp(&(b.created, &b.key)));
        v
    }

    pub fn len(&self) -> usize {
        self.inner.lock().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the sessions past their limits; `limits` gives (idle_timeout, max_ttl) for a
    /// session's frontend. Returns the ended sessions.
    pub fn reap(
        &self,
        limits: impl Fn(&str) -> (Duration, Duration),
    ) -> Vec<(Arc<Session>, EndReason)> {
        self.inner.lock().quotas.forget_idle(Instant::now());
        self.due(limits)
            .into_iter()
            .filter_map(|(k, r)| self.end(&k, r).map(|s| (s, r)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> SessionKey {
        SessionKey {
            session_id: id.into(),
            user_id: "alice".into(),
        }
    }

    fn place(n: u64) -> Option<Placement> {
        Some(Placement {
            server: ServerId(n),
            server_name: format!("sc{n}").into(),
        })
    }

    fn admit(r: &Registry, id: &str, n: u64) -> Admit {
        admit_up_to(r, id, n, 2)
    }

    fn admit_up_to(r: &Registry, id: &str, n: u64, max: usize) -> Admit {
        let (fe, be): (Arc<str>, Arc<str>) = ("gw".into(), "spark".into());
        let new = NewSession {
            meta: SessionMeta::default(),
            frontend: &fe,
            backend: &be,
            client: "127.0.0.1:1".parse().unwrap(),
            max,
            client_key: ClientKey::of("127.0.0.1:1".parse().unwrap(), None),
            per_client: Limits {
                max_live: max,
                per_second: u32::MAX,
            },
        };
        r.admit(&key(id), new, || place(n)).unwrap()
    }

    /// The reaper's cost follows the sessions that are due, not how many are live: with
    /// 1,000 sessions and nothing due, a reap looks at none of them.
    #[tokio::test(start_paused = true)]
    async fn a_reap_looks_only_at_sessions_that_may_be_due() {
        let r = Registry::default();
        let limits = |_: &str| (Duration::from_secs(60), Duration::from_secs(3600));
        let sessions: Vec<Arc<Session>> = (0..1000)
            .map(|i| match admit_up_to(&r, &format!("s{i}"), 1, 1000) {
                Admit::Live { session, .. } => session,
                _ => panic!("admitted"),
            })
            .collect();
        assert!(r.reap(limits).is_empty());
        assert_eq!(
            r.reaper_looked_at(),
            1000,
            "a new session is looked at once"
        );
        for _ in 0..50 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(r.reap(limits).is_empty());
        }
        assert_eq!(r.reaper_looked_at(), 1000, "nothing due: nothing looked at");
        sessions[7].touch();
        tokio::time::advance(Duration::from_secs(11)).await;
        let reaped = r.reap(limits);
        assert_eq!(
            reaped.len(),
            999,
            "all idle for 61 s but the one used at 50 s"
        );
        assert_eq!(r.reaper_looked_at(), 2000);
        assert!(sessions[7].end_reason().is_none());
        tokio::time::advance(Duration::from_secs(48)).await;
        assert!(r.reap(limits).is_empty(), "idle 59 s at 109 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.reap(limits).len(), 1, "idle 60 s since its last use");
        assert!(r.is_empty());
    }

    /// A reload that shortens the idle timeout applies at the next reap, though the queue was
    /// ordered by the old one.
    #[tokio::test(start_paused = true)]
    async fn shorter_limits_apply_at_the_next_reap() {
        let r = Registry::default();
        let Admit::Live { session, .. } = admit(&r, "a", 1) else {
            panic!()
        };
        assert!(
            r.reap(|_| (Duration::from_secs(1800), Duration::from_secs(3600)))
                .is_empty()
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        let reaped = r.reap(|_| (Duration::from_secs(60), Duration::from_secs(3600)));
        assert_eq!(reaped.len(), 1);
        assert_eq!(session.end_reason(), Some(EndReason::Idle));
    }

    /// A session put back after a restart (state file or store) is owned by its user, as one
    /// its first RPC created: another identity using its id is refused as before the restart.
    #[tokio::test(start_paused = true)]
    async fn a_restored_session_has_its_owner() {
        let r = Registry::default();
        assert!(r.restore(Restore {
            key: key("kept"),
            meta: SessionMeta::default(),
            frontend: "gw".into(),
            backend: "spark".into(),
            placement: place(1).unwrap(),
            created: SystemTime::now(),
            idle: Duration::from_secs(5),
        }));
        assert_eq!(r.owner("kept").as_deref(), Some("alice"));
        assert!(matches!(admit(&r, "new", 1), Admit::Live { new: true, .. }));
        assert_eq!(r.owner("new").as_deref(), Some("alice"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_stays_where_it_started_until_it_ends() {
        let r = Registry::default();
        let Admit::Live { session, new: true } = admit(&r, "a", 1) else {
            panic!("first RPC creates the session");
        };
        let Admit::Live {
            session: again,
            new: false,
        } = admit(&r, "a", 2)
        else {
            panic!("second RPC finds it");
        };
        assert!(Arc::ptr_eq(&session, &again));
        assert_eq!(again.placement().server, ServerId(1));
        assert!(matches!(admit(&r, "b", 2), Admit::Live { new: true, .. }));
        assert!(matches!(admit(&r, "c", 2), Admit::Full));

        let killed = session.killed();
        assert_eq!(r.kill("a").len(), 1);
        killed.await;
        assert!(matches!(admit(&r, "a", 1), Admit::Ended(EndReason::Killed)));
        assert_eq!(r.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_and_old_ones_are_reaped_busy_ones_only_at_ttl() {
        let r = Registry::default();
        let limits = |_: &str| (Duration::from_secs(60), Duration::from_secs(300));
        let Admit::Live { session: idle, .. } = admit(&r, "idle", 1) else {
            panic!()
        };
        let Admit::Live { session: busy, .. } = admit(&r, "busy", 1) else {
            panic!()
        };
        let _rpc = busy.rpc_started("127.0.0.1:2".parse().unwrap());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(r.reap(limits).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let reaped = r.reap(limits);
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].0.key, idle.key);
        assert_eq!(reaped[0].1, EndReason::Idle);
        // A long RPC keeps its session past the idle timeout, not past the TTL.
        tokio::time::advance(Duration::from_secs(240)).await;
        let reaped = r.reap(limits);
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].1, EndReason::Ttl);
        assert_eq!(busy.end_reason(), Some(EndReason::Ttl));
        assert!(r.is_empty());
    }
}
