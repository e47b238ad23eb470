//! `sclb::config::parse` (TOML reader + validator): any text gives a config or a non-empty
//! list of errors that point into the text, never a panic or a hang.
//!
//! A server `addr` such as "host:15002" is resolved through DNS at load. Inputs holding such
//! a string are set aside (`Corpus::Reject`) so that the fuzzer never sends a DNS query: the
//! traffic stays on this machine and every run takes microseconds. IP literals and
//! "localhost" (answered from /etc/hosts) are fuzzed.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;

use libfuzzer_sys::{Corpus, fuzz_target};
use toml::de::{DeTable, DeValue};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Ok(text) = std::str::from_utf8(data) else {
        return Corpus::Reject;
    };
    if would_resolve_a_name(text) {
        return Corpus::Reject;
    }
    match sclb::config::parse(Path::new("fuzz.toml"), text) {
        Ok(config) => {
            assert!(!config.frontends.is_empty(), "a config without a frontend");
            for fe in &config.frontends {
                assert!(
                    config.backends.iter().any(|b| b.name == fe.backend),
                    "frontend {} names a missing backend {}",
                    fe.name,
                    fe.backend
                );
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "rejected without a reason");
            let lines = text.split('\n').count();
            for e in &errors {
                assert_eq!(e.file, "fuzz.toml");
                assert!(
                    e.line >= 1 && e.line <= lines,
                    "line {} of {lines}: {e}",
                    e.line
                );
                assert!(e.column >= 1, "column 0: {e}");
                assert!(!e.message.is_empty());
            }
        }
    }
    Corpus::Keep
});

/// Whether any string in the document looks like "name:port" with a name that is not an IP
/// literal or "localhost" — what `config::resolve` would hand to getaddrinfo. Parses with the
/// same recoverable parser sclb uses; a document with syntax errors is never read further.
fn would_resolve_a_name(text: &str) -> bool {
    let (doc, errors) = DeTable::parse_recoverable(text);
    errors.is_empty() && table_has_name(doc.get_ref())
}

fn table_has_name(t: &DeTable<'_>) -> bool {
    t.values().any(|v| value_has_name(v.get_ref()))
}

fn value_has_name(v: &DeValue<'_>) -> bool {
    match v {
        DeValue::String(s) => is_name_and_port(s),
        DeValue::Array(items) => items.iter().any(|i| value_has_name(i.get_ref())),
        DeValue::Table(t) => table_has_name(t),
        _ => false,
    }
}

fn is_name_and_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return false;
    }
    match s.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && !host.is_empty() && host != "localhost"
        }
        None => false,
    }
}
