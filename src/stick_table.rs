//! The stick table: which server each client IP is pinned to, and until when.
//!
//! For Spark Connect a pin is a session: a client moved to another server loses its temp views
//! and cached frames. Entries name servers by [`ServerId`] (stable across reloads and reorders).
//! Each use refreshes the expiry; when the table is full the entry unused for longest goes.
//! One short mutex guards it; it is touched once per new connection, never on the copy path.
//! Whole-table work (`show table`, state-file saves, purges, forgetting a server) takes the
//! mutex for at most [`CHUNK`] entries at a time, so a new connection never waits for more
//! than one chunk however large the table is.

mod entries;

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::server::ServerId;
use entries::{Entries, MAX_ENTRIES, Ms, WalkId};

/// Entries handled per lock hold by whole-table walks: ~50 µs of work, the longest a new
/// connection waits behind a dump.
const CHUNK: usize = 1024;

/// One row of `show table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickEntry {
    pub key: IpAddr,
    pub server: ServerId,
    /// Time left before it expires.
    pub expires_in: Duration,
}

pub struct StickTable {
    inner: Mutex<Entries>,
    /// Where the table's clock ([`Ms`]) starts.
    base: Instant,
    expire: Duration,
    size: usize,
}

/// A walk's cursor in the table, given back when the walk ends however it ends.
struct Walk<'a> {
    table: &'a StickTable,
    id: WalkId,
}

impl Drop for Walk<'_> {
    fn drop(&mut self) {
        self.table.inner.lock().end_walk(self.id);
    }
}

impl StickTable {
    pub fn new(expire: Duration, size: usize) -> Self {
        StickTable {
            inner: Mutex::new(Entries::default()),
            base: Instant::now(),
            expire,
            size: size.clamp(1, MAX_ENTRIES),
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

    fn start_walk(&self) -> Walk<'_> {
        let id = self.inner.lock().start_walk();
        Walk { table: self, id }
    }

    /// The server `ip` is pinned to, if the pin is still live. Refreshes its expiry.
    pub fn lookup(&self, ip: IpAddr) -> Option<ServerId> {
        let now = self.now();
        let expires = deadline(now, self.expire);
        let mut inner = self.inner.lock();
        let i = inner.find(ip)?;
        if inner.expires(i) <= now {
            inner.remove(i);
            return None;
        }
        let server = inner.server(i);
        inner.update(i, server, expires, None);
        Some(server)
    }

    /// Pins `ip` to `server` (a new pin or a move). Evicts the oldest entries when full.
    pub fn pin(&self, ip: IpAddr, server: ServerId) {
        let expires = deadline(self.now(), self.expire);
        let mut inner = self.inner.lock();
        match inner.find(ip) {
            Some(i) => inner.update(i, server, expires, None),
            None => {
                while inner.len() >= self.size && inner.pop_first() {}
                inner.insert(ip, server, expires, None);
            }
        }
    }

    /// Drops one pin (`clear table <t> key <ip>`). Returns whether it existed.
    pub fn unpin(&self, ip: IpAddr) -> bool {
        let mut inner = self.inner.lock();
        inner.find(ip).map(|i| inner.remove(i)).is_some()
    }

    pub fn clear(&self) {
        // Freeing a large table takes a while: do it after the lock is released.
        let old = self.inner.lock().take();
        drop(old);
    }

    /// Drops every pin to `server` (the server is gone for good), a chunk at a time.
    pub fn forget_server(&self, server: ServerId) {
        let walk = self.start_walk();
        loop {
            let mut inner = self.inner.lock();
            if !inner.per_server().contains_key(&server)
                || inner.remove_server_rows(walk.id, server, CHUNK)
            {
                return;
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
                match inner.first_expires() {
                    Some(e) if e <= now => inner.pop_first(),
                    _ => return n,
                };
                n += 1;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().len()
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
        let walk = self.start_walk();
        let (start_seq, len) = {
            let inner = self.inner.lock();
            (inner.seq(), inner.len())
        };
        let mut rows: Vec<(StickEntry, u32)> = Vec::with_capacity(len);
        // Entries used during the walk are met twice. A walk overtaken by more uses than the
        // table holds (traffic outrunning a descheduled dump) takes the rest in one hold of the
        // lock, where nothing can overtake it: slower for new connections that once, but no
        // entry that was there all along is left out.
        let mut budget = 2 * len + CHUNK;
        // Taken for good once the budget is spent.
        let mut held: Option<parking_lot::MutexGuard<Entries>> = None;
        loop {
            let now = self.now();
            let (chunk, end) = match &mut held {
                Some(inner) => inner.next_rows(walk.id, CHUNK),
                None => self.inner.lock().next_rows(walk.id, CHUNK),
            };
            budget = budget.saturating_sub(chunk.len());
            rows.extend(chunk.iter().filter(|r| r.expires > now).map(|r| {
                let entry = StickEntry {
                    key: r.key,
                    server: r.server,
                    expires_in: Duration::from_millis(r.expires - now),
                };
                (entry, r.seq)
            }));
            if end {
                break;
            }
            if held.is_none() {
                if budget == 0 {
                    held = Some(self.inner.lock());
                } else {
                    between();
                }
            }
        }
        // Before the walk gives its cursor back (which takes the lock).
        drop(held);
        latest_rows(rows, start_seq)
    }

    /// Restores entries (from a state file, or a table replaced on reload) with the time each
    /// had left, a chunk per lock hold. Entries already there take the restored server and
    /// time; none is evicted to make room. Sorted by time left first, so that each is placed
    /// in expiry order a few steps from the one before.
    pub fn restore(&self, pins: impl IntoIterator<Item = (IpAddr, ServerId, Duration)>) {
        let mut pins: Vec<_> = pins
            .into_iter()
            .filter(|(_, _, left)| !left.is_zero())
            .map(|(ip, server, left)| (ip, server, left.min(self.expire)))
            .collect();
        pins.sort_by_key(|&(_, _, left)| left);
        let walk = self.start_walk();
        for chunk in pins.chunks(CHUNK) {
            let now = self.now();
            let mut inner = self.inner.lock();
            for &(ip, server, left) in chunk {
                let expires = deadline(now, left);
                let i = match inner.find(ip) {
                    Some(i) => {
                        inner.update(i, server, expires, Some(walk.id));
                        i
                    }
                    None if inner.len() >= self.size => continue,
                    None => {
                        inner.insert(ip, server, expires, Some(walk.id));
                        inner.find(ip).expect("just inserted")
                    }
                };
                inner.set_walk(walk.id, i);
            }
        }
    }

    /// How many live pins each server has.
    pub fn count_by_server(&self) -> HashMap<ServerId, usize> {
        self.inner.lock().per_server().clone()
    }
}

/// Drops the earlier rows of keys listed twice. Only an entry written after the walk started
/// can be listed twice, so only those keys are remembered: rows whose `seq` is after
/// `start_seq` in wrapping order (a row written 2^31 writes before may count as late too,
/// which costs a little memory, never a row).
fn latest_rows(rows: Vec<(StickEntry, u32)>, start_seq: u32) -> Vec<StickEntry> {
    let late: HashSet<IpAddr> = rows
        .iter()
        .filter(|(_, seq)| (1..=1 << 31).contains(&seq.wrapping_sub(start_seq)))
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

    /// Restored entries come with their own time left, in any order, beside pins: a purge
    /// removes exactly those whose time is up, never one early.
    #[tokio::test(start_paused = true)]
    async fn restored_out_of_order_then_purged_exactly_when_due() {
        let t = StickTable::new(Duration::from_secs(100), 1000);
        t.pin(ip("10.0.0.1"), ServerId(1)); // due at 100 s
        let secs = [70u64, 10, 50, 30, 90, 20, 200];
        t.restore(
            secs.iter()
                .map(|&s| (nth(s as usize), ServerId(2), Duration::from_secs(s))),
        );
        // One at a time, each behind a pin that expires later.
        t.restore([(ip("::5"), ServerId(3), Duration::from_secs(5))]);
        t.restore([(ip("::0"), ServerId(3), Duration::ZERO)]);
        assert_eq!(t.len(), 9, "the zero one is not restored");
        let e = t.entries();
        let left: Vec<u64> = e.iter().map(|e| e.expires_in.as_secs()).collect();
        // 200 s is more than the table's 100 s: cut to it.
        assert_eq!(left, [5, 10, 20, 30, 50, 70, 90, 100, 100]);
        let mut gone = 0;
        for (at, due) in [(4, 0), (5, 1), (29, 2), (30, 1), (99, 3), (100, 2)] {
            tokio::time::advance(Duration::from_secs(at) - t.base.elapsed()).await;
            assert_eq!(t.purge(), due, "at {at} s");
            gone += due;
            assert_eq!(t.len(), 9 - gone);
            assert!(t.entries().iter().all(|e| !e.expires_in.is_zero()));
        }
        assert!(t.is_empty());
        assert!(t.count_by_server().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn restore_keeps_the_size_limit_and_updates_entries_in_place() {
        let t = StickTable::new(Duration::from_secs(60), 3);
        t.pin(ip("10.0.0.1"), ServerId(1));
        t.pin(ip("10.0.0.2"), ServerId(1));
        let left = Duration::from_secs(10);
        t.restore([
            (ip("10.0.0.3"), ServerId(2), left),
            (ip("10.0.0.4"), ServerId(2), left),
            (ip("10.0.0.1"), ServerId(3), left),
        ]);
        assert_eq!(
            t.len(),
            3,
            "full: nothing evicted to make room for a restore"
        );
        assert_eq!(t.entries()[0].expires_in, left);
        assert_eq!(
            t.count_by_server(),
            HashMap::from([(ServerId(1), 1), (ServerId(2), 1), (ServerId(3), 1)])
        );
        // A pin evicts the soonest to expire, a restored one here.
        t.pin(ip("10.0.0.5"), ServerId(4));
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(ip("10.0.0.2")), Some(ServerId(1)));
        assert_eq!(t.lookup(ip("10.0.0.5")), Some(ServerId(4)));
        let kept: HashSet<IpAddr> = t.entries().iter().map(|e| e.key).collect();
        assert_eq!(
            kept,
            HashSet::from(["10.0.0.1", "10.0.0.2", "10.0.0.5"].map(ip))
        );
    }

    #[test]
    fn ipv4_and_ipv6_clients_are_pinned_apart() {
        let t = StickTable::new(Duration::from_secs(60), 10);
        let keys = ["10.1.2.3", "::10.1.2.3", "::ffff:10.1.2.3", "2001:db8::1"].map(ip);
        for (n, &k) in keys.iter().enumerate() {
            t.pin(k, ServerId(n as u64));
        }
        assert!(t.unpin(ip("::10.1.2.3")));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(ServerId(0)));
        assert_eq!(t.lookup(ip("::10.1.2.3")), None);
        assert_eq!(t.lookup(ip("::ffff:10.1.2.3")), Some(ServerId(2)));
        let listed: Vec<IpAddr> = t.entries().iter().map(|e| e.key).collect();
        assert_eq!(listed, [keys[3], keys[0], keys[2]], "order of last use");
    }

    #[test]
    fn unpinned_slots_are_reused() {
        let t = StickTable::new(Duration::from_secs(60), 1 << 20);
        for i in 0..3 * CHUNK {
            t.pin(nth(i), ServerId(1));
        }
        let slots = t.inner.lock().slots();
        for round in 1..4 {
            for i in 0..3 * CHUNK {
                assert!(t.unpin(nth(i)));
                t.pin(nth(round * 1_000_000 + i), ServerId(2));
            }
            t.clear();
            for i in 0..3 * CHUNK {
                t.pin(nth(i), ServerId(1));
            }
        }
        assert_eq!(t.inner.lock().slots(), slots);
        assert_eq!(t.len(), 3 * CHUNK);
    }
}
