//! The stick table: which server each client IP is pinned to, and until when.
//!
//! For Spark Connect a pin is a session: a client moved to another server loses its temp views
//! and cached frames. Entries name servers by [`ServerId`] (stable across reloads and reorders).
//! Each use refreshes the expiry; when the table is full the entry unused for longest goes.
//! One short mutex guards it; it is touched once per new connection, never on the copy path.
//! Whole-table work (`show table`, state-file saves, purges, forgetting a server) takes the
//! mutex for at most [`CHUNK`] entries at a time, so a new connection never waits for more
//! than one chunk however large the table is.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Bound::{Excluded, Unbounded};
use std::time::Duration;

use tokio::time::Instant;

use crate::server::ServerId;

/// Entries handled per lock hold by whole-table walks: ~50 µs of work, the longest a new
/// connection waits behind a dump.
const CHUNK: usize = 1024;

/// A time in the table: milliseconds since it was made (8 bytes, where an `Instant` takes 16;
/// a million entries hold two each).
type Ms = u64;

#[derive(Debug, Clone, Copy)]
struct Entry {
    server: ServerId,
    expires: Ms,
    /// Tie-breaker for the expiry index; grows with every insert, so an entry's `seq` tells
    /// whether it was written after a given moment.
    seq: u64,
}

/// Position in the expiry index.
type ExpiryKey = (Ms, u64);

#[derive(Default)]
struct Inner {
    map: HashMap<IpAddr, Entry>,
    /// Entries ordered by expiry: the first is the next to expire and the one evicted when full.
    /// A use sets the expiry to now + `expire`, after every other entry, so a walk in this
    /// order meets an entry used during the walk again, ahead of it.
    by_expiry: BTreeMap<ExpiryKey, IpAddr>,
    seq: u64,
    /// Live pins per server, kept as entries come and go so that the stats page never walks
    /// the table.
    per_server: HashMap<ServerId, usize>,
}

impl Inner {
    fn remove(&mut self, ip: &IpAddr) -> Option<Entry> {
        let e = self.map.remove(ip)?;
        self.by_expiry.remove(&(e.expires, e.seq));
        self.count(e.server, false);
        Some(e)
    }

    /// Moves a live entry's expiry to `expires` in place (one hash lookup, where removing and
    /// inserting it again took four): a client's every new connection does this. `None`, and
    /// nothing changed, if there is no entry for `ip` or `keep` rejects it.
    fn touch(
        &mut self,
        ip: &IpAddr,
        expires: Ms,
        keep: impl FnOnce(&Entry) -> bool,
    ) -> Option<ServerId> {
        let e = self.map.get_mut(ip)?;
        if !keep(e) {
            return None;
        }
        self.seq += 1;
        let old = (e.expires, e.seq);
        e.expires = expires;
        e.seq = self.seq;
        let server = e.server;
        self.by_expiry.remove(&old);
        self.by_expiry.insert((expires, self.seq), *ip);
        Some(server)
    }

    fn insert(&mut self, ip: IpAddr, server: ServerId, expires: Ms) {
        if self.touch(&ip, expires, |e| e.server == server).is_some() {
            return;
        }
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
        self.count(server, true);
    }

    /// Removes the entry at `key` of the expiry index (evicted or expired).
    fn remove_at(&mut self, key: &ExpiryKey) {
        if let Some(ip) = self.by_expiry.remove(key)
            && let Some(e) = self.map.remove(&ip)
        {
            self.count(e.server, false);
        }
    }

    fn count(&mut self, server: ServerId, added: bool) {
        if added {
            *self.per_server.entry(server).or_insert(0) += 1;
        } else if let Some(n) = self.per_server.get_mut(&server) {
            *n -= 1;
            if *n == 0 {
                self.per_server.remove(&server);
            }
        }
    }

    /// Up to [`CHUNK`] entries of the expiry index after `cursor` (from the start for `None`).
    fn chunk_after(&self, cursor: Option<ExpiryKey>) -> Vec<(ExpiryKey, IpAddr, ServerId)> {
        let range = match cursor {
            None => self.by_expiry.range(..),
            Some(c) => self.by_expiry.range((Excluded(c), Unbounded)),
        };
        range
            .take(CHUNK)
            .map(|(&k, &ip)| (k, ip, self.map[&ip].server))
            .collect()
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
    /// Where the table's clock ([`Ms`]) starts.
    base: Instant,
    expire: Duration,
    size: usize,
}

impl StickTable {
    pub fn new(expire: Duration, size: usize) -> Self {
        StickTable {
            inner: Mutex::new(Inner::default()),
            base: Instant::now(),
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

    fn now(&self) -> Ms {
        Instant::now()
            .saturating_duration_since(self.base)
            .as_millis()
            .try_into()
            .unwrap_or(Ms::MAX)
    }

    /// The server `ip` is pinned to, if the pin is still live. Refreshes its expiry.
    pub fn lookup(&self, ip: IpAddr) -> Option<ServerId> {
        let now = self.now();
        let expires = deadline(now, self.expire);
        let mut inner = self.inner.lock();
        let mut expired = false;
        let server = inner.touch(&ip, expires, |e| {
            expired = e.expires <= now;
            !expired
        });
        if expired {
            inner.remove(&ip);
        }
        server
    }

    /// Pins `ip` to `server` (a new pin or a move). Evicts the oldest entries when full.
    pub fn pin(&self, ip: IpAddr, server: ServerId) {
        let now = self.now();
        let mut inner = self.inner.lock();
        if !inner.map.contains_key(&ip) {
            while inner.map.len() >= self.size {
                let Some((&oldest, _)) = inner.by_expiry.first_key_value() else {
                    break;
                };
                inner.remove_at(&oldest);
            }
        }
        inner.insert(ip, server, deadline(now, self.expire));
    }

    /// Drops one pin (`clear table <t> key <ip>`). Returns whether it existed.
    pub fn unpin(&self, ip: IpAddr) -> bool {
        self.inner.lock().remove(&ip).is_some()
    }

    pub fn clear(&self) {
        // Freeing a large table takes a while: do it after the lock is released.
        let old = std::mem::take(&mut *self.inner.lock());
        drop(old);
    }

    /// Drops every pin to `server` (the server is gone for good), a chunk at a time.
    pub fn forget_server(&self, server: ServerId) {
        let mut cursor = None;
        loop {
            let mut inner = self.inner.lock();
            if !inner.per_server.contains_key(&server) {
                return;
            }
            let chunk = inner.chunk_after(cursor);
            for &(_, ip, s) in &chunk {
                if s == server {
                    inner.remove(&ip);
                }
            }
            match chunk.last() {
                Some(&(k, _, _)) if chunk.len() == CHUNK => cursor = Some(k),
                _ => return,
            }
        }
    }

    /// Removes expired entries, a chunk at a time; returns how many.
    pub fn purge(&self) -> usize {
        let mut n = 0;
        loop {
            let now = self.now();
            let mut inner = self.inner.lock();
            for _ in 0..CHUNK {
                match inner.by_expiry.first_key_value() {
                    Some((&key, _)) if key.0 <= now => inner.remove_at(&key),
                    _ => return n,
                }
                n += 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live entries, soonest to expire first (those used during the walk last), each once.
    ///
    /// The walk takes the lock a chunk at a time. An entry used while it runs moves ahead of
    /// the walk and is met again: only its later (newer) row is kept. An entry removed ahead of
    /// the walk, or added behind it, is not listed, as if the dump had been taken a moment
    /// later or earlier.
    pub fn entries(&self) -> Vec<StickEntry> {
        self.entries_between_chunks(|| {})
    }

    /// [`StickTable::entries`], calling `between` each time the lock is released.
    fn entries_between_chunks(&self, mut between: impl FnMut()) -> Vec<StickEntry> {
        let (start_seq, len) = {
            let inner = self.inner.lock();
            (inner.seq, inner.map.len())
        };
        let mut rows: Vec<(StickEntry, u64)> = Vec::with_capacity(len);
        let mut cursor = None;
        // Entries used during the walk are met twice. A walk overtaken by more uses than the
        // table holds (traffic outrunning a descheduled dump) takes the rest in one hold of the
        // lock, where nothing can overtake it: slower for new connections that once, but no
        // entry that was there all along is left out.
        let mut budget = 2 * len + CHUNK;
        // Taken for good once the budget is spent.
        let mut held: Option<parking_lot::MutexGuard<Inner>> = None;
        loop {
            let now = self.now();
            let chunk = match &held {
                Some(inner) => inner.chunk_after(cursor),
                None => self.inner.lock().chunk_after(cursor),
            };
            budget = budget.saturating_sub(chunk.len());
            rows.extend(chunk.iter().filter(|((exp, _), _, _)| *exp > now).map(
                |&((exp, seq), key, server)| {
                    let expires_in = Duration::from_millis(exp - now);
                    (
                        StickEntry {
                            key,
                            server,
                            expires_in,
                        },
                        seq,
                    )
                },
            ));
            match chunk.last() {
                Some(&(k, _, _)) if chunk.len() == CHUNK => cursor = Some(k),
                _ => break,
            }
            if held.is_none() {
                if budget == 0 {
                    held = Some(self.inner.lock());
                } else {
                    between();
                }
            }
        }
        latest_rows(rows, start_seq)
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
            deadline(self.now(), expires_in.min(self.expire)),
        );
    }

    /// How many live pins each server has.
    pub fn count_by_server(&self) -> HashMap<ServerId, usize> {
        self.inner.lock().per_server.clone()
    }
}

/// Drops the earlier rows of keys listed twice. Only an entry written after the walk started
/// (`seq > start_seq`) can be listed twice, so only those keys are remembered.
fn latest_rows(rows: Vec<(StickEntry, u64)>, start_seq: u64) -> Vec<StickEntry> {
    let late: HashSet<IpAddr> = rows
        .iter()
        .filter(|(_, seq)| *seq > start_seq)
        .map(|(e, _)| e.key)
        .collect();
    if late.is_empty() {
        return rows.into_iter().map(|(e, _)| e).collect();
    }
    let mut seen = HashSet::with_capacity(late.len());
    let mut out: Vec<StickEntry> = rows
        .into_iter()
        .rev()
        .filter(|(e, _)| !late.contains(&e.key) || seen.insert(e.key))
        .map(|(e, _)| e)
        .collect();
    out.reverse();
    out
}

/// `now + d` in whole milliseconds (rounded up, so that a pin never ends early), saturating
/// instead of overflowing: a pin's expiry must never be where a panic can take the lock.
fn deadline(now: Ms, d: Duration) -> Ms {
    let d: Ms = d
        .as_nanos()
        .div_ceil(1_000_000)
        .try_into()
        .unwrap_or(Ms::MAX);
    now.saturating_add(d)
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

    fn nth(i: usize) -> IpAddr {
        std::net::Ipv4Addr::from(0x0a00_0000 + i as u32).into()
    }

    fn keys(e: &[StickEntry]) -> HashSet<IpAddr> {
        let k: HashSet<IpAddr> = e.iter().map(|e| e.key).collect();
        assert_eq!(k.len(), e.len(), "an entry listed twice");
        k
    }

    #[test]
    fn dump_in_chunks_lists_each_entry_once_with_its_latest_value() {
        let n = 3 * CHUNK + 10;
        let t = StickTable::new(Duration::from_secs(60), 10 * n);
        for i in 0..n {
            t.pin(nth(i), ServerId(1));
        }
        let fresh = ip("192.168.0.1");
        let mut releases = 0;
        let e = t.entries_between_chunks(|| {
            releases += 1;
            if releases == 1 {
                // The first chunk (entries 0..CHUNK) is out; the rest is not.
                assert_eq!(t.lookup(nth(0)), Some(ServerId(1)));
                t.pin(nth(1), ServerId(9));
                assert_eq!(t.lookup(nth(CHUNK + 5)), Some(ServerId(1)));
                assert!(t.unpin(nth(2 * CHUNK)));
                t.pin(fresh, ServerId(2));
            }
        });
        assert_eq!(releases, 3, "the lock was released between chunks");
        let mut want: HashSet<IpAddr> = (0..n).map(nth).collect();
        want.remove(&nth(2 * CHUNK));
        want.insert(fresh);
        assert_eq!(keys(&e), want);
        let row = |k: IpAddr| e.iter().find(|e| e.key == k).unwrap();
        assert_eq!(row(nth(1)).server, ServerId(9), "the later value is kept");
        // Entries used during the dump come last: they now expire last.
        let tail: HashSet<IpAddr> = e[e.len() - 4..].iter().map(|e| e.key).collect();
        assert_eq!(tail, HashSet::from([nth(0), nth(1), nth(CHUNK + 5), fresh]));
        assert_eq!(
            t.count_by_server()[&ServerId(1)],
            n - 2,
            "one moved, one dropped"
        );
    }

    /// Traffic that keeps moving entries ahead of a dump (more uses between two chunks than a
    /// chunk holds) cannot make it leave any out.
    #[test]
    fn a_dump_overtaken_by_traffic_still_lists_every_entry_once() {
        let n = 4 * CHUNK;
        let t = StickTable::new(Duration::from_secs(60), 1 << 20);
        for i in 0..n {
            t.pin(nth(i), ServerId(1));
        }
        // Between two chunks, the same 2 chunks' worth of clients come back: each time they
        // move ahead of the walk (to the end of the expiry order) before it reaches them all.
        let e = t.entries_between_chunks(|| {
            for i in CHUNK..3 * CHUNK {
                assert!(t.lookup(nth(i)).is_some());
            }
        });
        assert_eq!(e.len(), n, "each entry once");
        assert_eq!(keys(&e), (0..n).map(nth).collect::<HashSet<_>>());
    }

    #[test]
    fn dump_during_concurrent_pins_and_unpins_misses_nothing_stable() {
        let stable = 4 * CHUNK;
        let t = std::sync::Arc::new(StickTable::new(Duration::from_secs(60), 1 << 20));
        for i in 0..stable {
            t.pin(nth(i), ServerId(1));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Use a stable entry, and pin then drop one of the churn's own.
                    assert!(t.lookup(nth(i % stable)).is_some());
                    let own = nth(1_000_000 + i % 5000);
                    t.pin(own, ServerId(2));
                    if i.is_multiple_of(2) {
                        t.unpin(own);
                    }
                    i += 1;
                }
                i
            })
        };
        let all_stable: HashSet<IpAddr> = (0..stable).map(nth).collect();
        for _ in 0..20 {
            let e = t.entries();
            let k = keys(&e);
            assert!(k.is_superset(&all_stable), "a stable entry was missed");
            assert!(
                e.iter()
                    .all(|e| e.server == ServerId(if all_stable.contains(&e.key) { 1 } else { 2 }))
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(churn.join().unwrap() > 0);
        let counts = t.count_by_server();
        assert_eq!(counts[&ServerId(1)], stable);
        assert_eq!(counts.values().sum::<usize>(), t.len());
    }

    #[tokio::test(start_paused = true)]
    async fn pin_counts_follow_moves_evictions_and_purges() {
        let t = StickTable::new(Duration::from_secs(60), 3);
        t.pin(ip("10.0.0.1"), ServerId(1));
        t.pin(ip("10.0.0.2"), ServerId(1));
        t.pin(ip("10.0.0.3"), ServerId(2));
        t.pin(ip("10.0.0.2"), ServerId(2)); // a move
        assert_eq!(
            t.count_by_server(),
            HashMap::from([(ServerId(1), 1), (ServerId(2), 2)])
        );
        t.pin(ip("10.0.0.4"), ServerId(3)); // evicts 10.0.0.1
        assert_eq!(
            t.count_by_server(),
            HashMap::from([(ServerId(2), 2), (ServerId(3), 1)])
        );
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(t.lookup(ip("10.0.0.4")), Some(ServerId(3)));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(t.purge(), 2);
        assert_eq!(t.count_by_server(), HashMap::from([(ServerId(3), 1)]));
        t.clear();
        assert!(t.count_by_server().is_empty());
    }

    #[test]
    fn forget_server_in_chunks_drops_only_its_pins() {
        let t = StickTable::new(Duration::from_secs(60), 1 << 20);
        for i in 0..3 * CHUNK {
            t.pin(nth(i), ServerId(1 + (i % 3) as u64));
        }
        t.forget_server(ServerId(2));
        let e = t.entries();
        assert_eq!(e.len(), 2 * CHUNK);
        assert!(e.iter().all(|e| e.server != ServerId(2)));
        assert_eq!(t.count_by_server().get(&ServerId(2)), None);
    }

    #[test]
    fn deadlines_round_up_and_saturate() {
        assert_eq!(deadline(5, Duration::from_micros(1)), 6, "never ends early");
        assert_eq!(deadline(5, Duration::from_secs(2)), 2005);
        assert_eq!(deadline(Ms::MAX - 1, Duration::from_secs(7200)), Ms::MAX);
        assert_eq!(deadline(0, Duration::MAX), Ms::MAX);
    }
}
