//! The stats listener (`[global] stats`, :9000): routes, the admin token check and the
//! handlers. Each stats request takes one [`Snapshot`] and renders it: `/stats` as the HTML
//! page (`page.rs`), `;csv` (= `show stat`) and `;json` as HAProxy does (on `/stats`, `/` and
//! `/stats?stats`, with `;norefresh`, `;up`, `;no-maint`)
//! ([`haproxy`]), Prometheus `/metrics` (`metrics.rs`). Besides: `/healthz`, `/readyz`, `POST /admin`
//! and `/sessions` for admin commands, and `POST /stats` for the page's actions
//! (`actions.rs`), when an `admin_token` is configured. Everything but the admin routes only
//! reads.

mod actions;
mod conns;
mod metrics;
mod page;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::Shared;
use crate::config::{AdminLevel, MetricNames};
use crate::stats::{Snapshot, haproxy};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/stats") }))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/admin", post(admin))
        .route(
            "/stats",
            get(stats_uri)
                .post(stats_action)
                .layer(DefaultBodyLimit::max(actions::MAX_BODY)),
        )
        .route("/stats.js", get(stats_js))
        .route("/sessions", get(sessions))
        .route("/sessions/{id}", axum::routing::delete(kill_session))
        // HAProxy's stats URIs: `/stats` and `/` with `;csv`, `;json`, `;norefresh`, `;up`,
        // `;no-maint` in any order, and `/stats?stats;...` (a `stats uri /stats?stats`).
        .fallback(get(stats_uri))
        .with_state(shared)
}

/// What a stats URI asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct StatsRequest {
    format: StatsFormat,
    norefresh: bool,
    filter: haproxy::StatFilter,
}

#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
enum StatsFormat {
    #[default]
    Html,
    Csv,
    Json,
}

/// Reads a stats URI as HAProxy does: the stats prefix (`/stats`, `/stats?stats` or `/`),
/// then `;`-separated options. `None`: not a stats URI.
fn parse_stats_uri(path_and_query: &str) -> Option<StatsRequest> {
    let rest = ["/stats?stats", "/stats/", "/stats", "/"]
        .iter()
        .find_map(|p| path_and_query.strip_prefix(p))?;
    let mut parts = rest.split(';');
    // Before the first `;`: nothing (or `?` and a query HAProxy would ignore).
    let head = parts.next().unwrap_or("");
    if !(head.is_empty() || head.starts_with('?')) {
        return None;
    }
    let mut req = StatsRequest::default();
    for opt in parts {
        match opt {
            "csv" => req.format = StatsFormat::Csv,
            "json" => req.format = StatsFormat::Json,
            "norefresh" => req.norefresh = true,
            "up" => req.filter.up = true,
            "no-maint" => req.filter.no_maint = true,
            // `;typed` has no HTTP form in HAProxy; `;st=...` is the result of an admin action.
            o if o.is_empty() || o.starts_with("st=") => {}
            _ => return None,
        }
    }
    Some(req)
}

async fn stats_uri(AxState(shared): AxState<Arc<Shared>>, uri: axum::http::Uri) -> Response {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let Some(req) = parse_stats_uri(pq) else {
        return (StatusCode::NOT_FOUND, "Not found\n").into_response();
    };
    let snap = Snapshot::take(&shared);
    match req.format {
        StatsFormat::Csv => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            haproxy::csv_filtered(&snap, &req.filter),
        )
            .into_response(),
        StatsFormat::Json => (
            [(header::CONTENT_TYPE, "application/json")],
            haproxy::json_filtered(&snap, &req.filter).to_string(),
        )
            .into_response(),
        StatsFormat::Html => {
            let refresh = (!req.norefresh).then(|| refresh(&shared));
            let actions = admin_token(&shared).is_some();
            (PAGE_HEADERS, Html(page::render(&snap, refresh, actions))).into_response()
        }
    }
}

/// The page runs only its own script (`/stats.js`) and cannot be framed (clickjacking an
/// operator into pressing a button), whatever a name on it might contain.
const PAGE_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
         img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// The page's script: the admin token box, ticking servers, the action buttons.
async fn stats_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        page::SCRIPT,
    )
        .into_response()
}

/// `POST /stats`: an action on the ticked servers ([`actions`]).
async fn stats_action(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(r) = denied(&shared, &headers) {
        return r;
    }
    match actions::parse(&body) {
        Ok(req) => actions::run(&shared, req).await,
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

/// Serves the stats listener until background tasks stop, within its own bounds
/// (`stats.maxconn`, `stats.timeout`: see [`conns`]).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let stop = shared.life.stop_background.clone();
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "stats page on http://{a}/stats, metrics on /metrics");
    }
    let limits = match &shared.state.snapshot().config.global.stats {
        Some(s) => conns::Limits {
            maxconn: s.maxconn,
            timeout: s.timeout,
        },
        None => conns::Limits {
            maxconn: 100,
            timeout: Duration::from_secs(10),
        },
    };
    conns::serve(listener, router(shared), limits, stop).await;
}

async fn healthz(AxState(shared): AxState<Arc<Shared>>) -> Response {
    if shared.life.stop_accepting.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "stopping\n").into_response()
    } else {
        "ok\n".into_response()
    }
}

/// Whether this process can route now (`/healthz` says only that it runs): not stopping, and
/// every frontend's backend has a server that takes new clients (or creates drivers on
/// demand). A Kubernetes readiness probe or an NLB target check points here.
async fn readyz(AxState(shared): AxState<Arc<Shared>>) -> Response {
    let mut why = Vec::new();
    if shared.life.stop_accepting.is_cancelled() {
        why.push("stopping".to_string());
    }
    // A replica that has not read the session records yet would place recorded sessions
    // anew.
    if let Some(k) = shared.gateway.store.get().and_then(|s| s.kubernetes())
        && !k.is_listed()
    {
        why.push("the session store (Kubernetes) has not been read yet".to_string());
    }
    let snap = shared.state.snapshot();
    for fe in &snap.config.frontends {
        if fe.grpc.as_ref().is_some_and(|g| g.on_demand.is_some()) {
            continue;
        }
        match snap.backend(&fe.backend) {
            Some(b) if b.servers.iter().any(|s| s.takes_new_clients()) => {}
            _ => why.push(format!(
                "frontend {}: no server of backend {} takes new clients",
                fe.name, fe.backend
            )),
        }
    }
    if why.is_empty() {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why.join("; ")),
        )
            .into_response()
    }
}

/// Compares in time that does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn admin_token(shared: &Shared) -> Option<String> {
    shared
        .state
        .snapshot()
        .config
        .global
        .stats
        .as_ref()
        .and_then(|s| s.admin_token.clone())
}

/// Admin actions need `Authorization: Bearer <global.stats.admin_token>` and must not come
/// from another site's page: the refusal, if this request is not such.
fn denied(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = admin_token(shared) else {
        return Some(
            (
                StatusCode::FORBIDDEN,
                "HTTP admin actions are disabled: set global.stats.admin_token to enable them\n",
            )
                .into_response(),
        );
    };
    if let Some(why) = actions::cross_site(headers) {
        warn!("admin request from another site refused: {why}");
        return Some(
            (
                StatusCode::FORBIDDEN,
                format!("Cross-site request refused: {why}\n"),
            )
                .into_response(),
        );
    }
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
    info!(command = %crate::escape::token(line), "admin command over HTTP");
    let out = crate::admin::execute_line(&shared, line, AdminLevel::Admin, &mut interactive).await;
    let status = match out.error {
        Some(_) => StatusCode::BAD_REQUEST,
        None => StatusCode::OK,
    };
    (status, out.text).into_response()
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
    let kill = crate::control::Operator::KillSession {
        id,
        by: "over HTTP",
    };
    match crate::control::apply(&shared, crate::control::Change::Operator(kill)) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            let e = crate::admin::AdminError::from(e);
            (StatusCode::NOT_FOUND, format!("{e}\n")).into_response()
        }
    }
}

/// How often the page reloads itself (`global.stats.refresh`, at least 1 s).
fn refresh(shared: &Shared) -> Duration {
    shared
        .state
        .snapshot()
        .config
        .global
        .stats
        .as_ref()
        .map(|s| s.refresh.max(Duration::from_secs(1)))
        .unwrap_or(Duration::from_secs(5))
}

/// `/metrics`: Prometheus text 0.0.4, or OpenMetrics when the scraper accepts it;
/// `?names=haproxy` (or `sclb`) overrides `stats.metric_names` for this scrape.
async fn metrics(
    AxState(shared): AxState<Arc<Shared>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let configured = shared
        .state
        .snapshot()
        .config
        .global
        .stats
        .as_ref()
        .map(|s| s.metric_names)
        .unwrap_or_default();
    let names = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| match kv {
            "names=haproxy" => Some(MetricNames::Haproxy),
            "names=sclb" => Some(MetricNames::Sclb),
            _ => None,
        })
        .unwrap_or(configured);
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let snap = Snapshot::take(&shared);
    let gateway = &shared.gateway.registry.metrics.registry;
    let mut extra = vec![&shared.auth.registry, &shared.gateway.pools.registry];
    extra.extend(shared.gateway.store.get().map(|s| s.metrics()));
    let (body, content_type) = if openmetrics {
        (
            metrics::encode_openmetrics(snap, names, gateway, &extra),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            metrics::encode(snap, names, gateway, &extra),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxys_stats_uris() {
        let csv = StatsRequest {
            format: StatsFormat::Csv,
            ..Default::default()
        };
        for uri in [
            "/;csv",
            "/stats;csv",
            "/stats?stats;csv",
            "/stats/;csv",
            "/;csv;",
        ] {
            assert_eq!(parse_stats_uri(uri).as_ref(), Some(&csv), "{uri}");
        }
        let r = parse_stats_uri("/stats;norefresh;json;up").unwrap();
        assert_eq!(r.format, StatsFormat::Json);
        assert!(r.norefresh && r.filter.up && !r.filter.no_maint);
        let r = parse_stats_uri("/;no-maint;norefresh").unwrap();
        assert_eq!(r.format, StatsFormat::Html);
        assert!(r.norefresh && r.filter.no_maint);
        assert_eq!(parse_stats_uri("/stats").unwrap().format, StatsFormat::Html);
        for uri in ["/nope", "/stats;bogus", "/favicon.ico", "/statsx;csv"] {
            assert_eq!(parse_stats_uri(uri), None, "{uri}");
        }
    }

    #[test]
    fn token_comparison_needs_the_exact_token() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeg"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
