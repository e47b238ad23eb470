//! The few Spark Connect messages the spark probe and the gateway need, with field numbers
//! from Spark's `spark/connect/base.proto`. Only these fields are declared: protobuf skips
//! unknown fields, so a server's full `AnalyzePlanResponse` decodes into this subset.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The gRPC method the probe calls.
pub const ANALYZE_PLAN_PATH: &str = "/spark.connect.SparkConnectService/AnalyzePlan";

#[derive(Clone, PartialEq, prost::Message)]
pub struct UserContext {
    #[prost(string, tag = "1")]
    pub user_id: String,
}

/// `AnalyzePlanRequest.SparkVersion`: an empty message selecting the analysis.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SparkVersionRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AnalyzePlanRequest {
    #[prost(string, tag = "1")]
    pub session_id: String,
    #[prost(message, optional, tag = "2")]
    pub user_context: Option<UserContext>,
    #[prost(string, optional, tag = "3")]
    pub client_type: Option<String>,
    #[prost(message, optional, tag = "10")]
    pub spark_version: Option<SparkVersionRequest>,
}

/// What the gateway sends for a session it closed, so the server frees it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReleaseSessionRequest {
    #[prost(string, tag = "1")]
    pub session_id: String,
    #[prost(message, optional, tag = "2")]
    pub user_context: Option<UserContext>,
    #[prost(string, optional, tag = "3")]
    pub client_type: Option<String>,
}

/// `SQL` (relations.proto): a query as `spark.sql()` takes it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sql {
    #[prost(string, tag = "1")]
    pub query: String,
}

/// `Relation`, with only its `sql` (10) form declared.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Relation {
    #[prost(message, optional, tag = "10")]
    pub sql: Option<Sql>,
}

/// `Plan`, with only its `root` relation (1) declared.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Plan {
    #[prost(message, optional, tag = "1")]
    pub root: Option<Relation>,
}

/// `ExecutePlanRequest`: what the pool's warm-up sends (no request options: not reattachable,
/// so the server streams the whole result on this one call).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExecutePlanRequest {
    #[prost(string, tag = "1")]
    pub session_id: String,
    #[prost(message, optional, tag = "2")]
    pub user_context: Option<UserContext>,
    #[prost(message, optional, tag = "3")]
    pub plan: Option<Plan>,
    #[prost(string, optional, tag = "4")]
    pub client_type: Option<String>,
}

impl ExecutePlanRequest {
    /// `spark.sql(query)` collected, on `session_id`.
    pub fn sql(session_id: &str, user_id: &str, client_type: &str, query: &str) -> Self {
        ExecutePlanRequest {
            session_id: session_id.to_string(),
            user_context: Some(UserContext {
                user_id: user_id.to_string(),
            }),
            plan: Some(Plan {
                root: Some(Relation {
                    sql: Some(Sql {
                        query: query.to_string(),
                    }),
                }),
            }),
            client_type: Some(client_type.to_string()),
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SparkVersion {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AnalyzePlanResponse {
    #[prost(string, tag = "1")]
    pub session_id: String,
    #[prost(message, optional, tag = "8")]
    pub spark_version: Option<SparkVersion>,
    #[prost(string, tag = "15")]
    pub server_side_session_id: String,
}

/// The request the probe sends: `AnalyzePlan { spark_version }` on the probe's session.
pub fn spark_version_request(session_id: &str) -> AnalyzePlanRequest {
    AnalyzePlanRequest {
        session_id: session_id.to_string(),
        user_context: Some(UserContext {
            user_id: "sclb-probe".into(),
        }),
        client_type: Some(format!("sclb/{} health-check", env!("CARGO_PKG_VERSION"))),
        spark_version: Some(SparkVersionRequest {}),
    }
}

/// Frames a message for gRPC: a zero compression flag, a 4-byte big-endian length, the bytes.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("BytesMut grows");
    b.freeze()
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty response body")]
    Empty,
    #[error("truncated gRPC frame: {got} of {want} bytes")]
    Truncated { got: usize, want: usize },
    #[error("compressed gRPC frame (flag {0}), but no compression was negotiated")]
    Compressed(u8),
    #[error("response message too large: {0} bytes")]
    TooLarge(usize),
}

/// Largest reply the probe accepts; a version reply is well under 1 KiB.
pub const MAX_REPLY: usize = 64 * 1024;

/// The first gRPC message in `body`.
pub fn first_message(mut body: &[u8]) -> Result<&[u8], FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    if body.len() < 5 {
        return Err(FrameError::Truncated {
            got: body.len(),
            want: 5,
        });
    }
    let flag = body.get_u8();
    let len = body.get_u32() as usize;
    if flag != 0 {
        return Err(FrameError::Compressed(flag));
    }
    if len > MAX_REPLY {
        return Err(FrameError::TooLarge(len));
    }
    if body.len() < len {
        return Err(FrameError::Truncated {
            got: body.len(),
            want: len,
        });
    }
    Ok(&body[..len])
}

/// The `grpc-status` in a response's headers (trailers-only) or trailers.
pub fn grpc_status_code(map: &http::HeaderMap) -> Option<u32> {
    map.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// gRPC status code names, for reasons an operator can read.
pub fn grpc_code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN_CODE")
}

/// Decodes `grpc-message`'s percent-encoding (lossy on bad UTF-8).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn request_round_trips_with_spark_field_numbers() {
        let req = spark_version_request("8d5bd0b8-67d6-4a5b-b3e4-5a1f3b3ff7b1");
        let bytes = req.encode_to_vec();
        // session_id (1, length-delimited) comes first: 0x0a, 36 bytes of UUID.
        assert_eq!(&bytes[..2], &[0x0a, 36]);
        // spark_version (10, length-delimited, empty): 0x52 0x00.
        assert!(bytes.windows(2).any(|w| w == [0x52, 0x00]));
        assert_eq!(AnalyzePlanRequest::decode(&bytes[..]).unwrap(), req);
    }

    #[test]
    fn an_sql_plan_has_spark_field_numbers() {
        let req = ExecutePlanRequest::sql("s", "u", "c", "SELECT 1");
        let bytes = req.encode_to_vec();
        // plan (3) { root (1) { sql (10) { query (1) "SELECT 1" } } }
        let plan = [
            0x1a, 14, 0x0a, 12, 0x52, 10, 0x0a, 8, b'S', b'E', b'L', b'E', b'C', b'T', b' ', b'1',
        ];
        assert!(bytes.windows(plan.len()).any(|w| w == plan), "{bytes:?}");
        assert_eq!(ExecutePlanRequest::decode(&bytes[..]).unwrap(), req);
    }

    #[test]
    fn frames() {
        let f = grpc_frame(&SparkVersion {
            version: "4.0.5".into(),
        });
        let msg = first_message(&f).unwrap();
        assert_eq!(SparkVersion::decode(msg).unwrap().version, "4.0.5");
        assert_eq!(first_message(&[]), Err(FrameError::Empty));
        assert_eq!(
            first_message(&[0, 0, 0, 0, 9, 1]),
            Err(FrameError::Truncated { got: 1, want: 9 })
        );
        assert_eq!(
            first_message(&[1, 0, 0, 0, 0]),
            Err(FrameError::Compressed(1))
        );
        assert_eq!(
            first_message(&[0, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(0xffff_ffff))
        );
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("a%20b%25"), "a b%");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
