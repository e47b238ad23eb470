//! Listeners and their accept loops.
//!
//! Listeners are keyed by their configured address, so a reload that keeps an address keeps
//! its socket (no refused connection) even if the frontend around it changed. Before each
//! accept a loop takes a global and a per-frontend connection slot: at maxconn it stops
//! accepting and the excess waits in the kernel's accept queue, nothing is dropped.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span};

use crate::{Shared, forward, sockopt};

#[derive(Debug, thiserror::Error)]
#[error("frontend {frontend}: cannot bind {addr}: {source}")]
pub struct BindError {
    pub frontend: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// The frontend a listener serves; replaced (not mutated) when a reload renames it.
pub struct FeName {
    pub name: Arc<str>,
}

struct Running {
    local: SocketAddr,
    frontend: Arc<ArcSwap<FeName>>,
    slots: Arc<ArcSwap<Option<Arc<Semaphore>>>>,
    /// `disable frontend`: the accept loops stop taking clients, who wait in the kernel's
    /// accept queue, until `enable frontend`.
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    stop: CancellationToken,
}

/// The listening sockets of every frontend.
#[derive(Default)]
pub struct Listeners {
    running: Mutex<HashMap<SocketAddr, Running>>,
}

/// What a listener should be: its address, frontend and limits.
pub struct Wanted {
    pub addr: SocketAddr,
    pub frontend: String,
    pub backlog: u32,
    pub slots: Option<Arc<Semaphore>>,
}

impl Listeners {
    /// Makes the set of listeners match `wanted`: unchanged addresses keep their socket and
    /// switch to the new frontend settings; gone ones stop; new ones bind. If any new bind
    /// fails, nothing changes and the error is returned.
    pub fn sync(&self, wanted: Vec<Wanted>, shared: &Arc<Shared>) -> Result<(), BindError> {
        let mut running = self.running.lock();
        // A listener bound to port 0 is known by its configured address and by the one it
        // got; a config that names the latter means the same socket. Re-key it.
        let rekey: Vec<(SocketAddr, SocketAddr)> = running
            .iter()
            .filter(|(k, r)| **k != r.local && wanted.iter().any(|w| w.addr == r.local))
            .map(|(k, r)| (*k, r.local))
            .collect();
        for (old, new) in rekey {
            if let Some(r) = running.remove(&old) {
                running.insert(new, r);
            }
        }
        let mut bound = Vec::new();
        for w in wanted.iter().filter(|w| !running.contains_key(&w.addr)) {
            // A port none of ours holds but someone else does: not joined through SO_REUSEPORT.
            let ours = running.values().any(|r| r.local.port() == w.addr.port());
            if !ours && sockopt::held_by_another(w.addr) {
                return Err(BindError {
                    frontend: w.frontend.clone(),
                    addr: w.addr,
                    source: io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process (another sclb?) listens on it",
                    ),
                });
            }
            match bind_all(w, shared.data.workers.len()) {
                Ok(ls) => bound.push((w.addr, ls)),
                Err(source) => {
                    return Err(BindError {
                        frontend: w.frontend.clone(),
                        addr: w.addr,
                        source,
                    });
                }
            }
        }
        running.retain(|addr, r| {
            let keep = wanted.iter().any(|w| w.addr == *addr);
            if !keep {
                info!(addr = %addr, "listener closed: no longer in the config");
                r.stop.cancel();
            }
            keep
        });
        for w in &wanted {
            if let Some(r) = running.get(&w.addr) {
                if *r.frontend.load().name != *w.frontend {
                    r.frontend.store(Arc::new(FeName {
                        name: w.frontend.as_str().into(),
                    }));
                }
                r.slots.store(Arc::new(w.slots.clone()));
            }
        }
        for (addr, listeners) in bound {
            let w = wanted
                .iter()
                .find(|w| w.addr == addr)
                .expect("bound from wanted");
            let local = listeners[0].local_addr().unwrap_or(addr);
            let r = Running {
                local,
                frontend: Arc::new(ArcSwap::from_pointee(FeName {
                    name: w.frontend.as_str().into(),
                })),
                slots: Arc::new(ArcSwap::from_pointee(w.slots.clone())),
                paused: Arc::new(tokio::sync::watch::Sender::new(false)),
                stop: shared.life.stop_accepting.child_token(),
            };
            for (i, std_listener) in listeners.into_iter().enumerate() {
                let span = info_span!("listener", frontend = %w.frontend, addr = %local);
                let (fe, slots, sh, stop) = (
                    r.frontend.clone(),
                    r.slots.clone(),
                    shared.clone(),
                    r.stop.clone(),
                );
                let paused = r.paused.subscribe();
                let task = async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(l) => accept_loop(l, fe, slots, paused, sh, stop).await,
                        Err(e) => error!("cannot register the listener: {e}"),
                    }
                }
                .instrument(span);
                match shared.data.workers.get(i) {
                    Some(worker) => drop(worker.spawn(task)),
                    None => drop(tokio::spawn(task)),
                }
            }
            info!(frontend = %w.frontend, addr = %local, "listening");
            running.insert(addr, r);
        }
        Ok(())
    }

    /// Pauses or resumes every listener of `frontend` (`disable|enable frontend`); returns
    /// how many it has.
    pub fn set_paused(&self, frontend: &str, paused: bool) -> usize {
        let running = self.running.lock();
        let mut n = 0;
        for r in of_frontend(&running, frontend) {
            r.paused.send_replace(paused);
            n += 1;
        }
        n
    }

    /// Whether `frontend` takes no clients: it has no listener (`shutdown frontend`) or every
    /// one is paused (`disable frontend`).
    pub fn is_stopped(&self, frontend: &str) -> bool {
        let running = self.running.lock();
        of_frontend(&running, frontend).all(|r| *r.paused.borrow())
    }

    /// Closes every listener of `frontend` (`shutdown frontend`); live connections go on. The
    /// next reload binds them again. Returns how many were closed.
    pub fn shut_down(&self, frontend: &str) -> usize {
        let mut running = self.running.lock();
        let before = running.len();
        running.retain(|_, r| {
            let mine = &*r.frontend.load().name == frontend;
            if mine {
                r.stop.cancel();
            }
            !mine
        });
        before - running.len()
    }

    /// Actual addresses of a frontend's listeners (port 0 resolved).
    pub fn local_addrs(&self, frontend: &str) -> Vec<SocketAddr> {
        let running = self.running.lock();
        let mut v: Vec<SocketAddr> = of_frontend(&running, frontend).map(|r| r.local).collect();
        v.sort();
        v
    }
}

/// The running listeners that serve `frontend` now (a reload may have renamed theirs).
fn of_frontend<'a>(
    running: &'a HashMap<SocketAddr, Running>,
    frontend: &'a str,
) -> impl Iterator<Item = &'a Running> {
    running
        .values()
        .filter(move |r| &*r.frontend.load().name == frontend)
}

/// One listening socket per worker thread (SO_REUSEPORT), or one for the current runtime.
fn bind_all(w: &Wanted, workers: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    if workers <= 1 {
        return Ok(vec![sockopt::bind_std(w.addr, w.backlog, workers == 1)?]);
    }
    let first = sockopt::bind_std(w.addr, w.backlog, true)?;
    // Port 0: the others bind the port the first one got.
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers {
        all.push(sockopt::bind_std(addr, w.backlog, true)?);
    }
    Ok(all)
}

/// Accept failures for want of resources (file descriptors, memory), logged once per burst
/// for the whole process — every worker's listener and the admin socket — not per attempt.
/// A burst ends after a second without a failure: under churn, successes and failures
/// alternate within one burst.
pub struct Bursts {
    /// Whether a burst is open: checked without the lock on every accept.
    open: std::sync::atomic::AtomicBool,
    /// (started, failures, last failure)
    state: Mutex<Option<(Instant, u64, Instant)>>,
}

pub static ACCEPT_FAILURES: Bursts = Bursts {
    open: std::sync::atomic::AtomicBool::new(false),
    state: Mutex::new(None),
};

impl Bursts {
    pub fn failed(&self, e: &io::Error) {
        let mut st = self.state.lock();
        match &mut *st {
            Some((_, n, last)) => {
                *n += 1;
                *last = Instant::now();
            }
            None => {
                error!("accept failed: {e}; backing off until it recovers");
                *st = Some((Instant::now(), 1, Instant::now()));
                self.open.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Whether an accept failed for want of resources within the last second.
    pub fn failed_recently(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .state
                .lock()
                .is_some_and(|(_, _, last)| last.elapsed() < Duration::from_secs(1))
    }

    pub fn succeeded(&self) {
        if !self.open.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut st = self.state.lock();
        if let Some((since, n, last)) = *st
            && last.elapsed() >= Duration::from_secs(1)
        {
            info!(
                "accepting again after {n} failed accepts in {:?}",
                since.elapsed()
            );
            *st = None;
            self.open.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// An accept (or the fd held for one) failed for want of resources: give back the file
/// descriptors this thread keeps pooled (idle pipes) and count it in the burst.
fn out_of_fds(e: &io::Error) {
    crate::pipe::release_pools();
    ACCEPT_FAILURES.failed(e);
}

async fn accept_loop(
    listener: TcpListener,
    frontend: Arc<ArcSwap<FeName>>,
    fe_slots: Arc<ArcSwap<Option<Arc<Semaphore>>>>,
    mut paused: tokio::sync::watch::Receiver<bool>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // The frontend's counters, looked up again only when a reload renames the frontend.
    let mut cached: Option<(Arc<FeName>, Arc<crate::state::FrontendCounters>)> = None;
    loop {
        // A disabled frontend takes nobody: clients wait in the kernel's accept queue.
        while *paused.borrow_and_update() {
            tokio::select! {
                r = paused.changed() => if r.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
        // At maxconn, do not accept: new clients wait in the kernel's accept queue. A slot is
        // only waited for here, not held: with one listener per worker, a listener with no
        // client must not keep a free slot from another that has one.
        let fe_sem = fe_slots.load_full().as_ref().clone();
        for sem in std::iter::once(&shared.data.maxconn).chain(fe_sem.as_ref()) {
            if sem.available_permits() == 0 {
                tokio::select! {
                    p = sem.acquire() => drop(p),
                    _ = stop.cancelled() => return,
                }
            }
        }
        // Short of file descriptors: accept only with one in hand for the client's server.
        // Held for a second at most while no client comes, then looked at again.
        let reserve = if ACCEPT_FAILURES.failed_recently() || sockopt::fd_shortage_recent() {
            match sockopt::reserve_fd() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    if sockopt::is_resource_exhaustion(&e) {
                        out_of_fds(&e);
                    } else {
                        debug!("reserving a file descriptor: {e}");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        _ = stop.cancelled() => return,
                    }
                }
            }
        } else {
            None
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = tokio::time::sleep(Duration::from_secs(1)), if reserve.is_some() => continue,
            // Disabled while waiting here: back to the top, where it waits unaccepted.
            r = paused.changed() => match r {
                Ok(()) => continue,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        // Usually free at once; if another worker took the last slot meanwhile, this client
        // waits here, accepted, for the next one. The frontend's slots are read again: `set
        // maxconn frontend` may have given it a limit while this loop waited in accept.
        let fe_sem = fe_slots.load_full().as_ref().clone();
        let slots = async {
            let global = shared.data.maxconn.clone().acquire_owned().await;
            let fe = match fe_sem {
                Some(sem) => Some(sem.acquire_owned().await),
                None => None,
            };
            (
                global.expect("never closed"),
                fe.map(|p| p.expect("never closed")),
            )
        };
        match accepted {
            Ok((stream, peer)) => {
                let (global, fe_slot) = tokio::select! {
                    s = slots => s,
                    _ = stop.cancelled() => return,
                };
                ACCEPT_FAILURES.succeeded();
                let fe = frontend.load_full();
                let counters = match &cached {
                    Some((name, c)) if Arc::ptr_eq(name, &fe) => c.clone(),
                    _ => {
                        let c = shared.state.frontend_counters(&fe.name);
                        cached = Some((fe.clone(), c.clone()));
                        c
                    }
                };
                let conn_shared = shared.clone();
                // No span per connection: its one log line carries client, frontend and server.
                shared.data.conns.spawn(async move {
                    // The client's server socket takes the reserved fd's place.
                    drop(reserve);
                    forward::handle(stream, peer, fe.name.clone(), counters, conn_shared).await;
                    drop(global);
                    drop(fe_slot);
                });
            }
            Err(e) if sockopt::is_resource_exhaustion(&e) => {
                out_of_fds(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A client that reset before we accepted it, and the like: routine.
            Err(e) => debug!("accept: {e}"),
        }
    }
}
