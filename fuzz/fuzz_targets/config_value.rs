//! The config's value parsers and what is derived from their results (issue 19, class 1): a
//! duration or size that parses must be one the running process can hold. Each input is put
//! in as every duration and size a config takes, the config is parsed, and a good one is then
//! used as sclb uses it: stick-table expiry from now, deadlines from now, the checker's
//! jittered intervals. No panic (overflow included); every error one bounded line.
#![no_main]

use std::path::Path;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sclb::config::reader::{MAX_DURATION, parse_duration};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let value = text.trim_end_matches('\0');
    match parse_duration(value) {
        Ok(d) => {
            assert!(d <= MAX_DURATION, "{value:?} -> {d:?}");
            assert!(Instant::now().checked_add(d * 8).is_some());
        }
        Err(e) => {
            assert!(e.len() <= 512, "{} bytes", e.len());
            assert!(!e.contains('\n'));
        }
    }
    // As a TOML string and as a bare value (a number for the sizes), in every place.
    let quoted = toml_string(value);
    let bare = if value
        .chars()
        .all(|c| c.is_ascii_digit() || c == '-' || c == '_')
        && !value.is_empty()
    {
        value.to_string()
    } else {
        quoted.clone()
    };
    let src = format!(
        r#"
[global]
maxconn = {bare}
hard_stop_after = {quoted}
stats = {{ bind = "127.0.0.1:0", refresh = {quoted}, maxconn = {bare}, timeout = {quoted} }}
[defaults]
timeout = {{ connect = {quoted}, client = {quoted}, server = {quoted}, tunnel = {quoted}, queue = {quoted}, http_request = {quoted} }}
check = {{ type = "tcp", inter = {quoted}, fastinter = {quoted}, downinter = {quoted}, timeout = {quoted}, rise = {bare}, fall = {bare} }}
retries = {bare}
[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:0"]
backend = "b"
maxconn = {bare}
backlog = {bare}
sessions = {{ idle_timeout = {quoted}, max_ttl = {quoted}, cleanup_interval = {quoted}, max = {bare}, max_per_client = {bare}, rate_per_client = {bare} }}
[[backend]]
name = "b"
stick = {{ on = "src", expire = {quoted}, size = {bare} }}
servers = [ {{ name = "s", addr = "127.0.0.1:1", weight = {bare}, maxconn = {bare} }} ]
"#
    );
    match sclb::config::parse(Path::new("fuzz.toml"), &src) {
        Ok(c) => {
            let b = &c.backends[0];
            if let Some(stick) = &b.stick {
                // The issue's example: a huge expire panicked at the first pin.
                let t = sclb::stick_table::StickTable::new(stick.expire, stick.size.min(1024));
                t.pin("10.0.0.1".parse().unwrap(), sclb::server::ServerId(1));
                let _ = t.lookup("10.0.0.1".parse().unwrap());
            }
            for d in [
                b.timeout_connect,
                b.timeout_server,
                b.timeout_queue,
                c.frontends[0].timeout_client,
                c.frontends[0].timeout_http_request,
                c.global.hard_stop_after,
            ] {
                assert!(d <= MAX_DURATION, "{d:?}");
                assert!(Instant::now().checked_add(d.saturating_mul(6)).is_some());
                let _ = d.mul_f64(1.05);
            }
        }
        Err(errors) => {
            for e in errors {
                let line = e.to_string();
                assert!(line.len() <= 1024, "{} bytes", line.len());
                assert!(!line.contains('\n'), "{line:?}");
            }
        }
    }
    let _ = Duration::ZERO;
});

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
