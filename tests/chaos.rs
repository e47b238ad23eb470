//! Chaos soak: the real `sclb` binary between 300 concurrent clients and five loopback echo
//! backends while backends are killed and restarted, servers are drained, put in maintenance
//! and enabled again through the admin socket, and the config file is rewritten and reloaded.
//!
//! What it proves:
//! - no byte is corrupted: every byte a client reads back is checked against what it sent;
//! - every failed connection matches a fault the test injected — its backend was killed while
//!   the connection was on it (or, before any reply, the server sclb tried was dead) — so none
//!   failed because of a reload, a drain or maintenance;
//! - afterwards sclb's sockets are back to their baseline and its RSS near it (no leak).
//!
//! Bounded: a warm-up of 5 s, a soak of `SOAK`, every client loop capped in count and time,
//! every connection in time; about 1.5 minutes on 2 cores. Figures go to the README
//! ("Reliability"); run with `--nocapture` to see them.

mod realbin;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use realbin::{
    SclbProcess, connect_from, corrupted, fd_kinds, field, pattern, stable_port, timestamp,
};

const WARMUP: Duration = Duration::from_secs(5);
const SOAK: Duration = Duration::from_secs(50);
/// Clients that open connection after connection (bulk or ping-pong).
const SHORT_CLIENTS: usize = 200;
/// Clients that keep one connection for the whole soak, pinging it (Spark sessions do this).
const LONG_CLIENTS: usize = 100;
const MAX_CONNS_PER_CLIENT: usize = 2_000;
/// Longest a single connection may take before it counts as stalled.
const CONN_LIMIT: Duration = Duration::from_secs(30);
/// Time between two injected faults.
const FAULT_EVERY: Duration = Duration::from_millis(2_500);
/// How long a killed backend stays dead.
const DEAD_FOR: Duration = Duration::from_millis(2_000);

// ---------------------------------------------------------------------------------------------
// Backends: echo servers that greet with their name, can be killed (listener and every live
// connection closed at once, as when a process dies) and restarted on the same port.

struct Backend {
    name: String,
    addr: SocketAddr,
    /// While it runs: what stops it, and its accept loop and connections.
    life: Mutex<Option<(CancellationToken, TaskTracker)>>,
    downtime: Mutex<Vec<Downtime>>,
}

/// One kill: from the moment it began until every socket was closed, and the restart.
struct Downtime {
    began: Instant,
    done: Instant,
    restarted: Option<Instant>,
}

impl Backend {
    async fn start(name: &str, seed: usize) -> Arc<Backend> {
        // A port below the ephemeral range: while the backend is dead, no outgoing connection
        // can take it, so it can always be bound again.
        for attempt in 0..50 {
            let addr = SocketAddr::from(([127, 0, 0, 1], stable_port(seed * 50 + attempt)));
            let b = Arc::new(Backend {
                name: name.to_string(),
                addr,
                life: Mutex::new(None),
                downtime: Mutex::new(Vec::new()),
            });
            if b.run().is_ok() {
                return b;
            }
        }
        panic!("no free port for backend {name}");
    }

    fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
        let s = TcpSocket::new_v4()?;
        s.set_reuseaddr(true)?;
        s.bind(addr)?;
        s.listen(1024)
    }

    /// Starts (or restarts) serving on its port.
    fn run(self: &Arc<Self>) -> std::io::Result<()> {
        let listener = Self::listen(self.addr)?;
        let life = CancellationToken::new();
        let tasks = TaskTracker::new();
        *self.life.lock().unwrap() = Some((life.clone(), tasks.clone()));
        if let Some(last) = self.downtime.lock().unwrap().last_mut() {
            last.restarted.get_or_insert(Instant::now());
        }
        let greeting: Arc<[u8]> = format!("{}\n", self.name).into_bytes().into();
        let conns = tasks.clone();
        tasks.spawn(async move {
            loop {
                let conn = tokio::select! {
                    biased;
                    _ = life.cancelled() => return,
                    r = listener.accept() => r,
                };
                if let Ok((s, _)) = conn
                    && !life.is_cancelled()
                {
                    conns.spawn(echo(s, greeting.clone(), life.clone()));
                }
            }
        });
        Ok(())
    }

    /// Restarts after a kill, retrying the bind for up to 5 s.
    async fn restart(self: &Arc<Self>) {
        for _ in 0..100 {
            if self.run().is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("backend {} could not bind {} again", self.name, self.addr);
    }

    /// Closes its listener and every live connection, like a process that dies; returns once
    /// all its sockets are closed.
    async fn kill(&self) {
        let running = self.life.lock().unwrap().take();
        if let Some((life, tasks)) = running {
            let began = Instant::now();
            life.cancel();
            tasks.close();
            tasks.wait().await;
            self.downtime.lock().unwrap().push(Downtime {
                began,
                done: Instant::now(),
                restarted: None,
            });
        }
    }

    /// Whether a kill overlapped the time from `a` to `b`.
    fn killed_during(&self, a: Instant, b: Instant) -> bool {
        let d = self.downtime.lock().unwrap();
        d.iter().any(|k| k.began <= b && k.done >= a)
    }

    /// Whether it was dead (or dying) at some moment between `a` and `b`.
    fn dead_during(&self, a: Instant, b: Instant) -> bool {
        let d = self.downtime.lock().unwrap();
        d.iter()
            .any(|k| k.began <= b && k.restarted.is_none_or(|r| r >= a))
    }
}

async fn echo(mut s: TcpStream, greeting: Arc<[u8]>, life: CancellationToken) {
    let work = async {
        s.write_all(&greeting).await?;
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await?;
        w.shutdown().await
    };
    tokio::select! {
        biased;
        _ = life.cancelled() => {}
        _ = work => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Rounds of message and echo, each checked.
    PingPong { rounds: usize, max: usize },
    /// Writes `size` bytes while reading the echo back.
    Bulk { size: u64 },
    /// Pings every few hundred ms until the deadline.
    Session { until: Instant },
}

/// A connection that did not complete.
#[derive(Debug)]
struct Failure {
    client: Option<SocketAddr>,
    server: Option<String>,
    start: Instant,
    end: Instant,
    start_wall: SystemTime,
    end_wall: SystemTime,
    what: String,
}

#[derive(Default)]
struct Tally {
    attempted: AtomicU64,
    completed: AtomicU64,
    bytes_checked: AtomicU64,
    corrupted: AtomicU64,
    failures: Mutex<Vec<Failure>>,
}

/// A small deterministic generator for the clients' choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs one connection to the end; returns the bytes checked and corrupted, or what went wrong
/// (with the server it was on, if it got that far).
async fn one_connection(
    fe: SocketAddr,
    ip: u8,
    seed: u64,
    plan: Plan,
    tally: &Tally,
) -> Result<(), Failure> {
    let (start, start_wall) = (Instant::now(), SystemTime::now());
    let fail = |client, server, what: String| Failure {
        client,
        server,
        start,
        end: Instant::now(),
        start_wall,
        end_wall: SystemTime::now(),
        what,
    };
    let stream = connect_from(ip, fe)
        .await
        .map_err(|e| fail(None, None, format!("connect to sclb: {e}")))?;
    let local = stream.local_addr().ok();
    let (mut r, mut w) = stream.into_split();
    let server = match tokio::time::timeout(CONN_LIMIT, greeting(&mut r)).await {
        Ok(Ok(name)) => name,
        Ok(Err(e)) => return Err(fail(local, None, format!("no greeting: {e}"))),
        Err(_) => return Err(fail(local, None, "no greeting in 30 s".into())),
    };
    let limit = match plan {
        Plan::Session { until } => until.saturating_duration_since(Instant::now()) + CONN_LIMIT,
        _ => CONN_LIMIT,
    };
    let run = async {
        let mut scratch = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut rng = Rng(seed | 1);
        let mut pos = 0u64;
        let checked = match plan {
            Plan::PingPong { rounds, max } => {
                for _ in 0..rounds {
                    let n = 1 + rng.below(max as u64) as usize;
                    ping(
                        &mut r,
                        &mut w,
                        seed,
                        pos,
                        &mut buf[..n],
                        &mut scratch,
                        tally,
                    )
                    .await?;
                    pos += n as u64;
                }
                pos
            }
            Plan::Session { until } => {
                while Instant::now() < until {
                    let n = 1 + rng.below(512) as usize;
                    ping(
                        &mut r,
                        &mut w,
                        seed,
                        pos,
                        &mut buf[..n],
                        &mut scratch,
                        tally,
                    )
                    .await?;
                    pos += n as u64;
                    tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
                }
                pos
            }
            Plan::Bulk { size } => bulk(&mut r, &mut w, seed, size, tally).await?,
        };
        w.shutdown().await?;
        let n = r.read(&mut buf).await?;
        if n != 0 {
            return Err(std::io::Error::other(format!("{n} bytes after the echo")));
        }
        Ok::<u64, std::io::Error>(checked)
    };
    match tokio::time::timeout(limit, run).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(fail(local, Some(server), e.to_string())),
        Err(_) => Err(fail(local, Some(server), format!("stalled {limit:?}"))),
    }
}

/// Reads the backend's greeting: its name and a newline.
async fn greeting(r: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<String> {
    let mut name = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            return Ok(String::from_utf8_lossy(&name).into_owned());
        }
        name.push(b);
        if name.len() > 64 {
            return Err(std::io::Error::other("greeting too long"));
        }
    }
}

async fn ping(
    r: &mut (impl AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
    seed: u64,
    pos: u64,
    buf: &mut [u8],
    scratch: &mut Vec<u8>,
    tally: &Tally,
) -> std::io::Result<()> {
    pattern(seed, pos, buf);
    w.write_all(buf).await?;
    r.read_exact(buf).await?;
    tally
        .corrupted
        .fetch_add(corrupted(seed, pos, buf, scratch), Relaxed);
    tally.bytes_checked.fetch_add(buf.len() as u64, Relaxed);
    Ok(())
}

/// Writes `size` bytes and reads the echo at the same time; every byte read is checked.
async fn bulk(
    r: &mut (impl AsyncReadExt + Unpin),
    w: &mut (impl AsyncWriteExt + Unpin),
    seed: u64,
    size: u64,
    tally: &Tally,
) -> std::io::Result<u64> {
    let write = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(buf.len() as u64) as usize;
            pattern(seed, pos, &mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            pos += n as u64;
        }
        Ok::<(), std::io::Error>(())
    };
    let read = async {
        let mut buf = vec![0u8; 32 * 1024];
        let mut scratch = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            let want = (size - pos).min(buf.len() as u64) as usize;
            let n = r.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "EOF after {pos} of {size} bytes"
                )));
            }
            tally
                .corrupted
                .fetch_add(corrupted(seed, pos, &buf[..n], &mut scratch), Relaxed);
            tally.bytes_checked.fetch_add(n as u64, Relaxed);
            pos += n as u64;
        }
        Ok(pos)
    };
    let (wrote, read) = tokio::join!(write, read);
    wrote?;
    read
}

/// A client that opens connections one after another until `until`.
async fn short_client(id: usize, fe: SocketAddr, until: Instant, tally: Arc<Tally>) {
    let ip = 2 + (id % 240) as u8;
    let mut rng = Rng(0x5EED_0000 + id as u64 * 7_919);
    for n in 0..MAX_CONNS_PER_CLIENT {
        if Instant::now() >= until {
            break;
        }
        let plan = if rng.below(100) < 15 {
            Plan::Bulk {
                size: 64 * 1024 + rng.below(448 * 1024),
            }
        } else {
            Plan::PingPong {
                rounds: 2 + rng.below(12) as usize,
                max: 4096,
            }
        };
        let seed = (id as u64) << 32 | n as u64;
        tally.attempted.fetch_add(1, Relaxed);
        match one_connection(fe, ip, seed, plan, &tally).await {
            Ok(()) => tally.completed.fetch_add(1, Relaxed),
            Err(f) => {
                tally.failures.lock().unwrap().push(f);
                0
            }
        };
        tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
    }
}

/// A client that holds one connection until `until`, and opens a new one if it fails.
async fn long_client(id: usize, fe: SocketAddr, until: Instant, tally: Arc<Tally>) {
    let ip = 2 + ((SHORT_CLIENTS + id) % 240) as u8;
    for n in 0..MAX_CONNS_PER_CLIENT {
        if Instant::now() >= until {
            break;
        }
        let seed = 0xF000_0000_0000 | (id as u64) << 20 | n as u64;
        tally.attempted.fetch_add(1, Relaxed);
        match one_connection(fe, ip, seed, Plan::Session { until }, &tally).await {
            Ok(()) => tally.completed.fetch_add(1, Relaxed),
            Err(f) => {
                tally.failures.lock().unwrap().push(f);
                0
            }
        };
    }
}

/// Runs every client until `until`; waits for them (bounded) and returns the tally.
async fn run_clients(fe: SocketAddr, until: Instant) -> Arc<Tally> {
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for id in 0..SHORT_CLIENTS {
        tasks.push(tokio::spawn(short_client(id, fe, until, tally.clone())));
    }
    for id in 0..LONG_CLIENTS {
        tasks.push(tokio::spawn(long_client(id, fe, until, tally.clone())));
    }
    let all = join_all(tasks);
    let grace =
        until.saturating_duration_since(Instant::now()) + CONN_LIMIT + Duration::from_secs(10);
    tokio::time::timeout(grace, all)
        .await
        .expect("every client finishes within its bounds");
    tally
}

async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.expect("a client task panicked");
    }
}

// ---------------------------------------------------------------------------------------------
// Config versions that reloads cycle through: weights, algorithm, and a fifth server that comes
// and goes (its live connections must drain, not break).

fn config(dir: &Path, bind: &str, backends: &[Arc<Backend>], version: usize) -> String {
    let (balance, weights, with_fifth) = match version % 3 {
        0 => ("roundrobin", [1, 1, 1, 1], false),
        1 => ("leastconn", [1, 2, 1, 2], true),
        _ => ("roundrobin", [2, 1, 2, 1], false),
    };
    let servers: Vec<String> = backends
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < 4 || with_fifth)
        .map(|(i, b)| {
            format!(
                "  {{ name = \"{}\", addr = \"{}\", weight = {} }},",
                b.name,
                b.addr,
                weights.get(i).copied().unwrap_or(1)
            )
        })
        .collect();
    format!(
        r#"# chaos soak, version {version}
[global]
maxconn = 5000
hard_stop_after = "5s"
log = {{ level = "info", format = "json" }}
admin = {{ path = "{admin}", mode = "0600", level = "admin" }}

[defaults]
timeout = {{ connect = "1s", client = "60s", server = "60s", queue = "5s" }}
retries = 3
check = {{ type = "tcp", inter = "300ms", rise = 2, fall = 2, timeout = "250ms" }}

[[frontend]]
name = "fe"
bind = ["{bind}"]
backend = "be"

[[backend]]
name = "be"
# The test servers greet first.
tcp_smart_connect = false
balance = "{balance}"
stick = {{ on = "src", expire = "2h" }}
servers = [
{servers}
]
"#,
        admin = dir.join("admin.sock").display(),
        servers = servers.join("\n"),
    )
}

/// Rewrites the config file atomically (as sclb-deploy-server does) and reloads through
/// `sclb ctl`. sclb's file watcher may reload on the rename as well: both must be harmless.
async fn rewrite_and_reload(path: &Path, text: String) {
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    let path = path.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(realbin::sclb_bin())
            .arg("ctl")
            .arg("-c")
            .arg(&path)
            .arg("reload")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "sclb ctl reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn admin(path: &Path, line: &str) -> String {
    let (path, line) = (path.to_path_buf(), line.to_string());
    tokio::task::spawn_blocking(move || realbin::admin(&path, &line))
        .await
        .unwrap()
}

#[derive(Default, Debug)]
struct Faults {
    kills: usize,
    drains: usize,
    maints: usize,
    reloads: usize,
    /// What was done when, to set beside a failure nothing explains.
    timeline: Vec<(Instant, String)>,
}

/// Injects a fault every `FAULT_EVERY` until `until`, in a fixed rotation: kill a backend (it
/// comes back after `DEAD_FOR`), drain a server, reload a new config version, enable the
/// server, put another in maintenance, reload, enable. At most one backend is dead and one
/// server drained or in maintenance at a time, so every client always has somewhere to go.
async fn inject_faults(
    sclb_config: &Path,
    admin_path: &Path,
    bind: &str,
    backends: &[Arc<Backend>],
    until: Instant,
) -> Faults {
    let dir = sclb_config.parent().unwrap();
    let mut f = Faults::default();
    let mut version = 0;
    let mut restarts = Vec::new();
    for step in 0..1_000usize {
        tokio::time::sleep(FAULT_EVERY).await;
        if Instant::now() + DEAD_FOR >= until {
            break;
        }
        let victim = &backends[(step / 7) % 4];
        let other = &backends[(step / 7 + 2) % 4];
        match step % 7 {
            0 | 4 => {
                let b = if step % 7 == 0 { victim } else { other };
                b.kill().await;
                f.kills += 1;
                f.timeline
                    .push((Instant::now(), format!("kill {}", b.name)));
                let b = b.clone();
                restarts.push(tokio::spawn(async move {
                    tokio::time::sleep(DEAD_FOR).await;
                    b.restart().await;
                }));
            }
            1 => {
                let r = admin(
                    admin_path,
                    &format!("set server be/{} state drain", other.name),
                )
                .await;
                assert_eq!(r.trim(), "", "drain: {r}");
                f.drains += 1;
                f.timeline
                    .push((Instant::now(), format!("drain {}", other.name)));
            }
            2 | 5 => {
                version += 1;
                let t = Instant::now();
                rewrite_and_reload(sclb_config, config(dir, bind, backends, version)).await;
                f.reloads += 1;
                f.timeline
                    .push((t, format!("reload to version {}", version % 3)));
            }
            3 => {
                admin(admin_path, &format!("enable server be/{}", other.name)).await;
                let r = admin(admin_path, &format!("disable server be/{}", victim.name)).await;
                assert_eq!(r.trim(), "", "maint: {r}");
                f.maints += 1;
                f.timeline.push((
                    Instant::now(),
                    format!("enable {}, maint {}", other.name, victim.name),
                ));
            }
            _ => {
                let r = admin(admin_path, &format!("enable server be/{}", victim.name)).await;
                assert_eq!(r.trim(), "", "enable: {r}");
                f.timeline
                    .push((Instant::now(), format!("enable {}", victim.name)));
            }
        }
    }
    for r in restarts {
        r.await.unwrap();
    }
    for b in backends {
        admin(admin_path, &format!("enable server be/{}", b.name)).await;
    }
    // Back to the warm-up config, so that the end state is compared with the same config.
    while version % 3 != 0 {
        version += 1;
    }
    rewrite_and_reload(sclb_config, config(dir, bind, backends, version)).await;
    f.reloads += 1;
    f
}

// ---------------------------------------------------------------------------------------------
// Explaining failures from the faults injected and sclb's own log line for the connection.

fn explain(f: &Failure, backends: &[Arc<Backend>], log: &[serde_json::Value]) -> Option<String> {
    let find = |name: &str| backends.iter().find(|b| b.name == name);
    if let Some(server) = &f.server {
        let b = find(server)?;
        return b
            .killed_during(f.start, f.end)
            .then(|| format!("backend {server} killed while the connection was on it"));
    }
    // No reply at all: what did sclb do with this client? Its log line says.
    let client = f.client?.to_string();
    let line = log.iter().find(|l| {
        field(l, "client") == client
            && timestamp(l).is_some_and(|t| {
                t + Duration::from_secs(1) >= f.start_wall
                    && t <= f.end_wall + Duration::from_secs(1)
            })
    })?;
    let end = field(line, "end");
    let server = match field(line, "server") {
        "" => realbin::message(line)
            .strip_prefix("connection refused: connect to ")
            .and_then(|m| m.split_whitespace().next())
            .unwrap_or(""),
        s => s,
    };
    let b = find(server)?;
    b.dead_during(f.start, f.end)
        .then(|| format!("backend {server} killed before it answered (sclb: {end})"))
}

fn kib(v: u64) -> String {
    format!("{:.1} MiB", v as f64 / 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_no_byte_and_fails_only_where_a_backend_died() {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = Vec::new();
    for i in 1..=5 {
        backends.push(Backend::start(&format!("s{i}"), i).await);
    }
    let mut sclb = SclbProcess::start(
        dir.path(),
        &config(dir.path(), "127.0.0.1:0", &backends, 0),
        &[],
    );
    let fe = sclb.frontend_addr("fe");
    // From now on the config names the port sclb got: a reload keeps the same socket.
    let bind = fe.to_string();
    let config_path = sclb.config.clone();
    let admin_path = sclb.admin.clone();
    let pid = sclb.pid;

    // Warm-up: the same load without faults fills sclb's pools (kernel pipes, allocator
    // arenas) so that the baseline is the steady state, not the empty process.
    let warm = run_clients(fe, Instant::now() + WARMUP).await;
    assert_eq!(
        warm.failures.lock().unwrap().len(),
        0,
        "failures without any fault: {:?}",
        warm.failures.lock().unwrap()
    );
    assert!(
        sclb.wait_for(Duration::from_secs(10), |s| s.info("CurrConns") == 0),
        "connections left after the warm-up"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, fds0, kinds0) = (sclb.rss_kib(), sclb.fds(), fd_kinds(pid));

    // The soak: clients and faults together; sclb's peak RSS and fds sampled along the way.
    let until = Instant::now() + SOAK;
    let peak = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    let rss = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse().ok())
                        .unwrap_or(0);
                    peak.0.fetch_max(rss, Relaxed);
                }
                if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    peak.1.fetch_max(d.count() as u64, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let started = Instant::now();
    let (tally, faults) = tokio::join!(
        run_clients(fe, until),
        inject_faults(&config_path, &admin_path, &bind, &backends, until)
    );
    let soak_time = started.elapsed();
    sampling.store(false, Relaxed);
    sampler.await.unwrap();

    // Back to rest: every connection closed, then compare with the baseline.
    let resting = Instant::now();
    let drained = sclb.wait_for(Duration::from_secs(15), |s| {
        s.info("CurrConns") == 0 && fd_kinds(s.pid).0 <= kinds0.0
    });
    let rest_time = resting.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss1, fds1, kinds1) = (sclb.rss_kib(), sclb.fds(), fd_kinds(pid));
    let (cur1, sess1) = (sclb.info("CurrConns"), sclb.admin("show sess"));

    // Explain every failure.
    let log = sclb.log_lines();
    let failures = std::mem::take(&mut *tally.failures.lock().unwrap());
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexplained = Vec::new();
    for f in &failures {
        match explain(f, &backends, &log) {
            Some(r) => *reasons.entry(r).or_default() += 1,
            None => unexplained.push(f),
        }
    }
    let info = sclb.admin("show info");
    let info_field = |k: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}: ")))
            .unwrap_or("?")
            .to_string()
    };

    let attempted = tally.attempted.load(Relaxed);
    let completed = tally.completed.load(Relaxed);
    let corrupted = tally.corrupted.load(Relaxed);
    let checked = tally.bytes_checked.load(Relaxed);
    println!(
        "chaos soak: {soak_time:.1?} with {SHORT_CLIENTS} short-lived and {LONG_CLIENTS} long-lived clients, 5 echo backends"
    );
    println!(
        "  faults: {} backend kills (each dead {DEAD_FOR:?}), {} drains, {} maintenances, {} config rewrites + reloads (sclb: Reloads {}, ReloadFailures {})",
        faults.kills,
        faults.drains,
        faults.maints,
        faults.reloads,
        info_field("Reloads"),
        info_field("ReloadFailures")
    );
    println!(
        "  connections: attempted {attempted}, completed {completed}, failed {} ({} explained, {} unexplained)",
        failures.len(),
        failures.len() - unexplained.len(),
        unexplained.len()
    );
    for (reason, n) in &reasons {
        println!("    {n:5} {reason}");
    }
    for f in &unexplained {
        println!(
            "    UNEXPLAINED client {:?} server {:?} after {:?}: {}",
            f.client,
            f.server,
            f.end - f.start,
            f.what
        );
        // What happened around it: faults injected, restarts, and sclb's line for the client.
        let mut near: Vec<(Instant, String)> = faults
            .timeline
            .iter()
            .filter(|(t, _)| {
                *t + Duration::from_secs(3) >= f.start && *t <= f.end + Duration::from_secs(1)
            })
            .cloned()
            .collect();
        for b in &backends {
            for d in b.downtime.lock().unwrap().iter() {
                for (t, what) in [
                    (Some(d.began), "kill began"),
                    (Some(d.done), "kill done"),
                    (d.restarted, "restarted"),
                ] {
                    if let Some(t) = t.filter(|t| {
                        *t + Duration::from_secs(3) >= f.start
                            && *t <= f.end + Duration::from_secs(1)
                    }) {
                        near.push((t, format!("{} {what}", b.name)));
                    }
                }
            }
        }
        near.sort();
        for (t, what) in near {
            let at = if t >= f.start {
                format!("+{:?}", t - f.start)
            } else {
                format!("-{:?}", f.start - t)
            };
            println!("        {at} from its start: {what}");
        }
        let client = f.client.map(|c| c.to_string()).unwrap_or_default();
        for l in log.iter().filter(|l| field(l, "client") == client) {
            println!("        sclb: {l}");
        }
    }
    println!(
        "  bytes echoed and checked: {:.1} MiB, corrupted: {corrupted}",
        checked as f64 / 1048576.0
    );
    println!(
        "  sclb RSS: baseline {}, peak {}, after {}",
        kib(rss0),
        kib(peak.0.load(Relaxed)),
        kib(rss1)
    );
    println!(
        "  back to rest (CurrConns 0, sockets at baseline) {rest_time:.1?} after the last client"
    );
    println!(
        "  sclb fds: baseline {fds0} (sockets {}, pipes {}), peak {}, after {fds1} (sockets {}, pipes {})",
        kinds0.0,
        kinds0.1,
        peak.1.load(Relaxed),
        kinds1.0,
        kinds1.1
    );

    assert!(sclb.is_running(), "sclb died:\n{}", sclb.log_text());
    assert!(
        !sclb.log_text().contains("panicked"),
        "sclb panicked:\n{}",
        sclb.log_text()
    );
    assert_eq!(corrupted, 0, "corrupted bytes");
    assert!(
        unexplained.is_empty(),
        "{} failures match no injected fault",
        unexplained.len()
    );
    assert_eq!(attempted, completed + failures.len() as u64);
    assert!(
        completed > 1_000,
        "too little traffic to prove anything: {completed}"
    );
    assert!(
        faults.kills >= 4 && faults.reloads >= 4 && faults.drains >= 2,
        "{faults:?}"
    );
    assert_eq!(info_field("ReloadFailures"), "0");
    assert!(
        drained,
        "connections or sockets left 15 s after the soak: CurrConns {cur1}, sockets {}, show sess:\n{sess1}",
        kinds1.0
    );
    // Sockets: exactly back. Pipes: sclb keeps up to 64 empty pipes per worker thread for
    // splice(2) (src/pipe.rs POOL_MAX); more than that is a leak.
    assert!(
        kinds1.0 <= kinds0.0,
        "sockets leaked: {} -> {}",
        kinds0.0,
        kinds1.0
    );
    let pool_fds = 2 * 64 * std::thread::available_parallelism().map_or(2, |n| n.get());
    assert!(
        kinds1.1 <= kinds0.1.max(pool_fds),
        "pipes leaked: {} -> {}",
        kinds0.1,
        kinds1.1
    );
    assert!(
        kinds1.2 <= kinds0.2 + 2,
        "other fds leaked: {} -> {}",
        kinds0.2,
        kinds1.2
    );
    // Memory: the allocator keeps some of what it freed; a leak would grow with the ~10k
    // connections of the soak.
    assert!(
        rss1 <= rss0 + (rss0 / 4).max(8 * 1024),
        "RSS did not come back: {} -> {}",
        kib(rss0),
        kib(rss1)
    );
}
