"""Who may use which session, with real PySpark and a real Spark Connect server that requires a
token (`spark.connect.authenticate.token`):

- a direct connection without the token fails; through sclb it works: the gateway frontend
  (TLS, static tokens) sends sclb's `backend_token`, the L4 TLS frontend passes the client's
  own Spark token through TLS it terminates (`;use_ssl=true`);
- `spark.conf.get("spark.connect.authenticate.token")` through sclb does not return it;
- a bad token is UNAUTHENTICATED naming the failed check, counted by reason;
- the authenticated user replaces the client's user_id and owns the session: another user
  with the same session id gets PERMISSION_DENIED.

Certificates come from the openssl CLI (scripts/test installs it); grpc trusts the test CA
through GRPC_DEFAULT_SSL_ROOTS_FILE_PATH (set in conftest before any channel exists).
"""

from __future__ import annotations

import hashlib
import os
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
    spark_port, l4_port, gw_port, stats_port = (harness.free_port() for _ in range(4))
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
                     proc.log)
    finally:
        proc.stop()
        spark.stop()
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
