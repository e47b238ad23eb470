//! Health checks: each probe against real peers, the rise/fall state machine under paused
//! time, and what DOWN and UP mean for pinned clients through real sockets.

mod common;
#[path = "common/h2srv.rs"]
mod h2srv;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use common::*;
use h2srv::{FakeSpark, SparkMode};
use sclb::health::probe::{H2Probe, Probe, ProbeFuture, SparkProbe, TcpProbe};
use sclb::server::{CheckStatus, LastCheck};

const T: Duration = Duration::from_millis(500);

async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Accepts connections and never says a word.
async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// An HTTP/1.1 server: answers anything with 400 and closes.
async fn http1_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
    });
    (addr, task)
}

#[tokio::test]
async fn tcp_probe() {
    let ok = Backend::start("s").await;
    assert_eq!(
        TcpProbe::default().check(ok.addr, T).await.status,
        CheckStatus::L4Ok
    );
    let r = TcpProbe::default().check(closed_port().await, T).await;
    assert_eq!(r.status, CheckStatus::L4Con);
    assert!(r.desc.contains("refused"), "{}", r.desc);

    // A listener whose accept queue is full drops SYNs: the connect times out.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(0).unwrap();
    let full = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(full),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let r = TcpProbe::default()
        .check(full, Duration::from_millis(300))
        .await;
    assert_eq!(r.status, CheckStatus::L4Tout, "{r:?}");
}

#[tokio::test]
async fn h2_probe() {
    let h2 = FakeSpark::start(SparkMode::Healthy).await;
    let r = H2Probe::default().check(h2.addr, T).await;
    assert_eq!(r.status, CheckStatus::L7Ok, "{r:?}");

    let (silent, _t) = silent_server().await;
    assert_eq!(
        H2Probe::default().check(silent, T).await.status,
        CheckStatus::L7Tout
    );

    let (http1, _t) = http1_server().await;
    let r = H2Probe::default().check(http1, T).await;
    assert_eq!(r.status, CheckStatus::L7Rsp, "{r:?}");

    assert_eq!(
        H2Probe::default()
            .check(closed_port().await, T)
            .await
            .status,
        CheckStatus::L4Con
    );
}

#[tokio::test]
async fn spark_probe_reads_the_version_of_a_real_spark_reply() {
    let spark = FakeSpark::start(SparkMode::Healthy).await;
    let probe = SparkProbe::new();
    for _ in 0..3 {
        let r = probe.check(spark.addr, T).await;
        assert_eq!(r.status, CheckStatus::L7Ok, "{r:?}");
        assert_eq!(r.desc, "Spark 4.0.5");
    }
    let seen = spark.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    for (path, ct, session) in &seen {
        assert_eq!(path, "/spark.connect.SparkConnectService/AnalyzePlan");
        assert_eq!(ct, "application/grpc");
        // One fixed session per probe: a new one per check would pile up server sessions.
        assert_eq!(session, probe.session_id());
        assert!(
            uuid::Uuid::parse_str(session).is_ok(),
            "Spark wants a UUID: {session}"
        );
    }
}

#[tokio::test]
async fn spark_probe_failures_say_why() {
    let probe = SparkProbe::new();
    let err = FakeSpark::start(SparkMode::Error).await;
    let r = probe.check(err.addr, T).await;
    assert_eq!(r.status, CheckStatus::L7Sts);
    assert!(
        r.desc
            .starts_with("gRPC 13 INTERNAL: [INVALID_HANDLE.FORMAT]"),
        "{}",
        r.desc
    );

    let garbage = FakeSpark::start(SparkMode::Garbage).await;
    assert_eq!(
        probe.check(garbage.addr, T).await.status,
        CheckStatus::L7Rsp
    );

    let nf = FakeSpark::start(SparkMode::NotFound).await;
    let r = probe.check(nf.addr, T).await;
    assert_eq!(
        (r.status, r.desc.as_str()),
        (CheckStatus::L7Sts, "HTTP status 404")
    );

    let (http1, _t) = http1_server().await;
    assert_eq!(probe.check(http1, T).await.status, CheckStatus::L7Rsp);

    let (silent, _t) = silent_server().await;
    assert_eq!(probe.check(silent, T).await.status, CheckStatus::L7Tout);

    assert_eq!(
        probe.check(closed_port().await, T).await.status,
        CheckStatus::L4Con
    );
}

/// A probe that answers from a script and notes when it was asked.
#[derive(Clone, Default)]
struct Scripted {
    answers: Arc<Mutex<VecDeque<bool>>>,
    asked_at: Arc<Mutex<Vec<Duration>>>,
    start: Arc<Mutex<Option<tokio::time::Instant>>>,
}

impl Probe for Scripted {
    fn check(&self, _addr: SocketAddr, _t: Duration) -> ProbeFuture<'_> {
        Box::pin(async move {
            let start = *self
                .start
                .lock()
                .unwrap()
                .get_or_insert(tokio::time::Instant::now());
            self.asked_at.lock().unwrap().push(start.elapsed());
            let ok = self.answers.lock().unwrap().pop_front().unwrap_or(true);
            LastCheck {
                status: if ok {
                    CheckStatus::L4Ok
                } else {
                    CheckStatus::L4Con
                },
                duration_ms: Some(0),
                desc: String::new(),
            }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn fall_three_rise_two_at_inter_fastinter_downinter() {
    let toml = r#"
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"
[[backend]]
name = "be"
# The test servers greet first.
tcp_smart_connect = false
check = { type = "tcp", inter = "2s", fastinter = "500ms", downinter = "5s", rise = 2, fall = 3, spread = "0%", init_state = "fully-up" }
servers = [ { name = "s1", addr = "127.0.0.1:1" } ]
"#;
    let config = sclb::config::parse(Path::new("t.toml"), toml).unwrap();
    let shared = sclb::Shared::new(config, Vec::new(), 1024);
    let server = shared.state.snapshot().backends[0].servers[0].clone();
    let probe = Scripted::default();
    probe
        .answers
        .lock()
        .unwrap()
        .extend([true, false, false, false, true, true]);
    let stop = tokio_util::sync::CancellationToken::new();
    *probe.start.lock().unwrap() = Some(tokio::time::Instant::now());
    sclb::health::spawn_with(
        server.clone(),
        Box::new(probe.clone()),
        sclb::control::checker_report(&shared),
        stop.clone(),
    );

    let mut statuses = Vec::new();
    for _ in 0..6 {
        let n = probe.asked_at.lock().unwrap().len();
        while probe.asked_at.lock().unwrap().len() == n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        statuses.push(server.status());
    }
    stop.cancel();
    let at: Vec<u64> = probe
        .asked_at
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.as_millis() as u64)
        .collect();
    assert_eq!(
        statuses,
        ["UP", "UP 2/3", "UP 1/3", "DOWN", "DOWN 1/2", "UP"],
        "checks at {at:?} ms"
    );
    // First check at once (spread 0), then inter while UP, fastinter while changing, downinter
    // while DOWN.
    assert_eq!(at, [0, 2000, 2500, 3000, 8000, 8500]);
    assert_eq!(server.counters.check_failures.load(Ordering::Relaxed), 3);
    assert_eq!(server.counters.check_downs.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn down_within_fall_x_inter_and_pinned_clients_move_only_then() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    // Checks go to separate ports, so that the test can fail a server's checks while its data
    // port still answers: a client must stay pinned until the server is really DOWN.
    let check_a = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let check_a_addr = check_a.local_addr().unwrap();
    let check_b = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let toml = format!(
        r#"
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"
[[backend]]
name = "be"
# The test servers greet first.
tcp_smart_connect = false
stick = {{ on = "src", expire = "2h" }}
check = {{ type = "tcp", inter = "100ms", timeout = "100ms", rise = 2, fall = 3, spread = "0%" }}
servers = [
  {{ name = "s1", addr = "{}", check = {{ port = {} }} }},
  {{ name = "s2", addr = "{}", check = {{ port = {} }} }},
]
"#,
        a.addr,
        check_a_addr.port(),
        b.addr,
        check_b.local_addr().unwrap().port()
    );
    let sclb = start_sclb(&toml).await;
    let fe = frontend_addr(&sclb);
    let snap = sclb.state().snapshot();
    let s1 = snap.backends[0].server_by_name("s1").unwrap().clone();
    wait_for(
        || s1.health.last().status == CheckStatus::L4Ok,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(which_server(2, fe).await.0, "s1");

    drop(check_a); // s1's checks now fail
    let t0 = std::time::Instant::now();
    assert_eq!(
        which_server(2, fe).await.0,
        "s1",
        "one failed check moves nobody"
    );
    wait_for(|| s1.status() == "DOWN", Duration::from_secs(3)).await;
    let took = t0.elapsed();
    // fall x inter + timeout, with slack for a loaded machine.
    assert!(
        took < Duration::from_millis(3 * 100 + 100 + 600),
        "DOWN after {took:?}"
    );
    assert_eq!(s1.health.last().status, CheckStatus::L4Con);
    assert_eq!(s1.counters.check_downs.load(Ordering::Relaxed), 1);

    assert_eq!(
        which_server(2, fe).await.0,
        "s2",
        "DOWN: the pinned client moves"
    );
    assert_eq!(snap.backends[0].repins.count.load(Ordering::Relaxed), 1);

    let _check_a = TcpListener::bind(check_a_addr).await.unwrap(); // s1 is back
    let t0 = std::time::Instant::now();
    wait_for(|| s1.status() == "UP", Duration::from_secs(3)).await;
    assert!(
        t0.elapsed() < Duration::from_millis(2 * 100 + 700),
        "UP after {:?}",
        t0.elapsed()
    );
    // The moved client stays where its new session is.
    assert_eq!(which_server(2, fe).await.0, "s2");
}

#[tokio::test]
async fn on_marked_down_shutdown_sessions_closes_live_connections() {
    let a = Backend::start("s1").await;
    let check = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let toml = config(
        &[&a],
        r#"on_marked_down = "shutdown-sessions"
check = { type = "tcp", inter = "100ms", fall = 1, spread = "0%" }"#,
        "",
    )
    .replace(
        "addr =",
        &format!(
            "check = {{ port = {} }}, addr =",
            check.local_addr().unwrap().port()
        ),
    );
    let sclb = start_sclb(&toml).await;
    let (_, mut conn) = which_server(2, frontend_addr(&sclb)).await;
    drop(check);
    let rest = read_to_end(&mut conn, Duration::from_secs(3)).await;
    assert!(
        rest.is_empty(),
        "connection closed when its server went DOWN"
    );
}

async fn wait_for(cond: impl Fn() -> bool, within: Duration) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "condition not met within {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn probe_messages_match_what_pyspark_and_spark_put_on_the_wire() {
    use prost::Message;
    use sclb::health::spark_proto;
    // Our request, without the client_type we add, is byte for byte what pyspark's generated
    // code encodes for the same fields.
    let mut req = spark_proto::spark_version_request("5c1b0000-7072-4f62-8e00-000000000001");
    req.client_type = None;
    let pyspark = std::fs::read("tests/fixtures/spark/analyze_spark_version_request.bin").unwrap();
    assert_eq!(req.encode_to_vec(), pyspark);
    // The real server's reply decodes to its version.
    let reply = std::fs::read("tests/fixtures/spark/analyze_spark_version_response.bin").unwrap();
    let mut framed = vec![0, 0, 0, 0, reply.len() as u8];
    framed.extend_from_slice(&reply);
    assert_eq!(
        sclb::health::probe::decode_version(&framed).unwrap(),
        "4.0.5"
    );
}
