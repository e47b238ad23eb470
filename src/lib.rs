//! sclb: an L4 load balancer for Apache Spark Connect, in HAProxy's terms.
//!
//! Module map, along the data path:
//! - [`config`]: TOML file → validated [`config::Config`] (every error with file:line and field).
//! - [`state`]: the running snapshot of frontends and backends behind one `ArcSwap`; live state
//!   (servers, stick tables) carried across reloads by stable keys.
//! - [`frontend`]: listeners and accept loops, maxconn.
//! - [`forward`]: one connection — pick (stick table, then [`balance`]), connect with retries,
//!   [`pipe`] both ways, log.
//! - [`server`], [`stick_table`]: a server's counters/health/admin state; client IP → server pins.
//! - [`health`]: a checker task per server (tcp, h2, spark probes) driving rise/fall.
//! - [`control`]: the one writer of live state — operator commands, reloads, discovery
//!   updates, health transitions and the state file each arrive as a `Change` at one `apply`.
//! - [`stats`]: one typed snapshot of every counter and state per request, rendered as
//!   HAProxy's `show stat` / `show info` ([`stats::haproxy`]).
//! - [`admin`] (Unix socket, HAProxy runtime API) and [`web`] (stats listener: HTML page,
//!   CSV/JSON, Prometheus metrics): read through [`stats`]; their changes go to [`control`].
//!
//! - [`access_log`]: the log output — per-thread line buffers and one writer thread.
//!
//! [`Sclb::start`] wires them up from a config; the binary adds signals and logging.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod auth;
pub mod balance;
pub mod choose;
pub mod config;
pub mod control;
pub mod discovered;
pub mod discovery;
pub mod escape;
pub mod files;
pub mod forward;
pub mod frontend;
pub mod gateway;
pub mod health;
pub mod instance;
pub mod k8s_api;
pub mod live_conns;
pub mod log_format;
pub mod persist;
pub mod pipe;
pub mod proxy_proto;
pub mod rate;
pub mod reload;
pub mod server;
pub mod sockopt;
pub mod state;
pub mod state_file;
pub mod stats;
pub mod stick_table;
pub mod store;
pub mod stream_pipe;
pub mod systemd;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use config::Config;
use frontend::{BindError, Listeners, Wanted};
use state::State;

/// What every task shares, in narrow handles: the running snapshot, the data path's
/// resources, the process's lifecycle, the control plane's own state, the gateway's.
pub struct Shared {
    /// The running snapshot of frontends, backends and servers (read everywhere; changed only
    /// through [`control`]).
    pub state: Arc<State>,
    /// What the data path holds: listeners, slots, live connections.
    pub data: DataPlane,
    /// Start time and the stop signals.
    pub life: Lifecycle,
    /// The control plane's own state (see [`control`]).
    pub control: control::Control,
    /// What reloads have done.
    pub reloads: reload::ReloadStats,
    /// The running discovery sources.
    pub discovery: discovery::Sources,
    /// Spark sessions and upstream HTTP/2 connections of gateway (`mode = "grpc"`) frontends.
    pub gateway: Arc<gateway::Gateway>,
    /// Each TLS frontend's certificate and client CAs, re-read when their files change.
    pub tls: tls::TlsStore,
    /// Each gateway frontend's token file or keys, re-read when the file changes.
    pub auth: auth::AuthStore,
}

/// The data path's resources.
pub struct DataPlane {
    /// Global maxconn slots.
    pub maxconn: Arc<Semaphore>,
    /// Live client connections, for graceful stop.
    pub conns: TaskTracker,
    pub listeners: Listeners,
    /// Live client connections for `show sess`.
    pub live_conns: live_conns::LiveConns,
    /// splice(2) or copy, from `global.splice` at start.
    pub pipe_mode: pipe::Mode,
    /// Most connections the file descriptor limit can hold (see [`fd_budget`]).
    pub fd_cap: usize,
    /// Data-plane runtimes, one per worker thread: each has its own listening sockets and
    /// keeps the connections it accepts. Empty: everything runs on the current runtime.
    pub workers: Vec<tokio::runtime::Handle>,
}

/// When the process started, and what stops it.
pub struct Lifecycle {
    pub started: std::time::SystemTime,
    /// Stops every accept loop (graceful stop).
    pub stop_accepting: CancellationToken,
    /// Stops background tasks.
    pub stop_background: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("admin socket {path}: {source}")]
    Admin {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the file descriptor limit is {limit}: room for only {room} connections; raise it \
         (ulimit -n, systemd LimitNOFILE) to at least {needed}"
    )]
    Fds {
        limit: usize,
        room: usize,
        needed: usize,
    },
    #[error("state file {}: {why}", .path.display())]
    StateFile {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("session store: {0}")]
    Store(String),
    #[error("stats listener {addr}: {source}")]
    Stats {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running load balancer.
pub struct Sclb {
    shared: Arc<Shared>,
    stats_addr: Option<SocketAddr>,
    admin_file: Option<admin::SocketFile>,
}

impl Sclb {
    /// Binds every frontend and starts serving on the current Tokio runtime.
    pub async fn start(config: Config) -> Result<Sclb, StartError> {
        Self::start_on(config, Vec::new()).await
    }

    /// Like [`Sclb::start`], with connections served on `workers` (one runtime per thread);
    /// health checks, the admin socket, stats and reloads stay on the current runtime.
    pub async fn start_on(
        config: Config,
        workers: Vec<tokio::runtime::Handle>,
    ) -> Result<Sclb, StartError> {
        if let Some(p) = &config.global.state_file {
            // Refused now rather than failing every save for the life of the process.
            config::check_state_file(p)
                .and_then(|()| config::parent_dir(p))
                .map_err(|why| StartError::StateFile {
                    path: p.clone(),
                    why,
                })?;
        }
        let fd_cap = fd_budget(&config, workers.len().max(1))?;
        let global = config.global.clone();
        let shared = Shared::new(config, workers, fd_cap);
        if let Some(saved) = global.state_file.as_deref().and_then(state_file::read) {
            let _ = control::apply(&shared, control::Change::Restore(saved));
        }
        match &global.store {
            config::StoreConfig::Memory => {}
            config::StoreConfig::Postgres(pg) => {
                // Connected before the first client when it can be (within `timeout`): else
                // that client's session or pin is bound here and written when the store answers.
                let store = store::Store::new(pg.clone());
                store.first_connect().await;
                let _ = shared
                    .gateway
                    .store
                    .set(store::SessionStore::Postgres(store));
            }
            config::StoreConfig::Kubernetes(k) => {
                let drivers = store::kubernetes::driver_watches(&shared.state.snapshot().config);
                let store = store::kubernetes::KubeStore::new(k.clone(), drivers)
                    .await
                    .map_err(StartError::Store)?;
                store.spawn(shared.life.stop_background.clone());
                let _ = shared
                    .gateway
                    .store
                    .set(store::SessionStore::Kubernetes(store));
            }
        }
        shared.sync_listeners()?;
        control::start_checkers(&shared);
        // Bind everything before serving anything, so a bad address fails the start cleanly.
        let admin = match &global.admin {
            Some(a) => Some((
                admin::bind(a).map_err(|source| StartError::Admin {
                    path: a.path.clone(),
                    source,
                })?,
                a.clone(),
            )),
            None => None,
        };
        let admin_file = admin.as_ref().map(|((_, f), _)| f.clone());
        let stats = match &global.stats {
            Some(s) => Some(
                sockopt::bind(s.bind, 128).map_err(|source| StartError::Stats {
                    addr: s.bind,
                    source,
                })?,
            ),
            None => None,
        };
        let stats_addr = stats.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(((listener, _), cfg)) = admin {
            tokio::spawn(admin::serve(listener, cfg, shared.clone()));
        }
        if let Some(listener) = stats {
            tokio::spawn(web::serve(listener, shared.clone()));
        }
        tokio::spawn(purge_loop(shared.clone()));
        tokio::spawn(watch_security_files(shared.clone()));
        tokio::spawn(gateway::reaper(shared.clone()));
        tokio::spawn(gateway::pool::keeper(shared.clone()));
        if let Some(store) = shared.gateway.store.get() {
            tokio::spawn(gateway::store_sync(shared.clone(), store.clone()));
        }
        discovery::sync_sources(&shared);
        // Always: a reload that sets a state file applies at the next save.
        tokio::spawn(persist::save_loop(shared.clone()));
        Ok(Sclb {
            shared,
            stats_addr,
            admin_file,
        })
    }

    pub fn state(&self) -> &Arc<State> {
        &self.shared.state
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Where the stats page listens (port 0 resolved), if configured.
    pub fn stats_addr(&self) -> Option<SocketAddr> {
        self.stats_addr
    }

    /// Actual listening addresses of a frontend (with port 0 resolved).
    pub fn local_addrs(&self, frontend: &str) -> Vec<SocketAddr> {
        self.shared.data.listeners.local_addrs(frontend)
    }

    /// Reloads the config file (what SIGHUP and `reload` do).
    pub async fn reload(&self) -> Result<String, String> {
        self.shared.reload().await
    }

    /// Stops accepting, lets live connections finish for up to `hard_stop_after`, then cuts
    /// the rest. Returns how many connections were cut.
    pub async fn shutdown(self, hard_stop_after: Duration) -> usize {
        let shared = &self.shared;
        shared.life.stop_accepting.cancel();
        shared.life.stop_background.cancel();
        // A replica that stops reaps no more: it hands the reaper Lease over at once.
        if let Some(store) = shared.gateway.store.get() {
            store.stop().await;
        }
        if let Some(f) = &self.admin_file {
            admin::remove_socket(f);
        }
        shared.data.conns.close();
        let live = shared.data.conns.len();
        if live > 0 {
            info!("stopping: waiting up to {hard_stop_after:?} for {live} live connections");
        }
        if tokio::time::timeout(hard_stop_after, shared.data.conns.wait())
            .await
            .is_ok()
        {
            self.save_state();
            return 0;
        }
        let cut = shared.data.conns.len();
        warn!("hard_stop_after reached: closing {cut} live connections");
        let _ = control::apply(shared, control::Change::HardStop);
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.data.conns.wait()).await;
        self.save_state();
        cut
    }

    /// Writes the state file, if one is configured.
    fn save_state(&self) {
        let snap = self.shared.state.snapshot();
        if let Some(p) = &snap.config.global.state_file {
            match state_file::save(&snap, &self.shared.gateway.registry, p) {
                Ok(()) => info!(path = %p.display(), "state saved"),
                Err(e) => {
                    error!(path = %p.display(), "state file NOT saved at stop: {e}; the pins and drains since the last save are lost")
                }
            }
        }
    }
}

impl Shared {
    /// The shared state of a process running `config`, before anything is bound or started
    /// ([`Sclb::start_on`] does that). `fd_cap`: most connections the descriptor limit holds.
    pub fn new(config: Config, workers: Vec<tokio::runtime::Handle>, fd_cap: usize) -> Arc<Self> {
        let maxconn = config.global.maxconn.min(fd_cap);
        let splice = config.global.splice;
        Arc::new(Shared {
            state: control::initial_state(config),
            data: DataPlane {
                maxconn: Arc::new(Semaphore::new(maxconn)),
                conns: TaskTracker::new(),
                listeners: Listeners::default(),
                live_conns: live_conns::LiveConns::default(),
                pipe_mode: if splice {
                    pipe::Mode::Splice
                } else {
                    pipe::Mode::Copy
                },
                fd_cap,
                workers,
            },
            life: Lifecycle {
                started: std::time::SystemTime::now(),
                stop_accepting: CancellationToken::new(),
                stop_background: CancellationToken::new(),
            },
            control: control::Control::new(maxconn),
            reloads: reload::ReloadStats::default(),
            discovery: discovery::Sources::default(),
            gateway: Arc::default(),
            tls: tls::TlsStore::default(),
            auth: auth::AuthStore::default(),
        })
    }

    /// Makes the listening sockets match the running config.
    pub fn sync_listeners(self: &Arc<Self>) -> Result<(), BindError> {
        let snap = self.state.snapshot();
        // What a listener's clients must show (certificates, tokens) follows the config too.
        self.tls.sync(&snap.config);
        self.auth.sync(&snap.config);
        let has_l4 = snap.frontends.iter().any(|fe| fe.config.grpc.is_none());
        let global = snap.config.global.maxconn.min(self.data.fd_cap);
        let wanted = snap
            .frontends
            .iter()
            .flat_map(|fe| {
                let limit = self.state.frontend_maxconn(&fe.config);
                let slots = frontend_limit(limit, fe.config.grpc.is_some(), has_l4, global)
                    .map(|n| self.state.frontend_slots(&fe.config, n));
                fe.config.binds.iter().map(move |addr| Wanted {
                    addr: *addr,
                    frontend: fe.config.name.clone(),
                    backlog: fe.config.backlog,
                    slots: slots.clone(),
                })
            })
            .collect();
        self.data.listeners.sync(wanted, self)
    }
}

/// A frontend's own connection limit: its `maxconn` in force; a gateway frontend without one, in a
/// config that also has L4 frontends, takes at most half the global limit, so that gateway
/// clients (silent ones included, until `timeout.http_request` closes them) can never hold
/// every slot and stop the L4 data path.
pub fn frontend_limit(
    maxconn: Option<usize>,
    gateway: bool,
    has_l4: bool,
    global: usize,
) -> Option<usize> {
    match maxconn {
        Some(n) => Some(n),
        None if gateway && has_l4 => Some((global / 2).max(1)),
        None => None,
    }
}

/// Fixed file descriptors: stdio, epoll and wake-up fds per runtime, signals, the admin and
/// stats sockets, the config watcher, health checks in flight, the state file.
const FD_RESERVE: usize = 48;

/// How many client connections the file descriptor limit can hold, as HAProxy derives its
/// maxconn from `ulimit -n`: first the soft limit is raised to the hard one, then each
/// connection is counted at two descriptors (client and server sockets) after the fixed
/// reserve, listeners and splice pipes (capped to a small share) are set aside. Asking for
/// more than fits would let sclb accept clients it then cannot connect anywhere.
pub fn fd_budget(config: &Config, workers: usize) -> Result<usize, StartError> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (mut soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((1024, 1024));
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        soft = hard;
    }
    let soft = soft.min(10_000_000) as usize;
    let listeners: usize = config
        .frontends
        .iter()
        .map(|f| f.binds.len())
        .sum::<usize>()
        * workers;
    let pipes = if config.global.splice {
        (soft / 16).min(256)
    } else {
        0
    };
    pipe::set_max_pipes(pipes);
    let fixed = FD_RESERVE + listeners + 2 * pipes;
    let cap = soft.saturating_sub(fixed) / 2;
    // A proxy that can hold a handful of connections is a broken deployment: say so at start
    // rather than serve almost nobody.
    const MIN_CONNECTIONS: usize = 8;
    if cap < MIN_CONNECTIONS {
        return Err(StartError::Fds {
            limit: soft,
            room: cap,
            needed: fixed + 2 * MIN_CONNECTIONS.max(config.global.maxconn.min(1024)),
        });
    }
    if config.global.maxconn > cap {
        warn!(
            "global.maxconn {} lowered to {cap}: the file descriptor limit is {soft} \
             (each connection needs two); raise it (systemd LimitNOFILE) to allow more",
            config.global.maxconn
        );
    }
    Ok(cap)
}

/// Re-reads certificates, client CAs, token files and keys whose files changed (cert-manager
/// renewals, kubelet Secret swaps), without touching live connections.
async fn watch_security_files(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(tls::WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.life.stop_background.cancelled() => return,
        }
        let sh = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            sh.tls.refresh();
            sh.auth.refresh();
        })
        .await;
    }
}

/// Every 10 s drops expired stick entries, so that a table's size reflects live pins; every
/// second drops servers removed by a reload once their last connection has ended.
async fn purge_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.life.stop_background.cancelled() => return,
        }
        n += 1;
        let snap = shared.state.snapshot();
        if n.is_multiple_of(10) {
            for b in &snap.backends {
                if let Some(t) = &b.stick {
                    t.purge();
                }
            }
        }
        // Servers removed by a reload stay visible while they drain; drop the empty ones.
        if snap.backends.iter().any(|b| {
            b.leaving
                .iter()
                .any(|s| s.counters.cur.load(std::sync::atomic::Ordering::Relaxed) == 0)
        }) {
            let _ = control::apply(&shared, control::Change::Refresh);
        }
    }
}
