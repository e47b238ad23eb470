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

struct Running {
    local: SocketAddr,
    frontend: Arc<ArcSwap<String>>,
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
            match sockopt::bind(w.addr, w.backlog) {
                Ok(l) => bound.push((w.addr, l)),
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
                r.frontend.store(Arc::new(w.frontend.clone()));
                r.slots.store(Arc::new(w.slots.clone()));
            }
        }
        for (addr, listener) in bound {
            let w = wanted
                .iter()
                .find(|w| w.addr == addr)
                .expect("bound from wanted");
            let local = listener.local_addr().unwrap_or(addr);
            let r = Running {
                local,
                frontend: Arc::new(ArcSwap::from_pointee(w.frontend.clone())),
                slots: Arc::new(ArcSwap::from_pointee(w.slots.clone())),
                stop: shared.stop_accepting.child_token(),
            };
            let span = info_span!("listener", frontend = %w.frontend, addr = %local);
            tokio::spawn(
                accept_loop(
                    listener,
                    r.frontend.clone(),
                    r.slots.clone(),
                    shared.clone(),
                    r.stop.clone(),
                )
                .instrument(span),
            );
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
            .filter(|r| r.frontend.load().as_str() == frontend)
            .map(|r| r.local)
            .collect();
        v.sort();
        v
    }
}

/// Accept errors that mean "out of resources": back off and keep going.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn accept_loop(
    listener: TcpListener,
    frontend: Arc<ArcSwap<String>>,
    fe_slots: Arc<ArcSwap<Option<Arc<Semaphore>>>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    // Resource errors come in bursts: log the first, count the rest, report when it passes.
    let mut burst: Option<(Instant, u64)> = None;
    loop {
        let global = tokio::select! {
            p = shared.maxconn.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.cancelled() => return,
        };
        let fe_slot = match fe_slots.load_full().as_ref().clone() {
            Some(sem) => Some(tokio::select! {
                p = sem.acquire_owned() => p.expect("never closed"),
                _ = stop.cancelled() => return,
            }),
            None => None,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some((since, n)) = burst.take() {
                    info!(
                        "accepting again after {n} failed accepts in {:?}",
                        since.elapsed()
                    );
                }
                sockopt::tune_stream(&stream);
                let fe = frontend.load_full();
                let counters = shared.state.frontend_counters(&fe);
                // The connection's own log line carries client and frontend; the span only groups
                // its debug lines, without repeating them.
                let span = info_span!(parent: None, "conn");
                let conn_shared = shared.clone();
                shared.conns.spawn(
                    async move {
                        forward::handle(stream, peer, fe.as_str().into(), counters, conn_shared)
                            .await;
                        drop(global);
                        drop(fe_slot);
                    }
                    .instrument(span),
                );
            }
            Err(e) if is_resource_exhaustion(&e) => {
                match &mut burst {
                    Some((_, n)) => *n += 1,
                    None => {
                        error!("accept failed: {e}; backing off until it recovers");
                        burst = Some((Instant::now(), 1));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A client that reset before we accepted it, and the like: routine.
            Err(e) => debug!("accept: {e}"),
        }
    }
}
