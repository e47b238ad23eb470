//! A hand-made [`Snapshot`] for renderer tests: every counter a different number, so a value
//! that lands in the wrong column or metric is seen.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::{
    BackendStats, BackendStatus, CheckStats, Counters, FrontendStats, InfoStats, LastRepin,
    ProxyMode, ServerStats, ServerStatus, Snapshot, StickStats,
};
use crate::config::Balance;
use crate::discovery::SourceStatus;
use crate::server::{AdminState, CheckStatus};

/// Counters numbered from `base`: `qcur = base + 1`, `qmax = base + 2`, ...
pub fn counters(base: u64) -> Counters {
    Counters {
        qcur: base + 1,
        qmax: base + 2,
        scur: base + 3,
        smax: base + 4,
        stot: base + 5,
        lbtot: base + 6,
        bytes_in: base + 7,
        bytes_out: base + 8,
        econ: base + 9,
        eresp: base + 10,
        wretr: base + 11,
        wredis: base + 12,
        chkfail: base + 13,
        chkdown: base + 14,
        rate: base + 15,
        rate_max: base + 16,
        qtime: base + 17,
        ctime: base + 18,
        ttime: base + 19,
        qtime_max: base + 20,
        ctime_max: base + 21,
        ttime_max: base + 22,
    }
}

/// A server with checks on, counters from `base`.
pub fn server(name: &str, sid: u32, base: u64) -> ServerStats {
    ServerStats {
        name: name.into(),
        sid,
        addr: format!("10.0.0.{sid}:15002").parse().unwrap(),
        status: ServerStatus::Up,
        admin: AdminState::Ready,
        up: true,
        backup: false,
        leaving: false,
        weight: 40 + sid,
        maxconn: None,
        counters: counters(base),
        last_change: Duration::from_secs(50 + u64::from(sid)),
        downtime: Duration::from_secs(80 + u64::from(sid)),
        check: Some(CheckStats {
            status: CheckStatus::L7Ok,
            duration: Some(Duration::from_millis(60 + u64::from(sid))),
            desc: String::new(),
            rise: 2,
            fall: 3,
        }),
        spark_version: None,
        pinned: 70 + sid as usize,
    }
}

/// Frontend `fe` (id 1); backend `be` (id 2) with an UP `s1`, a DOWN `s2` with a connection
/// limit and a Spark version, and a MAINT backup `s3` without checks; backend `be2` (id 3)
/// with a DRAIN server and no stick table.
pub fn snapshot() -> Snapshot {
    let s1 = server("s1", 1, 100);
    let s2 = ServerStats {
        status: ServerStatus::Down,
        up: false,
        maxconn: Some(90),
        check: Some(CheckStats {
            status: CheckStatus::L4Con,
            duration: Some(Duration::from_millis(62)),
            desc: "Connection refused, twice\nagain".into(),
            rise: 2,
            fall: 3,
        }),
        spark_version: Some("3.5.1".into()),
        ..server("s2", 2, 200)
    };
    let s3 = ServerStats {
        status: ServerStatus::Maint,
        admin: AdminState::Maint,
        backup: true,
        check: None,
        ..server("s3", 3, 300)
    };
    let mut totals = Counters::default();
    for s in [&s1, &s2, &s3] {
        totals += s.counters;
    }
    let be = BackendStats {
        name: "be".into(),
        proxy_id: 2,
        balance: Balance::RoundRobin,
        servers: vec![s1, s2, s3],
        totals,
        status: BackendStatus::Up,
        active: 1,
        backups: 0,
        weight: 41,
        slim: 1000,
        stick: Some(StickStats {
            used: 95,
            size: 96,
            expire: Duration::from_secs(7200),
        }),
        repins: 97,
        last_repin: Some(LastRepin {
            client: "192.0.2.7".parse().unwrap(),
            from: None,
            to: Some("s1".into()),
            ago: Duration::from_secs(98),
        }),
    };
    let d1 = ServerStats {
        status: ServerStatus::Drain,
        admin: AdminState::Drain,
        ..server("d1", 1, 400)
    };
    let be2 = BackendStats {
        name: "be2".into(),
        proxy_id: 3,
        balance: Balance::LeastConn,
        totals: d1.counters,
        servers: vec![d1],
        status: BackendStatus::Up,
        active: 1,
        backups: 0,
        weight: 41,
        slim: 1000,
        stick: None,
        repins: 0,
        last_repin: None,
    };
    let fe = FrontendStats {
        name: "fe".into(),
        proxy_id: 1,
        mode: ProxyMode::Tcp,
        scur: 11,
        smax: 12,
        slim: 13,
        stot: 14,
        bytes_in: 15,
        bytes_out: 16,
        denied: 17,
        rate: 18,
        rate_max: 19,
        stopped: false,
    };
    let discovery = BTreeMap::from([(
        "be2".to_string(),
        SourceStatus {
            source: "kubernetes pods in namespace spark, port 15002".into(),
            state: "watching".into(),
            servers: 1,
            errors: 3,
            ..SourceStatus::default()
        },
    )]);
    Snapshot {
        frontends: vec![fe],
        backends: vec![be, be2],
        info: InfoStats {
            version: "0.1.0",
            pid: 4242,
            nbthread: 2,
            node: "lb1".into(),
            hard_maxconn: 9000,
            max_pipes: 256,
            pipes_used: 3,
            pipes_free: 4,
            conn_rate: 5,
            max_conn_rate: 6,
            tasks: 7,
            run_queue: 8,
            idle_pct: 99,
            bytes_out: 16,
            started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            uptime: Duration::from_secs(90061),
            ulimit_n: 20000,
            maxconn: 1000,
            curr_conns: 11,
            cum_conns: 14,
            stopping: false,
            listeners: 1,
            config_file: "/etc/sclb/sclb.toml".into(),
            reloads: 21,
            reload_failures: 22,
            last_reload_error: None,
            log_dropped: 23,
            repins: 97,
            discovery,
        },
    }
}
