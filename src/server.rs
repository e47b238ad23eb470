//! A backend server and the live state that belongs to it: counters, health (rise/fall),
//! admin state (READY, DRAIN, MAINT) and the handle that closes its sessions.
//!
//! A `Server` outlives config snapshots: a reload that keeps a server (same backend, name and
//! address) hands the same `Arc<Server>` to the new snapshot, so nothing about it is lost.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{CheckConfig, CheckType, InitState, ServerConfig};

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
    fn from_u8(v: u8) -> Self {
        match v {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
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
            CheckStatus::L7Ok => "L7OK",
            CheckStatus::L7Tout => "L7TOUT",
            CheckStatus::L7Rsp => "L7RSP",
            CheckStatus::L7Sts => "L7STS",
        }
    }

    pub fn is_ok(self) -> bool {
        matches!(self, CheckStatus::L4Ok | CheckStatus::L7Ok)
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
    last: Mutex<LastCheck>,
    /// Last version string a Spark check reported.
    pub spark_version: Mutex<Option<String>>,
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

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Relaxed);
    }

    /// Applies one check result; only the checker task of this server calls it.
    pub fn record(&self, result: LastCheck) -> Transition {
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
        *self.last.lock().unwrap() = result;
        match (was_up, next >= rise) {
            (false, true) => Transition::WentUp,
            (true, false) => Transition::WentDown,
            _ => Transition::None,
        }
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
    pub fn set_rise_fall(&self, rise: u32, fall: u32) {
        let was_up = self.is_up();
        self.rise.store(rise, Relaxed);
        self.fall.store(fall, Relaxed);
        let c = if was_up { rise + fall - 1 } else { 0 };
        self.counter.store(c, Relaxed);
    }

    pub fn last(&self) -> LastCheck {
        self.last.lock().unwrap().clone()
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
}

impl Counters {
    pub fn connection_started(&self) {
        let cur = self.cur.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(cur, Relaxed);
        self.total.fetch_add(1, Relaxed);
    }

    pub fn connection_ended(&self) {
        self.cur.fetch_sub(1, Relaxed);
    }
}

pub struct Server {
    pub id: ServerId,
    pub backend: Arc<str>,
    pub name: Arc<str>,
    /// Position in its backend, 1-based (HAProxy's `sid`); may change on reload.
    pub sid: AtomicU32,
    addr: RwLock<SocketAddr>,
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
    /// When the state last changed (UP/DOWN or admin), for `lastchg`.
    last_change: Mutex<Instant>,
    checker: AtomicBool,
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

impl Server {
    pub fn new(id: ServerId, backend: &str, sid: u32, config: ServerConfig) -> Self {
        Server {
            id,
            backend: backend.into(),
            name: config.name.as_str().into(),
            sid: AtomicU32::new(sid),
            addr: RwLock::new(config.addr),
            weight: AtomicU32::new(config.weight),
            maxconn: AtomicU64::new(config.maxconn.unwrap_or(0) as u64),
            admin: AtomicU8::new(AdminState::Ready as u8),
            health: Health::new(&config.check),
            counters: Counters::default(),
            slots: Arc::new(Semaphore::new(
                config.maxconn.unwrap_or(Semaphore::MAX_PERMITS),
            )),
            sessions: Mutex::new(CancellationToken::new()),
            retired: CancellationToken::new(),
            last_change: Mutex::new(Instant::now()),
            config: ArcSwap::from_pointee(config),
            checker: AtomicBool::new(false),
        }
    }

    pub fn config(&self) -> Arc<ServerConfig> {
        self.config.load_full()
    }

    /// The address the server was configured with (the key a reload matches on).
    pub fn config_addr(&self) -> SocketAddr {
        self.config.load().addr
    }

    pub fn is_backup(&self) -> bool {
        self.config.load().backup
    }

    pub fn set_config(&self, config: ServerConfig) {
        self.config.store(Arc::new(config));
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addr.read().unwrap()
    }

    pub fn set_addr(&self, addr: SocketAddr) {
        *self.addr.write().unwrap() = addr;
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Relaxed);
    }

    /// 0 means no limit.
    pub fn maxconn(&self) -> u64 {
        self.maxconn.load(Relaxed)
    }

    /// Changes maxconn (0: no limit). Lowering it below the live count takes effect as
    /// connections close.
    pub fn set_maxconn(&self, n: u64) -> Result<(), String> {
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
    pub fn update_config(&self, new: ServerConfig) {
        let old = self.config();
        if old.weight != new.weight {
            self.set_weight(new.weight);
        }
        if old.maxconn != new.maxconn {
            let _ = self.set_maxconn(new.maxconn.unwrap_or(0) as u64);
        }
        if (old.check.rise, old.check.fall) != (new.check.rise, new.check.fall) {
            self.health.set_rise_fall(new.check.rise, new.check.fall);
        }
        if (old.check.kind == CheckType::None) != (new.check.kind == CheckType::None) {
            self.health.set_enabled(new.check.kind != CheckType::None);
        }
        self.set_config(new);
    }

    /// Whether a checker task is running for this server.
    pub fn checker_running(&self) -> bool {
        self.checker.load(Relaxed)
    }

    pub fn set_checker_running(&self, on: bool) {
        self.checker.store(on, Relaxed);
    }

    pub fn admin_state(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Relaxed))
    }

    pub fn set_admin_state(&self, s: AdminState) {
        if self.admin.swap(s as u8, Relaxed) != s as u8 {
            self.touch_last_change();
        }
    }

    pub fn touch_last_change(&self) {
        *self.last_change.lock().unwrap() = Instant::now();
    }

    pub fn since_last_change(&self) -> std::time::Duration {
        self.last_change.lock().unwrap().elapsed()
    }

    /// May take a client that is not pinned anywhere.
    pub fn takes_new_clients(&self) -> bool {
        self.admin_state() == AdminState::Ready
            && self.health.is_up()
            && self.weight() > 0
            && !self.retired.is_cancelled()
    }

    /// May take a client already pinned to it: DRAIN still does, MAINT and DOWN do not.
    pub fn takes_pinned_clients(&self) -> bool {
        self.admin_state() != AdminState::Maint && self.health.is_up()
    }

    /// A token that live connections watch; `shutdown_sessions` cancels it.
    pub fn sessions_token(&self) -> CancellationToken {
        self.sessions.lock().unwrap().clone()
    }

    /// Closes every live connection to this server (HAProxy `shutdown sessions server`).
    pub fn shutdown_sessions(&self) {
        let old = std::mem::take(&mut *self.sessions.lock().unwrap());
        old.cancel();
    }

    /// The status word of `show stat`: UP, DOWN, DRAIN, MAINT, "UP 1/3", "no check".
    pub fn status(&self) -> String {
        match self.admin_state() {
            AdminState::Maint => "MAINT".into(),
            AdminState::Drain if self.health.is_up() => "DRAIN".into(),
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
        assert_eq!(h.record(fail()), Transition::None);
        assert_eq!(h.describe(), "UP 2/3");
        assert_eq!(h.record(fail()), Transition::None);
        assert_eq!(h.describe(), "UP 1/3");
        assert_eq!(h.record(fail()), Transition::WentDown);
        assert_eq!(h.describe(), "DOWN");
        assert!(!h.is_up());
        assert_eq!(h.record(ok()), Transition::None);
        assert_eq!(h.describe(), "DOWN 1/2");
        assert_eq!(h.record(ok()), Transition::WentUp);
        assert_eq!(h.describe(), "UP");
        // A success in between resets the fall count.
        h.record(fail());
        h.record(ok());
        assert_eq!(h.describe(), "UP");
    }

    #[test]
    fn init_states() {
        let h = health(InitState::Up);
        assert!(h.is_up());
        assert_eq!(h.record(fail()), Transition::WentDown);
        let h = health(InitState::Down);
        assert!(!h.is_up());
        assert_eq!(h.record(ok()), Transition::WentUp);
        let h = health(InitState::FullyDown);
        assert_eq!(h.record(ok()), Transition::None);
        assert_eq!(h.record(ok()), Transition::WentUp);
    }
}
