//! One client connection, from accept to its log line: choose a server (pin first), wait for
//! a slot if the server is full, connect with retries and redispatch, pin, splice, log.

use crate::log_format::Addr;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

use crate::choose::Choice;
use crate::live_conns::ConnInfo;
use crate::pipe::{self, End, Side, Totals};
use crate::server::{Server, ServerId};
use crate::state::{Backend, FrontendCounters};
use crate::tls::client::{ServerStream, ServerTls};
use crate::{Shared, sockopt};
use tokio_util::either::Either;

/// Why a connection never reached a server.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no server available")]
    NoServer,
    #[error("queue timeout waiting for a slot on {server}")]
    QueueTimeout { server: Arc<str> },
    #[error("connect to {server} timed out")]
    Timeout { server: Arc<str> },
    #[error("connect to {server} failed: {source}")]
    Refused { server: Arc<str>, source: io::Error },
    #[error("TLS handshake with {server} failed: {source}")]
    Tls { server: Arc<str>, source: io::Error },
}

impl ConnectError {
    fn end(&self) -> &'static str {
        match self {
            ConnectError::NoServer => "no_server",
            ConnectError::QueueTimeout { .. } => "queue_timeout",
            ConnectError::Timeout { .. } => "connect_timeout",
            ConnectError::Refused { .. } => "connect_refused",
            ConnectError::Tls { .. } => "server_tls",
        }
    }
}

struct Connected {
    server: Arc<Server>,
    stream: ServerStream,
    _slot: Option<OwnedSemaphorePermit>,
    connect_time: Duration,
}

/// A client connection as accepted: a plain socket, or a TLS session sclb terminated.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// How long a client has to complete its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Terminates TLS on a frontend that has it: the handshake (bounded), then the verified client
/// certificate's identity. `None` (logged) when the client does not get through.
async fn accept_tls(
    client: TcpStream,
    peer: SocketAddr,
    frontend: &str,
    shared: &Shared,
) -> Option<(ClientStream, Option<crate::auth::Identity>)> {
    let Some(tls) = shared.tls.get(frontend) else {
        warn!(client = %Addr(peer), frontend, "TLS client refused: the frontend's certificate is not loaded");
        return None;
    };
    match timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(client)).await {
        Ok(Ok(s)) => {
            let id = crate::tls::peer_identity(s.get_ref().1, tls.settings().identity);
            Some((ClientStream::Tls(Box::new(s)), id))
        }
        Ok(Err(e)) => {
            info!(client = %Addr(peer), frontend, end = "tls_handshake", "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            info!(client = %Addr(peer), frontend, end = "tls_handshake", "TLS handshake timed out after {TLS_HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// The frontend's source rules: the PROXY header of a trusted peer (whose address then is the
/// client's), none from anyone else, then `allow`/`deny` on the client's address.
async fn admit(
    client: &mut TcpStream,
    peer: SocketAddr,
    access: &crate::config::Access,
) -> Result<SocketAddr, String> {
    use crate::proxy_proto as pp;
    let mut real = peer;
    if pp::listed(&access.accept_proxy, peer.ip()) {
        if let Some(a) = pp::read_header(client, peer.ip())
            .await
            .map_err(|e| e.to_string())?
        {
            real = a;
        }
    } else if !access.accept_proxy.is_empty() {
        pp::reject_untrusted(client, peer.ip())
            .await
            .map_err(|e| e.to_string())?;
    }
    if !pp::admitted(&access.allow, &access.deny, real.ip()) {
        return Err(format!("{} is not allowed on this frontend", real.ip()));
    }
    Ok(real)
}

/// Serves one accepted client to the end. Never returns an error: everything is logged here.
pub async fn handle(
    mut client: TcpStream,
    mut peer: SocketAddr,
    frontend: Arc<str>,
    fe_counters: Arc<FrontendCounters>,
    shared: Arc<Shared>,
) {
    let start = Instant::now();
    fe_counters.connection_started();
    let snap = shared.state.snapshot();
    let Some(fe) = snap.frontend(&frontend).cloned() else {
        // The frontend was removed by a reload between accept and here.
        fe_counters.cur.fetch_sub(1, Relaxed);
        return;
    };
    drop(snap);
    let (grpc, tls) = (fe.config.grpc.is_some(), fe.config.tls.is_some());
    if fe.config.access != crate::config::Access::default() {
        match Box::pin(admit(&mut client, peer, &fe.config.access)).await {
            Ok(real) => peer = real,
            Err(why) => {
                info!(client = %Addr(peer), frontend = %frontend, end = "refused", "connection refused: {why}");
                fe_counters.denied.fetch_add(1, Relaxed);
                fe_counters.cur.fetch_sub(1, Relaxed);
                return;
            }
        }
    }
    drop(fe);
    let (client, identity) = if tls {
        match Box::pin(accept_tls(client, peer, &frontend, &shared)).await {
            Some(c) => c,
            None => {
                fe_counters.denied.fetch_add(1, Relaxed);
                fe_counters.cur.fetch_sub(1, Relaxed);
                return;
            }
        }
    } else {
        (ClientStream::Plain(client), None)
    };
    if grpc {
        // Boxed: inline, the HTTP/2 server's state would size every L4 connection's task
        // (1.3 KB more per idle connection).
        use crate::gateway::serve;
        return match client {
            ClientStream::Plain(c) => {
                Box::pin(serve(c, peer, frontend, fe_counters, shared, identity)).await
            }
            ClientStream::Tls(c) => {
                Box::pin(serve(c, peer, frontend, fe_counters, shared, identity)).await
            }
        };
    }
    // Only its stick-table key outlives this point (an idle connection's memory is its task).
    let identity_key = identity.map(|id| identity_key(&id.user));
    let snap = shared.state.snapshot();
    let Some((backend, idle)) = snap.frontend(&frontend).and_then(|fe| {
        let backend = snap.backend(&fe.config.backend)?.clone();
        // Once both sides are connected, `timeout tunnel` replaces client and server timeouts.
        let idle = backend
            .config
            .timeout_tunnel
            .unwrap_or(fe.config.timeout_client.min(backend.config.timeout_server));
        Some((backend, idle))
    }) else {
        // The frontend was removed by a reload between accept and here.
        fe_counters.cur.fetch_sub(1, Relaxed);
        return;
    };
    drop(snap);

    // `stick = { on = "identity" }`: a client with a verified certificate keeps its server
    // when its address changes (VPN, wifi to ethernet); the stick table then holds a hash of
    // the identity in place of an address.
    let key = match (identity_key, backend.config.stick.as_ref().map(|s| s.on)) {
        (Some(k), Some(crate::config::StickOn::Identity)) => k,
        _ => peer.ip(),
    };
    // Boxed: its state (timeouts, retries, the queue wait) is freed once connected, so a
    // long-lived idle connection does not carry it (a task is as large as its largest state).
    let connected = Box::pin(connect(
        &backend,
        peer,
        key,
        shared.gateway.store.get().and_then(|s| s.postgres()),
    ))
    .await;
    let conn = match connected {
        Ok(c) => c,
        Err(e) => {
            fe_counters.denied.fetch_add(1, Relaxed);
            fe_counters.cur.fetch_sub(1, Relaxed);
            info!(
                client = %Addr(peer),
                frontend = %frontend,
                backend = %backend.config.name,
                total_ms = start.elapsed().as_millis() as u64,
                end = e.end(),
                "connection refused: {e}"
            );
            return;
        }
    };
    let Connected {
        server,
        stream: mut server_stream,
        _slot,
        connect_time,
    } = conn;
    server.connection_started();
    server.counters.ctime.add(connect_time.as_millis() as u64);

    // Closed by `shutdown sessions`, on_marked_down, or a hard stop (which shuts every
    // server's sessions).
    let sessions = server.sessions_token();
    let totals = Arc::new(Totals::default());
    // ... or by `shutdown session <id>`, this connection alone.
    let kill = async {
        tokio::select! {
            _ = sessions.cancelled() => {}
            _ = totals.kill.notified() => {}
        }
    };
    let _registered = shared.data.live_conns.register(ConnInfo {
        client: peer,
        frontend: frontend.clone(),
        backend: server.backend.clone(),
        server: server.name.clone(),
        started: start,
        totals: totals.clone(),
    });
    let on_bytes = |side: Side, n: u64| match side {
        Side::Client => {
            server.counters.bytes_in.fetch_add(n, Relaxed);
            fe_counters.bytes_in.fetch_add(n, Relaxed);
        }
        Side::Server => {
            server.counters.bytes_out.fetch_add(n, Relaxed);
            fe_counters.bytes_out.fetch_add(n, Relaxed);
        }
    };
    // Boxed: a TLS connection's copy state would otherwise size every plain one's task.
    let end = match client {
        ClientStream::Plain(client) => match &mut server_stream {
            Either::Left(server_stream) => {
                pipe::pipe(
                    &client,
                    server_stream,
                    idle,
                    kill,
                    &totals,
                    &on_bytes,
                    shared.data.pipe_mode,
                )
                .await
            }
            tls => {
                let copy = crate::stream_pipe::copy(client, tls, idle, kill, &totals, &on_bytes);
                Box::pin(copy).await
            }
        },
        ClientStream::Tls(client) => {
            let copy = crate::stream_pipe::copy(
                client,
                &mut server_stream,
                idle,
                kill,
                &totals,
                &on_bytes,
            );
            Box::pin(copy).await
        }
    };
    if end == End::Reset(Side::Server) {
        server.counters.resp_errors.fetch_add(1, Relaxed);
    }
    server.connection_ended();
    server
        .counters
        .ttime
        .add(start.elapsed().as_millis() as u64);
    fe_counters.cur.fetch_sub(1, Relaxed);
    info!(
        client = %Addr(peer),
        frontend = %frontend,
        backend = %backend.config.name,
        server = %server.name,
        connect_ms = connect_time.as_millis() as u64,
        total_ms = start.elapsed().as_millis() as u64,
        bytes_in = totals.up.load(Relaxed),
        bytes_out = totals.down.load(Relaxed),
        end = end.as_str(),
        "connection closed"
    );
}

/// With `stick.store = "shared"`, a client this node has no pin for is looked up in (or pinned
/// to this node's choice in) the shared store, in one round trip, so that every node sends it
/// to the same server. `None`: choose as usual (no shared pins, a local pin, or the store is
/// unreachable: the pin is written at the next sync).
async fn shared_pin(
    backend: &Backend,
    key: std::net::IpAddr,
    store: &crate::store::Store,
) -> Option<(Arc<Server>, Choice)> {
    let stick = backend.stick.as_ref()?;
    if !backend.config.stick.as_ref().is_some_and(|s| s.shared) || stick.lookup(key).is_some() {
        return None;
    }
    let (candidate, _) = backend.choose(key, &[])?;
    let (name, addr) = store
        .bind_pin(
            &backend.config.name,
            key,
            &candidate.name,
            &candidate.config_addr().to_string(),
            stick.expire(),
        )
        .await
        .ok()?;
    if *candidate.name == *name && candidate.config_addr().to_string() == addr {
        return Some((candidate, Choice::Balanced));
    }
    let theirs = backend
        .servers
        .iter()
        .find(|s| *s.name == *name && s.config_addr().to_string() == addr)?;
    // Pinned by another node: this node keeps the pin too.
    stick.pin(key, theirs.id);
    if theirs.takes_pinned_clients() {
        return Some((theirs.clone(), Choice::Pinned));
    }
    // That server takes no clients now: a re-pin, written back for the other nodes.
    let (to, _) = backend.choose_pinned(Some(theirs.id), key, &[])?;
    store.pins_to_write(vec![crate::store::PinWrite {
        backend: backend.config.name.clone(),
        client: key.to_string(),
        server: to.name.to_string(),
        server_addr: to.config_addr().to_string(),
        expires_ms: crate::store::now_ms().saturating_add(stick.expire().as_millis() as i64),
        overwrite: true,
    }]);
    Some((to, Choice::Repinned(theirs.id)))
}

/// Chooses a server and connects, following HAProxy's retry rules: `retries` more attempts
/// after the first; a refused connection waits min(connect timeout, 1 s) before retrying the
/// same server; with `redispatch`, the last retry goes to another server.
async fn connect(
    backend: &Backend,
    peer: SocketAddr,
    key: std::net::IpAddr,
    store: Option<&Arc<crate::store::Store>>,
) -> Result<Connected, ConnectError> {
    let cfg = &backend.config;
    let mut tried: Vec<ServerId> = Vec::new();
    let mut attempts_left = cfg.retries + 1;
    let mut current: Option<(Arc<Server>, Choice)> = match store {
        Some(store) => shared_pin(backend, key, store).await,
        None => None,
    };
    let mut repinned_from: Option<ServerId> = None;
    let mut last_err: Option<ConnectError> = None;
    // Out of file descriptors is sclb's problem, not the server's: such attempts retry the
    // same server without counting against it. Waiting for a local resource is a queue wait,
    // bounded by `timeout queue`.
    let fd_deadline = Instant::now() + cfg.timeout_queue;
    loop {
        let (server, choice) = match current.take() {
            Some(c) => c,
            // No other server to redispatch to: report why the last attempt failed.
            None => match backend.choose(key, &tried) {
                Some(c) => c,
                None => return Err(last_err.unwrap_or(ConnectError::NoServer)),
            },
        };
        if let Choice::Repinned(from) = choice {
            repinned_from.get_or_insert(from);
        }
        if current.is_none() && tried.is_empty() {
            server.counters.lbtot.fetch_add(1, Relaxed);
        }
        let slot = acquire_slot(&server, cfg.timeout_queue).await?;
        attempts_left -= 1;
        let t0 = Instant::now();
        let result = timeout(
            cfg.timeout_connect,
            sockopt::connect_upstream(server.addr(), cfg.tcp_keepalive, cfg.tcp_smart_connect),
        )
        .await;
        // A backend with server_tls: the handshake is part of connecting (and of its timeout).
        let result = match result {
            Ok(Ok(tcp)) => {
                let left = cfg.timeout_connect.saturating_sub(t0.elapsed());
                // Boxed: the handshake's state would otherwise size every connection's task.
                match timeout(
                    left,
                    Box::pin(ServerTls::wrap(cfg.server_tls.as_ref(), tcp, server.addr())),
                )
                .await
                {
                    Ok(Ok(s)) => Ok(Ok(s)),
                    Ok(Err(source)) => Err(ConnectError::Tls {
                        server: server.name.clone(),
                        source,
                    }),
                    Err(_) => Err(ConnectError::Timeout {
                        server: server.name.clone(),
                    }),
                }
            }
            Ok(Err(e)) => Ok(Err(e)),
            Err(_) => Err(ConnectError::Timeout {
                server: server.name.clone(),
            }),
        };
        if let Ok(Err(e)) = &result
            && crate::sockopt::is_resource_exhaustion(e)
            && Instant::now() < fd_deadline
        {
            attempts_left += 1;
            drop(slot);
            crate::sockopt::note_fd_shortage();
            crate::pipe::release_pools();
            tokio::time::sleep(Duration::from_millis(20)).await;
            current = Some((server, choice));
            continue;
        }
        let err = match result {
            Ok(Ok(stream)) => {
                if let Some(stick) = &backend.stick
                    && choice != Choice::Pinned
                {
                    stick.pin(key, server.id);
                }
                if let Some(from) = repinned_from.filter(|f| *f != server.id) {
                    log_repin(backend, peer, key, from, &server);
                    if let (Some(store), Some(stick)) = (store, &backend.stick)
                        && backend.config.stick.as_ref().is_some_and(|s| s.shared)
                    {
                        store.pins_to_write(vec![crate::store::PinWrite {
                            backend: cfg.name.clone(),
                            client: key.to_string(),
                            server: server.name.to_string(),
                            server_addr: server.config_addr().to_string(),
                            expires_ms: crate::store::now_ms()
                                .saturating_add(stick.expire().as_millis() as i64),
                            overwrite: true,
                        }]);
                    }
                }
                return Ok(Connected {
                    server,
                    stream,
                    _slot: slot,
                    connect_time: t0.elapsed(),
                });
            }
            Ok(Err(e)) => ConnectError::Refused {
                server: server.name.clone(),
                source: e,
            },
            Err(e) => e,
        };
        server.counters.conn_errors.fetch_add(1, Relaxed);
        debug!(client = %Addr(peer), server = %server.name, "connect attempt failed: {err}");
        if attempts_left == 0 {
            return Err(err);
        }
        let err_is_refused = matches!(err, ConnectError::Refused { .. });
        drop(slot);
        server.counters.retries.fetch_add(1, Relaxed);
        let last_retry = attempts_left == 1;
        if (cfg.redispatch && last_retry) || !server.takes_pinned_clients() {
            // Move on: this server is out of the running for this client.
            server.counters.redispatches.fetch_add(1, Relaxed);
            if choice == Choice::Pinned {
                repinned_from.get_or_insert(server.id);
            }
            tried.push(server.id);
        } else {
            if err_is_refused {
                tokio::time::sleep(cfg.timeout_connect.min(Duration::from_secs(1))).await;
            }
            current = Some((server, choice));
        }
        last_err = Some(err);
    }
}

/// The stick-table key of an identity: an IPv6 address in fd00::/8 (unique local, never a
/// real client's) made from its SHA-256.
fn identity_key(identity: &str) -> std::net::IpAddr {
    use sha2::Digest;
    let d = sha2::Sha256::digest(identity.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[0] = 0xfd;
    std::net::IpAddr::V6(std::net::Ipv6Addr::from(b))
}

fn log_repin(
    backend: &Backend,
    peer: SocketAddr,
    key: std::net::IpAddr,
    from: ServerId,
    to: &Server,
) {
    let from_name = backend
        .server(from)
        .map(|s| format!("{} ({})", s.name, s.status()))
        .unwrap_or_else(|| "a removed server".into());
    backend.note_repin(key, from, to.id);
    info!(
        client = %Addr(peer),
        backend = %backend.config.name,
        from = %from_name,
        to = %to.name,
        "re-pin: client moved from {from_name} to {}; its Spark session there is lost",
        to.name
    );
}

/// Waits for a connection slot on the server; the wait is the server's queue.
async fn acquire_slot(
    server: &Arc<Server>,
    queue_timeout: Duration,
) -> Result<Option<OwnedSemaphorePermit>, ConnectError> {
    let c = &server.counters;
    if let Ok(p) = server.slots.clone().try_acquire_owned() {
        c.qtime.add(0);
        return Ok(Some(p));
    }
    let q = c.queue_cur.fetch_add(1, Relaxed) + 1;
    c.queue_max.fetch_max(q, Relaxed);
    let waited = Instant::now();
    let r = timeout(queue_timeout, server.slots.clone().acquire_owned()).await;
    c.queue_cur.fetch_sub(1, Relaxed);
    match r {
        Ok(Ok(p)) => {
            c.qtime.add(waited.elapsed().as_millis() as u64);
            Ok(Some(p))
        }
        _ => {
            warn!(server = %server.name, "queue timeout: server stayed at maxconn");
            Err(ConnectError::QueueTimeout {
                server: server.name.clone(),
            })
        }
    }
}
