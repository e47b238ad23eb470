//! An operator's changes: admin states, weights, addresses, limits, health checks, closing a
//! server's connections, clearing pins, ending a Spark session. Each is logged once, here.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{info, warn};

use super::{Applied, ControlError};
use crate::Shared;
use crate::server::Writer;
use crate::server::{AdminState, ForcedHealth, Server};

/// What `disable|enable|shutdown frontend` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendAction {
    /// Stop accepting; clients wait in the accept queue.
    Pause,
    Resume,
    /// Close the listeners (until the next reload); live connections go on.
    Shutdown,
}

/// An operator's change, with its server already found.
pub enum Operator {
    /// `set server <b>/<s> state ready|drain|maint`, `enable|disable server`.
    SetState {
        server: Arc<Server>,
        state: AdminState,
    },
    SetWeight {
        server: Arc<Server>,
        weight: u32,
    },
    SetAddr {
        server: Arc<Server>,
        ip: IpAddr,
        port: Option<u16>,
    },
    /// 0: no limit.
    SetMaxconn {
        server: Arc<Server>,
        maxconn: u64,
    },
    /// `enable|disable health`.
    Checks {
        server: Arc<Server>,
        enable: bool,
    },
    ShutdownSessions {
        server: Arc<Server>,
    },
    /// `shutdown session <id>`: one client connection, by the id `show sess` prints.
    ShutdownConnection {
        id: u64,
    },
    /// `clear table <backend> [key <ip>]`.
    ClearTable {
        backend: String,
        key: Option<IpAddr>,
    },
    /// `set server <b>/<s> health up|stopping|down`.
    SetHealth {
        server: Arc<Server>,
        health: ForcedHealth,
    },
    /// `clear counters [all]`.
    ClearCounters {
        all: bool,
    },
    /// `disable|enable|shutdown frontend <name>`.
    Frontend {
        name: String,
        action: FrontendAction,
    },
    /// `set maxconn global <n>`.
    SetGlobalMaxconn {
        maxconn: usize,
    },
    /// `add server <b>/<s> <addr> [opts]`: a server added at run time.
    AddServer {
        backend: String,
        config: Box<crate::config::ServerConfig>,
        /// `enabled`: READY at once; otherwise MAINT, as HAProxy's dynamic servers start.
        enabled: bool,
    },
    /// `del server <b>/<s>`: only a server `add server` added, in MAINT, with no connection.
    DelServer {
        server: Arc<Server>,
    },
    /// `set maxconn frontend <fe> <n>`.
    SetFrontendMaxconn {
        name: String,
        maxconn: usize,
    },
    /// `kill session <id>`, `DELETE /sessions/<id>`; `by` says where it came from.
    KillSession {
        id: String,
        by: &'static str,
    },
}

fn name(s: &Server) -> String {
    format!("{}/{}", s.backend, s.name)
}

pub(super) fn apply(
    w: &Writer,
    shared: &Arc<Shared>,
    op: Operator,
) -> Result<Applied, ControlError> {
    match op {
        Operator::SetState { server, state } => {
            let (before, after) = server.set_operator_state(w, state);
            if before != after {
                info!(
                    "server {} is now {} (was {})",
                    name(&server),
                    after.word(),
                    before.word()
                );
            }
            if after != state && server.admin_flags().discovery_drain() {
                return Ok(Applied::Reply(format!(
                    "server {} stays DRAIN: discovery drains it (its pod is terminating)\n",
                    name(&server)
                )));
            }
        }
        Operator::SetWeight { server, weight } => {
            server.set_weight(w, weight);
            info!("server {} weight set to {weight}", name(&server));
        }
        Operator::SetAddr { server, ip, port } => {
            let old = server.addr();
            let mut new: SocketAddr = old;
            new.set_ip(ip);
            if let Some(p) = port {
                new.set_port(p);
            }
            if new == old {
                return Ok(Applied::Reply(
                    "no need to change the addr, no need to change the port by 'stats socket command'\n"
                        .into(),
                ));
            }
            server.set_addr(w, new);
            info!(
                "server {} address changed from {old} to {new}",
                name(&server)
            );
            return Ok(Applied::Reply(format!(
                "IP changed from '{}' to '{}', port changed from '{}' to '{}' by 'stats socket command'\n",
                old.ip(),
                new.ip(),
                old.port(),
                new.port()
            )));
        }
        Operator::SetMaxconn { server, maxconn } => {
            server
                .set_maxconn(w, maxconn)
                .map_err(|why| ControlError::Invalid {
                    what: "maxconn",
                    why,
                })?;
            info!("server {} maxconn set to {maxconn}", name(&server));
        }
        Operator::Checks { server, enable } => {
            server.health.set_enabled(w, enable);
            info!(
                "health checks of {} {}",
                name(&server),
                if enable { "enabled" } else { "disabled" }
            );
        }
        Operator::SetHealth { server, health } => {
            let t = server.health.force(w, health);
            if t != crate::server::Transition::None {
                server.touch_last_change();
            }
            info!(
                "server {} health forced {health:?} by the operator: now {}",
                name(&server),
                server.status()
            );
        }
        Operator::ClearCounters { all } => {
            for (_, s) in shared.state.snapshot().all_servers() {
                s.counters.clear(w, all);
            }
            for c in shared.state.all_frontend_counters() {
                c.clear(w, all);
            }
            info!(all, "counters cleared by the operator");
        }
        Operator::ShutdownSessions { server } => {
            let n = server.counters.cur.load(Relaxed);
            server.shutdown_sessions(w);
            info!("closing {n} live connections of {}", name(&server));
        }
        Operator::Frontend { name, action } => {
            if shared.state.snapshot().frontend(&name).is_none() {
                return Err(ControlError::NoSuchFrontend(name));
            }
            let n = match action {
                FrontendAction::Pause => shared.data.listeners.set_paused(&name, true),
                FrontendAction::Resume => shared.data.listeners.set_paused(&name, false),
                FrontendAction::Shutdown => shared.data.listeners.shut_down(&name),
            };
            info!(frontend = %name, listeners = n, "frontend {action:?} by the operator");
        }
        Operator::AddServer {
            backend,
            config,
            enabled,
        } => {
            let snap = shared.state.snapshot();
            let Some(be) = snap.backend(&backend) else {
                return Err(ControlError::Invalid {
                    what: "backend",
                    why: "No such backend.".into(),
                });
            };
            if be.server_by_name(&config.name).is_some() {
                return Err(ControlError::Invalid {
                    what: "server name",
                    why: format!("'{}' is already a server of {backend}", config.name),
                });
            }
            let name = config.name.clone();
            shared
                .state
                .dynamic
                .lock()
                .entry(backend.clone())
                .or_default()
                .push(*config);
            super::reconcile::refresh_now(w, shared);
            let added = shared
                .state
                .snapshot()
                .backend(&backend)
                .and_then(|b| b.server_by_name(&name).cloned());
            if let Some(s) = &added
                && !enabled
            {
                s.set_operator_state(w, AdminState::Maint);
            }
            info!("server {backend}/{name} added by the operator");
            return Ok(Applied::Reply(format!(
                "New server registered{}.\n",
                if enabled {
                    ""
                } else {
                    " (in MAINT: 'enable server' to start it)"
                }
            )));
        }
        Operator::DelServer { server } => {
            let (backend, sname) = (server.backend.to_string(), server.name.to_string());
            let dynamic = shared
                .state
                .dynamic
                .lock()
                .get(&backend)
                .is_some_and(|l| l.iter().any(|c| c.name == sname));
            if !dynamic {
                return Err(ControlError::Invalid {
                    what: "server",
                    why: "only servers added with 'add server' can be deleted; remove it from the config file and reload".into(),
                });
            }
            if server.admin_state() != AdminState::Maint {
                return Err(ControlError::Invalid {
                    what: "server state",
                    why: "Only servers in maintenance mode can be deleted.".into(),
                });
            }
            if server.counters.cur.load(Relaxed) > 0 || server.counters.queue_cur.load(Relaxed) > 0
            {
                return Err(ControlError::Invalid {
                    what: "server state",
                    why: "Server still has connections attached to it, cannot remove it.".into(),
                });
            }
            if let Some(l) = shared.state.dynamic.lock().get_mut(&backend) {
                l.retain(|c| c.name != sname);
            }
            super::reconcile::refresh_now(w, shared);
            info!("server {backend}/{sname} deleted by the operator");
            return Ok(Applied::Reply("Server deleted.\n".into()));
        }
        Operator::SetFrontendMaxconn { name, maxconn } => {
            let snap = shared.state.snapshot();
            let Some(fe) = snap.frontend(&name) else {
                return Err(ControlError::NoSuchFrontend(name));
            };
            shared.state.set_frontend_maxconn(&fe.config, maxconn);
            // A frontend that had no limit starts counting on its listeners.
            if let Err(e) = shared.sync_listeners() {
                warn!(frontend = %name, "listeners after set maxconn frontend: {e}");
            }
            info!(frontend = %name, maxconn, "frontend maxconn set by the operator");
        }
        Operator::SetGlobalMaxconn { maxconn } => {
            let new = maxconn.min(shared.data.fd_cap);
            let old = shared.control.global_maxconn.swap(new, Relaxed);
            crate::server::resize_semaphore(&shared.data.maxconn, old, new);
            info!("global maxconn set to {new} (was {old})");
            if new < maxconn {
                return Ok(Applied::Reply(format!(
                    "maxconn lowered to {new}: the file descriptor limit holds no more\n"
                )));
            }
        }
        Operator::ShutdownConnection { id } => {
            if !shared.data.live_conns.shutdown(id) {
                return Err(ControlError::NoSuchConnection(id));
            }
            info!("closing connection 0x{id:x} (shutdown session)");
        }
        Operator::ClearTable { backend, key } => {
            let snap = shared.state.snapshot();
            let t = snap
                .backend(&backend)
                .and_then(|b| b.stick.clone())
                .ok_or_else(|| ControlError::NoSuchTable(backend.clone()))?;
            match key {
                Some(k) => {
                    t.unpin(k);
                }
                None => t.clear(),
            }
            info!(table = %backend, key = ?key, "stick table cleared by the operator");
        }
        Operator::KillSession { id, by } => {
            if !crate::gateway::kill_session(shared, &id, by) {
                return Err(ControlError::NoSuchSession(id));
            }
        }
    }
    Ok(Applied::Done)
}
