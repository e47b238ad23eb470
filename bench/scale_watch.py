"""bench/run --scale, part `watch`: how sclb's Kubernetes discovery costs grow with the objects
in its watch, against the real kube-apiserver + etcd (scripts/k8s-apiserver.sh; built once per
machine by `scripts/k8s-apiserver.sh build`).

The bench plays the kubelet, as tests/k8s.rs does: it creates N pods in batches (8 client
threads, keep-alive HTTPS) and PATCHes each one's /status to Running + Ready with its own
127.x.y.z podIP. sclb watches them (`kind = "pods"`, a label selector, no health checks, so a
pod's cost is discovery's own). At each N, in one sclb process that keeps growing:

- RSS per pod: (VmRSS − VmRSS before any pod) ÷ N;
- event → routable: a pod among the N goes NotReady, then (0.2 s later: an isolated event)
  Ready again; the time from the Ready PATCH's answer until `get weight be/<pod>` answers with
  a weight (polled every 2 ms), p50 and max over a few pods;
- CPU per event: M pods flipped NotReady then Ready (2M watch events, as fast as 8 clients
  send them: a stream, which sclb hands over in batches); sclb's CPU until the last one is
  routable again, ÷ 2M;
- `show stat` time (the whole backend listed) and `reload` time with the config unchanged.

Python standard library only.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import ssl
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench as b

SCRIPT = b.REPO / "scripts" / "k8s-apiserver.sh"
NAMESPACE = "sclb-bench"
SELECTOR = ("bench", "watch")
TOKEN = "testtoken"  # the token scripts/k8s-apiserver.sh configures
BACKEND = "be"
CLIENT_THREADS = 8

WATCH_COLUMNS = [
    ("rss_per_pod_b", "RSS per pod (B)", lambda v: f"{v:,.0f}"),
    ("create_per_s", "pods made Ready/s (apiserver)", lambda v: f"{v:.0f}"),
    ("routable_p50_ms", "event → routable p50 ms", lambda v: f"{v:.1f}"),
    ("routable_max_ms", "max ms", lambda v: f"{v:.1f}"),
    ("cpu_us_per_event", "sclb CPU µs per event", lambda v: f"{v:.0f}"),
    ("show_stat_ms", "`show stat` ms", lambda v: f"{v:.1f}"),
    ("reload_ms", "reload (nothing changed) ms", lambda v: f"{v:.1f}"),
]


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind((b.HOST, 0))
        return sk.getsockname()[1]


class Api:
    """Requests to the API server: one keep-alive HTTPS connection per thread."""

    def __init__(self, port: int):
        self.port = port
        self.ctx = ssl._create_unverified_context()  # the bench's own apiserver on loopback
        self.local = threading.local()

    def call(self, method: str, path: str, body: dict | None = None,
             ctype: str = "application/json") -> dict:
        for attempt in range(3):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPSConnection(b.HOST, self.port, context=self.ctx, timeout=60)
                self.local.conn = conn
            try:
                data = json.dumps(body).encode() if body is not None else None
                conn.request(method, path, body=data, headers={
                    "authorization": f"Bearer {TOKEN}", "content-type": ctype,
                    "accept": "application/json"})
                resp = conn.getresponse()
                text = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise b.BenchError(f"kube-apiserver: {method} {path}: {exc}") from exc
                continue
            if resp.status >= 300:
                raise b.BenchError(f"kube-apiserver: {method} {path}: {resp.status} {text[:300]!r}")
            return json.loads(text) if text else {}
        raise AssertionError("unreachable")

    def create_pod(self, name: str) -> None:
        self.call("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", {
            "metadata": {"name": name, "labels": {SELECTOR[0]: SELECTOR[1]}},
            "spec": {"nodeName": "node-1", "containers": [{
                "name": "spark-connect-server", "image": "docker.io/apache/spark:4.0.4",
                "ports": [{"name": "spark-connect", "containerPort": 15002}]}]}})

    def kubelet(self, name: str, ip: str, ready: bool) -> None:
        st = "True" if ready else "False"
        self.call("PATCH", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}/status", {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": st}, {"type": "ContainersReady", "status": st}]}},
            ctype="application/merge-patch+json")


def pod_name(i: int) -> str:
    return f"spark-{i:06d}"


def pod_ip(i: int) -> str:
    return f"127.3.{(i >> 8) & 255}.{i & 255}"


def start_apiserver(s, d: Path) -> tuple[Api, Path]:
    if subprocess.run([SCRIPT, "path"], capture_output=True).returncode != 0:
        raise b.BenchError("the kube-apiserver is not built here: scripts/k8s-apiserver.sh build "
                           "(once per machine, ~10 min; scripts/test does it)")
    d.mkdir(parents=True, exist_ok=True)
    port, etcd, peer = free_port(), free_port(), free_port()
    b.PROCS.run("k8s-apiserver-start", [SCRIPT, "start", d, port, etcd, peer, os.getpid()], timeout=300)
    api = Api(port)
    api.call("POST", "/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
    return api, d / "kubeconfig"


def stop_apiserver(d: Path) -> None:
    subprocess.run([SCRIPT, "stop", d], capture_output=True, timeout=120)


def sclb_config(s, d: Path, kubeconfig: Path) -> tuple[Path, Path]:
    sock = d / "sclb-watch.sock"
    cfg = d / "sclb-watch.toml"
    cfg.write_text(f"""\
[global]
admin = {{ path = "{sock}", mode = "0600", level = "admin" }}
log = {{ level = "warn" }}
[defaults]
timeout = {{ connect = "1s" }}
check = {{ type = "none" }}
[[frontend]]
name = "fe"
bind = ["{b.HOST}:{s.sclb_port}"]
backend = "{BACKEND}"
[[backend]]
name = "{BACKEND}"
[backend.discovery.kubernetes]
kind = "pods"
namespace = "{NAMESPACE}"
selector = "{SELECTOR[0]}={SELECTOR[1]}"
port = 15002
kubeconfig = "{kubeconfig}"
""")
    return cfg, sock


def routable(sock: Path, name: str) -> bool:
    out, _ = b.admin(sock, f"get weight {BACKEND}/{name}", timeout=60)
    return "(initial" in out


def wait_routable(sock: Path, name: str, want: bool, budget: float = 60.0) -> float:
    """Seconds until `name` is (or is no longer) a server of the backend."""
    t0 = time.monotonic()
    while routable(sock, name) != want:
        if time.monotonic() - t0 > budget:
            raise b.BenchError(f"sclb: {name} {'not routable' if want else 'still routable'} "
                               f"after {budget:.0f} s")
        time.sleep(0.002)
    return time.monotonic() - t0


def servers(sock: Path) -> tuple[int, float]:
    out, secs = b.admin(sock, "show stat", timeout=60)
    rows = [ln for ln in out.splitlines() if ln.startswith(f"{BACKEND},")
            and not ln.startswith((f"{BACKEND},BACKEND", f"{BACKEND},FRONTEND"))]
    return len(rows), secs


def run_watch(s, rows: list, ns: list[int], row_type) -> None:
    d = s.workdir / "k8s"
    api, kubeconfig = start_apiserver(s, d)
    proc = None
    try:
        cfg, sock = sclb_config(s, s.workdir, kubeconfig)
        proc = b.PROCS.start("sclb-watch", [s.sclb_bin, "-c", cfg])
        b.wait_listening([s.sclb_port], [proc], timeout=60)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or not proc.alive():
                raise b.BenchError(f"sclb: no admin socket at {sock}:\n{proc.log_tail()}")
            time.sleep(0.01)
        time.sleep(1.0)
        rss0 = b.rss_kb(proc.pid)
        have = 0
        samples = 5 if s.quick else 15
        flips = 50 if s.quick else 200
        rng = random.Random(22)
        with ThreadPoolExecutor(CLIENT_THREADS) as pool:
            for n in ns:
                t0 = time.monotonic()
                new = range(have, n)
                list(pool.map(lambda i: api.create_pod(pod_name(i)), new))
                list(pool.map(lambda i: api.kubelet(pod_name(i), pod_ip(i), True), new))
                made = time.monotonic() - t0
                wait_routable(sock, pod_name(n - 1), True, budget=300)
                count, _ = servers(sock)
                if count != n:
                    # the last pod's event came last on the watch; give stragglers a moment
                    t1 = time.monotonic()
                    while count != n and time.monotonic() - t1 < 60:
                        time.sleep(0.5)
                        count, _ = servers(sock)
                    if count != n:
                        raise b.BenchError(f"sclb lists {count} servers for {n} Ready pods")
                have = n
                time.sleep(1.0)
                fig: dict = {"create_per_s": len(new) / made if made > 0 else 0.0,
                             "rss_per_pod_b": (b.rss_kb(proc.pid) - rss0) * 1024 / n}
                # event → routable, one pod at a time
                lat = []
                for i in rng.sample(range(n), min(samples, n)):
                    api.kubelet(pod_name(i), pod_ip(i), False)
                    wait_routable(sock, pod_name(i), False)
                    # An isolated event: sclb hands events over at most every 50 ms while they
                    # keep coming, so one right after another would measure that window.
                    time.sleep(0.2)
                    api.kubelet(pod_name(i), pod_ip(i), True)
                    lat.append(wait_routable(sock, pod_name(i), True) * 1000)
                fig["routable_p50_ms"] = statistics.median(lat)
                fig["routable_max_ms"] = max(lat)
                # CPU per event: M pods flipped NotReady then Ready
                picked = rng.sample(range(n), min(flips, n))
                cpu0 = b.cpu_seconds(proc.pid)
                list(pool.map(lambda i: api.kubelet(pod_name(i), pod_ip(i), False), picked))
                list(pool.map(lambda i: api.kubelet(pod_name(i), pod_ip(i), True), picked))
                for i in picked:
                    wait_routable(sock, pod_name(i), True)
                fig["cpu_us_per_event"] = (b.cpu_seconds(proc.pid) - cpu0) * 1e6 / (2 * len(picked))
                fig["show_stat_ms"] = statistics.median(servers(sock)[1] for _ in range(3)) * 1000
                reloads = []
                for _ in range(3):
                    out, secs = b.admin(sock, "reload", timeout=60)
                    if "fail" in out.lower():
                        raise b.BenchError(f"sclb: reload answered {out.strip()[:200]!r}")
                    reloads.append(secs * 1000)
                fig["reload_ms"] = statistics.median(reloads)
                if servers(sock)[0] != n:
                    raise b.BenchError("sclb lost discovered servers across a reload")
                rows.append(row_type("watch", "sclb", n, fig))
                print(f"    watch N={n}: " + ", ".join(f"{k} {v:.1f}" for k, v in fig.items()), flush=True)
    finally:
        if proc:
            b.PROCS.stop(proc)
        stop_apiserver(d)
