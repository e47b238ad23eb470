//! Moving bytes both ways between a client and its server until both sides are done.
//!
//! Half-close is honoured (a client that shuts its write side still reads the reply: gRPC
//! streams depend on it) and an idle connection is closed after the idle timeout.
//!
//! Two ways to move bytes: `splice(2)` through a kernel pipe (zero-copy: the bytes never enter
//! user space), or read/write through a buffer. Either way the pipe or buffer is taken from a
//! per-thread pool only while data is in flight, so an idle connection holds neither memory nor
//! file descriptors.
//!
//! [`Pipe`] is a hand-written future over the sockets' `poll_read_ready`/`poll_write_ready`
//! rather than `async` code: an idle connection then costs a few hundred bytes, not the
//! kilobyte that nested readiness futures and a select would hold for its whole life.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until};

const BUF_SIZE: usize = 64 * 1024;
/// Capacity asked for each pipe: fewer, larger splices for bulk transfers.
const PIPE_SIZE: usize = 256 * 1024;
/// Buffers kept per thread for reuse; more are freed.
const POOL_MAX: usize = 64;
/// Pipes kept per thread: each holds two file descriptors, which matter more than memory.
const PIPE_POOL_MAX: usize = 16;

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

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `splice(2)` through a pipe.
    Splice,
    /// read/write through a buffer.
    Copy,
}

/// Byte counts of one connection, updated live so that stats see them before it ends.
#[derive(Default)]
pub struct Totals {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
    /// Wakes the connection to close it (`shutdown session <id>`).
    pub kill: tokio::sync::Notify,
}

/// A kernel pipe used as the splice buffer; empty whenever it is in the pool.
struct KernelPipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

/// Pipes in existence (in use or pooled) and the most allowed: each holds two file
/// descriptors, and a connection must never fail to open its server socket because pipes took
/// the last descriptors. Past the limit a burst goes through a buffer instead.
static LIVE_PIPES: AtomicUsize = AtomicUsize::new(0);
static MAX_PIPES: AtomicUsize = AtomicUsize::new(256);

/// Sets how many pipes may exist at once (from the file descriptor budget).
pub fn set_max_pipes(n: usize) {
    MAX_PIPES.store(n, Relaxed);
}

/// (most pipes allowed, pipes in existence, idle pipes in the pools), for `show info`.
pub fn counts() -> (usize, usize, usize) {
    let idle = PIPE_POOLS
        .lock()
        .iter()
        .filter_map(Weak::upgrade)
        .map(|p| pool(&p).len())
        .sum();
    (MAX_PIPES.load(Relaxed), LIVE_PIPES.load(Relaxed), idle)
}

/// Each thread's idle pipes. The pools are per thread (taking and giving back a pipe is
/// uncontended) but registered process-wide: when descriptors run out, the thread that sees it
/// must be able to free the pipes every thread holds idle, including threads with no traffic
/// right now, whose pools would otherwise keep the descriptors a waiting client needs.
type PipePool = Arc<Mutex<Vec<KernelPipe>>>;
static PIPE_POOLS: Mutex<Vec<Weak<Mutex<Vec<KernelPipe>>>>> = Mutex::new(Vec::new());

thread_local! {
    static PIPES: PipePool = {
        let pool = PipePool::default();
        let mut all = PIPE_POOLS.lock();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&pool));
        pool
    };
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn pool(p: &Mutex<Vec<KernelPipe>>) -> MutexGuard<'_, Vec<KernelPipe>> {
    p.lock()
}

impl KernelPipe {
    fn take() -> io::Result<KernelPipe> {
        if let Some(p) = PIPES.with(|p| pool(p).pop()) {
            return Ok(p);
        }
        if LIVE_PIPES.fetch_add(1, Relaxed) >= MAX_PIPES.load(Relaxed) {
            LIVE_PIPES.fetch_sub(1, Relaxed);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let (r, w) =
            nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).inspect_err(|_| {
                LIVE_PIPES.fetch_sub(1, Relaxed);
            })?;
        // Best effort: a smaller pipe only means more syscalls.
        let cap = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .map(|c| c as usize)
            .unwrap_or(64 * 1024);
        Ok(KernelPipe { r, w, cap })
    }

    /// Returns an empty pipe to the pool (a pipe with bytes left in it is just closed).
    fn give(self) {
        PIPES.with(|p| {
            let mut p = pool(p);
            if p.len() < PIPE_POOL_MAX {
                p.push(self);
            }
        });
    }
}

/// Frees every thread's pooled pipes and this thread's pooled buffers: when file descriptors
/// run out, idle pipes must not be what keeps `accept` or a server `connect` failing.
pub fn release_pools() {
    let pools: Vec<PipePool> = PIPE_POOLS.lock().iter().filter_map(Weak::upgrade).collect();
    for p in pools {
        // Dropped outside the lock: closing is two system calls per pipe.
        let idle = std::mem::take(&mut *pool(&p));
        drop(idle);
    }
    BUFS.with(|p| p.borrow_mut().clear());
}

impl Drop for KernelPipe {
    fn drop(&mut self) {
        LIVE_PIPES.fetch_sub(1, Relaxed);
    }
}

fn take_buf() -> Box<[u8]> {
    BUFS.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
}

fn give_buf(b: Box<[u8]>) {
    BUFS.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// One read-like call (`read`, `splice`) of up to `cap` bytes from `src`. A short one means the
/// socket is drained: it is reported to tokio as "would block" so that the socket's readiness
/// is cleared now instead of by one more call returning `EAGAIN`.
fn read_once(
    src: &TcpStream,
    cap: usize,
    mut op: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = 0;
    let r = src.try_io(Interest::READABLE, || {
        let n = op()?;
        got = n;
        if n > 0 && n < cap {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        r => r,
    }
}

fn splice_flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Where the bytes of a burst wait between reading and writing.
enum Held {
    Pipe(KernelPipe),
    Buf(Box<[u8]>),
}

/// Which end of a one-way transfer failed.
#[derive(Debug, Clone, Copy)]
enum Failed {
    Source,
    Dest,
}

/// One direction: bytes from `src` to `dst`.
struct Transfer {
    /// The pipe or buffer of the burst in flight; `None` between bursts.
    held: Option<Held>,
    /// This direction has carried a burst that filled a buffer: bulk data, worth splicing.
    /// Until then bursts are copied: for small messages (RPCs, pings) `splice(2)` costs more
    /// than it saves (HAProxy's `splice-auto` makes the same call).
    bulk: bool,
    /// Bytes read and not yet written.
    pending: usize,
    /// For a buffer: where the unwritten bytes start.
    offset: usize,
    /// Bytes of the burst in flight, counted once it is all written.
    burst: usize,
    done: bool,
}

impl Transfer {
    fn new() -> Self {
        Transfer {
            held: None,
            bulk: false,
            pending: 0,
            offset: 0,
            burst: 0,
            done: false,
        }
    }

    /// Frees the pipe or buffer: pooled when empty, closed when it still holds bytes.
    fn release(&mut self) {
        match self.held.take() {
            Some(Held::Pipe(p)) if self.pending == 0 => p.give(),
            Some(Held::Buf(b)) => give_buf(b),
            _ => {}
        }
    }

    /// Reads a burst from `src`. Ok(0): EOF.
    fn read(&mut self, src: &TcpStream, mode: Mode) -> io::Result<usize> {
        if self.held.is_none() {
            self.held = Some(match mode {
                // No pipe to be had (file descriptors exhausted): this burst goes through a
                // buffer instead, rather than failing an established connection.
                Mode::Splice if self.bulk => KernelPipe::take()
                    .map(Held::Pipe)
                    .unwrap_or_else(|_| Held::Buf(take_buf())),
                _ => Held::Buf(take_buf()),
            });
        }
        let n = match self.held.as_mut().expect("just set") {
            Held::Pipe(p) => read_once(src, p.cap, || {
                nix::fcntl::splice(src, None, &p.w, None, p.cap, splice_flags())
                    .map_err(io::Error::from)
            })?,
            Held::Buf(b) => {
                let n = read_once(src, b.len(), || {
                    nix::unistd::read(src, b).map_err(io::Error::from)
                })?;
                if n == b.len() {
                    self.bulk = true;
                }
                n
            }
        };
        self.pending = n;
        self.offset = 0;
        Ok(n)
    }

    /// Writes what is pending to `dst`.
    fn write(&mut self, dst: &TcpStream) -> io::Result<usize> {
        let n = match self.held.as_mut().expect("bytes are pending") {
            Held::Pipe(p) => dst.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(&p.r, None, dst, None, self.pending, splice_flags())
                    .map_err(io::Error::from)
            })?,
            Held::Buf(b) => dst.try_write(&b[self.offset..self.offset + self.pending])?,
        };
        self.pending -= n;
        self.offset += n;
        Ok(n)
    }

    /// Moves bytes until `src` has nothing more for now (Pending), EOF (Ready(Ok): the
    /// half-close has been passed on) or an error. `moved(n)` is told of every finished burst.
    /// `other_done`: the opposite direction has already ended.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        mode: Mode,
        other_done: bool,
        moved: &mut dyn FnMut(u64),
    ) -> Poll<Result<(), Failed>> {
        loop {
            if self.pending == 0 {
                if ready!(src.poll_read_ready(cx)).is_err() {
                    return Poll::Ready(Err(Failed::Source));
                }
                match self.read(src, mode) {
                    Ok(0) => {
                        self.release();
                        self.done = true;
                        // EOF: pass the half-close on (a peer already gone shows up in the
                        // other direction). When the other direction is over too, both
                        // sockets are closed next, which sends the FIN: no call for it here.
                        if !other_done {
                            let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                        }
                        return Poll::Ready(Ok(()));
                    }
                    Ok(n) => self.burst = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.release();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Poll::Ready(Err(Failed::Source)),
                }
            }
            while self.pending > 0 {
                if ready!(dst.poll_write_ready(cx)).is_err() {
                    return Poll::Ready(Err(Failed::Dest));
                }
                match self.write(dst) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => return Poll::Ready(Err(Failed::Dest)),
                }
            }
            // The burst is written: give the pipe or buffer back before waiting for more.
            self.release();
            moved(self.burst as u64);
        }
    }
}

pin_project_lite::pin_project! {
    /// Both directions of one connection, its idle timer and its kill switch.
    pub struct Pipe<'a, K> {
        client: &'a TcpStream,
        server: &'a TcpStream,
        up: Transfer,
        down: Transfer,
        first_close: Option<Side>,
        idle: Duration,
        last: Instant,
        mode: Mode,
        totals: &'a Totals,
        on_bytes: &'a (dyn Fn(Side, u64) + Sync),
        #[pin]
        timer: Sleep,
        #[pin]
        kill: K,
    }
}

/// Copies until both directions are closed, one side fails, `idle` passes with no byte moved,
/// or `kill` completes. `on_bytes(side, n)` is told of every burst (for live counters).
pub fn pipe<'a, K: Future<Output = ()>>(
    client: &'a TcpStream,
    server: &'a TcpStream,
    idle: Duration,
    kill: K,
    totals: &'a Totals,
    on_bytes: &'a (dyn Fn(Side, u64) + Sync),
    mode: Mode,
) -> Pipe<'a, K> {
    let now = Instant::now();
    Pipe {
        client,
        server,
        up: Transfer::new(),
        down: Transfer::new(),
        first_close: None,
        idle,
        last: now,
        mode,
        totals,
        on_bytes,
        timer: sleep_until(now + idle),
        kill,
    }
}

impl<K: Future<Output = ()>> Future for Pipe<'_, K> {
    type Output = End;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<End> {
        let mut this = self.project();
        if this.kill.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Killed);
        }
        let mut moved = false;
        let (totals, on_bytes) = (*this.totals, *this.on_bytes);
        if !this.up.done {
            let mut count = |n| {
                totals.up.fetch_add(n, Relaxed);
                on_bytes(Side::Client, n);
                moved = true;
            };
            match this.up.poll(
                cx,
                this.client,
                this.server,
                *this.mode,
                this.down.done,
                &mut count,
            ) {
                Poll::Ready(Ok(())) => {
                    this.first_close.get_or_insert(Side::Client);
                }
                Poll::Ready(Err(Failed::Source)) => return Poll::Ready(End::Reset(Side::Client)),
                Poll::Ready(Err(Failed::Dest)) => return Poll::Ready(End::Reset(Side::Server)),
                Poll::Pending => {}
            }
        }
        if !this.down.done {
            let mut count = |n| {
                totals.down.fetch_add(n, Relaxed);
                on_bytes(Side::Server, n);
                moved = true;
            };
            match this.down.poll(
                cx,
                this.server,
                this.client,
                *this.mode,
                this.up.done,
                &mut count,
            ) {
                Poll::Ready(Ok(())) => {
                    this.first_close.get_or_insert(Side::Server);
                }
                Poll::Ready(Err(Failed::Source)) => return Poll::Ready(End::Reset(Side::Server)),
                Poll::Ready(Err(Failed::Dest)) => return Poll::Ready(End::Reset(Side::Client)),
                Poll::Pending => {}
            }
        }
        if this.up.done && this.down.done {
            return Poll::Ready(End::Closed(this.first_close.unwrap_or(Side::Client)));
        }
        if moved {
            *this.last = Instant::now();
        }
        // The timer is re-armed lazily: when it fires, it is pushed to last activity + idle,
        // so a busy connection costs no timer update per burst.
        while this.timer.as_mut().poll(cx).is_ready() {
            let deadline = *this.last + *this.idle;
            if Instant::now() >= deadline {
                return Poll::Ready(End::IdleTimeout);
            }
            this.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pooled_here() -> usize {
        PIPES.with(|p| pool(p).len())
    }

    /// Descriptors run out on one thread while another, with no traffic, holds idle pipes:
    /// releasing from the first must close the second's, or a waiting client waits for ever.
    #[test]
    fn release_frees_idle_pipes_of_every_thread() {
        let (pooled_tx, pooled_rx) = std::sync::mpsc::channel();
        let (released_tx, released_rx) = std::sync::mpsc::channel::<()>();
        let idle_thread = std::thread::spawn(move || {
            let pipes: Vec<KernelPipe> = (0..3).map(|_| KernelPipe::take().unwrap()).collect();
            pipes.into_iter().for_each(KernelPipe::give);
            pooled_tx.send(pooled_here()).unwrap();
            released_rx.recv().unwrap();
            pooled_here()
        });
        assert_eq!(pooled_rx.recv().unwrap(), 3);
        release_pools();
        released_tx.send(()).unwrap();
        assert_eq!(
            idle_thread.join().unwrap(),
            0,
            "the idle thread kept its pipes"
        );
    }
}
