//! One replica at a time reaps: the holder of a `coordination.k8s.io` Lease. The holder
//! renews it every third of `lease_duration`; another replica takes it over once it has seen
//! it unrenewed (its `resourceVersion` unchanged) for a whole `lease_duration` by its own
//! clock, so clocks that disagree do not matter. Every write carries the `resourceVersion`
//! it read: of two replicas taking over at once, one wins. A holder counts itself leader only
//! until `lease_duration` after the start of its last successful renewal, so it stops reaping
//! before anyone can take over; and the deletes it makes carry preconditions of their own.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub struct Election {
    api: Api<Lease>,
    name: String,
    pub identity: String,
    duration: Duration,
    /// Leader until then (the start of the last renewal + `duration`).
    until: Mutex<Option<Instant>>,
    /// Another holder's lease as last read, and since when it has not changed.
    observed: Mutex<Option<(String, Instant)>>,
    pub gauge: Gauge,
    failing: AtomicBool,
}

impl Election {
    pub fn new(api: Api<Lease>, name: String, identity: String, duration: Duration) -> Election {
        Election {
            api,
            name,
            identity,
            duration,
            until: Mutex::new(None),
            observed: Mutex::new(None),
            gauge: Gauge::default(),
            failing: AtomicBool::new(false),
        }
    }

    /// Whether this replica holds the Lease now.
    pub fn is_leader(&self) -> bool {
        self.until.lock().is_some_and(|u| Instant::now() < u)
    }

    /// Renews or takes the Lease every third of its duration until `stop`.
    pub async fn run(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let started = Instant::now();
            let r = tokio::time::timeout(self.duration / 2, self.step(started)).await;
            let was = self.is_leader();
            match r {
                Ok(Ok(())) => {
                    if self.failing.swap(false, Relaxed) {
                        info!(lease = %self.name, "reaper Lease: the API server answers again");
                    }
                }
                Ok(Err(e)) => {
                    if !self.failing.swap(true, Relaxed) {
                        warn!(lease = %self.name, "reaper Lease: {}", crate::k8s_api::chain(&e));
                    }
                }
                Err(_) => {
                    if !self.failing.swap(true, Relaxed) {
                        warn!(lease = %self.name, "reaper Lease: the API server did not answer in time");
                    }
                }
            }
            let now = self.is_leader();
            self.gauge.set(i64::from(now));
            if was && !now {
                warn!(lease = %self.name, identity = %self.identity, "reaper lease lost: this replica stops reaping");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.duration / 3) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn step(&self, started: Instant) -> Result<(), kube::Error> {
        let secs = self.duration.as_secs().max(1).min(i32::MAX as u64) as i32;
        let now = MicroTime(Timestamp::now());
        let current = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: kube::api::ObjectMeta {
                    name: Some(self.name.clone()),
                    labels: Some(
                        [("app.kubernetes.io/managed-by".into(), "sclb".into())]
                            .into_iter()
                            .collect(),
                    ),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.won(started, "created");
                    Ok(())
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        if holder != self.identity {
            *self.until.lock() = None;
            if !holder.is_empty() {
                let expired = {
                    let mut seen = self.observed.lock();
                    match &*seen {
                        Some((was, since)) if *was == rv => since.elapsed() >= self.duration,
                        _ => {
                            *seen = Some((rv, Instant::now()));
                            false
                        }
                    }
                };
                if !expired {
                    return Ok(());
                }
            }
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(secs);
        spec.renew_time = Some(now);
        // `replace` sends the resourceVersion read: a lease someone else wrote since is a 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if holder != self.identity {
                    self.won(started, "taken over");
                } else {
                    *self.until.lock() = Some(started + self.duration);
                }
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!(lease = %self.name, "reaper Lease changed meanwhile");
                *self.until.lock() = None;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn won(&self, started: Instant, how: &str) {
        *self.until.lock() = Some(started + self.duration);
        *self.observed.lock() = None;
        info!(lease = %self.name, identity = %self.identity, "reaper lease acquired ({how}): this replica reaps idle sessions and orphaned drivers");
    }

    /// Gives the Lease up (graceful stop), so that another replica takes over at once.
    pub async fn release(&self) {
        if !self.is_leader() {
            return;
        }
        *self.until.lock() = None;
        let r = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(&self.identity) {
                return Ok(());
            }
            spec.holder_identity = None;
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(2), r).await {
            Ok(Ok(())) => info!(lease = %self.name, "reaper lease released"),
            Ok(Err(e)) => {
                debug!(lease = %self.name, "reaper lease not released: {}", crate::k8s_api::chain(&e))
            }
            Err(_) => debug!(lease = %self.name, "reaper lease not released: timed out"),
        }
    }
}
