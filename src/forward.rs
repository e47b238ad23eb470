//! One client connection, from accept to its log line: choose a server (pin first), wait for
//! a slot if the server is full, connect with retries and redispatch, pin, splice, log.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

use crate::pipe::{self, End, Side, Totals};
use crate::server::{Server, ServerId};
use crate::sessions::SessInfo;
use crate::state::{Backend, Choice, FrontendCounters};
use crate::{Shared, sockopt};

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
}

impl ConnectError {
    fn end(&self) -> &'static str {
        match self {
            ConnectError::NoServer => "no_server",
            ConnectError::QueueTimeout { .. } => "queue_timeout",
            ConnectError::Timeout { .. } => "connect_timeout",
            ConnectError::Refused { .. } => "connect_refused",
        }
    }
}

struct Connected {
    server: Arc<Server>,
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    connect_time: Duration,
}

/// Serves one accepted client to the end. Never returns an error: everything is logged here.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    frontend: Arc<str>,
    fe_counters: Arc<FrontendCounters>,
    shared: Arc<Shared>,
) {
    let start = Instant::now();
    fe_counters.connection_started();
    let snap = shared.state.snapshot();
    if snap
        .frontend(&frontend)
        .is_some_and(|fe| fe.config.grpc.is_some())
    {
        drop(snap);
        // Boxed: inline, the HTTP/2 server's state would size every L4 connection's task
        // (1.3 KB more per idle connection).
        return Box::pin(crate::gateway::serve(
            client,
            peer,
            frontend,
            fe_counters,
            shared,
        ))
        .await;
    }
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

    // Boxed: its state (timeouts, retries, the queue wait) is freed once connected, so a
    // long-lived idle connection does not carry it (a task is as large as its largest state).
    let connected = Box::pin(connect(&backend, peer)).await;
    let conn = match connected {
        Ok(c) => c,
        Err(e) => {
            fe_counters.denied.fetch_add(1, Relaxed);
            fe_counters.cur.fetch_sub(1, Relaxed);
            info!(
                client = %peer,
                frontend = %frontend,
                backend = %backend.config.name,
                total_ms = start.elapsed().as_millis() as u64,
                end = e.end(),
                "connection refused: {e}"
            );
            return;
        }
    };
    let server = conn.server.clone();
    server.counters.connection_started();

    // Closed by `shutdown sessions`, on_marked_down, or a hard stop (which shuts every
    // server's sessions).
    let sessions = server.sessions_token();
    let kill = sessions.cancelled();
    let totals = Arc::new(Totals::default());
    let _registered = shared.sessions.register(SessInfo {
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
    let end = pipe::pipe(
        &client,
        &conn.stream,
        idle,
        kill,
        &totals,
        &on_bytes,
        shared.pipe_mode,
    )
    .await;
    if end == End::Reset(Side::Server) {
        server.counters.resp_errors.fetch_add(1, Relaxed);
    }
    server.counters.connection_ended();
    fe_counters.cur.fetch_sub(1, Relaxed);
    info!(
        client = %peer,
        frontend = %frontend,
        backend = %backend.config.name,
        server = %server.name,
        connect_ms = conn.connect_time.as_millis() as u64,
        total_ms = start.elapsed().as_millis() as u64,
        bytes_in = totals.up.load(Relaxed),
        bytes_out = totals.down.load(Relaxed),
        end = end.as_str(),
        "connection closed"
    );
}

/// Chooses a server and connects, following HAProxy's retry rules: `retries` more attempts
/// after the first; a refused connection waits min(connect timeout, 1 s) before retrying the
/// same server; with `redispatch`, the last retry goes to another server.
async fn connect(backend: &Backend, peer: SocketAddr) -> Result<Connected, ConnectError> {
    let cfg = &backend.config;
    let mut tried: Vec<ServerId> = Vec::new();
    let mut attempts_left = cfg.retries + 1;
    let mut current: Option<(Arc<Server>, Choice)> = None;
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
            None => match backend.choose(peer.ip(), &tried) {
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
        let result = timeout(cfg.timeout_connect, connect_to(server.addr())).await;
        if let Ok(Err(e)) = &result
            && crate::frontend::is_resource_exhaustion(e)
            && Instant::now() < fd_deadline
        {
            attempts_left += 1;
            drop(slot);
            tokio::time::sleep(Duration::from_millis(20)).await;
            current = Some((server, choice));
            continue;
        }
        let err = match result {
            Ok(Ok(stream)) => {
                if let Some(stick) = &backend.stick
                    && choice != Choice::Pinned
                {
                    stick.pin(peer.ip(), server.id);
                }
                if let Some(from) = repinned_from.filter(|f| *f != server.id) {
                    log_repin(backend, peer, from, &server);
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
            Err(_) => ConnectError::Timeout {
                server: server.name.clone(),
            },
        };
        server.counters.conn_errors.fetch_add(1, Relaxed);
        debug!(client = %peer, server = %server.name, "connect attempt failed: {err}");
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

fn log_repin(backend: &Backend, peer: SocketAddr, from: ServerId, to: &Server) {
    let from_name = backend
        .server(from)
        .map(|s| format!("{} ({})", s.name, s.status()))
        .unwrap_or_else(|| "a removed server".into());
    backend.note_repin(peer.ip(), from, to.id);
    info!(
        client = %peer,
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
    if let Ok(p) = server.slots.clone().try_acquire_owned() {
        return Ok(Some(p));
    }
    let c = &server.counters;
    let q = c.queue_cur.fetch_add(1, Relaxed) + 1;
    c.queue_max.fetch_max(q, Relaxed);
    let r = timeout(queue_timeout, server.slots.clone().acquire_owned()).await;
    c.queue_cur.fetch_sub(1, Relaxed);
    match r {
        Ok(Ok(p)) => Ok(Some(p)),
        _ => {
            warn!(server = %server.name, "queue timeout: server stayed at maxconn");
            Err(ConnectError::QueueTimeout {
                server: server.name.clone(),
            })
        }
    }
}

async fn connect_to(addr: SocketAddr) -> io::Result<TcpStream> {
    sockopt::upstream_socket(addr)?.connect(addr).await
}
