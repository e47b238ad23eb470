//! The gateway's `Config` response redaction (`rewrite::redact_config`), fed any message a
//! server could send and any backend token. Input: one byte gives the token's length (1-32),
//! then the token, then the `ConfigResponse` message.
//!
//! No panic; what a client decodes from a redacted message (prost, protobuf's rules: the last
//! of a repeated scalar wins, unknown fields skipped) never holds the token in a pair or a
//! warning, and a pair keyed `spark.connect.authenticate.token` (any case) carries the
//! redaction mark; redacting again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sclb::gateway::rewrite::{REDACTED, SPARK_TOKEN_KEY, redact_config};

/// Spark Connect's `ConfigResponse` as a client decodes it (bytes for strings, so that any
/// input decodes as far as protobuf allows).
#[derive(Clone, PartialEq, Message)]
struct ConfigResponse {
    #[prost(bytes = "vec", tag = "1")]
    session_id: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    pairs: Vec<KeyValue>,
    #[prost(bytes = "vec", repeated, tag = "3")]
    warnings: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "4")]
    server_side_session_id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "2")]
    value: Option<Vec<u8>>,
}

fn holds(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fuzz_target!(|data: &[u8]| {
    let [n, rest @ ..] = data else {
        return;
    };
    let n = (*n as usize % 32) + 1;
    if rest.len() < n {
        return;
    }
    let (token, msg) = rest.split_at(n);
    let Ok(token) = std::str::from_utf8(token) else {
        return;
    };
    let Some(out) = redact_config(msg, token) else {
        return;
    };
    assert_eq!(redact_config(&out, token).as_deref(), Some(out.as_slice()));
    let Ok(seen) = ConfigResponse::decode(out.as_slice()) else {
        return;
    };
    for p in &seen.pairs {
        let value = p.value.as_deref().unwrap_or_default();
        // The mark itself may hold a (one-character) token: it reveals nothing.
        assert!(
            value == REDACTED.as_bytes() || !holds(value, token.as_bytes()),
            "a pair's value holds the token"
        );
        if p.key.eq_ignore_ascii_case(SPARK_TOKEN_KEY.as_bytes()) {
            assert_eq!(value, REDACTED.as_bytes());
        }
    }
    for w in &seen.warnings {
        assert!(!holds(w, token.as_bytes()), "a warning holds the token");
    }
});
