"""Process helpers for the e2e suite: free ports, Spark Connect servers, sclb/socat, admin socket.

Everything here talks to 127.0.0.1 only, every wait is bounded, and every process is
stopped by its own PID.
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

REPO_ROOT = Path(__file__).resolve().parents[2]
SPARK_HOME = Path(pyspark.__file__).resolve().parent

# Result streams end after 5 s so that a long query needs ReattachExecute (test_reattach).
SPARK_SENDER_MAX_STREAM_DURATION = "5s"


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True if a TCP connect to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate, budget: float, what: str):
    """Poll `predicate()` every 100 ms until it is truthy; return its value."""
    deadline = time.monotonic() + budget
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {budget} s (last: {last!r})")
        time.sleep(0.1)


def tail(path: Path, lines: int = 60) -> str:
    """Last `lines` lines of a log file (empty string if missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(ANSI_ESCAPE.sub("", data).splitlines()[-lines:])


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def read_log(path: Path) -> str:
    """A whole log file as text, without ANSI colour escapes."""
    try:
        return ANSI_ESCAPE.sub("", path.read_text(errors="replace"))
    except OSError:
        return ""


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (read from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # field 4 (ppid) comes after the ")" that closes the command name
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


FIGURES: dict[str, str] = {}   # measured figures, printed in pytest's terminal summary


def record_peak_rss(name: str, pid: int) -> None:
    """Note a live process's peak RSS in FIGURES (no-op if it is gone)."""
    rss = peak_rss_mib(pid)
    if rss is not None:
        FIGURES[f"{name} peak RSS (VmHWM)"] = f"{rss:.0f} MiB"


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process in MiB, None if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class Proc:
    """A process we started, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to `grace` s, then SIGKILL; children (socat forks) too."""
        kids = child_pids(self.pid) if self.alive() else []
        for pid in kids:
            _kill(pid, signal.SIGTERM)
        if self.alive():
            _kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        for pid in kids:
            _kill(pid, signal.SIGKILL)

    def kill9(self) -> None:
        """SIGKILL now and reap."""
        _kill(self.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _spawn(name: str, argv: list[str], log: Path, cwd: Path, env: dict | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=cwd, env=env, start_new_session=True,
        )
    return Proc(name, popen, log)


def start_spark_server(name: str, port: int, workdir: Path, token: str | None = None,
                       address: str = "127.0.0.1") -> Proc:
    """Start a Spark Connect server from the pyspark package (see spark-connect-facts.md) on
    `address`:`port`; with `token`, it requires `authorization: Bearer <token>`
    (spark.connect.authenticate.token).

    spark-submit execs spark-class which execs java, so the PID is the JVM's.
    The working directory (spark-warehouse, derby files) is `workdir`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    # Python UDFs (test_gateway's artifact test) run in workers started with PYSPARK_PYTHON:
    # this interpreter (the venv's), which has pyspark; a bare `python3` may not.
    env = dict(os.environ, SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP=address,
               PYSPARK_PYTHON=sys.executable)
    argv = [
        str(SPARK_HOME / "bin" / "spark-submit"),
        "--class", "org.apache.spark.sql.connect.service.SparkConnectServer",
        "--master", "local[2]",
        "--driver-memory", "1g",
        "--conf", f"spark.connect.grpc.binding.address={address}",
        "--conf", f"spark.connect.grpc.binding.port={port}",
        "--conf", "spark.ui.enabled=false",
        "--conf", "spark.connect.execute.reattachable.senderMaxStreamDuration="
        + SPARK_SENDER_MAX_STREAM_DURATION,
        "--conf", f"spark.local.dir={workdir}",
    ]
    if token is not None:
        argv += ["--conf", f"spark.connect.authenticate.token={token}"]
    return _spawn(name, argv, workdir / f"{name}.log", workdir, env)


def wait_port(proc: Proc, port: int, budget: float, host: str = "127.0.0.1") -> float:
    """Wait until `host`:`port` accepts; fail early if `proc` dies. Returns seconds waited."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        if port_accepts(port, host):
            return time.monotonic() - proc.started
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} before :{port} accepted; "
                f"log {proc.log}:\n{tail(proc.log)}"
            )
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name}: :{port} not accepting after {budget:.0f} s; "
                       f"log {proc.log}:\n{tail(proc.log)}")


def start_socat(listen: int, target: int, workdir: Path) -> Proc:
    """A plain TCP proxy standing in for sclb (development only)."""
    argv = ["socat", "-d", f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
            f"TCP:127.0.0.1:{target}"]
    return _spawn("socat", argv, workdir / "socat.log", workdir)


def start_sclb(binary: Path, config: Path, workdir: Path) -> Proc:
    """Start sclb as `$SCLB_BIN -c <config>`; its stderr (the log) goes to sclb.log."""
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "info")
    env.setdefault("NO_COLOR", "1")
    env.setdefault("RUST_BACKTRACE", "1")
    return _spawn("sclb", [str(binary), "-c", str(config)], workdir / "sclb.log", workdir, env)


def sclb_config(admin_sock: Path, stats_port: int, front_port: int,
                servers: dict[str, int], gateway_port: int | None = None) -> str:
    """The sclb TOML for an L4 frontend in front of `servers` (name -> port), plus a gateway
    frontend (mode "grpc": HTTP/2, routed by Spark session) on `gateway_port` if given; both
    share backend "local"."""
    gateway = "" if gateway_port is None else f"""
[[frontend]]
name = "gateway"
mode = "grpc"
bind = ["127.0.0.1:{gateway_port}"]
backend = "local"
sessions = {{ idle_timeout = "30m", max_ttl = "4h", cleanup_interval = "1m" }}
"""
    srv = ", ".join(f'{{ name = "{n}", addr = "127.0.0.1:{p}" }}' for n, p in servers.items())
    return f"""\
[global]
maxconn = 1000
admin = {{ path = "{admin_sock}", mode = "0600", level = "admin" }}
stats = {{ bind = "127.0.0.1:{stats_port}" }}

[defaults]
timeout = {{ connect = "2s", client = "4h", server = "4h", tunnel = "4h", queue = "10s" }}
retries = 3

[[frontend]]
name = "sparkconnect"
bind = ["127.0.0.1:{front_port}"]
backend = "local"
{gateway}
[[backend]]
name = "local"
balance = "roundrobin"
stick = {{ on = "src", expire = "2h", size = 1000 }}
check = {{ type = "spark", inter = "1s", rise = 2, fall = 3, timeout = "2s" }}
servers = [ {srv} ]
"""


class Admin:
    """Client for sclb's admin socket (HAProxy runtime API: one command, reply ends with an
    empty line or EOF)."""

    def __init__(self, path: Path, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout

    def cmd(self, line: str) -> str:
        """Send one command, return the reply text without the terminating empty line."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(str(self.path))
            s.sendall(line.encode() + b"\n")
            buf = b""
            deadline = time.monotonic() + self.timeout
            while not buf.endswith(b"\n\n") and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return buf.decode("utf-8", "replace").rstrip("\n")

    def stat(self) -> dict[str, dict[str, str]]:
        """`show stat` as {svname: row} for the rows of backend "local"."""
        text = self.cmd("show stat")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise AssertionError(f"show stat: no CSV header in reply:\n{text}")
        rows = csv.DictReader(io.StringIO("\n".join([lines[0][2:]] + lines[1:])))
        return {r["svname"]: r for r in rows if r["pxname"] == "local"}

    def table(self) -> list[dict[str, str]]:
        """`show table local` entries as dicts (key, use, exp, server_id, server_key, ...)."""
        out = []
        for line in self.cmd("show table local").splitlines():
            if line.startswith("0x"):
                out.append(dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv))
        return out

    def sessions(self) -> dict[str, dict[str, str]]:
        """`show sessions` (gateway Spark sessions) as {session_id: {user, fe, be, srv, src,
        age, idle, rpcs, streams}}; checks the `# sessions: N` header against the rows."""
        text = self.cmd("show sessions")
        lines = text.splitlines()
        m = re.fullmatch(r"# sessions: (\d+)", lines[0]) if lines else None
        if not m:
            raise AssertionError(f"show sessions: no '# sessions: N' header in reply:\n{text}")
        out = {}
        for line in lines[1:]:
            sid, _, rest = line.partition(": ")
            out[sid] = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
        if len(out) != int(m[1]):
            raise AssertionError(f"show sessions: header says {m[1]}, {len(out)} rows:\n{text}")
        return out

    def wait_status(self, server: str, prefix: str, budget: float,
                    column: str = "status") -> float:
        """Poll `show stat` every 100 ms until server's `column` starts with `prefix`.
        Returns the seconds it took; raises TimeoutError with the last value."""
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < budget:
            try:
                last = self.stat().get(server, {}).get(column)
            except OSError as e:  # admin socket not there (yet)
                last = f"admin socket {self.path}: {e}"
            if last is not None and last.startswith(prefix):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise TimeoutError(f"{server} {column} {last!r}, wanted {prefix!r} within {budget} s")


def own_tcp_connections(port: int) -> dict[int, int]:
    """This process's TCP sockets connected to 127.0.0.1:port, as {fd: local port}."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            # gRPC uses AF_INET6 sockets with v4-mapped addresses (::ffff:127.0.0.1)
            if s.type == socket.SOCK_STREAM and s.family in (socket.AF_INET, socket.AF_INET6):
                host, peer_port = s.getpeername()[:2]
                if peer_port == port and host.removeprefix("::ffff:") == "127.0.0.1":
                    out[fd] = s.getsockname()[1]
        except OSError:
            pass
        finally:
            s.close()  # closes the dup only
    return out


def drop_own_tcp_connections(port: int) -> list[int]:
    """shutdown() this process's TCP connections to 127.0.0.1:port (what a network blip does
    to gRPC: the channel sees EOF and reconnects). Returns the local ports dropped."""
    dropped = []
    for fd, local_port in own_tcp_connections(port).items():
        s = socket.socket(fileno=os.dup(fd))
        try:
            s.shutdown(socket.SHUT_RDWR)
            dropped.append(local_port)
        except OSError:
            pass
        finally:
            s.close()
    return dropped
