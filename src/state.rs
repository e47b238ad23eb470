//! The running state: one immutable [`Snapshot`] of frontends and backends behind one
//! `ArcSwap`, rebuilt whole on every change.
//!
//! Live state — servers (with their counters, health and admin state) and stick tables — is
//! carried from the old snapshot into the new one by stable keys (backend name; server name and
//! address), so a reload keeps every connection, pin, health state and drain. A connection loads
//! the snapshot once and holds its `Arc<Server>` for its whole life.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::balance::Balancer;
use crate::config::{self, AllDown, Config};
use crate::server::{Server, ServerId};
use crate::stick_table::StickTable;

pub struct Backend {
    pub config: config::Backend,
    /// Servers in config order.
    pub servers: Vec<Arc<Server>>,
    /// Servers that left the config but still carry live connections; they take no new
    /// clients and disappear once empty.
    pub leaving: Vec<Arc<Server>>,
    pub balancer: Balancer,
    pub stick: Option<Arc<StickTable>>,
    /// Re-pin count and the last one; shared by every snapshot of this backend.
    pub repins: Arc<RepinLog>,
}

#[derive(Default)]
pub struct RepinLog {
    pub count: AtomicU64,
    pub last: Mutex<Option<Repin>>,
}

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

/// The last client moved off its server, for the stats page.
#[derive(Debug, Clone)]
pub struct Repin {
    pub client: IpAddr,
    pub from: ServerId,
    pub to: ServerId,
    pub at: std::time::SystemTime,
}

impl Backend {
    pub fn server(&self, id: ServerId) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| s.id == id)
    }

    pub fn note_repin(&self, client: IpAddr, from: ServerId, to: ServerId) {
        self.repins.count.fetch_add(1, Relaxed);
        *self.repins.last.lock().unwrap() = Some(Repin {
            client,
            from,
            to,
            at: std::time::SystemTime::now(),
        });
    }

    pub fn server_by_name(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| &*s.name == name)
    }

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
        let pick = |backup: bool| {
            self.balancer.pick(&self.servers, client, tried, |s| {
                s.is_backup() == backup && s.takes_new_clients()
            })
        };
        if let Some(s) = pick(false).or_else(|| pick(true)) {
            return Some((s, choice));
        }
        // Every server is DOWN (or drained). Fail open: a check can be wrong where the server
        // is not, and refusing every client is the worst outcome. MAINT and DRAIN still hold.
        if self.config.all_down == AllDown::FailOpen
            && !self.servers.iter().any(|s| s.takes_new_clients())
        {
            return self
                .balancer
                .pick(&self.servers, client, tried, |s| {
                    s.admin_state() == crate::server::AdminState::Ready
                        && s.weight() > 0
                        && !s.health.is_up()
                })
                .map(|s| (s, choice));
        }
        None
    }
}

pub struct Frontend {
    pub config: config::Frontend,
}

pub struct Snapshot {
    pub config: Arc<Config>,
    pub frontends: Vec<Arc<Frontend>>,
    pub backends: Vec<Arc<Backend>>,
}

impl Snapshot {
    pub fn backend(&self, name: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.config.name == name)
    }

    pub fn frontend(&self, name: &str) -> Option<&Arc<Frontend>> {
        self.frontends.iter().find(|f| f.config.name == name)
    }

    /// Every server of every backend, config order, then the leaving ones.
    pub fn all_servers(&self) -> impl Iterator<Item = (&Arc<Backend>, &Arc<Server>)> {
        self.backends.iter().flat_map(|b| {
            b.servers
                .iter()
                .chain(b.leaving.iter())
                .map(move |s| (b, s))
        })
    }
}

/// Live per-frontend counters, carried across reloads by frontend name.
#[derive(Default)]
pub struct FrontendCounters {
    pub cur: AtomicU64,
    pub max: AtomicU64,
    pub total: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Connections closed because no server could take them.
    pub denied: AtomicU64,
}

impl FrontendCounters {
    pub fn connection_started(&self) {
        let cur = self.cur.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(cur, Relaxed);
        self.total.fetch_add(1, Relaxed);
    }
}

pub struct State {
    current: ArcSwap<Snapshot>,
    next_server_id: AtomicU64,
    frontend_counters: Mutex<HashMap<String, Arc<FrontendCounters>>>,
    /// Serialises snapshot replacements (reload, discovery, refresh): each reads the current
    /// snapshot and replaces it, and two must not interleave.
    apply_lock: Mutex<()>,
    /// Servers reported by discovery sources, merged into each snapshot.
    pub discovered: crate::discovery::Registry,
    /// State-file entries waiting for their (discovered) servers.
    pub pending_restore: Mutex<Option<crate::state_file::Pending>>,
    /// Per-frontend maxconn slots, by frontend name: (maxconn, slots).
    frontend_slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

impl State {
    pub fn new(config: Config) -> Arc<Self> {
        let state = Arc::new(State {
            current: ArcSwap::from_pointee(Snapshot::empty()),
            next_server_id: AtomicU64::new(1),
            frontend_counters: Mutex::new(HashMap::new()),
            frontend_slots: Mutex::new(HashMap::new()),
            discovered: Default::default(),
            pending_restore: Mutex::new(None),
            apply_lock: Mutex::new(()),
        });
        let snap = state.build(config, &Snapshot::empty());
        state.current.store(Arc::new(snap));
        state
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn frontend_counters(&self, name: &str) -> Arc<FrontendCounters> {
        self.frontend_counters
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The connection slots of a frontend with `maxconn`; kept while maxconn is unchanged, so
    /// a reload does not reset the count of live connections.
    pub fn frontend_slots(&self, fe: &config::Frontend) -> Arc<Semaphore> {
        let n = fe.maxconn.unwrap_or(Semaphore::MAX_PERMITS);
        let mut map = self.frontend_slots.lock().unwrap();
        let e = map
            .entry(fe.name.clone())
            .or_insert_with(|| (n, Arc::new(Semaphore::new(n))));
        if e.0 != n {
            *e = (n, Arc::new(Semaphore::new(n)));
        }
        e.1.clone()
    }

    fn new_server_id(&self) -> ServerId {
        ServerId(self.next_server_id.fetch_add(1, Relaxed))
    }

    /// Builds a snapshot for `config`, carrying live state over from `old`.
    fn build(&self, config: Config, old: &Snapshot) -> Snapshot {
        let backends = config
            .backends
            .iter()
            .map(|bc| {
                let prev = old.backend(&bc.name);
                let discovered = self.discovered.servers(&bc.name);
                let configs: Vec<config::ServerConfig> = bc
                    .servers
                    .iter()
                    .cloned()
                    .chain(discovered.iter().map(|d| config::ServerConfig {
                        name: d.name.clone(),
                        uid: Some(d.uid.clone()),
                        addr_text: d.addr.to_string(),
                        addr: d.addr,
                        weight: 1,
                        maxconn: None,
                        backup: false,
                        check: bc.check.clone(),
                    }))
                    .collect();
                let mut servers = Vec::with_capacity(configs.len());
                for (i, sc) in configs.iter().enumerate() {
                    let kept = prev.and_then(|p| {
                        p.servers.iter().chain(p.leaving.iter()).find(|s| {
                            s.name.as_ref() == sc.name
                                && s.config_addr() == sc.addr
                                && s.config().uid == sc.uid
                        })
                    });
                    let server = match kept {
                        Some(s) => {
                            s.sid.store(i as u32 + 1, Relaxed);
                            if *s.config() != *sc {
                                s.update_config(sc.clone());
                            }
                            s.clone()
                        }
                        None => Arc::new(Server::new(
                            self.new_server_id(),
                            &bc.name,
                            i as u32 + 1,
                            sc.clone(),
                        )),
                    };
                    if sc.uid.is_some()
                        && discovered
                            .iter()
                            .any(|d| Some(&d.uid) == sc.uid.as_ref() && d.draining)
                        && server.admin_state() == crate::server::AdminState::Ready
                    {
                        // A terminating pod: its pinned sessions finish, no new ones start.
                        server.set_admin_state(crate::server::AdminState::Drain);
                    }
                    servers.push(server);
                }
                let leaving = prev
                    .map(|p| {
                        p.servers
                            .iter()
                            .chain(p.leaving.iter())
                            .filter(|s| !servers.iter().any(|n| n.id == s.id))
                            .filter(|s| s.counters.cur.load(Relaxed) > 0)
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let stick = bc
                    .stick
                    .as_ref()
                    .map(|sc| match prev.and_then(|p| p.stick.clone()) {
                        Some(t) if t.expire() == sc.expire && t.size() == sc.size => t,
                        Some(t) => {
                            let n = Arc::new(StickTable::new(sc.expire, sc.size));
                            for e in t.entries() {
                                n.restore(e.key, e.server, e.expires_in);
                            }
                            n
                        }
                        None => Arc::new(StickTable::new(sc.expire, sc.size)),
                    });
                let repins = prev.map(|p| p.repins.clone()).unwrap_or_default();
                Arc::new(Backend {
                    repins,
                    config: bc.clone(),
                    balancer: Balancer::new(bc.balance, &servers),
                    servers,
                    leaving,
                    stick,
                })
            })
            .collect();
        let frontends = config
            .frontends
            .iter()
            .map(|fc| Arc::new(Frontend { config: fc.clone() }))
            .collect();
        Snapshot {
            config: Arc::new(config),
            frontends,
            backends,
        }
    }

    /// Replaces the running config, carrying live state. Returns the old and new snapshots.
    pub fn apply(&self, config: Config) -> (Arc<Snapshot>, Arc<Snapshot>) {
        let _one = self.apply_lock.lock().unwrap();
        let old = self.snapshot();
        let new = Arc::new(self.build(config, &old));
        self.current.store(new.clone());
        (old, new)
    }

    /// Puts back a snapshot (a reload that could not finish).
    pub fn restore(&self, snap: Arc<Snapshot>) {
        let _one = self.apply_lock.lock().unwrap();
        self.current.store(snap);
    }

    /// Rebuilds the snapshot from the running config: discovered servers changed, or servers
    /// removed by a reload have finished draining.
    pub fn refresh(&self) -> (Arc<Snapshot>, Arc<Snapshot>) {
        let _one = self.apply_lock.lock().unwrap();
        let old = self.snapshot();
        let new = Arc::new(self.build((*old.config).clone(), &old));
        self.current.store(new.clone());
        (old, new)
    }
}

impl Snapshot {
    fn empty() -> Self {
        Snapshot {
            config: Arc::new(Config {
                source: Default::default(),
                global: config::Global {
                    maxconn: 1,
                    log: config::LogConfig {
                        level: "info".into(),
                        format: config::LogFormat::Text,
                    },
                    hard_stop_after: Default::default(),
                    admin: None,
                    stats: None,
                    state_file: None,
                    splice: true,
                    run_as: None,
                    threads: 0,
                },
                frontends: Vec::new(),
                backends: Vec::new(),
            }),
            frontends: Vec::new(),
            backends: Vec::new(),
        }
    }
}
