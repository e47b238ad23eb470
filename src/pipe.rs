//! Moving bytes both ways between a client and its server until both sides are done.
//!
//! Half-close is honoured (a client that shuts its write side still reads the reply: gRPC
//! streams depend on it), an idle connection is closed after the idle timeout, and buffers are
//! taken from a per-thread pool only while data is in flight, so an idle connection holds none.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

const BUF_SIZE: usize = 64 * 1024;
/// Buffers kept per thread for reuse; more are freed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// Which side did something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// How a spliced connection ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed; this one closed first.
    Closed(Side),
    /// This side reset the connection or failed.
    Reset(Side),
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// sclb closed it (shutdown sessions, server marked down, hard stop).
    Killed,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Closed(Side::Client) => "client_close",
            End::Closed(Side::Server) => "server_close",
            End::Reset(Side::Client) => "client_reset",
            End::Reset(Side::Server) => "server_reset",
            End::IdleTimeout => "idle_timeout",
            End::Killed => "killed",
        }
    }
}

/// Byte counts of one connection, updated live so that stats see them before it ends.
#[derive(Default)]
pub struct Totals {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
}

/// Copies until both directions are closed, one side fails, `idle` passes with no byte moved,
/// or `kill` fires. `on_bytes(side, n)` is told of every chunk (for live counters).
pub async fn pipe(
    client: &mut TcpStream,
    server: &mut TcpStream,
    idle: Duration,
    kill: &CancellationToken,
    totals: &Totals,
    on_bytes: &(dyn Fn(Side, u64) + Sync),
) -> End {
    let start = Instant::now();
    // Milliseconds since `start` of the last byte moved; the idle watchdog reads it.
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_millis() as u64, Relaxed);

    let (cr, cw) = client.split();
    let (sr, sw) = server.split();
    let up = one_way(cr, sw, &totals.up, &touch, |n| on_bytes(Side::Client, n));
    let down = one_way(sr, cw, &totals.down, &touch, |n| on_bytes(Side::Server, n));
    let watchdog = async {
        loop {
            let deadline = start + Duration::from_millis(last.load(Relaxed)) + idle;
            if Instant::now() >= deadline {
                return;
            }
            sleep_until(deadline).await;
        }
    };
    tokio::pin!(up, down, watchdog);

    let mut first_close: Option<Side> = None;
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => {
                    up_done = true;
                    first_close.get_or_insert(Side::Client);
                }
                Err(failed) => return End::Reset(failed.side(false)),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => {
                    down_done = true;
                    first_close.get_or_insert(Side::Server);
                }
                Err(failed) => return End::Reset(failed.side(true)),
            },
            _ = &mut watchdog => return End::IdleTimeout,
            _ = kill.cancelled() => return End::Killed,
        }
    }
    End::Closed(first_close.unwrap_or(Side::Client))
}

/// Which end of a one-way copy failed: its source or its destination.
#[derive(Debug, Clone, Copy)]
enum Failed {
    Source,
    Dest,
}

impl Failed {
    /// The connection side that failed; `reversed` is true for the server-to-client direction.
    fn side(self, reversed: bool) -> Side {
        match (self, reversed) {
            (Failed::Source, false) | (Failed::Dest, true) => Side::Client,
            _ => Side::Server,
        }
    }
}

/// Copies `src` to `dst` until EOF, then shuts `dst`'s write side (half-close).
///
/// A buffer is taken only once `src` is readable and given back as soon as it is drained.
/// The first read of each burst goes through `AsyncRead`, whose short-read path clears the
/// readiness flag, so a drained socket costs no extra `EAGAIN` syscall.
async fn one_way(
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    total: &AtomicU64,
    touch: &impl Fn(),
    on_bytes: impl Fn(u64),
) -> Result<(), Failed> {
    loop {
        src.readable().await.map_err(|_| Failed::Source)?;
        let mut buf = take_buf();
        let mut n = match src.read(&mut buf).await {
            Ok(n) => n,
            Err(_) => {
                give_buf(buf);
                return Err(Failed::Source);
            }
        };
        let result = loop {
            if n == 0 {
                break Ok(true);
            }
            if dst.write_all(&buf[..n]).await.is_err() {
                break Err(Failed::Dest);
            }
            total.fetch_add(n as u64, Relaxed);
            on_bytes(n as u64);
            touch();
            if n < buf.len() {
                break Ok(false);
            }
            // A full buffer: more is probably waiting.
            n = match src.try_read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(_) => break Err(Failed::Source),
            };
        };
        give_buf(buf);
        if result? {
            // EOF: pass the half-close on. A peer already gone shows up in the other direction.
            let _ = dst.shutdown().await;
            return Ok(());
        }
    }
}
