//! `[global] state_file`: what must survive a restart — stick entries (client → server pins),
//! the gateway's live Spark sessions (session → server) and the operator's admin states (drain,
//! maint, runtime weight; never a drain that discovery set, which the orchestrator says again)
//! — written atomically on graceful stop, every 30 s, within a second of a session starting or
//! ending, and before an operator's command answers; read once at start. This module owns the file's format, writing and reading;
//! [`crate::control`] applies what was read.
//!
//! A missing file is normal (first start); a corrupt one is reported and ignored.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::gateway::registry::Registry;
use crate::server::AdminState;
use crate::state::Snapshot;

const VERSION: u32 = 1;

/// What the state file holds.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Saved {
    pub version: u32,
    /// Seconds since the Unix epoch.
    pub written_at: u64,
    pub backends: BTreeMap<String, BackendState>,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
pub struct BackendState {
    pub servers: Vec<ServerState>,
    pub pins: Vec<Pin>,
    /// Gateway sessions placed on this backend's servers (absent in files of older versions).
    #[serde(default)]
    pub sessions: Vec<SavedSession>,
}

/// A live gateway session: its key, where it runs, and what the reaper needs.
#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
pub struct SavedSession {
    pub session_id: String,
    #[serde(default)]
    pub user_id: String,
    pub frontend: String,
    pub server: String,
    pub server_addr: SocketAddr,
    /// When the session started, in ms since the Unix epoch.
    pub created_ms: u64,
    /// How long it had been idle when the file was written.
    pub idle_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// sclb created this session's driver (and deletes it when the session ends).
    #[serde(default)]
    pub created_driver: bool,
}

/// A server is matched by name and address (a changed address is a new server, as on reload).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct ServerState {
    pub name: String,
    pub addr: SocketAddr,
    /// The operator's word: "ready", "drain" or "maint".
    pub admin: String,
    pub weight: u32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Pin {
    pub client: IpAddr,
    pub server: String,
    pub server_addr: SocketAddr,
    pub expires_in_ms: u64,
}

impl Saved {
    /// How long ago the file was written.
    pub fn age(&self) -> Duration {
        Duration::from_secs(now_secs().saturating_sub(self.written_at))
    }
}

impl ServerState {
    pub fn admin_state(&self) -> AdminState {
        match self.admin.as_str() {
            "drain" => AdminState::Drain,
            "maint" => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
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
pub fn save(snap: &Snapshot, sessions: &Registry, path: &Path) -> std::io::Result<()> {
    let mut backends = BTreeMap::new();
    for b in &snap.backends {
        let mut bs = BackendState::default();
        for s in &b.servers {
            bs.servers.push(ServerState {
                name: s.name.to_string(),
                addr: s.config_addr(),
                admin: admin_word(s.admin_flags().operator()).into(),
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
    for s in sessions.list() {
        let p = s.placement();
        let (Some(b), Some(bs)) = (snap.backend(&s.backend), backends.get_mut(&*s.backend)) else {
            continue;
        };
        let Some(server) = b.server(p.server) else {
            continue;
        };
        bs.sessions.push(SavedSession {
            session_id: s.key.session_id.clone(),
            user_id: s.key.user_id.clone(),
            frontend: s.frontend.to_string(),
            server: server.name.to_string(),
            server_addr: server.config_addr(),
            created_ms: s
                .created
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            idle_ms: s.idle_for().as_millis() as u64,
            namespace: s.meta.namespace.clone(),
            app: s.meta.app.clone(),
            team: s.meta.team.clone(),
            environment: s.meta.environment.clone(),
            created_driver: s.meta.created,
        });
    }
    let file = Saved {
        version: VERSION,
        written_at: now_secs(),
        backends,
    };
    // Streamed to the file: a million pins are ~100 MB of JSON, too much to hold as one
    // buffer beside the table (bench/run --scale measures the RSS per pin).
    write_atomically(path, |w| {
        serde_json::to_writer(&mut *w, &file).map_err(std::io::Error::other)
    })
}

/// Writes what `write` writes to a new temp file beside `path` and renames it into place, as a careful
/// daemon does: the temp file is created exclusively (a file or symlink planted at its name
/// makes the write fail instead of being followed), readable by sclb's user only, and
/// flushed to disk before the rename, so a crash leaves the old file or the new one.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    // A temp file left by a crash of this same process id: ours to replace.
    let _ = std::fs::remove_file(&tmp);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
    let written = write(&mut w)
        .and_then(|()| w.flush())
        .and_then(|()| w.get_ref().sync_all());
    drop(w);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Reads the state file. Never fails the start: a missing file is the first start, and a file
/// that cannot be read or parsed is reported and ignored.
pub fn read(path: &Path) -> Option<Saved> {
    if let Err(e) = crate::config::check_state_file(path) {
        warn!("state file: {e}: ignoring it");
        return None;
    }
    // At most 256 MiB: a million pins take about 100 MB.
    let bytes = match crate::files::read_regular(path, 256 << 20, false) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            info!(path = %path.display(), "no state file yet: starting with empty stick tables");
            return None;
        }
        Err(e) => {
            warn!(path = %path.display(), "cannot read the state file ({e}): ignoring it");
            return None;
        }
    };
    let file: Saved = match serde_json::from_slice(&bytes) {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), "state file is corrupt ({e}): ignoring it");
            return None;
        }
    };
    if file.version != VERSION {
        warn!(path = %path.display(), version = file.version, "state file has an unknown version: ignoring it");
        return None;
    }
    Some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link planted at the temp file's name is replaced, never written through.
    #[test]
    fn a_planted_link_at_the_temp_name_is_not_followed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let tmp = dir
            .path()
            .join(format!("state.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomically(&path, |w| w.write_all(b"{}")).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{}");
        assert!(!tmp.exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
