//! Sessions' lifetimes: the reaper (idle and TTL), an operator's kill, and releasing ended
//! sessions on their servers.

use super::*;
use tracing::warn;

/// Ends idle and over-age sessions every `cleanup_interval` (the shortest of the gateway
/// frontends'), releases them on their servers, and forgets upstream connections to servers
/// that are gone.
pub async fn reaper(shared: Arc<Shared>) {
    loop {
        let snap = shared.state.snapshot();
        let interval = snap
            .frontends
            .iter()
            .filter_map(|f| f.config.grpc.as_ref().map(|g| g.cleanup_interval))
            .min()
            .unwrap_or(Duration::from_secs(60));
        drop(snap);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.life.stop_background.cancelled() => return,
        }
        match shared.gateway.store.get() {
            Some(store) => reap_shared(&shared, store).await,
            None => {
                reap_once(&shared);
            }
        }
    }
}

/// The reaper with a shared store: a session idle here may be busy at another sclb, so the
/// store ends it only if it agrees (its recorded activity is older than the idle timeout
/// too); otherwise this process takes the other's activity as its own. While the store is
/// unreachable only TTLs are enforced.
async fn reap_shared(shared: &Arc<Shared>, store: &crate::store::SessionStore) {
    let snap = shared.state.snapshot();
    let limits = |fe: &str| session_limits(&snap, fe);
    let gw = &shared.gateway;
    let now = crate::store::now_ms();
    let due: Vec<(SessionKey, EndReason, i64)> = gw
        .registry
        .due(limits)
        .into_iter()
        .map(|(k, r)| {
            let idle = gw
                .registry
                .find(&k)
                .and_then(Result::ok)
                .map_or(DEFAULT_GRPC.idle_timeout, |s| limits(&s.frontend).0);
            let cutoff = match r {
                EndReason::Ttl => i64::MAX,
                _ => now.saturating_sub(idle.as_millis() as i64),
            };
            (k, r, cutoff)
        })
        .collect();
    drop(snap);
    let end: Vec<(SessionKey, EndReason)> = match store.end_if_idle(&due).await {
        Ok((ended, busy)) => {
            for (k, active_ms) in busy {
                if let Some(Ok(s)) = gw.registry.find(&k) {
                    s.seen(Duration::from_millis(
                        now.saturating_sub(active_ms).max(0) as u64
                    ));
                }
            }
            due.iter()
                .filter(|(k, _, _)| ended.contains(k))
                .map(|(k, r, _)| (k.clone(), *r))
                .collect()
        }
        Err(_) => due
            .iter()
            .filter(|(_, r, _)| *r == EndReason::Ttl)
            .map(|(k, r, _)| (k.clone(), *r))
            .collect(),
    };
    let reaped: Vec<Arc<Session>> = end
        .into_iter()
        .filter_map(|(k, r)| gw.registry.end(&k, r))
        .collect();
    release_sessions(shared, &reaped);
    if let Some(k) = store.kubernetes() {
        let snap = shared.state.snapshot();
        k.housekeep(
            |key| matches!(gw.registry.find(key), Some(Ok(_))),
            |fe| session_limits(&snap, fe),
        )
        .await;
    }
}

/// How often pins used since are written to the shared store (their expiry extended).
const PIN_REFRESH: Duration = Duration::from_secs(30);

/// The shared-pin backends' entries used within `within` (their expiry was refreshed).
fn refreshed_pins(shared: &Shared, within: Duration) -> Vec<crate::store::PinWrite> {
    let snap = shared.state.snapshot();
    let now = crate::store::now_ms();
    let mut out = Vec::new();
    for b in &snap.backends {
        let Some(t) = &b.stick else { continue };
        if !b.config.stick.as_ref().is_some_and(|s| s.shared) {
            continue;
        }
        let recent = t.expire().saturating_sub(within);
        for e in t.entries() {
            if e.expires_in < recent {
                continue;
            }
            let Some(s) = b.server(e.server) else {
                continue;
            };
            out.push(crate::store::PinWrite {
                backend: b.config.name.clone(),
                client: e.key.to_string(),
                server: s.name.to_string(),
                server_addr: s.config_addr().to_string(),
                expires_ms: now.saturating_add(e.expires_in.as_millis() as i64),
                overwrite: false,
            });
        }
    }
    out
}

/// Keeps this process and the shared store in step every `sync_interval`: writes activity,
/// ends and the sessions bound while the store was away; ends here what others ended.
pub async fn store_sync(shared: Arc<Shared>, store: crate::store::SessionStore) {
    let gw = &shared.gateway;
    gw.registry.keep_journal();
    let mut since = crate::store::now_ms();
    let mut down_logged = false;
    let mut pins_written = std::time::Instant::now();
    loop {
        if pins_written.elapsed() >= PIN_REFRESH
            && let Some(pg) = store.postgres()
        {
            pg.pins_to_write(refreshed_pins(&shared, pins_written.elapsed()));
            pins_written = std::time::Instant::now();
        }
        for (k, r) in gw.registry.take_journal() {
            store.ended_here(k, r);
        }
        let activity = gw.registry.activity_to_write();
        match store.sync(since, activity).await {
            Ok(synced) => {
                down_logged = false;
                since = since.max(synced.latest_end_ms);
                let mut ended = Vec::new();
                for (k, r) in synced.ended {
                    if let Some(s) = gw.registry.end(&k, r) {
                        ended.push(s);
                    }
                }
                // Ended elsewhere: the other sclb released them on their servers already.
                drop(ended);
                let snap = shared.state.snapshot();
                for k in synced.known {
                    if let Some(again) = take_known(&shared, &snap, k)
                        && let Some(kube) = store.kubernetes()
                    {
                        kube.again(again);
                    }
                }
                for (k, binding) in synced.moved {
                    let Some(Ok(s)) = gw.registry.find(&k) else {
                        continue;
                    };
                    let Some(b) = snap.backend(&s.backend) else {
                        continue;
                    };
                    if let Some(to) = b.servers.iter().find(|x| *x.name == *binding.server) {
                        let was = s.placement();
                        warn!(
                            session = %k.session_id,
                            from = %was.server_name,
                            to = %to.name,
                            "store conflict: another sclb bound this session to {} while the store was unreachable; it goes there (the first binding wins)",
                            to.name
                        );
                        s.move_to(registry::Placement {
                            server: to.id,
                            server_name: to.name.clone(),
                        });
                    }
                }
            }
            Err(e) => {
                if !down_logged {
                    warn!(
                        "session store: {e}; retrying every {:?}",
                        store.sync_interval()
                    );
                    down_logged = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(store.sync_interval()) => {}
            _ = shared.life.stop_background.cancelled() => {
                // Last writes on the way out: ends and activity of this process.
                for (k, r) in gw.registry.take_journal() {
                    store.ended_here(k, r);
                }
                let _ = store.sync(since, gw.registry.activity_to_write()).await;
                return;
            }
        }
    }
}

/// A session a watching store holds: its activity if it is live here, else put in the
/// registry where it runs (a replica that never saw it routes it there). One whose server
/// or driver is not (yet) in the backend waits for the next change of its record.
fn take_known(
    shared: &Shared,
    snap: &crate::state::Snapshot,
    k: crate::store::Known,
) -> Option<SessionKey> {
    use crate::store::Place;
    let gw = &shared.gateway;
    let idle =
        Duration::from_millis(crate::store::now_ms().saturating_sub(k.active_ms).max(0) as u64);
    match gw.registry.find(&k.key) {
        Some(Ok(s)) => {
            s.seen(idle);
            return None;
        }
        Some(Err(_)) => return None,
        None => {}
    }
    let Some(b) = snap.backend(&k.backend) else {
        return Some(k.key);
    };
    let (server, meta) = match &k.place {
        Place::Server { name, addr } => (
            b.servers
                .iter()
                .find(|s| *s.name == **name && s.config_addr().to_string() == *addr)
                .cloned(),
            SessionMeta::default(),
        ),
        Place::Driver {
            namespace,
            name,
            team,
            environment,
        } => (
            route::named_server(b, Some(namespace), name),
            SessionMeta {
                namespace: Some(namespace.clone()),
                app: Some(name.clone()),
                team: Some(team.clone()).filter(|t| !t.is_empty()),
                environment: Some(environment.clone()).filter(|e| !e.is_empty()),
                created: true,
                source: b.config.discovery.clone(),
            },
        ),
    };
    let Some(server) = server else {
        return Some(k.key);
    };
    let restored = gw.registry.restore(registry::Restore {
        key: k.key.clone(),
        meta,
        frontend: k.frontend.as_str().into(),
        backend: b.config.name.as_str().into(),
        placement: registry::Placement {
            server: server.id,
            server_name: server.name.clone(),
        },
        created: std::time::UNIX_EPOCH + Duration::from_millis(k.created_ms.max(0) as u64),
        idle,
    });
    if restored {
        debug!(session = %crate::escape::token(&k.key.session_id), server = %server.name, "session taken from the store");
    }
    None
}

/// A gateway frontend's (idle timeout, max TTL) for its sessions.
fn session_limits(snap: &crate::state::Snapshot, frontend: &str) -> (Duration, Duration) {
    let g = snap
        .frontend(frontend)
        .and_then(|f| f.config.grpc.as_ref())
        .unwrap_or(&DEFAULT_GRPC);
    (g.idle_timeout, g.max_ttl)
}

/// One pass of the reaper.
pub fn reap_once(shared: &Arc<Shared>) -> usize {
    let snap = shared.state.snapshot();
    let limits = |fe: &str| session_limits(&snap, fe);
    let gw = &shared.gateway;
    let reaped: Vec<Arc<Session>> = gw
        .registry
        .reap(limits)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    release_sessions(shared, &reaped);
    // Drivers created for sessions whose first RPC was given up on long ago.
    for fe in &snap.frontends {
        let Some(g) = &fe.config.grpc else { continue };
        let (Some(od), Some(b)) = (&g.on_demand, snap.backend(&fe.config.backend)) else {
            continue;
        };
        let Some(settings) = b.config.discovery.clone() else {
            continue;
        };
        for p in gw.ondemand.abandoned(od.ready_timeout + g.idle_timeout) {
            let gw = shared.gateway.clone();
            let settings = settings.clone();
            tokio::spawn(async move { gw.ondemand.delete(&settings, &p.namespace, &p.name).await });
        }
    }
    gw.upstreams.retain(|id, addr| {
        snap.all_servers()
            .any(|(_, s)| s.id == id && s.addr() == addr)
    });
    reaped.len()
}

/// `kill session <id>` and `DELETE /sessions/{id}`: ends every live session with that id,
/// releases it on its server and deletes its driver if sclb created one. False if none was
/// live.
pub fn kill_session(shared: &Arc<Shared>, id: &str, by: &str) -> bool {
    let killed = shared.gateway.registry.kill(id);
    if killed.is_empty() {
        return false;
    }
    info!(session = %id, "Spark session killed {by}");
    release_sessions(shared, &killed);
    true
}

/// Releases sessions sclb ended on their servers, and deletes the drivers it created for
/// them, in the background.
pub fn release_sessions(shared: &Arc<Shared>, ended: &[Arc<Session>]) {
    let snap = shared.state.snapshot();
    for s in ended {
        shared.gateway.delete_driver(s);
        let Some(b) = snap.backend(&s.backend) else {
            continue;
        };
        if let Some(server) = b.server(s.placement().server).cloned() {
            let (gw, key, cfg) = (shared.gateway.clone(), s.key.clone(), b.config.clone());
            tokio::spawn(async move { release_on_server(&gw, &server, &key, &cfg).await });
        }
    }
}

/// A session as `show sessions` and `GET /sessions` show it.
pub fn session_json(s: &Session) -> serde_json::Value {
    let p = s.placement();
    serde_json::json!({
        "session_id": s.key.session_id,
        "user_id": s.key.user_id,
        "frontend": &*s.frontend,
        "backend": &*s.backend,
        "server": &*p.server_name,
        "client": s.client().to_string(),
        "created": humantime::format_rfc3339_seconds(s.created).to_string(),
        "age_s": s.age().as_secs(),
        "idle_s": s.idle_for().as_secs(),
        "rpcs": s.rpcs.load(Relaxed),
        "streams": s.streams.load(Relaxed),
        "namespace": s.meta.namespace,
        "app": s.meta.app,
        "team": s.meta.team,
        "environment": s.meta.environment,
        "created_driver": s.meta.created,
    })
}

/// Sends `ReleaseSession` for a session sclb closed, so the server frees its state (cached
/// frames, temp views) now rather than at its own idle timeout. Best effort.
async fn release_on_server(
    gw: &Gateway,
    server: &Server,
    key: &SessionKey,
    cfg: &crate::config::Backend,
) {
    let call = gw
        .upstreams
        .call(server, cfg, "ReleaseSession", release_session_request(key));
    let session = crate::escape::token(&key.session_id);
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok((code, _))) => {
            debug!(session = %session, server = %server.name, "ReleaseSession sent: {}", grpc_code_name(code))
        }
        Ok(Err(e)) => {
            debug!(session = %session, server = %server.name, "ReleaseSession failed: {e}")
        }
        Err(_) => {
            debug!(session = %session, server = %server.name, "ReleaseSession timed out")
        }
    }
}

/// `ReleaseSessionRequest` for `key`, framed for gRPC.
pub(super) fn release_session_request(key: &SessionKey) -> Bytes {
    spark_proto::grpc_frame(&spark_proto::ReleaseSessionRequest {
        session_id: key.session_id.clone(),
        user_context: Some(spark_proto::UserContext {
            user_id: key.user_id.clone(),
        }),
        client_type: Some("sclb".into()),
    })
}
