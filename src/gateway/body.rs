//! The two bodies of a forwarded RPC. Both pass frames through as they come (HTTP/2 flow
//! control then reaches end to end: a slow reader stops the sender), count bytes, record the
//! session's activity, and stop when the session or the server's sessions are closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::Gateway;
use super::decode::Method;
use super::registry::{EndReason, RpcGuard, Session};
use super::status::{Status, code_name};
use crate::server::Server;
use crate::state::FrontendCounters;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Resolves with the status to end the RPC with when it must be cut short.
pub type Kill = Pin<Box<dyn Future<Output = Status> + Send>>;

/// The RPC's stop signal: its session ended, or its server's sessions were shut down
/// (`shutdown sessions`, `on_marked_down`, a hard stop).
pub fn kill_signal(session: Option<&Arc<Session>>, server: &Server) -> Kill {
    let token = server.sessions_token();
    let server_name = server.name.clone();
    let session = session.map(|s| (s.clone(), s.killed()));
    Box::pin(async move {
        let server_gone = async move {
            token.cancelled().await;
            Status::new(
                super::status::Code::Unavailable,
                format!("sclb: the sessions of server {server_name} were shut down"),
            )
        };
        match session {
            None => server_gone.await,
            Some((s, killed)) => tokio::select! {
                _ = killed => {
                    let reason = s.end_reason().unwrap_or(EndReason::Killed);
                    Status::new(
                        super::status::Code::Cancelled,
                        format!("sclb: Spark session {} {}", s.key.session_id, reason.explain()),
                    )
                }
                st = server_gone => st,
            },
        }
    })
}

/// Counts bytes one way and records the session's activity.
pub struct Track {
    pub session: Option<Arc<Session>>,
    pub server: Arc<Server>,
    pub frontend: Arc<FrontendCounters>,
}

impl Track {
    fn upstream(&self, n: u64) {
        self.server.counters.bytes_in.fetch_add(n, Relaxed);
        self.frontend.bytes_in.fetch_add(n, Relaxed);
        if let Some(s) = &self.session {
            s.touch();
        }
    }

    fn downstream(&self, n: u64) {
        self.server.counters.bytes_out.fetch_add(n, Relaxed);
        self.frontend.bytes_out.fetch_add(n, Relaxed);
        if let Some(s) = &self.session {
            s.touch();
        }
    }
}

/// A request body on its way to the server: the bytes read to find the routing key, then the
/// rest of the client's stream.
pub struct UpBody {
    head: Option<Bytes>,
    rest: Option<Incoming>,
    track: Option<Arc<Track>>,
    kill: Option<Kill>,
}

impl UpBody {
    pub fn new(head: Bytes, rest: Option<Incoming>, track: Arc<Track>, kill: Kill) -> Self {
        UpBody {
            head: (!head.is_empty()).then_some(head),
            rest,
            track: Some(track),
            kill: Some(kill),
        }
    }

    /// A body sclb writes itself (no client behind it).
    pub fn full(data: Bytes) -> Self {
        UpBody {
            head: Some(data),
            rest: None,
            track: None,
            kill: None,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(k) = &mut this.kill
            && let Poll::Ready(st) = k.as_mut().poll(cx)
        {
            this.kill = None;
            this.rest = None;
            return Poll::Ready(Some(Err(st.message.into())));
        }
        if let Some(h) = this.head.take() {
            if let Some(t) = &this.track {
                t.upstream(h.len() as u64);
            }
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        let Some(rest) = &mut this.rest else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(rest).poll_frame(cx)) {
            Some(Ok(f)) => {
                if let (Some(d), Some(t)) = (f.data_ref(), &this.track) {
                    t.upstream(d.len() as u64);
                }
                Poll::Ready(Some(Ok(f)))
            }
            // The client reset its stream: the server's stream is reset in turn.
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => {
                this.rest = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(head),
            Some(r) => {
                let h = r.size_hint();
                let mut s = SizeHint::new();
                s.set_lower(h.lower() + head);
                if let Some(u) = h.upper() {
                    s.set_upper(u + head);
                }
                s
            }
        }
    }
}

/// A response on its way to the client.
pub enum DownBody {
    /// Trailers-only responses (errors sclb raises, or the server's).
    Empty,
    Stream(Box<DownStream>),
}

pub struct DownStream {
    pub inner: Incoming,
    pub track: Arc<Track>,
    pub kill: Kill,
    pub method: Method,
    pub gateway: Arc<Gateway>,
    /// Holds the session's in-flight count and the server's current-stream count.
    pub guard: Option<RpcGuard>,
    pub server_stream: ServerStream,
    pub done: bool,
}

/// Counts one stream on a server (`scur`) until dropped.
pub struct ServerStream(pub Arc<Server>);

impl ServerStream {
    pub fn start(server: &Arc<Server>) -> Self {
        server.counters.connection_started();
        ServerStream(server.clone())
    }
}

impl Drop for ServerStream {
    fn drop(&mut self) {
        self.0.counters.connection_ended();
    }
}

impl DownStream {
    /// The server's trailers: count the status; a successful ReleaseSession ends the session.
    fn trailers(&self, t: &HeaderMap) {
        let code = t
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(2);
        self.gateway
            .registry
            .metrics
            .request(self.method.name(), code_name(code));
        if code == 0
            && self.method == Method::ReleaseSession
            && let Some(s) = &self.track.session
        {
            self.gateway.released(&s.key);
        }
    }

    /// Ends the client's stream with sclb's own status.
    fn cut(
        &mut self,
        st: Status,
        metric: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.gateway.registry.metrics.error(metric);
        self.gateway
            .registry
            .metrics
            .request(self.method.name(), st.code.as_str());
        Poll::Ready(Some(Ok(Frame::trailers(st.headers()))))
    }
}

impl Body for DownBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let DownBody::Stream(s) = self.get_mut() else {
            return Poll::Ready(None);
        };
        if s.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(st) = s.kill.as_mut().poll(cx) {
            return s.cut(st, "session_closed");
        }
        match ready!(Pin::new(&mut s.inner).poll_frame(cx)) {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    s.track.downstream(d.len() as u64);
                } else if let Some(t) = f.trailers_ref() {
                    s.trailers(t);
                    s.done = true;
                }
                Poll::Ready(Some(Ok(f)))
            }
            Some(Err(e)) => {
                // The server's stream broke mid-response (server gone, connection lost): tell
                // the client to retry; Spark clients reattach to the operation.
                s.track.server.counters.resp_errors.fetch_add(1, Relaxed);
                let st = Status::unavailable(
                    format!(
                        "sclb: the stream from server {} broke: {e}",
                        s.track.server.name
                    ),
                    Duration::from_millis(100),
                );
                s.cut(st, "upstream_reset")
            }
            None => {
                s.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownBody::Empty => true,
            DownBody::Stream(s) => s.done,
        }
    }
}
