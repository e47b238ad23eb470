//! On-demand drivers: a new Spark session that names no driver gets its own SparkConnect (or
//! SparkApplication), created from the operator's template in the backend's cluster. Its first
//! RPC is held until the backend's Kubernetes discovery reports the driver ready; then the
//! session is placed there like any other. The object is deleted when the session ends.
//!
//! A session whose driver is being created is *pending*: a retried first RPC (the client gave
//! up waiting, or got UNAVAILABLE at `ready_timeout`) waits for the same driver instead of
//! creating another.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

use super::registry::SessionKey;
use crate::config::{KubernetesDiscovery, KubernetesKind, OnDemand};

/// A driver being created for a session.
#[derive(Debug, Clone)]
pub struct Pending {
    pub namespace: String,
    pub name: String,
    pub team: String,
    pub environment: String,
    pub since: Instant,
}

#[derive(Default)]
pub struct OnDemandState {
    pending: Mutex<HashMap<SessionKey, Pending>>,
    clients: tokio::sync::Mutex<HashMap<Option<PathBuf>, kube::Client>>,
}

/// Fills `{team}`, `{environment}`, `{random}` (8 characters from a-z0-9) and `{session}`
/// ([`session_tag`]).
pub fn fill(pattern: &str, team: &str, environment: &str, session: &SessionKey) -> String {
    let random: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(8)
        .collect();
    pattern
        .replace("{team}", team)
        .replace("{environment}", environment)
        .replace("{random}", &random)
        .replace("{session}", &session_tag(session))
}

/// 12 hex digits that every sclb derives alike from a session (FNV-1a over its id and user):
/// with `{session}` in the name pattern, replicas that race on one new session create one
/// driver (the loser's create finds it there). Hand-written: FNV is five lines, and the
/// value must not change with a library's or the compiler's hasher.
pub fn session_tag(key: &SessionKey) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.session_id.bytes().chain([0]).chain(key.user_id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

impl OnDemandState {
    /// The pending driver of `key`, or a new one (not yet created) from `make`.
    pub fn pending_or(&self, key: &SessionKey, make: impl FnOnce() -> Pending) -> (Pending, bool) {
        let mut p = self.pending.lock();
        if let Some(existing) = p.get(key) {
            return (existing.clone(), false);
        }
        let new = make();
        p.insert(key.clone(), new.clone());
        (new, true)
    }

    /// `key`'s session waits for `p` instead (a pool driver it claimed).
    pub fn set_pending(&self, key: &SessionKey, p: Pending) {
        self.pending.lock().insert(key.clone(), p);
    }

    pub fn done(&self, key: &SessionKey) {
        self.pending.lock().remove(key);
    }

    /// Drivers being created for `team`.
    pub fn pending_for_team(&self, team: &str) -> usize {
        self.pending
            .lock()
            .values()
            .filter(|p| p.team == team)
            .count()
    }

    /// Pending drivers older than `age` (their client gave up): forgotten and returned, for
    /// deletion.
    pub fn abandoned(&self, age: Duration) -> Vec<Pending> {
        let mut out = Vec::new();
        self.pending.lock().retain(|_, p| {
            let keep = p.since.elapsed() < age;
            if !keep {
                out.push(p.clone());
            }
            keep
        });
        out
    }

    async fn client(&self, settings: &KubernetesDiscovery) -> Result<kube::Client, String> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&settings.kubeconfig) {
            return Ok(c.clone());
        }
        let c = crate::k8s_api::client(settings).await?;
        clients.insert(settings.kubeconfig.clone(), c.clone());
        Ok(c)
    }

    fn api(
        client: kube::Client,
        kind: KubernetesKind,
        namespace: &str,
    ) -> Result<Api<DynamicObject>, String> {
        Ok(Api::namespaced_with(
            client,
            namespace,
            &Self::resource(kind)?,
        ))
    }

    fn resource(kind: KubernetesKind) -> Result<kube::api::ApiResource, String> {
        match kind {
            KubernetesKind::SparkConnects => Ok(crate::k8s_api::spark_connects()),
            KubernetesKind::SparkApplications => Ok(crate::k8s_api::spark_applications()),
            other => Err(format!(
                "cannot create {other}: only sparkconnects or sparkapplications"
            )),
        }
    }

    /// The APIs of `settings`' driver kind in every namespace its discovery watches (all of
    /// them when it names none).
    pub async fn apis_watched(
        &self,
        settings: &KubernetesDiscovery,
    ) -> Result<Vec<Api<DynamicObject>>, String> {
        let client = self.client(settings).await?;
        let ar = Self::resource(settings.kind)?;
        if settings.namespaces.is_empty() {
            return Ok(vec![Api::all_with(client, &ar)]);
        }
        Ok(settings
            .namespaces
            .iter()
            .map(|ns| Api::namespaced_with(client.clone(), ns, &ar))
            .collect())
    }

    /// The driver object of `p` from the template: named, labelled managed-by=sclb with its
    /// team and environment.
    fn render(od: &OnDemand, p: &Pending) -> Result<serde_json::Value, String> {
        let text = crate::files::read_text(&od.template, crate::files::MAX_CONFIG)
            .map_err(|e| format!("template {}: {e}", od.template.display()))?;
        let text = text
            .replace("{name}", &p.name)
            .replace("{namespace}", &p.namespace)
            .replace("{team}", &p.team)
            .replace("{environment}", &p.environment);
        let mut value: serde_json::Value = serde_saphyr::from_str(&text)
            .map_err(|e| format!("template {}: {e}", od.template.display()))?;
        let meta = value
            .as_object_mut()
            .ok_or_else(|| format!("template {}: not a mapping", od.template.display()))?
            .entry("metadata")
            .or_insert_with(|| serde_json::json!({}));
        meta["name"] = p.name.clone().into();
        meta["namespace"] = p.namespace.clone().into();
        let labels = meta
            .as_object_mut()
            .ok_or("template: metadata is not a mapping")?
            .entry("labels")
            .or_insert_with(|| serde_json::json!({}));
        labels["app.kubernetes.io/managed-by"] = "sclb".into();
        labels["sclb.io/team"] = p.team.clone().into();
        labels["sclb.io/environment"] = p.environment.clone().into();
        Ok(value)
    }

    /// Creates an unclaimed driver of frontend `frontend`'s warm pool (labelled
    /// `sclb.io/pool=ready`, no session annotation).
    pub async fn create_member(
        &self,
        settings: &KubernetesDiscovery,
        od: &OnDemand,
        p: &Pending,
        placed: (&str, &str),
    ) -> Result<(), String> {
        let mut value = Self::render(od, p)?;
        let meta = &mut value["metadata"];
        meta["labels"][super::pool::LABEL] = super::pool::READY.into();
        use crate::store::kubernetes::annotation as a;
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        for (k, v) in [
            (a::FRONTEND, placed.0),
            (a::BACKEND, placed.1),
            (a::TEAM, p.team.as_str()),
            (a::ENVIRONMENT, p.environment.as_str()),
            (a::CREATED, now.as_str()),
        ] {
            meta["annotations"][k] = v.into();
        }
        let obj: DynamicObject = serde_json::from_value(value)
            .map_err(|e| format!("template {}: {e}", od.template.display()))?;
        let api = self.api_for(settings, &p.namespace).await?;
        api.create(&PostParams::default(), &obj)
            .await
            .map_err(|e| crate::k8s_api::chain(&e))?;
        info!(
            target: "sclb::audit",
            namespace = %p.namespace,
            name = %p.name,
            team = %p.team,
            environment = %p.environment,
            "pool driver created: {} {}/{}",
            settings.kind,
            p.namespace,
            p.name
        );
        Ok(())
    }

    /// The API of `settings`' driver kind in `namespace`.
    pub async fn api_for(
        &self,
        settings: &KubernetesDiscovery,
        namespace: &str,
    ) -> Result<Api<DynamicObject>, String> {
        Self::api(self.client(settings).await?, settings.kind, namespace)
    }

    /// Creates the driver object of `p` from the template, annotated as the record of `key`'s
    /// session on (frontend, backend) `placed`.
    pub async fn create(
        &self,
        settings: &KubernetesDiscovery,
        od: &OnDemand,
        p: &Pending,
        key: &SessionKey,
        placed: (&str, &str),
    ) -> Result<(), String> {
        let mut value = Self::render(od, p)?;
        let meta = &mut value["metadata"];
        // The session's record (read back by the kubernetes store's watch).
        use crate::store::kubernetes::annotation as a;
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        for (k, v) in [
            (a::SESSION, key.session_id.as_str()),
            (a::USER, key.user_id.as_str()),
            (a::FRONTEND, placed.0),
            (a::BACKEND, placed.1),
            (a::TEAM, p.team.as_str()),
            (a::ENVIRONMENT, p.environment.as_str()),
            (a::CREATED, now.as_str()),
            (a::LAST_ACTIVITY, now.as_str()),
        ] {
            meta["annotations"][k] = v.into();
        }
        let obj: DynamicObject = serde_json::from_value(value)
            .map_err(|e| format!("template {}: {e}", od.template.display()))?;
        let api = Self::api(self.client(settings).await?, settings.kind, &p.namespace)?;
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            // Another sclb (a replica, or this one before a restart) created this session's
            // driver first: it is the session's, if its annotation says so.
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                let existing = api
                    .get(&p.name)
                    .await
                    .map_err(|e| crate::k8s_api::chain(&e))?;
                let owner = existing
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get("sclb.io/spark-session"));
                if owner != Some(&key.session_id) {
                    return Err(format!(
                        "{}/{} exists and belongs to another session",
                        p.namespace, p.name
                    ));
                }
                info!(
                    session = %key.session_id,
                    namespace = %p.namespace,
                    name = %p.name,
                    "the session's driver was created by another sclb: using it"
                );
                return Ok(());
            }
            Err(e) => return Err(crate::k8s_api::chain(&e)),
        }
        info!(
            target: "sclb::audit",
            session = %crate::escape::token(&key.session_id),
            user = %crate::escape::token(&key.user_id),
            namespace = %p.namespace,
            name = %p.name,
            team = %p.team,
            environment = %p.environment,
            "driver created on demand: {} {}/{}",
            settings.kind,
            p.namespace,
            p.name
        );
        Ok(())
    }

    /// Deletes a driver sclb created. Best effort: logged, never retried.
    pub async fn delete(&self, settings: &KubernetesDiscovery, namespace: &str, name: &str) {
        let r = async {
            let api = Self::api(self.client(settings).await?, settings.kind, namespace)?;
            api.delete(name, &DeleteParams::default())
                .await
                .map_err(|e| crate::k8s_api::chain(&e))?;
            Ok::<_, String>(())
        };
        match r.await {
            Ok(()) => info!(
                target: "sclb::audit",
                namespace, name, "driver deleted: {} {namespace}/{name}", settings.kind
            ),
            Err(e) => warn!(
                namespace,
                name, "cannot delete driver {namespace}/{name}: {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_filled_and_labels_checked() {
        let key = |id: &str| SessionKey {
            session_id: id.into(),
            user_id: "alice".into(),
        };
        let k = key("5c1b0000-0000-4000-8000-000000000001");
        let n = fill("spark-connect-{team}-{random}", "data", "dev", &k);
        assert!(n.starts_with("spark-connect-data-"), "{n}");
        assert_eq!(n.len(), "spark-connect-data-".len() + 8);
        assert!(crate::config::is_dns_label(&n));
        assert_ne!(n, fill("spark-connect-{team}-{random}", "data", "dev", &k));
        assert_eq!(
            fill("sjns-{team}-{environment}", "data", "dev", &k),
            "sjns-data-dev"
        );
        // {session}: the same for the same session everywhere, another for another.
        let s = fill("spark-connect-{session}", "data", "dev", &k);
        assert!(crate::config::is_dns_label(&s), "{s}");
        assert_eq!(s, fill("spark-connect-{session}", "data", "dev", &k));
        assert_ne!(s, fill("spark-connect-{session}", "data", "dev", &key("x")));
        // Pinned: replicas of different versions must agree during a rolling upgrade.
        assert_eq!(s, "spark-connect-c6fe91c1398e");
        for bad in [
            "",
            "Data",
            "a_b",
            "-a",
            "a-",
            "a.b",
            &"a".repeat(64),
            "a\nb",
        ] {
            assert!(!crate::config::is_dns_label(bad), "{bad:?}");
        }
    }
}
