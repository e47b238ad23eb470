//! Issue 19, class 3: every listener has its own bound on connections, time and memory, and
//! the L4 data path keeps serving while any other listener is abused. On the real binary:
//! silent gateway connections, gateway RPCs that never send their first message, a flood of
//! idle connections to the stats port, idle clients on the admin socket. Each test asserts
//! sclb is alive and serving L4 while the abuse runs and prints its figures (`--nocapture`).

#[path = "common/grpc.rs"]
mod grpc;
mod realbin;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use realbin::{SclbProcess, echo_backend, field, l4_serves, message};

/// One test at a time: they count descriptors and time closes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// L4 frontend "l4" to `echo`, gateway "gw" to `grpc`, stats and admin; `global` and `gw`
/// are added to `[global]` and the gateway's table.
fn config(dir: &Path, echo: SocketAddr, grpc: SocketAddr, global: &str, gw: &str) -> String {
    format!(
        r#"
[global]
log = {{ level = "debug", format = "json" }}
admin = {{ path = "{}", mode = "0600", level = "admin" }}
{global}

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
# Another address than l4's: listeners are keyed by their configured address.
bind = ["127.0.0.2:0"]
backend = "spark"
{gw}

[[backend]]
name = "echo"
servers = [ {{ name = "e1", addr = "{echo}" }} ]

[[backend]]
name = "spark"
servers = [ {{ name = "sc1", addr = "{grpc}" }} ]
"#,
        dir.join("admin.sock").display()
    )
}

/// Waits for EOF (or a reset) on each of `conns`; the time the last one took.
async fn all_closed(conns: Vec<TcpStream>, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let waits = conns.into_iter().map(|mut s| async move {
        let mut b = [0u8; 256];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    tokio::time::timeout(within, futures::future::join_all(waits))
        .await
        .ok()
        .map(|_| t0.elapsed())
}

fn stats_addr(p: &SclbProcess) -> SocketAddr {
    for _ in 0..200 {
        for l in p.log_lines() {
            if message(&l).starts_with("stats page on") {
                return field(&l, "addr").parse().unwrap();
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("no stats listener:\n{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_gateway_clients_are_closed_and_never_stop_l4() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = grpc::FakeGrpc::start("sc1", grpc::Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(
            dir.path(),
            echo,
            spark.addr,
            "maxconn = 20",
            r#"timeout = { http_request = "1s" }"#,
        ),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let gw = p.frontend_addr("gw");

    // Variants: nothing at all; the HTTP/2 preface only; half a preface; junk.
    let mut silent = Vec::new();
    for i in 0..40 {
        let mut s = TcpStream::connect(gw).await.unwrap();
        match i % 4 {
            0 => {}
            1 => s
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap(),
            2 => s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap(),
            _ => s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap(),
        }
        silent.push(s);
    }
    // 40 gateway connections against maxconn 20: the gateway holds at most half, so L4
    // still serves at once.
    let t0 = Instant::now();
    let mut served = 0;
    while t0.elapsed() < Duration::from_millis(500) {
        assert!(
            l4_serves(l4, Duration::from_secs(2)).await,
            "L4 served while gateway clients were silent"
        );
        served += 1;
    }
    let closed = all_closed(silent, Duration::from_secs(10))
        .await
        .expect("silent gateway connections closed within 10 s");
    println!(
        "figure: 40 silent gateway connections (timeout.http_request 1s) closed after {closed:?}; \
         L4 served {served} round trips meanwhile"
    );
    assert!(closed >= Duration::from_millis(700), "{closed:?}");
    assert!(p.is_running());
    // And a real client still works afterwards.
    let mut c = grpc::Client::connect(gw).await;
    let r = c
        .call(
            "Config",
            grpc::request("01_Config_set.bin", &grpc::session(1)),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_that_never_sends_its_first_message_is_cut_at_the_request_timeout() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = grpc::FakeGrpc::start("sc1", grpc::Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(
            dir.path(),
            echo,
            spark.addr,
            "",
            r#"timeout = { http_request = "1s" }"#,
        ),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let gw = p.frontend_addr("gw");
    let tcp = TcpStream::connect(gw).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Variants: no body at all yet; 3 bytes of the 5-byte prefix; a prefix announcing 1 MB
    // and 1 KB of it. The stream stays open.
    let mut pending = Vec::new();
    let mut holds = Vec::new();
    for variant in 0..3 {
        let (mut tx, body) = futures::channel::mpsc::channel::<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >(4);
        match variant {
            0 => {}
            1 => tx
                .try_send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(&[
                    0, 0, 0,
                ]))))
                .unwrap(),
            _ => {
                let mut v = vec![0u8, 0, 0x10, 0, 0];
                v.extend(std::iter::repeat_n(b'x', 1024));
                tx.try_send(Ok(hyper::body::Frame::data(v.into()))).unwrap();
            }
        }
        holds.push(tx);
        let req = http::Request::post(format!(
            "http://{gw}/spark.connect.SparkConnectService/ExecutePlan"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(body))
        .unwrap();
        send.ready().await.unwrap();
        pending.push(send.send_request(req));
    }
    let t0 = Instant::now();
    for r in pending {
        let resp = tokio::time::timeout(Duration::from_secs(5), r)
            .await
            .expect("an answer within 5 s")
            .unwrap();
        let reply = grpc::finish(resp).await;
        assert_eq!(reply.status, 4, "DEADLINE_EXCEEDED: {reply:?}");
        assert!(reply.message.contains("http_request"), "{reply:?}");
    }
    println!(
        "figure: 3 RPCs without a first message cut after {:?}",
        t0.elapsed()
    );
    assert!(l4_serves(l4, Duration::from_secs(2)).await);
    assert!(p.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stats_port_flood_costs_the_data_path_nothing() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = grpc::FakeGrpc::start("sc1", grpc::Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(
            dir.path(),
            echo,
            spark.addr,
            r#"stats = { bind = "127.0.0.1:0", maxconn = 8, timeout = "1s" }"#,
            "",
        ),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let stats = stats_addr(&p);
    let fds_before = p.fds();
    // Variants: idle; half a request line; headers trickled, never finished; a kept-alive
    // connection after one full request.
    let mut flood = Vec::new();
    for i in 0..300 {
        let Ok(mut s) = TcpStream::connect(stats).await else {
            continue;
        };
        let _ = match i % 4 {
            0 => Ok(()),
            1 => s.write_all(b"GET /sta").await,
            2 => s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n").await,
            _ => {
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    .await
            }
        };
        flood.push(s);
    }
    let fds_flood = p.fds();
    let t0 = Instant::now();
    let mut served = 0;
    while t0.elapsed() < Duration::from_secs(1) {
        assert!(l4_serves(l4, Duration::from_secs(2)).await);
        served += 1;
    }
    let closed = all_closed(flood, Duration::from_secs(30))
        .await
        .expect("every flooding connection is closed");
    println!(
        "figure: stats flood of 300 connections (stats.maxconn 8, timeout 1s): sclb fds {fds_before} \
         -> {fds_flood}; L4 served {served} round trips in 1 s during the flood; all 300 closed \
         after {closed:?}"
    );
    assert!(
        fds_flood <= fds_before + 8 + 2,
        "the stats listener held at most its maxconn: {fds_before} -> {fds_flood}"
    );
    assert!(served >= 5, "{served}");
    // The page answers again once the flood is gone.
    let mut s = TcpStream::connect(stats).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(p.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_clients_are_bounded_and_timed_out() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = grpc::FakeGrpc::start("sc1", grpc::Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(dir.path(), echo, spark.addr, "", ""),
        &[],
    );
    let l4 = p.frontend_addr("l4");
    let fds_before = p.fds();
    let mut idle = Vec::new();
    for i in 0..50 {
        let mut s = UnixStream::connect(&p.admin).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"show in").await.unwrap();
        }
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_flood = p.fds();
    assert!(
        fds_flood <= fds_before + 32 + 2,
        "the admin socket holds at most 32 clients: {fds_before} -> {fds_flood}"
    );
    assert!(l4_serves(l4, Duration::from_secs(2)).await);
    let t0 = Instant::now();
    let closed = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(idle.into_iter().map(|mut s| async move {
            let mut b = Vec::new();
            let _ = s.read_to_end(&mut b).await;
        })),
    )
    .await;
    assert!(closed.is_ok(), "idle admin clients are closed");
    // The admin socket answers once they are gone.
    let info = p.admin("show info");
    assert!(info.contains("Pid:"), "{info}");
    println!(
        "figure: 50 idle admin clients: fds {fds_before} -> {fds_flood} (32 served, the rest \
         queued), all closed after {:?}",
        t0.elapsed()
    );
}

/// `set timeout cli` sets the connection's own idle timeout (hatop sends it), bounded as every
/// duration is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_timeout_cli_sets_the_connections_idle_timeout() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_backend().await;
    let spark = grpc::FakeGrpc::start("sc1", grpc::Behaviour::default()).await;
    let mut p = SclbProcess::start(
        dir.path(),
        &config(dir.path(), echo, spark.addr, "", ""),
        &[],
    );
    p.frontend_addr("l4");
    let bad = p.admin("set timeout cli 99999999999999999999999");
    assert!(bad.starts_with("Invalid timeout"), "{bad}");
    let mut s = UnixStream::connect(&p.admin).await.unwrap();
    s.write_all(b"prompt\nset timeout cli 1\n").await.unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut out))
        .await
        .expect("closed after its own 1 s, not the default 10 s")
        .unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
}
