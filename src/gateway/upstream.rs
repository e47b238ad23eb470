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

use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::body::UpBody;
use crate::server::ServerId;
use crate::sockopt;

type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<UpBody>>>>;

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
    Handshake(hyper::Error),
}

impl Upstreams {
    /// A ready sender to `server` at `addr`, connecting if needed.
    pub async fn get(
        &self,
        server: ServerId,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> Result<SendRequest<UpBody>, UpstreamError> {
        let slot = self
            .conns
            .lock()
            .unwrap()
            .entry((server, addr, std::thread::current().id()))
            .or_default()
            .clone();
        let mut held = slot.lock().await;
        if let Some(s) = held.as_mut() {
            if !s.is_closed() && s.ready().await.is_ok() {
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

    pub fn len(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<UpBody>, UpstreamError> {
    let stream = sockopt::upstream_socket(addr)?.connect(addr).await?;
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        // Spark answers with result batches of up to 4 MiB: let the window grow with the
        // bandwidth-delay product instead of HTTP/2's 64 KiB default.
        .adaptive_window(true)
        .max_frame_size(1 << 20)
        // No HTTP/2 keep-alive pings: Spark's gRPC (Netty) server answers pings more frequent
        // than its permitKeepAliveTime (5 min) with GOAWAY too_many_pings, which would end
        // every session's streams on this connection. TCP keepalive (set on the socket)
        // watches the connection instead.
        .handshake(TokioIo::new(stream))
        .await
        .map_err(UpstreamError::Handshake)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(server = %addr, "upstream HTTP/2 connection ended: {e}");
        }
    });
    Ok(send)
}
