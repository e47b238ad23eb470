//! The access log of the real binary (src/access_log.rs): each connection's line, with every
//! field, in text and JSON; lines still buffered when sclb stops are written before it exits
//! (SIGTERM, graceful and hard stop); `sclb_log_dropped_total` is served.
//!
//! Every wait has a budget and checks for a state; nothing assumes a sleep was long enough.
//! The waits block their thread, so the echo backend runs on a second runtime thread.

mod realbin;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use realbin::{SclbProcess, field, message};

/// An echo server on 127.0.0.1:0.
async fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

fn config(format: &str, servers: &str, global_extra: &str) -> String {
    format!(
        r#"
[global]
log = {{ level = "info", format = "{format}" }}
{global_extra}
[defaults]
timeout = {{ connect = "2s" }}
retries = 0

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
check = {{ type = "none" }}
servers = [ {servers} ]
"#
    )
}

/// Waits (bounded) until `cond` holds on sclb's log text; returns the text.
fn wait_log(sclb: &SclbProcess, within: Duration, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = sclb.log_text();
        if cond(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "not in the log within {within:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The frontend's address from its text "listening" line (`... listening frontend=fe addr=...`).
fn text_listen_addr(sclb: &SclbProcess) -> SocketAddr {
    let text = wait_log(sclb, Duration::from_secs(10), |t| {
        t.lines()
            .any(|l| l.contains(" listening ") && l.contains("frontend=fe"))
    });
    let line = text.lines().find(|l| l.contains(" listening ")).unwrap();
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next();
    addr.unwrap().parse().unwrap()
}

/// One client: sends `hello`, reads it back, closes.
async fn round_trip(fe: SocketAddr) -> SocketAddr {
    let mut s = TcpStream::connect(fe).await.unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .expect("echo within 10 s")
        .unwrap();
    assert_eq!(&back, b"hello");
    local
}

fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

fn wait_exit(sclb: &mut SclbProcess, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = sclb.exit_status() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "sclb still running after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_lines_keep_their_format_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let backend = echo_backend().await;
    let servers = format!(r#"{{ name = "s1", addr = "{backend}" }}"#);
    let sclb = SclbProcess::start(dir.path(), &config("text", &servers, ""), &[]);
    let fe = text_listen_addr(&sclb);
    let client = round_trip(fe).await;
    let want = format!(
        " INFO sclb::forward: connection closed client={client} frontend=fe backend=be server=s1 connect_ms="
    );
    let text = wait_log(&sclb, Duration::from_secs(10), |t| t.contains(&want));
    let line = text.lines().find(|l| l.contains(&want)).unwrap();
    // 2026-11-21T07:28:16.123456Z  INFO sclb::forward: connection closed client=... end="client_close"
    assert!(
        line.len() > 27 && line.as_bytes()[26] == b'Z' && line[..4].parse::<u32>().is_ok(),
        "{line}"
    );
    let rest = line.split(" connect_ms=").nth(1).unwrap();
    let mut words = rest.split(' ');
    assert!(words.next().unwrap().parse::<u64>().is_ok(), "{line}");
    assert!(
        words
            .next()
            .unwrap()
            .strip_prefix("total_ms=")
            .is_some_and(|v| v.parse::<u64>().is_ok()),
        "{line}"
    );
    assert_eq!(
        words.collect::<Vec<_>>(),
        ["bytes_in=5", "bytes_out=5", "end=\"client_close\""],
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_refused_lines_keep_their_format() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let servers = r#"{ name = "s1", addr = "127.0.0.1:1" }"#;
    let sclb = SclbProcess::start(dir.path(), &config("text", servers, ""), &[]);
    let fe = text_listen_addr(&sclb);
    let mut s = TcpStream::connect(fe).await.unwrap();
    let client = s.local_addr().unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let want = format!(
        " INFO sclb::forward: connection refused: connect to s1 failed: Connection refused (os error 111) client={client} frontend=fe backend=be total_ms="
    );
    let text = wait_log(&sclb, Duration::from_secs(10), |t| t.contains(&want));
    let line = text.lines().find(|l| l.contains(&want)).unwrap();
    assert!(line.ends_with(" end=\"connect_refused\""), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_keep_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let backend = echo_backend().await;
    let servers = format!(r#"{{ name = "s1", addr = "{backend}" }}"#);
    let mut sclb = SclbProcess::start(dir.path(), &config("json", &servers, ""), &[]);
    let fe = sclb.frontend_addr("fe");
    let client = round_trip(fe).await.to_string();
    wait_log(&sclb, Duration::from_secs(10), |t| t.contains(&client));
    let lines = sclb.log_lines();
    let line = lines
        .iter()
        .find(|l| message(l) == "connection closed" && field(l, "client") == client)
        .expect("a connection closed line for the client");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["target"], "sclb::forward");
    assert!(realbin::timestamp(line).is_some(), "{line}");
    for (name, value) in [
        ("frontend", "fe"),
        ("backend", "be"),
        ("server", "s1"),
        ("end", "client_close"),
    ] {
        assert_eq!(field(line, name), value, "{line}");
    }
    for (name, value) in [("bytes_in", 5), ("bytes_out", 5)] {
        assert_eq!(line["fields"][name], value, "{line}");
    }
    for name in ["connect_ms", "total_ms"] {
        assert!(line["fields"][name].is_u64(), "{line}");
    }
}

/// SIGTERM with two clients connected: one closes during the graceful stop, the other is cut
/// by the hard stop a moment before sclb exits. Both lines are in the log after the exit,
/// although the access log writes batches (every 100 ms) and sclb logs nothing after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_are_written_at_exit_after_sigterm_and_hard_stop() {
    let dir = tempfile::tempdir().unwrap();
    let backend = echo_backend().await;
    let servers = format!(r#"{{ name = "s1", addr = "{backend}" }}"#);
    let global = r#"hard_stop_after = "1s""#;
    let mut sclb = SclbProcess::start(dir.path(), &config("json", &servers, global), &[]);
    let fe = sclb.frontend_addr("fe");
    let mut connected = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(fe).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .expect("echo within 10 s")
            .unwrap();
        connected.push(s);
    }
    let held = connected.pop().unwrap();
    let closing = connected.pop().unwrap();
    let (held_addr, closing_addr) = (
        held.local_addr().unwrap().to_string(),
        closing.local_addr().unwrap().to_string(),
    );
    sigterm(sclb.pid);
    wait_log(&sclb, Duration::from_secs(10), |t| {
        t.contains("SIGTERM: stopping gracefully")
    });
    drop(closing);
    let status = wait_exit(&mut sclb, Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    let lines = sclb.log_lines();
    let end_of = |client: &str| {
        lines
            .iter()
            .find(|l| message(l) == "connection closed" && field(l, "client") == client)
            .map(|l| field(l, "end").to_string())
    };
    assert_eq!(end_of(&closing_addr).as_deref(), Some("client_close"));
    assert_eq!(end_of(&held_addr).as_deref(), Some("killed"));
    drop(held);
}

/// The counter is served even when nothing was dropped, so that an alert on it has a series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_serve_the_dropped_lines_counter() {
    let dir = tempfile::tempdir().unwrap();
    let global = r#"stats = { bind = "127.0.0.1:0" }"#;
    let servers = r#"{ name = "s1", addr = "127.0.0.1:1" }"#;
    let sclb = SclbProcess::start(dir.path(), &config("json", servers, global), &[]);
    wait_log(&sclb, Duration::from_secs(10), |t| {
        t.contains("stats page on")
    });
    let lines = sclb.log_lines();
    let stats: SocketAddr = lines
        .iter()
        .find(|l| message(l).starts_with("stats page on"))
        .map(|l| field(l, "addr").parse().unwrap())
        .unwrap();
    let body = get(stats, "/metrics").await;
    assert!(
        body.lines().any(|l| l == "sclb_log_dropped_total 0"),
        "{body}"
    );
}

/// A plain HTTP/1.0 GET.
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("reply within 10 s")
        .unwrap();
    out
}
