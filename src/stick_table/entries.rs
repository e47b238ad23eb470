//! The stick table's entries in one compact structure (48 bytes per entry, plus ~5 to 10 of
//! index), where a `HashMap` beside a `BTreeMap` expiry index took ~250 at a million.
//!
//! - Entries live in a slab: fixed-size chunks of [`Slot`]s, with freed slots on a free list.
//!   It grows a chunk at a time and never moves what it holds, so growing never needs twice the
//!   memory (a `Vec` doubling at a million entries would copy 48 MB into a fresh 96 MB).
//! - A doubly linked list through the slots (4-byte slot numbers) keeps them in expiry order:
//!   the head is the next to expire and the one evicted when full. A use sets the expiry to
//!   now + the table's `expire`, never before any other entry's, so it goes to the tail in
//!   O(1). A restored entry (with its own time left) is placed by its expiry; see
//!   [`Entries::insert`].
//! - A `hashbrown::HashTable` of slot numbers finds a client's slot by its address.
//! - Walks (dumps, saves, forgetting a server, a batch restore) keep a cursor here, one
//!   lock hold to the next: unlinking the slot a cursor is on moves the cursor to the slot
//!   before it, so a walk resumes where it was whatever happened between two chunks.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::HashTable;

use crate::server::ServerId;

/// A time in the table: milliseconds since it was made (8 bytes, where an `Instant` takes 16).
pub(super) type Ms = u64;

/// A slot's number in the slab.
pub(super) type SlotId = u32;

/// No slot: the end of a list.
const NIL: SlotId = SlotId::MAX;

/// Slots per slab chunk: 8,192 × 48 B = 384 KiB, the most a table holds unused beyond its
/// free slots.
const SLAB_CHUNK: usize = 1 << 13;

/// Most entries a table can hold (slot numbers are `u32`, one value is [`NIL`]).
pub(super) const MAX_ENTRIES: usize = NIL as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Free,
    V4,
    V6,
}

/// One entry, or a free slot.
#[derive(Debug, Clone, Copy)]
struct Slot {
    expires: Ms,
    server: ServerId,
    /// The client address: IPv6 octets, or an IPv4 address in the last four.
    addr: [u8; 16],
    prev: SlotId,
    /// The next slot in expiry order, or on the free list.
    next: SlotId,
    /// Written-at stamp, wrapping: tells a dump which rows may have been written during it.
    seq: u32,
    kind: Kind,
}

fn compact(ip: IpAddr) -> (Kind, [u8; 16]) {
    match ip {
        IpAddr::V4(a) => {
            let mut addr = [0; 16];
            addr[12..].copy_from_slice(&a.octets());
            (Kind::V4, addr)
        }
        IpAddr::V6(a) => (Kind::V6, a.octets()),
    }
}

impl Slot {
    fn ip(&self) -> IpAddr {
        match self.kind {
            Kind::V4 => {
                let [.., a, b, c, d] = self.addr;
                Ipv4Addr::new(a, b, c, d).into()
            }
            _ => Ipv6Addr::from(self.addr).into(),
        }
    }
}

/// Where a walk resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    Head,
    After(SlotId),
    /// The table was cleared: nothing that was there is left to walk.
    Done,
}

/// A walk registered with [`Entries::start_walk`].
#[derive(Debug, Clone, Copy)]
pub(super) struct WalkId(usize);

/// One entry as read by a walk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Row {
    pub key: IpAddr,
    pub server: ServerId,
    pub expires: Ms,
    pub seq: u32,
}

pub(super) struct Entries {
    slab: Vec<Vec<Slot>>,
    free: SlotId,
    index: HashTable<SlotId>,
    hasher: RandomState,
    head: SlotId,
    tail: SlotId,
    seq: u32,
    /// Live pins per server, kept as entries come and go so that the stats page never walks
    /// the table.
    per_server: HashMap<ServerId, usize>,
    walks: Vec<Option<Cursor>>,
}

impl Default for Entries {
    fn default() -> Self {
        Entries {
            slab: Vec::new(),
            free: NIL,
            index: HashTable::new(),
            hasher: RandomState::new(),
            head: NIL,
            tail: NIL,
            seq: 0,
            per_server: HashMap::new(),
            walks: Vec::new(),
        }
    }
}

fn hash(hasher: &RandomState, addr: &[u8; 16]) -> u64 {
    // An IPv4 address and the IPv6 `::a.b.c.d` hash alike; their kinds tell them apart.
    hasher.hash_one(u128::from_ne_bytes(*addr))
}

fn slot_in(slab: &[Vec<Slot>], i: SlotId) -> &Slot {
    let i = i as usize;
    &slab[i / SLAB_CHUNK][i % SLAB_CHUNK]
}

impl Entries {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Slots in the slab, free or not.
    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.slab.iter().map(Vec::len).sum()
    }

    /// The current written-at stamp: rows written later have a `seq` after it.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    fn slot(&self, i: SlotId) -> &Slot {
        slot_in(&self.slab, i)
    }

    fn slot_mut(&mut self, i: SlotId) -> &mut Slot {
        let i = i as usize;
        &mut self.slab[i / SLAB_CHUNK][i % SLAB_CHUNK]
    }

    pub fn find(&self, ip: IpAddr) -> Option<SlotId> {
        let (kind, addr) = compact(ip);
        self.index
            .find(hash(&self.hasher, &addr), |&i| {
                let s = self.slot(i);
                s.addr == addr && s.kind == kind
            })
            .copied()
    }

    pub fn expires(&self, i: SlotId) -> Ms {
        self.slot(i).expires
    }

    pub fn server(&self, i: SlotId) -> ServerId {
        self.slot(i).server
    }

    /// The expiry of the entry next to expire.
    pub fn first_expires(&self) -> Option<Ms> {
        (self.head != NIL).then(|| self.slot(self.head).expires)
    }

    /// Removes the entry next to expire (evicted or expired); false if there is none.
    pub fn pop_first(&mut self) -> bool {
        if self.head == NIL {
            return false;
        }
        self.remove(self.head);
        true
    }

    /// Points slot `i` at `server` and sets its expiry (a use, a move, a restore).
    pub fn update(&mut self, i: SlotId, server: ServerId, expires: Ms, hint: Option<WalkId>) {
        let old = self.slot(i).server;
        if old != server {
            self.count(old, false);
            self.count(server, true);
        }
        self.unlink(i);
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let s = self.slot_mut(i);
        s.server = server;
        s.expires = expires;
        s.seq = seq;
        self.link_by_expiry(i, hint);
    }

    /// Adds an entry for `ip`, which has none.
    ///
    /// Placing it costs O(1) when it expires no earlier than every other entry (every pin
    /// does). A restored entry may expire earlier: it is placed by walking forward from the
    /// last one a batch restore placed (`hint`; batches come sorted, so each walk is short),
    /// or back from the tail.
    pub fn insert(&mut self, ip: IpAddr, server: ServerId, expires: Ms, hint: Option<WalkId>) {
        let (kind, addr) = compact(ip);
        self.seq = self.seq.wrapping_add(1);
        let i = self.alloc(Slot {
            expires,
            server,
            addr,
            prev: NIL,
            next: NIL,
            seq: self.seq,
            kind,
        });
        let slab = &self.slab;
        let hasher = &self.hasher;
        self.index.insert_unique(hash(hasher, &addr), i, |&j| {
            hash(hasher, &slot_in(slab, j).addr)
        });
        self.link_by_expiry(i, hint);
        self.count(server, true);
    }

    pub fn remove(&mut self, i: SlotId) {
        let s = *self.slot(i);
        if let Ok(found) = self
            .index
            .find_entry(hash(&self.hasher, &s.addr), |&j| j == i)
        {
            found.remove();
        }
        self.unlink(i);
        self.count(s.server, false);
        let free = self.free;
        let s = self.slot_mut(i);
        s.kind = Kind::Free;
        s.next = free;
        self.free = i;
    }

    /// Live pins per server.
    pub fn per_server(&self) -> &HashMap<ServerId, usize> {
        &self.per_server
    }

    /// Empties the table, returning what it held (to be freed after the lock is released).
    /// Walks under way end: nothing they have not met is left.
    pub fn take(&mut self) -> Entries {
        let walks = std::mem::take(&mut self.walks);
        let seq = self.seq;
        let old = std::mem::take(self);
        self.seq = seq;
        self.walks = walks.into_iter().map(|w| w.map(|_| Cursor::Done)).collect();
        old
    }

    pub fn start_walk(&mut self) -> WalkId {
        match self.walks.iter().position(Option::is_none) {
            Some(w) => {
                self.walks[w] = Some(Cursor::Head);
                WalkId(w)
            }
            None => {
                self.walks.push(Some(Cursor::Head));
                WalkId(self.walks.len() - 1)
            }
        }
    }

    pub fn end_walk(&mut self, w: WalkId) {
        self.walks[w.0] = None;
        while self.walks.last() == Some(&None) {
            self.walks.pop();
        }
    }

    /// The slot a walk resumes at ([`NIL`] at the end).
    fn resume(&self, w: WalkId) -> SlotId {
        match self.walks[w.0] {
            Some(Cursor::Head) => self.head,
            Some(Cursor::After(i)) => self.slot(i).next,
            _ => NIL,
        }
    }

    /// Moves a walk past slot `i`.
    pub fn set_walk(&mut self, w: WalkId, i: SlotId) {
        self.walks[w.0] = Some(Cursor::After(i));
    }

    /// The next `max` entries of walk `w`, in expiry order, and whether it reached the end.
    pub fn next_rows(&mut self, w: WalkId, max: usize) -> (Vec<Row>, bool) {
        let mut at = self.resume(w);
        let mut rows = Vec::with_capacity(max.min(self.len()));
        while at != NIL && rows.len() < max {
            let s = *self.slot(at);
            rows.push(Row {
                key: s.ip(),
                server: s.server,
                expires: s.expires,
                seq: s.seq,
            });
            self.set_walk(w, at);
            at = s.next;
        }
        (rows, at == NIL)
    }

    /// Removes `server`'s entries among the next `max` of walk `w`; true at the end.
    pub fn remove_server_rows(&mut self, w: WalkId, server: ServerId, max: usize) -> bool {
        let mut at = self.resume(w);
        for _ in 0..max {
            if at == NIL {
                break;
            }
            let next = self.slot(at).next;
            if self.slot(at).server == server {
                self.remove(at);
            } else {
                self.set_walk(w, at);
            }
            at = next;
        }
        at == NIL
    }

    fn alloc(&mut self, s: Slot) -> SlotId {
        if self.free != NIL {
            let i = self.free;
            self.free = self.slot(i).next;
            *self.slot_mut(i) = s;
            return i;
        }
        if self.slab.last().is_none_or(|c| c.len() == SLAB_CHUNK) {
            self.slab.push(Vec::with_capacity(SLAB_CHUNK));
        }
        let chunks = self.slab.len() - 1;
        let last = &mut self.slab[chunks];
        last.push(s);
        // At most MAX_ENTRIES slots are live, and every freed one is reused first.
        (chunks * SLAB_CHUNK + last.len() - 1) as SlotId
    }

    fn unlink(&mut self, i: SlotId) {
        let Slot { prev, next, .. } = *self.slot(i);
        self.join(prev, next);
        let back = match prev {
            NIL => Cursor::Head,
            p => Cursor::After(p),
        };
        for c in self.walks.iter_mut().flatten() {
            if *c == Cursor::After(i) {
                *c = back;
            }
        }
    }

    /// Links slot `i` after the last entry expiring no later than it.
    fn link_by_expiry(&mut self, i: SlotId, hint: Option<WalkId>) {
        let e = self.slot(i).expires;
        let after = if self.tail == NIL || self.slot(self.tail).expires <= e {
            self.tail
        } else {
            let from = match hint.and_then(|w| self.walks[w.0]) {
                Some(Cursor::Head) => Some(NIL),
                Some(Cursor::After(h)) if self.slot(h).expires <= e => Some(h),
                _ => None,
            };
            match from {
                Some(mut p) => loop {
                    let n = if p == NIL {
                        self.head
                    } else {
                        self.slot(p).next
                    };
                    if n == NIL || self.slot(n).expires > e {
                        break p;
                    }
                    p = n;
                },
                None => {
                    let mut p = self.tail;
                    while p != NIL && self.slot(p).expires > e {
                        p = self.slot(p).prev;
                    }
                    p
                }
            }
        };
        let next = match after {
            NIL => self.head,
            p => self.slot(p).next,
        };
        self.join(after, i);
        self.join(i, next);
    }

    /// Makes `b` follow `a` in the list ([`NIL`] for `a`: `b` is the head; for `b`: `a` is
    /// the tail).
    fn join(&mut self, a: SlotId, b: SlotId) {
        match a {
            NIL => self.head = b,
            a => self.slot_mut(a).next = b,
        }
        match b {
            NIL => self.tail = a,
            b => self.slot_mut(b).prev = a,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Keys in list order, checking the links both ways and the expiry order.
    fn order(t: &Entries) -> Vec<IpAddr> {
        let mut out = Vec::new();
        let (mut at, mut prev) = (t.head, NIL);
        while at != NIL {
            let s = t.slot(at);
            assert_eq!(s.prev, prev, "back link");
            if prev != NIL {
                assert!(t.slot(prev).expires <= s.expires, "expiry order");
            }
            out.push(s.ip());
            (prev, at) = (at, s.next);
        }
        assert_eq!(t.tail, prev);
        assert_eq!(out.len(), t.len());
        out
    }

    #[test]
    fn a_slot_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 48);
    }

    #[test]
    fn ipv4_and_ipv6_keys_side_by_side() {
        let mut t = Entries::default();
        // Same 16 bytes of address: `::a.b.c.d` and a.b.c.d; and the v4-mapped form.
        let keys = [
            ip("10.1.2.3"),
            ip("::10.1.2.3"),
            ip("::ffff:10.1.2.3"),
            ip("::1"),
        ];
        for (n, &k) in keys.iter().enumerate() {
            t.insert(k, ServerId(n as u64), 100 + n as Ms, None);
        }
        for (n, &k) in keys.iter().enumerate() {
            let i = t.find(k).expect("found");
            assert_eq!(t.server(i), ServerId(n as u64), "{k}");
        }
        assert_eq!(order(&t), keys);
        assert_eq!(t.find(ip("10.1.2.4")), None);
    }

    #[test]
    fn freed_slots_are_reused_and_the_slab_grows_by_chunks() {
        let mut t = Entries::default();
        let nth = |i: u32| IpAddr::from(Ipv4Addr::from(i));
        for i in 0..SLAB_CHUNK as u32 + 1 {
            t.insert(nth(i), ServerId(1), i as Ms, None);
        }
        assert_eq!(t.slab.len(), 2);
        assert!(t.slab.iter().all(|c| c.capacity() == SLAB_CHUNK));
        let gone = t.find(nth(7)).unwrap();
        t.remove(gone);
        assert_eq!(t.find(nth(7)), None);
        t.insert(ip("::7"), ServerId(2), 1 << 20, None);
        assert_eq!(t.find(ip("::7")), Some(gone), "the freed slot is reused");
        assert_eq!(t.slab.len(), 2);
        assert_eq!(t.slab[1].len(), 1);
        assert_eq!(order(&t).last(), Some(&ip("::7")));
        assert_eq!(t.per_server()[&ServerId(1)], SLAB_CHUNK);
    }

    #[test]
    fn entries_out_of_order_are_placed_by_expiry() {
        let mut t = Entries::default();
        for (k, e) in [
            ("10.0.0.1", 50),
            ("10.0.0.2", 10),
            ("10.0.0.3", 30),
            ("10.0.0.4", 30),
        ] {
            t.insert(ip(k), ServerId(1), e, None);
        }
        let want = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.1"].map(ip);
        assert_eq!(order(&t), want);
        // A sorted batch placed forward from its last entry, amid later ones.
        let w = t.start_walk();
        for (k, e) in [("::1", 5), ("::2", 20), ("::3", 40), ("::4", 60)] {
            t.insert(ip(k), ServerId(2), e, Some(w));
            let i = t.find(ip(k)).unwrap();
            t.set_walk(w, i);
        }
        t.end_walk(w);
        let keys = [
            "::1", "10.0.0.2", "::2", "10.0.0.3", "10.0.0.4", "::3", "10.0.0.1", "::4",
        ];
        assert_eq!(order(&t), keys.map(ip));
        // A use moves an entry earlier or later.
        let i = t.find(ip("::4")).unwrap();
        t.update(i, ServerId(3), 0, None);
        assert_eq!(order(&t)[0], ip("::4"));
        assert_eq!(t.per_server()[&ServerId(2)], 3);
        assert_eq!(t.per_server()[&ServerId(3)], 1);
    }

    #[test]
    fn a_walk_resumes_after_its_slot_is_removed_or_moved() {
        let mut t = Entries::default();
        for i in 0..6u8 {
            t.insert(ip(&format!("10.0.0.{i}")), ServerId(1), i as Ms, None);
        }
        let w = t.start_walk();
        let (rows, end) = t.next_rows(w, 2);
        assert!(!end);
        assert_eq!(rows[1].key, ip("10.0.0.1"));
        // The slot the walk is on moves to the end; the one before it goes.
        let on = t.find(ip("10.0.0.1")).unwrap();
        t.update(on, ServerId(1), 100, None);
        t.remove(t.find(ip("10.0.0.0")).unwrap());
        let (rows, end) = t.next_rows(w, 10);
        assert!(end);
        let keys: Vec<IpAddr> = rows.iter().map(|r| r.key).collect();
        let want = ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.1"];
        assert_eq!(keys, want.map(ip));
        // Clearing ends it.
        let w2 = t.start_walk();
        drop(t.take());
        t.insert(ip("10.9.9.9"), ServerId(1), 1, None);
        assert_eq!(t.next_rows(w2, 10).0.len(), 0);
        t.end_walk(w2);
        t.end_walk(w);
        assert!(t.walks.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Pin, use, move or restore key `k` with an expiry anywhere.
        Set(u8, u64, Ms),
        Remove(u8),
        /// Drop what expired by then.
        Purge(Ms),
    }

    fn key(k: u8) -> IpAddr {
        // Half IPv4, half IPv6 with the same last bytes.
        if k.is_multiple_of(2) {
            Ipv4Addr::new(10, 0, 0, k).into()
        } else {
            Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0x0a00, k as u16 - 1).into()
        }
    }

    use proptest::prelude::*;

    proptest! {
        /// Any sequence of sets, removals and purges leaves the same entries as a plain map,
        /// in expiry order, with purges removing exactly what expired.
        #[test]
        fn behaves_like_a_map_kept_in_expiry_order(ops in proptest::collection::vec(
            prop_oneof![
                3 => (0u8..40, 0u64..3, 0u64..100).prop_map(|(k, s, e)| Op::Set(k, s, e)),
                1 => (0u8..40).prop_map(Op::Remove),
                1 => (0u64..100).prop_map(Op::Purge),
            ],
            0..200,
        )) {
            let mut t = Entries::default();
            let mut model: HashMap<IpAddr, (ServerId, Ms)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Set(k, s, e) => {
                        let (k, s) = (key(k), ServerId(s));
                        match t.find(k) {
                            Some(i) => t.update(i, s, e, None),
                            None => t.insert(k, s, e, None),
                        }
                        model.insert(k, (s, e));
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(t.find(key(k)).map(|i| t.remove(i)).is_some(),
                            model.remove(&key(k)).is_some());
                    }
                    Op::Purge(now) => {
                        let mut n = 0;
                        while t.first_expires().is_some_and(|e| e <= now) {
                            t.pop_first();
                            n += 1;
                        }
                        let before = model.len();
                        model.retain(|_, (_, e)| *e > now);
                        prop_assert_eq!(n, before - model.len());
                    }
                }
                let listed = order(&t);
                prop_assert_eq!(listed.len(), model.len());
                let mut counts = HashMap::new();
                for (&k, &(s, e)) in &model {
                    let i = t.find(k).expect("in the table");
                    prop_assert_eq!((t.server(i), t.expires(i)), (s, e));
                    *counts.entry(s).or_insert(0) += 1;
                }
                prop_assert_eq!(t.per_server(), &counts);
            }
        }
    }
}
