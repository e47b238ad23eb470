//! `auth = { type = "oidc" }` against the real `sclb` binary and a fake OpenID Connect issuer
//! served here over real HTTPS (a test CA, rcgen), with real RS256 and ES256 keys: keys found
//! through the discovery document, a rotation picked up on the first token with a new `kid`
//! (fetches rate-limited whatever kids clients make up), an issuer that goes down keeps the
//! cached keys working and a new `kid` is then UNAUTHENTICATED saying why, an issuer that
//! comes back is used again, and a discovery document naming another issuer is refused.

mod common;
#[path = "common/grpc.rs"]
mod grpc;
#[path = "common/pki.rs"]
mod pki;
mod realbin;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use grpc::{Client, FakeGrpc};
use pki::{Ca, SigningKey, now};
use realbin::SclbProcess;

/// What the fake issuer serves and what it was asked.
#[derive(Default)]
struct Published {
    issuer: String,
    keys: Vec<Value>,
    key_fetches: usize,
}

/// An OIDC issuer at `https://127.0.0.1:PORT/realms/test`.
struct FakeIssuer {
    addr: SocketAddr,
    published: Arc<Mutex<Published>>,
    tls: tokio_rustls::TlsAcceptor,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeIssuer {
    async fn start(cert: &(String, String), keys: Vec<Value>) -> FakeIssuer {
        let chain = CertificateDer::pem_slice_iter(cert.0.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(cert.1.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut me = FakeIssuer {
            addr,
            published: Arc::new(Mutex::new(Published {
                issuer: format!("https://{addr}/realms/test"),
                keys,
                key_fetches: 0,
            })),
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
            task: None,
        };
        me.serve(listener);
        me
    }

    fn url(&self) -> String {
        self.published.lock().unwrap().issuer.clone()
    }

    fn set_keys(&self, keys: Vec<Value>) {
        self.published.lock().unwrap().keys = keys;
    }

    fn key_fetches(&self) -> usize {
        self.published.lock().unwrap().key_fetches
    }

    fn serve(&mut self, listener: TcpListener) {
        let (published, tls) = (self.published.clone(), self.tls.clone());
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let (published, tls) = (published.clone(), tls.clone());
                conns.spawn(async move {
                    let Ok(tls) = tls.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let published = published.clone();
                        async move { Ok::<_, Infallible>(answer(req.uri().path(), &published)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        }));
    }

    /// Closes the listener and every connection: the issuer is unreachable.
    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Listens again on the same port.
    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for FakeIssuer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn answer(path: &str, published: &Mutex<Published>) -> hyper::Response<Full<Bytes>> {
    let mut p = published.lock().unwrap();
    let body = match path {
        "/realms/test/.well-known/openid-configuration" => json!({
            "issuer": p.issuer,
            "jwks_uri": format!("{}/protocol/openid-connect/certs", p.issuer),
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        }),
        "/realms/test/protocol/openid-connect/certs" => {
            p.key_fetches += 1;
            // Beside the signing keys, an encryption key and a kty sclb does not know: a
            // relying party skips them.
            let mut keys = p.keys.clone();
            keys.push(
                json!({ "kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB", "e": "AQAB" }),
            );
            keys.push(json!({ "kty": "PQC", "kid": "future-1" }));
            json!({ "keys": keys })
        }
        _ => {
            return hyper::Response::builder()
                .status(404)
                .body(Full::new(Bytes::from_static(b"not found")))
                .unwrap();
        }
    };
    hyper::Response::new(Full::new(Bytes::from(body.to_string())))
}

fn claims(issuer: &str, user: &str) -> Value {
    json!({ "iss": issuer, "aud": "sclb", "sub": user, "exp": now() + 600 })
}

/// One AnalyzePlan with `token`; a new session per call.
async fn call(client: &mut Client, token: &str) -> grpc::Reply {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(100);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    client.analyze_with_token(token, &grpc::session(n)).await
}

/// Calls until the reply satisfies `ok` (bounded): the last reply.
async fn call_until(
    client: &mut Client,
    token: &str,
    within: Duration,
    ok: impl Fn(&grpc::Reply) -> bool,
) -> grpc::Reply {
    let deadline = Instant::now() + within;
    loop {
        let r = call(client, token).await;
        if ok(&r) || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_keys_follow_the_issuer_and_survive_its_outage() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test issuers");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let (r1, e1, e2, e3) = (
        SigningKey::rs256("r1"),
        SigningKey::es256("e1"),
        SigningKey::es256("e2"),
        SigningKey::es256("e3"),
    );
    let mut idp =
        FakeIssuer::start(&ca.server("idp.test"), vec![r1.jwk.clone(), e1.jwk.clone()]).await;
    let issuer = idp.url();
    let server = FakeGrpc::start("s1", grpc::Behaviour::default()).await;
    // gw2 names the same issuer as "localhost": its discovery document names another issuer.
    let auth = |url: &str| {
        format!(
            "auth = {{ type = \"oidc\", issuer = \"{url}\", audience = \"sclb\", ca = \"{}\", \
             min_refresh = \"2s\", refresh = \"1h\", timeout = \"2s\" }}",
            ca_path.display()
        )
    };
    let config = format!(
        "[global]\nlog = {{ level = \"info\", format = \"json\" }}\n\
         admin = {{ path = \"{}\", level = \"admin\" }}\nstats = {{ bind = \"127.0.0.1:0\" }}\n\n\
         [[frontend]]\nname = \"gw\"\nmode = \"grpc\"\nbind = [\"127.0.0.1:0\"]\nbackend = \"be\"\n{}\n\n\
         [[frontend]]\nname = \"gw2\"\nmode = \"grpc\"\nbind = [\"127.0.0.2:0\"]\nbackend = \"be\"\n{}\n\n\
         [[backend]]\nname = \"be\"\nservers = [ {{ name = \"s1\", addr = \"{}\" }} ]\n",
        dir.path().join("admin.sock").display(),
        auth(&issuer),
        auth(&issuer.replace("127.0.0.1", "localhost")),
        server.addr
    );
    let mut sclb = SclbProcess::start(dir.path(), &config, &[]);
    let addr = sclb.frontend_addr("gw");
    let gw2 = sclb.frontend_addr("gw2");
    let mut client = Client::connect(addr).await;

    // The keys come from the issuer: an RS256 and an ES256 token work, named by their kid.
    let r = call_until(
        &mut client,
        &r1.sign(&claims(&issuer, "rita"), None),
        Duration::from_secs(15),
        |r| r.status == 0,
    )
    .await;
    assert_eq!(r.status, 0, "{r:?}");
    let r = call(&mut client, &e1.sign(&claims(&issuer, "emil"), None)).await;
    assert_eq!(r.status, 0, "{r:?}");
    {
        let seen = server.seen.lock().unwrap();
        let users: Vec<_> = seen
            .by_session
            .values()
            .flat_map(|v| v.iter().map(|(_, u)| u.clone().unwrap_or_default()))
            .collect();
        assert!(
            users.contains(&"rita".to_string()) && users.contains(&"emil".to_string()),
            "{users:?}"
        );
    }
    // Another issuer's token, signed by a key the issuer publishes: refused by iss.
    let r = call(
        &mut client,
        &e1.sign(&claims("https://evil.test", "mallory"), None),
    )
    .await;
    assert_eq!(r.status, 16);
    assert!(r.message.contains("issuer (iss)"), "{}", r.message);
    assert!(sclb.log_text().contains("OIDC keys loaded"));

    // Rotation: e2 appears, r1 goes. The first token with kid e2 makes sclb look (once the
    // last fetch is min_refresh old); r1 is then refused.
    idp.set_keys(vec![e1.jwk.clone(), e2.jwk.clone()]);
    let r = call_until(
        &mut client,
        &e2.sign(&claims(&issuer, "erin"), None),
        Duration::from_secs(15),
        |r| r.status == 0,
    )
    .await;
    assert_eq!(r.status, 0, "the rotated key was not used: {r:?}");
    let r = call(&mut client, &r1.sign(&claims(&issuer, "rita2"), None)).await;
    assert_eq!(r.status, 16, "{r:?}");
    assert!(
        r.message.contains("no key fits the token's kid"),
        "{}",
        r.message
    );

    // Made-up kids cannot make sclb hammer the issuer: at most one fetch per min_refresh.
    let (before, started) = (idp.key_fetches(), Instant::now());
    for i in 0..20 {
        let r = call(
            &mut client,
            &e1.sign(&claims(&issuer, "x"), Some(&format!("made-up-{i}"))),
        )
        .await;
        assert_eq!(r.status, 16, "{r:?}");
    }
    let allowed = 1 + started.elapsed().as_secs() as usize / 2;
    assert!(
        idp.key_fetches() - before <= allowed,
        "{} fetches for 20 unknown kids in {:?}",
        idp.key_fetches() - before,
        started.elapsed()
    );

    // The issuer goes down: cached keys keep working; a new kid is refused, saying why.
    idp.stop();
    let r = call(&mut client, &e2.sign(&claims(&issuer, "erin2"), None)).await;
    assert_eq!(r.status, 0, "cached keys stopped working: {r:?}");
    let e3_token = e3.sign(&claims(&issuer, "eve"), None);
    let r = call_until(&mut client, &e3_token, Duration::from_secs(15), |r| {
        r.message.contains("cannot be reached")
    })
    .await;
    assert_eq!(r.status, 16, "{r:?}");
    assert!(
        r.message.contains("no key fits the token's kid"),
        "{}",
        r.message
    );
    assert!(r.message.contains("cannot be reached"), "{}", r.message);
    let log = sclb.log_text();
    assert_eq!(
        log.matches("cannot fetch keys from the OIDC issuer, keeping the 2 cached keys")
            .count(),
        1,
        "one warning per outage:\n{log}"
    );
    let page = sclb.metrics();
    let failures = page
        .lines()
        .find(|l| l.starts_with("sclb_auth_keys_refresh_failures_total{frontend=\"gw\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 1, "no failed fetch counted:\n{page}");
    assert!(page.contains("sclb_auth_keys_last_refresh_timestamp_seconds{frontend=\"gw\"}"));

    // Back, now publishing e3: the next look finds it, and the log says the issuer is back.
    idp.set_keys(vec![e2.jwk.clone(), e3.jwk.clone()]);
    idp.restart().await;
    let r = call_until(&mut client, &e3_token, Duration::from_secs(20), |r| {
        r.status == 0
    })
    .await;
    assert_eq!(r.status, 0, "{r:?}");
    assert!(sclb.log_text().contains("OIDC issuer reached again"));

    // A discovery document that names another issuer is not trusted: no keys for gw2.
    let mut other = Client::connect(gw2).await;
    let issuer2 = issuer.replace("127.0.0.1", "localhost");
    let r = call(&mut other, &e2.sign(&claims(&issuer2, "erin"), None)).await;
    assert_eq!(r.status, 16, "{r:?}");
    assert!(
        sclb.wait_for(Duration::from_secs(10), |p| p
            .log_text()
            .contains("the discovery document names issuer")),
        "no log line about the wrong issuer"
    );
    drop(server);
}
