//! The `sclb` binary as an operator runs it.

mod common;

use std::process::{Command, Stdio};

use common::{KillOnDrop, binary_config};
use std::time::{Duration, Instant};

const SCLB: &str = env!("CARGO_BIN_EXE_sclb");

#[test]
fn version() {
    let out = Command::new(SCLB).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("sclb {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_accepts_a_good_config_and_lists_every_error_of_a_bad_one() {
    let ok = Command::new(SCLB)
        .args(["check", "-c", "conf/local.toml"])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK"));

    let bad = Command::new(SCLB)
        .args([
            "check",
            "-c",
            "tests/fixtures/config/invalid/everything_at_once.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("everything_at_once.toml:2:1: global.maxcon: unknown key"),
        "{err}"
    );
    assert!(err.contains("15 error(s)"), "{err}");

    let missing = Command::new(SCLB)
        .args(["check", "-c", "/nonexistent/sclb.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("cannot read /nonexistent/sclb.toml")
    );
}

/// A warm pool whose drivers would wait in a namespace the backend's discovery does not watch
/// (it would create drivers it never sees Ready, without end) is refused, per team, with the
/// file, line and field.
#[test]
fn check_refuses_a_pool_in_a_namespace_discovery_does_not_watch() {
    let bad = Command::new(SCLB)
        .args([
            "check",
            "-c",
            "tests/fixtures/config/invalid/pool_unwatched.toml",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    for (line, team, ns) in [
        (8, "ml/prod", "sjns-ml-prod"),
        (15, "web/dev", "sjns-web-dev"),
    ] {
        let want = format!(
            "frontend[{}].on_demand.pool.teams: the drivers of {team} would wait in namespace \"{ns}\", which backend \"drivers\" does not watch",
            if line == 8 { 0 } else { 1 }
        );
        assert!(
            err.lines()
                .any(|l| l.contains(&format!("pool_unwatched.toml:{line}:")) && l.contains(&want)),
            "{err}"
        );
    }
    assert!(
        !err.contains("data/dev") && !err.contains("ml/dev"),
        "{err}"
    );
    assert!(err.contains("2 error(s)"), "{err}");
}

#[test]
fn runs_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(&cfg, binary_config("", "")).unwrap();
    let mut child = KillOnDrop::spawn(
        Command::new(SCLB)
            .arg("-c")
            .arg(&cfg)
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "sclb exited early");
    let pid = child.id() as i32;
    // SAFETY-free: kill(1) via the shell keeps the test crate free of unsafe.
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let out = child.wait_with_output();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("listening"), "{log}");
    assert!(log.contains("SIGTERM: stopping gracefully"), "{log}");
}

#[test]
fn tells_systemd_ready_reloading_and_stopping_and_reloads_on_sighup() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cfg = dir.path().join("sclb.toml");
    let text = |servers: &str| binary_config("", servers);
    std::fs::write(&cfg, text(r#"{ name = "s", addr = "127.0.0.1:1" }"#)).unwrap();
    let child = KillOnDrop::spawn(
        Command::new(SCLB)
            .arg("-c")
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &notify)
            .stderr(Stdio::piped()),
    );
    let recv = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1");
    std::fs::write(
        &cfg,
        text(r#"{ name = "s", addr = "127.0.0.1:1" }, { name = "t", addr = "127.0.0.1:2" }"#),
    )
    .unwrap();
    let pid = child.id().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    // The file watcher may see the change first; either way systemd hears about SIGHUP's.
    let reloading = recv();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert_eq!(recv(), "READY=1");
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert_eq!(recv(), "STOPPING=1");
    let out = child.wait_with_output();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("SIGHUP: reloading"), "{log}");
    // Whichever reload saw the new file first (watcher or SIGHUP) added server t.
    assert!(
        log.contains("reloaded: frontends +0 -0 ~0, backends +0 -0 ~1, servers +1 -0 ~0"),
        "{log}"
    );
}

fn proc_status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap()
}

#[test]
fn drops_root_after_binding_and_owns_its_admin_socket_as_configured() {
    if !nix::unistd::getuid().is_root() {
        eprintln!("SKIPPED: needs root to switch users");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The socket's directory must let the unprivileged process remove the socket at stop.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let sock = dir.path().join("admin.sock");
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(
        &cfg,
        binary_config(
            &format!("user = \"nobody\"\nadmin = {{ path = \"{}\", mode = \"0660\", user = \"nobody\" }}", sock.display()),
            "",
        ),
    )
    .unwrap();
    let mut child = KillOnDrop::spawn(
        Command::new(SCLB)
            .arg("-c")
            .arg(&cfg)
            .stderr(Stdio::piped()),
    );
    let pid = child.id();
    let t0 = Instant::now();
    let want = format!("{0}\t{0}\t{0}\t{0}", nobody.uid);
    while proc_status_field(pid, "Uid") != want {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still {}",
            proc_status_field(pid, "Uid")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proc_status_field(pid, "Groups"), nobody.gid.to_string());
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    assert_eq!(meta.mode() & 0o777, 0o660);
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("dropped root privileges"), "{log}");
    assert!(!sock.exists(), "removed its socket as nobody");
}

#[test]
fn maxconn_is_capped_to_what_the_fd_limit_holds() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no prlimit (util-linux)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(
        &cfg,
        binary_config(
            &format!(
                "maxconn = 20000\nadmin = {{ path = \"{}\" }}",
                sock.display()
            ),
            "",
        ),
    )
    .unwrap();
    // Soft and hard limit 256: sclb cannot raise it, so it must lower maxconn.
    let mut child = KillOnDrop::spawn(
        Command::new("prlimit")
            .args(["--nofile=256:256", "--"])
            .arg(SCLB)
            .arg("-c")
            .arg(&cfg)
            .stderr(Stdio::piped()),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no admin socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(SCLB)
        .args(["ctl", "-s"])
        .arg(&sock)
        .arg("show info")
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout).to_string();
    let maxconn: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("Maxconn: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        maxconn < 128,
        "two descriptors per connection fit under 256: {maxconn}"
    );
    assert!(maxconn > 16, "{maxconn}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(
        log.contains(&format!("global.maxconn 20000 lowered to {maxconn}")),
        "{log}"
    );
}

/// A state-file path that is not a regular file is refused by `sclb check` and at start, with
/// the file, line and field, instead of hanging the start on a FIFO or writing through a link.
#[test]
fn a_state_file_that_is_not_a_regular_file_is_refused_at_check_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("state.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let link = dir.path().join("state.link");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    for (path, what) in [(&fifo, "not a regular file"), (&link, "symbolic link")] {
        let conf = dir.path().join("sclb.toml");
        let global = format!("state_file = \"{}\"", path.display());
        std::fs::write(&conf, binary_config(&global, "")).unwrap();
        for args in [vec!["check", "-c"], vec!["-c"]] {
            let child = KillOnDrop::spawn(
                Command::new(SCLB)
                    .args(&args)
                    .arg(&conf)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            );
            let started = Instant::now();
            let out = child.wait_with_output();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} {}: {err}", path.display());
            assert!(
                err.contains("sclb.toml:3:")
                    && err.contains("global.state_file")
                    && err.contains(what),
                "{args:?}: {err}"
            );
            eprintln!("{args:?} refused in {:?}", started.elapsed());
        }
    }
}

/// `sclb ctl "wait <t> srv-removable ..."` waits as long as the wait asks, not the client's
/// reply timeout (the README's drain runbook waits hours); and a ctl whose sclb goes away
/// before answering exits non-zero.
#[test]
fn ctl_waits_as_long_as_the_wait_and_fails_when_sclb_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let cfg = dir.path().join("sclb.toml");
    let global = format!("admin = {{ path = \"{}\" }}", sock.display());
    std::fs::write(&cfg, binary_config(&global, "")).unwrap();
    let mut child = KillOnDrop::spawn(Command::new(SCLB).arg("-c").arg(&cfg).stderr(Stdio::null()));
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no admin socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server stays READY, so the wait ends on its own 2 s timeout — past ctl's -t 1.
    let out = Command::new(SCLB)
        .args(["ctl", "-t", "1", "-s"])
        .arg(&sock)
        .arg("wait 2s srv-removable b/s")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("Timeout waiting for b/s"), "{text}");

    // sclb stops while a wait is pending: ctl says so and exits 2.
    let waiting = KillOnDrop::spawn(
        Command::new(SCLB)
            .args(["ctl", "-s"])
            .arg(&sock)
            .arg("wait 60s srv-removable b/s")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let out = waiting.wait_with_output();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
