"""sclb's gateway frontend (mode "grpc"): an HTTP/2 Spark Connect proxy that routes every RPC
by its Spark session, seen from real PySpark sessions (all from this one process, i.e. one
client IP, 127.0.0.1)."""

import concurrent.futures
import re
import textwrap
import time

import pytest
from pyspark.sql.types import LongType

import harness
from harness import wait_until
from test_queries import SLOW_QUERY, read_from, reattached_ops, wait_for_log

N_SESSIONS = 20
REGISTRY_BUDGET = 10.0  # seconds for a released / killed session to leave `show sessions`

OP_STARTED = r"Starting for opId=([0-9a-f-]+), reattachable=true, lastConsumedStreamIndex=0"


def endless_query(spark):
    """4 partitions sleeping 60 s each on local[2] (about 2 minutes): only ends early by being
    interrupted or killed. DataFrame API, so that collect() is the session's only ExecutePlan
    (spark.sql() sends one of its own first)."""
    return spark.range(0, 4, 1, 4).selectExpr(
        "id", "reflect('java.lang.Thread', 'sleep', CAST(60000 AS BIGINT)) AS slept")


def stop_quietly(spark):
    """spark.stop() that does not fail the test's cleanup (a killed session may refuse it)."""
    try:
        spark.stop()
    except Exception:  # noqa: BLE001
        pass


def test_gateway_spreads_sessions_from_one_ip(gateway):
    """20 SparkSessions from one client IP land on both servers (the gateway balances Spark
    sessions, not connections), `show sessions` lists each on the server that answers it, and
    each keeps its own temp view. After spark.stop() they leave `show sessions`."""
    sessions = []
    try:
        for _ in range(N_SESSIONS):
            sessions.append(gateway.new_session(gateway.gateway_url))
        for i, spark in enumerate(sessions):
            spark.sql(f"SELECT {i} AS owner, id FROM range({i + 1})") \
                .createOrReplaceTempView(f"gw_view_{i}")
        servers = {spark.session_id: gateway.which_server(spark) for spark in sessions}
        assert len(set(servers)) == N_SESSIONS

        # All 20 exist now: each session sees its own view with its own content ...
        for i, spark in enumerate(sessions):
            rows = spark.sql(f"SELECT owner, count(*) AS n, sum(id) AS s FROM gw_view_{i} "
                             f"GROUP BY owner").collect()
            assert [(r.owner, r.n, r.s) for r in rows] == [(i, i + 1, i * (i + 1) // 2)]
            # ... and not its neighbour's (which may well live on the same server)
            assert not spark.catalog.tableExists(f"gw_view_{(i + 1) % N_SESSIONS}")
            assert gateway.which_server(spark) == servers[spark.session_id]

        per_server = {name: sum(1 for s in servers.values() if s == name)
                      for name in gateway.backends}
        harness.FIGURES[f"gateway: {N_SESSIONS} sessions from one IP per server"] = str(per_server)
        assert all(per_server.values()), f"sessions not spread over both servers: {per_server}"

        listed = gateway.admin.sessions()
        for sid, server in servers.items():
            assert sid in listed, f"{sid} missing from show sessions:\n{listed}"
            entry = listed[sid]
            assert (entry["fe"], entry["be"], entry["srv"]) == ("gateway", "local", server), entry
            assert entry["src"].startswith("127.0.0.1:"), entry
            assert int(entry["rpcs"]) >= 4, entry
    finally:
        for spark in sessions:
            stop_quietly(spark)

    ids = set(servers)
    wait_until(lambda: not ids & set(gateway.admin.sessions()), REGISTRY_BUDGET,
               "stopped sessions leave show sessions")


def test_gateway_long_query_reattaches(gateway):
    """A query longer than the servers' senderMaxStreamDuration (5 s) completes through the
    gateway: the server ends the result stream at the deadline and the client's
    ReattachExecute reaches the server holding the operation."""
    before = gateway.metric("spark_connect_proxy_requests_total",
                            method="ReattachExecute", code="OK")
    with gateway.session(gateway.gateway_url) as spark:
        server = gateway.which_server(spark)
        log = gateway.backends[server].proc.log
        offset = log.stat().st_size
        rows = spark.sql(SLOW_QUERY).collect()
        assert sorted(r.id for r in rows) == [0, 1, 2, 3]
        assert gateway.which_server(spark) == server
        assert spark.range(3).count() == 3

    text = read_from(log, offset)
    deadlines = re.findall(r"Deadline reached, shutting down stream for opId=([0-9a-f-]+)", text)
    assert deadlines, f"no result stream hit the 5 s deadline on {server}; log {log}"
    assert deadlines[0] in reattached_ops(text), f"no ReattachExecute on {server}; log {log}"
    assert "SESSION_CHANGED" not in text and "OPERATION_NOT_FOUND" not in text
    after = gateway.metric("spark_connect_proxy_requests_total",
                           method="ReattachExecute", code="OK")
    assert after > before, gateway.metrics()


def test_gateway_add_artifacts_pyfile(gateway, tmp_path):
    """spark.addArtifacts(pyfile=True) (client-streaming AddArtifacts) through the gateway:
    a Python UDF on the server imports the uploaded module."""
    module = tmp_path / "gw_artifact_mod.py"
    module.write_text(textwrap.dedent("""\
        def magic(x):
            return x * 7 + 1
    """))

    def use_artifact(x):
        import gw_artifact_mod
        return gw_artifact_mod.magic(x)

    before = gateway.metric("spark_connect_proxy_requests_total", method="AddArtifacts", code="OK")
    with gateway.session(gateway.gateway_url) as spark:
        spark.addArtifacts(str(module), pyfile=True)
        spark.udf.register("gw_magic", use_artifact, LongType())
        rows = spark.sql("SELECT gw_magic(id) AS m FROM range(5)").collect()
        assert sorted(r.m for r in rows) == [1, 8, 15, 22, 29]
    assert gateway.metric("spark_connect_proxy_requests_total",
                          method="AddArtifacts", code="OK") > before, gateway.metrics()


def test_gateway_interrupt_tag(gateway):
    """spark.interruptTag() from the main thread stops a tagged query running in another
    thread of the same session; the query raises and the session stays usable."""
    with gateway.session(gateway.gateway_url) as spark:
        server = gateway.which_server(spark)
        log = gateway.backends[server].proc.log
        offset = log.stat().st_size

        def tagged_query():
            spark.addTag("gw_long")
            try:
                return endless_query(spark).collect()
            finally:
                spark.removeTag("gw_long")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(tagged_query)
            op = wait_for_log(log, offset, OP_STARTED, 30)[1]
            t0 = time.monotonic()
            interrupted = spark.interruptTag("gw_long")
            assert interrupted == [op], f"interruptTag: {interrupted}, running {op}"
            with pytest.raises(Exception) as err:
                fut.result(timeout=60)
            elapsed = time.monotonic() - t0
        assert elapsed < 30, f"query ended {elapsed:.1f} s after interruptTag"
        assert "OPERATION_CANCELED" in str(err.value) or "cancel" in str(err.value).lower(), \
            repr(err.value)
        assert spark.range(3).count() == 3
        assert gateway.which_server(spark) == server
    assert gateway.metric("spark_connect_proxy_requests_total",
                          method="Interrupt", code="OK") > 0, gateway.metrics()


def test_gateway_kill_session(gateway):
    """`kill session <id>` on the admin socket: the session's running query ends with
    "killed by an operator", its next query is refused (FAILED_PRECONDITION), and the session
    leaves `show sessions`. Other sessions are untouched."""
    spark = gateway.new_session(gateway.gateway_url)
    bystander = gateway.new_session(gateway.gateway_url)
    try:
        sid = spark.session_id
        server = gateway.which_server(spark)
        assert gateway.admin.sessions()[sid]["srv"] == server
        log = gateway.backends[server].proc.log
        offset = log.stat().st_size
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(lambda: endless_query(spark).collect())
            wait_for_log(log, offset, OP_STARTED, 30)
            reply = gateway.admin.cmd(f"kill session {sid}")
            with pytest.raises(Exception) as running:
                fut.result(timeout=60)
        assert "killed by an operator" in str(running.value), f"reply {reply!r}: {running.value!r}"

        with pytest.raises(Exception) as later:
            spark.range(3).count()
        text = str(later.value)
        assert "killed by an operator" in text or "FAILED_PRECONDITION" in text, repr(later.value)
        assert sid not in gateway.admin.sessions()
        # sclb released the session on its server too (ReleaseSession)
        wait_for_log(log, offset, rf"Closing session with userId: \S* and sessionId: {sid}", 10)

        assert bystander.range(4).count() == 4
        assert bystander.session_id in gateway.admin.sessions()
    finally:
        stop_quietly(spark)
        stop_quietly(bystander)
