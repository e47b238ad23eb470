//! A backend server and the live state that belongs to it: counters, health (rise/fall),
//! admin state (READY, DRAIN, MAINT) and the handle that closes its sessions.
//!
//! A `Server` outlives config snapshots: a reload that keeps a server (same backend, name and
//! address) hands the same `Arc<Server>` to the new snapshot, so nothing about it is lost.

use parking_lot::{Mutex, RwLock};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CheckConfig, CheckType, InitState, ServerConfig};

/// Permission to change live state. Only [`crate::control`] makes one (every change goes
/// through its `apply`); setters of live state here and in [`crate::state`] take one, so that
/// a write elsewhere stands out (a test checks that nothing else makes one).
pub struct Writer(());

impl Writer {
    /// For [`crate::control`] only.
    #[doc(hidden)]
    pub(crate) const fn for_control() -> Writer {
        Writer(())
    }

    #[cfg(test)]
    pub(crate) const FOR_TESTS: Writer = Writer(());
}

/// A server's identity for the life of the process. Stick entries refer to servers by it, so a
/// reordered config does not move clients and a recycled address never inherits a dead
/// server's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub u64);

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the operator said about a server (HAProxy's admin states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes new clients.
    Ready = 0,
    /// No new clients; clients pinned to it keep coming; checks go on.
    Drain = 1,
    /// No traffic at all; checks stop; pinned clients move on their next connection.
    Maint = 2,
}

impl AdminState {
    /// The operator's word for it, as `show stat` and the logs print it.
    pub fn word(self) -> &'static str {
        match self {
            AdminState::Ready => "READY",
            AdminState::Drain => "DRAIN",
            AdminState::Maint => "MAINT",
        }
    }
}

/// Who put a server in DRAIN or MAINT, one flag per source as HAProxy keeps them
/// (`srv_admin_state`, with HAProxy's bit values): the operator forces (admin socket, the
/// stats page, the state file that remembers the operator's word), discovery passes on what
/// the orchestrator says (a terminating pod drains). The server's state is the strongest
/// flag set — MAINT over DRAIN over READY — so one source never undoes another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdminFlags(u8);

impl AdminFlags {
    /// Put in maintenance by the operator (HAProxy `SRV_ADMF_FMAINT`).
    pub const FORCED_MAINT: u8 = 0x01;
    /// Drained by the operator (`SRV_ADMF_FDRAIN`).
    pub const FORCED_DRAIN: u8 = 0x08;
    /// Drained by discovery: the pod is terminating (`SRV_ADMF_IDRAIN`, inherited).
    pub const DISCOVERY_DRAIN: u8 = 0x10;

    pub fn bits(self) -> u8 {
        self.0
    }

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    /// The state every source together puts the server in.
    pub fn effective(self) -> AdminState {
        if self.has(Self::FORCED_MAINT) {
            AdminState::Maint
        } else if self.has(Self::FORCED_DRAIN | Self::DISCOVERY_DRAIN) {
            AdminState::Drain
        } else {
            AdminState::Ready
        }
    }

    /// What the operator alone said.
    pub fn operator(self) -> AdminState {
        if self.has(Self::FORCED_MAINT) {
            AdminState::Maint
        } else if self.has(Self::FORCED_DRAIN) {
            AdminState::Drain
        } else {
            AdminState::Ready
        }
    }

    /// Whether discovery drains the server.
    pub fn discovery_drain(self) -> bool {
        self.has(Self::DISCOVERY_DRAIN)
    }

    fn with_operator(self, s: AdminState) -> Self {
        let keep = self.0 & !(Self::FORCED_MAINT | Self::FORCED_DRAIN);
        AdminFlags(
            keep | match s {
                AdminState::Ready => 0,
                AdminState::Drain => Self::FORCED_DRAIN,
                AdminState::Maint => Self::FORCED_MAINT,
            },
        )
    }

    fn with_discovery_drain(self, on: bool) -> Self {
        if on {
            AdminFlags(self.0 | Self::DISCOVERY_DRAIN)
        } else {
            AdminFlags(self.0 & !Self::DISCOVERY_DRAIN)
        }
    }
}

/// Result codes of a health check, as HAProxy's `check_status` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// No check has run yet.
    Init,
    /// Checks are disabled for this server.
    Disabled,
    /// TCP connect succeeded (tcp check).
    L4Ok,
    /// TCP connect timed out.
    L4Tout,
    /// TCP connect failed (refused, unreachable).
    L4Con,
    /// TLS handshake with the server succeeded (tcp check with `server_tls`).
    L6Ok,
    /// TLS handshake did not complete in time.
    L6Tout,
    /// TLS handshake failed (certificate not trusted, wrong name, not TLS).
    L6Rsp,
    /// Layer 7 (HTTP/2, Spark) answer was good.
    L7Ok,
    /// Layer 7 answer did not come in time.
    L7Tout,
    /// Layer 7 answer was malformed or not the protocol expected.
    L7Rsp,
    /// Layer 7 answer was a proper error from the server.
    L7Sts,
}

impl CheckStatus {
    pub fn code(self) -> &'static str {
        match self {
            CheckStatus::Init => "INI",
            CheckStatus::Disabled => "",
            CheckStatus::L4Ok => "L4OK",
            CheckStatus::L4Tout => "L4TOUT",
            CheckStatus::L4Con => "L4CON",
            CheckStatus::L6Ok => "L6OK",
            CheckStatus::L6Tout => "L6TOUT",
            CheckStatus::L6Rsp => "L6RSP",
            CheckStatus::L7Ok => "L7OK",
            CheckStatus::L7Tout => "L7TOUT",
            CheckStatus::L7Rsp => "L7RSP",
            CheckStatus::L7Sts => "L7STS",
        }
    }

    pub fn is_ok(self) -> bool {
        matches!(
            self,
            CheckStatus::L4Ok | CheckStatus::L6Ok | CheckStatus::L7Ok
        )
    }
}

/// The last check's outcome, for `show stat` and the stats page.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub status: CheckStatus,
    pub duration_ms: Option<u64>,
    /// Free text: the error, or what the server said (e.g. the Spark version).
    pub desc: String,
}

/// Health as HAProxy keeps it: one counter from 0 to rise+fall-1; the server is UP when the
/// counter is at least `rise`. A success moves it up, a failure down; crossing `rise` flips the
/// state and jumps the counter to the far end, so that a flip needs `rise` successes or `fall`
/// failures in a row.
pub struct Health {
    counter: AtomicU32,
    rise: AtomicU32,
    fall: AtomicU32,
    enabled: AtomicBool,
    /// Forced "stopping" by the operator (HAProxy's NOLB): UP for pinned clients, no new ones,
    /// until the next good check.
    stopping: AtomicBool,
    last: Mutex<LastCheck>,
    /// Last version string a Spark check reported.
    pub spark_version: Mutex<Option<String>>,
}

/// A health state the operator forces (HAProxy's `set server ... health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedHealth {
    Up,
    /// UP, but takes no new clients (HAProxy's NOLB), until the next good check.
    Stopping,
    Down,
}

/// The health counter and its bounds at one moment, for typed stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCounter {
    /// From 0 to `rise + fall - 1`; UP from `rise` on.
    pub value: u32,
    pub rise: u32,
    pub fall: u32,
}

/// Fully UP, fully DOWN, or on the way between (HAProxy then checks at `fastinter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    FullyUp,
    Transition,
    FullyDown,
}

/// What a check result did to the state, for logging and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    WentUp,
    WentDown,
}

impl Health {
    fn new(check: &CheckConfig) -> Self {
        let (rise, fall) = (check.rise, check.fall);
        let counter = match check.init_state {
            InitState::FullyUp => rise + fall - 1,
            InitState::Up => rise,
            InitState::Down => rise - 1,
            InitState::FullyDown => 0,
        };
        Health {
            counter: AtomicU32::new(counter),
            rise: AtomicU32::new(rise),
            fall: AtomicU32::new(fall),
            enabled: AtomicBool::new(check.kind != CheckType::None),
            stopping: AtomicBool::new(false),
            last: Mutex::new(LastCheck {
                status: if check.kind == CheckType::None {
                    CheckStatus::Disabled
                } else {
                    CheckStatus::Init
                },
                duration_ms: None,
                desc: String::new(),
            }),
            spark_version: Mutex::new(None),
        }
    }

    /// UP as far as checks know (always true when checks are disabled).
    pub fn is_up(&self) -> bool {
        !self.enabled.load(Relaxed) || self.counter.load(Relaxed) >= self.rise.load(Relaxed)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Relaxed)
    }

    pub fn set_enabled(&self, _: &Writer, on: bool) {
        self.enabled.store(on, Relaxed);
        crate::balance::servers_changed();
    }

    /// Applies one check result (through [`crate::control`], from this server's checker).
    pub fn record(&self, _: &Writer, result: LastCheck) -> Transition {
        let (rise, fall) = (self.rise.load(Relaxed), self.fall.load(Relaxed));
        let top = rise + fall - 1;
        let c = self.counter.load(Relaxed);
        let was_up = c >= rise;
        let next = if result.status.is_ok() {
            if c + 1 >= rise && !was_up {
                top
            } else {
                (c + 1).min(top)
            }
        } else if was_up && c - 1 < rise {
            0
        } else {
            c.saturating_sub(1)
        };
        self.counter.store(next, Relaxed);
        let was_stopping = result.status.is_ok() && self.stopping.swap(false, Relaxed);
        *self.last.lock() = result;
        if was_up != (next >= rise) || was_stopping {
            crate::balance::servers_changed();
        }
        match (was_up, next >= rise) {
            (false, true) => Transition::WentUp,
            (true, false) => Transition::WentDown,
            _ => Transition::None,
        }
    }

    /// Forces the health state (`set server <b>/<s> health up|stopping|down`); the next checks
    /// move it on from there as usual. Returns the transition, for the log.
    pub fn force(&self, _: &Writer, to: ForcedHealth) -> Transition {
        let (rise, fall) = (self.rise.load(Relaxed), self.fall.load(Relaxed));
        let was_up = self.is_up();
        let (counter, stopping) = match to {
            ForcedHealth::Up => (rise + fall - 1, false),
            ForcedHealth::Stopping => (rise + fall - 1, true),
            ForcedHealth::Down => (0, false),
        };
        self.counter.store(counter, Relaxed);
        self.stopping.store(stopping, Relaxed);
        crate::balance::servers_changed();
        match (was_up, self.is_up()) {
            (false, true) => Transition::WentUp,
            (true, false) => Transition::WentDown,
            _ => Transition::None,
        }
    }

    /// Forced "stopping" (NOLB): pinned clients only.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Relaxed)
    }

    /// Where the counter stands, for choosing the next check interval.
    pub fn phase(&self) -> Phase {
        let (rise, fall) = (self.rise.load(Relaxed), self.fall.load(Relaxed));
        match self.counter.load(Relaxed) {
            c if c == rise + fall - 1 => Phase::FullyUp,
            0 => Phase::FullyDown,
            _ => Phase::Transition,
        }
    }

    /// Applies new rise/fall values (after a reload), keeping the UP/DOWN state.
    pub fn set_rise_fall(&self, _: &Writer, rise: u32, fall: u32) {
        let was_up = self.is_up();
        self.rise.store(rise, Relaxed);
        self.fall.store(fall, Relaxed);
        let c = if was_up { rise + fall - 1 } else { 0 };
        self.counter.store(c, Relaxed);
        crate::balance::servers_changed();
    }

    /// Where the counter stands: what [`Health::describe`] words.
    pub fn counter(&self) -> HealthCounter {
        HealthCounter {
            value: self.counter.load(Relaxed),
            rise: self.rise.load(Relaxed),
            fall: self.fall.load(Relaxed),
        }
    }

    pub fn last(&self) -> LastCheck {
        self.last.lock().clone()
    }

    /// "UP", "UP 1/3", "DOWN", "DOWN 1/2" as HAProxy shows health.
    pub fn describe(&self) -> String {
        if !self.enabled() {
            return "UP".into();
        }
        let (rise, fall) = (self.rise.load(Relaxed), self.fall.load(Relaxed));
        let c = self.counter.load(Relaxed);
        if c >= rise {
            if c == rise + fall - 1 {
                "UP".into()
            } else {
                format!("UP {}/{}", c - rise + 1, fall)
            }
        } else if c == 0 {
            "DOWN".into()
        } else {
            format!("DOWN {c}/{rise}")
        }
    }
}

/// Counters as HAProxy's `show stat` has them. Updated with relaxed atomics: they are
/// statistics, read approximately, never used to decide anything exactly.
#[derive(Default)]
pub struct Counters {
    /// Live connections (`scur`).
    pub cur: AtomicU64,
    pub max: AtomicU64,
    /// Connections ever sent here (`stot`).
    pub total: AtomicU64,
    /// Times the balancer chose it (`lbtot`).
    pub lbtot: AtomicU64,
    /// Bytes from clients to the server (`bin`).
    pub bytes_in: AtomicU64,
    /// Bytes from the server to clients (`bout`).
    pub bytes_out: AtomicU64,
    /// Failed connection attempts (`econ`).
    pub conn_errors: AtomicU64,
    /// Connections that died on a server error (`eresp`).
    pub resp_errors: AtomicU64,
    /// Retries to this server (`wretr`).
    pub retries: AtomicU64,
    /// Connections moved to another server after failing here (`wredis`).
    pub redispatches: AtomicU64,
    /// Failed checks (`chkfail`).
    pub check_failures: AtomicU64,
    /// UP to DOWN transitions (`chkdown`).
    pub check_downs: AtomicU64,
    /// Clients waiting for a slot on this server (`qcur`, `qmax`).
    pub queue_cur: AtomicU64,
    pub queue_max: AtomicU64,
    /// Connections sent here per second (`rate`, `rate_max`).
    pub rate: crate::rate::Rate,
    /// Sliding averages over the last 1024 connections, in ms: waiting in the queue
    /// (`qtime`), connecting (`ctime`), and the whole connection (`ttime`).
    pub qtime: crate::rate::Average,
    pub ctime: crate::rate::Average,
    pub ttime: crate::rate::Average,
}

impl Counters {
    pub fn connection_started(&self) {
        let cur = self.cur.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(cur, Relaxed);
        self.total.fetch_add(1, Relaxed);
        self.rate.hit();
    }

    pub fn connection_ended(&self) {
        self.cur.fetch_sub(1, Relaxed);
    }

    /// `clear counters`: the max values start again from the current ones; with `all`, every
    /// cumulated counter goes back to zero too (as after a restart).
    pub fn clear(&self, _: &Writer, all: bool) {
        self.max.store(self.cur.load(Relaxed), Relaxed);
        self.queue_max.store(self.queue_cur.load(Relaxed), Relaxed);
        self.rate.clear_max();
        for a in [&self.qtime, &self.ctime, &self.ttime] {
            a.clear_max();
        }
        if all {
            for c in [
                &self.total,
                &self.lbtot,
                &self.bytes_in,
                &self.bytes_out,
                &self.conn_errors,
                &self.resp_errors,
                &self.retries,
                &self.redispatches,
                &self.check_failures,
                &self.check_downs,
            ] {
                c.store(0, Relaxed);
            }
        }
    }
}

/// When a server's state last changed, and how long it has been DOWN or in MAINT.
struct Changes {
    at: Instant,
    /// Down since then (set at a change that left it down).
    down_since: Option<Instant>,
    down_total: std::time::Duration,
}

pub struct Server {
    pub id: ServerId,
    pub backend: Arc<str>,
    pub name: Arc<str>,
    /// Position in its backend, 1-based (HAProxy's `sid`); may change on reload.
    pub sid: AtomicU32,
    /// The address and, ready for a request URI, its `host:port` (the gateway's every RPC
    /// names it; formatting and parsing it per RPC was ~2,500 instructions).
    addr: RwLock<(SocketAddr, Option<http::uri::Authority>)>,
    /// The server's config; a reload that keeps the server may replace it (weight, check...).
    config: ArcSwap<ServerConfig>,
    weight: AtomicU32,
    maxconn: AtomicU64,
    admin: AtomicU8,
    pub health: Health,
    pub counters: Counters,
    /// Connection slots: `maxconn` of them, or unlimited. A client waits here (the queue) for
    /// up to `timeout queue`.
    pub slots: Arc<Semaphore>,
    sessions: Mutex<CancellationToken>,
    /// Cancelled when the server leaves the config: its checker stops, its clients drain.
    pub retired: CancellationToken,
    /// When the state last changed (UP/DOWN or admin), for `lastchg`, and the time spent
    /// unusable (DOWN or MAINT), for `downtime`.
    last_change: Mutex<Changes>,
    checker: AtomicBool,
    /// Woken when a reload changes the server's check, so that its checker applies the new
    /// interval at once instead of after the old one's sleep.
    pub check_changed: tokio::sync::Notify,
    /// Least connections: where the connection count goes when it changes.
    load_hook: ArcSwapOption<crate::balance::LoadHook>,
}

/// Grows or shrinks a semaphore used as a connection limit. Permits held above a lowered
/// limit are taken back as they are released.
pub fn resize_semaphore(sem: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        sem.add_permits((new - old).min(Semaphore::MAX_PERMITS - sem.available_permits()));
    } else if new < old {
        let mut deficit = old - new;
        deficit -= sem.forget_permits(deficit);
        if deficit > 0 {
            let sem = sem.clone();
            tokio::spawn(async move {
                if let Ok(p) = sem
                    .acquire_many_owned(deficit.min(u32::MAX as usize) as u32)
                    .await
                {
                    p.forget();
                }
            });
        }
    }
}

fn authority(addr: SocketAddr) -> Option<http::uri::Authority> {
    http::uri::Authority::from_maybe_shared(bytes::Bytes::from(addr.to_string())).ok()
}

impl Server {
    pub fn new(id: ServerId, backend: &str, sid: u32, config: ServerConfig) -> Self {
        Server {
            id,
            backend: backend.into(),
            name: config.name.as_str().into(),
            sid: AtomicU32::new(sid),
            addr: RwLock::new((config.addr, authority(config.addr))),
            weight: AtomicU32::new(config.weight),
            maxconn: AtomicU64::new(config.maxconn.unwrap_or(0) as u64),
            admin: AtomicU8::new(0),
            health: Health::new(&config.check),
            counters: Counters::default(),
            slots: Arc::new(Semaphore::new(
                config.maxconn.unwrap_or(Semaphore::MAX_PERMITS),
            )),
            sessions: Mutex::new(CancellationToken::new()),
            retired: CancellationToken::new(),
            last_change: Mutex::new(Changes {
                at: Instant::now(),
                down_since: None,
                down_total: std::time::Duration::ZERO,
            }),
            config: ArcSwap::from_pointee(config),
            checker: AtomicBool::new(false),
            check_changed: tokio::sync::Notify::new(),
            load_hook: ArcSwapOption::empty(),
        }
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// The server's config for a short read, without taking a reference.
    pub fn config_peek(&self) -> arc_swap::Guard<Arc<ServerConfig>> {
        self.config.load()
    }

    /// The address the server was configured with (the key a reload matches on).
    pub fn config_addr(&self) -> SocketAddr {
        self.config.load().addr
    }

    pub fn is_backup(&self) -> bool {
        self.config.load().backup
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr.read().0
    }

    /// [`Self::addr`] as a URI authority (`None` only if it does not parse, which a socket
    /// address always does).
    pub fn authority(&self) -> Option<http::uri::Authority> {
        self.addr.read().1.clone()
    }

    pub fn set_addr(&self, _: &Writer, addr: SocketAddr) {
        *self.addr.write() = (addr, authority(addr));
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, _: &Writer, w: u32) {
        self.weight.store(w, Relaxed);
        crate::balance::servers_changed();
    }

    /// 0 means no limit.
    pub fn maxconn(&self) -> u64 {
        self.maxconn.load(Relaxed)
    }

    /// Changes maxconn (0: no limit). Lowering it below the live count takes effect as
    /// connections close.
    pub fn set_maxconn(&self, _: &Writer, n: u64) -> Result<(), String> {
        let limit = |m: u64| {
            if m == 0 {
                Semaphore::MAX_PERMITS
            } else {
                m as usize
            }
        };
        if n > 1_000_000 {
            return Err("Invalid maxconn: at most 1000000.".into());
        }
        let old = self.maxconn.swap(n, Relaxed);
        resize_semaphore(&self.slots, limit(old), limit(n));
        Ok(())
    }

    /// Applies a new config to a server a reload keeps: an explicit config change of weight
    /// or maxconn wins over a runtime one; health state is kept.
    pub fn update_config(&self, w: &Writer, new: ServerConfig) {
        let old = self.config();
        if old.weight != new.weight {
            self.set_weight(w, new.weight);
        }
        if old.maxconn != new.maxconn {
            let _ = self.set_maxconn(w, new.maxconn.unwrap_or(0) as u64);
        }
        if (old.check.rise, old.check.fall) != (new.check.rise, new.check.fall) {
            self.health.set_rise_fall(w, new.check.rise, new.check.fall);
        }
        if (old.check.kind == CheckType::None) != (new.check.kind == CheckType::None) {
            self.health
                .set_enabled(w, new.check.kind != CheckType::None);
        }
        let check_changed = old.check != new.check;
        self.config.store(Arc::new(new));
        crate::balance::servers_changed();
        if check_changed {
            self.check_changed.notify_one();
        }
    }

    /// A connection to it started: counted, and its least-connections balancer told.
    pub fn connection_started(&self) {
        self.counters.connection_started();
        self.load_changed();
    }

    /// A connection to it ended.
    pub fn connection_ended(&self) {
        self.counters.connection_ended();
        self.load_changed();
    }

    fn load_changed(&self) {
        if let Some(hook) = &*self.load_hook.load() {
            hook.load_changed(self);
        }
    }

    /// The balancer its connection counts report to (set by [`crate::balance::Balancer`]).
    pub fn set_load_hook(&self, hook: Option<crate::balance::LoadHook>) {
        self.load_hook.store(hook.map(Arc::new));
    }

    /// Whether a checker task is running for this server.
    pub fn checker_running(&self) -> bool {
        self.checker.load(Relaxed)
    }

    pub fn set_checker_running(&self, on: bool) {
        self.checker.store(on, Relaxed);
    }

    /// The state all sources together put the server in.
    pub fn admin_state(&self) -> AdminState {
        self.admin_flags().effective()
    }

    /// Every source's flag (see [`AdminFlags`]).
    pub fn admin_flags(&self) -> AdminFlags {
        AdminFlags(self.admin.load(Relaxed))
    }

    /// Sets the operator's word, leaving other sources' flags alone; returns the state
    /// before and after.
    pub fn set_operator_state(&self, w: &Writer, s: AdminState) -> (AdminState, AdminState) {
        self.update_flags(w, |f| f.with_operator(s))
    }

    /// Sets or clears discovery's drain (a terminating pod), leaving the operator's alone.
    pub fn set_discovery_drain(&self, w: &Writer, on: bool) -> (AdminState, AdminState) {
        self.update_flags(w, |f| f.with_discovery_drain(on))
    }

    fn update_flags(
        &self,
        _: &Writer,
        f: impl Fn(AdminFlags) -> AdminFlags,
    ) -> (AdminState, AdminState) {
        let old = self
            .admin
            .fetch_update(Relaxed, Relaxed, |v| Some(f(AdminFlags(v)).0))
            .map(AdminFlags)
            .unwrap_or_default();
        let (before, after) = (old.effective(), f(old).effective());
        if before != after {
            self.touch_last_change();
            crate::balance::servers_changed();
        }
        (before, after)
    }

    /// Records a change of state now (called after the change).
    pub(crate) fn touch_last_change(&self) {
        let now = Instant::now();
        let down = self.is_down();
        let mut c = self.last_change.lock();
        c.at = now;
        if let Some(since) = c.down_since.take() {
            c.down_total += now - since;
        }
        c.down_since = down.then_some(now);
    }

    /// Not taking traffic: DOWN by its checks, or in MAINT (HAProxy's `downtime` counts both).
    fn is_down(&self) -> bool {
        !self.health.is_up() || self.admin_state() == AdminState::Maint
    }

    pub fn since_last_change(&self) -> std::time::Duration {
        self.last_change.lock().at.elapsed()
    }

    /// Total time spent DOWN or in MAINT since the server was created (`downtime`).
    pub fn downtime(&self) -> std::time::Duration {
        let c = self.last_change.lock();
        // A server that has been down since it was created counts from then.
        let current = match c.down_since {
            Some(since) => since.elapsed(),
            None if self.is_down() => c.at.elapsed(),
            None => std::time::Duration::ZERO,
        };
        c.down_total + current
    }

    /// May take a client that is not pinned anywhere.
    pub fn takes_new_clients(&self) -> bool {
        self.admin_state() == AdminState::Ready
            && self.health.is_up()
            && !self.health.stopping()
            && self.weight() > 0
            && !self.retired.is_cancelled()
    }

    /// May take a client already pinned to it: DRAIN still does, MAINT and DOWN do not.
    pub fn takes_pinned_clients(&self) -> bool {
        self.admin_state() != AdminState::Maint && self.health.is_up()
    }

    /// A token that live connections watch; `shutdown_sessions` cancels it.
    pub fn sessions_token(&self) -> CancellationToken {
        self.sessions.lock().clone()
    }

    /// Closes every live connection to this server (HAProxy `shutdown sessions server`).
    pub fn shutdown_sessions(&self, _: &Writer) {
        let old = std::mem::take(&mut *self.sessions.lock());
        old.cancel();
    }

    /// The status word of `show stat`: UP, DOWN, DRAIN, MAINT, "UP 1/3", "no check".
    pub fn status(&self) -> String {
        match self.admin_state() {
            AdminState::Maint => "MAINT".into(),
            AdminState::Drain if self.health.is_up() => "DRAIN".into(),
            _ if self.health.is_up() && self.health.stopping() => "NOLB".into(),
            _ if !self.health.enabled() => "no check".into(),
            _ => self.health.describe(),
        }
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} ({})", self.backend, self.name, self.addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckConfig;

    const W: Writer = Writer::FOR_TESTS;

    fn health(init: InitState) -> Health {
        Health::new(&CheckConfig {
            init_state: init,
            rise: 2,
            fall: 3,
            ..CheckConfig::default()
        })
    }

    fn ok() -> LastCheck {
        LastCheck {
            status: CheckStatus::L4Ok,
            duration_ms: Some(0),
            desc: String::new(),
        }
    }

    fn fail() -> LastCheck {
        LastCheck {
            status: CheckStatus::L4Con,
            duration_ms: Some(0),
            desc: "refused".into(),
        }
    }

    #[test]
    fn fall_three_rise_two() {
        let h = health(InitState::FullyUp);
        assert_eq!(h.describe(), "UP");
        assert_eq!(h.record(&W, fail()), Transition::None);
        assert_eq!(h.describe(), "UP 2/3");
        assert_eq!(h.record(&W, fail()), Transition::None);
        assert_eq!(h.describe(), "UP 1/3");
        assert_eq!(h.record(&W, fail()), Transition::WentDown);
        assert_eq!(h.describe(), "DOWN");
        assert!(!h.is_up());
        assert_eq!(h.record(&W, ok()), Transition::None);
        assert_eq!(h.describe(), "DOWN 1/2");
        assert_eq!(h.record(&W, ok()), Transition::WentUp);
        assert_eq!(h.describe(), "UP");
        // A success in between resets the fall count.
        h.record(&W, fail());
        h.record(&W, ok());
        assert_eq!(h.describe(), "UP");
    }

    #[test]
    fn init_states() {
        let h = health(InitState::Up);
        assert!(h.is_up());
        assert_eq!(h.record(&W, fail()), Transition::WentDown);
        let h = health(InitState::Down);
        assert!(!h.is_up());
        assert_eq!(h.record(&W, ok()), Transition::WentUp);
        let h = health(InitState::FullyDown);
        assert_eq!(h.record(&W, ok()), Transition::None);
        assert_eq!(h.record(&W, ok()), Transition::WentUp);
    }
}
