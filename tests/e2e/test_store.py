"""Two sclb gateways sharing their Spark sessions through a real PostgreSQL
(`[global] store = { kind = "postgres" }`), with real PySpark and the two real Spark Connect
servers: a session opened through one replica keeps its temp view through the other, and
after that replica is killed and started again.

PostgreSQL is Debian's package (scripts/test installs it): `initdb` in a temp dir, the server
on a Unix socket in that dir only, stopped by its PID; as root it runs as `nobody`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

import harness
from harness import Admin

PG_BUDGET = 60.0


def _pg_bin() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not dirs:
        pytest.fail("PostgreSQL is not installed (scripts/test installs the postgresql package)")
    return Path(dirs[-1])


def _as_db_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
    return argv


@pytest.fixture
def postgres():
    """A PostgreSQL server; yields its libpq connection string. Its directory is a fresh one
    in /tmp (pytest's own are 0700: `nobody` could not reach into them)."""
    base = Path(tempfile.mkdtemp(prefix="sclb-pg-"))
    data = base / "data"
    data.mkdir()
    if os.geteuid() == 0:
        import pwd
        nobody = pwd.getpwnam("nobody")
        os.chmod(base, 0o755)
        for p in (base, data):
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    bindir = _pg_bin()
    subprocess.run(_as_db_user([str(bindir / "initdb"), "-D", str(data), "-U", "sclb",
                                "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = harness._spawn("postgres", _as_db_user([
        str(bindir / "postgres"), "-D", str(data), "-c", "listen_addresses=",
        "-c", "fsync=off", "-p", "5432", "-k", str(base)]), base / "postgres.log", base)
    try:
        deadline = time.monotonic() + PG_BUDGET
        while subprocess.run([str(bindir / "pg_isready"), "-h", str(base), "-p", "5432", "-q"]
                             ).returncode != 0:
            assert proc.alive(), harness.tail(proc.log)
            assert time.monotonic() < deadline, "postgres not ready in time"
            time.sleep(0.2)
        yield f"host={base} port=5432 user=sclb dbname=postgres"
    finally:
        proc.stop()
        shutil.rmtree(base, ignore_errors=True)


def _replica(work: Path, backends, store_url: str):
    """One sclb with a gateway frontend on the postgres store; returns (proc, gateway url, admin)."""
    work.mkdir(parents=True, exist_ok=True)
    binary = Path(os.environ.get("SCLB_BIN", harness.REPO_ROOT / "target/debug/sclb"))
    if not binary.is_absolute():
        binary = harness.REPO_ROOT / binary
    front, gw, stats = harness.free_port(), harness.free_port(), harness.free_port()
    text = harness.sclb_config(work / "admin.sock", stats, front,
                               {n: b.port for n, b in backends.items()}, gateway_port=gw)
    text = text.replace("[global]\n", f'[global]\nstore = {{ kind = "postgres", url = "{store_url}", '
                                      'sync_interval = "500ms" }\n', 1)
    (work / "sclb.toml").write_text(text)
    proc = harness.start_sclb(binary, work / "sclb.toml", work)
    harness.wait_port(proc, gw, 15.0)
    return proc, f"sc://127.0.0.1:{gw}", Admin(work / "admin.sock")


def _server_of(spark: SparkSession, backends) -> str:
    port = int(spark.conf.get("spark.connect.grpc.binding.port"))
    return next(n for n, b in backends.items() if b.port == port)


def test_a_session_keeps_its_temp_view_through_either_replica(backends, postgres, tmp_path):
    one, url1, _ = _replica(tmp_path / "one", backends, postgres)
    two, url2, admin2 = _replica(tmp_path / "two", backends, postgres)
    try:
        # A first session through replica one takes the first server (round robin), so the
        # session under test is on the second; replica two, alone, would put a new session on
        # the first.
        warm = SparkSession.builder.remote(url1).create()
        warm.range(1).count()
        spark = SparkSession.builder.remote(url1).create()
        spark.range(5).createOrReplaceTempView("tv")
        home = _server_of(spark, backends)
        assert home != _server_of(warm, backends)
        sid = spark.client._session_id

        same = SparkSession.builder.remote(f"{url2}/;session_id={sid}").create()
        assert _server_of(same, backends) == home
        assert same.table("tv").count() == 5
        assert sid in admin2.cmd("show sessions")

        # Replica two dies and comes back with nothing in memory: the store still knows.
        # First let PySpark's background ReleaseExecute of that count() reach replica two:
        # one still pending when it dies retries for minutes and blocks every later stop().
        time.sleep(3)
        two.kill9()
        two, url2, _ = _replica(tmp_path / "two-again", backends, postgres)
        again = SparkSession.builder.remote(f"{url2}/;session_id={sid}").create()
        assert again.table("tv").count() == 5
        assert _server_of(again, backends) == home
        warm.stop()
        spark.stop()
    finally:
        one.stop()
        two.stop()
