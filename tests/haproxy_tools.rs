//! HAProxy operators' own tools against the real `sclb` binary: `hatop` (driven in a tmux
//! pane, as a person would see it), `prometheus-haproxy-exporter` with its default URL form
//! (`http://host:port/;csv`) and over the admin socket, and Prometheus' text parser
//! (python3-prometheus-client) reading `/metrics`. Debian packages: `scripts/test` installs
//! them and sets SCLB_REQUIRE_HAPROXY_TOOLS=1, so that a missing one fails there; elsewhere a
//! test without its tool is skipped.

mod realbin;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use realbin::{SclbProcess, field, message};

/// The tool's path, or `None` (the test is skipped) where it is not installed and not required.
fn tool(name: &str, package: &str) -> Option<String> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    match found {
        Some(f) => Some(f.display().to_string()),
        None => {
            assert!(
                std::env::var_os("SCLB_REQUIRE_HAPROXY_TOOLS").is_none(),
                "{name} is required here but not installed (apt-get install {package})"
            );
            eprintln!("SKIPPED: no {name} (apt-get install {package}); scripts/test installs it");
            None
        }
    }
}

/// An echo server: the backend every test's clients reach.
fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// sclb with frontend `fe`, backend `be` of two servers (`s1` on the echo server, `s2` on a
/// closed port, so DOWN), tcp checks, the stats listener and the admin socket.
fn start(dir: &Path) -> (SclbProcess, SocketAddr, SocketAddr) {
    let up = echo_backend();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = format!(
        r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:0" }}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
check = {{ type = "tcp", inter = "200ms", rise = 1, fall = 1 }}
servers = [ {{ name = "s1", addr = "{up}" }}, {{ name = "s2", addr = "{closed}" }} ]
"#,
        dir.join("admin.sock").display()
    );
    let mut sclb = SclbProcess::start(dir, &config, &[]);
    let fe = sclb.frontend_addr("fe");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let found = sclb.log_lines().iter().find_map(|l| {
            message(l)
                .starts_with("stats page on")
                .then(|| field(l, "addr").parse::<SocketAddr>().ok())
                .flatten()
        });
        if let Some(a) = found {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no stats listener:\n{}",
            sclb.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        sclb.wait_for(Duration::from_secs(10), |p| {
            p.admin("show stat be 4 1").contains(",UP,")
        }),
        "s1 never came UP:\n{}",
        sclb.admin("show stat")
    );
    (sclb, fe, stats)
}

/// `n` clients through sclb, each echoing `size` bytes.
fn traffic(fe: SocketAddr, n: usize, size: usize) {
    for _ in 0..n {
        let mut c = TcpStream::connect(fe).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(&vec![b'x'; size]).unwrap();
        let mut got = vec![0u8; size];
        c.read_exact(&mut got).unwrap();
    }
}

/// A plain HTTP/1.0 GET; the body.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{path}: {head}"
    );
    body.to_string()
}

/// A child killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the exporter on `scrape_uri`; its `/metrics` once it has scraped sclb.
fn exporter_metrics(bin: &str, scrape_uri: &str) -> String {
    let port = free_port();
    let _exporter = Guard(
        Command::new(bin)
            .arg(format!("--haproxy.scrape-uri={scrape_uri}"))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(addr).is_ok() {
            let body = http_get(addr, "/metrics");
            if body.contains("haproxy_up") {
                return body;
            }
        }
        assert!(Instant::now() < deadline, "the exporter never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `name{labels} value` of a metrics body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn prometheus_haproxy_exporter_scrapes_real_values_over_http_and_the_socket() {
    let Some(bin) = tool("prometheus-haproxy-exporter", "prometheus-haproxy-exporter") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (sclb, fe, stats) = start(dir.path());
    traffic(fe, 5, 1000);
    // The exporter's default form is http://localhost/;csv: sclb's runbooks use it as is.
    for uri in [
        format!("http://{stats}/;csv"),
        format!("unix:{}", sclb.admin.display()),
    ] {
        let m = exporter_metrics(&bin, &uri);
        let get = |series: &str| {
            sample(&m, series).unwrap_or_else(|| panic!("{uri}: no {series} in\n{m}"))
        };
        assert_eq!(get("haproxy_up"), 1.0, "{uri}");
        assert_eq!(
            get("haproxy_exporter_csv_parse_failures_total"),
            0.0,
            "{uri}"
        );
        assert_eq!(
            get("haproxy_server_up{backend=\"be\",server=\"s1\"}"),
            1.0,
            "{uri}"
        );
        assert_eq!(
            get("haproxy_server_up{backend=\"be\",server=\"s2\"}"),
            0.0,
            "{uri}"
        );
        assert_eq!(get("haproxy_backend_up{backend=\"be\"}"), 1.0, "{uri}");
        assert_eq!(
            get("haproxy_frontend_connections_total{frontend=\"fe\"}"),
            5.0,
            "{uri}"
        );
        assert_eq!(
            get("haproxy_server_bytes_in_total{backend=\"be\",server=\"s1\"}"),
            5000.0,
            "{uri}"
        );
        assert_eq!(
            get("haproxy_server_bytes_out_total{backend=\"be\",server=\"s1\"}"),
            5000.0,
            "{uri}"
        );
        assert_eq!(
            get("haproxy_backend_sessions_total{backend=\"be\"}"),
            5.0,
            "{uri}"
        );
    }
}

#[test]
fn hatop_starts_and_shows_the_servers() {
    let (Some(hatop), Some(tmux)) = (tool("hatop", "hatop"), tool("tmux", "tmux")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (sclb, fe, _) = start(dir.path());
    traffic(fe, 3, 100);
    // A tmux server of this test's own (its socket in the temp dir), so nothing else is touched.
    let sock = dir.path().join("tmux.sock");
    let tmux_cmd = |args: &[&str]| {
        Command::new(&tmux)
            .arg("-S")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    let cmd = format!("{hatop} -s {} -i 1", sclb.admin.display());
    let out = tmux_cmd(&["new-session", "-d", "-x", "160", "-y", "40", &cmd]);
    assert!(out.status.success(), "tmux: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let screen = loop {
        let screen =
            String::from_utf8_lossy(&tmux_cmd(&["capture-pane", "-p"]).stdout).into_owned();
        if screen.contains("BACKEND") || Instant::now() > deadline {
            break screen;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = tmux_cmd(&["kill-server"]);
    assert!(
        !screen.contains("error") && !screen.contains("missing"),
        "hatop failed:\n{screen}"
    );
    for want in [
        "sclb Version",
        "PID:",
        "Node:",
        ">>> fe",
        ">>> be",
        "BACKEND",
        "FRONTEND",
    ] {
        assert!(
            screen.contains(want),
            "no {want:?} on hatop's screen:\n{screen}"
        );
    }
    let row = |name: &str| {
        screen
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row:\n{screen}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(row("s1")[2], "UP", "{screen}");
    assert_eq!(row("s2")[2], "DOWN", "{screen}");
}

/// Prometheus' own text parser (python3-prometheus-client, the 0.0.4 format sclb serves by
/// default) types every counter as a counter: each `_total` sample belongs to a family of
/// type counter, and no family is left untyped.
#[test]
fn prometheus_parser_types_every_counter_as_a_counter() {
    // Debian's python3, where python3-prometheus-client installs (a python3 earlier on PATH,
    // e.g. pyenv's, does not see it).
    let debian = Path::new("/usr/bin/python3");
    let Some(python) = (if debian.is_file() {
        Some(debian.display().to_string())
    } else {
        tool("python3", "python3")
    }) else {
        return;
    };
    let has_client = Command::new(&python)
        .args(["-c", "import prometheus_client.parser"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        assert!(
            std::env::var_os("SCLB_REQUIRE_HAPROXY_TOOLS").is_none(),
            "python3-prometheus-client is required here but not installed"
        );
        eprintln!(
            "SKIPPED: no prometheus_client for {python} (apt-get install python3-prometheus-client)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_sclb, fe, stats) = start(dir.path());
    traffic(fe, 2, 10);
    for path in ["/metrics", "/metrics?names=haproxy"] {
        let body = http_get(stats, path);
        let file = dir.path().join("metrics.txt");
        std::fs::write(&file, &body).unwrap();
        let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
bad = []
families = 0
counters = 0
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    families += 1
    if f.type in ("unknown", "untyped"):
        bad.append("untyped family %s" % f.name)
    if f.type == "counter":
        counters += 1
    for s in f.samples:
        if s.name.endswith("_total") and f.type != "counter":
            bad.append("%s sampled in a %s family %s" % (s.name, f.type, f.name))
print("families=%d counters=%d" % (families, counters))
for b in bad:
    print(b)
sys.exit(1 if bad or counters == 0 else 0)
"#;
        let out = Command::new(&python)
            .args(["-c", script])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{path}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every metric name a panel of the Grafana dashboard (conf/grafana) queries is one the real
/// sclb serves: a family it declares, or a histogram family's `_bucket`, `_sum` or `_count`.
#[test]
fn every_dashboard_query_names_a_metric_sclb_serves() {
    let dir = tempfile::tempdir().unwrap();
    let (_sclb, fe, stats) = start(dir.path());
    traffic(fe, 1, 10);
    let body = http_get(stats, "/metrics");
    let mut served = std::collections::HashSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            served.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    served.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let dashboard = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/grafana/sclb-dashboard.json"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                        ("query", serde_json::Value::Object(q)) => {
                            if let Some(serde_json::Value::String(s)) = q.get("query") {
                                out.push(s.clone());
                            }
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(exprs.len() > 40, "{} queries", exprs.len());
    let mut unknown = Vec::new();
    let mut named = 0;
    for expr in &exprs {
        // Metric names: identifiers starting with sclb_, haproxy_ or spark_connect_.
        let mut rest = expr.as_str();
        while let Some(i) = ["sclb_", "haproxy_", "spark_connect_"]
            .iter()
            .filter_map(|p| rest.find(p))
            .min()
        {
            let preceded = rest[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$');
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            if !preceded {
                named += 1;
                if !served.contains(name) {
                    unknown.push(format!("{name} in {expr}"));
                }
            }
            rest = &tail[end..];
        }
    }
    assert!(named > 40, "only {named} metric names found");
    assert!(
        unknown.is_empty(),
        "not served by sclb:\n{}",
        unknown.join("\n")
    );
}
