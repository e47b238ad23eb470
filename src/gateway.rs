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
//! - [`pool`]: a warm pool of Ready drivers that new sessions claim.
//! - [`body`]: the two bodies of a forwarded RPC (bytes, activity, cancellation).
//! - [`status`]: the gRPC statuses sclb raises itself.

pub mod body;
pub mod decode;
mod identity;
mod lifetime;
pub mod ondemand;
pub mod pool;
pub mod quota;
pub mod registry;
pub mod rewrite;
mod route;
mod rpc;
pub mod status;
pub mod upstream;
mod watchdog;

pub use lifetime::{kill_session, reap_once, reaper, release_sessions, session_json, store_sync};

use crate::log_format::Addr;
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
use tokio::time::Instant;
use tracing::{debug, info};

use body::{DownBody, DownStream, ServerStream, Track, kill_signal};
use decode::{DecodeError, Method, RoutingKey};
use registry::{
    Admit, EndReason, NewSession, Placement, Registry, Session, SessionKey, SessionMeta,
};
use status::{Code, Status};

use crate::Shared;
use crate::choose::Choice;
use crate::health::spark_proto::{self, grpc_code_name};
use crate::server::Server;
use crate::state::{Backend, FrontendCounters};

/// Gateway state shared by every gateway frontend; lives across reloads.
#[derive(Default)]
pub struct Gateway {
    pub registry: Registry,
    /// The shared session store (`[global] store`, postgres or kubernetes), set at start.
    pub store: std::sync::OnceLock<crate::store::SessionStore>,
    pub upstreams: upstream::Upstreams,
    pub ondemand: ondemand::OnDemandState,
    pub pools: pool::Pools,
}

impl Gateway {
    /// Deletes, in the background, the driver sclb created for a session that has ended.
    pub fn delete_driver(self: &Arc<Self>, s: &Session) {
        // The kubernetes store deletes the session's record, which is its driver.
        if self.store.get().is_some_and(|st| st.kubernetes().is_some()) {
            return;
        }
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
        if code == 0 {
            self.registry.metrics.request_ok(method);
        } else {
            self.registry
                .metrics
                .request(method.name(), grpc_code_name(code));
        }
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

/// What a client may send on one stream ahead of sclb reading it: an upload's window, 1 GB/s
/// at 1 ms of round trip (hyper's default when the window is fixed).
const CLIENT_STREAM_WINDOW: u32 = 1 << 20;
/// What a client may send ahead on all its streams together: two uploads at full speed, and
/// the most one connection's unread requests can hold in sclb.
const CLIENT_CONNECTION_WINDOW: u32 = 2 << 20;

static DEFAULT_GRPC: std::sync::LazyLock<crate::config::GrpcConfig> =
    std::sync::LazyLock::new(Default::default);

/// One client connection.
struct Conn {
    peer: SocketAddr,
    /// The verified client certificate's identity (mTLS), if any.
    tls_identity: Option<Arc<crate::auth::Identity>>,
    /// The last bearer token this connection showed and what it proved, so that a client's
    /// every RPC is not a signature check: (token, auth file generation, identity, valid until).
    auth_cache: parking_lot::Mutex<Option<identity::AuthCached>>,
    frontend: Arc<str>,
    fe_counters: Arc<FrontendCounters>,
    shared: Arc<Shared>,
}

/// Serves one accepted gateway client (a socket, or a TLS session sclb terminated) to the end;
/// logs one line when it closes. `identity`: the client certificate's, on mTLS.
pub async fn serve<S>(
    client: S,
    peer: SocketAddr,
    frontend: Arc<str>,
    fe_counters: Arc<FrontendCounters>,
    shared: Arc<Shared>,
    identity: Option<crate::auth::Identity>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let stop = shared.life.stop_accepting.clone();
    let (first_request, idle) = shared.state.snapshot().frontend(&frontend).map_or(
        (Duration::from_secs(10), Duration::from_secs(4 * 3600)),
        |fe| (fe.config.timeout_http_request, fe.config.timeout_client),
    );
    let cx = Arc::new(Conn {
        peer,
        tls_identity: identity.map(Arc::new),
        auth_cache: parking_lot::Mutex::new(None),
        frontend: frontend.clone(),
        fe_counters: fe_counters.clone(),
        shared,
    });
    let activity = Arc::new(watchdog::Activity::default());
    let counted = activity.clone();
    let svc = hyper::service::service_fn(move |req| {
        let cx = cx.clone();
        let rpc = counted.rpc();
        async move {
            let resp = rpc::rpc(req, cx).await;
            Ok::<_, Infallible>(resp.map(|body| watchdog::Watched { body, _rpc: rpc }))
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Fixed windows, not hyper's adaptive ones: those measure the bandwidth with a PING
        // round trip on each connection whenever data arrives after a back-off (0.1 s at
        // first), and Spark sessions are long-lived channels with sparse small RPCs, so at
        // 1,000 sessions a quarter of the calls cost an extra round trip and wake-up
        // (bench/run --scale --parts gwconc). Uploads (artifacts) get a fixed window instead.
        .initial_stream_window_size(CLIENT_STREAM_WINDOW)
        .initial_connection_window_size(CLIENT_CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        // Spark's own limit; PySpark's headers are a few hundred bytes.
        .max_header_list_size(16 * 1024)
        // What one connection may have in flight (hyper's default, said here): each stream
        // holds at most its window until its first message is read or times out.
        .max_concurrent_streams(200)
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
        why = activity.expired(first_request, idle) => {
            fe_counters.cur.fetch_sub(1, Relaxed);
            if activity.rpcs() == 0 {
                // Never spoke: nothing to say goodbye to.
                debug!(client = %Addr(peer), frontend = %frontend, "gateway connection closed: {}", why.as_str());
                return;
            }
            // GOAWAY; a client that starts an RPC meanwhile retries it on a new connection.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
            info!(client = %Addr(peer), frontend = %frontend, rpcs = activity.rpcs(), "gateway connection closed: {}", why.as_str());
            return;
        }
    };
    fe_counters.cur.fetch_sub(1, Relaxed);
    let end = match &r {
        Ok(()) => "closed".to_string(),
        Err(e) => e.to_string(),
    };
    let rpcs = activity.rpcs();
    let total_ms = start.elapsed().as_millis() as u64;
    if rpcs == 0 {
        // A port probe or a client that never spoke HTTP/2: routine, not worth a line.
        debug!(client = %Addr(peer), frontend = %frontend, total_ms, end = %end, "gateway connection closed without an RPC");
        return;
    }
    info!(
        client = %Addr(peer),
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

#[cfg(test)]
mod tests {
    use super::lifetime::release_session_request;
    use super::rpc::session_hash_ip;
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
