//! Prometheus `/metrics`: a [`stats::Snapshot`]'s typed fields as metric families named as
//! HAProxy's own exporter (promex) names them, with the `sclb_` prefix — or, with
//! `stats.metric_names = "haproxy"` (or `?names=haproxy`), promex's exact `haproxy_*` names for
//! every family promex has, so that HAProxy dashboards and alerts work unchanged; sclb's own
//! families keep `sclb_`. Then the gateway's `spark_connect_*` metrics.
//!
//! Served in Prometheus' text format 0.0.4 by default, where a counter's `# TYPE` line names
//! the very `<name>_total` it is sampled as (so that Prometheus' parsers type it counter), or
//! in OpenMetrics 1.0 when the scraper asks for it (`Accept: application/openmetrics-text`).

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType::{self, Counter, Gauge};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::config::MetricNames;
use crate::discovery::SourceStatus;
use crate::server::{AdminState, CheckStatus};
use crate::stats::columns::one_line;
use crate::stats::{self, BackendStats, FrontendStats, ServerStats, ServerStatus};

/// The `/metrics` body in OpenMetrics 1.0: sclb's families from `stats`, then `gateway`'s
/// and `extra` (the session store's when shared, authentication's), then `# EOF`.
pub fn encode_openmetrics(
    stats: stats::Snapshot,
    names: MetricNames,
    gateway: &Registry,
    extra: &[&Registry],
) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collector { stats, names }));
    let mut body = String::new();
    prometheus_client::encoding::text::encode_registry(&mut body, &registry)?;
    prometheus_client::encoding::text::encode_registry(&mut body, gateway)?;
    for r in extra {
        prometheus_client::encoding::text::encode_registry(&mut body, r)?;
    }
    prometheus_client::encoding::text::encode_eof(&mut body)?;
    Ok(body)
}

/// The `/metrics` body in Prometheus' text format 0.0.4.
pub fn encode(
    stats: stats::Snapshot,
    names: MetricNames,
    gateway: &Registry,
    extra: &[&Registry],
) -> Result<String, fmt::Error> {
    Ok(to_text_004(&encode_openmetrics(
        stats, names, gateway, extra,
    )?))
}

/// OpenMetrics to Prometheus text 0.0.4: a counter family `x` sampled as `x_total` is declared
/// as `x_total` (0.0.4 has no suffix rule: a `# TYPE x counter` line would leave every
/// `x_total` sample untyped); `info` becomes a gauge `x_info`, `unknown` `untyped`; `# UNIT`
/// and `# EOF` go.
pub fn to_text_004(om: &str) -> String {
    let mut renamed: BTreeMap<&str, (String, &str)> = BTreeMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            let to = match kind {
                "counter" => Some((format!("{name}_total"), "counter")),
                "info" => Some((format!("{name}_info"), "gauge")),
                "unknown" => Some((name.to_string(), "untyped")),
                _ => None,
            };
            if let Some(to) = to {
                renamed.insert(name, to);
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (new, kind) = renamed.get(name)?;
            Some(if *p == "# TYPE " {
                format!("{p}{new} {kind}")
            } else {
                format!("{p}{new} {tail}")
            })
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[derive(Debug)]
struct Collector {
    stats: stats::Snapshot,
    names: MetricNames,
}

type Labels = Vec<(String, String)>;

/// A sample's value: counts print as integers, seconds as decimals.
#[derive(Debug, Clone, Copy, PartialEq)]
enum V {
    Int(u64),
    Secs(f64),
}

impl From<u64> for V {
    fn from(v: u64) -> V {
        V::Int(v)
    }
}

/// Whose name a family takes under `metric_names = "haproxy"`: promex's (`haproxy_`), or
/// sclb's own (`sclb_` always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Promex,
    Sclb,
}
use Origin::{Promex, Sclb};

struct Enc<'a, 'b> {
    enc: &'a mut DescriptorEncoder<'b>,
    names: MetricNames,
}

impl Enc<'_, '_> {
    /// One family. `name` is promex's without its prefix (and without `_total`, which the
    /// encoder adds to a counter's samples).
    fn family(
        &mut self,
        origin: Origin,
        name: &str,
        help: &str,
        kind: MetricType,
        series: &[(Labels, V)],
    ) -> Result<(), fmt::Error> {
        let prefix = match (origin, self.names) {
            (Promex, MetricNames::Haproxy) => "haproxy",
            _ => "sclb",
        };
        let full = format!("{prefix}_{name}");
        let mut m = self.enc.encode_descriptor(&full, help, None, kind)?;
        if let [(labels, v)] = series
            && labels.is_empty()
        {
            // No labels: `name 3`, not `name{} 3`.
            return sample(kind, *v, m);
        }
        for (labels, v) in series {
            sample(kind, *v, m.encode_family(labels)?)?;
        }
        Ok(())
    }
}

fn sample(
    kind: MetricType,
    v: V,
    m: prometheus_client::encoding::MetricEncoder,
) -> Result<(), fmt::Error> {
    match (kind, v) {
        (Counter, V::Int(v)) => ConstCounter::new(v).encode(m),
        (Counter, V::Secs(v)) => ConstCounter::new(v).encode(m),
        (_, V::Int(v)) => ConstGauge::new(v as i64).encode(m),
        (_, V::Secs(v)) => ConstGauge::new(v).encode(m),
    }
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ms(v: u64) -> V {
    V::Secs(v as f64 / 1000.0)
}

/// A family read off one field of every server, backend or frontend.
type Field<T> = (Origin, &'static str, &'static str, MetricType, fn(&T) -> V);

/// Per server: `{proxy, server}`.
const SERVER_FIELDS: [Field<ServerStats>; 27] = [
    (
        Promex,
        "server_current_sessions",
        "Current connections to the server.",
        Gauge,
        |s| s.counters.scur.into(),
    ),
    (
        Promex,
        "server_max_sessions",
        "Most connections to the server at once.",
        Gauge,
        |s| s.counters.smax.into(),
    ),
    (
        Promex,
        "server_limit_sessions",
        "The server's maxconn (0: none).",
        Gauge,
        |s| s.maxconn.unwrap_or(0).into(),
    ),
    (
        Promex,
        "server_sessions",
        "Connections sent to the server.",
        Counter,
        |s| s.counters.stot.into(),
    ),
    (
        Promex,
        "server_current_session_rate",
        "Connections sent to the server over the last second.",
        Gauge,
        |s| s.counters.rate.into(),
    ),
    (
        Promex,
        "server_max_session_rate",
        "Highest connection rate to the server.",
        Gauge,
        |s| s.counters.rate_max.into(),
    ),
    (
        Promex,
        "server_loadbalanced",
        "Times the balancer chose the server.",
        Counter,
        |s| s.counters.lbtot.into(),
    ),
    (
        Promex,
        "server_bytes_in",
        "Bytes from clients to the server.",
        Counter,
        |s| s.counters.bytes_in.into(),
    ),
    (
        Promex,
        "server_bytes_out",
        "Bytes from the server to clients.",
        Counter,
        |s| s.counters.bytes_out.into(),
    ),
    (
        Promex,
        "server_connection_errors",
        "Failed connection attempts to the server.",
        Counter,
        |s| s.counters.econ.into(),
    ),
    (
        Promex,
        "server_response_errors",
        "Connections that died on a server error.",
        Counter,
        |s| s.counters.eresp.into(),
    ),
    (
        Promex,
        "server_retry_warnings",
        "Retried connection attempts.",
        Counter,
        |s| s.counters.wretr.into(),
    ),
    (
        Promex,
        "server_redispatch_warnings",
        "Connections moved to another server after failing here.",
        Counter,
        |s| s.counters.wredis.into(),
    ),
    (
        Promex,
        "server_check_failures",
        "Failed health checks.",
        Counter,
        |s| s.counters.chkfail.into(),
    ),
    (
        Promex,
        "server_check_up_down",
        "UP to DOWN transitions.",
        Counter,
        |s| s.counters.chkdown.into(),
    ),
    (
        Promex,
        "server_downtime_seconds",
        "Time the server spent DOWN or in MAINT.",
        Counter,
        |s| s.downtime.as_secs().into(),
    ),
    (
        Promex,
        "server_current_queue",
        "Clients waiting for a slot on the server.",
        Gauge,
        |s| s.counters.qcur.into(),
    ),
    (
        Promex,
        "server_max_queue",
        "Most clients waiting for a slot at once.",
        Gauge,
        |s| s.counters.qmax.into(),
    ),
    (
        Promex,
        "server_weight",
        "Current weight of the server.",
        Gauge,
        |s| u64::from(s.weight).into(),
    ),
    (
        Promex,
        "server_check_last_change_seconds",
        "Seconds since the server last changed state.",
        Gauge,
        |s| s.last_change.as_secs().into(),
    ),
    (
        Promex,
        "server_queue_time_average_seconds",
        "Average queue wait of the last 1024 connections.",
        Gauge,
        |s| ms(s.counters.qtime),
    ),
    (
        Promex,
        "server_connect_time_average_seconds",
        "Average connect time of the last 1024 connections.",
        Gauge,
        |s| ms(s.counters.ctime),
    ),
    (
        Promex,
        "server_response_time_average_seconds",
        "Average response time (0 in TCP mode, as HAProxy).",
        Gauge,
        |_| V::Secs(0.0),
    ),
    (
        Promex,
        "server_total_time_average_seconds",
        "Average lifetime of the last 1024 connections.",
        Gauge,
        |s| ms(s.counters.ttime),
    ),
    (
        Promex,
        "server_max_queue_time_seconds",
        "Longest queue wait.",
        Gauge,
        |s| ms(s.counters.qtime_max),
    ),
    (
        Promex,
        "server_max_connect_time_seconds",
        "Longest connect time.",
        Gauge,
        |s| ms(s.counters.ctime_max),
    ),
    (
        Promex,
        "server_max_total_time_seconds",
        "Longest connection.",
        Gauge,
        |s| ms(s.counters.ttime_max),
    ),
];

/// Per backend, after `backend_status`: `{proxy}`.
const BACKEND_FIELDS: [Field<BackendStats>; 25] = [
    (
        Promex,
        "backend_current_sessions",
        "Current connections of the backend.",
        Gauge,
        |b| b.totals.scur.into(),
    ),
    (
        Promex,
        "backend_max_sessions",
        "Most connections of the backend at once (sum of its servers').",
        Gauge,
        |b| b.totals.smax.into(),
    ),
    (
        Promex,
        "backend_limit_sessions",
        "The backend's connection limit (the global maxconn).",
        Gauge,
        |b| b.slim.into(),
    ),
    (
        Promex,
        "backend_active_servers",
        "Servers taking traffic.",
        Gauge,
        |b| (b.active as u64).into(),
    ),
    (
        Promex,
        "backend_backup_servers",
        "Backup servers that could take traffic.",
        Gauge,
        |b| (b.backups as u64).into(),
    ),
    (
        Promex,
        "backend_sessions",
        "Connections of the backend.",
        Counter,
        |b| b.totals.stot.into(),
    ),
    (
        Promex,
        "backend_current_session_rate",
        "Connections over the last second.",
        Gauge,
        |b| b.totals.rate.into(),
    ),
    (
        Promex,
        "backend_max_session_rate",
        "Highest connection rate of a server of the backend.",
        Gauge,
        |b| b.totals.rate_max.into(),
    ),
    (
        Promex,
        "backend_loadbalanced",
        "Times the balancer chose a server.",
        Counter,
        |b| b.totals.lbtot.into(),
    ),
    (
        Promex,
        "backend_bytes_in",
        "Bytes from clients to the backend's servers.",
        Counter,
        |b| b.totals.bytes_in.into(),
    ),
    (
        Promex,
        "backend_bytes_out",
        "Bytes from the backend's servers to clients.",
        Counter,
        |b| b.totals.bytes_out.into(),
    ),
    (
        Promex,
        "backend_connection_errors",
        "Failed connection attempts.",
        Counter,
        |b| b.totals.econ.into(),
    ),
    (
        Promex,
        "backend_response_errors",
        "Connections that died on a server error.",
        Counter,
        |b| b.totals.eresp.into(),
    ),
    (
        Promex,
        "backend_retry_warnings",
        "Retried connection attempts.",
        Counter,
        |b| b.totals.wretr.into(),
    ),
    (
        Promex,
        "backend_redispatch_warnings",
        "Connections moved to another server.",
        Counter,
        |b| b.totals.wredis.into(),
    ),
    (
        Promex,
        "backend_check_up_down",
        "UP to DOWN transitions of its servers.",
        Counter,
        |b| b.totals.chkdown.into(),
    ),
    (
        Promex,
        "backend_current_queue",
        "Clients waiting for a server slot.",
        Gauge,
        |b| b.totals.qcur.into(),
    ),
    (
        Promex,
        "backend_max_queue",
        "Most clients waiting at once (sum of its servers').",
        Gauge,
        |b| b.totals.qmax.into(),
    ),
    (
        Promex,
        "backend_weight",
        "Total weight of the servers taking traffic.",
        Gauge,
        |b| b.weight.into(),
    ),
    (
        Promex,
        "backend_queue_time_average_seconds",
        "Average queue wait of the last connections.",
        Gauge,
        |b| ms(b.totals.qtime),
    ),
    (
        Promex,
        "backend_connect_time_average_seconds",
        "Average connect time of the last connections.",
        Gauge,
        |b| ms(b.totals.ctime),
    ),
    (
        Promex,
        "backend_response_time_average_seconds",
        "Average response time (0 in TCP mode, as HAProxy).",
        Gauge,
        |_| V::Secs(0.0),
    ),
    (
        Promex,
        "backend_total_time_average_seconds",
        "Average lifetime of the last connections.",
        Gauge,
        |b| ms(b.totals.ttime),
    ),
    (
        Promex,
        "backend_max_total_time_seconds",
        "Longest connection.",
        Gauge,
        |b| ms(b.totals.ttime_max),
    ),
    (
        Sclb,
        "backend_repins",
        "Clients moved off a DOWN or MAINT server; each is a lost Spark session.",
        Counter,
        |b| b.repins.into(),
    ),
];

/// Per frontend, after `frontend_status`: `{proxy}`.
const FRONTEND_FIELDS: [Field<FrontendStats>; 10] = [
    (
        Promex,
        "frontend_current_sessions",
        "Current client connections.",
        Gauge,
        |f| f.scur.into(),
    ),
    (
        Promex,
        "frontend_max_sessions",
        "Most client connections at once.",
        Gauge,
        |f| f.smax.into(),
    ),
    (
        Promex,
        "frontend_limit_sessions",
        "The frontend's connection limit.",
        Gauge,
        |f| f.slim.into(),
    ),
    (
        Promex,
        "frontend_sessions",
        "Client connections accepted.",
        Counter,
        |f| f.stot.into(),
    ),
    (
        Promex,
        "frontend_connections",
        "Client connections accepted (conn_tot).",
        Counter,
        |f| f.stot.into(),
    ),
    (
        Promex,
        "frontend_current_session_rate",
        "Client connections over the last second.",
        Gauge,
        |f| f.rate.into(),
    ),
    (
        Promex,
        "frontend_max_session_rate",
        "Highest client connection rate.",
        Gauge,
        |f| f.rate_max.into(),
    ),
    (
        Promex,
        "frontend_bytes_in",
        "Bytes from clients.",
        Counter,
        |f| f.bytes_in.into(),
    ),
    (
        Promex,
        "frontend_bytes_out",
        "Bytes to clients.",
        Counter,
        |f| f.bytes_out.into(),
    ),
    (
        Sclb,
        "frontend_denied_connections",
        "Client connections closed because no server could take them.",
        Counter,
        |f| f.denied.into(),
    ),
];

/// `server_status`'s state, promex's five: the operator's MAINT first, then health, then
/// DRAIN, then NOLB (UP, forced stopping).
fn server_state(s: &ServerStats) -> &'static str {
    if s.admin == AdminState::Maint {
        "MAINT"
    } else if !s.up {
        "DOWN"
    } else if s.admin == AdminState::Drain {
        "DRAIN"
    } else if s.status == ServerStatus::Nolb {
        "NOLB"
    } else {
        "UP"
    }
}

/// Check results promex has a `check_status` state for (not "initializing", not "disabled").
const CHECK_STATES: [CheckStatus; 10] = [
    CheckStatus::L4Ok,
    CheckStatus::L4Tout,
    CheckStatus::L4Con,
    CheckStatus::L6Ok,
    CheckStatus::L6Tout,
    CheckStatus::L6Rsp,
    CheckStatus::L7Ok,
    CheckStatus::L7Tout,
    CheckStatus::L7Rsp,
    CheckStatus::L7Sts,
];

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut enc = enc;
        let mut e = Enc {
            enc: &mut enc,
            names: self.names,
        };
        let stats = &self.stats;
        process(&mut e, &stats.info)?;
        frontends(&mut e, stats)?;
        backends(&mut e, stats)?;
        servers(&mut e, stats)?;
        stick_tables(&mut e, stats)?;
        discovery(&mut e, &stats.info.discovery)?;
        sclb_process(&mut e, &stats.info)
    }
}

fn frontends(e: &mut Enc, stats: &stats::Snapshot) -> Result<(), fmt::Error> {
    let mut status = Vec::new();
    for f in &stats.frontends {
        for st in ["DOWN", "UP"] {
            let up = !f.stopped;
            status.push((
                l(&[("proxy", &f.name), ("state", st)]),
                u64::from(up == (st == "UP")).into(),
            ));
        }
    }
    e.family(
        Promex,
        "frontend_status",
        "Current status of the frontend, per state label value.",
        Gauge,
        &status,
    )?;
    for (origin, name, help, kind, field) in FRONTEND_FIELDS {
        let series: Vec<_> = stats
            .frontends
            .iter()
            .map(|f| (l(&[("proxy", &f.name)]), field(f)))
            .collect();
        e.family(origin, name, help, kind, &series)?;
    }
    Ok(())
}

fn servers(e: &mut Enc, stats: &stats::Snapshot) -> Result<(), fmt::Error> {
    let servers: Vec<(&BackendStats, &ServerStats)> = stats
        .backends
        .iter()
        .flat_map(|b| b.servers.iter().map(move |s| (b, s)))
        .collect();
    let mut status = Vec::new();
    for (b, s) in &servers {
        let state = server_state(s);
        for st in ["DOWN", "UP", "MAINT", "DRAIN", "NOLB"] {
            let labels = l(&[("proxy", &b.name), ("server", &s.name), ("state", st)]);
            status.push((labels, u64::from(st == state).into()));
        }
    }
    e.family(
        Promex,
        "server_status",
        "Current status of the server, per state label value.",
        Gauge,
        &status,
    )?;
    let labels = |b: &BackendStats, s: &ServerStats| l(&[("proxy", &b.name), ("server", &s.name)]);
    for (origin, name, help, kind, field) in SERVER_FIELDS {
        let series: Vec<_> = servers
            .iter()
            .map(|(b, s)| (labels(b, s), field(s)))
            .collect();
        e.family(origin, name, help, kind, &series)?;
    }
    // Checks: only servers whose checks are on, as promex.
    let checked: Vec<_> = servers
        .iter()
        .filter_map(|(b, s)| s.check.as_ref().map(|c| (b, s, c)))
        .collect();
    let mut check_status = Vec::new();
    for (b, s, c) in &checked {
        for st in CHECK_STATES {
            let labels = l(&[
                ("proxy", &b.name),
                ("server", &s.name),
                ("state", st.code()),
            ]);
            check_status.push((labels, u64::from(c.status == st).into()));
        }
    }
    e.family(
        Promex,
        "server_check_status",
        "Status of last health check, per state label value.",
        Gauge,
        &check_status,
    )?;
    let durations: Vec<_> = checked
        .iter()
        .filter_map(|(b, s, c)| c.duration.map(|d| (labels(b, s), V::Secs(d.as_secs_f64()))))
        .collect();
    e.family(
        Promex,
        "server_check_duration_seconds",
        "Total duration of the latest server health check, in seconds.",
        Gauge,
        &durations,
    )?;
    let spark: Vec<_> = servers
        .iter()
        .filter_map(|(b, s)| {
            let v = s.spark_version.as_deref().filter(|v| !v.is_empty())?;
            let version = one_line(v);
            let labels = l(&[
                ("proxy", &b.name),
                ("server", &s.name),
                ("version", &version),
            ]);
            Some((labels, 1.into()))
        })
        .collect();
    e.family(
        Sclb,
        "server_spark_info",
        "Spark version the spark health check saw.",
        Gauge,
        &spark,
    )
}

fn backends(e: &mut Enc, stats: &stats::Snapshot) -> Result<(), fmt::Error> {
    let mut status = Vec::new();
    for b in &stats.backends {
        for st in ["DOWN", "UP"] {
            let labels = l(&[("proxy", &b.name), ("state", st)]);
            status.push((labels, u64::from(b.status.as_str() == st).into()));
        }
    }
    e.family(
        Promex,
        "backend_status",
        "Current status of the backend, per state label value.",
        Gauge,
        &status,
    )?;
    for (origin, name, help, kind, field) in BACKEND_FIELDS {
        let series: Vec<_> = stats
            .backends
            .iter()
            .map(|b| (l(&[("proxy", &b.name)]), field(b)))
            .collect();
        e.family(origin, name, help, kind, &series)?;
    }
    Ok(())
}

fn stick_tables(e: &mut Enc, stats: &stats::Snapshot) -> Result<(), fmt::Error> {
    let tables: Vec<_> = stats
        .backends
        .iter()
        .filter_map(|b| b.stick.map(|t| (l(&[("name", &b.name)]), t)))
        .collect();
    let series = |f: fn(&stats::StickStats) -> usize| -> Vec<(Labels, V)> {
        tables
            .iter()
            .map(|(labels, t)| (labels.clone(), (f(t) as u64).into()))
            .collect()
    };
    e.family(
        Promex,
        "sticktable_size",
        "Stick table size.",
        Gauge,
        &series(|t| t.size),
    )?;
    e.family(
        Promex,
        "sticktable_used",
        "Number of entries used in this stick table.",
        Gauge,
        &series(|t| t.used),
    )
}

/// `sclb_discovery_errors_total{proxy}` and `sclb_discovery_servers{proxy}`, for backends with
/// a discovery source.
fn discovery(e: &mut Enc, sources: &BTreeMap<String, SourceStatus>) -> Result<(), fmt::Error> {
    if sources.is_empty() {
        return Ok(());
    }
    let series = |f: fn(&SourceStatus) -> u64| -> Vec<(Labels, V)> {
        sources
            .iter()
            .map(|(b, st)| (l(&[("proxy", b)]), f(st).into()))
            .collect()
    };
    e.family(
        Sclb,
        "discovery_errors",
        "Faults of a backend's discovery source (watch errors, API server unreachable, RBAC).",
        Counter,
        &series(|st| st.errors),
    )?;
    e.family(
        Sclb,
        "discovery_servers",
        "Servers a backend's discovery source currently reports.",
        Gauge,
        &series(|st| st.servers as u64),
    )
}

/// promex's `process_*` families, from `show info`.
fn process(e: &mut Enc, info: &stats::InfoStats) -> Result<(), fmt::Error> {
    let one = |v: V| [(Labels::new(), v)];
    let start = info
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let jobs = info.curr_conns + info.listeners as u64;
    let fields: [(&str, &str, MetricType, V); 26] = [
        (
            "process_nbthread",
            "Number of started threads.",
            Gauge,
            (info.nbthread as u64).into(),
        ),
        (
            "process_nbproc",
            "Number of started worker processes (always 1).",
            Gauge,
            1.into(),
        ),
        (
            "process_relative_process_id",
            "Relative worker process number (1).",
            Gauge,
            1.into(),
        ),
        (
            "process_uptime_seconds",
            "How long ago this worker process was started (seconds).",
            Gauge,
            info.uptime.as_secs().into(),
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch.",
            Gauge,
            start.into(),
        ),
        (
            "process_max_fds",
            "Hard limit on the number of per-process file descriptors.",
            Gauge,
            info.ulimit_n.into(),
        ),
        (
            "process_max_sockets",
            "Hard limit on the number of per-process sockets.",
            Gauge,
            info.ulimit_n.into(),
        ),
        (
            "process_max_connections",
            "The global maxconn.",
            Gauge,
            info.maxconn.into(),
        ),
        (
            "process_hard_max_connections",
            "Most connections the file descriptor limit leaves room for.",
            Gauge,
            info.hard_maxconn.into(),
        ),
        (
            "process_current_connections",
            "Current client connections.",
            Gauge,
            info.curr_conns.into(),
        ),
        (
            "process_connections",
            "Client connections accepted since start.",
            Counter,
            info.cum_conns.into(),
        ),
        (
            "process_requests",
            "Client connections accepted since start (no HTTP requests in TCP mode).",
            Counter,
            info.cum_conns.into(),
        ),
        (
            "process_max_pipes",
            "Most splice pipes allowed.",
            Gauge,
            info.max_pipes.into(),
        ),
        (
            "process_pipes_used",
            "Splice pipes in use.",
            Counter,
            info.pipes_used.into(),
        ),
        (
            "process_pipes_free",
            "Splice pipes idle in the pools.",
            Counter,
            info.pipes_free.into(),
        ),
        (
            "process_current_connection_rate",
            "Client connections over the last second.",
            Gauge,
            info.conn_rate.into(),
        ),
        (
            "process_max_connection_rate",
            "Highest client connection rate.",
            Gauge,
            info.max_conn_rate.into(),
        ),
        (
            "process_current_session_rate",
            "Client sessions over the last second.",
            Gauge,
            info.conn_rate.into(),
        ),
        (
            "process_max_session_rate",
            "Highest client session rate.",
            Gauge,
            info.max_conn_rate.into(),
        ),
        (
            "process_current_tasks",
            "Tasks alive in the process's runtimes.",
            Gauge,
            info.tasks.into(),
        ),
        (
            "process_current_run_queue",
            "Tasks waiting in the runtimes' queues.",
            Gauge,
            info.run_queue.into(),
        ),
        (
            "process_idle_time_percent",
            "Percentage of the last second the threads were idle.",
            Gauge,
            info.idle_pct.into(),
        ),
        (
            "process_stopping",
            "1 while the process is stopping.",
            Gauge,
            u64::from(info.stopping).into(),
        ),
        (
            "process_jobs",
            "Client connections and listeners.",
            Gauge,
            jobs.into(),
        ),
        (
            "process_listeners",
            "Listening sockets.",
            Gauge,
            (info.listeners as u64).into(),
        ),
        (
            "process_dropped_logs",
            "Log lines dropped because the log writer could not keep up.",
            Counter,
            info.log_dropped.into(),
        ),
    ];
    for (name, help, kind, v) in fields {
        e.family(Promex, name, help, kind, &one(v))?;
    }
    e.family(
        Promex,
        "process_bytes_out",
        "Bytes sent to clients since start.",
        Counter,
        &one(info.bytes_out.into()),
    )?;
    e.family(
        Promex,
        "process_build_info",
        "Build info.",
        Gauge,
        &[(l(&[("version", info.version)]), 1.into())],
    )
}

/// sclb's own process families.
fn sclb_process(e: &mut Enc, info: &stats::InfoStats) -> Result<(), fmt::Error> {
    let one = |v: u64| [(Labels::new(), V::Int(v))];
    e.family(
        Sclb,
        "reloads",
        "Successful config reloads.",
        Counter,
        &one(info.reloads),
    )?;
    e.family(
        Sclb,
        "reload_failures",
        "Config reloads refused (bad file); the running config was kept.",
        Counter,
        &one(info.reload_failures),
    )?;
    e.family(
        Sclb,
        "log_dropped",
        "Log lines dropped because the log writer could not keep up.",
        Counter,
        &one(info.log_dropped),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::stats::{BackendStatus, sample};

    /// `name{labels}` → value, for every sample line of a `/metrics` body.
    fn parse(body: &str) -> BTreeMap<String, f64> {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, v) = l.rsplit_once(' ').unwrap();
                (series.to_string(), v.parse().unwrap())
            })
            .collect()
    }

    fn body(names: MetricNames) -> String {
        encode(sample::snapshot(), names, &Registry::default(), &[]).unwrap()
    }

    /// Samples are the typed snapshot's fields, under promex's names with `sclb_`.
    #[test]
    fn samples_are_the_typed_fields() {
        let snap = sample::snapshot();
        let got = parse(&body(MetricNames::Sclb));
        let get = |series: &str| {
            *got.get(series)
                .unwrap_or_else(|| panic!("no {series} in {got:#?}"))
        };
        let s2 = &snap.backends[0].servers[1];
        let l = "{proxy=\"be\",server=\"s2\"}";
        let n = &s2.counters;
        for (name, want) in [
            ("sclb_server_current_sessions", n.scur as f64),
            ("sclb_server_max_sessions", n.smax as f64),
            ("sclb_server_limit_sessions", 90.0),
            ("sclb_server_sessions_total", n.stot as f64),
            ("sclb_server_bytes_in_total", n.bytes_in as f64),
            ("sclb_server_bytes_out_total", n.bytes_out as f64),
            ("sclb_server_connection_errors_total", n.econ as f64),
            ("sclb_server_response_errors_total", n.eresp as f64),
            ("sclb_server_retry_warnings_total", n.wretr as f64),
            ("sclb_server_redispatch_warnings_total", n.wredis as f64),
            ("sclb_server_check_failures_total", n.chkfail as f64),
            ("sclb_server_check_up_down_total", n.chkdown as f64),
            ("sclb_server_loadbalanced_total", n.lbtot as f64),
            ("sclb_server_downtime_seconds_total", 82.0),
            ("sclb_server_current_queue", n.qcur as f64),
            ("sclb_server_max_queue", n.qmax as f64),
            ("sclb_server_weight", 42.0),
            ("sclb_server_check_last_change_seconds", 52.0),
            ("sclb_server_current_session_rate", n.rate as f64),
            ("sclb_server_max_session_rate", n.rate_max as f64),
            (
                "sclb_server_queue_time_average_seconds",
                n.qtime as f64 / 1000.0,
            ),
            (
                "sclb_server_connect_time_average_seconds",
                n.ctime as f64 / 1000.0,
            ),
            (
                "sclb_server_total_time_average_seconds",
                n.ttime as f64 / 1000.0,
            ),
            (
                "sclb_server_max_total_time_seconds",
                n.ttime_max as f64 / 1000.0,
            ),
            ("sclb_server_check_duration_seconds", 0.062),
        ] {
            assert_eq!(get(&format!("{name}{l}")), want, "{name}");
        }
        for (st, want) in [
            ("DOWN", 1.0),
            ("UP", 0.0),
            ("MAINT", 0.0),
            ("DRAIN", 0.0),
            ("NOLB", 0.0),
        ] {
            let series = format!("sclb_server_status{{proxy=\"be\",server=\"s2\",state=\"{st}\"}}");
            assert_eq!(get(&series), want, "{series}");
        }
        assert_eq!(
            get("sclb_server_status{proxy=\"be\",server=\"s3\",state=\"MAINT\"}"),
            1.0
        );
        for (st, want) in [("L4CON", 1.0), ("L4OK", 0.0), ("L7OK", 0.0)] {
            let series =
                format!("sclb_server_check_status{{proxy=\"be\",server=\"s2\",state=\"{st}\"}}");
            assert_eq!(get(&series), want, "{series}");
        }
        assert!(
            !got.keys()
                .any(|k| k.starts_with("sclb_server_check_status{proxy=\"be\",server=\"s3\"")),
            "no check status for a server without checks"
        );
        assert_eq!(
            get("sclb_server_spark_info{proxy=\"be\",server=\"s2\",version=\"3.5.1\"}"),
            1.0
        );
        let be = &snap.backends[0];
        let l = "{proxy=\"be\"}";
        for (name, want) in [
            ("sclb_backend_current_sessions", be.totals.scur as f64),
            ("sclb_backend_max_sessions", be.totals.smax as f64),
            ("sclb_backend_limit_sessions", 1000.0),
            ("sclb_backend_sessions_total", be.totals.stot as f64),
            ("sclb_backend_bytes_in_total", be.totals.bytes_in as f64),
            ("sclb_backend_bytes_out_total", be.totals.bytes_out as f64),
            ("sclb_backend_active_servers", 1.0),
            ("sclb_backend_backup_servers", 0.0),
            ("sclb_backend_repins_total", 97.0),
            (
                "sclb_backend_total_time_average_seconds",
                be.totals.ttime as f64 / 1000.0,
            ),
        ] {
            assert_eq!(get(&format!("{name}{l}")), want, "{name}");
        }
        for (st, status) in [("UP", BackendStatus::Up), ("DOWN", BackendStatus::Down)] {
            let series = format!("sclb_backend_status{{proxy=\"be\",state=\"{st}\"}}");
            assert_eq!(get(&series), f64::from(u8::from(be.status == status)));
        }
        let l = "{proxy=\"fe\"}";
        for (name, want) in [
            ("sclb_frontend_current_sessions", 11.0),
            ("sclb_frontend_max_sessions", 12.0),
            ("sclb_frontend_limit_sessions", 13.0),
            ("sclb_frontend_sessions_total", 14.0),
            ("sclb_frontend_connections_total", 14.0),
            ("sclb_frontend_bytes_in_total", 15.0),
            ("sclb_frontend_bytes_out_total", 16.0),
            ("sclb_frontend_denied_connections_total", 17.0),
            ("sclb_frontend_current_session_rate", 18.0),
            ("sclb_frontend_max_session_rate", 19.0),
        ] {
            assert_eq!(get(&format!("{name}{l}")), want, "{name}");
        }
        assert_eq!(get("sclb_frontend_status{proxy=\"fe\",state=\"UP\"}"), 1.0);
        assert_eq!(
            get("sclb_frontend_status{proxy=\"fe\",state=\"DOWN\"}"),
            0.0
        );
        assert_eq!(get("sclb_sticktable_used{name=\"be\"}"), 95.0);
        assert_eq!(get("sclb_sticktable_size{name=\"be\"}"), 96.0);
        assert_eq!(get("sclb_discovery_errors_total{proxy=\"be2\"}"), 3.0);
        for (name, want) in [
            ("sclb_process_nbthread", 2.0),
            ("sclb_process_uptime_seconds", 90061.0),
            ("sclb_process_start_time_seconds", 1_700_000_000.0),
            ("sclb_process_max_fds", 20000.0),
            ("sclb_process_max_connections", 1000.0),
            ("sclb_process_current_connections", 11.0),
            ("sclb_process_connections_total", 14.0),
            ("sclb_process_current_tasks", 7.0),
            ("sclb_process_idle_time_percent", 99.0),
            ("sclb_process_dropped_logs_total", 23.0),
            ("sclb_reloads_total", 21.0),
            ("sclb_reload_failures_total", 22.0),
            ("sclb_log_dropped_total", 23.0),
        ] {
            assert_eq!(get(name), want, "{name}");
        }
        assert_eq!(get("sclb_process_build_info{version=\"0.1.0\"}"), 1.0);
    }

    /// In 0.0.4, a counter's TYPE line names what it is sampled as; no OpenMetrics-only line.
    #[test]
    fn counters_are_declared_as_they_are_sampled() {
        let b = body(MetricNames::Sclb);
        assert!(b.contains("# TYPE sclb_server_sessions_total counter\n"));
        assert!(b.contains("# HELP sclb_server_sessions_total Connections sent to the server.\n"));
        assert!(!b.contains("# TYPE sclb_server_sessions counter"));
        assert!(!b.contains("# EOF") && !b.contains("# UNIT"));
        let mut declared = HashSet::new();
        for line in b.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(
                    declared.contains(name),
                    "{name} sampled under no TYPE of its own name"
                );
            }
        }
        let om = encode_openmetrics(
            sample::snapshot(),
            MetricNames::Sclb,
            &Registry::default(),
            &[],
        )
        .unwrap();
        assert!(om.contains("# TYPE sclb_server_sessions counter\n") && om.ends_with("# EOF\n"));
    }

    /// `metric_names = "haproxy"`: promex's exact names where promex has the family; sclb's own
    /// keep `sclb_`; the same samples otherwise.
    #[test]
    fn haproxy_names_are_promexs() {
        let sclb = parse(&body(MetricNames::Sclb));
        let haproxy = parse(&body(MetricNames::Haproxy));
        assert_eq!(sclb.len(), haproxy.len());
        for series in [
            "haproxy_server_status{proxy=\"be\",server=\"s1\",state=\"UP\"}",
            "haproxy_server_sessions_total{proxy=\"be\",server=\"s1\"}",
            "haproxy_server_check_status{proxy=\"be\",server=\"s1\",state=\"L7OK\"}",
            "haproxy_server_downtime_seconds_total{proxy=\"be\",server=\"s1\"}",
            "haproxy_backend_bytes_in_total{proxy=\"be\"}",
            "haproxy_frontend_status{proxy=\"fe\",state=\"UP\"}",
            "haproxy_sticktable_used{name=\"be\"}",
            "haproxy_process_start_time_seconds",
            "sclb_backend_repins_total{proxy=\"be\"}",
            "sclb_server_spark_info{proxy=\"be\",server=\"s2\",version=\"3.5.1\"}",
            "sclb_reloads_total",
        ] {
            assert!(haproxy.contains_key(series), "no {series}");
        }
        for (series, v) in &haproxy {
            let twin = series.replacen("haproxy_", "sclb_", 1);
            assert_eq!(sclb.get(&twin), Some(v), "{series} has no sclb twin");
        }
    }
}
