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

/// Headless, quiet, alone: no sandbox (tests may run as root), no network of its own.
const CHROMIUM_FLAGS: [&str; 11] = [
    "--disable-breakpad",
    "--disable-crash-reporter",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
];

async fn run_chromium(bin: &str, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin)
            .args(CHROMIUM_FLAGS)
            .arg("--window-size=1600,700")
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
# The test servers greet first.
tcp_smart_connect = false
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
    set_state(
        &sclb,
        &snap.backends[0].servers[2],
        sclb::server::AdminState::Drain,
    );
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

/// A minimal HTTP/1.1 client: `headers` are whole lines (`Origin: ...`).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("reply in time")
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

const TOKEN: &str = "stats-page-token-0123456789";

/// Three servers with checks that stay as forced (the first at once, the next in an hour).
fn actions_config(servers: &[&Backend], global_extra: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|b| format!("{{ name = \"{}\", addr = \"{}\" }}", b.name, b.addr))
        .collect();
    format!(
        r#"
[global]
stats = {{ bind = "127.0.0.1:0", refresh = "60s", admin_token = "{TOKEN}" }}
{global_extra}
[[frontend]]
name = "sparkconnect"
bind = ["127.0.0.1:0"]
backend = "sparkconnect_servers"
[[backend]]
name = "sparkconnect_servers"
# The test servers greet first.
tcp_smart_connect = false
stick = {{ on = "src", expire = "2h" }}
check = {{ type = "tcp", inter = "1h", spread = "0%", init_state = "fully-up" }}
servers = [ {} ]
"#,
        servers.join(", ")
    )
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within 20 s");
}

fn server(sclb: &sclb::Sclb, name: &str) -> std::sync::Arc<sclb::server::Server> {
    sclb.state().snapshot().backends[0]
        .server_by_name(name)
        .unwrap()
        .clone()
}

/// The page's actions over HTTP as a script would send them: HAProxy's form fields, the
/// token, refusals that name what is wrong, and the change in the state file on answer.
#[tokio::test]
async fn actions_need_the_token_refuse_other_sites_and_are_saved_before_the_answer() {
    let (a, b) = (Backend::start("sc1").await, Backend::start("sc2").await);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let sclb = start_sclb(&actions_config(
        &[&a, &b],
        &format!("state_file = \"{}\"", state.display()),
    ))
    .await;
    let addr = sclb.stats_addr().unwrap();
    let auth = format!("Authorization: Bearer {TOKEN}");
    let form = "b=sparkconnect_servers&s=sc1&s=sc2&action=maint";

    let (code, page) = http(addr, "GET", "/stats", &[], "").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("<input type=\"checkbox\" class=\"sel\" value=\"sc1\""),
        "{page}"
    );
    assert!(page.contains("<button type=\"button\" data-action=\"hdown\">Health DOWN</button>"));
    let (code, js) = http(addr, "GET", "/stats.js", &[], "").await;
    assert_eq!(code, 200);
    assert!(js.contains("sessionStorage"), "{js}");

    for (headers, want) in [
        (vec![], (401, "Permission denied\n")),
        (
            vec!["Authorization: Bearer wrong-token-wrong-token"],
            (401, "Permission denied\n"),
        ),
        (
            vec![auth.as_str(), "Origin: http://evil.example"],
            (
                403,
                "Cross-site request refused: Origin \"http://evil.example\" is not this listener",
            ),
        ),
        (
            vec![auth.as_str(), "Sec-Fetch-Site: cross-site"],
            (
                403,
                "Cross-site request refused: Sec-Fetch-Site is \"cross-site\"\n",
            ),
        ),
    ] {
        let (code, body) = http(addr, "POST", "/stats", &headers, form).await;
        assert_eq!(code, want.0, "{headers:?}: {body}");
        assert!(body.starts_with(want.1), "{headers:?}: {body}");
    }
    for (body, want) in [
        (
            "b=sparkconnect_servers&s=sc1&action=nuke",
            "field 'action': \"nuke\" is not one of ready, drain, maint, hrunn, hnolb, hdown, shutdown\n",
        ),
        (
            "b=sparkconnect_servers&action=maint",
            "field 's': no server ticked\n",
        ),
        (
            "b=sparkconnect_servers&s=sc1&s=sc9&action=maint",
            "field 's': no server \"sc9\" in backend sparkconnect_servers\n",
        ),
        (
            "b=nope&s=sc1&action=maint",
            "field 'b': no backend \"nope\"\n",
        ),
    ] {
        assert_eq!(
            http(addr, "POST", "/stats", &[&auth], body).await,
            (400, want.to_string()),
            "{body}"
        );
    }
    assert_eq!(
        server(&sclb, "sc1").status(),
        "UP",
        "nothing applied when one server is unknown"
    );

    // What the page's script sends, from the page itself.
    let origin = format!("Origin: http://{addr}");
    let (code, body) = http(
        addr,
        "POST",
        "/stats",
        &[&auth, &origin, "Sec-Fetch-Site: same-origin"],
        form,
    )
    .await;
    assert_eq!(
        (code, body.as_str()),
        (
            200,
            "sparkconnect_servers/sc1: MAINT done\nsparkconnect_servers/sc2: MAINT done\n"
        )
    );
    let saved = sclb::state_file::read(&state).expect("state file written before the answer");
    let admin: Vec<(String, String)> = saved.backends["sparkconnect_servers"]
        .servers
        .iter()
        .map(|s| (s.name.clone(), s.admin.clone()))
        .collect();
    assert_eq!(
        admin,
        [
            ("sc1".into(), "maint".into()),
            ("sc2".into(), "maint".into())
        ]
    );
    let (_, csv) = http(addr, "GET", "/stats;csv", &[], "").await;
    assert_eq!(csv.matches(",MAINT,").count(), 2, "{csv}");
}

/// Without an `admin_token` the page has no actions and `POST /stats` refuses.
#[tokio::test]
async fn without_a_token_the_page_has_no_actions() {
    let a = Backend::start("sc1").await;
    let sclb =
        start_sclb(&actions_config(&[&a], "").replace(&format!(", admin_token = \"{TOKEN}\""), ""))
            .await;
    let addr = sclb.stats_addr().unwrap();
    let (code, page) = http(addr, "GET", "/stats", &[], "").await;
    assert_eq!(code, 200);
    for no in ["<input", "<button", "<script", "Admin token"] {
        assert!(!page.contains(no), "{no} in {page}");
    }
    let (code, body) = http(
        addr,
        "POST",
        "/stats",
        &[&format!("Authorization: Bearer {TOKEN}")],
        "b=sparkconnect_servers&s=sc1&action=maint",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("set global.stats.admin_token"), "{body}");
    assert_eq!(server(&sclb, "sc1").status(), "UP");
}

/// Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// JSON messages ending in NUL, commands on its fd 3, answers on its fd 4), so that the test
/// clicks and types as an operator does. Confirm dialogs are accepted as they open.
struct Browser {
    child: tokio::process::Child,
    to: tokio::process::ChildStdin,
    from: tokio::io::BufReader<tokio::process::ChildStdout>,
    next_id: u64,
    session: Option<String>,
    /// The texts of the dialogs accepted so far.
    dialogs: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(bin: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        // `sh` moves the pipes to fds 3 and 4 and then becomes chromium (same PID).
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 </dev/null >/dev/null")
            .arg(bin)
            .args(CHROMIUM_FLAGS)
            .args(["--remote-debugging-pipe", "--window-size=1280,900"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let to = child.stdin.take().unwrap();
        let from = tokio::io::BufReader::new(child.stdout.take().unwrap());
        Browser {
            child,
            to,
            from,
            next_id: 0,
            session: None,
            dialogs: Vec::new(),
            _profile: profile,
        }
    }

    async fn write(&mut self, msg: serde_json::Value) {
        use tokio::io::AsyncWriteExt;
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to.write_all(&bytes).await.expect("chromium reads");
    }

    /// Sends a command (to the page once attached) and waits for its answer.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use tokio::io::AsyncBufReadExt;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        self.write(msg).await;
        loop {
            let mut buf = Vec::new();
            let n =
                tokio::time::timeout(Duration::from_secs(30), self.from.read_until(0, &mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("chromium answers {method} within 30 s"))
                    .unwrap();
            assert!(n > 0, "chromium closed the pipe during {method}");
            buf.pop();
            let m: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            if m["method"] == "Page.javascriptDialogOpening" {
                self.dialogs
                    .push(m["params"]["message"].as_str().unwrap_or("").into());
                self.next_id += 1;
                let accept = serde_json::json!({
                    "id": self.next_id,
                    "method": "Page.handleJavaScriptDialog",
                    "params": { "accept": true },
                    "sessionId": m["sessionId"],
                });
                self.write(accept).await;
            } else if m["id"] == id {
                assert!(m["error"].is_null(), "{method}: {m}");
                return m["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab of 1280 px and attaches to it.
    async fn open(&mut self, url: &str) {
        let t = self
            .call(
                "Target.createTarget",
                serde_json::json!({ "url": "about:blank" }),
            )
            .await;
        let a = self
            .call(
                "Target.attachToTarget",
                serde_json::json!({ "targetId": t["targetId"], "flatten": true }),
            )
            .await;
        self.session = Some(a["sessionId"].as_str().unwrap().into());
        self.call("Page.enable", serde_json::json!({})).await;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            serde_json::json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        )
        .await;
        self.call("Page.navigate", serde_json::json!({ "url": url }))
            .await;
    }

    async fn eval(&mut self, js: &str) -> serde_json::Value {
        let r = self.try_eval(js).await;
        r.unwrap_or_else(|e| panic!("{js}: {e}"))
    }

    /// `js`'s value, or its exception (e.g. while the page reloads).
    async fn try_eval(&mut self, js: &str) -> Result<serde_json::Value, serde_json::Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({ "expression": js, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        match r["exceptionDetails"].is_null() {
            true => Ok(r["result"]["value"].clone()),
            false => Err(r["exceptionDetails"].clone()),
        }
    }

    /// Waits until the page's script has run and `js` is true in the page (across reloads).
    async fn wait(&mut self, what: &str, js: &str) {
        let js = format!("document.body.hasAttribute('data-actions-ready') && ({js})");
        for _ in 0..400 {
            if self.try_eval(&js).await == Ok(serde_json::Value::Bool(true)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "{what}: not within 20 s; the page says {}",
            self.result().await
        );
    }

    /// A left click in the middle of the element, as a mouse does it.
    async fn click(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null; \
             e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            sel = serde_json::Value::from(selector)
        );
        let at = self.eval(&js).await;
        let (x, y) = (
            at[0]
                .as_f64()
                .unwrap_or_else(|| panic!("no {selector} on the page")),
            at[1].as_f64().unwrap(),
        );
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                serde_json::json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await;
        }
    }

    async fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", serde_json::json!({ "text": text }))
            .await;
    }

    /// What the page's result line says.
    async fn result(&mut self) -> String {
        self.eval("(document.getElementById('result') || {}).textContent || ''")
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn screenshot(&mut self, path: &std::path::Path) {
        use base64::Engine;
        let shot = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// Closes the browser and waits for it; killed (by its PID) if it does not go.
    async fn close(mut self) {
        self.session = None;
        self.next_id += 1;
        let close =
            serde_json::json!({ "id": self.next_id, "method": "Browser.close", "params": {} });
        self.write(close).await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

/// The text of a server's Status cell.
fn status_js(server: &str) -> String {
    format!(
        "(() => {{ const c = document.querySelector('input.sel[value=\"{server}\"]'); \
         return c ? c.closest('tr').children[3].textContent : null; }})()"
    )
}

/// An operator drives the actions with the mouse: ticks servers, presses buttons, sees the
/// result on the page; sclb's servers change as they asked.
#[tokio::test]
async fn an_operator_ticks_servers_and_presses_the_buttons_in_chromium() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("SCLB_REQUIRE_CHROMIUM").is_none(),
            "chromium is required here but not installed"
        );
        eprintln!("SKIPPED: no chromium (apt-get install chromium); scripts/test installs it");
        return;
    };
    let (a, b, c) = (
        Backend::start("sc1").await,
        Backend::start("sc2").await,
        Backend::start("sc3").await,
    );
    // A fourth that refuses connections: the longest check text a page shows.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = actions_config(&[&a, &b, &c], "").replace(
        "servers = [ ",
        &format!("servers = [ {{ name = \"sc4-refuses-connections\", addr = \"{closed}\" }}, "),
    );
    let sclb = start_sclb(&toml).await;
    let sc4 = server(&sclb, "sc4-refuses-connections");
    wait_for("sc4 checked", || {
        !sc4.health.last().status.is_ok()
            && sc4.health.last().status != sclb::server::CheckStatus::Init
    })
    .await;
    for name in ["sc1", "sc2", "sc3"] {
        let s = server(&sclb, name);
        wait_for(&format!("{name} checked UP"), || {
            s.health.last().status.is_ok() && s.status() == "UP"
        })
        .await;
    }
    let fe = sclb.local_addrs("sparkconnect")[0];
    let (victim, mut conn) = which_server(2, fe).await;
    let url = format!("http://{}/stats", sclb.stats_addr().unwrap());

    let mut br = Browser::start(bin).await;
    br.open(&url).await;
    br.wait(
        "the page with its token box",
        "!!document.getElementById('token') && document.readyState === 'complete'",
    )
    .await;
    assert_eq!(br.eval(&status_js("sc1")).await, "UP");

    // No token yet: the page says so and nothing changes.
    br.click("input.sel[value=\"sc1\"]").await;
    br.click("button[data-action=\"drain\"]").await;
    assert_eq!(br.result().await, "Enter the admin token first.");
    assert_eq!(server(&sclb, "sc1").status(), "UP");

    // A wrong token: refused, shown.
    br.click("#token").await;
    br.type_text("not-the-token-at-all").await;
    br.click("#use-token").await;
    br.click("button[data-action=\"drain\"]").await;
    br.wait(
        "the refusal",
        "document.getElementById('result').textContent.startsWith('HTTP 401: Permission denied')",
    )
    .await;
    assert_eq!(server(&sclb, "sc1").status(), "UP");

    // Untick sc1; the right token.
    br.click("input.sel[value=\"sc1\"]").await;
    assert_eq!(
        br.eval("document.querySelectorAll('input.sel:checked').length")
            .await,
        0
    );
    br.click("#forget-token").await;
    br.click("#token").await;
    br.type_text(TOKEN).await;
    br.click("#use-token").await;
    assert_eq!(
        br.eval("document.getElementById('token-state').textContent")
            .await,
        "token set for this tab"
    );

    // Kill the sessions of the server a client is on: asked to confirm, then it is cut.
    conn.get_mut().write_all(b"ping\n").await.unwrap();
    let mut echo = String::new();
    conn.read_line(&mut echo).await.unwrap();
    assert_eq!(echo, "ping\n", "the client's connection is up");
    br.click(&format!("input.sel[value=\"{victim}\"]")).await;
    br.click("button[data-action=\"shutdown\"]").await;
    br.wait(
        "the kill answered",
        &format!(
            "document.getElementById('result').textContent.includes('{victim}: Kill sessions done')"
        ),
    )
    .await;
    assert_eq!(
        br.dialogs,
        ["Close every connection to the ticked servers? Their clients lose their Spark sessions."]
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest))
        .await
        .expect("the connection is closed within 10 s");
    assert!(
        read.is_err() || rest.is_empty(),
        "closed: {read:?} {rest:?}"
    );

    // DRAIN sc1 and sc3.
    br.click("input.sel[value=\"sc1\"]").await;
    br.click("input.sel[value=\"sc3\"]").await;
    br.click("button[data-action=\"drain\"]").await;
    br.wait(
        "sc1 and sc3 DRAIN on the page",
        &format!(
            "{} === 'DRAIN' && {} === 'DRAIN'",
            status_js("sc1"),
            status_js("sc3")
        ),
    )
    .await;
    assert_eq!(
        br.result().await,
        "sparkconnect_servers/sc1: DRAIN done\nsparkconnect_servers/sc3: DRAIN done\n"
    );
    assert_eq!(server(&sclb, "sc1").status(), "DRAIN");
    assert_eq!(server(&sclb, "sc3").status(), "DRAIN");
    assert_eq!(server(&sclb, "sc2").status(), "UP");

    // MAINT sc3, then READY sc1.
    br.click("input.sel[value=\"sc3\"]").await;
    br.click("button[data-action=\"maint\"]").await;
    br.wait("sc3 MAINT", &format!("{} === 'MAINT'", status_js("sc3")))
        .await;
    br.click("input.sel[value=\"sc1\"]").await;
    br.click("button[data-action=\"ready\"]").await;
    br.wait("sc1 UP again", &format!("{} === 'UP'", status_js("sc1")))
        .await;

    // Health DOWN on sc2: forced down until its next check, an hour away.
    br.click("input.sel[value=\"sc2\"]").await;
    br.click("button[data-action=\"hdown\"]").await;
    br.wait("sc2 DOWN", &format!("{} === 'DOWN'", status_js("sc2")))
        .await;
    assert_eq!(server(&sclb, "sc2").status(), "DOWN");

    // The whole page fits 1280 px: nothing cut off.
    assert_eq!(
        br.eval("document.documentElement.scrollWidth <= 1280")
            .await,
        true,
        "the page is {} px wide",
        br.eval("document.documentElement.scrollWidth").await
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    br.click("input.sel[value=\"sc3\"]").await;
    br.screenshot(&dir.join("stats-actions.png")).await;
    br.close().await;
}
