//! One typed snapshot of what sclb reports about itself: every frontend's, backend's and
//! server's counters and states, and the process facts of `show info`. [`Snapshot::take`]
//! reads the running state once per request (`read.rs`; [`InfoStats::take`] for `show info`
//! alone); renderers only format it: HAProxy's `show stat` CSV, `typed`, JSON and `show info`
//! ([`haproxy`], through the one column mapping in [`columns`]), the HTML page and Prometheus
//! `/metrics` ([`crate::web`]). `show servers state`, `show table` and `show sessions` print
//! live state directly ([`live`]). Nothing here changes state.

pub mod columns;
pub mod haproxy;
pub mod live;
mod read;
#[cfg(test)]
pub(crate) mod sample;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::AddAssign;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::config::Balance;
use crate::discovery::SourceStatus;
use crate::server::{AdminState, CheckStatus};

/// Everything a stats request shows, read at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub frontends: Vec<FrontendStats>,
    pub backends: Vec<BackendStats>,
    pub info: InfoStats,
}

/// What a proxy speaks, in HAProxy's words (`mode` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Tcp,
    /// HTTP/2: the gateway (`mode = "grpc"`) frontends.
    Http,
}

impl ProxyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyMode::Tcp => "tcp",
            ProxyMode::Http => "http",
        }
    }
}

/// A frontend's row.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontendStats {
    pub name: String,
    /// HAProxy's proxy id (`iid`): frontends, then backends, numbered from 1.
    pub proxy_id: usize,
    pub mode: ProxyMode,
    /// Live client connections (`scur`), the most at once (`smax`), the limit (`slim`).
    pub scur: u64,
    pub smax: u64,
    pub slim: u64,
    /// Client connections accepted (`stot`, `conn_tot`).
    pub stot: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Connections closed because no server could take them (`ereq`).
    pub denied: u64,
    /// Connections accepted per second over the last second, and the highest such rate.
    pub rate: u64,
    pub rate_max: u64,
    /// Not accepting: `disable frontend` paused it, or `shutdown frontend` closed it
    /// (`status` STOP, as HAProxy shows; OPEN otherwise).
    pub stopped: bool,
}

/// The traffic counters a server has and a backend sums, named after their `show stat`
/// columns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub qcur: u64,
    pub qmax: u64,
    pub scur: u64,
    pub smax: u64,
    pub stot: u64,
    /// Times the balancer chose the server.
    pub lbtot: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Failed connection attempts.
    pub econ: u64,
    /// Connections that died on a server error.
    pub eresp: u64,
    /// Retries.
    pub wretr: u64,
    /// Connections moved to another server after failing here.
    pub wredis: u64,
    /// Failed checks.
    pub chkfail: u64,
    /// UP to DOWN transitions.
    pub chkdown: u64,
    /// Connections per second over the last second, and the highest such rate.
    pub rate: u64,
    pub rate_max: u64,
    /// Averages over the last 1024 connections, in ms: queue wait, connect, whole connection;
    /// and the longest of each.
    pub qtime: u64,
    pub ctime: u64,
    pub ttime: u64,
    pub qtime_max: u64,
    pub ctime_max: u64,
    pub ttime_max: u64,
}

impl AddAssign for Counters {
    fn add_assign(&mut self, o: Counters) {
        // Averages weighted by the connections each side has had.
        let avg = |a: u64, b: u64| {
            (a * self.stot + b * o.stot)
                .checked_div(self.stot + o.stot)
                .unwrap_or(0)
        };
        self.qtime = avg(self.qtime, o.qtime);
        self.ctime = avg(self.ctime, o.ctime);
        self.ttime = avg(self.ttime, o.ttime);
        self.qtime_max = self.qtime_max.max(o.qtime_max);
        self.ctime_max = self.ctime_max.max(o.ctime_max);
        self.ttime_max = self.ttime_max.max(o.ttime_max);
        self.rate += o.rate;
        self.rate_max = self.rate_max.max(o.rate_max);
        self.qcur += o.qcur;
        self.qmax += o.qmax;
        self.scur += o.scur;
        self.smax += o.smax;
        self.stot += o.stot;
        self.lbtot += o.lbtot;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.econ += o.econ;
        self.eresp += o.eresp;
        self.wretr += o.wretr;
        self.wredis += o.wredis;
        self.chkfail += o.chkfail;
        self.chkdown += o.chkdown;
    }
}

/// A server's status as `show stat` words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStatus {
    /// "UP": checks pass.
    Up,
    /// "UP 1/3": UP, failing checks; `left` more failures of `fall` take it DOWN.
    GoingDown { left: u32, fall: u32 },
    /// "DOWN".
    Down,
    /// "DOWN 1/2": DOWN, `passed` of the `rise` successful checks it needs.
    GoingUp { passed: u32, rise: u32 },
    /// "NOLB": UP, forced "stopping" by the operator: pinned clients only.
    Nolb,
    /// "no check": UP, checks are off.
    NoCheck,
    /// "DRAIN": set by the operator or discovery; keeps its pinned clients.
    Drain,
    /// "MAINT": no traffic.
    Maint,
    /// "DRAIN (removed)": a reload removed it; shown until its last connection ends.
    Removed,
}

impl fmt::Display for ServerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerStatus::Up => f.write_str("UP"),
            ServerStatus::GoingDown { left, fall } => write!(f, "UP {left}/{fall}"),
            ServerStatus::Down => f.write_str("DOWN"),
            ServerStatus::GoingUp { passed, rise } => write!(f, "DOWN {passed}/{rise}"),
            ServerStatus::Nolb => f.write_str("NOLB"),
            ServerStatus::NoCheck => f.write_str("no check"),
            ServerStatus::Drain => f.write_str("DRAIN"),
            ServerStatus::Maint => f.write_str("MAINT"),
            ServerStatus::Removed => f.write_str("DRAIN (removed)"),
        }
    }
}

/// A backend is UP while a server can take its pinned clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendStatus {
    Up,
    Down,
}

impl BackendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendStatus::Up => "UP",
            BackendStatus::Down => "DOWN",
        }
    }
}

/// The last health check of a server whose checks are on.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckStats {
    pub status: CheckStatus,
    pub duration: Option<Duration>,
    /// Free text: the error, or what the server said.
    pub desc: String,
    pub rise: u32,
    pub fall: u32,
}

/// A server's row.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerStats {
    pub name: String,
    /// Position in its backend, 1-based (`sid`).
    pub sid: u32,
    pub addr: SocketAddr,
    pub status: ServerStatus,
    pub admin: AdminState,
    /// UP as far as checks know (always, with checks off).
    pub up: bool,
    pub backup: bool,
    /// Removed by a reload, still carrying connections.
    pub leaving: bool,
    pub weight: u32,
    /// `None`: no limit.
    pub maxconn: Option<u64>,
    pub counters: Counters,
    /// Since the state last changed (`lastchg`).
    pub last_change: Duration,
    /// Time spent DOWN or in MAINT (`downtime`).
    pub downtime: Duration,
    /// `None`: checks are off.
    pub check: Option<CheckStats>,
    /// What the last Spark check reported.
    pub spark_version: Option<String>,
    /// Clients pinned to it in its backend's stick table.
    pub pinned: usize,
}

impl ServerStats {
    /// May take clients pinned to it (DRAIN still does, MAINT and DOWN do not), and counts
    /// among its backend's active or backup servers.
    pub fn usable(&self) -> bool {
        !self.leaving && self.admin != AdminState::Maint && self.up
    }
}

/// A backend's stick table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StickStats {
    pub used: usize,
    pub size: usize,
    pub expire: Duration,
}

/// The last client moved off its server.
#[derive(Debug, Clone, PartialEq)]
pub struct LastRepin {
    pub client: IpAddr,
    /// `None`: the server is no longer in the backend.
    pub from: Option<String>,
    pub to: Option<String>,
    pub ago: Duration,
}

impl fmt::Display for LastRepin {
    /// `10.0.0.7 sc1->sc2 12s ago`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |n: &Option<String>| n.clone().unwrap_or_else(|| "removed".into());
        write!(
            f,
            "{} {}->{} {}s ago",
            self.client,
            name(&self.from),
            name(&self.to),
            self.ago.as_secs()
        )
    }
}

/// A backend's row and its servers (config order, then the leaving ones).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStats {
    pub name: String,
    /// HAProxy's proxy id (`iid`).
    pub proxy_id: usize,
    pub balance: Balance,
    pub servers: Vec<ServerStats>,
    /// Sums over every server, leaving ones included.
    pub totals: Counters,
    pub status: BackendStatus,
    /// Usable active and backup servers (`act`, `bck`), and the active ones' weight.
    pub active: usize,
    pub backups: usize,
    pub weight: u64,
    /// The global maxconn (`slim`).
    pub slim: u64,
    pub stick: Option<StickStats>,
    /// Clients moved off a DOWN or MAINT server.
    pub repins: u64,
    pub last_repin: Option<LastRepin>,
}

/// `show info`: HAProxy's process facts, then sclb's.
#[derive(Debug, Clone)]
pub struct InfoStats {
    pub version: &'static str,
    pub pid: u32,
    /// Data-plane threads (`Nbthread`).
    pub nbthread: usize,
    /// The host name (`node`).
    pub node: String,
    /// Most connections the file descriptor limit leaves room for (`Hard_maxconn`).
    pub hard_maxconn: u64,
    /// splice(2) pipes: the most allowed, those carrying data, those idle in the pools.
    pub max_pipes: u64,
    pub pipes_used: u64,
    pub pipes_free: u64,
    /// Client connections accepted per second over the last second, and the highest rate.
    pub conn_rate: u64,
    pub max_conn_rate: u64,
    /// Tasks alive in every runtime, and tasks waiting in their queues.
    pub tasks: u64,
    pub run_queue: u64,
    /// Percent of the last interval the process's threads did not spend on the CPU.
    pub idle_pct: u64,
    /// Bytes sent to clients, over every frontend (`TotalBytesOut`).
    pub bytes_out: u64,
    pub started: SystemTime,
    pub uptime: Duration,
    /// The soft file descriptor limit.
    pub ulimit_n: u64,
    /// The global maxconn, as the file descriptor limit allows.
    pub maxconn: u64,
    /// Live client connections and connections ever accepted, over every frontend.
    pub curr_conns: u64,
    pub cum_conns: u64,
    pub stopping: bool,
    pub listeners: usize,
    pub config_file: PathBuf,
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_reload_error: Option<String>,
    /// Log lines dropped because the log writer could not keep up (metrics only).
    pub log_dropped: u64,
    pub repins: u64,
    /// Each backend's discovery source.
    pub discovery: BTreeMap<String, SourceStatus>,
}
