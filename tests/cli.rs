//! The `sclb` binary as an operator runs it.

use std::process::{Command, Stdio};
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

#[test]
fn runs_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(
        &cfg,
        r#"
[[frontend]]
name = "f"
bind = ["127.0.0.1:0"]
backend = "b"
[[backend]]
name = "b"
check = { type = "none" }
servers = [ { name = "s", addr = "127.0.0.1:1" } ]
"#,
    )
    .unwrap();
    let mut child = Command::new(SCLB)
        .arg("-c")
        .arg(&cfg)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("listening"), "{log}");
    assert!(log.contains("SIGTERM: stopping gracefully"), "{log}");
}
