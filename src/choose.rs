//! Choosing a server for a new connection or RPC, in one place: a live pin first (the stick
//! table's, or the gateway's session registry's), while its server takes pinned clients; else
//! the backend's balance algorithm among servers that take new clients, backups only when no
//! active server does; else, with `all_down = "fail-open"`, a server that checks say is DOWN.

use std::net::IpAddr;
use std::sync::Arc;

use crate::balance::Pool;
use crate::config::AllDown;
use crate::server::{Server, ServerId};
use crate::state::Backend;

/// How a connection's server was chosen, for the log and the re-pin counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// A live pin to a usable server.
    Pinned,
    /// No pin (or the backend has no stick table): the balancer chose.
    Balanced,
    /// The pin pointed at this server, which is DOWN, in MAINT or gone: the client moves.
    Repinned(ServerId),
}

impl Backend {
    /// Chooses a server for a new connection from `client`, skipping `tried`:
    /// a live pin wins while its server takes pinned clients; otherwise the balancer picks
    /// among servers that take new clients, backups only when no active server does.
    pub fn choose(&self, client: IpAddr, tried: &[ServerId]) -> Option<(Arc<Server>, Choice)> {
        let pin = self.stick.as_ref().and_then(|stick| stick.lookup(client));
        self.choose_pinned(pin, client, tried)
    }

    /// [`Backend::choose`] with the pin given by the caller (the gateway's session registry)
    /// instead of the stick table. `client` feeds `balance = "source"`.
    pub fn choose_pinned(
        &self,
        pin: Option<ServerId>,
        client: IpAddr,
        tried: &[ServerId],
    ) -> Option<(Arc<Server>, Choice)> {
        let mut choice = Choice::Balanced;
        if let Some(id) = pin {
            if let Some(s) = self.server(id)
                && !tried.contains(&id)
                && s.takes_pinned_clients()
            {
                return Some((s.clone(), Choice::Pinned));
            }
            choice = Choice::Repinned(id);
        }
        let pick = |pool| self.balancer.pick(&self.servers, client, tried, pool);
        if let Some(s) = pick(Pool::Active).or_else(|| pick(Pool::Backup)) {
            return Some((s, choice));
        }
        // Every server is DOWN (or drained). Fail open: a check can be wrong where the server
        // is not, and refusing every client is the worst outcome. MAINT and DRAIN still hold.
        if self.config.all_down == AllDown::FailOpen
            && !self.servers.iter().any(|s| s.takes_new_clients())
        {
            return pick(Pool::FailOpen).map(|s| (s, choice));
        }
        None
    }
}
