//! Hot reload and restart: nothing a client has is lost — connections, pins, drains.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use common::*;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// sclb started from the config file at `path`.
async fn start_from(path: &Path) -> sclb::Sclb {
    sclb::Sclb::start(sclb::config::load(path).unwrap())
        .await
        .unwrap()
}

/// sclb started from `<tempdir>/sclb.toml` with servers `(name, addr)` (check inter 1 s).
async fn started_in_tempdir(
    servers: &[(&str, String)],
) -> (tempfile::TempDir, std::path::PathBuf, sclb::Sclb) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    write(&path, &cfg("127.0.0.1:0", servers, "", "1s"));
    let sclb = start_from(&path).await;
    (dir, path, sclb)
}

/// A config file with frontend "fe" on `bind` and servers `(name, addr)` in backend "be".
fn cfg(bind: &str, servers: &[(&str, String)], extra_global: &str, inter: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|(n, a)| format!("{{ name = \"{n}\", addr = \"{a}\" }}"))
        .collect();
    format!(
        r#"
[global]
{extra_global}
[defaults]
check = {{ type = "tcp", inter = "{inter}" }}
[[frontend]]
name = "fe"
bind = ["{bind}"]
backend = "be"
[[backend]]
name = "be"
# The test servers greet first.
tcp_smart_connect = false
stick = {{ on = "src", expire = "2h" }}
servers = [ {} ]
"#,
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_traffic_fail_no_connection_and_move_no_client() {
    let (a, b, c) = (
        Backend::start("s1").await,
        Backend::start("s2").await,
        Backend::start("s3").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let two = [("s1", a.addr.to_string()), ("s2", b.addr.to_string())];
    write(&path, &cfg("127.0.0.1:0", &two, "", "1s"));
    let sclb = start_from(&path).await;
    let fe = sclb.local_addrs("fe")[0];
    let fe_port = fe.port();
    // Pin ten clients before the reloads start.
    let mut pinned = Vec::new();
    for ip in 2..12u8 {
        pinned.push((ip, which_server(ip, fe).await.0));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, moved) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut clients = Vec::new();
    for (ip, server) in pinned.clone() {
        let (stop, ok, failed, moved) = (stop.clone(), ok.clone(), failed.clone(), moved.clone());
        clients.push(tokio::spawn(async move {
            // Bounded: at most 2000 connections per client, or until told to stop.
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = tokio::time::timeout(Duration::from_secs(5), async {
                    let (got, mut conn) = which_server(ip, fe).await;
                    conn.get_mut().write_all(b"ping\n").await?;
                    let mut line = String::new();
                    conn.read_line(&mut line).await?;
                    Ok::<_, std::io::Error>((got, line))
                })
                .await;
                match r {
                    Ok(Ok((got, line))) if line == "ping\n" => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if got != server {
                            moved.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Fifty reloads: add and remove s3, change check intervals, add and remove a frontend.
    let three = [
        ("s1", a.addr.to_string()),
        ("s2", b.addr.to_string()),
        ("s3", c.addr.to_string()),
    ];
    for i in 0..50 {
        let bind = format!("127.0.0.1:{fe_port}");
        let text = if i % 2 == 0 {
            cfg(&bind, &three, "maxconn = 5000", "500ms")
        } else {
            cfg(&bind, &two, "", "1s")
        };
        write(&path, &text);
        let summary = sclb.reload().await.expect("good config reloads");
        assert!(summary.contains("servers +"), "{summary}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed, moved) = (
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        moved.load(Ordering::Relaxed),
    );
    assert!(ok > 100, "traffic flowed during the reloads: {ok}");
    assert_eq!(failed, 0, "failed connections during reloads ({ok} ok)");
    assert_eq!(moved, 0, "clients moved during reloads ({ok} ok)");
    let snap = sclb.state().snapshot();
    assert_eq!(snap.backends[0].repins.count.load(Ordering::Relaxed), 0);
    assert_eq!(sclb.shared().reloads.ok.load(Ordering::Relaxed), 50);
    assert_eq!(
        sclb.local_addrs("fe"),
        vec![fe],
        "the listener kept its socket"
    );
}

/// A reload that changes the stick table's `expire` or `size` builds a new table and carries
/// every pin over, each with the time it had left (cut to the new `expire`).
#[tokio::test]
async fn a_new_stick_expire_or_size_carries_every_pin_over() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let (_dir, path, sclb) =
        started_in_tempdir(&[("s1", a.addr.to_string()), ("s2", b.addr.to_string())]).await;
    let fe = sclb.local_addrs("fe")[0];
    let mut pinned = Vec::new();
    for ip in 2..8u8 {
        pinned.push((ip, which_server(ip, fe).await.0));
    }
    let table = |sclb: &sclb::Sclb| {
        let snap = sclb.state().snapshot();
        snap.backends[0].stick.clone().expect("a stick table")
    };
    let before = table(&sclb).entries();
    assert_eq!(before.len(), pinned.len());

    let text = std::fs::read_to_string(&path).unwrap();
    write(
        &path,
        &text.replace("expire = \"2h\"", "expire = \"30m\", size = 50"),
    );
    sclb.reload().await.unwrap();
    let t = table(&sclb);
    assert_eq!((t.expire(), t.size()), (Duration::from_secs(1800), 50));
    let after = t.entries();
    let keys = |e: &[sclb::stick_table::StickEntry]| -> Vec<(std::net::IpAddr, u64)> {
        e.iter().map(|e| (e.key, e.server.0)).collect()
    };
    assert_eq!(keys(&after), keys(&before), "same pins, same order");
    assert!(
        after
            .iter()
            .all(|e| e.expires_in <= Duration::from_secs(1800))
    );
    for (ip, server) in pinned {
        assert_eq!(
            which_server(ip, fe).await.0,
            server,
            "client {ip} kept its server"
        );
    }
}

#[tokio::test]
async fn a_bad_file_keeps_connections_pins_and_drains_then_a_good_one_applies() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let servers = [("s1", a.addr.to_string()), ("s2", b.addr.to_string())];
    let good = cfg("127.0.0.1:0", &servers, "", "1s");
    write(&path, &good);
    let sclb = start_from(&path).await;
    let fe = sclb.local_addrs("fe")[0];
    let (server, mut live) = which_server(2, fe).await;
    let snap = sclb.state().snapshot();
    let s2 = snap.backends[0].server_by_name("s2").unwrap().clone();
    set_state(&sclb, &s2, sclb::server::AdminState::Drain);

    write(
        &path,
        &good.replace("backend = \"be\"", "backend = \"nope\""),
    );
    let err = sclb.reload().await.unwrap_err();
    assert!(
        err.contains("sclb.toml:") && err.contains("backend \"nope\" is not defined"),
        "{err}"
    );
    assert_eq!(sclb.shared().reloads.failed.load(Ordering::Relaxed), 1);
    // Nothing was lost: the live connection works, the pin holds, the drain holds.
    live.get_mut().write_all(b"still\n").await.unwrap();
    let mut line = String::new();
    live.read_line(&mut line).await.unwrap();
    assert_eq!(line, "still\n");
    assert_eq!(which_server(2, fe).await.0, server);
    assert_eq!(s2.status(), "DRAIN");

    // The next good file applies, and the drain set at runtime survives it.
    write(&path, &good.replace("inter = \"1s\"", "inter = \"2s\""));
    sclb.reload().await.unwrap();
    let snap = sclb.state().snapshot();
    let s2_now = snap.backends[0].server_by_name("s2").unwrap();
    assert!(Arc::ptr_eq(s2_now, &s2), "same server, same live state");
    assert_eq!(s2_now.status(), "DRAIN");
    assert_eq!(s2_now.config().check.inter, Duration::from_secs(2));
    assert!(sclb.shared().reloads.last_error.lock().is_none());
}

#[tokio::test]
async fn a_file_replaced_by_rename_is_picked_up_by_the_watcher() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let (dir, path, sclb) = started_in_tempdir(&[("s1", a.addr.to_string())]).await;
    sclb::reload::watch(sclb.shared().clone(), &path).unwrap();
    // What config-management tools and deploy-server.sh do: write a temp file, rename it over.
    let tmp = dir.path().join(".sclb.toml.XXXX");
    let two = [("s1", a.addr.to_string()), ("s2", b.addr.to_string())];
    write(&tmp, &cfg("127.0.0.1:0", &two, "", "1s"));
    std::fs::rename(&tmp, &path).unwrap();
    wait_for(|| sclb.state().snapshot().backends[0].servers.len() == 2).await;
    // An editor that saves in place: also seen. Touching without a change reloads nothing.
    let reloads = sclb.shared().reloads.ok.load(Ordering::Relaxed);
    assert_eq!(reloads, 1);
    std::fs::write(dir.path().join("unrelated.txt"), "x").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        sclb.shared().reloads.ok.load(Ordering::Relaxed),
        1,
        "same content: no reload"
    );
    write(
        &path,
        &cfg("127.0.0.1:0", &[("s2", b.addr.to_string())], "", "1s"),
    );
    wait_for(|| sclb.state().snapshot().backends[0].servers.len() == 1).await;
}

#[tokio::test]
async fn a_kubernetes_configmap_update_is_picked_up_by_the_watcher() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The layout the kubelet gives a mounted ConfigMap: the file is a symlink through `..data`,
    // and an update swaps `..data` to a new timestamped directory by rename.
    std::fs::create_dir(d.join("..2026_11_21_01")).unwrap();
    let one = [("s1", a.addr.to_string())];
    write(
        &d.join("..2026_11_21_01/sclb.toml"),
        &cfg("127.0.0.1:0", &one, "", "1s"),
    );
    std::os::unix::fs::symlink("..2026_11_21_01", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sclb.toml", d.join("sclb.toml")).unwrap();
    let path = d.join("sclb.toml");
    let sclb = start_from(&path).await;
    sclb::reload::watch(sclb.shared().clone(), &path).unwrap();
    std::fs::create_dir(d.join("..2026_11_21_02")).unwrap();
    let two = [("s1", a.addr.to_string()), ("s2", b.addr.to_string())];
    write(
        &d.join("..2026_11_21_02/sclb.toml"),
        &cfg("127.0.0.1:0", &two, "", "1s"),
    );
    std::os::unix::fs::symlink("..2026_11_21_02", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    wait_for(|| sclb.state().snapshot().backends[0].servers.len() == 2).await;
    assert_eq!(sclb.shared().reloads.ok.load(Ordering::Relaxed), 1);
}

/// sclb must not keep reading its config file while nothing changes: not because it read the
/// file itself, not because other files in the directory (logs, a state file) are written.
#[tokio::test]
async fn the_watcher_does_not_reread_the_file_while_it_does_not_change() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let a = Backend::start("s1").await;
    let (dir, path, sclb) = started_in_tempdir(&[("s1", a.addr.to_string())]).await;
    // Every open of the config file, by anyone, from here on (closes too: inotify folds an
    // event into the one before it when both are the same).
    let opens = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    opens
        .add_watch(&path, AddWatchFlags::IN_OPEN | AddWatchFlags::IN_CLOSE)
        .unwrap();
    sclb::reload::watch(sclb.shared().clone(), &path).unwrap();
    let busy = dir.path().join("sclb.log");
    for i in 0..50 {
        std::fs::write(&busy, format!("line {i}\n")).unwrap();
        let _ = std::fs::read(&busy).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let events: Vec<_> = (opens.read_events().unwrap_or_default().into_iter())
        .filter(|e| e.mask.contains(AddWatchFlags::IN_OPEN))
        .collect();
    assert_eq!(
        events.len(),
        1,
        "only the watcher's first read (its baseline) opens the file: {events:?}"
    );
    // And a change is still seen.
    write(
        &path,
        &cfg("127.0.0.1:0", &[("s1", a.addr.to_string())], "", "2s"),
    );
    wait_for(|| sclb.shared().reloads.ok.load(Ordering::Relaxed) == 1).await;
}

#[tokio::test]
async fn a_removed_server_drains_its_live_connections_then_disappears() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let two = [("s1", a.addr.to_string()), ("s2", b.addr.to_string())];
    write(&path, &cfg("127.0.0.1:0", &two, "", "1s"));
    let sclb = start_from(&path).await;
    let fe = sclb.local_addrs("fe")[0];
    let mut on_s2 = None;
    for ip in 2..10 {
        let (s, conn) = which_server(ip, fe).await;
        if s == "s2" {
            on_s2 = Some((ip, conn));
            break;
        }
    }
    let (ip, mut conn) = on_s2.expect("roundrobin reaches s2");
    write(
        &path,
        &cfg("127.0.0.1:0", &[("s1", a.addr.to_string())], "", "1s"),
    );
    sclb.reload().await.unwrap();
    let stats = sclb::stats::Snapshot::take(sclb.shared());
    let s2 = stats.backends[0]
        .servers
        .iter()
        .find(|s| s.name == "s2")
        .expect("still shown while draining");
    assert_eq!(s2.status.to_string(), "DRAIN (removed)");
    assert_eq!(s2.counters.scur, 1);
    // Its live connection goes on...
    conn.get_mut().write_all(b"on\n").await.unwrap();
    let mut line = String::new();
    conn.read_line(&mut line).await.unwrap();
    assert_eq!(line, "on\n");
    // ...its client's next connection goes to a server that exists...
    assert_eq!(which_server(ip, fe).await.0, "s1");
    // ...and once its last connection ends it is gone.
    drop(conn);
    wait_for(|| {
        !sclb::stats::Snapshot::take(sclb.shared()).backends[0]
            .servers
            .iter()
            .any(|s| s.name == "s2")
    })
    .await;
}

#[tokio::test]
async fn restart_with_a_state_file_keeps_every_pin_and_drain() {
    let (a, b) = (Backend::start("s1").await, Backend::start("s2").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let state = dir.path().join("state.json");
    let servers = [("s1", a.addr.to_string()), ("s2", b.addr.to_string())];
    let text = cfg(
        "127.0.0.1:0",
        &servers,
        &format!("state_file = \"{}\"", state.display()),
        "1s",
    );
    write(&path, &text);
    let first = start_from(&path).await;
    let fe = first.local_addrs("fe")[0];
    let mut pins = Vec::new();
    for ip in 2..8u8 {
        pins.push((ip, which_server(ip, fe).await.0));
    }
    let snap = first.state().snapshot();
    let s2 = snap.backends[0].server_by_name("s2").unwrap();
    set_state(&first, s2, sclb::server::AdminState::Drain);
    assert_eq!(first.shutdown(Duration::from_secs(5)).await, 0);
    assert!(state.exists(), "state written on stop");

    // A new process (here: a new instance) on a new port.
    let second = start_from(&path).await;
    let fe = second.local_addrs("fe")[0];
    let snap = second.state().snapshot();
    assert_eq!(
        snap.backends[0].server_by_name("s2").unwrap().status(),
        "DRAIN"
    );
    assert_eq!(snap.backends[0].stick.as_ref().unwrap().len(), 6);
    for (ip, server) in pins {
        assert_eq!(
            which_server(ip, fe).await.0,
            server,
            "127.0.0.{ip} kept its server"
        );
    }
}

#[tokio::test]
async fn a_corrupt_state_file_is_reported_and_ignored() {
    let a = Backend::start("s1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let state = dir.path().join("state.json");
    std::fs::write(&state, "{ not json").unwrap();
    write(
        &path,
        &cfg(
            "127.0.0.1:0",
            &[("s1", a.addr.to_string())],
            &format!("state_file = \"{}\"", state.display()),
            "1s",
        ),
    );
    let sclb = start_from(&path).await;
    assert_eq!(which_server(2, sclb.local_addrs("fe")[0]).await.0, "s1");
    assert!(sclb::state_file::read(&state).is_none());
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 5 s");
}

#[tokio::test]
async fn pins_and_drains_of_discovered_servers_come_back_once_discovery_lists_them() {
    use sclb::discovery::{Discovered, Update};
    use sclb::server::AdminState;
    let (a, pod) = (Backend::start("s1").await, Backend::start("pod-a").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let state = dir.path().join("state.json");
    write(
        &path,
        &cfg(
            "127.0.0.1:0",
            &[("s1", a.addr.to_string())],
            &format!("state_file = \"{}\"", state.display()),
            "1s",
        ),
    );
    let discovered = || {
        Update::Reset(vec![Discovered {
            name: "pod-a".into(),
            uid: "uid-1".into(),
            addr: pod.addr,
            draining: false,
        }])
    };
    let first = start_from(&path).await;
    discovery_update(&first, "be", discovered());
    let snap = first.state().snapshot();
    let s1 = snap.backends[0].server_by_name("s1").unwrap().clone();
    set_state(&first, &s1, AdminState::Maint);
    assert_eq!(which_server(2, first.local_addrs("fe")[0]).await.0, "pod-a");
    set_state(&first, &s1, AdminState::Ready);
    let snap = first.state().snapshot();
    let pod_a = snap.backends[0].server_by_name("pod-a").unwrap();
    set_state(&first, pod_a, AdminState::Drain);
    first.shutdown(Duration::from_secs(5)).await;

    // Restart: the state file is read before discovery has listed anything...
    let second = start_from(&path).await;
    assert!(
        second.state().snapshot().backends[0]
            .server_by_name("pod-a")
            .is_none()
    );
    // ...and applied when it does.
    discovery_update(&second, "be", discovered());
    let snap = second.state().snapshot();
    assert_eq!(
        snap.backends[0].server_by_name("pod-a").unwrap().status(),
        "DRAIN"
    );
    assert_eq!(
        which_server(2, second.local_addrs("fe")[0]).await.0,
        "pod-a"
    );
}

/// Discovery's drain (a terminating pod) and the operator's drain are separate flags, as
/// HAProxy keeps one per source: neither undoes the other, and the state file keeps only the
/// operator's word. (With one shared flag, the operator's `ready` on a terminating pod held
/// until the next discovery refresh, a pod that served again stayed DRAIN for ever, and a
/// restart restored discovery's drain as if the operator had set it.)
#[tokio::test]
async fn discovery_drain_and_operator_drain_are_separate_sources() {
    use sclb::discovery::{Discovered, Update};
    let (a, pod) = (Backend::start("s1").await, Backend::start("pod-a").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sclb.toml");
    let state = dir.path().join("state.json");
    let sock = dir.path().join("admin.sock");
    let global = format!(
        "state_file = \"{}\"\nadmin = {{ path = \"{}\" }}",
        state.display(),
        sock.display()
    );
    write(
        &path,
        &cfg("127.0.0.1:0", &[("s1", a.addr.to_string())], &global, "1s"),
    );
    let pod_a = |draining| {
        Update::Reset(vec![Discovered {
            name: "pod-a".into(),
            uid: "uid-1".into(),
            addr: pod.addr,
            draining,
        }])
    };
    let status = |sclb: &sclb::Sclb| {
        let snap = sclb.state().snapshot();
        let server = snap.backends[0].server_by_name("pod-a").unwrap().clone();
        server.admin_state().word()
    };
    let first = start_from(&path).await;

    // The pod terminates: discovery drains it. The operator's "ready" cannot override the
    // orchestrator, and says so; the next discovery refresh changes nothing.
    discovery_update(&first, "be", pod_a(true));
    assert_eq!(status(&first), "DRAIN");
    // `show servers state` has HAProxy's srv_admin_state bits: 0x10, drained by discovery.
    let admin_bits = |text: String| {
        let line = text
            .lines()
            .find(|l| l.contains(" pod-a "))
            .unwrap()
            .to_string();
        line.split_whitespace().nth(6).unwrap().to_string()
    };
    assert_eq!(
        admin_bits(admin(&sock, "show servers state be").await),
        "16"
    );
    let reply = admin(&sock, "set server be/pod-a state ready").await;
    assert!(reply.contains("stays DRAIN"), "{reply:?}");
    assert_eq!(status(&first), "DRAIN");
    discovery_update(&first, "be", pod_a(true));
    assert_eq!(status(&first), "DRAIN");

    // The endpoint serves again: discovery's drain goes, and with it the DRAIN.
    discovery_update(&first, "be", pod_a(false));
    assert_eq!(status(&first), "READY", "discovery's drain was lifted");

    // The operator drains it; discovery's updates, draining or not, leave that alone.
    assert_eq!(admin(&sock, "set server be/pod-a state drain").await, "\n");
    discovery_update(&first, "be", pod_a(true));
    discovery_update(&first, "be", pod_a(false));
    assert_eq!(status(&first), "DRAIN", "the operator's drain stays");
    let flags = |sclb: &sclb::Sclb| {
        let snap = sclb.state().snapshot();
        let flags = snap.backends[0]
            .server_by_name("pod-a")
            .unwrap()
            .admin_flags();
        flags.bits()
    };
    assert_eq!(flags(&first), sclb::server::AdminFlags::FORCED_DRAIN);
    assert_eq!(admin_bits(admin(&sock, "show servers state be").await), "8");

    // Back to ready by the operator, then the pod terminates again before a restart: the
    // state file keeps the operator's "ready", not discovery's drain.
    assert_eq!(admin(&sock, "set server be/pod-a state ready").await, "\n");
    discovery_update(&first, "be", pod_a(true));
    assert_eq!(status(&first), "DRAIN");
    first.shutdown(Duration::from_secs(5)).await;
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        saved.contains(r#""name":"pod-a""#) && !saved.contains(r#""admin":"drain""#),
        "{saved}"
    );

    // Restarted, with the same endpoint serving: READY, because nobody drains it now.
    let second = start_from(&path).await;
    discovery_update(&second, "be", pod_a(false));
    assert_eq!(status(&second), "READY");
}
