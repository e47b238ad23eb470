//! The stats listener's own bounds, so that nobody can use it to take sclb's descriptors or
//! memory from the data path: at most `stats.maxconn` connections (more wait in the kernel's
//! accept queue), a request's headers within `stats.timeout` (a kept-alive connection that
//! sends nothing for that long is closed too), and at most [`LIFETIMES`] × `stats.timeout`
//! per connection, which bounds a client that trickles its body or reads its answer slowly.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// A connection lives at most this many `stats.timeout`s.
pub const LIFETIMES: u32 = 6;

/// Bounds of one stats listener.
#[derive(Clone, Copy)]
pub struct Limits {
    pub maxconn: usize,
    pub timeout: Duration,
}

/// Accepts and serves `app` until `stop`; then lets the requests in flight finish (at most
/// one `timeout`).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(limits.maxconn.max(1)));
    let conns = TaskTracker::new();
    loop {
        // At the limit, do not accept: new clients wait in the kernel's queue.
        let slot = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if crate::sockopt::is_resource_exhaustion(&e) {
                        crate::frontend::ACCEPT_FAILURES.failed(&e);
                    } else {
                        debug!("stats accept: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let svc = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        conns.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            let lifetime = limits.timeout.saturating_mul(LIFETIMES);
            let r = tokio::select! {
                r = tokio::time::timeout(lifetime, conn.as_mut()) => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(limits.timeout, conn.as_mut()).await
                }
            };
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(client = %peer, "stats connection: {e}"),
                Err(_) => debug!(client = %peer, "stats connection closed at its time limit"),
            }
            drop(slot);
        });
    }
    conns.close();
    conns.wait().await;
}
