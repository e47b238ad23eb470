//! Per-client shares of the session registry, so that no single source can use up a quota
//! everyone shares: at most `sessions.max_per_client` live sessions and
//! `sessions.rate_per_client` new sessions a second (a token bucket with a burst of as many)
//! per [`ClientKey`].
//!
//! The key is computed in one place, [`ClientKey::of`]: the authenticated user when the
//! gateway verifies clients (`auth`), else the client's address (an IPv6 client by its /64,
//! the block one host is given).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use tokio::time::Instant;

/// Who a session is counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An authenticated user.
    User(String),
    /// An IPv4 address, or an IPv6 /64.
    Addr(IpAddr),
}

impl ClientKey {
    /// The key of a client connecting from `peer`, proven to be `identity` if it is.
    pub fn of(peer: SocketAddr, identity: Option<&crate::auth::Identity>) -> ClientKey {
        if let Some(id) = identity {
            return ClientKey::User(id.user.clone());
        }
        match peer.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::Addr(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    ClientKey::Addr(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
            v4 => ClientKey::Addr(v4),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::User(u) => write!(f, "user {}", crate::escape::token(u)),
            ClientKey::Addr(IpAddr::V6(a)) => write!(f, "{a}/64"),
            ClientKey::Addr(a) => write!(f, "{a}"),
        }
    }
}

/// A client's limits, from its frontend's `sessions` settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_live: usize,
    pub per_second: u32,
}

/// Why a client may not open a session now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// It holds `max_per_client` live sessions.
    Live(usize),
    /// It opened `rate_per_client` in the last second.
    Rate(u32),
}

struct Use {
    live: usize,
    tokens: f64,
    refilled: Instant,
    /// The rate it was last taken at (its frontend's), for [`Use::idle`].
    per_second: u32,
}

impl Use {
    fn refill(&mut self, per_second: u32, now: Instant) {
        let burst = f64::from(per_second.max(1));
        let gained = now.duration_since(self.refilled).as_secs_f64() * burst;
        self.tokens = (self.tokens + gained).min(burst);
        self.refilled = now;
    }

    /// Nothing live and the bucket full again: nothing worth remembering.
    fn idle(&self, now: Instant) -> bool {
        let burst = f64::from(self.per_second.max(1));
        self.live == 0
            && self.tokens + now.duration_since(self.refilled).as_secs_f64() * burst >= burst
    }
}

/// The per-client counts; lives inside the registry's lock.
#[derive(Default)]
pub struct Quotas {
    by_client: HashMap<ClientKey, Use>,
}

impl Quotas {
    /// Takes one new session for `client` within `limits`, or says which limit it is at.
    pub fn take(&mut self, client: &ClientKey, limits: Limits) -> Result<(), Refused> {
        let now = Instant::now();
        if self.by_client.len() > 4096 && !self.by_client.contains_key(client) {
            self.forget_idle(now);
        }
        let u = self.by_client.entry(client.clone()).or_insert(Use {
            live: 0,
            tokens: f64::from(limits.per_second.max(1)),
            refilled: now,
            per_second: limits.per_second,
        });
        u.per_second = limits.per_second;
        u.refill(limits.per_second, now);
        if u.live >= limits.max_live {
            return Err(Refused::Live(limits.max_live));
        }
        if u.tokens < 1.0 {
            return Err(Refused::Rate(limits.per_second));
        }
        u.tokens -= 1.0;
        u.live += 1;
        Ok(())
    }

    /// One of `client`'s sessions ended.
    pub fn release(&mut self, client: &ClientKey) {
        if let Some(u) = self.by_client.get_mut(client) {
            u.live = u.live.saturating_sub(1);
        }
    }

    /// Live sessions `client` holds.
    pub fn live(&self, client: &ClientKey) -> usize {
        self.by_client.get(client).map_or(0, |u| u.live)
    }

    /// Drops clients with nothing live and a full bucket (called by the reaper and when the
    /// map grows), so the map holds about as many clients as there are sessions.
    pub fn forget_idle(&mut self, now: Instant) {
        self.by_client.retain(|_, u| !u.idle(now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(s: &str) -> ClientKey {
        ClientKey::of(s.parse().unwrap(), None)
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_a_mapped_v4_is_v4() {
        assert_eq!(
            key("[2001:db8:1:2:aaaa::1]:5"),
            key("[2001:db8:1:2:bbbb::9]:6")
        );
        assert_ne!(key("[2001:db8:1:2::1]:5"), key("[2001:db8:1:3::1]:5"));
        assert_eq!(key("[::ffff:10.0.0.1]:5"), key("10.0.0.1:7"));
        assert_eq!(key("[2001:db8:1:2::1]:5").to_string(), "2001:db8:1:2::/64");
    }

    #[tokio::test(start_paused = true)]
    async fn live_and_rate_limits_per_client() {
        let mut q = Quotas::default();
        let lim = Limits {
            max_live: 3,
            per_second: 2,
        };
        let (a, b) = (key("10.0.0.1:1"), key("10.0.0.2:1"));
        assert_eq!(q.take(&a, lim), Ok(()));
        assert_eq!(q.take(&a, lim), Ok(()));
        assert_eq!(q.take(&a, lim), Err(Refused::Rate(2)));
        assert_eq!(q.take(&b, lim), Ok(()), "another client is not affected");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(q.take(&a, lim), Ok(()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(q.take(&a, lim), Err(Refused::Live(3)));
        q.release(&a);
        assert_eq!(q.live(&a), 2);
        assert_eq!(q.take(&a, lim), Ok(()));
        // Released and refilled: forgotten, and a fresh start.
        for _ in 0..3 {
            q.release(&a);
        }
        q.release(&b);
        tokio::time::advance(Duration::from_secs(2)).await;
        q.forget_idle(Instant::now());
        assert!(q.by_client.is_empty());
    }
}
