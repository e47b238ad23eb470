//! Keys and certificates made by the tests: a CA that signs server and client certificates
//! (rcgen), and JWT signing keys with their JWKs (ES256 by rcgen, RS256 by the `rsa` crate,
//! since ring cannot generate RSA keys).
#![allow(dead_code)]

use base64::Engine;
use serde_json::Value;

/// A CA, and certificates it signs.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A client certificate with `uri` as its SAN URI: (cert PEM, key PEM).
    pub fn client(&self, uri: &str) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).unwrap(),
        ));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cn-not-used");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A server certificate for `localhost`, `dns` and 127.0.0.1: (cert PEM, key PEM).
    pub fn server(&self, dns: &str) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), dns.to_string()]).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, dns);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// A JWT signing key: its algorithm, private key PEM and public JWK (with `kid`).
pub struct SigningKey {
    pub alg: jsonwebtoken::Algorithm,
    pub kid: String,
    pem: String,
    pub jwk: Value,
}

impl SigningKey {
    pub fn es256(kid: &str) -> SigningKey {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = key.public_key_raw(); // 0x04 || X || Y
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        });
        SigningKey {
            alg: jsonwebtoken::Algorithm::ES256,
            kid: kid.into(),
            pem: key.serialize_pem(),
            jwk,
        }
    }

    pub fn rs256(kid: &str) -> SigningKey {
        use rsa::pkcs8::EncodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::new(&mut rand_core_os(), 2048).unwrap();
        let jwk = serde_json::json!({
            "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
            "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
        });
        SigningKey {
            alg: jsonwebtoken::Algorithm::RS256,
            kid: kid.into(),
            pem: key
                .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .to_string(),
            jwk,
        }
    }

    /// A token signed by this key, naming its `kid` (or `kid` when given).
    pub fn sign(&self, claims: &Value, kid: Option<&str>) -> String {
        let mut header = jsonwebtoken::Header::new(self.alg);
        header.kid = Some(kid.unwrap_or(&self.kid).to_string());
        let key = match self.alg {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(self.pem.as_bytes())
            }
            _ => jsonwebtoken::EncodingKey::from_ec_pem(self.pem.as_bytes()),
        }
        .unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

fn rand_core_os() -> rsa::rand_core::OsRng {
    rsa::rand_core::OsRng
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
