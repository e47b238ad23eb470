//! Issue 19 on the gateway, on the real binary: one source never uses up the shared session
//! quota (class 5), slow readers cost only their own stream window (class 4), and servers
//! that accept TCP but never answer never hang an RPC (class 6). Each test asserts sclb is
//! alive and serving L4 meanwhile and prints its figures (`--nocapture`).

#[path = "common/grpc.rs"]
mod grpc;
mod realbin;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use grpc::{Behaviour, Client, FakeGrpc, request, session};
use realbin::{SclbProcess, connect_from, echo_backend, l4_serves};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// L4 "l4" to an echo server, gateway "gw" over `servers` (name, addr); `gw` and `backend`
/// go into the gateway frontend's and its backend's tables.
fn config(
    dir: &Path,
    echo: SocketAddr,
    servers: &[(&str, SocketAddr)],
    gw: &str,
    backend: &str,
) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|(n, a)| format!("{{ name = \"{n}\", addr = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{}", mode = "0600", level = "admin" }}
threads = 1

[defaults]
check = {{ type = "none" }}
timeout = {{ connect = "1s" }}

[[frontend]]
name = "l4"
bind = ["127.0.0.1:0"]
backend = "echo"

[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.2:0"]
backend = "spark"
{gw}

[[backend]]
name = "echo"
servers = [ {{ name = "e1", addr = "{echo}" }} ]

[[backend]]
name = "spark"
{backend}
servers = [ {} ]
"#,
        dir.join("admin.sock").display(),
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_cannot_fill_the_session_registry() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = FakeGrpc::start("sc1", Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(
            dir.path(),
            echo,
            &[("sc1", spark.addr)],
            "sessions = { max = 40 }",
            "",
        ),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let gw = p.frontend_addr("gw");

    // The first client (127.0.0.3) hammers: 400 new sessions as fast as it can, over 4
    // connections.
    let hammer = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for c in 0..4u32 {
            tasks.push(tokio::spawn(async move {
                let tcp = connect_from(3, gw).await.unwrap();
                let mut client = Client::over(tcp, gw).await;
                let (mut ok, mut refused, mut other) = (0, Vec::new(), 0);
                for i in 0..100u32 {
                    let r = client
                        .call(
                            "Config",
                            request("01_Config_set.bin", &session(c * 1000 + i)),
                        )
                        .await;
                    match r.status {
                        0 => ok += 1,
                        8 => refused.push(r.message),
                        _ => other += 1,
                    }
                }
                (ok, refused, other)
            }));
        }
        let mut all = (0, Vec::new(), 0);
        for t in tasks {
            let (o, r, x) = t.await.unwrap();
            all.0 += o;
            all.1.extend(r);
            all.2 += x;
        }
        all
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile a second client (127.0.0.4) opens its sessions, one every 100 ms.
    let tcp = connect_from(4, gw).await.unwrap();
    let mut second = Client::over(tcp, gw).await;
    let mut second_ok = 0;
    for i in 0..10u32 {
        let r = second
            .call("Config", request("01_Config_set.bin", &session(90_000 + i)))
            .await;
        assert_eq!(r.status, 0, "the second client's session {i}: {r:?}");
        second_ok += 1;
        assert!(l4_serves(l4, Duration::from_secs(2)).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, refused, other) = hammer.await.unwrap();
    println!(
        "figure: sessions.max 40: the hammering client opened {ok} of 400 ({} refused \
         RESOURCE_EXHAUSTED, {other} other); the second client opened {second_ok} of 10",
        refused.len()
    );
    assert!(ok <= 10, "at most a quarter of sessions.max: {ok}");
    assert_eq!(other, 0);
    assert!(
        refused.iter().all(
            |m| m.contains("sessions.max_per_client") || m.contains("sessions.rate_per_client")
        ),
        "each refusal names the limit: {:?}",
        &refused[..3.min(refused.len())]
    );
    assert!(p.is_running());
}

/// A server that accepts TCP and never says anything.
async fn mute_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A server that speaks HTTP/2 but never answers a request.
async fn deaf_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok(req)) = conn.accept().await {
                    held.push(req);
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_accept_but_never_answer_never_hang_an_rpc() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let good = FakeGrpc::start("good", Behaviour::default()).await;
    let (mute, deaf) = (mute_server().await, deaf_server().await);
    let mut p = SclbProcess::start(
        dir.path(),
        &config(
            dir.path(),
            echo,
            &[("mute", mute), ("deaf", deaf), ("good", good.addr)],
            "",
            r#"timeout = { connect = "1s", server = "2s" }"#,
        ),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let gw = p.frontend_addr("gw");
    let mut client = Client::connect(gw).await;
    // New sessions: balanced over the three; one placed on the mute server fails over at
    // once (connect timeout); one placed on the deaf one is moved and told to retry.
    let mut worst = Duration::ZERO;
    let mut statuses = Vec::new();
    for i in 0..9u32 {
        let t0 = Instant::now();
        let mut r = client
            .call("Config", request("01_Config_set.bin", &session(i)))
            .await;
        if r.status == 14 {
            assert!(r.message.contains("timeout server"), "{r:?}");
            r = client
                .call("Config", request("01_Config_set.bin", &session(i)))
                .await;
        }
        worst = worst.max(t0.elapsed());
        statuses.push(r.status);
        assert_eq!(r.status, 0, "session {i}: {r:?}");
        assert_eq!(r.server(), "good");
        assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    }
    assert!(l4_serves(l4, Duration::from_secs(2)).await);
    println!(
        "figure: 9 new sessions over mute, deaf and good servers all served by good; slowest \
         first RPC {worst:?} (connect 1s, server 2s)"
    );

    // A session with history on the deaf server: made to look so by sending it there by name.
    let deaf_only = dir.path().join("sclb.toml");
    let text = std::fs::read_to_string(&deaf_only).unwrap();
    std::fs::write(
        &deaf_only,
        text.replace(
            &format!("{{ name = \"good\", addr = \"{}\" }}", good.addr),
            "",
        )
        .replace(&format!("{{ name = \"mute\", addr = \"{mute}\" }}, "), ""),
    )
    .unwrap();
    let reply = p.admin("reload");
    assert!(
        reply.contains("reloaded") || reply.contains("servers"),
        "{reply}"
    );
    let t0 = Instant::now();
    let r = client
        .call("Config", request("01_Config_set.bin", &session(500)))
        .await;
    assert_eq!(r.status, 14, "{r:?}");
    assert!(
        r.message.contains("deaf") && r.message.contains("timeout server"),
        "{r:?}"
    );
    let r2 = client
        .call("Config", request("02_Config_get.bin", &session(500)))
        .await;
    assert_eq!(r2.status, 14, "{r2:?}");
    println!(
        "figure: a session on a server that never answers: UNAVAILABLE after {:?}: {}",
        t0.elapsed(),
        r2.message
    );
    assert!(p.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_stalled_readers_cost_their_windows_and_delay_nobody() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    // Each ExecutePlan streams 400 messages of 64 KiB (25 MiB) as fast as it may.
    let spark = FakeGrpc::start(
        "sc1",
        Behaviour {
            stream_messages: 400,
            stream_every: Duration::ZERO,
            message_size: 64 * 1024,
            ..Default::default()
        },
    )
    .await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(dir.path(), echo, &[("sc1", spark.addr)], "", ""),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let gw = p.frontend_addr("gw");
    let rss_before = p.rss_kib();
    // 100 clients start a big result (in one Spark session) and never read it.
    let mut stalled = Vec::new();
    for _ in 0..100u32 {
        let mut c = Client::connect(gw).await;
        let resp = c
            .start(
                "ExecutePlan",
                request("04_ExecutePlan_root_aggregate.bin", &session(1)),
            )
            .await;
        stalled.push((c, resp));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_stalled = p.rss_kib();
    // Another client on the same server (one worker: the same upstream connection) gets its
    // whole 25 MiB result promptly.
    let t0 = Instant::now();
    let mut reader = Client::connect(gw).await;
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        reader.call(
            "ExecutePlan",
            request("04_ExecutePlan_root_aggregate.bin", &session(999)),
        ),
    )
    .await
    .expect("a reading client is not stalled by the others");
    assert_eq!(r.status, 0, "{}", r.message);
    assert_eq!(r.messages.len(), 400);
    let took = t0.elapsed();
    assert!(l4_serves(l4, Duration::from_secs(2)).await);
    println!(
        "figure: 100 stalled gateway readers: sclb RSS {} MiB -> {} MiB ({} KiB each); a \
         reading client's 25 MiB stream took {took:?}",
        rss_before / 1024,
        rss_stalled / 1024,
        (rss_stalled.saturating_sub(rss_before)) / 100
    );
    assert!(
        rss_stalled.saturating_sub(rss_before) < 100 * 1024,
        "less than 1 MiB per stalled reader: {rss_before} -> {rss_stalled} KiB"
    );
    drop(stalled);
    assert!(p.is_running());
}

/// A ConfigRequest with `user_id` (session_id field 1, user_context field 2), gRPC-framed.
fn config_request(session_id: &str, user_id: &str) -> bytes::Bytes {
    let mut user = vec![0x0a, user_id.len() as u8];
    user.extend_from_slice(user_id.as_bytes());
    let mut msg = vec![0x0a, session_id.len() as u8];
    msg.extend_from_slice(session_id.as_bytes());
    msg.push(0x12);
    msg.push(user.len() as u8);
    msg.extend_from_slice(&user);
    grpc::frame(&msg)
}

/// Class 7: a client-controlled user id with a newline, spaces and a terminal escape writes no
/// fake line or field into `show sessions` or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_user_id_is_escaped_wherever_it_is_printed() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = FakeGrpc::start("sc1", Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(dir.path(), echo, &[("sc1", spark.addr)], "", ""),
        &[],
    );
    let gw = p.frontend_addr("gw");
    let evil = "mallory\n5c1b0000-0000-4000-8000-00000000dead: user=root fe=gw\u{1b}[2J";
    let mut c = Client::connect(gw).await;
    let r = c.call("Config", config_request(&session(7), evil)).await;
    assert_eq!(r.status, 0, "{r:?}");
    let show = p.admin("show sessions");
    let lines: Vec<&str> = show.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "a header and one session line: {show}");
    assert!(
        !show.split_whitespace().any(|f| f == "user=root"),
        "no forged field: {show}"
    );
    assert!(!show.contains('\u{1b}'), "{show}");
    assert!(lines[1].contains("user=mallory\\n"), "{show}");
    let log = p.log_text();
    assert!(
        log.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every log line is sclb's own JSON line"
    );
    assert!(!log.contains('\u{1b}'), "{log}");
    println!("show sessions with a hostile user id:\n{show}");
}
