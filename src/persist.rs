//! When the state file is written: every 30 s (pins are refreshed by traffic, and a crash loses
//! at most that much of them), within a second of a gateway session starting or ending (a
//! session must outlive a restart that comes right after it), on graceful stop, and before an
//! operator's command answers (a drain set just before a `kill -9` is still there after it).
//! [`crate::state_file`] owns the format and the atomic write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{debug, error, warn};

use crate::Shared;
use crate::state_file;

/// How often the state file is written when nothing asks for it sooner.
const PERIOD: Duration = Duration::from_secs(30);
/// Session churn writes the file at most this often.
const SESSION_DELAY: Duration = Duration::from_secs(1);
/// While saves keep failing, how often that is said again at error level.
const REMIND_EVERY: Duration = Duration::from_secs(600);
/// How long an operator's command waits for its change to be on disk.
const DURABLE_WITHIN: Duration = Duration::from_secs(10);

/// Save requests and their outcome.
pub struct Persist {
    /// Generations asked for by operators (each waits for a save that covers it).
    asked: AtomicU64,
    urgent: Notify,
    /// The newest generation a save covered, and whether that save succeeded.
    done: watch::Sender<(u64, bool)>,
}

impl Default for Persist {
    fn default() -> Self {
        Persist {
            asked: AtomicU64::new(0),
            urgent: Notify::new(),
            done: watch::channel((0, true)).0,
        }
    }
}

/// Why an operator's change may not survive a restart.
#[derive(Debug, PartialEq, Eq)]
pub enum NotDurable {
    /// The save failed (the error is logged).
    Failed,
    /// No save finished within the budget.
    Slow,
}

impl Persist {
    /// Writes the state file now, if one is configured, and waits until it is on disk.
    pub async fn durable(&self, shared: &Shared) -> Result<(), NotDurable> {
        if shared.state.snapshot().config.global.state_file.is_none() {
            return Ok(());
        }
        let want = self.asked.fetch_add(1, Relaxed) + 1;
        let mut rx = self.done.subscribe();
        self.urgent.notify_one();
        match tokio::time::timeout(DURABLE_WITHIN, rx.wait_for(|(g, _)| *g >= want)).await {
            Ok(Ok(r)) if r.1 => Ok(()),
            Ok(_) => Err(NotDurable::Failed),
            Err(_) => Err(NotDurable::Slow),
        }
    }
}

/// Writes the state file when asked and on schedule, until the process stops (the last save
/// is the stop's own).
pub async fn save_loop(shared: Arc<Shared>) {
    let persist = &shared.control.persist;
    let sessions_changed = &shared.gateway.registry.changed;
    let mut tick = tokio::time::interval(PERIOD);
    tick.tick().await;
    let mut failures = 0u64;
    // When the failure streak was last said at error level.
    let mut said: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = persist.urgent.notified() => {}
            _ = sessions_changed.notified() => {
                // A burst of new sessions is one write; an operator's command cuts the wait.
                tokio::select! {
                    _ = tokio::time::sleep(SESSION_DELAY) => {}
                    _ = persist.urgent.notified() => {}
                    _ = shared.life.stop_background.cancelled() => return,
                }
            }
            _ = shared.life.stop_background.cancelled() => return,
        }
        let covers = persist.asked.load(Relaxed);
        let ok = match save(&shared).await {
            Ok(()) => {
                if failures > 0 {
                    warn!("state file saved again after {failures} failed saves");
                    failures = 0;
                    said = None;
                }
                true
            }
            Err(e) => {
                failures += 1;
                // Every pin, session and drain since the last good save would be lost by a
                // restart: said at error level when a streak starts and every 10 minutes while
                // it lasts (saves come every second under session churn), at debug otherwise.
                if said.is_none_or(|t| t.elapsed() >= REMIND_EVERY) {
                    said = Some(tokio::time::Instant::now());
                    error!(
                        failures,
                        "state file NOT saved: {e}; a restart now would lose the pins, sessions and drains since the last save"
                    );
                } else {
                    debug!(failures, "state file still not saved: {e}");
                }
                false
            }
        };
        persist.done.send_replace((covers, ok));
        tick.reset();
    }
}

/// One save, off the runtime's threads (a million pins take a while to write).
pub async fn save(shared: &Arc<Shared>) -> Result<(), String> {
    let snap = shared.state.snapshot();
    let Some(path) = snap.config.global.state_file.clone() else {
        return Ok(());
    };
    let gw = shared.gateway.clone();
    let r = tokio::task::spawn_blocking(move || state_file::save(&snap, &gw.registry, &path)).await;
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("the save panicked: {e}")),
    }
}
