//! The configuration: TOML in, a validated [`Config`] out. This file holds the typed model;
//! [`load`] (in `config/load.rs`) reads the file, walks it with [`reader`] (which knows every
//! allowed key and reports every error with file, line and field), applies `[defaults]`, and
//! checks cross-references. Everything downstream holds typed values (`Duration`,
//! `SocketAddr`, enums), never strings.

pub mod diff;
mod load;
pub mod reader;
pub mod security;
pub mod selector;

pub use load::{check_state_file, is_dns_label, load, parent_dir, parse};

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use reader::ConfigError;
pub use security::{
    AuthConfig, ClaimNames, ClientVerify, IdentityFrom, JwtConfig, KeySource, OidcSource, Secret,
    ServerTlsConfig, TlsConfig,
};

/// A config that failed to load: every error found, in file order.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ConfigError>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub source: PathBuf,
    pub global: Global,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Global {
    /// Most connections sclb holds at once; more wait in the kernel's accept queue.
    pub maxconn: usize,
    pub log: LogConfig,
    /// On SIGTERM, how long live connections may go on before they are cut.
    pub hard_stop_after: Duration,
    pub admin: Option<AdminConfig>,
    pub stats: Option<StatsConfig>,
    pub state_file: Option<PathBuf>,
    /// Move bytes with `splice(2)` (zero-copy) rather than through user-space buffers.
    pub splice: bool,
    /// `user`/`group`: drop root for this identity after binding.
    pub run_as: Option<RunAs>,
    /// Worker threads serving connections; 0: one per CPU.
    pub threads: usize,
    /// Where gateway sessions live beyond this process (`[global] store`).
    pub store: StoreConfig,
}

/// `[global] store`: `memory` keeps sessions in this process (and its state file); `postgres`
/// shares them between sclb processes through a PostgreSQL-compatible database; `kubernetes`
/// through the API server (driver objects and Leases).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum StoreConfig {
    #[default]
    Memory,
    Postgres(PostgresStore),
    Kubernetes(KubernetesStore),
}

/// `store = { kind = "kubernetes", ... }`: sessions recorded as Kubernetes objects.
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesStore {
    /// Where session Leases and the reaper's Lease live.
    pub namespace: String,
    /// The name of the reaper's Lease (one replica at a time reaps).
    pub lease: String,
    /// How long the reaper's Lease holds without renewal.
    pub lease_duration: Duration,
    /// A kubeconfig file; `None`: the in-cluster service account, then `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// A session's last activity is written at most this often.
    pub activity_interval: Duration,
    /// A driver labelled managed-by=sclb that no session owns is deleted this long after its
    /// creation.
    pub orphan_grace: Duration,
    /// How often activity and ends are written and the watch applied to the registry.
    pub sync_interval: Duration,
}

#[derive(Clone, PartialEq)]
pub struct PostgresStore {
    /// A libpq connection string or `postgres://` URL (without the password, best).
    pub url: String,
    /// A file holding the password (a Kubernetes Secret, an EMR secret file).
    pub password_file: Option<PathBuf>,
    /// The CA bundle that verifies the database's certificate (`sslmode=require` in `url`);
    /// without it, the system's roots.
    pub ca: Option<PathBuf>,
    /// Most time one statement may take before the store counts as unreachable.
    pub timeout: Duration,
    /// How often activity is written and other replicas' ends are read.
    pub sync_interval: Duration,
}

/// Never prints the connection string: it may carry a password.
impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("password_file", &self.password_file)
            .field("ca", &self.ca)
            .field("timeout", &self.timeout)
            .field("sync_interval", &self.sync_interval)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub path: PathBuf,
    pub mode: u32,
    pub level: AdminLevel,
    /// Owner of the socket file (HAProxy's `user`/`group` on `stats socket`).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// The unprivileged identity sclb switches to once its sockets are bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// HAProxy's socket levels, least to most powerful.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AdminLevel {
    User,
    Operator,
    Admin,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatsConfig {
    pub bind: SocketAddr,
    /// When set, HTTP admin actions require `Authorization: Bearer <token>`.
    pub admin_token: Option<String>,
    /// Auto-refresh period of the HTML page.
    pub refresh: Duration,
    /// Most connections the stats listener holds at once; more wait in its accept queue.
    pub maxconn: usize,
    /// Time a stats client has to send a request's headers, and the most a kept-alive
    /// connection may sit idle.
    pub timeout: Duration,
    /// What `/metrics` calls its families (`metric_names`).
    pub metric_names: MetricNames,
}

/// `stats.metric_names`: `"sclb"` (every family `sclb_*`, the default) or `"haproxy"`
/// (HAProxy's own exporter's exact `haproxy_*` names for the families it has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetricNames {
    #[default]
    Sclb,
    Haproxy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Frontend {
    pub name: String,
    pub binds: Vec<SocketAddr>,
    pub backend: String,
    pub maxconn: Option<usize>,
    /// Inactivity allowed on the client side (HAProxy `timeout client`).
    pub timeout_client: Duration,
    /// Gateway: time a new connection has to send its first request, and an RPC its first
    /// message (HAProxy `timeout http-request`).
    pub timeout_http_request: Duration,
    pub backlog: u32,
    /// `mode = "grpc"`: the Spark Connect gateway (HTTP/2, routed by Spark session).
    /// `None`: `mode = "tcp"`, the L4 splice proxy routed by client IP.
    pub grpc: Option<GrpcConfig>,
    /// `tls = { cert, key, ... }`: sclb terminates TLS (and mTLS) on this frontend.
    pub tls: Option<TlsConfig>,
    /// `accept_proxy`, `allow`, `deny`: source networks.
    pub access: Access,
}

/// Which source networks a frontend takes clients and PROXY headers from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Peers that must (and only they may) send a PROXY protocol header first.
    pub accept_proxy: Vec<ipnet::IpNet>,
    /// When not empty, only clients in these networks are served.
    pub allow: Vec<ipnet::IpNet>,
    /// Clients in these networks are refused (before `allow`).
    pub deny: Vec<ipnet::IpNet>,
}

/// A gateway frontend's session settings (`[frontend.sessions]`).
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcConfig {
    /// A session with no message either way for this long is closed.
    pub idle_timeout: Duration,
    /// A session older than this is closed, busy or not.
    pub max_ttl: Duration,
    /// How often idle and over-age sessions are looked for.
    pub cleanup_interval: Duration,
    /// Most sessions the registry holds; a new session beyond it gets RESOURCE_EXHAUSTED.
    pub max_sessions: usize,
    /// Most live sessions one client (its [`crate::gateway::ClientKey`]) may hold.
    pub max_per_client: usize,
    /// New sessions one client may open per second (with a burst of as many).
    pub rate_per_client: u32,
    /// Request headers that route a session (`[frontend.route]`).
    pub route: RouteHeaders,
    /// Create a driver per new session (`[frontend.on_demand]`).
    pub on_demand: Option<OnDemand>,
    /// `auth = { type = "static" | "jwt", ... }`: every RPC must carry a valid token.
    pub auth: Option<AuthConfig>,
}

/// Header names (lowercase) the gateway routes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteHeaders {
    /// Names the SparkConnect/SparkApplication (or server) to route to.
    pub session: String,
    pub namespace: String,
    pub team: String,
    pub environment: String,
}

impl Default for RouteHeaders {
    fn default() -> Self {
        RouteHeaders {
            session: "x-spark-session-id".into(),
            namespace: "x-spark-namespace".into(),
            team: "x-spark-team".into(),
            environment: "x-spark-environment".into(),
        }
    }
}

/// On-demand drivers: a new Spark session without a routing header gets its own SparkConnect
/// (or SparkApplication), created from `template` in the backend's Kubernetes cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct OnDemand {
    /// A YAML manifest; `{name}`, `{namespace}`, `{team}`, `{environment}` are filled in.
    pub template: PathBuf,
    /// Pattern of the object's name; `{random}` is 8 random characters.
    pub name: String,
    /// Pattern of its namespace.
    pub namespace: String,
    /// How long the session's first RPC waits for the driver to be ready.
    pub ready_timeout: Duration,
    pub max_sessions_per_team: Option<usize>,
    /// Team and environment when the client sends none.
    pub default_team: Option<String>,
    pub default_environment: Option<String>,
    /// A warm pool of Ready drivers that new sessions claim (`on_demand.pool`).
    pub pool: Option<Pool>,
}

impl OnDemand {
    /// The namespace where the pool's drivers of (team, environment) wait: a pool's namespace
    /// pattern holds no `{random}` nor `{session}` (checked at load).
    pub fn pool_namespace(&self, team: &str, environment: &str) -> String {
        self.namespace
            .replace("{team}", team)
            .replace("{environment}", environment)
    }
}

/// `on_demand.pool`: drivers kept Ready and unclaimed, per (team, environment).
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// Ready (or starting) unclaimed drivers kept per (team, environment).
    pub min_ready: usize,
    /// Most unclaimed drivers per (team, environment); the oldest beyond it are retired.
    pub max_ready: usize,
    /// Unclaimed drivers older than this are retired (and replaced).
    pub max_age: Duration,
    /// The (team, environment) pairs that have a pool.
    pub teams: Vec<(String, String)>,
    /// The query run on each new driver before it is offered (`None`: offered once Ready).
    pub warm_up: Option<WarmUp>,
}

/// `on_demand.pool.warm_up`: a fresh Spark driver is a cold JVM whose first query takes
/// seconds; the pool runs this throwaway query on each new driver (in a session of its own,
/// released after) before any session may claim it.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmUp {
    /// Spark SQL, collected and dropped. The default runs a small job (an aggregate over a
    /// shuffle), as a first query does: `SELECT 1` would leave job scheduling and code
    /// generation cold.
    pub query: String,
    /// A warm-up not answered within this fails: the driver is retired and replaced.
    pub timeout: Duration,
    /// How many sessions run the query, one after the other: a JVM's code paths get
    /// compiled as they are used, and a claimed driver's first session comes after these.
    pub runs: u32,
}

impl Default for WarmUp {
    fn default() -> Self {
        WarmUp {
            query: "SELECT count(*) FROM range(1000)".into(),
            timeout: Duration::from_secs(120),
            runs: 3,
        }
    }
}

/// A quarter of `sessions.max` by default: one client (a runaway script, a hostile peer) can
/// never hold every slot, and a busy NAT still gets plenty.
pub fn default_max_per_client(max_sessions: usize) -> usize {
    max_sessions.div_ceil(4).max(1)
}

/// New sessions per second one client may open by default: far above what a notebook or a CI
/// runner creates, far below what fills `sessions.max` in a blink.
pub const DEFAULT_RATE_PER_CLIENT: u32 = 20;

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            idle_timeout: Duration::from_secs(30 * 60),
            max_ttl: Duration::from_secs(4 * 3600),
            cleanup_interval: Duration::from_secs(60),
            max_sessions: 100_000,
            max_per_client: default_max_per_client(100_000),
            rate_per_client: DEFAULT_RATE_PER_CLIENT,
            route: RouteHeaders::default(),
            on_demand: None,
            auth: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastConn,
    /// Consistent hash of the client's IP.
    Source,
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "roundrobin",
            Balance::LeastConn => "leastconn",
            Balance::Source => "source",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StickConfig {
    pub expire: Duration,
    pub size: usize,
    /// `store = "shared"`: pins are also kept in the `[global] store` (postgres), so that
    /// several sclb nodes pin each client address to the same server.
    pub shared: bool,
    pub on: StickOn,
}

/// What an L4 backend pins a client by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StickOn {
    /// The client's source IP.
    Src,
    /// The client certificate's identity (mTLS); its source IP when it has none.
    Identity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckType {
    Tcp,
    H2,
    Spark,
    None,
}

impl fmt::Display for CheckType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckType::Tcp => "tcp",
            CheckType::H2 => "h2",
            CheckType::Spark => "spark",
            CheckType::None => "none",
        })
    }
}

/// Where a server starts before its first check (HAProxy's `init-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitState {
    /// UP; every one of `fall` checks must fail to take it DOWN.
    FullyUp,
    /// UP; the first failed check takes it DOWN (HAProxy's and sclb's default).
    Up,
    /// DOWN; the first good check brings it UP.
    Down,
    /// DOWN; `rise` good checks bring it UP.
    FullyDown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckConfig {
    pub kind: CheckType,
    pub inter: Duration,
    /// Interval while a server is transitioning (between UP and DOWN).
    pub fastinter: Duration,
    /// Interval while a server is DOWN.
    pub downinter: Duration,
    pub rise: u32,
    pub fall: u32,
    pub timeout: Duration,
    /// Check this port instead of the server's.
    pub port: Option<u16>,
    /// Random jitter, as a fraction of the interval (0.0..=0.5).
    pub spread: f64,
    pub init_state: InitState,
    /// The backend's `backend_token`, sent by the spark probe (servers that require a token
    /// answer a probe without one UNAUTHENTICATED).
    pub token: Option<Secret>,
    /// The backend's `server_tls`: probes speak TLS to the server.
    pub tls: Option<crate::tls::client::ServerTls>,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            kind: CheckType::Tcp,
            inter: Duration::from_secs(2),
            fastinter: Duration::from_secs(2),
            downinter: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            timeout: Duration::from_secs(2),
            port: None,
            spread: 0.05,
            init_state: InitState::Up,
            token: None,
            tls: None,
        }
    }
}

/// What happens to a server's live connections when its checks mark it DOWN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMarkedDown {
    /// They go on; the server may still answer them.
    Keep,
    /// They are closed at once (HAProxy `on-marked-down shutdown-sessions`).
    ShutdownSessions,
}

/// What a backend does when every server is DOWN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDown {
    /// Try the servers anyway: the checks may be wrong, the servers may not.
    FailOpen,
    /// Close new connections at once.
    Reject,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    pub stick: Option<StickConfig>,
    pub servers: Vec<ServerConfig>,
    /// Extra connect attempts after the first one fails.
    pub retries: u32,
    /// Let the last retry go to another server (and re-pin the client there).
    pub redispatch: bool,
    pub timeout_connect: Duration,
    pub timeout_server: Duration,
    /// Inactivity allowed once both sides are connected; replaces client/server when set.
    pub timeout_tunnel: Option<Duration>,
    /// How long a client may wait for a slot on a full server.
    pub timeout_queue: Duration,
    pub on_marked_down: OnMarkedDown,
    pub all_down: AllDown,
    /// TCP keepalive on connections to servers (HAProxy `option srvtcpka`). Default: on when
    /// the idle timeout lets a connection sit idle past the first probe (see README).
    pub tcp_keepalive: bool,
    /// The backend's check settings (defaults merged), for servers that are discovered
    /// rather than listed.
    pub check: CheckConfig,
    /// Where servers come from besides `servers`: a Kubernetes watch.
    pub discovery: Option<KubernetesDiscovery>,
    /// `backend_token`: sent as `authorization: Bearer` to the servers (gateway RPCs and the
    /// spark health probe), for Spark started with `spark.connect.authenticate.token`.
    pub backend_token: Option<Secret>,
    /// `server_tls`: sclb speaks TLS to the servers (data, gateway and health checks).
    pub server_tls: Option<crate::tls::client::ServerTls>,
}

/// `[backend.discovery.kubernetes]`: the backend's servers also come from a Kubernetes watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesDiscovery {
    pub kind: KubernetesKind,
    /// The namespaces to watch; empty means every namespace.
    pub namespaces: Vec<String>,
    /// A label selector on the watched objects (`spark-role=driver,app in (a,b)`).
    pub selector: Option<String>,
    /// The Spark Connect port on each discovered address.
    pub port: PortRef,
    /// A kubeconfig file; `None`: the in-cluster service account, then `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
}

/// What a Kubernetes discovery source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubernetesKind {
    /// Pods that are Running and Ready, each a server named after the pod.
    Pods,
    /// `discovery.k8s.io/v1` EndpointSlices: ready endpoints, and serving terminating ones.
    EndpointSlices,
    /// spark-operator SparkApplications (v1beta2): each application's driver pod.
    SparkApplications,
    /// spark-operator SparkConnects (v1alpha1): `status.server.podIp` once Ready.
    SparkConnects,
}

impl fmt::Display for KubernetesKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KubernetesKind::Pods => "pods",
            KubernetesKind::EndpointSlices => "endpointslices",
            KubernetesKind::SparkApplications => "sparkapplications",
            KubernetesKind::SparkConnects => "sparkconnects",
        })
    }
}

/// A port by number, or by the name of a container port (an EndpointSlice port's name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(s) => f.write_str(s),
        }
    }
}

/// Spark Connect's own port, the default for discovered servers.
pub const SPARK_CONNECT_PORT: u16 = 15002;

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub name: String,
    /// Identity of a discovered server (a pod's uid); `None` for servers from the file. Two
    /// servers with the same name and address but different uids are different servers, so a
    /// recycled pod IP never inherits a dead pod's clients.
    pub uid: Option<String>,
    /// The address as written (a hostname is kept for display).
    pub addr_text: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub maxconn: Option<usize>,
    pub backup: bool,
    pub check: CheckConfig,
}

/// Largest weight a server can have, as in HAProxy.
pub const MAX_WEIGHT: u32 = 256;
