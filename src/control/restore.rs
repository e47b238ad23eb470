//! Applying what the state file kept: the operator's admin states and weights, and the pins
//! with the time they had left, less the time the file has aged. Entries whose servers are
//! not there yet (discovery has not listed them) wait, and apply when discovery brings them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use tracing::info;

use crate::Shared;
use crate::gateway::registry::{Placement, Restore, SessionKey, SessionMeta};
use crate::server::Writer;
use crate::state_file::{BackendState, Saved};

/// What a restore found, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub pins: usize,
    /// Gateway sessions put back on their servers.
    pub sessions: usize,
    pub admin_states: usize,
    /// Entries waiting for servers that are not there yet.
    pub skipped: usize,
}

/// Entries whose servers were not there yet.
pub(super) struct Pending {
    saved: Saved,
    read_at: Instant,
}

/// How long unmatched entries wait for their servers to be discovered.
const PENDING_FOR: Duration = Duration::from_secs(600);

pub(super) fn apply(w: &Writer, shared: &Arc<Shared>, saved: Saved) -> Restored {
    let aged = saved.age();
    let (r, left) = apply_matching(w, shared, saved);
    info!(
        pins = r.pins,
        sessions = r.sessions,
        admin_states = r.admin_states,
        waiting = r.skipped,
        "state restored (written {}s ago)",
        aged.as_secs()
    );
    if r.skipped > 0 {
        *shared.control.pending_restore.lock() = Some(Pending {
            saved: left,
            read_at: Instant::now(),
        });
    }
    r
}

/// Applies the entries that wait for discovered servers, once those servers exist.
pub(super) fn retry_pending(w: &Writer, shared: &Arc<Shared>) -> Restored {
    let mut slot = shared.control.pending_restore.lock();
    let Some(p) = slot.take() else {
        return Restored::default();
    };
    if p.read_at.elapsed() > PENDING_FOR {
        info!("state file entries for servers never discovered are dropped");
        return Restored::default();
    }
    let (r, left) = apply_matching(w, shared, p.saved);
    if r.pins + r.sessions + r.admin_states > 0 {
        info!(
            pins = r.pins,
            sessions = r.sessions,
            admin_states = r.admin_states,
            "state restored for discovered servers"
        );
    }
    if r.skipped > 0 {
        *slot = Some(Pending {
            saved: left,
            read_at: p.read_at,
        });
    }
    r
}

/// Applies what matches the running servers; returns the counts and what did not match.
fn apply_matching(w: &Writer, shared: &Shared, saved: Saved) -> (Restored, Saved) {
    let aged = saved.age();
    let snap = shared.state.snapshot();
    let mut r = Restored::default();
    let mut left = Saved {
        version: saved.version,
        written_at: saved.written_at,
        backends: BTreeMap::new(),
    };
    for (name, bs) in saved.backends {
        let Some(b) = snap.backend(&name) else {
            r.skipped += bs.pins.len() + bs.servers.len() + bs.sessions.len();
            left.backends.insert(name, bs);
            continue;
        };
        let find = |n: &str, a: SocketAddr| {
            b.servers
                .iter()
                .find(|s| &*s.name == n && s.config_addr() == a)
        };
        let mut keep = BackendState::default();
        for ss in bs.servers {
            let Some(s) = find(&ss.name, ss.addr) else {
                r.skipped += 1;
                keep.servers.push(ss);
                continue;
            };
            s.set_operator_state(w, ss.admin_state());
            s.set_weight(w, ss.weight.min(crate::config::MAX_WEIGHT));
            r.admin_states += 1;
        }
        if let Some(t) = &b.stick {
            let mut pins = Vec::with_capacity(bs.pins.len());
            for p in bs.pins {
                let left_ms = Duration::from_millis(p.expires_in_ms).saturating_sub(aged);
                if left_ms.is_zero() {
                    continue;
                }
                match find(&p.server, p.server_addr) {
                    Some(s) => pins.push((p.client, s.id, left_ms)),
                    None => {
                        r.skipped += 1;
                        keep.pins.push(p);
                    }
                }
            }
            r.pins += pins.len();
            t.restore(pins);
        }
        let registry = &shared.gateway.registry;
        for ss in bs.sessions {
            let Some(s) = find(&ss.server, ss.server_addr) else {
                r.skipped += 1;
                keep.sessions.push(ss);
                continue;
            };
            let restored = registry.restore(Restore {
                key: SessionKey {
                    session_id: ss.session_id,
                    user_id: ss.user_id,
                },
                meta: SessionMeta {
                    namespace: ss.namespace,
                    app: ss.app,
                    team: ss.team,
                    environment: ss.environment,
                    created: ss.created_driver,
                    source: b.config.discovery.clone().filter(|_| ss.created_driver),
                },
                frontend: ss.frontend.into(),
                backend: name.as_str().into(),
                placement: Placement {
                    server: s.id,
                    server_name: s.name.clone(),
                },
                created: UNIX_EPOCH + Duration::from_millis(ss.created_ms),
                idle: Duration::from_millis(ss.idle_ms).saturating_add(aged),
            });
            if restored {
                r.sessions += 1;
            }
        }
        if !keep.servers.is_empty() || !keep.pins.is_empty() || !keep.sessions.is_empty() {
            left.backends.insert(name, keep);
        }
    }
    (r, left)
}
