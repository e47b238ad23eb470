//! Moving bytes both ways between a client and its server until both sides are done.
//!
//! Half-close is honoured (a client that shuts its write side still reads the reply: gRPC
//! streams depend on it) and an idle connection is closed after the idle timeout.
//!
//! Two ways to move bytes: `splice(2)` through a kernel pipe (zero-copy: the bytes never enter
//! user space), or read/write through a buffer. Either way the pipe or buffer is taken from a
//! per-thread pool only while data is in flight, so an idle connection holds neither memory nor
//! file descriptors — what lets 10,000 idle Spark sessions cost little.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use std::net::Shutdown;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
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

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `splice(2)` through a pipe.
    Splice,
    /// read/write through a buffer.
    Copy,
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
    mode: Mode,
) -> End {
    if mode == Mode::Splice {
        return pipe_splice(client, server, idle, kill, totals, on_bytes).await;
    }
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

/// Capacity asked for each pipe: fewer, larger splices for bulk transfers.
const PIPE_SIZE: usize = 256 * 1024;

thread_local! {
    static PIPES: RefCell<Vec<KernelPipe>> = const { RefCell::new(Vec::new()) };
}

/// A kernel pipe used as the splice buffer; empty whenever it is in the pool.
struct KernelPipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl KernelPipe {
    fn take() -> io::Result<KernelPipe> {
        if let Some(p) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(p);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // Best effort: a smaller pipe only means more syscalls.
        let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .map(|c| c as usize)
            .unwrap_or(64 * 1024);
        Ok(KernelPipe { r, w, cap })
    }

    /// Returns an empty pipe to the pool (a pipe with bytes left in it is just closed).
    fn give(self) {
        PIPES.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

fn splice_flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// [`pipe`] with `splice(2)`: the same select over two directions, idle watchdog and kill.
async fn pipe_splice(
    client: &TcpStream,
    server: &TcpStream,
    idle: Duration,
    kill: &CancellationToken,
    totals: &Totals,
    on_bytes: &(dyn Fn(Side, u64) + Sync),
) -> End {
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_millis() as u64, Relaxed);
    let up = one_way_splice(client, server, &totals.up, &touch, |n| {
        on_bytes(Side::Client, n)
    });
    let down = one_way_splice(server, client, &totals.down, &touch, |n| {
        on_bytes(Side::Server, n)
    });
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

/// Splices `src` into `dst` until EOF, then shuts `dst`'s write side.
///
/// Each burst: wait until `src` is readable, take a pipe, splice as much as the pipe holds,
/// then splice it all out to `dst` (waiting while `dst` is full: backpressure, no buffering),
/// give the pipe back. A short read is reported to tokio as "would block" so that the socket's
/// readiness is cleared without an extra `EAGAIN` syscall.
async fn one_way_splice(
    src: &TcpStream,
    dst: &TcpStream,
    total: &AtomicU64,
    touch: &impl Fn(),
    on_bytes: impl Fn(u64),
) -> Result<(), Failed> {
    loop {
        src.readable().await.map_err(|_| Failed::Source)?;
        let pipe = KernelPipe::take().map_err(|_| Failed::Source)?;
        let mut got = 0usize;
        let r = src.try_io(Interest::READABLE, || {
            let n = nix::fcntl::splice(src, None, &pipe.w, None, pipe.cap, splice_flags())
                .map_err(io::Error::from)?;
            got = n;
            if n > 0 && n < pipe.cap {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let eof = match r {
            Ok(_) => got == 0,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(_) => return Err(Failed::Source),
        };
        if got == 0 {
            pipe.give();
            if eof {
                // EOF: pass the half-close on.
                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                return Ok(());
            }
            continue;
        }
        let mut left = got;
        while left > 0 {
            dst.writable().await.map_err(|_| Failed::Dest)?;
            match dst.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(&pipe.r, None, dst, None, left, splice_flags())
                    .map_err(io::Error::from)
            }) {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The pipe still holds bytes: it is closed, not pooled.
                Err(_) => return Err(Failed::Dest),
            }
        }
        pipe.give();
        total.fetch_add(got as u64, Relaxed);
        on_bytes(got as u64);
        touch();
    }
}
