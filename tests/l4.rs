//! The L4 data path through real sockets on 127.0.0.1: stickiness, balancing, failover,
//! integrity, half-close, timeouts, limits, graceful stop.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

use common::*;

#[tokio::test]
async fn each_client_ip_sticks_to_one_server() {
    let (a, b, c) = (
        Backend::start("s1").await,
        Backend::start("s2").await,
        Backend::start("s3").await,
    );
    let sclb = start_sclb(&config(
        &[&a, &b, &c],
        r#"balance = "roundrobin"
stick = { on = "src", expire = "2h", size = 1000 }"#,
        "",
    ))
    .await;
    let fe = frontend_addr(&sclb);
    let mut first: HashMap<u8, String> = HashMap::new();
    for round in 0..5 {
        for ip in 2..=13u8 {
            let (server, _conn) = which_server(ip, fe).await;
            let pinned = first.entry(ip).or_insert(server.clone());
            assert_eq!(*pinned, server, "127.0.0.{ip} moved in round {round}");
        }
    }
    // Round robin spread the twelve clients evenly before pinning them.
    let mut per_server: HashMap<&str, usize> = HashMap::new();
    for s in first.values() {
        *per_server.entry(s).or_default() += 1;
    }
    assert_eq!(per_server.len(), 3, "{per_server:?}");
    assert!(per_server.values().all(|&n| n == 4), "{per_server:?}");
    let table = sclb.state().snapshot().backends[0].stick.clone().unwrap();
    assert_eq!(table.len(), 12);
}

#[tokio::test]
async fn roundrobin_without_stick_table_rotates() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let sclb = start_sclb(&config(&[&a, &b], r#"balance = "roundrobin""#, "")).await;
    let fe = frontend_addr(&sclb);
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(which_server(2, fe).await.0);
    }
    assert_eq!(seen, ["s1", "s2", "s1", "s2", "s1", "s2"]);
}

#[tokio::test]
async fn leastconn_sends_new_clients_to_the_least_busy_server() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let sclb = start_sclb(&config(&[&a, &b], r#"balance = "leastconn""#, "")).await;
    let fe = frontend_addr(&sclb);
    // Three long connections: s1, s2, then either. Close the two on s1: next go to s1.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(which_server(2, fe).await);
    }
    let on_s1 = held.iter().filter(|(s, _)| s == "s1").count();
    assert_eq!(on_s1, 2, "leastconn balances held connections");
    held.retain(|(s, _)| s != "s1");
    // Let sclb see the closes.
    wait_until(|| server_cur(&sclb, "s1") == 0).await;
    assert_eq!(which_server(2, fe).await.0, "s1");
}

#[tokio::test]
async fn source_hash_keeps_a_client_on_one_server_without_a_table() {
    let (a, b, c) = (
        Backend::start("s1").await,
        Backend::start("s2").await,
        Backend::start("s3").await,
    );
    let sclb = start_sclb(&config(&[&a, &b, &c], r#"balance = "source""#, "")).await;
    let fe = frontend_addr(&sclb);
    let mut used = std::collections::HashSet::new();
    for ip in 2..=40u8 {
        let first = which_server(ip, fe).await.0;
        assert_eq!(which_server(ip, fe).await.0, first);
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "39 client IPs hash onto all three servers");
}

#[tokio::test]
async fn full_stick_table_forgets_the_least_recently_used_client() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let sclb = start_sclb(&config(
        &[&a, &b],
        r#"stick = { on = "src", expire = "2h", size = 2 }"#,
        "",
    ))
    .await;
    let fe = frontend_addr(&sclb);
    which_server(2, fe).await;
    which_server(3, fe).await;
    which_server(2, fe).await; // 127.0.0.2 used again: 127.0.0.3 is now the oldest
    which_server(4, fe).await;
    let table = sclb.state().snapshot().backends[0].stick.clone().unwrap();
    let mut keys: Vec<String> = table.entries().iter().map(|e| e.key.to_string()).collect();
    keys.sort();
    assert_eq!(keys, ["127.0.0.2", "127.0.0.4"]);
}

#[tokio::test]
async fn refused_server_fails_over_and_the_client_is_repinned() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let sclb = start_sclb(&config(
        &[&a, &b],
        r#"retries = 1
stick = { on = "src", expire = "2h", size = 100 }"#,
        "",
    ))
    .await;
    let fe = frontend_addr(&sclb);
    let (first, _) = which_server(2, fe).await;
    let (dead, alive) = if first == "s1" {
        (&a, "s2")
    } else {
        (&b, "s1")
    };
    dead.stop();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The pinned server refuses: the retry is redispatched and the client re-pinned.
    let (now, _) = which_server(2, fe).await;
    assert_eq!(now, alive);
    let snap = sclb.state().snapshot();
    let be = &snap.backends[0];
    let pinned = be
        .stick
        .as_ref()
        .unwrap()
        .lookup("127.0.0.2".parse().unwrap());
    assert_eq!(be.server(pinned.unwrap()).unwrap().name.as_ref(), alive);
    assert_eq!(be.repins.count.load(Ordering::Relaxed), 1);
    let dead_srv = be.server_by_name(&dead.name).unwrap();
    assert_eq!(dead_srv.counters.conn_errors.load(Ordering::Relaxed), 1);
    assert_eq!(dead_srv.counters.redispatches.load(Ordering::Relaxed), 1);
    // And it stays there.
    assert_eq!(which_server(2, fe).await.0, alive);
}

/// xorshift64: a cheap reproducible byte stream.
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

#[tokio::test]
async fn a_100_mb_transfer_arrives_intact_both_ways_with_splice() {
    transfer_100_mb("splice = true").await;
}

#[tokio::test]
async fn a_100_mb_transfer_arrives_intact_both_ways_with_copy() {
    transfer_100_mb("splice = false").await;
}

async fn transfer_100_mb(global: &str) {
    const TOTAL: usize = 100 * 1024 * 1024;
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], "", global)).await;
    let (_, conn) = which_server(2, frontend_addr(&sclb)).await;
    let (mut r, mut w) = tokio::io::split(conn);
    let writer = tokio::spawn(async move {
        let mut seed = 0x5eed_u64;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < TOTAL {
            fill(&mut seed, &mut buf);
            w.write_all(&buf).await.unwrap();
            sent += buf.len();
        }
        w.shutdown().await.unwrap();
    });
    let mut seed = 0x5eed_u64;
    let mut expect = vec![0u8; 256 * 1024];
    let mut got = vec![0u8; 256 * 1024];
    let mut received = 0;
    while received < TOTAL {
        fill(&mut seed, &mut expect);
        tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut got))
            .await
            .expect("data keeps flowing")
            .unwrap();
        assert!(got == expect, "corrupted bytes after {received} bytes");
        received += got.len();
    }
    writer.await.unwrap();
    assert!(
        read_to_end(&mut r, Duration::from_secs(10))
            .await
            .is_empty()
    );
    let snap = sclb.state().snapshot();
    let s = &snap.backends[0].servers[0];
    wait_until(|| s.counters.cur.load(Ordering::Relaxed) == 0).await;
    assert_eq!(s.counters.bytes_in.load(Ordering::Relaxed), TOTAL as u64);
    assert_eq!(
        s.counters.bytes_out.load(Ordering::Relaxed),
        TOTAL as u64 + 3
    ); // + "s1\n"
}

#[tokio::test]
async fn client_half_close_still_gets_the_reply() {
    for global in ["splice = true", "splice = false"] {
        half_close(global).await;
    }
}

async fn half_close(global: &str) {
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], "", global)).await;
    let (_, mut conn) = which_server(2, frontend_addr(&sclb)).await;
    conn.get_mut().write_all(b"last words").await.unwrap();
    conn.get_mut().shutdown().await.unwrap(); // FIN: the backend echoes, then closes
    let reply = read_to_end(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(reply, b"last words");
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_tunnel_timeout() {
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], r#"timeout = { tunnel = "300ms" }"#, "")).await;
    let (_, mut conn) = which_server(2, frontend_addr(&sclb)).await;
    let t0 = std::time::Instant::now();
    // Activity keeps it open.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        conn.get_mut().write_all(b"x\n").await.unwrap();
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        assert_eq!(line, "x\n");
    }
    let rest = read_to_end(&mut conn, Duration::from_secs(5)).await;
    assert!(rest.is_empty());
    let lived = t0.elapsed();
    assert!(
        lived >= Duration::from_millis(900),
        "closed too early: {lived:?}"
    );
}

#[tokio::test]
async fn at_global_maxconn_new_clients_wait_instead_of_being_dropped() {
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], "", "maxconn = 2")).await;
    let fe = frontend_addr(&sclb);
    let first = which_server(2, fe).await;
    let _second = which_server(3, fe).await;
    // The third TCP handshake completes in the kernel's accept queue, but sclb does not take
    // it until a slot frees.
    let third = tokio::spawn(which_server(4, fe));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "third client was served over maxconn");
    assert_eq!(a.accepted.load(Ordering::SeqCst), 2);
    drop(first);
    let (server, _) = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a slot frees")
        .unwrap();
    assert_eq!(server, "s1");
}

#[tokio::test]
async fn a_full_server_queues_clients_up_to_the_queue_timeout() {
    let a = Backend::start("s1").await;
    let toml = config(&[&a], r#"timeout = { queue = "400ms" }"#, "")
        .replace("addr =", "maxconn = 1, addr =");
    let sclb = start_sclb(&toml).await;
    let fe = frontend_addr(&sclb);
    let first = which_server(2, fe).await;
    // Second client queues; first leaves in time: second is served.
    let second = tokio::spawn(which_server(3, fe));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!second.is_finished());
    let srv = sclb.state().snapshot().backends[0].servers[0].clone();
    assert_eq!(srv.counters.queue_cur.load(Ordering::Relaxed), 1);
    drop(first);
    let (_, held) = second.await.unwrap();
    // Third client queues behind `held` for longer than 400 ms: sclb closes it.
    let mut third = connect_from(4, fe).await;
    let got = read_to_end(&mut third, Duration::from_secs(5)).await;
    assert!(got.is_empty(), "queue timeout closes the client");
    assert_eq!(srv.counters.queue_max.load(Ordering::Relaxed), 1);
    drop(held);
}

#[tokio::test]
async fn graceful_stop_lets_a_live_connection_finish() {
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], "", "")).await;
    let fe = frontend_addr(&sclb);
    let (_, mut conn) = which_server(2, fe).await;
    let stopping = tokio::spawn(sclb.shutdown(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new clients...
    assert!(tokio::net::TcpStream::connect(fe).await.is_err());
    // ...but the live one goes on.
    conn.get_mut().write_all(b"still here\n").await.unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    assert_eq!(line, "still here\n");
    assert!(!stopping.is_finished());
    drop(conn);
    let cut = tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stops once the last connection ends")
        .unwrap();
    assert_eq!(cut, 0);
}

#[tokio::test]
async fn hard_stop_after_cuts_connections_that_outstay_it() {
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], "", "")).await;
    let (_, mut conn) = which_server(2, frontend_addr(&sclb)).await;
    let cut = sclb.shutdown(Duration::from_millis(200)).await;
    assert_eq!(cut, 1);
    assert!(
        read_to_end(&mut conn, Duration::from_secs(5))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn ipv6_frontend_and_backend() {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let a = Backend::serve("v6", listener);
    let toml = config(&[&a], "", "").replace("127.0.0.1:0", "[::1]:0");
    let sclb = start_sclb(&toml).await;
    let fe = frontend_addr(&sclb);
    assert!(fe.is_ipv6());
    let s = tokio::net::TcpStream::connect(fe).await.unwrap();
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "v6\n");
}

fn server_cur(sclb: &sclb::Sclb, name: &str) -> u64 {
    sclb.state().snapshot().backends[0]
        .server_by_name(name)
        .unwrap()
        .counters
        .cur
        .load(Ordering::Relaxed)
}

async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 5 s");
}

/// An idle connection's memory is mostly its task, so the connection future must stay small.
/// (The gateway's HTTP/2 server, a frontend mode away, once sized every L4 connection's task
/// and cost 1.3 KB per idle connection.) 1088: the client is a socket or a TLS session
/// (`ClientStream`, 40 bytes beside the accepted socket); TLS and gateway state are boxed.
#[tokio::test]
async fn an_l4_connection_task_stays_small() {
    let a = Backend::start("s1").await;
    let sclb = start_sclb(&config(&[&a], "", "")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, peer) = listener.accept().await.unwrap();
    let shared = sclb.shared().clone();
    let counters = shared.state.frontend_counters("fe");
    let task = sclb::forward::handle(accepted, peer, "fe".into(), counters, shared);
    let size = std::mem::size_of_val(&task);
    assert!(size <= 1088, "a connection task takes {size} bytes");
}

/// The kernel's timer field ("tr" in /proc/net/tcp) of the established socket connected to
/// `server`: 2 while a keepalive timer is armed on an idle connection, 0 without keepalive.
fn timer_of_socket_to(server: std::net::SocketAddr) -> Option<u32> {
    let std::net::IpAddr::V4(ip) = server.ip() else {
        panic!("IPv4 only");
    };
    let remote = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        server.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[2] == remote && f[3] == "01").then(|| f[5].split(':').next().unwrap().parse().unwrap())
    })
}

/// `tcp_keepalive = false` (HAProxy without `option srvtcpka`): sclb's socket to the server
/// has no keepalive timer; with `true` it has one. Read from the kernel, not from the config.
#[tokio::test]
async fn tcp_keepalive_false_leaves_the_server_socket_without_keepalive() {
    for on in [true, false] {
        let b = Backend::start("s1").await;
        let sclb = start_sclb(&config(&[&b], &format!("tcp_keepalive = {on}"), "")).await;
        let (server, _conn) = which_server(2, frontend_addr(&sclb)).await;
        assert_eq!(server, "s1");
        let mut timer = None;
        for _ in 0..500 {
            timer = timer_of_socket_to(b.addr);
            if timer.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let want = if on { 2 } else { 0 };
        assert_eq!(timer, Some(want), "tcp_keepalive = {on}");
    }
}

/// `tcp_smart_connect` (on by default; HAProxy `option tcp-smart-connect`): the handshake's
/// last ACK to the server waits for the client's first bytes and travels with them, so a
/// server sees a new connection only once its client has spoken (or after the kernel's
/// delayed-ACK timer, 200 ms). With `false` the server sees it at once. Both read off the
/// server's `accept`.
#[tokio::test]
async fn a_server_sees_a_smart_connected_client_once_it_speaks() {
    for (setting, smart) in [
        ("", true),
        ("tcp_smart_connect = true", true),
        ("tcp_smart_connect = false", false),
    ] {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let toml = format!(
            r#"
[defaults]
timeout = {{ connect = "5s", queue = "2s" }}
check = {{ type = "none" }}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
{setting}
servers = [ {{ name = "s1", addr = "{}" }} ]
"#,
            server.local_addr().unwrap()
        );
        let sclb = start_sclb(&toml).await;
        let mut client = tokio::net::TcpStream::connect(frontend_addr(&sclb))
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(100), server.accept()).await;
        let mut conn = if smart {
            // A loaded machine only makes the handshake slower, never this early.
            assert!(
                early.is_err(),
                "{setting:?}: the server accepted before the client spoke"
            );
            client.write_all(b"PRI * HTTP/2.0").await.unwrap();
            let (conn, _) = tokio::time::timeout(Duration::from_secs(10), server.accept())
                .await
                .expect("accepted once the client spoke")
                .unwrap();
            conn
        } else {
            let conn = match early {
                Ok(r) => r.unwrap().0,
                Err(_) => {
                    tokio::time::timeout(Duration::from_secs(10), server.accept())
                        .await
                        .expect("accepted while the client is silent")
                        .unwrap()
                        .0
                }
            };
            client.write_all(b"PRI * HTTP/2.0").await.unwrap();
            conn
        };
        let mut got = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut got))
            .await
            .expect("the client's bytes reach the server")
            .unwrap();
        assert_eq!(&got, b"PRI * HTTP/2.0", "{setting:?}");
        sclb.shutdown(Duration::ZERO).await;
    }
}
