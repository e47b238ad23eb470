//! What outlives the process, on the real binary: gateway sessions and an operator's commands
//! kept in the state file (`store = memory`, one node) across a `kill -9` and a restart, and
//! sessions shared by several sclb processes through a real PostgreSQL (`store = postgres`).

mod common;
#[path = "common/grpc.rs"]
mod grpc;
#[path = "common/postgres.rs"]
mod postgres;
mod realbin;

use std::path::Path;
use std::time::Duration;

use grpc::{Behaviour, Client, FakeGrpc, expect_placed, open, request, session};
use realbin::SclbProcess;

fn config(dir: &Path, servers: &[&FakeGrpc]) -> String {
    config_with(dir, servers, "")
}

fn config_with(dir: &Path, servers: &[&FakeGrpc], global: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ name = \"{}\", addr = \"{}\" }}", s.name, s.addr))
        .collect();
    format!(
        r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{dir}/admin.sock", mode = "0600", level = "admin" }}
state_file = "{dir}/state.json"
{global}

[defaults]
timeout = {{ connect = "1s", queue = "2s" }}
check = {{ type = "none" }}

[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:0"]
backend = "spark"

[[backend]]
name = "spark"
# The test servers greet first.
tcp_smart_connect = false
servers = [ {list} ]
"#,
        dir = dir.display(),
        list = list.join(", ")
    )
}

/// Sessions of backend `spark` in the state file, if it can be read.
fn saved_sessions(dir: &Path) -> usize {
    std::fs::read(dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["backends"]["spark"]["sessions"].as_array().map(Vec::len))
        .unwrap_or(0)
}

fn wait(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// sclb is killed (SIGKILL) two seconds after its sessions started and started again: every
/// session's next RPC reaches the server that holds it, as before the kill. Without the state
/// file's sessions they would be balanced afresh (in another order here) and land anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_sessions_survive_kill_9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let cfg = config(dir.path(), &[&a, &b]);
    let mut sclb = SclbProcess::start(dir.path(), &cfg, &[]);
    let mut c = Client::connect(sclb.frontend_addr("gw")).await;
    let placed = open(&mut c, 0..10).await;
    assert!(placed.iter().any(|s| s == "sc1") && placed.iter().any(|s| s == "sc2"));
    // Written within a second or so of the sessions starting, not at the next 30 s save.
    wait(
        "10 sessions in the state file",
        Duration::from_secs(10),
        || saved_sessions(dir.path()) == 10,
    );
    drop(c);
    drop(sclb);

    let mut sclb = SclbProcess::start(dir.path(), &cfg, &[]);
    let addr = sclb.frontend_addr("gw");
    let shown = sclb.admin("show sessions");
    assert!(shown.starts_with("# sessions: 10\n"), "{shown}");
    let mut c = Client::connect(addr).await;
    expect_placed(&mut c, 0..10, &placed, "moved across the restart").await;
    for n in 0..10u32 {
        let other = if placed[n as usize] == "sc1" { &b } else { &a };
        assert!(other.methods(&session(n)).is_empty(), "session {n}");
    }
    let log = sclb.log_text();
    assert!(
        log.contains("\"sessions\":10") && log.contains("state restored"),
        "the restore is logged with its counts"
    );
}

/// An operator's drain answers only once it is in the state file: a `kill -9` right after the
/// answer keeps it (a 30 s periodic save would lose it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_command_is_durable_when_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let cfg = config(dir.path(), &[&a, &b]);
    let mut sclb = SclbProcess::start(dir.path(), &cfg, &[]);
    sclb.frontend_addr("gw");
    // Past the start-up save, if any: only the command's own save can carry the drain.
    std::thread::sleep(Duration::from_millis(300));
    for cmd in ["set server spark/sc1 state drain", "set weight spark/sc2 7"] {
        let reply = sclb.admin(cmd);
        assert!(reply.trim().is_empty(), "{cmd}: {reply}");
    }
    drop(sclb);

    let mut sclb = SclbProcess::start(dir.path(), &cfg, &[]);
    sclb.frontend_addr("gw");
    let state = sclb.admin("show servers state spark");
    let row = |name: &str| -> Vec<String> {
        state
            .lines()
            .find(|l| l.split(' ').nth(3) == Some(name))
            .unwrap_or_else(|| panic!("{name} in {state}"))
            .split(' ')
            .map(str::to_string)
            .collect()
    };
    // HAProxy's columns: srv_admin_state is the 7th (FDRAIN = 0x08), srv_uweight the 8th.
    assert_eq!(row("sc1")[6], "8", "{state}");
    assert_eq!(row("sc2")[7], "7", "{state}");
}

fn pg_config(dir: &Path, servers: &[&FakeGrpc], pg: &postgres::Postgres) -> String {
    config_with(
        dir,
        servers,
        &format!(
            "store = {{ kind = \"postgres\", url = \"{}\", sync_interval = \"300ms\" }}",
            pg.url
        ),
    )
}

/// Two sclb processes on one PostgreSQL: sessions opened through the first reach the same
/// servers through the second (balanced there in another order, they would not); a session
/// released through one is ended at the other too; a replica killed and started again finds
/// every session in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sclb_share_sessions_through_postgres() {
    let pg = postgres::Postgres::start();
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = SclbProcess::start(dir1.path(), &pg_config(dir1.path(), &[&a, &b], &pg), &[]);
    let cfg2 = pg_config(dir2.path(), &[&a, &b], &pg);
    let mut two = SclbProcess::start(dir2.path(), &cfg2, &[]);
    let mut c1 = Client::connect(one.frontend_addr("gw")).await;
    let placed = open(&mut c1, 0..10).await;
    let rows = pg.query("SELECT count(*) FROM sclb_sessions").await;
    assert_eq!(rows[0][0].as_deref(), Some("10"), "one row per session");

    let mut c2 = Client::connect(two.frontend_addr("gw")).await;
    expect_placed(&mut c2, 0..10, &placed, "through the second sclb").await;
    let shown = two.admin("show sessions");
    assert!(shown.starts_with("# sessions: 10\n"), "{shown}");

    // Released through the second: the first learns it within a few syncs.
    let r = c2
        .call(
            "ReleaseSession",
            request("18_ReleaseSession_request.bin", &session(0)),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    wait(
        "the first sclb ends the released session",
        Duration::from_secs(15),
        || one.admin("show sessions").starts_with("# sessions: 9\n"),
    );
    let r = c1
        .call(
            "AnalyzePlan",
            request("03_AnalyzePlan_schema.bin", &session(0)),
        )
        .await;
    assert_ne!(r.status, 0, "a released session is refused: {r:?}");
    assert!(r.message.contains("released"), "{r:?}");

    // The second replica dies (kill -9) and comes back empty-handed: the store places
    // every session where it was.
    drop(c2);
    drop(two);
    let mut two = SclbProcess::start(dir2.path(), &cfg2, &[]);
    let mut c2 = Client::connect(two.frontend_addr("gw")).await;
    expect_placed(&mut c2, 1..10, &placed, "after the restart").await;
}

/// The store stops for 30 s under traffic: known sessions keep working, new ones are bound
/// locally, the log says so; when the store is back the new sessions are in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_fails_no_rpc_and_is_reconciled_after() {
    let mut pg = postgres::Postgres::start();
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut sclb = SclbProcess::start(dir.path(), &pg_config(dir.path(), &[&a, &b], &pg), &[]);
    let mut c = Client::connect(sclb.frontend_addr("gw")).await;
    open(&mut c, 0..4).await;
    pg.stop();
    // 30 s without the store, under traffic: the known sessions and four new ones (bound
    // locally) keep answering, every call.
    let outage = std::time::Instant::now();
    let mut calls = 0;
    while outage.elapsed() < Duration::from_secs(30) {
        for n in 0..8 {
            let r = c
                .call(
                    "AnalyzePlan",
                    request("03_AnalyzePlan_schema.bin", &session(n)),
                )
                .await;
            assert_eq!(
                r.status,
                0,
                "session {n} after {:?} without the store: {r:?}",
                outage.elapsed()
            );
            calls += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        calls >= 8 * 20,
        "traffic all along the outage: {calls} calls"
    );
    assert!(
        sclb.log_text().contains("session store"),
        "the outage is logged"
    );
    pg.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = pg
            .query("SELECT count(*) FROM sclb_sessions WHERE ended IS NULL")
            .await;
        if rows[0][0].as_deref() == Some("8") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions bound during the outage never reached the store: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Two L4 nodes (EMR primary nodes behind one NLB) with `stick.store = "shared"`: 50 client
/// addresses pinned through the first reach the same servers through the second, which would
/// balance them (in reverse order here) elsewhere on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_l4_nodes_pin_every_client_identically_through_postgres() {
    let pg = postgres::Postgres::start();
    let servers = [
        common::Backend::start("s1").await,
        common::Backend::start("s2").await,
        common::Backend::start("s3").await,
    ];
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ name = \"{}\", addr = \"{}\" }}", s.name, s.addr))
        .collect();
    let node = |dir: &Path| {
        format!(
            r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{dir}/admin.sock", mode = "0600", level = "admin" }}
store = {{ kind = "postgres", url = "{url}", sync_interval = "300ms" }}

[defaults]
check = {{ type = "none" }}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
# The test servers greet first.
tcp_smart_connect = false
stick = {{ store = "shared" }}
servers = [ {list} ]
"#,
            dir = dir.display(),
            url = pg.url,
            list = list.join(", ")
        )
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut one = SclbProcess::start(d1.path(), &node(d1.path()), &[]);
    let mut two = SclbProcess::start(d2.path(), &node(d2.path()), &[]);
    let (fe1, fe2) = (one.frontend_addr("fe"), two.frontend_addr("fe"));
    let mut first = Vec::new();
    for n in 2..52u8 {
        let (server, _s) = common::which_server(n, fe1).await;
        first.push(server);
    }
    assert!(
        first.iter().any(|s| s == "s3"),
        "balanced over all: {first:?}"
    );
    let rows = pg.query("SELECT count(*) FROM sclb_pins").await;
    let store_lines = |p: &SclbProcess| -> String {
        p.log_text()
            .lines()
            .filter(|l| l.contains("store"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        rows[0][0].as_deref(),
        Some("50"),
        "one row per client; node one's store log:\n{}",
        store_lines(&one)
    );
    for n in (2..52u8).rev() {
        let (server, _s) = common::which_server(n, fe2).await;
        assert_eq!(
            server,
            first[(n - 2) as usize],
            "client 127.0.0.{n} failed over to the second node"
        );
    }
    let table = two.admin("show table be");
    assert!(
        table.contains("used:50"),
        "the second node keeps the pins too: {table}"
    );
}

/// A store that takes only TLS connections (pg_hba `hostssl`, `sslmode=require` in the url):
/// with the CA that signed the database's certificate, sessions are written; with another CA,
/// sclb refuses the database's certificate, says so, keeps routing on local binds and
/// reports the store down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_reached_over_tls_verified_by_its_ca() {
    let pg = postgres::Postgres::start_tls();
    let ca = pg.ca.clone().unwrap();
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let store = |ca: &Path| {
        format!(
            "store = {{ kind = \"postgres\", url = \"{}\", ca = \"{}\", sync_interval = \"300ms\" }}",
            pg.url,
            ca.display()
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config_with(dir.path(), &[&a], &store(&ca)),
        &[],
    );
    let mut c = Client::connect(sclb.frontend_addr("gw")).await;
    open(&mut c, 0..3).await;
    let rows = pg.query("SELECT count(*) FROM sclb_sessions").await;
    assert_eq!(
        rows[0][0].as_deref(),
        Some("3"),
        "sessions written over TLS"
    );
    let ssl = pg
        .query("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'sclb' AND s.ssl")
        .await;
    assert_ne!(
        ssl[0][0].as_deref(),
        Some("0"),
        "sclb's connection uses TLS"
    );
    drop(c);
    drop(sclb);

    // Another CA: the database's certificate is not trusted.
    let other = postgres::TestCa::write(dir.path(), "other");
    let dir2 = tempfile::tempdir().unwrap();
    let mut sclb = SclbProcess::start(
        dir2.path(),
        &config_with(dir2.path(), &[&a], &store(&other.ca)),
        &[],
    );
    let mut c = Client::connect(sclb.frontend_addr("gw")).await;
    open(&mut c, 10..12).await;
    wait(
        "sclb says why it cannot reach the store",
        Duration::from_secs(15),
        || {
            let log = sclb.log_text();
            log.contains("session store") && log.contains("certificate")
        },
    );
    let rows = pg
        .query("SELECT count(*) FROM sclb_sessions WHERE session_id LIKE '%0000000010%'")
        .await;
    assert_eq!(
        rows[0][0].as_deref(),
        Some("0"),
        "nothing written past a bad CA"
    );
    assert!(
        sclb.is_running(),
        "a store it cannot trust does not stop sclb"
    );
}
