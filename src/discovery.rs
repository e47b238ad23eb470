//! Servers that come from somewhere other than the config file (a Kubernetes watch), fed in as
//! [`Update`]s through [`crate::control`] (`Change::Discovery`).
//!
//! A discovery source only says which servers exist; everything else — pins, health, drains,
//! counters, checkers — is handled exactly as for servers listed in the file: an update patches
//! the running snapshot with the servers it changes ([`crate::state::State::patch_discovered`])
//! and starts and retires them as a reload does; a complete relist rebuilds it as a reload does.
//! A source that fails keeps the last servers it reported: it sends nothing until it knows
//! better.
//!
//! [`sync_sources`] keeps one task per backend whose config declares a source (see
//! [`kubernetes`]), in [`Registry`]'s list of running sources: at start, and after each reload,
//! where an unchanged source keeps running and a removed or changed one is stopped.

pub mod kubernetes;

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::KubernetesDiscovery;
use crate::control::{self, Change};
pub use crate::discovered::{Discovered, Registry, SourceStatus, Update};

/// The running discovery source of each backend that has one. Also serialises delivery
/// against stopping (see [`deliver`]).
#[derive(Default)]
pub struct Sources(Mutex<HashMap<String, Running>>);

/// A running source: what it was started with, and what stops it.
struct Running {
    settings: KubernetesDiscovery,
    stop: CancellationToken,
}

/// Starts (or, after a reload, restarts) the discovery sources that the running config
/// declares. Sources for backends whose discovery settings did not change keep running; a
/// changed source is restarted and keeps its servers until its first list replaces them; a
/// removed source takes its servers with it (their live connections drain).
pub fn sync_sources(shared: &Arc<Shared>) {
    let snap = shared.state.snapshot();
    let wanted: HashMap<&str, &KubernetesDiscovery> = snap
        .config
        .backends
        .iter()
        .filter_map(|b| b.discovery.as_ref().map(|d| (b.name.as_str(), d)))
        .collect();
    let registry = &shared.state.discovered;
    let mut gone: Vec<String> = Vec::new();
    {
        let mut running = shared.discovery.0.lock();
        running.retain(|backend, r| {
            let keep = wanted.get(backend.as_str()) == Some(&&r.settings) && !r.stop.is_cancelled();
            if !keep {
                r.stop.cancel();
                tracing::info!(backend = %backend, "discovery source stopped");
                if !wanted.contains_key(backend.as_str()) {
                    gone.push(backend.clone());
                }
            }
            keep
        });
        if shared.life.stop_background.is_cancelled() {
            return;
        }
        for (backend, settings) in wanted {
            if running.contains_key(backend) {
                continue;
            }
            let stop = shared.life.stop_background.child_token();
            tracing::info!(backend = %backend, "discovery source started: {}", kubernetes::describe(settings));
            kubernetes::spawn(shared, backend.to_string(), settings.clone(), stop.clone());
            running.insert(
                backend.to_string(),
                Running {
                    settings: settings.clone(),
                    stop,
                },
            );
        }
    }
    for backend in gone {
        update(shared, &backend, vec![Update::Reset(Vec::new())]);
        registry.forget_status(&backend);
    }
}

/// Hands a source's update over unless the source has been stopped: checked and applied under
/// the lock that stopping takes, so a stopped source can never bring its servers back.
fn deliver(shared: &Arc<Shared>, backend: &str, stop: &CancellationToken, updates: Vec<Update>) {
    let _running = shared.discovery.0.lock();
    if !stop.is_cancelled() {
        self::update(shared, backend, updates);
    }
}

fn update(shared: &Arc<Shared>, backend: &str, updates: Vec<Update>) {
    let change = Change::Discovery {
        backend: backend.to_string(),
        updates,
    };
    let _ = control::apply(shared, change);
}
