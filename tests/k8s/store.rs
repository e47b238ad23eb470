//! `store = { kind = "kubernetes" }` on the real binary against the real API server: session
//! records (Leases for static servers, annotations on on-demand drivers) shared by replicas,
//! the reaper Lease (one replica reaps; another takes over when it dies; none reaps without
//! it), and orphaned drivers adopted or deleted.

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::apiserver::{ApiServer, Cluster, Partition, shared};
use crate::grpc::{self, Behaviour, Client, FakeGrpc, expect_placed, open, request, session};
use crate::lb::eventually;
use crate::realbin::SclbProcess;

/// `[global] store = { kind = "kubernetes" }` in `ns`, with quick intervals.
pub(crate) fn store_line(api: &ApiServer, ns: &str, extra: &str) -> String {
    format!(
        "store = {{ kind = \"kubernetes\", namespace = \"{ns}\", lease = \"sclb-reaper\", kubeconfig = \"{}\", lease_duration = \"3s\", activity_interval = \"1s\", sync_interval = \"300ms\"{extra} }}",
        api.kubeconfig().display()
    )
}

/// A gateway on static servers sharing sessions through the kubernetes store.
fn static_config(
    dir: &Path,
    api: &ApiServer,
    ns: &str,
    servers: &[&FakeGrpc],
    idle: &str,
) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ name = \"{}\", addr = \"{}\" }}", s.name, s.addr))
        .collect();
    format!(
        r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{dir}/admin.sock", mode = "0600", level = "admin" }}
{store}

[defaults]
timeout = {{ connect = "1s", queue = "2s" }}
check = {{ type = "none" }}

[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:0"]
backend = "spark"
sessions = {{ idle_timeout = "{idle}", cleanup_interval = "200ms" }}

[[backend]]
name = "spark"
servers = [ {list} ]
"#,
        dir = dir.display(),
        store = store_line(api, ns, ""),
        list = list.join(", ")
    )
}

/// The session Leases in `k`'s namespace: name → annotations.
async fn session_leases(k: &Cluster) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    let leases: Api<Lease> = Api::namespaced(k.client.clone(), &k.ns);
    let lp = ListParams::default().labels("app.kubernetes.io/component=spark-session");
    leases
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|l| (l.name_any(), l.annotations().clone()))
        .collect()
}

fn sessions_shown(p: &SclbProcess) -> usize {
    let shown = p.admin("show sessions");
    shown
        .strip_prefix("# sessions: ")
        .and_then(|r| r.split('\n').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Waits until `k`'s namespace holds `n` session Leases.
async fn leases_become(k: &Cluster, n: usize, what: &str) {
    eventually(what, || async {
        let has = session_leases(k).await.len();
        if has == n {
            Ok(())
        } else {
            Err(format!("{has} Leases"))
        }
    })
    .await;
}

/// Waits (polling, within `within`) for `cond`.
async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn holds_lease(p: &SclbProcess) -> bool {
    p.log_text().contains("reaper lease acquired")
}

/// Two replicas with `config(dir)`: the first holds the reaper Lease before the second starts.
async fn holder_then_other(
    d1: &Path,
    d2: &Path,
    config: impl Fn(&Path) -> String,
) -> (SclbProcess, SclbProcess) {
    let mut one = SclbProcess::start(d1, &config(d1), &[]);
    one.frontend_addr("gw");
    until(
        "the first replica holds the reaper Lease",
        Duration::from_secs(20),
        || holds_lease(&one),
    )
    .await;
    let mut two = SclbProcess::start(d2, &config(d2), &[]);
    two.frontend_addr("gw");
    (one, two)
}

/// Cut off from the API server, a replica fails no RPC: its sessions keep their servers and
/// new ones are bound locally; once it reaches the API server again, their Leases are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_the_api_server_sessions_route_and_are_recorded_after() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-cut").await;
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let relay = Partition::start(api.port).await;
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = d.path().join("relay.kubeconfig");
    relay.kubeconfig(api, &kubeconfig);
    let cfg = static_config(d.path(), api, &k.ns, &[&a, &b], "10m").replace(
        &api.kubeconfig().display().to_string(),
        &kubeconfig.display().to_string(),
    );
    let mut one = SclbProcess::start(d.path(), &cfg, &[]);
    let mut c = Client::connect(one.frontend_addr("gw")).await;
    let mut placed = open(&mut c, 0..4).await;
    assert_eq!(session_leases(&k).await.len(), 4);

    relay.set(true);
    expect_placed(&mut c, 0..4, &placed, "while cut off").await;
    placed.extend(open(&mut c, 4..6).await);
    expect_placed(&mut c, 0..6, &placed, "while cut off").await;
    until("the outage is logged", Duration::from_secs(10), || {
        one.log_text().contains("unreachable")
    })
    .await;
    assert_eq!(
        session_leases(&k).await.len(),
        4,
        "nothing written meanwhile"
    );

    relay.set(false);
    leases_become(&k, 6, "the sessions bound while cut off are recorded").await;
    expect_placed(&mut c, 0..6, &placed, "after the outage").await;
}

/// Sessions opened through one replica are recorded as Leases and reach the same servers
/// through another replica (balanced there afresh, in reverse order, they would not); a
/// replica killed and started again routes them as before; a session released through one
/// replica ends at the other and its Lease goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_shared_by_replicas_and_outlive_a_restart() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-shared").await;
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg1 = static_config(d1.path(), api, &k.ns, &[&a, &b], "10m");
    let mut one = SclbProcess::start(d1.path(), &cfg1, &[]);
    let mut two = SclbProcess::start(
        d2.path(),
        &static_config(d2.path(), api, &k.ns, &[&a, &b], "10m"),
        &[],
    );
    let mut c1 = Client::connect(one.frontend_addr("gw")).await;
    let placed = open(&mut c1, 0..10).await;
    assert!(placed.iter().any(|s| s == "sc1") && placed.iter().any(|s| s == "sc2"));
    let leases = session_leases(&k).await;
    assert_eq!(leases.len(), 10, "one Lease per session: {leases:?}");
    let (_, ann) = &leases[0];
    for key in [
        "sclb.io/spark-session",
        "sclb.io/user",
        "sclb.io/server",
        "sclb.io/created",
        "sclb.io/last-activity",
    ] {
        assert!(ann.contains_key(key), "{key} in {ann:?}");
    }

    let mut c2 = Client::connect(two.frontend_addr("gw")).await;
    expect_placed(&mut c2, 0..10, &placed, "through the second replica").await;
    for n in 0..10u32 {
        let other = if placed[n as usize] == "sc1" { &b } else { &a };
        assert!(other.methods(&session(n)).is_empty(), "session {n} split");
    }

    // Released through the second: the first ends it too, and its Lease is gone.
    let r = c2
        .call(
            "ReleaseSession",
            request("18_ReleaseSession_request.bin", &session(0)),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    until(
        "the first replica ends the released session",
        Duration::from_secs(20),
        || sessions_shown(&one) == 9,
    )
    .await;
    leases_become(&k, 9, "the released session's Lease is deleted").await;
    let r = c1
        .call(
            "AnalyzePlan",
            request("03_AnalyzePlan_schema.bin", &session(0)),
        )
        .await;
    assert!(r.message.contains("released"), "{r:?}");

    // The first replica dies (kill -9) and starts again knowing nothing but the store.
    drop(c1);
    drop(one);
    let mut one = SclbProcess::start(d1.path(), &cfg1, &[]);
    let mut c1 = Client::connect(one.frontend_addr("gw")).await;
    expect_placed(&mut c1, 1..10, &placed, "after a restart").await;
    assert_eq!(session_leases(&k).await.len(), 9, "no second record");
}

/// The replica that holds the reaper Lease is killed: the other takes the Lease over once it
/// has seen it unrenewed for its duration (3 s) and reaps the idle session — releases it on
/// its server, deletes its Lease — within the idle timeout, the activity slack and the lease
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_reaper_dies_another_replica_reaps() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-reaper").await;
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (one, mut two) = holder_then_other(d1.path(), d2.path(), |d| {
        static_config(d, api, &k.ns, &[&a], "4s")
    })
    .await;
    let mut c = Client::connect(two.frontend_addr("gw")).await;
    open(&mut c, 0..1).await;
    until(
        "the first replica learns the session",
        Duration::from_secs(10),
        || sessions_shown(&one) == 1,
    )
    .await;
    assert!(!holds_lease(&two));
    let killed = Instant::now();
    drop(one);

    leases_become(&k, 0, "the session's Lease is reaped").await;
    let took = killed.elapsed();
    // idle 4 s + slack (2 × 1 s + 0.3 s) + lease 3 s + cleanup and sync rounds.
    assert!(took < Duration::from_secs(20), "reaped after {took:?}");
    assert!(holds_lease(&two), "the second replica took the Lease over");
    let leases: Api<Lease> = Api::namespaced(k.client.clone(), &k.ns);
    let lease = leases.get("sclb-reaper").await.unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    assert!(holder.ends_with(&format!("-{}", two.pid)), "{holder}");
    until(
        "the reaped session is ended",
        Duration::from_secs(10),
        || sessions_shown(&two) == 0,
    )
    .await;
    // The release on the server goes out beside the record's end: waited for, not assumed.
    until("released on its server", Duration::from_secs(10), || {
        a.methods(&session(0))
            .contains(&"ReleaseSession".to_string())
    })
    .await;
}

/// A session used only through the replica that does not reap stays alive: its activity,
/// written to its Lease, keeps the reaper (the other replica) from ending it; once unused, it
/// is reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_through_another_replica_keeps_a_session_from_the_reaper() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-activity").await;
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (reaper, mut other) = holder_then_other(d1.path(), d2.path(), |d| {
        static_config(d, api, &k.ns, &[&a], "3s")
    })
    .await;
    let mut c = Client::connect(other.frontend_addr("gw")).await;
    open(&mut c, 0..1).await;
    // 12 s of use through the other replica: idle 3 s + slack 2.3 s twice over.
    let until_t = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until_t {
        let r = c
            .call(
                "AnalyzePlan",
                request("03_AnalyzePlan_schema.bin", &session(0)),
            )
            .await;
        assert_eq!(r.status, 0, "the session is alive: {r:?}");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert_eq!(session_leases(&k).await.len(), 1);
    assert!(!reaper.log_text().contains("deleted by the reaper"));
    // Unused now: the reaper ends it.
    leases_become(&k, 0, "the unused session is reaped").await;
    // The Lease is gone once the API server answers; the line follows it into the log.
    eventually("the reaper's log line", || async {
        let log = reaper.log_text();
        if log.contains("deleted by the reaper (idle)") {
            Ok(())
        } else {
            Err(log.lines().rev().take(10).collect::<Vec<_>>().join("\n"))
        }
    })
    .await;
}

/// A replica stopped gracefully (SIGTERM) hands the reaper Lease over at once: the other holds
/// it well within the Lease's 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_the_reaper_lease_over() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-handover").await;
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg = |d: &Path| {
        static_config(d, api, &k.ns, &[&a], "10m")
            .replace("lease_duration = \"3s\"", "lease_duration = \"30s\"")
    };
    let (one, two) = holder_then_other(d1.path(), d2.path(), cfg).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(one.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = Instant::now();
    until(
        "the second replica takes the Lease",
        Duration::from_secs(20),
        || holds_lease(&two),
    )
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "taken over after {:?}, not at once",
        stopped.elapsed()
    );
    assert!(one.log_text().contains("reaper lease released"));
}

/// Someone else holds the reaper Lease (renewing it): sclb deletes nothing, however idle its
/// session; once the holder stops renewing, sclb takes the Lease over and reaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_the_reaper_lease_deletes_nothing() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-no-lease").await;
    let leases: Api<Lease> = Api::namespaced(k.client.clone(), &k.ns);
    let lease = serde_json::from_value(json!({
        "metadata": {"name": "sclb-reaper"},
        "spec": {"holderIdentity": "another-sclb", "leaseDurationSeconds": 3}
    }))
    .unwrap();
    leases.create(&PostParams::default(), &lease).await.unwrap();
    let renew = {
        let leases = leases.clone();
        tokio::spawn(async move {
            loop {
                let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                    k8s_openapi::jiff::Timestamp::now(),
                );
                let patch = json!({"spec": {"renewTime": now}});
                if let Err(e) = leases
                    .patch(
                        "sclb-reaper",
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    eprintln!("renewing the test's Lease: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let d = tempfile::tempdir().unwrap();
    let mut one = SclbProcess::start(
        d.path(),
        &static_config(d.path(), api, &k.ns, &[&a], "1s"),
        &[],
    );
    let mut c = Client::connect(one.frontend_addr("gw")).await;
    open(&mut c, 0..1).await;
    // Idle 1 s + slack 2.3 s: due long before this, were it the reaper.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(session_leases(&k).await.len(), 1, "nothing deleted");
    assert_eq!(sessions_shown(&one), 1);
    assert!(!holds_lease(&one));

    renew.abort();
    leases_become(&k, 0, "sclb takes the Lease over and reaps").await;
    assert!(holds_lease(&one));
    until("the session is ended", Duration::from_secs(10), || {
        sessions_shown(&one) == 0
    })
    .await;
}

/// An on-demand gateway with the kubernetes store; `{random}` driver names, so that only the
/// record (the driver's annotations) can tell another replica which driver is the session's.
fn on_demand_store_config(
    dir: &Path,
    api: &ApiServer,
    port: u16,
    ns: &str,
    idle: &str,
    extra: &str,
) -> String {
    let cfg = crate::on_demand_config(dir, api, port, ns);
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(text.contains("idle_timeout = \"2s\""));
    text.replace(
        "idle_timeout = \"2s\"",
        &format!("idle_timeout = \"{idle}\""),
    )
    .replacen(
        "[global]\n",
        &format!(
            "[global]\nlog = {{ level = \"info\", format = \"json\" }}\n{}\n",
            store_line(api, ns, extra)
        ),
        1,
    )
}

async fn drivers(connects: &Api<kube::api::DynamicObject>) -> Vec<String> {
    connects
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|o| o.name_any())
        .collect()
}

/// A session whose driver replica 1 created is routed by replica 2 to that driver (no second
/// driver), and by replica 1 after its restart; the driver carries the session's record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_driver_is_its_sessions_record_for_every_replica() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-rec-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let driver =
        FakeGrpc::start_on("driver", "127.0.0.51".parse().unwrap(), Default::default()).await;
    let port = driver.addr.port();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg1 = on_demand_store_config(d1.path(), api, port, &k.ns, "60s", "");
    let mut one = SclbProcess::start(d1.path(), &cfg1, &[]);
    let mut two = SclbProcess::start(
        d2.path(),
        &on_demand_store_config(d2.path(), api, port, &k.ns, "60s", ""),
        &[],
    );
    let team = [("x-spark-team", "rec"), ("x-spark-environment", "dev")];
    let s = session(51);
    let gw1 = one.frontend_addr("gw");
    let first = {
        let body = request("01_Config_set.bin", &s);
        tokio::spawn(async move {
            let mut c = Client::connect(gw1).await;
            grpc::finish(c.start_with("Config", body, &team).await).await
        })
    };
    let name = eventually("replica 1 creates the driver", || {
        let connects = connects.clone();
        async move {
            drivers(&connects)
                .await
                .pop()
                .ok_or_else(|| "none".to_string())
        }
    })
    .await;
    let ready = json!({"status": {"state": "Ready", "server": {
        "podIp": "127.0.0.51", "podName": format!("{name}-server")}}});
    connects
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("the held RPC completes")
        .unwrap();
    assert_eq!((r.status, r.server()), (0, "driver"), "{r:?}");
    let ann = connects.get(&name).await.unwrap().annotations().clone();
    assert_eq!(ann["sclb.io/spark-session"], s);
    assert_eq!(ann["sclb.io/user"], "sclb-test");
    assert_eq!(ann["sclb.io/team"], "rec");
    assert_eq!(ann["sclb.io/environment"], "dev");
    assert!(ann.contains_key("sclb.io/created") && ann.contains_key("sclb.io/last-activity"));

    // Replica 2 never saw the session: the record sends it to the same driver.
    let mut c2 = Client::connect(two.frontend_addr("gw")).await;
    let r = grpc::finish(
        c2.start_with(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &s),
            &team,
        )
        .await,
    )
    .await;
    assert_eq!((r.status, r.server()), (0, "driver"), "{r:?}");
    assert_eq!(drivers(&connects).await, vec![name.clone()], "one driver");

    // Replica 1 restarts: the session still routes there, still one driver.
    drop(one);
    let mut one = SclbProcess::start(d1.path(), &cfg1, &[]);
    let mut c1 = Client::connect(one.frontend_addr("gw")).await;
    let r = c1
        .call("AnalyzePlan", request("03_AnalyzePlan_schema.bin", &s))
        .await;
    assert_eq!((r.status, r.server()), (0, "driver"), "{r:?}");
    assert_eq!(drivers(&connects).await, vec![name.clone()], "one driver");
    assert_eq!(driver.methods(&s), ["Config", "ExecutePlan", "AnalyzePlan"]);
    let shown = one.admin("show sessions");
    assert!(shown.contains(&format!("srv={name} ")), "{shown}");
}

/// Drivers labelled managed-by=sclb that no replica created this run: one that names a
/// session is adopted (its session routes there, is shown, and is reaped when idle with its
/// driver); one that names none is an orphan, deleted after `orphan_grace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_drivers_are_adopted_or_deleted() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-orphan-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let driver =
        FakeGrpc::start_on("driver", "127.0.0.52".parse().unwrap(), Default::default()).await;
    let s = session(52);
    let spec = json!({
        "sparkVersion": "4.0.5",
        "server": {"template": {"spec": {"containers": [
            {"name": "spark-kubernetes-driver", "image": "docker.io/apache/spark:4.0.5"}]}}},
        "executor": {"instances": 1}
    });
    for (name, annotations) in [
        (
            "left-behind",
            json!({"sclb.io/spark-session": s, "sclb.io/user": "sclb-test"}),
        ),
        ("orphan", json!({})),
    ] {
        let o = serde_json::from_value(json!({
            "apiVersion": "sparkoperator.k8s.io/v1alpha1",
            "kind": "SparkConnect",
            "metadata": {"name": name, "annotations": annotations,
                         "labels": {"app.kubernetes.io/managed-by": "sclb"}},
            "spec": spec,
        }))
        .unwrap();
        connects.create(&PostParams::default(), &o).await.unwrap();
    }
    let ready = json!({"status": {"state": "Ready", "server": {
        "podIp": "127.0.0.52", "podName": "left-behind-server"}}});
    connects
        .patch_status(
            "left-behind",
            &PatchParams::default(),
            &Patch::Merge(&ready),
        )
        .await
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = on_demand_store_config(
        d.path(),
        api,
        driver.addr.port(),
        &k.ns,
        "6s",
        ", orphan_grace = \"3s\"",
    );
    let mut one = SclbProcess::start(d.path(), &cfg, &[]);
    let mut c = Client::connect(one.frontend_addr("gw")).await;

    // Adopted: shown, and its session's RPC goes to it (no header, no new driver).
    until(
        "the left-behind driver's session is adopted",
        Duration::from_secs(20),
        || one.admin("show sessions").contains("srv=left-behind "),
    )
    .await;
    let r = c
        .call("AnalyzePlan", request("03_AnalyzePlan_schema.bin", &s))
        .await;
    assert_eq!((r.status, r.server()), (0, "driver"), "{r:?}");
    assert_eq!(drivers(&connects).await.len(), 2, "no driver created");

    // Both go: the orphan after its grace, the adopted one once idle (2 s + slack).
    eventually("both drivers deleted", || {
        let connects = connects.clone();
        async move {
            let left = drivers(&connects).await;
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        }
    })
    .await;
    let log = one.log_text();
    assert!(
        log.contains("deleted orphaned driver"),
        "the orphan's delete is audited"
    );
    until(
        "the adopted session is ended",
        Duration::from_secs(10),
        || sessions_shown(&one) == 0,
    )
    .await;
    // Its driver went with its record: no ReleaseSession is needed (or reachable) there.
    assert!(
        one.log_text()
            .contains("session record deleted by the reaper (idle)"),
        "the adopted session was reaped as idle"
    );
}

/// The replicated kit's Role (replicated/rbac-store.yaml) is all the store needs: sclb as the
/// kit's service account records sessions in Leases and holds the reaper Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_store_role_is_enough() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "store-rbac").await;
    for file in ["serviceaccount.yaml", "replicated/rbac-store.yaml"] {
        for yaml in crate::apiserver::manifest(file, &k.ns) {
            k.post_yaml(&crate::apiserver::collection(&yaml, &k.ns), &yaml)
                .await
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
    let d = tempfile::tempdir().unwrap();
    let kubeconfig = d.path().join("sa.kubeconfig");
    crate::apiserver::service_account_kubeconfig(api, &k, "sclb", &kubeconfig).await;
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let cfg = static_config(d.path(), api, &k.ns, &[&a], "10m").replace(
        &api.kubeconfig().display().to_string(),
        &kubeconfig.display().to_string(),
    );
    let mut one = SclbProcess::start(d.path(), &cfg, &[]);
    let mut c = Client::connect(one.frontend_addr("gw")).await;
    open(&mut c, 0..3).await;
    assert_eq!(session_leases(&k).await.len(), 3);
    until(
        "sclb holds the reaper Lease",
        Duration::from_secs(20),
        || holds_lease(&one),
    )
    .await;
    let log = one.log_text();
    assert!(!log.contains("forbidden"), "{log}");
}
