//! The Kubernetes API as sclb uses it, shared by discovery (watches) and the gateway's
//! on-demand drivers (creates, deletes): the client, spark-operator's resources, and errors in
//! one line.

use std::time::Duration;

use kube::Client;
use kube::api::{ApiResource, GroupVersionKind};

use crate::config::KubernetesDiscovery;

/// How long one watch request lasts before it is renewed (the API server ends it).
pub const WATCH_TIMEOUT_SECS: u32 = 240;

/// A kube client from `kubeconfig`, else the in-cluster service account, else `$KUBECONFIG`
/// (or `~/.kube/config`).
pub async fn client(s: &KubernetesDiscovery) -> Result<Client, String> {
    client_from(s.kubeconfig.as_deref()).await
}

/// A kube client from `kubeconfig`, else the in-cluster service account, else `$KUBECONFIG`.
pub async fn client_from(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {}", path.display(), chain(&e)))?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => kube::Config::incluster()
            .map_err(|e| format!("in-cluster service account: {}", chain(&e)))?,
        None => kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .map_err(|e| {
                format!(
                    "not in a cluster, and no kubeconfig ($KUBECONFIG or ~/.kube/config): {}",
                    chain(&e)
                )
            })?,
    };
    // A hung API server must not hang a list forever; watches are renewed well before this.
    config.read_timeout = Some(Duration::from_secs(WATCH_TIMEOUT_SECS as u64 + 60));
    Client::try_from(config).map_err(|e| chain(&e))
}

/// spark-operator's SparkApplication (v1beta2).
pub fn spark_applications() -> ApiResource {
    crd("v1beta2", "SparkApplication", "sparkapplications")
}

/// spark-operator's SparkConnect (v1alpha1).
pub fn spark_connects() -> ApiResource {
    crd("v1alpha1", "SparkConnect", "sparkconnects")
}

fn crd(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("sparkoperator.k8s.io", version, kind),
        plural,
    )
}

/// An error and its sources, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
