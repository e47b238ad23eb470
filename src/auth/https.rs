//! A small HTTPS GET for an OIDC issuer's discovery document and key set: bounded in time
//! (`auth.timeout` for connect, TLS, request and response together) and size (1 MiB), no
//! redirects, trusting `auth.ca` or the system's CAs.
//!
//! hyper's HTTP/1 client connection over tokio-rustls rather than a full HTTP client crate:
//! two GETs every few minutes need neither pooling nor redirects, and both are already here.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// Largest discovery document or key set accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Longest URL accepted (issuer or `jwks_uri`).
const MAX_URL: usize = 1024;

/// An `https://` URL (or `http://` to a loopback address, for a local sidecar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, String> {
        let shown = crate::config::reader::bounded(s);
        if s.len() > MAX_URL {
            return Err(format!("\"{shown}\" is longer than {MAX_URL} characters"));
        }
        let uri: http::Uri = s.parse().map_err(|_| format!("\"{shown}\" is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("\"{shown}\" is not an https:// URL")),
        };
        let auth = uri
            .authority()
            .ok_or_else(|| format!("\"{shown}\" has no host"))?;
        if auth.as_str().contains('@') {
            // Not quoted: it holds a password.
            return Err("a URL with credentials (user:password@) is not accepted".into());
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !tls && !loopback {
            return Err(format!(
                "\"{shown}\": keys are fetched over https:// (http:// only from a loopback address)"
            ));
        }
        if s.contains('#') {
            return Err(format!(
                "\"{shown}\": a URL with a #fragment is not accepted"
            ));
        }
        Ok(Url {
            tls,
            host: host.to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
        })
    }

    /// `host:port` as the `Host` header wants it.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{host}:{}", self.port)
    }
}

/// Why a fetch failed, in words for a log line and a client's error message.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Url(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP with {addr}: {source}")]
    Http { addr: String, source: hyper::Error },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the answer is more than {MAX_BODY} bytes")]
    TooBig { url: String },
}

/// Fetches URLs with one TLS client config.
pub struct Fetcher {
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl Fetcher {
    pub fn new(roots: rustls::RootCertStore, timeout: Duration) -> Fetcher {
        Fetcher {
            tls: crate::tls::client::config(roots, true, &[b"http/1.1"]),
            timeout,
        }
    }

    /// The body of a `200 OK` answer to `GET url`.
    pub async fn get(&self, url: &Url) -> Result<Bytes, FetchError> {
        tokio::time::timeout(self.timeout, self.get_unbounded(url))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }

    async fn get_unbounded(&self, url: &Url) -> Result<Bytes, FetchError> {
        let addr = url.authority();
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|source| FetchError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if url.tls {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|_| FetchError::Url(format!("\"{}\" is not a host name", url.host)))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| FetchError::Tls {
                    addr: addr.clone(),
                    source,
                })?;
            request(TokioIo::new(tls), url, &addr).await
        } else {
            request(TokioIo::new(tcp), url, &addr).await
        }
    }
}

async fn request<IO>(io: IO, url: &Url, addr: &str) -> Result<Bytes, FetchError>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http = |source| FetchError::Http {
        addr: addr.to_string(),
        source,
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http)?;
    // The connection ends with this function (its task is dropped with the future when
    // the timeout fires, closing the socket).
    let driver = tokio::spawn(conn);
    let _abort = AbortOnDrop(driver);
    let req = http::Request::get(url.path.as_str())
        .header(http::header::HOST, addr)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "sclb")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Url(e.to_string()))?;
    let resp = send.send_request(req).await.map_err(http)?;
    let shown = format!(
        "{}://{addr}{}",
        if url.tls { "https" } else { "http" },
        crate::escape::token(&url.path)
    );
    if resp.status() != http::StatusCode::OK {
        return Err(FetchError::Status {
            url: shown,
            status: resp.status().as_u16(),
        });
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => http(*e),
            Err(_) => FetchError::TooBig { url: shown },
        })?;
    Ok(body.to_bytes())
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_except_to_loopback() {
        let u = Url::parse("https://idp.example.com/realms/a").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "idp.example.com", 443, "/realms/a")
        );
        let u = Url::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (false, 8080, "/"));
        assert!(Url::parse("http://[::1]:80/x").is_ok());
        for bad in [
            "http://idp.example.com",
            "ftp://idp",
            "idp.example.com",
            "https://user:pw@idp/",
            "https://idp/#frag",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        assert!(Url::parse(&format!("https://idp/{}", "a".repeat(2000))).is_err());
    }
}
