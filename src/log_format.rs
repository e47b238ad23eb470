//! The text layout of every log line, written without `core::fmt` where it can be.
//!
//! The layout is `tracing_subscriber::fmt`'s default ("full") one, without colours:
//! `2026-12-07T17:48:46.875929Z  INFO span{f=v}: target: message key=value ...`. sclb writes one
//! such line per connection (the access line), so its cost is part of every connection's: with
//! the default formatter a line cost ~15,000 instructions (callgrind), about half of all the
//! user-space work of a proxied connection, where HAProxy's whole log line costs ~5,500. Here
//! the timestamp's date and time are formatted once a second per thread, numbers with `itoa`,
//! plain strings are copied; only `%value` fields (addresses, names) go through `Display`.
//!
//! Every value is escaped on its way in, so a value from outside (an error text, a client's
//! address list) cannot start a fake line or send terminal escapes: in the message and in
//! `%value` fields, control characters are written as `\n`, `\r`, `\t`, `\xNN` or `\u{NN}`
//! (the default formatter escapes only terminal escapes there, not newlines); string fields are
//! quoted and escaped as Rust's `Debug` does.
//!
//! On a terminal (colours on), sclb keeps the default formatter: a person reads that output.
//!
//! [`Json`] does the same for `log.format = "json"` (~25,000 instructions a line before): the
//! object `tracing_subscriber`'s JSON formatter writes, key for key, with strings escaped as
//! `serde_json` escapes them. A line logged inside a span (health checks, discovery: not per
//! connection) is handed to that formatter, which knows how to write the span objects.

use std::cell::Cell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The text format (see the module's documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct Text;

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Records from the `log` crate (rustls) carry their real target in fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        timestamp(&mut w)?;
        w.write_str(match *meta.level() {
            Level::TRACE => " TRACE ",
            Level::DEBUG => " DEBUG ",
            Level::INFO => "  INFO ",
            Level::WARN => "  WARN ",
            Level::ERROR => " ERROR ",
        })?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                w.write_str(span.metadata().name())?;
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    w.write_char('{')?;
                    w.write_str(fields)?;
                    w.write_char('}')?;
                }
                w.write_char(':')?;
                seen = true;
            }
            if seen {
                w.write_char(' ')?;
            }
        }
        w.write_str(meta.target())?;
        w.write_str(": ")?;
        let mut fields = Fields {
            w: &mut w,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_char('\n')
    }
}

/// A client's address in a log line (`client = %Addr(peer)`): what `SocketAddr`'s `Display`
/// writes, an IPv4 one made with `itoa` (the std way costs ~1,700 instructions, a tenth of a
/// whole access line).
pub struct Addr(pub std::net::SocketAddr);

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let std::net::SocketAddr::V4(a) = self.0 else {
            return fmt::Display::fmt(&self.0, f);
        };
        // "255.255.255.255:65535" is 21 bytes.
        let mut out = [0u8; 21];
        let mut n = 0;
        let mut put = |s: &[u8]| {
            out[n..n + s.len()].copy_from_slice(s);
            n += s.len();
        };
        let mut num = itoa::Buffer::new();
        for (i, octet) in a.ip().octets().into_iter().enumerate() {
            if i > 0 {
                put(b".");
            }
            put(num.format(octet).as_bytes());
        }
        put(b":");
        put(num.format(a.port()).as_bytes());
        f.pad(std::str::from_utf8(&out[..n]).map_err(|_| fmt::Error)?)
    }
}

/// The JSON format (see the module's documentation).
pub struct Json {
    /// For lines inside a span.
    spans: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
}

impl Default for Json {
    fn default() -> Json {
        Json {
            spans: tracing_subscriber::fmt::format::Format::default().json(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Json
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if event.parent().is_some() || (event.is_contextual() && ctx.lookup_current().is_some()) {
            return self.spans.format_event(ctx, w, event);
        }
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        w.write_str("{\"timestamp\":\"")?;
        timestamp(&mut w)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_str("\",\"fields\":{")?;
        let mut fields = JsonFields {
            w: &mut w,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        w.write_str("},\"target\":")?;
        json_str(&mut w, meta.target())?;
        w.write_str("}\n")
    }
}

/// An event's fields as `tracing_serde` writes them: every field, in order, under its own name.
struct JsonFields<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn key(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        if !self.first {
            self.result = self.w.write_char(',');
        }
        self.first = false;
        self.result = self
            .result
            .and_then(|()| json_str(self.w, field.name()))
            .and_then(|()| self.w.write_char(':'));
        self.result.is_ok()
    }

    fn raw(&mut self, field: &Field, text: &str) {
        if self.key(field) {
            self.result = self.w.write_str(text);
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            self.result = json_str(self.w, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json's way with the odd ones (NaN and infinities are null).
        match serde_json::to_string(&value) {
            Ok(text) => self.raw(field, &text),
            Err(_) => self.raw(field, "null"),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.key(field) {
            self.result = self
                .w
                .write_char('"')
                .and_then(|()| write!(JsonEscaped(self.w), "{value:?}"))
                .and_then(|()| self.w.write_char('"'));
        }
    }
}

/// `s` as a JSON string.
fn json_str(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    JsonEscaped(w).write_str(s)?;
    w.write_char('"')
}

/// A writer that escapes what it writes as `serde_json` escapes a string's contents: `"`, `\\`
/// and the C0 control characters.
struct JsonEscaped<'a, 'w>(&'a mut Writer<'w>);

impl Write for JsonEscaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..0x20 => "",
                _ => continue,
            };
            // Every escaped byte is ASCII: `i` is on a character boundary.
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let hex = [HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]];
                self.0.write_str("\\u00")?;
                self.0
                    .write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

/// `2026-12-07T17:48:46.875929Z`, as `tracing_subscriber`'s `SystemTime` writes it: the part
/// up to the seconds is made once a second per thread.
fn timestamp(w: &mut Writer<'_>) -> fmt::Result {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
    }
    let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH) else {
        return w.write_str("<unknown time>");
    };
    let secs = now.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        let full =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .to_string();
        // "YYYY-MM-DDTHH:MM:SSZ": the 19 bytes before the Z (years past 9999 are not ours).
        match full.as_bytes().get(..19) {
            Some(b) => text.copy_from_slice(b),
            None => return w.write_str(&full),
        }
        SECOND.set((secs, text));
    }
    let mut micros = now.subsec_micros();
    let mut frac = *b".000000Z";
    for d in frac[1..7].iter_mut().rev() {
        *d = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    // Both parts are ASCII digits and separators.
    w.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)?;
    w.write_str(std::str::from_utf8(&frac).map_err(|_| fmt::Error)?)
}

/// Writes an event's fields as the default formatter does: the message bare, then
/// `name=value` separated by spaces.
struct Fields<'a, 'w> {
    w: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// The separator and `name=`; false for fields not to be written (`log.*`, already in the
    /// line's target).
    fn start(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return false;
        }
        if !self.first {
            self.result = self.w.write_char(' ');
        }
        self.first = false;
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.w.write_str(name))
                .and_then(|()| self.w.write_char('='));
        }
        self.result.is_ok()
    }

    fn number(&mut self, field: &Field, text: &str) {
        if self.start(field) {
            self.result = self.w.write_str(text);
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            Escaped(self.w).write_str(value)
        } else if value
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            self.w
                .write_char('"')
                .and_then(|()| self.w.write_str(value))
                .and_then(|()| self.w.write_char('"'))
        } else {
            write!(self.w, "{value:?}")
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, itoa::Buffer::new().format(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.number(field, if value { "true" } else { "false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        let mut out = Escaped(self.w);
        self.result = write!(out, "{value}");
        if let Some(mut source) = value.source() {
            let name = field.name().strip_prefix("r#").unwrap_or(field.name());
            self.result = self
                .result
                .and_then(|()| write!(self.w, " {name}.sources=["));
            loop {
                self.result = self
                    .result
                    .and_then(|()| write!(Escaped(self.w), "{source}"));
                match source.source() {
                    Some(next) => {
                        self.result = self.result.and_then(|()| self.w.write_str(", "));
                        source = next;
                    }
                    None => break,
                }
            }
            self.result = self.result.and_then(|()| self.w.write_char(']'));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.start(field) {
            self.result = write!(Escaped(self.w), "{value:?}");
        }
    }
}

/// A writer that escapes control characters (C0, DEL, C1) as it writes.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // C1 characters are U+0080..U+009F: 0xC2 0x80..0x9F in UTF-8.
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, c) in s.char_indices() {
            let escape: Option<&str> = match c {
                '\n' => Some("\\n"),
                '\r' => Some("\\r"),
                '\t' => Some("\\t"),
                c if (c as u32) < 0x20 || c == '\x7f' || (0x80..=0x9f).contains(&(c as u32)) => {
                    Some("")
                }
                _ => None,
            };
            let Some(escape) = escape else { continue };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{{{:x}}}", c as u32)?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + c.len_utf8();
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::io;
    use std::sync::Arc;
    use tracing::{info, info_span, warn};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer failure")]
    struct Outer(#[source] io::Error);

    /// The same events as an operator's log would hold: an access line, one in a span, an
    /// error with its sources, every kind of field.
    fn events() {
        let peer: std::net::SocketAddr = "127.0.0.1:58262".parse().unwrap();
        let name: Arc<str> = Arc::from("spark_connect");
        info!(
            client = %peer,
            frontend = %name,
            connect_ms = 14u64,
            delta = -3i64,
            ok = true,
            end = "client_close",
            "connection closed"
        );
        let span = info_span!("check", server = %"be/s1");
        span.in_scope(|| warn!(r#type = "spark", "server is down: {} of {}", 3, 3));
        let err = Outer(io::Error::other("inner cause"));
        warn!(
            error = &err as &(dyn std::error::Error + 'static),
            "reload failed"
        );
        info!(quoted = "say \"hi\"\\", list = ?vec![1, 2], "plain");
    }

    /// With nothing to escape, a line is byte for byte what `tracing_subscriber`'s default
    /// formatter writes, but for the time.
    #[test]
    fn lines_match_the_default_formatter() {
        let ours = Captured::default();
        let theirs = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(ours.clone())
            .event_format(Text)
            .finish();
        tracing::subscriber::with_default(sub, events);
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(theirs.clone())
            .finish();
        tracing::subscriber::with_default(sub, events);
        let strip = |c: &Captured| {
            let text = String::from_utf8(c.0.lock().clone()).unwrap();
            text.lines()
                .map(|l| {
                    let (ts, rest) = l.split_at(27);
                    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{l}");
                    rest.to_string()
                })
                .collect::<Vec<_>>()
        };
        let (ours, theirs) = (strip(&ours), strip(&theirs));
        assert_eq!(ours.len(), 4);
        assert_eq!(ours, theirs);
        assert!(ours[0].contains(" connection closed client=127.0.0.1:58262 frontend=spark_connect connect_ms=14 delta=-3 ok=true end=\"client_close\""), "{}", ours[0]);
        assert!(ours[1].contains("check{server=be/s1}: sclb::log_format::tests: server is down: 3 of 3 type=\"spark\""), "{}", ours[1]);
    }

    /// Events whose JSON strings need escaping, beside `events`.
    fn json_events() {
        events();
        info!(
            why = "a \"quoted\"\\ \n\t\x01\x1f é",
            count = 2.5f64,
            "odd\u{8} \x0c"
        );
    }

    /// Every line (in a span or not) is the object `tracing_subscriber`'s JSON formatter
    /// writes, but for the time.
    #[test]
    fn json_lines_match_the_default_formatter() {
        let ours = Captured::default();
        let theirs = Captured::default();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(ours.clone())
            .event_format(Json::default())
            .finish();
        tracing::subscriber::with_default(sub, json_events);
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(theirs.clone())
            .finish();
        tracing::subscriber::with_default(sub, json_events);
        let strip = |c: &Captured| {
            let text = String::from_utf8(c.0.lock().clone()).unwrap();
            text.lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let ts = v["timestamp"].as_str().unwrap();
                    humantime::parse_rfc3339(ts).unwrap();
                    l.replace(ts, "T")
                })
                .collect::<Vec<_>>()
        };
        let (ours, theirs) = (strip(&ours), strip(&theirs));
        assert_eq!(ours.len(), 5);
        assert_eq!(ours, theirs);
        assert!(ours[0].starts_with(r#"{"timestamp":"T","level":"INFO","fields":{"message":"connection closed","client":"127.0.0.1:58262","frontend":"spark_connect","connect_ms":14,"delta":-3,"ok":true,"end":"client_close"},"target":"sclb::log_format::tests"}"#), "{}", ours[0]);
        assert!(
            ours[1].contains(r#""span":{"server":"be/s1","name":"check"}"#),
            "{}",
            ours[1]
        );
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for a in [
            "127.0.0.1:58262",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.20.3.4:80",
            "[::1]:15002",
            "[fd00::1%3]:1",
        ] {
            let a: std::net::SocketAddr = a.parse().unwrap();
            assert_eq!(Addr(a).to_string(), a.to_string());
        }
    }

    /// A value from outside cannot start a line of its own or send terminal escapes.
    #[test]
    fn control_characters_are_escaped_in_messages_and_values() {
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(out.clone())
            .event_format(Text)
            .finish();
        tracing::subscriber::with_default(sub, || {
            let why = "bad\nfake line\x1b[31m\u{9b}";
            info!(end = %why, name = why, "refused: {why}");
        });
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(r#"refused: bad\nfake line\u{1b}[31m\u{9b} end=bad\nfake line\u{1b}[31m\u{9b} name="bad\nfake line\u{1b}[31m\u{9b}""#),
            "{text}"
        );
    }

    #[test]
    fn the_time_is_rfc3339_with_microseconds() {
        let out = Captured::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .event_format(Text)
            .finish();
        let before = SystemTime::now();
        tracing::subscriber::with_default(sub, || info!("x"));
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        let ts = humantime::parse_rfc3339(&text[..27]).unwrap();
        let after = SystemTime::now();
        assert!(
            before <= ts + std::time::Duration::from_micros(1) && ts <= after,
            "{text}"
        );
    }
}
