//! Upstream HTTP/2 connections: one per server and worker thread, shared by every client
//! stream that thread routes there.
//!
//! Per thread, because a client connection lives on one worker thread: its streams then go
//! out on a connection driven by the same thread, and no stream is handed between threads on
//! the hot path (a cross-thread wake-up costs more than the whole forwarding). With the
//! default one worker per CPU, a server sees a handful of connections.
//!
//! A connection is opened on first use and reopened when it has closed (server restart,
//! GOAWAY, network error). Two RPCs that find no connection at once open only one: the second
//! waits for the first's handshake.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderValue, Request, header};
use tracing::debug;

use crate::health::spark_proto;
use crate::server::{Server, ServerId};
use crate::sockopt;
use crate::tls::client::ServerTls;

/// Per-stream receive window: what a server may send ahead of a slow client, and so all sclb
/// holds for a client that stops reading (with one frame on its way down). 256 KiB keeps a
/// stream at full speed up to ~2 ms of round trip at 1 Gbit/s.
const STREAM_WINDOW: u32 = 256 << 10;
/// Per-connection receive window, shared by every session's streams to the server: the most
/// HTTP/2 allows, so that stalled streams (each holding at most its own window) can never use
/// it up and stall the other clients' streams on the connection.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;
/// Largest DATA frame a server may send: the unit handed down to a client at a time.
const MAX_FRAME: u32 = 64 << 10;

/// Most characters of a server's grpc-message kept by [`Upstreams::call`].
const MAX_MESSAGE: usize = 300;

pub type Sender = SendRequest<Bytes>;

type Slot = Arc<tokio::sync::Mutex<Option<Sender>>>;

#[derive(Default)]
pub struct Upstreams {
    conns: Mutex<HashMap<(ServerId, SocketAddr, ThreadId), Slot>>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(#[from] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(h2::Error),
    #[error("no HTTP/2 answer within {0:?} (it accepts TCP but does not speak HTTP/2)")]
    Silent(Duration),
}

impl Upstreams {
    /// A ready sender to `server` at `addr`, connecting if needed (over TLS with `tls`).
    pub async fn get(
        &self,
        server: ServerId,
        addr: SocketAddr,
        connect_timeout: Duration,
        tls: Option<&ServerTls>,
    ) -> Result<Sender, UpstreamError> {
        let slot = self
            .conns
            .lock()
            .entry((server, addr, std::thread::current().id()))
            .or_default()
            .clone();
        let mut held = slot.lock().await;
        if let Some(s) = held.as_mut() {
            // Pending (the server's stream limit is reached) is fine: the caller waits.
            let alive = futures::future::poll_fn(|cx| match s.poll_ready(cx) {
                std::task::Poll::Ready(r) => std::task::Poll::Ready(r.is_ok()),
                std::task::Poll::Pending => std::task::Poll::Ready(true),
            })
            .await;
            if alive {
                return Ok(s.clone());
            }
            debug!(server = %addr, "upstream HTTP/2 connection closed; reconnecting");
            *held = None;
        }
        let s = connect(addr, connect_timeout, tls).await?;
        *held = Some(s.clone());
        Ok(s)
    }

    /// [`Upstreams::get`] for `server` of backend `cfg` (its connect timeout and TLS).
    pub async fn to(
        &self,
        server: &Server,
        cfg: &crate::config::Backend,
    ) -> Result<Sender, UpstreamError> {
        self.get(
            server.id,
            server.addr(),
            cfg.timeout_connect,
            cfg.server_tls.as_ref(),
        )
        .await
    }

    /// One gRPC call of sclb's own (not a client's) to `server` of backend `cfg`, over the
    /// shared connection, with sclb's `backend_token`: its reply is read to the end and
    /// dropped. The answer: the grpc-status and grpc-message (bounded, escaped); `Err`: why
    /// no status came back. The caller bounds the time.
    pub async fn call(
        &self,
        server: &Server,
        cfg: &crate::config::Backend,
        method: &str,
        body: Bytes,
    ) -> Result<(u32, String), String> {
        let send = self.to(server, cfg).await.map_err(|e| e.to_string())?;
        let scheme = if cfg.server_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut req = Request::post(format!(
            "{scheme}://{}/spark.connect.SparkConnectService/{method}",
            server.addr()
        ))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(
            header::USER_AGENT,
            concat!("sclb/", env!("CARGO_PKG_VERSION")),
        )
        .body(())
        .map_err(|e| e.to_string())?;
        // A server that requires sclb's token refuses a call without it.
        if let Some(t) = &cfg.backend_token
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", t.0))
        {
            v.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        let mut send = send.ready().await.map_err(|e| e.to_string())?;
        let (resp, mut tx) = send.send_request(req, false).map_err(|e| e.to_string())?;
        tx.send_data(body, true).map_err(|e| e.to_string())?;
        let (parts, mut body) = resp.await.map_err(|e| e.to_string())?.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(format!("HTTP status {}", parts.status.as_u16()));
        }
        while let Some(d) = body.data().await {
            let d = d.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(d.len());
        }
        let trailers = body
            .trailers()
            .await
            .map_err(|e| e.to_string())?
            .unwrap_or(parts.headers);
        let code = spark_proto::grpc_status_code(&trailers)
            .ok_or("no grpc-status in the reply: not a gRPC server")?;
        let message = trailers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .map(|m| {
                // The server's text, on its way into sclb's log: one bounded line.
                spark_proto::percent_decode(m)
                    .chars()
                    .take(MAX_MESSAGE)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect()
            })
            .unwrap_or_default();
        Ok((code, message))
    }

    /// Forgets connections to servers not in `keep` (removed by a reload or discovery).
    pub fn retain(&self, keep: impl Fn(ServerId, SocketAddr) -> bool) {
        self.conns
            .lock()
            .retain(|(id, addr, _), _| keep(*id, *addr));
    }
}

/// Connects and makes sure the server speaks HTTP/2, all within `timeout`: the TCP connect,
/// the TLS handshake of a backend with `server_tls`, then a PING answered (which comes after the server's SETTINGS). A server that accepts TCP
/// but never answers would otherwise take every RPC sent to it, each hanging until its client
/// gives up.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&ServerTls>,
) -> Result<Sender, UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout.min(crate::config::reader::MAX_DURATION);
    // Keepalive always: one shared connection per server and thread, and nothing else
    // watches it (see below).
    let stream = tokio::time::timeout_at(deadline, sockopt::connect_upstream(addr, true, false))
        .await
        .map_err(|_| UpstreamError::Timeout(timeout))??;
    let stream = tokio::time::timeout_at(deadline, ServerTls::wrap(tls, stream, addr))
        .await
        .map_err(|_| UpstreamError::Timeout(timeout))?
        .map_err(UpstreamError::Tls)?;
    // h2 directly rather than through hyper's client: a request's HEADERS and its first DATA
    // then leave in one write (hyper pipes the body after the headers are flushed, which
    // wakes the server twice per unary RPC).
    //
    // No HTTP/2 keep-alive pings: Spark's gRPC (Netty) server answers pings more frequent than
    // its permitKeepAliveTime (5 min) with GOAWAY too_many_pings, which would end every
    // session's streams on this connection. TCP keepalive (set on the socket) watches it. The
    // one PING of the handshake is within what it allows (two strikes).
    let (send, mut conn) = tokio::time::timeout_at(
        deadline,
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .enable_push(false)
            .handshake(stream),
    )
    .await
    .map_err(|_| UpstreamError::Silent(timeout))?
    .map_err(UpstreamError::Handshake)?;
    let ping = conn.ping_pong();
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(server = %addr, "upstream HTTP/2 connection ended: {e}");
        }
    });
    if let Some(mut ping) = ping {
        match tokio::time::timeout_at(deadline, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                driver.abort();
                return Err(UpstreamError::Handshake(e));
            }
            Err(_) => {
                driver.abort();
                return Err(UpstreamError::Silent(timeout));
            }
        }
    }
    Ok(send)
}
