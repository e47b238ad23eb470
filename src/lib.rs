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
//! - [`admin`] (Unix socket, HAProxy runtime API) and [`http`] (stats page, metrics): read
//!   through [`stats`]; every change goes through [`admin::execute`] or [`reload`].
//!
//! [`Sclb::start`] wires them up from a config; the binary adds signals and logging.

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod forward;
pub mod frontend;
pub mod gateway;
pub mod health;
pub mod http;
pub mod pipe;
pub mod reload;
pub mod server;
pub mod sessions;
pub mod sockopt;
pub mod state;
pub mod state_file;
pub mod stats;
pub mod stick_table;
pub mod systemd;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::Config;
use frontend::{BindError, Listeners, Wanted};
use state::State;

/// What every connection task shares.
pub struct Shared {
    pub state: Arc<State>,
    /// Global maxconn.
    pub maxconn: Arc<Semaphore>,
    /// Live client connections, for graceful stop.
    pub conns: TaskTracker,
    /// Stops every accept loop (graceful stop).
    pub stop_accepting: CancellationToken,
    /// Stops background tasks.
    pub stop_background: CancellationToken,
    pub listeners: Listeners,
    pub sessions: sessions::Sessions,
    pub started: std::time::SystemTime,
    pub reloads: reload::ReloadStats,
    /// splice(2) or copy, from `global.splice` at start.
    pub pipe_mode: pipe::Mode,
    /// Most connections the file descriptor limit can hold (see [`fd_budget`]).
    pub fd_cap: usize,
    /// Data-plane runtimes, one per worker thread: each has its own listening sockets and
    /// keeps the connections it accepts. Empty: everything runs on the current runtime.
    pub workers: Vec<tokio::runtime::Handle>,
    /// Spark sessions and upstream HTTP/2 connections of gateway (`mode = "grpc"`) frontends.
    pub gateway: Arc<gateway::Gateway>,
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
    admin_path: Option<std::path::PathBuf>,
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
        let fd_cap = fd_budget(&config, workers.len().max(1))?;
        let maxconn = config.global.maxconn.min(fd_cap);
        let global = config.global.clone();
        let state = State::new(config);
        if let Some(p) = &global.state_file {
            state_file::restore(&state, p);
        }
        let shared = Arc::new(Shared {
            state,
            maxconn: Arc::new(Semaphore::new(maxconn)),
            conns: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            stop_background: CancellationToken::new(),
            listeners: Listeners::default(),
            sessions: sessions::Sessions::default(),
            started: std::time::SystemTime::now(),
            reloads: reload::ReloadStats::default(),
            pipe_mode: if global.splice {
                pipe::Mode::Splice
            } else {
                pipe::Mode::Copy
            },
            workers,
            fd_cap,
            gateway: Arc::default(),
        });
        shared.sync_listeners()?;
        for (_, server) in shared.state.snapshot().all_servers() {
            health::spawn_checker(
                server.clone(),
                shared.state.clone(),
                shared.stop_background.clone(),
            );
        }
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
        if let Some((listener, cfg)) = admin {
            tokio::spawn(admin::serve(listener, cfg, shared.clone()));
        }
        if let Some(listener) = stats {
            tokio::spawn(http::serve(listener, shared.clone()));
        }
        tokio::spawn(purge_loop(shared.clone()));
        tokio::spawn(gateway::reaper(shared.clone()));
        discovery::sync_sources(&shared);
        if let Some(p) = global.state_file.clone() {
            tokio::spawn(save_loop(shared.clone(), p));
        }
        Ok(Sclb {
            shared,
            stats_addr,
            admin_path: global.admin.map(|a| a.path),
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
        self.shared.listeners.local_addrs(frontend)
    }

    /// Reloads the config file (what SIGHUP and `reload` do).
    pub async fn reload(&self) -> Result<String, String> {
        self.shared.reload().await
    }

    /// Stops accepting, lets live connections finish for up to `hard_stop_after`, then cuts
    /// the rest. Returns how many connections were cut.
    pub async fn shutdown(self, hard_stop_after: Duration) -> usize {
        let shared = &self.shared;
        shared.stop_accepting.cancel();
        shared.stop_background.cancel();
        if let Some(p) = &self.admin_path {
            admin::remove_socket(p);
        }
        shared.conns.close();
        let live = shared.conns.len();
        if live > 0 {
            info!("stopping: waiting up to {hard_stop_after:?} for {live} live connections");
        }
        if tokio::time::timeout(hard_stop_after, shared.conns.wait())
            .await
            .is_ok()
        {
            self.save_state();
            return 0;
        }
        let cut = shared.conns.len();
        warn!("hard_stop_after reached: closing {cut} live connections");
        for (_, s) in shared.state.snapshot().all_servers() {
            s.shutdown_sessions();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.conns.wait()).await;
        self.save_state();
        cut
    }

    /// Writes the state file, if one is configured.
    fn save_state(&self) {
        let snap = self.shared.state.snapshot();
        if let Some(p) = &snap.config.global.state_file {
            match state_file::save(&self.shared.state, p) {
                Ok(()) => info!(path = %p.display(), "state saved"),
                Err(e) => warn!(path = %p.display(), "cannot save state: {e}"),
            }
        }
    }
}

impl Shared {
    /// Makes the listening sockets match the running config.
    pub fn sync_listeners(self: &Arc<Self>) -> Result<(), BindError> {
        let snap = self.state.snapshot();
        let wanted = snap
            .frontends
            .iter()
            .flat_map(|fe| {
                let slots = fe
                    .config
                    .maxconn
                    .map(|_| self.state.frontend_slots(&fe.config));
                fe.config.binds.iter().map(move |addr| Wanted {
                    addr: *addr,
                    frontend: fe.config.name.clone(),
                    backlog: fe.config.backlog,
                    slots: slots.clone(),
                })
            })
            .collect();
        self.listeners.sync(wanted, self)
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

/// Writes the state file every 30 s, so that even a crash loses little.
async fn save_loop(shared: Arc<Shared>, path: std::path::PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop_background.cancelled() => return,
        }
        let (state, p) = (shared.state.clone(), path.clone());
        let r = tokio::task::spawn_blocking(move || state_file::save(&state, &p)).await;
        if let Ok(Err(e)) = r {
            warn!(path = %path.display(), "cannot save state: {e}");
        }
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
            _ = shared.stop_background.cancelled() => return,
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
            shared.state.refresh();
        }
    }
}
