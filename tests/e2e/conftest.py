"""Session fixtures: two real Spark Connect servers and sclb (or socat) in front of them.

Env:
  SCLB_BIN          sclb binary (default target/debug/sclb in the repo)
  SCLB_E2E_PROXY    "socat" runs a plain TCP proxy to sc1 instead of sclb (harness development
                    only: tests needing sclb's admin socket or health checks are skipped)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import os
import re
import resource
import signal
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

import harness
from harness import Admin, Proc

# The CA that test_security.py's certificates chain to. grpc reads this variable once, when it
# makes its first TLS channel, so it is set here, before any test runs; the file is written by
# the fixture that makes the CA.
E2E_CA_FILE = Path(tempfile.gettempdir()) / f"sclb-e2e-ca-{os.getpid()}.pem"
os.environ["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(E2E_CA_FILE)

SPARK_START_BUDGET = 60.0   # seconds per server, both start in parallel
SCLB_START_BUDGET = 15.0
HEALTH_UP_BUDGET = 30.0     # rise=2 x inter=1s, plus the first (cold) spark_version probe

_LOGS: list[Path] = []      # logs shown when a test fails
_FIGURES = harness.FIGURES  # printed in the terminal summary


@dataclass
class Backend:
    """One Spark Connect server of the pair."""

    name: str
    port: int
    proc: Proc


@dataclass
class LB:
    """What the tests talk to: sclb (or socat) and the servers behind it."""

    mode: str                       # "sclb" or "socat"
    port: int
    proc: Proc
    backends: dict[str, Backend]
    admin: Admin | None = None
    log: Path | None = None
    gateway_port: int | None = None  # sclb's gateway frontend (mode "grpc")
    stats_port: int | None = None    # sclb's stats listener (/metrics)

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    @property
    def gateway_url(self) -> str:
        assert self.gateway_port is not None, "no gateway frontend"
        return f"sc://127.0.0.1:{self.gateway_port}"

    def new_session(self, url: str | None = None) -> SparkSession:
        """A brand-new SparkSession (new session_id, new channel, new TCP connection) through
        `url` (default: the L4 frontend)."""
        return SparkSession.builder.remote(url or self.url).create()

    @contextlib.contextmanager
    def session(self, url: str | None = None):
        """new_session() that is stopped (released on its server) at the end."""
        spark = self.new_session(url)
        try:
            yield spark
        finally:
            spark.stop()

    def metrics(self) -> str:
        """The stats listener's /metrics page (Prometheus text)."""
        assert self.stats_port is not None, "no stats listener"
        url = f"http://127.0.0.1:{self.stats_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
        total = 0.0
        for line in self.metrics().splitlines():
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?", line)
            if not m or m[1] != name:
                continue
            have = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m[3])
        return total

    def which_server(self, spark: SparkSession) -> str:
        """Name of the backend serving `spark`, read from the server's own static conf
        (spark.connect.grpc.binding.port differs per server and the client cannot change it)."""
        port = int(spark.conf.get("spark.connect.grpc.binding.port"))
        names = [b.name for b in self.backends.values() if b.port == port]
        assert names, f"session answered from unknown port {port}"
        return names[0]

    def other(self, name: str) -> str:
        """The other backend's name."""
        return next(n for n in self.backends if n != name)

    def log_text(self) -> str:
        """sclb's log (its stderr) so far."""
        return harness.read_log(self.log) if self.log else ""


@pytest.fixture(scope="session")
def backends(tmp_path_factory) -> dict[str, Backend]:
    """Two Spark Connect servers sc1, sc2 on free ports, started in parallel."""
    base = tmp_path_factory.mktemp("spark")
    procs: dict[str, Backend] = {}
    try:
        for name in ("sc1", "sc2"):
            port = harness.free_port()
            procs[name] = Backend(name, port, harness.start_spark_server(name, port, base / name))
            _LOGS.append(procs[name].proc.log)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            waits = {n: pool.submit(harness.wait_port, b.proc, b.port, SPARK_START_BUDGET)
                     for n, b in procs.items()}
            for n, fut in waits.items():
                _FIGURES[f"{n} port accepting after"] = f"{fut.result():.1f} s"
        yield procs
    finally:
        for b in procs.values():
            harness.record_peak_rss(b.name, b.proc.pid)
            b.proc.stop()


@pytest.fixture(scope="session")
def lb(backends, tmp_path_factory) -> LB:
    """sclb in front of both servers (or socat in front of sc1 under SCLB_E2E_PROXY=socat)."""
    work = tmp_path_factory.mktemp("lb")
    mode = os.environ.get("SCLB_E2E_PROXY", "sclb")
    port = harness.free_port()
    if mode == "socat":
        proc = harness.start_socat(port, backends["sc1"].port, work)
        _LOGS.append(proc.log)
        lb = LB(mode, port, proc, backends)
    elif mode == "sclb":
        binary = Path(os.environ.get("SCLB_BIN", harness.REPO_ROOT / "target/debug/sclb"))
        if not binary.is_absolute():
            binary = harness.REPO_ROOT / binary
        if not os.access(binary, os.X_OK):
            pytest.fail(f"sclb binary {binary} missing (cargo build, or set SCLB_BIN)")
        admin_sock = work / "admin.sock"
        config = work / "sclb.toml"
        stats_port, gateway_port = harness.free_port(), harness.free_port()
        config.write_text(harness.sclb_config(
            admin_sock, stats_port, port, {n: b.port for n, b in backends.items()},
            gateway_port=gateway_port))
        proc = harness.start_sclb(binary, config, work)
        _LOGS.append(proc.log)
        lb = LB(mode, port, proc, backends, Admin(admin_sock), proc.log,
                gateway_port=gateway_port, stats_port=stats_port)
    else:
        pytest.fail(f"SCLB_E2E_PROXY={mode!r}: want unset or 'socat'")
    try:
        harness.wait_port(proc, port, SCLB_START_BUDGET)
        if lb.gateway_port is not None:
            harness.wait_port(proc, lb.gateway_port, SCLB_START_BUDGET)
        if lb.admin:
            for name in backends:
                # A server starts UP (init_state "up"); ready means the spark probe has
                # had its answer from this server.
                lb.admin.wait_status(name, "L7OK", HEALTH_UP_BUDGET, column="check_status")
                _FIGURES[f"{name} L7OK in sclb, after sclb start"] = \
                    f"{time.monotonic() - proc.started:.1f} s"
        yield lb
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def collect_dead_sessions():
    """gc.collect() around every test, so unreachable SparkSessions of earlier tests are
    finalized here and not at a random allocation later. PySpark 4.0.5's SparkSession.__del__
    calls client.close() -> ExecutePlanResponseReattachableIterator.shutdown(), which takes the
    class-wide non-reentrant _lock; if the cyclic GC runs it inside _release_all() (which holds
    that _lock while ThreadPoolExecutor.submit starts a thread), the thread deadlocks on itself
    and the query never returns."""
    gc.collect()
    yield
    gc.collect()


@pytest.fixture
def sclb(lb) -> LB:
    """`lb`, but skip when there is no sclb (admin socket, health checks) in front."""
    if lb.admin is None:
        pytest.skip(f"needs sclb's admin socket / health checks (running under {lb.mode})")
    return lb


@pytest.fixture
def gateway(sclb) -> LB:
    """`sclb`, for tests of its gateway frontend (`gateway_url`, `show sessions`, /metrics)."""
    assert sclb.gateway_port is not None and sclb.stats_port is not None
    return sclb


def pytest_configure(config):
    """SIGTERM -> KeyboardInterrupt, so the fixtures' finalizers still stop what we started."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(items):
    """Tests marked `destructive` (they kill a server) run after all others."""
    items.sort(key=lambda it: it.get_closest_marker("destructive") is not None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, append the tails of sclb's and the servers' logs to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for log in _LOGS:
            report.sections.append((f"log {log}", harness.tail(log, 40)))


def pytest_terminal_summary(terminalreporter):
    """Print the figures measured during the run (start times, peak RSS)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    _FIGURES["pytest (client) peak RSS"] = f"{ru.ru_maxrss / 1024:.0f} MiB"
    terminalreporter.write_sep("-", "sclb e2e figures")
    for k, v in _FIGURES.items():
        terminalreporter.write_line(f"{k}: {v}")
