//! The gateway's routing-key decoder (`gateway::decode`): it reads the Spark session id and
//! user id from whatever prefix of a client's request body has arrived. Input: one byte picks
//! the method, one byte where the body is cut, the rest is the body.
//!
//! No panic; keys within their length limits; `NeedMore(n)` asks for more than it was given;
//! an answer read from a prefix is final (the whole body gives the same one); the best-effort
//! variant agrees whenever the exact one answers; `method()` accepts only its own paths.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sclb::gateway::decode::{
    DecodeError, MAX_SESSION_ID_LEN, MAX_USER_ID_LEN, Method, SERVICE_PREFIX, method, routing_key,
    routing_key_best_effort,
};

fuzz_target!(|data: &[u8]| {
    let [m, cut, body @ ..] = data else {
        return;
    };
    let m = Method::ALL[*m as usize % Method::ALL.len()];
    let whole = routing_key(m, body);
    if let Ok(k) = &whole {
        assert!(!k.session_id.is_empty() && k.session_id.len() <= MAX_SESSION_ID_LEN);
        assert!(
            k.user_id
                .as_ref()
                .is_none_or(|u| u.len() <= MAX_USER_ID_LEN)
        );
        assert!(
            k.new_session_id
                .as_ref()
                .is_none_or(|s| s.len() <= MAX_SESSION_ID_LEN)
        );
        assert_eq!(
            routing_key_best_effort(m, body).as_ref(),
            Ok(k),
            "best effort disagrees"
        );
    }
    if let Err(DecodeError::NeedMore(n)) = whole {
        assert!(
            n > body.len(),
            "NeedMore({n}) with {} bytes given",
            body.len()
        );
    }
    // A prefix of the body: its answer, once it is not NeedMore, is the answer.
    let prefix = &body[..body.len() * *cut as usize / 255];
    match routing_key(m, prefix) {
        Err(DecodeError::NeedMore(n)) => assert!(n > prefix.len()),
        early => assert_eq!(
            early,
            whole,
            "{} of {} bytes answered differently",
            prefix.len(),
            body.len()
        ),
    }
    let _ = routing_key_best_effort(m, prefix);

    let path = String::from_utf8_lossy(body);
    if let Some(found) = method(&path) {
        assert_eq!(path, format!("{SERVICE_PREFIX}{}", found.name()));
    }
});
