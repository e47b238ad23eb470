//! The HTML stats page (`GET /stats`): frontends, then each backend with its servers, the
//! discovery source and the last re-pin, refreshed by the browser every `stats.refresh`.
//! Rendered from one [`stats::Snapshot`]; everything shown from the config or the network is
//! escaped ([`esc`]). With `actions` (an `admin_token` is configured), each server gets a tick
//! box and each backend HAProxy's actions as buttons; the page's script ([`SCRIPT`]) sends them
//! to `POST /stats` with the token the operator typed (`actions.rs`). Without it the page has
//! no form, no box and no button.

use std::fmt::{Display, Write};
use std::time::Duration;

use super::actions::Action;
use crate::discovery::SourceStatus;
use crate::stats::columns::one_line;
use crate::stats::haproxy::{discovery_line, uptime};
use crate::stats::{
    self, BackendStats, BackendStatus, CheckStats, Counters, ServerStats, ServerStatus,
};

/// Escapes text for HTML: names come from the config and must never become markup.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u < units.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

fn human_secs(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

/// The page's only script, served as `/stats.js` (the page's CSP allows no inline script).
pub const SCRIPT: &str = include_str!("stats.js");

/// CSS class of a server's status.
fn server_class(status: ServerStatus) -> &'static str {
    match status {
        ServerStatus::Up | ServerStatus::NoCheck => "up",
        ServerStatus::GoingDown { .. } => "going-down",
        ServerStatus::GoingUp { .. } => "going-up",
        ServerStatus::Down => "down",
        ServerStatus::Drain | ServerStatus::Removed => "drain",
        ServerStatus::Maint => "maint",
        // No colour of its own (the legend has none).
        ServerStatus::Nolb => "",
    }
}

/// CSS class of a backend's status.
fn backend_class(status: BackendStatus) -> &'static str {
    match status {
        BackendStatus::Up => "up",
        BackendStatus::Down => "down",
    }
}

const STYLE: &str = "body{font-family:Arial,Helvetica,sans-serif;font-size:13px;margin:12px;color:#222}\
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 4px}.meta{color:#555;margin-bottom:8px}\
table{border-collapse:collapse;margin-bottom:6px}th,td{border:1px solid #999;padding:2px 3px;text-align:right;white-space:nowrap;font-size:12px}\
th{background:#20407a;color:#fff;font-weight:normal;text-align:center;white-space:normal}\
td.chk{white-space:normal;min-width:110px;max-width:170px;word-break:break-word}td.l{text-align:left}tr.total td{background:#e8e8f8;font-weight:bold}\
.up{background:#c0f0c0}.down{background:#ff9090}.going-down{background:#ffffa0}.going-up{background:#ffd080}\
.drain{background:#b0d0ff}.maint{background:#c0b090}\
tr.row-up td{background:#e4f8e4}tr.row-down td{background:#ffd8d8}tr.row-going-down td{background:#ffffd8}\
tr.row-going-up td{background:#ffecd0}tr.row-drain td{background:#e0ecff}tr.row-maint td{background:#e8e0d0}\
tr td.up{background:#c0f0c0}tr td.down{background:#ff9090}tr td.going-down{background:#ffffa0}\
tr td.going-up{background:#ffd080}tr td.drain{background:#b0d0ff}tr td.maint{background:#c0b090}\
td.tick,th.tick{padding:0 1px}.tick input{margin:0 2px}.admin{margin:6px 0}.admin input{font-size:12px}.actions{margin:0 0 6px}.actions button{margin-right:4px;font-size:12px}\
#result{margin:4px 0;white-space:pre-wrap;font-family:inherit}#result.ok{color:#060}#result.err{color:#b00000;font-weight:bold}\
.links{margin:4px 0}.links a{margin-right:10px}.err{color:#b00000;font-weight:bold}.legend span{padding:1px 6px;margin-right:4px;border:1px solid #999}";

/// A number cell, or an empty one.
fn cell(out: &mut String, v: Option<impl Display>) {
    match v {
        Some(v) => {
            let _ = write!(out, "<td>{v}</td>");
        }
        None => out.push_str("<td></td>"),
    }
}

/// The whole page; the browser reloads it every `refresh` (never with `None`: HAProxy's
/// `;norefresh`). With `actions`, the script reloads it instead, and not while a server is
/// ticked or the token is being typed.
pub fn render(stats: &stats::Snapshot, refresh: Option<Duration>, actions: bool) -> String {
    let info = &stats.info;
    let mut out = String::new();
    let (head, body) = match (refresh, actions) {
        (None, _) => (String::new(), String::new()),
        (Some(r), false) => (
            format!("<meta http-equiv=\"refresh\" content=\"{}\">", r.as_secs()),
            String::new(),
        ),
        (Some(r), true) => (String::new(), format!(" data-refresh=\"{}\"", r.as_secs())),
    };
    let script = if actions {
        "<script src=\"/stats.js\" defer></script>"
    } else {
        ""
    };
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\">{head}\
         <title>sclb stats</title><style>{STYLE}</style>{script}</head><body{body}>\
         <h1>sclb {} — Spark Connect load balancer</h1>\
         <div class=\"meta\">pid {} · uptime {} · config {} · {} live connections of {} max · reloads {} ok, {} failed</div>\
         <div class=\"links\"><a href=\"/stats;csv\">CSV export</a><a href=\"/stats;json\">JSON export</a>\
         <a href=\"/metrics\">Prometheus metrics</a><a href=\"/stats;norefresh\">Stop refreshing</a></div>",
        esc(info.version),
        info.pid,
        esc(&uptime(info.uptime)),
        esc(&info.config_file.display().to_string()),
        info.curr_conns,
        info.maxconn,
        info.reloads,
        info.reload_failures,
    );
    if let Some(e) = &info.last_reload_error {
        let _ = write!(
            out,
            "<div class=\"err\">Last reload failed, the running config is kept:<pre>{}</pre></div>",
            esc(e)
        );
    }
    if actions {
        out.push_str(
            "<div class=\"admin\">Admin token <input type=\"password\" id=\"token\" size=\"28\" \
             maxlength=\"512\" autocomplete=\"off\"> <button type=\"button\" id=\"use-token\">Use</button> \
             <button type=\"button\" id=\"forget-token\">Forget</button> <span id=\"token-state\"></span>\
             <pre id=\"result\"></pre></div>",
        );
    }
    out.push_str(
        "<div class=\"legend\"><span class=\"up\">UP</span><span class=\"going-down\">UP, checks failing</span>\
         <span class=\"going-up\">DOWN, checks passing</span><span class=\"down\">DOWN</span>\
         <span class=\"drain\">DRAIN</span><span class=\"maint\">MAINT</span></div>",
    );
    frontends(&mut out, stats);
    for be in &stats.backends {
        backend(&mut out, be, info.discovery.get(&be.name), actions);
    }
    out.push_str("</body></html>");
    out
}

fn frontends(out: &mut String, stats: &stats::Snapshot) {
    out.push_str(
        "<h2>Frontends</h2><table><tr><th>Name</th><th>Status</th><th>Cur</th><th>Max</th><th>Limit</th>\
         <th>Total</th><th>Bytes in</th><th>Bytes out</th><th>Denied</th><th>Rate/s</th><th>Max rate</th></tr>",
    );
    for fe in &stats.frontends {
        let (class, word) = if fe.stopped {
            ("maint", "STOP")
        } else {
            ("up", "OPEN")
        };
        let _ = write!(
            out,
            "<tr><td class=\"l\">{}</td><td class=\"{class}\">{word}</td>",
            esc(&fe.name),
        );
        for v in [fe.scur, fe.smax, fe.slim, fe.stot] {
            cell(out, Some(v));
        }
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td>",
            human_bytes(fe.bytes_in),
            human_bytes(fe.bytes_out)
        );
        for v in [fe.denied, fe.rate, fe.rate_max] {
            cell(out, Some(v));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
}

/// A backend: its heading, its discovery source, a line per server and its totals, and its
/// last re-pin.
fn backend(out: &mut String, be: &BackendStats, discovery: Option<&SourceStatus>, actions: bool) {
    let _ = write!(
        out,
        "<h2>Backend {} <small>({}, stick table {})</small></h2>",
        esc(&be.name),
        be.balance,
        be.stick
            .map(|t| format!(
                "{} of {} entries, expire {}",
                t.used,
                t.size,
                humantime::format_duration(t.expire)
            ))
            .unwrap_or_else(|| "none".into())
    );
    if let Some(st) = discovery {
        discovery_status(out, st);
    }
    out.push_str("<table><tr>");
    if actions {
        out.push_str(
            "<th class=\"tick\"><input type=\"checkbox\" class=\"all\" title=\"tick every server\"></th>",
        );
    }
    out.push_str(
        "<th>Server</th><th>Address</th><th>Status</th><th>Last change</th><th>Check</th>\
         <th>Spark</th><th>Weight</th><th>Cur</th><th>Max</th><th>Limit</th><th>Total</th>\
         <th>Queue</th><th>Bytes in</th><th>Bytes out</th><th>Conn err</th><th>Retries</th>\
         <th>Redisp</th><th>Chk fail</th><th>Downs</th><th>Pinned</th><th>Rate/s</th>\
         <th>Max rate</th><th>LbTot</th><th>Downtime</th><th>Role</th></tr>",
    );
    for s in &be.servers {
        line(out, &Line::server(s), actions);
    }
    line(out, &Line::backend(be), actions);
    out.push_str("</table>");
    if actions {
        action_buttons(out, be);
    }
    if let Some(last) = &be.last_repin {
        let _ = write!(
            out,
            "<div>Last re-pin (a client moved off its server: its Spark session was lost): {}</div>",
            esc(&last.to_string())
        );
    }
}

/// The buttons under a backend's table, for its ticked servers: the health ones only when
/// some server of it is checked (a server without checks counts as UP whatever is forced).
fn action_buttons(out: &mut String, be: &BackendStats) {
    let checked = be.servers.iter().any(|s| s.check.is_some());
    let _ = write!(
        out,
        "<div class=\"actions\" data-backend=\"{}\">Ticked servers: ",
        esc(&be.name)
    );
    for (action, value, words) in Action::ALL {
        let confirm = match action {
            Action::Health(_) if !checked => continue,
            Action::Shutdown => {
                " data-confirm=\"Close every connection to the ticked servers? Their clients \
                 lose their Spark sessions.\""
            }
            _ => "",
        };
        let _ = write!(
            out,
            "<button type=\"button\" data-action=\"{value}\"{confirm}>{words}</button>"
        );
    }
    out.push_str("</div>");
}

/// A backend's discovery source: one line, and its last error in red while it is failing.
fn discovery_status(out: &mut String, st: &SourceStatus) {
    let _ = write!(
        out,
        "<div class=\"discovery\">Discovery: {}</div>",
        esc(&discovery_line(st))
    );
    if let Some(e) = st.last_error.as_ref().filter(|_| st.state != "watching") {
        let _ = write!(
            out,
            "<div class=\"err\">Discovery is failing, the last known servers keep serving: {}</div>",
            esc(e)
        );
    }
}

/// What a line of a backend's table shows: a server, or the backend's totals.
struct Line<'a> {
    total: bool,
    name: &'a str,
    addr: String,
    class: &'static str,
    status: String,
    last_change: Option<Duration>,
    check: Option<&'a CheckStats>,
    spark_version: Option<&'a str>,
    weight: u64,
    slim: Option<u64>,
    counters: &'a Counters,
    chkfail: Option<u64>,
    pinned: Option<usize>,
    downtime: Option<Duration>,
    /// "active" or "backup" for a server.
    role: &'static str,
}

impl<'a> Line<'a> {
    fn server(s: &'a ServerStats) -> Self {
        Line {
            total: false,
            name: &s.name,
            addr: s.addr.to_string(),
            class: server_class(s.status),
            status: s.status.to_string(),
            last_change: Some(s.last_change),
            check: s.check.as_ref(),
            spark_version: s.spark_version.as_deref(),
            weight: s.weight.into(),
            slim: s.maxconn,
            counters: &s.counters,
            chkfail: Some(s.counters.chkfail),
            pinned: Some(s.pinned),
            downtime: Some(s.downtime),
            role: if s.backup { "backup" } else { "active" },
        }
    }

    fn backend(be: &'a BackendStats) -> Self {
        Line {
            total: true,
            name: "BACKEND",
            addr: String::new(),
            class: backend_class(be.status),
            status: be.status.as_str().into(),
            last_change: None,
            check: None,
            spark_version: None,
            weight: be.weight,
            slim: Some(be.slim),
            counters: &be.totals,
            chkfail: None,
            pinned: be.stick.map(|t| t.used),
            downtime: None,
            role: "",
        }
    }
}

/// The last check in a few words: `L4CON in 1ms: Connection refused`.
fn check_words(c: &CheckStats) -> String {
    let code = c.status.code();
    if code.is_empty() {
        return String::new();
    }
    let ms = c
        .duration
        .map(|d| d.as_millis().to_string())
        .unwrap_or_default();
    let desc = one_line(&c.desc);
    if desc.is_empty() {
        format!("{code} in {ms}ms")
    } else {
        format!("{code} in {ms}ms: {desc}")
    }
}

fn line(out: &mut String, l: &Line, actions: bool) {
    let tick = match (actions, l.total) {
        (false, _) => String::new(),
        (true, true) => "<td></td>".into(),
        (true, false) => format!(
            "<td class=\"tick\"><input type=\"checkbox\" class=\"sel\" value=\"{}\" title=\"tick {}\"></td>",
            esc(l.name),
            esc(l.name)
        ),
    };
    let _ = write!(
        out,
        "<tr{}>{tick}<td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l {}\">{}</td><td>{}</td>",
        if l.total {
            " class=\"total\"".to_string()
        } else {
            // The whole row in the status's colour, as HAProxy's page.
            format!(" class=\"row-{}\"", l.class)
        },
        esc(l.name),
        esc(&l.addr),
        l.class,
        esc(&l.status),
        l.last_change.map(human_secs).unwrap_or_default(),
    );
    let check = l.check.map(check_words).unwrap_or_default();
    let _ = write!(out, "<td class=\"l chk\">{}</td>", esc(&check));
    let _ = write!(
        out,
        "<td>{}</td>",
        esc(&l.spark_version.map(one_line).unwrap_or_default())
    );
    let c = l.counters;
    for v in [
        Some(l.weight),
        Some(c.scur),
        Some(c.smax),
        l.slim,
        Some(c.stot),
        Some(c.qcur),
    ] {
        cell(out, v);
    }
    let _ = write!(
        out,
        "<td>{}</td><td>{}</td>",
        human_bytes(c.bytes_in),
        human_bytes(c.bytes_out)
    );
    for v in [
        Some(c.econ),
        Some(c.wretr),
        Some(c.wredis),
        l.chkfail,
        Some(c.chkdown),
        l.pinned.map(|n| n as u64),
        Some(c.rate),
        Some(c.rate_max),
        Some(c.lbtot),
    ] {
        cell(out, v);
    }
    let _ = write!(
        out,
        "<td>{}</td><td class=\"l\">{}</td></tr>",
        l.downtime.map(human_secs).unwrap_or_default(),
        l.role
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::sample;

    /// A typed snapshot on the page: status classes from the status values, totals, checks.
    #[test]
    fn the_page_shows_the_snapshot() {
        let mut snap = sample::snapshot();
        snap.backends[0].servers[0].status = ServerStatus::GoingDown { left: 1, fall: 3 };
        snap.backends[1].servers[0].status = ServerStatus::Removed;
        let page = render(&snap, Some(Duration::from_secs(7)), false);
        assert!(
            !render(&snap, None, false).contains("http-equiv"),
            ";norefresh"
        );
        for no in ["<input", "<button", "<script", "data-refresh"] {
            assert!(!page.contains(no), "no actions without a token: {no}");
        }
        for part in [
            "<meta http-equiv=\"refresh\" content=\"7\">",
            "pid 4242 · uptime 1d 1h01m01s · config /etc/sclb/sclb.toml · 11 live connections of \
             1000 max · reloads 21 ok, 22 failed",
            "<tr><td class=\"l\">fe</td><td class=\"up\">OPEN</td><td>11</td><td>12</td>\
             <td>13</td><td>14</td><td>15 B</td><td>16 B</td><td>17</td><td>18</td><td>19</td></tr>",
            "<tr class=\"row-down\"><td class=\"l\">s2</td>",
            "<td>215</td><td>216</td><td>206</td><td>1m22s</td><td class=\"l\">active</td></tr>",
            "<td class=\"l\">backup</td></tr>",
            "<a href=\"/stats;csv\">CSV export</a><a href=\"/stats;json\">JSON export</a>",
            "<h2>Backend be <small>(roundrobin, stick table 95 of 96 entries, expire 2h)</small></h2>",
            "<td class=\"l going-down\">UP 1/3</td>",
            "<td class=\"l down\">DOWN</td><td>52s</td>\
             <td class=\"l chk\">L4CON in 62ms: Connection refused  twice again</td><td>3.5.1</td>",
            "<td class=\"l maint\">MAINT</td><td>53s</td><td class=\"l chk\"></td><td></td>",
            "<td class=\"l drain\">DRAIN (removed)</td>",
            "<tr class=\"total\"><td class=\"l\">BACKEND</td><td class=\"l\"></td>\
             <td class=\"l up\">UP</td><td></td><td class=\"l chk\"></td><td></td><td>41</td>\
             <td>609</td><td>612</td><td>1000</td><td>615</td><td>603</td><td>621 B</td>\
             <td>624 B</td><td>627</td><td>633</td><td>636</td><td></td><td>642</td><td>95</td><td>645</td><td>316</td><td>618</td><td></td><td class=\"l\"></td></tr>",
            "<div>Last re-pin (a client moved off its server: its Spark session was lost): \
             192.0.2.7 removed-&gt;s1 98s ago</div>",
            "<div class=\"discovery\">Discovery: kubernetes pods in namespace spark, port 15002: \
             watching, 1 servers, 3 errors, last sync never</div>",
        ] {
            assert!(page.contains(part), "no {part} in\n{page}");
        }
    }

    /// With a token configured: a tick box per server (its name escaped), the buttons under
    /// each backend (health ones only where checks run), the script, and no meta refresh.
    #[test]
    fn the_page_with_actions() {
        let mut snap = sample::snapshot();
        snap.backends[0].servers[0].name = "s\"1<".into();
        let page = render(&snap, Some(Duration::from_secs(7)), true);
        for part in [
            "<script src=\"/stats.js\" defer></script></head><body data-refresh=\"7\">",
            "<input type=\"password\" id=\"token\"",
            "<td class=\"tick\"><input type=\"checkbox\" class=\"sel\" value=\"s&quot;1&lt;\"",
            "<div class=\"actions\" data-backend=\"be\">Ticked servers: \
             <button type=\"button\" data-action=\"ready\">READY</button>",
            "<button type=\"button\" data-action=\"hdown\">Health DOWN</button>",
            "<button type=\"button\" data-action=\"shutdown\" data-confirm=\"Close every",
        ] {
            assert!(page.contains(part), "no {part} in\n{page}");
        }
        assert!(!page.contains("http-equiv"), "the script reloads instead");
        assert_eq!(
            page.matches("<div class=\"actions\"").count(),
            snap.backends.len()
        );
        snap.backends.truncate(1);
        for s in &mut snap.backends[0].servers {
            s.check = None;
        }
        let unchecked = render(&snap, None, true);
        assert!(
            !unchecked.contains("Health"),
            "no health buttons without checks"
        );
        assert!(!unchecked.contains("data-refresh"), ";norefresh");
    }

    #[test]
    fn sizes_and_ages_for_people() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
        assert_eq!(human_secs(Duration::from_secs(59)), "59s");
        assert_eq!(human_secs(Duration::from_secs(61)), "1m01s");
        assert_eq!(human_secs(Duration::from_secs(3660)), "1h01m");
        assert_eq!(human_secs(Duration::from_secs(90000)), "1d01h");
    }

    #[test]
    fn everything_from_the_config_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }
}
