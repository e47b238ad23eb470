//! The health probes: `tcp` (connect), `h2` (HTTP/2 preface, SETTINGS, PING ack) and `spark`
//! (a real Spark Connect `AnalyzePlan { spark_version }` on one fixed session id per server).
//!
//! Each probe turns what happened into a [`LastCheck`] with HAProxy's check_status codes.
//! Timeouts bound the whole probe: connect inside the timeout is L4, the TLS handshake of a
//! backend with `server_tls` L6 (as HAProxy's `check-ssl`), after it L7.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use super::spark_proto::{self, AnalyzePlanResponse};
use crate::config::{CheckType, Secret};
use crate::server::{CheckStatus, LastCheck};
use crate::tls::client::{ServerStream, ServerTls};

pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = LastCheck> + Send + 'a>>;

/// A health probe: checks one address within a timeout.
pub trait Probe: Send + Sync {
    fn check(&self, addr: SocketAddr, timeout: Duration) -> ProbeFuture<'_>;
}

/// The probe for a check type; `None` for `type = "none"`.
pub fn for_type(kind: CheckType) -> Option<Box<dyn Probe>> {
    for_check(kind, None, None)
}

/// The probe for a check type, the spark probe sending `token` as `authorization: Bearer`,
/// each speaking TLS to the server when `tls` is set.
pub fn for_check(
    kind: CheckType,
    token: Option<&Secret>,
    tls: Option<&ServerTls>,
) -> Option<Box<dyn Probe>> {
    let tls = tls.cloned();
    match kind {
        CheckType::Tcp => Some(Box::new(TcpProbe { tls })),
        CheckType::H2 => Some(Box::new(H2Probe { tls })),
        CheckType::Spark => {
            let mut p = SparkProbe::new();
            p.token = token.cloned();
            p.tls = tls;
            Some(Box::new(p))
        }
        CheckType::None => None,
    }
}

fn result(status: CheckStatus, started: Instant, desc: impl Into<String>) -> LastCheck {
    LastCheck {
        status,
        duration_ms: Some(started.elapsed().as_millis() as u64),
        desc: desc.into(),
    }
}

/// Starts a check: connects within `timeout`. Ok: the stream, when the check started and its
/// deadline (the rest of the check must fit in it); Err: the L4 result to report.
async fn connect(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Instant, Instant), LastCheck> {
    let started = Instant::now();
    let deadline = started + timeout;
    match timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok((s, started, deadline))
        }
        Ok(Err(e)) => Err(result(CheckStatus::L4Con, started, e.to_string())),
        Err(_) => Err(result(CheckStatus::L4Tout, started, "connect timed out")),
    }
}

/// The TLS handshake of a backend with `server_tls`, within the check's deadline; a plain
/// stream without. Err: the L6 result to report.
async fn secure(
    tls: Option<&ServerTls>,
    tcp: TcpStream,
    addr: SocketAddr,
    started: Instant,
    deadline: Instant,
) -> Result<ServerStream, LastCheck> {
    match timeout_at(deadline, ServerTls::wrap(tls, tcp, addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(result(
            CheckStatus::L6Rsp,
            started,
            format!("TLS handshake failed: {e}"),
        )),
        Err(_) => Err(result(
            CheckStatus::L6Tout,
            started,
            "TLS handshake timed out",
        )),
    }
}

/// Connects, then speaks TLS if the backend asks for it, all within `timeout`.
async fn open(
    tls: Option<&ServerTls>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(ServerStream, Instant, Instant), LastCheck> {
    let (tcp, started, deadline) = connect(addr, timeout).await?;
    let s = secure(tls, tcp, addr, started, deadline).await?;
    Ok((s, started, deadline))
}

#[derive(Default)]
pub struct TcpProbe {
    tls: Option<ServerTls>,
}

impl Probe for TcpProbe {
    fn check(&self, addr: SocketAddr, timeout: Duration) -> ProbeFuture<'_> {
        Box::pin(async move {
            match open(self.tls.as_ref(), addr, timeout).await {
                Ok((_, started, _)) if self.tls.is_some() => {
                    result(CheckStatus::L6Ok, started, "TLS handshake done")
                }
                Ok((_, started, _)) => result(CheckStatus::L4Ok, started, ""),
                Err(r) => r,
            }
        })
    }
}

/// Aborts the HTTP/2 connection task when the probe is done or dropped (timeout).
struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts an HTTP/2 client connection; the connection is driven by a task owned by the guard.
async fn h2_connect(
    io: ServerStream,
) -> Result<
    (
        h2::client::SendRequest<Bytes>,
        Option<h2::PingPong>,
        ConnTask,
    ),
    h2::Error,
> {
    let (send, mut conn) = h2::client::Builder::new()
        .max_frame_size(16 * 1024)
        .initial_window_size(spark_proto::MAX_REPLY as u32)
        .handshake(io)
        .await?;
    let ping = conn.ping_pong();
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((send, ping, ConnTask(task)))
}

#[derive(Default)]
pub struct H2Probe {
    tls: Option<ServerTls>,
}

impl Probe for H2Probe {
    fn check(&self, addr: SocketAddr, timeout: Duration) -> ProbeFuture<'_> {
        Box::pin(async move {
            let (tcp, started, deadline) = match open(self.tls.as_ref(), addr, timeout).await {
                Ok(c) => c,
                Err(r) => return r,
            };
            let attempt = async {
                let (_send, ping, _task) = h2_connect(tcp).await?;
                let mut ping = ping.expect("first call to ping_pong");
                // A PING ack proves the peer parsed our preface and SETTINGS: an HTTP/2 stack.
                ping.ping(h2::Ping::opaque()).await?;
                Ok::<_, h2::Error>(())
            };
            match timeout_at(deadline, attempt).await {
                Ok(Ok(())) => result(CheckStatus::L7Ok, started, "HTTP/2 PING acknowledged"),
                Ok(Err(e)) => result(CheckStatus::L7Rsp, started, format!("not HTTP/2: {e}")),
                Err(_) => result(CheckStatus::L7Tout, started, "no HTTP/2 answer in time"),
            }
        })
    }
}

/// Calls `AnalyzePlan { spark_version }` with one session id for the life of the probe (that
/// is, of the server): each new session id would live 60 minutes on the server. The probe
/// never releases its session, so the server keeps it warm and the check stays cheap.
pub struct SparkProbe {
    session_id: String,
    token: Option<Secret>,
    tls: Option<ServerTls>,
}

impl SparkProbe {
    pub fn new() -> Self {
        SparkProbe {
            session_id: uuid::Uuid::new_v4().to_string(),
            token: None,
            tls: None,
        }
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

impl Default for SparkProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// What a gRPC call answered, or why it could not be read.
enum Reply {
    Ok(Vec<u8>),
    Status { code: u32, message: String },
    Http(u16),
    Malformed(String),
}

impl Probe for SparkProbe {
    fn check(&self, addr: SocketAddr, timeout: Duration) -> ProbeFuture<'_> {
        Box::pin(async move {
            let (tcp, started, deadline) = match open(self.tls.as_ref(), addr, timeout).await {
                Ok(c) => c,
                Err(r) => return r,
            };
            let body =
                spark_proto::grpc_frame(&spark_proto::spark_version_request(&self.session_id));
            let reply = match timeout_at(deadline, grpc_unary(tcp, addr, body, self.token.as_ref()))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => Reply::Malformed(format!("HTTP/2: {e}")),
                Err(_) => {
                    return result(
                        CheckStatus::L7Tout,
                        started,
                        "no Spark Connect answer in time",
                    );
                }
            };
            match reply {
                Reply::Ok(body) => match decode_version(&body) {
                    Ok(v) => result(CheckStatus::L7Ok, started, format!("Spark {v}")),
                    Err(e) => result(CheckStatus::L7Rsp, started, e),
                },
                Reply::Status { code, message } => result(
                    CheckStatus::L7Sts,
                    started,
                    format!(
                        "gRPC {code} {}: {message}",
                        spark_proto::grpc_code_name(code)
                    ),
                ),
                Reply::Http(code) => {
                    result(CheckStatus::L7Sts, started, format!("HTTP status {code}"))
                }
                Reply::Malformed(e) => result(CheckStatus::L7Rsp, started, e),
            }
        })
    }
}

/// The Spark version in an `AnalyzePlanResponse` gRPC body.
pub fn decode_version(body: &[u8]) -> Result<String, String> {
    let msg = spark_proto::first_message(body).map_err(|e| e.to_string())?;
    let resp =
        AnalyzePlanResponse::decode(msg).map_err(|e| format!("not an AnalyzePlanResponse: {e}"))?;
    match resp.spark_version {
        Some(v) if !v.version.is_empty() => Ok(v.version),
        _ => Err("AnalyzePlanResponse without a Spark version".into()),
    }
}

fn grpc_status(map: &http::HeaderMap) -> Option<(u32, String)> {
    let code = spark_proto::grpc_status_code(map)?;
    let message = map
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(spark_proto::percent_decode)
        .unwrap_or_default();
    Some((code, message))
}

/// One unary gRPC call over a fresh HTTP/2 connection.
async fn grpc_unary(
    io: ServerStream,
    addr: SocketAddr,
    body: Bytes,
    token: Option<&Secret>,
) -> Result<Reply, h2::Error> {
    let scheme = match io {
        tokio_util::either::Either::Left(_) => "http",
        tokio_util::either::Either::Right(_) => "https",
    };
    let (send, _ping, _task) = h2_connect(io).await?;
    let mut send = send.ready().await?;
    let mut req = http::Request::post(format!(
        "{scheme}://{addr}{}",
        spark_proto::ANALYZE_PLAN_PATH
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("user-agent", concat!("sclb/", env!("CARGO_PKG_VERSION")))
    .body(())
    .expect("static request is valid");
    if let Some(t) = token
        && let Ok(mut v) = http::HeaderValue::from_str(&format!("Bearer {}", t.0))
    {
        v.set_sensitive(true);
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    let (response, mut stream) = send.send_request(req, false)?;
    stream.send_data(body, true)?;
    let response = response.await?;
    let status = response.status().as_u16();
    if status != 200 {
        return Ok(Reply::Http(status));
    }
    // Trailers-only responses carry grpc-status in the headers.
    if let Some((code, message)) = grpc_status(response.headers()) {
        return Ok(if code == 0 {
            Reply::Malformed("gRPC OK without a message".into())
        } else {
            Reply::Status { code, message }
        });
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
        if data.len() > spark_proto::MAX_REPLY + 5 {
            return Ok(Reply::Malformed(format!(
                "reply larger than {} bytes",
                spark_proto::MAX_REPLY
            )));
        }
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    match grpc_status(&trailers) {
        Some((0, _)) => Ok(Reply::Ok(data)),
        Some((code, message)) => Ok(Reply::Status { code, message }),
        None => Ok(Reply::Malformed(
            "no grpc-status in the reply: not a gRPC server".into(),
        )),
    }
}
