//! The real API server (started by `scripts/k8s-apiserver.sh` on ports of its own), and the
//! test playing the kubelet and the spark-operator against it; a relay to cut sclb off from it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

pub const SCRIPT: &str = "scripts/k8s-apiserver.sh";

/// Whether the API server is built. Absent, the tests fail with what to do, unless
/// `SCLB_SKIP_K8S=1` says to skip them.
pub fn built() -> bool {
    let ok = Command::new(SCRIPT)
        .arg("path")
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    if std::env::var("SCLB_SKIP_K8S").as_deref() == Ok("1") {
        eprintln!("SCLB_SKIP_K8S=1 and kube-apiserver is not built: skipping");
        return false;
    }
    panic!(
        "kube-apiserver is not built, so the Kubernetes discovery tests cannot run.\n\
         Build it once per machine (~10 min): {SCRIPT} build   (scripts/test does it)\n\
         or skip these tests: SCLB_SKIP_K8S=1 cargo test"
    );
}

/// A kube-apiserver with its etcd, on ports of its own, stopped by PID on drop (and by the
/// script's watchdog if this process dies first).
pub struct ApiServer {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    pub port: u16,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let tmp = tempfile::Builder::new()
            .prefix("sclb-k8s-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_path_buf();
        let ports = free_ports(3);
        let t = Instant::now();
        let out = Command::new(SCRIPT)
            .arg("start")
            .arg(&dir)
            .args(ports.iter().map(u16::to_string))
            .arg(std::process::id().to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "starting the API server failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "kube-apiserver ready on 127.0.0.1:{} in {:?}",
            ports[0],
            t.elapsed()
        );
        ApiServer {
            dir,
            _tmp: tmp,
            port: ports[0],
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub fn script(&self, cmd: &str) {
        let out = Command::new(SCRIPT)
            .arg(cmd)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{SCRIPT} {cmd} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the API server only; etcd keeps the data.
    pub fn stop_apiserver(&self) {
        self.script("stop-apiserver");
    }

    pub fn start_apiserver(&self) {
        self.script("start-apiserver");
    }

    pub async fn client(&self) -> kube::Client {
        kube_client(&self.kubeconfig()).await
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).arg("stop").arg(&self.dir).output();
    }
}

/// The API server the tests share (each in its own namespace); stopped by the script's
/// watchdog when the test process exits.
pub fn shared() -> Option<&'static ApiServer> {
    static SHARED: OnceLock<ApiServer> = OnceLock::new();
    built().then(|| SHARED.get_or_init(ApiServer::start))
}

pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub async fn kube_client(kubeconfig: &Path) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// One namespace of the cluster, through the admin's client.
pub struct Cluster {
    pub client: kube::Client,
    pub ns: String,
}

impl Cluster {
    pub async fn new(api: &ApiServer, ns: &str) -> Cluster {
        let client = api.client().await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let n = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        namespaces.create(&PostParams::default(), &n).await.unwrap();
        Cluster {
            client,
            ns: ns.to_string(),
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A Spark Connect server pod, bound to a node (so that a delete waits for "the kubelet").
    pub async fn create_pod(&self, name: &str, labels: serde_json::Value, port: u16) -> String {
        let pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": "node-1",
                "containers": [{
                    "name": "spark-connect-server",
                    "image": "docker.io/apache/spark:4.0.4",
                    "ports": [
                        {"name": "driver-rpc-port", "containerPort": 7078},
                        {"name": "spark-connect", "containerPort": port}
                    ]
                }]
            }
        }))
        .unwrap();
        let p = self
            .pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
        p.metadata.uid.unwrap()
    }

    /// The kubelet's report: Running with `ip`, Ready or not.
    pub async fn kubelet(&self, pod: &str, ip: &str, ready: bool) {
        let ready = if ready { "True" } else { "False" };
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [
                {"type": "Ready", "status": ready},
                {"type": "ContainersReady", "status": ready}
            ]
        }});
        self.pods()
            .patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
    }

    /// Deletes a pod: with a grace period it only starts terminating (no kubelet finishes it);
    /// with 0 it is gone.
    pub async fn delete_pod(&self, pod: &str, grace: u32) {
        let dp = DeleteParams {
            grace_period_seconds: Some(grace),
            ..Default::default()
        };
        self.pods().delete(pod, &dp).await.unwrap();
    }

    pub async fn label(&self, pod: &str, labels: serde_json::Value) {
        let patch = json!({"metadata": {"labels": labels}});
        self.pods()
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    pub fn crd(&self, version: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("sparkoperator.k8s.io", version, kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        Api::namespaced_with(self.client.clone(), &self.ns, &ar)
    }

    /// Posts raw YAML (one object) to `path`, as `kubectl apply` would send it.
    pub async fn post_yaml(&self, path: &str, yaml: &str) -> Result<String, kube::Error> {
        let req = http::Request::post(path)
            .header("Content-Type", "application/yaml")
            .body(yaml.as_bytes().to_vec())
            .unwrap();
        self.client.request_text(req).await
    }
}

/// A kubeconfig that authenticates as service account `sa` of `ns` (a TokenRequest).
pub async fn service_account_kubeconfig(api: &ApiServer, k: &Cluster, sa: &str, out: &Path) {
    let req = http::Request::post(format!(
        "/api/v1/namespaces/{}/serviceaccounts/{sa}/token",
        k.ns
    ))
    .header("Content-Type", "application/json")
    .body(
        serde_json::to_vec(&json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600}
        }))
        .unwrap(),
    )
    .unwrap();
    let reply: serde_json::Value =
        serde_json::from_str(&k.client.request_text(req).await.unwrap()).unwrap();
    let token = reply["status"]["token"].as_str().unwrap();
    std::fs::write(
        out,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: local, cluster: {{server: \"https://127.0.0.1:{}\", certificate-authority: {}}}}}]\n\
             users: [{{name: {sa}, user: {{token: {token}}}}}]\n\
             contexts: [{{name: local, context: {{cluster: local, user: {sa}}}}}]\ncurrent-context: local\n",
            api.port,
            api.dir.join("certs/apiserver.crt").display()
        ),
    )
    .unwrap();
}

/// The shipped manifest `file` with its namespace set to `ns`, split into objects.
pub fn manifest(file: &str, ns: &str) -> Vec<String> {
    let text = std::fs::read_to_string(Path::new("deploy/kubernetes").join(file)).unwrap();
    text.replace("namespace: spark", &format!("namespace: {ns}"))
        .split("\n---\n")
        .map(str::to_string)
        .collect()
}

/// Where an object of the shipped manifests is created.
pub fn collection(yaml: &str, ns: &str) -> String {
    let kind = yaml
        .lines()
        .find_map(|l| l.strip_prefix("kind: "))
        .unwrap_or_else(|| panic!("no kind in\n{yaml}"))
        .trim();
    let (prefix, plural) = match kind {
        "ServiceAccount" => ("/api/v1", "serviceaccounts"),
        "ConfigMap" => ("/api/v1", "configmaps"),
        "Service" => ("/api/v1", "services"),
        "Deployment" => ("/apis/apps/v1", "deployments"),
        "Role" => ("/apis/rbac.authorization.k8s.io/v1", "roles"),
        "RoleBinding" => ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
        other => panic!("unexpected kind {other}"),
    };
    format!("{prefix}/namespaces/{ns}/{plural}")
}

/// A TCP relay between sclb and the API server that can be cut (live connections reset, new
/// ones refused) and restored: a network partition between sclb and the API server only.
pub struct Partition {
    addr: SocketAddr,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    pub async fn start(upstream: u16) -> Partition {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = Arc::new(cut);
        let c = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if *c.borrow() {
                    continue; // dropped: the client sees its connection closed at once
                }
                let mut cut = c.subscribe();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Partition { addr, cut, task }
    }

    pub fn set(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// A kubeconfig like `api`'s (same credentials and CA) that goes through the relay.
    pub fn kubeconfig(&self, api: &ApiServer, out: &Path) {
        let kc = std::fs::read_to_string(api.kubeconfig()).unwrap();
        let kc = kc.replace(
            &format!("https://127.0.0.1:{}", api.port),
            &format!("https://{}", self.addr),
        );
        std::fs::write(out, kc).unwrap();
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}
