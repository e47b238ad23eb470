//! The stats listener (`[global] stats`, :9000): the HTML stats page, `/stats;csv` (= `show
//! stat`), `/stats;json`, Prometheus `/metrics`, `/healthz`, and `POST /admin` for admin
//! commands when an `admin_token` is configured. Everything but `/admin` only reads.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::Router;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::Shared;
use crate::config::AdminLevel;
use crate::server::AdminState;
use crate::stats::{self, Row, RowType};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/stats") }))
        .route("/stats", get(page))
        .route("/stats;csv", get(csv))
        .route("/stats;json", get(json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/admin", post(admin))
        .route("/sessions", get(sessions))
        .route("/sessions/{id}", axum::routing::delete(kill_session))
        .with_state(shared)
}

/// Serves the stats listener until background tasks stop.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let stop = shared.stop_background.clone();
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "stats page on http://{a}/stats, metrics on /metrics");
    }
    let app = router(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!("stats listener stopped: {e}");
    }
}

async fn csv(AxState(shared): AxState<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        stats::csv(&stats::rows(&shared)),
    )
        .into_response()
}

async fn json(AxState(shared): AxState<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        stats::json(&stats::rows(&shared)).to_string(),
    )
        .into_response()
}

async fn healthz(AxState(shared): AxState<Arc<Shared>>) -> Response {
    if shared.stop_accepting.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

/// Compares in time that does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Admin actions need `Authorization: Bearer <global.stats.admin_token>`: the refusal, if
/// this request does not carry it.
fn denied(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let token = shared
        .state
        .snapshot()
        .config
        .global
        .stats
        .as_ref()
        .and_then(|s| s.admin_token.clone());
    let Some(token) = token else {
        return Some(
            (
                StatusCode::FORBIDDEN,
                "HTTP admin actions are disabled: set global.stats.admin_token to enable them\n",
            )
                .into_response(),
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return Some((StatusCode::UNAUTHORIZED, "Permission denied\n").into_response());
    }
    None
}

async fn admin(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(r) = denied(&shared, &headers) {
        return r;
    }
    let mut interactive = false;
    let line = body.lines().next().unwrap_or("");
    info!(command = %line, "admin command over HTTP");
    let (out, _) =
        crate::admin::execute_line(&shared, line, AdminLevel::Admin, &mut interactive).await;
    let status = if crate::admin::command::is_error(&out) {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    (status, out).into_response()
}

/// `GET /sessions`: the gateway's live Spark sessions as JSON. Behind the admin token: a
/// session id is all a client needs to use a session.
async fn sessions(AxState(shared): AxState<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Some(r) = denied(&shared, &headers) {
        return r;
    }
    let list: Vec<serde_json::Value> = shared
        .gateway
        .registry
        .list()
        .iter()
        .map(|s| crate::gateway::session_json(s))
        .collect();
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{}\n", serde_json::json!({ "sessions": list })),
    )
        .into_response()
}

/// `DELETE /sessions/{id}`: what `kill session <id>` does.
async fn kill_session(
    AxState(shared): AxState<Arc<Shared>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = denied(&shared, &headers) {
        return r;
    }
    if !crate::gateway::kill_session(&shared, &id, "over HTTP") {
        return (StatusCode::NOT_FOUND, format!("No such session '{id}'.\n")).into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

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

fn human_bytes(v: &str) -> String {
    let Ok(n) = v.parse::<f64>() else {
        return esc(v);
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n;
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

fn human_secs(v: &str) -> String {
    let Ok(s) = v.parse::<u64>() else {
        return String::new();
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86400, s / 3600 % 24),
    }
}

/// CSS class of a status word.
fn status_class(status: &str) -> &'static str {
    match status {
        "UP" | "OPEN" | "no check" => "up",
        s if s.starts_with("UP ") => "going-down",
        s if s.starts_with("DOWN ") => "going-up",
        s if s.starts_with("DOWN") => "down",
        s if s.starts_with("DRAIN") => "drain",
        "MAINT" => "maint",
        _ => "",
    }
}

const STYLE: &str = "body{font-family:Arial,Helvetica,sans-serif;font-size:13px;margin:12px;color:#222}\
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 4px}.meta{color:#555;margin-bottom:8px}\
table{border-collapse:collapse;margin-bottom:6px}th,td{border:1px solid #999;padding:2px 6px;text-align:right;white-space:nowrap}\
th{background:#20407a;color:#fff;font-weight:normal;text-align:center}td.l{text-align:left}tr.total td{background:#e8e8f8;font-weight:bold}\
.up{background:#c0f0c0}.down{background:#ff9090}.going-down{background:#ffffa0}.going-up{background:#ffd080}\
.drain{background:#b0d0ff}.maint{background:#c0b090}.err{color:#b00000;font-weight:bold}.legend span{padding:1px 6px;margin-right:4px;border:1px solid #999}";

fn cell(out: &mut String, v: &str) {
    let _ = write!(out, "<td>{}</td>", esc(v));
}

async fn page(AxState(shared): AxState<Arc<Shared>>) -> Html<String> {
    let snap = shared.state.snapshot();
    let rows = stats::rows(&shared);
    let refresh = snap
        .config
        .global
        .stats
        .as_ref()
        .map(|s| s.refresh.as_secs().max(1))
        .unwrap_or(5);
    let info = stats::info(&shared);
    let info_get = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or("")
            .to_string()
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <title>sclb stats</title><style>{STYLE}</style></head><body>\
         <h1>sclb {} — Spark Connect load balancer</h1>\
         <div class=\"meta\">pid {} · uptime {} · config {} · {} live connections of {} max · reloads {} ok, {} failed</div>",
        esc(&info_get("Version")),
        esc(&info_get("Pid")),
        esc(&info_get("Uptime")),
        esc(&info_get("ConfigFile")),
        esc(&info_get("CurrConns")),
        esc(&info_get("Maxconn")),
        esc(&info_get("Reloads")),
        esc(&info_get("ReloadFailures")),
    );
    if let Some(e) = shared.reloads.last_error.lock().unwrap().as_ref() {
        let _ = write!(
            out,
            "<div class=\"err\">Last reload failed, the running config is kept:<pre>{}</pre></div>",
            esc(e)
        );
    }
    out.push_str(
        "<div class=\"legend\"><span class=\"up\">UP</span><span class=\"going-down\">UP, checks failing</span>\
         <span class=\"going-up\">DOWN, checks passing</span><span class=\"down\">DOWN</span>\
         <span class=\"drain\">DRAIN</span><span class=\"maint\">MAINT</span></div>",
    );
    // Frontends.
    out.push_str(
        "<h2>Frontends</h2><table><tr><th>Name</th><th>Status</th><th>Cur</th><th>Max</th><th>Limit</th>\
         <th>Total</th><th>Bytes in</th><th>Bytes out</th><th>Denied</th></tr>",
    );
    for r in rows.iter().filter(|r| r.kind == RowType::Frontend) {
        let _ = write!(
            out,
            "<tr><td class=\"l\">{}</td><td class=\"up\">{}</td>",
            esc(r.get("pxname")),
            esc(r.get("status"))
        );
        for f in ["scur", "smax", "slim", "stot"] {
            cell(&mut out, r.get(f));
        }
        let _ = write!(
            out,
            "<td>{}</td><td>{}</td>",
            human_bytes(r.get("bin")),
            human_bytes(r.get("bout"))
        );
        cell(&mut out, r.get("ereq"));
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    // Backends.
    for be in &snap.backends {
        let _ = write!(
            out,
            "<h2>Backend {} <small>({}, stick table {})</small></h2>",
            esc(&be.config.name),
            be.config.balance,
            be.stick
                .as_ref()
                .map(|t| format!(
                    "{} of {} entries, expire {}",
                    t.len(),
                    t.size(),
                    humantime::format_duration(t.expire())
                ))
                .unwrap_or_else(|| "none".into())
        );
        if let Some(st) = shared.state.discovered.statuses().get(&be.config.name) {
            discovery_status(&mut out, st);
        }
        out.push_str(
            "<table><tr><th>Server</th><th>Address</th><th>Status</th><th>Last change</th><th>Check</th>\
             <th>Spark</th><th>Weight</th><th>Cur</th><th>Max</th><th>Limit</th><th>Total</th>\
             <th>Queue</th><th>Bytes in</th><th>Bytes out</th><th>Conn err</th><th>Retries</th>\
             <th>Redisp</th><th>Chk fail</th><th>Downs</th><th>Pinned clients</th></tr>",
        );
        let be_rows = rows
            .iter()
            .filter(|r| r.get("pxname") == be.config.name && r.kind != RowType::Frontend);
        for r in be_rows {
            server_or_backend_row(&mut out, r);
        }
        out.push_str("</table>");
        if let Some(last) = rows
            .iter()
            .find(|r| r.kind == RowType::Backend && r.get("pxname") == be.config.name)
            .map(|r| r.get("last_repin").to_string())
            .filter(|s| !s.is_empty())
        {
            let _ = write!(
                out,
                "<div>Last re-pin (a client moved off its server: its Spark session was lost): {}</div>",
                esc(&last)
            );
        }
    }
    out.push_str("</body></html>");
    Html(out)
}

/// A backend's discovery source: one line, and its last error in red while it is failing.
fn discovery_status(out: &mut String, st: &crate::discovery::SourceStatus) {
    let _ = write!(
        out,
        "<div class=\"discovery\">Discovery: {}</div>",
        esc(&stats::discovery_line(st))
    );
    if let Some(e) = st.last_error.as_ref().filter(|_| st.state != "watching") {
        let _ = write!(
            out,
            "<div class=\"err\">Discovery is failing, the last known servers keep serving: {}</div>",
            esc(e)
        );
    }
}

fn server_or_backend_row(out: &mut String, r: &Row) {
    let total = r.kind == RowType::Backend;
    let status = r.get("status");
    let _ = write!(
        out,
        "<tr{}><td class=\"l\">{}</td><td class=\"l\">{}</td><td class=\"l {}\">{}</td><td>{}</td>",
        if total { " class=\"total\"" } else { "" },
        esc(r.get("svname")),
        esc(r.get("addr")),
        status_class(status),
        esc(status),
        human_secs(r.get("lastchg")),
    );
    let check = if r.get("check_status").is_empty() {
        String::new()
    } else {
        format!(
            "{} in {}ms{}",
            r.get("check_status"),
            r.get("check_duration"),
            if r.get("last_chk").is_empty() {
                String::new()
            } else {
                format!(": {}", r.get("last_chk"))
            }
        )
    };
    let _ = write!(out, "<td class=\"l\">{}</td>", esc(&check));
    cell(out, r.get("spark_version"));
    for f in ["weight", "scur", "smax", "slim", "stot", "qcur"] {
        cell(out, r.get(f));
    }
    let _ = write!(
        out,
        "<td>{}</td><td>{}</td>",
        human_bytes(r.get("bin")),
        human_bytes(r.get("bout"))
    );
    for f in [
        "econ",
        "wretr",
        "wredis",
        "chkfail",
        "chkdown",
        "stick_entries",
    ] {
        cell(out, r.get(f));
    }
    out.push_str("</tr>");
}

/// Prometheus metrics, named as the HAProxy exporter names them, with the `sclb_` prefix.
#[derive(Clone)]
struct Collector(Arc<Shared>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sclb stats collector")
    }
}

type Labels = Vec<(String, String)>;

fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    if let [(labels, v)] = series
        && labels.is_empty()
    {
        // No labels: `name 3`, not `name{} 3`.
        return match kind {
            MetricType::Counter => ConstCounter::new(*v as u64).encode(m),
            _ => ConstGauge::new(*v as i64).encode(m),
        };
    }
    for (labels, v) in series {
        let fam = m.encode_family(labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*v as u64).encode(fam)?,
            _ => ConstGauge::new(*v as i64).encode(fam)?,
        }
    }
    Ok(())
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let shared = &self.0;
        let snap = shared.state.snapshot();
        let rows = stats::rows(shared);
        let num = |r: &Row, f: &str| r.get(f).parse::<f64>().unwrap_or(0.0);

        let servers: Vec<&Row> = rows.iter().filter(|r| r.kind == RowType::Server).collect();
        let srv_labels = |r: &Row| l(&[("proxy", r.get("pxname")), ("server", r.get("svname"))]);
        let mut status = Vec::new();
        for (b, s) in snap.all_servers() {
            let word = if s.admin_state() == AdminState::Maint {
                "MAINT"
            } else if !s.health.is_up() {
                "DOWN"
            } else if s.admin_state() == AdminState::Drain {
                "DRAIN"
            } else {
                "UP"
            };
            for st in ["UP", "DOWN", "MAINT", "DRAIN"] {
                status.push((
                    l(&[
                        ("proxy", &b.config.name),
                        ("server", &s.name),
                        ("state", st),
                    ]),
                    f64::from(u8::from(st == word)),
                ));
            }
        }
        family(
            &mut enc,
            "server_status",
            "Current state of the server (1 for the state it is in).",
            Gauge,
            &status,
        )?;
        let per_server = |field: &str| -> Vec<(Labels, f64)> {
            servers
                .iter()
                .map(|r| (srv_labels(r), num(r, field)))
                .collect()
        };
        for (name, help, kind, field) in [
            (
                "server_current_sessions",
                "Current connections to the server.",
                Gauge,
                "scur",
            ),
            (
                "server_max_sessions",
                "Most connections to the server at once.",
                Gauge,
                "smax",
            ),
            (
                "server_sessions",
                "Connections sent to the server.",
                Counter,
                "stot",
            ),
            (
                "server_bytes_in",
                "Bytes from clients to the server.",
                Counter,
                "bin",
            ),
            (
                "server_bytes_out",
                "Bytes from the server to clients.",
                Counter,
                "bout",
            ),
            (
                "server_connection_errors",
                "Failed connection attempts to the server.",
                Counter,
                "econ",
            ),
            (
                "server_retry_warnings",
                "Retried connection attempts.",
                Counter,
                "wretr",
            ),
            (
                "server_redispatch_warnings",
                "Connections moved to another server after failing here.",
                Counter,
                "wredis",
            ),
            (
                "server_check_failures",
                "Failed health checks.",
                Counter,
                "chkfail",
            ),
            (
                "server_check_up_down",
                "UP to DOWN transitions.",
                Counter,
                "chkdown",
            ),
            (
                "server_current_queue",
                "Clients waiting for a slot on the server.",
                Gauge,
                "qcur",
            ),
            (
                "server_weight",
                "Current weight of the server.",
                Gauge,
                "weight",
            ),
            (
                "server_check_last_change_seconds",
                "Seconds since the server last changed state.",
                Gauge,
                "lastchg",
            ),
        ] {
            family(&mut enc, name, help, kind, &per_server(field))?;
        }
        let spark: Vec<(Labels, f64)> = servers
            .iter()
            .filter(|r| !r.get("spark_version").is_empty())
            .map(|r| {
                (
                    l(&[
                        ("proxy", r.get("pxname")),
                        ("server", r.get("svname")),
                        ("version", r.get("spark_version")),
                    ]),
                    1.0,
                )
            })
            .collect();
        family(
            &mut enc,
            "server_spark_info",
            "Spark version the spark health check saw.",
            Gauge,
            &spark,
        )?;

        let backends: Vec<&Row> = rows.iter().filter(|r| r.kind == RowType::Backend).collect();
        let be_series = |f: &dyn Fn(&Row) -> f64| -> Vec<(Labels, f64)> {
            backends
                .iter()
                .map(|r| (l(&[("proxy", r.get("pxname"))]), f(r)))
                .collect()
        };
        let mut be_status = Vec::new();
        for r in &backends {
            for st in ["UP", "DOWN"] {
                be_status.push((
                    l(&[("proxy", r.get("pxname")), ("state", st)]),
                    f64::from(u8::from(r.get("status") == st)),
                ));
            }
        }
        family(
            &mut enc,
            "backend_status",
            "Current state of the backend.",
            Gauge,
            &be_status,
        )?;
        family(
            &mut enc,
            "backend_current_sessions",
            "Current connections of the backend.",
            Gauge,
            &be_series(&|r| num(r, "scur")),
        )?;
        family(
            &mut enc,
            "backend_active_servers",
            "Servers taking traffic.",
            Gauge,
            &be_series(&|r| num(r, "act")),
        )?;
        family(
            &mut enc,
            "backend_sessions",
            "Connections of the backend.",
            Counter,
            &be_series(&|r| num(r, "stot")),
        )?;
        family(
            &mut enc,
            "backend_repins",
            "Clients moved off a DOWN or MAINT server; each is a lost Spark session.",
            Counter,
            &be_series(&|r| num(r, "repins")),
        )?;

        let fes: Vec<&Row> = rows
            .iter()
            .filter(|r| r.kind == RowType::Frontend)
            .collect();
        let fe_series = |f: &str| -> Vec<(Labels, f64)> {
            fes.iter()
                .map(|r| (l(&[("proxy", r.get("pxname"))]), num(r, f)))
                .collect()
        };
        family(
            &mut enc,
            "frontend_current_sessions",
            "Current client connections.",
            Gauge,
            &fe_series("scur"),
        )?;
        family(
            &mut enc,
            "frontend_sessions",
            "Client connections accepted.",
            Counter,
            &fe_series("stot"),
        )?;
        family(
            &mut enc,
            "frontend_bytes_in",
            "Bytes from clients.",
            Counter,
            &fe_series("bin"),
        )?;
        family(
            &mut enc,
            "frontend_bytes_out",
            "Bytes to clients.",
            Counter,
            &fe_series("bout"),
        )?;
        family(
            &mut enc,
            "frontend_denied_connections",
            "Client connections closed because no server could take them.",
            Counter,
            &fe_series("ereq"),
        )?;

        let tables: Vec<_> = snap
            .backends
            .iter()
            .filter_map(|b| b.stick.as_ref().map(|t| (b, t)))
            .collect();
        let used: Vec<(Labels, f64)> = tables
            .iter()
            .map(|(b, t)| (l(&[("name", &b.config.name)]), t.len() as f64))
            .collect();
        let size: Vec<(Labels, f64)> = tables
            .iter()
            .map(|(b, t)| (l(&[("name", &b.config.name)]), t.size() as f64))
            .collect();
        family(
            &mut enc,
            "sticktable_used",
            "Entries in the stick table.",
            Gauge,
            &used,
        )?;
        family(
            &mut enc,
            "sticktable_size",
            "Capacity of the stick table.",
            Gauge,
            &size,
        )?;

        discovery_families(&mut enc, &shared.state.discovered.statuses())?;

        let none: Labels = Vec::new();
        family(
            &mut enc,
            "reloads",
            "Successful config reloads.",
            Counter,
            &[(none.clone(), shared.reloads.ok.load(Relaxed) as f64)],
        )?;
        family(
            &mut enc,
            "reload_failures",
            "Config reloads refused (bad file); the running config was kept.",
            Counter,
            &[(none.clone(), shared.reloads.failed.load(Relaxed) as f64)],
        )?;
        let start = shared
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        family(
            &mut enc,
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch.",
            Gauge,
            &[(none, start)],
        )?;
        Ok(())
    }
}

/// `sclb_discovery_errors_total{proxy}` and `sclb_discovery_servers{proxy}`, for backends with
/// a discovery source.
fn discovery_families(
    enc: &mut DescriptorEncoder,
    sources: &std::collections::BTreeMap<String, crate::discovery::SourceStatus>,
) -> Result<(), std::fmt::Error> {
    if sources.is_empty() {
        return Ok(());
    }
    let series = |f: fn(&crate::discovery::SourceStatus) -> f64| -> Vec<(Labels, f64)> {
        sources
            .iter()
            .map(|(b, st)| (l(&[("proxy", b)]), f(st)))
            .collect()
    };
    family(
        enc,
        "discovery_errors",
        "Faults of a backend's discovery source (watch errors, API server unreachable, RBAC).",
        MetricType::Counter,
        &series(|st| st.errors as f64),
    )?;
    family(
        enc,
        "discovery_servers",
        "Servers a backend's discovery source currently reports.",
        MetricType::Gauge,
        &series(|st| st.servers as f64),
    )
}

async fn metrics(AxState(shared): AxState<Arc<Shared>>) -> Response {
    let mut registry = Registry::with_prefix("sclb");
    let shared_gateway = shared.gateway.clone();
    registry.register_collector(Box::new(Collector(shared)));
    let mut body = String::new();
    let encoded = prometheus_client::encoding::text::encode_registry(&mut body, &registry)
        .and_then(|()| {
            prometheus_client::encoding::text::encode_registry(
                &mut body,
                &shared_gateway.registry.metrics.registry,
            )
        })
        .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut body));
    match encoded {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_from_the_config_is_escaped() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn token_comparison_needs_the_exact_token() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeg"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
