//! Kubernetes discovery, end to end: a real kube-apiserver (v1.20.2 with etcd, started by
//! `scripts/k8s-apiserver.sh` on ports of its own) and, for what 1.20 cannot serve
//! (EndpointSlice v1) or to replay recorded traffic byte for byte, a fake API server.
//!
//! The tests play the kubelet and the spark-operator by PATCHing `/status`: pods get podIPs
//! 127.0.0.x where a stand-in server listens, and every check looks at what sclb shows (admin
//! socket `show stat` / `show info`, `/metrics`, the stats page) and sends real TCP traffic
//! through sclb to see which server answers.
//!
//! Without a built API server these tests fail with what to do, unless `SCLB_SKIP_K8S=1`.

mod common;

#[path = "k8s/apiserver.rs"]
mod apiserver;
#[path = "k8s/fake.rs"]
mod fake;
#[path = "k8s/lb.rs"]
mod lb;
#[path = "k8s/pool.rs"]
mod pool;
mod realbin;
#[path = "k8s/store.rs"]
mod store;

use std::path::Path;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use apiserver::{
    ApiServer, Cluster, Partition, built, collection, manifest, service_account_kubeconfig, shared,
};
use fake::{FakeApi, wire};
use lb::{at, discovery, eventually, metric, stand_ins, start_lb};

// ---------------------------------------------------------------------------------------------
// Against the real API server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_become_servers_when_ready_drain_when_terminating_and_go_when_deleted() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "pods").await;
    let (port, _servers) = stand_ins(&[("a", 11), ("b", 12), ("other", 13)]).await;
    let role = json!({"spark-role": "connect-server"});
    k.create_pod("a", role.clone(), port).await;
    k.create_pod("b", role.clone(), port).await;
    k.create_pod("other", json!({"spark-role": "driver"}), port)
        .await;
    k.kubelet("other", "127.0.0.13", true).await;
    let lb = start_lb(&discovery(
        "pods",
        "pods",
        "spark-role=connect-server",
        "\"spark-connect\"",
        &api.kubeconfig(),
    ))
    .await;
    lb.expect_info(&[
        "Discovery.be: kubernetes pods in namespace pods",
        "watching, 0 servers",
    ])
    .await;
    lb.expect_pool(&[]).await;

    // add, ready
    k.kubelet("a", "127.0.0.11", true).await;
    lb.expect_pool(&[("a", at(11, port), "UP")]).await;
    assert_eq!(lb.hello(2).await, "a");
    k.kubelet("b", "127.0.0.12", false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    lb.expect_pool(&[("a", at(11, port), "UP")]).await;
    k.kubelet("b", "127.0.0.12", true).await;
    lb.expect_pool(&[("a", at(11, port), "UP"), ("b", at(12, port), "UP")])
        .await;
    let on_b = lb.client_on("b", 3).await;

    // not ready: gone, and its pinned client moves on
    k.kubelet("b", "127.0.0.12", false).await;
    lb.expect_pool(&[("a", at(11, port), "UP")]).await;
    assert_eq!(lb.hello(on_b).await, "a");
    assert_eq!(lb.hello(on_b).await, "a", "the client is now pinned to a");

    // ready again, then terminating: DRAIN keeps its pinned clients, new ones go elsewhere
    k.kubelet("b", "127.0.0.12", true).await;
    lb.expect_pool(&[("a", at(11, port), "UP"), ("b", at(12, port), "UP")])
        .await;
    let on_b = lb.client_on("b", 50).await;
    k.delete_pod("b", 30).await;
    lb.expect_pool(&[("a", at(11, port), "UP"), ("b", at(12, port), "DRAIN")])
        .await;
    assert_eq!(
        lb.hello(on_b).await,
        "b",
        "a pinned client finishes on its draining server"
    );
    assert_eq!(
        lb.hello(100).await,
        "a",
        "a new client goes to a READY server"
    );

    // the kubelet finishes: b is gone, its pins too
    k.delete_pod("b", 0).await;
    lb.expect_pool(&[("a", at(11, port), "UP")]).await;
    let entries = lb.cmd("show table be").await;
    assert!(!entries.contains("server_key=b"), "{entries}");
    assert_eq!(lb.hello(on_b).await, "a");

    // relabel: out of the selector, then back in (a new server: same pod, no pins)
    k.label("a", json!({"spark-role": "off-duty"})).await;
    lb.expect_pool(&[]).await;
    k.label("a", role).await;
    lb.expect_pool(&[("a", at(11, port), "UP")]).await;
    assert_eq!(lb.hello(2).await, "a");
    lb.expect_info(&["Discovery.be:", "watching, 1 servers, 0 errors"])
        .await;
}

/// A pod event changes only the server it is about: an operator's `disable server` on another
/// discovered server holds across it and across a reload; a pinned client whose server went
/// NotReady stays where it moved; a pod deleted and created again under the same name is a
/// new server, with no pins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_event_changes_only_its_own_server() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "patch").await;
    let (port, _servers) = stand_ins(&[("a", 21), ("b", 22), ("c", 23)]).await;
    let role = json!({"spark-role": "connect-server"});
    for (name, ip) in [
        ("a", "127.0.0.21"),
        ("b", "127.0.0.22"),
        ("c", "127.0.0.23"),
    ] {
        k.create_pod(name, role.clone(), port).await;
        k.kubelet(name, ip, true).await;
    }
    let source = discovery(
        "pods",
        "patch",
        "spark-role=connect-server",
        "\"spark-connect\"",
        &api.kubeconfig(),
    );
    let lb = start_lb(&source).await;
    let (a, b, c) = (at(21, port), at(22, port), at(23, port));
    lb.expect_pool(&[("a", a, "UP"), ("b", b, "UP"), ("c", c, "UP")])
        .await;

    // The operator takes a out; pod events about others leave it out.
    assert_eq!(lb.cmd("disable server be/a").await, "\n");
    k.kubelet("c", "127.0.0.23", false).await;
    lb.expect_pool(&[("a", a, "MAINT"), ("b", b, "UP")]).await;
    let on_b = lb.client_on("b", 10).await;
    k.kubelet("c", "127.0.0.23", true).await;
    lb.expect_pool(&[("a", a, "MAINT"), ("b", b, "UP"), ("c", c, "UP")])
        .await;
    assert_eq!(
        lb.hello(on_b).await,
        "b",
        "a pin holds across other pods' events"
    );

    // b flips NotReady and back: its pinned client moves to c and stays there.
    k.kubelet("b", "127.0.0.22", false).await;
    lb.expect_pool(&[("a", a, "MAINT"), ("c", c, "UP")]).await;
    assert_eq!(lb.hello(on_b).await, "c");
    k.kubelet("b", "127.0.0.22", true).await;
    lb.expect_pool(&[("a", a, "MAINT"), ("b", b, "UP"), ("c", c, "UP")])
        .await;
    assert_eq!(lb.hello(on_b).await, "c", "the client is pinned to c now");

    // A reload between events keeps the discovered servers and the operator's word.
    lb.reload_with(Some(&source), "retries = 1").await;
    lb.expect_pool(&[("a", a, "MAINT"), ("b", b, "UP"), ("c", c, "UP")])
        .await;
    k.kubelet("b", "127.0.0.22", false).await;
    lb.expect_pool(&[("a", a, "MAINT"), ("c", c, "UP")]).await;
    assert_eq!(lb.cmd("enable server be/a").await, "\n");
    lb.expect_pool(&[("a", a, "UP"), ("c", c, "UP")]).await;

    // c deleted and created again under its name: a new server, whose pins went with the old.
    k.delete_pod("c", 0).await;
    lb.expect_pool(&[("a", a, "UP")]).await;
    assert!(!lb.cmd("show table be").await.contains("server_key=c"));
    assert_eq!(lb.hello(on_b).await, "a", "the old pin went with the old c");
    k.create_pod("c", role, port).await;
    k.kubelet("c", "127.0.0.23", true).await;
    lb.expect_pool(&[("a", a, "UP"), ("c", c, "UP")]).await;
    let table = lb.cmd("show table be").await;
    assert!(!table.contains("server_key=c"), "{table}");
    assert_eq!(lb.hello(on_b).await, "a", "still pinned where it moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spark_application_is_served_by_its_driver_pod() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "apps").await;
    let (port, _servers) = stand_ins(&[("etl-driver-1", 21), ("etl-driver-2", 22)]).await;
    let apps = k.crd("v1beta2", "SparkApplication", "sparkapplications");
    let app = serde_json::from_value(json!({
        "apiVersion": "sparkoperator.k8s.io/v1beta2",
        "kind": "SparkApplication",
        "metadata": {"name": "etl", "labels": {"team": "data"}},
        "spec": {"type": "Scala", "mode": "cluster", "sparkVersion": "4.0.4",
                 "mainApplicationFile": "local:///opt/spark/connect.jar",
                 "driver": {}, "executor": {}}
    }))
    .unwrap();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let lb = start_lb(&discovery(
        "sparkapplications",
        "apps",
        "team=data",
        &port.to_string(),
        &api.kubeconfig(),
    ))
    .await;
    lb.expect_info(&["Discovery.be: kubernetes sparkapplications", "watching"])
        .await;

    // The operator submits: status.driverInfo, then the driver pod runs and is ready.
    let status = json!({"status": {
        "applicationState": {"state": "RUNNING"},
        "driverInfo": {"podName": "etl-driver"},
        "sparkApplicationId": "spark-0001"
    }});
    apps.patch_status("etl", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let driver = json!({"spark-role": "driver", "sparkoperator.k8s.io/app-name": "etl"});
    k.create_pod("etl-driver", driver.clone(), port).await;
    k.kubelet("etl-driver", "127.0.0.21", true).await;
    lb.expect_pool(&[("etl", at(21, port), "UP")]).await;
    assert_eq!(lb.hello(2).await, "etl-driver-1");

    // The driver is replaced (a new pod, a new IP): a new server; the pinned client moves.
    k.delete_pod("etl-driver", 0).await;
    lb.expect_pool(&[]).await;
    k.create_pod("etl-driver", driver, port).await;
    k.kubelet("etl-driver", "127.0.0.22", true).await;
    lb.expect_pool(&[("etl", at(22, port), "UP")]).await;
    assert_eq!(lb.hello(2).await, "etl-driver-2");

    // The application is deleted: its server goes.
    apps.delete("etl", &DeleteParams::default()).await.unwrap();
    lb.expect_pool(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spark_connect_is_served_at_its_pod_ip_once_ready() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "connects").await;
    let (port, _servers) = stand_ins(&[("connect-server", 31)]).await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let sc = serde_json::from_value(json!({
        "apiVersion": "sparkoperator.k8s.io/v1alpha1",
        "kind": "SparkConnect",
        "metadata": {"name": "sc", "finalizers": ["sclb.test/hold"]},
        "spec": {
            "sparkVersion": "4.0.4",
            "server": {"template": {"spec": {"containers": [
                {"name": "spark-kubernetes-driver", "image": "docker.io/apache/spark:4.0.4"}
            ]}}},
            "executor": {"instances": 1}
        }
    }))
    .unwrap();
    connects.create(&PostParams::default(), &sc).await.unwrap();
    let lb = start_lb(&discovery(
        "sparkconnects",
        "connects",
        "",
        &port.to_string(),
        &api.kubeconfig(),
    ))
    .await;
    lb.expect_info(&["Discovery.be: kubernetes sparkconnects", "watching"])
        .await;
    let set = |state: &str| {
        json!({"status": {"state": state, "server": {
            "podIp": "127.0.0.31", "podName": "sc-server", "serviceName": "sc-svc"}}})
    };
    connects
        .patch_status(
            "sc",
            &PatchParams::default(),
            &Patch::Merge(&set("NotReady")),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    lb.expect_pool(&[]).await;
    connects
        .patch_status("sc", &PatchParams::default(), &Patch::Merge(&set("Ready")))
        .await
        .unwrap();
    lb.expect_pool(&[("sc", at(31, port), "UP")]).await;
    assert_eq!(lb.hello(2).await, "connect-server");

    // Deleted (held by a finalizer): DRAIN; the finalizer goes: removed.
    connects
        .delete("sc", &DeleteParams::default())
        .await
        .unwrap();
    lb.expect_pool(&[("sc", at(31, port), "DRAIN")]).await;
    assert_eq!(lb.hello(2).await, "connect-server");
    let release = json!({"metadata": {"finalizers": null}});
    connects
        .patch("sc", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    lb.expect_pool(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rbac_denial_is_reported_clearly_and_the_shipped_role_is_enough() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "rbac").await;
    let (port, _servers) = stand_ins(&[("a", 41)]).await;
    for yaml in manifest("serviceaccount.yaml", "rbac") {
        k.post_yaml(&collection(&yaml, "rbac"), &yaml)
            .await
            .unwrap();
    }
    k.create_pod("a", json!({"spark-role": "connect-server"}), port)
        .await;
    k.kubelet("a", "127.0.0.41", true).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("sa.kubeconfig");
    service_account_kubeconfig(api, &k, "sclb", &kubeconfig).await;
    let lb = start_lb(&discovery(
        "pods",
        "rbac",
        "spark-role=connect-server",
        &port.to_string(),
        &kubeconfig,
    ))
    .await;

    // No Role yet: the error says who may not do what, and what to grant.
    lb.expect_info(&["Discovery.be:", "forbidden"]).await;
    let err = lb
        .expect_info(&[
            "Discovery.be.LastError: RBAC: forbidden to list pods in namespace \"rbac\"",
        ])
        .await;
    assert!(
        err.contains("grant get, list and watch on pods in namespace \"rbac\"")
            && err.contains("system:serviceaccount:rbac:sclb"),
        "{err}"
    );
    lb.expect_pool(&[]).await;
    let metrics = lb.http_get("/metrics").await;
    assert!(
        metric(&metrics, "sclb_discovery_errors_total{proxy=\"be\"}").unwrap() >= 1.0,
        "{metrics}"
    );
    let page = lb.http_get("/stats").await;
    assert!(page.contains("Discovery is failing"), "{page}");

    // The shipped Role and RoleBinding: sclb's retries succeed.
    for yaml in manifest("rbac.yaml", "rbac") {
        k.post_yaml(&collection(&yaml, "rbac"), &yaml)
            .await
            .unwrap();
    }
    lb.expect_pool(&[("a", at(41, port), "UP")]).await;
    lb.expect_info(&["Discovery.be:", "watching, 1 servers"])
        .await;
    assert_eq!(lb.hello(2).await, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_servers_keep_serving_while_the_api_server_is_down() {
    if !built() {
        return;
    }
    let api = ApiServer::start();
    let k = Cluster::new(&api, "restart").await;
    let (port, _servers) = stand_ins(&[("a", 71), ("b", 72)]).await;
    let role = json!({"spark-role": "connect-server"});
    k.create_pod("a", role.clone(), port).await;
    k.kubelet("a", "127.0.0.71", true).await;
    let lb = start_lb(&discovery(
        "pods",
        "restart",
        "spark-role=connect-server",
        &port.to_string(),
        &api.kubeconfig(),
    ))
    .await;
    lb.expect_pool(&[("a", at(71, port), "UP")]).await;
    let on_a = lb.client_on("a", 2).await;

    api.stop_apiserver();
    lb.expect_info(&["Discovery.be:", "unreachable"]).await;
    lb.expect_info(&["Discovery.be.LastError:", "API server unreachable"])
        .await;
    // Nothing flapped: a is still there, serving new and pinned clients.
    lb.expect_pool(&[("a", at(71, port), "UP")]).await;
    assert_eq!(lb.hello(on_a).await, "a");
    assert_eq!(lb.hello(60).await, "a");
    let metrics = lb.http_get("/metrics").await;
    assert!(
        metric(&metrics, "sclb_discovery_errors_total{proxy=\"be\"}").unwrap() >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "sclb_discovery_servers{proxy=\"be\"}"),
        Some(1.0),
        "{metrics}"
    );
    let page = lb.http_get("/stats").await;
    assert!(
        page.contains("Discovery is failing, the last known servers keep serving"),
        "{page}"
    );

    // Back: the watch resumes (or relists) and changes flow again.
    api.start_apiserver();
    k.create_pod("b", role, port).await;
    k.kubelet("b", "127.0.0.72", true).await;
    lb.expect_pool(&[("a", at(71, port), "UP"), ("b", at(72, port), "UP")])
        .await;
    lb.expect_info(&["Discovery.be:", "watching, 2 servers"])
        .await;
    assert_eq!(lb.hello(on_a).await, "a", "the pinned client stayed on a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_the_api_server_sclb_keeps_its_servers_then_a_relist_catches_up() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "partition").await;
    let (port, _servers) = stand_ins(&[("a", 81), ("b", 82), ("c", 83)]).await;
    let role = json!({"spark-role": "connect-server"});
    for (name, ip) in [("a", "127.0.0.81"), ("b", "127.0.0.82")] {
        k.create_pod(name, role.clone(), port).await;
        k.kubelet(name, ip, true).await;
    }
    let relay = Partition::start(api.port).await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    relay.kubeconfig(api, &kubeconfig);
    let lb = start_lb(&discovery(
        "pods",
        "partition",
        "spark-role=connect-server",
        &port.to_string(),
        &kubeconfig,
    ))
    .await;
    lb.expect_pool(&[("a", at(81, port), "UP"), ("b", at(82, port), "UP")])
        .await;
    let on_a = lb.client_on("a", 2).await;
    let on_b = lb.client_on("b", on_a + 1).await;
    let served = lb.pool().await["a"].2;

    // Cut off, while the cluster changes: b goes, c comes. sclb cannot know, and keeps what it
    // knew: nothing is flapped away.
    relay.set(true);
    lb.expect_info(&["Discovery.be:", "unreachable"]).await;
    k.delete_pod("b", 0).await;
    k.create_pod("c", role, port).await;
    k.kubelet("c", "127.0.0.83", true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    lb.expect_pool(&[("a", at(81, port), "UP"), ("b", at(82, port), "UP")])
        .await;
    assert_eq!(lb.hello(on_b).await, "b");

    // Back: one relist brings sclb up to date.
    relay.set(false);
    lb.expect_pool(&[("a", at(81, port), "UP"), ("c", at(83, port), "UP")])
        .await;
    lb.expect_info(&["Discovery.be:", "watching, 2 servers"])
        .await;
    // a was never dropped: the same server, with its counters and its pinned client.
    assert!(lb.pool().await["a"].2 >= served);
    assert_eq!(lb.hello(on_a).await, "a");
    assert_ne!(
        lb.hello(on_b).await,
        "b",
        "b's client moved to a live server"
    );
}

#[test]
fn the_discovery_config_reads_into_typed_settings() {
    use sclb::config::{KubernetesKind, PortRef};
    let c = sclb::config::load(Path::new("tests/fixtures/config/valid/kubernetes.toml")).unwrap();
    let d = |i: usize| c.backends[i].discovery.clone().unwrap();
    // `[backend.discovery.kubernetes]` after `[[backend]]` belongs to that backend.
    let drivers = d(0);
    assert_eq!(drivers.kind, KubernetesKind::Pods);
    assert_eq!(drivers.namespaces, ["spark"]);
    assert_eq!(drivers.port, PortRef::Name("spark-connect".into()));
    assert_eq!(
        drivers.kubeconfig.as_deref(),
        Some(Path::new("/etc/sclb/kubeconfig"))
    );
    assert_eq!(
        c.backends[0].servers.len(),
        1,
        "static servers beside discovery"
    );
    let connects = d(1);
    assert_eq!(connects.kind, KubernetesKind::SparkConnects);
    assert_eq!(connects.namespaces, ["team-a", "team-b"]);
    assert_eq!(
        connects.port,
        PortRef::Number(15002),
        "Spark Connect's port by default"
    );
    assert_eq!(connects.selector, None);
    let apps = d(2);
    assert_eq!(apps.kind, KubernetesKind::SparkApplications);
    assert!(apps.namespaces.is_empty(), "no namespace: all of them");
    assert_eq!(apps.port, PortRef::Number(15003));
    assert_eq!(d(3).kind, KubernetesKind::EndpointSlices);
    assert_eq!(c.backends[3].servers.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_manifests_are_accepted_by_the_api_server() {
    // The ConfigMap's sclb.toml is a valid config with the documented discovery.
    let cm = std::fs::read_to_string("deploy/kubernetes/configmap.yaml").unwrap();
    let toml: String = cm
        .split("sclb.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let c =
        sclb::config::parse(Path::new("configmap.yaml"), &toml).unwrap_or_else(|e| panic!("{e:?}"));
    let d = c.backends[0].discovery.as_ref().unwrap();
    assert_eq!(d.kind, sclb::config::KubernetesKind::Pods);
    assert_eq!(d.namespaces, ["spark"]);
    // The replicated kit's config is a gateway sharing sessions through the kubernetes store
    // in the kit's namespace (its RBAC: replicated/rbac-store.yaml, tested in store.rs).
    let c = sclb::config::load(Path::new("deploy/kubernetes/replicated/sclb.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    let sclb::config::StoreConfig::Kubernetes(store) = &c.global.store else {
        panic!("{:?}", c.global.store);
    };
    assert_eq!(store.namespace, "spark");
    assert!(c.frontends[0].grpc.is_some());
    // Its PodDisruptionBudget (policy/v1, which the test API server does not serve) is a
    // well-formed one that selects sclb's pods.
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget = serde_saphyr::from_str(
        &std::fs::read_to_string("deploy/kubernetes/replicated/pdb.yaml").unwrap(),
    )
    .unwrap();
    let spec = pdb.spec.unwrap();
    assert_eq!(
        spec.min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        spec.selector.unwrap().match_labels.unwrap()["app.kubernetes.io/name"],
        "sclb"
    );

    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "spark").await;
    for file in [
        "serviceaccount.yaml",
        "rbac.yaml",
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "replicated/rbac-store.yaml",
    ] {
        for yaml in manifest(file, "spark") {
            let path = format!("{}?dryRun=All", collection(&yaml, "spark"));
            if let Err(e) = k.post_yaml(&path, &yaml).await {
                panic!("{file} refused: {e}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_v1_ready_endpoints_serve_and_terminating_ones_drain() {
    let (port, _servers) = stand_ins(&[("a", 61), ("b", 62), ("c", 63)]).await;
    let ips = [("10.244.1.5", 61), ("10.244.2.7", 62), ("10.244.3.9", 63)];
    let list = wire("endpointslices-list.json", &ips, port);
    let relist = wire("endpointslices-relist.json", &ips, port);
    let fake = FakeApi::start(vec![list, relist]).await;
    let lb = start_lb(&discovery(
        "endpointslices",
        "spark",
        "kubernetes.io/service-name=spark-connect",
        "\"spark-connect\"",
        &fake.kubeconfig,
    ))
    .await;
    lb.expect_pool(&[
        ("connect-a", at(61, port), "UP"),
        ("connect-b", at(62, port), "UP"),
    ])
    .await;
    let watch = &fake.watches(1).await[0];
    assert!(
        watch.starts_with("/apis/discovery.k8s.io/v1/namespaces/spark/endpointslices?")
            && watch.contains("labelSelector=kubernetes.io%2Fservice-name%3Dspark-connect")
            && watch.contains("allowWatchBookmarks=true")
            && watch.contains("resourceVersion=219"),
        "{watch}"
    );
    let on_b = lb.client_on("b", 2).await;
    let served = lb.pool().await["connect-a"].2;

    let events = wire("endpointslices-watch.jsonl", &ips, port);
    let mut events = events.lines();
    // b terminating but serving: DRAIN, its pinned client stays; c ready: added.
    fake.send(events.next().unwrap());
    lb.expect_pool(&[
        ("connect-a", at(61, port), "UP"),
        ("connect-b", at(62, port), "DRAIN"),
        ("connect-c", at(63, port), "UP"),
    ])
    .await;
    assert_eq!(lb.hello(on_b).await, "b");
    // b leaves the slice: removed.
    fake.send(events.next().unwrap());
    lb.expect_pool(&[
        ("connect-a", at(61, port), "UP"),
        ("connect-c", at(63, port), "UP"),
    ])
    .await;
    assert_ne!(lb.hello(on_b).await, "b");

    // The recorded 410: sclb lists again, and nothing it still sees is dropped on the way.
    fake.send(wire("watch410-error.jsonl", &[], port).trim());
    fake.end_watch();
    fake.watches(2).await;
    assert_eq!(fake.requests(false).len(), 2, "one list, then one relist");
    lb.expect_info(&[
        "Discovery.be.LastError:",
        "410 Gone: too old resource version: 1 (214)",
    ])
    .await;
    lb.expect_pool(&[
        ("connect-a", at(61, port), "UP"),
        ("connect-c", at(63, port), "UP"),
    ])
    .await;
    assert!(lb.pool().await["connect-a"].2 >= served);
    assert!(fake.requests(true)[1].contains("resourceVersion=222"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_pod_watch_is_followed_event_by_event() {
    let (port, _servers) = stand_ins(&[("spark-pi-driver", 51)]).await;
    let empty =
        r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"232"},"items":[]}"#;
    let fake = FakeApi::start(vec![empty.to_string()]).await;
    let lb = start_lb(&discovery(
        "pods",
        "default",
        "spark-role=driver",
        "\"spark-connect\"",
        &fake.kubeconfig,
    ))
    .await;
    fake.watches(1).await;
    let recording = wire("pods-watch.jsonl", &[("10.244.0.17", 51)], port);
    let events: Vec<&str> = recording.lines().collect();
    let drv = at(51, port);
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    // ADDED, Pending: not a server yet.
    fake.send(events[0]);
    settle().await;
    lb.expect_pool(&[]).await;
    // MODIFIED: Running and Ready with its IP.
    fake.send(events[1]);
    lb.expect_pool(&[("spark-pi-driver", drv, "UP")]).await;
    assert_eq!(lb.hello(2).await, "spark-pi-driver");
    // DELETED (relabelled out of the selector), ADDED (back in).
    fake.send(events[2]);
    lb.expect_pool(&[]).await;
    fake.send(events[3]);
    lb.expect_pool(&[("spark-pi-driver", drv, "UP")]).await;
    // MODIFIED with deletionTimestamp: DRAIN; DELETED: gone; BOOKMARKs change nothing.
    fake.send(events[4]);
    lb.expect_pool(&[("spark-pi-driver", drv, "DRAIN")]).await;
    fake.send(events[5]);
    lb.expect_pool(&[]).await;
    fake.send(events[6]);
    fake.send(events[7]);
    settle().await;
    lb.expect_pool(&[]).await;
    lb.expect_info(&["Discovery.be:", "watching, 0 servers, 0 errors"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_an_unchanged_source_restarts_a_changed_one_and_stops_a_removed_one() {
    let (port, _servers) = stand_ins(&[("spark-pi-driver", 91)]).await;
    // The recorded pod, Running and Ready, as a list item.
    let recording = wire("pods-watch.jsonl", &[("10.244.0.17", 91)], port);
    let pod: serde_json::Value = serde_json::from_str::<serde_json::Value>(
        recording.lines().nth(1).unwrap(),
    )
    .unwrap()["object"]
        .clone();
    let list = json!({"kind": "PodList", "apiVersion": "v1",
                      "metadata": {"resourceVersion": "234"}, "items": [pod]});
    let fake = FakeApi::start(vec![list.to_string()]).await;
    let source = |selector: &str| {
        discovery(
            "pods",
            "default",
            selector,
            &port.to_string(),
            &fake.kubeconfig,
        )
    };
    let lb = start_lb(&source("spark-role=driver")).await;
    let drv = at(91, port);
    lb.expect_pool(&[("spark-pi-driver", drv, "UP")]).await;
    fake.watches(1).await;
    let on = lb.client_on("spark-pi-driver", 2).await;

    // Another setting changes: the source keeps running (no new list), the server stays.
    let summary = lb
        .reload_with(Some(&source("spark-role=driver")), "retries = 2")
        .await;
    assert!(summary.contains("backends +0 -0 ~1"), "{summary}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.requests(false).len(), 1, "{:?}", fake.requests(false));
    lb.expect_pool(&[("spark-pi-driver", drv, "UP")]).await;

    // The selector changes: a new watch lists with it; the server is kept across.
    lb.reload_with(
        Some(&source("spark-role=driver,spark-version")),
        "retries = 2",
    )
    .await;
    eventually("a list with the new selector", || async {
        let lists = fake.requests(false);
        match lists.last() {
            Some(l) if lists.len() == 2 && l.contains("spark-version") => Ok(()),
            _ => Err(format!("{lists:?}")),
        }
    })
    .await;
    lb.expect_pool(&[("spark-pi-driver", drv, "UP")]).await;
    assert_eq!(lb.hello(on).await, "spark-pi-driver", "the pin survived");

    // Discovery is removed: its servers go, and so does its status.
    lb.reload_with(None, "retries = 2").await;
    lb.expect_pool(&[]).await;
    let info = lb.cmd("show info").await;
    assert!(!info.contains("Discovery."), "{info}");
}

// ---------------------------------------------------------------------------------------------
// Gateway: drivers by header and on demand, against the real API server.

#[path = "common/grpc.rs"]
mod grpc;

/// The gateway config for on-demand SparkConnects in `sjns-{team}-{environment}`, and the
/// template an operator would write.
fn on_demand_config(dir: &Path, api: &ApiServer, port: u16, ns: &str) -> std::path::PathBuf {
    let template = dir.join("sparkconnect.yaml");
    std::fs::write(
        &template,
        r#"apiVersion: sparkoperator.k8s.io/v1alpha1
kind: SparkConnect
metadata:
  name: "{name}"
  labels:
    team: "{team}"
spec:
  sparkVersion: 4.0.5
  server:
    template:
      spec:
        containers:
          - name: spark-kubernetes-driver
            image: docker.io/apache/spark:4.0.5
  executor:
    instances: 1
"#,
    )
    .unwrap();
    let cfg = dir.join("sclb.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[global]
admin = {{ path = "{sock}", mode = "0600", level = "admin" }}
[defaults]
timeout = {{ connect = "1s" }}
check = {{ type = "none" }}

[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:0"]
backend = "drivers"
sessions = {{ idle_timeout = "2s", cleanup_interval = "200ms" }}
on_demand = {{ template = "{template}", name = "spark-connect-{{team}}-{{random}}", namespace = "sjns-{{team}}-{{environment}}", ready_timeout = "30s", max_sessions_per_team = 1 }}

[[backend]]
name = "drivers"
[backend.discovery.kubernetes]
kind = "sparkconnects"
namespace = "{ns}"
port = {port}
kubeconfig = "{kc}"
"#,
            sock = dir.join("admin.sock").display(),
            template = template.display(),
            kc = api.kubeconfig().display(),
        ),
    )
    .unwrap();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_creates_a_driver_per_new_session_and_deletes_it_when_the_session_ends() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-data-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let driver =
        grpc::FakeGrpc::start_on("driver", "127.0.0.41".parse().unwrap(), Default::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = on_demand_config(dir.path(), api, driver.addr.port(), &k.ns);
    let lb = sclb::Sclb::start(sclb::config::load(&cfg).unwrap_or_else(|e| panic!("{e}")))
        .await
        .unwrap();
    let gw = lb.local_addrs("gw")[0];
    let admin_sock = dir.path().join("admin.sock");
    let admin = |line: &'static str| common::admin(&admin_sock, line);
    let team = [("x-spark-team", "data"), ("x-spark-environment", "dev")];

    // A new session, no driver named: its first RPC is held while sclb creates one...
    let s = grpc::session(41);
    let mut c = grpc::Client::connect(gw).await;
    let first = {
        let body = grpc::request("01_Config_set.bin", &s);
        let mut c2 = grpc::Client::connect(gw).await;
        tokio::spawn(async move { grpc::finish(c2.start_with("Config", body, &team).await).await })
    };
    let name = eventually("sclb creates a SparkConnect", || {
        let connects = connects.clone();
        async move {
            let list = connects.list(&Default::default()).await.unwrap();
            list.items
                .first()
                .map(|o| o.metadata.name.clone().unwrap())
                .ok_or_else(|| "no SparkConnect yet".to_string())
        }
    })
    .await;
    assert!(name.starts_with("spark-connect-data-"), "{name}");
    let obj = connects.get(&name).await.unwrap();
    assert_eq!(obj.labels()["app.kubernetes.io/managed-by"], "sclb");
    assert_eq!(obj.labels()["team"], "data", "the template was filled in");
    assert_eq!(obj.annotations()["sclb.io/spark-session"], s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!first.is_finished(), "held until the driver is ready");

    // ... until the operator (this test) reports the driver ready at its pod IP.
    let ready = json!({"status": {"state": "Ready", "server": {
        "podIp": "127.0.0.41", "podName": format!("{name}-server")}}});
    connects
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), first)
        .await
        .expect("the held RPC completes")
        .unwrap();
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(r.server(), "driver");
    assert_eq!(
        r.headers["x-spark-session-id"],
        name.as_str(),
        "the client learns its driver"
    );

    // Later RPCs of the session follow it without headers; no second driver.
    let r = c
        .call(
            "ExecutePlan",
            grpc::request("04_ExecutePlan_root_aggregate.bin", &s),
        )
        .await;
    assert_eq!((r.status, r.server()), (0, "driver"));
    assert_eq!(
        connects
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(driver.methods(&s), ["Config", "ExecutePlan"]);
    let shown = admin("show sessions").await;
    assert!(
        shown.contains(&format!("{s}: user=sclb-test fe=gw be=drivers srv={name} ")),
        "{shown}"
    );
    assert!(
        shown.contains(&format!(" app=sjns-data-dev/{name} created\n")),
        "{shown}"
    );

    // The team is at max_sessions_per_team.
    let other = grpc::session(42);
    let r = grpc::finish(
        c.start_with("Config", grpc::request("01_Config_set.bin", &other), &team)
            .await,
    )
    .await;
    assert_eq!(r.status, 8, "RESOURCE_EXHAUSTED: {r:?}");

    // Route 1: a header names the driver (another session joins it); an unknown name is
    // NOT_FOUND naming it.
    let by_name = [
        ("x-spark-session-id", name.as_str()),
        ("x-spark-namespace", "sjns-data-dev"),
    ];
    let r = grpc::finish(
        c.start_with(
            "Config",
            grpc::request("01_Config_set.bin", &grpc::session(43)),
            &by_name,
        )
        .await,
    )
    .await;
    assert_eq!((r.status, r.server()), (0, "driver"), "{r:?}");
    let r = grpc::finish(
        c.start_with(
            "Config",
            grpc::request("01_Config_set.bin", &grpc::session(44)),
            &[("x-spark-session-id", "no-such-app")],
        )
        .await,
    )
    .await;
    assert_eq!(r.status, 5, "NOT_FOUND: {r:?}");
    assert!(r.message.contains("no-such-app"), "{}", r.message);

    // Idle: the session ends, its driver is deleted, the server asked to release it.
    eventually("the idle session's driver is deleted", || {
        let connects = connects.clone();
        async move {
            let list = connects.list(&Default::default()).await.unwrap();
            let names: Vec<String> = list
                .items
                .iter()
                .filter_map(|o| o.metadata.name.clone())
                .collect();
            if names.is_empty() {
                Ok(())
            } else {
                Err(format!("still there: {names:?}"))
            }
        }
    })
    .await;
    eventually("the server asked to release the session", || async {
        let seen = driver.methods(&s);
        if seen.contains(&"ReleaseSession".to_string()) {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    eventually("every session reaped", || async {
        let shown = admin("show sessions").await;
        if shown == "# sessions: 0\n\n" {
            Ok(())
        } else {
            Err(shown)
        }
    })
    .await;
    lb.shutdown(Duration::from_secs(1)).await;
}

/// Two gateway replicas get the first RPC of one new session at once (behind one Service,
/// a client's retry can land on either). With `{session}` in the name pattern both derive the
/// same driver name: exactly one driver is created, the loser's create finds it (the
/// annotation says it is this session's) and both RPCs are served by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_on_a_new_session_create_one_driver() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-race-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let driver =
        grpc::FakeGrpc::start_on("driver", "127.0.0.42".parse().unwrap(), Default::default()).await;
    let mut replicas = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let cfg = on_demand_config(dir.path(), api, driver.addr.port(), &k.ns);
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("spark-connect-{team}-{random}", "spark-connect-{session}");
        std::fs::write(&cfg, text).unwrap();
        let lb = sclb::Sclb::start(sclb::config::load(&cfg).unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap();
        replicas.push(lb);
        dirs.push(dir);
    }
    let team = [("x-spark-team", "race"), ("x-spark-environment", "dev")];
    let s = grpc::session(44);
    let first: Vec<_> = replicas
        .iter()
        .map(|lb| {
            let (gw, body) = (
                lb.local_addrs("gw")[0],
                grpc::request("01_Config_set.bin", &s),
            );
            tokio::spawn(async move {
                let mut c = grpc::Client::connect(gw).await;
                grpc::finish(c.start_with("Config", body, &team).await).await
            })
        })
        .collect();
    let name = eventually("a SparkConnect for the session", || {
        let connects = connects.clone();
        async move {
            let list = connects.list(&Default::default()).await.unwrap();
            list.items
                .first()
                .map(|o| o.metadata.name.clone().unwrap())
                .ok_or_else(|| "none yet".to_string())
        }
    })
    .await;
    assert!(name.starts_with("spark-connect-"), "{name}");
    let ready = json!({"status": {"state": "Ready", "server": {
        "podIp": "127.0.0.42", "podName": format!("{name}-server")}}});
    connects
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    for rpc in first {
        let r = tokio::time::timeout(Duration::from_secs(30), rpc)
            .await
            .expect("the held RPC completes")
            .unwrap();
        assert_eq!((r.status, r.server()), (0, "driver"), "{r:?}");
    }
    let list = connects.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), 1, "one driver for one session");
    assert_eq!(driver.methods(&s), ["Config", "Config"]);
}
