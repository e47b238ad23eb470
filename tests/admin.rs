//! The admin socket (HAProxy's runtime API over a real Unix socket) and the stats listener
//! (real HTTP): every command's happy and error path, drain and maint semantics, CSV columns.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
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
    assert!(typed.contains("S.2.1.1.svname.1:KNS:str:s1\n"), "{typed}");
    let json: serde_json::Value =
        serde_json::from_str(admin(&lb.sock, "show stat json").await.trim()).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 4);
    // Selectors, as hatop and scripts send them: `<iid|proxy> <type> <sid>`.
    let servers = admin(&lb.sock, "show stat be 4 -1").await;
    let names: Vec<&str> = servers
        .lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"], "{servers}");
    let one = admin(&lb.sock, "show stat 2 4 2 typed").await;
    assert!(
        one.contains("S.2.2.1.svname.1:KNS:str:s2\n") && !one.contains(":s1\n"),
        "{one}"
    );
    assert_eq!(
        admin(&lb.sock, "show stat nope 4 -1").await,
        "No such proxy.\n\n"
    );
    let info = admin(&lb.sock, "show info typed").await;
    assert!(info.starts_with("0.Name.1:POS:str:sclb\n"), "{info}");
    let info: serde_json::Value =
        serde_json::from_str(admin(&lb.sock, "show info json").await.trim()).unwrap();
    assert_eq!(info[2]["field"]["name"], "Release_date");
}

#[tokio::test]
async fn set_maxconn_frontend_and_show_servers_conn() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    assert_eq!(admin(&lb.sock, "set maxconn frontend fe 7").await, "\n");
    assert_eq!(
        csv_col(&admin(&lb.sock, "show stat").await, "FRONTEND", "slim"),
        "7"
    );
    assert_eq!(
        admin(&lb.sock, "set maxconn frontend nope 7").await,
        "No such frontend.\n\n"
    );
    // The limit is enforced: at 0, a client is accepted by the kernel but never served.
    assert_eq!(admin(&lb.sock, "set maxconn frontend fe 0").await, "\n");
    let fe = lb.sclb.local_addrs("fe")[0];
    let mut c = tokio::net::TcpStream::connect(fe).await.unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await;
    assert!(r.is_err(), "served past maxconn 0: {r:?}");
    assert_eq!(admin(&lb.sock, "set maxconn frontend fe 5").await, "\n");
    let conn = admin(&lb.sock, "show servers conn").await;
    let mut lines = conn.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("# bkname/svname bkid/svid addr port - purge_delay used_cur"),
        "{conn}"
    );
    assert!(
        lines.next().unwrap().starts_with("be/s1 2/1 127.0.0.1 "),
        "{conn}"
    );
    assert_eq!(
        admin(&lb.sock, "show servers conn nope").await,
        "No such backend.\n\n"
    );
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
        ("disable server", "Require 'backend/server'.\n\n"),
        ("disable server be/", "Require 'backend/server'.\n\n"),
        ("disable server nope", "No such server.\n\n"),
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

/// The design card's own words: `disable server sc1`, a bare name, works when the name is in
/// one backend; when several backends have it, the error names every candidate.
#[tokio::test]
async fn a_bare_server_name_works_when_unique_and_an_ambiguous_one_lists_the_candidates() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let toml = format!(
        r#"
[global]
admin = {{ path = "{}" }}
[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be1"
[[backend]]
name = "be1"
# The test servers greet first.
tcp_smart_connect = false
check = {{ type = "none" }}
servers = [ {{ name = "sc1", addr = "{}" }}, {{ name = "shared", addr = "{}" }} ]
[[backend]]
name = "be2"
# The test servers greet first.
tcp_smart_connect = false
check = {{ type = "none" }}
servers = [ {{ name = "shared", addr = "{}" }} ]
"#,
        sock.display(),
        a.addr,
        b.addr,
        b.addr
    );
    let sclb = start_sclb(&toml).await;
    assert_eq!(admin(&sock, "disable server sc1").await, "\n");
    let snap = sclb.state().snapshot();
    assert_eq!(snap.backends[0].servers[0].status(), "MAINT");
    assert_eq!(admin(&sock, "set server sc1 state ready").await, "\n");
    assert_ne!(snap.backends[0].servers[0].status(), "MAINT");
    let reply = admin(&sock, "disable server shared").await;
    assert_eq!(
        reply,
        "Require 'backend/server': 'shared' is a server of several backends: be1/shared, be2/shared.\n\n"
    );
    assert_eq!(admin(&sock, "disable server be2/shared").await, "\n");
    assert_eq!(snap.backends[1].servers[0].status(), "MAINT");
    assert_eq!(snap.backends[0].servers[1].admin_state().word(), "READY");
}

/// Commands HAProxy operators type that sclb answers as HAProxy does: `get weight`,
/// `set server ... health`, `clear counters [all]`, `show version`, `show backend`.
#[tokio::test]
async fn get_weight_forced_health_clear_counters_version_and_backends() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    // Checks on, the first at once (spread 0) and the next an hour later.
    let backend = r#"stick = { on = "src", expire = "2h" }
check = { type = "tcp", inter = "1h", spread = "0%", init_state = "fully-up" }"#;
    let global = format!("admin = {{ path = \"{}\" }}", sock.display());
    let sclb = start_sclb(&config(&[&a, &b], backend, &global)).await;
    let s = &sock;
    let fe = sclb.local_addrs("fe")[0];
    let snap = sclb.state().snapshot();
    for server in &snap.backends[0].servers {
        for _ in 0..500 {
            if server.health.last().status != sclb::server::CheckStatus::Init {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(server.health.last().status.is_ok(), "first check done");
    }
    assert_eq!(admin(s, "get weight be/s1").await, "1 (initial 1)\n\n");
    assert_eq!(admin(s, "set weight s1 7").await, "\n");
    assert_eq!(admin(s, "get weight s1").await, "7 (initial 1)\n\n");
    assert_eq!(admin(s, "set weight be/s1 1").await, "\n");
    assert_eq!(
        admin(s, "show version").await,
        format!("{}\n\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(admin(s, "show backend").await, "# name\nbe\n\n");

    // Pin client .2 to s1, then force s1 "stopping": its pinned client stays, new clients
    // go to s2; "down" moves even the pinned one; "up" brings it back.
    let (first, _conn) = which_server(2, fe).await;
    let (pinned, other) = if first == "s1" {
        ("s1", "s2")
    } else {
        ("s2", "s1")
    };
    assert_eq!(
        admin(s, &format!("set server be/{pinned} health stopping")).await,
        "\n"
    );
    let stat = admin(s, "show stat").await;
    assert_eq!(csv_col(&stat, pinned, "status"), "NOLB");
    assert_eq!(which_server(2, fe).await.0, pinned, "a pinned client stays");
    for ip in 3..6u8 {
        assert_eq!(
            which_server(ip, fe).await.0,
            other,
            "new clients avoid NOLB"
        );
    }
    assert_eq!(
        admin(s, &format!("set server be/{pinned} health down")).await,
        "\n"
    );
    assert_eq!(
        csv_col(&admin(s, "show stat").await, pinned, "status"),
        "DOWN"
    );
    assert_eq!(
        admin(s, &format!("set server be/{pinned} health up")).await,
        "\n"
    );
    assert_eq!(
        csv_col(&admin(s, "show stat").await, pinned, "status"),
        "UP"
    );
    assert!(
        admin(s, "set server be/s1 health maybe")
            .await
            .starts_with("'set server <srv> health' expects"),
    );

    // clear counters: max values restart from the current ones; all: totals go to zero.
    let stat = admin(s, "show stat").await;
    assert_ne!(csv_col(&stat, other, "stot"), "0");
    assert_eq!(admin(s, "clear counters").await, "\n");
    let stat = admin(s, "show stat").await;
    assert_ne!(
        csv_col(&stat, other, "stot"),
        "0",
        "plain clear keeps totals"
    );
    assert_eq!(admin(s, "clear counters all").await, "\n");
    let stat = admin(s, "show stat").await;
    assert_eq!(csv_col(&stat, other, "stot"), "0");
    assert_eq!(csv_col(&stat, other, "bin"), "0");
}

/// `show sess <id>` and `shutdown session <id>` take the ids `show sess` prints: one client
/// connection is closed, the others go on.
#[tokio::test]
async fn shutdown_session_closes_one_connection_by_its_show_sess_id() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    let s = &lb.sock;
    let fe = lb.sclb.local_addrs("fe")[0];
    let (_, mut first) = which_server(2, fe).await;
    let (_, mut second) = which_server(3, fe).await;
    let listing = admin(s, "show sess").await;
    let id_of = |src: &str| {
        listing
            .lines()
            .find(|l| l.contains(&format!("src={src}:")))
            .and_then(|l| l.split(':').next())
            .unwrap_or_else(|| panic!("no {src} in {listing}"))
            .to_string()
    };
    let (id1, id2) = (id_of("127.0.0.2"), id_of("127.0.0.3"));
    let one = admin(s, &format!("show sess {id1}")).await;
    assert!(
        one.starts_with(&format!("{id1}: proto=tcpv4 src=127.0.0.2:")),
        "{one}"
    );
    assert_eq!(admin(s, &format!("shutdown session {id1}")).await, "\n");
    // The first client sees its connection end; the second still echoes.
    let rest = read_to_end(&mut first, Duration::from_secs(5)).await;
    assert!(rest.is_empty(), "{rest:?}");
    second.get_mut().write_all(b"ping\n").await.unwrap();
    let mut line = String::new();
    second.read_line(&mut line).await.unwrap();
    assert_eq!(line, "ping\n");
    let listing = admin(s, "show sess").await;
    assert!(
        !listing.contains(&format!("{id1}:")) && listing.contains(&format!("{id2}:")),
        "{listing}"
    );
    assert_eq!(
        admin(s, &format!("shutdown session {id1}")).await,
        format!("No such session id {id1}.\n\n")
    );
    assert!(
        admin(s, "shutdown session 12zz")
            .await
            .starts_with("Invalid session id '12zz'")
    );
}

/// Whether a client connecting now is served (greeted by its server) within `within`.
async fn served(fe: std::net::SocketAddr, n: u8, within: Duration) -> Option<BufReaderStream> {
    let s = connect_from(n, fe).await;
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    match tokio::time::timeout(within, r.read_line(&mut line)).await {
        Ok(Ok(k)) if k > 0 => Some(r),
        _ => None,
    }
}

type BufReaderStream = tokio::io::BufReader<tokio::net::TcpStream>;

/// `disable frontend` stops accepting (clients wait in the accept queue and are served on
/// `enable frontend`), `shutdown frontend` closes the listeners until the next reload, and
/// `set maxconn global` changes the limit at once.
#[tokio::test]
async fn frontends_pause_resume_and_shut_down_and_global_maxconn_changes_at_once() {
    let a = Backend::start("s1").await;
    let lb = lb(&[&a], "admin", "").await;
    let s = &lb.sock;
    let fe = lb.sclb.local_addrs("fe")[0];
    assert!(served(fe, 2, Duration::from_secs(5)).await.is_some());

    assert_eq!(admin(s, "disable frontend fe").await, "\n");
    assert_eq!(
        csv_col(&admin(s, "show stat").await, "FRONTEND", "status"),
        "STOP"
    );
    let waiting = connect_from(3, fe).await;
    let mut waiting = tokio::io::BufReader::new(waiting);
    let mut line = String::new();
    let early =
        tokio::time::timeout(Duration::from_millis(300), waiting.read_line(&mut line)).await;
    assert!(
        early.is_err(),
        "a paused frontend served a client: {line:?}"
    );
    assert_eq!(admin(s, "enable frontend fe").await, "\n");
    assert_eq!(
        csv_col(&admin(s, "show stat").await, "FRONTEND", "status"),
        "OPEN"
    );
    tokio::time::timeout(Duration::from_secs(5), waiting.read_line(&mut line))
        .await
        .expect("the waiting client is served once enabled")
        .unwrap();
    assert_eq!(line, "s1\n");
    assert_eq!(
        admin(s, "disable frontend nope").await,
        "No such frontend.\n\n"
    );

    // Global maxconn 1: with one client connected, the next waits until it is raised.
    let held = served(fe, 4, Duration::from_secs(5)).await.expect("served");
    drop(waiting);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(admin(s, "set maxconn global 1").await, "\n");
    assert!(admin(s, "show info").await.contains("\nMaxconn: 1\n"));
    let mut second = tokio::io::BufReader::new(connect_from(5, fe).await);
    let mut line = String::new();
    let early = tokio::time::timeout(Duration::from_millis(300), second.read_line(&mut line)).await;
    assert!(early.is_err(), "served beyond maxconn: {line:?}");
    assert_eq!(admin(s, "set maxconn global 100").await, "\n");
    tokio::time::timeout(Duration::from_secs(5), second.read_line(&mut line))
        .await
        .expect("served once maxconn is raised")
        .unwrap();
    assert!(
        admin(s, "set maxconn global 0")
            .await
            .starts_with("Invalid maxconn")
    );
    drop(held);

    // shutdown frontend: no listener until the next reload.
    assert_eq!(admin(s, "shutdown frontend fe").await, "\n");
    assert!(lb.sclb.local_addrs("fe").is_empty());
    assert!(
        tokio::net::TcpStream::connect(fe).await.is_err(),
        "still listening"
    );
    lb.sclb.reload().await.unwrap();
    let fe = lb.sclb.local_addrs("fe")[0];
    assert!(served(fe, 6, Duration::from_secs(5)).await.is_some());
}

/// `/readyz` says whether this process can route: 503 naming the backend while no server
/// takes new clients, 200 again when one does; `/healthz` stays 200 (the process is fine).
#[tokio::test]
async fn readyz_follows_whether_a_server_takes_clients() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a, &b], "admin", "").await;
    let addr = lb.sclb.stats_addr().unwrap();
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));
    admin(&lb.sock, "set server be/s1 state maint").await;
    admin(&lb.sock, "set server be/s2 state drain").await;
    let (code, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        body,
        "not ready: frontend fe: no server of backend be takes new clients\n"
    );
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));
    admin(&lb.sock, "set server be/s2 state ready").await;
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));
}

/// `add server` / `del server`, HAProxy's dynamic servers: added in MAINT unless `enabled`,
/// taking traffic once enabled, deleted only in MAINT and idle, and kept across a reload.
#[tokio::test]
async fn add_and_del_server_as_haproxys_dynamic_servers() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let lb = lb(&[&a], "admin", "").await;
    let fe = lb.sclb.local_addrs("fe")[0];
    let added = admin(&lb.sock, &format!("add server be/s2 {} weight 3", b.addr)).await;
    assert!(added.starts_with("New server registered"), "{added}");
    let stat = admin(&lb.sock, "show stat").await;
    assert_eq!(csv_col(&stat, "s2", "status"), "MAINT", "{stat}");
    assert_eq!(csv_col(&stat, "s2", "weight"), "3");
    assert!(
        admin(&lb.sock, &format!("add server be/s2 {}", b.addr))
            .await
            .starts_with("Invalid server name"),
    );
    // Enabled, and the config's server in MAINT: new clients go to the added one.
    assert_eq!(admin(&lb.sock, "enable server be/s2").await, "\n");
    assert_eq!(admin(&lb.sock, "disable server be/s1").await, "\n");
    let (name, _conn) = which_server(2, fe).await;
    assert_eq!(name, "s2");
    assert_eq!(
        admin(&lb.sock, "del server be/s2").await,
        "Invalid server state: Only servers in maintenance mode can be deleted.\n\n"
    );
    assert!(
        admin(&lb.sock, "del server be/s1")
            .await
            .starts_with("Invalid server: only servers added with 'add server'"),
    );
    assert_eq!(admin(&lb.sock, "disable server be/s2").await, "\n");
    // Still carrying a client: refused, as HAProxy.
    assert!(
        admin(&lb.sock, "del server be/s2")
            .await
            .contains("Server still has connections attached to it"),
    );
    drop(_conn);
    let mut deleted = String::new();
    for _ in 0..100 {
        deleted = admin(&lb.sock, "del server be/s2").await;
        if deleted == "Server deleted.\n\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(deleted, "Server deleted.\n\n");
    assert!(!admin(&lb.sock, "show stat").await.contains("be,s2,"));

    // A reload keeps servers added at run time, with their state, and their clients.
    let r = admin(&lb.sock, &format!("add server be/s3 {} enabled", b.addr)).await;
    assert_eq!(r, "New server registered.\n\n");
    // (s3 is added at the address of the process that greets as "s2"; s1 is in MAINT.)
    let (name, _kept) = which_server(3, fe).await;
    assert_eq!(name, "s2");
    let reloaded = admin(&lb.sock, "reload").await;
    assert!(!reloaded.starts_with("Reload failed"), "{reloaded}");
    let stat = admin(&lb.sock, "show stat").await;
    assert_eq!(csv_col(&stat, "s3", "status"), "no check", "{stat}");
    assert_eq!(
        csv_col(&stat, "s3", "scur"),
        "1",
        "its client stays: {stat}"
    );
    let table = admin(&lb.sock, "show table be").await;
    assert!(
        table.contains("key=127.0.0.3") && table.contains("server_key=s3"),
        "the pin to the added server survives the reload: {table}"
    );
}
