//! The warm-up of pool members (`on_demand.pool.warm_up`): a driver that just started is a
//! cold JVM whose first query takes seconds, which the session claiming it would pay. Once a
//! member is discovered Ready (and passes its health check), the keeper runs the warm-up query
//! on it in a session of its own, releases that session, and marks the member warm (annotation
//! [`WARMED`]); [`super::list`] offers only warm members. A warm-up that fails or times out
//! marks the member for the keeper to retire.
//!
//! Data enters from the pool's last listing (members) and leaves as the annotation on the
//! object, the `sclb_pool_warmup*` metrics and the member's state at the next look.

use std::sync::Arc;

use kube::api::{DynamicObject, Patch, PatchParams};
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use super::{Member, MemberState, PoolKey, WARMED, timed};
use crate::Shared;
use crate::config::{OnDemand, WarmUp};
use crate::gateway::registry::SessionKey;
use crate::health::spark_proto;
use crate::server::Server;
use crate::state::Backend;

/// A warm-up the keeper started on a member.
pub(super) enum Warm {
    Running(tokio::task::AbortHandle),
    /// Done, and the member marked warm: kept until a look lists it Ready (a look that listed
    /// it before it was marked must not warm it up again).
    Done,
    /// Failed (and logged): the member is retired at the next look.
    Failed,
}

/// Whether `od`'s pool warms its drivers up before offering them.
pub(super) fn warms(od: &OnDemand) -> bool {
    od.pool.as_ref().is_some_and(|p| p.warm_up.is_some())
}

/// The keeper's warm-ups of one pool at one look: starts one on each Warming member that has
/// none, marks those whose warm-up failed (to be retired), and forgets (stopping them) the
/// warm-ups of drivers no longer Warming members.
pub(super) fn warm_ups(
    shared: &Arc<Shared>,
    (key, namespace): (&PoolKey, &str),
    api: &kube::Api<DynamicObject>,
    b: &Arc<Backend>,
    w: &WarmUp,
    mut members: Vec<Member>,
) -> Vec<Member> {
    let pools = &shared.gateway.pools;
    let mut warm = pools.warm.lock();
    warm.retain(|(k, name), st| {
        let keep = k != key
            || members
                .iter()
                .any(|m| m.name == *name && m.state == MemberState::Warming);
        if !keep && let Warm::Running(task) = st {
            task.abort();
        }
        keep
    });
    for m in members
        .iter_mut()
        .filter(|m| m.state == MemberState::Warming)
    {
        let id = (key.clone(), m.name.clone());
        match warm.get(&id) {
            Some(Warm::Failed) => m.state = MemberState::WarmUpFailed,
            Some(Warm::Running(_) | Warm::Done) => {}
            None => {
                let Some(server) = super::super::route::named_server(b, Some(namespace), &m.name)
                else {
                    continue;
                };
                let span = info_span!("pool_warm_up", namespace = %namespace, name = %m.name);
                let task = tokio::spawn(
                    warm_up(
                        shared.clone(),
                        id.clone(),
                        (api.clone(), namespace.to_string()),
                        server,
                        b.clone(),
                        w.clone(),
                    )
                    .instrument(span),
                );
                warm.insert(id, Warm::Running(task.abort_handle()));
            }
        }
    }
    members
}

/// Warms one member up (`w.runs` runs of [`run_warm_up`], all within `w.timeout`); then marks
/// it warm on its object, or its warm-up failed for the keeper to retire it.
async fn warm_up(
    shared: Arc<Shared>,
    id: (PoolKey, String),
    (api, namespace): (kube::Api<DynamicObject>, String),
    server: Arc<Server>,
    b: Arc<Backend>,
    w: WarmUp,
) {
    let pools = &shared.gateway.pools;
    let name = &id.1;
    let started = tokio::time::Instant::now();
    let runs = async {
        for _ in 0..w.runs {
            run_warm_up(&shared, &server, &b, &w.query).await?;
        }
        Ok(())
    };
    let ran = tokio::time::timeout(w.timeout, runs).await;
    let ran = ran.unwrap_or_else(|_| {
        Err(format!(
            "no answer within its timeout ({})",
            humantime::format_duration(w.timeout)
        ))
    });
    let took = started.elapsed();
    let marked = match ran {
        Ok(()) => {
            let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            let patch = json!({"metadata": {"annotations": {WARMED: now}}});
            match timed(api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))).await {
                Ok(_) => Ok(()),
                // Retired (or deleted) meanwhile: nothing to mark.
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                Err(e) => Err(crate::k8s_api::chain(&e)),
            }
        }
        Err(e) => {
            pools.warmups.get_or_create(&[("result", "failed")]).inc();
            warn!(
                "pool driver {namespace}/{name} failed its warm-up after {:.1}s: {e}; retiring it",
                took.as_secs_f64()
            );
            if let Some(st) = pools.warm.lock().get_mut(&id) {
                *st = Warm::Failed;
            }
            pools.wake.notify_one();
            return;
        }
    };
    match marked {
        Ok(()) => {
            pools.warmups.get_or_create(&[("result", "ok")]).inc();
            pools.warmup_seconds.observe(took.as_secs_f64());
            info!(
                "pool driver warmed up in {:.2}s: {namespace}/{name}",
                took.as_secs_f64()
            );
            if let Some(st) = pools.warm.lock().get_mut(&id) {
                *st = Warm::Done;
            }
        }
        Err(e) => {
            // The next look starts another warm-up.
            warn!("pool driver {namespace}/{name}: cannot mark it warm: {e}");
            pools.warm.lock().remove(&id);
        }
    }
    pools.wake.notify_one();
}

/// One run of the warm-up: `query` collected in a session of its own, which is then released.
/// A server without ReleaseSession (Spark before 4.0) keeps that session until its own idle
/// timeout.
async fn run_warm_up(
    shared: &Shared,
    server: &Server,
    b: &Backend,
    query: &str,
) -> Result<(), String> {
    let up = &shared.gateway.upstreams;
    let key = SessionKey {
        session_id: uuid::Uuid::new_v4().to_string(),
        user_id: "sclb-warm-up".into(),
    };
    let client_type = concat!("sclb/", env!("CARGO_PKG_VERSION"), " warm-up");
    let plan =
        spark_proto::ExecutePlanRequest::sql(&key.session_id, &key.user_id, client_type, query);
    let answer = |what: &str, (code, message): (u32, String)| {
        format!(
            "{what}: gRPC {code} {}: {message}",
            spark_proto::grpc_code_name(code)
        )
    };
    let got = up
        .call(
            server,
            &b.config,
            "ExecutePlan",
            spark_proto::grpc_frame(&plan),
        )
        .await
        .map_err(|e| format!("the query: {e}"))?;
    if got.0 != 0 {
        return Err(answer("the query failed", got));
    }
    let release = super::super::lifetime::release_session_request(&key);
    let got = up
        .call(server, &b.config, "ReleaseSession", release)
        .await
        .map_err(|e| format!("releasing its session: {e}"))?;
    match got.0 {
        // 12: UNIMPLEMENTED.
        0 | 12 => Ok(()),
        _ => Err(answer("releasing its session failed", got)),
    }
}
