//! Resource limits, on the real `sclb` binary: file descriptors running out, a backend that
//! never reads, clients that never send, ~9,500 idle connections, and maxconn.
//!
//! The tests take turns (`SERIAL`): they measure RSS, fds and times, which a neighbour's load
//! would blur. Figures are printed (run with `--nocapture`) and quoted in the README
//! ("Reliability").

mod realbin;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use realbin::{SclbProcess, connect_from, field, message};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A config with frontend "fe" on 127.0.0.1:0 and backend "be" over `servers`.
fn config(dir: &Path, servers: &[SocketAddr], global: &str, defaults: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ name = \"s{}\", addr = \"{a}\" }}", i + 1))
        .collect();
    format!(
        r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{}", mode = "0600", level = "admin" }}
{global}

[defaults]
check = {{ type = "none" }}
{defaults}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
servers = [ {} ]
"#,
        dir.join("admin.sock").display(),
        list.join(", ")
    )
}

/// An echo backend that greets each connection with "hi\n".
async fn echo_backend() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                if s.write_all(b"hi\n").await.is_ok() {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (addr, task)
}

/// Reads the 3-byte greeting within `within`: Some(true) greeted, Some(false) closed (EOF or
/// reset) without one, None still waiting.
async fn greeted(s: &mut TcpStream, within: Duration) -> Option<bool> {
    let mut b = [0u8; 3];
    match tokio::time::timeout(within, s.read_exact(&mut b)).await {
        Ok(Ok(_)) => Some(&b == b"hi\n"),
        Ok(Err(_)) => Some(false),
        Err(_) => None,
    }
}

/// One round trip through an established connection.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> bool {
    let mut back = vec![0u8; msg.len()];
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        s.write_all(msg).await?;
        s.read_exact(&mut back).await
    })
    .await;
    matches!(r, Ok(Ok(_))) && back == msg
}

fn count_log(sclb: &SclbProcess, starts_with: &str) -> usize {
    sclb.log_lines()
        .iter()
        .filter(|l| message(l).starts_with(starts_with))
        .count()
}

/// What one burst of clients met while sclb had no fd left, and after.
#[derive(Default, Debug)]
struct Burst {
    /// Greeted while fds ran out.
    served: usize,
    /// Still in the accept queue when the burst peaked.
    queued: usize,
    /// Established connections that still echoed while no fd was free.
    echoing: usize,
    /// Queued clients greeted once fds came back, and how long it took.
    served_after: usize,
    first_after: Duration,
    all_after: Duration,
    /// Clients sclb accepted but then closed without reaching a server (during, after).
    dropped: (usize, usize),
    /// Clients neither served nor closed 20 s after the release.
    stuck: usize,
    /// sclb's fds at the peak.
    fds_peak: usize,
}

/// Opens `clients` at once against sclb (whose fds run out), checks the served ones still
/// echo, then closes them and waits for the queued ones to be served.
async fn fd_burst(sclb: &SclbProcess, fe: SocketAddr, clients: usize) -> Burst {
    let mut b = Burst::default();
    let mut served = Vec::new();
    let mut waiting = Vec::new();
    for i in 0..clients {
        let s = connect_from(2 + (i % 200) as u8, fe)
            .await
            .expect("the kernel queues it");
        waiting.push(s);
    }
    let settle = Instant::now() + Duration::from_secs(4);
    while Instant::now() < settle {
        let mut still = Vec::new();
        for mut s in waiting {
            match greeted(&mut s, Duration::from_millis(5)).await {
                Some(true) => served.push(s),
                Some(false) => b.dropped.0 += 1,
                None => still.push(s),
            }
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.fds_peak = sclb.fds();
    (b.served, b.queued) = (served.len(), waiting.len());
    for (i, s) in served.iter_mut().enumerate() {
        if round_trip(s, format!("ping {i} during the burst").as_bytes()).await {
            b.echoing += 1;
        }
    }
    // Release: close the served clients; the queued ones must now be served. Each is checked
    // and closed at once: more are queued than fit at the same time.
    let released = Instant::now();
    drop(served);
    let deadline = released + Duration::from_secs(20);
    while !waiting.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for mut s in waiting {
            match greeted(&mut s, Duration::from_millis(5)).await {
                Some(true) => {
                    if b.served_after == 0 {
                        b.first_after = released.elapsed();
                    }
                    b.served_after += 1;
                    let msg = format!("ping {} after", b.served_after);
                    assert!(
                        round_trip(&mut s, msg.as_bytes()).await,
                        "no echo after the burst"
                    );
                }
                Some(false) => b.dropped.1 += 1,
                None => still.push(s),
            }
        }
        waiting = still;
    }
    b.all_after = released.elapsed();
    b.stuck = waiting.len();
    b
}

/// `ss` on the listening sockets of `addr`, for diagnostics.
fn listen_queues(addr: SocketAddr) -> String {
    std::process::Command::new("ss")
        .args(["-ltn", &format!("sport = :{}", addr.port())])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ss: {e}"))
}

/// Starts sclb, then lowers its RLIMIT_NOFILE while it runs (`prlimit --pid`) to the fds it has
/// open plus `headroom`: sclb sizes maxconn from the limit it starts with, so this is how its
/// fds run out for real (as when the limit is lowered, or other fds are taken, after start).
/// Returns the new limit.
fn start_then_limit_fds(
    dir: &Path,
    backend: SocketAddr,
    headroom: usize,
) -> (SclbProcess, SocketAddr, usize) {
    let mut sclb = SclbProcess::start(
        dir,
        &config(dir, &[backend], "", "timeout = { connect = \"1s\" }"),
        &["prlimit", "--nofile=4096:4096", "--"],
    );
    let fe = sclb.frontend_addr("fe");
    let nofile = sclb.fds() + headroom;
    let limit = format!("--nofile={nofile}:{nofile}");
    let pid = sclb.pid.to_string();
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &pid, &limit])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(st.success(), "prlimit --pid {pid} {limit}");
    (sclb, fe, nofile)
}

/// File descriptors run out: sclb's limit is lowered while it runs to leave 40 fds, so about 20
/// connections fit; each of two bursts opens 60 clients at once. What must hold:
/// - connections already established keep moving bytes while no fd is free;
/// - accept keeps running: once fds come back, every client still in the accept queue is served;
/// - sclb's sockets go back to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_accept_keeps_running_and_recovers() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let (mut sclb, fe, nofile) = start_then_limit_fds(dir.path(), backend, 40);
    let (fds0, sockets0) = (sclb.fds(), sclb.fd_kinds().0);
    println!(
        "fd exhaustion: sclb's RLIMIT_NOFILE lowered to {nofile} while it runs, {fds0} fds at rest"
    );
    for burst in 1..=2usize {
        let b = fd_burst(&sclb, fe, 60).await;
        println!(
            "  burst {burst}: 60 clients: {} served, {} queued, sclb fds {}; {}/{} established connections echo while no fd is free",
            b.served, b.queued, b.fds_peak, b.echoing, b.served
        );
        println!(
            "  burst {burst}: fds released: {} queued clients served, first after {:?}, all after {:?}; {} stuck; {} accepted then closed without a server",
            b.served_after,
            b.first_after,
            b.all_after,
            b.stuck,
            b.dropped.0 + b.dropped.1
        );
        assert!(b.served > 0 && b.queued > 0, "fds never ran out: {b:?}");
        assert_eq!(b.echoing, b.served, "established connections broke: {b:?}");
        assert_eq!(
            b.stuck,
            0,
            "queued clients never served: {b:?}\nlisteners (Recv-Q: the accept queue):\n{}\nshow info:\n{}\nshow sess:\n{}\nfds: {:?}",
            listen_queues(fe),
            sclb.admin("show info"),
            sclb.admin("show sess"),
            sclb.fd_kinds()
        );
        assert!(b.served_after > 0, "{b:?}");
        assert!(
            sclb.wait_for(Duration::from_secs(10), |s| s.fd_kinds().0 <= sockets0),
            "sockets did not come back to {sockets0}: {:?}",
            sclb.fd_kinds()
        );
        println!(
            "  burst {burst}: log so far: {} \"accept failed\", {} \"accepting again\"",
            count_log(&sclb, "accept failed"),
            count_log(&sclb, "accepting again")
        );
    }
    assert!(sclb.is_running());
    assert!(sclb.admin("show info").contains("CurrConns: 0"));
}

/// "accept failed" is logged once per burst of fd exhaustion and "accepting again" once when
/// it passes, not once per refused accept nor once per connection accepted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_logs_once_per_burst() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let (sclb, fe, _) = start_then_limit_fds(dir.path(), backend, 40);
    for burst in 1..=2usize {
        let b = fd_burst(&sclb, fe, 60).await;
        // The burst is over: a quiet second, then a client served normally.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut s = connect_from(2, fe).await.unwrap();
        assert_eq!(
            greeted(&mut s, Duration::from_secs(5)).await,
            Some(true),
            "burst {burst}: a client after it was not served: {b:?}\nfds: {:?}\nshow info:\n{}",
            sclb.fd_kinds(),
            sclb.admin("show info")
        );
        drop(s);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let failed = count_log(&sclb, "accept failed");
        let again = count_log(&sclb, "accepting again");
        println!(
            "burst {burst}: {failed} \"accept failed\", {again} \"accepting again\" lines so far"
        );
        assert_eq!(
            failed, burst,
            "accept failures logged more than once per burst"
        );
        assert_eq!(again, burst, "recovery logged more than once per burst");
    }
}

/// Under fd exhaustion, a client sclb accepts with its last fd cannot get a server socket;
/// it should wait (or stay in the accept queue) like the others, not be closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_drops_no_client() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let (sclb, fe, _) = start_then_limit_fds(dir.path(), backend, 40);
    let b = fd_burst(&sclb, fe, 60).await;
    let refused: Vec<String> = sclb
        .log_lines()
        .iter()
        .filter(|l| message(l).starts_with("connection refused"))
        .map(|l| format!("{} (end={})", message(l), field(l, "end")))
        .collect();
    println!("{b:?}\nsclb: {refused:?}");
    assert_eq!(
        b.dropped,
        (0, 0),
        "clients closed without a server: {refused:?}"
    );
}

/// While fds are exhausted, an operator opening the admin socket costs one log line, not one per
/// retry of the admin accept loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_does_not_flood_the_log_from_the_admin_socket() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let (sclb, fe, nofile) = start_then_limit_fds(dir.path(), backend, 10);
    let mut clients = Vec::new();
    for i in 0..40 {
        clients.push(connect_from(2 + i as u8, fe).await.unwrap());
    }
    assert!(sclb.wait_for(Duration::from_secs(5), |s| s.fds() >= nofile - 1));
    // An operator tries `show info` for 2 s while no fd is free.
    let admin_path = sclb.admin.clone();
    let attempt = std::thread::spawn(move || {
        let s = std::os::unix::net::UnixStream::connect(&admin_path);
        if let Ok(mut s) = s {
            use std::io::Write;
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"show info\n");
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = tokio::task::spawn_blocking(move || attempt.join()).await;
    drop(clients);
    let lines = count_log(&sclb, "admin socket accept");
    println!("admin socket under fd exhaustion: {lines} \"admin socket accept\" log lines in 2 s");
    assert!(
        lines <= 2,
        "the admin socket logged {lines} lines for one waiting operator"
    );
}

/// A backend that accepts and never reads while clients push 400 MB: sclb must stop reading
/// from the clients (TCP backpressure) instead of buffering, in both data paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_reads_gets_backpressure_not_buffering() {
    let _serial = SERIAL.lock().await;
    for (mode, global) in [("splice", "splice = true"), ("copy", "splice = false")] {
        backpressure(mode, global).await;
    }
}

async fn backpressure(mode: &str, global: &str) {
    const CLIENTS: usize = 4;
    const ATTEMPT: u64 = 100 << 20;
    let dir = tempfile::tempdir().unwrap();
    // Accepts, holds, never reads.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    let mut sclb = SclbProcess::start(dir.path(), &config(dir.path(), &[backend], global, ""), &[]);
    let fe = sclb.frontend_addr("fe");
    let rss0 = sclb.rss_kib();
    let peak = Arc::new(AtomicU64::new(rss0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (peak.clone(), sampling.clone(), sclb.pid);
        tokio::spawn(async move {
            while sampling.load(Relaxed) {
                if let Some(rss) = rss_of(pid) {
                    peak.fetch_max(rss, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Each client writes 1 MiB chunks until a write has been blocked for a second.
    let mut pushers = Vec::new();
    for i in 0..CLIENTS {
        pushers.push(tokio::spawn(async move {
            let mut s = connect_from(2 + i as u8, fe).await.unwrap();
            let chunk = vec![0x5au8; 1 << 20];
            let mut sent = 0u64;
            let started = Instant::now();
            while sent < ATTEMPT && started.elapsed() < Duration::from_secs(20) {
                match tokio::time::timeout(Duration::from_secs(1), s.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len() as u64,
                    _ => break,
                }
            }
            (s, sent)
        }));
    }
    let mut accepted = Vec::new();
    let mut streams = Vec::new();
    for p in pushers {
        let (s, sent) = p.await.unwrap();
        accepted.push(sent);
        streams.push(s);
    }
    sampling.store(false, Relaxed);
    sampler.await.unwrap();
    let peak = peak.load(Relaxed);
    let total: u64 = accepted.iter().sum();
    println!(
        "backpressure ({mode}): {CLIENTS} clients tried to push {} MiB each into a backend that never reads; the network took {:?} MiB each before writes blocked; sclb RSS {} -> peak {} KiB (+{} KiB)",
        ATTEMPT >> 20,
        accepted.iter().map(|b| b >> 20).collect::<Vec<_>>(),
        rss0,
        peak,
        peak.saturating_sub(rss0)
    );
    assert!(
        accepted.iter().all(|&b| b < ATTEMPT / 2),
        "sclb took {total} bytes: it reads without a reader on the other side"
    );
    assert!(
        peak <= rss0 + 16 * 1024,
        "sclb's RSS grew by {} KiB: it buffers instead of applying backpressure",
        peak - rss0
    );
    drop(streams);
    held.abort();
}

fn rss_of(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Clients that open a connection and never send are closed by the idle timeout; one that
/// keeps talking is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_send_are_closed_by_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    const SILENT: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    // A backend that accepts and stays silent (reads and drops what comes).
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut b = [0u8; 1024];
                while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
            });
        }
    });
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config(
            dir.path(),
            &[backend],
            "",
            "timeout = { client = \"1s\", server = \"1s\" }",
        ),
        &[],
    );
    let fe = sclb.frontend_addr("fe");
    let mut closers = Vec::new();
    for i in 0..SILENT {
        closers.push(tokio::spawn(async move {
            let mut s = connect_from(2 + i as u8, fe).await.unwrap();
            let t0 = Instant::now();
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
            (t0.elapsed(), matches!(r, Ok(Ok(0)) | Ok(Err(_))))
        }));
    }
    // A talker: a byte every 300 ms for 3 s keeps its connection.
    let talker = tokio::spawn(async move {
        let mut s = connect_from(250, fe).await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(b"x").await.is_err() {
                return false;
            }
        }
        true
    });
    let mut times = Vec::new();
    for c in closers {
        let (t, closed) = c.await.unwrap();
        assert!(closed, "a silent client was not closed within 10 s");
        times.push(t);
    }
    times.sort();
    println!(
        "idle timeout 1s: {SILENT} silent clients closed after {:?} .. {:?}; a client sending every 300 ms stayed open 3 s: {}",
        times[0],
        times[SILENT - 1],
        !talker.is_finished()
    );
    assert!(talker.await.unwrap(), "an active client was cut");
    assert!(
        times[0] >= Duration::from_millis(900),
        "closed before the timeout: {:?}",
        times[0]
    );
    assert!(
        times[SILENT - 1] <= Duration::from_secs(3),
        "closed late: {:?}",
        times[SILENT - 1]
    );
    // The access log writes its lines in batches (every 100 ms): wait for them.
    let idle_lines = |s: &SclbProcess| {
        s.log_lines()
            .iter()
            .filter(|l| field(l, "end") == "idle_timeout")
            .count()
    };
    sclb.wait_for(Duration::from_secs(10), |s| idle_lines(s) >= SILENT);
    assert_eq!(idle_lines(&sclb), SILENT, "log lines with end=idle_timeout");
    silent.abort();
}

/// ~9,500 concurrent idle connections: each costs sclb two fds (client and server side), and
/// the hard RLIMIT_NOFILE on the machines this runs on is 20,000, so 10,000 cannot fit
/// (20,000 fds + sclb's own); 9,500 is the largest round figure that does. Measures sclb's RSS
/// per idle connection. The servers are listeners that never accept: the kernel completes each
/// connection into their accept queue (up to somaxconn each), so the test process holds only the
/// client side and fits under the same limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_thousand_five_hundred_idle_connections() {
    let _serial = SERIAL.lock().await;
    let hard = realbin::raise_nofile();
    // sclb needs 2 per connection plus ~50; this process 1 per connection plus ~100.
    let n = 9_500usize.min((hard as usize).saturating_sub(100) / 2);
    if n < 9_500 {
        println!(
            "RLIMIT_NOFILE hard limit is {hard}: testing {n} idle connections instead of 9,500"
        );
    }
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let per_server = somaxconn.min(4_096) * 9 / 10;
    let servers = n.div_ceil(per_server);
    let mut listeners = Vec::new();
    for _ in 0..servers {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        listeners.push(s.listen(somaxconn as u32).unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let dir = tempfile::tempdir().unwrap();
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config(dir.path(), &addrs, "maxconn = 20000", ""),
        &[],
    );
    let fe = sclb.frontend_addr("fe");
    // Warm up the data path with a few connections so that the baseline includes its first
    // allocations, then measure the empty process.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, fds0) = (sclb.rss_kib(), sclb.fds());

    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::new();
    for i in 0..n {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await.unwrap();
            connect_from(2 + (i % 200) as u8, fe).await
        }));
    }
    let mut clients = Vec::with_capacity(n);
    for t in tasks {
        clients.push(t.await.unwrap().expect("client connects"));
    }
    let all_up = sclb.wait_for(Duration::from_secs(60), |s| {
        s.info("CurrConns") as usize == n && s.fds() >= fds0 + 2 * n
    });
    let open_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss1, fds1, cur) = (sclb.rss_kib(), sclb.fds(), sclb.info("CurrConns"));
    let per_conn = (rss1.saturating_sub(rss0)) as f64 * 1024.0 / n as f64;
    println!(
        "{n} idle connections through sclb in {open_time:.1?}: CurrConns {cur}, fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB: {:.0} bytes ({:.1} KiB) per idle connection",
        per_conn,
        per_conn / 1024.0
    );
    assert!(
        all_up,
        "not every connection reached a server: CurrConns {cur}, fds {fds1}"
    );
    assert!(
        per_conn < 16.0 * 1024.0,
        "an idle connection costs {per_conn:.0} bytes of RSS"
    );

    // Let them go: clients close, the servers' queued connections are reset.
    let closing = Instant::now();
    drop(clients);
    drop(listeners);
    let closed = sclb.wait_for(Duration::from_secs(60), |s| {
        s.info("CurrConns") == 0 && s.fds() <= fds0 + 2
    });
    println!(
        "  all closed in {:.1?}: fds {} (at rest {fds0}), RSS {} KiB",
        closing.elapsed(),
        sclb.fds(),
        sclb.rss_kib()
    );
    assert!(closed, "connections left: fds {}", sclb.fds());
}

/// At global maxconn, new clients wait in the kernel's accept queue and are served as slots
/// free: none is dropped, and sclb never holds more than maxconn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_maxconn_clients_wait_in_the_accept_queue_and_none_is_dropped() {
    let _serial = SERIAL.lock().await;
    const MAXCONN: usize = 20;
    const CLIENTS: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config(dir.path(), &[backend], &format!("maxconn = {MAXCONN}"), ""),
        &[],
    );
    let fe = sclb.frontend_addr("fe");
    let peak = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, admin) = (peak.clone(), sampling.clone(), sclb.admin.clone());
        tokio::task::spawn_blocking(move || {
            while sampling.load(Relaxed) {
                let info = realbin::admin(&admin, "show info");
                if let Some(c) = info
                    .lines()
                    .find_map(|l| l.strip_prefix("CurrConns: "))
                    .and_then(|v| v.trim().parse().ok())
                {
                    peak.fetch_max(c, Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Every client connects at once, waits for its greeting, holds 100 ms, checks an echo, leaves.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut s = connect_from(2 + (i % 200) as u8, fe).await.unwrap();
            match greeted(&mut s, Duration::from_secs(60)).await {
                Some(true) => {}
                Some(false) => return Err("closed without a greeting".to_string()),
                None => return Err("no greeting in 60 s".to_string()),
            }
            let waited = t0.elapsed();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !round_trip(&mut s, format!("client {i}").as_bytes()).await {
                return Err("echo failed".into());
            }
            Ok(waited)
        }));
    }
    let mut waits = Vec::new();
    let mut dropped = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(w) => waits.push(w),
            Err(e) => dropped.push(e),
        }
    }
    sampling.store(false, Relaxed);
    sampler.await.unwrap();
    waits.sort();
    let peak = peak.load(Relaxed);
    println!(
        "maxconn {MAXCONN}: {CLIENTS} clients at once: {} served, {} dropped, in {:.1?}; longest wait in the accept queue {:?}; CurrConns peak {peak}",
        waits.len(),
        dropped.len(),
        started.elapsed(),
        waits.last().copied().unwrap_or_default()
    );
    assert!(dropped.is_empty(), "dropped: {dropped:?}");
    assert!(
        peak as usize <= MAXCONN,
        "sclb held {peak} connections over maxconn {MAXCONN}"
    );
    assert!(
        waits.last().unwrap() >= &Duration::from_millis(500),
        "nobody waited: maxconn did not apply"
    );
    let refused = sclb
        .log_lines()
        .iter()
        .filter(|l| message(l).starts_with("connection refused"))
        .count();
    assert_eq!(refused, 0, "sclb refused connections at maxconn");
}

/// A file-descriptor limit too small for even one connection: sclb must refuse to start and say
/// why, or start and still serve; never run with a maxconn of 0, accepting nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_fd_limit_is_refused_at_start_or_still_serves() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config(dir.path(), &[backend], "", ""),
        &["prlimit", "--nofile=40:40", "--"],
    );
    match sclb.try_frontend_addr("fe", Duration::from_secs(10)) {
        None => {
            let status = sclb.exit_status();
            println!("nofile 40: sclb did not start ({status:?})");
            assert!(
                status.is_some_and(|s| !s.success()),
                "sclb neither listens nor exits with an error: {status:?}"
            );
            assert!(
                sclb.log_text().contains("file descriptor"),
                "the refusal does not name the cause:\n{}",
                sclb.log_text()
            );
        }
        Some(fe) => {
            let mut s = connect_from(2, fe).await.unwrap();
            let got = greeted(&mut s, Duration::from_secs(5)).await;
            println!(
                "nofile 40: sclb started; a client was {}",
                if got == Some(true) {
                    "served"
                } else {
                    "not served"
                }
            );
            assert_eq!(
                got,
                Some(true),
                "sclb runs but serves nobody (show info: {})",
                sclb.admin("show info").replace('\n', ", ")
            );
        }
    }
}

/// `maxconn = 1`, clients one after the other: each must be served once the previous one has
/// left, whichever worker's listener (SO_REUSEPORT) the kernel hands it to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_maxconn_1_every_client_is_served() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, _b) = echo_backend().await;
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config(dir.path(), &[backend], "maxconn = 1", ""),
        &[],
    );
    let fe = sclb.frontend_addr("fe");
    let mut served = 0;
    for i in 0..20u8 {
        let mut s = connect_from(2 + i, fe).await.unwrap();
        match greeted(&mut s, Duration::from_secs(3)).await {
            Some(true) => served += 1,
            other => {
                println!(
                    "client {i}: {other:?} after 3 s; {}",
                    listen_queues(fe).replace('\n', " | ")
                );
            }
        }
        drop(s);
        // Let sclb see the close and free the slot.
        assert!(sclb.wait_for(Duration::from_secs(5), |s| s.info("CurrConns") == 0));
    }
    println!("maxconn 1: {served}/20 clients served one after the other");
    assert_eq!(
        served, 20,
        "clients left waiting while no connection was open"
    );
}
