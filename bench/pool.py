#!/usr/bin/python3
"""bench/run --pool: a PySpark session's first query on a warm-pool hit, beside a miss, with real
Spark Connect servers and the real kube-apiserver + etcd (scripts/k8s-apiserver.sh; built once
per machine by `scripts/k8s-apiserver.sh build`).

The bench plays the spark-operator: when a SparkConnect appears in its namespace it starts a
real, cold Spark Connect server (the pyspark package's spark-submit, local[2], 1 GiB heap) on a
loopback address of its own (127.0.0.x, every driver on one port, as pods of one template) and,
once that server accepts connections, PATCHes the object's status Ready at that address; when
the object is deleted it stops the server. sclb (`mode = "grpc"`, `on_demand`) creates,
claims and deletes the objects. Each figure is the time a fresh PySpark process measures from
`SparkSession.builder.remote(...).getOrCreate()` to the answer of its first query
(`spark.range(10).count()`), through sclb:

- hit: `on_demand.pool = { min_ready = 1, ... }` with the default warm-up; the session claims a
  pool driver sclb started and warmed up (wait until `show pool` says ready=1 first).
- hit, no warm-up: the same with `warm_up = false`: the claimed driver is a cold JVM.
- miss: no pool; the session waits for its driver: the object is created, the (bench)
  operator starts a cold Spark server, and the first query runs on it.
- direct: the floor — no sclb, no Kubernetes wait: a fresh PySpark process straight to a warm
  Spark server the operator started (one query run on it first).

While a hit is measured the operator starts nothing (a pool's replacement would otherwise start
a JVM on the bench's two cores during the measurement; in a cluster it starts on another node),
and each rep (hit or direct) starts once the Spark servers are quiet: a JVM that just ran its
warm-up keeps compiling for seconds in background threads, which on a node of its own costs the
client nothing but here would take the client's CPU.

Python standard library only; PySpark runs in SPARK_PYTHON (default .venv/bin/python).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import bench as b
import scale_watch as k8s

NAMESPACE = k8s.NAMESPACE  # created by scale_watch.start_apiserver
CONNECTS = f"/apis/sparkoperator.k8s.io/v1alpha1/namespaces/{NAMESPACE}/sparkconnects"
TEAM = ("bench", "dev")
SPARK_START_BUDGET = 180.0  # a cold JVM on a busy 2-core machine
READY_BUDGET = 300.0        # a pool member started and warmed up
QUIET_BUDGET = 30.0         # the Spark servers' JIT compilers settle before a rep
TEMPLATE = """\
apiVersion: sparkoperator.k8s.io/v1alpha1
kind: SparkConnect
metadata:
  name: "{name}"
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
FIRST_QUERY = """\
import json, sys, time
from pyspark.sql import SparkSession
t0 = time.monotonic()
spark = SparkSession.builder.remote(sys.argv[1]).getOrCreate()
t1 = time.monotonic()
assert spark.range(10).count() == 10
took = time.monotonic() - t0
print(json.dumps({"seconds": took, "get_or_create": t1 - t0, "session": spark.session_id}))
spark.stop()
"""
SCENARIOS = {
    "hit": '{ min_ready = 1, max_ready = 1, max_age = "1h", teams = ["bench/dev"] }',
    "hit-no-warm-up": '{ min_ready = 1, max_ready = 1, max_age = "1h", teams = ["bench/dev"], '
                      'warm_up = false }',
    "miss": None,
    # The floor: PySpark straight to a warm Spark server (one query run on it first), no sclb.
    "direct": None,
}


def jvm_ticks(op: "Operator") -> int:
    ticks = 0
    for proc, _ip, _started in list(op.servers.values()):
        try:
            for tid in os.listdir(f"/proc/{proc.pid}/task"):
                f = open(f"/proc/{proc.pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                ticks += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass  # stopped meanwhile
    return ticks


def settle(op: "Operator", budget: float = QUIET_BUDGET) -> float:
    """Waits (at most `budget`) until the Spark servers together use under a tenth of a CPU;
    the seconds waited."""
    hz = os.sysconf("SC_CLK_TCK")
    t0 = time.monotonic()
    before = jvm_ticks(op)
    while time.monotonic() < t0 + budget:
        time.sleep(1.0)
        now = jvm_ticks(op)
        if now - before < 0.1 * hz:
            break
        before = now
    return time.monotonic() - t0


def accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


class Operator:
    """Plays the spark-operator in NAMESPACE with real Spark Connect servers (see the module
    doc). `paused` holds back new servers (those already starting finish)."""

    def __init__(self, api: k8s.Api, spark_home: Path, port: int, workdir: Path):
        self.api, self.spark_home, self.port, self.workdir = api, spark_home, port, workdir
        self.servers: dict[str, tuple[b.Proc, str, float]] = {}  # name -> (proc, ip, started)
        self.ready: set[str] = set()
        self.start_s: list[float] = []  # server start to port accepting
        self.paused = threading.Event()
        self.stopping = threading.Event()
        self.error: str | None = None
        self.next_ip = 10
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            try:
                self.look()
            except b.BenchError as exc:
                self.error = str(exc)

    def look(self) -> None:
        names = {o["metadata"]["name"] for o in self.api.call("GET", CONNECTS).get("items", [])}
        for name in sorted(names - set(self.servers)):
            if not self.paused.is_set():
                self.start(name)
        for name, (proc, ip, started) in list(self.servers.items()):
            if name not in names:
                b.PROCS.stop(proc, timeout=10)
                del self.servers[name]
                self.ready.discard(name)
            elif name not in self.ready and accepts(ip, self.port):
                self.start_s.append(time.monotonic() - started)
                try:
                    self.api.call("PATCH", f"{CONNECTS}/{name}/status", {"status": {
                        "state": "Ready", "server": {"podIp": ip, "podName": f"{name}-server"}}},
                        ctype="application/merge-patch+json")
                except b.BenchError as exc:
                    if " 404 " not in str(exc):  # deleted since the list: the next look stops it
                        raise
                self.ready.add(name)
            elif name not in self.ready and time.monotonic() - started > SPARK_START_BUDGET:
                raise b.BenchError(f"Spark server of {name} not accepting after "
                                   f"{SPARK_START_BUDGET:.0f} s: {proc.log_tail(5)}")

    def start(self, name: str) -> None:
        ip = f"127.0.0.{self.next_ip}"
        self.next_ip += 1
        d = self.workdir / "spark" / name
        d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, SPARK_HOME=str(self.spark_home), SPARK_LOCAL_IP=ip)
        argv = [self.spark_home / "bin" / "spark-submit",
                "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
                "--master", "local[2]", "--driver-memory", "1g",
                "--conf", f"spark.connect.grpc.binding.address={ip}",
                "--conf", f"spark.connect.grpc.binding.port={self.port}",
                "--conf", "spark.ui.enabled=false",
                "--conf", f"spark.local.dir={d}",
                "--conf", f"spark.sql.warehouse.dir={d / 'warehouse'}"]
        self.servers[name] = (b.PROCS.start(f"spark-{name}", argv, env=env), ip, time.monotonic())

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        for proc, _, _ in self.servers.values():
            b.PROCS.stop(proc, timeout=10)


def sclb_config(d: Path, kubeconfig: Path, spark_port: int, pool: str | None) -> tuple[Path, Path, int, int]:
    port, stats = k8s.free_port(), k8s.free_port()
    sock, cfg, template = d / "sclb-pool.sock", d / "sclb-pool.toml", d / "sparkconnect.yaml"
    template.write_text(TEMPLATE)
    pool_setting = f", pool = {pool}" if pool else ""
    cfg.write_text(f"""\
[global]
admin = {{ path = "{sock}", mode = "0600", level = "admin" }}
stats = {{ bind = "{b.HOST}:{stats}" }}
log = {{ level = "info" }}
[defaults]
timeout = {{ connect = "2s" }}
check = {{ type = "none" }}
[[frontend]]
name = "gw"
mode = "grpc"
bind = ["{b.HOST}:{port}"]
backend = "drivers"
sessions = {{ idle_timeout = "10m", max_ttl = "1h", cleanup_interval = "1s" }}
on_demand = {{ template = "{template}", name = "spark-connect-{{team}}-{{random}}", namespace = "{NAMESPACE}", ready_timeout = "5m", default_team = "{TEAM[0]}", default_environment = "{TEAM[1]}"{pool_setting} }}
[[backend]]
name = "drivers"
[backend.discovery.kubernetes]
kind = "sparkconnects"
namespace = "{NAMESPACE}"
port = {spark_port}
kubeconfig = "{kubeconfig}"
""")
    return cfg, sock, port, stats


def metric(stats: int, series: str) -> float:
    with urllib.request.urlopen(f"http://{b.HOST}:{stats}/metrics", timeout=10) as r:
        text = r.read().decode()
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(what: str, budget: float, fn, op: Operator, sclb: b.Proc) -> None:
    deadline = time.monotonic() + budget
    while not fn():
        if op.error:
            raise b.BenchError(op.error)
        if not sclb.alive():
            raise b.BenchError(f"sclb exited: {sclb.log_tail()}")
        if time.monotonic() > deadline:
            raise b.BenchError(f"{what}: not within {budget:.0f} s")
        time.sleep(0.2)


def pool_ready(sock: Path) -> int:
    out, _ = b.admin(sock, "show pool", timeout=10)
    m = re.search(r" ready=(\d+) ", out)
    return int(m.group(1)) if m else -1


def first_query(spark_python: Path, port: int, name: str, host: str = b.HOST) -> tuple[float, float]:
    """(getOrCreate() to the first answer, of which getOrCreate() itself), seconds."""
    url = f"sc://{host}:{port}/;x-spark-team={TEAM[0]};x-spark-environment={TEAM[1]}"
    out = b.PROCS.run(name, [spark_python, "-c", FIRST_QUERY, url], timeout=600)
    got = json.loads(out.strip().splitlines()[-1])
    return got["seconds"], got["get_or_create"]


def run_direct(s, api: k8s.Api, op: Operator) -> dict:
    """The floor a pool hit is measured against: the operator starts one Spark server, one
    query warms it, then each rep is a fresh PySpark process straight to it (no sclb)."""
    name = "bench-direct"
    api.call("POST", CONNECTS, {
        "apiVersion": "sparkoperator.k8s.io/v1alpha1", "kind": "SparkConnect", "metadata": {"name": name},
        # TEMPLATE's spec, as a dict (the standard library reads no YAML)
        "spec": {"sparkVersion": "4.0.5",
                 "server": {"template": {"spec": {"containers": [
                     {"name": "spark-kubernetes-driver", "image": "docker.io/apache/spark:4.0.5"}]}}},
                 "executor": {"instances": 1}}})
    times: list[float] = []
    gocs: list[float] = []
    try:
        deadline = time.monotonic() + SPARK_START_BUDGET
        while name not in op.ready:
            if op.error or time.monotonic() > deadline:
                raise b.BenchError(f"direct: the Spark server did not start: {op.error or 'timed out'}")
            time.sleep(0.2)
        ip = op.servers[name][1]
        first_query(s.spark_python, s.spark_port, "client-direct-warm-up", host=ip)
        for rep in range(s.reps):
            quiet = settle(op)
            took, goc = first_query(s.spark_python, s.spark_port, f"client-direct-{rep}", host=ip)
            times.append(took)
            gocs.append(goc)
            print(f"  direct #{rep + 1}: {took:.2f} s (Spark quiet after {quiet:.0f} s)", flush=True)
    finally:
        try:
            api.call("DELETE", f"{CONNECTS}/{name}")
        except b.BenchError:
            pass
    return {"scenario": "direct", "times": times, "get_or_create": gocs, "warmups": 0,
            "warmup_mean_s": None, "first_response_ms": None}


def run_scenario(s, api: k8s.Api, kubeconfig: Path, scenario: str, op: Operator) -> dict:
    if scenario == "direct":
        return run_direct(s, api, op)
    pool = SCENARIOS[scenario]
    d = s.workdir / scenario
    d.mkdir(parents=True, exist_ok=True)
    cfg, sock, port, stats = sclb_config(d, kubeconfig, s.spark_port, pool)
    sclb = b.PROCS.start(f"sclb-{scenario}", [s.sclb_bin, "-c", cfg])
    times: list[float] = []
    gocs: list[float] = []
    try:
        b.wait_listening([port], [sclb], timeout=60)
        for rep in range(s.reps):
            if pool:
                op.paused.clear()
                wait_for("a Ready (warm) pool driver", READY_BUDGET, lambda: pool_ready(sock) == 1,
                         op, sclb)
                op.paused.set()
            quiet = settle(op)
            hits = metric(stats, 'sclb_pool_claims_total{result="hit"}')
            took, goc = first_query(s.spark_python, port, f"client-{scenario}-{rep}")
            gocs.append(goc)
            if pool and metric(stats, 'sclb_pool_claims_total{result="hit"}') != hits + 1:
                raise b.BenchError(f"{scenario}: rep {rep} was not a pool hit")
            times.append(took)
            print(f"  {scenario} #{rep + 1}: {took:.2f} s (Spark quiet after {quiet:.0f} s)", flush=True)
        warm_n = metric(stats, "sclb_pool_warmup_seconds_count")
        warm_sum = metric(stats, "sclb_pool_warmup_seconds_sum")
        # sclb's own part: a session's first RPC (the claim or the create happens there) to its
        # first response.
        result = "hit" if pool else "miss"
        first_n = metric(stats, f'sclb_session_first_response_seconds_count{{result="{result}"}}')
        first_sum = metric(stats, f'sclb_session_first_response_seconds_sum{{result="{result}"}}')
    finally:
        op.paused.clear()
        b.PROCS.stop(sclb)
        for o in api.call("GET", CONNECTS).get("items", []):
            try:
                api.call("DELETE", f"{CONNECTS}/{o['metadata']['name']}")
            except b.BenchError:
                pass  # deleted by sclb meanwhile
    return {"scenario": scenario, "times": times, "get_or_create": gocs, "warmups": warm_n,
            "warmup_mean_s": warm_sum / warm_n if warm_n else None,
            "first_response_ms": 1000 * first_sum / first_n if first_n else None}


def report(s, results: list[dict], op: Operator, errors: list[str], envlog: list[str]) -> Path:
    lines = [f"# sclb warm pool: first query of a PySpark session {s.stamp}", "",
             "getOrCreate() to the first query's answer (`spark.range(10).count()`), a fresh "
             "PySpark 4.0.5 process each time, through sclb's gateway (`on_demand`), real Spark "
             "Connect servers started by the bench as the operator, the real kube-apiserver. "
             "See bench/pool.py.", "",
             "| scenario | reps | p50 s | max s | each s | of which getOrCreate(), p50 s | "
             "pool warm-ups (mean s) | sclb: first RPC → its answer, mean ms |",
             "|---|---:|---:|---:|---|---:|---|---:|"]
    for r in results:
        t = r["times"]
        if not t:
            continue
        warm = f"{r['warmups']:.0f} ({r['warmup_mean_s']:.1f})" if r["warmup_mean_s"] else "–"
        first = "–" if r["first_response_ms"] is None else f"{r['first_response_ms']:.0f}"
        lines.append(f"| {r['scenario']} | {len(t)} | {statistics.median(t):.2f} | {max(t):.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in t)} | "
                     f"{statistics.median(r['get_or_create']):.2f} | {warm} | {first} |")
    if op.start_s:
        lines += ["", f"Cold Spark Connect server, spark-submit to port accepting: p50 "
                      f"{statistics.median(op.start_s):.1f} s, max {max(op.start_s):.1f} s "
                      f"({len(op.start_s)} servers)."]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e.splitlines()[0]}" for e in errors]
    lines += ["", "## Environment", "", "```"] + envlog + ["```", ""]
    s.outdir.mkdir(parents=True, exist_ok=True)
    md = s.outdir / f"{s.stamp}-pool.md"
    md.write_text("\n".join(lines))
    print("\n".join(lines[:8 + len(results)]))
    print(f"bench: wrote {md}")
    return md


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="bench/run --pool", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", action="store_true", help="(selects this driver)")
    ap.add_argument("--reps", type=int, default=3, help="sessions per scenario (1..20, default 3)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma list out of: {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--no-build", action="store_true", help="never run cargo build")
    ap.add_argument("--out", default=str(b.BENCH / "results"), help="results directory")
    a = ap.parse_args(argv)
    if not 1 <= a.reps <= 20:
        ap.error("--reps: 1..20")
    scenarios = [x for x in a.scenarios.split(",") if x]
    if not scenarios or set(scenarios) - set(SCENARIOS):
        ap.error(f"--scenarios: out of {','.join(SCENARIOS)}")
    return argparse.Namespace(
        reps=a.reps, scenarios=scenarios, build=not a.no_build, outdir=Path(a.out),
        sclb_bin=Path(os.environ.get("SCLB_BIN", str(b.DEFAULT_SCLB_BIN))).absolute(),
        spark_python=Path(os.environ.get("SPARK_PYTHON", str(b.REPO / ".venv" / "bin" / "python"))),
        spark_port=k8s.free_port(), stamp="", workdir=Path())


def main(argv: list[str]) -> int:
    s = parse_args(argv)
    s.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    s.workdir = b.BENCH / ".work" / f"{s.stamp}-pool"
    s.workdir.mkdir(parents=True, exist_ok=True)
    b.tidy_workdirs(s.workdir)
    b.PROCS.logdir = s.workdir
    signal.signal(signal.SIGTERM, b._on_signal)
    errors: list[str] = []
    results: list[dict] = []
    op = None
    try:
        sclb_ok, sclb_note = b.prepare_sclb(s)
        if not sclb_ok:
            raise b.BenchError(f"sclb: {sclb_note}")
        if not s.spark_python.exists():
            raise b.BenchError(f"{s.spark_python} missing (scripts/venv.sh, or set SPARK_PYTHON)")
        spark_home = Path(subprocess.run(
            [s.spark_python, "-c", "import os, pyspark; print(os.path.dirname(pyspark.__file__))"],
            capture_output=True, text=True, check=True).stdout.strip())
        print(f"bench: pool run {s.stamp}, {s.reps} reps of {','.join(s.scenarios)}; sclb: {sclb_note}; "
              f"logs in {s.workdir}", flush=True)
        envlog = [f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
                  f"cpus: {os.cpu_count()}; sclb: {sclb_note}; spark: {spark_home}",
                  f"loadavg before: {b.loadavg()}"]
        api, kubeconfig = k8s.start_apiserver(s, s.workdir / "k8s")
        op = Operator(api, spark_home, s.spark_port, s.workdir)
        for scenario in s.scenarios:
            t0 = time.monotonic()
            try:
                results.append(run_scenario(s, api, kubeconfig, scenario, op))
            except b.BenchError as exc:
                errors.append(f"{scenario}: {exc}")
            print(f"  {scenario}: {time.monotonic() - t0:.0f} s", flush=True)
        envlog.append(f"loadavg after: {b.loadavg()}")
        report(s, results, op, errors, envlog)
    except b.BenchError as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        if op:
            op.stop()
        b.PROCS.stop_all()
        k8s.stop_apiserver(s.workdir / "k8s")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
