//! What the spark probe decodes from a server's bytes: the gRPC frame (`first_message`), the
//! `AnalyzePlanResponse` (`decode_version`) and the `grpc-message` header (`percent_decode`).
//! No panic; no allocation beyond the input (libFuzzer's -rss_limit_mb and -malloc_limit_mb
//! catch a length field believed blindly); a message never reaches past the frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sclb::health::probe::decode_version;
use sclb::health::spark_proto::{MAX_REPLY, first_message, percent_decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = first_message(data) {
        assert!(msg.len() <= MAX_REPLY);
        assert_eq!(
            msg.len() as u64,
            u32::from_be_bytes(data[1..5].try_into().unwrap()) as u64
        );
        assert_eq!(msg, &data[5..5 + msg.len()]);
    }
    if let Ok(version) = decode_version(data) {
        assert!(!version.is_empty());
        assert!(version.len() <= MAX_REPLY);
    }
    let header = String::from_utf8_lossy(data);
    assert!(percent_decode(&header).len() <= header.len());
});
