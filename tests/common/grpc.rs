//! gRPC over HTTP/2 on both sides of the gateway, for tests that need many servers and
//! failures on cue (the real-Spark suite in tests/e2e covers the real server):
//! - [`FakeGrpc`]: a server that answers every Spark Connect RPC the way Spark frames it
//!   (response headers, length-prefixed messages, `grpc-status` trailers), names itself in each
//!   message, and records the sessions it saw. `ExecutePlan` streams `stream_messages`
//!   messages, one every `stream_every`.
//! - [`Client`]: an HTTP/2 client connection sending requests built from the requests real
//!   PySpark 4.0.5 sent (tests/fixtures/spark/rpcs), with the session id swapped.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use sclb::gateway::decode;

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What one fake server saw.
#[derive(Default)]
pub struct Seen {
    /// RPCs by session id: (method, user id).
    pub by_session: BTreeMap<String, Vec<(String, Option<String>)>>,
    pub rpcs: usize,
    /// Streamed messages handed to the connection (accepted by HTTP/2 flow control).
    pub sent: usize,
    /// Streams the client (through the gateway) reset before their end.
    pub cancelled: usize,
    /// Each RPC's `authorization` header, as received.
    pub authorization: Vec<Option<String>>,
    /// Each RPC's request body, as received.
    pub bodies: Vec<Bytes>,
    /// The server name (SNI) of each TLS connection (`serve_tls`).
    pub sni: Vec<Option<String>>,
}

pub struct FakeGrpc {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
pub struct Behaviour {
    pub stream_messages: usize,
    pub stream_every: Duration,
    /// Padding added to each streamed message.
    pub message_size: usize,
    /// `ExecutePlan` answers only once it takes a permit from this (the test hands them out).
    pub execute_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// `ExecutePlan` fails with this gRPC status and message.
    pub execute_fails: Option<(u32, &'static str)>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            stream_messages: 3,
            stream_every: Duration::from_millis(10),
            message_size: 0,
            execute_gate: None,
            execute_fails: None,
        }
    }
}

/// A gRPC message: the 5-byte prefix, then `payload`.
pub fn frame(payload: &[u8]) -> Bytes {
    let mut v = vec![0u8];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    Bytes::from(v)
}

fn trailers(code: u32, msg: &str) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", code.into());
    if !msg.is_empty() {
        t.insert("grpc-message", msg.parse().unwrap());
    }
    t
}

impl FakeGrpc {
    pub async fn start(name: &str, behaviour: Behaviour) -> FakeGrpc {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, listener, behaviour)
    }

    /// On a loopback address of its own (a pod IP).
    pub async fn start_on(name: &str, ip: std::net::Ipv4Addr, behaviour: Behaviour) -> FakeGrpc {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        Self::serve(name, listener, behaviour)
    }

    pub fn serve(name: &str, listener: TcpListener, behaviour: Behaviour) -> FakeGrpc {
        Self::serve_tls(name, listener, behaviour, None)
    }

    /// Serves TLS (ALPN h2) when `tls` is given, as Spark Connect servers built with TLS do;
    /// `seen.sni` records the names clients asked for.
    pub fn serve_tls(
        name: &str,
        listener: TcpListener,
        behaviour: Behaviour,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeGrpc {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (n, s) = (name.to_string(), seen.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (n, s, b, tls) = (n.clone(), s.clone(), behaviour.clone(), tls.clone());
                conns.spawn(async move {
                    let seen = s.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let (n, s, b) = (n.clone(), s.clone(), b.clone());
                        async move { Ok::<_, Infallible>(answer(req, &n, &s, &b).await) }
                    });
                    let h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = h2.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                        Some(tls) => {
                            let Ok(tls) = tls.accept(tcp).await else {
                                return;
                            };
                            let sni = tls.get_ref().1.server_name().map(str::to_string);
                            seen.lock().unwrap().sni.push(sni);
                            let _ = h2.serve_connection(TokioIo::new(tls), svc).await;
                        }
                    }
                });
            }
        });
        FakeGrpc {
            name: name.to_string(),
            addr,
            seen,
            task,
        }
    }

    /// Session ids this server saw.
    pub fn sessions(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .by_session
            .keys()
            .cloned()
            .collect()
    }

    /// Methods it saw for `session`.
    pub fn methods(&self, session: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .by_session
            .get(session)
            .map(|v| v.iter().map(|(m, _)| m.clone()).collect())
            .unwrap_or_default()
    }

    /// Stops the server and drops every connection to it.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for FakeGrpc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    name: &str,
    seen: &Arc<Mutex<Seen>>,
    b: &Behaviour,
) -> Response<BoxBody> {
    let path = req.uri().path().to_string();
    let method = decode::method(&path);
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut headers = Response::builder()
        .header("content-type", "application/grpc")
        .header("x-fake-server", name);
    let Some(method) = method else {
        let mut r = headers.body(Full::new(Bytes::new()).boxed()).unwrap();
        r.headers_mut().extend(trailers(12, "Method not found"));
        return r;
    };
    let body = req.into_body();
    // Client-streaming AddArtifacts: read it all. Others: the first message is all there is.
    let data = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let key = decode::routing_key_best_effort(method, &data).ok();
    {
        let mut s = seen.lock().unwrap();
        s.rpcs += 1;
        s.authorization.push(authorization);
        s.bodies.push(data.clone());
        if let Some(k) = &key {
            s.by_session
                .entry(k.session_id.clone())
                .or_default()
                .push((method.name().to_string(), k.user_id.clone()));
        }
    }
    let reply = format!("{name} {} bytes={}", method.name(), data.len());
    headers = headers.header("x-request-bytes", data.len());
    if method == decode::Method::ExecutePlan
        && let Some(gate) = &b.execute_gate
    {
        gate.acquire().await.expect("the gate stays open").forget();
    }
    if method == decode::Method::ExecutePlan
        && let Some((code, msg)) = b.execute_fails
    {
        let mut r = headers.body(Full::new(Bytes::new()).boxed()).unwrap();
        r.headers_mut().extend(trailers(code, msg));
        return r;
    }
    if method == decode::Method::ExecutePlan {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let (n, every, pad) = (b.stream_messages, b.stream_every, b.message_size);
        let seen = seen.clone();
        tokio::spawn(async move {
            for i in 0..n {
                let mut text = format!("{reply} #{i} ").into_bytes();
                text.resize(text.len() + pad, b'.');
                if tx.send(Ok(Frame::data(frame(&text)))).await.is_err() {
                    seen.lock().unwrap().cancelled += 1;
                    return;
                }
                seen.lock().unwrap().sent += 1;
                if !every.is_zero() {
                    tokio::time::sleep(every).await;
                }
            }
            let _ = tx.send(Ok(Frame::trailers(trailers(0, "")))).await;
        });
        let body = StreamBody::new(tokio_stream_from(rx));
        return headers.body(BodyExt::boxed(body)).unwrap();
    }
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
        Ok(Frame::data(frame(reply.as_bytes()))),
        Ok(Frame::trailers(trailers(0, ""))),
    ];
    headers
        .body(BodyExt::boxed(StreamBody::new(futures::stream::iter(
            frames,
        ))))
        .unwrap()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A request body PySpark sent for `fixture`, with its session id replaced by `session`
/// (both are 36-byte UUIDs, so every length stays right).
pub fn request(fixture: &str, session: &str) -> Bytes {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spark/rpcs");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut body = std::fs::read(dir.join(fixture)).unwrap();
    assert_eq!(session.len(), 36);
    for old in ["session_id", "anon_session_id"] {
        let old = manifest[old].as_str().unwrap().as_bytes();
        let mut i = 0;
        while i + old.len() <= body.len() {
            if &body[i..i + old.len()] == old {
                body[i..i + old.len()].copy_from_slice(session.as_bytes());
                i += old.len();
            } else {
                i += 1;
            }
        }
    }
    Bytes::from(body)
}

/// Opens sessions `ids` (their first RPC); returns the server each landed on.
pub async fn open(c: &mut Client, ids: std::ops::Range<u32>) -> Vec<String> {
    let mut placed = Vec::new();
    for n in ids {
        let r = c
            .call("Config", request("01_Config_set.bin", &session(n)))
            .await;
        assert_eq!(r.status, 0, "{r:?}");
        placed.push(r.server().to_string());
    }
    placed
}

/// One RPC of each session in `ids`, in reverse order (so that a fresh round robin would
/// place them otherwise); each must reach `placed[n]`.
pub async fn expect_placed(
    c: &mut Client,
    ids: std::ops::Range<u32>,
    placed: &[String],
    when: &str,
) {
    for n in ids.rev() {
        let r = c
            .call(
                "AnalyzePlan",
                request("03_AnalyzePlan_schema.bin", &session(n)),
            )
            .await;
        assert_eq!(r.status, 0, "{r:?}");
        assert_eq!(r.server(), placed[n as usize], "session {n} {when}");
    }
}

/// A session id for test `n`.
pub fn session(n: u32) -> String {
    format!("5c1b0000-0000-4000-8000-{n:012}")
}

/// One HTTP/2 connection to the gateway, as one Spark client holds one.
pub struct Client {
    send: hyper::client::conn::http2::SendRequest<BoxBody>,
    pub addr: SocketAddr,
}

/// What an RPC came back with.
#[derive(Debug)]
pub struct Reply {
    pub headers: HeaderMap,
    /// Messages (without their prefix).
    pub messages: Vec<String>,
    /// `grpc-status` (from the trailers, or the headers of a trailers-only reply).
    pub status: u32,
    pub message: String,
    pub trailers: HeaderMap,
}

impl Reply {
    /// The fake server that answered, from its messages.
    pub fn server(&self) -> &str {
        self.headers
            .get("x-fake-server")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Self::over(tcp, addr).await
    }

    /// A client over a connection made elsewhere (a TLS session).
    pub fn from_sender(
        send: hyper::client::conn::http2::SendRequest<BoxBody>,
        addr: SocketAddr,
    ) -> Client {
        Client { send, addr }
    }

    pub async fn over(tcp: TcpStream, addr: SocketAddr) -> Client {
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        Client { send, addr }
    }

    /// Sends `body` to `method` and starts the response.
    pub async fn start(&mut self, method: &str, body: Bytes) -> Response<Incoming> {
        self.start_with(method, body, &[]).await
    }

    /// [`Client::start`] with extra request headers (connection-string parameters).
    pub async fn start_with(
        &mut self,
        method: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> Response<Incoming> {
        let mut req = Request::post(format!(
            "http://{}/spark.connect.SparkConnectService/{method}",
            self.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body).boxed()).unwrap();
        self.send.ready().await.unwrap();
        self.send.send_request(req).await.unwrap()
    }

    /// The recorded AnalyzePlan on `session`, with `authorization: Bearer <token>`, read to
    /// its end.
    pub async fn analyze_with_token(&mut self, token: &str, session: &str) -> Reply {
        let auth = format!("Bearer {token}");
        let body = request("03_AnalyzePlan_schema.bin", session);
        let headers = [("authorization", auth.as_str())];
        finish(self.start_with("AnalyzePlan", body, &headers).await).await
    }

    /// An RPC to any path, read to its end.
    pub async fn call_path(&mut self, path: &str, body: Bytes) -> Reply {
        let req = Request::post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(body).boxed())
            .unwrap();
        self.send.ready().await.unwrap();
        finish(self.send.send_request(req).await.unwrap()).await
    }

    pub async fn call(&mut self, method: &str, body: Bytes) -> Reply {
        let resp = self.start(method, body).await;
        finish(resp).await
    }
}

/// Reads a response to its end.
pub async fn finish(resp: Response<Incoming>) -> Reply {
    let (parts, mut body) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = HeaderMap::new();
    while let Some(f) = body.frame().await {
        let Ok(f) = f else { break };
        match f.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = t;
                }
            }
        }
    }
    let mut messages = Vec::new();
    let mut rest = &data[..];
    while rest.len() >= 5 {
        let n = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        messages.push(String::from_utf8_lossy(&rest[5..5 + n]).into_owned());
        rest = &rest[5 + n..];
    }
    let st = if trailers.contains_key("grpc-status") {
        &trailers
    } else {
        &parts.headers
    };
    let status = st
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(999);
    let message = st
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Reply {
        headers: parts.headers,
        messages,
        status,
        message,
        trailers,
    }
}
