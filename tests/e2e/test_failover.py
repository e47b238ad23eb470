"""kill -9 of the server a session is pinned to. Destroys that server: runs last."""

import pytest

import harness

FALL, INTER = 3, 1.0          # as in harness.sclb_config
DOWN_SLACK = 1.0              # poll period, check timing jitter, admin round trip


@pytest.mark.destructive
def test_kill9_pinned_server(sclb):
    """The spark probe marks the killed server DOWN within fall x inter, a new SparkSession
    works on the other server, and sclb logs the re-pin."""
    old = sclb.new_session()
    try:
        server = sclb.which_server(old)
        other = sclb.other(server)
        assert old.range(10).count() == 10
        backend = sclb.backends[server]
        harness.record_peak_rss(server, backend.proc.pid)
        log_before = len(sclb.log_text())

        backend.proc.kill9()
        took = sclb.admin.wait_status(server, "DOWN", 15.0)
        harness.FIGURES[f"{server} DOWN after kill -9"] = f"{took:.1f} s"
        assert took <= FALL * INTER + DOWN_SLACK, f"DOWN after {took:.1f} s"
        assert sclb.admin.stat()[other]["status"].startswith("UP")

        with sclb.session() as spark:
            assert sclb.which_server(spark) == other
            assert spark.range(1234).count() == 1234
            spark.range(3).createOrReplaceTempView("after_kill")
            assert spark.table("after_kill").count() == 3
        assert "re-pin" in sclb.log_text()[log_before:]
    finally:
        old.client.close()  # no stop(): its ReleaseSession would retry against a dead server
