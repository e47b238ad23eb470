//! Live client connections (HAProxy calls them sessions: `show sess`, `shutdown session`; a
//! Spark session is something else, see `gateway::registry`). Registered once a server is connected and
//! removed when the connection ends (by a guard, so no exit path forgets it).
//!
//! The table is split in shards, one per thread that registers (worker threads, one runtime
//! each): a connection takes only its own thread's lock, twice, and two workers never wait
//! for each other. `show sess` walks every shard and lists connections oldest first, as one
//! table did.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use tokio::time::Instant;

use crate::pipe::Totals;

pub struct ConnInfo {
    pub client: SocketAddr,
    pub frontend: Arc<str>,
    pub backend: Arc<str>,
    pub server: Arc<str>,
    pub started: Instant,
    pub totals: Arc<Totals>,
}

/// Shards per table: more than the worker threads sclb runs on a usual machine, so that each
/// thread has its own (threads past it share, which is still correct).
const SHARDS: usize = 64;

/// One shard on its own cache line, so that two workers' locks do not share one.
#[repr(align(64))]
#[derive(Default)]
struct Shard(Mutex<BTreeMap<u64, ConnInfo>>);

pub struct LiveConns {
    next: AtomicU64,
    shards: Box<[Shard]>,
}

impl Default for LiveConns {
    fn default() -> Self {
        LiveConns {
            next: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

/// This thread's shard number: threads take the next one the first time they register.
fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Removes its session from the registry when dropped.
pub struct ConnGuard<'a> {
    sessions: &'a LiveConns,
    shard: usize,
    id: u64,
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.sessions.shards[self.shard].0.lock().remove(&self.id);
    }
}

impl LiveConns {
    pub fn register(&self, info: ConnInfo) -> ConnGuard<'_> {
        let id = self.next.fetch_add(1, Relaxed) + 1;
        let shard = my_shard();
        self.shards[shard].0.lock().insert(id, info);
        ConnGuard {
            sessions: self,
            shard,
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The line `show sess` prints for one connection.
    fn line(id: u64, s: &ConnInfo) -> String {
        let proto = if s.client.is_ipv4() { "tcpv4" } else { "tcpv6" };
        format!(
            "0x{id:x}: proto={proto} src={} fe={} be={} srv={} age={}s bytes_in={} bytes_out={}",
            s.client,
            s.frontend,
            s.backend,
            s.server,
            s.started.elapsed().as_secs(),
            s.totals.up.load(Relaxed),
            s.totals.down.load(Relaxed),
        )
    }

    /// `show sess <id>`: the connection's line, if it is live.
    pub fn show_one(&self, id: u64) -> Option<String> {
        self.shards.iter().find_map(|shard| {
            let map = shard.0.lock();
            map.get(&id).map(|s| format!("{}\n", Self::line(id, s)))
        })
    }

    /// `shutdown session <id>`: closes that connection (both sides); whether it was live.
    pub fn shutdown(&self, id: u64) -> bool {
        self.shards.iter().any(|shard| {
            let map = shard.0.lock();
            map.get(&id).map(|s| s.totals.kill.notify_one()).is_some()
        })
    }

    /// One line per live connection, oldest first.
    pub fn show(&self) -> String {
        let mut lines: Vec<(u64, String)> = Vec::new();
        for shard in self.shards.iter() {
            for (id, s) in shard.0.lock().iter() {
                lines.push((*id, Self::line(*id, s)));
            }
        }
        lines.sort_unstable_by_key(|(id, _)| *id);
        let mut out = String::new();
        for (_, line) in lines {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(port: u16) -> ConnInfo {
        ConnInfo {
            client: SocketAddr::from(([127, 0, 0, 1], port)),
            frontend: "fe".into(),
            backend: "be".into(),
            server: "s1".into(),
            started: Instant::now(),
            totals: Arc::new(Totals::default()),
        }
    }

    /// Connections registered from several threads are listed together, oldest first, and
    /// each disappears with its guard, whichever thread drops it.
    #[test]
    fn show_lists_every_threads_connections_oldest_first() {
        let sessions = Arc::new(LiveConns::default());
        let first = sessions.register(info(1000));
        std::thread::scope(|s| {
            for t in 0..3u16 {
                let sessions = &sessions;
                s.spawn(move || std::mem::forget(sessions.register(info(1001 + t))));
            }
        });
        let last = sessions.register(info(2000));
        let shown = sessions.show();
        let ports: Vec<&str> = shown
            .lines()
            .map(|l| {
                l.split("src=127.0.0.1:")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
            })
            .collect();
        assert_eq!(ports.len(), 5, "{shown}");
        assert_eq!((ports[0], ports[4]), ("1000", "2000"), "{shown}");
        assert!(shown.starts_with("0x1: proto=tcpv4 src=127.0.0.1:1000 fe=fe be=be srv=s1 age=0s bytes_in=0 bytes_out=0\n"), "{shown}");
        drop(first);
        std::thread::scope(|s| {
            s.spawn(move || drop(last));
        });
        assert_eq!(sessions.len(), 3);
        assert!(!sessions.show().contains(":1000 ") && !sessions.show().contains(":2000 "));
    }
}
