"""sclb's admin socket and spark health checks, seen from real PySpark sessions."""

import contextlib

import pyspark

STATE_BUDGET = 10.0  # seconds for an admin state change / health transition to show


@contextlib.contextmanager
def restored(sclb, server):
    """Put `server` back to ready and UP after the test, whatever happened."""
    try:
        yield
    finally:
        sclb.admin.cmd(f"set server local/{server} state ready")
        sclb.admin.wait_status(server, "UP", STATE_BUDGET)


def test_show_stat_has_spark_version(sclb):
    """`show stat` keeps HAProxy's leading columns and adds spark_version from the probe."""
    header = sclb.admin.cmd("show stat").splitlines()[0]
    assert header.startswith("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,")
    assert "spark_version" in header.split(",")
    with sclb.session() as spark:
        version = spark.version
    assert version == pyspark.__version__ == "4.0.5"
    stat = sclb.admin.stat()
    for name in sclb.backends:
        assert stat[name]["spark_version"] == version, stat[name]
        assert stat[name]["status"].startswith("UP"), stat[name]


def test_show_table_pins_client(sclb):
    """After a session, the stick table pins 127.0.0.1 to the server that served it."""
    with sclb.session() as spark:
        server = sclb.which_server(spark)
        entries = [e for e in sclb.admin.table() if e.get("key") == "127.0.0.1"]
    assert len(entries) == 1, sclb.admin.cmd("show table local")
    assert entries[0]["server_key"] == server


def test_drain_keeps_live_session(sclb):
    """`set server ... state drain`: the live session keeps working, on the same server."""
    with sclb.session() as spark:
        server = sclb.which_server(spark)
        spark.range(7).createOrReplaceTempView("before_drain")
        with restored(sclb, server):
            sclb.admin.cmd(f"set server local/{server} state drain")
            sclb.admin.wait_status(server, "DRAIN", STATE_BUDGET)
            assert spark.table("before_drain").count() == 7
            assert spark.range(100).count() == 100
            assert sclb.which_server(spark) == server
            assert sclb.admin.stat()[server]["status"].startswith("DRAIN")


def test_disable_moves_new_session(sclb):
    """`disable server`: a new SparkSession lands on the other server, works, and sclb logs
    the re-pin of the client's stick entry."""
    with sclb.session() as spark:
        server = sclb.which_server(spark)
    other = sclb.other(server)
    log_before = len(sclb.log_text())
    with restored(sclb, server):
        assert "" == sclb.admin.cmd(f"disable server local/{server}").strip()
        sclb.admin.wait_status(server, "MAINT", STATE_BUDGET)
        with sclb.session() as spark:
            assert sclb.which_server(spark) == other
            assert spark.range(50).count() == 50
            assert spark.sql("SELECT 6 * 7 AS v").collect()[0].v == 42
        pinned = [e for e in sclb.admin.table() if e.get("key") == "127.0.0.1"]
        assert [e["server_key"] for e in pinned] == [other]
        assert "re-pin" in sclb.log_text()[log_before:]
        sclb.admin.cmd(f"enable server local/{server}")
        sclb.admin.wait_status(server, "UP", STATE_BUDGET)
