//! A [`Snapshot`] in HAProxy's formats: `show stat` as CSV, `typed` and JSON (each printing
//! the cells of [`super::columns`]), and `show info`.

use std::fmt::Write;
use std::time::Duration;

use super::columns::{COLUMNS, Cell, Row, cells};
use super::{InfoStats, Snapshot};
use crate::discovery::SourceStatus;

/// Which proxy `show stat <iid|proxy> <type> <sid>` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxySel {
    Id(usize),
    Name(String),
}

/// `show stat`'s selection, as HAProxy's: `{<iid>|<proxy>} <type> <sid>` (type a mask of 1
/// frontends, 2 backends, 4 servers) and `up` / `no-maint` (servers only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFilter {
    /// `None`: every proxy (`-1`).
    pub proxy: Option<ProxySel>,
    pub types: u32,
    /// `None`: every server (`-1`).
    pub sid: Option<u32>,
    /// Only servers that are UP.
    pub up: bool,
    /// No server in MAINT.
    pub no_maint: bool,
}

impl Default for StatFilter {
    fn default() -> Self {
        StatFilter {
            proxy: None,
            types: 7,
            sid: None,
            up: false,
            no_maint: false,
        }
    }
}

impl StatFilter {
    pub fn keeps(&self, row: Row) -> bool {
        let (kind, _, _) = row.kind();
        let bit = match kind {
            0 => 1,
            1 => 2,
            _ => 4,
        };
        if self.types & bit == 0 {
            return false;
        }
        let (proxy_id, sid) = row.ids();
        match &self.proxy {
            Some(ProxySel::Id(id)) if *id != proxy_id => return false,
            Some(ProxySel::Name(n)) if n != row.proxy_name() => return false,
            _ => {}
        }
        if let Row::Server(_, s) = row {
            if self.sid.is_some_and(|want| want != sid) {
                return false;
            }
            if self.up && !(s.up && s.admin != crate::server::AdminState::Maint && !s.leaving) {
                return false;
            }
            if self.no_maint && s.admin == crate::server::AdminState::Maint {
                return false;
            }
        }
        true
    }
}

/// `show stat`: a `# ` header of the columns, then a line per row; every cell ends with a
/// comma, as in HAProxy.
pub fn csv(snap: &Snapshot) -> String {
    csv_filtered(snap, &StatFilter::default())
}

/// `show stat` with a selection.
pub fn csv_filtered(snap: &Snapshot, filter: &StatFilter) -> String {
    let mut out = String::from("# ");
    for name in COLUMNS {
        out.push_str(name);
        out.push(',');
    }
    out.push('\n');
    for row in snap.rows().filter(|r| filter.keeps(*r)) {
        for cell in cells(row) {
            let _ = write!(out, "{cell},");
        }
        out.push('\n');
    }
    out
}

/// The cells `typed` and JSON show: position, column name, value.
fn shown(row: Row) -> impl Iterator<Item = (usize, &'static str, Cell)> {
    cells(row)
        .into_iter()
        .zip(COLUMNS)
        .enumerate()
        .filter(|(_, (cell, _))| !cell.is_blank())
        .map(|(pos, (cell, name))| (pos, name, cell))
}

/// HAProxy 2.6's origin, nature and scope letters for a column of a row of kind `t` (`F`,
/// `B`, `S`), as its `stats_fill_*_stats` tag each field.
pub fn stat_tags(t: char, name: &str) -> &'static str {
    match (name, t) {
        ("pxname" | "svname", _) => "KNS",
        ("mode" | "type" | "algo" | "addr" | "qlimit", _) => "CGS",
        ("check_rise" | "check_fall" | "check_health", _) => "CGS",
        ("cookie" | "tracked", _) => "CNS",
        ("iid" | "sid", _) => "KGS",
        ("pid", _) => "KGP",
        ("status", _) => "SGP",
        ("act" | "bck", 'S') => "SGP",
        ("smax" | "qmax" | "req_rate_max" | "conn_rate_max", _) => "MMP",
        ("qtime_max" | "ctime_max" | "rtime_max" | "ttime_max", _) => "MMP",
        ("rate_max", 'B') | ("rate", 'B') => "MGP",
        ("rate_max", _) => "MMP",
        ("rate" | "req_rate" | "conn_rate", _) => "MRP",
        ("slim" | "rate_lim" | "src_ilim", _) => "CLP",
        ("lastchg" | "lastsess", _) => "MAP",
        ("weight" | "uweight" | "throttle", _) => "MaP",
        ("qtime" | "ctime" | "rtime" | "ttime", _) => "MaP",
        ("check_duration" | "agent_duration", _) => "MDP",
        ("check_status" | "check_code" | "check_desc" | "last_chk", _) => "MOP",
        ("agent_status" | "agent_code" | "agent_desc" | "last_agt", _) => "MOP",
        ("spark_version" | "last_repin", _) => "MOP",
        (
            "stot" | "bin" | "bout" | "dreq" | "dresp" | "ereq" | "econ" | "eresp" | "wretr"
            | "wredis" | "chkfail" | "chkdown" | "downtime" | "lbtot" | "conn_tot" | "repins"
            | "hanafail" | "cli_abrt" | "srv_abrt" | "req_tot" | "dcon" | "dses" | "wrew" | "eint"
            | "connect" | "reuse" | "intercepted",
            _,
        ) => "MCP",
        _ => "MGP",
    }
}

/// HAProxy's `typed` output: `<T>.<proxy id>.<id>.<pos>.<name>.<proc>:<tags>:<type>:<value>`.
pub fn typed(snap: &Snapshot) -> String {
    typed_filtered(snap, &StatFilter::default())
}

pub fn typed_filtered(snap: &Snapshot, filter: &StatFilter) -> String {
    let mut out = String::new();
    for row in snap.rows().filter(|r| filter.keeps(*r)) {
        let (_, t, _) = row.kind();
        let (proxy_id, id) = row.ids();
        for (pos, name, cell) in shown(row) {
            let ty = match cell {
                Cell::U64(_) => "u64",
                _ => "str",
            };
            let tags = stat_tags(t, name);
            let _ = writeln!(out, "{t}.{proxy_id}.{id}.{pos}.{name}.1:{tags}:{ty}:{cell}");
        }
    }
    out
}

/// HAProxy's JSON shape: an array per row of `{objType, proxyId, id, field{pos,name},
/// processNum, tags, value}`.
pub fn json(snap: &Snapshot) -> serde_json::Value {
    json_filtered(snap, &StatFilter::default())
}

pub fn json_filtered(snap: &Snapshot, filter: &StatFilter) -> serde_json::Value {
    let rows = snap.rows().filter(|r| filter.keeps(*r)).map(|row| {
        let (_, t, obj) = row.kind();
        let (proxy_id, id) = row.ids();
        let cells = shown(row).map(|(pos, name, cell)| {
            let value = match cell {
                Cell::U64(n) => serde_json::json!({"type": "u64", "value": n}),
                Cell::Str(s) => serde_json::json!({"type": "str", "value": s}),
                Cell::Empty => unreachable!("blank cells are not shown"),
            };
            serde_json::json!({
                "objType": obj,
                "proxyId": proxy_id,
                "id": id,
                "field": {"pos": pos, "name": name},
                "processNum": 1,
                "tags": json_tags(stat_tags(t, name)),
                "value": value,
            })
        });
        serde_json::Value::Array(cells.collect())
    });
    serde_json::Value::Array(rows.collect())
}

/// The date of this release, as `show info` prints HAProxy's (`Release_date`).
pub const RELEASE_DATE: &str = "2025/06/01";

/// A value of `show info` or `show stat typed`, with HAProxy's type word.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u64),
    U64(u64),
    Str(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::U32(v) | Value::U64(v) => v.fmt(f),
            Value::Str(s) => f.write_str(s),
        }
    }
}

impl Value {
    fn type_word(&self) -> &'static str {
        match self {
            Value::U32(_) => "u32",
            Value::U64(_) => "u64",
            Value::Str(_) => "str",
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Value::U32(v) | Value::U64(v) => {
                serde_json::json!({"type": self.type_word(), "value": v})
            }
            Value::Str(s) => serde_json::json!({"type": "str", "value": s}),
        }
    }
}

/// One `show info` field: its name, HAProxy's origin/nature/scope tags (`typed`), its value.
pub struct InfoField {
    pub name: &'static str,
    pub tags: &'static str,
    pub value: Value,
}

/// Every field HAProxy 2.6 prints in `show info`, in its order (its `info_fields`), with
/// sclb's value where sclb has one and HAProxy's idle value where it has nothing of the kind
/// (no SSL, no compression, no peers, no memory pools); then sclb's own fields.
pub fn info_fields(info: &InfoStats) -> Vec<InfoField> {
    use Value::{Str, U32, U64};
    let start = info
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let jobs = info.curr_conns + info.listeners as u64;
    [
        ("Name", "POS", Str("sclb".into())),
        ("Version", "POS", Str(info.version.into())),
        ("Release_date", "POS", Str(RELEASE_DATE.into())),
        ("Nbthread", "CGS", U32(info.nbthread as u64)),
        ("Nbproc", "CGS", U32(1)),
        ("Process_num", "KGP", U32(1)),
        ("Pid", "SGP", U32(info.pid.into())),
        ("Uptime", "MDP", Str(uptime(info.uptime))),
        ("Uptime_sec", "MDP", U32(info.uptime.as_secs())),
        ("Memmax_MB", "CLP", U32(0)),
        ("PoolAlloc_MB", "MGP", U32(0)),
        ("PoolUsed_MB", "MGP", U32(0)),
        ("PoolFailed", "MCP", U32(0)),
        ("Ulimit-n", "CLP", U32(info.ulimit_n)),
        ("Maxsock", "CLP", U32(info.ulimit_n)),
        ("Maxconn", "CLP", U32(info.maxconn)),
        ("Hard_maxconn", "CLP", U32(info.hard_maxconn)),
        ("CurrConns", "MGP", U32(info.curr_conns)),
        ("CumConns", "MCP", U32(info.cum_conns)),
        ("CumReq", "MCP", U32(info.cum_conns)),
        ("MaxSslConns", "MMP", U32(0)),
        ("CurrSslConns", "MGP", U32(0)),
        ("CumSslConns", "MCP", U32(0)),
        ("Maxpipes", "CLP", U32(info.max_pipes)),
        ("PipesUsed", "MGP", U32(info.pipes_used)),
        ("PipesFree", "MGP", U32(info.pipes_free)),
        ("ConnRate", "MRP", U32(info.conn_rate)),
        ("ConnRateLimit", "CLP", U32(0)),
        ("MaxConnRate", "MMP", U32(info.max_conn_rate)),
        ("SessRate", "MRP", U32(info.conn_rate)),
        ("SessRateLimit", "CLP", U32(0)),
        ("MaxSessRate", "MRP", U32(info.max_conn_rate)),
        ("SslRate", "MRP", U32(0)),
        ("SslRateLimit", "CLP", U32(0)),
        ("MaxSslRate", "MMP", U32(0)),
        ("SslFrontendKeyRate", "MGP", U32(0)),
        ("SslFrontendMaxKeyRate", "MMP", U32(0)),
        ("SslFrontendSessionReuse_pct", "MGP", U32(0)),
        ("SslBackendKeyRate", "MRP", U32(0)),
        ("SslBackendMaxKeyRate", "MMP", U32(0)),
        ("SslCacheLookups", "MCP", U32(0)),
        ("SslCacheMisses", "MCP", U32(0)),
        ("CompressBpsIn", "MRP", U32(0)),
        ("CompressBpsOut", "MRP", U32(0)),
        ("CompressBpsRateLim", "CLP", U32(0)),
        ("ZlibMemUsage", "MGP", U32(0)),
        ("MaxZlibMemUsage", "CLP", U32(0)),
        ("Tasks", "MGP", U32(info.tasks)),
        ("Run_queue", "MGP", U32(info.run_queue)),
        ("Idle_pct", "MaP", U32(info.idle_pct)),
        ("node", "COS", Str(info.node.clone())),
        ("Stopping", "MGP", U32(info.stopping.into())),
        ("Jobs", "MGP", U32(jobs)),
        ("Unstoppable Jobs", "MGP", U32(0)),
        ("Listeners", "MGP", U32(info.listeners as u64)),
        ("ActivePeers", "MGP", U32(0)),
        ("ConnectedPeers", "MGP", U32(0)),
        ("DroppedLogs", "MGP", U32(info.log_dropped)),
        ("BusyPolling", "MGP", U32(0)),
        ("FailedResolutions", "MGP", U32(0)),
        ("TotalBytesOut", "MGP", U64(info.bytes_out)),
        ("TotalSplicedBytesOut", "MGP", U64(0)),
        ("BytesOutRate", "MRP", U64(0)),
        ("DebugCommandsIssued", "MGP", U32(0)),
        ("CumRecvLogs", "MCP", U32(0)),
        ("Build info", "POS", Str(info.version.into())),
        ("Memmax_bytes", "CLP", U32(0)),
        ("PoolAlloc_bytes", "MGP", U32(0)),
        ("PoolUsed_bytes", "MGP", U32(0)),
        ("Start_time_sec", "MDP", U32(start)),
        ("Tainted", "SGP", Str("0x0".into())),
        // sclb's own.
        (
            "ConfigFile",
            "COS",
            Str(info.config_file.display().to_string()),
        ),
        ("Reloads", "MCP", U64(info.reloads)),
        ("ReloadFailures", "MCP", U64(info.reload_failures)),
        (
            "LastReloadError",
            "MOP",
            Str(info
                .last_reload_error
                .as_deref()
                .map(|e| e.replace('\n', " | "))
                .unwrap_or_default()),
        ),
        ("Repins", "MCP", U64(info.repins)),
    ]
    .into_iter()
    .map(|(name, tags, value)| InfoField { name, tags, value })
    .collect()
}

/// How many of [`info_fields`] are HAProxy 2.6's.
pub const HAPROXY_INFO_FIELDS: usize = 71;

/// `show info`: `Name: value` per field, HAProxy's then sclb's (config file, reloads,
/// re-pins), then each backend's discovery source.
pub fn info(info: &InfoStats) -> String {
    let mut out = String::new();
    for f in info_fields(info) {
        let _ = writeln!(out, "{}: {}", f.name, f.value);
    }
    for (backend, st) in &info.discovery {
        let _ = writeln!(out, "Discovery.{backend}: {}", discovery_line(st));
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

/// `show info typed`: `<pos>.<name>.<process>:<tags>:<type>:<value>`, as HAProxy.
pub fn info_typed(info: &InfoStats) -> String {
    let mut out = String::new();
    for (pos, f) in info_fields(info).into_iter().enumerate() {
        let _ = writeln!(
            out,
            "{pos}.{}.1:{}:{}:{}",
            f.name,
            f.tags,
            f.value.type_word(),
            f.value
        );
    }
    out
}

/// `show info json`: an array of `{field{pos,name}, processNum, tags, value}`, as HAProxy.
pub fn info_json(info: &InfoStats) -> serde_json::Value {
    let fields = info_fields(info).into_iter().enumerate().map(|(pos, f)| {
        serde_json::json!({
            "field": {"pos": pos, "name": f.name},
            "processNum": 1,
            "tags": json_tags(f.tags),
            "value": f.value.json(),
        })
    });
    serde_json::Value::Array(fields.collect())
}

/// HAProxy's JSON words for the three tag letters.
fn json_tags(tags: &str) -> serde_json::Value {
    let b = tags.as_bytes();
    let origin = match b[0] {
        b'M' => "Metric",
        b'S' => "Status",
        b'K' => "Key",
        b'C' => "Config",
        b'P' => "Product",
        _ => "Unknown",
    };
    let nature = match b[1] {
        b'G' => "Gauge",
        b'L' => "Limit",
        b'm' => "Min",
        b'M' => "Max",
        b'R' => "Rate",
        b'C' => "Counter",
        b'D' => "Duration",
        b'A' => "Age",
        b'T' => "Time",
        b'N' => "Name",
        b'O' => "Output",
        b'a' => "Avg",
        _ => "Unknown",
    };
    let scope = match b[2] {
        b'P' => "Process",
        b'S' => "Service",
        b's' => "System",
        b'C' => "Cluster",
        _ => "Unknown",
    };
    serde_json::json!({"origin": origin, "nature": nature, "scope": scope})
}

/// `0d 1h02m03s`, as `show info` words an uptime.
pub fn uptime(d: Duration) -> String {
    let s = d.as_secs();
    format!(
        "{}d {}h{:02}m{:02}s",
        s / 86400,
        s / 3600 % 24,
        s / 60 % 60,
        s % 60
    )
}

/// A discovery source's state in one line: `kubernetes pods in namespace spark, port 15002:
/// watching, 3 servers, 0 errors, last sync 12s ago`.
pub fn discovery_line(st: &SourceStatus) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{ServerStatus, sample};

    /// The cells of the CSV line whose pxname and svname are these.
    fn csv_row(csv: &str, px: &str, sv: &str) -> Vec<String> {
        csv.lines()
            .map(|l| l.split(',').map(String::from).collect::<Vec<_>>())
            .find(|c| c[0] == px && c[1] == sv)
            .unwrap_or_else(|| panic!("no row {px}/{sv} in\n{csv}"))
    }

    /// Each typed field lands in its column at HAProxy 2.6's position (positions as HAProxy's
    /// management guide numbers them).
    #[test]
    fn a_servers_fields_land_in_haproxy_columns() {
        let snap = sample::snapshot();
        let s2 = &snap.backends[0].servers[1];
        let n = &s2.counters;
        let row = csv_row(&csv(&snap), "be", "s2");
        assert_eq!(row.len(), COLUMNS.len() + 1, "every cell ends with a comma");
        assert_eq!(row[COLUMNS.len()], "");
        for (pos, want) in [
            (0, "be".to_string()),
            (1, "s2".into()),
            (2, n.qcur.to_string()),
            (3, n.qmax.to_string()),
            (4, n.scur.to_string()),
            (5, n.smax.to_string()),
            (6, "90".into()),
            (7, n.stot.to_string()),
            (8, n.bytes_in.to_string()),
            (9, n.bytes_out.to_string()),
            (10, "".into()),
            (11, "0".into()),
            (13, n.econ.to_string()),
            (14, n.eresp.to_string()),
            (15, n.wretr.to_string()),
            (16, n.wredis.to_string()),
            (17, "DOWN".into()),
            (18, s2.weight.to_string()),
            (19, "1".into()),
            (20, "0".into()),
            (21, n.chkfail.to_string()),
            (22, n.chkdown.to_string()),
            (23, s2.last_change.as_secs().to_string()),
            (26, "1".into()),
            (27, "2".into()),
            (28, "2".into()),
            (30, n.lbtot.to_string()),
            (32, "2".into()),
            (36, "L4CON".into()),
            (38, "62".into()),
            (56, "Connection refused  twice again".into()),
            (65, "Layer4 connection problem".into()),
            (67, "2".into()),
            (68, "3".into()),
            (73, "10.0.0.2:15002".into()),
            (75, "tcp".into()),
            (76, "".into()),
            (79, n.stot.to_string()),
            (99, s2.weight.to_string()),
            (103, "3.5.1".into()),
            (104, s2.pinned.to_string()),
            (105, "".into()),
        ] {
            assert_eq!(row[pos], want, "column {pos} ({})", COLUMNS[pos]);
        }
    }

    /// A CSV line with these cells, every other one empty.
    fn line_of(cells: &[(usize, &str)]) -> String {
        let mut v = vec![String::new(); COLUMNS.len() + 1];
        for (pos, val) in cells {
            v[*pos] = val.to_string();
        }
        v.join(",")
    }

    /// Whole lines, one per kind of row: what HAProxy leaves empty stays empty.
    #[test]
    fn every_row_kind_in_full() {
        let csv = csv(&sample::snapshot());
        let line = |px: &str, sv: &str| csv_row(&csv, px, sv).join(",");
        assert_eq!(
            line("fe", "FRONTEND"),
            line_of(&[
                (0, "fe"),
                (1, "FRONTEND"),
                (4, "11"),
                (5, "12"),
                (6, "13"),
                (7, "14"),
                (8, "15"),
                (9, "16"),
                (10, "0"),
                (11, "0"),
                (12, "17"),
                (17, "OPEN"),
                (26, "1"),
                (27, "1"),
                (28, "0"),
                (32, "0"),
                (33, "18"),
                (34, "0"),
                (35, "19"),
                (75, "tcp"),
                (77, "18"),
                (78, "19"),
                (79, "14"),
            ])
        );
        assert_eq!(
            line("be", "s3"),
            line_of(&[
                (0, "be"),
                (1, "s3"),
                (2, "301"),
                (3, "302"),
                (4, "303"),
                (5, "304"),
                (7, "305"),
                (8, "307"),
                (9, "308"),
                (11, "0"),
                (13, "309"),
                (14, "310"),
                (15, "311"),
                (16, "312"),
                (17, "MAINT"),
                (18, "43"),
                (19, "0"),
                (20, "1"),
                (21, "313"),
                (22, "314"),
                (23, "53"),
                (24, "83"),
                (26, "1"),
                (27, "2"),
                (28, "3"),
                (30, "306"),
                (32, "2"),
                (33, "315"),
                (35, "316"),
                (58, "317"),
                (59, "318"),
                (60, "0"),
                (61, "319"),
                (73, "10.0.0.3:15002"),
                (75, "tcp"),
                (79, "305"),
                (90, "320"),
                (91, "321"),
                (92, "0"),
                (93, "322"),
                (99, "43"),
                (104, "73"),
            ])
        );
        // Averages weighted by each server's connections; rates summed, maxima the largest.
        assert_eq!(
            line("be", "BACKEND"),
            line_of(&[
                (0, "be"),
                (1, "BACKEND"),
                (2, "603"),
                (3, "606"),
                (4, "609"),
                (5, "612"),
                (6, "1000"),
                (7, "615"),
                (8, "621"),
                (9, "624"),
                (13, "627"),
                (14, "630"),
                (15, "633"),
                (16, "636"),
                (17, "UP"),
                (18, "41"),
                (19, "1"),
                (20, "0"),
                (22, "642"),
                (26, "1"),
                (27, "2"),
                (28, "0"),
                (30, "618"),
                (32, "1"),
                (33, "645"),
                (35, "316"),
                (58, "249"),
                (59, "250"),
                (60, "0"),
                (61, "251"),
                (75, "tcp"),
                (76, "roundrobin"),
                (79, "615"),
                (90, "320"),
                (91, "321"),
                (92, "0"),
                (93, "322"),
                (104, "95"),
                (105, "97"),
                (106, "192.0.2.7 removed->s1 98s ago"),
            ])
        );
        assert_eq!(line("be2", "d1").split(',').nth(17), Some("DRAIN"));
        assert_eq!(
            line("be2", "BACKEND").split(',').nth(104),
            Some(""),
            "no stick table: no stick_entries"
        );
    }

    #[test]
    fn status_words() {
        for (status, word) in [
            (ServerStatus::Up, "UP"),
            (ServerStatus::GoingDown { left: 1, fall: 3 }, "UP 1/3"),
            (ServerStatus::Down, "DOWN"),
            (ServerStatus::GoingUp { passed: 1, rise: 2 }, "DOWN 1/2"),
            (ServerStatus::Nolb, "NOLB"),
            (ServerStatus::NoCheck, "no check"),
            (ServerStatus::Drain, "DRAIN"),
            (ServerStatus::Maint, "MAINT"),
            (ServerStatus::Removed, "DRAIN (removed)"),
        ] {
            let mut snap = sample::snapshot();
            snap.backends[0].servers[0].status = status;
            assert_eq!(csv_row(&csv(&snap), "be", "s1")[17], word);
        }
    }

    #[test]
    fn typed_and_json_carry_the_same_cells_with_their_types() {
        let snap = sample::snapshot();
        let typed = typed(&snap);
        for line in [
            "F.1.0.4.scur.1:MGP:u64:11\n",
            "F.1.0.7.stot.1:MCP:u64:14\n",
            "S.2.1.1.svname.1:KNS:str:s1\n",
            "S.2.2.4.scur.1:MGP:u64:203\n",
            "S.2.2.5.smax.1:MMP:u64:204\n",
            "S.2.2.17.status.1:SGP:str:DOWN\n",
            "S.2.2.18.weight.1:MaP:u64:42\n",
            "S.2.2.38.check_duration.1:MDP:u64:62\n",
            "B.2.0.106.last_repin.1:MOP:str:192.0.2.7 removed->s1 98s ago\n",
        ] {
            assert!(typed.contains(line), "no {line} in\n{typed}");
        }
        assert!(!typed.contains("S.2.1.6.slim"), "empty cells are left out");
        assert!(!typed.contains("S.2.1.56.last_chk"), "and so is empty text");
        assert!(
            !typed.contains("\n\n"),
            "no empty line inside: it would end the reply for a CLI reader"
        );
        let keys: std::collections::BTreeSet<String> = typed
            .lines()
            .map(|l| l.splitn(4, '.').take(3).collect::<Vec<_>>().join("."))
            .collect();
        assert_eq!(keys.len(), 7, "7 rows: {keys:?}");

        let json = json(&snap);
        let rows = json.as_array().unwrap();
        assert_eq!(rows.len(), 7);
        let typed_cells: usize = typed.lines().filter(|l| !l.is_empty()).count();
        let json_cells: usize = rows.iter().map(|r| r.as_array().unwrap().len()).sum();
        assert_eq!(typed_cells, json_cells);
        let scur = rows[2]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["field"]["name"] == "scur")
            .unwrap();
        assert_eq!(
            scur,
            &serde_json::json!({
                "objType": "Server", "proxyId": 2, "id": 2, "processNum": 1,
                "field": {"pos": 4, "name": "scur"},
                "tags": {"origin": "Metric", "nature": "Gauge", "scope": "Process"},
                "value": {"type": "u64", "value": 203},
            })
        );
    }

    #[test]
    fn show_stat_selects_as_haproxy() {
        let snap = sample::snapshot();
        let rows = |f: StatFilter| -> Vec<String> {
            csv_filtered(&snap, &f)
                .lines()
                .skip(1)
                .map(|l| l.split(',').take(2).collect::<Vec<_>>().join("/"))
                .collect()
        };
        let all = StatFilter::default();
        assert_eq!(rows(all.clone()).len(), 7);
        // `show stat be 4 -1`: the servers of be.
        let be_servers = StatFilter {
            proxy: Some(ProxySel::Name("be".into())),
            types: 4,
            ..all.clone()
        };
        assert_eq!(rows(be_servers), ["be/s1", "be/s2", "be/s3"]);
        // `show stat 2 -1 2`: proxy id 2, server id 2, and the BACKEND row.
        let one = StatFilter {
            proxy: Some(ProxySel::Id(2)),
            sid: Some(2),
            ..all.clone()
        };
        assert_eq!(rows(one), ["be/s2", "be/BACKEND"]);
        // `show stat -1 3 -1`: frontends and backends only.
        let proxies = StatFilter {
            types: 3,
            ..all.clone()
        };
        assert_eq!(rows(proxies), ["fe/FRONTEND", "be/BACKEND", "be2/BACKEND"]);
        let up = StatFilter {
            up: true,
            types: 4,
            ..all.clone()
        };
        assert_eq!(rows(up), ["be/s1", "be2/d1"]);
        let no_maint = StatFilter {
            no_maint: true,
            types: 4,
            ..all
        };
        assert_eq!(rows(no_maint), ["be/s1", "be/s2", "be2/d1"]);
    }

    /// HAProxy 2.6's `show info` field names, in its order (`info_fields` of its stats.c).
    const HAPROXY_26_INFO: [&str; HAPROXY_INFO_FIELDS] = [
        "Name",
        "Version",
        "Release_date",
        "Nbthread",
        "Nbproc",
        "Process_num",
        "Pid",
        "Uptime",
        "Uptime_sec",
        "Memmax_MB",
        "PoolAlloc_MB",
        "PoolUsed_MB",
        "PoolFailed",
        "Ulimit-n",
        "Maxsock",
        "Maxconn",
        "Hard_maxconn",
        "CurrConns",
        "CumConns",
        "CumReq",
        "MaxSslConns",
        "CurrSslConns",
        "CumSslConns",
        "Maxpipes",
        "PipesUsed",
        "PipesFree",
        "ConnRate",
        "ConnRateLimit",
        "MaxConnRate",
        "SessRate",
        "SessRateLimit",
        "MaxSessRate",
        "SslRate",
        "SslRateLimit",
        "MaxSslRate",
        "SslFrontendKeyRate",
        "SslFrontendMaxKeyRate",
        "SslFrontendSessionReuse_pct",
        "SslBackendKeyRate",
        "SslBackendMaxKeyRate",
        "SslCacheLookups",
        "SslCacheMisses",
        "CompressBpsIn",
        "CompressBpsOut",
        "CompressBpsRateLim",
        "ZlibMemUsage",
        "MaxZlibMemUsage",
        "Tasks",
        "Run_queue",
        "Idle_pct",
        "node",
        "Stopping",
        "Jobs",
        "Unstoppable Jobs",
        "Listeners",
        "ActivePeers",
        "ConnectedPeers",
        "DroppedLogs",
        "BusyPolling",
        "FailedResolutions",
        "TotalBytesOut",
        "TotalSplicedBytesOut",
        "BytesOutRate",
        "DebugCommandsIssued",
        "CumRecvLogs",
        "Build info",
        "Memmax_bytes",
        "PoolAlloc_bytes",
        "PoolUsed_bytes",
        "Start_time_sec",
        "Tainted",
    ];

    #[test]
    fn show_info_has_every_haproxy_26_field_in_order_then_sclbs() {
        let info = sample::snapshot().info;
        let text = super::info(&info);
        let names: Vec<&str> = text
            .lines()
            .map(|l| l.split(": ").next().unwrap())
            .collect();
        assert_eq!(names[..HAPROXY_INFO_FIELDS], HAPROXY_26_INFO);
        assert_eq!(
            names[HAPROXY_INFO_FIELDS..],
            [
                "ConfigFile",
                "Reloads",
                "ReloadFailures",
                "LastReloadError",
                "Repins",
                "Discovery.be2"
            ]
        );
        for line in [
            "Name: sclb\n",
            "Release_date: ",
            "Nbthread: 2\n",
            "Nbproc: 1\n",
            "Process_num: 1\n",
            "Pid: 4242\n",
            "Uptime: 1d 1h01m01s\n",
            "Maxconn: 1000\n",
            "Hard_maxconn: 9000\n",
            "CurrConns: 11\n",
            "CumConns: 14\n",
            "Maxpipes: 256\n",
            "PipesUsed: 3\n",
            "PipesFree: 4\n",
            "ConnRate: 5\n",
            "MaxConnRate: 6\n",
            "Tasks: 7\n",
            "Run_queue: 8\n",
            "Idle_pct: 99\n",
            "node: lb1\n",
            "Jobs: 12\n",
            "DroppedLogs: 23\n",
            "TotalBytesOut: 16\n",
            "Start_time_sec: 1700000000\n",
            "Reloads: 21\n",
            "Discovery.be2: kubernetes pods in namespace spark, port 15002: watching, 1 servers, 3 errors, last sync never\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn show_info_typed_and_json_are_haproxys_shapes() {
        let info = sample::snapshot().info;
        let typed = info_typed(&info);
        for line in [
            "0.Name.1:POS:str:sclb\n",
            "3.Nbthread.1:CGS:u32:2\n",
            "6.Pid.1:SGP:u32:4242\n",
            "8.Uptime_sec.1:MDP:u32:90061\n",
            "18.CumConns.1:MCP:u32:14\n",
            "50.node.1:COS:str:lb1\n",
            "69.Start_time_sec.1:MDP:u32:1700000000\n",
        ] {
            assert!(typed.contains(line), "no {line:?} in\n{typed}");
        }
        let json = info_json(&info);
        let fields = json.as_array().unwrap();
        assert_eq!(fields.len(), typed.lines().count());
        assert_eq!(
            fields[6],
            serde_json::json!({
                "field": {"pos": 6, "name": "Pid"},
                "processNum": 1,
                "tags": {"origin": "Status", "nature": "Gauge", "scope": "Process"},
                "value": {"type": "u32", "value": 4242},
            })
        );
    }
}
