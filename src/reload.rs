//! Reload: load, validate, diff, apply — from SIGHUP, the admin `reload` command, or the
//! config file changing on disk. All three call [`Shared::reload`].
//!
//! A file that does not validate is logged, counted and shown (`show info`, stats page,
//! `sclb_reload_failures_total`) and changes nothing. A good file is applied by
//! [`crate::state::State::apply`], which carries every live connection, pin, health and admin
//! state across; then listeners are synced (an unchanged address keeps its socket), checkers
//! start for new servers and removed servers are retired (their live connections drain).

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::{Shared, health};

/// What reloads have done, for `show info`, the stats page and metrics.
#[derive(Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub last_ok: Mutex<Option<SystemTime>>,
    /// One reload at a time.
    lock: tokio::sync::Mutex<()>,
    /// Hash of the file content last loaded, so the watcher reloads only on a real change.
    last_content: Mutex<Option<u64>>,
}

/// One keyed change between two lists.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<K, V> {
    Added(V),
    Removed(K),
    Changed(V),
}

/// The changes that turn `old` into `new`, items matched by `key`.
pub fn diff<K: Eq + Hash + Clone, V: PartialEq + Clone>(
    old: &[V],
    new: &[V],
    key: impl Fn(&V) -> K,
) -> Vec<Change<K, V>> {
    let old_by: HashMap<K, &V> = old.iter().map(|v| (key(v), v)).collect();
    let new_keys: HashMap<K, ()> = new.iter().map(|v| (key(v), ())).collect();
    let mut out = Vec::new();
    for v in new {
        match old_by.get(&key(v)) {
            None => out.push(Change::Added(v.clone())),
            Some(o) if *o != v => out.push(Change::Changed(v.clone())),
            Some(_) => {}
        }
    }
    for v in old {
        if !new_keys.contains_key(&key(v)) {
            out.push(Change::Removed(key(v)));
        }
    }
    out
}

/// Applies `changes` to `old`: kept items in their order, then added ones.
pub fn apply<K: Eq + Hash + Clone, V: Clone>(
    old: &[V],
    changes: &[Change<K, V>],
    key: impl Fn(&V) -> K,
) -> Vec<V> {
    let mut out: Vec<V> = Vec::with_capacity(old.len());
    for v in old {
        let k = key(v);
        if changes
            .iter()
            .any(|c| matches!(c, Change::Removed(r) if *r == k))
        {
            continue;
        }
        let changed = changes.iter().find_map(|c| match c {
            Change::Changed(n) if key(n) == k => Some(n.clone()),
            _ => None,
        });
        out.push(changed.unwrap_or_else(|| v.clone()));
    }
    for c in changes {
        if let Change::Added(v) = c {
            out.push(v.clone());
        }
    }
    out
}

/// Counts of a diff, for the log line.
fn counts<K, V>(changes: &[Change<K, V>]) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for ch in changes {
        match ch {
            Change::Added(_) => c.0 += 1,
            Change::Removed(_) => c.1 += 1,
            Change::Changed(_) => c.2 += 1,
        }
    }
    c
}

/// A one-line summary of what a reload changes.
pub fn summary(old: &Config, new: &Config) -> String {
    let fe = counts(&diff(&old.frontends, &new.frontends, |f| f.name.clone()));
    let be = counts(&diff(&old.backends, &new.backends, |b| b.name.clone()));
    let mut srv = (0, 0, 0);
    for nb in &new.backends {
        let empty = Vec::new();
        let olds = old
            .backends
            .iter()
            .find(|b| b.name == nb.name)
            .map(|b| &b.servers)
            .unwrap_or(&empty);
        let c = counts(&diff(olds, &nb.servers, |s| (s.name.clone(), s.addr)));
        srv = (srv.0 + c.0, srv.1 + c.1, srv.2 + c.2);
    }
    for ob in old
        .backends
        .iter()
        .filter(|o| !new.backends.iter().any(|n| n.name == o.name))
    {
        srv.1 += ob.servers.len();
    }
    format!(
        "frontends +{} -{} ~{}, backends +{} -{} ~{}, servers +{} -{} ~{}",
        fe.0, fe.1, fe.2, be.0, be.1, be.2, srv.0, srv.1, srv.2
    )
}

fn content_hash(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

impl Shared {
    /// Reloads the config file the process was started with.
    pub async fn reload(self: &Arc<Self>) -> Result<String, String> {
        let _one = self.reloads.lock.lock().await;
        let path = self.state.snapshot().config.source.clone();
        let p = path.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&p).ok();
            (config::load(&p), bytes.map(|b| content_hash(&b)))
        })
        .await
        .expect("config loading does not panic");
        *self.reloads.last_content.lock().unwrap() = loaded.1;
        let result = match loaded.0 {
            Ok(c) => self.apply_config(c),
            Err(e) => Err(e.to_string()),
        };
        match &result {
            Ok(s) => {
                self.reloads.ok.fetch_add(1, Relaxed);
                *self.reloads.last_error.lock().unwrap() = None;
                *self.reloads.last_ok.lock().unwrap() = Some(SystemTime::now());
                info!(config = %path.display(), "reloaded: {s}");
            }
            Err(e) => {
                self.reloads.failed.fetch_add(1, Relaxed);
                *self.reloads.last_error.lock().unwrap() = Some(e.clone());
                warn!(config = %path.display(), "reload failed, the running config is kept:\n{e}");
            }
        }
        result
    }

    /// Applies a validated config, carrying live state; on a listener that cannot bind,
    /// puts the old snapshot back and changes nothing.
    pub fn apply_config(self: &Arc<Self>, config: Config) -> Result<String, String> {
        let old_cfg = self.state.snapshot().config.clone();
        let summary = summary(&old_cfg, &config);
        let global_changed = old_cfg.global.admin != config.global.admin
            || old_cfg.global.stats != config.global.stats
            || old_cfg.global.log != config.global.log
            || old_cfg.global.threads != config.global.threads
            || old_cfg.global.splice != config.global.splice;
        let (new_maxconn, old_maxconn) = (
            config.global.maxconn.min(self.fd_cap),
            old_cfg.global.maxconn.min(self.fd_cap),
        );
        let (old, new) = self.state.apply(config);
        if let Err(e) = self.sync_listeners() {
            let created: Vec<_> = new
                .all_servers()
                .filter(|(_, s)| !old.all_servers().any(|(_, o)| o.id == s.id))
                .map(|(_, s)| s.clone())
                .collect();
            self.state.restore(old);
            for s in created {
                s.retired.cancel();
            }
            return Err(e.to_string());
        }
        crate::server::resize_semaphore(&self.maxconn, old_maxconn, new_maxconn);
        self.reconcile(&old, &new);
        crate::discovery::sync_sources(self);
        if global_changed {
            warn!(
                "changes to global.admin, global.stats, global.log, global.threads and global.splice take effect at the next restart"
            );
        }
        Ok(summary)
    }

    /// Applies a discovery update for `backend`: the snapshot is rebuilt (the running config
    /// plus the discovered servers), then checkers start and retirements follow, as on a
    /// reload.
    pub fn discovery_update(self: &Arc<Self>, backend: &str, update: crate::discovery::Update) {
        if !self.state.discovered.apply(backend, update) {
            return;
        }
        let (old, new) = self.state.refresh();
        self.reconcile(&old, &new);
        crate::state_file::retry_pending(&self.state);
    }

    /// After a new snapshot: start checkers for new servers, retire removed ones (their pins
    /// go; their live connections drain).
    fn reconcile(self: &Arc<Self>, old: &crate::state::Snapshot, new: &crate::state::Snapshot) {
        for (_, s) in new.all_servers() {
            if !old.all_servers().any(|(_, o)| o.id == s.id) || !s.checker_running() {
                health::spawn_checker(s.clone(), self.state.clone(), self.stop_background.clone());
            }
        }
        for (ob, s) in old.all_servers() {
            let still = new
                .backend(&ob.config.name)
                .is_some_and(|nb| nb.server(s.id).is_some());
            if !still {
                s.retired.cancel();
                if let Some(t) = new.backend(&ob.config.name).and_then(|b| b.stick.clone()) {
                    t.forget_server(s.id);
                }
            }
        }
    }
}

/// Watches the config file and reloads when its content changes. Watches the directory, not
/// the file, so that editors that save by rename, tools that replace the file and Kubernetes
/// ConfigMap symlink swaps (`..data`) are all seen; events are debounced and a reload happens
/// only when the file's content differs from what was last loaded.
///
/// Only finished changes are asked of the kernel (a file closed after writing, renamed, created,
/// deleted), and only those naming the config file or a ConfigMap entry count: reading the file
/// (sclb's own reads included) and writes to other files in the directory — logs, a state
/// file — cost nothing.
pub fn watch(shared: Arc<Shared>, path: &Path) -> std::io::Result<()> {
    use nix::sys::inotify::{AddWatchFlags as F, InitFlags, Inotify};

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
    inotify.add_watch(
        &dir,
        F::IN_CLOSE_WRITE
            | F::IN_MOVED_TO
            | F::IN_MOVED_FROM
            | F::IN_CREATE
            | F::IN_DELETE
            | F::IN_ATTRIB
            | F::IN_DELETE_SELF
            | F::IN_MOVE_SELF
            | F::IN_ONLYDIR,
    )?;
    let (tx, mut rx) = mpsc::channel::<()>(16);
    // Blocking reads on a thread of its own: the process forbids the `unsafe` that registering
    // a raw descriptor with tokio takes.
    std::thread::Builder::new()
        .name("sclb-config-watch".into())
        .spawn(move || {
            loop {
                let events = match inotify.read_events() {
                    Ok(ev) => ev,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        warn!("stopped watching the config file for changes: {e}");
                        return;
                    }
                };
                let relevant = events.iter().any(|e| match &e.name {
                    Some(n) => *n == name || n.as_encoded_bytes().starts_with(b".."),
                    // The directory itself moved or went away, or events were lost: look again.
                    None => true,
                });
                if relevant && tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })?;
    let path = path.to_path_buf();
    if let Ok(b) = std::fs::read(&path) {
        *shared.reloads.last_content.lock().unwrap() = Some(content_hash(&b));
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = rx.recv() => if ev.is_none() { return },
                _ = shared.stop_background.cancelled() => return,
            }
            // Debounce: wait until the directory has been quiet for 300 ms.
            loop {
                match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let now = std::fs::read(&path).ok().map(|b| content_hash(&b));
            let last = *shared.reloads.last_content.lock().unwrap();
            if now.is_some() && now != last {
                info!(config = %path.display(), "config file changed on disk: reloading");
                let _ = shared.reload().await;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Applying diff(a, b) to a gives b (as a keyed set, values included).
        #[test]
        fn applying_the_diff_gives_the_new_list(
            a in proptest::collection::btree_map(0u8..20, 0u8..4, 0..12),
            b in proptest::collection::btree_map(0u8..20, 0u8..4, 0..12),
        ) {
            let a: Vec<(u8, u8)> = a.into_iter().collect();
            let b: Vec<(u8, u8)> = b.into_iter().collect();
            let d = diff(&a, &b, |v| v.0);
            let mut got = apply(&a, &d, |v| v.0);
            got.sort();
            prop_assert_eq!(got, b.clone());
            // And no change at all between equal lists.
            prop_assert!(diff(&b, &b, |v| v.0).is_empty());
        }
    }
}
