//! Choosing a server for a client that is not pinned (or whose pin is no longer usable):
//! weighted round robin, least connections, or a consistent hash of the source address.
//!
//! A `Balancer` is built with each snapshot from the backend's server list. Round robin and
//! least connections keep the servers ordered (a `BTreeSet`, as HAProxy keeps them in trees),
//! so a pick costs O(log N) in the number of servers, not a scan:
//! - round robin orders each server by its next due time, `(picks + ½) / weight` — earliest
//!   deadline first, which over a cycle of Σweight picks gives each server exactly its weight
//!   and spreads its turns evenly (the ½ keeps servers from all falling due together at the
//!   end of a cycle);
//! - least connections orders them by `(connections + 1) / weight`; a server's connection count
//!   changes reach the order through the hook the server holds ([`LoadHook`]).
//!
//! Which servers may take new clients (UP, READY, weight > 0; backups apart) changes rarely: the
//! setters of that state call [`servers_changed`], and the order is rebuilt at the next pick.
//! A pick still checks the server it chose, so a change seen late never sends a client to a
//! server that takes none. The order's only lock is taken once per new connection.

use parking_lot::Mutex;
use std::cmp::Ordering;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::Balance;
use crate::server::{AdminState, Server, ServerId};

/// Virtual points per unit of weight on the consistent-hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 40;

/// Bumped whenever a server's eligibility or weight may have changed, in any backend: each
/// balancer compares it with the value its order was built at.
static SERVERS_CHANGED: AtomicU64 = AtomicU64::new(1);

/// Says that a server's state (health, admin state, weight, config) changed: balancers rebuild
/// their order at their next pick.
pub fn servers_changed() {
    SERVERS_CHANGED.fetch_add(1, Relaxed);
}

/// The servers a pick chooses among.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pool {
    /// Active servers taking new clients.
    Active,
    /// Backup servers taking new clients (used when no active server does).
    Backup,
    /// Every server is DOWN: READY servers with a weight that checks say are DOWN
    /// (`all_down = "fail-open"`).
    FailOpen,
}

impl Pool {
    /// The pool `s` is in now, if any.
    fn of(s: &Server) -> Option<Pool> {
        if s.takes_new_clients() {
            Some(if s.is_backup() {
                Pool::Backup
            } else {
                Pool::Active
            })
        } else if s.admin_state() == AdminState::Ready && s.weight() > 0 && !s.health.is_up() {
            Some(Pool::FailOpen)
        } else {
            None
        }
    }

    fn admits(self, s: &Server) -> bool {
        Pool::of(s) == Some(self)
    }
}

/// A non-negative fraction `num / den`, compared exactly (cross products in 128 bits).
#[derive(Debug, Clone, Copy)]
struct Frac {
    num: u64,
    den: u64,
}

impl Frac {
    const ZERO: Frac = Frac { num: 0, den: 1 };
}

impl Default for Frac {
    fn default() -> Self {
        Frac::ZERO
    }
}

impl Ord for Frac {
    fn cmp(&self, o: &Self) -> Ordering {
        (u128::from(self.num) * u128::from(o.den)).cmp(&(u128::from(o.num) * u128::from(self.den)))
    }
}

impl PartialOrd for Frac {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl PartialEq for Frac {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}

impl Eq for Frac {}

/// Servers in pick order: by pool, then key, then position in the config (ties go to the
/// first server, as a scan would).
#[derive(Default)]
struct Order {
    /// [`SERVERS_CHANGED`] when built; 0: never.
    built_at: u64,
    /// Per position, as ordered: its pool and key.
    slots: Vec<Option<(Pool, Frac)>>,
    /// (pool, key, tie-break, position).
    set: BTreeSet<(Pool, Frac, u64, usize)>,
    /// Round robin: of servers due at the same time, the heavier goes first (it has the
    /// shorter time between turns).
    heavier_first: bool,
    /// Round robin: the due time of the last pick in each pool, where a server joining it
    /// starts.
    now: [Frac; 3],
}

impl Order {
    fn place(&mut self, pos: usize, slot: Option<(Pool, Frac)>) {
        if let Some((p, k)) = self.slots[pos] {
            self.set.remove(&(p, k, self.tie(k), pos));
        }
        if let Some((p, k)) = slot {
            self.set.insert((p, k, self.tie(k), pos));
        }
        self.slots[pos] = slot;
    }

    fn tie(&self, k: Frac) -> u64 {
        if self.heavier_first {
            u64::MAX - k.den
        } else {
            0
        }
    }

    /// First in `pool` not in `tried` that the pool still admits.
    fn first(
        &self,
        pool: Pool,
        servers: &[Arc<Server>],
        tried: &[ServerId],
    ) -> Option<(Frac, usize)> {
        self.set
            .range((pool, Frac::ZERO, 0, 0)..)
            .take_while(|(p, ..)| *p == pool)
            .find(|(.., pos)| {
                let s = &servers[*pos];
                !tried.contains(&s.id) && pool.admits(s)
            })
            .map(|&(_, k, _, pos)| (k, pos))
    }
}

/// Least connections: how a server tells its balancer that its connection count changed.
pub struct LoadHook {
    order: Arc<Mutex<Order>>,
    pos: usize,
}

impl LoadHook {
    /// Re-places the server by its connection count now (read under the lock, so the last
    /// of concurrent changes wins with the final count).
    pub fn load_changed(&self, s: &Server) {
        let mut o = self.order.lock();
        if o.built_at == 0 || self.pos >= o.slots.len() {
            return;
        }
        if let Some((pool, _)) = o.slots[self.pos] {
            o.place(self.pos, Some((pool, load_key(s))));
        }
    }
}

fn load_key(s: &Server) -> Frac {
    Frac {
        num: s.counters.cur.load(Relaxed) + 1,
        den: weight(s),
    }
}

fn weight(s: &Server) -> u64 {
    u64::from(s.weight().max(1))
}

pub struct Balancer {
    algo: Balance,
    /// Round robin and least connections: servers in pick order.
    order: Arc<Mutex<Order>>,
    /// Consistent-hash ring: (point, server), sorted by point. By id, not position, so that a
    /// server added or removed changes only its own points.
    ring: Vec<(u64, ServerId)>,
    /// Position of each server.
    /// (foldhash, not SipHash: ids are ours, not a client's, and a discovery change updates
    /// this for every server after the one it added or removed.)
    by_id: foldhash::HashMap<ServerId, usize>,
}

fn hash<T: Hash>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Balancer {
    /// Builds the balancer for `servers`; with least connections, the servers' connection
    /// counts report to it from now on.
    pub fn new(algo: Balance, servers: &[Arc<Server>]) -> Self {
        let ring = if algo == Balance::Source {
            ring_points(servers)
        } else {
            Vec::new()
        };
        let by_id = servers.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        let b = Self::with_ring(algo, by_id, ring);
        b.attach(servers);
        b
    }

    /// The balancer for `servers`, which are this one's with `removed` gone and `added` come,
    /// the same up to position `moved`: the index keeps the positions before it and the ring
    /// the other servers' points instead of hashing them again. Its order is built at the next
    /// pick, as a new balancer's is.
    pub fn patched(
        &self,
        servers: &[Arc<Server>],
        moved: usize,
        removed: &[ServerId],
        added: &[Arc<Server>],
    ) -> Self {
        let mut by_id = self.by_id.clone();
        for id in removed {
            by_id.remove(id);
        }
        for (i, s) in servers.iter().enumerate().skip(moved) {
            by_id.insert(s.id, i);
        }
        let mut ring = Vec::new();
        if self.algo == Balance::Source {
            let mut new = ring_points(added);
            let removed: HashSet<ServerId> = removed.iter().copied().collect();
            ring = self
                .ring
                .iter()
                .filter(|(_, id)| !removed.contains(id))
                .copied()
                .collect();
            ring.append(&mut new);
            // Two sorted runs: the sort merges them in linear time.
            ring.sort();
        }
        let b = Self::with_ring(self.algo, by_id, ring);
        // Only least connections hooks the servers (by position, which may have moved); the
        // others' servers have no hook, and new ones start without.
        if b.algo == Balance::LeastConn {
            b.attach(servers);
        }
        b
    }

    fn with_ring(
        algo: Balance,
        by_id: foldhash::HashMap<ServerId, usize>,
        ring: Vec<(u64, ServerId)>,
    ) -> Self {
        let order = Arc::new(Mutex::new(Order {
            slots: vec![None; by_id.len()],
            heavier_first: algo == Balance::RoundRobin,
            ..Order::default()
        }));
        Balancer {
            algo,
            order,
            ring,
            by_id,
        }
    }

    /// Points the servers' load hooks at this balancer (least connections) or at none. Called
    /// when its snapshot comes into force again after a failed reload.
    pub fn attach(&self, servers: &[Arc<Server>]) {
        for (pos, s) in servers.iter().enumerate() {
            s.set_load_hook((self.algo == Balance::LeastConn).then(|| LoadHook {
                order: self.order.clone(),
                pos,
            }));
        }
        self.order.lock().built_at = 0;
    }

    pub fn algo(&self) -> Balance {
        self.algo
    }

    /// The position of server `id` in the list the balancer was built from.
    pub fn position(&self, id: ServerId) -> Option<usize> {
        self.by_id.get(&id).copied()
    }

    /// Picks a server of `pool` among `servers` (the list the balancer was built from),
    /// skipping `tried`.
    pub fn pick(
        &self,
        servers: &[Arc<Server>],
        client: IpAddr,
        tried: &[ServerId],
        pool: Pool,
    ) -> Option<Arc<Server>> {
        let idx = match self.algo {
            Balance::RoundRobin => self.round_robin(servers, tried, pool),
            Balance::LeastConn => self.least_conn(servers, tried, pool),
            Balance::Source => self.source(servers, client, tried, pool),
        }?;
        Some(servers[idx].clone())
    }

    /// The order, rebuilt first if a server changed since it was built.
    fn order(&self, servers: &[Arc<Server>]) -> parking_lot::MutexGuard<'_, Order> {
        let mut o = self.order.lock();
        let changed = SERVERS_CHANGED.load(Relaxed);
        if o.built_at != changed || o.slots.len() != servers.len() {
            o.slots.resize(servers.len(), None);
            for (pos, s) in servers.iter().enumerate() {
                let slot = Pool::of(s).map(|pool| {
                    let key = match self.algo {
                        Balance::LeastConn => load_key(s),
                        _ => due_after(o.slots[pos], pool, o.now[pool as usize], weight(s)),
                    };
                    (pool, key)
                });
                o.place(pos, slot);
            }
            o.built_at = changed;
        }
        o
    }

    fn round_robin(
        &self,
        servers: &[Arc<Server>],
        tried: &[ServerId],
        pool: Pool,
    ) -> Option<usize> {
        let mut o = self.order(servers);
        let (due, pos) = o.first(pool, servers, tried)?;
        o.now[pool as usize] = due;
        let next = Frac {
            num: due.num + 2,
            den: due.den,
        };
        o.place(pos, Some((pool, next)));
        Some(pos)
    }

    fn least_conn(&self, servers: &[Arc<Server>], tried: &[ServerId], pool: Pool) -> Option<usize> {
        self.order(servers)
            .first(pool, servers, tried)
            .map(|(_, pos)| pos)
    }

    fn source(
        &self,
        servers: &[Arc<Server>],
        client: IpAddr,
        tried: &[ServerId],
        pool: Pool,
    ) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let h = hash(&client);
        let start = self.ring.partition_point(|(p, _)| *p < h);
        (0..self.ring.len())
            .filter_map(|k| self.position(self.ring[(start + k) % self.ring.len()].1))
            .find(|&pos| {
                let s = &servers[pos];
                !tried.contains(&s.id) && pool.admits(s)
            })
    }
}

/// The consistent-hash points of `servers`, sorted. Points hash the server's name, not its
/// position: adding or removing one server moves only the clients that hashed to it.
fn ring_points(servers: &[Arc<Server>]) -> Vec<(u64, ServerId)> {
    let mut ring = Vec::new();
    for s in servers {
        let points = s.config().weight.max(1) * RING_POINTS_PER_WEIGHT;
        for i in 0..points {
            ring.push((hash(&(&*s.name, i)), s.id));
        }
    }
    ring.sort_unstable();
    ring
}

/// Round robin: a server's next due time, `(picks + ½) / weight`, kept as
/// `(2 picks + 1) / 2 weight`. One already in `pool` with this weight keeps its place; one
/// joining it (or whose weight changed) starts at the pool's current time `now` (the first
/// due time not before it), so it neither floods the pool nor waits a whole cycle.
fn due_after(old: Option<(Pool, Frac)>, pool: Pool, now: Frac, w: u64) -> Frac {
    match old {
        Some((p, k)) if p == pool && k.den == 2 * w => k,
        _ => {
            // picks = ⌊now · w + ½⌋, so that (picks + ½) / w ≥ now.
            let (n, d) = (u128::from(now.num), u128::from(now.den));
            let picks = (2 * n * u128::from(w) + d) / (2 * d);
            Frac {
                num: (2 * picks + 1) as u64,
                den: 2 * w,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckConfig, ServerConfig};
    use crate::server::Writer;
    use std::collections::HashMap;

    const W: Writer = Writer::FOR_TESTS;

    fn server(i: usize, w: u32, backup: bool) -> Arc<Server> {
        Arc::new(Server::new(
            ServerId(i as u64 + 1),
            "b",
            i as u32 + 1,
            ServerConfig {
                name: format!("s{}", i + 1),
                uid: None,
                addr_text: format!("127.0.0.1:{}", 10000 + i),
                addr: format!("127.0.0.1:{}", 10000 + i).parse().unwrap(),
                weight: w,
                maxconn: None,
                backup,
                check: CheckConfig::default(),
            },
        ))
    }

    fn servers(weights: &[u32]) -> Vec<Arc<Server>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| server(i, w, false))
            .collect()
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn names(b: &Balancer, s: &[Arc<Server>], n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                b.pick(s, CLIENT, &[], Pool::Active)
                    .unwrap()
                    .name
                    .to_string()
            })
            .collect()
    }

    fn count(names: &[String]) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for n in names {
            *out.entry(n.clone()).or_insert(0) += 1;
        }
        out
    }

    fn spread(b: &Balancer, s: &[Arc<Server>], n: usize) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for i in 0..n {
            let ip: IpAddr = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap();
            let p = b.pick(s, ip, &[], Pool::Active).unwrap();
            *out.entry(p.name.to_string()).or_insert(0) += 1;
        }
        out
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let s = servers(&[1, 2, 1]);
        let b = Balancer::new(Balance::RoundRobin, &s);
        assert_eq!(
            names(&b, &s, 8),
            ["s2", "s1", "s3", "s2", "s2", "s1", "s3", "s2"]
        );
    }

    #[test]
    fn round_robin_gives_each_server_its_weight_in_every_cycle() {
        let weights = [3, 1, 2, 5, 1, 7];
        let s = servers(&weights);
        let b = Balancer::new(Balance::RoundRobin, &s);
        let cycle: u32 = weights.iter().sum();
        for _ in 0..5 {
            let c = count(&names(&b, &s, cycle as usize));
            for (i, w) in weights.iter().enumerate() {
                assert_eq!(c[&format!("s{}", i + 1)], *w as usize, "{c:?}");
            }
        }
        // Spread out, not in runs: the weight-7 server's turns are never more than twice the
        // even spacing (⌈19/7⌉ = 3) apart.
        let order = names(&b, &s, 3 * cycle as usize);
        let at: Vec<usize> = (0..order.len()).filter(|&i| order[i] == "s6").collect();
        assert!(at.windows(2).all(|w| w[1] - w[0] <= 6), "{at:?}");
    }

    #[test]
    fn round_robin_skips_a_server_while_it_is_out_and_takes_it_back() {
        let s = servers(&[1, 1, 1]);
        let b = Balancer::new(Balance::RoundRobin, &s);
        names(&b, &s, 1);
        s[1].set_operator_state(&W, AdminState::Drain);
        let c = count(&names(&b, &s, 100));
        assert_eq!(c.get("s2"), None);
        assert_eq!((c["s1"], c["s3"]), (50, 50));
        s[1].set_operator_state(&W, AdminState::Ready);
        let order = names(&b, &s, 3);
        assert!(order.contains(&"s2".to_string()), "{order:?}");
        let c = count(&names(&b, &s, 300));
        assert_eq!((c["s1"], c["s2"], c["s3"]), (100, 100, 100));
        // A new weight counts from the next pick.
        s[2].set_weight(&W, 2);
        let c = count(&names(&b, &s, 400));
        assert_eq!((c["s1"], c["s2"], c["s3"]), (100, 100, 200));
    }

    #[test]
    fn retries_skip_tried_servers_and_backups_serve_only_their_pool() {
        let mut s = servers(&[1, 1]);
        s.push(server(2, 1, true));
        for algo in [Balance::RoundRobin, Balance::LeastConn, Balance::Source] {
            let b = Balancer::new(algo, &s);
            for _ in 0..10 {
                let first = b.pick(&s, CLIENT, &[], Pool::Active).unwrap();
                assert!(!first.is_backup());
                let other = b.pick(&s, CLIENT, &[first.id], Pool::Active).unwrap();
                assert!(other.id != first.id && !other.is_backup(), "{algo:?}");
                assert!(
                    b.pick(&s, CLIENT, &[s[0].id, s[1].id], Pool::Active)
                        .is_none()
                );
                assert_eq!(b.pick(&s, CLIENT, &[], Pool::Backup).unwrap().id, s[2].id);
            }
        }
    }

    #[test]
    fn least_conn_prefers_idle_servers() {
        let s = servers(&[1, 1, 1]);
        s[0].counters.cur.store(5, Relaxed);
        s[1].counters.cur.store(1, Relaxed);
        s[2].counters.cur.store(3, Relaxed);
        let b = Balancer::new(Balance::LeastConn, &s);
        let p = b.pick(&s, CLIENT, &[], Pool::Active).unwrap();
        assert_eq!(&*p.name, "s2");
        let p = b.pick(&s, CLIENT, &[ServerId(2)], Pool::Active).unwrap();
        assert_eq!(&*p.name, "s3");
    }

    #[test]
    fn least_conn_follows_connections_as_they_start_and_end() {
        let s = servers(&[1, 2, 1]);
        let b = Balancer::new(Balance::LeastConn, &s);
        let pick = || b.pick(&s, CLIENT, &[], Pool::Active).unwrap();
        // Open 8 connections, each on the pick: loads end as 2 / 4 / 2 (per weight).
        let mut open = Vec::new();
        for _ in 0..8 {
            let p = pick();
            p.connection_started();
            open.push(p);
        }
        let load: Vec<u64> = s.iter().map(|x| x.counters.cur.load(Relaxed)).collect();
        assert_eq!(load, [2, 4, 2]);
        // (4 + 1) / 2 is below (2 + 1) / 1.
        assert_eq!(&*pick().name, "s2");
        s[1].connection_started();
        assert_eq!(&*pick().name, "s1", "ties go to the first server");
        s[2].connection_ended();
        assert_eq!(&*pick().name, "s3");
        for _ in 0..3 {
            s[1].connection_ended();
        }
        assert_eq!(&*pick().name, "s2");
        // A server taken out is skipped until it comes back.
        s[1].set_operator_state(&W, AdminState::Maint);
        assert_eq!(&*pick().name, "s3");
        s[1].set_operator_state(&W, AdminState::Ready);
        assert_eq!(&*pick().name, "s2");
    }

    #[test]
    fn source_hash_spreads_and_is_consistent() {
        let s = servers(&[1, 1, 1]);
        let b = Balancer::new(Balance::Source, &s);
        let counts = spread(&b, &s, 3000);
        for (name, n) in &counts {
            assert!((700..1300).contains(n), "{name} got {n} of 3000");
        }
        // Same client, same server.
        let ip: IpAddr = "10.9.8.7".parse().unwrap();
        let first = b.pick(&s, ip, &[], Pool::Active).unwrap().id;
        assert!((0..10).all(|_| b.pick(&s, ip, &[], Pool::Active).unwrap().id == first));
        // Taking s2 out moves only s2's clients.
        let ips: Vec<IpAddr> = (0..500u32)
            .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + i * 7919).into())
            .collect();
        let before: Vec<ServerId> = ips
            .iter()
            .map(|&ip| b.pick(&s, ip, &[], Pool::Active).unwrap().id)
            .collect();
        s[1].set_operator_state(&W, AdminState::Maint);
        for (ip, before) in ips.iter().zip(before) {
            let after = b.pick(&s, *ip, &[], Pool::Active).unwrap().id;
            if before != s[1].id {
                assert_eq!(before, after);
            } else {
                assert_ne!(after, s[1].id);
            }
        }
    }

    #[test]
    fn nothing_eligible_is_none() {
        let s = servers(&[1, 1]);
        for x in &s {
            x.set_operator_state(&W, AdminState::Maint);
        }
        for algo in [Balance::RoundRobin, Balance::LeastConn, Balance::Source] {
            let b = Balancer::new(algo, &s);
            assert!(b.pick(&s, CLIENT, &[], Pool::Active).is_none());
            assert!(b.pick(&s, CLIENT, &[], Pool::FailOpen).is_none());
        }
    }
}
