//! Gateway mode (`mode = "grpc"`) through real sockets: HTTP/2 clients sending the requests
//! real PySpark sent, to gRPC servers that frame replies as Spark does. Routing by Spark
//! session, the session registry and its reaping, the admin socket, `/sessions` and the
//! `spark_connect_*` metrics. tests/e2e/test_gateway.py runs real PySpark and real Spark.

mod common;
#[path = "common/grpc.rs"]
mod grpc;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use grpc::{Behaviour, Client, FakeGrpc, request, session};

struct Gw {
    sclb: sclb::Sclb,
    sock: PathBuf,
    stats: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Gw {
    fn addr(&self) -> SocketAddr {
        self.sclb.local_addrs("gw")[0]
    }

    async fn admin(&self, line: &str) -> String {
        common::admin(&self.sock, line).await
    }

    async fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        http(self.stats, method, path, token).await
    }
}

async fn gateway(servers: &[&FakeGrpc], sessions: &str, backend_extra: &str) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let list: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ name = \"{}\", addr = \"{}\" }}", s.name, s.addr))
        .collect();
    let toml = format!(
        r#"
[global]
admin = {{ path = "{}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:0", admin_token = "s3cret-token-0123" }}

[defaults]
timeout = {{ connect = "1s", queue = "2s" }}
check = {{ type = "none" }}

[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:0"]
backend = "spark"
{sessions}

[[backend]]
name = "spark"
{backend_extra}
servers = [ {} ]
"#,
        sock.display(),
        list.join(", ")
    );
    let path = dir.path().join("sclb.toml");
    std::fs::write(&path, toml).unwrap();
    let config = sclb::config::load(&path).unwrap();
    let sclb = sclb::Sclb::start(config).await.unwrap();
    let stats = sclb.stats_addr().unwrap();
    Gw {
        sclb,
        sock,
        stats,
        _dir: dir,
    }
}

/// One HTTP/1.1 request to the stats listener; (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The value of a metric line (exact series), or 0.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// `ExecutePlan` streams `n` messages, one every 20 ms.
fn slow(n: usize) -> Behaviour {
    Behaviour {
        stream_messages: n,
        stream_every: Duration::from_millis(20),
        message_size: 0,
        ..Default::default()
    }
}

async fn wait_until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sessions_from_one_connection_spread_and_each_stays_on_its_server() {
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let gw = gateway(&[&a, &b], "", "").await;
    // 20 sessions over one client connection: one client IP, as behind a NAT.
    let mut c = Client::connect(gw.addr()).await;
    let mut first = Vec::new();
    for n in 0..20 {
        let r = c
            .call("Config", request("01_Config_set.bin", &session(n)))
            .await;
        assert_eq!(r.status, 0, "{r:?}");
        first.push(r.server().to_string());
    }
    let used: BTreeSet<&str> = first.iter().map(String::as_str).collect();
    assert_eq!(
        used,
        BTreeSet::from(["sc1", "sc2"]),
        "sessions spread: {first:?}"
    );

    // Every later RPC of a session, on another connection (the client reconnected or changed
    // address), reaches the server that has it: unary, server-streaming and client-streaming.
    let mut c2 = Client::connect(gw.addr()).await;
    for (n, server) in first.iter().enumerate() {
        let s = session(n as u32);
        for (method, fixture) in [
            ("AnalyzePlan", "03_AnalyzePlan_schema.bin"),
            ("ExecutePlan", "04_ExecutePlan_root_aggregate.bin"),
            ("ReattachExecute", "06_ReattachExecute_request.bin"),
            ("AddArtifacts", "12_AddArtifacts_batch.bin"),
            ("Interrupt", "16_Interrupt_tag.bin"),
        ] {
            let r = c2.call(method, request(fixture, &s)).await;
            assert_eq!(r.status, 0, "{method}: {r:?}");
            assert_eq!(r.server(), server, "{method} of session {n}");
            if method == "ExecutePlan" {
                assert_eq!(r.messages.len(), 3, "every streamed message arrives");
            }
        }
    }
    for (n, server) in first.iter().enumerate() {
        let owner = if server == "sc1" { &a } else { &b };
        let other = if server == "sc1" { &b } else { &a };
        assert_eq!(owner.methods(&session(n as u32)).len(), 6);
        assert!(other.methods(&session(n as u32)).is_empty());
    }
    // The request bytes reach the server unchanged (the fake reports their length).
    let big = request("11_AddArtifacts_begin_chunk_large.bin", &session(0));
    let r = c2.call("AddArtifacts", big.clone()).await;
    assert_eq!(r.headers["x-request-bytes"], big.len().to_string().as_str());

    let shown = gw.admin("show sessions").await;
    assert!(shown.starts_with("# sessions: 20\n"), "{shown}");
    assert!(
        shown.contains(&format!(
            "{}: user=sclb-test fe=gw be=spark srv={}",
            session(3),
            first[3]
        )),
        "{shown}"
    );
}

#[tokio::test]
async fn unknown_methods_get_unimplemented_and_the_metrics_count_rpcs() {
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let gw = gateway(&[&a], "", "").await;
    let mut c = Client::connect(gw.addr()).await;
    let r = c
        .call_path("/grpc.health.v1.Health/Check", grpc::frame(b""))
        .await;
    assert_eq!(r.status, 12);
    assert!(
        r.message.contains("not a Spark Connect method"),
        "{}",
        r.message
    );
    assert_eq!(a.seen.lock().unwrap().rpcs, 0, "not forwarded");

    for _ in 0..3 {
        assert_eq!(
            c.call("Config", request("02_Config_get.bin", &session(1)))
                .await
                .status,
            0
        );
    }
    let (code, m) = gw.http("GET", "/metrics", None).await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(
            &m,
            r#"spark_connect_proxy_requests_total{method="Config",code="OK"}"#
        ),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"spark_connect_proxy_errors_total{reason="unimplemented"}"#
        ),
        1.0
    );
    assert_eq!(metric(&m, "spark_connect_sessions_active"), 1.0);
    assert_eq!(metric(&m, "spark_connect_sessions_created_total"), 1.0);
    assert!(
        m.contains(r#"spark_connect_message_latency_seconds_count{method="Config"} 3"#),
        "{m}"
    );
    assert!(
        m.contains("sclb_frontend_"),
        "sclb's own metrics are still there"
    );
    // Prometheus text 0.0.4 (the default): a counter's TYPE names its `_total` samples, and
    // there is no OpenMetrics `# EOF`.
    assert!(
        m.contains("# TYPE spark_connect_proxy_requests_total counter"),
        "{m}"
    );
    assert!(!m.contains("# EOF"));

    // show stat: the gateway is an HTTP proxy to HAProxy's eyes; a server counts RPC streams.
    let stat = gw.admin("show stat").await;
    let header: Vec<&str> = stat.lines().next().unwrap()[2..].split(',').collect();
    let col = |row: &str, name: &str| {
        let pos = header.iter().position(|h| *h == name).unwrap();
        let line = stat.lines().find(|l| l.starts_with(row)).unwrap();
        line.split(',').nth(pos).unwrap().to_string()
    };
    assert_eq!(col("gw,FRONTEND,", "mode"), "http");
    assert_eq!(col("spark,sc1,", "stot"), "3");
    assert_eq!(col("spark,sc1,", "scur"), "0");
}

#[tokio::test]
async fn killing_a_session_closes_its_streams_and_its_client_is_told() {
    let a = FakeGrpc::start("sc1", slow(1000)).await;
    let gw = gateway(&[&a], "", "").await;
    let mut c = Client::connect(gw.addr()).await;
    let s = session(7);
    let resp = c
        .start(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &s),
        )
        .await;
    assert_eq!(resp.headers()["x-fake-server"], "sc1");
    let reading = tokio::spawn(grpc::finish(resp));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gw.admin("show sessions").await.contains("streams=1"));

    assert_eq!(gw.admin(&format!("kill session {s}")).await, "\n");
    let r = tokio::time::timeout(Duration::from_secs(5), reading)
        .await
        .expect("the stream ends when its session is killed")
        .unwrap();
    assert_eq!(r.status, 1, "CANCELLED: {r:?}");
    assert!(r.message.contains("killed by an operator"), "{}", r.message);
    assert!(!r.messages.is_empty() && r.messages.len() < 1000);

    // The client is told its session is gone, instead of landing on a fresh one.
    let r = c.call("Config", request("02_Config_get.bin", &s)).await;
    assert_eq!(r.status, 9, "FAILED_PRECONDITION: {r:?}");
    assert!(
        r.message.contains("create a new SparkSession"),
        "{}",
        r.message
    );
    assert_eq!(gw.admin("show sessions").await, "# sessions: 0\n\n");
    // And the server was asked to free it.
    wait_until(
        "ReleaseSession on the server",
        Duration::from_secs(5),
        async || a.methods(&s).contains(&"ReleaseSession".to_string()),
    )
    .await;
    let r = gw
        .admin("kill session 5c1b0000-0000-4000-8000-999999999999")
        .await;
    assert!(r.starts_with("No such session"), "{r}");
}

#[tokio::test]
async fn idle_sessions_are_reaped_busy_ones_are_not() {
    let a = FakeGrpc::start("sc1", slow(100)).await;
    let gw = gateway(
        &[&a],
        r#"sessions = { idle_timeout = "500ms", max_ttl = "1h", cleanup_interval = "100ms" }"#,
        "",
    )
    .await;
    let mut c = Client::connect(gw.addr()).await;
    let (idle, busy) = (session(1), session(2));
    assert_eq!(
        c.call("Config", request("01_Config_set.bin", &idle))
            .await
            .status,
        0
    );
    // A 2-second stream: activity keeps its session.
    let r = c
        .call(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &busy),
        )
        .await;
    assert_eq!(r.status, 0);
    assert_eq!(r.messages.len(), 100, "the busy session was not cut");
    let shown = gw.admin("show sessions").await;
    assert!(!shown.contains(&idle), "idle session reaped: {shown}");
    assert!(shown.contains(&busy), "{shown}");
    wait_until(
        "busy session reaped once idle",
        Duration::from_secs(5),
        async || !gw.admin("show sessions").await.contains(&busy),
    )
    .await;
    let (_, m) = gw.http("GET", "/metrics", None).await;
    assert_eq!(
        metric(&m, r#"spark_connect_sessions_expired_total{reason="idle"}"#),
        2.0,
        "{m}"
    );
    assert_eq!(metric(&m, "spark_connect_sessions_active"), 0.0);
    assert!(
        m.contains("spark_connect_session_duration_seconds_count 2"),
        "{m}"
    );
    wait_until(
        "both released on the server",
        Duration::from_secs(5),
        async || {
            [&idle, &busy]
                .iter()
                .all(|s| a.methods(s).contains(&"ReleaseSession".to_string()))
        },
    )
    .await;
}

#[tokio::test]
async fn sessions_end_at_their_ttl_even_when_busy() {
    let a = FakeGrpc::start("sc1", slow(1000)).await;
    let gw = gateway(
        &[&a],
        r#"sessions = { idle_timeout = "1h", max_ttl = "700ms", cleanup_interval = "100ms" }"#,
        "",
    )
    .await;
    let mut c = Client::connect(gw.addr()).await;
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.call(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &session(3)),
        ),
    )
    .await
    .expect("cut at the TTL");
    assert_eq!(r.status, 1);
    assert!(r.message.contains("maximum lifetime"), "{}", r.message);
}

#[tokio::test]
async fn a_released_session_leaves_the_registry() {
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let gw = gateway(&[&a], "", "").await;
    let mut c = Client::connect(gw.addr()).await;
    let s = session(4);
    assert_eq!(
        c.call("Config", request("01_Config_set.bin", &s))
            .await
            .status,
        0
    );
    assert!(gw.admin("show sessions").await.contains(&s));
    assert_eq!(
        c.call(
            "ReleaseSession",
            request("18_ReleaseSession_request.bin", &s)
        )
        .await
        .status,
        0
    );
    assert_eq!(gw.admin("show sessions").await, "# sessions: 0\n\n");
    let (_, m) = gw.http("GET", "/metrics", None).await;
    assert_eq!(
        metric(
            &m,
            r#"spark_connect_sessions_expired_total{reason="released"}"#
        ),
        1.0
    );
    // PySpark's background ReleaseExecute calls arrive after ReleaseSession: they reach the
    // server that held the session (which answers as Spark does), and create no session.
    let r = c
        .call(
            "ReleaseExecute",
            request("08_ReleaseExecute_release_all.bin", &s),
        )
        .await;
    assert_eq!((r.status, r.server()), (0, "sc1"), "{r:?}");
    assert_eq!(gw.admin("show sessions").await, "# sessions: 0\n\n");
    // Anything else is told the session is over.
    let r = c.call("Config", request("02_Config_get.bin", &s)).await;
    assert_eq!(r.status, 9, "{r:?}");
    assert!(
        r.message.contains("was released by its client"),
        "{}",
        r.message
    );
}

#[tokio::test]
async fn sessions_over_http_need_the_admin_token() {
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    let gw = gateway(&[&a], "", "").await;
    let mut c = Client::connect(gw.addr()).await;
    let s = session(5);
    assert_eq!(
        c.call("Config", request("01_Config_set.bin", &s))
            .await
            .status,
        0
    );

    assert_eq!(gw.http("GET", "/sessions", None).await.0, 401);
    assert_eq!(gw.http("GET", "/sessions", Some("wrong")).await.0, 401);
    let (code, body) = gw.http("GET", "/sessions", Some("s3cret-token-0123")).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let list = v["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["session_id"], s.as_str());
    assert_eq!(list[0]["user_id"], "sclb-test");
    assert_eq!(list[0]["server"], "sc1");
    assert_eq!(list[0]["rpcs"], 1);

    assert_eq!(
        gw.http("DELETE", &format!("/sessions/{s}"), None).await.0,
        401
    );
    assert_eq!(
        gw.http(
            "DELETE",
            &format!("/sessions/{s}"),
            Some("s3cret-token-0123")
        )
        .await
        .0,
        204
    );
    assert_eq!(
        gw.http(
            "DELETE",
            &format!("/sessions/{s}"),
            Some("s3cret-token-0123")
        )
        .await
        .0,
        404
    );
    let (_, body) = gw.http("GET", "/sessions", Some("s3cret-token-0123")).await;
    assert_eq!(body.trim(), r#"{"sessions":[]}"#);
}

#[tokio::test]
async fn a_session_moves_only_when_its_server_is_out_and_a_down_server_gets_no_new_ones() {
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let gw = gateway(&[&a, &b], "", "").await;
    let mut c = Client::connect(gw.addr()).await;
    let s = session(6);
    let home = c
        .call("Config", request("01_Config_set.bin", &s))
        .await
        .server()
        .to_string();
    let other = if home == "sc1" { "sc2" } else { "sc1" };
    // Drain keeps the session where it is.
    assert_eq!(
        gw.admin(&format!("set server spark/{home} state drain"))
            .await,
        "\n"
    );
    assert_eq!(
        c.call("Config", request("02_Config_get.bin", &s))
            .await
            .server(),
        home
    );
    // New sessions go to the other server meanwhile.
    for n in 100..104 {
        assert_eq!(
            c.call("Config", request("01_Config_set.bin", &session(n)))
                .await
                .server(),
            other
        );
    }
    // Maintenance moves it (its state there is lost, as with a pinned L4 client).
    assert_eq!(
        gw.admin(&format!("disable server spark/{home}")).await,
        "\n"
    );
    assert_eq!(
        c.call("Config", request("02_Config_get.bin", &s))
            .await
            .server(),
        other
    );
    assert!(
        gw.admin("show sessions")
            .await
            .contains(&format!("{s}: user=sclb-test fe=gw be=spark srv={other}"))
    );
}

#[tokio::test]
async fn an_unreachable_server_gives_unavailable_with_retry_info_and_new_sessions_go_elsewhere() {
    let a = FakeGrpc::start("sc1", Behaviour::default()).await;
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            r#"
[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:0"]
backend = "spark"

[[backend]]
name = "spark"
balance = "roundrobin"
retries = 1
check = {{ type = "none" }}
servers = [ {{ name = "dead", addr = "{dead}" }}, {{ name = "sc1", addr = "{}" }} ]
"#,
            a.addr
        );
        let p = dir.path().join("sclb.toml");
        std::fs::write(&p, toml).unwrap();
        (
            sclb::Sclb::start(sclb::config::load(&p).unwrap())
                .await
                .unwrap(),
            dir,
        )
    };
    let mut c = Client::connect(gw.0.local_addrs("gw")[0]).await;
    // Each new session lands on sc1, whichever server the balancer tried first.
    for n in 0..4 {
        let r = c
            .call("Config", request("01_Config_set.bin", &session(n)))
            .await;
        assert_eq!((r.status, r.server()), (0, "sc1"), "{r:?}");
    }
    // A session with history on sc1 whose server then dies is told to retry, not moved.
    a.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = c
        .call("Config", request("02_Config_get.bin", &session(0)))
        .await;
    assert_eq!(r.status, 14, "UNAVAILABLE: {r:?}");
    assert!(r.message.contains("sc1"), "{}", r.message);
    let details = r
        .headers
        .get("grpc-status-details-bin")
        .expect("RetryInfo attached");
    assert!(!details.is_empty());
}

#[tokio::test]
async fn a_client_that_cancels_resets_the_servers_stream_and_a_slow_reader_slows_the_server() {
    let big = Behaviour {
        stream_messages: 2000,
        stream_every: Duration::ZERO,
        message_size: 64 * 1024,
        ..Default::default()
    };
    let a = FakeGrpc::start("sc1", big).await;
    let gw = gateway(&[&a], "", "").await;
    let mut c = Client::connect(gw.addr()).await;

    // Flow control end to end: the client reads nothing; the server soon cannot send more.
    // 2000 × 64 KiB = 125 MiB would be sent at once if sclb buffered.
    let resp = c
        .start(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &session(1)),
        )
        .await;
    let sent = || a.seen.lock().unwrap().sent;
    let mut last = usize::MAX;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sent() == last {
            break;
        }
        last = sent();
    }
    let stalled = sent();
    assert!(
        stalled < 200,
        "the server stalls once the HTTP/2 windows are full (~3 MiB here), not after all 2000 messages: {stalled}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sent(), stalled, "nothing more until the client reads");

    // Cancellation: the client drops the stream (RST_STREAM); the server's stream is reset.
    drop(resp);
    wait_until(
        "the server sees the cancel",
        Duration::from_secs(5),
        async || a.seen.lock().unwrap().cancelled == 1,
    )
    .await;
    assert!(gw.admin("show sessions").await.contains("streams=0"));

    // Reading the whole stream: every byte arrives, trailers last.
    let r = c
        .call(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &session(2)),
        )
        .await;
    assert_eq!(r.status, 0);
    assert_eq!(r.messages.len(), 2000);
    assert!(r.messages.iter().all(|m| m.len() > 64 * 1024));
}

/// `CloneSessionRequest { session_id = 1, user_context = 2 { user_id = 1 }, new_session_id = 4 }`
/// (Spark 4.2; PySpark 4.0.5, which recorded the other fixtures, has no CloneSession).
fn clone_session_request(source: &str, user: &str, new: &str) -> bytes::Bytes {
    let mut m = vec![0x0a, source.len() as u8];
    m.extend_from_slice(source.as_bytes());
    m.extend_from_slice(&[0x12, user.len() as u8 + 2, 0x0a, user.len() as u8]);
    m.extend_from_slice(user.as_bytes());
    m.extend_from_slice(&[0x22, new.len() as u8]);
    m.extend_from_slice(new.as_bytes());
    grpc::frame(&m)
}

#[tokio::test]
async fn a_cloned_session_is_created_beside_its_source() {
    let (a, b) = (
        FakeGrpc::start("sc1", Behaviour::default()).await,
        FakeGrpc::start("sc2", Behaviour::default()).await,
    );
    let gw = gateway(&[&a, &b], "", "").await;
    let mut c = Client::connect(gw.addr()).await;
    for n in 0..6 {
        let (source, clone) = (session(n), session(100 + n));
        let home = c
            .call("Config", request("01_Config_set.bin", &source))
            .await
            .server()
            .to_string();
        let r = c
            .call(
                "CloneSession",
                clone_session_request(&source, "sclb-test", &clone),
            )
            .await;
        assert_eq!((r.status, r.server()), (0, home.as_str()));
        // The clone's own RPCs find it there, whatever the balancer would have said.
        for _ in 0..2 {
            let r = c.call("Config", request("02_Config_get.bin", &clone)).await;
            assert_eq!(r.server(), home, "clone {n} follows its source");
        }
    }
}
