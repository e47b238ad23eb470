//! Reads the running state into a [`Snapshot`]: the one place that loads counters, health and
//! admin state for reporting. Each value is loaded once per snapshot, so a backend's totals
//! are the sums of the very server values shown beside them.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::{
    BackendStats, BackendStatus, CheckStats, Counters, FrontendStats, InfoStats, LastRepin,
    ProxyMode, ServerStats, ServerStatus, Snapshot, StickStats,
};
use crate::Shared;
use crate::server::{AdminState, HealthCounter, Server};
use crate::state::{self, Backend};

impl Snapshot {
    /// Reads everything from one snapshot of the running state.
    pub fn take(shared: &Shared) -> Snapshot {
        let snap = shared.state.snapshot();
        let frontends = frontends(shared, &snap);
        let global_maxconn = global_maxconn(shared);
        let backends: Vec<BackendStats> = snap
            .backends
            .iter()
            .enumerate()
            .map(|(i, be)| backend(be, frontends.len() + i + 1, global_maxconn))
            .collect();
        let repins = backends.iter().map(|b| b.repins).sum();
        let info = info(shared, &snap, &frontends, repins);
        Snapshot {
            frontends,
            backends,
            info,
        }
    }
}

impl InfoStats {
    /// `show info` alone: the process facts, without reading every server and stick table.
    pub fn take(shared: &Shared) -> InfoStats {
        let snap = shared.state.snapshot();
        let repins = snap
            .backends
            .iter()
            .map(|b| b.repins.count.load(Relaxed))
            .sum();
        info(shared, &snap, &frontends(shared, &snap), repins)
    }
}

/// The global maxconn in force: the config's, or what `set maxconn global` made it.
fn global_maxconn(shared: &Shared) -> u64 {
    shared.control.global_maxconn.load(Relaxed) as u64
}

fn frontends(shared: &Shared, snap: &state::Snapshot) -> Vec<FrontendStats> {
    let global_maxconn = global_maxconn(shared);
    snap.frontends
        .iter()
        .enumerate()
        .map(|(i, fe)| frontend(shared, fe, i + 1, global_maxconn))
        .collect()
}

fn frontend(
    shared: &Shared,
    fe: &state::Frontend,
    proxy_id: usize,
    global_maxconn: u64,
) -> FrontendStats {
    let c = shared.state.frontend_counters(&fe.config.name);
    FrontendStats {
        name: fe.config.name.clone(),
        proxy_id,
        mode: if fe.config.grpc.is_some() {
            ProxyMode::Http
        } else {
            ProxyMode::Tcp
        },
        scur: c.cur.load(Relaxed),
        smax: c.max.load(Relaxed),
        slim: shared
            .state
            .frontend_maxconn(&fe.config)
            .map_or(global_maxconn, |m| m as u64),
        stot: c.total.load(Relaxed),
        bytes_in: c.bytes_in.load(Relaxed),
        bytes_out: c.bytes_out.load(Relaxed),
        denied: c.denied.load(Relaxed),
        rate: c.rate.read(),
        rate_max: c.rate.max(),
        stopped: shared.data.listeners.is_stopped(&fe.config.name),
    }
}

fn backend(be: &Backend, proxy_id: usize, global_maxconn: u64) -> BackendStats {
    let pins = be
        .stick
        .as_ref()
        .map(|t| t.count_by_server())
        .unwrap_or_default();
    let servers: Vec<ServerStats> = be
        .servers
        .iter()
        .chain(be.leaving.iter())
        .map(|s| {
            let leaving = be.leaving.iter().any(|l| l.id == s.id);
            server(s, leaving, pins.get(&s.id).copied().unwrap_or(0))
        })
        .collect();
    let mut totals = Counters::default();
    for s in &servers {
        totals += s.counters;
    }
    let usable = |backup: bool| {
        servers
            .iter()
            .filter(move |s| s.backup == backup && s.usable())
    };
    let (active, backups) = (usable(false).count(), usable(true).count());
    let last_repin = be.repins.last.lock().as_ref().map(|last| {
        let name = |id| be.server(id).map(|s| s.name.to_string());
        LastRepin {
            client: last.client,
            from: name(last.from),
            to: name(last.to),
            ago: last.at.elapsed().unwrap_or_default(),
        }
    });
    BackendStats {
        name: be.config.name.clone(),
        proxy_id,
        balance: be.config.balance,
        status: if active + backups == 0 {
            BackendStatus::Down
        } else {
            BackendStatus::Up
        },
        active,
        backups,
        weight: usable(false).map(|s| u64::from(s.weight)).sum(),
        totals,
        servers,
        slim: global_maxconn,
        stick: be.stick.as_ref().map(|t| StickStats {
            used: t.len(),
            size: t.size(),
            expire: t.expire(),
        }),
        repins: be.repins.count.load(Relaxed),
        last_repin,
    }
}

fn server(s: &Server, leaving: bool, pinned: usize) -> ServerStats {
    let c = &s.counters;
    let cfg = s.config();
    let check = s.health.enabled().then(|| {
        let last = s.health.last();
        CheckStats {
            status: last.status,
            duration: last.duration_ms.map(Duration::from_millis),
            desc: last.desc,
            rise: cfg.check.rise,
            fall: cfg.check.fall,
        }
    });
    ServerStats {
        name: s.name.to_string(),
        sid: s.sid.load(Relaxed),
        addr: s.addr(),
        status: status(s, leaving),
        admin: s.admin_state(),
        up: s.health.is_up(),
        backup: cfg.backup,
        leaving,
        weight: s.weight(),
        maxconn: Some(s.maxconn()).filter(|&m| m > 0),
        counters: Counters {
            qcur: c.queue_cur.load(Relaxed),
            qmax: c.queue_max.load(Relaxed),
            scur: c.cur.load(Relaxed),
            smax: c.max.load(Relaxed),
            stot: c.total.load(Relaxed),
            lbtot: c.lbtot.load(Relaxed),
            bytes_in: c.bytes_in.load(Relaxed),
            bytes_out: c.bytes_out.load(Relaxed),
            econ: c.conn_errors.load(Relaxed),
            eresp: c.resp_errors.load(Relaxed),
            wretr: c.retries.load(Relaxed),
            wredis: c.redispatches.load(Relaxed),
            chkfail: c.check_failures.load(Relaxed),
            chkdown: c.check_downs.load(Relaxed),
            rate: c.rate.read(),
            rate_max: c.rate.max(),
            qtime: c.qtime.average(),
            ctime: c.ctime.average(),
            ttime: c.ttime.average(),
            qtime_max: c.qtime.max(),
            ctime_max: c.ctime.max(),
            ttime_max: c.ttime.max(),
        },
        last_change: s.since_last_change(),
        downtime: s.downtime(),
        check,
        spark_version: s.health.spark_version.lock().clone(),
        pinned,
    }
}

/// What [`Server::status`] words, as a value: the operator's state first, then health.
fn status(s: &Server, leaving: bool) -> ServerStatus {
    if leaving {
        return ServerStatus::Removed;
    }
    match s.admin_state() {
        AdminState::Maint => ServerStatus::Maint,
        AdminState::Drain if s.health.is_up() => ServerStatus::Drain,
        _ if s.health.is_up() && s.health.stopping() => ServerStatus::Nolb,
        _ if !s.health.enabled() => ServerStatus::NoCheck,
        _ => health_status(s.health.counter()),
    }
}

/// HAProxy's reading of the rise/fall counter (what [`crate::server::Health::describe`] says).
fn health_status(h: HealthCounter) -> ServerStatus {
    let top = h.rise + h.fall - 1;
    if h.value >= h.rise {
        if h.value == top {
            ServerStatus::Up
        } else {
            ServerStatus::GoingDown {
                left: h.value - h.rise + 1,
                fall: h.fall,
            }
        }
    } else if h.value == 0 {
        ServerStatus::Down
    } else {
        ServerStatus::GoingUp {
            passed: h.value,
            rise: h.rise,
        }
    }
}

fn info(
    shared: &Shared,
    snap: &state::Snapshot,
    frontends: &[FrontendStats],
    repins: u64,
) -> InfoStats {
    let ulimit_n = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0);
    let (max_pipes, live_pipes, pipes_free) = crate::pipe::counts();
    let runtimes = || {
        shared
            .data
            .workers
            .iter()
            .cloned()
            .chain(tokio::runtime::Handle::try_current().ok())
    };
    let nbthread = shared.data.workers.len().max(1);
    InfoStats {
        version: env!("CARGO_PKG_VERSION"),
        pid: std::process::id(),
        nbthread,
        node: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default(),
        hard_maxconn: shared.data.fd_cap as u64,
        max_pipes: max_pipes as u64,
        pipes_used: live_pipes.saturating_sub(pipes_free) as u64,
        pipes_free: pipes_free as u64,
        conn_rate: crate::rate::PROCESS_CONNS.read(),
        max_conn_rate: crate::rate::PROCESS_CONNS.max(),
        tasks: runtimes()
            .map(|h| h.metrics().num_alive_tasks() as u64)
            .sum(),
        run_queue: runtimes()
            .map(|h| h.metrics().global_queue_depth() as u64)
            .sum(),
        idle_pct: idle_pct(nbthread),
        bytes_out: frontends.iter().map(|f| f.bytes_out).sum(),
        started: shared.life.started,
        uptime: shared.life.started.elapsed().unwrap_or_default(),
        ulimit_n,
        maxconn: global_maxconn(shared),
        curr_conns: frontends.iter().map(|f| f.scur).sum(),
        cum_conns: frontends.iter().map(|f| f.stot).sum(),
        stopping: shared.life.stop_accepting.is_cancelled(),
        listeners: snap.frontends.iter().map(|f| f.config.binds.len()).sum(),
        config_file: snap.config.source.clone(),
        reloads: shared.reloads.ok.load(Relaxed),
        reload_failures: shared.reloads.failed.load(Relaxed),
        last_reload_error: shared.reloads.last_error.lock().clone(),
        log_dropped: crate::access_log::dropped(),
        repins,
        discovery: shared.state.discovered.statuses(),
    }
}

/// Percent of the time since the last call (or since start) that the process's threads were
/// not on a CPU: 100 minus the CPU time used over the wall time of `threads` threads.
fn idle_pct(threads: usize) -> u64 {
    use std::time::Instant;
    static LAST: parking_lot::Mutex<Option<(Instant, Duration)>> = parking_lot::Mutex::new(None);
    let cpu = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                Duration::new(tv.tv_sec() as u64, tv.tv_usec() as u32 * 1000)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or_default();
    let now = Instant::now();
    let mut last = LAST.lock();
    let (then, cpu_then) = last.unwrap_or((now - Duration::from_secs(1), Duration::ZERO));
    // Keep the reference at least a second old, so that quick successive reads stay smooth.
    if now.duration_since(then) >= Duration::from_secs(1) || last.is_none() {
        *last = Some((now, cpu));
    }
    let wall = now.duration_since(then).as_secs_f64() * threads as f64;
    if wall <= 0.0 {
        return 100;
    }
    let busy = (cpu.saturating_sub(cpu_then)).as_secs_f64() / wall;
    (100.0 - (busy * 100.0).min(100.0)).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckConfig, CheckType, ServerConfig};
    use crate::server::{CheckStatus, ForcedHealth, LastCheck, ServerId, Writer};

    const W: Writer = Writer::FOR_TESTS;

    fn server(check: CheckType) -> Server {
        let config = ServerConfig {
            name: "s1".into(),
            uid: None,
            addr_text: "127.0.0.1:1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
            maxconn: None,
            backup: false,
            check: CheckConfig {
                kind: check,
                rise: 2,
                fall: 3,
                ..CheckConfig::default()
            },
        };
        Server::new(ServerId(1), "be", 1, config)
    }

    fn check(s: &Server, ok: bool) {
        s.health.record(
            &W,
            LastCheck {
                status: if ok {
                    CheckStatus::L4Ok
                } else {
                    CheckStatus::L4Con
                },
                duration_ms: Some(1),
                desc: String::new(),
            },
        );
    }

    /// One read of a running sclb: ids in HAProxy's order, a backend's totals and status from
    /// its servers, pins per server, and `show info` alone agreeing with the full snapshot.
    #[tokio::test]
    async fn a_snapshot_reads_the_running_state() {
        let toml = r#"
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"
[[backend]]
name = "be"
stick = { on = "src", expire = "1h" }
check = { type = "none" }
servers = [
  { name = "s1", addr = "127.0.0.1:1", maxconn = 7 },
  { name = "s2", addr = "127.0.0.1:2", backup = true },
]
"#;
        let config = crate::config::parse(std::path::Path::new("test.toml"), toml).unwrap();
        let sclb = crate::Sclb::start(config).await.unwrap();
        let be = sclb.state().snapshot().backends[0].clone();
        be.servers[0].counters.connection_started();
        be.servers[1].counters.connection_started();
        be.servers[1].counters.connection_started();
        be.stick
            .as_ref()
            .unwrap()
            .pin("192.0.2.1".parse().unwrap(), be.servers[1].id);
        let maint = crate::control::Operator::SetState {
            server: be.servers[0].clone(),
            state: AdminState::Maint,
        };
        crate::control::apply(sclb.shared(), crate::control::Change::Operator(maint)).unwrap();

        let snap = Snapshot::take(sclb.shared());
        assert_eq!(snap.frontends[0].name, "fe");
        assert_eq!(snap.frontends[0].proxy_id, 1);
        let b = &snap.backends[0];
        assert_eq!((b.name.as_str(), b.proxy_id), ("be", 2));
        let names: Vec<_> = b.servers.iter().map(|s| (s.name.as_str(), s.sid)).collect();
        assert_eq!(names, [("s1", 1), ("s2", 2)]);
        let (s1, s2) = (&b.servers[0], &b.servers[1]);
        assert_eq!((s1.status, s1.maxconn), (ServerStatus::Maint, Some(7)));
        assert_eq!((s2.status, s2.maxconn), (ServerStatus::NoCheck, None));
        assert_eq!((s1.counters.stot, s2.counters.stot), (1, 2));
        assert_eq!((s1.pinned, s2.pinned), (0, 1));
        assert_eq!(b.totals.stot, 3);
        assert_eq!(b.totals.scur, 3);
        // s1 is in MAINT: only the backup serves.
        assert_eq!((b.active, b.backups, b.weight), (0, 1, 0));
        assert_eq!(b.status, BackendStatus::Up);
        assert_eq!(b.stick.map(|t| t.used), Some(1));

        let info = InfoStats::take(sclb.shared());
        assert_eq!(info.config_file, snap.info.config_file);
        assert_eq!(info.listeners, 1);
        assert_eq!(
            (info.curr_conns, info.cum_conns, info.repins),
            (snap.info.curr_conns, snap.info.cum_conns, snap.info.repins)
        );
        sclb.shutdown(Duration::ZERO).await;
    }

    /// The typed status and the words `Server::status` uses in logs and errors stay one.
    #[test]
    fn typed_status_says_what_server_status_says() {
        let s = server(CheckType::Tcp);
        let mut seen = Vec::new();
        let mut compare = |s: &Server| {
            let typed = status(s, false);
            assert_eq!(typed.to_string(), s.status(), "{typed:?}");
            seen.push(typed);
        };
        for ok in [false, false, false, true, true, false] {
            check(&s, ok);
            compare(&s);
        }
        s.set_operator_state(&W, AdminState::Drain);
        compare(&s);
        check(&s, true);
        check(&s, true);
        compare(&s);
        s.set_operator_state(&W, AdminState::Maint);
        compare(&s);
        s.set_operator_state(&W, AdminState::Drain);
        for _ in 0..3 {
            check(&s, false);
            compare(&s);
        }
        s.set_operator_state(&W, AdminState::Ready);
        compare(&s);
        s.health.force(&W, ForcedHealth::Stopping);
        compare(&s);
        compare(&server(CheckType::None));
        for want in [
            ServerStatus::Up,
            ServerStatus::GoingDown { left: 2, fall: 3 },
            ServerStatus::Down,
            ServerStatus::GoingUp { passed: 1, rise: 2 },
            ServerStatus::Drain,
            ServerStatus::Maint,
            ServerStatus::Nolb,
            ServerStatus::NoCheck,
        ] {
            assert!(seen.contains(&want), "{want:?} not covered: {seen:?}");
        }
        assert_eq!(status(&s, true).to_string(), "DRAIN (removed)");
    }
}
