//! The running state: one immutable [`Snapshot`] of frontends and backends behind one
//! `ArcSwap`, rebuilt whole on every change.
//!
//! Live state — servers (with their counters, health and admin state) and stick tables — is
//! carried from the old snapshot into the new one by stable keys (backend name; server name and
//! address), so a reload keeps every connection, pin, health state and drain. A connection loads
//! the snapshot once and holds its `Arc<Server>` for its whole life. Only [`crate::control`]
//! replaces the snapshot: the methods that do take its writer.

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::balance::Balancer;
use crate::config::{self, Config};
use crate::server::Writer;
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
        self.balancer.position(id).map(|i| &self.servers[i])
    }

    pub fn note_repin(&self, client: IpAddr, from: ServerId, to: ServerId) {
        self.repins.count.fetch_add(1, Relaxed);
        *self.repins.last.lock() = Some(Repin {
            client,
            from,
            to,
            at: std::time::SystemTime::now(),
        });
    }

    pub fn server_by_name(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| &*s.name == name)
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
    /// Connections accepted per second (`rate`, `conn_rate` and their max).
    pub rate: crate::rate::Rate,
}

impl FrontendCounters {
    /// `clear counters [all]`, as for a server's counters.
    pub fn clear(&self, _: &crate::server::Writer, all: bool) {
        self.max.store(self.cur.load(Relaxed), Relaxed);
        self.rate.clear_max();
        if all {
            for c in [&self.total, &self.bytes_in, &self.bytes_out, &self.denied] {
                c.store(0, Relaxed);
            }
        }
    }

    pub fn connection_started(&self) {
        let cur = self.cur.fetch_add(1, Relaxed) + 1;
        self.max.fetch_max(cur, Relaxed);
        self.total.fetch_add(1, Relaxed);
        self.rate.hit();
        crate::rate::PROCESS_CONNS.hit();
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
    pub discovered: crate::discovered::Registry,
    /// Per-frontend maxconn slots, by frontend name: (maxconn, slots).
    frontend_slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
    /// `set maxconn frontend`: a frontend's maxconn set at run time, over its config's.
    frontend_maxconn: Mutex<HashMap<String, usize>>,
    /// `add server`: servers added at run time, per backend, after the config's and the
    /// discovered ones. A reload keeps them (unless the file now has a server of that name, or
    /// no longer the backend); a restart does not.
    pub dynamic: Mutex<HashMap<String, Vec<config::ServerConfig>>>,
}

impl State {
    /// The state for a first config (see [`crate::control::initial_state`]).
    pub fn new(w: &Writer, config: Config) -> Arc<Self> {
        let state = Arc::new(State {
            current: ArcSwap::from_pointee(Snapshot::empty()),
            next_server_id: AtomicU64::new(1),
            frontend_counters: Mutex::new(HashMap::new()),
            frontend_slots: Mutex::new(HashMap::new()),
            frontend_maxconn: Mutex::new(HashMap::new()),
            dynamic: Mutex::new(HashMap::new()),
            discovered: Default::default(),
            apply_lock: Mutex::new(()),
        });
        let snap = state.build(w, config, &Snapshot::empty());
        state.current.store(Arc::new(snap));
        state
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Every frontend's counters, by name.
    pub fn all_frontend_counters(&self) -> Vec<Arc<FrontendCounters>> {
        self.frontend_counters.lock().values().cloned().collect()
    }

    pub fn frontend_counters(&self, name: &str) -> Arc<FrontendCounters> {
        self.frontend_counters
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// A frontend's maxconn in force: `set maxconn frontend`'s, else the config's.
    pub fn frontend_maxconn(&self, fe: &config::Frontend) -> Option<usize> {
        self.frontend_maxconn
            .lock()
            .get(&fe.name)
            .copied()
            .or(fe.maxconn)
    }

    /// `set maxconn frontend`: the slots of a frontend that has some are resized in place (its
    /// live connections keep counting); a frontend that had no limit gets slots for the
    /// connections it accepts from now on. Kept until sclb restarts.
    pub fn set_frontend_maxconn(&self, fe: &config::Frontend, n: usize) {
        self.frontend_maxconn.lock().insert(fe.name.clone(), n);
        let mut map = self.frontend_slots.lock();
        if let Some(e) = map.get_mut(&fe.name) {
            crate::server::resize_semaphore(&e.1, e.0, n);
            e.0 = n;
        }
    }

    /// The `n` connection slots of a frontend; kept while `n` is unchanged, so a reload does
    /// not reset the count of live connections.
    pub fn frontend_slots(&self, fe: &config::Frontend, n: usize) -> Arc<Semaphore> {
        let n = n.min(Semaphore::MAX_PERMITS);
        let mut map = self.frontend_slots.lock();
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
    fn build(&self, w: &Writer, config: Config, old: &Snapshot) -> Snapshot {
        let backends = config
            .backends
            .iter()
            .map(|bc| {
                let prev = old.backend(&bc.name);
                let discovered = self.discovered.servers(&bc.name);
                let dynamic = self
                    .dynamic
                    .lock()
                    .get(&bc.name)
                    .cloned()
                    .unwrap_or_default();
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
                    .chain(dynamic)
                    .collect();
                // Indexed, not searched: a discovery update rebuilds this for every event, and a
                // backend may hold thousands of pods.
                let mut previous: HashMap<(&str, SocketAddr), Vec<&Arc<Server>>> = HashMap::new();
                if let Some(p) = prev {
                    for s in p.servers.iter().chain(p.leaving.iter()) {
                        previous
                            .entry((s.name.as_ref(), s.config_addr()))
                            .or_default()
                            .push(s);
                    }
                }
                let draining_uids: HashSet<&str> = discovered
                    .iter()
                    .filter(|d| d.draining)
                    .map(|d| d.uid.as_str())
                    .collect();
                let mut servers = Vec::with_capacity(configs.len());
                for (i, sc) in configs.iter().enumerate() {
                    let kept = previous
                        .get(&(sc.name.as_str(), sc.addr))
                        .and_then(|same| same.iter().find(|s| s.config().uid == sc.uid))
                        .copied();
                    let server = match kept {
                        Some(s) => {
                            s.sid.store(i as u32 + 1, Relaxed);
                            if *s.config() != *sc {
                                s.update_config(w, sc.clone());
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
                    // A terminating pod: its pinned sessions finish, no new ones start. This is
                    // discovery's own flag: the operator's word about the server stays as it is.
                    let draining = sc.uid.as_deref().is_some_and(|u| draining_uids.contains(u));
                    server.set_discovery_drain(w, draining);
                    servers.push(server);
                }
                // Its index of the servers by id also tells which of the old ones are gone.
                let balancer = Balancer::new(bc.balance, &servers);
                let leaving = prev
                    .map(|p| {
                        p.servers
                            .iter()
                            .chain(p.leaving.iter())
                            .filter(|s| balancer.position(s.id).is_none())
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
                            n.restore(
                                t.entries()
                                    .into_iter()
                                    .map(|e| (e.key, e.server, e.expires_in)),
                            );
                            n
                        }
                        None => Arc::new(StickTable::new(sc.expire, sc.size)),
                    });
                let repins = prev.map(|p| p.repins.clone()).unwrap_or_default();
                Arc::new(Backend {
                    repins,
                    config: bc.clone(),
                    balancer,
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
    pub fn apply(&self, w: &Writer, config: Config) -> (Arc<Snapshot>, Arc<Snapshot>) {
        let _one = self.apply_lock.lock();
        let old = self.snapshot();
        let new = Arc::new(self.build(w, config, &old));
        self.current.store(new.clone());
        (old, new)
    }

    /// Puts back a snapshot (a reload that could not finish).
    pub fn restore(&self, _: &Writer, snap: Arc<Snapshot>) {
        let _one = self.apply_lock.lock();
        for b in &snap.backends {
            b.balancer.attach(&b.servers);
        }
        self.current.store(snap);
    }

    /// Rebuilds the snapshot from the running config: discovered servers changed, or servers
    /// removed by a reload have finished draining.
    pub fn refresh(&self, w: &Writer) -> (Arc<Snapshot>, Arc<Snapshot>) {
        let _one = self.apply_lock.lock();
        let old = self.snapshot();
        let new = Arc::new(self.build(w, (*old.config).clone(), &old));
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
                    store: Default::default(),
                },
                frontends: Vec::new(),
                backends: Vec::new(),
            }),
            frontends: Vec::new(),
            backends: Vec::new(),
        }
    }
}
