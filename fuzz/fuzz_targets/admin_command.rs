//! The admin socket's line handling: `split_line` then `command::parse` on each part, as a
//! session does with every line it reads (bytes made UTF-8 lossily, trailing blanks trimmed).
//! No panic; the parts are trimmed and non-empty; an error reply is recognised as one by
//! `sclb ctl` (`is_error`), so that scripts see a failing exit code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sclb::admin::command::{is_error, parse, split_line};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    for cmd in split_line(line.trim_end()) {
        assert!(!cmd.is_empty(), "an empty command from {line:?}");
        assert_eq!(cmd.trim(), cmd, "an untrimmed command from {line:?}");
        match parse(&cmd) {
            Ok(c) => {
                let _ = c.level();
            }
            Err(e) => {
                let reply = e.to_string();
                assert!(
                    is_error(&reply),
                    "{cmd:?} -> {reply:?} does not read as an error"
                );
                // Error replies quote a bounded part of what they got, on one line.
                assert!(
                    reply.len() <= 512,
                    "{cmd:?} -> a reply of {} bytes",
                    reply.len()
                );
                assert!(
                    !reply.contains('\n'),
                    "{cmd:?} -> a reply of several lines: {reply:?}"
                );
            }
        }
    }
});
