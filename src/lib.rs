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
//!
//! [`Sclb::start`] wires them up from a config; the binary adds signals and logging.

#![forbid(unsafe_code)]

pub mod balance;
pub mod config;
pub mod forward;
pub mod frontend;
pub mod health;
pub mod pipe;
pub mod server;
pub mod sockopt;
pub mod state;
pub mod stick_table;

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
    /// Cuts every live connection (hard stop).
    pub hard_stop: CancellationToken,
    /// Stops background tasks.
    pub stop_background: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// A running load balancer.
pub struct Sclb {
    shared: Arc<Shared>,
    listeners: Listeners,
}

impl Sclb {
    /// Binds every frontend and starts serving. Must be called inside a Tokio runtime.
    pub async fn start(config: Config) -> Result<Sclb, StartError> {
        let maxconn = config.global.maxconn;
        let state = State::new(config);
        let shared = Arc::new(Shared {
            state,
            maxconn: Arc::new(Semaphore::new(maxconn)),
            conns: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            stop_background: CancellationToken::new(),
        });
        let sclb = Sclb {
            shared,
            listeners: Listeners::default(),
        };
        sclb.sync_listeners()?;
        for (_, server) in sclb.shared.state.snapshot().all_servers() {
            health::spawn_checker(
                server.clone(),
                sclb.shared.state.clone(),
                sclb.shared.stop_background.clone(),
            );
        }
        tokio::spawn(purge_loop(sclb.shared.clone()));
        Ok(sclb)
    }

    pub fn state(&self) -> &Arc<State> {
        &self.shared.state
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Actual listening addresses of a frontend (with port 0 resolved).
    pub fn local_addrs(&self, frontend: &str) -> Vec<SocketAddr> {
        self.listeners.local_addrs(frontend)
    }

    fn sync_listeners(&self) -> Result<(), BindError> {
        let snap = self.shared.state.snapshot();
        let wanted = snap
            .frontends
            .iter()
            .flat_map(|fe| {
                let slots = fe
                    .config
                    .maxconn
                    .map(|_| self.shared.state.frontend_slots(&fe.config));
                fe.config.binds.iter().map(move |addr| Wanted {
                    addr: *addr,
                    frontend: fe.config.name.clone(),
                    backlog: fe.config.backlog,
                    slots: slots.clone(),
                })
            })
            .collect();
        self.listeners.sync(wanted, &self.shared)
    }

    /// Stops accepting, lets live connections finish for up to `hard_stop_after`, then cuts
    /// the rest. Returns how many connections were cut.
    pub async fn shutdown(self, hard_stop_after: Duration) -> usize {
        let shared = &self.shared;
        shared.stop_accepting.cancel();
        shared.stop_background.cancel();
        shared.conns.close();
        let live = shared.conns.len();
        if live > 0 {
            info!("stopping: waiting up to {hard_stop_after:?} for {live} live connections");
        }
        if tokio::time::timeout(hard_stop_after, shared.conns.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = shared.conns.len();
        warn!("hard_stop_after reached: closing {cut} live connections");
        shared.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.conns.wait()).await;
        cut
    }
}

/// Drops expired stick entries, so that the table's size reflects live pins.
async fn purge_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop_background.cancelled() => return,
        }
        for b in &shared.state.snapshot().backends {
            if let Some(t) = &b.stick {
                t.purge();
            }
        }
    }
}
