//! A small reader over a TOML document that keeps positions, so that every problem in a config
//! file is reported with its file, line, column and field path — and all of them at once.
//!
//! Why not `serde` with `deny_unknown_fields`: serde stops at the first error, and an operator
//! fixing a file one error per run is a bad afternoon. The reader walks the spanned tree that
//! `toml` parses, checks keys against the keys each table allows, and collects every error.

use std::cell::RefCell;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field, e.g. `backend[0].servers[1].addr`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file, self.line, self.column, self.field, self.message
            )
        }
    }
}

/// Collects errors and turns byte offsets into lines and columns.
pub struct Diag {
    file: String,
    line_starts: Vec<usize>,
    errors: RefCell<Vec<ConfigError>>,
}

impl Diag {
    pub fn new(file: &Path, src: &str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Diag {
            file: file.display().to_string(),
            line_starts,
            errors: RefCell::new(Vec::new()),
        }
    }

    /// Records an error at byte offset `at`. Whatever value the message quotes, the message
    /// stays one line of bounded length (a megabyte key or value is not echoed back whole).
    pub fn error(&self, at: usize, field: &str, message: impl Into<String>) {
        let line = self.line_starts.partition_point(|&s| s <= at).max(1);
        let column = at - self.line_starts[line - 1] + 1;
        self.errors.borrow_mut().push(ConfigError {
            file: self.file.clone(),
            line,
            column,
            field: one_line(field, 160),
            message: one_line(&message.into(), 600),
        });
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.borrow().is_empty()
    }

    pub fn into_errors(self) -> Vec<ConfigError> {
        let mut errors = self.errors.into_inner();
        errors.sort_by_key(|e| (e.line, e.column));
        errors
    }
}

/// A view of one TOML table at a known path.
#[derive(Clone, Copy)]
pub struct Table<'a, 'i> {
    pub path: &'a str,
    table: &'a DeTable<'i>,
    /// Where the table starts in the source (for errors about a missing key).
    at: usize,
    diag: &'a Diag,
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Joins a parent path and a key into a field path.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a, 'i> Table<'a, 'i> {
    pub fn root(doc: &'a Spanned<DeTable<'i>>, diag: &'a Diag) -> Self {
        Table {
            path: "",
            table: doc.get_ref(),
            at: doc.span().start,
            diag,
        }
    }

    pub fn diag(&self) -> &'a Diag {
        self.diag
    }

    /// Reports every key not in `allowed`, suggesting the closest allowed one.
    pub fn allow(&self, allowed: &[&str]) {
        for (key, _) in self.table.iter() {
            let name: &str = key.get_ref();
            if !allowed.contains(&name) {
                let hint = closest(name, allowed)
                    .map(|c| format!(" (did you mean \"{c}\"?)"))
                    .unwrap_or_default();
                self.diag.error(
                    key.span().start,
                    &join(self.path, name),
                    format!(
                        "unknown key \"{name}\"{hint}; allowed here: {}",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }

    fn get(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.table.get(key)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Whether `key` holds a string (for keys that take a string or a number).
    pub fn is_string(&self, key: &str) -> bool {
        matches!(self.get(key).map(|v| v.get_ref()), Some(DeValue::String(_)))
    }

    /// Whether `key` holds a boolean (for keys that take `false` or a table).
    pub fn is_bool(&self, key: &str) -> bool {
        matches!(
            self.get(key).map(|v| v.get_ref()),
            Some(DeValue::Boolean(_))
        )
    }

    /// Whether `key` holds a table.
    pub fn is_table(&self, key: &str) -> bool {
        matches!(self.get(key).map(|v| v.get_ref()), Some(DeValue::Table(_)))
    }

    /// Byte offset of a key's value, or of the table itself when the key is absent.
    pub fn pos(&self, key: &str) -> usize {
        self.get(key).map(|v| v.span().start).unwrap_or(self.at)
    }

    /// Records an error about `key` of this table.
    pub fn error(&self, key: &str, message: impl Into<String>) {
        self.diag
            .error(self.pos(key), &join(self.path, key), message);
    }

    fn wrong_type(&self, key: &str, v: &Spanned<DeValue<'i>>, expected: &str) {
        self.diag.error(
            v.span().start,
            &join(self.path, key),
            format!("expected {expected}, found {}", type_name(v.get_ref())),
        );
    }

    pub fn required(&self, key: &str) -> bool {
        if self.contains(key) {
            true
        } else {
            self.diag.error(
                self.at,
                &join(self.path, key),
                format!("missing required key \"{key}\""),
            );
            false
        }
    }

    pub fn str(&self, key: &str) -> Option<&'a str> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.wrong_type(key, v, "a string");
                None
            }
        }
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(key, v, "true or false");
                None
            }
        }
    }

    /// An integer within `min..=max`.
    pub fn int(&self, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = self.get(key)?;
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(key, v, "an integer");
            return None;
        };
        let parsed = i64::from_str_radix(i.as_str().replace('_', "").as_str(), i.radix());
        match parsed {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.error(key, format!("must be between {min} and {max}, got {i}"));
                None
            }
        }
    }

    /// A human duration such as "2s", "500ms", "4h" or "1h 30m".
    pub fn duration(&self, key: &str) -> Option<Duration> {
        let v = self.get(key)?;
        if !matches!(v.get_ref(), DeValue::String(_)) {
            self.wrong_type(key, v, "a duration string such as \"2s\" or \"500ms\"");
            return None;
        }
        let s = self.str(key)?;
        match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(key, e);
                None
            }
        }
    }

    /// [`Table::duration`] within `min..=max` (both included), as [`Table::int`] bounds an
    /// integer.
    pub fn duration_between(&self, key: &str, min: Duration, max: Duration) -> Option<Duration> {
        let d = self.duration(key)?;
        if d < min || d > max {
            self.error(
                key,
                format!(
                    "must be between {} and {}, got {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                    humantime::format_duration(d)
                ),
            );
            return None;
        }
        Some(d)
    }

    /// A string parsed with `FromStr`; `what` names the expected form in the error.
    pub fn parse<T: FromStr>(&self, key: &str, what: &str) -> Option<T>
    where
        T::Err: fmt::Display,
    {
        let s = self.str(key)?;
        match s.parse::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(key, format!("invalid {what} \"{s}\": {e}"));
                None
            }
        }
    }

    /// One of a fixed set of words.
    pub fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Option<T> {
        let s = self.str(key)?;
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
                self.error(key, format!("\"{s}\" is not one of: {}", names.join(", ")));
                None
            }
        }
    }

    pub fn table<'b>(&self, key: &str, path: &'b str) -> Option<Table<'b, 'i>>
    where
        'a: 'b,
    {
        let v = self.get(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Table {
                path,
                table: t,
                at: v.span().start,
                diag: self.diag,
            }),
            _ => {
                self.wrong_type(key, v, "a table");
                None
            }
        }
    }

    /// Items of an array, each with its byte offset. A missing key is an empty list.
    pub fn array(&self, key: &str) -> Vec<&'a Spanned<DeValue<'i>>> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        match v.get_ref() {
            DeValue::Array(items) => items.iter().collect(),
            _ => {
                self.wrong_type(key, v, "an array");
                Vec::new()
            }
        }
    }

    /// Where the string `want` is in `key` (a string or an array of them), quietly: errors
    /// about the values were reported when they were read. The key's position otherwise.
    pub fn string_pos(&self, key: &str, want: &str) -> usize {
        let found = |v: &Spanned<DeValue<'i>>| {
            matches!(v.get_ref(), DeValue::String(s) if s.as_ref() == want).then(|| v.span().start)
        };
        let Some(v) = self.get(key) else {
            return self.at;
        };
        let at = match v.get_ref() {
            DeValue::Array(items) => items.iter().find_map(found),
            _ => found(v),
        };
        at.unwrap_or(v.span().start)
    }

    /// Strings of an array; a single string is accepted as a list of one.
    pub fn strings(&self, key: &str) -> Vec<(&'a str, usize)> {
        let Some(v) = self.get(key) else {
            return Vec::new();
        };
        if let DeValue::String(s) = v.get_ref() {
            return vec![(s.as_ref(), v.span().start)];
        }
        let mut out = Vec::new();
        for (i, item) in self.array(key).into_iter().enumerate() {
            match item.get_ref() {
                DeValue::String(s) => out.push((s.as_ref(), item.span().start)),
                other => self.diag.error(
                    item.span().start,
                    &format!("{}[{i}]", join(self.path, key)),
                    format!("expected a string, found {}", type_name(other)),
                ),
            }
        }
        out
    }

    /// The tables of an array of tables (`[[frontend]]` or an inline array of `{ ... }`).
    /// `paths` receives the path of each element, and must outlive the returned views.
    pub fn tables<'b>(&self, key: &str, paths: &'b [String]) -> Vec<Table<'b, 'i>>
    where
        'a: 'b,
    {
        let mut out = Vec::new();
        for (i, item) in self.array(key).into_iter().enumerate() {
            match item.get_ref() {
                DeValue::Table(t) => out.push(Table {
                    path: &paths[i],
                    table: t,
                    at: item.span().start,
                    diag: self.diag,
                }),
                other => self.diag.error(
                    item.span().start,
                    &paths[i],
                    format!("expected a table, found {}", type_name(other)),
                ),
            }
        }
        out
    }

    /// Field paths for the elements of the array at `key`, for [`Table::tables`].
    pub fn element_paths(&self, key: &str) -> Vec<String> {
        let n = match self.get(key).map(|v| v.get_ref()) {
            Some(DeValue::Array(a)) => a.len(),
            _ => 0,
        };
        (0..n)
            .map(|i| format!("{}[{i}]", join(self.path, key)))
            .collect()
    }

    /// Reports an error at an array element's position.
    pub fn error_at(&self, at: usize, field: &str, message: impl Into<String>) {
        self.diag.error(at, field, message);
    }
}

/// Parses "2s", "500ms", "4h", "1h 30m"; a bare number is refused so that units are explicit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let shown = bounded(s);
    if s.trim().chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "\"{shown}\" has no unit; write a duration such as \"500ms\", \"2s\", \"30m\" or \"4h\""
        ));
    }
    let d = humantime::parse_duration(s).map_err(|e| {
        format!(
            "invalid duration \"{shown}\" ({}); write e.g. \"500ms\", \"2s\", \"30m\" or \"4h\"",
            bounded(&e.to_string())
        )
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "\"{shown}\" is longer than {}, the longest duration sclb accepts (HAProxy's limit, 2^31 ms)",
            humantime::format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// The longest duration any setting or command takes: HAProxy's, 2^31 - 1 ms (24.8 days).
/// Everything derived from a duration (deadlines, expiry instants) stays far from overflow.
pub const MAX_DURATION: Duration = Duration::from_millis(i32::MAX as u64);

/// A value quoted in an error: at most 64 bytes of it as printed (control characters escaped,
/// then "..."), so that a hostile value is never echoed back whole or as several lines.
pub fn bounded(s: &str) -> String {
    // The bound is on what is printed: an escaped control character takes up to 10 bytes.
    const MAX: usize = 64;
    let mut out = String::new();
    for c in s.chars() {
        let start = out.len();
        out.extend(c.escape_debug());
        if out.len() > MAX {
            out.truncate(start);
            out.push_str("...");
            break;
        }
    }
    out
}

/// `s` with control characters escaped, cut at `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for c in s.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if s.chars().nth(max).is_some() {
        out.push_str("...");
    }
    out
}

/// The allowed word closest to `word`, if it is close enough to be a typo.
fn closest<'s>(word: &str, allowed: &[&'s str]) -> Option<&'s str> {
    allowed
        .iter()
        .map(|a| (edit_distance(word, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_quoted_value_is_bounded_as_printed() {
        let ctrl = "\u{1a}".repeat(200);
        let q = bounded(&ctrl);
        assert!(
            q.len() <= 67 && q.ends_with("..."),
            "{} bytes: {q}",
            q.len()
        );
        assert_eq!(bounded(&"a".repeat(64)), "a".repeat(64));
        assert_eq!(bounded(&"a".repeat(65)), format!("{}...", "a".repeat(64)));
    }

    use super::*;

    #[test]
    fn durations_are_bounded_and_errors_quote_a_bounded_prefix() {
        assert_eq!(
            parse_duration("24d").unwrap(),
            Duration::from_secs(24 * 86400)
        );
        for huge in ["25d", "100y", "584542046090y", "18446744073709551615s"] {
            let e = parse_duration(huge).unwrap_err();
            assert!(
                e.contains("longest duration") || e.contains("invalid duration"),
                "{huge}: {e}"
            );
        }
        let long = "9".repeat(1_000_000) + "x";
        let e = parse_duration(&long).unwrap_err();
        assert!(
            e.len() < 400,
            "the error quotes a bounded prefix: {} bytes",
            e.len()
        );
        let e = parse_duration("1s\nfake line").unwrap_err();
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn every_error_is_one_bounded_line_whatever_it_quotes() {
        let src = format!(
            "[global]\n{} = 1\nstate_file = 7\n[[frontend]]\nname = \"{}\"\nbind = [\"a\\nb\"]\n",
            "k".repeat(100_000),
            "n\\n".repeat(100_000)
        );
        let errors = crate::config::parse(Path::new("x.toml"), &src).unwrap_err();
        for e in errors {
            let text = e.to_string();
            assert!(text.len() < 1000, "{} bytes", text.len());
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("2000").unwrap_err().contains("no unit"));
        assert!(parse_duration("2 fortnights").is_err());
    }

    #[test]
    fn typo_suggestions() {
        assert_eq!(closest("maxcon", &["maxconn", "log"]), Some("maxconn"));
        assert_eq!(closest("zzzzzz", &["maxconn", "log"]), None);
    }
}
