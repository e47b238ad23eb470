//! TLS termination on frontends (rustls with the ring provider only; TLS 1.2 and 1.3).
//!
//! Owns each TLS frontend's running `rustls::ServerConfig`, behind one `ArcSwap` per frontend:
//! a handshake loads it once, so replacing it never touches a live connection. Certificates
//! enter from the files named by `tls = { cert, key, client_ca }`; [`watch`] re-reads them when
//! their size, mtime or inode changes (cert-manager writes, kubelet's Secret symlink swaps),
//! and a pair that fails to load keeps the previous one and logs why. The verified client
//! certificate of an mTLS connection leaves as an [`crate::auth::Identity`].

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::config::{ClientVerify, Config, IdentityFrom, TlsConfig};

pub mod client;

/// Which of a frontend's TLS files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Cert,
    Key,
    ClientCa,
    /// A CA bundle sclb verifies a server with (`server_tls.ca`, `auth.ca`, the session
    /// store's database).
    ServerCa,
}

/// Why a certificate, key or CA bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        which: Which,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Bad {
        which: Which,
        path: PathBuf,
        what: String,
    },
}

impl TlsError {
    /// The file the error is about.
    pub fn file(&self) -> Which {
        match self {
            TlsError::Read { which, .. } | TlsError::Bad { which, .. } => *which,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(which: Which, path: &Path) -> Result<Vec<u8>, TlsError> {
    // Certificates and keys are small; a bigger file is a mistake, not a certificate.
    const MAX: u64 = 1 << 20;
    let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
        which,
        path: path.into(),
        source,
    })?;
    if meta.len() > MAX {
        return Err(TlsError::Bad {
            which,
            path: path.into(),
            what: format!("{} bytes, more than a PEM file should hold", meta.len()),
        });
    }
    std::fs::read(path).map_err(|source| TlsError::Read {
        which,
        path: path.into(),
        source,
    })
}

fn certs(which: Which, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(which, path)?;
    let bad = |what: String| TlsError::Bad {
        which,
        path: path.into(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Builds the rustls config of a frontend from its files, checking that key and certificate
/// belong together. `alpn`: protocols offered (`h2` for Spark Connect).
pub fn build(cfg: &TlsConfig, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let chain = certs(Which::Cert, &cfg.cert)?;
    let key_pem = read(Which::Key, &cfg.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Bad {
        which: Which::Key,
        path: cfg.key.clone(),
        what: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3");
    let builder = match (&cfg.client_ca, cfg.verify) {
        (Some(ca), verify) if verify != ClientVerify::None => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(Which::ClientCa, ca)? {
                roots.add(c).map_err(|e| TlsError::Bad {
                    which: Which::ClientCa,
                    path: ca.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            let v = if verify == ClientVerify::Optional {
                v.allow_unauthenticated()
            } else {
                v
            };
            let v = v.build().map_err(|e| TlsError::Bad {
                which: Which::ClientCa,
                path: ca.clone(),
                what: e.to_string(),
            })?;
            builder.with_client_cert_verifier(v)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Bad {
            which: Which::Key,
            path: cfg.key.clone(),
            what: format!("does not go with certificate {}: {e}", cfg.cert.display()),
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// What identifies the current content of a file: size, mtime and inode.
pub type Stamp = Option<(u64, SystemTime, u64)>;

pub fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

fn stamps(cfg: &TlsConfig) -> [Stamp; 3] {
    [
        stamp(&cfg.cert),
        stamp(&cfg.key),
        cfg.client_ca.as_deref().and_then(stamp),
    ]
}

/// One frontend's TLS: its settings and the config in force.
pub struct FrontendTls {
    settings: TlsConfig,
    alpn: Vec<&'static [u8]>,
    config: ArcSwap<ServerConfig>,
    /// The files' stamps when last read (successfully or not).
    seen: Mutex<[Stamp; 3]>,
}

impl FrontendTls {
    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    pub fn settings(&self) -> &TlsConfig {
        &self.settings
    }

    /// Re-reads the files if they changed; a pair that fails keeps the running one.
    fn refresh(&self, frontend: &str) {
        let now = stamps(&self.settings);
        let mut seen = self.seen.lock();
        if *seen == now {
            return;
        }
        *seen = now;
        drop(seen);
        match build(&self.settings, &self.alpn) {
            Ok(c) => {
                self.config.store(Arc::new(c));
                info!(frontend, cert = %self.settings.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => warn!(
                frontend,
                "TLS files changed but cannot be used, keeping the previous certificate: {e}"
            ),
        }
    }
}

/// Every TLS frontend's running config, by frontend name; lives across reloads.
#[derive(Default)]
pub struct TlsStore {
    by_frontend: Mutex<HashMap<String, Arc<FrontendTls>>>,
}

impl TlsStore {
    /// The TLS of `frontend`, if it terminates TLS.
    pub fn get(&self, frontend: &str) -> Option<Arc<FrontendTls>> {
        self.by_frontend.lock().get(frontend).cloned()
    }

    /// Makes the store match `config`: unchanged settings keep their running config (and the
    /// files are checked for changes), new ones are built. A frontend whose files fail to
    /// load keeps what it had; one that never loaded refuses TLS clients until they do.
    pub fn sync(&self, config: &Config) {
        let mut map = self.by_frontend.lock();
        map.retain(|name, t| {
            config
                .frontends
                .iter()
                .any(|f| f.name == *name && f.tls.as_ref() == Some(&t.settings))
        });
        for fe in &config.frontends {
            let Some(settings) = &fe.tls else { continue };
            if let Some(t) = map.get(&fe.name) {
                t.refresh(&fe.name);
                continue;
            }
            // Spark Connect is gRPC: HTTP/2 on both kinds of frontend (grpc clients require
            // ALPN h2 to be negotiated).
            let alpn: Vec<&'static [u8]> = vec![b"h2"];
            match build(settings, &alpn) {
                Ok(c) => {
                    map.insert(
                        fe.name.clone(),
                        Arc::new(FrontendTls {
                            settings: settings.clone(),
                            alpn,
                            config: ArcSwap::from_pointee(c),
                            seen: Mutex::new(stamps(settings)),
                        }),
                    );
                }
                Err(e) => warn!(frontend = %fe.name, "TLS not loaded: {e}"),
            }
        }
    }

    /// Re-reads every frontend's files that changed.
    pub fn refresh(&self) {
        let all: Vec<(String, Arc<FrontendTls>)> = self
            .by_frontend
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, t) in all {
            t.refresh(&name);
        }
    }
}

/// How often certificate files are looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The client certificate's identity, by the frontend's `identity` setting.
pub fn peer_identity(
    conn: &rustls::ServerConnection,
    from: IdentityFrom,
) -> Option<crate::auth::Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::URI(u) => uris.push(u.to_string()),
                x509_parser::extensions::GeneralName::DNSName(d) => dns.push(d.to_string()),
                _ => {}
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .map(str::to_string);
    let name = match from {
        IdentityFrom::Auto => uris
            .into_iter()
            .next()
            .or_else(|| dns.into_iter().next())
            .or(cn),
        IdentityFrom::SanUri => uris.into_iter().next(),
        IdentityFrom::SanDns => dns.into_iter().next(),
        IdentityFrom::Cn => cn,
    }?;
    crate::auth::Identity::from_certificate(&name)
}
