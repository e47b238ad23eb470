"""Who may use which session, with real PySpark and a real Spark Connect server that requires a
token (`spark.connect.authenticate.token`):

- a direct connection without the token fails; through sclb it works: the gateway frontend
  (TLS, static tokens) sends sclb's `backend_token`, the L4 TLS frontend passes the client's
  own Spark token through TLS it terminates (`;use_ssl=true`);
- `spark.conf.get("spark.connect.authenticate.token")` through sclb does not return it;
- a bad token is UNAUTHENTICATED naming the failed check, counted by reason;
- the authenticated user replaces the client's user_id and owns the session: another user
  with the same session id gets PERMISSION_DENIED;
- an OpenID Connect issuer served by the test (real HTTP discovery document and JWKS, real
  RS256 and ES256 keys made by the openssl CLI) signs PySpark's tokens; the issuer rotates its
  key mid-test and a token signed with the new key works at once.

Certificates come from the openssl CLI (scripts/test installs it); grpc trusts the test CA
through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (set in conftest before any channel exists).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import threading
import secrets
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

import conftest
import harness
from harness import Admin


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sclb e2e CA",
             cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=sclb", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)
    return d / "ca.pem", d / "server.pem", d / "server.key"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _der_ints(der: bytes) -> list[int]:
    """The INTEGERs of a DER SEQUENCE (an ECDSA signature is SEQUENCE { r, s })."""
    assert der[0] == 0x30, der[:4].hex()
    i, out = (3, []) if der[1] & 0x80 else (2, [])
    while i < len(der):
        assert der[i] == 0x02
        n = der[i + 1]
        out.append(int.from_bytes(der[i + 2:i + 2 + n], "big"))
        i += 2 + n
    return out


class SigningKey:
    """A key of the test's OIDC issuer, made and used through the openssl CLI (no Python crypto
    library in the e2e venv): RS256 (RSA-2048) or ES256 (P-256)."""

    def __init__(self, d: Path, kid: str, alg: str):
        self.kid, self.alg, self.path = kid, alg, d / f"{kid}.key"
        if alg == "RS256":
            _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                     "-out", self.path.name, cwd=d)
            modulus = subprocess.run(["openssl", "rsa", "-in", str(self.path), "-noout", "-modulus"],
                                     capture_output=True, text=True, check=True, timeout=60).stdout
            n = bytes.fromhex(modulus.strip().split("=", 1)[1])
            self.jwk = {"kty": "RSA", "kid": kid, "alg": alg, "use": "sig", "n": _b64url(n),
                        "e": _b64url((65537).to_bytes(3, "big"))}
        else:
            _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-out", self.path.name, cwd=d)
            der = subprocess.run(["openssl", "pkey", "-in", str(self.path), "-pubout", "-outform", "DER"],
                                 capture_output=True, check=True, timeout=60).stdout
            point = der[-65:]  # 04 || x || y
            self.jwk = {"kty": "EC", "kid": kid, "alg": alg, "use": "sig", "crv": "P-256",
                        "x": _b64url(point[1:33]), "y": _b64url(point[33:])}

    def token(self, **claims) -> str:
        head = _b64url(json.dumps({"alg": self.alg, "typ": "JWT", "kid": self.kid}).encode())
        body = _b64url(json.dumps(claims).encode())
        signing_input = f"{head}.{body}".encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.path)],
                             input=signing_input, capture_output=True, check=True, timeout=60).stdout
        if self.alg == "ES256":
            r, s_ = _der_ints(sig)
            sig = r.to_bytes(32, "big") + s_.to_bytes(32, "big")
        return f"{head}.{body}.{_b64url(sig)}"


class Issuer:
    """An OpenID Connect issuer on 127.0.0.1 (real HTTP): its discovery document and JWKS.
    `publish` swaps the keys it serves (a rotation); `fetches` counts JWKS requests."""

    def __init__(self):
        self.keys: list[dict] = []
        self.fetches = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                base = f"http://127.0.0.1:{self.server.server_address[1]}"
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": base, "jwks_uri": base + "/jwks"}
                elif self.path == "/jwks":
                    issuer.fetches += 1
                    body = {"keys": list(issuer.keys)}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *keys: SigningKey) -> None:
        self.keys = [k.jwk for k in keys]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Secure:
    spark_port: int
    l4_port: int
    gw_port: int
    backend_token: str
    tokens: dict[str, str]        # user -> token
    admin: Admin
    stats_port: int
    log: Path
    oidc_port: int
    issuer: Issuer
    oidc_keys: list[SigningKey]

    def gw(self, user: str | None, extra: str = "") -> str:
        tok = f";token={self.tokens[user]}" if user else ""
        return f"sc://127.0.0.1:{self.gw_port}/{tok}{extra}"

    def metric(self, name: str, **labels: str) -> float:
        """A sample of sclb's /metrics (0 if absent)."""
        url = f"http://127.0.0.1:{self.stats_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith(name + "{"):
                series, _, value = line.rpartition(" ")
                have = ",".join(sorted(series[len(name) + 1:-1].split(",")))
                if have == want:
                    return float(value)
        return 0.0


@pytest.fixture(scope="module")
def secure(tmp_path_factory) -> Secure:
    work = tmp_path_factory.mktemp("secure")
    ca, cert, key = make_certs(work)
    ca_file = conftest.E2E_CA_FILE
    ca_file.write_bytes(ca.read_bytes())
    backend_token = secrets.token_urlsafe(24)
    tokens = {u: secrets.token_urlsafe(24) for u in ("alice", "bob")}
    (work / "tokens.toml").write_text("".join(
        f'[[token]]\nsha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\nuser = "{u}"\n'
        f'team = "team-{u}"\n\n' for u, t in tokens.items()))
    (work / "backend.token").write_text(backend_token + "\n")
    spark_port, l4_port, gw_port, stats_port, oidc_port = (harness.free_port() for _ in range(5))
    issuer = Issuer()
    oidc_keys = [SigningKey(work, "k1", "RS256"), SigningKey(work, "k2", "ES256")]
    issuer.publish(oidc_keys[0])
    spark = harness.start_spark_server("sc-token", spark_port, work / "sc-token",
                                       token=backend_token)
    conftest._LOGS.append(spark.log)
    admin_sock = work / "admin.sock"
    config = work / "sclb.toml"
    config.write_text(f"""\
[global]
admin = {{ path = "{admin_sock}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:{stats_port}" }}

[defaults]
timeout = {{ connect = "2s", client = "1h", server = "1h", tunnel = "1h", queue = "10s" }}

[[frontend]]
name = "tls_l4"
bind = ["127.0.0.1:{l4_port}"]
backend = "direct"
tls = {{ cert = "{cert}", key = "{key}" }}

[[frontend]]
name = "tls_gw"
mode = "grpc"
bind = ["127.0.0.1:{gw_port}"]
backend = "secured"
tls = {{ cert = "{cert}", key = "{key}" }}
auth = {{ type = "static", tokens = "{work / 'tokens.toml'}" }}

[[frontend]]
name = "oidc_gw"
mode = "grpc"
bind = ["127.0.0.1:{oidc_port}"]
backend = "secured"
tls = {{ cert = "{cert}", key = "{key}" }}
auth = {{ type = "oidc", issuer = "{issuer.url}", audience = "sclb-e2e", min_refresh = "1s", user_claim = "preferred_username" }}

[[backend]]
name = "direct"
servers = [ {{ name = "sc", addr = "127.0.0.1:{spark_port}" }} ]
check = {{ type = "tcp", inter = "1s" }}

[[backend]]
name = "secured"
backend_token = {{ file = "{work / 'backend.token'}" }}
servers = [ {{ name = "sc", addr = "127.0.0.1:{spark_port}" }} ]
check = {{ type = "spark", inter = "1s", rise = 1, fall = 3, timeout = "2s" }}
""")
    binary = Path(os.environ.get("SCLB_BIN", harness.REPO_ROOT / "target/debug/sclb"))
    if not binary.is_absolute():
        binary = harness.REPO_ROOT / binary
    proc = harness.start_sclb(binary, config, work)
    conftest._LOGS.append(proc.log)
    admin = Admin(admin_sock)
    try:
        harness.wait_port(spark, spark_port, conftest.SPARK_START_BUDGET)
        harness.wait_port(proc, gw_port, conftest.SCLB_START_BUDGET)
        # The spark probe answers L7OK only if it carries the backend token.
        t0 = time.monotonic()
        while True:
            text = admin.cmd("show stat")
            row = [line for line in text.splitlines() if line.startswith("secured,sc,")]
            if row and ",L7OK," in row[0]:
                break
            if time.monotonic() - t0 > conftest.HEALTH_UP_BUDGET:
                raise TimeoutError(f"secured/sc not L7OK:\n{text}")
            time.sleep(0.2)
        yield Secure(spark_port, l4_port, gw_port, backend_token, tokens, admin, stats_port,
                     proc.log, oidc_port, issuer, oidc_keys)
    finally:
        proc.stop()
        spark.stop()
        issuer.stop()
        ca_file.unlink(missing_ok=True)


def _query(url: str) -> int:
    spark = SparkSession.builder.remote(url).create()
    try:
        return spark.range(5).count()
    finally:
        spark.stop()


def test_direct_without_token_fails_through_sclb_works(secure):
    with pytest.raises(Exception) as e:
        _query(f"sc://127.0.0.1:{secure.spark_port}")
    assert "UNAUTHENTICATED" in str(e.value) or "Invalid authentication" in str(e.value), e.value
    assert _query(secure.gw("alice")) == 5


def test_l4_tls_frontend_carries_pyspark_use_ssl(secure):
    # sclb terminates TLS; the client's own Spark token rides inside it to the server.
    url = f"sc://127.0.0.1:{secure.l4_port}/;use_ssl=true;token={secure.backend_token}"
    assert _query(url) == 5
    # Cleartext HTTP/2 on that port gets nowhere: sclb wants a TLS ClientHello and closes.
    # (A raw socket: PySpark would retry UNAVAILABLE for ten minutes.)
    with socket.create_connection(("127.0.0.1", secure.l4_port), timeout=5) as s:
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    assert b"Spark" not in got and len(got) < 64, got


def _conf_get(spark: SparkSession, key: str) -> str | None:
    try:
        return spark.conf.get(key)
    except Exception as e:  # SQL_CONF_NOT_FOUND: this Spark keeps it out of the session conf
        assert "SQL_CONF_NOT_FOUND" in str(e), e
        return None


def test_backend_token_cannot_be_read_back(secure):
    spark = SparkSession.builder.remote(secure.gw("alice")).create()
    try:
        assert _conf_get(spark, "spark.connect.authenticate.token") != secure.backend_token
        assert secure.backend_token not in repr(dict(spark.conf.getAll))
        # However the token gets into a Config answer, the client gets Spark's redaction mark:
        # here a setting whose value holds it, read back through a real server.
        spark.conf.set("spark.sclb.e2e.copy", f"x{secure.backend_token}x")
        assert spark.conf.get("spark.sclb.e2e.copy") == "*********(redacted)"
        assert secure.backend_token not in repr(dict(spark.conf.getAll))
        spark.conf.set("spark.sclb.e2e.plain", "visible")
        assert spark.conf.get("spark.sclb.e2e.plain") == "visible"
    finally:
        spark.stop()


def test_bad_or_missing_token_is_unauthenticated_naming_the_check(secure):
    before = secure.metric("sclb_auth_failures_total", frontend="tls_gw", reason="unknown_token")
    wrong = secrets.token_urlsafe(16)
    with pytest.raises(Exception) as e:
        _query(f"sc://127.0.0.1:{secure.gw_port}/;token={wrong}")
    msg = str(e.value)
    assert "authentication failed: the token is not in the static token file" in msg, msg
    # PySpark shows the message only; the status code is in sclb's count of its answers.
    assert secure.metric("spark_connect_proxy_requests_total", method="ExecutePlan",
                         code="UNAUTHENTICATED") + \
        secure.metric("spark_connect_proxy_requests_total", method="AnalyzePlan",
                      code="UNAUTHENTICATED") + \
        secure.metric("spark_connect_proxy_requests_total", method="Config",
                      code="UNAUTHENTICATED") >= 1
    assert wrong not in msg
    with pytest.raises(Exception) as e:
        _query(f"sc://127.0.0.1:{secure.gw_port}/;use_ssl=true")
    assert "no authorization header" in str(e.value), e.value
    after = secure.metric("sclb_auth_failures_total", frontend="tls_gw", reason="unknown_token")
    assert after >= before + 1
    assert wrong not in harness.read_log(secure.log)


def test_session_belongs_to_the_authenticated_user(secure):
    sid = str(uuid.uuid4())
    alice = SparkSession.builder.remote(
        secure.gw("alice", f";user_id=mallory;session_id={sid}")).create()
    try:
        alice.sql("CREATE TEMPORARY VIEW mine AS SELECT 42 AS answer").collect()
        row = secure.admin.sessions()[sid]
        assert row["user"] == "alice", row          # not the client's claim "mallory"
        bob = SparkSession.builder.remote(secure.gw("bob", f";session_id={sid}")).create()
        try:
            with pytest.raises(Exception) as e:
                bob.sql("SELECT * FROM mine").collect()
            assert "belongs to another user" in str(e.value), e.value
            denied = sum(secure.metric("spark_connect_proxy_requests_total", method=m,
                                       code="PERMISSION_DENIED")
                         for m in ("ExecutePlan", "AnalyzePlan", "Config"))
            assert denied >= 1
        finally:
            try:
                bob.stop()
            except Exception:
                pass
        # Alice's session is untouched.
        assert alice.sql("SELECT * FROM mine").collect()[0].answer == 42
    finally:
        alice.stop()
    assert "permission denied: bob used a Spark session that alice owns" in \
        harness.read_log(secure.log)


def test_oidc_tokens_from_pyspark_and_a_key_rotation(secure):
    """PySpark's `;token=` carries an OIDC issuer's JWT; sclb checks it against the issuer's
    JWKS, names the session after the configured user claim, and follows a key rotation."""
    k1, k2 = secure.oidc_keys
    now = int(time.time())
    claims = {"iss": secure.issuer.url, "aud": "sclb-e2e", "sub": "u-1001",
              "preferred_username": "carol", "iat": now, "exp": now + 3600}

    def url(token: str, extra: str = "") -> str:
        return f"sc://127.0.0.1:{secure.oidc_port}/;token={token}{extra}"

    sid = str(uuid.uuid4())
    spark = SparkSession.builder.remote(url(k1.token(**claims), f";session_id={sid}")).create()
    try:
        assert spark.range(7).count() == 7
        assert secure.admin.sessions()[sid]["user"] == "carol"
    finally:
        spark.stop()

    # The issuer rotates to a new key (another algorithm too): the first token signed with it
    # makes sclb fetch the keys again, and it works.
    fetched = secure.issuer.fetches
    secure.issuer.publish(k2)
    claims2 = dict(claims, preferred_username="dave", sub="u-1002")
    assert _query(url(k2.token(**claims2))) == 5
    assert secure.issuer.fetches > fetched

    # Each failed check is named; the token never appears in the message or the log.
    bad = [
        (k1.token(**claims), "no key"),                                   # retired key
        (k2.token(**dict(claims2, aud="someone-else")), "audience"),
        (k2.token(**dict(claims2, exp=now - 3600)), "expired"),
        (k2.token(**claims2)[:-8] + "AAAAAAAA", "signature"),
    ]
    for token, why in bad:
        with pytest.raises(Exception) as e:
            _query(url(token))
        msg = str(e.value)
        assert "authentication failed" in msg and why in msg, (why, msg)
        assert token not in msg
        assert token.rsplit(".", 1)[1] not in harness.read_log(secure.log)
