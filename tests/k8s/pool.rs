//! `on_demand.pool` on the real binary against the real API server: the test plays the
//! spark-operator (each SparkConnect sclb creates is marked Ready at an address where a
//! stand-in driver listens, while the "operator" is on), and looks at what sclb shows
//! (`show pool`, `/metrics`), at the objects, and at which driver answers each session.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::json;
use tokio::net::TcpListener;

use crate::apiserver::{ApiServer, Cluster, shared};
use crate::grpc::{self, Behaviour, Client, FakeGrpc, request, session};
use crate::lb::{eventually, metric};
use crate::realbin::SclbProcess;

/// Plays the spark-operator in one namespace: while on, every SparkConnect without a status
/// is marked Ready at the next stand-in driver's address (127.0.0.`first`, `first`+1, ...,
/// all on one port, as pods of one template are).
struct Operator {
    on: Arc<AtomicBool>,
    /// SparkConnect name → the stand-in that serves it.
    serves: Arc<parking_lot::Mutex<BTreeMap<String, String>>>,
    port: u16,
    drivers: Vec<FakeGrpc>,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    async fn start(connects: Api<DynamicObject>, first: u8, n: u8) -> Operator {
        Self::start_with(connects, first, n, |_| Behaviour::default()).await
    }

    /// With stand-in `i` (0-based, in the order drivers are made Ready) behaving as
    /// `behaviour(i)`.
    async fn start_with(
        connects: Api<DynamicObject>,
        first: u8,
        n: u8,
        behaviour: impl Fn(u8) -> Behaviour,
    ) -> Operator {
        let mut drivers = Vec::new();
        let mut port = 0;
        for i in 0..n {
            let ip = std::net::Ipv4Addr::new(127, 0, 0, first + i);
            let l = TcpListener::bind((ip, port)).await.unwrap();
            port = l.local_addr().unwrap().port();
            drivers.push(FakeGrpc::serve(&format!("d{}", first + i), l, behaviour(i)));
        }
        let on = Arc::new(AtomicBool::new(true));
        let serves = Arc::new(parking_lot::Mutex::new(BTreeMap::new()));
        let (on2, serves2) = (on.clone(), serves.clone());
        let task = tokio::spawn(async move {
            let mut next = 0u8;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if !on2.load(SeqCst) {
                    continue;
                }
                let Ok(list) = connects.list(&Default::default()).await else {
                    continue;
                };
                for o in list.items {
                    let name = o.name_any();
                    if o.data.get("status").is_some() || serves2.lock().contains_key(&name) {
                        continue;
                    }
                    assert!(next < n, "the test ran out of stand-in drivers");
                    let ip = format!("127.0.0.{}", first + next);
                    let ready = json!({"status": {"state": "Ready", "server": {
                        "podIp": ip, "podName": format!("{name}-server")}}});
                    if connects
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
                        .await
                        .is_ok()
                    {
                        serves2.lock().insert(name, format!("d{}", first + next));
                        next += 1;
                    }
                }
            }
        });
        Operator {
            on,
            serves,
            port,
            drivers,
            task,
        }
    }

    fn pause(&self) {
        self.on.store(false, SeqCst);
    }

    fn resume(&self) {
        self.on.store(true, SeqCst);
    }

    /// Stops the stand-in serving SparkConnect `name` (its Spark server died).
    fn kill_server_of(&self, name: &str) {
        let server = self.server_of(name);
        self.drivers
            .iter()
            .find(|d| d.name == server)
            .expect("a stand-in serves it")
            .stop();
    }

    /// The stand-in serving SparkConnect `name`.
    fn server_of(&self, name: &str) -> String {
        self.serves.lock().get(name).cloned().unwrap_or_default()
    }

    /// The methods of each session of sclb's warm-up that the stand-in serving `name` saw.
    fn warm_ups(&self, name: &str) -> Vec<Vec<String>> {
        let server = self.server_of(name);
        let Some(d) = self.drivers.iter().find(|d| d.name == server) else {
            return vec![];
        };
        let seen = d.seen.lock().unwrap();
        seen.by_session
            .values()
            .filter(|rpcs| {
                rpcs.iter()
                    .all(|(_, user)| user.as_deref() == Some("sclb-warm-up"))
            })
            .map(|rpcs| rpcs.iter().map(|(m, _)| m.clone()).collect())
            .collect()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An on-demand gateway (drivers in `sjns-{team}-{environment}`) with `pool`, a team quota of
/// `quota`, sessions idle for a minute, and `global` added to `[global]`.
fn pool_config(
    dir: &Path,
    api: &ApiServer,
    port: u16,
    ns: &str,
    quota: usize,
    pool: &str,
    global: &str,
) -> String {
    let cfg = crate::on_demand_config(dir, api, port, ns);
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(text.contains("max_sessions_per_team = 1 }"));
    text.replace("idle_timeout = \"2s\"", "idle_timeout = \"60s\"")
        .replace(
            "max_sessions_per_team = 1 }",
            &format!("max_sessions_per_team = {quota}, pool = {pool} }}"),
        )
        .replacen(
            "[global]\n",
            &format!(
                "[global]\nlog = {{ level = \"info\", format = \"json\" }}\nstats = {{ bind = \"127.0.0.1:0\" }}\n{global}\n"
            ),
            1,
        )
}

/// The Ready members `show pool` lists.
fn ready_members(p: &SclbProcess) -> Vec<String> {
    p.admin("show pool")
        .lines()
        .filter_map(|l| l.strip_prefix("  ").map(str::to_string))
        .filter_map(|l| {
            let mut w = l.split(' ');
            let (name, state) = (w.next()?, w.next()?);
            (state == "Ready").then(|| name.to_string())
        })
        .collect()
}

/// Waits until `show pool` lists `n` Ready members; returns them.
async fn pool_becomes(p: &SclbProcess, n: usize, what: &str) -> Vec<String> {
    eventually(what, || async {
        let ready = ready_members(p);
        if ready.len() == n {
            Ok(ready)
        } else {
            Err(p.admin("show pool"))
        }
    })
    .await
}

const TEAM: [(&str, &str); 2] = [("x-spark-team", "pool"), ("x-spark-environment", "dev")];

/// A new session's first RPC through `gw`: (status, the driver the client is told).
async fn first_rpc(gw: std::net::SocketAddr, n: u32, team: [(&str, &str); 2]) -> grpc::Reply {
    let mut c = Client::connect(gw).await;
    grpc::finish(
        c.start_with("Config", request("01_Config_set.bin", &session(n)), &team)
            .await,
    )
    .await
}

fn driver_of(r: &grpc::Reply) -> String {
    r.headers
        .get("x-spark-session-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn claims(p: &SclbProcess, result: &str) -> f64 {
    metric(
        &p.metrics(),
        &format!("sclb_pool_claims_total{{result=\"{result}\"}}"),
    )
    .unwrap_or(-1.0)
}

/// A pool of 2 is kept Ready; three new sessions in a row get 2 hits (at once, while no driver
/// could be started) and 1 miss (held until its own driver is Ready); each claimed driver is
/// relabelled as its session's and replaced; a released session's driver is deleted, never
/// offered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_serves_new_sessions_at_once_and_never_reuses_a_driver() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-pool-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let op = Operator::start(connects.clone(), 71, 9).await;
    let d = tempfile::tempdir().unwrap();
    let cfg = pool_config(
        d.path(),
        api,
        op.port,
        &k.ns,
        10,
        r#"{ min_ready = 2, max_ready = 4, max_age = "2h", teams = ["pool/dev"] }"#,
        "",
    );
    let mut lb = SclbProcess::start(d.path(), &cfg, &[]);
    let gw = lb.frontend_addr("gw");

    let pooled = pool_becomes(&lb, 2, "a pool of 2 Ready drivers").await;
    for name in &pooled {
        let o = connects.get(name).await.unwrap();
        assert_eq!(o.labels()["sclb.io/pool"], "ready");
        assert_eq!(o.labels()["app.kubernetes.io/managed-by"], "sclb");
        assert!(!o.annotations().contains_key("sclb.io/spark-session"));
        // Warmed up (the default) before it was offered: three runs, each one query in a
        // session of its own, then that session released.
        assert!(o.annotations().contains_key("sclb.io/warmed-up"));
        assert_eq!(
            op.warm_ups(name),
            [["ExecutePlan", "ReleaseSession"]; 3],
            "{name}"
        );
    }
    let shown = lb.admin("show pool");
    assert!(
        shown.contains("gw team=pool environment=dev namespace=sjns-pool-dev ready=2"),
        "{shown}"
    );
    let m = lb.metrics();
    assert_eq!(
        metric(
            &m,
            "sclb_pool_ready{template=\"sparkconnect.yaml\",team=\"pool\",environment=\"dev\"}"
        ),
        Some(2.0),
        "{m}"
    );

    // No new driver can start now: only the pool can serve at once.
    op.pause();
    let mut hits = Vec::new();
    for n in 0..2 {
        let r = first_rpc(gw, 70 + n, TEAM).await;
        assert_eq!(r.status, 0, "{r:?}");
        let name = driver_of(&r);
        assert!(pooled.contains(&name), "{name} not in {pooled:?}");
        assert_eq!(r.server(), op.server_of(&name));
        hits.push(name);
    }
    assert_ne!(hits[0], hits[1], "one driver per session");
    let third = tokio::spawn(first_rpc(gw, 72, TEAM));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!third.is_finished(), "a miss waits for a driver of its own");
    op.resume();
    let r = tokio::time::timeout(Duration::from_secs(30), third)
        .await
        .expect("the miss is served once its driver is Ready")
        .unwrap();
    assert_eq!(r.status, 0, "{r:?}");
    let missed = driver_of(&r);
    assert!(!pooled.contains(&missed));
    assert_eq!((claims(&lb, "hit"), claims(&lb, "miss")), (2.0, 1.0));
    let m = lb.metrics();
    assert_eq!(
        metric(
            &m,
            "sclb_session_first_response_seconds_count{result=\"hit\"}"
        ),
        Some(2.0),
        "{m}"
    );

    // Each claimed driver is its session's record, no longer a pool member.
    for (n, name) in hits.iter().enumerate() {
        let o = connects.get(name).await.unwrap();
        assert_eq!(o.labels()["sclb.io/pool"], "claimed");
        assert_eq!(
            o.annotations()["sclb.io/spark-session"],
            session(70 + n as u32)
        );
        assert_eq!(o.annotations()["sclb.io/user"], "sclb-test");
    }
    // ... and replaced.
    let refilled = pool_becomes(&lb, 2, "the pool refilled to 2 Ready").await;
    let used: HashSet<&String> = hits.iter().chain([&missed]).collect();
    assert!(refilled.iter().all(|n| !used.contains(n)), "{refilled:?}");
    let shown = lb.admin("show sessions");
    assert!(shown.contains(&format!("srv={} ", hits[0])), "{shown}");

    // An unclaimed driver is kept for a new session: a header cannot name it.
    let mut c = Client::connect(gw).await;
    let by_name = [
        ("x-spark-session-id", refilled[0].as_str()),
        ("x-spark-namespace", "sjns-pool-dev"),
    ];
    let r = grpc::finish(
        c.start_with(
            "Config",
            request("01_Config_set.bin", &session(79)),
            &by_name,
        )
        .await,
    )
    .await;
    assert_eq!(r.status, 5, "NOT_FOUND: {r:?}");
    assert!(r.message.contains("warm-pool driver"), "{}", r.message);

    // Released: its driver is deleted, not returned to the pool.
    let r = c
        .call(
            "ReleaseSession",
            request("18_ReleaseSession_request.bin", &session(70)),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    eventually("the released session's driver is deleted", || {
        let connects = connects.clone();
        let gone = hits[0].clone();
        async move {
            match connects.get_opt(&gone).await.unwrap() {
                None => Ok(()),
                Some(_) => Err(format!("{gone} is still there")),
            }
        }
    })
    .await;
    assert!(!lb.admin("show pool").contains(&hits[0]));
    let r = first_rpc(gw, 73, TEAM).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert!(refilled.contains(&driver_of(&r)), "{r:?}");
    assert!(lb.log_text().contains("pool driver claimed"));
}

/// Two replicas (sharing the kubernetes store) get a new session each at once while the pool
/// holds one Ready driver: it goes to exactly one of them, the other session gets a driver of
/// its own. The unclaimed member is not taken for an orphan by the store's reaper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_for_the_last_ready_driver_give_it_to_one_session() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-prace-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let op = Operator::start(connects.clone(), 81, 6).await;
    let pool = r#"{ min_ready = 1, max_ready = 2, max_age = "2h", teams = ["prace/dev"] }"#;
    let store = crate::store::store_line(api, &k.ns, ", orphan_grace = \"1s\"");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = SclbProcess::start(
        d1.path(),
        &pool_config(d1.path(), api, op.port, &k.ns, 10, pool, &store),
        &[],
    );
    let mut two = SclbProcess::start(
        d2.path(),
        &pool_config(d2.path(), api, op.port, &k.ns, 10, pool, &store),
        &[],
    );
    let (gw1, gw2) = (one.frontend_addr("gw"), two.frontend_addr("gw"));
    let last = pool_becomes(&one, 1, "one Ready pool driver").await;
    pool_becomes(&two, 1, "the other replica sees it too").await;
    op.pause();
    // Twice the orphan grace: an unclaimed member is not an orphan.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ready_members(&one), last, "{}", one.admin("show pool"));

    let team = [("x-spark-team", "prace"), ("x-spark-environment", "dev")];
    let a = tokio::spawn(first_rpc(gw1, 80, team));
    let b = tokio::spawn(first_rpc(gw2, 81, team));
    tokio::time::sleep(Duration::from_secs(2)).await;
    op.resume();
    let mut got = Vec::new();
    for rpc in [a, b] {
        let r = tokio::time::timeout(Duration::from_secs(30), rpc)
            .await
            .expect("both sessions are served")
            .unwrap();
        assert_eq!(r.status, 0, "{r:?}");
        got.push(driver_of(&r));
    }
    assert_ne!(got[0], got[1], "one driver, one session");
    let winners: Vec<usize> = (0..2).filter(|&i| got[i] == last[0]).collect();
    assert_eq!(winners.len(), 1, "{got:?} vs {last:?}");
    let o = connects.get(&last[0]).await.unwrap();
    assert_eq!(
        o.annotations()["sclb.io/spark-session"],
        session(80 + winners[0] as u32)
    );
    let sum = |r: &str| claims(&one, r) + claims(&two, r);
    assert_eq!((sum("hit"), sum("miss")), (1.0, 1.0));
}

/// A pool driver deleted from under sclb is replaced; ones older than `max_age` are retired
/// and replaced; the pool keeps no more drivers than the team's quota leaves room for (claimed
/// sessions count, the pool does not): with the quota taken it shrinks to zero, and it fills
/// again as sessions end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_drivers_are_replaced_retired_and_shrunk_by_the_quota() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-pkeep-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let op = Operator::start(connects.clone(), 91, 12).await;
    let d = tempfile::tempdir().unwrap();
    let cfg = pool_config(
        d.path(),
        api,
        op.port,
        &k.ns,
        2,
        r#"{ min_ready = 2, max_ready = 2, max_age = "8s", teams = ["pkeep/dev"] }"#,
        "",
    );
    let mut lb = SclbProcess::start(d.path(), &cfg, &[]);
    let gw = lb.frontend_addr("gw");
    let first = pool_becomes(&lb, 2, "two Ready pool drivers").await;

    // Killed: replaced.
    connects
        .delete(&first[0], &DeleteParams::default())
        .await
        .unwrap();
    let second = eventually("a replacement for the killed driver", || async {
        let now = ready_members(&lb);
        if now.len() == 2 && !now.contains(&first[0]) {
            Ok(now)
        } else {
            Err(lb.admin("show pool"))
        }
    })
    .await;

    // Too old: retired and replaced.
    let started = Instant::now();
    eventually("the old drivers are retired and replaced", || async {
        let now = ready_members(&lb);
        if now.len() == 2 && now.iter().all(|n| !second.contains(n)) {
            Ok(())
        } else {
            Err(lb.admin("show pool"))
        }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(25));
    assert!(
        lb.log_text()
            .contains("pool driver retired (older than max_age)")
    );
    for gone in &second {
        assert_eq!(
            connects.get_opt(gone).await.unwrap().map(|o| o.name_any()),
            None,
            "the retired driver is deleted"
        );
    }

    // The quota is 2: one claimed session leaves room for one pool driver, two for none.
    op.pause();
    let members = || async {
        let lp = kube::api::ListParams::default().labels("sclb.io/pool=ready");
        connects.list(&lp).await.unwrap().items.len()
    };
    let team = [("x-spark-team", "pkeep"), ("x-spark-environment", "dev")];
    let mut claimed = Vec::new();
    for n in 0..2 {
        let r = first_rpc(gw, 90 + n, team).await;
        assert_eq!(r.status, 0, "{r:?}");
        claimed.push(driver_of(&r));
    }
    assert_eq!(claims(&lb, "hit"), 2.0, "both from the pool");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let shown = lb.admin("show pool");
    assert!(
        shown.contains(" ready=0 warming=0 starting=0 down=0 "),
        "{shown}"
    );
    assert_eq!(members().await, 0, "nothing kept for a team at its quota");
    op.resume();

    // One session ends: room for one again.
    let mut c = Client::connect(gw).await;
    let r = c
        .call(
            "ReleaseSession",
            request("18_ReleaseSession_request.bin", &session(90)),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    let refilled = pool_becomes(&lb, 1, "the pool fills to what the quota leaves").await;
    assert!(!claimed.contains(&refilled[0]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(members().await, 1, "{}", lb.admin("show pool"));
}

/// A pool driver whose server stops answering its health check (`h2` here) is retired and
/// replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_driver_failing_its_health_check_is_replaced() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-phealth-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let op = Operator::start(connects.clone(), 101, 6).await;
    let d = tempfile::tempdir().unwrap();
    let cfg = pool_config(
        d.path(),
        api,
        op.port,
        &k.ns,
        10,
        r#"{ min_ready = 1, max_ready = 1, max_age = "2h", teams = ["phealth/dev"] }"#,
        "",
    );
    assert!(cfg.contains("check = { type = \"none\" }"));
    let cfg = cfg.replace(
        "check = { type = \"none\" }",
        "check = { type = \"h2\", inter = \"300ms\", rise = 1, fall = 2 }",
    );
    let lb = SclbProcess::start(d.path(), &cfg, &[]);
    let first = pool_becomes(&lb, 1, "one Ready pool driver").await;
    op.kill_server_of(&first[0]);
    eventually("the failing driver is replaced", || async {
        match ready_members(&lb).as_slice() {
            [n] if *n != first[0] => Ok(()),
            _ => Err(lb.admin("show pool")),
        }
    })
    .await;
    assert!(
        lb.log_text()
            .contains("pool driver retired (failing its health check)"),
        "{}",
        lb.log_text()
    );
    assert!(connects.get_opt(&first[0]).await.unwrap().is_none());
}

/// A new session refused after its claim (here: the gateway holds `sessions.max` already)
/// does not keep the driver it claimed: it is deleted, and the pool refilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_session_does_not_keep_the_driver_it_claimed() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-prefuse-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let op = Operator::start(connects.clone(), 111, 6).await;
    let d = tempfile::tempdir().unwrap();
    let cfg = pool_config(
        d.path(),
        api,
        op.port,
        &k.ns,
        10,
        r#"{ min_ready = 1, max_ready = 1, max_age = "2h", teams = ["prefuse/dev"] }"#,
        "",
    );
    let cfg = cfg.replace(
        "cleanup_interval = \"200ms\" }",
        "cleanup_interval = \"200ms\", max = 1 }",
    );
    let mut lb = SclbProcess::start(d.path(), &cfg, &[]);
    let gw = lb.frontend_addr("gw");
    let team = [("x-spark-team", "prefuse"), ("x-spark-environment", "dev")];
    pool_becomes(&lb, 1, "one Ready pool driver").await;
    let r = first_rpc(gw, 110, team).await;
    assert_eq!(r.status, 0, "{r:?}");
    let kept = driver_of(&r);
    let second = pool_becomes(&lb, 1, "a replacement").await;

    let r = first_rpc(gw, 111, team).await;
    assert_eq!(r.status, 8, "RESOURCE_EXHAUSTED: {r:?}");
    eventually("the refused session's driver is deleted", || {
        let connects = connects.clone();
        let gone = second[0].clone();
        async move {
            match connects.get_opt(&gone).await.unwrap() {
                None => Ok(()),
                Some(o) => Err(format!("{gone}: {:?}", o.annotations())),
            }
        }
    })
    .await;
    pool_becomes(&lb, 1, "the pool refilled").await;
    assert!(
        connects.get_opt(&kept).await.unwrap().is_some(),
        "the admitted session keeps its driver"
    );
}

/// A reload that removes a pool retires its unclaimed drivers (a claimed one stays its
/// session's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_pool_retires_its_drivers() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-psweep-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    let op = Operator::start(connects.clone(), 121, 6).await;
    let d = tempfile::tempdir().unwrap();
    let pool = r#"{ min_ready = 2, max_ready = 2, max_age = "2h", teams = ["psweep/dev"] }"#;
    let cfg = pool_config(d.path(), api, op.port, &k.ns, 10, pool, "");
    let mut lb = SclbProcess::start(d.path(), &cfg, &[]);
    let gw = lb.frontend_addr("gw");
    pool_becomes(&lb, 2, "two Ready pool drivers").await;
    let team = [("x-spark-team", "psweep"), ("x-spark-environment", "dev")];
    let r = first_rpc(gw, 120, team).await;
    assert_eq!(r.status, 0, "{r:?}");
    let claimed = driver_of(&r);

    let without = cfg.replace(&format!(", pool = {pool}"), "");
    assert_ne!(without, cfg);
    std::fs::write(d.path().join("sclb.toml"), without).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lb.pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    eventually("the pool's drivers are retired", || {
        let connects = connects.clone();
        async move {
            let left = connects
                .list(&kube::api::ListParams::default().labels("sclb.io/pool=ready"))
                .await
                .unwrap()
                .items
                .len();
            if left == 0 {
                Ok(())
            } else {
                Err(format!("{left} unclaimed drivers left"))
            }
        }
    })
    .await;
    assert!(
        lb.log_text()
            .contains("pool driver retired (its pool is no longer configured)")
    );
    assert!(connects.get_opt(&claimed).await.unwrap().is_some());
    assert_eq!(lb.admin("show pool"), "# pools: 0 claims: hit=1 miss=0\n\n");
}

/// A pool driver is offered only once its warm-up query has been answered (and its session
/// released): until then a new session is a miss and gets a driver of its own. A driver whose
/// warm-up fails is retired and replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_driver_is_offered_only_once_warm_and_one_failing_its_warm_up_is_replaced() {
    let Some(api) = shared() else { return };
    let k = Cluster::new(api, "sjns-pwarm-dev").await;
    let connects = k.crd("v1alpha1", "SparkConnect", "sparkconnects");
    // The first driver made Ready fails every query; the others answer one only when the
    // test opens the gate.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let op = Operator::start_with(connects.clone(), 131, 8, move |i| Behaviour {
        execute_fails: (i == 0).then_some((13, "the JVM fell over")),
        execute_gate: (i > 0).then(|| g.clone()),
        ..Behaviour::default()
    })
    .await;
    let d = tempfile::tempdir().unwrap();
    let cfg = pool_config(
        d.path(),
        api,
        op.port,
        &k.ns,
        10,
        r#"{ min_ready = 1, max_ready = 1, max_age = "2h", teams = ["pwarm/dev"], warm_up = { query = "SELECT 42 AS warm", timeout = "2m", runs = 2 } }"#,
        "",
    );
    let mut lb = SclbProcess::start(d.path(), &cfg, &[]);
    let gw = lb.frontend_addr("gw");
    let warm_ups = |result: &str| {
        metric(
            &lb.metrics(),
            &format!("sclb_pool_warmups_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(-1.0)
    };

    // The first driver's warm-up fails: retired, and a second one is made.
    eventually("the first driver's warm-up fails", || async {
        if lb
            .log_text()
            .contains("pool driver retired (its warm-up failed)")
        {
            Ok(())
        } else {
            Err(lb.admin("show pool"))
        }
    })
    .await;
    assert!(
        lb.log_text().contains("the JVM fell over"),
        "{}",
        lb.log_text()
    );
    assert_eq!(warm_ups("failed"), 1.0);
    let warming = eventually("a second driver, warming", || async {
        let shown = lb.admin("show pool");
        let name = shown
            .lines()
            .find_map(|l| l.strip_prefix("  ")?.split_once(" Warming "))
            .map(|(n, _)| n.to_string());
        match name {
            Some(n) if shown.contains(" ready=0 warming=1 ") && !op.server_of(&n).is_empty() => {
                Ok(n)
            }
            _ => Err(shown),
        }
    })
    .await;
    let first = op
        .serves
        .lock()
        .iter()
        .find(|(_, s)| *s == "d131")
        .map(|(n, _)| n.clone())
        .expect("d131 served the first driver");
    assert_ne!(first, warming);
    assert!(
        connects.get_opt(&first).await.unwrap().is_none(),
        "{first} is deleted"
    );

    // Its warm-up query is held: it is not offered. A new session is a miss.
    eventually("the warm-up query reaches the driver", || async {
        let server = op.server_of(&warming);
        let d = op.drivers.iter().find(|d| d.name == server).unwrap();
        let seen = d.seen.lock().unwrap();
        if seen
            .bodies
            .iter()
            .any(|b| b.windows(16).any(|w| w == b"SELECT 42 AS war"))
        {
            Ok(())
        } else {
            Err(format!("{} RPCs", seen.rpcs))
        }
    })
    .await;
    let o = connects.get(&warming).await.unwrap();
    assert!(!o.annotations().contains_key("sclb.io/warmed-up"));
    assert_eq!(
        metric(
            &lb.metrics(),
            "sclb_pool_ready{template=\"sparkconnect.yaml\",team=\"pwarm\",environment=\"dev\"}"
        ),
        Some(0.0)
    );
    let team = [("x-spark-team", "pwarm"), ("x-spark-environment", "dev")];
    let r = first_rpc(gw, 130, team).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_ne!(driver_of(&r), warming, "a warming driver is not claimed");
    assert_eq!((claims(&lb, "hit"), claims(&lb, "miss")), (0.0, 1.0));

    // Answered: warm, offered, claimed by the next session.
    gate.add_permits(10);
    let ready = pool_becomes(&lb, 1, "the warmed-up driver is Ready").await;
    assert_eq!(ready, std::slice::from_ref(&warming));
    let o = connects.get(&warming).await.unwrap();
    assert!(o.annotations().contains_key("sclb.io/warmed-up"));
    assert_eq!(
        op.warm_ups(&warming),
        [["ExecutePlan", "ReleaseSession"]; 2]
    );
    assert_eq!(warm_ups("ok"), 1.0);
    let r = first_rpc(gw, 131, team).await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(driver_of(&r), warming);
    assert_eq!(claims(&lb, "hit"), 1.0);
    assert!(lb.log_text().contains("pool driver warmed up in"));
}
