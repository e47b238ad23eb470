//! The warm pool of on-demand drivers (`on_demand.pool`): per gateway frontend and (team,
//! environment), sclb keeps `min_ready` drivers created from the frontend's template, Ready
//! and claimed by nobody, so that a new session starts on one at once instead of waiting for
//! a driver to be scheduled, pulled and started.
//!
//! - A member is a driver labelled `sclb.io/pool=ready` with no session annotation. The
//!   kubernetes store's watch does not take it for an orphan.
//! - A new session claims the oldest Ready member with one merge patch that names the
//!   `resourceVersion` it read: two replicas racing for it get one 200 and one 409, so a
//!   driver is claimed once. The patch relabels it `sclb.io/pool=claimed` and writes the
//!   session's record annotations (those of a driver created for the session), so from then on
//!   it is that session's driver everywhere: counted in its team's quota, deleted when the
//!   session ends, never returned to the pool.
//! - The keeper ([`keeper`]) lists every pool each second (and at once after a claim): every
//!   replica, for `show pool` and the metrics; only the holder of the reaper Lease (or a lone
//!   sclb) creates and retires members. Retired (deleted, with the `resourceVersion` read, so
//!   a member claimed meanwhile is kept): members older than `max_age`, failing their health
//!   check, not Ready within `ready_timeout`, and the oldest beyond `max_ready` or beyond what
//!   the team's `max_sessions_per_team` leaves room for. Every ten seconds it also retires
//!   unclaimed drivers of a frontend's (team, environment) that has no pool any more (a reload
//!   removed it).
//! - A new driver is a cold JVM: its first query takes seconds. With `warm_up` (the default),
//!   the keeper runs a throwaway query on each member once it is Ready (and passes its health
//!   check), in a session of its own that it then releases, and only then marks the member
//!   warm (annotation `sclb.io/warmed-up`): only warm members are claimed and counted Ready.
//!   A warm-up that fails or times out retires the member, and it is replaced.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as PromRegistry;
use serde_json::json;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::ondemand::{self, Pending};
use super::registry::SessionKey;
use crate::Shared;
use crate::config::{KubernetesDiscovery, OnDemand, Pool};
use crate::state::Backend;
use crate::store::kubernetes::annotation as a;

mod warm_up;
use warm_up::{Warm, warm_ups, warms};

/// The label that marks a pool driver, and its values.
pub const LABEL: &str = "sclb.io/pool";
pub const READY: &str = "ready";
pub const CLAIMED: &str = "claimed";
/// The annotation the keeper puts on a member once its warm-up succeeded (when).
pub const WARMED: &str = "sclb.io/warmed-up";

/// How often the keeper looks at the pools.
const TICK: Duration = Duration::from_secs(1);
/// Most time one API call of the pool may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// One pool: a frontend's drivers for one (team, environment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub frontend: String,
    pub team: String,
    pub environment: String,
}

/// Whether a member can be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// Discovered, it takes new clients, and it is warm (or the pool has no warm-up).
    Ready,
    /// Discovered and taking new clients, its warm-up not done yet.
    Warming,
    /// Its warm-up failed (seen by the keeper that ran it): retired.
    WarmUpFailed,
    /// Not (yet) discovered Ready.
    Starting,
    /// Discovered, and its health check fails.
    Down,
}

impl MemberState {
    fn as_str(self) -> &'static str {
        match self {
            MemberState::Ready => "Ready",
            MemberState::Warming => "Warming",
            MemberState::WarmUpFailed => "WarmUpFailed",
            MemberState::Starting => "Starting",
            MemberState::Down => "Down",
        }
    }
}

/// An unclaimed driver of a pool.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub age: Duration,
    pub state: MemberState,
    rv: String,
}

/// What the keeper saw of one pool at its last look.
#[derive(Debug, Clone)]
struct Seen {
    namespace: String,
    template: String,
    pool: Pool,
    members: Vec<Member>,
}

type Labels1 = [(&'static str, &'static str); 1];

/// The pools' last look, the keeper's warm-ups, and their metrics (`sclb_pool_*`).
pub struct Pools {
    seen: Mutex<BTreeMap<PoolKey, Seen>>,
    /// By pool and member name.
    warm: Mutex<BTreeMap<(PoolKey, String), Warm>>,
    wake: Notify,
    pub registry: PromRegistry,
    ready: Family<Vec<(&'static str, String)>, Gauge>,
    claims: Family<Labels1, Counter>,
    first_response: Family<Labels1, Histogram>,
    warmups: Family<Labels1, Counter>,
    warmup_seconds: Histogram,
}

impl Default for Pools {
    fn default() -> Self {
        let mut registry = PromRegistry::with_prefix("sclb");
        let ready = Family::<Vec<(&'static str, String)>, Gauge>::default();
        let claims = Family::<Labels1, Counter>::default();
        // 10 ms .. ~20 min
        let first_response = Family::<Labels1, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 18))
        });
        let warmups = Family::<Labels1, Counter>::default();
        // 50 ms .. ~7 min
        let warmup_seconds = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "pool_ready",
            "Ready unclaimed drivers of each warm pool.",
            ready.clone(),
        );
        registry.register(
            "pool_claims",
            "New on-demand sessions of a pooled team: hit (a Ready pool driver was claimed) or miss (one was created).",
            claims.clone(),
        );
        registry.register(
            "session_first_response_seconds",
            "Time from an on-demand session's first RPC to its first response, by pool hit or miss.",
            first_response.clone(),
        );
        registry.register(
            "pool_warmups",
            "Warm-up queries run on new pool drivers: ok (the driver is offered) or failed (it is retired).",
            warmups.clone(),
        );
        registry.register(
            "pool_warmup_seconds",
            "Time a successful warm-up of a pool driver took (its query and the release of its session).",
            warmup_seconds.clone(),
        );
        for r in ["hit", "miss"] {
            let _ = claims.get_or_create(&[("result", r)]);
            let _ = first_response.get_or_create(&[("result", r)]);
        }
        for r in ["ok", "failed"] {
            let _ = warmups.get_or_create(&[("result", r)]);
        }
        Pools {
            seen: Mutex::default(),
            warm: Mutex::default(),
            wake: Notify::new(),
            registry,
            ready,
            claims,
            first_response,
            warmups,
            warmup_seconds,
        }
    }
}

/// No session: pool drivers are named before they have one.
fn nobody() -> SessionKey {
    SessionKey {
        session_id: String::new(),
        user_id: String::new(),
    }
}

/// The namespace of a (team, environment)'s drivers.
pub fn namespace(od: &OnDemand, team: &str, environment: &str) -> String {
    od.pool_namespace(team, environment)
}

fn selector(team: &str, environment: &str) -> String {
    format!(
        "app.kubernetes.io/managed-by=sclb,{LABEL}={READY},sclb.io/team={team},sclb.io/environment={environment}"
    )
}

async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(kube::Error::Service(
            format!("the API server did not answer within {CALL_TIMEOUT:?}").into(),
        )),
    }
}

/// A pool's unclaimed drivers, oldest first, as discovery sees them in `backend`; with
/// `warm_up`, a discovered driver is Ready once warm, Warming until then.
async fn list(
    api: &kube::Api<DynamicObject>,
    frontend: &str,
    namespace: &str,
    (team, environment): (&str, &str),
    backend: &Backend,
    warm_up: bool,
) -> Result<Vec<Member>, String> {
    let lp = ListParams::default().labels(&selector(team, environment));
    let list = timed(api.list(&lp))
        .await
        .map_err(|e| crate::k8s_api::chain(&e))?;
    let now = crate::store::now_ms();
    let mut out: Vec<Member> = list
        .items
        .into_iter()
        .filter(|o| {
            o.metadata.deletion_timestamp.is_none()
                && o.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(a::FRONTEND))
                    .is_some_and(|f| f == frontend)
                && !o
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(a::SESSION))
        })
        .map(|o| {
            let name = o.metadata.name.clone().unwrap_or_default();
            let created = o
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(now, |t| t.0.as_millisecond());
            let warm = !warm_up
                || o.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(WARMED));
            let state = match super::route::named_server(backend, Some(namespace), &name) {
                Some(s) if s.takes_new_clients() && warm => MemberState::Ready,
                Some(s) if s.takes_new_clients() => MemberState::Warming,
                Some(s) if !s.takes_pinned_clients() => MemberState::Down,
                _ => MemberState::Starting,
            };
            Member {
                name,
                age: Duration::from_millis(now.saturating_sub(created).max(0) as u64),
                state,
                rv: o.metadata.resource_version.unwrap_or_default(),
            }
        })
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.age));
    Ok(out)
}

/// How one claiming patch went.
enum Tried {
    Claimed,
    /// Claimed by someone else, changed or gone since it was read.
    Taken,
    /// The API server failed: no claim this time.
    Failed,
}

/// A claimed session, for [`Pools::claim`].
pub struct Claim<'a> {
    pub key: &'a SessionKey,
    pub frontend: &'a str,
    pub backend: &'a Arc<Backend>,
    pub team: &'a str,
    pub environment: &'a str,
}

impl Pools {
    /// Whether `od` keeps a pool for (team, environment).
    pub fn pooled(od: &OnDemand, team: &str, environment: &str) -> bool {
        od.pool.as_ref().is_some_and(|p| {
            p.min_ready > 0 && p.teams.iter().any(|(t, e)| t == team && e == environment)
        })
    }

    /// Claims a Ready driver of the pool for `c`'s new session: the name of the driver that
    /// is now the session's, or `None` (no Ready driver free; the caller creates one).
    /// Counted as a hit or a miss.
    pub async fn claim(
        &self,
        ondemand: &ondemand::OnDemandState,
        settings: &KubernetesDiscovery,
        od: &OnDemand,
        c: Claim<'_>,
    ) -> Option<Pending> {
        let namespace = namespace(od, c.team, c.environment);
        let got = match ondemand.api_for(settings, &namespace).await {
            Ok(api) => self.claim_in(&api, &namespace, &c, warms(od)).await,
            Err(e) => {
                warn!("pool of {}/{}: {e}", c.team, c.environment);
                None
            }
        };
        let result = if got.is_some() { "hit" } else { "miss" };
        self.claims.get_or_create(&[("result", result)]).inc();
        // A replacement now, not at the next tick.
        self.wake.notify_one();
        got.map(|name| Pending {
            namespace,
            name,
            team: c.team.to_string(),
            environment: c.environment.to_string(),
            since: tokio::time::Instant::now(),
        })
    }

    /// Claims from the keeper's last look first (its resourceVersions: one API call, the
    /// claiming patch, instead of a LIST and the patch); when every member of that look is
    /// stale (a 409 or 404: claimed, retired or changed since) or it offers none, from a
    /// fresh LIST of the pool's drivers.
    async fn claim_in(
        &self,
        api: &kube::Api<DynamicObject>,
        namespace: &str,
        c: &Claim<'_>,
        warm_up: bool,
    ) -> Option<String> {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        for m in self.last_look(namespace, c) {
            match self.try_claim(api, namespace, c, &m, &now).await {
                Tried::Claimed => return Some(m.name),
                Tried::Taken => {}
                Tried::Failed => return None,
            }
        }
        let team = (c.team, c.environment);
        let members = match list(api, c.frontend, namespace, team, c.backend, warm_up).await {
            Ok(m) => m,
            Err(e) => {
                warn!(
                    "pool of {}/{}: cannot list its drivers: {e}",
                    c.team, c.environment
                );
                return None;
            }
        };
        for m in members
            .into_iter()
            .filter(|m| m.state == MemberState::Ready)
        {
            match self.try_claim(api, namespace, c, &m, &now).await {
                Tried::Claimed => return Some(m.name),
                Tried::Taken => {}
                Tried::Failed => return None,
            }
        }
        None
    }

    /// The members of `c`'s pool that were Ready (warm) at the keeper's last look and whose
    /// server still takes new clients now, oldest first.
    fn last_look(&self, namespace: &str, c: &Claim<'_>) -> Vec<Member> {
        let key = PoolKey {
            frontend: c.frontend.to_string(),
            team: c.team.to_string(),
            environment: c.environment.to_string(),
        };
        let seen = self.seen.lock();
        let Some(s) = seen.get(&key).filter(|s| s.namespace == namespace) else {
            return Vec::new();
        };
        s.members
            .iter()
            .filter(|m| {
                m.state == MemberState::Ready
                    && super::route::named_server(c.backend, Some(namespace), &m.name)
                        .is_some_and(|s| s.takes_new_clients())
            })
            .cloned()
            .collect()
    }

    /// One claiming patch of `m`, naming the `resourceVersion` it was read at.
    async fn try_claim(
        &self,
        api: &kube::Api<DynamicObject>,
        namespace: &str,
        c: &Claim<'_>,
        m: &Member,
        now: &str,
    ) -> Tried {
        // Refused (409) if anyone changed it since it was read: another replica claimed it,
        // or the keeper is retiring it.
        let patch = json!({"metadata": {
            "resourceVersion": m.rv,
            "labels": {LABEL: CLAIMED},
            "annotations": {
                a::SESSION: c.key.session_id,
                a::USER: c.key.user_id,
                a::FRONTEND: c.frontend,
                a::BACKEND: c.backend.config.name,
                a::TEAM: c.team,
                a::ENVIRONMENT: c.environment,
                a::CREATED: now,
                a::LAST_ACTIVITY: now,
            },
        }});
        match timed(api.patch(&m.name, &PatchParams::default(), &Patch::Merge(&patch))).await {
            Ok(_) => {
                // Not offered (nor refused by header) until the next look.
                for s in self.seen.lock().values_mut() {
                    s.members
                        .retain(|x| x.name != m.name || s.namespace != namespace);
                }
                info!(
                    target: "sclb::audit",
                    session = %crate::escape::token(&c.key.session_id),
                    user = %crate::escape::token(&c.key.user_id),
                    namespace,
                    name = %m.name,
                    team = %c.team,
                    environment = %c.environment,
                    "pool driver claimed: {namespace}/{} for session {}",
                    m.name,
                    crate::escape::token(&c.key.session_id)
                );
                Tried::Claimed
            }
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                debug!(name = %m.name, "pool driver taken or changed since it was read: trying the next");
                Tried::Taken
            }
            Err(e) => {
                warn!(
                    "pool of {}/{}: cannot claim {namespace}/{}: {}",
                    c.team,
                    c.environment,
                    m.name,
                    crate::k8s_api::chain(&e)
                );
                Tried::Failed
            }
        }
    }

    /// Whether `name` (in `namespace`, if given) is an unclaimed member at the last look.
    pub fn is_unclaimed(&self, namespace: Option<&str>, name: &str) -> bool {
        self.seen.lock().values().any(|s| {
            namespace.is_none_or(|ns| ns == s.namespace) && s.members.iter().any(|m| m.name == name)
        })
    }

    /// The time from an on-demand session's first RPC to its first response.
    pub fn first_response(&self, hit: bool, took: Duration) {
        let r = if hit { "hit" } else { "miss" };
        self.first_response
            .get_or_create(&[("result", r)])
            .observe(took.as_secs_f64());
    }

    /// Stops and forgets the warm-ups of pools no longer configured (or no longer warming up).
    fn forget_warm_ups(&self, warming: &std::collections::HashSet<PoolKey>) {
        self.warm.lock().retain(|(k, _), st| {
            let keep = warming.contains(k);
            if !keep && let Warm::Running(task) = st {
                task.abort();
            }
            keep
        });
    }

    /// Keeps what the keeper saw and sets the gauges (a pool gone from the config goes).
    fn saw(&self, now: BTreeMap<PoolKey, Seen>) {
        let mut seen = self.seen.lock();
        let labels = |k: &PoolKey, s: &Seen| {
            vec![
                ("template", s.template.clone()),
                ("team", k.team.clone()),
                ("environment", k.environment.clone()),
            ]
        };
        for (k, s) in seen.iter() {
            if !now.contains_key(k) {
                self.ready.remove(&labels(k, s));
            }
        }
        for (k, s) in &now {
            let ready = s
                .members
                .iter()
                .filter(|m| m.state == MemberState::Ready)
                .count();
            self.ready.get_or_create(&labels(k, s)).set(ready as i64);
        }
        *seen = now;
    }

    /// `show pool`: each pool and its unclaimed drivers.
    pub fn show(&self) -> String {
        use std::fmt::Write;
        let seen = self.seen.lock();
        let count = |r: &'static str| self.claims.get_or_create(&[("result", r)]).get();
        let mut out = format!(
            "# pools: {} claims: hit={} miss={}\n",
            seen.len(),
            count("hit"),
            count("miss")
        );
        for (k, s) in seen.iter() {
            let n = |st: MemberState| s.members.iter().filter(|m| m.state == st).count();
            let _ = writeln!(
                out,
                "{} team={} environment={} namespace={} ready={} warming={} starting={} down={} min_ready={} max_ready={} max_age={}",
                k.frontend,
                k.team,
                k.environment,
                s.namespace,
                n(MemberState::Ready),
                n(MemberState::Warming),
                n(MemberState::Starting),
                n(MemberState::Down),
                s.pool.min_ready,
                s.pool.max_ready,
                humantime::format_duration(s.pool.max_age)
            );
            for m in &s.members {
                let _ = writeln!(
                    out,
                    "  {} {} age={}s",
                    m.name,
                    m.state.as_str(),
                    m.age.as_secs()
                );
            }
        }
        out.push('\n');
        out
    }
}

/// What the keeper does with a pool's members at one look.
#[derive(Debug)]
struct Plan {
    /// Oldest first.
    kept: Vec<Member>,
    retire: Vec<(Member, &'static str)>,
}

/// Splits `members` (oldest first) into those kept and those retired, and why: older than
/// `max_age`, failing their health check, not Ready within `ready_timeout`, then the oldest
/// beyond `max_ready` or beyond `room` (what the team's quota leaves).
fn plan(members: Vec<Member>, pool: &Pool, ready_timeout: Duration, room: usize) -> Plan {
    let limit = pool.max_ready.min(room);
    let mut kept = Vec::new();
    let mut retire = Vec::new();
    for m in members {
        let why = if m.age >= pool.max_age {
            Some("older than max_age")
        } else if m.state == MemberState::Down {
            Some("failing its health check")
        } else if m.state == MemberState::WarmUpFailed {
            Some("its warm-up failed")
        } else if m.state == MemberState::Starting && m.age >= ready_timeout {
            Some("not Ready within ready_timeout")
        } else {
            None
        };
        match why {
            Some(why) => retire.push((m, why)),
            None => kept.push(m),
        }
    }
    while kept.len() > limit {
        let why = if room < pool.max_ready {
            "the team's max_sessions_per_team leaves no room"
        } else {
            "beyond max_ready"
        };
        retire.push((kept.remove(0), why));
    }
    Plan { kept, retire }
}

/// How often (in ticks) the keeper looks for unclaimed drivers of pools no longer configured.
const SWEEP_EVERY: u32 = 10;

/// Keeps every frontend's pools filled until the process stops.
pub async fn keeper(shared: Arc<Shared>) {
    let mut failing: std::collections::HashSet<PoolKey> = Default::default();
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shared.gateway.pools.wake.notified() => {}
            _ = shared.life.stop_background.cancelled() => return,
        }
        let snap = shared.state.snapshot();
        let mut seen = BTreeMap::new();
        // Pools that warm their drivers up.
        let mut warming = std::collections::HashSet::new();
        for fe in &snap.frontends {
            let Some(od) = fe.config.grpc.as_ref().and_then(|g| g.on_demand.as_ref()) else {
                continue;
            };
            let (Some(pool), Some(b)) = (&od.pool, snap.backend(&fe.config.backend)) else {
                continue;
            };
            let Some(settings) = &b.config.discovery else {
                continue;
            };
            for (team, environment) in &pool.teams {
                let key = PoolKey {
                    frontend: fe.config.name.clone(),
                    team: team.clone(),
                    environment: environment.clone(),
                };
                if pool.warm_up.is_some() {
                    warming.insert(key.clone());
                }
                match keep(&shared, &key, b, settings, od, pool).await {
                    Ok(s) => {
                        if failing.remove(&key) {
                            info!("pool of {team}/{environment}: the API server answers again");
                        }
                        seen.insert(key, s);
                    }
                    Err(e) => {
                        if failing.insert(key) {
                            warn!("pool of {team}/{environment}: {e}; retrying every {TICK:?}");
                        }
                    }
                }
            }
        }
        shared.gateway.pools.forget_warm_ups(&warming);
        shared.gateway.pools.saw(seen);
        ticks = ticks.wrapping_add(1);
        if ticks.is_multiple_of(SWEEP_EVERY) && is_leader(&shared) {
            for fe in &snap.frontends {
                let Some(od) = fe.config.grpc.as_ref().and_then(|g| g.on_demand.as_ref()) else {
                    continue;
                };
                let Some(settings) = snap
                    .backend(&fe.config.backend)
                    .and_then(|b| b.config.discovery.as_ref())
                else {
                    continue;
                };
                if let Err(e) = sweep(&shared, &fe.config.name, od, settings).await {
                    debug!("pool sweep of {}: {e}", fe.config.name);
                }
            }
        }
    }
}

/// The reaper (or a lone sclb) keeps and retires pool drivers.
fn is_leader(shared: &Shared) -> bool {
    shared
        .gateway
        .store
        .get()
        .and_then(|s| s.kubernetes())
        .is_none_or(|k| k.is_leader())
}

/// Retires the unclaimed drivers of `frontend` whose (team, environment) no longer has a pool
/// (a reload removed the pool or the team), in every namespace its discovery watches.
async fn sweep(
    shared: &Arc<Shared>,
    frontend: &str,
    od: &OnDemand,
    settings: &KubernetesDiscovery,
) -> Result<(), String> {
    let gw = &shared.gateway;
    let lp = ListParams::default().labels(&format!(
        "app.kubernetes.io/managed-by=sclb,{LABEL}={READY}"
    ));
    for api in gw.ondemand.apis_watched(settings).await? {
        let list = timed(api.list(&lp))
            .await
            .map_err(|e| crate::k8s_api::chain(&e))?;
        for o in list.items {
            let m = &o.metadata;
            let ann = |k: &str| m.annotations.as_ref().and_then(|a| a.get(k)).cloned();
            let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).cloned();
            let (Some(team), Some(env)) = (label("sclb.io/team"), label("sclb.io/environment"))
            else {
                continue;
            };
            if ann(a::FRONTEND).as_deref() != Some(frontend)
                || ann(a::SESSION).is_some()
                || Pools::pooled(od, &team, &env)
            {
                continue;
            }
            let (Some(ns), Some(name)) = (m.namespace.clone(), m.name.clone()) else {
                continue;
            };
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: m.resource_version.clone(),
                    uid: None,
                }),
                ..Default::default()
            };
            let api = gw.ondemand.api_for(settings, &ns).await?;
            match timed(api.delete(&name, &dp)).await {
                Ok(_) => info!(
                    target: "sclb::audit",
                    namespace = %ns,
                    name = %name,
                    "pool driver retired (its pool is no longer configured): {ns}/{name}"
                ),
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => return Err(crate::k8s_api::chain(&e)),
            }
        }
    }
    Ok(())
}

/// One look at one pool: its members; on the reaper (or a lone sclb), the retired ones
/// deleted and the missing ones created.
async fn keep(
    shared: &Arc<Shared>,
    key: &PoolKey,
    b: &Arc<Backend>,
    settings: &KubernetesDiscovery,
    od: &OnDemand,
    pool: &Pool,
) -> Result<Seen, String> {
    let gw = &shared.gateway;
    let (team, environment) = (key.team.as_str(), key.environment.as_str());
    let namespace = namespace(od, team, environment);
    let api = gw.ondemand.api_for(settings, &namespace).await?;
    let warm_up = pool.warm_up.as_ref();
    let members = list(
        &api,
        &key.frontend,
        &namespace,
        (team, environment),
        b,
        warm_up.is_some(),
    )
    .await?;
    let template = od
        .template
        .file_name()
        .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
    let seen = |members| Seen {
        namespace: namespace.clone(),
        template: template.clone(),
        pool: pool.clone(),
        members,
    };
    if !is_leader(shared) {
        return Ok(seen(members));
    }
    // Room the team's quota leaves: claimed sessions count, the pool does not.
    let room = od.max_sessions_per_team.map_or(usize::MAX, |max| {
        max.saturating_sub(gw.registry.created_for_team(team) + gw.ondemand.pending_for_team(team))
    });
    let members = match warm_up {
        Some(w) => warm_ups(shared, (key, &namespace), &api, b, w, members),
        None => members,
    };
    let Plan { mut kept, retire } = plan(members, pool, od.ready_timeout, room);
    for (m, why) in retire {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(m.rv.clone()),
                uid: None,
            }),
            ..Default::default()
        };
        match timed(api.delete(&m.name, &dp)).await {
            Ok(_) => info!(
                target: "sclb::audit",
                namespace = %namespace,
                name = %m.name,
                "pool driver retired ({why}): {namespace}/{}",
                m.name
            ),
            // Claimed (or gone) since it was read.
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
            Err(e) => return Err(crate::k8s_api::chain(&e)),
        }
    }
    let target = pool.min_ready.min(room);
    let placed = (key.frontend.as_str(), b.config.name.as_str());
    // Pool drivers have no session: a `{session}` in the name is random for them.
    let name_pattern = od.name.replace("{session}", "{random}");
    while kept.len() < target {
        let p = Pending {
            namespace: namespace.clone(),
            name: ondemand::fill(&name_pattern, team, environment, &nobody()),
            team: team.to_string(),
            environment: environment.to_string(),
            since: tokio::time::Instant::now(),
        };
        gw.ondemand
            .create_member(settings, od, &p, placed)
            .await
            .map_err(|e| format!("cannot create a pool driver: {e}"))?;
        kept.push(Member {
            name: p.name,
            age: Duration::ZERO,
            state: MemberState::Starting,
            rv: String::new(),
        });
    }
    Ok(seen(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, age_s: u64, state: MemberState) -> Member {
        Member {
            name: name.into(),
            age: Duration::from_secs(age_s),
            state,
            rv: String::new(),
        }
    }

    fn names(p: &Plan) -> (Vec<&str>, Vec<(&str, &str)>) {
        (
            p.kept.iter().map(|m| m.name.as_str()).collect(),
            p.retire
                .iter()
                .map(|(m, w)| (m.name.as_str(), *w))
                .collect(),
        )
    }

    #[test]
    fn the_keeper_retires_old_failing_stuck_and_surplus_members() {
        use MemberState::*;
        let pool = Pool {
            min_ready: 1,
            max_ready: 2,
            max_age: Duration::from_secs(100),
            teams: vec![],
            warm_up: None,
        };
        let t = Duration::from_secs(30);
        let members = || {
            vec![
                member("old", 100, Ready),
                member("stuck", 40, Starting),
                member("a", 20, Ready),
                member("down", 15, Down),
                member("b", 10, Ready),
                member("c", 5, Starting),
            ]
        };
        // The oldest of the rest beyond max_ready go.
        let p = plan(members(), &pool, t, usize::MAX);
        assert_eq!(
            names(&p),
            (
                vec!["b", "c"],
                vec![
                    ("old", "older than max_age"),
                    ("stuck", "not Ready within ready_timeout"),
                    ("down", "failing its health check"),
                    ("a", "beyond max_ready"),
                ]
            )
        );
        // The team's quota leaves room for one, then none: the pool shrinks to zero.
        let p = plan(members(), &pool, t, 1);
        assert_eq!(names(&p).0, ["c"]);
        assert!(
            p.retire
                .iter()
                .any(|(m, w)| m.name == "b" && w.contains("max_sessions_per_team"))
        );
        assert!(plan(members(), &pool, t, 0).kept.is_empty());
        // Nothing to retire: everything kept.
        let p = plan(vec![member("a", 1, Ready)], &pool, t, usize::MAX);
        assert_eq!(names(&p), (vec!["a"], vec![]));
    }
}
