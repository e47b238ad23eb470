//! Routing keys from the first bytes of a Spark Connect request.
//!
//! The gateway must pick a backend before it forwards a request, yet the key it routes by
//! (which Spark session the RPC belongs to) sits inside the request's protobuf body. Every
//! `SparkConnectService` request carries `session_id` as field 1 (string) and `user_context` as
//! field 2 (a message whose field 1 is `user_id`); Spark keys its sessions by the pair. Real
//! clients put both at the very front (`0a 24` + 36-byte UUID, then `12 ..`), within about 60
//! bytes, but a plan of many megabytes may follow, so this decoder works on whatever prefix of
//! the HTTP/2 request body has arrived and says how much more it needs.
//!
//! It is a hand-rolled scan of protobuf fields rather than a generated parser because it must be
//! bounded on untrusted input: it reads only the bytes it is given, never allocates by a length
//! read off the wire, copies at most two short strings, accepts fields in any order (protobuf
//! allows it) and skips the ones it does not need without looking at their contents.
//!
//! Fixtures recorded from a real PySpark 4.0.5 client are in `tests/fixtures/spark/rpcs/`.

use std::fmt;

/// gRPC path prefix of every Spark Connect RPC.
pub const SERVICE_PREFIX: &str = "/spark.connect.SparkConnectService/";

/// Longest session id accepted. Spark wants a UUID (36 bytes); the slack only lets a
/// non-UUID be reported as such rather than as too long.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// Longest user id accepted. Spark sets no limit; this one keeps stick-table keys and log lines
/// small while leaving room for long principal names.
pub const MAX_USER_ID_LEN: usize = 256;

/// The gRPC message prefix: compressed flag (1 byte), message length (u32, big endian).
const GRPC_PREFIX: usize = 5;

/// Longest valid varint (a u64 in 7-bit groups).
const MAX_VARINT_LEN: usize = 10;

/// Every RPC of `spark.connect.SparkConnectService` (Spark 4.2; `CloneSession` and `GetStatus`
/// are new there, the rest exist since 3.4-4.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    ExecutePlan,
    AnalyzePlan,
    Config,
    AddArtifacts,
    ArtifactStatus,
    Interrupt,
    ReattachExecute,
    ReleaseExecute,
    ReleaseSession,
    FetchErrorDetails,
    CloneSession,
    GetStatus,
}

impl Method {
    pub const ALL: [Method; 12] = [
        Method::ExecutePlan,
        Method::AnalyzePlan,
        Method::Config,
        Method::AddArtifacts,
        Method::ArtifactStatus,
        Method::Interrupt,
        Method::ReattachExecute,
        Method::ReleaseExecute,
        Method::ReleaseSession,
        Method::FetchErrorDetails,
        Method::CloneSession,
        Method::GetStatus,
    ];

    /// The method's position in [`Method::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The method name as it appears in the gRPC path.
    pub fn name(self) -> &'static str {
        match self {
            Method::ExecutePlan => "ExecutePlan",
            Method::AnalyzePlan => "AnalyzePlan",
            Method::Config => "Config",
            Method::AddArtifacts => "AddArtifacts",
            Method::ArtifactStatus => "ArtifactStatus",
            Method::Interrupt => "Interrupt",
            Method::ReattachExecute => "ReattachExecute",
            Method::ReleaseExecute => "ReleaseExecute",
            Method::ReleaseSession => "ReleaseSession",
            Method::FetchErrorDetails => "FetchErrorDetails",
            Method::CloneSession => "CloneSession",
            Method::GetStatus => "GetStatus",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The Spark Connect method a request path (`:path`) names; `None` for anything else, which
/// the gateway answers with UNIMPLEMENTED as Spark does.
pub fn method(path: &str) -> Option<Method> {
    let name = path.strip_prefix(SERVICE_PREFIX)?;
    Method::ALL.into_iter().find(|m| m.name() == name)
}

/// What a request is routed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoutingKey {
    /// Field 1, checked to be what Spark accepts as a UUID.
    pub session_id: String,
    /// Field 2.1. `None` when absent or empty: proto3 cannot tell the two apart, and Spark keys
    /// such a session by the empty user id either way.
    pub user_id: Option<String>,
    /// `CloneSession` only (field 4): the session to create beside the source, so it must be
    /// pinned to the source's backend. `None` when absent (the server then picks one).
    pub new_session_id: Option<String>,
}

/// Why no routing key could be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The key lies beyond the bytes given: call again once the body holds at least this many
    /// bytes (counted from the start of the gRPC prefix).
    #[error("need at least {0} bytes of the request body")]
    NeedMore(usize),
    /// The compressed flag is set although no `grpc-encoding` was negotiated (Spark clients
    /// never compress requests).
    #[error("compressed gRPC request message, but no compression was negotiated")]
    Compressed,
    /// Not a well-formed gRPC message holding protobuf.
    #[error("malformed request message: {0}")]
    Malformed(&'static str),
    /// The message ended without a non-empty `session_id`; Spark rejects that as
    /// `INVALID_HANDLE.FORMAT`.
    #[error("request has no session_id")]
    MissingSessionId,
    /// A key field longer than its limit (declared length; the bytes need not have arrived).
    #[error("{field} is {len} bytes long, more than {max}")]
    TooLong {
        field: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{field} is not valid UTF-8")]
    NotUtf8 { field: &'static str },
    /// Spark's `UUID.fromString` would reject it (`INVALID_HANDLE.FORMAT`).
    #[error("{field} {value:?} is not a UUID")]
    NotUuid { field: &'static str, value: String },
}

use DecodeError::{Malformed, NeedMore};

/// The routing key of a request whose body starts with `body` (the 5-byte gRPC prefix, then
/// as much of the first message as has arrived).
///
/// Fields may come in any order and unknown fields are skipped. The answer is final as soon as
/// `session_id` and `user_context` (and, for `CloneSession`, `new_session_id`) have been read,
/// or the message has ended; until then it is [`DecodeError::NeedMore`]. A field that appears
/// twice is taken at its first occurrence: protobuf says the last one wins, but honouring that
/// would mean reading every plan to its end, and no Spark client repeats these fields.
///
/// A request without `user_context` (a client with no user id) is only known to lack it once the
/// header of its last field has arrived, after the plan; see [`routing_key_best_effort`] for
/// callers that cannot wait that long.
pub fn routing_key(method: Method, body: &[u8]) -> Result<RoutingKey, DecodeError> {
    let mut found = Found::default();
    found.scan(method, body)?;
    found.into_key()
}

/// Like [`routing_key`], but once `session_id` is known, answers with the key read so far
/// instead of [`DecodeError::NeedMore`]; `user_id` (or `new_session_id`) is then `None` if not
/// yet seen. For a caller that has buffered as much as it is willing to: PySpark sends no
/// `user_context` at all when it has no user id, so proving its absence from an `ExecutePlan`
/// would mean buffering the whole plan.
pub fn routing_key_best_effort(method: Method, body: &[u8]) -> Result<RoutingKey, DecodeError> {
    let mut found = Found::default();
    match found.scan(method, body) {
        Err(NeedMore(_)) if found.session_id.is_some() => {}
        r => r?,
    }
    found.into_key()
}

/// Key fields seen so far.
#[derive(Default)]
struct Found {
    session_id: Option<String>,
    user_context: bool,
    user_id: Option<String>,
    new_session_id: Option<String>,
}

impl Found {
    fn into_key(self) -> Result<RoutingKey, DecodeError> {
        Ok(RoutingKey {
            session_id: self.session_id.ok_or(DecodeError::MissingSessionId)?,
            user_id: self.user_id,
            new_session_id: self.new_session_id,
        })
    }

    fn complete(&self, method: Method) -> bool {
        self.session_id.is_some()
            && self.user_context
            && (method != Method::CloneSession || self.new_session_id.is_some())
    }

    /// Scans the gRPC prefix and the top-level fields of the message, stopping early once
    /// [`Found::complete`].
    fn scan(&mut self, method: Method, body: &[u8]) -> Result<(), DecodeError> {
        match body.first() {
            None => return Err(NeedMore(GRPC_PREFIX)),
            Some(0) => {}
            Some(1) => return Err(DecodeError::Compressed),
            Some(_) => return Err(Malformed("gRPC compressed flag is neither 0 nor 1")),
        }
        let Some(&[_, a, b, c, d]) = body.get(..GRPC_PREFIX) else {
            return Err(NeedMore(GRPC_PREFIX));
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        let mut r = Reader {
            body,
            pos: GRPC_PREFIX,
            end: GRPC_PREFIX.saturating_add(len),
        };
        while let Some((field, value)) = r.next_field()? {
            match (field, value) {
                (1, Value::Bytes(range)) if self.session_id.is_none() => {
                    self.session_id =
                        r.key_string(range, "session_id", MAX_SESSION_ID_LEN, true)?;
                }
                (2, Value::Bytes(range)) if !self.user_context => {
                    self.user_context = true;
                    self.user_id = user_id(body, range)?;
                }
                (4, Value::Bytes(range))
                    if method == Method::CloneSession && self.new_session_id.is_none() =>
                {
                    self.new_session_id =
                        r.key_string(range, "new_session_id", MAX_SESSION_ID_LEN, true)?;
                }
                _ => {}
            }
            if self.complete(method) {
                break;
            }
        }
        Ok(())
    }
}

/// `user_id` (field 1) of the `UserContext` message at `range` of the body.
fn user_id(body: &[u8], range: Span) -> Result<Option<String>, DecodeError> {
    let mut r = Reader {
        body,
        pos: range.start,
        end: range.end,
    };
    while let Some((field, value)) = r.next_field()? {
        if let (1, Value::Bytes(range)) = (field, value) {
            let id = r.key_string(range, "user_context.user_id", MAX_USER_ID_LEN, false)?;
            if id.is_some() {
                return Ok(id);
            }
        }
    }
    Ok(None)
}

/// A byte range of the body: `start..end`, where `end` may lie beyond what has arrived.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// A field's value: only length-delimited ones are ever looked at.
enum Value {
    Other,
    Bytes(Span),
}

/// A cursor over the fields of one message, `pos..end` of the body. `end` is the message's
/// declared end and may lie beyond `body.len()`: whatever runs past the body is
/// [`DecodeError::NeedMore`], whatever runs past `end` is [`DecodeError::Malformed`].
struct Reader<'a> {
    body: &'a [u8],
    pos: usize,
    end: usize,
}

impl Reader<'_> {
    /// The next field's number and value, or `None` at the end of the message. Skipping a value
    /// needs only its length, not its bytes.
    fn next_field(&mut self) -> Result<Option<(u64, Value)>, DecodeError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let tag = self.varint()?;
        let field = tag >> 3;
        if field == 0 || field > 0x1FFF_FFFF {
            return Err(Malformed("field number out of range"));
        }
        let value = match tag & 7 {
            0 => {
                self.varint()?;
                Value::Other
            }
            1 => {
                self.skip(8)?;
                Value::Other
            }
            5 => {
                self.skip(4)?;
                Value::Other
            }
            2 => {
                let len = self.varint()?;
                let start = self.pos;
                self.skip(len)?;
                Value::Bytes(Span {
                    start,
                    end: self.pos,
                })
            }
            // Groups (3, 4) are deprecated and absent from Spark's protos; 6 and 7 do not exist.
            _ => return Err(Malformed("unsupported wire type")),
        };
        Ok(Some((field, value)))
    }

    /// Reads a varint, at most [`MAX_VARINT_LEN`] bytes.
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for i in 0..MAX_VARINT_LEN {
            let at = self.pos + i;
            if at >= self.end {
                return Err(Malformed("varint runs past the end of its message"));
            }
            let Some(&byte) = self.body.get(at) else {
                return Err(NeedMore(at + 1));
            };
            if i == MAX_VARINT_LEN - 1 && byte > 1 {
                return Err(Malformed("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7F) << (7 * i);
            if byte < 0x80 {
                self.pos = at + 1;
                return Ok(value);
            }
        }
        Err(Malformed("varint longer than 10 bytes"))
    }

    fn skip(&mut self, len: u64) -> Result<(), DecodeError> {
        let to = usize::try_from(len)
            .ok()
            .and_then(|len| self.pos.checked_add(len))
            .filter(|&to| to <= self.end)
            .ok_or(Malformed("field runs past the end of its message"))?;
        self.pos = to;
        Ok(())
    }

    /// A key string at `range`: at most `max` bytes, UTF-8, and if `uuid`, what Spark accepts
    /// as a UUID. `None` if empty, which proto3 treats as absent.
    fn key_string(
        &self,
        range: Span,
        field: &'static str,
        max: usize,
        uuid: bool,
    ) -> Result<Option<String>, DecodeError> {
        let len = range.end - range.start;
        if len > max {
            return Err(DecodeError::TooLong {
                field,
                len: len as u64,
                max,
            });
        }
        let Some(bytes) = self.body.get(range.start..range.end) else {
            return Err(NeedMore(range.end));
        };
        let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8 { field })?;
        if s.is_empty() {
            return Ok(None);
        }
        if uuid && !java_uuid(s) {
            return Err(DecodeError::NotUuid {
                field,
                value: s.to_owned(),
            });
        }
        Ok(Some(s.to_owned()))
    }
}

/// Whether Java's `UUID.fromString`, which is how Spark validates a new session id, could
/// accept `s`. For ASCII this is exact, including Java's leniency: at most 36 characters, five
/// dash-separated parts, each an optional `+` and at least one hex digit whose value fits in an
/// i64 (so `1-2-3-4-5` is accepted, as Spark does). Java also takes digits of other scripts;
/// a non-ASCII part is let through and left to Spark, so the gateway is never stricter than the
/// server it stands in for.
fn java_uuid(s: &str) -> bool {
    // The canonical form (what every Spark client sends), accepted in one pass: the general
    // check below costs ~1,500 instructions per RPC.
    let b = s.as_bytes();
    if b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
    {
        return true;
    }
    if s.encode_utf16().count() > 36 || s.split('-').count() != 5 {
        return false;
    }
    s.split('-').all(|part| {
        let digits = part.strip_prefix('+').unwrap_or(part);
        if digits.is_empty() || !digits.is_ascii() {
            return !digits.is_empty();
        }
        let significant = digits.trim_start_matches('0');
        digits.bytes().all(|b| b.is_ascii_hexdigit())
            && (significant.len() < 16
                || (significant.len() == 16
                    && significant.starts_with(|c| ('0'..='7').contains(&c))))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SID: &str = "5c1b0000-6761-7465-8000-000000000011";

    #[test]
    fn method_index_is_its_place_in_all() {
        for (i, m) in Method::ALL.into_iter().enumerate() {
            assert_eq!(m.index(), i, "{m:?}");
        }
    }

    /// Protobuf encoding for tests: varints, tags and length-delimited fields.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn bytes_field(field: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint(field << 3 | 2, &mut out);
        varint(value.len() as u64, &mut out);
        out.extend_from_slice(value);
        out
    }

    fn user_context(user: &str) -> Vec<u8> {
        bytes_field(2, &bytes_field(1, user.as_bytes()))
    }

    /// A gRPC message: flag 0, length, then the concatenated fields.
    fn grpc(fields: &[Vec<u8>]) -> Vec<u8> {
        let msg = fields.concat();
        let mut out = vec![0];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(&msg);
        out
    }

    fn key(session: &str, user: Option<&str>) -> RoutingKey {
        RoutingKey {
            session_id: session.into(),
            user_id: user.map(Into::into),
            new_session_id: None,
        }
    }

    /// The smallest prefix length at which `routing_key` stops asking for more.
    fn needed(method: Method, msg: &[u8]) -> usize {
        (0..=msg.len())
            .find(|&k| !matches!(routing_key(method, &msg[..k]), Err(NeedMore(_))))
            .unwrap()
    }

    #[test]
    fn method_names_round_trip() {
        for m in Method::ALL {
            assert_eq!(method(&format!("{SERVICE_PREFIX}{m}")), Some(m));
        }
        assert_eq!(method("/spark.connect.SparkConnectService/Nope"), None);
        assert_eq!(method("/grpc.health.v1.Health/Check"), None);
        assert_eq!(method("/spark.connect.SparkConnectService/"), None);
        assert_eq!(method("spark.connect.SparkConnectService/Config"), None);
    }

    #[test]
    fn canonical_request() {
        let msg = grpc(&[
            bytes_field(1, SID.as_bytes()),
            user_context("alice"),
            bytes_field(3, b"plan"),
        ]);
        assert_eq!(
            routing_key(Method::ExecutePlan, &msg),
            Ok(key(SID, Some("alice")))
        );
        // The plan is never needed: the key is complete after user_context.
        assert_eq!(needed(Method::ExecutePlan, &msg), 5 + 38 + 9);
    }

    #[test]
    fn fields_out_of_order_and_unknown_fields_first() {
        let mut unknown = Vec::new();
        varint(7 << 3, &mut unknown); // varint field 7
        varint(300, &mut unknown);
        varint(9 << 3 | 1, &mut unknown); // fixed64
        unknown.extend_from_slice(&[0xff; 8]);
        varint(10 << 3 | 5, &mut unknown); // fixed32
        unknown.extend_from_slice(&[0xff; 4]);
        varint(999 << 3 | 2, &mut unknown); // multi-byte tag, length-delimited
        varint(3, &mut unknown);
        unknown.extend_from_slice(b"abc");
        let msg = grpc(&[
            unknown,
            bytes_field(3, &bytes_field(1, b"nested session_id is not ours")),
            user_context("bob"),
            bytes_field(1, SID.as_bytes()),
        ]);
        assert_eq!(
            routing_key(Method::AnalyzePlan, &msg),
            Ok(key(SID, Some("bob")))
        );
    }

    #[test]
    fn field_1_with_another_wire_type_is_skipped_like_an_unknown_field() {
        let mut wrong = Vec::new();
        varint(1 << 3, &mut wrong);
        varint(5, &mut wrong);
        let msg = grpc(&[wrong, bytes_field(1, SID.as_bytes())]);
        assert_eq!(routing_key(Method::Config, &msg), Ok(key(SID, None)));
    }

    #[test]
    fn first_occurrence_wins() {
        let other = "00000000-0000-0000-0000-000000000000";
        let msg = grpc(&[
            bytes_field(1, SID.as_bytes()),
            bytes_field(1, other.as_bytes()),
            user_context("a"),
            user_context("b"),
        ]);
        assert_eq!(routing_key(Method::Config, &msg), Ok(key(SID, Some("a"))));
    }

    #[test]
    fn need_more_names_the_minimum() {
        let msg = grpc(&[bytes_field(1, SID.as_bytes()), user_context("carol")]);
        assert_eq!(routing_key(Method::Config, &[]), Err(NeedMore(5)));
        assert_eq!(routing_key(Method::Config, &msg[..3]), Err(NeedMore(5)));
        assert_eq!(routing_key(Method::Config, &msg[..5]), Err(NeedMore(6)));
        assert_eq!(routing_key(Method::Config, &msg[..6]), Err(NeedMore(7)));
        // Inside the session id: all 36 bytes are needed at once.
        assert_eq!(routing_key(Method::Config, &msg[..7]), Err(NeedMore(43)));
        assert_eq!(routing_key(Method::Config, &msg[..42]), Err(NeedMore(43)));
        assert_eq!(routing_key(Method::Config, &msg[..43]), Err(NeedMore(44)));
        // Inside user_context: the user id's bytes.
        assert_eq!(routing_key(Method::Config, &msg[..47]), Err(NeedMore(52)));
        assert_eq!(
            routing_key(Method::Config, &msg[..52]),
            Ok(key(SID, Some("carol")))
        );
        // A multi-byte varint cut in the middle.
        let big = grpc(&[bytes_field(3, &[0; 300]), bytes_field(1, SID.as_bytes())]);
        assert_eq!(routing_key(Method::Config, &big[..7]), Err(NeedMore(8)));
        // Skipping a field needs no bytes of it: only the next tag.
        assert_eq!(routing_key(Method::Config, &big[..8]), Err(NeedMore(309)));
    }

    #[test]
    fn no_user_context_is_known_only_at_the_end_unless_best_effort() {
        // As PySpark sends it without a user id: session_id, plan, then client_type.
        let plan = vec![7u8; 100_000];
        let msg = grpc(&[
            bytes_field(1, SID.as_bytes()),
            bytes_field(3, &plan),
            bytes_field(4, b"_SPARK_CONNECT_PYTHON"),
        ]);
        let cut = &msg[..200];
        let after_plan = 5 + 38 + 4 + plan.len();
        assert_eq!(
            routing_key(Method::ExecutePlan, cut),
            Err(NeedMore(after_plan + 1))
        );
        assert_eq!(
            routing_key_best_effort(Method::ExecutePlan, cut),
            Ok(key(SID, None))
        );
        assert_eq!(routing_key(Method::ExecutePlan, &msg), Ok(key(SID, None)));
        // Best effort still waits for the session id.
        assert_eq!(
            routing_key_best_effort(Method::ExecutePlan, &msg[..20]),
            Err(NeedMore(43))
        );
    }

    #[test]
    fn huge_declared_message_is_fine_when_the_key_comes_first() {
        let mut msg = vec![0, 0xff, 0xff, 0xff, 0xff];
        msg.extend(bytes_field(1, SID.as_bytes()));
        msg.extend(user_context("dave"));
        assert_eq!(
            routing_key(Method::ExecutePlan, &msg),
            Ok(key(SID, Some("dave")))
        );
    }

    #[test]
    fn oversized_lengths() {
        let long = "a".repeat(65);
        let msg = grpc(&[bytes_field(1, long.as_bytes())]);
        let too_long = Err(DecodeError::TooLong {
            field: "session_id",
            len: 65,
            max: 64,
        });
        assert_eq!(routing_key(Method::Config, &msg), too_long);
        // Known from the declared length alone, before the bytes arrive.
        assert_eq!(routing_key(Method::Config, &msg[..8]), too_long);
        let user = "u".repeat(MAX_USER_ID_LEN + 1);
        let msg = grpc(&[bytes_field(1, SID.as_bytes()), user_context(&user)]);
        assert!(matches!(
            routing_key(Method::Config, &msg),
            Err(DecodeError::TooLong {
                field: "user_context.user_id",
                ..
            })
        ));
        // A field longer than its message.
        let mut msg = grpc(&[bytes_field(1, SID.as_bytes())]);
        msg[6] = 37;
        assert!(matches!(
            routing_key(Method::Config, &msg),
            Err(Malformed(_))
        ));
        // A length of 2^64 - 1.
        let mut huge = vec![0x1a];
        varint(u64::MAX, &mut huge);
        let msg = grpc(&[huge]);
        assert!(matches!(
            routing_key(Method::Config, &msg),
            Err(Malformed(_))
        ));
        // A varint beyond 64 bits.
        let msg = grpc(&[vec![
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81,
        ]]);
        assert!(matches!(
            routing_key(Method::Config, &msg),
            Err(Malformed(_))
        ));
        // A varint cut by the end of its message.
        let msg = grpc(&[vec![0x08, 0xff]]);
        assert!(matches!(
            routing_key(Method::Config, &msg),
            Err(Malformed(_))
        ));
    }

    #[test]
    fn bad_utf8() {
        let mut sid = SID.as_bytes().to_vec();
        sid[3] = 0xff;
        let msg = grpc(&[bytes_field(1, &sid)]);
        assert_eq!(
            routing_key(Method::Config, &msg),
            Err(DecodeError::NotUtf8 {
                field: "session_id"
            })
        );
        let msg = grpc(&[
            bytes_field(1, SID.as_bytes()),
            bytes_field(2, &bytes_field(1, &[b'a', 0xc3])),
        ]);
        assert_eq!(
            routing_key(Method::Config, &msg),
            Err(DecodeError::NotUtf8 {
                field: "user_context.user_id"
            })
        );
    }

    #[test]
    fn non_uuid_session_ids() {
        let msg = grpc(&[bytes_field(1, b"not-a-uuid")]);
        assert_eq!(
            routing_key(Method::AnalyzePlan, &msg),
            Err(DecodeError::NotUuid {
                field: "session_id",
                value: "not-a-uuid".into()
            })
        );
        // Accepted and rejected exactly as Java 17's UUID.fromString does (checked with it).
        for ok in [
            SID,
            "ABCDEF01-2345-6789-abcd-ef0123456789",
            "1-2-3-4-5",
            "+1-2-3-4-+5",
            "7fffffffffffffff-1-1-1-1",
            "123456789-1-1-1-1",
            "\u{661}-2-3-4-5",
        ] {
            assert!(java_uuid(ok), "{ok}");
        }
        for bad in [
            "-1-2-3-4-5",
            "0-0-0-0-",
            "0000000G-0000-0000-0000-000000000000",
            " 1-2-3-4-5",
            "ffffffffffffffff-1-1-1-1",
            "1-2-3-4",
            "1-2-3-4-5-6",
            "+-1-1-1-1",
            "0000000000000000000000000000000-1-1",
            "00000000-0000-0000-0000-00000000000+",
        ] {
            assert!(!java_uuid(bad), "{bad}");
        }
    }

    #[test]
    fn compressed_and_bad_flags() {
        assert_eq!(
            routing_key(Method::Config, &[1]),
            Err(DecodeError::Compressed)
        );
        assert!(matches!(
            routing_key(Method::Config, &[2, 0, 0, 0, 0]),
            Err(Malformed(_))
        ));
    }

    #[test]
    fn empty_message_and_empty_strings() {
        assert_eq!(
            routing_key(Method::Config, &[0, 0, 0, 0, 0]),
            Err(DecodeError::MissingSessionId)
        );
        // proto3: empty means unset, so an empty session_id does not hide a later one.
        let msg = grpc(&[
            bytes_field(1, b""),
            user_context(""),
            bytes_field(1, SID.as_bytes()),
        ]);
        assert_eq!(routing_key(Method::Config, &msg), Ok(key(SID, None)));
        let msg = grpc(&[bytes_field(1, b""), user_context("x")]);
        assert_eq!(
            routing_key(Method::Config, &msg),
            Err(DecodeError::MissingSessionId)
        );
    }

    #[test]
    fn unsupported_wire_types_and_field_zero() {
        for tag in [0x0b, 0x0c, 0x0e, 0x0f, 0x02] {
            let msg = grpc(&[vec![tag, 0]]);
            assert!(
                matches!(routing_key(Method::Config, &msg), Err(Malformed(_))),
                "{tag:#x}"
            );
        }
    }

    #[test]
    fn clone_session_takes_field_4_only_for_clone_session() {
        let new = "5c1b0000-6761-7465-8000-000000000099";
        let msg = grpc(&[
            bytes_field(1, SID.as_bytes()),
            user_context("erin"),
            bytes_field(3, b"client type"),
            bytes_field(4, new.as_bytes()),
        ]);
        let mut want = key(SID, Some("erin"));
        want.new_session_id = Some(new.into());
        assert_eq!(routing_key(Method::CloneSession, &msg), Ok(want));
        // Field 4 of ExecutePlan is client_type: not a session id, never read.
        assert_eq!(
            routing_key(Method::ExecutePlan, &msg),
            Ok(key(SID, Some("erin")))
        );
        let bad = grpc(&[bytes_field(1, SID.as_bytes()), bytes_field(4, b"nope")]);
        assert_eq!(
            routing_key(Method::CloneSession, &bad),
            Err(DecodeError::NotUuid {
                field: "new_session_id",
                value: "nope".into()
            })
        );
    }

    /// A valid request with the key fields in a random order among random unknown fields.
    fn arb_request() -> impl Strategy<Value = (Vec<u8>, RoutingKey)> {
        let unknown = (3u64..2000, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(f, v)| bytes_field(f, &v));
        (
            prop::collection::vec(unknown, 0..5),
            prop::option::of("[a-z]{1,20}"),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(mut fields, user, i, j)| {
                fields.insert(i.index(fields.len() + 1), bytes_field(1, SID.as_bytes()));
                if let Some(u) = &user {
                    fields.insert(j.index(fields.len() + 1), user_context(u));
                }
                (grpc(&fields), key(SID, user.as_deref()))
            })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            body in prop::collection::vec(any::<u8>(), 0..300),
            flag0 in any::<bool>(),
        ) {
            let mut body = body;
            if flag0 && !body.is_empty() {
                body[0] = 0; // get past the flag check more often
            }
            for m in Method::ALL {
                let _ = routing_key(m, &body);
                let _ = routing_key_best_effort(m, &body);
            }
        }

        #[test]
        fn truncation_gives_need_more_or_the_same_key((msg, want) in arb_request()) {
            prop_assert_eq!(routing_key(Method::ExecutePlan, &msg), Ok(want.clone()));
            let need = needed(Method::ExecutePlan, &msg);
            for k in 0..=msg.len() {
                match routing_key(Method::ExecutePlan, &msg[..k]) {
                    Err(NeedMore(m)) => prop_assert!(k < m && m <= need, "k={} m={} need={}", k, m, need),
                    other => {
                        prop_assert!(k >= need);
                        prop_assert_eq!(other, Ok(want.clone()));
                    }
                }
            }
        }
    }
}
