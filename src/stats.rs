//! Read-only views of the running state in HAProxy's formats: `show stat` rows (CSV with
//! HAProxy 2.6's columns at HAProxy's positions, then sclb's own), `typed`, JSON, `show info`,
//! `show servers state`, `show table`. The admin socket and the HTTP stats page both render
//! from here; nothing here changes state.

use std::fmt::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;

use crate::Shared;
use crate::server::{AdminState, Server};
use crate::state::{Backend, Snapshot};

/// HAProxy 2.6's general `show stat` columns, in order (read off a running HAProxy 2.6).
pub const HAPROXY_FIELDS: &[&str] = &[
    "pxname",
    "svname",
    "qcur",
    "qmax",
    "scur",
    "smax",
    "slim",
    "stot",
    "bin",
    "bout",
    "dreq",
    "dresp",
    "ereq",
    "econ",
    "eresp",
    "wretr",
    "wredis",
    "status",
    "weight",
    "act",
    "bck",
    "chkfail",
    "chkdown",
    "lastchg",
    "downtime",
    "qlimit",
    "pid",
    "iid",
    "sid",
    "throttle",
    "lbtot",
    "tracked",
    "type",
    "rate",
    "rate_lim",
    "rate_max",
    "check_status",
    "check_code",
    "check_duration",
    "hrsp_1xx",
    "hrsp_2xx",
    "hrsp_3xx",
    "hrsp_4xx",
    "hrsp_5xx",
    "hrsp_other",
    "hanafail",
    "req_rate",
    "req_rate_max",
    "req_tot",
    "cli_abrt",
    "srv_abrt",
    "comp_in",
    "comp_out",
    "comp_byp",
    "comp_rsp",
    "lastsess",
    "last_chk",
    "last_agt",
    "qtime",
    "ctime",
    "rtime",
    "ttime",
    "agent_status",
    "agent_code",
    "agent_duration",
    "check_desc",
    "agent_desc",
    "check_rise",
    "check_fall",
    "check_health",
    "agent_rise",
    "agent_fall",
    "agent_health",
    "addr",
    "cookie",
    "mode",
    "algo",
    "conn_rate",
    "conn_rate_max",
    "conn_tot",
    "intercepted",
    "dcon",
    "dses",
    "wrew",
    "connect",
    "reuse",
    "cache_lookups",
    "cache_hits",
    "srv_icur",
    "src_ilim",
    "qtime_max",
    "ctime_max",
    "rtime_max",
    "ttime_max",
    "eint",
    "idle_conn_cur",
    "safe_conn_cur",
    "used_conn_cur",
    "need_conn_est",
    "uweight",
    "agg_server_status",
    "agg_server_check_status",
    "agg_check_status",
];

/// sclb's own columns, after HAProxy's.
pub const SCLB_FIELDS: &[&str] = &["spark_version", "stick_entries", "repins", "last_repin"];

/// Every column of a row.
pub fn fields() -> impl Iterator<Item = &'static str> {
    HAPROXY_FIELDS.iter().chain(SCLB_FIELDS).copied()
}

fn field_pos(name: &str) -> usize {
    fields()
        .position(|f| f == name)
        .unwrap_or_else(|| panic!("unknown stat field {name}"))
}

/// What a row describes (HAProxy's `type` column: 0 frontend, 1 backend, 2 server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowType {
    Frontend,
    Backend,
    Server,
}

/// One `show stat` row: a value (possibly empty) per column.
#[derive(Debug, Clone)]
pub struct Row {
    pub kind: RowType,
    pub proxy_id: usize,
    pub id: usize,
    pub values: Vec<String>,
}

impl Row {
    fn new(kind: RowType, proxy_id: usize, id: usize) -> Self {
        Row {
            kind,
            proxy_id,
            id,
            values: vec![String::new(); HAPROXY_FIELDS.len() + SCLB_FIELDS.len()],
        }
    }

    fn set(&mut self, name: &str, v: impl ToString) {
        self.values[field_pos(name)] = v.to_string();
    }

    pub fn get(&self, name: &str) -> &str {
        &self.values[field_pos(name)]
    }
}

/// HAProxy's words for a check status code, for `check_desc`.
fn check_desc(code: &str) -> &'static str {
    match code {
        "INI" => "Initializing",
        "L4OK" => "Layer4 check passed",
        "L4TOUT" => "Layer4 timeout",
        "L4CON" => "Layer4 connection problem",
        "L7OK" => "Layer7 check passed",
        "L7TOUT" => "Layer7 timeout",
        "L7RSP" => "Layer7 invalid response",
        "L7STS" => "Layer7 wrong status",
        _ => "",
    }
}

/// All rows: each frontend, then each backend's servers followed by its BACKEND row.
pub fn rows(shared: &Shared) -> Vec<Row> {
    let snap = shared.state.snapshot();
    let mut out = Vec::new();
    let mut iid = 0;
    for fe in &snap.frontends {
        iid += 1;
        let c = shared.state.frontend_counters(&fe.config.name);
        let mut r = Row::new(RowType::Frontend, iid, 0);
        r.set("pxname", &fe.config.name);
        r.set("svname", "FRONTEND");
        r.set("scur", c.cur.load(Relaxed));
        r.set("smax", c.max.load(Relaxed));
        r.set(
            "slim",
            fe.config.maxconn.unwrap_or(snap.config.global.maxconn),
        );
        r.set("stot", c.total.load(Relaxed));
        r.set("bin", c.bytes_in.load(Relaxed));
        r.set("bout", c.bytes_out.load(Relaxed));
        r.set("dreq", 0);
        r.set("dresp", 0);
        r.set("ereq", c.denied.load(Relaxed));
        r.set("status", "OPEN");
        r.set("pid", 1);
        r.set("iid", iid);
        r.set("sid", 0);
        r.set("type", 0);
        // HAProxy's word for an HTTP/2 proxy; sclb's gateway is one.
        r.set(
            "mode",
            if fe.config.grpc.is_some() {
                "http"
            } else {
                "tcp"
            },
        );
        r.set("conn_tot", c.total.load(Relaxed));
        out.push(r);
    }
    for be in &snap.backends {
        iid += 1;
        let pins = be
            .stick
            .as_ref()
            .map(|t| t.count_by_server())
            .unwrap_or_default();
        for s in be.servers.iter().chain(be.leaving.iter()) {
            out.push(server_row(
                be,
                s,
                iid,
                pins.get(&s.id).copied().unwrap_or(0),
            ));
        }
        out.push(backend_row(&snap, be, iid));
    }
    out
}

fn server_row(be: &Backend, s: &Server, iid: usize, pins: usize) -> Row {
    let sid = s.sid.load(Relaxed) as usize;
    let c = &s.counters;
    let mut r = Row::new(RowType::Server, iid, sid);
    let cfg = s.config();
    r.set("pxname", &be.config.name);
    r.set("svname", &s.name);
    r.set("qcur", c.queue_cur.load(Relaxed));
    r.set("qmax", c.queue_max.load(Relaxed));
    r.set("scur", c.cur.load(Relaxed));
    r.set("smax", c.max.load(Relaxed));
    if s.maxconn() > 0 {
        r.set("slim", s.maxconn());
    }
    r.set("stot", c.total.load(Relaxed));
    r.set("bin", c.bytes_in.load(Relaxed));
    r.set("bout", c.bytes_out.load(Relaxed));
    r.set("dresp", 0);
    r.set("econ", c.conn_errors.load(Relaxed));
    r.set("eresp", c.resp_errors.load(Relaxed));
    r.set("wretr", c.retries.load(Relaxed));
    r.set("wredis", c.redispatches.load(Relaxed));
    let leaving = be.leaving.iter().any(|l| l.id == s.id);
    r.set(
        "status",
        if leaving {
            "DRAIN (removed)".to_string()
        } else {
            s.status()
        },
    );
    r.set("weight", s.weight());
    r.set("act", u8::from(!cfg.backup));
    r.set("bck", u8::from(cfg.backup));
    r.set("chkfail", c.check_failures.load(Relaxed));
    r.set("chkdown", c.check_downs.load(Relaxed));
    r.set("lastchg", s.since_last_change().as_secs());
    r.set("pid", 1);
    r.set("iid", iid);
    r.set("sid", sid);
    r.set("lbtot", c.lbtot.load(Relaxed));
    r.set("type", 2);
    if s.health.enabled() {
        let last = s.health.last();
        r.set("check_status", last.status.code());
        if let Some(ms) = last.duration_ms {
            r.set("check_duration", ms);
        }
        r.set("last_chk", csv_safe(&last.desc));
        r.set("check_desc", check_desc(last.status.code()));
        r.set("check_rise", cfg.check.rise);
        r.set("check_fall", cfg.check.fall);
    }
    r.set("addr", s.addr());
    r.set("mode", "tcp");
    r.set("conn_tot", c.total.load(Relaxed));
    r.set("uweight", s.weight());
    if let Some(v) = s.health.spark_version.lock().unwrap().as_ref() {
        r.set("spark_version", csv_safe(v));
    }
    r.set("stick_entries", pins);
    r
}

fn backend_row(snap: &Snapshot, be: &Backend, iid: usize) -> Row {
    let mut r = Row::new(RowType::Backend, iid, 0);
    let all: Vec<&std::sync::Arc<Server>> = be.servers.iter().chain(be.leaving.iter()).collect();
    let sum = |f: &dyn Fn(&Server) -> u64| all.iter().map(|s| f(s)).sum::<u64>();
    r.set("pxname", &be.config.name);
    r.set("svname", "BACKEND");
    r.set("qcur", sum(&|s| s.counters.queue_cur.load(Relaxed)));
    r.set("qmax", sum(&|s| s.counters.queue_max.load(Relaxed)));
    r.set("scur", sum(&|s| s.counters.cur.load(Relaxed)));
    r.set("smax", sum(&|s| s.counters.max.load(Relaxed)));
    r.set("slim", snap.config.global.maxconn);
    r.set("stot", sum(&|s| s.counters.total.load(Relaxed)));
    r.set("bin", sum(&|s| s.counters.bytes_in.load(Relaxed)));
    r.set("bout", sum(&|s| s.counters.bytes_out.load(Relaxed)));
    r.set("econ", sum(&|s| s.counters.conn_errors.load(Relaxed)));
    r.set("eresp", sum(&|s| s.counters.resp_errors.load(Relaxed)));
    r.set("wretr", sum(&|s| s.counters.retries.load(Relaxed)));
    r.set("wredis", sum(&|s| s.counters.redispatches.load(Relaxed)));
    let usable = |backup: bool| {
        be.servers
            .iter()
            .filter(|s| s.is_backup() == backup && s.takes_pinned_clients())
            .collect::<Vec<_>>()
    };
    let (act, bck) = (usable(false), usable(true));
    r.set(
        "status",
        if act.is_empty() && bck.is_empty() {
            "DOWN"
        } else {
            "UP"
        },
    );
    r.set("weight", act.iter().map(|s| s.weight()).sum::<u32>());
    r.set("act", act.len());
    r.set("bck", bck.len());
    r.set("chkdown", sum(&|s| s.counters.check_downs.load(Relaxed)));
    r.set("pid", 1);
    r.set("iid", iid);
    r.set("sid", 0);
    r.set("lbtot", sum(&|s| s.counters.lbtot.load(Relaxed)));
    r.set("type", 1);
    r.set("mode", "tcp");
    r.set("algo", be.config.balance);
    r.set("conn_tot", sum(&|s| s.counters.total.load(Relaxed)));
    if let Some(t) = &be.stick {
        r.set("stick_entries", t.len());
    }
    r.set("repins", be.repins.count.load(Relaxed));
    if let Some(last) = be.repins.last.lock().unwrap().as_ref() {
        let name = |id| {
            be.server(id)
                .map(|s| s.name.to_string())
                .unwrap_or_else(|| "removed".into())
        };
        let ago = last.at.elapsed().map(|d| d.as_secs()).unwrap_or(0);
        r.set(
            "last_repin",
            format!(
                "{} {}->{} {ago}s ago",
                last.client,
                name(last.from),
                name(last.to)
            ),
        );
    }
    r
}

/// CSV has no quoting in HAProxy's format: commas and newlines in free text become spaces.
fn csv_safe(s: &str) -> String {
    s.replace([',', '\n', '\r'], " ")
}

pub fn csv(rows: &[Row]) -> String {
    let mut out = String::from("# ");
    for f in fields() {
        out.push_str(f);
        out.push(',');
    }
    out.push('\n');
    for r in rows {
        for v in &r.values {
            out.push_str(v);
            out.push(',');
        }
        out.push('\n');
    }
    out
}

/// HAProxy's `typed` output: `<T>.<proxy id>.<id>.<pos>.<name>.<proc>:<tags>:<type>:<value>`.
pub fn typed(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        let t = match r.kind {
            RowType::Frontend => 'F',
            RowType::Backend => 'B',
            RowType::Server => 'S',
        };
        for (pos, (name, v)) in fields().zip(&r.values).enumerate() {
            if v.is_empty() {
                continue;
            }
            let ty = if v.parse::<u64>().is_ok() {
                "u64"
            } else {
                "str"
            };
            let _ = writeln!(
                out,
                "{t}.{}.{}.{pos}.{name}.1:MGP:{ty}:{v}",
                r.proxy_id, r.id
            );
        }
        out.push('\n');
    }
    out
}

/// HAProxy's JSON shape: an array per row of `{objType, proxyId, id, field{pos,name}, value}`.
pub fn json(rows: &[Row]) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let obj = match r.kind {
                RowType::Frontend => "Frontend",
                RowType::Backend => "Backend",
                RowType::Server => "Server",
            };
            let cells: Vec<serde_json::Value> = fields()
                .zip(&r.values)
                .enumerate()
                .filter(|(_, (_, v))| !v.is_empty())
                .map(|(pos, (name, v))| {
                    let value = match v.parse::<u64>() {
                        Ok(n) => serde_json::json!({"type": "u64", "value": n}),
                        Err(_) => serde_json::json!({"type": "str", "value": v}),
                    };
                    serde_json::json!({
                        "objType": obj,
                        "proxyId": r.proxy_id,
                        "id": r.id,
                        "field": {"pos": pos, "name": name},
                        "processNum": 1,
                        "value": value,
                    })
                })
                .collect();
            serde_json::Value::Array(cells)
        })
        .collect();
    serde_json::Value::Array(rows)
}

/// `show servers state`, in HAProxy's server-state file layout.
pub fn servers_state(snap: &Snapshot, only: Option<&str>) -> String {
    let mut out = String::from(
        "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n",
    );
    let nfe = snap.frontends.len();
    for (i, be) in snap.backends.iter().enumerate() {
        if only.is_some_and(|o| o != be.config.name) {
            continue;
        }
        for s in &be.servers {
            let cfg = s.config();
            let op = if s.health.is_up() { 2 } else { 0 };
            let admin = match s.admin_state() {
                AdminState::Ready => 0,
                AdminState::Maint => 1,
                AdminState::Drain => 8,
            };
            let addr = s.addr();
            let _ = writeln!(
                out,
                "{} {} {} {} {} {op} {admin} {} {} {} {} {} {} {} 0 0 0 - {} - 0 {} - - 0",
                nfe + i + 1,
                be.config.name,
                s.sid.load(Relaxed),
                s.name,
                addr.ip(),
                s.weight(),
                cfg.weight,
                s.since_last_change().as_secs(),
                s.health.last().status.code(),
                u8::from(s.health.last().status.is_ok()) + 1,
                u8::from(s.health.is_up()),
                u8::from(s.health.enabled()) * 6,
                addr.port(),
                cfg.check.port.unwrap_or(0),
            );
        }
    }
    out
}

/// `show table`: a summary line per table, or one table's entries (optionally one key).
/// `show sessions`: the gateway's live Spark sessions, oldest first.
pub fn spark_sessions(shared: &Shared) -> String {
    use std::fmt::Write;
    let list = shared.gateway.registry.list();
    let mut out = format!("# sessions: {}\n", list.len());
    for s in &list {
        let p = s.placement();
        let _ = writeln!(
            out,
            "{}: user={} fe={} be={} srv={} src={} age={}s idle={}s rpcs={} streams={}",
            s.key.session_id,
            if s.key.user_id.is_empty() {
                "-"
            } else {
                &s.key.user_id
            },
            s.frontend,
            s.backend,
            p.server_name,
            s.client(),
            s.age().as_secs(),
            s.idle_for().as_secs(),
            s.rpcs.load(std::sync::atomic::Ordering::Relaxed),
            s.streams.load(std::sync::atomic::Ordering::Relaxed),
        );
        if let Some(app) = &s.meta.app {
            // Before the newline: the driver it runs on, when that is a Kubernetes object.
            out.pop();
            let _ = writeln!(
                out,
                " app={}/{}{}",
                s.meta.namespace.as_deref().unwrap_or("-"),
                app,
                if s.meta.created { " created" } else { "" }
            );
        }
    }
    out
}

pub fn table(snap: &Snapshot, name: Option<&str>, key: Option<IpAddr>) -> Result<String, String> {
    let mut out = String::new();
    let header = |out: &mut String, be: &Backend| {
        let t = be.stick.as_ref().expect("filtered");
        let _ = writeln!(
            out,
            "# table: {}, type: ip, size:{}, used:{}",
            be.config.name,
            t.size(),
            t.len()
        );
    };
    match name {
        None => {
            for be in snap.backends.iter().filter(|b| b.stick.is_some()) {
                header(&mut out, be);
            }
        }
        Some(n) => {
            let be = snap
                .backend(n)
                .filter(|b| b.stick.is_some())
                .ok_or("No such table")?;
            header(&mut out, be);
            let t = be.stick.as_ref().expect("filtered");
            for (i, e) in t.entries().iter().enumerate() {
                if key.is_some_and(|k| k != e.key) {
                    continue;
                }
                let server = be.server(e.server);
                let _ = writeln!(
                    out,
                    "0x{:x}: key={} use={} exp={} server_id={} server_key={}",
                    i + 1,
                    e.key,
                    server.map(|s| s.counters.cur.load(Relaxed)).unwrap_or(0),
                    e.expires_in.as_millis(),
                    server.map(|s| s.sid.load(Relaxed)).unwrap_or(0),
                    server
                        .map(|s| s.name.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
            }
        }
    }
    Ok(out)
}

/// `show info`: HAProxy's process facts, then sclb's (config file, reloads, re-pins).
pub fn info(shared: &Shared) -> String {
    let snap = shared.state.snapshot();
    let uptime = shared.started.elapsed().unwrap_or_default().as_secs();
    let (cur, total) = snap.frontends.iter().fold((0, 0), |(cur, total), f| {
        let c = shared.state.frontend_counters(&f.config.name);
        (cur + c.cur.load(Relaxed), total + c.total.load(Relaxed))
    });
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0);
    let listeners: usize = snap.frontends.iter().map(|f| f.config.binds.len()).sum();
    let repins: u64 = snap
        .backends
        .iter()
        .map(|b| b.repins.count.load(Relaxed))
        .sum();
    let last_error = shared.reloads.last_error.lock().unwrap().clone();
    let mut out = String::new();
    let mut kv = |k: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{k}: {v}");
    };
    kv("Name", &"sclb");
    kv("Version", &env!("CARGO_PKG_VERSION"));
    kv("Pid", &std::process::id());
    kv(
        "Uptime",
        &format!(
            "{}d {}h{:02}m{:02}s",
            uptime / 86400,
            uptime / 3600 % 24,
            uptime / 60 % 60,
            uptime % 60
        ),
    );
    kv("Uptime_sec", &uptime);
    kv("Ulimit-n", &nofile);
    kv("Maxconn", &snap.config.global.maxconn.min(shared.fd_cap));
    kv("CurrConns", &cur);
    kv("CumConns", &total);
    kv("Stopping", &u8::from(shared.stop_accepting.is_cancelled()));
    kv("Listeners", &listeners);
    kv("ConfigFile", &snap.config.source.display());
    kv("Reloads", &shared.reloads.ok.load(Relaxed));
    kv("ReloadFailures", &shared.reloads.failed.load(Relaxed));
    kv(
        "LastReloadError",
        &last_error
            .as_deref()
            .map(|e| e.replace('\n', " | "))
            .unwrap_or_default(),
    );
    kv("Repins", &repins);
    for (backend, st) in shared.state.discovered.statuses() {
        let _ = writeln!(out, "Discovery.{backend}: {}", discovery_line(&st));
        if let Some(e) = &st.last_error {
            let _ = writeln!(
                out,
                "Discovery.{backend}.LastError: {} ({})",
                e.replace('\n', " | "),
                ago(st.last_error_at)
            );
        }
    }
    out
}

/// A discovery source's state in one line: `kubernetes pods in namespace spark, port 15002:
/// watching, 3 servers, 0 errors, last sync 12s ago`.
pub fn discovery_line(st: &crate::discovery::SourceStatus) -> String {
    format!(
        "{}: {}, {} servers, {} errors, last sync {}",
        st.source,
        st.state,
        st.servers,
        st.errors,
        ago(st.last_sync)
    )
}

/// "12s ago", or "never".
fn ago(t: Option<std::time::SystemTime>) -> String {
    match t {
        Some(t) => format!("{}s ago", t.elapsed().unwrap_or_default().as_secs()),
        None => "never".into(),
    }
}
