//! Who the client really is when another load balancer stands in front: the PROXY protocol
//! (HAProxy's v1 text and v2 binary headers) accepted only from the frontend's `accept_proxy`
//! networks, and the frontend's `allow`/`deny` source networks.
//!
//! A header is read to its exact end (v2: 16 bytes and its stated length, bounded; v1: to CRLF,
//! at most 107 bytes), parsed with the `ppp` crate, and never forwarded: the server sees the
//! bytes after it. Its source address then stands for the client in pins, logs and `show sess`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (the spec's 107).
const V1_MAX: usize = 107;
/// Most address and TLV bytes accepted after a v2 header's fixed 16.
const V2_MAX_EXTRA: usize = 1024;
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
    // Look before reading: a peer that sends something else is told so at once, not after
    // the timeout.
    let mut buf = vec![0u8; 12];
    loop {
        let n = s.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyError::Missing(peer));
        }
        let seen = &buf[..n];
        let v2 = V2_SIGNATURE.starts_with(&seen[..n.min(12)]);
        let v1 = b"PROXY ".starts_with(&seen[..n.min(6)]) || seen.starts_with(b"PROXY ");
        if !v1 && !v2 {
            return Err(ProxyError::Missing(peer));
        }
        if n >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.read_exact(&mut buf).await?;
    if buf == V2_SIGNATURE {
        let mut rest = [0u8; 4];
        s.read_exact(&mut rest).await?;
        buf.extend_from_slice(&rest);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        if len > V2_MAX_EXTRA {
            return Err(ProxyError::Malformed(format!(
                "v2 header of {len} more bytes, more than {V2_MAX_EXTRA}"
            )));
        }
        let start = buf.len();
        buf.resize(start + len, 0);
        s.read_exact(&mut buf[start..]).await?;
        return match ppp::v2::Header::try_from(buf.as_slice()) {
            Ok(h) => Ok(match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                _ => None,
            }),
            Err(e) => Err(ProxyError::Malformed(format!("v2: {e}"))),
        };
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing(peer));
    }
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Malformed(format!(
                "v1 header longer than {V1_MAX} bytes"
            )));
        }
        s.read_exact(&mut b).await?;
        buf.push(b[0]);
    }
    let text =
        std::str::from_utf8(&buf).map_err(|_| ProxyError::Malformed("v1: not ASCII".into()))?;
    match ppp::v1::Header::try_from(text) {
        Ok(h) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            ppp::v1::Addresses::Unknown => None,
        }),
        Err(e) => Err(ProxyError::Malformed(format!("v1: {e}"))),
    }
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
