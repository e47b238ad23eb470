//! Live client connections, for `show sess`. Registered once a server is connected and
//! removed when the connection ends (by a guard, so no exit path forgets it).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::pipe::Totals;

pub struct SessInfo {
    pub client: SocketAddr,
    pub frontend: Arc<str>,
    pub backend: Arc<str>,
    pub server: Arc<str>,
    pub started: Instant,
    pub totals: Arc<Totals>,
}

#[derive(Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, SessInfo>>,
}

/// Removes its session from the registry when dropped.
pub struct SessGuard<'a> {
    sessions: &'a Sessions,
    id: u64,
}

impl Drop for SessGuard<'_> {
    fn drop(&mut self) {
        self.sessions.live.lock().unwrap().remove(&self.id);
    }
}

impl Sessions {
    pub fn register(&self, info: SessInfo) -> SessGuard<'_> {
        let id = self.next.fetch_add(1, Relaxed) + 1;
        self.live.lock().unwrap().insert(id, info);
        SessGuard { sessions: self, id }
    }

    pub fn len(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One line per live connection, oldest first.
    pub fn show(&self) -> String {
        let mut out = String::new();
        for (id, s) in self.live.lock().unwrap().iter() {
            let proto = if s.client.is_ipv4() { "tcpv4" } else { "tcpv6" };
            let _ = writeln!(
                out,
                "0x{id:x}: proto={proto} src={} fe={} be={} srv={} age={}s bytes_in={} bytes_out={}",
                s.client,
                s.frontend,
                s.backend,
                s.server,
                s.started.elapsed().as_secs(),
                s.totals.up.load(Relaxed),
                s.totals.down.load(Relaxed),
            );
        }
        out
    }
}
