//! Active health checks: one checker task per server, driving the server's rise/fall state
//! with a [`probe::Probe`] (tcp, h2 or spark).
//!
//! Checkers are started for servers that appear in a snapshot and stopped when a server
//! leaves (its `retired` token). A server in MAINT, or with checks disabled from the admin
//! socket, is not checked. Each result goes to [`crate::control`], which moves the server's
//! rise/fall state and logs every UP/DOWN transition once, with HAProxy's wording.

pub mod probe;
pub mod spark_proto;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use crate::config::CheckConfig;
use crate::server::{AdminState, LastCheck, Phase, Server};
use probe::Probe;

/// Where a checker hands each result: in the process, the control plane
/// (`control::checker_report`), which moves the server's state.
pub type Report = Arc<dyn Fn(Arc<Server>, LastCheck) + Send + Sync>;

/// Starts the checker of `server` unless its checks are off. It stops when the server is
/// retired or `stop` fires.
pub fn spawn_checker(server: Arc<Server>, report: &Report, stop: &CancellationToken) {
    let check = server.config().check.clone();
    let Some(probe) = probe::for_check(check.kind, check.token.as_ref(), check.tls.as_ref()) else {
        return;
    };
    spawn_with(server, probe, report.clone(), stop.clone());
}

/// Starts a checker with a given probe (tests script probes through this seam).
pub fn spawn_with(
    server: Arc<Server>,
    probe: Box<dyn Probe>,
    report: Report,
    stop: CancellationToken,
) {
    let span = info_span!("check", server = %format!("{}/{}", server.backend, server.name));
    server.set_checker_running(true);
    tokio::spawn(
        async move {
            run(server.clone(), probe, report, stop).await;
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
    report: Report,
    stop: CancellationToken,
) {
    let mut kind = server.config().check.kind;
    let mut token = server.config().check.token.clone();
    let mut tls = server.config().check.tls.clone();
    // The first check comes at once, moved by up to `spread` of the interval, so that sclb
    // knows the truth quickly after start without every check firing at the same instant.
    let check = server.config().check.clone();
    let first = check.inter.mul_f64(random_unit() * check.spread);
    let mut wait = first;
    let mut since = tokio::time::Instant::now();
    loop {
        let due = since
            .checked_add(wait)
            .unwrap_or_else(|| since + crate::config::reader::MAX_DURATION);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => return,
            _ = server.retired.cancelled() => return,
            _ = server.check_changed.notified() => {
                // A reload changed the check: the new interval counts from the last check.
                wait = next_interval(&server.config().check, server.health.phase());
                continue;
            }
        }
        let check = server.config().check.clone();
        if check.kind != kind || check.token != token || check.tls != tls {
            // A reload changed the check type, the backend token or server_tls.
            match probe::for_check(check.kind, check.token.as_ref(), check.tls.as_ref()) {
                Some(p) => {
                    (probe, kind, token, tls) =
                        (p, check.kind, check.token.clone(), check.tls.clone())
                }
                None => return,
            }
        }
        if server.admin_state() != AdminState::Maint && server.health.enabled() {
            let result = probe
                .check(check_addr(&server, &check), check.timeout)
                .await;
            report(server.clone(), result);
        }
        // Chosen after the result: a first failure switches to fastinter at once.
        wait = next_interval(&check, server.health.phase());
        since = tokio::time::Instant::now();
    }
}
