//! `[global] store = { kind = "postgres" }`: gateway sessions shared by every sclb process
//! that points at one PostgreSQL-compatible database (PostgreSQL, RDS/Aurora, CockroachDB), so
//! that a session's RPCs reach its server whichever sclb they arrive at, and a restart, a
//! rollout or the loss of a replica loses none.
//!
//! - A session this process already knows costs no round trip. A new one costs one:
//!   bind-if-absent (`INSERT … ON CONFLICT … RETURNING`) answers the server it is bound to,
//!   this process's choice or another's.
//! - Activity is written in batches every `sync_interval`; at the same pace each process reads
//!   the sessions others ended (their tombstones stay in the table for 4 h) and ends them too.
//! - The idle reaper ends a session only if the store agrees it is idle: the end is an
//!   `UPDATE … WHERE active_ms < cutoff`, so a process that has not seen another's traffic
//!   cannot end a session in use there.
//! - When the database is unreachable, sclb keeps routing what it knows, binds new sessions
//!   locally and writes them when the database is back; a session another process bound
//!   meanwhile to another server is moved there (the row already in the database wins) and
//!   logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry as PromRegistry;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, NoTls, Socket};
use tracing::{info, warn};

use crate::config::PostgresStore;
use crate::gateway::registry::{EndReason, SessionKey};

mod election;
mod kinds;
pub mod kubernetes;
pub use kinds::SessionStore;

/// How long ended sessions' rows are kept, so that every process learns of the end.
const TOMBSTONE_MS: i64 = 4 * 3600 * 1000;
/// Most rows one batch writes.
const BATCH: usize = 5_000;
/// Retries of a statement the database refused for a serialization conflict (CockroachDB).
const SERIALIZATION_RETRIES: usize = 3;

const SCHEMA: &str = "
SET client_min_messages TO warning;
CREATE TABLE IF NOT EXISTS sclb_sessions (
    session_id  text   NOT NULL,
    user_id     text   NOT NULL,
    backend     text   NOT NULL,
    frontend    text   NOT NULL,
    server      text   NOT NULL,
    server_addr text   NOT NULL,
    created_ms  bigint NOT NULL,
    active_ms   bigint NOT NULL,
    ended       text,
    ended_ms    bigint,
    PRIMARY KEY (session_id, user_id)
);
CREATE INDEX IF NOT EXISTS sclb_sessions_ended ON sclb_sessions (ended_ms);
CREATE TABLE IF NOT EXISTS sclb_pins (
    backend     text   NOT NULL,
    client      text   NOT NULL,
    server      text   NOT NULL,
    server_addr text   NOT NULL,
    expires_ms  bigint NOT NULL,
    PRIMARY KEY (backend, client)
);
";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where a session is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub backend: String,
    pub frontend: String,
    pub server: String,
    pub server_addr: String,
    pub created_ms: i64,
}

/// What the store said about a new session.
#[derive(Debug)]
pub enum Bound {
    /// Bound to this process's choice.
    Ours,
    /// Already bound by another process (or before a restart), maybe elsewhere.
    Theirs { binding: Binding, active_ms: i64 },
    /// It ended (released, reaped or killed) somewhere.
    Ended(EndReason),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is unreachable")]
    Down,
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{}", db_message(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("TLS to the store: {0}")]
    Tls(String),
    #[error("{0}")]
    Kube(String),
}

type Labels = [(&'static str, &'static str); 1];

pub struct StoreMetrics {
    pub registry: PromRegistry,
    up: Gauge,
    errors: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    conflicts: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        let mut registry = PromRegistry::with_prefix("sclb_store");
        let up = Gauge::default();
        let errors = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0002, 2.0, 16))
        });
        let conflicts = Counter::default();
        registry.register(
            "up",
            "1 while the session store answers, 0 while sclb routes from what it knows.",
            up.clone(),
        );
        registry.register(
            "errors",
            "Store operations that failed, by operation.",
            errors.clone(),
        );
        registry.register(
            "latency_seconds",
            "Time of store operations, by operation.",
            latency.clone(),
        );
        registry.register(
            "conflicts",
            "Sessions bound locally while the store was unreachable that another sclb had bound elsewhere.",
            conflicts.clone(),
        );
        StoreMetrics {
            registry,
            up,
            errors,
            latency,
            conflicts,
        }
    }
}

impl StoreMetrics {
    /// Counts one operation of `secs`, and an error if it failed.
    pub(crate) fn observe(&self, op: &'static str, secs: f64, ok: bool) {
        self.latency.get_or_create(&[("op", op)]).observe(secs);
        if !ok {
            self.errors.get_or_create(&[("op", op)]).inc();
        }
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    pub(crate) fn conflict(&self) {
        self.conflicts.inc();
    }
}

/// A PostgreSQL session store.
pub struct Store {
    cfg: PostgresStore,
    client: ArcSwapOption<Client>,
    up: AtomicBool,
    pub metrics: StoreMetrics,
    /// Sessions bound locally while the store was unreachable, to write when it is back.
    unwritten: Mutex<Vec<(SessionKey, Binding)>>,
    /// Sessions ended here, to write.
    ended: Mutex<Vec<(SessionKey, EndReason, i64)>>,
    /// Pins to write (re-pins and refreshed expiries).
    pins: Mutex<Vec<PinWrite>>,
}

/// One pin to write: `overwrite` for a re-pin (the server changed), else only a later expiry.
#[derive(Debug, Clone)]
pub struct PinWrite {
    pub backend: String,
    pub client: String,
    pub server: String,
    pub server_addr: String,
    pub expires_ms: i64,
    pub overwrite: bool,
}

impl Store {
    pub fn new(cfg: PostgresStore) -> Arc<Store> {
        Arc::new(Store {
            cfg,
            client: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            metrics: StoreMetrics::default(),
            unwritten: Mutex::default(),
            ended: Mutex::default(),
            pins: Mutex::default(),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub fn sync_interval(&self) -> Duration {
        self.cfg.sync_interval
    }

    fn set_up(&self, up: bool) {
        let was = self.up.swap(up, Relaxed);
        self.metrics.up.set(i64::from(up));
        if was && !up {
            warn!("session store unreachable: routing known sessions, binding new ones locally");
            self.client.store(None);
        }
    }

    /// Runs one operation with the statement timeout; counts it; a failure marks the store
    /// down (the sync loop reconnects).
    async fn op<T, F, Fut>(&self, name: &'static str, f: F) -> Result<T, StoreError>
    where
        F: Fn(Arc<Client>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let Some(client) = self.client.load_full() else {
            return Err(StoreError::Down);
        };
        let started = std::time::Instant::now();
        let mut tries = 0;
        let r = loop {
            let r = tokio::time::timeout(self.cfg.timeout, f(client.clone())).await;
            match r {
                Ok(Err(e))
                    if e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
                        && tries < SERIALIZATION_RETRIES =>
                {
                    tries += 1;
                    continue;
                }
                Ok(r) => break r.map_err(StoreError::Db),
                Err(_) => break Err(StoreError::Timeout(self.cfg.timeout)),
            }
        };
        self.metrics
            .latency
            .get_or_create(&[("op", name)])
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &r {
            self.metrics.errors.get_or_create(&[("op", name)]).inc();
            let lost = match e {
                StoreError::Db(e) => e.is_closed() || e.code().is_none(),
                _ => true,
            };
            if lost {
                self.set_up(false);
            }
        }
        r
    }

    /// Binds a new session to `b` unless it is bound (or ended) already: one round trip.
    pub async fn bind(&self, key: &SessionKey, b: &Binding) -> Result<Bound, StoreError> {
        let now = now_ms();
        let row = self
            .op("bind", |c| async move {
                c.query_one(
                    "INSERT INTO sclb_sessions AS s
                        (session_id, user_id, backend, frontend, server, server_addr, created_ms, active_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (session_id, user_id)
                        DO UPDATE SET active_ms = GREATEST(s.active_ms, EXCLUDED.active_ms)
                     RETURNING backend, frontend, server, server_addr, created_ms, active_ms, ended",
                    &[
                        &key.session_id,
                        &key.user_id,
                        &b.backend,
                        &b.frontend,
                        &b.server,
                        &b.server_addr,
                        &b.created_ms,
                        &now,
                    ],
                )
                .await
            })
            .await?;
        if let Some(reason) = row.get::<_, Option<String>>(6) {
            return Ok(Bound::Ended(parse_reason(&reason)));
        }
        let binding = Binding {
            backend: row.get(0),
            frontend: row.get(1),
            server: row.get(2),
            server_addr: row.get(3),
            created_ms: row.get(4),
        };
        if &binding == b {
            Ok(Bound::Ours)
        } else {
            Ok(Bound::Theirs {
                binding,
                active_ms: row.get(5),
            })
        }
    }

    /// Pins `client` of `backend` to `server` unless a live pin exists: one round trip. The
    /// answer is the pinned server's (name, address).
    pub async fn bind_pin(
        &self,
        backend: &str,
        client: std::net::IpAddr,
        server: &str,
        server_addr: &str,
        expire: Duration,
    ) -> Result<(String, String), StoreError> {
        let now = now_ms();
        let expires = now.saturating_add(expire.as_millis() as i64);
        let client = client.to_string();
        let row = self
            .op("pin", |c| {
                let client = client.clone();
                async move {
                    c.query_one(
                        "INSERT INTO sclb_pins AS p (backend, client, server, server_addr, expires_ms)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (backend, client) DO UPDATE SET
                            server = CASE WHEN p.expires_ms < $6 THEN EXCLUDED.server ELSE p.server END,
                            server_addr = CASE WHEN p.expires_ms < $6 THEN EXCLUDED.server_addr ELSE p.server_addr END,
                            expires_ms = GREATEST(p.expires_ms, EXCLUDED.expires_ms)
                         RETURNING server, server_addr",
                        &[&backend, &client, &server, &server_addr, &expires, &now],
                    )
                    .await
                }
            })
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    /// Pins written here since the last sync (re-pins overwrite, refreshes extend).
    pub fn pins_to_write(&self, pins: Vec<PinWrite>) {
        let mut p = self.pins.lock();
        if p.len() + pins.len() <= 1_000_000 {
            p.extend(pins);
        }
    }

    /// A session bound here while the store was unreachable: written when it is back.
    pub fn bound_locally(&self, key: SessionKey, b: Binding) {
        let mut u = self.unwritten.lock();
        if u.len() < 1_000_000 {
            u.push((key, b));
        }
    }

    /// A session ended here: written at the next sync.
    pub fn ended_here(&self, key: SessionKey, reason: EndReason) {
        let mut e = self.ended.lock();
        if e.len() < 1_000_000 {
            e.push((key, reason, now_ms()));
        }
    }

    /// Ends the sessions in `due` that the store also finds idle since `cutoff_ms` (or over
    /// their TTL: `ttl` true); returns those it ended, and for the others the last activity
    /// another process recorded.
    pub async fn end_if_idle(
        &self,
        due: &[(SessionKey, EndReason, i64)],
    ) -> Result<(Vec<SessionKey>, Vec<(SessionKey, i64)>), StoreError> {
        let mut ended = Vec::new();
        let mut busy = Vec::new();
        let now = now_ms();
        for (key, reason, cutoff) in due {
            let row = self
                .op("reap", |c| async move {
                    c.query_one(
                        "WITH e AS (
                            UPDATE sclb_sessions SET ended = $3, ended_ms = $4
                            WHERE session_id = $1 AND user_id = $2 AND ended IS NULL AND active_ms < $5
                            RETURNING 1)
                         SELECT (SELECT count(*) FROM e),
                                (SELECT active_ms FROM sclb_sessions WHERE session_id = $1 AND user_id = $2)",
                        &[
                            &key.session_id,
                            &key.user_id,
                            &reason.as_str(),
                            &now,
                            cutoff,
                        ],
                    )
                    .await
                })
                .await?;
            let n: i64 = row.get(0);
            let active: Option<i64> = row.get(1);
            match (n, active) {
                (1, _) | (_, None) => ended.push(key.clone()),
                (_, Some(a)) => busy.push((key.clone(), a)),
            }
        }
        Ok((ended, busy))
    }

    /// Connects (and creates the table) when the store is down; then writes what waits and
    /// reads the sessions other processes ended since `since_ms`. Returns those ends and
    /// the sessions bound here whose rows another process had bound elsewhere.
    pub async fn sync(
        &self,
        since_ms: i64,
        activity: Vec<(SessionKey, i64)>,
    ) -> Result<Synced, StoreError> {
        if self.client.load().is_none() {
            self.connect().await?;
        }
        let mut out = Synced::default();
        // Local binds made while the store was away.
        let unwritten = std::mem::take(&mut *self.unwritten.lock());
        for (i, (key, b)) in unwritten.iter().enumerate() {
            match self.bind(key, b).await {
                Ok(Bound::Ours) => {}
                Ok(Bound::Theirs { binding, .. }) => {
                    self.metrics.conflicts.inc();
                    out.moved.push((key.clone(), binding));
                }
                Ok(Bound::Ended(r)) => out.ended.push((key.clone(), r)),
                Err(e) => {
                    self.unwritten.lock().extend(unwritten[i..].iter().cloned());
                    return Err(e);
                }
            }
        }
        let ended = std::mem::take(&mut *self.ended.lock());
        for chunk in ended.chunks(BATCH) {
            let (ids, users, reasons, ats) = unzip4(chunk.iter().map(|(k, r, at)| {
                (
                    k.session_id.clone(),
                    k.user_id.clone(),
                    r.as_str().to_string(),
                    *at,
                )
            }));
            let r = self
                .op("end", |c| {
                    let (ids, users, reasons, ats) =
                        (ids.clone(), users.clone(), reasons.clone(), ats.clone());
                    async move {
                        c.execute(
                            "UPDATE sclb_sessions s SET ended = v.r, ended_ms = v.at
                             FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) AS v(sid, uid, r, at)
                             WHERE s.session_id = v.sid AND s.user_id = v.uid AND s.ended IS NULL",
                            &[&ids, &users, &reasons, &ats],
                        )
                        .await
                    }
                })
                .await;
            if let Err(e) = r {
                self.ended.lock().extend(ended.iter().cloned());
                return Err(e);
            }
        }
        let pins = std::mem::take(&mut *self.pins.lock());
        for chunk in pins.chunks(BATCH) {
            if let Err(e) = self.write_pins(chunk).await {
                self.pins.lock().extend(pins.iter().cloned());
                return Err(e);
            }
        }
        for chunk in activity.chunks(BATCH) {
            let ids: Vec<&str> = chunk.iter().map(|(k, _)| k.session_id.as_str()).collect();
            let users: Vec<&str> = chunk.iter().map(|(k, _)| k.user_id.as_str()).collect();
            let ats: Vec<i64> = chunk.iter().map(|(_, a)| *a).collect();
            self.op("activity", |c| {
                let (ids, users, ats) = (ids.clone(), users.clone(), ats.clone());
                async move {
                    c.execute(
                        "UPDATE sclb_sessions s SET active_ms = GREATEST(s.active_ms, v.a)
                         FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(sid, uid, a)
                         WHERE s.session_id = v.sid AND s.user_id = v.uid",
                        &[&ids, &users, &ats],
                    )
                    .await
                }
            })
            .await?;
        }
        let rows = self
            .op("ends", |c| async move {
                c.query(
                    "SELECT session_id, user_id, ended, ended_ms FROM sclb_sessions
                     WHERE ended_ms >= $1 ORDER BY ended_ms LIMIT 100000",
                    &[&since_ms],
                )
                .await
            })
            .await?;
        for r in rows {
            let key = SessionKey {
                session_id: r.get(0),
                user_id: r.get(1),
            };
            let reason: String = r.get(2);
            out.latest_end_ms = out.latest_end_ms.max(r.get(3));
            out.ended.push((key, parse_reason(&reason)));
        }
        let cutoff = now_ms() - TOMBSTONE_MS;
        self.op("prune", |c| async move {
            c.execute("DELETE FROM sclb_sessions WHERE ended_ms < $1", &[&cutoff])
                .await
        })
        .await?;
        Ok(out)
    }

    /// Re-pins overwrite the row; refreshes add a missing row (a pin made while the store was
    /// away) or extend the expiry of one that names the same server, never replace another
    /// node's choice.
    async fn write_pins(&self, chunk: &[PinWrite]) -> Result<(), StoreError> {
        for overwrite in [true, false] {
            let part: Vec<&PinWrite> = chunk.iter().filter(|p| p.overwrite == overwrite).collect();
            if part.is_empty() {
                continue;
            }
            let col = |f: fn(&PinWrite) -> String| part.iter().map(|p| f(p)).collect::<Vec<_>>();
            let (bes, clients, servers, addrs) = (
                col(|p| p.backend.clone()),
                col(|p| p.client.clone()),
                col(|p| p.server.clone()),
                col(|p| p.server_addr.clone()),
            );
            let exp: Vec<i64> = part.iter().map(|p| p.expires_ms).collect();
            let sql = if overwrite {
                "INSERT INTO sclb_pins AS p (backend, client, server, server_addr, expires_ms)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                 ON CONFLICT (backend, client) DO UPDATE SET server = EXCLUDED.server,
                    server_addr = EXCLUDED.server_addr, expires_ms = EXCLUDED.expires_ms"
            } else {
                "INSERT INTO sclb_pins AS p (backend, client, server, server_addr, expires_ms)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[])
                 ON CONFLICT (backend, client) DO UPDATE SET expires_ms = CASE
                    WHEN p.server = EXCLUDED.server AND p.server_addr = EXCLUDED.server_addr
                    THEN GREATEST(p.expires_ms, EXCLUDED.expires_ms) ELSE p.expires_ms END"
            };
            self.op("pins", |c| {
                let a = (bes.clone(), clients.clone(), servers.clone(), addrs.clone());
                let exp = exp.clone();
                async move { c.execute(sql, &[&a.0, &a.1, &a.2, &a.3, &exp]).await }
            })
            .await?;
        }
        Ok(())
    }

    async fn open<T>(&self, cfg: &tokio_postgres::Config, tls: T) -> Result<Client, StoreError>
    where
        T: MakeTlsConnect<Socket> + Send,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let (client, conn) = tokio::time::timeout(self.cfg.timeout, cfg.connect(tls))
            .await
            .map_err(|_| StoreError::Timeout(self.cfg.timeout))??;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                info!("session store connection closed: {e}");
            }
        });
        Ok(client)
    }

    /// The connection attempt at start; a failure is logged and retried by the sync loop.
    pub async fn first_connect(&self) {
        if let Err(e) = self.connect().await {
            self.metrics.up.set(0);
            warn!("session store not reachable at start ({e}): routing on, retrying");
        }
    }

    async fn connect(&self) -> Result<(), StoreError> {
        let mut cfg: tokio_postgres::Config = self.cfg.url.parse().map_err(StoreError::Db)?;
        if let Some(p) = &self.cfg.password_file {
            // A regular file of at most 64 KiB: a FIFO there must not hang the connect.
            match crate::files::read_text(p, 64 << 10) {
                Ok(pw) => {
                    cfg.password(pw.trim_end_matches(['\n', '\r']));
                }
                Err(e) => warn!(path = %p.display(), "store password_file: {e}"),
            }
        }
        cfg.connect_timeout(self.cfg.timeout);
        cfg.application_name("sclb");
        // A Unix socket takes no TLS (as with libpq): PostgreSQL on the same host.
        let local = cfg
            .get_hosts()
            .iter()
            .any(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        let client = if cfg.get_ssl_mode() == SslMode::Disable || local {
            self.open(&cfg, NoTls).await?
        } else {
            // sslmode=prefer (libpq's default) or require: TLS when the server offers it,
            // verified against `ca` (re-read at every connect: a rotated bundle applies).
            let tls = crate::tls::client::store_config(self.cfg.ca.as_deref())
                .map_err(|e| StoreError::Tls(e.to_string()))?;
            self.open(&cfg, tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await?
        };
        // Two sclb starting together race on CREATE … IF NOT EXISTS (PostgreSQL reports a
        // unique violation on its catalog): the loser tries again and finds the table.
        let mut tries = 0;
        loop {
            let r = tokio::time::timeout(self.cfg.timeout, client.batch_execute(SCHEMA))
                .await
                .map_err(|_| StoreError::Timeout(self.cfg.timeout))?;
            match r {
                Err(e) if tries < 3 && e.as_db_error().is_some() => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50 * tries)).await;
                }
                r => break r?,
            }
        }
        self.client.store(Some(Arc::new(client)));
        if !self.up.swap(true, Relaxed) {
            info!("session store connected");
        }
        self.metrics.up.set(1);
        Ok(())
    }
}

/// What one sync brought back.
#[derive(Default)]
pub struct Synced {
    /// Sessions other processes ended.
    pub ended: Vec<(SessionKey, EndReason)>,
    /// The newest end read (where the next read starts).
    pub latest_end_ms: i64,
    /// Sessions bound here while the store was away that are bound elsewhere.
    pub moved: Vec<(SessionKey, Binding)>,
    /// Sessions the store holds that are new or changed since the last sync (a store that
    /// watches, as the kubernetes kind does): to put in the registry, or their activity.
    pub known: Vec<Known>,
}

/// A session as a watching store sees it.
#[derive(Debug, Clone)]
pub struct Known {
    pub key: SessionKey,
    pub frontend: String,
    pub backend: String,
    pub place: Place,
    pub created_ms: i64,
    pub active_ms: i64,
}

/// Where a known session runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A server of the backend, by name and configured address.
    Server { name: String, addr: String },
    /// The driver sclb created for it.
    Driver {
        namespace: String,
        name: String,
        team: String,
        environment: String,
    },
}

/// The database's own words when it refused (tokio-postgres prints only "db error").
fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            // The kind ("error performing TLS handshake") and then why, from the causes.
            let mut out = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !out.contains(&text) {
                    out.push_str(": ");
                    out.push_str(&text);
                }
                cause = c.source();
            }
            out
        }
    }
}

pub(crate) fn parse_reason(s: &str) -> EndReason {
    match s {
        "released" => EndReason::Released,
        "idle" => EndReason::Idle,
        "ttl" => EndReason::Ttl,
        _ => EndReason::Killed,
    }
}

fn unzip4<A, B, C, D>(it: impl Iterator<Item = (A, B, C, D)>) -> (Vec<A>, Vec<B>, Vec<C>, Vec<D>) {
    let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (w, x, y, z) in it {
        a.push(w);
        b.push(x);
        c.push(y);
        d.push(z);
    }
    (a, b, c, d)
}
