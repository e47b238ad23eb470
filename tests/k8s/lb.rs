//! Stand-in Spark Connect servers on 127.0.0.x, and sclb as an operator sees it: `show stat`,
//! `show info`, `/metrics`, the stats page, and real client connections.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{Backend, which_server};

/// A greeting server per `(name, 127.0.0.x)`, all on one port (as pods share a container port).
pub async fn stand_ins(servers: &[(&str, u8)]) -> (u16, Vec<Backend>) {
    'retry: for _ in 0..20 {
        let first = TcpListener::bind((Ipv4Addr::new(127, 0, 0, servers[0].1), 0))
            .await
            .unwrap();
        let port = first.local_addr().unwrap().port();
        let mut out = vec![Backend::serve(servers[0].0, first)];
        for (name, ip) in &servers[1..] {
            match TcpListener::bind((Ipv4Addr::new(127, 0, 0, *ip), port)).await {
                Ok(l) => out.push(Backend::serve(name, l)),
                Err(_) => continue 'retry,
            }
        }
        return (port, out);
    }
    panic!("no port free on all of {servers:?}");
}

pub struct Lb {
    sclb: sclb::Sclb,
    sock: PathBuf,
    cfg: PathBuf,
    _dir: tempfile::TempDir,
}

/// sclb config: frontend "fe", backend "be" (pinned by source IP, quick tcp checks) with
/// `discovery` as its `[backend.discovery.kubernetes]` table.
fn lb_config(sock: &Path, discovery: &str) -> String {
    format!(
        r#"
[global]
admin = {{ path = "{}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:0" }}
[defaults]
timeout = {{ connect = "1s", queue = "2s" }}
retries = 1
check = {{ type = "tcp", inter = "300ms", rise = 1, fall = 1 }}
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"
[[backend]]
name = "be"
stick = {{ on = "src", expire = "2h" }}
[backend.discovery.kubernetes]
{discovery}
"#,
        sock.display()
    )
}

pub async fn start_lb(discovery: &str) -> Lb {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(&cfg, lb_config(&sock, discovery)).unwrap();
    let config = sclb::config::load(&cfg).unwrap_or_else(|e| panic!("{e}"));
    let sclb = sclb::Sclb::start(config).await.unwrap();
    Lb {
        sclb,
        sock,
        cfg,
        _dir: dir,
    }
}

impl Lb {
    pub async fn cmd(&self, line: &str) -> String {
        crate::common::admin(&self.sock, line).await
    }

    /// Backend "be" as `show stat` shows it: server → (addr, status, stot).
    pub async fn pool(&self) -> BTreeMap<String, (String, String, u64)> {
        let csv = self.cmd("show stat").await;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().unwrap()[2..].split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
        let (px, sv, addr, status, stot) = (
            col("pxname"),
            col("svname"),
            col("addr"),
            col("status"),
            col("stot"),
        );
        lines
            .filter(|l| !l.is_empty())
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f[px] == "be" && f[sv] != "BACKEND")
            .map(|f| {
                (
                    f[sv].to_string(),
                    (
                        f[addr].to_string(),
                        f[status].to_string(),
                        f[stot].parse().unwrap_or(0),
                    ),
                )
            })
            .collect()
    }

    /// Waits (up to 30 s) until the pool is exactly `want`: `(server, addr, status)`.
    pub async fn expect_pool(&self, want: &[(&str, SocketAddr, &str)]) {
        let want: BTreeMap<String, (String, String)> = want
            .iter()
            .map(|(n, a, s)| (n.to_string(), (a.to_string(), s.to_string())))
            .collect();
        eventually(&format!("pool {want:?}"), || async {
            let got: BTreeMap<String, (String, String)> = self
                .pool()
                .await
                .into_iter()
                .map(|(n, (a, s, _))| (n, (a, s)))
                .collect();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        })
        .await
    }

    /// Waits (up to 30 s) until `show info` has a line containing every one of `parts`.
    pub async fn expect_info(&self, parts: &[&str]) -> String {
        eventually(&format!("show info line with {parts:?}"), || async {
            let info = self.cmd("show info").await;
            match info.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                Some(l) => Ok(l.to_string()),
                None => Err(info
                    .lines()
                    .filter(|l| l.starts_with("Discovery"))
                    .collect::<Vec<_>>()
                    .join("\n")),
            }
        })
        .await
    }

    pub fn fe(&self) -> SocketAddr {
        self.sclb.local_addrs("fe")[0]
    }

    /// Which stand-in answers client 127.0.0.`n` (the connection is closed after the greeting).
    pub async fn hello(&self, n: u8) -> String {
        which_server(n, self.fe()).await.0
    }

    /// A client IP (from `from` up) that sclb sends to `server`: it is then pinned there.
    pub async fn client_on(&self, server: &str, from: u8) -> u8 {
        for n in from..from + 40 {
            if self.hello(n).await == server {
                return n;
            }
        }
        panic!("no client reached {server}");
    }

    pub async fn http_get(&self, path: &str) -> String {
        let addr = self.sclb.stats_addr().unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: sclb\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
            .await
            .expect("HTTP reply in time")
            .unwrap();
        out
    }

    pub async fn reload_with(&self, discovery: Option<&str>, extra: &str) -> String {
        let mut text = match discovery {
            Some(d) => lb_config(&self.sock, d),
            None => lb_config(&self.sock, "").replace("[backend.discovery.kubernetes]\n", ""),
        };
        text = text.replace("retries = 1", extra);
        std::fs::write(&self.cfg, text).unwrap();
        self.sclb.reload().await.unwrap_or_else(|e| panic!("{e}"))
    }
}

pub fn at(ip: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(127, 0, 0, ip), port))
}

/// Polls `f` every 100 ms until it is `Ok`; fails after 30 s with the last thing it saw.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after 30 s waiting for {what}; last seen:\n{last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The value of a metric line `name{labels} value` in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A `[backend.discovery.kubernetes]` table; an empty selector is left out.
pub fn discovery(kind: &str, ns: &str, selector: &str, port: &str, kubeconfig: &Path) -> String {
    let selector = if selector.is_empty() {
        String::new()
    } else {
        format!("selector = \"{selector}\"\n")
    };
    format!(
        "kind = \"{kind}\"\nnamespace = \"{ns}\"\n{selector}port = {port}\nkubeconfig = \"{}\"\n",
        kubeconfig.display()
    )
}
