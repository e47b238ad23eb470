//! Test helpers: real TCP backends on 127.0.0.1:0, sclb started from a config string, and
//! clients that connect from a chosen loopback source address (127.0.0.2, 127.0.0.3, ...) so
//! that each looks like a different client IP.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

use sclb::Sclb;

/// A backend that greets each connection with its name and a newline, then echoes.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener)
    }

    /// Serves on an existing listener (to restart a backend on the same port).
    pub fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let greeting = format!("{name}\n");
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            accepted,
            task,
        }
    }

    /// Stops accepting: new connections to its port are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends one admin command line the way `socat stdio` does and reads the reply until sclb
/// closes the connection.
pub async fn admin(sock: &Path, line: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(sock).await.unwrap();
    s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("admin reply in time")
        .unwrap();
    out
}

/// Starts sclb from TOML text.
pub async fn start_sclb(toml: &str) -> Sclb {
    let config = sclb::config::parse(Path::new("test.toml"), toml)
        .unwrap_or_else(|e| panic!("test config invalid: {e:?}"));
    Sclb::start(config).await.expect("sclb starts")
}

/// A config with one frontend "fe" on 127.0.0.1:0 and one backend "be" over `backends`.
/// `backend_extra` is added to the backend table (balance, stick, ...). [`Backend`]s greet
/// first (their name), which is what `tcp_smart_connect = false` is for: with the default a
/// silent client's server would see it only after the kernel's 200 ms delayed ACK.
pub fn config(backends: &[&Backend], backend_extra: &str, global_extra: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ name = \"{}\", addr = \"{}\" }}", b.name, b.addr))
        .collect();
    let smart = if backend_extra.contains("tcp_smart_connect") {
        ""
    } else {
        "tcp_smart_connect = false"
    };
    format!(
        r#"
[global]
{global_extra}
[defaults]
timeout = {{ connect = "1s", queue = "2s" }}
check = {{ type = "none" }}

[[frontend]]
name = "fe"
bind = ["127.0.0.1:0"]
backend = "be"

[[backend]]
name = "be"
{smart}
{backend_extra}
servers = [ {} ]
"#,
        servers.join(", ")
    )
}

pub fn frontend_addr(sclb: &Sclb) -> SocketAddr {
    sclb.local_addrs("fe")[0]
}

/// Connects to `dst` from source address 127.0.0.`n`.
pub async fn connect_from(n: u8, dst: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, n), 0)))
        .unwrap();
    s.connect(dst).await.unwrap()
}

/// Connects from 127.0.0.`n` and returns the greeting's server name and the stream.
pub async fn which_server(n: u8, dst: SocketAddr) -> (String, BufReader<TcpStream>) {
    let s = connect_from(n, dst).await;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
        .await
        .expect("greeting within 10 s")
        .unwrap();
    assert!(line.ends_with('\n'), "no greeting, got {line:?}");
    (line.trim().to_string(), r)
}

/// Reads until EOF with a deadline; returns the bytes.
pub async fn read_to_end(s: &mut (impl AsyncReadExt + Unpin), within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(within, s.read_to_end(&mut out))
        .await
        .expect("EOF in time")
        .unwrap();
    out
}

/// A config for the real binary: frontend "f" on 127.0.0.1:0, backend "b" with `servers`
/// (default: one server that nothing answers) and no checks; `global` is the `[global]` body.
pub fn binary_config(global: &str, servers: &str) -> String {
    let servers = if servers.is_empty() {
        r#"{ name = "s", addr = "127.0.0.1:1" }"#
    } else {
        servers
    };
    format!(
        r#"
[global]
{global}
[[frontend]]
name = "f"
bind = ["127.0.0.1:0"]
backend = "b"
[[backend]]
name = "b"
check = {{ type = "none" }}
servers = [ {servers} ]
"#
    )
}

/// A child process (the real `sclb` binary) killed when dropped, so that a test failing half
/// way leaves nothing running. `std`'s `kill` does not signal a child already waited for, so a
/// reused PID is never hit.
pub struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        KillOnDrop(Some(cmd.spawn().expect("the process starts")))
    }

    /// Waits for the process to exit and collects its output.
    pub fn wait_with_output(mut self) -> std::process::Output {
        let child = self.0.take().expect("not yet waited for");
        child.wait_with_output().expect("output collected")
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().expect("not yet waited for")
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("not yet waited for")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Puts a server in an admin state as an operator does: through the control plane.
pub fn set_state(sclb: &Sclb, server: &Arc<sclb::server::Server>, state: sclb::server::AdminState) {
    use sclb::control::{Change, Operator, apply};
    let server = server.clone();
    apply(
        sclb.shared(),
        Change::Operator(Operator::SetState { server, state }),
    )
    .unwrap();
}

/// Hands a discovery update for `backend` to the control plane, as a discovery source does.
pub fn discovery_update(sclb: &Sclb, backend: &str, update: sclb::discovery::Update) {
    use sclb::control::{Change, apply};
    let backend = backend.to_string();
    apply(
        sclb.shared(),
        Change::Discovery {
            backend,
            updates: vec![update],
        },
    )
    .unwrap();
}

/// Connects from 127.0.0.`n`, sends `first`, then `ping\n`: the echoed line after the
/// backend's greeting, or `None` if sclb closed the connection.
pub async fn through(n: u8, addr: SocketAddr, first: &[u8]) -> Option<String> {
    let mut s = connect_from(n, addr).await;
    s.write_all(first).await.ok()?;
    s.write_all(b"ping\n").await.ok()?;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 256];
        while let Ok(k) = s.read(&mut buf).await {
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k]);
            if got.ends_with(b"ping\n") {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    (!text.is_empty()).then_some(text)
}
