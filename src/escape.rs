//! Client-controlled text on its way into a line sclb prints (admin replies, text and JSON
//! logs): a Spark user id, a header value, an admin line sent over HTTP. Such text may hold a
//! newline (a fake line in `show sessions` or the log), a space (a fake `key=value` field),
//! terminal escapes, or kilobytes. [`token`] makes it one bounded token.

use std::borrow::Cow;
use std::fmt::Write;

/// Most characters of a token shown; longer ones end with `...`.
pub const MAX_TOKEN: usize = 256;

/// `s` as one printable token: at most [`MAX_TOKEN`] characters; control characters, white
/// space and backslashes escaped (`\n`, `\u{20}`, `\\`), so that it can neither start a new
/// line nor a new field. Unchanged (and not copied) when it needs nothing.
pub fn token(s: &str) -> Cow<'_, str> {
    let plain = |c: char| !(c.is_control() || c.is_whitespace() || c == '\\');
    if s.len() <= MAX_TOKEN && s.chars().all(plain) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(MAX_TOKEN * 2));
    for c in s.chars().take(MAX_TOKEN) {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if plain(c) => out.push(c),
            c => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
        }
    }
    if s.chars().nth(MAX_TOKEN).is_some() {
        out.push_str("...");
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_cannot_start_a_line_or_a_field() {
        assert!(matches!(token("alice"), Cow::Borrowed("alice")));
        assert_eq!(
            token("a\nb c\\d\u{1b}[31m"),
            "a\\nb\\u{20}c\\\\d\\u{1b}[31m"
        );
        assert_eq!(token("ünïcode"), "ünïcode");
        let long = "x".repeat(10_000);
        assert_eq!(token(&long).len(), MAX_TOKEN + 3);
    }
}
