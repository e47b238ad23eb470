"""Two sclb gateways sharing their Spark sessions through a real PostgreSQL
(`[global] store = { kind = "postgres" }`), with real PySpark and the two real Spark Connect
servers: a session opened through one replica keeps its temp view through the other, and
after that replica is killed and started again.

PostgreSQL is Debian's package (scripts/test installs it): `initdb` in a temp dir, the server
on a Unix socket in that dir only, stopped by its PID; as root it runs as `nobody`.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

import harness
from harness import Admin, wait_until
from test_queries import SLOW_QUERY, read_from, reattached_ops

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


def _binary() -> Path:
    binary = Path(os.environ.get("SCLB_BIN", harness.REPO_ROOT / "target/debug/sclb"))
    return binary if binary.is_absolute() else harness.REPO_ROOT / binary


def _replica(work: Path, backends, store_url: str, gw: int | None = None):
    """One sclb with a gateway frontend on the postgres store (on port `gw` if given: a
    restarted replica comes back where its load balancer expects it); returns (proc, gateway
    url, admin)."""
    work.mkdir(parents=True, exist_ok=True)
    binary = _binary()
    front, stats = harness.free_port(), harness.free_port()
    gw = gw or harness.free_port()
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


def _front(work: Path, replicas: list[int]):
    """An L4 sclb in front of the gateway replicas, as a cloud load balancer or a Kubernetes
    Service would be: no stickiness, a refused connect retried on the other replica, a dead
    replica found by a TCP check. Returns (proc, url)."""
    work.mkdir(parents=True, exist_ok=True)
    port, stats = harness.free_port(), harness.free_port()
    servers = ", ".join(f'{{ name = "gw{i}", addr = "127.0.0.1:{p}" }}'
                        for i, p in enumerate(replicas, 1))
    (work / "sclb.toml").write_text(f"""\
[global]
maxconn = 1000
admin = {{ path = "{work / 'admin.sock'}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:{stats}" }}

[defaults]
timeout = {{ connect = "1s", client = "1h", server = "1h", tunnel = "1h", queue = "10s" }}
retries = 2
redispatch = true

[[frontend]]
name = "nlb"
bind = ["127.0.0.1:{port}"]
backend = "replicas"

[[backend]]
name = "replicas"
balance = "roundrobin"
check = {{ type = "tcp", inter = "500ms", rise = 1, fall = 1, timeout = "1s" }}
servers = [ {servers} ]
""")
    proc = harness.start_sclb(_binary(), work / "sclb.toml", work)
    harness.wait_port(proc, port, 15.0)
    return proc, f"sc://127.0.0.1:{port}"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_kill_9_of_a_replica_during_a_long_collect_finishes_through_the_other(
        backends, postgres, tmp_path):
    """The replica carrying a long query dies (kill -9); PySpark's retry reaches the other
    replica through the load balancer, whose ReattachExecute finds the operation on the same
    Spark server through the store, and the query finishes with every row."""
    one, url1, admin1 = _replica(tmp_path / "one", backends, postgres)
    two, url2, admin2 = _replica(tmp_path / "two", backends, postgres)
    front, url = _front(tmp_path / "front", [_port(url1), _port(url2)])
    try:
        spark = SparkSession.builder.remote(url).create()
        spark.range(1).count()
        home = _server_of(spark, backends)
        sid = spark.client._session_id
        carrier, survivor = (one, two) if sid in admin1.cmd("show sessions") else (two, one)
        log = backends[home].proc.log
        offset = log.stat().st_size

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: spark.sql(SLOW_QUERY).collect())
            # Kill once the server runs the operation: the client's stream is mid-query.
            deadline = time.monotonic() + 60
            while "Starting for opId=" not in read_from(log, offset):
                assert time.monotonic() < deadline, f"the query never started on {home}"
                assert not fut.done(), fut.result()
                time.sleep(0.1)
            carrier.kill9()
            rows = fut.result(timeout=180)
        assert sorted(r.id for r in rows) == [0, 1, 2, 3]
        assert survivor.alive()
        assert _server_of(spark, backends) == home
        text = read_from(log, offset)
        assert reattached_ops(text), f"no ReattachExecute reached {home}; log {log}"
        assert "SESSION_CHANGED" not in text and "OPERATION_NOT_FOUND" not in text
        spark.stop()
    finally:
        front.stop()
        one.stop()
        two.stop()


def test_a_rolling_restart_of_every_replica_changes_no_session(backends, postgres, tmp_path):
    """20 live sessions, each with a temp view, keep querying while each replica in turn is
    stopped and started again on its port: every query succeeds, no session changes server
    or loses its view (no SESSION_CHANGED)."""
    one, url1, _ = _replica(tmp_path / "one", backends, postgres)
    two, url2, _ = _replica(tmp_path / "two", backends, postgres)
    front, url = _front(tmp_path / "front", [_port(url1), _port(url2)])
    replicas = {"one": (one, _port(url1)), "two": (two, _port(url2))}
    sessions = []
    try:
        for i in range(20):
            s = SparkSession.builder.remote(url).create()
            s.range(i + 1).createOrReplaceTempView("mine")
            sessions.append((s, _server_of(s, backends), i + 1))
        assert {home for _, home, _ in sessions} == set(backends), "both servers in use"

        stop = threading.Event()
        failures: list[str] = []
        done = [0]

        def keep_querying(s, want):
            while not stop.is_set():
                try:
                    got = s.table("mine").count()
                    if got != want:
                        failures.append(f"count {got} != {want}")
                    done[0] += 1
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    failures.append(f"{type(e).__name__}: {str(e)[:300]}")
                time.sleep(0.2)

        threads = [threading.Thread(target=keep_querying, args=(s, n), daemon=True)
                   for s, _, n in sessions]
        for t in threads:
            t.start()
        try:
            for name in ("one", "two"):
                proc, port = replicas[name]
                before = done[0]
                wait_until(lambda: done[0] >= before + 20, 60, "queries run before a restart")
                proc.stop()
                proc, _, _ = _replica(tmp_path / f"{name}-again", backends, postgres, gw=port)
                replicas[name] = (proc, port)
            before = done[0]
            wait_until(lambda: done[0] >= before + 40, 60, "queries run after the restarts")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
        assert not failures, failures[:5]
        for s, home, n in sessions:
            assert _server_of(s, backends) == home
            assert s.table("mine").count() == n
        for name in backends:
            assert "SESSION_CHANGED" not in harness.read_log(backends[name].proc.log)
        for s, _, _ in sessions:
            s.stop()
    finally:
        front.stop()
        for proc, _ in replicas.values():
            proc.stop()
