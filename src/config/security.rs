//! Who may connect and as whom: a frontend's `tls` and `auth` tables and a backend's
//! `backend_token`. Every file they name is read here too, so that a missing certificate, a
//! key that does not match it, a malformed token file or JWKS is reported at load time with
//! the file, line and field of the key that names it.

use std::path::PathBuf;
use std::time::Duration;

use super::reader::{Table, join};

/// `tls = { cert, key, client_ca, verify, identity }` on a frontend: sclb terminates TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of the CAs that sign client certificates (mTLS).
    pub client_ca: Option<PathBuf>,
    pub verify: ClientVerify,
    /// Which name of a verified client certificate is the connection's identity.
    pub identity: IdentityFrom,
}

/// Whether a client certificate is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientVerify {
    /// No `client_ca`: no client certificate is asked for.
    None,
    /// A certificate, if sent, must verify against `client_ca`; clients without one connect.
    Optional,
    /// Every client must present a certificate that verifies against `client_ca`.
    Required,
}

/// Where a client certificate's identity is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityFrom {
    /// The first SAN URI, else the first SAN DNS name, else the subject CN.
    Auto,
    SanUri,
    SanDns,
    Cn,
}

/// `auth` on a gateway frontend: how a client proves who it is.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthConfig {
    /// A file of SHA-256 token hashes, each with an identity.
    Static { tokens: PathBuf },
    /// Signed JWTs checked against keys from a PEM or JWKS file (`type = "jwt"`) or from an
    /// OpenID Connect issuer's discovery document (`type = "oidc"`).
    Jwt(Box<JwtConfig>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct JwtConfig {
    /// Where the keys come from.
    pub keys: KeySource,
    /// Required as the token's `iss` when set (always set for an OIDC issuer).
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// Algorithms accepted; HMAC ones only when named here.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    pub claims: ClaimNames,
}

/// Where a JWT frontend's verification keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// A PEM public key (or, for HMAC, a file holding the secret) or a JWKS document.
    File(PathBuf),
    /// `<issuer>/.well-known/openid-configuration` → `jwks_uri`, fetched over HTTPS.
    Oidc(OidcSource),
}

/// How an OIDC issuer's keys are fetched (`type = "oidc"`); the issuer URL is
/// [`JwtConfig::issuer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcSource {
    /// PEM CAs trusted for the issuer's HTTPS (instead of the system store).
    pub ca: Option<PathBuf>,
    /// How often the keys are fetched again while they work.
    pub refresh: Duration,
    /// Fetches on a token with an unknown `kid` are at most this often (and failed scheduled
    /// fetches are retried from this, doubling up to `refresh`).
    pub min_refresh: Duration,
    /// Bound on one fetch: connect, TLS, request and response.
    pub timeout: Duration,
}

/// `server_tls = { ca, sni, verify }` on a backend: sclb speaks TLS to its servers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerTlsConfig {
    /// PEM CAs that sign the servers' certificates (the system store without one).
    pub ca: Option<PathBuf>,
    /// The name asked for and checked; without it, the server's IP address.
    pub sni: Option<String>,
    /// `false`: encrypted but the server is not authenticated.
    pub verify: bool,
}

/// Which claims of a token name the user, team, environment and groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimNames {
    pub user: String,
    pub team: String,
    pub environment: String,
    pub groups: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        ClaimNames {
            user: "sub".into(),
            team: "team".into(),
            environment: "environment".into(),
            groups: "groups".into(),
        }
    }
}

/// A secret read from a file or an environment variable; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Longest token sclb accepts in a file or variable.
const MAX_SECRET: usize = 4096;

/// `tls = { ... }`; the certificate and key are loaded to check them.
pub(super) fn read_tls(t: Table<'_, '_>) -> Option<TlsConfig> {
    t.allow(&["cert", "key", "client_ca", "verify", "identity"]);
    let cert = t.required("cert").then(|| t.str("cert")).flatten();
    let key = t.required("key").then(|| t.str("key")).flatten();
    let client_ca = t.str("client_ca").map(PathBuf::from);
    let verify = match (
        t.choice(
            "verify",
            &[
                ("required", ClientVerify::Required),
                ("optional", ClientVerify::Optional),
                ("none", ClientVerify::None),
            ],
        ),
        &client_ca,
    ) {
        (Some(ClientVerify::None), Some(_)) => {
            t.error(
                "verify",
                "\"none\" with a client_ca: use \"required\" or \"optional\", or drop client_ca",
            );
            return None;
        }
        (Some(ClientVerify::Required | ClientVerify::Optional), None) => {
            t.error(
                "verify",
                "needs client_ca (the CAs that sign client certificates)",
            );
            return None;
        }
        (Some(v), _) => v,
        (None, Some(_)) if t.contains("verify") => return None,
        (None, Some(_)) => ClientVerify::Required,
        (None, None) => ClientVerify::None,
    };
    let identity = t
        .choice(
            "identity",
            &[
                ("auto", IdentityFrom::Auto),
                ("san_uri", IdentityFrom::SanUri),
                ("san_dns", IdentityFrom::SanDns),
                ("cn", IdentityFrom::Cn),
            ],
        )
        .unwrap_or(IdentityFrom::Auto);
    let cfg = TlsConfig {
        cert: cert?.into(),
        key: key?.into(),
        client_ca,
        verify,
        identity,
    };
    if let Err(e) = crate::tls::build(&cfg, &[]) {
        let field = match e.file() {
            crate::tls::Which::Cert => "cert",
            crate::tls::Which::Key => "key",
            crate::tls::Which::ClientCa => "client_ca",
            crate::tls::Which::ServerCa => "ca",
        };
        t.error(field, e.to_string());
        return None;
    }
    Some(cfg)
}

/// `auth = { type = "static" | "jwt" | "oidc", ... }` on a gateway frontend.
pub(super) fn read_auth(t: Table<'_, '_>) -> Option<AuthConfig> {
    #[derive(Clone, Copy)]
    enum Kind {
        Static,
        Jwt,
        Oidc,
    }
    let kind = t.required("type").then(|| {
        t.choice(
            "type",
            &[
                ("static", Kind::Static),
                ("jwt", Kind::Jwt),
                ("oidc", Kind::Oidc),
            ],
        )
    })??;
    match kind {
        Kind::Static => {
            t.allow(&["type", "tokens"]);
            let tokens = PathBuf::from(t.required("tokens").then(|| t.str("tokens")).flatten()?);
            if let Err(e) = crate::auth::StaticTokens::load(&tokens) {
                t.error("tokens", e.to_string());
                return None;
            }
            Some(AuthConfig::Static { tokens })
        }
        Kind::Jwt => read_jwt(t),
        Kind::Oidc => read_oidc(t),
    }
}

/// The keys every token-checking kind accepts.
const CHECK_KEYS: [&str; 9] = [
    "type",
    "issuer",
    "audience",
    "algorithms",
    "leeway",
    "user_claim",
    "team_claim",
    "environment_claim",
    "groups_claim",
];

/// `type = "jwt"`: keys from a file.
fn read_jwt(t: Table<'_, '_>) -> Option<AuthConfig> {
    let mut allowed = CHECK_KEYS.to_vec();
    allowed.push("keys");
    t.allow(&allowed);
    let keys = t.required("keys").then(|| t.str("keys")).flatten();
    let (checks, checks_ok) = read_checks(t, false);
    let cfg = JwtConfig {
        keys: KeySource::File(keys?.into()),
        issuer: t.str("issuer").map(str::to_string),
        audience: t.str("audience").map(str::to_string),
        ..checks
    };
    if let Err(e) = crate::auth::JwtKeys::load(&cfg) {
        t.error("keys", e.to_string());
        return None;
    }
    checks_ok.then(|| AuthConfig::Jwt(Box::new(cfg)))
}

/// `type = "oidc"`: keys from the issuer's discovery document, fetched by the running
/// process (not here: a config check must not depend on the issuer being up).
fn read_oidc(t: Table<'_, '_>) -> Option<AuthConfig> {
    let mut allowed = CHECK_KEYS.to_vec();
    allowed.extend(["ca", "refresh", "min_refresh", "timeout"]);
    t.allow(&allowed);
    let issuer = t.required("issuer").then(|| t.str("issuer")).flatten();
    let issuer_ok = issuer.is_some_and(|i| match crate::auth::https::Url::parse(i) {
        Ok(_) => true,
        Err(e) => {
            t.error("issuer", e);
            false
        }
    });
    let ca = t.str("ca").map(PathBuf::from);
    let ca_ok = match ca
        .as_deref()
        .map(|ca| crate::tls::client::roots(Some(ca)).map_err(|e| e.to_string()))
    {
        Some(Err(e)) => {
            t.error("ca", e);
            false
        }
        _ => true,
    };
    let bounded = |key: &str, default: Duration, min: Duration, max: Duration| {
        if t.contains(key) {
            t.duration_between(key, min, max)
        } else {
            Some(default)
        }
    };
    let s = Duration::from_secs;
    let refresh = bounded("refresh", s(600), s(10), s(86_400));
    let min_refresh = bounded("min_refresh", s(30), s(1), s(3600));
    let timeout = bounded("timeout", s(5), Duration::from_millis(100), s(60));
    let mut order_ok = true;
    if let (Some(r), Some(m)) = (refresh, min_refresh)
        && m > r
    {
        t.error("min_refresh", "must not be longer than refresh");
        order_ok = false;
    }
    let (checks, checks_ok) = read_checks(t, true);
    if !(issuer_ok && ca_ok && order_ok && checks_ok) {
        return None;
    }
    Some(AuthConfig::Jwt(Box::new(JwtConfig {
        keys: KeySource::Oidc(OidcSource {
            ca,
            refresh: refresh?,
            min_refresh: min_refresh?,
            timeout: timeout?,
        }),
        issuer: issuer.map(str::to_string),
        audience: t.str("audience").map(str::to_string),
        ..checks
    })))
}

/// Algorithms, leeway and claim names, and whether every algorithm was usable (errors are
/// reported). The returned config's `keys`, `issuer` and `audience` are placeholders for the
/// caller to fill.
fn read_checks(t: Table<'_, '_>, oidc: bool) -> (JwtConfig, bool) {
    let mut algorithms = Vec::new();
    let mut algs_ok = true;
    let apath = join(t.path, "algorithms");
    for (i, (name, at)) in t.strings("algorithms").into_iter().enumerate() {
        match name.parse::<jsonwebtoken::Algorithm>() {
            Ok(
                jsonwebtoken::Algorithm::HS256
                | jsonwebtoken::Algorithm::HS384
                | jsonwebtoken::Algorithm::HS512,
            ) if oidc => {
                algs_ok = false;
                t.error_at(
                    at,
                    &format!("{apath}[{i}]"),
                    format!("{name} needs a shared secret, and an issuer publishes public keys only: use type = \"jwt\" for HMAC"),
                );
            }
            Ok(a) => algorithms.push(a),
            Err(_) => {
                algs_ok = false;
                t.error_at(
                    at,
                    &format!("{apath}[{i}]"),
                    format!("unknown algorithm \"{}\": use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA, or HS256/HS384/HS512", crate::config::reader::bounded(name)),
                );
            }
        }
    }
    if !t.contains("algorithms") {
        use jsonwebtoken::Algorithm::*;
        algorithms = vec![
            RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA,
        ];
    } else if algorithms.is_empty() && algs_ok {
        t.error("algorithms", "needs at least one algorithm");
        algs_ok = false;
    }
    let leeway = t.duration("leeway").unwrap_or(Duration::from_secs(30));
    let mut claims = ClaimNames::default();
    for (key, slot) in [
        ("user_claim", &mut claims.user),
        ("team_claim", &mut claims.team),
        ("environment_claim", &mut claims.environment),
        ("groups_claim", &mut claims.groups),
    ] {
        if let Some(v) = t.str(key) {
            if v.is_empty() || v.len() > 128 {
                t.error(key, "a claim name is 1-128 characters");
            } else {
                *slot = v.to_string();
            }
        }
    }
    let cfg = JwtConfig {
        keys: KeySource::File(PathBuf::new()),
        issuer: None,
        audience: None,
        algorithms,
        leeway,
        claims,
    };
    (cfg, algs_ok)
}

/// `backend_token = { file = "..." }` or `{ env = "VAR" }`: the token sclb sends to the
/// servers (`authorization: Bearer`), read now so a missing one fails the load.
pub(super) fn read_backend_token(t: Table<'_, '_>) -> Option<Secret> {
    t.allow(&["file", "env"]);
    let raw = match (t.str("file"), t.str("env")) {
        (Some(_), Some(_)) => {
            t.error("env", "give either file or env, not both");
            return None;
        }
        (Some(f), None) => match std::fs::read_to_string(f) {
            Ok(s) => s,
            Err(e) => {
                t.error("file", format!("cannot read {f}: {e}"));
                return None;
            }
        },
        (None, Some(v)) => match std::env::var(v) {
            Ok(s) => s,
            Err(e) => {
                t.error("env", format!("environment variable {v}: {e}"));
                return None;
            }
        },
        (None, None) => {
            t.error("file", "needs file or env");
            return None;
        }
    };
    let token = raw.trim();
    let which = if t.contains("file") { "file" } else { "env" };
    if token.is_empty() || token.len() > MAX_SECRET {
        t.error(which, format!("the token must be 1-{MAX_SECRET} bytes"));
        return None;
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        t.error(
            which,
            "the token must be printable ASCII without spaces (it travels in a header)",
        );
        return None;
    }
    Some(Secret(token.to_string()))
}

/// `server_tls = { ca, sni, verify }` on a backend; the CA file is read now.
pub(super) fn read_server_tls(t: Table<'_, '_>) -> Option<crate::tls::client::ServerTls> {
    t.allow(&["ca", "sni", "verify"]);
    let verify = t.bool("verify").unwrap_or(true);
    let ca = t.str("ca").map(PathBuf::from);
    let mut ok = true;
    if !verify && ca.is_some() {
        t.error(
            "verify",
            "false with a ca: the ca would not be used (drop one of them)",
        );
        ok = false;
    }
    let sni = t.str("sni").map(str::to_string);
    if let Some(n) = &sni
        && rustls_pki_types::ServerName::try_from(n.as_str()).is_err()
    {
        t.error(
            "sni",
            format!(
                "\"{}\" is not a DNS name or IP address",
                crate::config::reader::bounded(n)
            ),
        );
        ok = false;
    }
    if let Some(ca) = &ca
        && let Err(e) = crate::tls::client::roots(Some(ca)).map_err(|e| e.to_string())
    {
        t.error("ca", e);
        ok = false;
    }
    if !ok {
        return None;
    }
    match crate::tls::client::ServerTls::new(ServerTlsConfig { ca, sni, verify }) {
        Ok(tls) => Some(tls),
        Err(e) => {
            t.error("ca", e);
            None
        }
    }
}

/// A list of networks (`"10.0.0.0/8"`, `"2001:db8::/32"`, or a single address).
pub(super) fn read_nets(t: Table<'_, '_>, key: &str) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (i, (text, at)) in t.strings(key).into_iter().enumerate() {
        let net = text.parse::<ipnet::IpNet>().ok().or_else(|| {
            text.parse::<std::net::IpAddr>()
                .ok()
                .map(ipnet::IpNet::from)
        });
        match net {
            Some(n) => out.push(n.trunc()),
            None => t.error_at(
                at,
                &format!("{}[{i}]", join(t.path, key)),
                format!(
                    "\"{}\" is not a network: write \"10.0.0.0/8\", \"2001:db8::/32\" or an address",
                    crate::config::reader::bounded(text)
                ),
            ),
        }
    }
    out
}
