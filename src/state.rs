//! The running state: one immutable [`Snapshot`] of frontends and backends behind one
//! `ArcSwap`, rebuilt whole on a reload or `add server`. A discovery change patches it instead
//! ([`State::patch_discovered`]): the changed backend gets a new server list with the servers
//! added and removed, every other part is shared with the old snapshot, and a server whose
//! place did not change is the same `Arc` — so an event costs what it changes plus copying
//! one list of pointers, not building every server again.
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
    /// Servers in config order: the config's, then the discovered ones in uid order, then
    /// those added with `add server`.
    pub servers: Vec<Arc<Server>>,
    /// Where the discovered servers are in `servers`.
    pub discovered: std::ops::Range<usize>,
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
                    .chain(discovered.iter().map(|d| discovered_config(bc, d)))
                    .chain(dynamic)
                    .collect();
                let discovered_at = bc.servers.len()..bc.servers.len() + discovered.len();
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
                    discovered: discovered_at,
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

/// A discovery change applied to the running snapshot ([`State::patch_discovered`]).
pub struct Patched {
    pub old: Arc<Snapshot>,
    pub new: Arc<Snapshot>,
    /// New servers: their checkers are to start.
    pub added: Vec<Arc<Server>>,
    /// Servers no longer taking clients: they are to be retired.
    pub removed: Vec<Arc<Server>>,
}

/// The config of a discovered server of backend `bc`.
fn discovered_config(
    bc: &config::Backend,
    d: &crate::discovered::Discovered,
) -> config::ServerConfig {
    config::ServerConfig {
        name: d.name.clone(),
        uid: Some(d.uid.clone()),
        addr_text: d.addr.to_string(),
        addr: d.addr,
        weight: 1,
        maxconn: None,
        backup: false,
        check: bc.check.clone(),
    }
}

impl State {
    /// Applies discovery's change of servers `uids` (added, changed or removed in the
    /// registry) to `backend` of the running snapshot, as [`State::refresh`] would but at the
    /// cost of those servers: a server whose name and address are unchanged is kept (only its
    /// drain follows), one whose name or address changed is replaced, as a rebuild would.
    /// Only a server added or removed makes a new snapshot. `None`: no such backend.
    pub fn patch_discovered(&self, w: &Writer, backend: &str, uids: &[String]) -> Option<Patched> {
        let _one = self.apply_lock.lock();
        let old = self.snapshot();
        let bi = old.backends.iter().position(|b| b.config.name == backend)?;
        let ob = &old.backends[bi];
        let mut servers = ob.servers.clone();
        let mut range = ob.discovered.clone();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        // The first position whose server changed: from there on, sids are numbered again and
        // the balancer's index of positions updated.
        let mut moved = servers.len();
        for uid in uids {
            let at = servers[range.clone()]
                .binary_search_by(|s| s.config_peek().uid.as_deref().unwrap_or("").cmp(uid))
                .map(|k| range.start + k)
                .map_err(|k| range.start + k);
            match (at, self.discovered.get(backend, uid)) {
                (Ok(pos), Some(d)) => {
                    let s = &servers[pos];
                    if s.config_peek().name == d.name && s.config_addr() == d.addr {
                        s.set_discovery_drain(w, d.draining);
                        continue;
                    }
                    let new = self.discovered_server(w, ob, pos, &d);
                    removed.push(std::mem::replace(&mut servers[pos], new.clone()));
                    added.push(new);
                    moved = moved.min(pos);
                }
                (Ok(pos), None) => {
                    removed.push(servers.remove(pos));
                    range.end -= 1;
                    moved = moved.min(pos);
                }
                (Err(pos), Some(d)) => {
                    let new = self.discovered_server(w, ob, pos, &d);
                    servers.insert(pos, new.clone());
                    added.push(new);
                    range.end += 1;
                    moved = moved.min(pos);
                }
                (Err(_), None) => {}
            }
        }
        if added.is_empty() && removed.is_empty() {
            return Some(Patched {
                new: old.clone(),
                old,
                added,
                removed,
            });
        }
        for (i, s) in servers.iter().enumerate().skip(moved) {
            s.sid.store(i as u32 + 1, Relaxed);
        }
        let gone: Vec<ServerId> = removed.iter().map(|s| s.id).collect();
        let balancer = ob.balancer.patched(&servers, moved, &gone, &added);
        let leaving = ob
            .leaving
            .iter()
            .chain(removed.iter())
            .filter(|s| s.counters.cur.load(Relaxed) > 0)
            .cloned()
            .collect();
        let nb = Arc::new(Backend {
            config: ob.config.clone(),
            servers,
            discovered: range,
            leaving,
            balancer,
            stick: ob.stick.clone(),
            repins: ob.repins.clone(),
        });
        let mut backends = old.backends.clone();
        backends[bi] = nb;
        let new = Arc::new(Snapshot {
            config: old.config.clone(),
            frontends: old.frontends.clone(),
            backends,
        });
        self.current.store(new.clone());
        Some(Patched {
            old,
            new,
            added,
            removed,
        })
    }

    fn discovered_server(
        &self,
        w: &Writer,
        b: &Backend,
        pos: usize,
        d: &crate::discovered::Discovered,
    ) -> Arc<Server> {
        let s = Arc::new(Server::new(
            self.new_server_id(),
            &b.config.name,
            pos as u32 + 1,
            discovered_config(&b.config, d),
        ));
        s.set_discovery_drain(w, d.draining);
        s
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Pool;
    use crate::discovered::{Changed, Discovered, Update};

    const W: Writer = Writer::FOR_TESTS;

    fn config(balance: &str) -> Config {
        let toml = format!(
            r#"
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"
[[backend]]
name = "be"
balance = "{balance}"
check = {{ type = "none" }}
servers = [{{ name = "cfg", addr = "127.0.0.1:1" }}]
[[backend]]
name = "other"
check = {{ type = "none" }}
servers = [{{ name = "o1", addr = "127.0.0.1:2" }}]
"#
        );
        crate::config::parse(std::path::Path::new("t.toml"), &toml).unwrap()
    }

    /// A state with one server from the file and one added at run time after the discovered.
    fn state(balance: &str) -> Arc<State> {
        let state = State::new(&W, config(balance));
        let mut added = state.snapshot().backends[0].servers[0]
            .config()
            .as_ref()
            .clone();
        added.name = "added".into();
        added.addr = "127.0.0.1:3".parse().unwrap();
        state.dynamic.lock().insert("be".into(), vec![added]);
        state.refresh(&W);
        state
    }

    /// Feeds updates as discovery does: a patch for single changes, a rebuild after a reset.
    fn feed(state: &State, updates: Vec<Update>) {
        match state.discovered.apply("be", updates) {
            Changed::Nothing => {}
            Changed::All => drop(state.refresh(&W)),
            Changed::Servers(uids) => drop(state.patch_discovered(&W, "be", &uids)),
        }
    }

    /// What a user sees of a backend: each server's sid, name, address, uid and state.
    type Row = (
        u32,
        String,
        SocketAddr,
        Option<String>,
        crate::server::AdminState,
    );

    fn rows(b: &Backend) -> Vec<Row> {
        b.servers
            .iter()
            .map(|s| {
                let c = s.config();
                let sid = s.sid.load(Relaxed);
                (sid, c.name.clone(), c.addr, c.uid.clone(), s.admin_state())
            })
            .collect()
    }

    /// A small deterministic generator (xorshift), so that a failure replays.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    fn random_update(rng: &mut Rng) -> Update {
        let k = rng.below(30);
        let uid = format!("uid-{k:02}");
        if rng.below(3) == 0 {
            return Update::Remove(uid);
        }
        // Now and then a pod keeps its uid but changes its name or address.
        Update::Upsert(Discovered {
            name: format!("pod-{k}-{}", rng.below(8) / 7),
            uid,
            addr: SocketAddr::from(([10, 0, 0, k as u8], 15002 + (rng.below(8) / 7) as u16)),
            draining: rng.below(4) == 0,
        })
    }

    /// Patching the snapshot for each change must give what rebuilding it gives: the same
    /// servers in the same order with the same sids and states, the same `Arc`s where a rebuild
    /// keeps them, the same picks, and the untouched backend shared.
    #[test]
    fn a_patched_snapshot_is_the_rebuilt_one() {
        for balance in ["roundrobin", "leastconn", "source"] {
            let (patched, rebuilt) = (state(balance), state(balance));
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            for step in 0..300 {
                let updates: Vec<Update> = (0..1 + rng.below(3))
                    .map(|_| random_update(&mut rng))
                    .collect();
                let other_before = patched.snapshot().backends[1].clone();
                feed(&patched, updates.clone());
                if rebuilt.discovered.apply("be", updates) != Changed::Nothing {
                    rebuilt.refresh(&W);
                }
                let (p, r) = (patched.snapshot(), rebuilt.snapshot());
                let (pb, rb) = (&p.backends[0], &r.backends[0]);
                assert_eq!(rows(pb), rows(rb), "{balance}, step {step}");
                assert_eq!(pb.discovered, rb.discovered, "{balance}, step {step}");
                assert!(Arc::ptr_eq(&p.backends[1], &other_before));
                for (i, s) in pb.servers.iter().enumerate() {
                    assert!(Arc::ptr_eq(pb.server(s.id).unwrap(), s), "{i}");
                }
                // The same picks: a source hash exactly; round robin and least connections
                // (whose order carries the picks before) reach the same servers.
                let picks = |b: &Backend| {
                    let mut out = Vec::new();
                    for k in 0..2 * b.servers.len() as u32 + 2 {
                        let n = if balance == "source" { k } else { 0 };
                        let client = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n * 7919));
                        let s = b.balancer.pick(&b.servers, client, &[], Pool::Active);
                        out.push(s.map(|s| s.name.to_string()));
                    }
                    if balance != "source" {
                        out.sort();
                        out.dedup();
                    }
                    out
                };
                assert_eq!(picks(pb), picks(rb), "{balance}, step {step}");
                if step % 7 == 0 {
                    // A rebuild of the patched snapshot keeps every server as it is.
                    let before: Vec<ServerId> = pb.servers.iter().map(|s| s.id).collect();
                    let (_, again) = patched.refresh(&W);
                    let after: Vec<ServerId> =
                        again.backends[0].servers.iter().map(|s| s.id).collect();
                    assert_eq!(before, after, "{balance}, step {step}");
                }
            }
        }
    }

    /// A pod removed and added again with the same name and address is a new server (its
    /// uid is new); one removed while serving clients stays, leaving, until they finish.
    #[test]
    fn a_pod_back_under_its_old_name_is_a_new_server_and_a_busy_one_leaves() {
        let state = state("roundrobin");
        let pod = |uid: &str| Discovered {
            name: "pod".into(),
            uid: uid.into(),
            addr: "10.0.0.1:15002".parse().unwrap(),
            draining: false,
        };
        feed(&state, vec![Update::Upsert(pod("u1"))]);
        let first = state.snapshot().backends[0]
            .server_by_name("pod")
            .unwrap()
            .clone();
        first.connection_started();
        feed(&state, vec![Update::Remove("u1".into())]);
        let b = state.snapshot().backends[0].clone();
        assert!(b.server_by_name("pod").is_none());
        assert!(Arc::ptr_eq(&b.leaving[0], &first));
        feed(&state, vec![Update::Upsert(pod("u2"))]);
        let b = state.snapshot().backends[0].clone();
        let second = b.server_by_name("pod").unwrap();
        assert_ne!(second.id, first.id);
        assert_eq!(b.leaving.len(), 1);
        first.connection_ended();
        // The same name and uid again: the server it was, not a new one.
        feed(
            &state,
            vec![Update::Upsert(Discovered {
                draining: true,
                ..pod("u2")
            })],
        );
        let b = state.snapshot().backends[0].clone();
        assert_eq!(b.server_by_name("pod").unwrap().id, second.id);
        assert_eq!(
            b.server_by_name("pod").unwrap().admin_state(),
            crate::server::AdminState::Drain
        );
    }
}
