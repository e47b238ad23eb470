//! A new snapshot — from a reload or a discovery update — and what follows it: checkers start
//! for new servers, removed servers are retired (their pins go, their live connections drain),
//! listeners and limits follow the config.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{info, warn};

use crate::Shared;
use crate::config::Config;
use crate::discovered::{Changed, Update};
use crate::server::{Server, ServerId, Writer};
use crate::state::Snapshot;

/// Applies a validated config, carrying live state; on a listener that cannot bind, puts the
/// old snapshot back and changes nothing. The caller then restarts the discovery sources the
/// new config declares ([`crate::discovery::sync_sources`]).
pub(super) fn reload(
    w: &Writer,
    shared: &Arc<Shared>,
    config: Config,
) -> Result<String, super::ControlError> {
    let old_cfg = shared.state.snapshot().config.clone();
    let summary = crate::config::diff::summary(&old_cfg, &config);
    let (now, later) = global_changes(&old_cfg.global, &config.global);
    let new_maxconn = config.global.maxconn.min(shared.data.fd_cap);
    // Servers added with `add server` stay, in the backends the new file still has, unless
    // the file now names a server so (it then comes from the file).
    let dynamic = {
        let mut d = shared.state.dynamic.lock();
        let before = d.clone();
        d.retain(|backend, added| {
            let Some(b) = config.backends.iter().find(|b| b.name == *backend) else {
                return false;
            };
            added.retain(|s| !b.servers.iter().any(|c| c.name == s.name));
            !added.is_empty()
        });
        before
    };
    let (old, new) = shared.state.apply(w, config);
    if let Err(e) = shared.sync_listeners() {
        let created: Vec<_> = new
            .all_servers()
            .filter(|(_, s)| !old.all_servers().any(|(_, o)| o.id == s.id))
            .map(|(_, s)| s.clone())
            .collect();
        *shared.state.dynamic.lock() = dynamic;
        shared.state.restore(w, old);
        for s in created {
            s.retired.cancel();
        }
        return Err(super::ControlError::Reload(e.to_string()));
    }
    // From what is in force, which `set maxconn global` may have changed since the last file.
    let old_maxconn = shared.control.global_maxconn.swap(new_maxconn, Relaxed);
    crate::server::resize_semaphore(&shared.data.maxconn, old_maxconn, new_maxconn);
    after_snapshot(shared, &old, &new);
    if !now.is_empty() {
        info!("reload: {} changed and apply now", now.join(", "));
    }
    if !later.is_empty() {
        warn!(
            "reload: {} changed but take effect only at the next restart; the running values stay until then",
            later.join(", ")
        );
    }
    Ok(summary)
}

/// Applies a discovery update for `backend`: the snapshot is patched with the servers it
/// changed (rebuilt after a relist), then checkers start for the new servers and the removed
/// ones are retired, as on a reload; state file entries that waited for these servers apply
/// now.
pub(super) fn discovery(w: &Writer, shared: &Arc<Shared>, backend: &str, updates: Vec<Update>) {
    match shared.state.discovered.apply(backend, updates) {
        Changed::Nothing => return,
        Changed::All => {
            let (old, new) = shared.state.refresh(w);
            after_snapshot(shared, &old, &new);
        }
        Changed::Servers(uids) => {
            let Some(p) = shared.state.patch_discovered(w, backend, &uids) else {
                return;
            };
            let report = super::checker_report(shared);
            for s in &p.added {
                crate::health::spawn_checker(s.clone(), &report, &shared.life.stop_background);
            }
            let stick = p.new.backend(backend).and_then(|b| b.stick.clone());
            for s in &p.removed {
                retire(s, stick.as_deref());
            }
        }
    }
    super::restore::retry_pending(w, shared);
}

/// A server that takes no more clients: its checker stops, its pins go, its sessions drain.
fn retire(s: &Server, stick: Option<&crate::stick_table::StickTable>) {
    s.retired.cancel();
    if let Some(t) = stick {
        t.forget_server(s.id);
    }
}

/// Rebuilds the snapshot from the running config, e.g. once servers removed by a reload have
/// finished draining.
pub(super) fn refresh(w: &Writer, shared: &Arc<Shared>) {
    refresh_now(w, shared);
}

/// Rebuilds the snapshot now (`add server`, `del server`).
pub(super) fn refresh_now(w: &Writer, shared: &Arc<Shared>) {
    let (old, new) = shared.state.refresh(w);
    after_snapshot(shared, &old, &new);
}

/// After a new snapshot: start checkers for new servers, retire removed ones (their pins go;
/// their live connections drain).
fn after_snapshot(shared: &Arc<Shared>, old: &Snapshot, new: &Snapshot) {
    // A set, not a search per server: a discovery update runs this for every batch of events.
    let old_ids: HashSet<ServerId> = old.all_servers().map(|(_, s)| s.id).collect();
    let report = super::checker_report(shared);
    for (_, s) in new.all_servers() {
        if !old_ids.contains(&s.id) || !s.checker_running() {
            crate::health::spawn_checker(s.clone(), &report, &shared.life.stop_background);
        }
    }
    for (ob, s) in old.all_servers() {
        // Taking clients in the new snapshot (not merely leaving, with connections to finish):
        // the backend's index of its servers answers that.
        let still = new
            .backend(&ob.config.name)
            .is_some_and(|nb| nb.server(s.id).is_some());
        if !still {
            let stick = new.backend(&ob.config.name).and_then(|b| b.stick.clone());
            retire(s, stick.as_deref());
        }
    }
}

/// The `[global]` settings a reload changed: those that apply at once, and those that only a
/// restart applies (sockets bound, threads started and the log set up at start). Said apart
/// so that the log is true about both.
pub fn global_changes(
    old: &crate::config::Global,
    new: &crate::config::Global,
) -> (Vec<&'static str>, Vec<&'static str>) {
    let (mut now, mut later) = (Vec::new(), Vec::new());
    let mut note = |changed: bool, name: &'static str, at_once: bool| {
        if changed {
            if at_once {
                now.push(name);
            } else {
                later.push(name);
            }
        }
    };
    note(old.maxconn != new.maxconn, "global.maxconn", true);
    note(
        old.hard_stop_after != new.hard_stop_after,
        "global.hard_stop_after",
        true,
    );
    note(old.state_file != new.state_file, "global.state_file", true);
    let (os, ns) = (old.stats.as_ref(), new.stats.as_ref());
    note(
        os.map(|s| &s.admin_token) != ns.map(|s| &s.admin_token),
        "global.stats.admin_token",
        true,
    );
    note(
        os.map(|s| s.refresh) != ns.map(|s| s.refresh),
        "global.stats.refresh",
        true,
    );
    note(
        os.map(|s| (s.bind, s.maxconn, s.timeout)) != ns.map(|s| (s.bind, s.maxconn, s.timeout)),
        "global.stats (bind, maxconn, timeout)",
        false,
    );
    note(old.admin != new.admin, "global.admin", false);
    note(old.log != new.log, "global.log", false);
    note(old.threads != new.threads, "global.threads", false);
    note(old.splice != new.splice, "global.splice", false);
    note(old.run_as != new.run_as, "global.user/group", false);
    note(old.store != new.store, "global.store", false);
    (now, later)
}
