"""sclb's gateway creating Spark Connect drivers on demand, against a real kube-apiserver.

Real parts only: PySpark 4.0.5 -> sclb (frontend mode "grpc" with `on_demand`) -> a real Spark
Connect server (sc1 of the `backends` fixture), with a real kube-apiserver + etcd
(scripts/k8s-apiserver.sh) holding the SparkConnect objects. Nothing runs the spark-operator:
the test plays it, PATCHing the object's status with a podIp (127.0.0.1) where sc1 listens;
sclb's discovery port is sc1's port, so the driver "at" that pod IP is sc1.

What is proved: a new session's first RPC is held until the object sclb created is Ready, then
answered by the real server; idle timeout, max TTL and spark.stop() end the session and sclb
deletes the object from the API server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from pyspark.sql import SparkSession

import harness
from harness import Admin, wait_until

K8S_SCRIPT = harness.REPO_ROOT / "scripts" / "k8s-apiserver.sh"
NS = "sjns-data-dev"
CONNECTS = f"/apis/sparkoperator.k8s.io/v1alpha1/namespaces/{NS}/sparkconnects"
TEAM_PARAMS = ";x-spark-team=data;x-spark-environment=dev"
NAME_RE = re.compile(r"spark-connect-data-[a-z0-9]+")

APISERVER_START_BUDGET = 240.0  # etcd + kube-apiserver + CRDs on a busy 2-core machine
SCLB_START_BUDGET = 15.0
APPEAR_BUDGET = 30.0    # a new session's SparkConnect shows up in the API server
HELD_BUDGET = 60.0      # the held first RPC completes once the object is Ready
DELETE_SLACK = 15.0     # beyond idle_timeout / max_ttl, for the object to be deleted
SPARK_START_BUDGET = 120.0  # the pool test's own Spark server, started while others run
WARM_BUDGET = 180.0     # a cold Spark server's first query (the pool's warm-up), loaded machine
COLD_IP = "127.0.0.2"   # where the pool test's own (cold) Spark server listens
WARM_UP_CLOSED = re.compile(r"Closing session with userId: sclb-warm-up")

TEMPLATE = """\
apiVersion: sparkoperator.k8s.io/v1alpha1
kind: SparkConnect
metadata:
  name: "{name}"
  labels:
    team: "{team}"
spec:
  sparkVersion: 4.0.5
  server:
    template:
      spec:
        containers:
          - name: spark-kubernetes-driver
            image: docker.io/apache/spark:4.0.5
  executor:
    instances: 1
"""


class Kube:
    """Just enough of the Kubernetes REST API (bearer token, the API server's own CA)."""

    def __init__(self, workdir: Path, port: int):
        self.base = f"https://127.0.0.1:{port}"
        self.kubeconfig = workdir / "kubeconfig"
        self.ctx = ssl.create_default_context(cafile=str(workdir / "certs" / "apiserver.crt"))

    def call(self, method: str, path: str, body=None,
             ctype: str = "application/json") -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": "Bearer testtoken", "Accept": "application/json",
            **({"Content-Type": ctype} if data is not None else {})})
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ctx) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"raw": text.decode(errors="replace")}

    def connects(self) -> list[dict]:
        """The SparkConnect objects in NS."""
        code, body = self.call("GET", CONNECTS)
        assert code == 200, f"GET {CONNECTS}: HTTP {code} {body}"
        return body["items"]

    def names(self) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.connects())

    def make_ready(self, name: str, ip: str = "127.0.0.1") -> dict:
        """What the spark-operator does once the server pod runs: status Ready at its pod IP."""
        status = {"status": {"state": "Ready",
                             "server": {"podIp": ip, "podName": f"{name}-server"}}}
        code, body = self.call("PATCH", f"{CONNECTS}/{name}/status", status,
                               ctype="application/merge-patch+json")
        assert code == 200, f"PATCH status of {name}: HTTP {code} {body}"
        return body

    def delete_all(self) -> None:
        for name in self.names():
            self.call("DELETE", f"{CONNECTS}/{name}")


@pytest.fixture(scope="module")
def kube():
    """A real kube-apiserver (+ etcd) on loopback with the spark-operator CRDs and namespace
    sjns-data-dev; stopped (by PID, by the script) at the end of the module."""
    if subprocess.run([str(K8S_SCRIPT), "path"], capture_output=True).returncode != 0:
        pytest.skip("kube-apiserver not built on this machine: run "
                    "scripts/k8s-apiserver.sh build (CI builds it before this suite)")
    # A short path of our own: the script's watchdog removes a DIR named sclb-k8s-* once this
    # process is gone, if the fixture's finalizer never ran.
    workdir = Path(tempfile.mkdtemp(prefix="sclb-k8s-"))
    port, etcd_port, peer_port = harness.free_port(), harness.free_port(), harness.free_port()
    started = time.monotonic()
    try:
        r = subprocess.run(
            [str(K8S_SCRIPT), "start", str(workdir), str(port), str(etcd_port), str(peer_port),
             str(os.getpid())],
            capture_output=True, text=True, timeout=APISERVER_START_BUDGET)
        assert r.returncode == 0, f"k8s-apiserver.sh start failed:\n{r.stdout}\n{r.stderr}"
        harness.FIGURES["kube-apiserver ready after"] = f"{time.monotonic() - started:.1f} s"
        k = Kube(workdir, port)
        code, body = k.call("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        assert code in (201, 409), f"creating namespace {NS}: HTTP {code} {body}"
        yield k
    finally:
        subprocess.run([str(K8S_SCRIPT), "stop", str(workdir)], capture_output=True, timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


class Gateway:
    """One sclb process: a gateway frontend creating SparkConnects on demand."""

    def __init__(self, proc, port: int, admin: Admin):
        self.proc, self.port, self.admin = proc, port, admin

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}/{TEAM_PARAMS}"

    def log(self) -> str:
        return harness.read_log(self.proc.log)


def start_gateway(kube: Kube, spark_port: int, workdir: Path, idle: str, ttl: str,
                  pool: str = "") -> Gateway:
    """sclb with frontend "gw" (on_demand, sessions idle `idle` / max_ttl `ttl`, `pool` its
    on_demand.pool if given) in front of backend "drivers", which discovers SparkConnects in NS
    at `spark_port`."""
    pool_setting = f", pool = {pool}" if pool else ""
    workdir.mkdir(parents=True, exist_ok=True)
    template = workdir / "sparkconnect.yaml"
    template.write_text(TEMPLATE)
    admin_sock = workdir / "admin.sock"
    port, stats_port = harness.free_port(), harness.free_port()
    config = workdir / "sclb.toml"
    config.write_text(f"""\
[global]
admin = {{ path = "{admin_sock}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:{stats_port}" }}

[defaults]
timeout = {{ connect = "2s" }}
check = {{ type = "none" }}

[[frontend]]
name = "gw"
mode = "grpc"
bind = ["127.0.0.1:{port}"]
backend = "drivers"
sessions = {{ idle_timeout = "{idle}", max_ttl = "{ttl}", cleanup_interval = "500ms" }}
on_demand = {{ template = "{template}", name = "spark-connect-{{team}}-{{random}}", namespace = "sjns-{{team}}-{{environment}}", ready_timeout = "60s"{pool_setting} }}

[[backend]]
name = "drivers"
[backend.discovery.kubernetes]
kind = "sparkconnects"
namespace = "{NS}"
port = {spark_port}
kubeconfig = "{kube.kubeconfig}"
""")
    binary = Path(os.environ.get("SCLB_BIN", harness.REPO_ROOT / "target/debug/sclb"))
    if not binary.is_absolute():
        binary = harness.REPO_ROOT / binary
    if not os.access(binary, os.X_OK):
        pytest.fail(f"sclb binary {binary} missing (cargo build, or set SCLB_BIN)")
    proc = harness.start_sclb(binary, config, workdir)
    try:
        harness.wait_port(proc, port, SCLB_START_BUDGET)
    except BaseException:
        proc.stop()
        raise
    return Gateway(proc, port, Admin(admin_sock))


@pytest.fixture
def gateway_factory(kube, backends, tmp_path):
    """start_gateway(idle, ttl) for this test; sclb stopped by PID at the end, its log shown
    on failure, and no SparkConnect left behind for the next test."""
    started: list[Gateway] = []

    def start(idle: str, ttl: str, pool: str = "") -> Gateway:
        gw = start_gateway(kube, backends["sc1"].port, tmp_path / f"sclb{len(started)}",
                           idle, ttl, pool)
        started.append(gw)
        return gw

    assert kube.names() == [], f"SparkConnects left over in {NS}: {kube.names()}"
    try:
        yield start
    finally:
        for gw in started:
            gw.proc.stop()
        for gw in started:  # shown by pytest when the test failed
            print(f"--- sclb log {gw.proc.log} ---\n{harness.tail(gw.proc.log, 80)}")
        kube.delete_all()


class Background:
    """Runs fn() in a daemon thread (a held gRPC call must not keep pytest from exiting)."""

    def __init__(self, fn):
        self.result = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: BLE001
            self.error = e
        finally:
            self.finished_at = time.monotonic()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def get(self, budget: float):
        self._thread.join(budget)
        if self._thread.is_alive():
            raise TimeoutError(f"still running after {budget} s")
        if self.error is not None:
            raise self.error
        return self.result


def stop_quietly(spark):
    try:
        spark.stop()
    except Exception:  # noqa: BLE001
        pass


def open_held_session(gw: Gateway, kube: Kube, backends) -> tuple[SparkSession, str, float]:
    """A new PySpark session through `gw` whose first query is held until this test, playing
    the spark-operator, reports the SparkConnect sclb created Ready at 127.0.0.1. Returns the
    session, the object's name and when it was made Ready (monotonic)."""
    holder: dict = {}

    def first_query():
        spark = SparkSession.builder.remote(gw.url).create()
        holder["spark"] = spark
        # the session's first RPC: held by sclb until the driver is ready
        return spark.range(10).count()

    t0 = time.monotonic()
    job = Background(first_query)
    try:
        objs = wait_until(kube.connects, APPEAR_BUDGET, f"sclb creates a SparkConnect in {NS}")
        assert len(objs) == 1, [o["metadata"]["name"] for o in objs]
        obj = objs[0]
        name = obj["metadata"]["name"]
        harness.FIGURES["on-demand: SparkConnect created after"] = f"{time.monotonic() - t0:.1f} s"
        assert NAME_RE.fullmatch(name), name
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/managed-by") == "sclb", labels
        assert labels.get("sclb.io/team") == "data", labels
        assert labels.get("sclb.io/environment") == "dev", labels
        assert labels.get("team") == "data", f"the template was not filled in: {labels}"
        assert obj["spec"]["sparkVersion"] == "4.0.5", obj["spec"]
        assert "status" not in obj or not obj["status"].get("server"), obj.get("status")

        # Nothing answers until the "operator" says so.
        time.sleep(1.0)
        assert not job.done(), f"the first RPC completed before the driver was ready: " \
                               f"{job.result!r} {job.error!r}"
        assert "spark" in holder, "SparkSession.create() itself did not return"
        session_id = holder["spark"].session_id
        assert obj["metadata"].get("annotations", {}).get("sclb.io/spark-session") == session_id

        ready_at = time.monotonic()
        kube.make_ready(name)
        assert job.get(HELD_BUDGET) == 10
        harness.FIGURES["on-demand: held RPC answered after Ready"] = \
            f"{job.finished_at - ready_at:.1f} s"
        return holder["spark"], name, ready_at
    except BaseException:
        if job.done() and "spark" in holder:
            stop_quietly(holder["spark"])
        raise


def answered_by_sc1(spark, backends) -> None:
    port = int(spark.conf.get("spark.connect.grpc.binding.port"))
    assert port == backends["sc1"].port, f"answered from :{port}, sc1 is :{backends['sc1'].port}"


def grpc_code(error: BaseException) -> str | None:
    """The gRPC status code behind a PySpark error (PySpark raises its own exception `from
    None`, the grpc.RpcError stays in __context__)."""
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
            return e.code().name
        e = e.__cause__ or e.__context__
    return None


def no_sessions(gw: Gateway) -> bool:
    return gw.admin.sessions() == {}


def test_gateway_k8s_held_until_ready_then_idle_reaped(gateway_factory, kube, backends):
    """A new session's first RPC is held while sclb creates a SparkConnect; the test (as the
    operator) patches its status Ready at 127.0.0.1, and the held query is answered by the
    real Spark server; later queries (and a temp view) stay on it. Left idle, the session ends
    and sclb deletes the object from the API server."""
    idle_s = 5.0
    gw = gateway_factory(idle=f"{idle_s:.0f}s", ttl="1h")
    spark, name, _ = open_held_session(gw, kube, backends)
    try:
        sid = spark.session_id
        # The session lives on the driver: a temp view survives across queries.
        spark.sql("SELECT id, id * id AS sq FROM range(100)").createOrReplaceTempView("od_view")
        assert spark.sql("SELECT count(*) AS n, sum(sq) AS s FROM od_view").collect()[0] \
            .asDict() == {"n": 100, "s": sum(i * i for i in range(100))}
        assert spark.table("od_view").where("id < 10").count() == 10
        answered_by_sc1(spark, backends)
        assert kube.names() == [name], "one driver per session"

        listed = gw.admin.sessions()
        assert list(listed) == [sid], listed
        entry = listed[sid]
        assert (entry["fe"], entry["be"], entry["srv"]) == ("gw", "drivers", name), entry
        assert entry.get("app") == f"{NS}/{name}", entry
        raw = gw.admin.cmd("show sessions")
        assert re.search(rf"^{re.escape(sid)}: .* app={re.escape(NS)}/{re.escape(name)} created$",
                         raw, re.M), raw

        # Idle: no RPC from now on. The object is deleted, the session gone.
        quiet_from = time.monotonic()
        wait_until(lambda: kube.names() == [], idle_s + DELETE_SLACK,
                   f"{name} deleted after {idle_s} s idle")
        took = time.monotonic() - quiet_from
        harness.FIGURES["on-demand: idle driver deleted after"] = f"{took:.1f} s (idle_timeout {idle_s:.0f} s)"
        assert took >= idle_s - 1.0, f"deleted after {took:.1f} s, before the idle timeout"
        wait_until(lambda: no_sessions(gw), 5.0, "show sessions empty")
        # ... and sclb released it on the Spark server (ReleaseSession on the client's behalf).
        closed = re.compile(rf"Closing session with userId: .*sessionId: {re.escape(sid)}")
        wait_until(lambda: closed.search(harness.read_log(backends["sc1"].proc.log)), 10.0,
                   f"sc1 closes session {sid}")

        log = gw.log()
        assert re.search(rf"driver created on demand: sparkconnects {NS}/{name}", log), log[-3000:]
        assert re.search(r"session ended: was closed by sclb after its idle timeout "
                         rf"session={re.escape(sid)} .*reason=\"?idle", log), log[-3000:]
        assert f"driver deleted: sparkconnects {NS}/{name}" in log, log[-3000:]
    finally:
        stop_quietly(spark)


def test_gateway_k8s_released_by_stop(gateway_factory, kube, backends):
    """spark.stop() (ReleaseSession) ends the session at once and sclb deletes its driver,
    long before the idle timeout."""
    gw = gateway_factory(idle="1h", ttl="1h")
    spark, name, _ = open_held_session(gw, kube, backends)
    try:
        sid = spark.session_id
        answered_by_sc1(spark, backends)
        assert spark.sql("SELECT 41 + 1 AS x").collect()[0].x == 42
    finally:
        t0 = time.monotonic()
        spark.stop()
    log_has = re.compile(rf"session ended: was released by its client session={re.escape(sid)} "
                         r".*reason=\"?released")
    wait_until(lambda: log_has.search(gw.log()), 5.0, "sclb ends the released session")
    wait_until(lambda: kube.names() == [], DELETE_SLACK,
               f"spark.stop() (ReleaseSession) ended the session: its driver {name} deleted")
    harness.FIGURES["on-demand: released driver deleted after"] = f"{time.monotonic() - t0:.1f} s"
    wait_until(lambda: no_sessions(gw), 5.0, "show sessions empty")
    assert f"driver deleted: sparkconnects {NS}/{name}" in gw.log(), gw.log()[-3000:]


def test_gateway_k8s_ttl_reaps_busy_session(gateway_factory, kube, backends):
    """A session kept busy (a query every second) still ends at max_ttl: sclb deletes its
    driver and the client's next RPC fails, telling it the session reached its maximum
    lifetime."""
    ttl_s = 8.0
    gw = gateway_factory(idle="1h", ttl=f"{ttl_s:.0f}s")
    spark, name, ready_at = open_held_session(gw, kube, backends)
    try:
        answered_by_sc1(spark, backends)
        queries, error = 0, None
        deadline = ready_at + ttl_s + DELETE_SLACK
        while time.monotonic() < deadline:
            try:
                assert spark.range(queries + 1).count() == queries + 1
                queries += 1
            except Exception as e:  # noqa: BLE001 -- the RPC sclb refuses
                error = e
                break
            time.sleep(1.0)
        failed_after = time.monotonic() - ready_at
        assert error is not None, f"{queries} queries over {failed_after:.0f} s, none refused"
        harness.FIGURES["on-demand: busy session refused after"] = \
            f"{failed_after:.1f} s after Ready (max_ttl {ttl_s:.0f} s), {queries} queries"
        assert queries >= 3, f"only {queries} queries before the TTL: {error}"
        assert "maximum lifetime" in str(error), repr(error)
        code = grpc_code(error)
        assert code in ("CANCELLED", "FAILED_PRECONDITION"), f"{code}: {error!r}"
        wait_until(lambda: kube.names() == [], DELETE_SLACK, f"{name} deleted at the TTL")
        wait_until(lambda: no_sessions(gw), 5.0, "show sessions empty")
        log = gw.log()
        assert re.search(r"session ended: was closed by sclb at its maximum lifetime "
                         rf"session={re.escape(spark.session_id)} .*reason=\"?ttl", log), log[-3000:]
        assert f"driver deleted: sparkconnects {NS}/{name}" in log, log[-3000:]
    finally:
        stop_quietly(spark)


def test_gateway_k8s_killed_by_admin(gateway_factory, kube, backends):
    """`kill session <id>` on the admin socket ends the session and sclb deletes its driver;
    the client's next RPC is refused."""
    gw = gateway_factory(idle="1h", ttl="1h")
    spark, name, _ = open_held_session(gw, kube, backends)
    try:
        sid = spark.session_id
        answered_by_sc1(spark, backends)
        assert sid in gw.admin.sessions()
        reply = gw.admin.cmd(f"kill session {sid}")
        wait_until(lambda: kube.names() == [], DELETE_SLACK, f"{name} deleted after kill session")
        assert no_sessions(gw), f"{reply}\n{gw.admin.cmd('show sessions')}"
        with pytest.raises(Exception, match="killed by an operator"):
            spark.range(3).count()
        log = gw.log()
        assert re.search(rf"session ended: was killed by an operator session={re.escape(sid)} "
                         r".*reason=\"?killed", log), log[-3000:]
        assert f"driver deleted: sparkconnects {NS}/{name}" in log, log[-3000:]
    finally:
        stop_quietly(spark)


class Operator:
    """Plays the spark-operator with no pod start time: every SparkConnect without a status is
    made Ready at once at `ip` (127.0.0.1, where sc1 listens, by default). Stopped by stop()."""

    def __init__(self, kube: Kube, ip: str = "127.0.0.1"):
        self.kube, self.ip, self.stopping = kube, ip, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self.stopping.wait(0.05):
            try:
                for o in self.kube.connects():
                    if not o.get("status"):
                        self.kube.make_ready(o["metadata"]["name"], self.ip)
            except AssertionError:
                pass  # deleted between the list and the patch: the next round sees

    def stop(self):
        self.stopping.set()
        self._thread.join(5)


def first_query_seconds(url: str) -> tuple[float, SparkSession]:
    """From getOrCreate() to the first query's answer, through the gateway."""
    t0 = time.monotonic()
    spark = SparkSession.builder.remote(url).getOrCreate()
    assert spark.range(10).count() == 10
    return time.monotonic() - t0, spark


def pool_ready(gw: Gateway) -> int:
    m = re.search(r" ready=(\d+) ", gw.admin.cmd("show pool"))
    return int(m.group(1)) if m else -1


def test_gateway_k8s_pool_hit_first_query_at_once_beside_a_miss(gateway_factory, kube, backends,
                                                                tmp_path):
    """A warm pool of one driver, a freshly started (cold) Spark Connect server: sclb warms it
    up (a throwaway query in a session of its own, released after) before offering it; a new
    PySpark session's first query is then answered by the claimed driver at once; the claimed
    driver is the session's and is deleted on spark.stop(), never returned to the pool.
    Figures: getOrCreate() to the first answer on that hit, and on a miss (a gateway without a
    pool, whose "operator" takes no time at all, in front of sc1 warmed by one direct query
    first, so that the figure is sclb's and not a cold JVM's). bench/run --pool measures both
    with cold servers."""
    warm = SparkSession.builder.remote(f"sc://127.0.0.1:{backends['sc1'].port}").create()
    try:
        assert warm.range(10).count() == 10
    finally:
        stop_quietly(warm)
    # The pool's driver: a server of its own, cold, at 127.0.0.2 on sc1's port (discovery
    # has one port for every driver, as pods of one template).
    port = backends["sc1"].port
    cold = harness.start_spark_server("sc-pool", port, tmp_path / "sc-pool", address=COLD_IP)
    operator = None
    try:
        operator = Operator(kube)
        plain = gateway_factory("10m", "1h")
        miss, spark = first_query_seconds(plain.url)
        answered_by_sc1(spark, backends)
        harness.FIGURES["pool miss (no pool, instant operator): getOrCreate() to first answer"] = \
            f"{miss:.2f} s"
        spark.stop()
        wait_until(lambda: kube.names() == [], DELETE_SLACK, "the miss's driver deleted")
        plain.proc.stop()
        operator.stop()

        harness.wait_port(cold, port, SPARK_START_BUDGET, host=COLD_IP)
        operator = Operator(kube, COLD_IP)
        gw = gateway_factory("10m", "1h",
                             '{ min_ready = 1, max_ready = 2, max_age = "1h", teams = ["data/dev"] }')
        pooled = wait_until(kube.names, APPEAR_BUDGET, "a pool driver")
        assert len(pooled) == 1, pooled
        t0 = time.monotonic()
        wait_until(lambda: pool_ready(gw) == 1, WARM_BUDGET, "one warm pool driver")
        harness.FIGURES["pool: a fresh server's warm-up by sclb, Ready to offered"] = \
            f"about {time.monotonic() - t0:.1f} s"
        _, obj = kube.call("GET", f"{CONNECTS}/{pooled[0]}")
        assert "sclb.io/warmed-up" in obj["metadata"]["annotations"], obj["metadata"]
        # The warm-up's session was released on the server.
        wait_until(lambda: WARM_UP_CLOSED.search(harness.read_log(cold.log)), 10.0,
                   "the warm-up session closed on the pool's server")
        assert re.search(r"pool driver warmed up in [0-9.]+s", gw.log()), gw.log()[-3000:]

        hit, spark = first_query_seconds(gw.url)
        assert spark.conf.get("spark.connect.grpc.binding.address") == COLD_IP
        harness.FIGURES["pool hit (a fresh server, warmed up by sclb): getOrCreate() to first answer"] = \
            f"{hit:.2f} s"
        _, obj = kube.call("GET", f"{CONNECTS}/{pooled[0]}")
        assert obj["metadata"]["labels"]["sclb.io/pool"] == "claimed", obj["metadata"]
        assert obj["metadata"]["annotations"]["sclb.io/spark-session"] == spark.session_id
        assert "pool driver claimed" in gw.log()
        wait_until(lambda: pool_ready(gw) == 1 and pooled[0] not in gw.admin.cmd("show pool"),
                   WARM_BUDGET, "a replacement in the pool")
        spark.stop()
        wait_until(lambda: pooled[0] not in kube.names(), DELETE_SLACK,
                   "the claimed driver deleted when its session ends")
        assert pooled[0] not in gw.admin.cmd("show pool")
    finally:
        if operator:
            operator.stop()
        cold.stop()
