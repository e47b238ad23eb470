//! `[global] state_file`: what must survive a restart — stick entries (client → server pins)
//! and admin states (drain, maint, runtime weight) — written atomically on graceful stop and
//! every 30 s, read once at start.
//!
//! Servers are matched by backend, name and address (a changed address is a new server, as on
//! reload). A missing file is normal (first start); a corrupt one is reported and ignored; pins
//! are restored with the time they had left, less the time the file has aged.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::server::AdminState;
use crate::state::State;

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct File {
    version: u32,
    /// Seconds since the Unix epoch.
    written_at: u64,
    backends: BTreeMap<String, BackendState>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
struct BackendState {
    servers: Vec<ServerState>,
    pins: Vec<Pin>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct ServerState {
    name: String,
    addr: SocketAddr,
    admin: String,
    weight: u32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Pin {
    client: IpAddr,
    server: String,
    server_addr: SocketAddr,
    expires_in_ms: u64,
}

fn admin_word(s: AdminState) -> &'static str {
    match s {
        AdminState::Ready => "ready",
        AdminState::Drain => "drain",
        AdminState::Maint => "maint",
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes the state file (temp file + rename, so a crash never leaves half a file).
pub fn save(state: &State, path: &Path) -> std::io::Result<()> {
    let snap = state.snapshot();
    let mut backends = BTreeMap::new();
    for b in &snap.backends {
        let mut bs = BackendState::default();
        for s in &b.servers {
            bs.servers.push(ServerState {
                name: s.name.to_string(),
                addr: s.config_addr(),
                admin: admin_word(s.admin_state()).into(),
                weight: s.weight(),
            });
        }
        if let Some(t) = &b.stick {
            for e in t.entries() {
                if let Some(s) = b.server(e.server) {
                    bs.pins.push(Pin {
                        client: e.key,
                        server: s.name.to_string(),
                        server_addr: s.config_addr(),
                        expires_in_ms: e.expires_in.as_millis() as u64,
                    });
                }
            }
        }
        backends.insert(b.config.name.clone(), bs);
    }
    let file = File {
        version: VERSION,
        written_at: now_secs(),
        backends,
    };
    let json = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// What a restore found, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub pins: usize,
    pub admin_states: usize,
    pub skipped: usize,
}

/// Entries whose servers were not there yet (servers that discovery has not listed yet).
pub struct Pending {
    file: File,
    read_at: std::time::Instant,
}

/// How long unmatched entries wait for their servers to be discovered.
const PENDING_FOR: Duration = Duration::from_secs(600);

/// Reads the state file into the running state. Never fails the start: problems are logged.
/// Entries for servers not (yet) in the pool are kept and applied by [`retry_pending`] when
/// discovery brings their servers.
pub fn restore(state: &State, path: &Path) -> Restored {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(path = %path.display(), "no state file yet: starting with empty stick tables");
            return Restored::default();
        }
        Err(e) => {
            warn!(path = %path.display(), "cannot read the state file ({e}): ignoring it");
            return Restored::default();
        }
    };
    let file: File = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), "state file is corrupt ({e}): ignoring it");
            return Restored::default();
        }
    };
    if file.version != VERSION {
        warn!(path = %path.display(), version = file.version, "state file has an unknown version: ignoring it");
        return Restored::default();
    }
    let aged = Duration::from_secs(now_secs().saturating_sub(file.written_at));
    let (r, left) = apply(state, file);
    info!(
        path = %path.display(),
        pins = r.pins,
        admin_states = r.admin_states,
        waiting = r.skipped,
        "state restored (written {}s ago)",
        aged.as_secs()
    );
    if r.skipped > 0 {
        *state.pending_restore.lock().unwrap() = Some(Pending {
            file: left,
            read_at: std::time::Instant::now(),
        });
    }
    r
}

/// Applies the entries that wait for discovered servers, once those servers exist.
pub fn retry_pending(state: &State) -> Restored {
    let mut slot = state.pending_restore.lock().unwrap();
    let Some(p) = slot.take() else {
        return Restored::default();
    };
    if p.read_at.elapsed() > PENDING_FOR {
        info!("state file entries for servers never discovered are dropped");
        return Restored::default();
    }
    let (r, left) = apply(state, p.file);
    if r.pins + r.admin_states > 0 {
        info!(
            pins = r.pins,
            admin_states = r.admin_states,
            "state restored for discovered servers"
        );
    }
    if r.skipped > 0 {
        *slot = Some(Pending {
            file: left,
            read_at: p.read_at,
        });
    }
    r
}

/// Applies what matches the running servers; returns the counts and what did not match.
fn apply(state: &State, file: File) -> (Restored, File) {
    let aged = Duration::from_secs(now_secs().saturating_sub(file.written_at));
    let snap = state.snapshot();
    let mut r = Restored::default();
    let mut left = File {
        version: file.version,
        written_at: file.written_at,
        backends: BTreeMap::new(),
    };
    for (name, bs) in file.backends {
        let Some(b) = snap.backend(&name) else {
            r.skipped += bs.pins.len() + bs.servers.len();
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
            let admin = match ss.admin.as_str() {
                "drain" => AdminState::Drain,
                "maint" => AdminState::Maint,
                _ => AdminState::Ready,
            };
            s.set_admin_state(admin);
            s.set_weight(ss.weight.min(crate::config::MAX_WEIGHT));
            r.admin_states += 1;
        }
        if let Some(t) = &b.stick {
            for p in bs.pins {
                let left_ms = Duration::from_millis(p.expires_in_ms).saturating_sub(aged);
                if left_ms.is_zero() {
                    continue;
                }
                match find(&p.server, p.server_addr) {
                    Some(s) => {
                        t.restore(p.client, s.id, left_ms);
                        r.pins += 1;
                    }
                    None => {
                        r.skipped += 1;
                        keep.pins.push(p);
                    }
                }
            }
        }
        if !keep.servers.is_empty() || !keep.pins.is_empty() {
            left.backends.insert(name, keep);
        }
    }
    (r, left)
}
