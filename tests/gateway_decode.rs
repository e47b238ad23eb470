//! The gateway decoder against request bytes recorded from a real PySpark 4.0.5 client talking
//! to a real Spark Connect server (`tests/fixtures/spark/rpcs/`, see its README and
//! `capture.py`): every fixture yields the session and user `manifest.json` names, and every
//! truncation of it asks for more bytes (never more than needed) or yields the same key.

use std::collections::BTreeSet;
use std::path::Path;

use sclb::gateway::decode::{
    DecodeError, Method, RoutingKey, SERVICE_PREFIX, method, routing_key, routing_key_best_effort,
};
use serde_json::Value;

const DIR: &str = "tests/fixtures/spark/rpcs";

struct Fixture {
    file: String,
    method: Method,
    bytes: Vec<u8>,
    want: RoutingKey,
    user_context_present: bool,
}

fn fixtures() -> Vec<Fixture> {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(DIR).join("manifest.json")).unwrap(),
    )
    .unwrap();
    manifest["fixtures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let file = f["file"].as_str().unwrap().to_owned();
            let name = f["method"].as_str().unwrap();
            Fixture {
                method: method(&format!("{SERVICE_PREFIX}{name}"))
                    .unwrap_or_else(|| panic!("{file}: unknown method {name}")),
                bytes: std::fs::read(Path::new(DIR).join(&file)).unwrap(),
                want: RoutingKey {
                    session_id: f["session_id"].as_str().unwrap().to_owned(),
                    user_id: f["user_id"].as_str().map(str::to_owned),
                    new_session_id: None,
                },
                user_context_present: f["user_context_present"].as_bool().unwrap(),
                file,
            }
        })
        .collect()
}

#[test]
fn gateway_covers_every_rpc_of_the_4_0_client() {
    let seen: BTreeSet<&str> = fixtures().iter().map(|f| f.method.name()).collect();
    let all: BTreeSet<&str> = Method::ALL
        .iter()
        .filter(|m| !matches!(m, Method::CloneSession | Method::GetStatus)) // Spark 4.2 only
        .map(|m| m.name())
        .collect();
    assert_eq!(seen, all);
}

#[test]
fn gateway_decodes_fixtures_to_the_manifest_keys() {
    for f in fixtures() {
        assert_eq!(f.bytes[0], 0, "{}: compressed", f.file);
        let len = u32::from_be_bytes(f.bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 5, f.bytes.len(), "{}: one whole gRPC message", f.file);
        assert_eq!(
            routing_key(f.method, &f.bytes),
            Ok(f.want.clone()),
            "{}",
            f.file
        );
        assert_eq!(
            routing_key_best_effort(f.method, &f.bytes),
            Ok(f.want.clone()),
            "{}",
            f.file
        );
    }
}

/// The smallest body prefix that yields the key.
fn needed(f: &Fixture) -> usize {
    (0..=f.bytes.len())
        .find(|&k| {
            !matches!(
                routing_key(f.method, &f.bytes[..k]),
                Err(DecodeError::NeedMore(_))
            )
        })
        .unwrap()
}

#[test]
fn gateway_truncated_fixtures_need_more_or_give_the_same_key() {
    for f in fixtures() {
        let need = needed(&f);
        for k in 0..=f.bytes.len() {
            match routing_key(f.method, &f.bytes[..k]) {
                Err(DecodeError::NeedMore(m)) => {
                    assert!(k < m && m <= need, "{}: k={k} m={m} need={need}", f.file)
                }
                got => assert_eq!(got, Ok(f.want.clone()), "{}: k={k}", f.file),
            }
        }
    }
}

/// Where the key sits in real requests: with a user id, within the first 64 bytes, whatever
/// follows. Without one, PySpark leaves `user_context` out, and only the header of the last
/// field (after the plan, in an `ExecutePlan`) proves it absent, unless the caller settles for
/// the session id: 43 bytes.
#[test]
fn gateway_keys_sit_at_the_front() {
    for f in fixtures() {
        let need = needed(&f);
        if f.user_context_present {
            assert!(need <= 64, "{}: key complete after {need} bytes", f.file);
        } else {
            assert!(need > 43, "{}: key complete after {need} bytes", f.file);
            let session_only = RoutingKey {
                user_id: None,
                ..f.want.clone()
            };
            assert_eq!(
                routing_key_best_effort(f.method, &f.bytes[..43]),
                Ok(session_only),
                "{}",
                f.file
            );
        }
    }
}
