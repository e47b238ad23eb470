//! Moving bytes both ways between a client and its server when either is not a plain socket
//! (a TLS session sclb terminated, or one it opened to a server with `server_tls`), with the same half-close, idle timeout, kill switch and live counters as
//! [`crate::pipe`] (which splices plain sockets and cannot see inside TLS).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::pipe::{End, Side, Totals};

const BUF: usize = 16 * 1024;

/// How one direction ended.
enum Dir {
    Closed,
    /// Reading (the source) or writing (the destination) failed.
    SourceFailed,
    DestFailed,
}

async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    count: impl Fn(u64),
    last: &AtomicU64,
    epoch: Instant,
) -> Dir
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => {
                // Half-close: the other way goes on (gRPC reads its reply after this).
                let _ = to.shutdown().await;
                return Dir::Closed;
            }
            Ok(n) => n,
            Err(_) => return Dir::SourceFailed,
        };
        if to.write_all(&buf[..n]).await.is_err() || to.flush().await.is_err() {
            return Dir::DestFailed;
        }
        last.store(epoch.elapsed().as_millis() as u64, Relaxed);
        count(n as u64);
    }
}

/// Copies until both directions are closed, one side fails, `idle` passes with no byte moved,
/// or `kill` completes.
pub async fn copy<C, S, K>(
    client: C,
    server: S,
    idle: Duration,
    kill: K,
    totals: &Totals,
    on_bytes: &(dyn Fn(Side, u64) + Sync),
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
    K: Future<Output = ()>,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = tokio::io::split(server);
    let first_close = parking_lot::Mutex::new(None);
    let up = async {
        let d = one_way(
            cr,
            sw,
            |n| {
                totals.up.fetch_add(n, Relaxed);
                on_bytes(Side::Client, n);
            },
            &last,
            epoch,
        )
        .await;
        first_close.lock().get_or_insert(Side::Client);
        match d {
            Dir::Closed => Ok(()),
            Dir::SourceFailed => Err(End::Reset(Side::Client)),
            Dir::DestFailed => Err(End::Reset(Side::Server)),
        }
    };
    let down = async {
        let d = one_way(
            sr,
            cw,
            |n| {
                totals.down.fetch_add(n, Relaxed);
                on_bytes(Side::Server, n);
            },
            &last,
            epoch,
        )
        .await;
        first_close.lock().get_or_insert(Side::Server);
        match d {
            Dir::Closed => Ok(()),
            Dir::SourceFailed => Err(End::Reset(Side::Server)),
            Dir::DestFailed => Err(End::Reset(Side::Client)),
        }
    };
    let idle_watch = async {
        loop {
            let since = Duration::from_millis(last.load(Relaxed));
            let deadline = epoch + since + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = async { tokio::try_join!(up, down) } => match r {
            Ok(_) => End::Closed(first_close.lock().unwrap_or(Side::Client)),
            Err(e) => e,
        },
        _ = kill => End::Killed,
        _ = idle_watch => End::IdleTimeout,
    }
}
