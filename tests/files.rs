//! Issue 19, class 9 (with tests/cli.rs's state-file test): files handled as a careful daemon
//! handles them. A config, state file or admin socket path sclb could not use is refused at
//! `sclb check` and at start, at once and clearly, never by hanging; and SIGTERM during
//! start-up stops sclb.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{KillOnDrop, binary_config};

const SCLB: &str = env!("CARGO_BIN_EXE_sclb");

/// Runs `sclb <args> <config>`; asserts it fails within 5 s with `what` in its stderr.
fn refused(args: &[&str], config: &std::path::Path, what: &str) {
    let child = KillOnDrop::spawn(
        Command::new(SCLB)
            .args(args)
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let t0 = Instant::now();
    let out = child.wait_with_output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?}: {err}");
    assert!(err.contains(what), "{args:?}: wanted {what:?} in {err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[test]
fn a_config_that_is_a_fifo_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("sclb.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    refused(&["check", "-c"], &fifo, "not a regular file");
    refused(&["-c"], &fifo, "not a regular file");
}

#[test]
fn paths_sclb_could_not_use_are_refused_by_check_and_start() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    // (global, what the error says, whether `sclb check` sees it: a missing directory is
    // only known at start, systemd creates RuntimeDirectory and StateDirectory then).
    let cases = [
        (
            "state_file = \"/dev/null\"".to_string(),
            "not a regular file",
            true,
        ),
        (
            format!("state_file = \"{}\"", missing.join("state.json").display()),
            "no-such-dir",
            false,
        ),
        (
            format!(
                "admin = {{ path = \"{}\" }}",
                missing.join("a.sock").display()
            ),
            "no-such-dir",
            false,
        ),
        (
            format!(
                "admin = {{ path = \"{}/{}\" }}",
                dir.path().display(),
                "s".repeat(120)
            ),
            "at most",
            true,
        ),
    ];
    for (global, what, at_check) in cases {
        let cfg = dir.path().join("sclb.toml");
        std::fs::write(&cfg, binary_config(&global, "")).unwrap();
        if at_check {
            refused(&["check", "-c"], &cfg, what);
        }
        refused(&["-c"], &cfg, what);
    }
}

#[test]
fn sigterm_during_start_up_stops_sclb() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sclb.toml");
    std::fs::write(&cfg, binary_config("", "")).unwrap();
    for delay_ms in [0, 5, 20, 50] {
        let mut child = KillOnDrop::spawn(
            Command::new(SCLB)
                .arg("-c")
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        std::thread::sleep(Duration::from_millis(delay_ms));
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let t0 = Instant::now();
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "SIGTERM {delay_ms} ms into start-up was not honoured"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
