//! The one writer of live state. Every change to what the data path sees — servers' admin
//! states, weights, addresses, limits and health, the running snapshot, stick entries, Spark
//! sessions killed by an operator — arrives here as a [`Change`] and goes through [`apply`]:
//!
//! - an operator's command (the admin socket, the stats listener's `POST /admin`),
//! - a reload (SIGHUP, `reload`, the config file changing on disk),
//! - a discovery update (a Kubernetes watch),
//! - a health transition (a checker's result),
//! - the state file read at start.
//!
//! Server setters take a [`Writer`], which only this module makes, so a write that does not
//! come through here stands out. Reading stays everywhere: `server.admin_state()`,
//! `state.snapshot()`.

mod health;
mod operator;
mod reconcile;
mod restore;

use parking_lot::Mutex;
use std::sync::Arc;

use crate::Shared;
use crate::config::Config;
use crate::discovered::Update;
use crate::server::{LastCheck, Server, Transition, Writer};
use crate::state::State;

pub use operator::{FrontendAction, Operator};
pub use restore::Restored;

/// Everything that can change live state.
pub enum Change {
    /// An operator's command, with its server already looked up.
    Operator(Operator),
    /// A validated config replaces the running one.
    Reload(Box<Config>),
    /// A discovery source's update for one backend.
    Discovery {
        backend: String,
        updates: Vec<Update>,
    },
    /// One health check's result for a server.
    Health {
        server: Arc<Server>,
        result: LastCheck,
    },
    /// What the state file kept from the last run (the operator's states and the pins).
    Restore(crate::state_file::Saved),
    /// Rebuild the snapshot from the running config: servers removed by a reload have
    /// finished draining.
    Refresh,
    /// `hard_stop_after` ran out while stopping: close every live connection.
    HardStop,
}

/// What a change did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// A reload's one-line summary of what changed.
    Reloaded(String),
    /// What a health result did to the server's state.
    Health(Transition),
    Restored(Restored),
    /// A reply for the operator (HAProxy prints one for some commands, e.g. `set server addr`).
    Reply(String),
}

/// Why a change was refused; nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The new config cannot run (a listener cannot bind); the running one is kept.
    #[error("{0}")]
    Reload(String),
    #[error("no such table '{0}'")]
    NoSuchTable(String),
    #[error("no such session '{0}'")]
    NoSuchSession(String),
    #[error("no such connection 0x{0:x}")]
    NoSuchConnection(u64),
    #[error("no such frontend '{0}'")]
    NoSuchFrontend(String),
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
}

/// Live state that belongs to the control plane itself.
pub struct Control {
    /// State-file entries whose servers discovery has not listed yet.
    pending_restore: Mutex<Option<restore::Pending>>,
    /// The global maxconn in force (the config's, or `set maxconn global`'s), which the
    /// global slots semaphore holds.
    pub global_maxconn: std::sync::atomic::AtomicUsize,
    /// State-file saves asked for by operators' commands, and their outcome.
    pub persist: crate::persist::Persist,
}

impl Control {
    pub fn new(global_maxconn: usize) -> Self {
        Control {
            pending_restore: Mutex::default(),
            global_maxconn: global_maxconn.into(),
            persist: Default::default(),
        }
    }
}

/// The state a process starts with, built from its first config.
pub fn initial_state(config: Config) -> Arc<State> {
    State::new(&Writer::for_control(), config)
}

/// Where health checkers report: each result becomes a `Change::Health`.
pub fn checker_report(shared: &Arc<Shared>) -> crate::health::Report {
    let shared = Arc::downgrade(shared);
    Arc::new(move |server, result| {
        if let Some(shared) = shared.upgrade() {
            let _ = apply(&shared, Change::Health { server, result });
        }
    })
}

/// Starts the health checker of every server of the running snapshot (at start).
pub fn start_checkers(shared: &Arc<Shared>) {
    let report = checker_report(shared);
    for (_, server) in shared.state.snapshot().all_servers() {
        crate::health::spawn_checker(server.clone(), &report, &shared.life.stop_background);
    }
}

/// Applies one change. The only way live state changes.
pub fn apply(shared: &Arc<Shared>, change: Change) -> Result<Applied, ControlError> {
    let w = &Writer::for_control();
    match change {
        Change::Operator(op) => operator::apply(w, shared, op),
        Change::Reload(config) => reconcile::reload(w, shared, *config).map(Applied::Reloaded),
        Change::Discovery { backend, updates } => {
            reconcile::discovery(w, shared, &backend, updates);
            Ok(Applied::Done)
        }
        Change::Health { server, result } => {
            Ok(Applied::Health(health::record(w, shared, &server, result)))
        }
        Change::Restore(saved) => Ok(Applied::Restored(restore::apply(w, shared, saved))),
        Change::Refresh => {
            reconcile::refresh(w, shared);
            Ok(Applied::Done)
        }
        Change::HardStop => {
            for (_, s) in shared.state.snapshot().all_servers() {
                s.shutdown_sessions(w);
            }
            Ok(Applied::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every change goes through [`super::apply`]: nothing outside this module makes a writer.
    #[test]
    fn only_the_control_plane_makes_a_writer() {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        walk(&src, &mut files);
        let makers: Vec<_> = files
            .iter()
            .filter(|p| !p.starts_with(src.join("control")))
            .filter(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                text.lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .any(|l| l.contains("Writer::for_control()") && !l.contains("fn for_control"))
            })
            .collect();
        assert!(
            makers.is_empty(),
            "writers made outside control: {makers:?}"
        );
        assert!(files.len() > 20, "walked {}", src.display());
    }
}
