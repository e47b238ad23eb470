//! A gateway connection's time bounds. A connection that never sends a request (a port scan, a
//! client that never speaks HTTP/2, an attacker holding slots) is closed after
//! `timeout.http_request`; one with no RPC in flight is closed after `timeout.client` of
//! quiet. Without them, silent connections would hold connection slots and descriptors for
//! ever, and with them the L4 frontends' share of `global.maxconn`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::time::Instant;

/// What a connection has done: RPCs started, RPCs in flight, and when the last one ended.
pub struct Activity {
    start: Instant,
    started: AtomicU64,
    inflight: AtomicU64,
    /// Milliseconds since `start` when the last RPC ended.
    last_end_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            start: Instant::now(),
            started: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
        }
    }
}

/// Why the watchdog closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No request within `timeout.http_request`.
    NoRequest,
    /// No RPC in flight for `timeout.client`.
    Idle,
}

impl Expired {
    pub fn as_str(self) -> &'static str {
        match self {
            Expired::NoRequest => "no request within timeout http_request",
            Expired::Idle => "idle for timeout client",
        }
    }
}

/// Counts one RPC in flight until dropped (with its response).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_end_ms
            .fetch_max(a.start.elapsed().as_millis() as u64, Relaxed);
        a.inflight.fetch_sub(1, Relaxed);
    }
}

impl Activity {
    /// An RPC arrived; it is in flight until the guard drops.
    pub fn rpc(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Relaxed);
        self.inflight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }

    pub fn rpcs(&self) -> u64 {
        self.started.load(Relaxed)
    }

    /// Resolves when the connection has outlived its bounds: no request within
    /// `first_request`, or nothing in flight for `idle`.
    pub async fn expired(&self, first_request: Duration, idle: Duration) -> Expired {
        loop {
            let now = Instant::now();
            if self.started.load(Relaxed) == 0 {
                let due = later(self.start, first_request);
                if now >= due {
                    return Expired::NoRequest;
                }
                tokio::time::sleep_until(due).await;
                continue;
            }
            if self.inflight.load(Relaxed) > 0 {
                // Looked at again later: an RPC may run for hours, and a check per `idle`
                // costs nothing.
                tokio::time::sleep(idle.min(Duration::from_secs(60))).await;
                continue;
            }
            let quiet_since = later(
                self.start,
                Duration::from_millis(self.last_end_ms.load(Relaxed)),
            );
            let due = later(quiet_since, idle);
            if now >= due {
                // An RPC may have started and ended meanwhile: only expire on a quiet reading.
                if self.inflight.load(Relaxed) == 0 {
                    return Expired::Idle;
                }
                continue;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}

/// A response body that holds its RPC's [`InFlight`] until the body is dropped.
pub struct Watched<B> {
    pub body: B,
    pub _rpc: InFlight,
}

impl<B: http_body::Body + Unpin> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// `at + d`, saturating far in the future rather than panicking.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 86400))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_after_the_first_request_timeout() {
        let a = Arc::new(Activity::default());
        let t0 = Instant::now();
        let e = a
            .expired(Duration::from_secs(10), Duration::from_secs(3600))
            .await;
        assert_eq!(e, Expired::NoRequest);
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_expires_only_when_quiet_for_the_idle_timeout() {
        let a = Arc::new(Activity::default());
        let rpc = a.rpc();
        let watch = {
            let a = a.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let e = a
                    .expired(Duration::from_secs(1), Duration::from_secs(100))
                    .await;
                (e, t0.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_secs(500)).await;
        assert!(!watch.is_finished(), "an RPC in flight keeps it open");
        drop(rpc);
        let (e, took) = watch.await.unwrap();
        assert_eq!(e, Expired::Idle);
        assert!(
            took >= Duration::from_secs(600) && took <= Duration::from_secs(661),
            "{took:?}"
        );
    }

    #[test]
    fn deadlines_saturate() {
        let now = Instant::now();
        assert!(later(now, Duration::MAX) > now);
    }
}
