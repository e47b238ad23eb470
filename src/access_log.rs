//! The process's log output: every formatted log line (the per-connection access lines and
//! the rest) enters here from the thread that logged it and leaves through one writer thread
//! to stderr (journald under systemd). Owns the per-thread line buffers, the writer thread,
//! and the count of lines dropped under overload (`sclb_log_dropped_total`).
//!
//! Why not `tracing_appender::non_blocking`, as before: it allocates each line, sends it over
//! a channel (waking the writer thread: a `futex` call on the connection's thread) and
//! writes it with its own `write(2)`. Here a line is appended to its thread's buffer under an
//! uncontended lock; the writer takes the buffers every [`FLUSH_INTERVAL`] or when one holds
//! [`FLUSH_SIZE`] bytes, and writes them with one `write(2)`. So an access line costs no
//! system call. Lines that are not access lines (start-up, health, reloads, warnings) are rare
//! and an operator waits for them: they wake the writer at once.
//!
//! Within one thread, lines keep their order; lines of different threads are written in
//! batches, thread by thread, so across threads they may be out of order by up to
//! [`FLUSH_INTERVAL`] (each line carries its time). A buffer that reaches [`MAX_BUFFERED`]
//! because the writer is stuck (a blocked pipe, a stalled journald) drops further lines and
//! counts them, as HAProxy drops log lines rather than slow traffic down. What is buffered is
//! written when the [`LogGuard`] is dropped: at every exit of `main`, graceful or not, except
//! SIGKILL.

use parking_lot::Mutex;
use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

/// A thread's buffer holding this much wakes the writer.
pub const FLUSH_SIZE: usize = 64 * 1024;
/// Longest a buffered access line waits for the writer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Beyond this much unwritten text per thread, lines are dropped and counted.
pub const MAX_BUFFERED: usize = 1024 * 1024;

/// Lines dropped by every writer of this process, for `sclb_log_dropped_total`.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because the writer could not keep up (or its output failed).
pub fn dropped() -> u64 {
    DROPPED.load(Relaxed)
}

/// Where formatted lines go: a `MakeWriter` for `tracing_subscriber::fmt`.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

/// Stops the writer thread and writes what is buffered, when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    /// Tells this sink's buffers apart in a thread's list (tests run several sinks).
    id: u64,
    buffers: Mutex<Vec<Arc<ThreadBuf>>>,
    writer: OnceLock<std::thread::Thread>,
    /// Some buffer has a line the writer has not been told to flush yet.
    pending: AtomicBool,
    /// Flush now: a buffer passed FLUSH_SIZE, or an operator-facing line was logged.
    kick: AtomicBool,
    stop: AtomicBool,
    max_buffered: usize,
    interval: Duration,
}

struct ThreadBuf {
    text: Mutex<Vec<u8>>,
    /// False once its thread has exited: the writer forgets it after taking its text.
    alive: AtomicBool,
}

/// A thread's handle on its buffer: marks the buffer dead when the thread exits.
struct Local {
    sink: u64,
    buf: Arc<ThreadBuf>,
}

impl Drop for Local {
    fn drop(&mut self) {
        self.buf.alive.store(false, Relaxed);
    }
}

thread_local! {
    static LOCAL: RefCell<Vec<Local>> = const { RefCell::new(Vec::new()) };
}

impl AccessLog {
    /// Starts the writer thread writing to `out` (stderr in the binary).
    pub fn start(out: impl Write + Send + 'static) -> io::Result<(AccessLog, LogGuard)> {
        Self::start_with(out, MAX_BUFFERED, FLUSH_INTERVAL)
    }

    /// [`AccessLog::start`] with a buffer limit and flush interval of one's own (tests).
    pub fn start_with(
        out: impl Write + Send + 'static,
        max_buffered: usize,
        interval: Duration,
    ) -> io::Result<(AccessLog, LogGuard)> {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let shared = Arc::new(Shared {
            id: IDS.fetch_add(1, Relaxed),
            buffers: Mutex::new(Vec::new()),
            writer: OnceLock::new(),
            pending: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            max_buffered,
            interval,
        });
        let for_writer = shared.clone();
        let handle = std::thread::Builder::new()
            .name("sclb-log".into())
            .spawn(move || for_writer.write_loop(out))?;
        let _ = shared.writer.set(handle.thread().clone());
        Ok((
            AccessLog {
                shared: shared.clone(),
            },
            LogGuard {
                shared,
                writer: Some(handle),
            },
        ))
    }

    /// Appends one formatted line to this thread's buffer. `urgent` lines wake the writer now;
    /// the others wait for the interval or a full buffer.
    pub fn append(&self, line: &[u8], urgent: bool) {
        let sh = &self.shared;
        let len = with_buffer(sh, |text| {
            if text.len() + line.len() > sh.max_buffered {
                DROPPED.fetch_add(1, Relaxed);
                return None;
            }
            text.extend_from_slice(line);
            Some(text.len())
        });
        let Some(len) = len else { return };
        if urgent || len >= FLUSH_SIZE {
            sh.wake(&sh.kick);
        } else {
            sh.wake(&sh.pending);
        }
    }
}

/// Runs `f` on this thread's buffer of sink `sh`, creating and registering it on first use.
fn with_buffer<R>(sh: &Shared, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let buf = LOCAL.try_with(|l| {
        let mut l = l.borrow_mut();
        if let Some(local) = l.iter().find(|b| b.sink == sh.id) {
            return local.buf.clone();
        }
        let buf = sh.register();
        l.push(Local {
            sink: sh.id,
            buf: buf.clone(),
        });
        buf
    });
    // A thread that is exiting (its thread-locals gone) gets a buffer of its own for this line.
    let buf = buf.unwrap_or_else(|_| {
        let b = sh.register();
        b.alive.store(false, Relaxed);
        b
    });
    let mut text = buf.text.lock();
    f(&mut text)
}

impl Shared {
    fn register(&self) -> Arc<ThreadBuf> {
        let buf = Arc::new(ThreadBuf {
            text: Mutex::new(Vec::new()),
            alive: AtomicBool::new(true),
        });
        self.buffers.lock().push(buf.clone());
        buf
    }

    /// Sets `flag` and unparks the writer, unless the flag was already set (then the writer
    /// has been told): at most one wake-up per flush, not one per line.
    fn wake(&self, flag: &AtomicBool) {
        if !flag.load(Relaxed)
            && !flag.swap(true, Relaxed)
            && let Some(t) = self.writer.get()
        {
            t.unpark();
        }
    }

    fn write_loop(&self, mut out: impl Write) {
        let mut batch = Vec::with_capacity(FLUSH_SIZE);
        loop {
            let stopping = self.stop.load(Relaxed);
            if !stopping && !self.kick.load(Relaxed) {
                if self.pending.load(Relaxed) {
                    // Let lines gather for the interval, unless told to flush sooner.
                    let deadline = Instant::now() + self.interval;
                    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                        if self.kick.load(Relaxed) || self.stop.load(Relaxed) {
                            break;
                        }
                        std::thread::park_timeout(left);
                    }
                } else {
                    std::thread::park();
                    continue;
                }
            }
            // Cleared before taking the buffers: a line appended from here on sets them
            // again, and is written by this round or the next.
            self.pending.store(false, Relaxed);
            self.kick.store(false, Relaxed);
            self.take_all(&mut batch);
            if !batch.is_empty() {
                if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                    let lost = batch.iter().filter(|&&b| b == b'\n').count();
                    DROPPED.fetch_add(lost as u64, Relaxed);
                }
                batch.clear();
            }
            if stopping {
                return;
            }
        }
    }

    /// Moves every buffer's text into `batch`, thread by thread, and forgets the buffers of
    /// threads that have exited.
    fn take_all(&self, batch: &mut Vec<u8>) {
        let buffers: Vec<Arc<ThreadBuf>> = {
            let mut all = self.buffers.lock();
            let snapshot = all.clone();
            // Dead ones are emptied below; dropping them now is safe, we hold them meanwhile.
            all.retain(|b| b.alive.load(Relaxed));
            snapshot
        };
        for b in &buffers {
            let mut text = b.text.lock();
            if text.is_empty() {
                continue;
            }
            if batch.is_empty() {
                // One thread's text: hand it over whole and give the thread our empty buffer.
                std::mem::swap(batch, &mut text);
            } else {
                batch.extend_from_slice(&text);
                text.clear();
            }
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        if let Some(w) = self.writer.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

/// Access lines are the events with an `end` field: "connection closed", "connection refused"
/// and the gateway's connection end. Those wait for a batch; every other line is urgent.
fn is_access_line(meta: &Metadata<'_>) -> bool {
    meta.fields().field("end").is_some() && *meta.level() >= tracing::Level::INFO
}

/// One event's writer: `tracing_subscriber::fmt` formats a whole line, then writes it once.
pub struct LineWriter<'a> {
    log: &'a AccessLog,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.log.append(line, self.urgent);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for AccessLog {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            log: self,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            log: self,
            urgent: !is_access_line(meta),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        cond()
    }

    #[test]
    fn lines_from_several_threads_are_written_whole_and_in_order_per_thread() {
        let out = Captured::default();
        let (log, guard) =
            AccessLog::start_with(out.clone(), MAX_BUFFERED, Duration::from_millis(10)).unwrap();
        let threads: Vec<_> = (0..3)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        log.append(format!("t{t} line {i}\n").as_bytes(), false);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        for t in 0..3 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("t{t} ")))
                .collect();
            let want: Vec<String> = (0..500).map(|i| format!("t{t} line {i}")).collect();
            assert_eq!(mine, want);
        }
    }

    #[test]
    fn access_lines_wait_for_the_interval_and_the_rest_flush_at_once() {
        let out = Captured::default();
        // An hour: an access line is only written by a kick, a full buffer or the guard.
        let (log, guard) =
            AccessLog::start_with(out.clone(), MAX_BUFFERED, Duration::from_secs(3600)).unwrap();
        log.append(b"access\n", false);
        log.append(b"started\n", true);
        assert!(
            wait_for(Duration::from_secs(10), || out.0.lock().as_slice()
                == b"access\nstarted\n"),
            "an urgent line did not flush what came before it"
        );
        log.append(b"access 2\n", false);
        drop(guard);
        assert_eq!(out.0.lock().as_slice(), b"access\nstarted\naccess 2\n");
    }

    #[test]
    fn a_full_buffer_flushes_without_waiting_for_the_interval() {
        let out = Captured::default();
        let (log, _guard) =
            AccessLog::start_with(out.clone(), MAX_BUFFERED, Duration::from_secs(3600)).unwrap();
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        for _ in 0..FLUSH_SIZE / line.len() {
            log.append(&line, false);
        }
        assert!(wait_for(Duration::from_secs(10), || out.0.lock().len() >= FLUSH_SIZE));
    }

    /// The writer stuck on a pipe nobody reads: lines beyond the buffer limit are dropped and
    /// counted, and appending never blocks.
    #[test]
    fn lines_are_dropped_and_counted_when_the_writer_is_stuck() {
        let (reader, writer) = std::io::pipe().unwrap();
        let (log, guard) = AccessLog::start_with(writer, 8 * 1024, FLUSH_INTERVAL).unwrap();
        let before = dropped();
        let line = [b'y'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        // The pipe (64 KiB) fills, the writer blocks, then this thread's 8 KiB fill up.
        for _ in 0..2000 {
            log.append(&line, true);
            if dropped() > before {
                break;
            }
        }
        assert!(
            wait_for(Duration::from_secs(30), || {
                log.append(&line, true);
                dropped() > before
            }),
            "no line dropped although the writer is blocked"
        );
        // Unblock the writer so that the guard can stop it.
        drop(reader);
        drop(guard);
    }
}
