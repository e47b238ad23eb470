//! Issue 19, class 8: a reload applies at once, and its log says truthfully what changed and
//! what waits for a restart. On the real binary.

mod realbin;

use std::time::Duration;

use realbin::{SclbProcess, message};

fn config(dir: &std::path::Path, server: std::net::SocketAddr, inter: &str, token: &str) -> String {
    format!(
        r#"
[global]
log = {{ level = "info", format = "json" }}
admin = {{ path = "{}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:0", admin_token = "{token}" }}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
check = {{ type = "tcp", inter = "{inter}", fall = 1, rise = 1, spread = "0%" }}
servers = [ {{ name = "s1", addr = "{server}" }} ]
"#,
        dir.join("admin.sock").display()
    )
}

fn status(p: &SclbProcess) -> String {
    p.admin("show stat")
        .lines()
        .find(|l| l.starts_with("be,s1,"))
        .map(|l| l.split(',').nth(17).unwrap_or("").to_string())
        .unwrap_or_default()
}

#[test]
fn a_shorter_check_interval_applies_at_once_and_the_log_is_true() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let mut p = SclbProcess::start(
        dir.path(),
        &config(dir.path(), server, "1h", "first-token-0123456789"),
        &[],
    );
    p.frontend_addr("fe");
    // The first check (at once with spread 0) finds it UP; the next would come in an hour.
    assert!(p.wait_for(Duration::from_secs(10), |p| {
        p.log_text().contains("\"check_status\"") || status(p) == "UP"
    }));
    std::thread::sleep(Duration::from_millis(500));
    drop(listener);
    std::fs::write(
        &p.config,
        config(dir.path(), server, "200ms", "second-token-0123456789"),
    )
    .unwrap();
    let reply = p.admin("reload");
    assert!(!reply.contains("rror"), "{reply}");
    let down = p.wait_for(Duration::from_secs(5), |p| status(p).starts_with("DOWN"));
    assert!(
        down,
        "the new 200ms interval applied at once: {}",
        status(&p)
    );
    let lines = p.log_lines();
    let said = |needle: &str| lines.iter().any(|l| message(l).contains(needle));
    assert!(
        said("global.stats.admin_token changed and apply now"),
        "{}",
        p.log_text()
    );
    assert!(
        !said("take effect only at the next restart"),
        "{}",
        p.log_text()
    );
}
