//! A health check's result: the server's rise/fall state, its counters, the log line of a
//! transition, and what DOWN means for its live connections (`on_marked_down`).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tracing::{debug, info, warn};

use crate::Shared;
use crate::config::OnMarkedDown;
use crate::server::Writer;
use crate::server::{LastCheck, Server, Transition};

pub(super) fn record(
    w: &Writer,
    shared: &Arc<Shared>,
    server: &Server,
    result: LastCheck,
) -> Transition {
    let ok = result.status.is_ok();
    if let Some(v) = result.desc.strip_prefix("Spark ")
        && ok
    {
        *server.health.spark_version.lock() = Some(v.to_string());
    }
    if !ok {
        server.counters.check_failures.fetch_add(1, Relaxed);
    }
    let code = result.status.code();
    let ms = result.duration_ms.unwrap_or(0);
    let desc = result.desc.clone();
    let transition = server.health.record(w, result);
    match transition {
        Transition::WentDown => {
            server.counters.check_downs.fetch_add(1, Relaxed);
            server.touch_last_change();
            warn!(
                check_status = code,
                "Server {}/{} is DOWN, reason: {code}, info: \"{desc}\", check duration: {ms}ms",
                server.backend,
                server.name
            );
            let on_down = shared
                .state
                .snapshot()
                .backend(&server.backend)
                .map(|b| b.config.on_marked_down);
            if on_down == Some(OnMarkedDown::ShutdownSessions) {
                info!(
                    "closing the live connections of {}/{} (on_marked_down = shutdown-sessions)",
                    server.backend, server.name
                );
                server.shutdown_sessions(w);
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
    transition
}
