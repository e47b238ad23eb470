//! sclb as a TLS client: to an OIDC issuer (`auth.ca`), to servers that serve TLS
//! (`server_tls`) and to the session store's database. Trusted roots come from a PEM file when one is named, else from the
//! system's store; a handshake checks the peer's certificate against them and the name asked
//! for, unless `server_tls.verify = false` says otherwise.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::warn;

use super::{TlsError, Which, certs, provider};

/// The CAs in `ca`, or the system's store when `None`.
pub fn roots(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let Some(ca) = ca else {
        return Ok(system_roots().clone());
    };
    let mut roots = RootCertStore::empty();
    for c in certs(Which::ServerCa, ca)? {
        roots.add(c).map_err(|e| TlsError::Bad {
            which: Which::ServerCa,
            path: ca.into(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The system's CA store, read once. Unreadable certificates are skipped; none at all fails
/// every handshake, which then says the server's certificate is not trusted.
fn system_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            warn!("reading the system CA store: {e}");
        }
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            warn!("no system CA certificates found: name a ca file to verify servers");
        }
        roots
    })
}

/// The protocol versions sclb speaks as a client, on the ring provider.
fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
}

/// A client config for the session store's database: servers verified against `ca` (a PEM
/// bundle) when given, else against the system's roots.
pub fn store_config(ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    Ok(builder()
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth())
}

/// A client config trusting `roots` (or nothing at all when `verify` is false), offering `alpn`.
pub fn config(roots: RootCertStore, verify: bool, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let builder = builder();
    let mut cfg = if verify {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth()
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// `verify = false`: the channel is encrypted but the peer is not authenticated (signatures
/// are still checked, so the handshake itself is sound).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A backend's `server_tls`, ready to connect: sclb speaks TLS to its servers.
#[derive(Clone)]
pub struct ServerTls {
    pub settings: crate::config::ServerTlsConfig,
    config: Arc<ClientConfig>,
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings.fmt(f)
    }
}

/// A connection to a server: plain, or TLS when its backend has `server_tls`.
pub type ServerStream = tokio_util::either::Either<TcpStream, Box<TlsStream<TcpStream>>>;

impl ServerTls {
    /// Reads the CA file (the system store without one); ALPN offers `h2` (Spark Connect is
    /// gRPC, whose TLS servers require it).
    pub fn new(settings: crate::config::ServerTlsConfig) -> Result<ServerTls, String> {
        let roots = if settings.verify {
            roots(settings.ca.as_deref()).map_err(|e| e.to_string())?
        } else {
            RootCertStore::empty()
        };
        let config = config(roots, settings.verify, &[b"h2"]);
        Ok(ServerTls { settings, config })
    }

    /// The TLS handshake on `tcp`, naming `sni` or else the server's address (its certificate
    /// must then hold that IP address).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match &self.settings.sni {
            Some(n) => ServerName::try_from(n.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            None => ServerName::IpAddress(addr.ip().into()),
        };
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
    }

    /// `tcp`, wrapped in TLS when `tls` is set.
    pub async fn wrap(
        tls: Option<&ServerTls>,
        tcp: TcpStream,
        addr: SocketAddr,
    ) -> std::io::Result<ServerStream> {
        Ok(match tls {
            Some(t) => tokio_util::either::Either::Right(Box::new(t.handshake(tcp, addr).await?)),
            None => tokio_util::either::Either::Left(tcp),
        })
    }
}
