//! Where an RPC goes, in order: a driver named by header, an on-demand driver for a new
//! session, then the session registry (pin, else balance).

use super::pool::{self, Pools};
use super::rpc::{Refusal, header, placement, session_ended, session_hash_ip};
use super::*;

/// The server named `name` (a discovered SparkConnect/SparkApplication, or a server of the
/// config) in `namespace`: discovery names servers `namespace/name` when it watches several
/// namespaces, `name` when it watches one.
pub(super) fn named_server(
    backend: &Backend,
    namespace: Option<&str>,
    name: &str,
) -> Option<Arc<Server>> {
    let qualified = namespace.map(|ns| format!("{ns}/{name}"));
    let watched_one = backend
        .config
        .discovery
        .as_ref()
        .map(|d| d.namespaces.as_slice());
    let plain_ok = match (namespace, watched_one) {
        (None, _) | (_, None) => true,
        (Some(ns), Some([only])) => only == ns,
        (Some(_), Some(_)) => false,
    };
    backend
        .servers
        .iter()
        .find(|s| qualified.as_deref() == Some(&*s.name) || (plain_ok && &*s.name == name))
        .cloned()
}

/// The driver a request names by header (`x-spark-session-id`, in `x-spark-namespace`), if
/// it names one; refused when no such driver serves, it takes no clients now, or it is an
/// unclaimed driver of a warm pool (it is kept for one new session of its own).
fn named_driver(
    backend: &Backend,
    headers: &http::HeaderMap,
    g: &crate::config::GrpcConfig,
    namespace: Option<&str>,
    pools: &Pools,
) -> Result<Option<(Arc<Server>, String)>, Refusal> {
    match header(headers, &g.route.session) {
        Some(name) => {
            let Some(s) = named_server(backend, namespace, name) else {
                return Err((
                    "not_found",
                    Status::new(
                        Code::NotFound,
                        format!(
                            "sclb: no SparkConnect or SparkApplication named {}{} serves in backend {}",
                            crate::escape::token(name),
                            namespace.map_or(String::new(), |ns| format!(
                                " in namespace {}",
                                crate::escape::token(ns)
                            )),
                            backend.config.name
                        ),
                    ),
                ));
            };
            if pools.is_unclaimed(namespace, name) {
                return Err((
                    "not_found",
                    Status::new(
                        Code::NotFound,
                        format!(
                            "sclb: {} is a warm-pool driver that no session has claimed yet; open a new session without {} to get one",
                            crate::escape::token(name),
                            g.route.session
                        ),
                    ),
                ));
            }
            if !s.takes_pinned_clients() {
                return Err((
                    "not_ready",
                    Status::unavailable(
                        format!("sclb: {name} is {}", s.status()),
                        Duration::from_secs(2),
                    ),
                ));
            }
            Ok(Some((s, name.to_string())))
        }
        None => Ok(None),
    }
}

/// The session an RPC belongs to and the server it goes to, by the gateway's three routes:
/// a header naming the driver, an on-demand driver for a new session, or the session's pin
/// (balanced when new).
pub(super) async fn route(
    cx: &Conn,
    backend: &Arc<Backend>,
    g: &crate::config::GrpcConfig,
    headers: &http::HeaderMap,
    method: Method,
    key: Option<&RoutingKey>,
    identity: Option<&crate::auth::Identity>,
) -> Result<(Option<Arc<Session>>, Arc<Server>, Option<bool>), Refusal> {
    let no_server = || {
        (
            "no_server",
            Status::unavailable(
                format!(
                    "sclb: no server of backend {} is available",
                    backend.config.name
                ),
                Duration::from_secs(1),
            ),
        )
    };
    let gw = &cx.shared.gateway;
    let namespace = header(headers, &g.route.namespace);
    // 1. A header names the driver.
    let named = named_driver(backend, headers, g, namespace, &gw.pools)?;
    let Some(k) = key else {
        if let Some((s, _)) = named {
            return Ok((None, s, None));
        }
        let (s, _) = backend
            .choose_pinned(None, cx.peer.ip(), &[])
            .ok_or_else(no_server)?;
        return Ok((None, s, None));
    };
    let skey = SessionKey {
        session_id: k.session_id.clone(),
        user_id: k.user_id.clone().unwrap_or_default(),
    };
    let ip = session_hash_ip(&skey);
    // A session belongs to the identity that opened it.
    if let Some(id) = identity
        && let Some(owner) = gw.registry.owner(&skey.session_id)
        && owner != id.user
    {
        info!(
            target: "sclb::audit",
            session = %skey.session_id,
            user = %id.user,
            owner = %owner,
            client = %cx.peer,
            "permission denied: {} used a Spark session that {} owns",
            id.user,
            owner
        );
        return Err((
            "not_owner",
            Status::new(
                Code::PermissionDenied,
                format!(
                    "sclb: Spark session {} belongs to another user",
                    skey.session_id
                ),
            ),
        ));
    }
    let live = match gw.registry.find(&skey) {
        Some(Err((reason, was))) => {
            // A client's cleanup after the end (PySpark releases executions in the background,
            // also after ReleaseSession) goes to the server that held the session, which
            // answers it as Spark does; anything else is told the session is over.
            if matches!(method, Method::ReleaseExecute | Method::ReleaseSession)
                && let Some(s) = backend.server(was.server)
            {
                return Ok((None, s.clone(), None));
            }
            return Err(session_ended(&skey, reason));
        }
        Some(Ok(s)) => Some(s),
        None => None,
    };
    let mut fixed = named.as_ref().map(|(s, _)| s.clone());
    // Some(pool hit) when this RPC placed a new session on a driver of its own.
    let mut first = None;
    // Not known here: a shared store knows whether another sclb (or this one before a
    // restart) placed it. On-demand sessions are placed by creating their driver.
    let live = match (live, gw.store.get()) {
        (None, Some(store)) if named.is_some() || g.on_demand.is_none() => {
            let candidate = match fixed.clone() {
                Some(s) => Some(s),
                None => backend.choose_pinned(None, ip, &[]).map(|(s, _)| s),
            };
            match candidate {
                Some(c) => {
                    // Boxed, as on_demand below: rare, large futures (store and Kubernetes
                    // calls) that every RPC's future would otherwise carry and copy.
                    let (live, place) = Box::pin(from_store(cx, backend, store, &skey, c)).await?;
                    fixed = place.or(fixed);
                    live
                }
                None => None,
            }
        }
        (live, _) => live,
    };
    let session = match live {
        Some(s) => s,
        None => {
            let meta = match &named {
                Some((_, name)) => SessionMeta {
                    app: Some(name.clone()),
                    namespace: namespace.map(str::to_string),
                    ..SessionMeta::default()
                },
                // 2. A new session, no header: its own driver.
                None if g.on_demand.is_some() => {
                    let (s, m, hit) =
                        Box::pin(on_demand(cx, backend, g, headers, &skey, identity)).await?;
                    fixed = Some(s);
                    first = Some(hit);
                    m
                }
                None => SessionMeta::default(),
            };
            // A driver this RPC created or claimed: deleted if the session is refused below
            // (it would serve nobody, and a refused client must not drain the pool).
            let own_driver = match (&meta.source, &meta.namespace, &meta.app) {
                (Some(src), Some(ns), Some(app)) if meta.created && first.is_some() => {
                    Some((src.clone(), ns.clone(), app.clone()))
                }
                _ => None,
            };
            // 3. A new session without a driver of its own: balanced (two first RPCs racing
            // agree on one server).
            let new = NewSession {
                meta,
                frontend: &cx.frontend,
                backend: &backend.config.name,
                client: cx.peer,
                max: g.max_sessions,
                client_key: super::quota::ClientKey::of(cx.peer, identity),
                per_client: per_client(g),
            };
            let admitted = gw.registry.admit(&skey, new, || match &fixed {
                Some(s) => Some(placement(s)),
                None => backend
                    .choose_pinned(None, ip, &[])
                    .map(|(s, _)| placement(&s)),
            });
            if !matches!(admitted, Some(Admit::Live { .. }))
                && let Some((src, ns, app)) = own_driver
            {
                let gw = cx.shared.gateway.clone();
                tokio::spawn(async move { gw.ondemand.delete(&src, &ns, &app).await });
            }
            match admitted {
                None => return Err(no_server()),
                Some(Admit::Full) => {
                    return Err((
                        "sessions_full",
                        Status::new(
                            Code::ResourceExhausted,
                            format!(
                                "sclb: {} Spark sessions are open, the most this gateway holds",
                                g.max_sessions
                            ),
                        ),
                    ));
                }
                Some(Admit::ClientLimit(why)) => {
                    let key = super::quota::ClientKey::of(cx.peer, identity);
                    let (reason, text) = match why {
                        super::quota::Refused::Live(n) => (
                            "client_sessions_full",
                            format!(
                                "sclb: client {key} holds {n} live Spark sessions, the most one \
                                 client may (sessions.max_per_client); stop one first"
                            ),
                        ),
                        super::quota::Refused::Rate(n) => (
                            "client_session_rate",
                            format!(
                                "sclb: client {key} opens new Spark sessions faster than {n} a \
                                 second (sessions.rate_per_client); retry shortly"
                            ),
                        ),
                    };
                    return Err((reason, Status::new(Code::ResourceExhausted, text)));
                }
                Some(Admit::Ended(reason)) => return Err(session_ended(&skey, reason)),
                Some(Admit::Live { session, .. }) => session,
            }
        }
    };
    // The session's pin: its server while that takes it, else a new one (a re-pin).
    let was = session.placement();
    let (server, choice) = match fixed {
        Some(s) if s.id == was.server => (s, Choice::Pinned),
        Some(s) => (s, Choice::Balanced),
        None => backend
            .choose_pinned(Some(was.server), ip, &[])
            .ok_or_else(no_server)?,
    };
    if choice != Choice::Pinned {
        session.move_to(placement(&server));
        backend.note_repin(cx.peer.ip(), was.server, server.id);
        info!(
            session = %crate::escape::token(&skey.session_id),
            client = %cx.peer,
            backend = %backend.config.name,
            from = %was.server_name,
            to = %server.name,
            "re-pin: Spark session moved from {} to {}; its state there is lost",
            was.server_name,
            server.name
        );
    }
    // CloneSession creates its new session on the source's server.
    if method == Method::CloneSession
        && let Some(new_id) = &k.new_session_id
    {
        let clone_key = SessionKey {
            session_id: new_id.clone(),
            user_id: skey.user_id.clone(),
        };
        let new = NewSession {
            meta: SessionMeta {
                created: false,
                ..session.meta.clone()
            },
            frontend: &cx.frontend,
            backend: &backend.config.name,
            client: cx.peer,
            max: g.max_sessions,
            client_key: super::quota::ClientKey::of(cx.peer, identity),
            per_client: per_client(g),
        };
        gw.registry
            .admit(&clone_key, new, || Some(placement(&server)));
    }
    Ok((Some(session), server, first))
}

fn per_client(g: &crate::config::GrpcConfig) -> super::quota::Limits {
    super::quota::Limits {
        max_live: g.max_per_client,
        per_second: g.rate_per_client,
    }
}

/// A session this process does not know, looked up in (or bound to) the shared store in one
/// round trip: the live session if another process (or this one before a restart) placed it,
/// else the server to place it on (`candidate`, now bound in the store).
async fn from_store(
    cx: &Conn,
    backend: &Arc<Backend>,
    store: &crate::store::SessionStore,
    skey: &SessionKey,
    candidate: Arc<Server>,
) -> Result<(Option<Arc<Session>>, Option<Arc<Server>>), Refusal> {
    use crate::store::{Binding, Bound};
    let binding = Binding {
        backend: backend.config.name.clone(),
        frontend: cx.frontend.to_string(),
        server: candidate.name.to_string(),
        server_addr: candidate.config_addr().to_string(),
        created_ms: crate::store::now_ms(),
    };
    match store.bind(skey, &binding).await {
        Ok(Bound::Ours) => Ok((None, Some(candidate))),
        Ok(Bound::Ended(reason)) => Err(session_ended(skey, reason)),
        Ok(Bound::Theirs { binding, active_ms }) => {
            let Some(server) = backend.servers.iter().find(|s| {
                *s.name == *binding.server && s.config_addr().to_string() == binding.server_addr
            }) else {
                info!(
                    session = %skey.session_id,
                    server = %binding.server,
                    "the store places this session on a server this sclb does not have: placing it anew"
                );
                return Ok((None, None));
            };
            let idle = Duration::from_millis(
                crate::store::now_ms().saturating_sub(active_ms).max(0) as u64,
            );
            let gw = &cx.shared.gateway;
            gw.registry.restore(registry::Restore {
                key: skey.clone(),
                meta: SessionMeta::default(),
                frontend: binding.frontend.as_str().into(),
                backend: backend.config.name.as_str().into(),
                placement: placement(server),
                created: std::time::UNIX_EPOCH
                    + Duration::from_millis(binding.created_ms.max(0) as u64),
                idle,
            });
            match gw.registry.find(skey) {
                Some(Ok(s)) => Ok((Some(s), None)),
                Some(Err((reason, _))) => Err(session_ended(skey, reason)),
                None => Ok((None, None)),
            }
        }
        Err(e) => {
            debug!(session = %skey.session_id, "store: {e}; binding the session here");
            store.bound_locally(skey.clone(), binding);
            Ok((None, Some(candidate)))
        }
    }
}

/// How long a first RPC waits for a replica that just started to read the session store.
const STORE_LISTED_WITHIN: Duration = Duration::from_secs(5);

/// Route 2: claims a Ready driver of the warm pool for a new session, else creates (or keeps
/// waiting for) its driver and returns it once discovery reports it ready, within
/// `ready_timeout`. The bool: whether the pool had one.
pub(super) async fn on_demand(
    cx: &Conn,
    backend: &Arc<Backend>,
    g: &crate::config::GrpcConfig,
    headers: &http::HeaderMap,
    skey: &SessionKey,
    identity: Option<&crate::auth::Identity>,
) -> Result<(Arc<Server>, SessionMeta, bool), Refusal> {
    let od = g.on_demand.as_ref().expect("checked by the caller");
    let Some(settings) = backend.config.discovery.clone() else {
        return Err((
            "on_demand",
            Status::new(
                Code::Internal,
                "sclb: on-demand drivers need a discovery source",
            ),
        ));
    };
    let gw = &cx.shared.gateway;
    // A driver the kubernetes store records for this session (another replica, or this one
    // before a restart, created it): the session's, whatever its name; no second one.
    let kube = gw.store.get().and_then(|s| s.kubernetes());
    if let Some(k) = kube
        && !k.is_listed()
        && !k.listed(STORE_LISTED_WITHIN).await
    {
        return Err((
            "not_ready",
            Status::unavailable(
                "sclb: this replica has not read the session store yet",
                Duration::from_secs(1),
            ),
        ));
    }
    if let Some(known) = kube.and_then(|k| k.driver_of(skey))
        && let crate::store::Place::Driver {
            namespace,
            name,
            team,
            environment,
        } = known.place
    {
        let (pending, _) = gw.ondemand.pending_or(skey, || ondemand::Pending {
            namespace,
            name,
            team,
            environment,
            since: Instant::now(),
        });
        return wait_for_driver(cx, backend, od, &settings, skey, pending)
            .await
            .map(|(s, m)| (s, m, false));
    }
    // With authentication on, team and environment come from the token, never from headers
    // a client can set.
    let label = |h: &str,
                 from_token: Option<&Option<String>>,
                 default: &Option<String>|
     -> Result<String, Refusal> {
        let v = match from_token {
            Some(t) => t.clone(),
            None => header(headers, h).map(str::to_string),
        }
        .or_else(|| default.clone());
        match v {
            Some(v) if crate::config::is_dns_label(&v) => Ok(v),
            Some(v) => Err((
                "bad_header",
                Status::new(
                    Code::InvalidArgument,
                    format!(
                        "sclb: header {h} {v:?} is not a DNS label (a-z, 0-9, '-', at most 63)"
                    ),
                ),
            )),
            None => Err((
                "bad_header",
                Status::new(
                    Code::InvalidArgument,
                    format!(
                        "sclb: a new Spark session needs header {h} to get its own driver (or {} to name one)",
                        g.route.session
                    ),
                ),
            )),
        }
    };
    let authed = identity.filter(|_| g.auth.is_some());
    let team = label(&g.route.team, authed.map(|i| &i.team), &od.default_team)?;
    let environment = label(
        &g.route.environment,
        authed.map(|i| &i.environment),
        &od.default_environment,
    )?;
    let (mut pending, is_new) = gw.ondemand.pending_or(skey, || ondemand::Pending {
        namespace: ondemand::fill(&od.namespace, &team, &environment, skey),
        name: ondemand::fill(&od.name, &team, &environment, skey),
        team: team.clone(),
        environment: environment.clone(),
        since: Instant::now(),
    });
    if is_new {
        if let Some(max) = od.max_sessions_per_team {
            let used =
                gw.registry.created_for_team(&team) + gw.ondemand.pending_for_team(&team) - 1;
            if used >= max {
                gw.ondemand.done(skey);
                return Err((
                    "team_full",
                    Status::new(
                        Code::ResourceExhausted,
                        format!(
                            "sclb: team {team} has {used} Spark sessions with their own driver, its limit (max_sessions_per_team)"
                        ),
                    ),
                ));
            }
        }
        let placed = (&*cx.frontend, backend.config.name.as_str());
        let claimed = match Pools::pooled(od, &team, &environment) {
            true => {
                let c = pool::Claim {
                    key: skey,
                    frontend: &cx.frontend,
                    backend,
                    team: &team,
                    environment: &environment,
                };
                gw.pools.claim(&gw.ondemand, &settings, od, c).await
            }
            false => None,
        };
        if let Some(p) = claimed {
            // A retried first RPC waits for the claimed driver, not the one not created.
            gw.ondemand.set_pending(skey, p.clone());
            pending = p;
            return wait_for_driver(cx, backend, od, &settings, skey, pending)
                .await
                .map(|(s, m)| (s, m, true));
        }
        if let Err(e) = gw
            .ondemand
            .create(&settings, od, &pending, skey, placed)
            .await
        {
            gw.ondemand.done(skey);
            return Err((
                "create_failed",
                Status::unavailable(
                    format!(
                        "sclb: cannot create {} {}/{}: {e}",
                        settings.kind, pending.namespace, pending.name
                    ),
                    Duration::from_secs(5),
                ),
            ));
        }
    }
    wait_for_driver(cx, backend, od, &settings, skey, pending)
        .await
        .map(|(s, m)| (s, m, false))
}

/// Holds a new session's first RPC until its driver is ready (discovery reports it), within
/// `ready_timeout` of its creation.
async fn wait_for_driver(
    cx: &Conn,
    backend: &Arc<Backend>,
    od: &crate::config::OnDemand,
    settings: &crate::config::KubernetesDiscovery,
    skey: &SessionKey,
    pending: ondemand::Pending,
) -> Result<(Arc<Server>, SessionMeta), Refusal> {
    let gw = &cx.shared.gateway;
    let deadline = pending.since + od.ready_timeout;
    loop {
        let snap = cx.shared.state.snapshot();
        if let Some(b) = snap.backend(&backend.config.name)
            && let Some(s) = named_server(b, Some(&pending.namespace), &pending.name)
            && s.takes_new_clients()
        {
            gw.ondemand.done(skey);
            let meta = SessionMeta {
                namespace: Some(pending.namespace.clone()),
                app: Some(pending.name.clone()),
                team: Some(pending.team.clone()),
                environment: Some(pending.environment.clone()),
                created: true,
                source: Some(settings.clone()),
            };
            return Ok((s, meta));
        }
        drop(snap);
        if Instant::now() >= deadline {
            return Err((
                "not_ready",
                Status::unavailable(
                    format!(
                        "sclb: driver {}/{} is not ready after {:?}; retry to keep waiting for it",
                        pending.namespace, pending.name, od.ready_timeout
                    ),
                    Duration::from_secs(5),
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
