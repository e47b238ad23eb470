#!/usr/bin/python3
"""Driver of bench/run: sclb vs HAProxy vs direct, on loopback backends.

Started by bench/run (which installs the tools and compiles benchtool.c); see
bench/README.md. Python 3.11 standard library only.

Shape of a run: for each scenario, start the loopback backends (the same kind
of server on all three backend ports, because source affinity sends all of
127.0.0.1 to one of them), then for each repetition run every variant in turn
(direct, haproxy[, haproxy-splice-auto, haproxy-splice-force], sclb), each one
with a freshly started proxy. Figures of a proxy are divided by the direct
figure of the same repetition; the table shows medians and [min-max].
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as dt
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TOOL = BENCH / ".build" / "benchtool"
HOST = "127.0.0.1"
DEFAULT_SCLB_BIN = REPO / "target" / "release" / "sclb"
# the reference addresses in bench/haproxy.cfg and bench/sclb.toml
REF_HAPROXY_PORT, REF_SCLB_PORT, REF_BACKEND_PORTS = 18080, 18081, (19001, 19002, 19003)
os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


class BenchError(Exception):
    """A tool failed, a proxy did not forward, or the harness is misconfigured."""


class Broken(BenchError):
    """A server or proxy did not start or does not forward: no point retrying it."""


# ---------------------------------------------------------------- settings

@dataclass
class Settings:
    quick: bool
    reps: int
    scenarios: list[str]
    variants: list[str]
    bulk_s: float
    tls_bulk_bytes: int
    connrate_s: float
    rps_s: float
    rps_warmup_s: float
    pingpong_s: float
    grpc_s: float
    idle_conns: int
    spark: bool
    build: bool
    sclb_bin: Path
    haproxy_port: int
    sclb_port: int
    backend_ports: tuple[int, int, int]
    spark_servers: list[str]
    spark_python: Path
    spark_iterations: int
    outdir: Path
    workdir: Path = Path()
    stamp: str = ""


def parse_args(argv: list[str]) -> Settings:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke run for CI: 1 rep, ~1 s per measurement, 500 idle conns, no verdicts")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    ap.add_argument("--scenarios", default="bulk,connrate,latency,idle,gateway,tls",
                    help="comma list out of bulk,connrate,latency,idle,gateway,tls (default: all)")
    ap.add_argument("--variants", default="direct,haproxy,haproxy-splice-auto,haproxy-splice-force,sclb,"
                                          "haproxy-log,haproxy-log-syslog,sclb-log,haproxy-http,sclb-gateway,"
                                          "sclb-gateway-pg,sclb-gateway-jwt,haproxy-tls,sclb-tls",
                    help="comma list of variants to run (direct is always run when a ratio needs it)")
    ap.add_argument("--seconds", type=float, help="override the length of every timed measurement")
    ap.add_argument("--idle-conns", type=int, help="idle connections (default 9500, --quick 500)")
    ap.add_argument("--spark", action="store_true",
                    help="also run the real-Spark scenario (needs a Spark Connect server, see README)")
    ap.add_argument("--no-build", action="store_true",
                    help="never run cargo build; a missing sclb binary is reported as 'not built'")
    ap.add_argument("--out", default=str(BENCH / "results"), help="results directory")
    a = ap.parse_args(argv)

    secs = (lambda full, quick: a.seconds or (quick if a.quick else full))
    scenarios = [x for x in a.scenarios.split(",") if x]
    unknown = set(scenarios) - {"bulk", "connrate", "latency", "idle", "gateway", "tls"}
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if a.spark:
        scenarios.append("spark")
    variants = [x for x in a.variants.split(",") if x]
    if "direct" not in variants:
        variants.insert(0, "direct")
    unknown = set(variants) - set(VARIANT_KINDS)
    if unknown:
        ap.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if a.idle_conns is not None and not 4 <= a.idle_conns <= 9900:
        ap.error("--idle-conns must be within 4..9900 (maxconn 9950, RLIMIT_NOFILE 20000)")
    if a.reps is not None and not 1 <= a.reps <= 20:
        ap.error("--reps must be within 1..20")
    if a.seconds is not None and not 1 <= a.seconds <= 120:
        ap.error("--seconds must be within 1..120")
    ports = [int(p) for p in os.environ.get("BENCH_BACKEND_PORTS", "19001,19002,19003").split(",")]
    if len(ports) != 3:
        ap.error("BENCH_BACKEND_PORTS needs exactly three ports")
    return Settings(
        quick=a.quick,
        reps=a.reps or (1 if a.quick else 3),
        scenarios=scenarios,
        variants=variants,
        bulk_s=secs(5, 1), tls_bulk_bytes=(256 if a.quick else 2048) << 20, connrate_s=secs(5, 1), rps_s=secs(5, 1),
        rps_warmup_s=0.5 if a.quick else 1.0, pingpong_s=secs(5, 1), grpc_s=secs(5, 1),
        idle_conns=a.idle_conns or (500 if a.quick else 9500),
        spark=a.spark,
        build=not a.no_build,
        sclb_bin=Path(os.environ.get("SCLB_BIN", str(DEFAULT_SCLB_BIN))).absolute(),
        haproxy_port=int(os.environ.get("BENCH_HAPROXY_PORT", REF_HAPROXY_PORT)),
        sclb_port=int(os.environ.get("BENCH_SCLB_PORT", REF_SCLB_PORT)),
        backend_ports=tuple(ports),  # type: ignore[arg-type]
        spark_servers=os.environ.get("SPARK_CONNECT_SERVERS", "127.0.0.1:15002").split(","),
        spark_python=Path(os.environ.get("SPARK_PYTHON", str(REPO / ".venv" / "bin" / "python"))),
        spark_iterations=int(os.environ.get("SPARK_ITERATIONS", "2" if a.quick else "5")),
        outdir=Path(a.out),
    )


# ------------------------------------------------------ process management

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the driver dies (even by SIGKILL)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _proc_starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name, self.popen, self.log = name, popen, log
        self.pid = popen.pid
        self.extra: list[tuple[int, str]] = []  # (pid, starttime) of forked workers
        self.companions: list[Proc] = []  # stopped with it (a proxy's syslog sink)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def adopt_children(self) -> None:
        """Remember forked workers (nginx) so they can be killed by PID too."""
        for pid in descendants(self.pid):
            st = _proc_starttime(pid)
            if st:
                self.extra.append((pid, st))
                PROCS.record(pid, f"{self.name}-child")


class Procs:
    """Every process the harness starts; stop_all() kills them all by PID."""

    def __init__(self) -> None:
        self.live: list[Proc] = []
        self.logdir = Path("/tmp")

    def record(self, pid: int, name: str) -> None:
        """Append to <workdir>/pids, so a later run can kill what a SIGKILLed run left."""
        with open(self.logdir / "pids", "a") as fh:
            fh.write(f"{pid} {_proc_starttime(pid)} {name}\n")

    @staticmethod
    def reap_stale(workdirs: list[Path]) -> None:
        """Kill survivors of earlier runs (only PIDs they recorded, same start time)."""
        for pidfile in (w / "pids" for w in workdirs):
            if not pidfile.exists():
                continue
            for line in pidfile.read_text().splitlines():
                pid, st, name = line.split(" ", 2)
                if _proc_starttime(int(pid)) == st:
                    print(f"bench: killing {name} (pid {pid}) left over by {pidfile.parent.name}", file=sys.stderr)
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            pidfile.unlink()

    def start(self, name: str, argv: list[str], env: dict | None = None,
              stdin=subprocess.DEVNULL, stdout=None) -> Proc:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as fh:
            fh.write(f"\n### {time.strftime('%H:%M:%S')} {' '.join(map(str, argv))}\n".encode())
            fh.flush()
            popen = subprocess.Popen([str(a) for a in argv], env=env, stdin=stdin,
                                     stdout=stdout if stdout is not None else fh, stderr=fh,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        proc = Proc(name, popen, log)
        self.live.append(proc)
        self.record(proc.pid, name)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        if proc.alive():
            try:
                proc.popen.terminate()
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        for pid, st in proc.extra:
            if _proc_starttime(pid) == st:  # still the same process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for stream in (proc.popen.stdin, proc.popen.stdout):
            if stream:
                stream.close()
        if proc in self.live:
            self.live.remove(proc)
        for other in proc.companions:
            self.stop(other, timeout)

    def stop_all(self) -> None:
        for proc in reversed(list(self.live)):
            try:
                self.stop(proc, timeout=3.0)
            except Exception as exc:  # keep going: every process must be stopped
                print(f"bench: could not stop {proc.name} (pid {proc.pid}): {exc}", file=sys.stderr)

    def run(self, name: str, argv: list[str], timeout: float, env: dict | None = None) -> str:
        """Run a client tool to completion (bounded by timeout); return its stdout."""
        out = self.logdir / f"{name}.out"
        with open(out, "wb") as fh:
            proc = self.start(name, argv, env=env, stdout=fh)
            try:
                rc = proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{name} did not finish within {timeout:.0f} s") from None
            finally:
                self.stop(proc)
        text = out.read_text(errors="replace")
        if rc != 0:
            raise BenchError(f"{name} exited with {rc}: {text[-400:]} {proc.log_tail(5)}")
        return text


PROCS = Procs()


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)


# ------------------------------------------------------------ /proc probes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime (all threads, reaped children included) of pid and its live descendants."""
    total = 0.0
    for p in [pid] + descendants(pid):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15]) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_kb(pid: int) -> int:
    total = 0
    for p in [pid] + descendants(pid):
        try:
            m = re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text(), re.M)
            total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def listening_ports() -> set[int]:
    """Every TCP port in LISTEN state, from one read of /proc/net/tcp{,6} (a thousand ports are
    checked at once: bench/scale.py)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A":
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def listening(port: int) -> bool:
    return port in listening_ports()


def wait_listening(ports: list[int], procs: list[Proc], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(listening(p) for p in ports):
        for proc in procs:
            if not proc.alive():
                raise Broken(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise Broken(f"ports {ports} not listening after {timeout:.0f} s")
        time.sleep(0.05)


def cpu_times() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ---------------------------------------------------------------- backends

@dataclass
class Backend:
    kind: str                 # iperf3 | http1 | h2c | echo | echo1 | grpc | spark
    addrs: list[str]          # the three server addresses (host:port)
    procs: list[Proc] = field(default_factory=list)


def start_backend(s: Settings, kind: str) -> Backend:
    ports = list(s.backend_ports)
    addrs = [f"{HOST}:{p}" for p in ports]
    if kind == "spark":
        servers = (s.spark_servers * 3)[:3]
        return Backend(kind, servers)
    if kind == "iperf3":
        procs = [PROCS.start(f"backend-iperf3-{p}", ["iperf3", "-s", "-B", HOST, "-p", p]) for p in ports]
    elif kind in ("echo", "echo1"):  # echo1: closes after its first echo (bench/scale.py)
        procs = [PROCS.start(f"backend-{kind}", [TOOL, kind, 3600, *ports])]
    elif kind == "grpc":
        procs = [PROCS.start("backend-grpc", [TOOL, "grpc", 3600, *ports])]
    elif kind in ("http1", "h2c"):
        procs = [start_nginx(s, ports, h2=(kind == "h2c"))]
    else:
        raise ValueError(kind)
    be = Backend(kind, addrs, procs)
    try:
        wait_listening(ports, procs)
    except BenchError:
        stop_backend(be)
        raise
    for proc in procs:
        proc.adopt_children()
    return be


def start_nginx(s: Settings, ports: list[int], h2: bool) -> Proc:
    wd = s.workdir / ("nginx-h2c" if h2 else "nginx-http1")
    (wd / "nginx-tmp").mkdir(parents=True, exist_ok=True)
    listen = "\n".join(f"        listen {HOST}:{p} backlog=4096{' http2' if h2 else ''};" for p in ports)
    conf = string.Template((BENCH / "nginx.conf").read_text()).substitute(workdir=wd, listen=listen)
    (wd / "nginx.conf").write_text(conf)
    # /big for the TLS download: a sparse file (no disk used), read from the page cache.
    with open(wd / "big.bin", "wb") as fh:
        fh.truncate(s.tls_bulk_bytes)
    return PROCS.start(f"backend-nginx-{'h2c' if h2 else 'http1'}",
                       ["nginx", "-p", wd, "-c", wd / "nginx.conf", "-e", wd / "nginx-startup.log"])


def stop_backend(be: Backend) -> None:
    for proc in be.procs:
        PROCS.stop(proc)


# ----------------------------------------------------------------- proxies

VARIANT_KINDS = {
    "direct": ("direct", ""),
    "haproxy": ("haproxy", ""),
    "haproxy-splice-auto": ("haproxy", "auto"),
    "haproxy-splice-force": ("haproxy", "force"),
    "sclb": ("sclb", ""),
    "haproxy-log": ("haproxy", ""),          # + `log stdout format raw local0`, `option tcplog`
    "haproxy-log-syslog": ("haproxy", ""),   # + `log <unix socket> local0` (bench/syslog_sink.py)
    "sclb-log": ("sclb", ""),                # bench/sclb.toml with log level "info"
    "haproxy-http": ("haproxy-http", ""),   # L7: mode http, h2 on both sides (bench/haproxy-http.cfg)
    "sclb-gateway": ("sclb-gateway", ""),   # L7: mode = "grpc" (bench/sclb-gateway.toml)
    # the same, its sessions in a PostgreSQL store (initdb in the workdir, a Unix socket)
    "sclb-gateway-pg": ("sclb-gateway", ""),
    # the same, every call carrying a bearer token checked against an RS256 key (auth.type "jwt")
    "sclb-gateway-jwt": ("sclb-gateway", ""),
    # L4 with TLS terminated on the frontend (an ECDSA P-256 certificate), cleartext to the servers
    "haproxy-tls": ("haproxy", ""),          # bind ... ssl crt <cert+key PEM>
    "sclb-tls": ("sclb", ""),                # tls = { cert, key } on the frontend
}
PROXY_CONFIGS = {  # kind -> (config template, reference frontend port)
    "haproxy": ("haproxy.cfg", REF_HAPROXY_PORT),
    "haproxy-http": ("haproxy-http.cfg", REF_HAPROXY_PORT),
    "sclb": ("sclb.toml", REF_SCLB_PORT),
    "sclb-gateway": ("sclb-gateway.toml", REF_SCLB_PORT),
}
SCLB_VARIANTS = ("sclb", "sclb-log", "sclb-gateway", "sclb-gateway-pg", "sclb-gateway-jwt", "sclb-tls")
TLS_VARIANTS = ("haproxy-tls", "sclb-tls")
# Extra request headers a variant's clients send (the jwt variant's bearer token).
VARIANT_HEADERS: dict[str, list[str]] = {}
PG_SOCKETS: dict[str, Path] = {}  # variant -> the socket directory of its PostgreSQL
# Variants with an access log line per connection (the others log nothing per connection):
# HAProxy writes each line itself (stdout: one write(2) per line; syslog: one sendto(2) per
# line to a local datagram socket); sclb formats it into its thread's buffer and a writer
# thread writes batches (src/access_log.rs).
LOGGED = {"haproxy-log": "stdout", "haproxy-log-syslog": "syslog", "sclb-log": "info"}


def with_log(text: str, kind: str, target: str) -> str:
    """A rendered proxy config with its per-connection access log turned on."""
    if kind == "sclb":
        return text.replace('log = { level = "warn" }', 'log = { level = "info" }', 1)
    line = "log stdout format raw local0" if target == "stdout" else f"log {target} local0"
    text = re.sub(r"^global\n", f"global\n    {line}\n", text, count=1, flags=re.M)
    return re.sub(r"^defaults\n", "defaults\n    log global\n    option tcplog\n", text, count=1, flags=re.M)


def render(template: Path, frontend_port: int, frontend_ref: int, be: Backend) -> str:
    """Rewrite the reference addresses of a proxy config to the ones in use."""
    mapping = {f"{HOST}:{frontend_ref}": f"{HOST}:{frontend_port}"}
    mapping.update({f"{HOST}:{ref}": addr for ref, addr in zip(REF_BACKEND_PORTS, be.addrs)})
    text = template.read_text()
    for ref in mapping:
        if ref not in text:
            raise BenchError(f"{template} no longer mentions {ref}; cannot render it")
    return re.sub(r"127\.0\.0\.1:\d+\b", lambda m: mapping.get(m.group(0), m.group(0)), text)


def proxy_env(splice: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LB_SPLICE"}
    if splice:
        env["LB_SPLICE"] = splice
    return env


def tls_material(s: Settings) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for both TLS variants: (cert, key, cert+key PEM
    for HAProxy's `crt`). Made once per run with the openssl CLI."""
    d = s.workdir / "tls"
    cert, key, both = d / "cert.pem", d / "key.pem", d / "haproxy.pem"
    if not both.exists():
        d.mkdir(parents=True, exist_ok=True)
        PROCS.run("openssl-req", ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                                  "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                                  "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
                                  "-keyout", key, "-out", cert], timeout=60)
        both.write_text(cert.read_text() + key.read_text())
    return cert, key, both


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_material(s: Settings) -> tuple[Path, str]:
    """An RSA-2048 public key for sclb's `auth.keys` and an RS256 token signed with its private
    key (openssl CLI: no Python crypto library needed), valid for a day."""
    d = s.workdir / "jwt"
    d.mkdir(parents=True, exist_ok=True)
    key, pub = d / "jwt.key", d / "jwt.pub"
    if not pub.exists():
        PROCS.run("openssl-genpkey", ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                                      "rsa_keygen_bits:2048", "-out", key], timeout=60)
        PROCS.run("openssl-pkey", ["openssl", "pkey", "-in", key, "-pubout", "-out", pub], timeout=60)
    now = int(time.time())
    head = b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    claims = b64url(json.dumps({"sub": "bench", "team": "bench", "environment": "bench",
                                "iat": now, "exp": now + 86400}).encode())
    signing_input = f"{head}.{claims}".encode()
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key)], input=signing_input,
                         capture_output=True, timeout=60, check=True).stdout
    return pub, f"{head}.{claims}.{b64url(sig)}"


def with_tls(text: str, kind: str, s: Settings) -> str:
    """A rendered L4 config with TLS terminated on its frontend."""
    cert, key, both = tls_material(s)
    if kind == "haproxy":
        out = re.sub(r"^(\s*bind \S+)", rf"\1 ssl crt {both}", text, count=1, flags=re.M)
    else:
        out = re.sub(r"^(bind = \[[^\]]*\])$", rf'\1\ntls = {{ cert = "{cert}", key = "{key}" }}', text,
                     count=1, flags=re.M)
    if out == text:
        raise BenchError(f"cannot add TLS to the {kind} config: its bind line moved")
    return out


def with_jwt(text: str, s: Settings, variant: str) -> str:
    """A rendered gateway config whose frontend checks an RS256 bearer token on every call."""
    pub, token = jwt_material(s)
    VARIANT_HEADERS[variant] = ["-H", f"authorization: Bearer {token}"]
    out = re.sub(r'^(mode = "grpc")$', rf'\1\nauth = {{ type = "jwt", keys = "{pub}" }}', text,
                 count=1, flags=re.M)
    if out == text:
        raise BenchError("cannot add auth to the gateway config: its mode line moved")
    return out


def start_proxy(s: Settings, variant: str, be: Backend) -> tuple[Proc | None, int, str]:
    """Start the proxy of a variant; return (proc, port the client uses, client host)."""
    kind, splice = VARIANT_KINDS[variant]
    if kind == "direct":
        host, port = be.addrs[0].rsplit(":", 1)
        return None, int(port), host
    template, ref_port = PROXY_CONFIGS[kind]
    text = render(BENCH / template, s.haproxy_port if kind.startswith("haproxy") else s.sclb_port,
                  ref_port, be)
    sink = None
    if LOGGED.get(variant) == "syslog":
        sock = s.workdir / "syslog.sock"
        sink = PROCS.start(f"{variant}-sink", ["/usr/bin/python3", BENCH / "syslog_sink.py", sock,
                                                s.workdir / f"{variant}-syslog.log"])
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline and sink.alive():
            time.sleep(0.02)
        if not sock.exists():
            PROCS.stop(sink)
            raise Broken(f"the syslog sink did not start:\n{sink.log_tail()}")
        text = with_log(text, kind, str(sock))
    elif variant in LOGGED:
        text = with_log(text, kind, LOGGED[variant])
    if variant in TLS_VARIANTS:
        text = with_tls(text, kind, s)
    if variant == "sclb-gateway-jwt":
        text = with_jwt(text, s, variant)
    if variant == "sclb-gateway-pg":
        pg, sockdir = start_postgres(s, variant)
        PG_SOCKETS[variant] = sockdir
        text = text.replace("[global]\n", '[global]\nstore = { kind = "postgres", url = '
                            f'"host={sockdir} port=5432 user=sclb dbname=postgres" }}\n', 1)
    if kind.startswith("haproxy"):
        cfg = s.workdir / f"{variant}-{be.kind}.cfg"
        cfg.write_text(text)
        proc = PROCS.start(variant, ["haproxy", "-db", "-f", cfg], env=proxy_env(splice))
        port = s.haproxy_port
    else:
        cfg = s.workdir / f"{variant}-{be.kind}.toml"
        cfg.write_text(text)
        proc = PROCS.start(variant, [s.sclb_bin, "-c", cfg], env=proxy_env(""))
        port = s.sclb_port
    if sink:
        proc.companions.append(sink)
    if variant in PG_SOCKETS:
        proc.companions.append(pg)
    try:
        wait_listening([port], [proc])
    except BenchError:
        PROCS.stop(proc)
        raise
    return proc, port, HOST


def _pg_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not dirs:
        raise Broken("PostgreSQL is not installed (apt-get install postgresql)")
    return dirs[-1].parent


def _as_db_user(argv: list) -> list:
    """PostgreSQL refuses to run as root: as root, run it as nobody."""
    if os.geteuid() == 0:
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
    return argv


def start_postgres(s: Settings, variant: str) -> tuple[Proc, Path]:
    """A fresh PostgreSQL for a store variant: initdb in a new directory (world-readable, so
    that nobody can use it), listening on a Unix socket there only. Returns (proc, socket dir)."""
    base = s.workdir / f"{variant}-pg"
    shutil.rmtree(base, ignore_errors=True)
    (base / "data").mkdir(parents=True)
    if os.geteuid() == 0:
        import pwd
        nobody = pwd.getpwnam("nobody")
        for p in (base, base / "data"):
            os.chmod(p, 0o755 if p == base else 0o700)
            os.chown(p, nobody.pw_uid, nobody.pw_gid)
    bindir = _pg_bindir()
    r = subprocess.run(_as_db_user([bindir / "initdb", "-D", base / "data", "-U", "sclb",
                                    "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise Broken(f"initdb failed: {r.stderr[-300:]}")
    proc = PROCS.start(f"{variant}-postgres", _as_db_user(
        [bindir / "postgres", "-D", base / "data", "-c", "listen_addresses=", "-c", "fsync=off",
         "-p", "5432", "-k", base]))
    deadline = time.monotonic() + 60
    while subprocess.run([bindir / "pg_isready", "-h", base, "-p", "5432", "-q"]).returncode:
        if not proc.alive() or time.monotonic() > deadline:
            PROCS.stop(proc)
            raise Broken(f"postgres did not start:\n{proc.log_tail()}")
        time.sleep(0.1)
    return proc, base


def store_statements(sockdir: Path) -> int:
    """Transactions committed in the store's database so far (sclb's statements run one per
    transaction or one batch per transaction; this query itself adds one)."""
    out = subprocess.run(["psql", "-h", sockdir, "-p", "5432", "-U", "sclb", "-d", "postgres",
                          "-Atc", "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise BenchError(f"psql: {out.stderr[-200:]}")
    return int(out.stdout.strip())


def check_haproxy_config(s: Settings) -> None:
    be = Backend("check", [f"{HOST}:{p}" for p in s.backend_ports])
    for template, splices in (("haproxy.cfg", ("", "auto", "force")), ("haproxy-http.cfg", ("",))):
        cfg = s.workdir / f"check-{template}"
        text = render(BENCH / template, s.haproxy_port, REF_HAPROXY_PORT, be)
        if template == "haproxy.cfg":  # with the access log too (haproxy-log)
            text = with_log(text, "haproxy", "stdout")
        cfg.write_text(text)
        for splice in splices:
            r = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], env=proxy_env(splice),
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise BenchError(f"haproxy -c {template} failed (LB_SPLICE={splice!r}): {r.stdout}{r.stderr}")


def prepare_sclb(s: Settings) -> tuple[bool, str]:
    """(usable, note). Builds the default binary with cargo if it is missing."""
    b, why = s.sclb_bin, f"{s.sclb_bin} missing"
    if not (b.is_file() and os.access(b, os.X_OK)) and s.build and b == DEFAULT_SCLB_BIN \
            and shutil.which("cargo") and (REPO / "Cargo.toml").exists():
        log = s.workdir / "cargo-build.log"
        print(f"bench: {b} missing; running cargo build --release (log: {log})", flush=True)
        with open(log, "wb") as fh:
            proc = PROCS.start("cargo-build", ["cargo", "build", "--release",
                                               "--manifest-path", REPO / "Cargo.toml"], stdout=fh)
            try:
                rc = proc.popen.wait(3600)
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:
                PROCS.stop(proc)
        if rc != 0:
            why = f"cargo build --release failed ({rc}), see {log}"
    if not (b.is_file() and os.access(b, os.X_OK)):
        return False, f"not built ({why})"
    mtime = dt.datetime.fromtimestamp(b.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return True, f"{b} (built {mtime})"


# ------------------------------------------------------------- admin socket

def admin(path: Path, line: str, timeout: float = 300.0) -> tuple[str, float]:
    """One command on a HAProxy-style admin socket (non-interactive: the answer ends at EOF);
    returns (answer, seconds from sending to EOF)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        t0 = time.monotonic()
        s.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace"), time.monotonic() - t0


# ----------------------------------------------------- forwarding probes

def _exchange(host: str, port: int, payload: bytes, want: Callable[[bytes], bool]) -> bool:
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(payload)
        data = b""
        while not want(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return want(data)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe_tls(host: str, port: int, kind: str) -> bool:
    """One request through a TLS frontend (certificate not verified: it is the bench's own)."""
    url = f"https://{host}:{port}/"
    r = subprocess.run(["curl", "-sk", "--no-alpn", "--http1.1", "--max-time", "5", url],
                       capture_output=True, timeout=10)
    return kind == "http1" and r.returncode == 0 and r.stdout == b"ok\n"


def probe_once(kind: str, host: str, port: int, variant: str = "") -> bool:
    if variant in TLS_VARIANTS:
        return probe_tls(host, port, kind)
    if kind == "iperf3":
        try:
            iperf3_json(PROCS.run("probe-iperf3", ["iperf3", "-c", host, "-p", port, "-n", "256K", "-J"],
                                  timeout=15))
            return True
        except BenchError:
            return False
    if kind == "echo":
        msg = b"sclb-bench-probe\n"
        return _exchange(host, port, msg, lambda d: d == msg)
    if kind == "http1":
        req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        return _exchange(host, port, req, lambda d: d.startswith(b"HTTP/1.1 200") and d.endswith(b"\r\n\r\nok\n"))
    if kind == "grpc":  # one real unary RPC, answered with grpc-status 0 in the trailers
        return grpc_call(host, port, GRPC_METHOD, GRPC_BODY, headers=VARIANT_HEADERS.get(variant, [])) == "0"
    if kind in ("h2c", "spark"):  # an HTTP/2 (gRPC) server answers the preface with SETTINGS
        return _exchange(host, port, H2_PREFACE, lambda d: len(d) >= 9 and d[3] == 4)
    raise ValueError(kind)


SPARK_SERVICE = "/spark.connect.SparkConnectService/"
# A real PySpark 4.0.5 request (gRPC-framed), captured by tests/fixtures/spark/rpcs/capture.py:
# spark.conf.get("spark.sql.shuffle.partitions") of session 5c1b0000-...-000000000011.
GRPC_METHOD, GRPC_BODY = "Config", REPO / "tests" / "fixtures" / "spark" / "rpcs" / "02_Config_get.bin"
GRPC_HEADERS = ["-H", "content-type: application/grpc", "-H", "te: trailers"]


def grpc_call(host: str, port: int, method: str, body: Path, path: str | None = None,
              headers: list[str] | None = None) -> str | None:
    """One unary gRPC call with nghttp; returns the grpc-status trailer (None if there is none)."""
    url = f"http://{host}:{port}{path or SPARK_SERVICE + method}"
    r = subprocess.run(["nghttp", "-v", "-n", "-t", "5", "-d", str(body), *GRPC_HEADERS, *(headers or []), url],
                       capture_output=True, text=True, timeout=10)
    m = re.findall(r"recv \(stream_id=\d+\) grpc-status: (\d+)", r.stdout)
    return m[-1] if m else None


def probe(kind: str, host: str, port: int, what: str, timeout: float = 15.0) -> None:
    """Retry until one request goes through end to end, else the variant does not forward."""
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            if probe_once(kind, host, port, what):
                return
            last = "unexpected answer"
        except (OSError, subprocess.TimeoutExpired) as exc:
            last = str(exc)
        time.sleep(0.3)
    raise Broken(f"{what} does not forward to the {kind} backend within {timeout:.0f} s ({last})")


# ------------------------------------------------------------ measurements

@dataclass
class Ctx:
    s: Settings
    variant: str
    rep: int
    host: str
    port: int
    proxy: Proc | None

    def name(self, what: str) -> str:
        return f"{what}-{self.variant}-rep{self.rep + 1}"

    def proxy_cpu(self) -> float:
        return cpu_seconds(self.proxy.pid) if self.proxy else 0.0

    def check_proxy(self) -> None:
        if self.proxy and not self.proxy.alive():
            raise Broken(f"{self.variant} died:\n{self.proxy.log_tail()}")


def timed(ctx: Ctx, fn: Callable[[], str]) -> tuple[str, float, float]:
    """Run fn; return (its output, wall seconds, proxy CPU seconds used meanwhile)."""
    cpu0, t0 = ctx.proxy_cpu(), time.monotonic()
    out = fn()
    wall, cpu = time.monotonic() - t0, ctx.proxy_cpu() - cpu0
    ctx.check_proxy()
    return out, wall, cpu


def iperf3_json(out: str) -> dict:
    """iperf3 -J exits 0 even when the test failed; the error is in the JSON."""
    try:
        j = json.loads(out)
    except ValueError:
        raise BenchError(f"iperf3 printed no JSON: {out[-300:]}") from None
    if j.get("error") or "sum_received" not in j.get("end", {}):
        raise BenchError(f"iperf3: {j.get('error', 'no result')}")
    return j


def measure_bulk(ctx: Ctx, streams: int) -> dict:
    secs = max(1, round(ctx.s.bulk_s))
    argv = ["iperf3", "-c", ctx.host, "-p", ctx.port, "-t", secs, "-P", streams, "-J"]
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name(f"iperf3-P{streams}"), argv, timeout=secs + 30))
    end = iperf3_json(out)["end"]
    recv, util = end["sum_received"], end["cpu_utilization_percent"]
    gb = recv["bytes"] / 1e9
    if gb <= 0:
        raise BenchError(f"iperf3 moved no data through {ctx.variant}")
    m = {"gbps": recv["bits_per_second"] / 1e9,
         "endpoints_cpu_s_per_gb": (util["host_total"] + util["remote_total"]) / 100 * recv["seconds"] / gb}
    if ctx.proxy:
        m.update(proxy_cpu_pct=100 * cpu / wall, proxy_cpu_s_per_gb=cpu / gb)
    return m


def measure_connrate(ctx: Ctx, scheme: str = "http", what: str = "wrk") -> dict:
    """wrk with `Connection: close`: a new connection per request."""
    secs = max(1, round(ctx.s.connrate_s))
    argv = ["wrk", "-t", 2, "-c", 32, "-d", f"{secs}s", "--timeout", "5s",
            "-H", "Connection: close", f"{scheme}://{ctx.host}:{ctx.port}/"]
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name(what), argv, timeout=secs + 30))
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not done or not rate or int(done.group(1)) == 0:
        raise BenchError(f"wrk completed no request through {ctx.variant}: {out[-300:]}")
    errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    m = {"conns_per_s": float(rate.group(1)), "errors": float(errors)}
    if ctx.proxy:
        m.update(proxy_cpu_pct=100 * cpu / wall, proxy_cpu_us_per_conn=cpu * 1e6 / int(done.group(1)))
    return m


def measure_tls_handshakes(ctx: Ctx) -> dict:
    """wrk over HTTPS with `Connection: close` through a TLS frontend: one full TLS handshake
    per request (wrk keeps no session for resumption); direct is the same over plain HTTP."""
    return measure_connrate(ctx, "https" if ctx.variant in TLS_VARIANTS else "http", "wrk-tls")


def measure_tls_bulk(ctx: Ctx) -> dict:
    """One HTTPS download of a large file (nginx sendfile behind the proxy) with curl: the proxy
    encrypts every byte; direct is the same over plain HTTP."""
    scheme = "https" if ctx.variant in TLS_VARIANTS else "http"
    url = f"{scheme}://{ctx.host}:{ctx.port}/big"
    argv = ["curl", "-sSk", "--no-alpn", "--http1.1", "--max-time", 120, "-o", "/dev/null",
            "-w", "%{size_download} %{time_total}", url]
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name("curl-tls-bulk"), argv, timeout=150))
    m = re.search(r"(\d+) ([\d.]+)\s*$", out)
    if not m or int(m.group(1)) != ctx.s.tls_bulk_bytes:
        raise BenchError(f"curl did not download the whole file through {ctx.variant}: {out[-300:]}")
    size, secs = int(m.group(1)), float(m.group(2))
    r = {"gbps": size * 8 / secs / 1e9}
    if ctx.proxy:
        r.update(proxy_cpu_pct=100 * cpu / wall, proxy_cpu_s_per_gb=cpu / (size / 1e9))
    return r


def percentiles(values_us: list[float]) -> dict:
    v = sorted(values_us)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]  # nearest rank
    return {"p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "p999_us": pct(99.9)}


def measure_rps(ctx: Ctx) -> dict:
    """h2load, 4 h2c connections x 500 req/s = 2000 req/s; the first rps_warmup_s are dropped."""
    s, log = ctx.s, PROCS.logdir / f"{ctx.name('h2load')}.requests.tsv"
    argv = ["h2load", "-c", 4, "-m", 1, "--rps", 500, "-D", f"{round((s.rps_s + s.rps_warmup_s) * 1000)}ms",
            f"--log-file={log}", f"http://{ctx.host}:{ctx.port}/"]
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name("h2load"), argv, timeout=s.rps_s + 30))
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not rows or not failed or sum(map(int, failed.groups())) > 0.01 * len(rows):
        raise BenchError(f"h2load failed through {ctx.variant}: {out[-300:]}")
    t0 = min(int(r[0]) for r in rows) + s.rps_warmup_s * 1e6
    kept = [r for r in rows if int(r[0]) >= t0 and r[1] == "200"]
    span = (max(int(r[0]) for r in kept) - t0) / 1e6
    m = {"rps": len(kept) / span, **percentiles([float(r[2]) for r in kept])}
    if ctx.proxy:
        m.update(proxy_cpu_pct=100 * cpu / wall, proxy_rss_kb=rss_kb(ctx.proxy.pid),
                 proxy_cpu_us_per_req=cpu * 1e6 / len(rows))
    return m


def measure_pingpong(ctx: Ctx) -> dict:
    """benchtool pingpong: one connection, one 64-byte message in flight, echo backend."""
    secs = ctx.s.pingpong_s
    argv = [TOOL, "pingpong", ctx.host, ctx.port, f"{secs:g}", 64, 2_000_000, 500]
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name("pingpong"), argv, timeout=secs + 30))
    r = json.loads(out)
    m = {k: r[k] for k in ("rps", "p50_us", "p90_us", "p99_us", "p999_us")}
    if ctx.proxy:
        m.update(proxy_cpu_pct=100 * cpu / wall, proxy_rss_kb=rss_kb(ctx.proxy.pid),
                 proxy_cpu_us_per_req=cpu * 1e6 / (r["count"] + 500))
    return m


def measure_grpc(ctx: Ctx, mode: str, secs: float | None = None) -> dict:
    """Unary gRPC calls (a captured PySpark Config request to /spark.connect.SparkConnectService/Config)
    with h2load and its per-request log. mode "pingpong": one h2c connection, one call in flight
    (closed loop); "rps1000": 4 connections x 250 calls/s, open loop. The first warm-up
    seconds are dropped. h2load counts HTTP statuses only; the probe checked grpc-status 0."""
    s = ctx.s
    secs = secs or s.grpc_s
    log = PROCS.logdir / f"{ctx.name('h2load-grpc-' + mode)}.requests.tsv"
    load = ["-c", 1, "-m", 1] if mode == "pingpong" else ["-c", 4, "-m", 1, "--rps", 250]
    argv = ["h2load", *load, "-D", f"{round((secs + s.rps_warmup_s) * 1000)}ms", "-d", GRPC_BODY,
            *GRPC_HEADERS, *VARIANT_HEADERS.get(ctx.variant, []), f"--log-file={log}", f"http://{ctx.host}:{ctx.port}{SPARK_SERVICE}{GRPC_METHOD}"]
    pg = PG_SOCKETS.get(ctx.variant)
    stmts = store_statements(pg) if pg else 0
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name(f"h2load-grpc-{mode}"), argv, timeout=secs + 30))
    if pg:
        # One session (every call carries the same session id): the store's cost per
        # session-hour of a busy session, the psql look itself taken out.
        stmts = store_statements(pg) - stmts - 1
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not rows or not failed or sum(map(int, failed.groups())) > 0.01 * len(rows):
        raise BenchError(f"h2load (gRPC {mode}) failed through {ctx.variant}: {out[-300:]}")
    t0 = min(int(r[0]) for r in rows) + s.rps_warmup_s * 1e6
    kept = [r for r in rows if int(r[0]) >= t0 and r[1] == "200"]
    if len(kept) < 0.95 * len([r for r in rows if int(r[0]) >= t0]) or len(kept) < 10:
        raise BenchError(f"h2load (gRPC {mode}) through {ctx.variant}: too few 200 responses "
                         f"({len(kept)} of {len(rows)})")
    span = max(1e-3, (max(int(r[0]) for r in kept) - t0) / 1e6)
    m = {"rps": len(kept) / span, **percentiles([float(r[2]) for r in kept])}
    if ctx.proxy:
        m.update(proxy_cpu_pct=100 * cpu / wall, proxy_rss_kb=rss_kb(ctx.proxy.pid),
                 proxy_cpu_us_per_req=cpu * 1e6 / len(rows))
    if pg:
        m["store_stmts_per_session_hour"] = stmts * 3600 / wall
    return m


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure_idle(ctx: Ctx) -> dict:
    """RSS slope of the proxy while N idle connections are opened in 4 steps,
    then the extra slope while 1 byte is echoed over the first k*N/4 of them."""
    n, steps, settle = ctx.s.idle_conns, 4, 0.5
    client = PROCS.start(ctx.name("idle-client"), [TOOL, "idle", ctx.host, ctx.port, n],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def command(line: str) -> None:
        client.popen.stdin.write(f"{line}\n".encode())
        client.popen.stdin.flush()
        ready, _, _ = select.select([client.popen.stdout], [], [], 90)
        reply = client.popen.stdout.readline().decode().strip() if ready else "timeout"
        if not reply.startswith("ok"):
            raise BenchError(f"idle client '{line}' through {ctx.variant}: {reply or 'exited'}")
        time.sleep(settle)

    try:
        base = rss_kb(ctx.proxy.pid)
        xs, ys = [0], [base]
        for k in range(1, steps + 1):
            command(f"open {n * k // steps}")
            xs.append(n * k // steps)
            ys.append(rss_kb(ctx.proxy.pid))
        px, py = [0], [ys[-1]]
        for k in range(1, steps + 1):
            command(f"ping {n * k // steps}")
            px.append(n * k // steps)
            py.append(rss_kb(ctx.proxy.pid))
        ctx.check_proxy()
    finally:
        PROCS.stop(client)
    idle = slope(xs, ys) * 1024
    return {"conns": n, "rss_base_kb": base, "bytes_per_conn_idle": idle,
            "bytes_per_conn_after_ping": idle + slope(px, py) * 1024}


def measure_spark(ctx: Ctx) -> dict:
    """Hook for the real-Spark scenario: bench/spark_topandas.py through the variant."""
    s = ctx.s
    argv = [s.spark_python, BENCH / "spark_topandas.py", "--remote", f"sc://{ctx.host}:{ctx.port}",
            "--rows", 2_000_000, "--iterations", s.spark_iterations]
    out, wall, cpu = timed(ctx, lambda: PROCS.run(ctx.name("spark"), argv, timeout=900))
    r = json.loads(out.strip().splitlines()[-1])
    m = {"seconds": statistics.median(r["seconds"])}
    if ctx.proxy:
        m.update(proxy_cpu_pct=100 * cpu / wall)
    return m


def spark_unavailable(s: Settings) -> str | None:
    if not s.spark_python.exists():
        return f"{s.spark_python} missing (set SPARK_PYTHON)"
    host, port = s.spark_servers[0].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as exc:
        return f"no Spark Connect server at {s.spark_servers[0]} ({exc}; set SPARK_CONNECT_SERVERS)"
    return None


# --------------------------------------------------------------- scenarios

@dataclass
class Part:
    scenario: str
    label: str
    backend: str
    variants: tuple[str, ...]
    measure: Callable[[Ctx], dict]


BULK = ("direct", "haproxy", "haproxy-splice-auto", "haproxy-splice-force", "sclb")
ALL = BULK + tuple(LOGGED) + ("haproxy-http", "sclb-gateway", "sclb-gateway-pg", "sclb-gateway-jwt") \
    + TLS_VARIANTS  # column order of the tables
STD = ("direct", "haproxy", "sclb")
CONNRATE = STD + tuple(LOGGED)
L7 = ("direct", "haproxy-http", "sclb-gateway", "sclb-gateway-pg", "sclb-gateway-jwt")
SPARK = ("direct", "haproxy", "sclb", "haproxy-http", "sclb-gateway")
TLS = ("direct",) + TLS_VARIANTS


def scenario_parts(s: Settings) -> dict[str, list[Part]]:
    return {
        "bulk": [Part("bulk", "P1", "iperf3", BULK, lambda c: measure_bulk(c, 1)),
                 Part("bulk", "P4", "iperf3", BULK, lambda c: measure_bulk(c, 4))],
        "connrate": [Part("connrate", "c32", "http1", CONNRATE, measure_connrate)],
        "latency": [Part("latency", "rps2000", "h2c", STD, measure_rps),
                    Part("latency", "pingpong", "echo", STD, measure_pingpong)],
        "idle": [Part("idle", f"n{s.idle_conns}", "echo", ("haproxy", "sclb"), measure_idle)],
        "gateway": [Part("gateway", "pingpong", "grpc", L7, lambda c: measure_grpc(c, "pingpong")),
                    Part("gateway", "rps1000", "grpc", L7, lambda c: measure_grpc(c, "rps1000"))],
        "tls": [Part("tls", "handshakes", "http1", TLS, measure_tls_handshakes),
                Part("tls", "download", "http1", TLS, measure_tls_bulk)],
        "spark": [Part("spark", "toPandas2M", "spark", SPARK, measure_spark),
                  Part("spark", "unary-Config", "spark", L7, lambda c: measure_grpc(c, "pingpong"))],
    }


# ----------------------------------------------------------------- results

METRICS = ["gbps", "conns_per_s", "rps", "seconds", "p50_us", "p90_us", "p99_us", "p999_us",
           "endpoints_cpu_s_per_gb", "errors", "conns", "rss_base_kb", "bytes_per_conn_idle",
           "bytes_per_conn_after_ping", "proxy_cpu_pct", "proxy_cpu_s_per_gb",
           "proxy_cpu_us_per_conn", "proxy_cpu_us_per_req", "proxy_rss_kb",
           "store_stmts_per_session_hour"]
LATENCY = {"p50_us", "p90_us", "p99_us", "p999_us"}
RATIO = {"gbps", "conns_per_s", "rps", "seconds"} | LATENCY


@dataclass
class Stat:
    values: list[float]
    ratios: list[float]   # paired with direct of the same repetition
    deltas: list[float]

    @property
    def med(self) -> float:
        return statistics.median(self.values)

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def delta(self) -> float | None:
        return statistics.median(self.deltas) if self.deltas else None


class Results:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str, str], dict[str, dict[int, float]]] = {}
        self.order: dict[tuple[str, str], int] = {}
        self.errors: list[str] = []
        self.notes: list[str] = []

    def add(self, part: Part, variant: str, rep: int, metrics: dict) -> None:
        self.order.setdefault((part.scenario, part.label), len(self.order))
        for metric, value in metrics.items():
            self.data.setdefault((part.scenario, part.label, metric), {}) \
                .setdefault(variant, {})[rep] = float(value)

    def rows(self) -> list[tuple[str, str, str]]:
        return sorted(self.data, key=lambda k: (self.order[k[:2]], METRICS.index(k[2])))

    def stat(self, key: tuple[str, str, str], variant: str) -> Stat | None:
        per_rep = self.data.get(key, {}).get(variant)
        if not per_rep:
            return None
        direct = self.data[key].get("direct", {}) if variant != "direct" else {}
        pairs = [(v, direct[r]) for r, v in sorted(per_rep.items()) if r in direct]
        return Stat(list(per_rep.values()),
                    [v / d for v, d in pairs if d] if key[2] in RATIO else [],
                    [v - d for v, d in pairs] if key[2] in LATENCY else [])


# ----------------------------------------------------------------- targets

@dataclass
class Target:
    key: tuple[str, str, str]
    figure: str
    haproxy_ref: str
    text: str
    kind: str        # ratio_ge | ratio_le | value_le | delta_le | delta_le_haproxy | delta_lt_haproxy
    #                  | ratio_ge_haproxy | value_le_haproxy (limit = the factor on HAProxy's figure)
    #                  | delta_within (added latency ≤ the ref variant's + limit µs)
    limit: float = 0.0
    variant: str = "sclb"      # the variant judged
    ref: str = "haproxy"       # the HAProxy variant it is compared with


TARGETS = [
    Target(("bulk", "P1", "gbps"), "bulk throughput, 1 stream", "0.40× (splice-force 0.77×)", "≥ 0.85×", "ratio_ge", 0.85),
    Target(("bulk", "P4", "gbps"), "bulk throughput, 4 streams", "0.54× (splice-force 0.92×)", "≥ 0.95×", "ratio_ge", 0.95),
    Target(("bulk", "P1", "proxy_cpu_s_per_gb"), "proxy CPU-s per GB, 1 stream", "1.1 (splice-force 0.5)", "≤ 0.45", "value_le", 0.45),
    Target(("bulk", "P4", "proxy_cpu_s_per_gb"), "proxy CPU-s per GB, 4 streams", "1.1 (splice-force 0.5)", "≤ 0.45", "value_le", 0.45),
    Target(("connrate", "c32", "conns_per_s"), "new connections/s (wrk -c 32, close)", "0.52×", "≥ 0.65×", "ratio_ge", 0.65),
    Target(("connrate", "c32", "proxy_cpu_us_per_conn"), "proxy CPU per connection (µs)", "138", "≤ 90", "value_le", 90),
    Target(("latency", "pingpong", "p50_us"), "ping-pong added p50", "+113 µs", "≤ +60 µs", "delta_le", 60),
    Target(("latency", "pingpong", "p99_us"), "ping-pong added p99", "+2.5 ms", "≤ HAProxy", "delta_le_haproxy"),
    Target(("latency", "rps2000", "p99_us"), "h2c 2000 req/s, added p99", "+2.1 ms", "≤ HAProxy", "delta_le_haproxy"),
    Target(("idle", "*", "bytes_per_conn_idle"), "RSS per idle connection (B)", "3,380", "≤ 3,000", "value_le", 3000),
    Target(("connrate", "c32", "proxy_cpu_us_per_conn"), "CPU per connection, access log on (stdout)", "—",
           "≤ 0.9× HAProxy", "value_le_haproxy", 0.9, variant="sclb-log", ref="haproxy-log"),
    Target(("connrate", "c32", "conns_per_s"), "connections/s, access log on (stdout)", "—",
           "≥ HAProxy", "ratio_ge_haproxy", variant="sclb-log", ref="haproxy-log"),
    Target(("connrate", "c32", "proxy_cpu_us_per_conn"), "CPU per connection, access log on (syslog)", "—",
           "≤ 0.9× HAProxy", "value_le_haproxy", 0.9, variant="sclb-log", ref="haproxy-log-syslog"),
    Target(("connrate", "c32", "conns_per_s"), "connections/s, access log on (syslog)", "—",
           "≥ HAProxy", "ratio_ge_haproxy", variant="sclb-log", ref="haproxy-log-syslog"),
    Target(("spark", "toPandas2M", "seconds"), "Spark range(2M).toPandas() time", "—", "≤ 1.02×", "ratio_le", 1.02),
    Target(("gateway", "pingpong", "p50_us"), "L7 gRPC unary, 1 in flight, added p50", "—",
           "< HAProxy http", "delta_lt_haproxy", variant="sclb-gateway", ref="haproxy-http"),
    Target(("gateway", "rps1000", "p50_us"), "L7 gRPC unary, 1000 calls/s, added p50", "—",
           "< HAProxy http", "delta_lt_haproxy", variant="sclb-gateway", ref="haproxy-http"),
    # A known session costs no store round trip: the postgres store within noise of memory.
    Target(("gateway", "pingpong", "p50_us"), "L7 gRPC unary, 1 in flight, added p50, postgres store", "—",
           "≤ memory store + 10 µs", "delta_within", 10, variant="sclb-gateway-pg", ref="sclb-gateway"),
    Target(("gateway", "rps1000", "p50_us"), "L7 gRPC unary, 1000 calls/s, added p50, postgres store", "—",
           "≤ memory store + 10 µs", "delta_within", 10, variant="sclb-gateway-pg", ref="sclb-gateway"),
    # An RS256 bearer token on every call: checked once per connection and token, then cached.
    Target(("gateway", "pingpong", "p50_us"), "L7 gRPC unary, 1 in flight, added p50, jwt auth", "—",
           "≤ no auth + 10 µs", "delta_within", 10, variant="sclb-gateway-jwt", ref="sclb-gateway"),
    Target(("gateway", "rps1000", "p50_us"), "L7 gRPC unary, 1000 calls/s, added p50, jwt auth", "—",
           "≤ no auth + 10 µs", "delta_within", 10, variant="sclb-gateway-jwt", ref="sclb-gateway"),
    Target(("tls", "handshakes", "conns_per_s"), "TLS handshakes/s (wrk -c 32, close; ECDSA P-256)", "—",
           "≥ HAProxy ssl crt", "ratio_ge_haproxy", variant="sclb-tls", ref="haproxy-tls"),
    Target(("tls", "handshakes", "proxy_cpu_us_per_conn"), "proxy CPU per TLS connection (µs)", "—",
           "≤ HAProxy ssl crt", "value_le_haproxy", 1.0, variant="sclb-tls", ref="haproxy-tls"),
    Target(("tls", "download", "gbps"), "HTTPS download through the TLS frontend, 1 stream", "—",
           "≥ HAProxy ssl crt", "ratio_ge_haproxy", variant="sclb-tls", ref="haproxy-tls"),
    Target(("tls", "download", "proxy_cpu_s_per_gb"), "proxy CPU-s per GB encrypted", "—",
           "≤ HAProxy ssl crt", "value_le_haproxy", 1.0, variant="sclb-tls", ref="haproxy-tls"),
    Target(("spark", "toPandas2M", "seconds"), "Spark range(2M).toPandas() time, gateway", "—",
           "≤ 1.05×", "ratio_le", 1.05, variant="sclb-gateway", ref="haproxy-http"),
    Target(("spark", "unary-Config", "p50_us"), "Spark Config RPC, 1 in flight, added p50, gateway", "—",
           "< HAProxy http", "delta_lt_haproxy", variant="sclb-gateway", ref="haproxy-http"),
]


TARGETS_NOTE = ("The absolute CPU targets (s/GB, µs/conn) were set against HAProxy's reference figures; "
                "CPU per unit of work moves with the machine's load, so compare HAProxy's figure of this run "
                "with its reference and read 'sclb ÷ HAProxy' too (targets ÷ reference: 0.41× s/GB, "
                "0.65× µs/conn, 0.89× RSS/conn).")


def targets_for(key: tuple[str, str, str]) -> list[Target]:
    return [t for t in TARGETS if t.key[0] == key[0] and t.key[2] == key[2] and t.key[1] in ("*", key[1])]


def verdict(t: Target, res: Results, key: tuple[str, str, str], quick: bool, sclb_note: str) -> str:
    sc, hp = res.stat(key, t.variant), res.stat(key, t.ref)
    if sc is None:
        return "– (sclb " + ("not built)" if sclb_note.startswith("not built") else "no data)")
    if quick:
        return "– (quick)"
    if t.kind == "ratio_ge":
        ok = sc.ratio is not None and sc.ratio >= t.limit
    elif t.kind == "ratio_le":
        ok = sc.ratio is not None and sc.ratio <= t.limit
    elif t.kind == "value_le":
        ok = sc.med <= t.limit
    elif t.kind == "delta_le":
        ok = sc.delta is not None and sc.delta <= t.limit
    elif t.kind == "value_le_haproxy":
        ok = hp is not None and sc.med <= t.limit * hp.med
    elif t.kind == "ratio_ge_haproxy":
        ok = sc.ratio is not None and hp is not None and hp.ratio is not None and sc.ratio >= hp.ratio
    elif t.kind == "delta_within":
        ok = sc.delta is not None and hp is not None and hp.delta is not None and sc.delta <= hp.delta + t.limit
    elif t.kind == "delta_lt_haproxy":
        ok = sc.delta is not None and hp is not None and hp.delta is not None and sc.delta < hp.delta
    else:  # delta_le_haproxy
        ok = sc.delta is not None and hp is not None and hp.delta is not None and sc.delta <= hp.delta
    return "**pass**" if ok else "**MISS**"


# --------------------------------------------------------------- rendering

def fmt(v: float) -> str:
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}" if a >= 0.1 else f"{v:.3g}"


def cell(st: Stat | None) -> str:
    if st is None:
        return "–"
    out = fmt(st.med)
    if len(st.values) > 1:
        out += f" [{fmt(min(st.values))}–{fmt(max(st.values))}]"
    if st.ratio is not None:
        out += f" ({st.ratio:.2f}×)"
    if st.delta is not None:
        out += f" {st.delta:+.0f}µs"
    return out + f" n={len(st.values)}"


def table(res: Results, s: Settings, sclb_note: str) -> str:
    variants = [v for v in ALL if v in s.variants and any(v in scenario_variants(sc) for sc in s.scenarios)]
    head = ["scenario", "variant", "metric"] + [v if v == "direct" else f"{v} (×direct)" for v in variants] \
        + ["target (sclb)", "pass/miss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in res.rows():
        not_built = sclb_note.startswith("not built")
        cells = ["not built" if v in SCLB_VARIANTS and v in scenario_variants(key[0]) and not_built
                 else cell(res.stat(key, v)) for v in variants]
        ts = targets_for(key)
        label = (lambda t: f"{t.variant}" + (f" vs {t.ref}" if t.ref != "haproxy" or t.variant != "sclb" else "")
                 + ": " if len(ts) > 1 or t.variant != "sclb" else "")
        tail = ["; ".join(label(t) + t.text for t in ts),
                "; ".join(label(t) + verdict(t, res, key, s.quick, sclb_note) for t in ts)]
        lines.append("| " + " | ".join(list(key) + cells + tail) + " |")
    return "\n".join(lines)


def scenario_variants(scenario: str) -> tuple[str, ...]:
    return {"bulk": BULK, "connrate": CONNRATE, "idle": ("haproxy", "sclb"), "gateway": L7,
            "spark": SPARK, "tls": TLS}.get(scenario, STD)


def summary_figure(res: Results, key: tuple[str, str, str], variant: str) -> str:
    st = res.stat(key, variant)
    if st is None:
        return "–"
    if key[2] in LATENCY:
        return f"{st.delta:+.0f} µs" if st.delta is not None else "–"
    if st.ratio is not None:
        return f"{st.ratio:.2f}×"
    return fmt(st.med)


def sclb_vs_haproxy(res: Results, key: tuple[str, str, str], variant: str = "sclb", ref: str = "haproxy") -> str:
    """sclb's figure divided by HAProxy's of the same run (added latency for latencies)."""
    sc, hp = res.stat(key, variant), res.stat(key, ref)
    if sc is None or hp is None:
        return "–"
    if key[2] in LATENCY:
        a, b = sc.delta, hp.delta
    elif key[2] in RATIO:
        a, b = sc.ratio, hp.ratio
    else:
        a, b = sc.med, hp.med
    return f"{a / b:.2f}×" if a is not None and b and b > 0 else "–"


def targets_table(res: Results, s: Settings, sclb_note: str) -> str:
    lines = ["| figure | HAProxy ref | HAProxy this run | sclb this run | sclb ÷ HAProxy | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for t in TARGETS:
        keys = [k for k in res.rows() if t in targets_for(k)]
        if not keys:
            continue
        key = keys[0]
        hp = summary_figure(res, key, t.ref)
        if key[0] == "bulk":
            hp += f" (splice-force {summary_figure(res, key, 'haproxy-splice-force')})"
        elif t.ref != "haproxy":
            hp += f" ({t.ref})"
        sc = summary_figure(res, key, t.variant)
        if sc == "–" and sclb_note.startswith("not built"):
            sc = "not built"
        elif t.variant != "sclb" and sc != "–":
            sc += f" ({t.variant})"
        lines.append(f"| {t.figure} | {t.haproxy_ref} | {hp} | {sc} | {sclb_vs_haproxy(res, key, t.variant, t.ref)} | "
                     f"{t.text} | "
                     f"{verdict(t, res, key, s.quick, sclb_note)} |")
    return "\n".join(lines)


CHART_COLORS = {"haproxy": "#8c8c8c", "haproxy-splice-auto": "#b7c9e2",
                "haproxy-splice-force": "#5b84b1", "sclb": "#e4572e",
                "haproxy-log": "#6a3d9a", "haproxy-log-syslog": "#cab2d6", "sclb-log": "#b2182b",
                "haproxy-http": "#4d4d4d", "sclb-gateway": "#f2a541", "sclb-gateway-pg": "#f7d08a",
                "sclb-gateway-jwt": "#d95f02", "haproxy-tls": "#1b9e77", "sclb-tls": "#e7298a"}
CHART_PANELS = [  # (title, log scale?, [(scenario, part, metric, label)])
    ("Throughput, ratio to direct (higher is better)", False,
     [("bulk", "P1", "gbps", "bulk 1 stream"), ("bulk", "P4", "gbps", "bulk 4 streams"),
      ("connrate", "c32", "conns_per_s", "conn/s (close)"), ("latency", "pingpong", "rps", "ping-pong req/s")]),
    ("Latency and time, ratio to direct (lower is better; log scale)", True,
     [("latency", "pingpong", "p50_us", "ping-pong p50"), ("latency", "pingpong", "p99_us", "ping-pong p99"),
      ("latency", "rps2000", "p50_us", "h2c 2000/s p50"), ("latency", "rps2000", "p99_us", "h2c 2000/s p99"),
      ("gateway", "pingpong", "p50_us", "gRPC 1 call p50"), ("gateway", "pingpong", "p99_us", "gRPC 1 call p99"),
      ("gateway", "rps1000", "p50_us", "gRPC 1000/s p50"), ("gateway", "rps1000", "p99_us", "gRPC 1000/s p99"),
      ("spark", "toPandas2M", "seconds", "Spark toPandas"), ("spark", "unary-Config", "p50_us", "Spark Config p50")]),
]


def chart(res: Results, s: Settings, png: Path) -> str | None:
    """Grouped bars of ratio-to-direct (median, whiskers min-max) with gnuplot."""
    if not shutil.which("gnuplot"):
        return "gnuplot missing: no chart"
    series = [v for v in ALL if v != "direct" and v in s.variants]
    plots = []
    for i, (title, log, items) in enumerate(CHART_PANELS):
        rows, used, top, bottom = [], set(), 1.0, 0.5
        for scen, part, metric, label in items:
            cols = []
            for v in series:
                st = res.stat((scen, part, metric), v)
                if st and st.ratios:
                    cols += [st.ratio, min(st.ratios), max(st.ratios)]
                    used.add(v)
                    top, bottom = max(top, max(st.ratios)), min(bottom, min(st.ratios) / 1.5)
                else:
                    cols += ["?", "?", "?"]
            if any(c != "?" for c in cols):
                rows.append("\t".join([f'"{label}"'] + [str(c) for c in cols]))
        if not rows:
            continue
        dat = s.workdir / f"chart{i}.dat"
        dat.write_text("\n".join(rows) + "\n")
        curves = [f"'{dat}' using {2 + 3 * j}:{3 + 3 * j}:{4 + 3 * j}{':xtic(1)' if not k else ''} "
                  f"title '{v}' linecolor rgb '{CHART_COLORS[v]}'"
                  for k, (j, v) in enumerate((j, v) for j, v in enumerate(series) if v in used)]
        curves.append("1 with lines dashtype 2 linewidth 2 linecolor rgb 'black' title 'direct = 1.0'")
        yrange = f"set logscale y\nset yrange [{bottom:.3g}:{top * 1.5:.3g}]" if log else \
            f"unset logscale y\nset yrange [0:{top * 1.15:.3g}]"
        plots.append(f"set title '{title}'\n{yrange}\nplot " + ", \\\n  ".join(curves))
    if not plots:
        return "no ratio figures: no chart"
    script = f"""set terminal pngcairo size 1100,{420 * len(plots)} font 'sans,10'
set output '{png}'
set datafile separator '\\t'
set datafile missing '?'
set style data histograms
set style histogram errorbars gap 2 linewidth 1
set style fill solid 0.75 border -1
set grid ytics
set key outside top center horizontal
set multiplot layout {len(plots)},1 title 'sclb bench {s.stamp} ({"quick" if s.quick else f"{s.reps} reps"}): bars = median, whiskers = min–max'
{chr(10).join(plots)}
unset multiplot
"""
    (s.workdir / "chart.gp").write_text(script)
    r = subprocess.run(["gnuplot", str(s.workdir / "chart.gp")], capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 and png.exists() else f"gnuplot failed: {r.stderr[-300:]}"


# -------------------------------------------------------------- environment

def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "missing"


def memcpy_probe() -> str:
    try:
        return subprocess.run([str(TOOL), "memcpy"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "memcpy probe failed"


def environment_header(s: Settings, sclb_note: str) -> list[str]:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "no commit"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [
        f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"mode: {'quick' if s.quick else 'full'}, reps {s.reps}, bulk {s.bulk_s:g} s, connrate {s.connrate_s:g} s, "
        f"rps2000 {s.rps_s:g} s (+{s.rps_warmup_s:g} s warm-up), pingpong {s.pingpong_s:g} s, "
        f"gateway {s.grpc_s:g} s (+{s.rps_warmup_s:g} s warm-up), idle {s.idle_conns} conns"
        + (f", spark {s.spark_iterations} iterations" if s.spark else ""),
        f"kernel: {platform.system()} {platform.release()} {platform.machine()}  cpus: {os.cpu_count()}  "
        f"model name: {model.group(1) if model else '?'}",
        f"haproxy: {tool_version(['haproxy', '-v'])}",
        f"nginx: {tool_version(['nginx', '-v'])}",
        f"iperf3: {tool_version(['iperf3', '--version'])}",
        f"wrk: {tool_version(['wrk', '-v'])}",
        f"h2load: {tool_version(['h2load', '--version'])}",
        f"nghttp: {tool_version(['nghttp', '--version'])}",
        f"sclb: {sclb_note}; repo HEAD {git}",
        f"ports: haproxy {s.haproxy_port}, sclb {s.sclb_port}, backends {','.join(map(str, s.backend_ports))}",
        f"nofile: soft {soft} hard {hard}",
        f"{memcpy_probe()} (before)",
    ]


# --------------------------------------------------------------------- run

def run_variant(s: Settings, res: Results, parts: list[Part], be: Backend, variant: str, rep: int) -> None:
    proxy, port, host = start_proxy(s, variant, be)
    try:
        probe(be.kind, host, port, what=variant)
        if variant == "sclb-gateway-jwt" and be.kind == "grpc":
            # the token is checked: a call without it is refused with UNAUTHENTICATED (16)
            st = grpc_call(host, port, GRPC_METHOD, GRPC_BODY)
            if st != "16":
                raise Broken(f"sclb-gateway-jwt answered grpc-status {st} (want 16) to a call without a token")
        if variant == "sclb-gateway" and be.kind == "grpc":
            # the gateway answers a path outside SparkConnectService itself: UNIMPLEMENTED (12)
            st = grpc_call(host, port, GRPC_METHOD, GRPC_BODY, path="/grpc.health.v1.Health/Check")
            if st != "12":
                raise Broken(f"sclb-gateway answered grpc-status {st} (want 12) to a non-Spark path")
        ctx = Ctx(s, variant, rep, host, port, proxy)
        for part in parts:
            if variant in part.variants:
                res.add(part, variant, rep, part.measure(ctx))
    finally:
        if proxy:
            PROCS.stop(proxy)


def run_group(s: Settings, res: Results, parts: list[Part], sclb_ok: bool) -> None:
    """Parts sharing one backend: start it, then rep-major, variant-minor."""
    variants = [v for v in ALL if v in s.variants and any(v in p.variants for p in parts)]
    if not sclb_ok:
        variants = [v for v in variants if v not in SCLB_VARIANTS]
    be = start_backend(s, parts[0].backend)
    try:
        host, port = be.addrs[0].rsplit(":", 1)
        probe(be.kind, host, int(port), what=f"the {be.kind} backend itself")
        broken: set[str] = set()  # a variant that cannot forward is not retried in later reps
        what = f"{parts[0].scenario}/{'+'.join(p.label for p in parts)}"
        for rep in range(s.reps):
            for v in [v for v in variants if v not in broken]:
                t0 = time.monotonic()
                try:
                    run_variant(s, res, parts, be, v, rep)
                    status = "ok"
                except BenchError as exc:
                    res.errors.append(f"{what} rep {rep + 1} {v}: {exc}")
                    status = f"FAILED: {str(exc).splitlines()[0]}"
                    if isinstance(exc, Broken):
                        broken.add(v)
                print(f"  {what:20} rep {rep + 1}/{s.reps} {v:21} {time.monotonic() - t0:5.1f} s  {status}",
                      flush=True)
    finally:
        stop_backend(be)


def run_scenario(s: Settings, res: Results, scenario: str, sclb_ok: bool, envlog: list[str]) -> None:
    parts = scenario_parts(s)[scenario]
    if scenario == "spark":
        why = spark_unavailable(s)
        if why:
            res.errors.append(f"spark: requested with --spark but unavailable: {why}")
            return
    envlog.append(f"loadavg before scen_{scenario}: {loadavg()}")
    t0, cpu0 = time.monotonic(), cpu_times()
    if scenario == "spark":
        # The Spark server's JVM keeps getting faster over the first few dozen queries (JIT):
        # warm it up directly first, or the variant measured first (direct) is penalised.
        host, port = s.spark_servers[0].rsplit(":", 1)
        try:
            PROCS.run("spark-warmup", [s.spark_python, BENCH / "spark_topandas.py", "--remote",
                                       f"sc://{host}:{port}", "--rows", 2_000_000,
                                       "--iterations", 2 if s.quick else 10], timeout=900)
        except BenchError as exc:
            res.errors.append(f"spark: warm-up failed: {exc}")
            return
    groups: list[list[Part]] = []
    for part in parts:
        if groups and groups[-1][0].backend == part.backend:
            groups[-1].append(part)
        else:
            groups.append([part])
    try:
        for group in groups:
            run_group(s, res, group, sclb_ok)
    except BenchError as exc:
        res.errors.append(f"{scenario}: {exc}")
    d = [b - a for a, b in zip(cpu0, cpu_times())]
    total = sum(d) or 1
    envlog.append(f"scen_{scenario} took {time.monotonic() - t0:.0f} s "
                  f"(machine busy {100 * (total - d[3] - d[4]) / total:.0f}%, steal {100 * d[7] / total:.1f}%)")


def preflight(s: Settings) -> None:
    if not TOOL.exists():
        raise BenchError(f"{TOOL} missing: start the bench with bench/run, which compiles it")
    for tool in ("haproxy", "iperf3", "wrk", "h2load", "nghttp", "nginx"):
        if not shutil.which(tool):
            raise BenchError(f"{tool} missing: bench/run installs it (bench/install.sh)")
    busy = [p for p in (s.haproxy_port, s.sclb_port, *s.backend_ports) if listening(p)]
    if busy:
        raise BenchError(f"port(s) {busy} already in use; set BENCH_HAPROXY_PORT, BENCH_SCLB_PORT "
                         f"or BENCH_BACKEND_PORTS (see bench/README.md)")
    check_haproxy_config(s)


def tidy_workdirs(current: Path, keep: int = 5) -> None:
    runs = sorted(p for p in (BENCH / ".work").glob("*") if p != current)
    PROCS.reap_stale(runs)
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_report(s: Settings, res: Results, sclb_note: str, envlog: list[str]) -> Path:
    s.outdir.mkdir(parents=True, exist_ok=True)
    base = s.outdir / (s.stamp + ("-quick" if s.quick else ""))
    png = base.with_suffix(".png")
    chart_problem = chart(res, s, png)
    main, targets = table(res, s, sclb_note), targets_table(res, s, sclb_note)
    doc = [f"# sclb bench {s.stamp} ({'quick, no verdicts' if s.quick else f'{s.reps} reps'})", "",
           "Medians [min–max] over repetitions; (N×) = median of per-repetition ratios to direct "
           "measured in the same repetition; +µs = added latency vs direct. See bench/README.md.", "",
           "## Targets", "", targets, "", TARGETS_NOTE, "", "## All figures", "", main, ""]
    if res.errors:
        doc += ["## Errors", ""] + [f"- {e.splitlines()[0]}" for e in res.errors] + [""]
    doc += ["## Environment", "", "```"] + envlog + ["```", ""]
    doc.append(f"![ratios to direct]({png.name})" if chart_problem is None else f"(chart: {chart_problem})")
    md = base.with_suffix(".md")
    md.write_text("\n".join(doc) + "\n")
    print("\n## Targets\n\n" + targets + "\n\n" + TARGETS_NOTE + "\n\n## All figures\n\n" + main + "\n")
    for e in res.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    print(f"bench: wrote {md}" + (f" and {png}" if chart_problem is None else f" ({chart_problem})"))
    return md


def main(argv: list[str]) -> int:
    s = parse_args(argv)
    s.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    s.workdir = BENCH / ".work" / s.stamp
    s.workdir.mkdir(parents=True, exist_ok=True)
    tidy_workdirs(s.workdir)
    PROCS.logdir = s.workdir
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # respect nohup
        signal.signal(signal.SIGHUP, _on_signal)
    t_start = time.monotonic()
    res = Results()
    try:
        preflight(s)
        sclb_ok, sclb_note = prepare_sclb(s) if set(SCLB_VARIANTS) & set(s.variants) \
            else (False, "not selected")
        print(f"bench: {'quick' if s.quick else 'full'} run {s.stamp}, {s.reps} rep(s), "
              f"scenarios {','.join(s.scenarios)}; sclb: {sclb_note}; logs in {s.workdir}", flush=True)
        envlog = environment_header(s, sclb_note)
        for scenario in s.scenarios:
            run_scenario(s, res, scenario, sclb_ok, envlog)
        envlog.append(f"{memcpy_probe()} (after)")
        envlog.append(f"loadavg after: {loadavg()}; total {time.monotonic() - t_start:.0f} s")
        write_report(s, res, sclb_note, envlog)
    except BenchError as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        PROCS.stop_all()
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
