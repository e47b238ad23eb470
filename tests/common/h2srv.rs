//! Real HTTP/2 peers for the h2 and spark probes: an `h2::server` that answers Spark Connect's
//! AnalyzePlan by replaying what a real Spark 4.0.5 server sent (tests/fixtures/spark/).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How the fake Spark Connect server answers.
#[derive(Clone, Copy, Debug)]
pub enum SparkMode {
    /// The real AnalyzePlanResponse{spark_version="4.0.5"}.
    Healthy,
    /// The real error a Spark server sends for a bad session handle (grpc-status 13).
    Error,
    /// HTTP 200, grpc-status 0, but a body that is not an AnalyzePlanResponse.
    Garbage,
    /// HTTP 404.
    NotFound,
}

/// What the fake server saw: (path, content-type, session_id of the request).
pub type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

pub struct FakeSpark {
    pub addr: SocketAddr,
    pub seen: Seen,
    pub mode: Arc<Mutex<SparkMode>>,
    task: JoinHandle<()>,
}

impl Drop for FakeSpark {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("tests/fixtures/spark/{name}")).unwrap()
}

fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// Decodes field 1 (session_id) of a framed request, the way Spark would.
fn session_id(body: &[u8]) -> String {
    use prost::Message;
    #[derive(Clone, PartialEq, prost::Message)]
    struct R {
        #[prost(string, tag = "1")]
        session_id: String,
    }
    R::decode(&body[5.min(body.len())..])
        .map(|r| r.session_id)
        .unwrap_or_default()
}

impl FakeSpark {
    pub async fn start(mode: SparkMode) -> FakeSpark {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let mode = Arc::new(Mutex::new(mode));
        let (seen2, mode2) = (seen.clone(), mode.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let (seen, mode) = (seen2.clone(), mode2.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(sock).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let (seen, mode) = (seen.clone(), mode.clone());
                        tokio::spawn(async move {
                            let path = req.uri().path().to_string();
                            let ct = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_string())
                                .unwrap_or_default();
                            let mut body = req.into_body();
                            let mut data = Vec::new();
                            while let Some(Ok(c)) = body.data().await {
                                let _ = body.flow_control().release_capacity(c.len());
                                data.extend_from_slice(&c);
                            }
                            seen.lock().unwrap().push((path, ct, session_id(&data)));
                            let mode = *mode.lock().unwrap();
                            answer(mode, &mut respond);
                        });
                    }
                });
            }
        });
        FakeSpark {
            addr,
            seen,
            mode,
            task,
        }
    }
}

fn answer(mode: SparkMode, respond: &mut h2::server::SendResponse<Bytes>) {
    let grpc = || {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
    };
    match mode {
        SparkMode::Healthy | SparkMode::Garbage => {
            let msg = match mode {
                SparkMode::Healthy => frame(&fixture("analyze_spark_version_response.bin")),
                _ => frame(b"\xff\xff\xff not protobuf"),
            };
            let mut s = respond
                .send_response(grpc().body(()).unwrap(), false)
                .unwrap();
            s.send_data(msg, false).unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            s.send_trailers(t).unwrap();
        }
        SparkMode::Error => {
            let real: serde_json::Value =
                serde_json::from_slice(&fixture("analyze_invalid_session.json")).unwrap();
            // Trailers-only response, as grpc-java sends for an immediate error.
            let resp = grpc()
                .header("grpc-status", real["grpc_status"].to_string())
                .header("grpc-message", real["grpc_message"].as_str().unwrap())
                .body(())
                .unwrap();
            respond.send_response(resp, true).unwrap();
        }
        SparkMode::NotFound => {
            let resp = http::Response::builder().status(404).body(()).unwrap();
            respond.send_response(resp, true).unwrap();
        }
    }
}
