//! Gateway mode (`mode = "grpc"`): an L7 Spark Connect proxy. Each client connection is served
//! as HTTP/2; each RPC is forwarded as a stream on a shared HTTP/2 connection to its server,
//! routed by the Spark session it belongs to (its `session_id` and `user_id`, read from the
//! first request message by [`decode`]) rather than by the client's address: sessions from one
//! client IP or NAT spread over the servers, and a client that changes address keeps its
//! session.
//!
//! - [`registry`]: session → server, activity, idle/TTL reaping, the `spark_connect_*` metrics.
//! - [`upstream`]: one HTTP/2 connection per server and worker thread.
//! - [`ondemand`]: drivers created per session on Kubernetes.
//! - [`body`]: the two bodies of a forwarded RPC (bytes, activity, cancellation).
//! - [`status`]: the gRPC statuses sclb raises itself.

pub mod body;
pub mod decode;
pub mod ondemand;
pub mod registry;
pub mod status;
pub mod upstream;

use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use body::{DownBody, DownStream, ServerStream, Track, kill_signal};
use decode::{DecodeError, Method, RoutingKey};
use registry::{
    Admit, EndReason, NewSession, Placement, Registry, Session, SessionKey, SessionMeta,
};
use status::{Code, Status};

use crate::Shared;
use crate::health::spark_proto::{self, grpc_code_name};
use crate::server::Server;
use crate::state::{Backend, Choice, FrontendCounters};

/// Gateway state shared by every gateway frontend; lives across reloads.
#[derive(Default)]
pub struct Gateway {
    pub registry: Registry,
    pub upstreams: upstream::Upstreams,
    pub ondemand: ondemand::OnDemandState,
}

impl Gateway {
    /// Deletes, in the background, the driver sclb created for a session that has ended.
    pub fn delete_driver(self: &Arc<Self>, s: &Session) {
        if let (true, Some(settings), Some(ns), Some(app)) = (
            s.meta.created,
            s.meta.source.clone(),
            s.meta.namespace.clone(),
            s.meta.app.clone(),
        ) {
            let gw = self.clone();
            tokio::spawn(async move { gw.ondemand.delete(&settings, &ns, &app).await });
        }
    }

    /// An RPC the server answered, with `status` its trailers (or the headers of a
    /// trailers-only reply): counted by status; a successful ReleaseSession ends its session
    /// (released by its client).
    pub fn rpc_finished(
        self: &Arc<Self>,
        method: Method,
        session: Option<&Arc<Session>>,
        status: &http::HeaderMap,
    ) {
        let code = spark_proto::grpc_status_code(status).unwrap_or(2);
        self.registry
            .metrics
            .request(method.name(), grpc_code_name(code));
        if code == 0
            && method == Method::ReleaseSession
            && let Some(s) = session
            && let Some(s) = self.registry.end(&s.key, EndReason::Released)
        {
            self.delete_driver(&s);
        }
    }
}

/// How much of a request body is buffered to find its routing key. PySpark sends
/// `session_id` and `user_context` first, in the first ~60 bytes; a client without a user id
/// sends no `user_context`, and proving its absence would mean buffering a whole plan.
const PEEK_LIMIT: usize = 16 * 1024;

static DEFAULT_GRPC: std::sync::LazyLock<crate::config::GrpcConfig> =
    std::sync::LazyLock::new(Default::default);

/// One client connection.
struct Conn {
    peer: SocketAddr,
    frontend: Arc<str>,
    fe_counters: Arc<FrontendCounters>,
    shared: Arc<Shared>,
}

/// Serves one accepted gateway client to the end; logs one line when it closes.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    frontend: Arc<str>,
    fe_counters: Arc<FrontendCounters>,
    shared: Arc<Shared>,
) {
    let start = Instant::now();
    let stop = shared.stop_accepting.clone();
    let cx = Arc::new(Conn {
        peer,
        frontend: frontend.clone(),
        fe_counters: fe_counters.clone(),
        shared,
    });
    let rpcs = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = rpcs.clone();
    let svc = hyper::service::service_fn(move |req| {
        let cx = cx.clone();
        counted.fetch_add(1, Relaxed);
        async move { Ok::<_, Infallible>(rpc(req, cx).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_frame_size(1 << 20)
        // Spark's own limit; PySpark's headers are a few hundred bytes.
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20))
        .serve_connection(TokioIo::new(client), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            // Graceful stop: GOAWAY, then the RPCs in flight finish.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    fe_counters.cur.fetch_sub(1, Relaxed);
    let end = match &r {
        Ok(()) => "closed".to_string(),
        Err(e) => e.to_string(),
    };
    let rpcs = rpcs.load(Relaxed);
    let total_ms = start.elapsed().as_millis() as u64;
    if rpcs == 0 {
        // A port probe or a client that never spoke HTTP/2: routine, not worth a line.
        debug!(client = %peer, frontend = %frontend, total_ms, end = %end, "gateway connection closed without an RPC");
        return;
    }
    info!(
        client = %peer,
        frontend = %frontend,
        total_ms,
        rpcs,
        end = %end,
        "gateway connection closed"
    );
}

/// A trailers-only response carrying `st`.
fn status_response(st: &Status) -> Response<DownBody> {
    let mut r = Response::new(DownBody::Empty);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.extend(st.headers());
    r
}

impl Conn {
    /// Answers with sclb's own status, counted and logged.
    fn refuse(&self, method: &'static str, reason: &'static str, st: Status) -> Response<DownBody> {
        let m = &self.shared.gateway.registry.metrics;
        m.error(reason);
        m.request(method, st.code.as_str());
        info!(
            client = %self.peer,
            frontend = %self.frontend,
            method,
            code = st.code.as_str(),
            reason,
            "rpc refused: {}",
            st.message
        );
        status_response(&st)
    }
}

/// Reads the request body until the routing key is known (or cannot be), returning what was
/// read, the key, and whether the body has ended.
async fn peek_key(
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
fn session_hash_ip(k: &SessionKey) -> IpAddr {
    let mut h = DefaultHasher::new();
    k.hash(&mut h);
    let a = h.finish();
    k.session_id.hash(&mut h);
    IpAddr::V6(Ipv6Addr::from(
        (u128::from(a) << 64) | u128::from(h.finish()),
    ))
}

fn placement(s: &Server) -> Placement {
    Placement {
        server: s.id,
        server_name: s.name.clone(),
    }
}

/// One RPC, from its request headers to the response handed back to hyper.
async fn rpc(req: Request<Incoming>, cx: Arc<Conn>) -> Response<DownBody> {
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
    let timeout_client = fe.config.timeout_client;
    // Borrowed, not copied: a reload that turned this frontend to tcp leaves its live
    // connections with the defaults.
    let grpc_cfg = fe.config.grpc.as_ref().unwrap_or(&DEFAULT_GRPC);

    let (parts, mut body) = req.into_parts();
    let (head, key, ended) = match tokio::time::timeout(timeout_client, peek_key(method, &mut body))
        .await
    {
        Ok(Ok(x)) => x,
        // The client reset the stream before its first message: nobody to answer.
        Ok(Err(_)) => return status_response(&Status::new(Code::Cancelled, "client cancelled")),
        Err(_) => {
            return cx.refuse(
                m,
                "client_timeout",
                Status::new(
                    Code::DeadlineExceeded,
                    format!("sclb: no request message within {timeout_client:?} (timeout client)"),
                ),
            );
        }
    };

    let (session, server) = match route(
        &cx,
        &backend,
        grpc_cfg,
        &parts.headers,
        method,
        key.as_ref(),
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

    // Connect (or reuse the server's connection). A session's first RPC, or one without a
    // session, may move to another server; a session with a history stays and the client
    // retries (its state is on that server).
    let cfg = &backend.config;
    let mut server = server;
    let mut tried = Vec::new();
    let sender = loop {
        match gw
            .upstreams
            .get(server.id, server.addr(), cfg.timeout_connect)
            .await
        {
            Ok(s) => break s,
            Err(e) => {
                server.counters.conn_errors.fetch_add(1, Relaxed);
                tried.push(server.id);
                let movable = session.as_ref().is_none_or(|s| s.rpcs.load(Relaxed) == 0);
                let ip = session
                    .as_ref()
                    .map_or(cx.peer.ip(), |s| session_hash_ip(&s.key));
                if movable
                    && tried.len() <= cfg.retries as usize
                    && let Some((next, _)) = backend.choose_pinned(None, ip, &tried)
                {
                    server.counters.redispatches.fetch_add(1, Relaxed);
                    debug!(server = %server.name, "gateway connect failed: {e}; trying {}", next.name);
                    if let Some(s) = &session {
                        s.move_to(placement(&next));
                    }
                    server = next;
                    continue;
                }
                return cx.refuse(
                    m,
                    "connect_failed",
                    Status::unavailable(
                        format!(
                            "sclb: cannot reach server {} ({}): {e}",
                            server.name,
                            server.addr()
                        ),
                        Duration::from_secs(1),
                    ),
                );
            }
        }
    };

    server.counters.lbtot.fetch_add(1, Relaxed);
    let guard = session.as_ref().map(|s| s.rpc_started(cx.peer));
    let server_stream = ServerStream::start(&server);
    let track = Arc::new(Track {
        session: session.clone(),
        server: server.clone(),
        frontend: cx.fe_counters.clone(),
    });
    let mut up = Request::from_parts(parts, ());
    let pq = up
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    match Uri::builder()
        .scheme("http")
        .authority(server.addr().to_string())
        .path_and_query(pq)
        .build()
    {
        Ok(u) => *up.uri_mut() = u,
        Err(e) => {
            return cx.refuse(
                m,
                "bad_path",
                Status::new(
                    Code::InvalidArgument,
                    format!("sclb: bad request path: {e}"),
                ),
            );
        }
    }
    for h in [
        header::CONNECTION,
        header::HOST,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        up.headers_mut().remove(h);
    }

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
    // Room for another stream on the server's connection (its SETTINGS limit).
    let mut sender = tokio::select! {
        r = sender.ready() => match r {
            Ok(s) => s,
            Err(e) => {
                let (reason, st) = upstream_failed(&server, &e);
                return cx.refuse(m, reason, st);
            }
        },
        st = &mut kill => return cx.refuse(m, "session_closed", st),
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
        ));
    }
    let resp = tokio::select! {
        r = resp_fut => r,
        st = &mut kill => return cx.refuse(m, "session_closed", st),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            let (reason, st) = upstream_failed(&server, &e);
            return cx.refuse(m, reason, st);
        }
    };
    gw.registry.metrics.latency(m, t0.elapsed().as_secs_f64());
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
        })),
    );
    with_app(resp, app_header)
}

fn with_app(mut r: Response<DownBody>, app: Option<(String, HeaderValue)>) -> Response<DownBody> {
    if let Some((name, v)) = app
        && let Ok(name) = http::HeaderName::from_bytes(name.as_bytes())
    {
        r.headers_mut().insert(name, v);
    }
    r
}

type Refusal = (&'static str, Status);

/// What a client still using an ended session is told.
fn session_ended(k: &SessionKey, reason: EndReason) -> Refusal {
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

fn header<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The server named `name` (a discovered SparkConnect/SparkApplication, or a server of the
/// config) in `namespace`: discovery names servers `namespace/name` when it watches several
/// namespaces, `name` when it watches one.
fn named_server(backend: &Backend, namespace: Option<&str>, name: &str) -> Option<Arc<Server>> {
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

/// The session an RPC belongs to and the server it goes to, by the gateway's three routes:
/// a header naming the driver, an on-demand driver for a new session, or the session's pin
/// (balanced when new).
async fn route(
    cx: &Conn,
    backend: &Arc<Backend>,
    g: &crate::config::GrpcConfig,
    headers: &http::HeaderMap,
    method: Method,
    key: Option<&RoutingKey>,
) -> Result<(Option<Arc<Session>>, Arc<Server>), Refusal> {
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
    let named = match header(headers, &g.route.session) {
        Some(name) => {
            let Some(s) = named_server(backend, namespace, name) else {
                return Err((
                    "not_found",
                    Status::new(
                        Code::NotFound,
                        format!(
                            "sclb: no SparkConnect or SparkApplication named {name}{} serves in backend {}",
                            namespace.map_or(String::new(), |ns| format!(" in namespace {ns}")),
                            backend.config.name
                        ),
                    ),
                ));
            };
            if !s.takes_pinned_clients() {
                return Err((
                    "not_ready",
                    Status::unavailable(
                        format!("sclb: {name} is {}", s.status()),
                        Duration::from_secs(2),
                    ),
                ));
            }
            Some((s, name.to_string()))
        }
        None => None,
    };
    let Some(k) = key else {
        if let Some((s, _)) = named {
            return Ok((None, s));
        }
        let (s, _) = backend
            .choose_pinned(None, cx.peer.ip(), &[])
            .ok_or_else(no_server)?;
        return Ok((None, s));
    };
    let skey = SessionKey {
        session_id: k.session_id.clone(),
        user_id: k.user_id.clone().unwrap_or_default(),
    };
    let ip = session_hash_ip(&skey);
    let live = match gw.registry.find(&skey) {
        Some(Err((reason, was))) => {
            // A client's cleanup after the end (PySpark releases executions in the background,
            // also after ReleaseSession) goes to the server that held the session, which
            // answers it as Spark does; anything else is told the session is over.
            if matches!(method, Method::ReleaseExecute | Method::ReleaseSession)
                && let Some(s) = backend.server(was.server)
            {
                return Ok((None, s.clone()));
            }
            return Err(session_ended(&skey, reason));
        }
        Some(Ok(s)) => Some(s),
        None => None,
    };
    let mut fixed = named.as_ref().map(|(s, _)| s.clone());
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
                    let (s, m) = on_demand(cx, backend, g, headers, &skey).await?;
                    fixed = Some(s);
                    m
                }
                None => SessionMeta::default(),
            };
            // 3. A new session without a driver of its own: balanced (two first RPCs racing
            // agree on one server).
            let new = NewSession {
                meta,
                frontend: &cx.frontend,
                backend: &backend.config.name,
                client: cx.peer,
                max: g.max_sessions,
            };
            let admitted = gw.registry.admit(&skey, new, || match &fixed {
                Some(s) => Some(placement(s)),
                None => backend
                    .choose_pinned(None, ip, &[])
                    .map(|(s, _)| placement(&s)),
            });
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
            session = %skey.session_id,
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
        };
        gw.registry
            .admit(&clone_key, new, || Some(placement(&server)));
    }
    Ok((Some(session), server))
}

/// Route 2: creates (or keeps waiting for) the driver of a new session and returns it once
/// discovery reports it ready, within `ready_timeout`.
async fn on_demand(
    cx: &Conn,
    backend: &Arc<Backend>,
    g: &crate::config::GrpcConfig,
    headers: &http::HeaderMap,
    skey: &SessionKey,
) -> Result<(Arc<Server>, SessionMeta), Refusal> {
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
    let label = |h: &str, default: &Option<String>| -> Result<String, Refusal> {
        let v = header(headers, h)
            .map(str::to_string)
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
    let team = label(&g.route.team, &od.default_team)?;
    let environment = label(&g.route.environment, &od.default_environment)?;
    let gw = &cx.shared.gateway;
    let (pending, is_new) = gw.ondemand.pending_or(skey, || ondemand::Pending {
        namespace: ondemand::fill(&od.namespace, &team, &environment),
        name: ondemand::fill(&od.name, &team, &environment),
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
        if let Err(e) = gw.ondemand.create(&settings, od, &pending, skey).await {
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
            _ = shared.stop_background.cancelled() => return,
        }
        reap_once(&shared);
    }
}

/// One pass of the reaper.
pub fn reap_once(shared: &Arc<Shared>) -> usize {
    let snap = shared.state.snapshot();
    let limits = |fe: &str| {
        let g = snap
            .frontend(fe)
            .and_then(|f| f.config.grpc.as_ref())
            .unwrap_or(&DEFAULT_GRPC);
        (g.idle_timeout, g.max_ttl)
    };
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
            let (gw, key, timeout) = (
                shared.gateway.clone(),
                s.key.clone(),
                b.config.timeout_connect,
            );
            tokio::spawn(async move { release_on_server(&gw, &server, &key, timeout).await });
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
async fn release_on_server(gw: &Gateway, server: &Server, key: &SessionKey, timeout: Duration) {
    let msg = release_session_request(key);
    let r = async {
        let send = gw
            .upstreams
            .get(server.id, server.addr(), timeout)
            .await
            .map_err(|e| e.to_string())?;
        let req = Request::post(format!(
            "http://{}/spark.connect.SparkConnectService/ReleaseSession",
            server.addr()
        ))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
        let mut send = send.ready().await.map_err(|e| e.to_string())?;
        let (resp, mut tx) = send.send_request(req, false).map_err(|e| e.to_string())?;
        tx.send_data(msg, true).map_err(|e| e.to_string())?;
        let (parts, mut body) = resp.await.map_err(|e| e.to_string())?.into_parts();
        while let Some(d) = body.data().await {
            let d = d.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(d.len());
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(parts.headers);
        Ok::<_, String>(spark_proto::grpc_status_code(&trailers).map_or("none", grpc_code_name))
    };
    match tokio::time::timeout(Duration::from_secs(10), r).await {
        Ok(Ok(code)) => {
            debug!(session = %key.session_id, server = %server.name, "ReleaseSession sent: {code}")
        }
        Ok(Err(e)) => {
            debug!(session = %key.session_id, server = %server.name, "ReleaseSession failed: {e}")
        }
        Err(_) => {
            debug!(session = %key.session_id, server = %server.name, "ReleaseSession timed out")
        }
    }
}

/// `ReleaseSessionRequest` for `key`, framed for gRPC.
fn release_session_request(key: &SessionKey) -> Bytes {
    spark_proto::grpc_frame(&spark_proto::ReleaseSessionRequest {
        session_id: key.session_id.clone(),
        user_context: Some(spark_proto::UserContext {
            user_id: key.user_id.clone(),
        }),
        client_type: Some("sclb".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_session_request_decodes_to_its_key() {
        let key = SessionKey {
            session_id: "8d2c0a8e-6a3e-4a8f-9f52-3f6b0c3f1f11".into(),
            user_id: "alice".into(),
        };
        let body = release_session_request(&key);
        let k = decode::routing_key(Method::ReleaseSession, &body).unwrap();
        assert_eq!(k.session_id, key.session_id);
        assert_eq!(k.user_id.as_deref(), Some("alice"));
    }

    #[test]
    fn source_balance_hashes_the_session_not_the_client() {
        let k = |id: &str| SessionKey {
            session_id: id.into(),
            user_id: String::new(),
        };
        assert_eq!(session_hash_ip(&k("a")), session_hash_ip(&k("a")));
        assert_ne!(session_hash_ip(&k("a")), session_hash_ip(&k("b")));
    }
}
