//! Reload: load, validate, diff, apply — from SIGHUP, the admin `reload` command, or the
//! config file changing on disk. All three call [`Shared::reload`].
//!
//! A file that does not validate is logged, counted and shown (`show info`, stats page,
//! `sclb_reload_failures_total`) and changes nothing. A good file is handed to
//! [`crate::control`] as a `Change::Reload`, which carries every live connection, pin, health
//! and admin state across; then listeners are synced (an unchanged address keeps its socket),
//! checkers start for new servers and removed servers are retired (their connections drain).

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::Shared;
use crate::config;
use crate::control::{self, Applied};

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
            let bytes = crate::files::read_regular(&p, crate::files::MAX_CONFIG, true).ok();
            (config::load(&p), bytes.map(|b| content_hash(&b)))
        })
        .await
        .expect("config loading does not panic");
        *self.reloads.last_content.lock() = loaded.1;
        let result = match loaded.0 {
            Ok(c) => match control::apply(self, control::Change::Reload(Box::new(c))) {
                Ok(Applied::Reloaded(summary)) => {
                    crate::discovery::sync_sources(self);
                    Ok(summary)
                }
                Ok(other) => Ok(format!("{other:?}")),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match &result {
            Ok(s) => {
                self.reloads.ok.fetch_add(1, Relaxed);
                *self.reloads.last_error.lock() = None;
                *self.reloads.last_ok.lock() = Some(SystemTime::now());
                info!(config = %path.display(), "reloaded: {s}");
            }
            Err(e) => {
                self.reloads.failed.fetch_add(1, Relaxed);
                *self.reloads.last_error.lock() = Some(e.clone());
                warn!(config = %path.display(), "reload failed, the running config is kept:\n{e}");
            }
        }
        result
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
    if let Ok(b) = crate::files::read_regular(&path, crate::files::MAX_CONFIG, true) {
        *shared.reloads.last_content.lock() = Some(content_hash(&b));
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = rx.recv() => if ev.is_none() { return },
                _ = shared.life.stop_background.cancelled() => return,
            }
            // Debounce: wait until the directory has been quiet for 300 ms.
            loop {
                match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let now = crate::files::read_regular(&path, crate::files::MAX_CONFIG, true)
                .ok()
                .map(|b| content_hash(&b));
            let last = *shared.reloads.last_content.lock();
            if now.is_some() && now != last {
                info!(config = %path.display(), "config file changed on disk: reloading");
                let _ = shared.reload().await;
            }
        }
    });
    Ok(())
}
