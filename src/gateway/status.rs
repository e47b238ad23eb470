//! gRPC statuses the gateway raises itself, sent the way a gRPC server sends them: a
//! "trailers-only" response (HTTP 200, `content-type: application/grpc`, `grpc-status`,
//! `grpc-message`) and, where a retry will help, `grpc-status-details-bin` holding a
//! `google.rpc.Status` with a `google.rpc.RetryInfo` (Spark 4.2 clients wait that long).

use std::time::Duration;

use base64::Engine;

use crate::health::spark_proto::grpc_code_name;
use http::{HeaderMap, HeaderValue};
use prost::Message;

/// The gRPC status codes sclb uses (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        grpc_code_name(self as u32)
    }
}

/// An error status raised by sclb.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
    /// Sent as `google.rpc.RetryInfo.retry_delay`: the client may retry after this long.
    pub retry_after: Option<Duration>,
}

impl Status {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Status {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// UNAVAILABLE with a RetryInfo: what a client should retry (Spark clients retry
    /// UNAVAILABLE; 4.2 waits `after`).
    pub fn unavailable(message: impl Into<String>, after: Duration) -> Self {
        Status {
            code: Code::Unavailable,
            message: message.into(),
            retry_after: Some(after),
        }
    }

    /// The status as gRPC headers (or trailers).
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from(self.code as u32));
        if let Ok(v) = HeaderValue::from_str(&percent_encode(&self.message)) {
            h.insert("grpc-message", v);
        }
        let details = base64::engine::general_purpose::STANDARD_NO_PAD.encode(self.details());
        if let Ok(v) = HeaderValue::from_str(&details) {
            h.insert("grpc-status-details-bin", v);
        }
        h
    }

    /// `google.rpc.Status { code, message, details: [Any(RetryInfo)] }`, protobuf-encoded.
    pub fn details(&self) -> Vec<u8> {
        let retry = self.retry_after.map(|d| RetryInfo {
            retry_delay: Some(PbDuration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
        });
        RpcStatus {
            code: self.code as i32,
            message: self.message.clone(),
            details: retry
                .map(|r| Any {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: r.encode_to_vec(),
                })
                .into_iter()
                .collect(),
        }
        .encode_to_vec()
    }
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<PbDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct PbDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// `grpc-message` encoding: printable ASCII except `%` as is, every other byte as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_carries_a_retry_info_google_can_read() {
        let s = Status::unavailable("no server", Duration::from_millis(1500));
        let h = s.headers();
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["grpc-message"], "no server");
        let bin = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(h["grpc-status-details-bin"].as_bytes())
            .unwrap();
        // Status{code=14, message="no server", details=[Any{type_url, value=RetryInfo{
        // retry_delay=Duration{seconds=1, nanos=500000000}}}]}, as protoc encodes it.
        let mut want = vec![0x08, 14, 0x12, 9];
        want.extend_from_slice(b"no server");
        let url = b"type.googleapis.com/google.rpc.RetryInfo";
        let dur = [0x08, 1, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01];
        let retry_len = 2 + dur.len();
        let any_len = 2 + url.len() + 2 + retry_len;
        want.extend_from_slice(&[0x1a, any_len as u8, 0x0a, url.len() as u8]);
        want.extend_from_slice(url);
        want.extend_from_slice(&[0x12, retry_len as u8, 0x0a, dur.len() as u8]);
        want.extend_from_slice(&dur);
        assert_eq!(bin, want);
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% über"), "50%25 %C3%BCber");
        let h = Status::new(Code::NotFound, "spark app \"x\"\n").headers();
        assert_eq!(h["grpc-message"], "spark app \"x\"%0A");
        assert_eq!(h["grpc-status"], "5");
    }
}
