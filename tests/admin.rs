//! The admin socket (HAProxy's runtime API over a real Unix socket) and the stats listener
//! (real HTTP): every command's happy and error path, drain and maint semantics, CSV columns.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use common::*;

struct Lb {
    sclb: sclb::Sclb,
    sock: PathBuf,
    _dir: tempfile::TempDir,
    cfg_path: PathBuf,
}

/// sclb with an admin socket at `level`, a stats listener and `backends` under backend "be".
async fn lb(backends: &[&Backend], level: &str, stats_extra: &str) -> Lb {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let toml = config(
        backends,
        r#"stick = { on = "src", expire = "2h", size = 100 }"#,
        &format!(
            "admin = {{ path = \"{}\", mode = \"0600\", level = \"{level}\" }}\nstats = {{ bind = \"127.0.0.1:0\"{stats_extra} }}",
            sock.display()
        ),
    );
    let cfg_path = dir.path().join("sclb.toml");
    std::fs::write(&cfg_path, &toml).unwrap();
    let config = sclb::config::load(&cfg_path).unwrap();
    let sclb = sclb::Sclb::start(config).await.unwrap();
    Lb {
        sclb,
        sock,
        _dir: dir,
        cfg_path,
    }
}

fn csv_col(csv: &str, row: &str, col: &str) -> String {
    let header: Vec<&str> = csv.lines().next().unwrap()[2..].split(',').collect();
    let pos = header.iter().position(|h| *h == col).unwrap();
    let line = csv
        .lines()
        .find(|l| l.split(',').nth(1) == Some(row))
        .unwrap_or_else(|| panic!("no row {row} in\n{csv}"));
    line.split(',').nth(pos).unwrap().to_string()
}

#[tokio::test]
async fn socket_is_private_and_replies_end_with_an_empty_line() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&lb.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let info = admin(&lb.sock, "show info").await;
    assert!(info.starts_with("Name: sclb\n"), "{info}");
    assert!(info.ends_with("\n\n"));
    assert!(info.contains(&format!("Pid: {}\n", std::process::id())));
    // A command with no output answers a lone empty line, like HAProxy.
    assert_eq!(admin(&lb.sock, "disable server be/s1").await, "\n");
    assert_eq!(admin(&lb.sock, "enable server be/s1").await, "\n");
    // Several commands on a line, separated by ';'.
    let two = admin(&lb.sock, "show table; show table be").await;
    assert_eq!(
        two,
        "# table: be, type: ip, size:100, used:0\n\n# table: be, type: ip, size:100, used:0\n\n"
    );
}

#[tokio::test]
async fn show_stat_has_haproxy_columns_at_haproxy_positions() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a, &b], "admin", "").await;
    let csv = admin(&lb.sock, "show stat").await;
    let header: Vec<&str> = csv
        .lines()
        .next()
        .unwrap()
        .strip_prefix("# ")
        .unwrap()
        .split(',')
        .collect();
    // Positions a dashboard or script reading HAProxy 2.6's CSV relies on.
    for (pos, name) in [
        (0, "pxname"),
        (1, "svname"),
        (2, "qcur"),
        (4, "scur"),
        (7, "stot"),
        (8, "bin"),
        (9, "bout"),
        (13, "econ"),
        (17, "status"),
        (18, "weight"),
        (36, "check_status"),
        (38, "check_duration"),
        (65, "check_desc"),
        (73, "addr"),
        (75, "mode"),
        (76, "algo"),
        (102, "agg_check_status"),
        (103, "spark_version"),
    ] {
        assert_eq!(header[pos], name, "column {pos}");
    }
    assert_eq!(
        header.last(),
        Some(&""),
        "rows end with a comma, like HAProxy's"
    );
    let rows: Vec<&str> = csv.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), 4, "FRONTEND, s1, s2, BACKEND:\n{csv}");
    for r in &rows {
        assert_eq!(r.split(',').count(), header.len(), "{r}");
    }
    assert_eq!(csv_col(&csv, "s1", "addr"), a.addr.to_string());
    assert_eq!(csv_col(&csv, "BACKEND", "algo"), "roundrobin");
    assert_eq!(csv_col(&csv, "s2", "status"), "no check");
    let typed = admin(&lb.sock, "show stat typed").await;
    assert!(typed.contains("S.2.1.1.svname.1:MGP:str:s1\n"), "{typed}");
    let json: serde_json::Value =
        serde_json::from_str(admin(&lb.sock, "show stat json").await.trim()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn drain_keeps_pinned_clients_and_sends_new_ones_elsewhere() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a, &b], "admin", "").await;
    let fe = lb.sclb.local_addrs("fe")[0];
    let (first, _) = which_server(2, fe).await;
    let other = if first == "s1" { "s2" } else { "s1" };
    assert_eq!(
        admin(&lb.sock, &format!("set server be/{first} state drain")).await,
        "\n"
    );
    let csv = admin(&lb.sock, "show stat").await;
    assert_eq!(csv_col(&csv, &first, "status"), "DRAIN");
    // The pinned client keeps coming back to its (draining) server...
    for _ in 0..3 {
        assert_eq!(which_server(2, fe).await.0, first);
    }
    // ...while new clients go to the other.
    for ip in 3..8 {
        assert_eq!(which_server(ip, fe).await.0, other);
    }
    // MAINT: the pinned client moves on its next connection, and the move is counted.
    assert_eq!(
        admin(&lb.sock, &format!("disable server be/{first}")).await,
        "\n"
    );
    assert_eq!(
        csv_col(&admin(&lb.sock, "show stat").await, &first, "status"),
        "MAINT"
    );
    assert_eq!(which_server(2, fe).await.0, other);
    let table = admin(&lb.sock, "show table be key 127.0.0.2").await;
    assert!(table.contains(&format!("server_key={other}")), "{table}");
    assert_eq!(
        csv_col(&admin(&lb.sock, "show stat").await, "BACKEND", "repins"),
        "1"
    );
    // READY again: it takes new clients; the moved client stays where its session now is.
    assert_eq!(
        admin(&lb.sock, &format!("set server be/{first} state ready")).await,
        "\n"
    );
    assert_eq!(which_server(2, fe).await.0, other);
}

#[tokio::test]
async fn server_commands_change_what_show_stat_reports() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a, &b], "admin", "").await;
    let s = &lb.sock;
    assert_eq!(admin(s, "set weight be/s1 7").await, "\n");
    assert_eq!(admin(s, "set server be/s2 weight 200%").await, "\n");
    let csv = admin(s, "show stat").await;
    assert_eq!(csv_col(&csv, "s1", "weight"), "7");
    assert_eq!(csv_col(&csv, "s2", "weight"), "2");
    assert_eq!(admin(s, "set maxconn server be/s1 12").await, "\n");
    assert_eq!(csv_col(&admin(s, "show stat").await, "s1", "slim"), "12");
    // set addr: new connections go to the new address.
    let c = Backend::start("s3").await;
    let reply = admin(
        s,
        &format!("set server be/s1 addr 127.0.0.1 port {}", c.addr.port()),
    )
    .await;
    assert!(
        reply.starts_with("IP changed from '127.0.0.1' to '127.0.0.1', port changed from"),
        "{reply}"
    );
    assert_eq!(admin(s, "disable server be/s2").await, "\n");
    let fe = lb.sclb.local_addrs("fe")[0];
    assert_eq!(which_server(9, fe).await.0, "s3");
    // show sess lists the live connection; shutdown sessions closes it.
    let (_, mut held) = which_server(10, fe).await;
    let sess = admin(s, "show sess").await;
    assert!(
        sess.contains("src=127.0.0.10:") && sess.contains("srv=s1"),
        "{sess}"
    );
    assert_eq!(admin(s, "shutdown sessions server be/s1").await, "\n");
    assert!(
        read_to_end(&mut held, Duration::from_secs(5))
            .await
            .is_empty()
    );
    // Health checks can be stopped and started.
    assert_eq!(admin(s, "disable health be/s1").await, "\n");
    assert_eq!(
        csv_col(&admin(s, "show stat").await, "s1", "status"),
        "no check"
    );
    assert_eq!(admin(s, "enable health be/s1").await, "\n");
    // clear table forgets pins.
    assert!(admin(s, "show table be").await.contains("used:2"));
    assert_eq!(admin(s, "clear table be key 127.0.0.9").await, "\n");
    assert!(admin(s, "show table be").await.contains("used:1"));
    assert_eq!(admin(s, "clear table be").await, "\n");
    assert!(admin(s, "show table be").await.contains("used:0"));
    let state = admin(s, "show servers state be").await;
    assert!(
        state.starts_with("1\n# be_id be_name srv_id srv_name"),
        "{state}"
    );
    assert!(
        state.contains(" be 2 s2 127.0.0.1 2 1 "),
        "MAINT shows as admin state 1:\n{state}"
    );
}

#[tokio::test]
async fn errors_are_one_clear_line_and_the_socket_stays_usable() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    for (cmd, want) in [
        ("disable server be/nope", "No such server.\n\n"),
        ("disable server nope/s1", "No such backend.\n\n"),
        ("disable server be", "Require 'backend/server'.\n\n"),
        ("show table nope", "No such table\n\n"),
        (
            "set server be/s1 state bogus",
            "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n",
        ),
        (
            "set weight be/s1 999",
            "Absolute weight can only be between 0 and 256 inclusive.\n\n",
        ),
    ] {
        assert_eq!(admin(&lb.sock, cmd).await, want, "{cmd}");
    }
    let unknown = admin(&lb.sock, "frobnicate now").await;
    assert!(
        unknown.starts_with("Unknown command 'frobnicate now'"),
        "{unknown}"
    );
    // A timeout on wait says what is left.
    let wait = admin(&lb.sock, "wait 200ms srv-removable be/s1").await;
    assert!(
        wait.starts_with("Timeout waiting for be/s1 to be removable"),
        "{wait}"
    );
    assert!(admin(&lb.sock, "show info").await.starts_with("Name: sclb"));
}

#[tokio::test]
async fn wait_srv_removable_returns_when_the_last_connection_ends() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    let fe = lb.sclb.local_addrs("fe")[0];
    let (_, held) = which_server(2, fe).await;
    admin(&lb.sock, "set server be/s1 state drain").await;
    let sock = lb.sock.clone();
    let waiting = tokio::spawn(async move { admin(&sock, "wait 10s srv-removable be/s1").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a live connection is left");
    drop(held);
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, "\n");
}

#[tokio::test]
async fn interactive_mode_prompts_until_quit() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    let mut s = UnixStream::connect(&lb.sock).await.unwrap();
    s.write_all(b"prompt\nshow table\nquit\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "\n> # table: be, type: ip, size:100, used:0\n\n> ");
}

#[tokio::test]
async fn user_level_can_read_but_not_change() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "user", "").await;
    assert!(admin(&lb.sock, "show stat").await.starts_with("# pxname"));
    assert_eq!(
        admin(&lb.sock, "disable server be/s1").await,
        "Permission denied\n\n"
    );
    assert_eq!(
        admin(&lb.sock, "clear table be").await,
        "Permission denied\n\n"
    );
    assert_eq!(admin(&lb.sock, "reload").await, "Permission denied\n\n");
    let snap = lb.sclb.state().snapshot();
    assert_eq!(
        snap.backends[0].servers[0].status(),
        "no check",
        "nothing changed"
    );
}

#[tokio::test]
async fn reload_command_applies_a_good_file_and_keeps_a_bad_one_out() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a], "admin", "").await;
    let good = std::fs::read_to_string(&lb.cfg_path).unwrap().replace(
        &format!("{{ name = \"s1\", addr = \"{}\" }}", a.addr),
        &format!(
            "{{ name = \"s1\", addr = \"{}\" }}, {{ name = \"s2\", addr = \"{}\" }}",
            a.addr, b.addr
        ),
    );
    std::fs::write(&lb.cfg_path, &good).unwrap();
    let r = admin(&lb.sock, "reload").await;
    assert_eq!(
        r,
        "frontends +0 -0 ~0, backends +0 -0 ~1, servers +1 -0 ~0\n\n"
    );
    assert!(admin(&lb.sock, "show stat").await.contains("\nbe,s2,"));
    std::fs::write(
        &lb.cfg_path,
        good.replace("[[backend]]", "[[backend]]\nbalanse = 1"),
    )
    .unwrap();
    let r = admin(&lb.sock, "reload").await;
    assert!(
        r.starts_with("Reload failed, the running config is kept:\n"),
        "{r}"
    );
    assert!(r.contains("sclb.toml:"), "names the file: {r}");
    assert!(r.contains("backend[0].balanse: unknown key"), "{r}");
    let info = admin(&lb.sock, "show info").await;
    assert!(info.contains("ReloadFailures: 1\n"), "{info}");
    assert!(
        admin(&lb.sock, "show stat").await.contains("\nbe,s2,"),
        "still running"
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, "", "").await
}

/// A minimal HTTP/1.1 client, enough for the stats listener.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    auth: &str,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = if auth.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {auth}\r\n")
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn stats_listener_serves_csv_json_metrics_and_health() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a, &b], "admin", "").await;
    let addr = lb.sclb.stats_addr().unwrap();
    let fe = lb.sclb.local_addrs("fe")[0];
    which_server(2, fe).await;
    admin(&lb.sock, "set server be/s2 state maint").await;

    let (code, csv) = http_get(addr, "/stats;csv").await;
    assert_eq!(code, 200);
    let sock_csv = admin(&lb.sock, "show stat").await;
    assert_eq!(
        csv.lines().next(),
        sock_csv.lines().next(),
        "same columns as show stat"
    );
    assert_eq!(csv_col(&csv, "s2", "status"), "MAINT");

    let (code, json) = http_get(addr, "/stats;json").await;
    assert_eq!(code, 200);
    assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());

    let (code, m) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "sclb_server_status{proxy=\"be\",server=\"s2\",state=\"MAINT\"} 1",
        "sclb_server_status{proxy=\"be\",server=\"s2\",state=\"UP\"} 0",
        "sclb_server_sessions_total{proxy=\"be\",server=\"s1\"} 1",
        "sclb_sticktable_used{name=\"be\"} 1",
        "sclb_reload_failures_total 0",
        "sclb_frontend_sessions_total{proxy=\"fe\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line} in\n{m}");
    }
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
    let (code, html) = http_get(addr, "/stats").await;
    assert_eq!(code, 200);
    assert!(html.contains("<td class=\"l maint\">MAINT</td>"), "{html}");
    // Without a token, HTTP cannot change anything.
    let (code, _) = http(addr, "POST", "/admin", "", "disable server be/s1").await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn http_admin_needs_the_token() {
    let a = Backend::start("s1").await;
    let lb = lb(
        &[&a],
        "admin",
        ", admin_token = \"0123456789abcdef-secret\"",
    )
    .await;
    let addr = lb.sclb.stats_addr().unwrap();
    let (code, body) = http(
        addr,
        "POST",
        "/admin",
        "wrong-token-wrong-token",
        "disable server be/s1",
    )
    .await;
    assert_eq!((code, body.as_str()), (401, "Permission denied\n"));
    let (code, _) = http(
        addr,
        "POST",
        "/admin",
        "0123456789abcdef-secret",
        "disable server be/s1",
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        lb.sclb.state().snapshot().backends[0].servers[0].status(),
        "MAINT"
    );
    let (code, body) = http(
        addr,
        "POST",
        "/admin",
        "0123456789abcdef-secret",
        "disable server be/zz",
    )
    .await;
    assert_eq!((code, body.as_str()), (400, "No such server.\n\n"));
    let _ = a.accepted.load(Ordering::SeqCst);
}

#[test]
fn ctl_speaks_to_the_socket_and_exits_by_the_reply() {
    // Run a real sclb binary and talk to it with `sclb ctl`.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(
        &cfg,
        binary_config(&format!("admin = {{ path = \"{}\" }}", sock.display()), ""),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_sclb");
    let mut child = KillOnDrop::spawn(
        std::process::Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .stderr(std::process::Stdio::null()),
    );
    let t0 = std::time::Instant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = |args: &[&str]| {
        std::process::Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .arg("ctl")
            .args(args)
            .output()
            .unwrap()
    };
    let ok = ctl(&["show", "stat"]);
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && stdout.starts_with("# pxname,"),
        "{stdout}"
    );
    let bad = ctl(&["disable", "server", "b/zz"]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&bad.stdout), "No such server.\n");
    let drain = ctl(&["set", "server", "b/s", "state", "drain"]);
    assert!(drain.status.success());
    assert!(String::from_utf8_lossy(&ctl(&["show", "stat"]).stdout).contains("b,s,"));
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success());
    assert!(!sock.exists(), "socket removed on stop");
    let gone = ctl(&["show", "info"]);
    assert_eq!(gone.status.code(), Some(2));
}
