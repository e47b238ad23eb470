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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tracing::debug;

use crate::server::ServerId;
use crate::sockopt;

/// Per-stream receive window: what a server may send ahead of a slow client.
const STREAM_WINDOW: u32 = 4 << 20;
/// Per-connection receive window, shared by every session's streams to the server.
const CONNECTION_WINDOW: u32 = 64 << 20;

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
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(h2::Error),
}

impl Upstreams {
    /// A ready sender to `server` at `addr`, connecting if needed.
    pub async fn get(
        &self,
        server: ServerId,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<Sender, UpstreamError> {
        let slot = self
            .conns
            .lock()
            .unwrap()
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
        let s = tokio::time::timeout(connect_timeout, connect(addr))
            .await
            .map_err(|_| UpstreamError::Timeout(connect_timeout))??;
        *held = Some(s.clone());
        Ok(s)
    }

    /// Forgets connections to servers not in `keep` (removed by a reload or discovery).
    pub fn retain(&self, keep: impl Fn(ServerId, SocketAddr) -> bool) {
        self.conns
            .lock()
            .unwrap()
            .retain(|(id, addr, _), _| keep(*id, *addr));
    }
}

async fn connect(addr: SocketAddr) -> Result<Sender, UpstreamError> {
    let stream = sockopt::upstream_socket(addr)?.connect(addr).await?;
    // h2 directly rather than through hyper's client: a request's HEADERS and its first DATA
    // then leave in one write (hyper pipes the body after the headers are flushed, which
    // wakes the server twice per unary RPC).
    //
    // No HTTP/2 keep-alive pings: Spark's gRPC (Netty) server answers pings more frequent than
    // its permitKeepAliveTime (5 min) with GOAWAY too_many_pings, which would end every
    // session's streams on this connection. TCP keepalive (set on the socket) watches it.
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        .enable_push(false)
        .handshake(stream)
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(server = %addr, "upstream HTTP/2 connection ended: {e}");
        }
    });
    Ok(send)
}
