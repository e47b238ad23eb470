//! The stats page as an operator sees it: rendered by headless Chromium, with a DOWN server
//! shown as DOWN. The screenshot lands in target/test-artifacts/stats.png.
//!
//! Needs Debian's chromium (`scripts/test` installs it and sets SCLB_REQUIRE_CHROMIUM=1, so
//! that in CI a missing browser fails the test instead of skipping it).

mod common;

use std::time::Duration;

use common::*;

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
}

async fn run_chromium(bin: &str, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1600,700",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes within 60 s")
    .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_page_renders_in_chromium_and_shows_a_down_server_as_down() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("SCLB_REQUIRE_CHROMIUM").is_none(),
            "chromium is required here but not installed"
        );
        eprintln!("SKIPPED: no chromium (apt-get install chromium); scripts/test installs it");
        return;
    };
    let up = Backend::start("sc1").await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let drained = Backend::start("sc3").await;
    let toml = format!(
        r#"
[global]
stats = {{ bind = "127.0.0.1:0", refresh = "60s" }}
[[frontend]]
name = "sparkconnect"
bind = ["127.0.0.1:0"]
backend = "sparkconnect_servers"
[[backend]]
name = "sparkconnect_servers"
stick = {{ on = "src", expire = "2h" }}
check = {{ type = "tcp", inter = "100ms", fall = 1 }}
servers = [
  {{ name = "sc1", addr = "{}" }},
  {{ name = "sc2", addr = "{}" }},
  {{ name = "sc3", addr = "{}" }},
]
"#,
        up.addr, closed, drained.addr
    );
    let sclb = start_sclb(&toml).await;
    let snap = sclb.state().snapshot();
    snap.backends[0].servers[2].set_admin_state(sclb::server::AdminState::Drain);
    which_server(2, sclb.local_addrs("sparkconnect")[0]).await;
    for _ in 0..100 {
        if snap.backends[0].servers[1].status() == "DOWN" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://{}/stats", sclb.stats_addr().unwrap());

    let dom = run_chromium(bin, &url, &["--dump-dom".into()]).await;
    assert!(dom.contains("<title>sclb stats</title>"), "{dom}");
    let row = |name: &str| {
        let start = dom
            .find(&format!("<td class=\"l\">{name}</td>"))
            .unwrap_or_else(|| panic!("no row {name}"));
        dom[start..start + dom[start..].find("</tr>").unwrap()].to_string()
    };
    assert!(
        row("sc2").contains("<td class=\"l down\">DOWN</td>"),
        "{}",
        row("sc2")
    );
    assert!(row("sc2").contains("L4CON"), "{}", row("sc2"));
    assert!(
        row("sc1").contains("<td class=\"l up\">UP</td>"),
        "{}",
        row("sc1")
    );
    assert!(
        row("sc3").contains("<td class=\"l drain\">DRAIN</td>"),
        "{}",
        row("sc3")
    );

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("stats.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(bin, &url, &[format!("--screenshot={}", png.display())]).await;
    let bytes = std::fs::read(&png).expect("screenshot written");
    assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        bytes.len() > 10_000,
        "a real page, not a blank one: {} bytes",
        bytes.len()
    );
}
