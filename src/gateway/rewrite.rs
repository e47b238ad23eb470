//! The two edits the gateway makes inside Spark Connect messages when it knows who a client
//! is and holds a secret for the servers:
//!
//! - [`UserInjector`]: the request's first message gets a `user_context` (field 2) naming the
//!   authenticated identity, appended at the message's end. Protobuf merges a repeated message
//!   field and the last `user_id` wins, so whatever the client put anywhere in its message
//!   (first, or after a plan of many megabytes) is overridden without buffering the plan.
//! - [`redact_config`]: in a `ConfigResponse`, every pair whose key is Spark's authentication
//!   token setting or whose value holds the backend token gets Spark's own redaction mark as
//!   its value (the client still gets an answer for every key it asked), and every warning
//!   that holds the token is dropped.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Spark's setting for the pre-shared token its server requires.
pub const SPARK_TOKEN_KEY: &str = "spark.connect.authenticate.token";

/// What Spark itself shows for a redacted setting.
pub const REDACTED: &str = "*********(redacted)";

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

fn put_bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `user_context { user_id: user, user_name: user }` as field 2 of a request.
fn user_context_field(user: &str) -> Vec<u8> {
    let mut inner = Vec::new();
    put_bytes_field(&mut inner, 1, user.as_bytes());
    put_bytes_field(&mut inner, 2, user.as_bytes());
    let mut out = Vec::new();
    put_bytes_field(&mut out, 2, &inner);
    out
}

/// Why a request cannot carry the identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the request does not start with an uncompressed gRPC message")]
    NotGrpc,
    #[error("the request message is too large")]
    TooLarge,
}

/// Appends the identity's `user_context` to the first message of a request stream.
pub struct UserInjector {
    /// Bytes of the first message still to pass before the suffix goes in.
    remaining: u64,
    suffix: Option<Bytes>,
}

impl UserInjector {
    /// Starts on the request's first bytes (at least the 5-byte gRPC prefix): returns them
    /// with the message length grown, and the suffix already placed if the message ends
    /// within them.
    pub fn start(head: &[u8], user: &str) -> Result<(Bytes, UserInjector), InjectError> {
        let Some(&[0, a, b, c, d]) = head.get(..5) else {
            return Err(InjectError::NotGrpc);
        };
        let len = u64::from(u32::from_be_bytes([a, b, c, d]));
        let ours = user_context_field(user);
        // The buffered part of the first message: every user_context wholly inside it is
        // replaced in place too, so a reader that takes the first occurrence (sclb's own
        // decoder, a proxy further on) agrees with Spark, which takes the last.
        let avail = (head.len() - 5).min(len as usize);
        let mut body = Vec::with_capacity(head.len() + ours.len());
        let mut pos = 0;
        while pos < avail {
            let mut p = pos;
            let Some(tag) = get_varint(&head[5..5 + avail], &mut p) else {
                break;
            };
            let end = match tag & 7 {
                0 => get_varint(&head[5..5 + avail], &mut p).map(|_| p),
                1 => Some(p + 8),
                2 => get_varint(&head[5..5 + avail], &mut p)
                    .and_then(|n| usize::try_from(n).ok())
                    .and_then(|n| p.checked_add(n)),
                5 => Some(p + 4),
                _ => None,
            };
            let Some(end) = end.filter(|e| *e <= avail) else {
                break;
            };
            if tag == (2 << 3) | 2 {
                body.extend_from_slice(&ours);
            } else {
                body.extend_from_slice(&head[5 + pos..5 + end]);
            }
            pos = end;
        }
        let replaced = body.len() as u64;
        body.extend_from_slice(&head[5 + pos..]);
        // The message grows by what the replacements added and by the appended suffix.
        let new_len = (len + replaced + ours.len() as u64)
            .checked_sub(pos as u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(InjectError::TooLarge)?;
        let mut inj = UserInjector {
            remaining: len - pos as u64,
            suffix: Some(Bytes::from(ours)),
        };
        let mut out = BytesMut::with_capacity(body.len() + 64);
        out.extend_from_slice(&[0]);
        out.extend_from_slice(&new_len.to_be_bytes());
        out.extend_from_slice(&body[..replaced as usize]);
        for piece in inj.feed(Bytes::copy_from_slice(&body[replaced as usize..])) {
            out.extend_from_slice(&piece);
        }
        Ok((out.freeze(), inj))
    }

    /// Passes on the next bytes of the request, the suffix inserted where the first message
    /// ends.
    pub fn feed(&mut self, mut chunk: Bytes) -> Vec<Bytes> {
        let Some(suffix) = &self.suffix else {
            return vec![chunk];
        };
        if (chunk.len() as u64) < self.remaining {
            self.remaining -= chunk.len() as u64;
            return vec![chunk];
        }
        let rest = chunk.split_off(self.remaining as usize);
        let out = vec![chunk, suffix.clone(), rest];
        self.suffix = None;
        self.remaining = 0;
        out.into_iter().filter(|b| !b.is_empty()).collect()
    }
}

/// A top-level field: number, wire type, its whole encoding, and its payload (length-delimited
/// fields only), as ranges of the message.
type Field = (u64, u64, Range<usize>, Option<Range<usize>>);

/// The top-level fields of a message; `None` if it does not parse.
fn fields(msg: &[u8]) -> Option<Vec<Field>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < msg.len() {
        let start = pos;
        let tag = get_varint(msg, &mut pos)?;
        let (field, wire) = (tag >> 3, tag & 7);
        let payload = match wire {
            0 => {
                get_varint(msg, &mut pos)?;
                None
            }
            1 => {
                pos = pos.checked_add(8)?;
                None
            }
            2 => {
                let n = usize::try_from(get_varint(msg, &mut pos)?).ok()?;
                let p = pos;
                pos = pos.checked_add(n)?;
                Some(p..pos)
            }
            5 => {
                pos = pos.checked_add(4)?;
                None
            }
            _ => return None,
        };
        if pos > msg.len() {
            return None;
        }
        out.push((field, wire, start..pos, payload));
    }
    Some(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A `ConfigResponse` message (without its gRPC prefix) with the token taken out: pairs
/// (field 2) keyed by [`SPARK_TOKEN_KEY`] or whose value holds `token`, and warnings
/// (field 3) that hold it. `None` if the message does not parse (the caller then withholds it).
pub fn redact_config(msg: &[u8], token: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(msg.len());
    for (field, wire, whole, payload) in fields(msg)? {
        match (field, wire, &payload) {
            (2, 2, Some(p)) => {
                let kv = &msg[p.clone()];
                // A key repeated in one pair: a client reads the last one (protobuf's rule),
                // and any of them naming the token's key redacts the pair.
                let mut key: Option<&[u8]> = None;
                let mut key_hit = false;
                for (f, w, _, pl) in fields(kv)? {
                    if let (1, 2, Some(r)) = (f, w, &pl) {
                        let k = &kv[r.clone()];
                        key_hit |= k.eq_ignore_ascii_case(SPARK_TOKEN_KEY.as_bytes());
                        key = Some(k);
                    }
                }
                if key_hit || contains(kv, token.as_bytes()) {
                    let mut pair = Vec::new();
                    put_bytes_field(&mut pair, 1, key.unwrap_or_default());
                    put_bytes_field(&mut pair, 2, REDACTED.as_bytes());
                    put_bytes_field(&mut out, 2, &pair);
                } else {
                    out.extend_from_slice(&msg[whole]);
                }
            }
            (3, 2, Some(p)) if contains(&msg[p.clone()], token.as_bytes()) => {}
            _ => out.extend_from_slice(&msg[whole]),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(msg: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v
    }

    fn request(session: &str, user: Option<&str>, tail: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, session.as_bytes());
        if let Some(u) = user {
            let mut uc = Vec::new();
            put_bytes_field(&mut uc, 1, u.as_bytes());
            put_bytes_field(&mut m, 2, &uc);
        }
        m.extend_from_slice(tail);
        grpc(&m)
    }

    /// What Spark reads: the last user_id of every user_context occurrence (merge rules).
    fn user_seen(body: &[u8]) -> Option<String> {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let msg = &body[5..5 + len];
        let mut user = None;
        for (f, _, _, p) in fields(msg).unwrap() {
            if f == 2 {
                for (g, _, _, q) in fields(&msg[p.clone().unwrap()]).unwrap() {
                    if g == 1 {
                        user = Some(
                            String::from_utf8(msg[p.clone().unwrap()][q.unwrap()].to_vec())
                                .unwrap(),
                        );
                    }
                }
            }
        }
        user
    }

    #[test]
    fn the_identity_wins_however_the_request_is_split() {
        let sid = "8d2c0a8e-6a3e-4a8f-9f52-3f6b0c3f1f11";
        // A plan field (3) after the user, then a second message of a client stream.
        let mut plan = Vec::new();
        put_bytes_field(&mut plan, 3, &[7u8; 300]);
        let mut body = request(sid, Some("mallory"), &plan);
        let first_len = body.len();
        body.extend_from_slice(&request(sid, Some("mallory"), b""));
        for cut in [
            5,
            6,
            40,
            first_len - 1,
            first_len,
            first_len + 3,
            body.len(),
        ] {
            let (head, mut inj) = UserInjector::start(&body[..cut], "alice").unwrap();
            let mut out = head.to_vec();
            for piece in body[cut..].chunks(17) {
                for b in inj.feed(Bytes::copy_from_slice(piece)) {
                    out.extend_from_slice(&b);
                }
            }
            assert_eq!(user_seen(&out).as_deref(), Some("alice"), "cut at {cut}");
            if cut >= 60 {
                // The user_context was in the buffered head: replaced there too.
                let first = crate::gateway::decode::routing_key(
                    crate::gateway::decode::Method::ExecutePlan,
                    &out,
                )
                .unwrap();
                assert_eq!(first.user_id.as_deref(), Some("alice"), "cut at {cut}");
                let len = u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize;
                assert!(!contains(&out[..5 + len], b"mallory"), "cut at {cut}");
            }
            // The second message is untouched and follows the first.
            let len = u32::from_be_bytes(out[1..5].try_into().unwrap()) as usize;
            assert_eq!(&out[5 + len..], &body[first_len..], "cut at {cut}");
        }
    }

    #[test]
    fn a_request_without_user_context_gets_one() {
        let body = request("8d2c0a8e-6a3e-4a8f-9f52-3f6b0c3f1f11", None, b"");
        let (head, _) = UserInjector::start(&body, "bob").unwrap();
        assert_eq!(user_seen(&head).as_deref(), Some("bob"));
        assert_eq!(
            UserInjector::start(&[1, 0, 0, 0, 0], "bob").err(),
            Some(InjectError::NotGrpc)
        );
    }

    #[test]
    fn config_responses_lose_the_token_and_keep_the_rest() {
        let kv = |k: &str, v: &str| {
            let mut p = Vec::new();
            put_bytes_field(&mut p, 1, k.as_bytes());
            put_bytes_field(&mut p, 2, v.as_bytes());
            p
        };
        let mut m = Vec::new();
        put_bytes_field(&mut m, 1, b"sid");
        put_bytes_field(&mut m, 2, &kv("spark.app.name", "x"));
        put_bytes_field(&mut m, 2, &kv(SPARK_TOKEN_KEY, "s3cr3t-backend"));
        put_bytes_field(&mut m, 2, &kv("spark.other", "has s3cr3t-backend inside"));
        put_bytes_field(&mut m, 3, b"warning about s3cr3t-backend");
        put_bytes_field(&mut m, 4, b"server-side");
        let out = redact_config(&m, "s3cr3t-backend").unwrap();
        assert!(!contains(&out, b"s3cr3t-backend"));
        assert!(contains(&out, SPARK_TOKEN_KEY.as_bytes()));
        assert!(contains(&out, REDACTED.as_bytes()));
        assert!(contains(&out, b"spark.app.name"));
        assert!(contains(&out, b"server-side"));
        assert!(redact_config(&[0xff], "t").is_none());

        // A pair with two keys: a client reads the last, so a later token key still redacts
        // (what fuzz/config_redact checks).
        let mut pair = Vec::new();
        put_bytes_field(&mut pair, 1, b"harmless");
        put_bytes_field(&mut pair, 1, SPARK_TOKEN_KEY.as_bytes());
        put_bytes_field(&mut pair, 2, b"other-value");
        let mut m = Vec::new();
        put_bytes_field(&mut m, 2, &pair);
        let out = redact_config(&m, "s3cr3t-backend").unwrap();
        assert!(contains(&out, REDACTED.as_bytes()));
        assert!(!contains(&out, b"other-value"));
    }
}
