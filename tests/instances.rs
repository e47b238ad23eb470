//! Issue 19, class 10: one sclb per config. A second `sclb -c same.toml` refuses to start with a
//! clear message and never takes the first one's ports or admin socket; neither does a second
//! sclb with another config that names the same admin socket or port. The first one goes on
//! serving throughout and its socket is still there.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, binary_config};

const SCLB: &str = env!("CARGO_BIN_EXE_sclb");

fn start(cfg: &Path) -> KillOnDrop {
    KillOnDrop::spawn(
        Command::new(SCLB)
            .arg("-c")
            .arg(cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
}

fn wait_for_socket(sock: &Path) {
    let t0 = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no admin socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn admin(sock: &Path, line: &str) -> String {
    let out = Command::new(SCLB)
        .args(["ctl", "-s"])
        .arg(sock)
        .arg(line)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a second sclb on `cfg` and expects it to refuse within 10 s; its stderr.
fn refused(cfg: &Path) -> String {
    let second = start(cfg);
    let t0 = Instant::now();
    let out = second.wait_with_output();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the second sclb ran: {err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    err
}

#[test]
fn a_second_sclb_never_takes_the_first_ones_config_socket_or_port() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let global = format!("admin = {{ path = \"{}\" }}", sock.display());
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(
        &cfg,
        binary_config(&global, "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let mut first = start(&cfg);
    wait_for_socket(&sock);
    let pid = first.id();

    // 1. The same config (also through another path to it).
    let err = refused(&cfg);
    assert!(
        err.contains(&format!("another sclb (pid {pid}) already runs with")),
        "{err}"
    );
    std::os::unix::fs::symlink(&cfg, dir.path().join("alias.toml")).unwrap();
    let err = refused(&dir.path().join("alias.toml"));
    assert!(err.contains("another sclb"), "{err}");

    // 2. Another config, the same admin socket (another port).
    let other = dir.path().join("other.toml");
    std::fs::write(&other, binary_config(&global, "")).unwrap();
    let err = refused(&other);
    assert!(
        err.contains("admin socket") && err.contains("running process"),
        "{err}"
    );

    // 3. Another config and socket, the same port.
    let other_sock = dir.path().join("other.sock");
    std::fs::write(
        &other,
        binary_config(
            &format!("admin = {{ path = \"{}\" }}", other_sock.display()),
            "",
        )
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let err = refused(&other);
    assert!(err.contains("another process"), "{err}");
    assert!(!other_sock.exists(), "the refused sclb left no socket");

    // The first goes on, its socket in place and answering.
    assert!(first.try_wait().unwrap().is_none());
    assert!(admin(&sock, "show info").contains(&format!("Pid: {pid}")));
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(first.wait().unwrap().success());
    assert!(!sock.exists(), "the first removed its own socket at stop");
    // Free again: a new sclb starts on the config.
    let mut again = start(&cfg);
    wait_for_socket(&sock);
    assert!(again.try_wait().unwrap().is_none());
}

/// A socket some other process put at the admin path after sclb started is not removed by
/// sclb's stop.
#[test]
fn sclb_removes_only_its_own_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("admin.sock");
    let cfg = dir.path().join("sclb.toml");
    let global = format!("admin = {{ path = \"{}\" }}", sock.display());
    std::fs::write(&cfg, binary_config(&global, "")).unwrap();
    let mut first = start(&cfg);
    wait_for_socket(&sock);
    // Someone replaces the socket file (as a second, misconfigured daemon would).
    std::fs::remove_file(&sock).unwrap();
    let theirs = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(first.wait().unwrap().success());
    assert!(sock.exists(), "the other process's socket is left alone");
    drop(theirs);
}
