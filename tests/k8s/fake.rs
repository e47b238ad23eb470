//! A fake API server replaying recorded traffic: EndpointSlice v1 (which 1.20 does not serve),
//! a real pod watch byte for byte, and reloads.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::lb::eventually;

/// Serves one resource: each list request gets the next body of `lists` (the last repeats);
/// each watch request opens a chunked stream that `send` writes events to.
pub struct FakeApi {
    addr: SocketAddr,
    state: Arc<FakeState>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

#[derive(Default)]
struct FakeState {
    lists: Mutex<VecDeque<String>>,
    requests: Mutex<Vec<String>>,
    watch: Mutex<Option<mpsc::UnboundedSender<Option<String>>>>,
}

impl FakeApi {
    pub async fn start(lists: Vec<String>) -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FakeState {
            lists: Mutex::new(lists.into()),
            ..Default::default()
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(fake_serve(s, st.clone()));
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
                 users: [{{name: none, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: none}}}}]\n\
                 current-context: fake\n"
            ),
        )
        .unwrap();
        FakeApi {
            addr,
            state,
            task,
            _dir: dir,
            kubeconfig,
        }
    }

    pub fn requests(&self, watch: bool) -> Vec<String> {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.contains("watch=true") == watch)
            .cloned()
            .collect()
    }

    /// Waits until `n` watch requests have come.
    pub async fn watches(&self, n: usize) -> Vec<String> {
        eventually(&format!("{n} watch requests at {}", self.addr), || async {
            let w = self.requests(true);
            if w.len() >= n {
                Ok(w)
            } else {
                Err(format!("{:?}", self.state.requests.lock().unwrap()))
            }
        })
        .await
    }

    /// Sends one event line on the open watch.
    pub fn send(&self, line: &str) {
        let w = self.state.watch.lock().unwrap();
        w.as_ref()
            .expect("a watch is open")
            .send(Some(line.to_string()))
            .unwrap();
    }

    /// Ends the open watch stream.
    pub fn end_watch(&self) {
        if let Some(w) = self.state.watch.lock().unwrap().take() {
            let _ = w.send(None);
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.end_watch();
        self.task.abort();
    }
}

async fn fake_serve(mut s: TcpStream, st: Arc<FakeState>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 && head.len() < 65536 => head.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let target = head.split(' ').nth(1).unwrap_or("").to_string();
    st.requests.lock().unwrap().push(target.clone());
    if target.contains("watch=true") {
        let (tx, mut rx) = mpsc::unbounded_channel();
        *st.watch.lock().unwrap() = Some(tx);
        let headers = "HTTP/1.1 200 OK\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if s.write_all(headers.as_bytes()).await.is_err() {
            return;
        }
        while let Some(Some(line)) = rx.recv().await {
            let chunk = format!("{:x}\r\n{line}\n\r\n", line.len() + 1);
            if s.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        let _ = s.shutdown().await;
    } else {
        let body = {
            let mut lists = st.lists.lock().unwrap();
            if lists.len() > 1 {
                lists.pop_front().unwrap()
            } else {
                lists.front().cloned().unwrap_or_default()
            }
        };
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(reply.as_bytes()).await;
        let _ = s.shutdown().await;
    }
}

/// A recording from tests/fixtures/k8s/wire, with pod IPs and the port replaced.
pub fn wire(file: &str, ips: &[(&str, u8)], port: u16) -> String {
    let mut text =
        std::fs::read_to_string(Path::new("tests/fixtures/k8s/wire").join(file)).unwrap();
    for (from, to) in ips {
        text = text.replace(&format!("\"{from}\""), &format!("\"127.0.0.{to}\""));
    }
    text.replace("\"port\":15002", &format!("\"port\":{port}"))
        .replace(
            "\"containerPort\":15002",
            &format!("\"containerPort\":{port}"),
        )
}
