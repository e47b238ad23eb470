//! Listeners and their accept loops.
//!
//! Listeners are keyed by their configured address, so a reload that keeps an address keeps
//! its socket (no refused connection) even if the frontend around it changed. Before each
//! accept a loop takes a global and a per-frontend connection slot: at maxconn it stops
//! accepting and the excess waits in the kernel's accept queue, nothing is dropped.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
        let mut running = self.running.lock().unwrap();
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
            match bind_all(w, shared.workers.len()) {
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
                stop: shared.stop_accepting.child_token(),
            };
            for (i, std_listener) in listeners.into_iter().enumerate() {
                let span = info_span!("listener", frontend = %w.frontend, addr = %local);
                let (fe, slots, sh, stop) = (
                    r.frontend.clone(),
                    r.slots.clone(),
                    shared.clone(),
                    r.stop.clone(),
                );
                let task = async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(l) => accept_loop(l, fe, slots, sh, stop).await,
                        Err(e) => error!("cannot register the listener: {e}"),
                    }
                }
                .instrument(span);
                match shared.workers.get(i) {
                    Some(worker) => drop(worker.spawn(task)),
                    None => drop(tokio::spawn(task)),
                }
            }
            info!(frontend = %w.frontend, addr = %local, "listening");
            running.insert(addr, r);
        }
        Ok(())
    }

    /// Actual addresses of a frontend's listeners (port 0 resolved).
    pub fn local_addrs(&self, frontend: &str) -> Vec<SocketAddr> {
        let running = self.running.lock().unwrap();
        let mut v: Vec<SocketAddr> = running
            .values()
            .filter(|r| &*r.frontend.load().name == frontend)
            .map(|r| r.local)
            .collect();
        v.sort();
        v
    }
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
        let mut st = self.state.lock().unwrap();
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

    pub fn succeeded(&self) {
        if !self.open.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut st = self.state.lock().unwrap();
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

/// Accept errors that mean "out of resources": back off and keep going.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn accept_loop(
    listener: TcpListener,
    frontend: Arc<ArcSwap<FeName>>,
    fe_slots: Arc<ArcSwap<Option<Arc<Semaphore>>>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // The frontend's counters, looked up again only when a reload renames the frontend.
    let mut cached: Option<(Arc<FeName>, Arc<crate::state::FrontendCounters>)> = None;
    loop {
        // At maxconn, do not accept: new clients wait in the kernel's accept queue. A slot is
        // only waited for here, not held: with one listener per worker, a listener with no
        // client must not keep a free slot from another that has one.
        let fe_sem = fe_slots.load_full().as_ref().clone();
        for sem in std::iter::once(&shared.maxconn).chain(fe_sem.as_ref()) {
            if sem.available_permits() == 0 {
                tokio::select! {
                    p = sem.acquire() => drop(p),
                    _ = stop.cancelled() => return,
                }
            }
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        // Usually free at once; if another worker took the last slot meanwhile, this client
        // waits here, accepted, for the next one.
        let slots = async {
            let global = shared.maxconn.clone().acquire_owned().await;
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
                shared.conns.spawn(async move {
                    forward::handle(stream, peer, fe.name.clone(), counters, conn_shared).await;
                    drop(global);
                    drop(fe_slot);
                });
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Give back the file descriptors this thread keeps pooled (idle pipes).
                crate::pipe::release_pools();
                ACCEPT_FAILURES.failed(&e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A client that reset before we accepted it, and the like: routine.
            Err(e) => debug!("accept: {e}"),
        }
    }
}
