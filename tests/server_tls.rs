//! `server_tls` on a backend, against the real `sclb` binary and servers that serve only TLS
//! (certificates from a test CA, rcgen): an L4 frontend copies a plain client's bytes through
//! TLS to its server, the gateway's upstream HTTP/2 runs over TLS, health checks speak TLS,
//! and a backend that does not trust the servers' CA has them marked DOWN (L6RSP) while its
//! clients are refused, with a log line saying why.

mod common;
#[path = "common/grpc.rs"]
mod grpc;
#[path = "common/pki.rs"]
mod pki;
mod realbin;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use grpc::{Client, FakeGrpc};
use pki::Ca;
use realbin::SclbProcess;

/// A TLS acceptor for (cert PEM, key PEM), offering ALPN h2.
fn acceptor(cert: &(String, String)) -> tokio_rustls::TlsAcceptor {
    let chain = CertificateDer::pem_slice_iter(cert.0.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS-only echo server that greets with `name`; records each client's SNI.
async fn tls_echo(
    name: &'static str,
    cert: &(String, String),
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = acceptor(cert);
    let sni = Arc::new(Mutex::new(Vec::new()));
    let seen = sni.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tls, seen) = (tls.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut s) = tls.accept(tcp).await else {
                    return;
                };
                let name_asked = s.get_ref().1.server_name().unwrap_or("-").to_string();
                seen.lock().unwrap().push(name_asked);
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, sni)
}

fn global(dir: &Path) -> String {
    format!(
        "[global]\nlog = {{ level = \"info\", format = \"json\" }}\n\
         admin = {{ path = \"{}\", level = \"admin\" }}\n",
        dir.join("admin.sock").display()
    )
}

/// The `show stat` CSV row of `server` in `backend`.
fn stat_row(sclb: &SclbProcess, backend: &str, server: &str) -> String {
    sclb.admin("show stat")
        .lines()
        .find(|l| l.starts_with(&format!("{backend},{server},")))
        .unwrap_or_default()
        .to_string()
}

const CHECK: &str = "check = { type = \"tcp\", inter = \"300ms\", fastinter = \"300ms\", downinter = \"300ms\", fall = 2, rise = 1 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_copies_plain_clients_through_tls_and_a_wrong_ca_marks_servers_down() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, stranger) = (Ca::new("spark servers"), Ca::new("someone else"));
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(d.join("other.pem"), stranger.pem()).unwrap();
    let (echo, sni) = tls_echo("b1", &ca.server("spark-1.test")).await;
    let config = format!(
        "{}\n[[frontend]]\nname = \"good\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"trusting\"\n\n\
         [[frontend]]\nname = \"bad\"\nbind = [\"127.0.0.2:0\"]\nbackend = \"distrusting\"\n\n\
         [[backend]]\nname = \"trusting\"\n{CHECK}\n\
         server_tls = {{ ca = \"{}\", sni = \"spark-1.test\" }}\n\
         servers = [ {{ name = \"b1\", addr = \"{echo}\" }} ]\n\n\
         [[backend]]\nname = \"distrusting\"\nretries = 0\n{CHECK}\n\
         server_tls = {{ ca = \"{}\" }}\n\
         servers = [ {{ name = \"b1\", addr = \"{echo}\" }} ]\n",
        global(d),
        d.join("ca.pem").display(),
        d.join("other.pem").display(),
    );
    let mut sclb = SclbProcess::start(d, &config, &[]);
    let good = sclb.frontend_addr("good");
    let bad = sclb.frontend_addr("bad");

    // A plain client's bytes go through TLS to the server and back; sclb asked for the sni.
    assert_eq!(
        common::through(1, good, b"").await.as_deref(),
        Some("b1\nping\n")
    );
    assert!(sni.lock().unwrap().contains(&"spark-1.test".to_string()));

    // The backend that does not trust the servers' CA: its check (a TLS handshake) marks the
    // server DOWN, saying why; the trusting backend's check passes at layer 6.
    assert!(
        sclb.wait_for(Duration::from_secs(15), |p| p.log_lines().iter().any(|l| {
            realbin::message(l).starts_with(
                "Server distrusting/b1 is DOWN, reason: L6RSP, info: \"TLS handshake failed",
            )
        })),
        "no DOWN line:\n{}",
        sclb.log_text()
    );
    for (backend, status, check) in [
        ("distrusting", ",DOWN,", "L6RSP"),
        ("trusting", ",UP,", "L6OK"),
    ] {
        assert!(
            sclb.wait_for(Duration::from_secs(10), |p| {
                let row = stat_row(p, backend, "b1");
                row.contains(status) && row.contains(check)
            }),
            "{}",
            stat_row(&sclb, backend, "b1")
        );
    }
    // Its clients are refused, and the log says it was the handshake.
    assert_eq!(common::through(1, bad, b"").await, None);
    assert!(
        sclb.wait_for(Duration::from_secs(5), |p| {
            p.log_lines().iter().any(|l| {
                realbin::message(l).contains("TLS handshake with b1 failed")
                    && realbin::field(l, "end") == "server_tls"
            })
        }),
        "no log line for the refused client:\n{}",
        sclb.log_text()
    );
    // The trusting frontend still serves.
    assert_eq!(
        common::through(1, good, b"").await.as_deref(),
        Some("b1\nping\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_speaks_tls_to_servers_and_refuses_untrusted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, stranger) = (Ca::new("spark servers"), Ca::new("someone else"));
    let d = dir.path();
    std::fs::write(d.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(d.join("other.pem"), stranger.pem()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = FakeGrpc::serve_tls(
        "s1",
        listener,
        grpc::Behaviour::default(),
        Some(acceptor(&ca.server("spark-1.test"))),
    );
    let h2_check = CHECK.replace("\"tcp\"", "\"h2\"");
    // No sni: the name checked is the server's address (the certificate holds 127.0.0.1).
    let config = format!(
        "{}\n[[frontend]]\nname = \"gw\"\nmode = \"grpc\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"trusting\"\n\n\
         [[frontend]]\nname = \"gw_bad\"\nmode = \"grpc\"\nbind = [\"127.0.0.2:0\"]\nbackend = \"distrusting\"\n\n\
         [[backend]]\nname = \"trusting\"\n{h2_check}\nserver_tls = {{ ca = \"{}\" }}\n\
         servers = [ {{ name = \"s1\", addr = \"{}\" }} ]\n\n\
         [[backend]]\nname = \"distrusting\"\nretries = 0\n{h2_check}\nserver_tls = {{ ca = \"{}\" }}\n\
         servers = [ {{ name = \"s1\", addr = \"{}\" }} ]\n",
        global(d),
        d.join("ca.pem").display(),
        server.addr,
        d.join("other.pem").display(),
        server.addr,
    );
    let mut sclb = SclbProcess::start(d, &config, &[]);
    let gw = sclb.frontend_addr("gw");
    let gw_bad = sclb.frontend_addr("gw_bad");

    let sid = grpc::session(7);
    let mut client = Client::connect(gw).await;
    let r = client
        .call(
            "AnalyzePlan",
            grpc::request("03_AnalyzePlan_schema.bin", &sid),
        )
        .await;
    assert_eq!(r.status, 0, "{r:?}");
    assert_eq!(r.server(), "s1");
    assert!(
        server.sessions().contains(&sid),
        "the RPC reached the TLS server"
    );

    // The h2 check runs over TLS: UP at layer 7 for the trusting backend; the other's fails
    // its handshake and goes DOWN.
    assert!(
        sclb.wait_for(Duration::from_secs(15), |p| p.log_lines().iter().any(|l| {
            realbin::message(l).starts_with(
                "Server distrusting/s1 is DOWN, reason: L6RSP, info: \"TLS handshake failed",
            )
        })),
        "no DOWN line:\n{}",
        sclb.log_text()
    );
    assert!(
        sclb.wait_for(Duration::from_secs(10), |p| {
            let row = stat_row(p, "trusting", "s1");
            row.contains(",UP,") && row.contains("L7OK")
        }),
        "{}",
        stat_row(&sclb, "trusting", "s1")
    );

    let mut other = Client::connect(gw_bad).await;
    let r = other
        .call(
            "AnalyzePlan",
            grpc::request("03_AnalyzePlan_schema.bin", &grpc::session(8)),
        )
        .await;
    assert_eq!(r.status, 14, "UNAVAILABLE: {r:?}");
    assert!(r.message.contains("TLS handshake failed"), "{}", r.message);
    assert!(!server.sessions().contains(&grpc::session(8)));
}
