//! The PROXY protocol header parser (`proxy_proto::parse`), fed whatever a trusted peer's
//! first bytes are: v1 text, v2 binary, a header still arriving, a header with the client's
//! bytes after it, or anything else.
//!
//! No panic; a header's length lies within the input and the bounds (v2: 16 + 1024 bytes, v1:
//! 107), and does not depend on the bytes after it; every strict prefix of a whole header asks
//! for more (a header arriving slowly is never refused); a buffer the reader can fill is never
//! still incomplete (the reader would wait for its timeout); what is not a header stays not one
//! whatever follows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sclb::proxy_proto::{HeaderError, Parsed, V1_MAX, V2_MAX_EXTRA, parse};

/// The reader's peek buffer.
const MAX: usize = 16 + V2_MAX_EXTRA;

fuzz_target!(|data: &[u8]| {
    let buf = &data[..data.len().min(MAX)];
    match parse(buf) {
        Ok(Parsed::Header { len, client }) => {
            assert!(len <= buf.len());
            assert!(len <= MAX);
            if buf.starts_with(b"PROXY ") {
                assert!(len <= V1_MAX);
            }
            assert_eq!(parse(&buf[..len]), Ok(Parsed::Header { len, client }));
            for cut in [0, 1, len / 2, len.saturating_sub(1)] {
                if cut < len {
                    assert_eq!(parse(&buf[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
                }
            }
        }
        Ok(Parsed::Incomplete) => assert!(buf.len() < MAX),
        Err(HeaderError::NotProxy) => {
            let mut more = buf.to_vec();
            more.extend_from_slice(b"\r\n\r\n\0\r\nQUIT\nPROXY ");
            assert_eq!(parse(&more), Err(HeaderError::NotProxy));
        }
        Err(HeaderError::Malformed(m)) => assert!(m.len() < 4096),
    }
});
