//! Who the client really is when another load balancer stands in front: the PROXY protocol
//! (HAProxy's v1 text and v2 binary headers) accepted only from the frontend's `accept_proxy`
//! networks, and the frontend's `allow`/`deny` source networks.
//!
//! A header is looked at (peeked) until [`parse`] finds it whole (v2: 16 bytes and its stated
//! length, bounded; v1: to CRLF, at most 107 bytes; fields read by the `ppp` crate), then
//! taken off the stream to its exact end, and never forwarded: the server sees the bytes
//! after it. Its source address then stands for the client in pins, logs and `show sess`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the spec's 107).
pub const V1_MAX: usize = 107;
/// Most address and TLV bytes accepted after a v2 header's fixed 16.
pub const V2_MAX_EXTRA: usize = 1024;
/// How long a trusted peer has to send its header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY header from {0}, which is listed in accept_proxy")]
    Missing(IpAddr),
    #[error("a PROXY header from {0}, which is not listed in accept_proxy")]
    Untrusted(IpAddr),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header not received within {HEADER_TIMEOUT:?}")]
    Timeout,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether `ip` is in any of `nets` (IPv4-mapped IPv6 addresses count as IPv4).
pub fn listed(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

/// Whether a client at `ip` may connect: not denied, and allowed if an allow list exists.
pub fn admitted(allow: &[IpNet], deny: &[IpNet], ip: IpAddr) -> bool {
    !listed(deny, ip) && (allow.is_empty() || listed(allow, ip))
}

/// Reads the PROXY header of a trusted peer; the address it names (`None`: a LOCAL or UNKNOWN
/// header, the connection is the proxy's own, e.g. a health check).
pub async fn read_header(
    s: &mut TcpStream,
    peer: IpAddr,
) -> Result<Option<SocketAddr>, ProxyError> {
    timeout(HEADER_TIMEOUT, read(s, peer))
        .await
        .map_err(|_| ProxyError::Timeout)?
}

async fn read(s: &mut TcpStream, peer: IpAddr) -> Result<Option<SocketAddr>, ProxyError> {
    // Look before reading: the header is taken off the stream only once it is whole, and a
    // peer that sends something else is told so at once, not after the timeout.
    let mut buf = vec![0u8; 16 + V2_MAX_EXTRA];
    loop {
        let n = s.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyError::Missing(peer));
        }
        match parse(&buf[..n]) {
            Ok(Parsed::Header { len, client }) => {
                s.read_exact(&mut buf[..len]).await?;
                return Ok(client);
            }
            Ok(Parsed::Incomplete) => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(HeaderError::NotProxy) => return Err(ProxyError::Missing(peer)),
            Err(HeaderError::Malformed(m)) => return Err(ProxyError::Malformed(m)),
        }
    }
}

/// What the first bytes of a trusted peer's connection hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The start of a header: more bytes are needed.
    Incomplete,
    /// A whole header of `len` bytes, naming the client (`None`: a LOCAL or UNKNOWN header).
    Header {
        len: usize,
        client: Option<SocketAddr>,
    },
}

/// Why the first bytes are not a usable PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// They do not start like one.
    NotProxy,
    Malformed(String),
}

/// Parses a PROXY header (v1 or v2) at the start of `buf`, which may hold more (the client's
/// first bytes) or less (a header still arriving). A v2 header is at most 16 +
/// [`V2_MAX_EXTRA`] bytes, a v1 header at most [`V1_MAX`]; `ppp` reads the fields.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let starts = |sig: &[u8]| buf.starts_with(sig) || sig.starts_with(buf);
    if buf.len() < 12 {
        return if starts(V2_SIGNATURE) || starts(b"PROXY ") {
            Ok(Parsed::Incomplete)
        } else {
            Err(HeaderError::NotProxy)
        };
    }
    if buf[..12] == V2_SIGNATURE[..] {
        let Some(fixed) = buf.get(..16) else {
            return Ok(Parsed::Incomplete);
        };
        let extra = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        if extra > V2_MAX_EXTRA {
            return Err(HeaderError::Malformed(format!(
                "v2 header of {extra} more bytes, more than {V2_MAX_EXTRA}"
            )));
        }
        let Some(header) = buf.get(..16 + extra) else {
            return Ok(Parsed::Incomplete);
        };
        let h = ppp::v2::Header::try_from(header)
            .map_err(|e| HeaderError::Malformed(format!("v2: {e}")))?;
        let client = match h.addresses {
            ppp::v2::Addresses::IPv4(a) => {
                Some(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            ppp::v2::Addresses::IPv6(a) => {
                Some(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            _ => None,
        };
        return Ok(Parsed::Header {
            len: header.len(),
            client,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(HeaderError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(HeaderError::Malformed(format!(
                "v1 header longer than {V1_MAX} bytes"
            )))
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let header = &buf[..end + 2];
    // The spec's v1 is US-ASCII, and ppp slices the text by byte offsets: a multi-byte
    // character there panics inside it (found by fuzz/proxy_header). Refused before ppp sees it.
    if !header.is_ascii() {
        return Err(HeaderError::Malformed("v1: not ASCII".into()));
    }
    let text =
        std::str::from_utf8(header).map_err(|_| HeaderError::Malformed("v1: not ASCII".into()))?;
    let h =
        ppp::v1::Header::try_from(text).map_err(|e| HeaderError::Malformed(format!("v1: {e}")))?;
    let client = match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    };
    Ok(Parsed::Header {
        len: header.len(),
        client,
    })
}

/// Refuses a PROXY header from a peer that is not trusted: looks (briefly, without consuming)
/// at the first bytes of a connection on a frontend that takes PROXY headers from others.
pub async fn reject_untrusted(s: &TcpStream, peer: IpAddr) -> Result<(), ProxyError> {
    let mut buf = [0u8; 12];
    // Spark clients speak first (the HTTP/2 preface); one that is silent is let through.
    let Ok(Ok(n)) = timeout(Duration::from_secs(1), s.peek(&mut buf)).await else {
        return Ok(());
    };
    let head = &buf[..n];
    if (n >= 6 && head.starts_with(b"PROXY ")) || (n == 12 && head == V2_SIGNATURE) {
        return Err(ProxyError::Untrusted(peer));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_whole_or_ask_for_more() {
        let v1 = b"PROXY TCP4 10.1.2.3 127.0.0.1 5678 15002\r\nPRI * HTTP/2.0";
        let whole = Parsed::Header {
            len: 42,
            client: Some("10.1.2.3:5678".parse().unwrap()),
        };
        assert_eq!(parse(v1), Ok(whole));
        for cut in [1, 5, 6, 11, 12, 41] {
            assert_eq!(parse(&v1[..cut]), Ok(Parsed::Incomplete), "{cut} bytes");
        }
        assert_eq!(parse(b"PRI * HTTP/2.0\r\n"), Err(HeaderError::NotProxy));
        assert_eq!(parse(b"PRX"), Err(HeaderError::NotProxy));
        // A multi-byte character where ppp slices the text (it used to panic there).
        let utf8 = b"PROXY ,,,,,TCP6 2001:PROXY TCd1\r\xc6\x9d\xcd\xbf:: \n\r02\r0\n01:\n\0\r\n";
        assert_eq!(
            parse(utf8),
            Err(HeaderError::Malformed("v1: not ASCII".into()))
        );
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(parse(&long), Err(HeaderError::Malformed(_))));

        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 1, 2, 3, 127, 0, 0, 1]);
        v2.extend_from_slice(&4567u16.to_be_bytes());
        v2.extend_from_slice(&15002u16.to_be_bytes());
        assert_eq!(parse(&v2[..20]), Ok(Parsed::Incomplete));
        let len = v2.len();
        v2.extend_from_slice(b"client bytes");
        assert_eq!(
            parse(&v2),
            Ok(Parsed::Header {
                len,
                client: Some("10.1.2.3:4567".parse().unwrap())
            })
        );
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&huge), Err(HeaderError::Malformed(_))));
    }

    #[test]
    fn networks_match_mapped_addresses_and_deny_wins() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(listed(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!listed(&nets, "11.0.0.1".parse().unwrap()));
        let deny: Vec<IpNet> = vec!["10.9.0.0/16".parse().unwrap()];
        assert!(admitted(&nets, &deny, "10.1.0.1".parse().unwrap()));
        assert!(!admitted(&nets, &deny, "10.9.0.1".parse().unwrap()));
        assert!(!admitted(&nets, &[], "192.168.0.1".parse().unwrap()));
        assert!(admitted(&[], &[], "192.168.0.1".parse().unwrap()));
    }
}
