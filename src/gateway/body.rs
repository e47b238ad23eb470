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
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame};
use hyper::body::Incoming;

use super::Gateway;
use super::decode::Method;
use super::registry::{EndReason, RpcGuard, Session};
use super::status::Status;
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
    pub fn upstream(&self, n: u64) {
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

/// Forwards the rest of a client's request stream (after the first bytes, already sent) to
/// the server: one frame at a time, each only once the server's window has room, so a slow
/// server slows the client instead of filling sclb's memory. Ends the server's stream with the
/// client's end, its trailers, or a reset when the client resets or the session is closed.
pub async fn pump(
    mut body: Incoming,
    mut tx: SendStream<Bytes>,
    track: Arc<Track>,
    mut kill: Kill,
    mut inject: Option<super::rewrite::UserInjector>,
) {
    use http_body_util::BodyExt;
    loop {
        // Room for at least a byte before reading more from the client.
        tx.reserve_capacity(1);
        let room = tokio::select! {
            r = std::future::poll_fn(|cx| tx.poll_capacity(cx)) => r,
            _ = &mut kill => None,
        };
        if !matches!(room, Some(Ok(n)) if n > 0) {
            tx.send_reset(h2::Reason::CANCEL);
            return;
        }
        let frame = tokio::select! {
            f = body.frame() => f,
            _ = &mut kill => {
                tx.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let sent = match frame {
            None => tx.send_data(Bytes::new(), true),
            Some(Ok(f)) => match f.into_data() {
                Ok(d) => {
                    track.upstream(d.len() as u64);
                    let eos = body.is_end_stream();
                    let r = match &mut inject {
                        None => tx.send_data(d, eos),
                        Some(inj) => {
                            let pieces = inj.feed(d);
                            let n = pieces.len();
                            let mut r = Ok(());
                            for (i, p) in pieces.into_iter().enumerate() {
                                r = r.and_then(|()| tx.send_data(p, eos && i + 1 == n));
                            }
                            if n == 0 && eos {
                                r = tx.send_data(Bytes::new(), true);
                            }
                            r
                        }
                    };
                    if eos {
                        return;
                    }
                    r
                }
                Err(f) => match f.into_trailers() {
                    Ok(t) => {
                        let _ = tx.send_trailers(t);
                        return;
                    }
                    Err(_) => continue,
                },
            },
            // The client reset its stream: so is the server's.
            Some(Err(_)) => {
                tx.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        if sent.is_err() || body.is_end_stream() {
            return;
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
    pub inner: RecvStream,
    /// The server's DATA has ended; its trailers come next.
    pub data_done: bool,
    pub track: Arc<Track>,
    pub kill: Kill,
    pub method: Method,
    pub gateway: Arc<Gateway>,
    /// Holds the session's in-flight count and the server's current-stream count.
    pub guard: Option<RpcGuard>,
    pub server_stream: ServerStream,
    pub done: bool,
    /// Config responses from servers that hold sclb's backend token: each message is
    /// assembled and passed through [`super::rewrite::redact_config`] before the client sees it.
    pub redact: Option<Redact>,
}

/// The backend token, and the bytes of a response message being assembled.
pub struct Redact {
    pub token: crate::config::Secret,
    pub buf: bytes::BytesMut,
}

/// Largest Config response message sclb assembles to check (Spark's are a few KiB).
const MAX_REDACT: usize = 16 << 20;

impl Redact {
    /// The next complete message, redacted, with its gRPC prefix; `Err` if it cannot be
    /// checked (then it is withheld).
    fn next(&mut self) -> Result<Option<Bytes>, &'static str> {
        let Some(&[flag, a, b, c, d]) = self.buf.get(..5) else {
            return Ok(None);
        };
        if flag != 0 {
            return Err("the server sent a compressed Config response");
        }
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > MAX_REDACT {
            return Err("the server's Config response is too large to check");
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let msg = self.buf.split_to(5 + len);
        let clean = super::rewrite::redact_config(&msg[5..], &self.token.0)
            .ok_or("the server's Config response does not parse")?;
        let mut out = Vec::with_capacity(5 + clean.len());
        out.push(0);
        out.extend_from_slice(&(clean.len() as u32).to_be_bytes());
        out.extend_from_slice(&clean);
        Ok(Some(Bytes::from(out)))
    }
}

/// Counts one stream on a server (`scur`) until dropped.
pub struct ServerStream(pub Arc<Server>);

impl ServerStream {
    pub fn start(server: &Arc<Server>) -> Self {
        server.connection_started();
        ServerStream(server.clone())
    }
}

impl Drop for ServerStream {
    fn drop(&mut self) {
        self.0.connection_ended();
    }
}

impl DownStream {
    /// The server's stream broke mid-response (server gone, connection lost, reset): tell the
    /// client to retry; Spark clients reattach to the operation.
    fn broken(&mut self, e: h2::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.track.server.counters.resp_errors.fetch_add(1, Relaxed);
        let st = Status::unavailable(
            format!(
                "sclb: the stream from server {} broke: {e}",
                self.track.server.name
            ),
            Duration::from_millis(100),
        );
        self.cut(st, "upstream_reset")
    }

    /// A Config response that could not be checked for the backend token is not passed on.
    fn withheld(&mut self, why: &str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let st = Status::new(
            super::status::Code::Internal,
            format!("sclb: {why}; withheld, as it might hold the backend token"),
        );
        self.cut(st, "config_withheld")
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
        while !s.data_done {
            match ready!(s.inner.poll_data(cx)) {
                Some(Ok(d)) => {
                    // Handed on: the server may send this much more. hyper polls this body only
                    // when the client's window has room, so that is where backpressure starts.
                    let _ = s.inner.flow_control().release_capacity(d.len());
                    s.track.downstream(d.len() as u64);
                    let Some(r) = &mut s.redact else {
                        return Poll::Ready(Some(Ok(Frame::data(d))));
                    };
                    r.buf.extend_from_slice(&d);
                    match r.next() {
                        Ok(Some(m)) => return Poll::Ready(Some(Ok(Frame::data(m)))),
                        Ok(None) => {}
                        Err(why) => return s.withheld(why),
                    }
                }
                Some(Err(e)) => return s.broken(e),
                None => {
                    s.data_done = true;
                    if s.redact.as_ref().is_some_and(|r| !r.buf.is_empty()) {
                        return s.withheld("the server's Config response ended mid-message");
                    }
                }
            }
        }
        match ready!(s.inner.poll_trailers(cx)) {
            Ok(Some(t)) => {
                s.gateway
                    .rpc_finished(s.method, s.track.session.as_ref(), &t);
                s.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(t))))
            }
            Ok(None) => {
                s.done = true;
                Poll::Ready(None)
            }
            Err(e) => s.broken(e),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownBody::Empty => true,
            DownBody::Stream(s) => s.done,
        }
    }
}
