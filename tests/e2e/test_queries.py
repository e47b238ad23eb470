"""Real PySpark queries through the load balancer (these need no sclb-only features)."""

import concurrent.futures
import re
import time

import numpy as np

import harness

# 4 partitions sleeping 4 s each on local[2]: about 8 s of result streaming, longer than the
# servers' senderMaxStreamDuration (5 s).
SLOW_QUERY = ("SELECT id, reflect('java.lang.Thread', 'sleep', CAST(4000 AS BIGINT)) AS slept "
              "FROM range(0, 4, 1, 4)")


def read_from(path, offset):
    """Text appended to a log file since byte `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def reattached_ops(text):
    """Operation ids the server resumed with ReattachExecute (lastConsumedStreamIndex > 0)."""
    return re.findall(r"Starting for opId=([0-9a-f-]+), reattachable=true, "
                      r"lastConsumedStreamIndex=[1-9]", text)


def test_range_count(lb):
    """DataFrame API: range().count(), with and without explicit partitions."""
    with lb.session() as spark:
        assert spark.range(1000).count() == 1000
        assert spark.range(0, 10_000_000, 7, numPartitions=4).count() == 1_428_572


def test_sql(lb):
    """spark.sql(): an expression and a GROUP BY with exact results."""
    with lb.session() as spark:
        row = spark.sql("SELECT 1 + 1 AS two, upper('spark') AS s").collect()[0]
        assert (row.two, row.s) == (2, "SPARK")
        rows = spark.sql(
            "SELECT id % 3 AS k, count(*) AS n, sum(id) AS total "
            "FROM range(100) GROUP BY k ORDER BY k").collect()
        assert [(r.k, r.n, r.total) for r in rows] == [(0, 34, 1683), (1, 33, 1617), (2, 33, 1650)]


def test_to_pandas_2m_rows_intact(lb):
    """2M rows (~30 MB of Arrow) arrive complete and in order, every value checked."""
    n = 2_000_000
    with lb.session() as spark:
        pdf = spark.range(n).selectExpr(
            "id", "id * 3 AS x", "concat('r', CAST(id AS STRING)) AS s").toPandas()
    ids = np.arange(n, dtype=np.int64)
    assert len(pdf) == n
    assert list(pdf.columns) == ["id", "x", "s"]
    assert np.array_equal(pdf["id"].to_numpy(), ids)
    assert np.array_equal(pdf["x"].to_numpy(), ids * 3)
    assert (pdf["s"] == "r" + pdf["id"].astype(str)).all()


def test_session_state_survives_calls(lb):
    """A temp view and a session conf set in one call are seen by the next calls."""
    with lb.session() as spark:
        server = lb.which_server(spark)
        spark.range(5).createOrReplaceTempView("e2e_state")
        spark.conf.set("sclb.e2e.marker", "kept")
        assert spark.sql("SELECT sum(id) AS s FROM e2e_state").collect()[0].s == 10
        assert spark.conf.get("sclb.e2e.marker") == "kept"
        assert spark.table("e2e_state").count() == 5
        assert lb.which_server(spark) == server


def test_which_server_tells_servers_apart(lb):
    """The helper the failover tests rely on answers with the port of the server it reached."""
    with lb.session() as spark:
        name = lb.which_server(spark)
    assert name in lb.backends
    if lb.mode == "socat":
        assert name == "sc1"  # socat forwards to sc1 only


def test_long_query_reattaches_on_same_server(lb):
    """A query longer than senderMaxStreamDuration (5 s): the server ends the result stream at
    the deadline, the client sends ReattachExecute, and it must reach the same server (else
    INVALID_HANDLE.OPERATION_NOT_FOUND / SESSION_CHANGED would be raised here)."""
    with lb.session() as spark:
        server = lb.which_server(spark)
        log = lb.backends[server].proc.log
        offset = log.stat().st_size
        rows = spark.sql(SLOW_QUERY).collect()
        assert sorted(r.id for r in rows) == [0, 1, 2, 3]
        assert lb.which_server(spark) == server
        assert spark.range(3).count() == 3  # session still usable afterwards

    text = read_from(log, offset)
    deadlines = re.findall(r"Deadline reached, shutting down stream for opId=([0-9a-f-]+)", text)
    assert deadlines, f"no result stream hit the 5 s deadline on {server}; log {log}"
    assert deadlines[0] in reattached_ops(text), f"no ReattachExecute on {server}; log {log}"
    assert "SESSION_CHANGED" not in text


def wait_for_log(path, offset, pattern, budget):
    """Poll a log from byte `offset` until `pattern` matches; return the match."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        m = re.search(pattern, read_from(path, offset))
        if m:
            return m
        time.sleep(0.1)
    raise TimeoutError(f"{pattern!r} not in {path} within {budget} s")


def test_reattach_after_connection_drop(lb):
    """The client's TCP connection is cut mid-query: gRPC reconnects (a new TCP connection
    from 127.0.0.1) and the client resumes with ReattachExecute, which only succeeds if the
    new connection reaches the server running the operation (source-IP stickiness)."""
    with lb.session() as spark:
        server = lb.which_server(spark)
        log = lb.backends[server].proc.log
        before = set(harness.own_tcp_connections(lb.port).values())
        assert before, "session has no TCP connection to the load balancer"
        df = spark.sql(SLOW_QUERY)  # runs no job yet
        offset = log.stat().st_size
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(df.collect)
            op = wait_for_log(log, offset, r"Starting for opId=([0-9a-f-]+), reattachable=true, "
                                           r"lastConsumedStreamIndex=0", 30)[1]
            time.sleep(1.0)  # well inside the first 4 s wave and the 5 s stream deadline
            assert not fut.done(), "query finished before the connection could be cut"
            dropped = harness.drop_own_tcp_connections(lb.port)
            assert dropped
            rows = fut.result(timeout=120)
        assert sorted(r.id for r in rows) == [0, 1, 2, 3]
        after = set(harness.own_tcp_connections(lb.port).values())
        assert after and not after & set(dropped), f"no new connection: {before} -> {after}"
        assert lb.which_server(spark) == server
        assert spark.range(3).count() == 3

    # The operation's first resumption must be the reattach caused by the drop, i.e. come
    # before the stream's 5 s deadline would have ended it anyway.
    text = read_from(log, offset)
    first_reattach = re.search(rf"Starting for opId={op}, reattachable=true, "
                               rf"lastConsumedStreamIndex=[1-9]", text)
    deadline = re.search(rf"Deadline reached, shutting down stream for opId={op}", text)
    assert first_reattach, f"no ReattachExecute for {op} on {server}; log {log}"
    assert deadline is None or first_reattach.start() < deadline.start(), \
        f"{op} was only resumed after its stream deadline, not after the drop; log {log}"
    assert "SESSION_CHANGED" not in text and "OPERATION_NOT_FOUND" not in text


def test_new_connections_stick_to_one_server(sclb):
    """Source-IP stickiness: successive new SparkSessions (each a new TCP connection from
    127.0.0.1) land on the same server, although balance is roundrobin."""
    seen = set()
    for _ in range(3):
        with sclb.session() as spark:
            seen.add(sclb.which_server(spark))
            assert spark.range(10).count() == 10
    assert len(seen) == 1, f"sessions spread over {seen}"


def test_parallel_sessions(lb):
    """Three live sessions at once (three TCP connections) each keep their own state."""
    sessions = [lb.new_session() for _ in range(3)]
    try:
        for i, spark in enumerate(sessions):
            spark.range(i + 1).createOrReplaceTempView("mine")
        for i, spark in enumerate(sessions):
            assert spark.table("mine").count() == i + 1
    finally:
        for spark in sessions:
            spark.stop()
