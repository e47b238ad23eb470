//! TLS termination and token auth, against the real `sclb` binary: certificates made here with
//! rcgen, a rustls client, echo and fake gRPC servers on 127.0.0.1:0.
//!
//! - An L4 TLS frontend negotiates ALPN h2, passes bytes both ways, and picks up a new
//!   certificate from its files without dropping a live connection; a key that does not match
//!   keeps the running certificate and says why.
//! - A gateway frontend with static tokens: no token or a wrong one is UNAUTHENTICATED naming
//!   the check (counted by reason, token never logged); a good token's identity replaces the
//!   client's user_id; another user with the same session id is PERMISSION_DENIED; servers get
//!   the backend token and never the client's.

mod common;
#[path = "common/grpc.rs"]
mod grpc;
#[path = "common/pki.rs"]
mod pki;
mod realbin;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use grpc::{Client, FakeGrpc};
use pki::{Ca, SigningKey, now};
use realbin::SclbProcess;

/// A self-signed certificate for 127.0.0.1 named `cn`: (cert PEM, key PEM).
fn cert(cn: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Replaces a file the way cert-manager and kubelet do: write aside, rename over.
fn swap(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS client that trusts only `trusted` (PEM), offering ALPN h2.
fn connector(trusted: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(trusted.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    addr: SocketAddr,
    trusted: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        connector(trusted).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// Reads one line (the echo backend's greeting, or an echoed line).
async fn line(s: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b))
        .await
        .expect("a line within 5 s")
        .is_ok()
    {
        if b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Waits (bounded, polling) until `f` is true.
async fn eventually<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut f: impl FnMut() -> F,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    f().await
}

fn global(dir: &Path) -> String {
    format!(
        "[global]\nlog = {{ level = \"info\", format = \"json\" }}\n\
         admin = {{ path = \"{}\", level = \"admin\" }}\n\
         stats = {{ bind = \"127.0.0.1:0\" }}\n",
        dir.join("admin.sock").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_tls_serves_h2_and_rotates_certificates_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_a, key_a) = cert("first");
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, &cert_a).unwrap();
    std::fs::write(&key_path, &key_a).unwrap();
    let echo = common::Backend::start("b1").await;
    let config = format!(
        "{}\n[[frontend]]\nname = \"fe\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"be\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n\n\
         [[backend]]\nname = \"be\"\nservers = [ {{ name = \"b1\", addr = \"{}\" }} ]\n",
        global(dir.path()),
        cert_path.display(),
        key_path.display(),
        echo.addr
    );
    let mut sclb = SclbProcess::start(dir.path(), &config, &[]);
    let addr = sclb.frontend_addr("fe");

    // Plain bytes after the handshake reach the server and come back; ALPN says h2.
    let mut live = tls_connect(addr, &cert_a)
        .await
        .expect("TLS with the first cert");
    assert_eq!(live.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(line(&mut live).await, "b1");
    live.write_all(b"before\n").await.unwrap();
    assert_eq!(line(&mut live).await, "before");
    // A client that does not trust this certificate is refused.
    let (other, _) = cert("stranger");
    assert!(tls_connect(addr, &other).await.is_err());

    // Rotation: new handshakes get the new certificate; the live connection goes on.
    let (cert_b, key_b) = cert("second");
    swap(&key_path, &key_b);
    swap(&cert_path, &cert_b);
    assert!(
        eventually(Duration::from_secs(15), || async {
            tls_connect(addr, &cert_b).await.is_ok()
        })
        .await,
        "the new certificate was not served within 15 s"
    );
    live.write_all(b"after\n").await.unwrap();
    assert_eq!(line(&mut live).await, "after");
    assert!(tls_connect(addr, &cert_a).await.is_err());

    // A certificate whose key is not on disk: the running one stays, and the log says why.
    let (cert_c, _) = cert("third");
    swap(&cert_path, &cert_c);
    assert!(
        sclb.wait_for(Duration::from_secs(15), |p| p
            .log_text()
            .contains("keeping the previous certificate")),
        "no log line about the bad pair"
    );
    let mut again = tls_connect(addr, &cert_b)
        .await
        .expect("the previous certificate is still served");
    assert_eq!(line(&mut again).await, "b1");
    live.write_all(b"still\n").await.unwrap();
    assert_eq!(line(&mut live).await, "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tokens_identify_users_who_own_their_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let hash = |t: &str| {
        sha2::Sha256::digest(t.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nsha256 = \"{}\"\nuser = \"alice\"\n\n[[token]]\nsha256 = \"{}\"\nuser = \"bob\"\n",
            hash("alice-token-0123456789"),
            hash("bob-token-0123456789")
        ),
    )
    .unwrap();
    let backend_token = dir.path().join("backend.token");
    std::fs::write(&backend_token, "backend-secret-xyz\n").unwrap();
    let server = FakeGrpc::start("s1", grpc::Behaviour::default()).await;
    let config = format!(
        "{}\n[[frontend]]\nname = \"gw\"\nmode = \"grpc\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"be\"\n\
         auth = {{ type = \"static\", tokens = \"{}\" }}\n\n\
         [[backend]]\nname = \"be\"\nbackend_token = {{ file = \"{}\" }}\n\
         servers = [ {{ name = \"s1\", addr = \"{}\" }} ]\n",
        global(dir.path()),
        tokens.display(),
        backend_token.display(),
        server.addr
    );
    let mut sclb = SclbProcess::start(dir.path(), &config, &[]);
    let addr = sclb.frontend_addr("gw");
    let mut client = Client::connect(addr).await;
    let sid = grpc::session(17);
    // The recorded request claims user "sclb-test" (see tests/fixtures/spark/rpcs).
    let body = || grpc::request("03_AnalyzePlan_schema.bin", &sid);

    let r = grpc::finish(client.start("AnalyzePlan", body()).await).await;
    assert_eq!(r.status, 16, "no token: {r:?}");
    assert!(
        r.message.contains("no authorization header"),
        "{}",
        r.message
    );
    let r = grpc::finish(
        client
            .start_with(
                "AnalyzePlan",
                body(),
                &[("authorization", "Bearer wrong-token-0123456789")],
            )
            .await,
    )
    .await;
    assert_eq!(r.status, 16, "wrong token: {r:?}");
    assert!(r.message.contains("not in the static token file"));
    assert_eq!(
        server.seen.lock().unwrap().rpcs,
        0,
        "refused RPCs reached a server"
    );

    let alice = [("authorization", "Bearer alice-token-0123456789")];
    let r = grpc::finish(client.start_with("AnalyzePlan", body(), &alice).await).await;
    assert_eq!(r.status, 0, "{r:?}");
    {
        let seen = server.seen.lock().unwrap();
        assert_eq!(
            seen.authorization,
            vec![Some("Bearer backend-secret-xyz".to_string())],
            "the server gets sclb's token, never the client's"
        );
        let users: Vec<_> = seen.by_session[&sid]
            .iter()
            .map(|(_, u)| u.clone())
            .collect();
        assert_eq!(users, vec![Some("alice".to_string())]);
        let b = &seen.bodies[0];
        assert!(
            !b.windows(9).any(|w| w == b"sclb-test"),
            "the claimed user is gone"
        );
    }
    let sessions = sclb.admin("show sessions");
    assert!(
        sessions.contains(&sid) && sessions.contains("user=alice"),
        "{sessions}"
    );

    // Bob, with alice's session id: refused, logged.
    let bob = [("authorization", "Bearer bob-token-0123456789")];
    let r = grpc::finish(client.start_with("AnalyzePlan", body(), &bob).await).await;
    assert_eq!(r.status, 7, "{r:?}");
    assert!(
        r.message.contains("belongs to another user"),
        "{}",
        r.message
    );
    assert_eq!(server.seen.lock().unwrap().rpcs, 1);
    let log = sclb.log_text();
    assert!(log.contains("permission denied: bob used a Spark session that alice owns"));
    assert!(!log.contains("wrong-token"), "a token reached the log");

    // The failures, by reason, on /metrics is covered by the e2e suite; the log has them.
    assert!(
        log.matches("authentication failed").count() >= 2,
        "audit lines for the refused tokens"
    );
    drop(server);
}

/// A TLS client trusting `server_cert`, showing `client` (cert, key) if given.
async fn mtls_connect(
    tcp: TcpStream,
    server_cert: &str,
    client: Option<&(String, String)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(server_cert.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let connect = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp);
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The greeting of the echo server behind an mTLS L4 frontend, from source 127.0.0.`n`;
/// `None` when sclb refuses the client.
async fn mtls_server(
    n: u8,
    addr: SocketAddr,
    server_cert: &str,
    client: Option<&(String, String)>,
) -> Option<String> {
    let tcp = common::connect_from(n, addr).await;
    let mut s = mtls_connect(tcp, server_cert, client).await.ok()?;
    // TLS 1.3: a refused client certificate shows on the first read.
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) if b[0] == b'\n' => return String::from_utf8(out).ok(),
            Ok(Ok(1)) => out.push(b[0]),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identity_pins_l4_clients_and_names_gateway_users() {
    let dir = tempfile::tempdir().unwrap();
    let (server_cert, server_key) = cert("sclb");
    let ca = Ca::new("clients");
    let stranger_ca = Ca::new("someone else");
    for (name, text) in [
        ("tls.crt", &server_cert),
        ("tls.key", &server_key),
        ("ca.pem", &ca.pem()),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let (b1, b2) = (
        common::Backend::start("b1").await,
        common::Backend::start("b2").await,
    );
    let fake = FakeGrpc::start("s1", grpc::Behaviour::default()).await;
    let d = dir.path().display();
    let tls = format!(
        "tls = {{ cert = \"{d}/tls.crt\", key = \"{d}/tls.key\", client_ca = \"{d}/ca.pem\" }}"
    );
    let config = format!(
        "{}\n[[frontend]]\nname = \"l4\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"echo\"\n{tls}\n\n\
         [[frontend]]\nname = \"gw\"\nmode = \"grpc\"\nbind = [\"127.0.0.2:0\"]\nbackend = \"grpc\"\n{tls}\n\n\
         [[backend]]\nname = \"echo\"\nstick = {{ on = \"identity\" }}\n\
         servers = [ {{ name = \"b1\", addr = \"{}\" }}, {{ name = \"b2\", addr = \"{}\" }} ]\n\n\
         [[backend]]\nname = \"grpc\"\nservers = [ {{ name = \"s1\", addr = \"{}\" }} ]\n",
        global(dir.path()),
        b1.addr,
        b2.addr,
        fake.addr
    );
    let mut sclb = SclbProcess::start(dir.path(), &config, &[]);
    let l4 = sclb.frontend_addr("l4");
    let gw = sclb.frontend_addr("gw");
    let alice = ca.client("spiffe://test/alice");
    let bob = ca.client("spiffe://test/bob");

    // No certificate, or one from another CA: refused.
    assert_eq!(mtls_server(2, l4, &server_cert, None).await, None);
    let forged = stranger_ca.client("spiffe://test/alice");
    assert_eq!(mtls_server(2, l4, &server_cert, Some(&forged)).await, None);

    // Pinned by identity: alice keeps her server from any address; bob, from alice's
    // address, is balanced on his own (round robin: the other server).
    let first = mtls_server(2, l4, &server_cert, Some(&alice))
        .await
        .expect("alice gets in");
    let bobs = mtls_server(2, l4, &server_cert, Some(&bob))
        .await
        .expect("bob gets in");
    assert_ne!(first, bobs, "bob was pinned by alice's address");
    for n in 3..6 {
        let again = mtls_server(n, l4, &server_cert, Some(&alice)).await;
        assert_eq!(again.as_deref(), Some(first.as_str()), "from 127.0.0.{n}");
    }

    // On a gateway frontend without auth, the certificate names the Spark user.
    let tcp = TcpStream::connect(gw).await.unwrap();
    let tls = mtls_connect(tcp, &server_cert, Some(&alice)).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut client = Client::from_sender(send, gw);
    let sid = grpc::session(18);
    let r = client
        .call(
            "AnalyzePlan",
            grpc::request("03_AnalyzePlan_schema.bin", &sid),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    let users: Vec<_> = fake.seen.lock().unwrap().by_session[&sid]
        .iter()
        .map(|(_, u)| u.clone())
        .collect();
    assert_eq!(users, vec![Some("spiffe://test/alice".to_string())]);
    assert!(
        sclb.admin("show sessions")
            .contains("user=spiffe://test/alice")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_checks_each_claim_and_follows_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, k2) = (SigningKey::es256("k1"), SigningKey::es256("k2"));
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, serde_json::json!({ "keys": [k1.jwk] }).to_string()).unwrap();
    let server = FakeGrpc::start("s1", grpc::Behaviour::default()).await;
    let config = format!(
        "{}\n[[frontend]]\nname = \"gw\"\nmode = \"grpc\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"be\"\n\
         auth = {{ type = \"jwt\", keys = \"{}\", issuer = \"https://idp.test\", audience = \"sclb\", \
         leeway = \"5s\", user_claim = \"preferred_username\" }}\n\n\
         [[backend]]\nname = \"be\"\nservers = [ {{ name = \"s1\", addr = \"{}\" }} ]\n",
        global(dir.path()),
        jwks.display(),
        server.addr
    );
    let mut sclb = SclbProcess::start(dir.path(), &config, &[]);
    let addr = sclb.frontend_addr("gw");
    let mut client = Client::connect(addr).await;
    let good = |extra: serde_json::Value| {
        let mut c = serde_json::json!({
            "iss": "https://idp.test", "aud": "sclb", "sub": "u-123",
            "preferred_username": "carol", "team": "analytics", "exp": now() + 600,
        });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    let mut call =
        async |token: String, n: u32| client.analyze_with_token(&token, &grpc::session(n)).await;

    let r = call(k1.sign(&good(serde_json::json!({})), None), 30).await;
    assert_eq!(r.status, 0, "{r:?}");
    let seen_user = server.seen.lock().unwrap().by_session[&grpc::session(30)][0]
        .1
        .clone();
    assert_eq!(seen_user.as_deref(), Some("carol"), "user from user_claim");

    for (claims, check) in [
        (serde_json::json!({ "exp": now() - 60 }), "expired (exp)"),
        (serde_json::json!({ "aud": "other" }), "audience (aud)"),
        (
            serde_json::json!({ "iss": "https://evil.test" }),
            "issuer (iss)",
        ),
        (
            serde_json::json!({ "nbf": now() + 600 }),
            "not valid yet (nbf)",
        ),
        (
            serde_json::json!({ "preferred_username": 7 }),
            "no usable user claim",
        ),
    ] {
        let r = call(k1.sign(&good(claims.clone()), None), 31).await;
        assert_eq!(r.status, 16, "{claims}: {r:?}");
        assert!(r.message.contains(check), "{claims}: {}", r.message);
    }
    // Signed by a key the JWKS does not hold (same kid): the signature check fails.
    let r = call(k2.sign(&good(serde_json::json!({})), Some("k1")), 32).await;
    assert!(
        r.message.contains("signature does not verify"),
        "{}",
        r.message
    );
    // An HMAC token against asymmetric keys: refused by algorithm before any key is tried.
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &good(serde_json::json!({})),
        &jsonwebtoken::EncodingKey::from_secret(b"guessable"),
    )
    .unwrap();
    let r = call(hs, 33).await;
    assert!(r.message.contains("algorithm"), "{}", r.message);

    // Rotation: the JWKS now holds k2 only.
    std::fs::write(&jwks, serde_json::json!({ "keys": [k2.jwk] }).to_string()).unwrap();
    let mut rotated = false;
    for i in 0..100 {
        let r = call(k2.sign(&good(serde_json::json!({})), None), 40 + i).await;
        if r.status == 0 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "the new key was not used within 10 s");
    let r = call(k1.sign(&good(serde_json::json!({})), None), 200).await;
    assert_eq!(r.status, 16);
    assert!(r.message.contains("no key fits"), "{}", r.message);

    assert!(sclb.log_text().contains("auth file reloaded"));
    // Each refusal is counted by the check that failed.
    let page = sclb.metrics();
    for reason in [
        "expired",
        "audience",
        "issuer",
        "not_yet_valid",
        "claims",
        "signature",
    ] {
        let series = format!("sclb_auth_failures_total{{frontend=\"gw\",reason=\"{reason}\"}} 1");
        assert!(page.contains(&series), "{series} not in:\n{page}");
    }
}

/// A PROXY v2 header for a TCP4 client `src`.
fn proxy_v2(src: std::net::SocketAddrV4) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.ip().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&src.port().to_be_bytes());
    h.extend_from_slice(&15002u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_only_from_trusted_peers_and_source_rules() {
    let dir = tempfile::tempdir().unwrap();
    let echo = common::Backend::start("b1").await;
    let config = format!(
        "{}\n[[frontend]]\nname = \"fe\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"be\"\n\
         accept_proxy = [\"127.0.0.2/32\"]\ndeny = [\"10.6.6.0/24\", \"127.0.0.4\"]\n\n\
         [[backend]]\nname = \"be\"\nservers = [ {{ name = \"b1\", addr = \"{}\" }} ]\n",
        global(dir.path()),
        echo.addr
    );
    let mut sclb = SclbProcess::start(dir.path(), &config, &[]);
    let addr = sclb.frontend_addr("fe");

    // A trusted peer's v2 header: the client is the address it carries; the header itself
    // never reaches the server (the echo holds our bytes only).
    let v2 = proxy_v2("10.1.2.3:4567".parse().unwrap());
    assert_eq!(
        common::through(2, addr, &v2).await.as_deref(),
        Some("b1\nping\n")
    );
    // v1 as well.
    let v1 = b"PROXY TCP4 10.1.2.4 127.0.0.1 5678 15002\r\n";
    assert_eq!(
        common::through(2, addr, v1).await.as_deref(),
        Some("b1\nping\n")
    );
    // The carried address meets the deny list.
    let v2_denied = proxy_v2("10.6.6.6:1000".parse().unwrap());
    assert_eq!(common::through(2, addr, &v2_denied).await, None);
    // A trusted peer without a header, and an untrusted one with a header: refused.
    assert_eq!(common::through(2, addr, b"").await, None);
    assert_eq!(common::through(3, addr, &v2).await, None);
    // An untrusted peer speaking plainly is a client like any other; a denied one is not.
    assert_eq!(
        common::through(3, addr, b"").await.as_deref(),
        Some("b1\nping\n")
    );
    assert_eq!(common::through(4, addr, b"").await, None);

    assert!(sclb.wait_for(Duration::from_secs(5), |p| {
        let lines = p.log_lines();
        let closed: Vec<&str> = lines
            .iter()
            .filter(|l| realbin::message(l) == "connection closed")
            .map(|l| realbin::field(l, "client"))
            .collect();
        closed.contains(&"10.1.2.3:4567") && closed.contains(&"10.1.2.4:5678")
    }));
    let log = sclb.log_text();
    for why in [
        "10.6.6.6 is not allowed on this frontend",
        "no PROXY header from 127.0.0.2",
        "a PROXY header from 127.0.0.3, which is not listed in accept_proxy",
        "127.0.0.4 is not allowed on this frontend",
    ] {
        assert!(log.contains(why), "no log line saying {why:?}");
    }
}
