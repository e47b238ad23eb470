//! The one mapping from typed stats to `show stat` columns: [`COLUMNS`] (HAProxy 2.6's at
//! HAProxy's positions, then sclb's own) and [`cells`], which gives a row's value for each.
//! CSV, `typed` and JSON ([`super::haproxy`]) only print these cells.

use super::{BackendStats, FrontendStats, ServerStats, Snapshot};
use crate::server::CheckStatus;

/// Every `show stat` column, in order: HAProxy 2.6's general columns (read off a running
/// HAProxy 2.6), then sclb's own (`spark_version` onwards).
pub const COLUMNS: [&str; 107] = [
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
    // sclb's own.
    "spark_version",
    "stick_entries",
    "repins",
    "last_repin",
];

/// How many of [`COLUMNS`] are HAProxy's.
pub const HAPROXY_COLUMNS: usize = 103;

/// A column's position by name, at compile time: a misspelt name does not build.
const fn position(name: &str) -> usize {
    let mut i = 0;
    while i < COLUMNS.len() {
        if same(COLUMNS[i].as_bytes(), name.as_bytes()) {
            return i;
        }
        i += 1;
    }
    panic!("not a show stat column");
}

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The position of a named column, checked when sclb is built.
macro_rules! col {
    ($name:literal) => {{
        const POS: usize = position($name);
        POS
    }};
}

/// One row of `show stat`.
#[derive(Debug, Clone, Copy)]
pub enum Row<'a> {
    Frontend(&'a FrontendStats),
    Server(&'a BackendStats, &'a ServerStats),
    Backend(&'a BackendStats),
}

impl<'a> Row<'a> {
    /// HAProxy's object type: its `type` column and the letter and word `typed` and JSON use.
    pub fn kind(self) -> (u64, char, &'static str) {
        match self {
            Row::Frontend(_) => (0, 'F', "Frontend"),
            Row::Backend(_) => (1, 'B', "Backend"),
            Row::Server(..) => (2, 'S', "Server"),
        }
    }

    /// The proxy's name (`pxname`).
    pub fn proxy_name(self) -> &'a str {
        match self {
            Row::Frontend(f) => &f.name,
            Row::Server(b, _) | Row::Backend(b) => &b.name,
        }
    }

    /// (proxy id, id) as `typed` and JSON number objects.
    pub fn ids(self) -> (usize, u32) {
        match self {
            Row::Frontend(f) => (f.proxy_id, 0),
            Row::Server(b, s) => (b.proxy_id, s.sid),
            Row::Backend(b) => (b.proxy_id, 0),
        }
    }
}

impl Snapshot {
    /// `show stat`'s rows: each frontend, then each backend's servers followed by its BACKEND.
    pub fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        let frontends = self.frontends.iter().map(Row::Frontend);
        let backends = self.backends.iter().flat_map(|b| {
            b.servers
                .iter()
                .map(move |s| Row::Server(b, s))
                .chain(std::iter::once(Row::Backend(b)))
        });
        frontends.chain(backends)
    }
}

/// A column's value. `Empty` where HAProxy leaves the column empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Cell {
    #[default]
    Empty,
    U64(u64),
    Str(String),
}

impl From<u64> for Cell {
    fn from(v: u64) -> Self {
        Cell::U64(v)
    }
}

impl From<u32> for Cell {
    fn from(v: u32) -> Self {
        Cell::U64(v.into())
    }
}

impl From<usize> for Cell {
    fn from(v: usize) -> Self {
        Cell::U64(v as u64)
    }
}

impl From<bool> for Cell {
    /// HAProxy's 1 and 0.
    fn from(v: bool) -> Self {
        Cell::U64(v.into())
    }
}

impl From<&str> for Cell {
    fn from(v: &str) -> Self {
        Cell::Str(v.to_string())
    }
}

impl From<String> for Cell {
    fn from(v: String) -> Self {
        Cell::Str(v)
    }
}

impl Cell {
    /// Whether `typed` and JSON leave it out: nothing, or empty text.
    pub fn is_blank(&self) -> bool {
        match self {
            Cell::Empty => true,
            Cell::U64(_) => false,
            Cell::Str(s) => s.is_empty(),
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Empty => Ok(()),
            Cell::U64(v) => v.fmt(f),
            Cell::Str(s) => f.write_str(s),
        }
    }
}

/// A row's cells, one per column of [`COLUMNS`]: the HAProxy column mapping.
pub fn cells(row: Row) -> Vec<Cell> {
    let mut c = vec![Cell::Empty; COLUMNS.len()];
    let (kind, _, _) = row.kind();
    c[col!("pid")] = 1u64.into();
    c[col!("type")] = kind.into();
    match row {
        Row::Frontend(fe) => {
            c[col!("pxname")] = fe.name.as_str().into();
            c[col!("svname")] = "FRONTEND".into();
            c[col!("scur")] = fe.scur.into();
            c[col!("smax")] = fe.smax.into();
            c[col!("slim")] = fe.slim.into();
            c[col!("stot")] = fe.stot.into();
            c[col!("bin")] = fe.bytes_in.into();
            c[col!("bout")] = fe.bytes_out.into();
            c[col!("dreq")] = 0u64.into();
            c[col!("dresp")] = 0u64.into();
            c[col!("ereq")] = fe.denied.into();
            c[col!("status")] = if fe.stopped { "STOP" } else { "OPEN" }.into();
            c[col!("iid")] = fe.proxy_id.into();
            c[col!("sid")] = 0u64.into();
            c[col!("rate")] = fe.rate.into();
            c[col!("rate_lim")] = 0u64.into();
            c[col!("rate_max")] = fe.rate_max.into();
            c[col!("conn_rate")] = fe.rate.into();
            c[col!("conn_rate_max")] = fe.rate_max.into();
            // HAProxy's word for an HTTP/2 proxy; sclb's gateway is one.
            c[col!("mode")] = fe.mode.as_str().into();
            c[col!("conn_tot")] = fe.stot.into();
        }
        Row::Server(be, s) => {
            let n = &s.counters;
            c[col!("pxname")] = be.name.as_str().into();
            c[col!("svname")] = s.name.as_str().into();
            c[col!("qcur")] = n.qcur.into();
            c[col!("qmax")] = n.qmax.into();
            c[col!("scur")] = n.scur.into();
            c[col!("smax")] = n.smax.into();
            if let Some(m) = s.maxconn {
                c[col!("slim")] = m.into();
            }
            c[col!("stot")] = n.stot.into();
            c[col!("bin")] = n.bytes_in.into();
            c[col!("bout")] = n.bytes_out.into();
            c[col!("dresp")] = 0u64.into();
            c[col!("econ")] = n.econ.into();
            c[col!("eresp")] = n.eresp.into();
            c[col!("wretr")] = n.wretr.into();
            c[col!("wredis")] = n.wredis.into();
            c[col!("status")] = s.status.to_string().into();
            c[col!("weight")] = s.weight.into();
            c[col!("act")] = (!s.backup).into();
            c[col!("bck")] = s.backup.into();
            c[col!("chkfail")] = n.chkfail.into();
            c[col!("chkdown")] = n.chkdown.into();
            c[col!("lastchg")] = s.last_change.as_secs().into();
            c[col!("downtime")] = s.downtime.as_secs().into();
            c[col!("iid")] = be.proxy_id.into();
            c[col!("sid")] = s.sid.into();
            c[col!("lbtot")] = n.lbtot.into();
            times(&mut c, n);
            if let Some(check) = &s.check {
                c[col!("check_status")] = check.status.code().into();
                if let Some(d) = check.duration {
                    c[col!("check_duration")] = (d.as_millis() as u64).into();
                }
                c[col!("last_chk")] = one_line(&check.desc).into();
                c[col!("check_desc")] = check_desc(check.status).into();
                c[col!("check_rise")] = check.rise.into();
                c[col!("check_fall")] = check.fall.into();
            }
            c[col!("addr")] = s.addr.to_string().into();
            c[col!("mode")] = "tcp".into();
            c[col!("conn_tot")] = n.stot.into();
            c[col!("uweight")] = s.weight.into();
            if let Some(v) = &s.spark_version {
                c[col!("spark_version")] = one_line(v).into();
            }
            c[col!("stick_entries")] = s.pinned.into();
        }
        Row::Backend(be) => {
            let n = &be.totals;
            c[col!("pxname")] = be.name.as_str().into();
            c[col!("svname")] = "BACKEND".into();
            c[col!("qcur")] = n.qcur.into();
            c[col!("qmax")] = n.qmax.into();
            c[col!("scur")] = n.scur.into();
            c[col!("smax")] = n.smax.into();
            c[col!("slim")] = be.slim.into();
            c[col!("stot")] = n.stot.into();
            c[col!("bin")] = n.bytes_in.into();
            c[col!("bout")] = n.bytes_out.into();
            c[col!("econ")] = n.econ.into();
            c[col!("eresp")] = n.eresp.into();
            c[col!("wretr")] = n.wretr.into();
            c[col!("wredis")] = n.wredis.into();
            c[col!("status")] = be.status.as_str().into();
            c[col!("weight")] = be.weight.into();
            c[col!("act")] = be.active.into();
            c[col!("bck")] = be.backups.into();
            c[col!("chkdown")] = n.chkdown.into();
            c[col!("iid")] = be.proxy_id.into();
            c[col!("sid")] = 0u64.into();
            c[col!("lbtot")] = n.lbtot.into();
            times(&mut c, n);
            c[col!("mode")] = "tcp".into();
            c[col!("algo")] = be.balance.to_string().into();
            c[col!("conn_tot")] = n.stot.into();
            if let Some(t) = &be.stick {
                c[col!("stick_entries")] = t.used.into();
            }
            c[col!("repins")] = be.repins.into();
            if let Some(last) = &be.last_repin {
                c[col!("last_repin")] = last.to_string().into();
            }
        }
    }
    c
}

/// The rate and time columns servers and backends share.
fn times(c: &mut [Cell], n: &super::Counters) {
    c[col!("rate")] = n.rate.into();
    c[col!("rate_max")] = n.rate_max.into();
    c[col!("qtime")] = n.qtime.into();
    c[col!("ctime")] = n.ctime.into();
    c[col!("rtime")] = 0u64.into();
    c[col!("ttime")] = n.ttime.into();
    c[col!("qtime_max")] = n.qtime_max.into();
    c[col!("ctime_max")] = n.ctime_max.into();
    c[col!("rtime_max")] = 0u64.into();
    c[col!("ttime_max")] = n.ttime_max.into();
}

/// HAProxy's words for a check status code, for `check_desc`.
fn check_desc(status: CheckStatus) -> &'static str {
    match status {
        CheckStatus::Init => "Initializing",
        CheckStatus::Disabled => "",
        CheckStatus::L4Ok => "Layer4 check passed",
        CheckStatus::L4Tout => "Layer4 timeout",
        CheckStatus::L4Con => "Layer4 connection problem",
        CheckStatus::L6Ok => "Layer6 check passed",
        CheckStatus::L6Tout => "Layer6 timeout",
        CheckStatus::L6Rsp => "Layer6 invalid response",
        CheckStatus::L7Ok => "Layer7 check passed",
        CheckStatus::L7Tout => "Layer7 timeout",
        CheckStatus::L7Rsp => "Layer7 invalid response",
        CheckStatus::L7Sts => "Layer7 wrong status",
    }
}

/// CSV has no quoting in HAProxy's format: commas and newlines in free text become spaces.
pub fn one_line(s: &str) -> String {
    s.replace([',', '\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_haproxy_26s_then_sclbs() {
        assert_eq!(COLUMNS[..HAPROXY_COLUMNS].last(), Some(&"agg_check_status"));
        assert_eq!(COLUMNS[HAPROXY_COLUMNS], "spark_version");
        assert_eq!(col!("scur"), 4);
        assert_eq!(col!("addr"), 73);
        assert_eq!(col!("last_repin"), COLUMNS.len() - 1);
    }
}
