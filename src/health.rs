//! Active health checks: one checker task per server, driving the server's rise/fall state
//! with a [`probe::Probe`] (tcp, h2 or spark).
//!
//! Checkers are started for servers that appear in a snapshot and stopped when a server
//! leaves (its `retired` token). A server in MAINT, or with checks disabled from the admin
//! socket, is not checked. Every UP/DOWN transition is logged once, with HAProxy's wording and
//! check_status code, and counted.

pub mod probe;
pub mod spark_proto;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{CheckConfig, OnMarkedDown};
use crate::server::{AdminState, Phase, Server, Transition};
use crate::state::State;
use probe::Probe;

/// Starts the checker of `server` unless its checks are off. It stops when the server is
/// retired or `stop` fires.
pub fn spawn_checker(server: Arc<Server>, state: Arc<State>, stop: CancellationToken) {
    let check = server.config().check.clone();
    let Some(probe) = probe::for_type(check.kind) else {
        return;
    };
    spawn_with(server, probe, state, stop);
}

/// Starts a checker with a given probe (tests script probes through this seam).
pub fn spawn_with(
    server: Arc<Server>,
    probe: Box<dyn Probe>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    let span = info_span!("check", server = %format!("{}/{}", server.backend, server.name));
    server.set_checker_running(true);
    tokio::spawn(
        async move {
            run(server.clone(), probe, state, stop).await;
            server.set_checker_running(false);
        }
        .instrument(span),
    );
}

/// Random fraction in [0, 1).
fn random_unit() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The wait before the next check: `inter`, `fastinter` on the way between UP and DOWN,
/// `downinter` while fully DOWN, each moved by up to ±`spread` so that checks of many
/// servers do not fire together.
fn next_interval(check: &CheckConfig, phase: Phase) -> Duration {
    let base = match phase {
        Phase::FullyUp => check.inter,
        Phase::Transition => check.fastinter,
        Phase::FullyDown => check.downinter,
    };
    let jitter = (random_unit() * 2.0 - 1.0) * check.spread;
    base.mul_f64(1.0 + jitter)
}

fn check_addr(server: &Server, check: &CheckConfig) -> SocketAddr {
    let mut addr = server.addr();
    if let Some(port) = check.port {
        addr.set_port(port);
    }
    addr
}

async fn run(
    server: Arc<Server>,
    mut probe: Box<dyn Probe>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    let mut kind = server.config().check.kind;
    // The first check comes at once, moved by up to `spread` of the interval, so that sclb
    // knows the truth quickly after start without every check firing at the same instant.
    let check = server.config().check.clone();
    let first = check.inter.mul_f64(random_unit() * check.spread);
    let mut wait = first;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
            _ = server.retired.cancelled() => return,
        }
        let check = server.config().check.clone();
        if check.kind != kind {
            // A reload changed the check type.
            match probe::for_type(check.kind) {
                Some(p) => (probe, kind) = (p, check.kind),
                None => return,
            }
        }
        if server.admin_state() != AdminState::Maint && server.health.enabled() {
            let result = probe
                .check(check_addr(&server, &check), check.timeout)
                .await;
            check_done(&server, &state, result);
        }
        // Chosen after the result: a first failure switches to fastinter at once.
        wait = next_interval(&check, server.health.phase());
    }
}

/// Applies one probe result: state, counters, logs, and what DOWN means for live sessions.
pub fn check_done(server: &Server, state: &State, result: crate::server::LastCheck) {
    let ok = result.status.is_ok();
    if let Some(v) = result.desc.strip_prefix("Spark ")
        && ok
    {
        *server.health.spark_version.lock().unwrap() = Some(v.to_string());
    }
    if !ok {
        server.counters.check_failures.fetch_add(1, Relaxed);
    }
    let code = result.status.code();
    let ms = result.duration_ms.unwrap_or(0);
    let desc = result.desc.clone();
    match server.health.record(result) {
        Transition::WentDown => {
            server.counters.check_downs.fetch_add(1, Relaxed);
            server.touch_last_change();
            warn!(
                check_status = code,
                "Server {}/{} is DOWN, reason: {code}, info: \"{desc}\", check duration: {ms}ms",
                server.backend,
                server.name
            );
            let on_down = state
                .snapshot()
                .backend(&server.backend)
                .map(|b| b.config.on_marked_down);
            if on_down == Some(OnMarkedDown::ShutdownSessions) {
                info!(
                    "closing the live connections of {}/{} (on_marked_down = shutdown-sessions)",
                    server.backend, server.name
                );
                server.shutdown_sessions();
            }
        }
        Transition::WentUp => {
            server.touch_last_change();
            info!(
                check_status = code,
                "Server {}/{} is UP, reason: {code}, info: \"{desc}\", check duration: {ms}ms",
                server.backend,
                server.name
            );
        }
        Transition::None => {
            debug!(check_status = code, status = %server.health.describe(), "{desc}")
        }
    }
}
