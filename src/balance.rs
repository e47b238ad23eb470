//! Choosing a server for a client that is not pinned (or whose pin is no longer usable):
//! weighted round robin, least connections, or a consistent hash of the source address.
//!
//! A `Balancer` is built with each snapshot from the backend's server list. Its only lock is
//! round robin's cursor, taken once per new connection.

use parking_lot::Mutex;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::config::Balance;
use crate::server::{Server, ServerId};

/// Virtual points per unit of weight on the consistent-hash ring.
const RING_POINTS_PER_WEIGHT: u32 = 40;

pub struct Balancer {
    algo: Balance,
    /// Smooth weighted round robin: current weight per server (by position).
    rr: Mutex<Vec<i64>>,
    /// Consistent-hash ring: (point, server position), sorted by point.
    ring: Vec<(u64, usize)>,
}

fn hash<T: Hash>(v: &T) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

impl Balancer {
    pub fn new(algo: Balance, servers: &[Arc<Server>]) -> Self {
        let mut ring = Vec::new();
        if algo == Balance::Source {
            for (pos, s) in servers.iter().enumerate() {
                // Points hash the server's name, not its position: adding or removing one server
                // moves only the clients that hashed to it.
                let points = s.config().weight.max(1) * RING_POINTS_PER_WEIGHT;
                for i in 0..points {
                    ring.push((hash(&(&*s.name, i)), pos));
                }
            }
            ring.sort_unstable();
        }
        Balancer {
            algo,
            rr: Mutex::new(vec![0; servers.len()]),
            ring,
        }
    }

    pub fn algo(&self) -> Balance {
        self.algo
    }

    /// Picks among `servers` those for which `eligible` holds, skipping `tried`.
    pub fn pick(
        &self,
        servers: &[Arc<Server>],
        client: IpAddr,
        tried: &[ServerId],
        eligible: impl Fn(&Server) -> bool,
    ) -> Option<Arc<Server>> {
        let ok = |s: &Arc<Server>| eligible(s) && !tried.contains(&s.id);
        let idx = match self.algo {
            Balance::RoundRobin => self.round_robin(servers, &ok),
            Balance::LeastConn => least_conn(servers, &ok),
            Balance::Source => self.source(servers, client, &ok),
        }?;
        Some(servers[idx].clone())
    }

    fn round_robin(
        &self,
        servers: &[Arc<Server>],
        ok: &dyn Fn(&Arc<Server>) -> bool,
    ) -> Option<usize> {
        let mut cur = self.rr.lock();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, s) in servers.iter().enumerate() {
            if !ok(s) {
                continue;
            }
            let w = i64::from(s.weight().max(1));
            cur[i] += w;
            total += w;
            if best.is_none_or(|b| cur[i] > cur[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        cur[b] -= total;
        Some(b)
    }

    fn source(
        &self,
        servers: &[Arc<Server>],
        client: IpAddr,
        ok: &dyn Fn(&Arc<Server>) -> bool,
    ) -> Option<usize> {
        if self.ring.is_empty() {
            return None;
        }
        let h = hash(&client);
        let start = self.ring.partition_point(|(p, _)| *p < h);
        (0..self.ring.len())
            .map(|k| self.ring[(start + k) % self.ring.len()].1)
            .find(|&pos| ok(&servers[pos]))
    }
}

fn least_conn(servers: &[Arc<Server>], ok: &dyn Fn(&Arc<Server>) -> bool) -> Option<usize> {
    // Compare cur/weight without division: a.cur * b.w < b.cur * a.w.
    let mut best: Option<(usize, u64, u64)> = None;
    for (i, s) in servers.iter().enumerate() {
        if !ok(s) {
            continue;
        }
        let cur = s.counters.cur.load(Relaxed) + 1;
        let w = u64::from(s.weight().max(1));
        if best.is_none_or(|(_, bc, bw)| cur * bw < bc * w) {
            best = Some((i, cur, w));
        }
    }
    best.map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckConfig, ServerConfig};
    use std::collections::HashMap;

    fn servers(weights: &[u32]) -> Vec<Arc<Server>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
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
                        backup: false,
                        check: CheckConfig::default(),
                    },
                ))
            })
            .collect()
    }

    fn spread(b: &Balancer, s: &[Arc<Server>], n: usize) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for i in 0..n {
            let ip: IpAddr = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)
                .parse()
                .unwrap();
            let p = b.pick(s, ip, &[], |_| true).unwrap();
            *out.entry(p.name.to_string()).or_insert(0) += 1;
        }
        out
    }

    #[test]
    fn weighted_round_robin_is_exact_and_smooth() {
        let s = servers(&[1, 2, 1]);
        let b = Balancer::new(Balance::RoundRobin, &s);
        let order: Vec<String> = (0..8)
            .map(|_| {
                b.pick(&s, [127, 0, 0, 1].into(), &[], |_| true)
                    .unwrap()
                    .name
                    .to_string()
            })
            .collect();
        assert_eq!(order, ["s2", "s1", "s3", "s2", "s2", "s1", "s3", "s2"]);
    }

    #[test]
    fn least_conn_prefers_idle_servers() {
        let s = servers(&[1, 1, 1]);
        s[0].counters.cur.store(5, Relaxed);
        s[1].counters.cur.store(1, Relaxed);
        s[2].counters.cur.store(3, Relaxed);
        let b = Balancer::new(Balance::LeastConn, &s);
        let p = b.pick(&s, [127, 0, 0, 1].into(), &[], |_| true).unwrap();
        assert_eq!(&*p.name, "s2");
        let p = b
            .pick(&s, [127, 0, 0, 1].into(), &[ServerId(2)], |_| true)
            .unwrap();
        assert_eq!(&*p.name, "s3");
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
        let first = b.pick(&s, ip, &[], |_| true).unwrap().id;
        assert!((0..10).all(|_| b.pick(&s, ip, &[], |_| true).unwrap().id == first));
        // Taking s2 out moves only s2's clients.
        let without = |srv: &Server| &*srv.name != "s2";
        for i in 0..500u32 {
            let ip: IpAddr = std::net::Ipv4Addr::from(0x0a00_0000 + i * 7919).into();
            let before = b.pick(&s, ip, &[], |_| true).unwrap();
            let after = b.pick(&s, ip, &[], without).unwrap();
            if &*before.name != "s2" {
                assert_eq!(before.id, after.id);
            }
        }
    }

    #[test]
    fn nothing_eligible_is_none() {
        let s = servers(&[1, 1]);
        for algo in [Balance::RoundRobin, Balance::LeastConn, Balance::Source] {
            let b = Balancer::new(algo, &s);
            assert!(b.pick(&s, [127, 0, 0, 1].into(), &[], |_| false).is_none());
        }
    }
}
