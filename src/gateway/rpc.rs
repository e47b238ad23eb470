//! One RPC: peek at its first message for the Spark session, route it, forward it as a stream
//! to its server and relay the answer, with the session's bookkeeping on the way.

use super::route::route;
use super::*;

/// Reads the request body until the routing key is known (or cannot be), returning what was
/// read, the key, and whether the body has ended.
pub(super) async fn peek_key(
    method: Method,
    body: &mut Incoming,
) -> Result<(Bytes, Option<RoutingKey>, bool), hyper::Error> {
    let mut buf = BytesMut::new();
    let mut ended = body.is_end_stream();
    loop {
        match decode::routing_key(method, &buf) {
            Ok(k) => return Ok((buf.freeze(), Some(k), ended)),
            Err(DecodeError::NeedMore(_)) if !ended && buf.len() < PEEK_LIMIT => {}
            Err(DecodeError::NeedMore(_)) => {
                let k = decode::routing_key_best_effort(method, &buf).ok();
                return Ok((buf.freeze(), k, ended));
            }
            // Not a request Spark would accept either: forward it without a session and let
            // the server answer (INVALID_HANDLE.FORMAT and the like), as a direct client sees.
            Err(_) => return Ok((buf.freeze(), None, ended)),
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
                ended = body.is_end_stream();
            }
            Some(Err(e)) => return Err(e),
            None => ended = true,
        }
    }
}

/// Feeds `balance = "source"` in a gateway: the session, not the client, is hashed.
pub(super) fn session_hash_ip(k: &SessionKey) -> IpAddr {
    let mut h = DefaultHasher::new();
    k.hash(&mut h);
    let a = h.finish();
    k.session_id.hash(&mut h);
    IpAddr::V6(Ipv6Addr::from(
        (u128::from(a) << 64) | u128::from(h.finish()),
    ))
}

pub(super) fn placement(s: &Server) -> Placement {
    Placement {
        server: s.id,
        server_name: s.name.clone(),
    }
}

/// One RPC, from its request headers to the response handed back to hyper.
pub(super) async fn rpc(req: Request<Incoming>, cx: Arc<Conn>) -> Response<DownBody> {
    let arrived = Instant::now();
    let gw = cx.shared.gateway.clone();
    let path = req.uri().path().to_string();
    let Some(method) = decode::method(&path) else {
        return cx.refuse(
            "unknown",
            "unimplemented",
            Status::new(
                Code::Unimplemented,
                format!(
                    "sclb: {path} is not a Spark Connect method (this is a Spark Connect gateway)"
                ),
            ),
        );
    };
    let m = method.name();
    let snap = cx.shared.state.snapshot();
    let Some((fe, backend)) = snap.frontend(&cx.frontend).and_then(|fe| {
        let b = snap.backend(&fe.config.backend)?.clone();
        Some((fe.clone(), b))
    }) else {
        return cx.refuse(
            m,
            "no_frontend",
            Status::unavailable(
                "sclb: this frontend was removed by a reload",
                Duration::from_secs(1),
            ),
        );
    };
    drop(snap);
    // The first message comes with the request's headers from any Spark client: a stream that
    // holds it back holds buffers and a stream slot, so it gets the short request timeout.
    let first_message = fe.config.timeout_http_request;
    // Borrowed, not copied: a reload that turned this frontend to tcp leaves its live
    // connections with the defaults.
    let grpc_cfg = fe.config.grpc.as_ref().unwrap_or(&DEFAULT_GRPC);

    let (parts, mut body) = req.into_parts();
    let identity = match super::identity::authenticate(&cx, grpc_cfg, &parts.headers).await {
        Ok(id) => id,
        Err((reason, st)) => return cx.refuse(m, reason, st),
    };
    let (head, mut key, ended) =
        match tokio::time::timeout(first_message, peek_key(method, &mut body)).await {
            Ok(Ok(x)) => x,
            // The client reset the stream before its first message: nobody to answer.
            Ok(Err(_)) => {
                return status_response(&Status::new(Code::Cancelled, "client cancelled"));
            }
            Err(_) => {
                return cx.refuse(
                m,
                "client_timeout",
                Status::new(
                    Code::DeadlineExceeded,
                    format!(
                        "sclb: no request message within {first_message:?} (timeout http_request)"
                    ),
                ),
            );
            }
        };

    // The verified identity is the Spark user: the server keys its sessions by it, and the
    // request says so whatever the client wrote (see rewrite::UserInjector).
    let (head, inject) = match &identity {
        None => (head, None),
        Some(id) => {
            let Some(k) = key.as_mut() else {
                return cx.refuse(
                    m,
                    "bad_request",
                    Status::new(
                        Code::InvalidArgument,
                        "sclb: the request has no readable session_id",
                    ),
                );
            };
            k.user_id = Some(id.user.clone());
            match super::rewrite::UserInjector::start(&head, &id.user) {
                Ok((h, inj)) => (h, Some(inj)),
                Err(e) => {
                    return cx.refuse(
                        m,
                        "bad_request",
                        Status::new(Code::InvalidArgument, format!("sclb: {e}")),
                    );
                }
            }
        }
    };
    let (session, server, pool_hit) = match route(
        &cx,
        &backend,
        grpc_cfg,
        &parts.headers,
        method,
        key.as_ref(),
        identity.as_deref(),
    )
    .await
    {
        Ok(r) => r,
        Err((reason, st)) => return cx.refuse(m, reason, st),
    };
    // Tell an on-demand (or header-routed) session's client the name of its driver.
    let app_header = session
        .as_ref()
        .and_then(|s| s.meta.app.as_deref())
        .and_then(|a| HeaderValue::from_str(a).ok())
        .map(|v| (grpc_cfg.route.session.clone(), v));

    let (sender, server) = match connect(&cx, &backend, session.as_ref(), server).await {
        Ok(x) => x,
        Err((reason, st)) => return cx.refuse(m, reason, st),
    };

    server.counters.lbtot.fetch_add(1, Relaxed);
    let guard = session.as_ref().map(|s| s.rpc_started(cx.peer));
    let server_stream = ServerStream::start(&server);
    let track = Arc::new(Track {
        session: session.clone(),
        server: server.clone(),
        frontend: cx.fe_counters.clone(),
    });
    let up = match upstream_request(parts, &server, &path, &backend.config) {
        // A rewritten body has a new length.
        Ok(mut up) if inject.is_some() => {
            up.headers_mut().remove(header::CONTENT_LENGTH);
            up
        }
        Ok(up) => up,
        Err((reason, st)) => return cx.refuse(m, reason, st),
    };

    let t0 = Instant::now();
    let mut kill = kill_signal(session.as_ref(), &server);
    let upstream_failed = |server: &Server, e: &dyn std::fmt::Display| {
        server.counters.resp_errors.fetch_add(1, Relaxed);
        (
            "upstream_failed",
            Status::unavailable(
                format!("sclb: server {} did not answer: {e}", server.name),
                Duration::from_millis(100),
            ),
        )
    };
    // From here the server has `timeout.server` to take the stream and answer its headers.
    let timeout_server = backend.config.timeout_server;
    let answer_by = t0
        .checked_add(timeout_server)
        .unwrap_or_else(|| t0 + crate::config::reader::MAX_DURATION);
    let no_answer = |server: &Server| {
        server.counters.resp_errors.fetch_add(1, Relaxed);
        no_answer(session.as_ref(), &backend, server, timeout_server)
    };
    // One timer for both waits below (a timer entry per wait was two per RPC).
    let deadline = tokio::time::sleep_until(answer_by);
    tokio::pin!(deadline);
    // Room for another stream on the server's connection (its SETTINGS limit). Biased: the
    // connection almost always has room, and then neither the kill signal nor the timer is
    // polled (registered) for this wait.
    let mut sender = tokio::select! {
        biased;
        r = sender.ready() => match r {
            Ok(s) => s,
            Err(e) => {
                let (reason, st) = upstream_failed(&server, &e);
                return cx.refuse(m, reason, st);
            }
        },
        st = &mut kill => return cx.refuse(m, "session_closed", st),
        () = &mut deadline => {
            let (reason, st) = no_answer(&server);
            return cx.refuse(m, reason, st);
        }
    };
    // HEADERS and the first bytes go out together (h2 buffers DATA until the stream opens).
    let eos = ended && head.is_empty();
    let (resp_fut, mut tx) = match sender.send_request(up, eos) {
        Ok(r) => r,
        Err(e) => {
            let (reason, st) = upstream_failed(&server, &e);
            return cx.refuse(m, reason, st);
        }
    };
    if !head.is_empty() {
        track.upstream(head.len() as u64);
        let _ = tx.send_data(head, ended);
    }
    if !ended {
        tokio::spawn(body::pump(
            body,
            tx,
            track.clone(),
            kill_signal(session.as_ref(), &server),
            inject,
        ));
    }
    let resp = tokio::select! {
        r = resp_fut => r,
        st = &mut kill => return cx.refuse(m, "session_closed", st),
        () = &mut deadline => {
            // Dropping the response future resets the server's stream.
            let (reason, st) = no_answer(&server);
            return cx.refuse(m, reason, st);
        }
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let (reason, st) = upstream_failed(&server, &e);
            return cx.refuse(m, reason, st);
        }
    };
    gw.registry
        .metrics
        .latency(method, t0.elapsed().as_secs_f64());
    // The first RPC of a session on a driver of its own: how long its user waited.
    if let Some(hit) = pool_hit {
        gw.pools.first_response(hit, arrived.elapsed());
    }
    let (parts, inner) = resp.into_parts();
    if inner.is_end_stream() {
        // Trailers-only: the status is in the headers.
        gw.rpc_finished(method, session.as_ref(), &parts.headers);
        return with_app(Response::from_parts(parts, DownBody::Empty), app_header);
    }
    let resp = Response::from_parts(
        parts,
        DownBody::Stream(Box::new(DownStream {
            inner,
            data_done: false,
            track,
            kill,
            method,
            gateway: gw.clone(),
            guard,
            server_stream,
            done: false,
            redact: (method == Method::Config)
                .then(|| backend.config.backend_token.clone())
                .flatten()
                .map(|token| body::Redact {
                    token,
                    buf: BytesMut::new(),
                }),
        })),
    );
    with_app(resp, app_header)
}

/// Connects to `server` (or reuses its connection). A session's first RPC, or one without a
/// session, may move to another server; a session with a history stays and the client
/// retries (its state is on that server).
async fn connect(
    cx: &Conn,
    backend: &Backend,
    session: Option<&Arc<Session>>,
    mut server: Arc<Server>,
) -> Result<(upstream::Sender, Arc<Server>), Refusal> {
    let gw = &cx.shared.gateway;
    let cfg = &backend.config;
    let mut tried = Vec::new();
    loop {
        match gw.upstreams.to(&server, cfg).await {
            Ok(s) => return Ok((s, server)),
            Err(e) => {
                server.counters.conn_errors.fetch_add(1, Relaxed);
                tried.push(server.id);
                let movable = session.is_none_or(|s| s.rpcs.load(Relaxed) == 0);
                let ip = session.map_or(cx.peer.ip(), |s| session_hash_ip(&s.key));
                if movable
                    && tried.len() <= cfg.retries as usize
                    && let Some((next, _)) = backend.choose_pinned(None, ip, &tried)
                {
                    server.counters.redispatches.fetch_add(1, Relaxed);
                    debug!(server = %server.name, "gateway connect failed: {e}; trying {}", next.name);
                    if let Some(s) = session {
                        s.move_to(placement(&next));
                    }
                    server = next;
                    continue;
                }
                return Err((
                    "connect_failed",
                    Status::unavailable(
                        format!(
                            "sclb: cannot reach server {} ({}): {e}",
                            server.name,
                            server.addr()
                        ),
                        Duration::from_secs(1),
                    ),
                ));
            }
        }
    }
}

/// A server that took no stream or sent no response headers within `timeout.server`. A
/// session whose first RPC this was moves to another server (the client's retry lands there);
/// a session with history stays (its state is on that server) and is told so.
fn no_answer(
    session: Option<&Arc<Session>>,
    backend: &Backend,
    server: &Server,
    timeout: Duration,
) -> Refusal {
    let fresh = session.is_none_or(|s| s.rpcs.load(Relaxed) <= 1);
    let moved = match session {
        Some(s) if fresh => backend
            .choose_pinned(None, session_hash_ip(&s.key), &[server.id])
            .map(|(next, _)| {
                s.move_to(placement(&next));
                s.unanswered();
                next.name.clone()
            }),
        _ => None,
    };
    let message = match (moved, session) {
        (Some(next), _) => format!(
            "sclb: server {} sent no response within {timeout:?} (timeout server); \
             retry: this new session now goes to {next}",
            server.name
        ),
        (None, Some(s)) if !fresh => format!(
            "sclb: server {} sent no response within {timeout:?} (timeout server); \
             Spark session {} stays there, where its state is",
            server.name, s.key.session_id
        ),
        (None, _) => format!(
            "sclb: server {} sent no response within {timeout:?} (timeout server)",
            server.name
        ),
    };
    (
        "server_timeout",
        Status::unavailable(message, Duration::from_secs(1)),
    )
}

/// The client's request as it goes to `server`: its URI pointed there, hop-by-hop headers
/// removed.
fn upstream_request(
    parts: http::request::Parts,
    server: &Server,
    path: &str,
    cfg: &crate::config::Backend,
) -> Result<Request<()>, Refusal> {
    let backend_token = cfg.backend_token.as_ref();
    let mut up = Request::from_parts(parts, ());
    // The client's path as it came (a cheap clone), and the server's cached authority:
    // nothing formatted or parsed per RPC.
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(if cfg.server_tls.is_some() {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    let bad_path = |e: &dyn std::fmt::Display| {
        (
            "bad_path",
            Status::new(
                Code::InvalidArgument,
                format!("sclb: bad request path: {e}"),
            ),
        )
    };
    uri.authority = match server.authority() {
        Some(a) => Some(a),
        None => Some(
            http::uri::Authority::try_from(server.addr().to_string()).map_err(|e| bad_path(&e))?,
        ),
    };
    uri.path_and_query = match up.uri().path_and_query() {
        Some(pq) => Some(pq.clone()),
        None => Some(http::uri::PathAndQuery::try_from(path).map_err(|e| bad_path(&e))?),
    };
    *up.uri_mut() = Uri::from_parts(uri).map_err(|e| bad_path(&e))?;
    for h in [
        header::CONNECTION,
        header::HOST,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        // The client's credentials are for sclb, never for a server.
        header::AUTHORIZATION,
    ] {
        up.headers_mut().remove(h);
    }
    if let Some(t) = backend_token
        && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", t.0))
    {
        v.set_sensitive(true);
        up.headers_mut().insert(header::AUTHORIZATION, v);
    }
    Ok(up)
}

pub(super) fn with_app(
    mut r: Response<DownBody>,
    app: Option<(String, HeaderValue)>,
) -> Response<DownBody> {
    if let Some((name, v)) = app
        && let Ok(name) = http::HeaderName::from_bytes(name.as_bytes())
    {
        r.headers_mut().insert(name, v);
    }
    r
}

pub(super) type Refusal = (&'static str, Status);

/// What a client still using an ended session is told.
pub(super) fn session_ended(k: &SessionKey, reason: EndReason) -> Refusal {
    (
        "session_ended",
        Status::new(
            Code::FailedPrecondition,
            format!(
                "sclb: Spark session {} {}; stop it and create a new SparkSession",
                k.session_id,
                reason.explain()
            ),
        ),
    )
}

pub(super) fn header<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}
