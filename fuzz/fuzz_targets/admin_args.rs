//! The admin commands' argument values (issue 19, class 1): each input is put in as every
//! value a command takes (timeouts, weights, maxconn, ids, addresses, ports), and what parses
//! must be within the bounds the process holds: a `wait` timeout of at most 2^31 ms (from
//! which `sclb ctl` and the server derive deadlines), weights and maxconn in their ranges.
//! Errors quote a bounded part of the value on one line.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sclb::admin::command::{Command, Weight, is_error, parse};
use sclb::config::reader::MAX_DURATION;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // One word: the admin line is split on blanks.
    let v: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ';')
        .collect();
    if v.is_empty() {
        return;
    }
    for line in [
        format!("wait {v} srv-removable b/s"),
        format!("set weight b/s {v}"),
        format!("set server b/s weight {v}"),
        format!("set maxconn server b/s {v}"),
        format!("set maxconn global {v}"),
        format!("show table b key {v}"),
        format!("set server b/s addr {v} port {v}"),
        format!("show sess {v}"),
        format!("shutdown session {v}"),
        format!("kill session {v}"),
        format!("disable server {v}"),
    ] {
        match parse(&line) {
            Ok(Command::WaitRemovable { timeout, .. }) => {
                assert!(timeout <= MAX_DURATION, "{line:?} -> {timeout:?}");
                assert!(Instant::now().checked_add(timeout * 2).is_some());
            }
            Ok(Command::SetWeight {
                weight: Weight::Absolute(w),
                ..
            }) => {
                assert!(w <= sclb::config::MAX_WEIGHT, "{line:?}");
            }
            Ok(Command::SetMaxconn { maxconn, .. }) => assert!(maxconn <= 1_000_000, "{line:?}"),
            Ok(Command::SetGlobalMaxconn(n)) => assert!(n <= 10_000_000, "{line:?}"),
            Ok(c) => {
                let _ = c.level();
            }
            Err(e) => {
                let reply = e.to_string();
                assert!(is_error(&reply), "{line:?} -> {reply:?}");
                assert!(reply.len() <= 512, "{line:?} -> {} bytes", reply.len());
                assert!(!reply.contains('\n'), "{line:?} -> {reply:?}");
            }
        }
    }
});
