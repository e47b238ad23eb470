//! The stick table: which server each client IP is pinned to, and until when.
//!
//! For Spark Connect a pin is a session: a client moved to another server loses its temp views
//! and cached frames. Entries name servers by [`ServerId`] (stable across reloads and reorders).
//! Each use refreshes the expiry; when the table is full the entry unused for longest goes.
//! One short mutex guards it; it is touched once per new connection, never on the copy path.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::server::ServerId;

#[derive(Debug, Clone, Copy)]
struct Entry {
    server: ServerId,
    expires: Instant,
    /// Tie-breaker for the expiry index.
    seq: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<IpAddr, Entry>,
    /// Entries ordered by expiry: the first is the next to expire and the one evicted when full.
    by_expiry: BTreeMap<(Instant, u64), IpAddr>,
    seq: u64,
}

impl Inner {
    fn remove(&mut self, ip: &IpAddr) -> Option<Entry> {
        let e = self.map.remove(ip)?;
        self.by_expiry.remove(&(e.expires, e.seq));
        Some(e)
    }

    fn insert(&mut self, ip: IpAddr, server: ServerId, expires: Instant) {
        self.remove(&ip);
        self.seq += 1;
        let seq = self.seq;
        self.map.insert(
            ip,
            Entry {
                server,
                expires,
                seq,
            },
        );
        self.by_expiry.insert((expires, seq), ip);
    }
}

/// One row of `show table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickEntry {
    pub key: IpAddr,
    pub server: ServerId,
    /// Time left before it expires.
    pub expires_in: Duration,
}

pub struct StickTable {
    inner: Mutex<Inner>,
    expire: Duration,
    size: usize,
}

impl StickTable {
    pub fn new(expire: Duration, size: usize) -> Self {
        StickTable {
            inner: Mutex::new(Inner::default()),
            expire,
            size: size.max(1),
        }
    }

    pub fn expire(&self) -> Duration {
        self.expire
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// The server `ip` is pinned to, if the pin is still live. Refreshes its expiry.
    pub fn lookup(&self, ip: IpAddr) -> Option<ServerId> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let e = *inner.map.get(&ip)?;
        if e.expires <= now {
            inner.remove(&ip);
            return None;
        }
        inner.insert(ip, e.server, deadline(now, self.expire));
        Some(e.server)
    }

    /// Pins `ip` to `server` (a new pin or a move). Evicts the oldest entries when full.
    pub fn pin(&self, ip: IpAddr, server: ServerId) {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        if !inner.map.contains_key(&ip) {
            while inner.map.len() >= self.size {
                let Some((_, oldest)) = inner.by_expiry.pop_first() else {
                    break;
                };
                inner.map.remove(&oldest);
            }
        }
        inner.insert(ip, server, deadline(now, self.expire));
    }

    /// Drops one pin (`clear table <t> key <ip>`). Returns whether it existed.
    pub fn unpin(&self, ip: IpAddr) -> bool {
        self.inner.lock().remove(&ip).is_some()
    }

    pub fn clear(&self) {
        let mut inner = self.inner.lock();
        inner.map.clear();
        inner.by_expiry.clear();
    }

    /// Drops every pin to `server` (the server is gone for good).
    pub fn forget_server(&self, server: ServerId) {
        let mut inner = self.inner.lock();
        let ips: Vec<IpAddr> = inner
            .map
            .iter()
            .filter(|(_, e)| e.server == server)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in ips {
            inner.remove(&ip);
        }
    }

    /// Removes expired entries; returns how many.
    pub fn purge(&self) -> usize {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let mut n = 0;
        while let Some((&(expires, _), _)) = inner.by_expiry.first_key_value() {
            if expires > now {
                break;
            }
            let (_, ip) = inner.by_expiry.pop_first().expect("first exists");
            inner.map.remove(&ip);
            n += 1;
        }
        n
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries, soonest to expire first.
    pub fn entries(&self) -> Vec<StickEntry> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .by_expiry
            .iter()
            .filter(|((exp, _), _)| *exp > now)
            .map(|((exp, _), ip)| StickEntry {
                key: *ip,
                server: inner.map[ip].server,
                expires_in: *exp - now,
            })
            .collect()
    }

    /// Restores an entry (from a state file) with the time it had left.
    pub fn restore(&self, ip: IpAddr, server: ServerId, expires_in: Duration) {
        if expires_in.is_zero() {
            return;
        }
        let mut inner = self.inner.lock();
        if inner.map.len() >= self.size && !inner.map.contains_key(&ip) {
            return;
        }
        inner.insert(
            ip,
            server,
            deadline(Instant::now(), expires_in.min(self.expire)),
        );
    }

    /// How many live pins each server has.
    pub fn count_by_server(&self) -> HashMap<ServerId, usize> {
        let mut out = HashMap::new();
        for e in self.inner.lock().map.values() {
            *out.entry(e.server).or_insert(0) += 1;
        }
        out
    }
}

/// `now + d`, saturating far in the future instead of panicking on overflow (config values are
/// bounded, but a pin's expiry must never be where a panic can take the table's lock).
fn deadline(now: Instant, d: std::time::Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86400))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pins_expire_unless_used() {
        let t = StickTable::new(Duration::from_secs(7200), 10);
        t.pin(ip("10.0.0.1"), ServerId(1));
        t.pin(ip("::1"), ServerId(2));
        tokio::time::advance(Duration::from_secs(7000)).await;
        // Use refreshes the expiry.
        assert_eq!(t.lookup(ip("10.0.0.1")), Some(ServerId(1)));
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(t.lookup(ip("10.0.0.1")), Some(ServerId(1)));
        assert_eq!(
            t.lookup(ip("::1")),
            None,
            "IPv6 pin unused for 2h05 expired"
        );
        tokio::time::advance(Duration::from_secs(7201)).await;
        assert_eq!(t.purge(), 1);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_evicts_least_recently_used() {
        let t = StickTable::new(Duration::from_secs(60), 3);
        for i in 1..=3 {
            t.pin(ip(&format!("10.0.0.{i}")), ServerId(i));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(t.lookup(ip("10.0.0.1")), Some(ServerId(1)));
        t.pin(ip("10.0.0.4"), ServerId(4));
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.lookup(ip("10.0.0.2")),
            None,
            "least recently used evicted"
        );
        assert_eq!(t.lookup(ip("10.0.0.1")), Some(ServerId(1)));
        assert_eq!(t.lookup(ip("10.0.0.4")), Some(ServerId(4)));
    }

    #[tokio::test(start_paused = true)]
    async fn forget_and_entries() {
        let t = StickTable::new(Duration::from_secs(60), 10);
        t.pin(ip("10.0.0.1"), ServerId(1));
        t.pin(ip("10.0.0.2"), ServerId(2));
        t.pin(ip("10.0.0.3"), ServerId(1));
        assert_eq!(t.count_by_server()[&ServerId(1)], 2);
        t.forget_server(ServerId(1));
        let e = t.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key, ip("10.0.0.2"));
        assert_eq!(e[0].expires_in, Duration::from_secs(60));
        assert!(t.unpin(ip("10.0.0.2")));
        assert!(!t.unpin(ip("10.0.0.2")));
    }
}
