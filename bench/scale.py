#!/usr/bin/python3
"""bench/run --scale: how sclb's cost grows with the work it holds (scale curves).

Started by bench/run when --scale is given; see bench/README.md ("Scale curves").
Python 3.11 standard library only; processes, backends and probes come from bench.py.

pins: one proxy at a time (HAProxy, then sclb), both with `stick on src`, in front of three
"echo1" backends (echo one byte, then close: the server closes first, so a million short
connections leave no TIME_WAIT on the proxy's ephemeral ports). The stick table is filled by
real connections, each from its own source address 127.x.y.z (`benchtool conns`), so both
tables hold the same thing: key ip, server id, expiry. At each checkpoint N: RSS, the connect
path's latency for pinned clients (random among the N), `show table` time, and for sclb the
state-file save (an admin change answers once the file is on disk) and, at the end, load
(start to listening with that file); and whether `show table` / saves stall the data path: a
ping-pong on an established connection and new connections, with and without a `show table`
loop running.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import bench as b
import scale_gwconc
import scale_watch

TABLE = "spark_servers"
PARTS = {"pins", "sessions", "servers", "watch", "gwconc"}
ALGOS = ("roundrobin", "leastconn", "source")
# Session ids of the harness's calls: the last 12 hex digits of the UUID are this + i (the
# probe's own call, the captured request as it is, ends in ...000000000011).
FIRST_SESSION = 1 << 32


@dataclass
class ScaleSettings:
    quick: bool
    parts: list[str]
    proxies: list[str]
    pin_ns: list[int]
    session_ns: list[int]
    server_ns: list[int]
    watch_ns: list[int]
    gwconc_ns: list[int]   # concurrent sessions doing small RPCs (bench/scale_gwconc.py)
    gwconc_rate: float     # its paced phase: calls/s offered over all N sessions
    gwconc_warm_s: float
    gwconc_s: float        # each phase's measured window
    idle_s: float          # how long sclb's idle CPU (the session reaper) is measured
    samples: int           # connections per connect-latency measurement
    stall_s: float         # length of each stall measurement (baseline and during)
    build: bool
    sclb_bin: Path
    haproxy_port: int
    sclb_port: int
    backend_ports: tuple[int, int, int]
    outdir: Path
    workdir: Path = Path()
    stamp: str = ""
    sclb_ok: bool = False
    notes: list[str] = field(default_factory=list)  # for the report's environment block


def parse_args(argv: list[str]) -> ScaleSettings:
    ap = argparse.ArgumentParser(prog="bench/run --scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", action="store_true", help="(selects this driver)")
    ap.add_argument("--quick", action="store_true", help="small N for CI (the harness works; < 1 min)")
    ap.add_argument("--parts", default="pins,sessions,servers,watch,gwconc",
                    help="comma list out of: pins,sessions,servers,watch,gwconc (default: all)")
    ap.add_argument("--variants", default="haproxy,sclb", help="proxies: haproxy,sclb")
    ap.add_argument("--pins", help="comma list of stick-table sizes N (default 1000,10000,100000,1000000;"
                                   " --quick 300,1000)")
    ap.add_argument("--sessions", help="comma list of live gateway session counts N (default "
                                       "1000,10000,100000; --quick 300,1000)")
    ap.add_argument("--servers", help="comma list of backend sizes N (default 10,100,1000; --quick 10,100)")
    ap.add_argument("--pods", help="comma list of pod counts N in a Kubernetes watch (default "
                                   "100,1000,10000; --quick 50,200)")
    ap.add_argument("--gwconc", help="comma list of concurrent gateway session counts N (default "
                                     "10,100,1000,10000; --quick 10,100)")
    ap.add_argument("--gwconc-rate", type=float, default=2000.0,
                    help="gwconc's paced phase: calls/s offered over all N sessions (default 2000)")
    ap.add_argument("--no-build", action="store_true", help="never run cargo build")
    ap.add_argument("--out", default=str(b.BENCH / "results"), help="results directory")
    a = ap.parse_args(argv)
    parts = [p for p in a.parts.split(",") if p]
    if set(parts) - PARTS:
        ap.error(f"unknown part(s): {', '.join(sorted(set(parts) - PARTS))}")
    proxies = [p for p in a.variants.split(",") if p]
    if set(proxies) - {"haproxy", "sclb"}:
        ap.error("--variants: haproxy and/or sclb")
    default_ns = "300,1000" if a.quick else "1000,10000,100000,1000000"
    try:
        ns = sorted({int(x) for x in (a.pins or default_ns).split(",") if x})
    except ValueError:
        ap.error("--pins: a comma list of integers")
    if not ns or ns[0] < 10 or ns[-1] > 1_000_000:
        ap.error("--pins: sizes within 10..1000000 (the tables are configured for 1m entries)")
    try:
        sns = sorted({int(x) for x in (a.sessions or ("300,1000" if a.quick else "1000,10000,100000"))
                      .split(",") if x})
    except ValueError:
        ap.error("--sessions: a comma list of integers")
    if not sns or sns[0] < 10 or sns[-1] > 1_000_000:
        ap.error("--sessions: counts within 10..1000000")
    try:
        vns = sorted({int(x) for x in (a.servers or ("10,100" if a.quick else "10,100,1000")).split(",") if x})
    except ValueError:
        ap.error("--servers: a comma list of integers")
    if not vns or vns[0] < 3 or vns[-1] > 2000:
        ap.error("--servers: sizes within 3..2000")
    try:
        wns = sorted({int(x) for x in (a.pods or ("50,200" if a.quick else "100,1000,10000")).split(",") if x})
    except ValueError:
        ap.error("--pods: a comma list of integers")
    if not wns or wns[0] < 10 or wns[-1] > 60000:
        ap.error("--pods: counts within 10..60000 (one 127.3.x.y address each)")
    try:
        gns = sorted({int(x) for x in (a.gwconc or ("10,100" if a.quick else "10,100,1000,10000")).split(",") if x})
    except ValueError:
        ap.error("--gwconc: a comma list of integers")
    if not gns or gns[0] < 1 or gns[-1] > 50000:
        ap.error("--gwconc: counts within 1..50000 (one 127.x.y.z source address and fd each)")
    if not 1 <= a.gwconc_rate <= 100000:
        ap.error("--gwconc-rate: within 1..100000 calls/s")
    ports = [int(p) for p in os.environ.get("BENCH_BACKEND_PORTS", "19001,19002,19003").split(",")]
    if len(ports) != 3:
        ap.error("BENCH_BACKEND_PORTS needs exactly three ports")
    return ScaleSettings(
        quick=a.quick, parts=parts, proxies=proxies, pin_ns=ns, session_ns=sns, server_ns=vns, watch_ns=wns,
        gwconc_ns=gns, gwconc_rate=a.gwconc_rate, gwconc_warm_s=0.5 if a.quick else 1.0,
        gwconc_s=1.5 if a.quick else 5.0,
        idle_s=3.0 if a.quick else 15.0,
        samples=300 if a.quick else 2000, stall_s=1.0 if a.quick else 3.0,
        build=not a.no_build,
        sclb_bin=Path(os.environ.get("SCLB_BIN", str(b.DEFAULT_SCLB_BIN))).absolute(),
        haproxy_port=int(os.environ.get("BENCH_HAPROXY_PORT", b.REF_HAPROXY_PORT)),
        sclb_port=int(os.environ.get("BENCH_SCLB_PORT", b.REF_SCLB_PORT)),
        backend_ports=tuple(ports),  # type: ignore[arg-type]
        outdir=Path(a.out),
    )


def table_used(sock: Path) -> int:
    out, _ = b.admin(sock, f"show table")
    m = re.search(rf"# table: {TABLE}, type: ip, size:\d+, used:(\d+)", out)
    if not m:
        raise b.BenchError(f"show table: no '{TABLE}' header in {out[:200]!r}")
    return int(m.group(1))


def show_table(sock: Path) -> tuple[int, float]:
    """Dumps the whole table; (entries in the dump, seconds)."""
    out, secs = b.admin(sock, f"show table {TABLE}")
    return sum(1 for line in out.splitlines() if line.startswith("0x")), secs


# ------------------------------------------------------------------ proxies

@dataclass
class Proxy:
    variant: str
    proc: b.Proc
    port: int
    sock: Path
    state: Path | None = None
    cfg: Path = Path()


def proxy_files(s: ScaleSettings, variant: str) -> tuple[Path, Path]:
    return s.workdir / f"{variant}-admin.sock", s.workdir / f"{variant}-state.json"


def render_proxy(s: ScaleSettings, variant: str, be: b.Backend) -> Path:
    """The bench's proxy config with an admin socket (and for sclb a state file) added."""
    sock, state = proxy_files(s, variant)
    if variant == "haproxy":
        text = b.render(b.BENCH / "haproxy.cfg", s.haproxy_port, b.REF_HAPROXY_PORT, be)
        text = re.sub(r"^global\n", f"global\n    stats socket {sock} mode 600 level admin\n", text,
                      count=1, flags=re.M)
        cfg = s.workdir / "haproxy-scale.cfg"
    else:
        text = b.render(b.BENCH / "sclb.toml", s.sclb_port, b.REF_SCLB_PORT, be)
        text = text.replace("[global]\n", f'[global]\nadmin = {{ path = "{sock}" }}\n'
                                          f'state_file = "{state}"\n', 1)
        # HAProxy's "size 1m" is 1,048,576 entries: the same here, so that a million pins and
        # the probes' own (127.0.0.1) fit in both without an eviction.
        text = text.replace("size = 1000000 }", "size = 1048576 }", 1)
        cfg = s.workdir / "sclb-scale.toml"
    cfg.write_text(text)
    return cfg


def start_proxy(s: ScaleSettings, variant: str, cfg: Path, name: str) -> tuple[Proxy, float]:
    """Starts a proxy; (proxy, seconds until it listened and answered on its admin socket)."""
    sock, state = proxy_files(s, variant)
    t0 = time.monotonic()
    if variant == "haproxy":
        proc = b.PROCS.start(name, ["haproxy", "-db", "-f", cfg])
        port = s.haproxy_port
    else:
        proc = b.PROCS.start(name, [s.sclb_bin, "-c", cfg])
        port = s.sclb_port
    try:
        b.wait_listening([port], [proc], timeout=120)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or not proc.alive():
                raise b.Broken(f"{variant}: no admin socket at {sock}:\n{proc.log_tail()}")
            time.sleep(0.01)
    except b.BenchError:
        b.PROCS.stop(proc)
        raise
    return Proxy(variant, proc, port, sock, state if variant == "sclb" else None, cfg), time.monotonic() - t0


def stop_proxy(p: Proxy) -> float:
    """Graceful stop (SIGTERM; sclb saves its state file on the way out); seconds it took."""
    t0 = time.monotonic()
    b.PROCS.stop(p.proc, timeout=120)
    return time.monotonic() - t0


# -------------------------------------------------------------------- loads

def conns(name: str, port: int, count: int, conc: int, base: int, rng: int, order: str,
          timeout: float, until_timeout: bool = False, errors_ok: bool = False) -> dict:
    """benchtool conns: short connections from distinct 127.x.y.z sources; its JSON line.
    until_timeout: the count is a bound and the time is the measurement (unfinished is fine)."""
    out = b.PROCS.run(name, [b.TOOL, "conns", b.HOST, port, count, conc, base, rng, order, timeout],
                      timeout=timeout + 30)
    r = json.loads(out.strip().splitlines()[-1])
    if (r.get("errors") and not errors_ok) or (r.get("unfinished") and not until_timeout):
        raise b.BenchError(f"{name}: {r['errors']} errors, {r['unfinished']} unfinished of {count}")
    return r


def pingpong(name: str, port: int, secs: float) -> dict:
    out = b.PROCS.run(name, [b.TOOL, "pingpong", b.HOST, port, f"{secs:g}", 64, 2_000_000, 200],
                      timeout=secs + 30)
    return json.loads(out)


def stall_probe(s: ScaleSettings, name: str, port: int, pinned: int, during=None) -> dict:
    """A ping-pong on one connection and a stream of new connections (one at a time, pinned
    sources), side by side for stall_s; with `during` (a callable) running in a loop meanwhile.
    Returns the p99s and how many times `during` ran."""
    stop, runs, errors = threading.Event(), [], []

    def loop():
        while not stop.is_set():
            try:
                runs.append(during())
            except Exception as exc:  # reported below: the measurement is void
                errors.append(exc)
                return

    worker = threading.Thread(target=loop) if during else None
    if worker:
        worker.start()
    try:
        res: dict = {}
        t_pp = threading.Thread(target=lambda: res.update(pp=pingpong(f"{name}-pingpong", port, s.stall_s)))
        t_pp.start()
        # new connections for as long as the ping-pong runs (bounded in count, 1 in flight)
        res["conn"] = conns(f"{name}-conns", port, 200_000, 1, 0, pinned, "rand", s.stall_s, True, True)
        t_pp.join()
    finally:
        stop.set()
        if worker:
            worker.join()
    if errors:
        raise b.BenchError(f"{name}: the loop beside the probe failed: {errors[0]}")
    return {"pingpong_p99_us": res["pp"]["p99_us"], "pingpong_max_us": res["pp"]["max_us"],
            "conn_p99_us": res["conn"]["p99_us"], "conn_max_us": res["conn"]["max_us"],
            "conn_errors": res["conn"]["errors"], "loop_runs": len(runs),
            "loop_median_ms": statistics.median(runs) * 1000 if runs and isinstance(runs[0], float) else 0}


# --------------------------------------------------------------------- pins

@dataclass
class Row:
    part: str
    variant: str
    n: int
    figures: dict = field(default_factory=dict)


def sclb_save(p: Proxy) -> float:
    """Seconds for an admin change to answer: it answers once the state file is on disk."""
    out, secs = b.admin(p.sock, f"set server {TABLE}/s1 state ready")
    if out.strip():
        raise b.BenchError(f"sclb: 'set server … state ready' answered {out.strip()[:200]!r}")
    return secs


def sclb_reload(sock: Path) -> float:
    """Seconds for `reload` (the config file unchanged) to answer."""
    out, secs = b.admin(sock, "reload")
    if "fail" in out.lower():
        raise b.BenchError(f"sclb: reload answered {out.strip()[:200]!r}")
    return secs


def run_pins(s: ScaleSettings, variant: str, rows: list[Row], direct: dict) -> None:
    be = b.start_backend(s, "echo1")
    proxy = None
    try:
        cfg = render_proxy(s, variant, be)
        proxy, _ = start_proxy(s, variant, cfg, f"{variant}-pins")
        conns(f"{variant}-probe", proxy.port, 1, 1, 10_000_000, 0, "seq", 15)
        b.admin(proxy.sock, f"clear table {TABLE}")  # the probe's pin
        time.sleep(0.5)
        base_rss = b.rss_kb(proxy.proc.pid)
        filled, prev_rss, saves = 0, base_rss, []
        print(f"  pins {variant}: base RSS {base_rss} kB", flush=True)
        for n in s.pin_ns:
            t0, cpu0 = time.monotonic(), b.cpu_seconds(proxy.proc.pid)
            fill = conns(f"{variant}-fill-{n}", proxy.port, n - filled, 64, filled, 0, "seq", 1800)
            fill_cpu = b.cpu_seconds(proxy.proc.pid) - cpu0
            fill_s = time.monotonic() - t0
            used = table_used(proxy.sock)
            if used != n:
                raise b.BenchError(f"{variant}: table holds {used} entries after filling {n}")
            time.sleep(1.0)
            rss = b.rss_kb(proxy.proc.pid)
            f: dict = {"entries": used, "rss_kb": rss,
                       "bytes_per_entry": (rss - base_rss) * 1024 / n,
                       "bytes_per_entry_marginal": (rss - prev_rss) * 1024 / (n - filled),
                       "fill_conns_per_s": fill["per_s"],
                       "cpu_us_per_new_pin": fill_cpu * 1e6 / (n - filled)}
            lat = conns(f"{variant}-connlat-{n}", proxy.port, s.samples, 1, 0, n, "rand", 600)
            f.update(conn_p50_us=lat["p50_us"], conn_p99_us=lat["p99_us"],
                     conn_added_p50_us=lat["p50_us"] - direct["p50_us"],
                     conn_added_p99_us=lat["p99_us"] - direct["p99_us"])
            dumped, secs = show_table(proxy.sock)
            if dumped != n:
                raise b.BenchError(f"{variant}: show table dumped {dumped} entries, {n} expected")
            f["show_table_ms"] = secs * 1000
            if variant == "sclb":
                f["save_ms"] = statistics.median(sclb_save(proxy) for _ in range(3)) * 1000
                # each N's file is loaded after the run; the largest is the one written at stop
                saves.append((n, s.workdir / f"sclb-state-{n}.json"))
                if n != s.pin_ns[-1]:
                    shutil.copyfile(proxy.state, saves[-1][1])
            base = stall_probe(s, f"{variant}-stall-base-{n}", proxy.port, n)
            during = stall_probe(s, f"{variant}-stall-show-{n}", proxy.port, n, lambda: show_table(proxy.sock))
            f.update({f"base_{k}": v for k, v in base.items() if k != "loop_runs"})
            f.update({f"show_{k}": v for k, v in during.items()})
            if variant == "sclb":
                saving = stall_probe(s, f"{variant}-stall-save-{n}", proxy.port, n, lambda: sclb_save(proxy))
                f.update({f"save_{k}": v for k, v in saving.items()})
                reloading = stall_probe(s, f"{variant}-stall-reload-{n}", proxy.port, n,
                                        lambda: sclb_reload(proxy.sock))
                f.update({f"reload_{k}": v for k, v in reloading.items()})
                if table_used(proxy.sock) < n:
                    raise b.BenchError(f"sclb lost pins in a reload: {table_used(proxy.sock)} of {n}")
            b.admin(proxy.sock, f"clear table {TABLE} key {b.HOST}")  # the ping-pong's own pin
            if not proxy.proc.alive():
                raise b.Broken(f"{variant} died:\n{proxy.proc.log_tail()}")
            rows.append(Row("pins", variant, n, f))
            print(f"  pins {variant} N={n}: {fill_s:.0f} s fill, {f['bytes_per_entry']:.0f} B/entry, "
                  f"connect p99 {f['conn_p99_us']:.0f} µs, show table {f['show_table_ms']:.0f} ms"
                  + (f", save {f['save_ms']:.0f} ms" if 'save_ms' in f else ""), flush=True)
            filled, prev_rss = n, rss
        stop_proxy(proxy)
        proxy = None
        if variant == "sclb":
            state = proxy_files(s, variant)[1]
            last = saves[-1][1] if saves else None
            if last and state.exists():
                state.replace(last)  # written at the graceful stop: the largest N
            state.unlink(missing_ok=True)
            p, empty = start_proxy(s, variant, cfg, "sclb-start-empty")
            stop_proxy(p)
            for n, path in saves:  # load time: start to listening with that state file
                path.replace(proxy_files(s, variant)[1])  # moved, not copied: 10^6 pins are 100 MB
                p, secs = start_proxy(s, variant, cfg, f"sclb-load-{n}")
                try:
                    used = table_used(p.sock)
                finally:
                    stop_proxy(p)
                if used != n:
                    raise b.BenchError(f"sclb restored {used} pins from a file of {n}")
                f = next(r for r in rows if r.variant == variant and r.n == n).figures
                f.update(start_ms=secs * 1000, load_ms=max(0.0, secs - empty) * 1000)
    finally:
        if proxy:
            b.PROCS.stop(proxy.proc)
        b.stop_backend(be)


# ----------------------------------------------------------------- sessions

# The gateway's limits opened wide: every session comes from one client (127.0.0.1) and the
# harness opens them as fast as it can. The reaper runs every second, so its cost shows.
SESSION_LIMITS = ('sessions = { max = 1000000, max_per_client = 1000000, rate_per_client = 1000000, '
                  'cleanup_interval = "1s", idle_timeout = "30m", max_ttl = "4h" }')


def render_gateway(s: ScaleSettings, be: b.Backend) -> Path:
    sock, _ = proxy_files(s, "sclb")
    text = b.render(b.BENCH / "sclb-gateway.toml", s.sclb_port, b.REF_SCLB_PORT, be)
    text = text.replace("[global]\n", f'[global]\nadmin = {{ path = "{sock}" }}\n', 1)
    if 'mode = "grpc"\n' not in text:
        raise b.BenchError("bench/sclb-gateway.toml no longer has a mode = \"grpc\" frontend")
    text = text.replace('mode = "grpc"\n', f'mode = "grpc"\n{SESSION_LIMITS}\n', 1)
    cfg = s.workdir / "sclb-gateway-scale.toml"
    cfg.write_text(text)
    return cfg


def live_sessions(sock: Path) -> tuple[int, int, float]:
    """`show sessions`: (the count in its header, session lines, seconds)."""
    out, secs = b.admin(sock, "show sessions")
    m = re.match(r"# sessions: (\d+)", out)
    if not m:
        raise b.BenchError(f"show sessions: unexpected answer {out[:200]!r}")
    return int(m.group(1)), sum(1 for line in out.splitlines()[1:] if ": user=" in line), secs


def idle_cpu_ms_per_min(pid: int, secs: float) -> float:
    """The proxy's CPU while nothing is sent: timers, health checks, the session reaper."""
    c0, t0 = b.cpu_seconds(pid), time.monotonic()
    time.sleep(secs)
    return (b.cpu_seconds(pid) - c0) * 1000 * 60 / (time.monotonic() - t0)


def run_sessions(s: ScaleSettings, rows: list[Row]) -> None:
    be = b.start_backend(s, "grpc")
    proxy = None
    try:
        cfg = render_gateway(s, be)
        proxy, _ = start_proxy(s, "sclb", cfg, "sclb-gateway-sessions")
        b.probe("grpc", b.HOST, proxy.port, what="sclb-gateway")  # one session: the probe's
        time.sleep(1.0)
        base_sessions = live_sessions(proxy.sock)[0]
        base_rss = b.rss_kb(proxy.proc.pid)
        base_cpu = idle_cpu_ms_per_min(proxy.proc.pid, s.idle_s)
        print(f"  sessions: base RSS {base_rss} kB, idle CPU {base_cpu:.0f} ms/min", flush=True)
        opened, prev_rss = 0, base_rss
        for n in s.session_ns:
            cpu0 = b.cpu_seconds(proxy.proc.pid)
            calls = b.PROCS.run(f"sessions-fill-{n}", [b.TOOL, "grpccalls", b.HOST, proxy.port, b.GRPC_BODY,
                                                       n - opened, 16, FIRST_SESSION + opened, 1800],
                                timeout=1830)
            r = json.loads(calls.strip().splitlines()[-1])
            if r["errors"] or r["unfinished"]:
                raise b.BenchError(f"sessions: {r['errors']} failed and {r['unfinished']} unfinished "
                                   f"calls of {n - opened}")
            fill_cpu = b.cpu_seconds(proxy.proc.pid) - cpu0
            live, lines, secs = live_sessions(proxy.sock)
            if live - base_sessions != n or lines != live:
                raise b.BenchError(f"sessions: {live} live ({lines} listed) after opening {n}")
            time.sleep(1.0)
            rss = b.rss_kb(proxy.proc.pid)
            f = {"sessions": n, "rss_kb": rss,
                 "bytes_per_session": (rss - base_rss) * 1024 / n,
                 "bytes_per_session_marginal": (rss - prev_rss) * 1024 / (n - opened),
                 "new_sessions_per_s": r["per_s"], "cpu_us_per_new_session": fill_cpu * 1e6 / (n - opened),
                 "first_rpc_p50_us": r["p50_us"], "first_rpc_p99_us": r["p99_us"],
                 "show_sessions_ms": statistics.median([secs] + [live_sessions(proxy.sock)[2] for _ in range(2)])
                 * 1000}
            cpu = idle_cpu_ms_per_min(proxy.proc.pid, s.idle_s)
            f.update(idle_cpu_ms_per_min=cpu, reaper_cpu_ms_per_min=cpu - base_cpu)
            f["reload_ms"] = statistics.median(sclb_reload(proxy.sock) for _ in range(3)) * 1000
            if live_sessions(proxy.sock)[0] != live:
                raise b.BenchError("sessions: a reload changed the live sessions")
            if not proxy.proc.alive():
                raise b.Broken(f"sclb-gateway died:\n{proxy.proc.log_tail()}")
            rows.append(Row("sessions", "sclb", n, f))
            print(f"  sessions N={n}: {f['bytes_per_session']:.0f} B/session, {r['per_s']:.0f} new/s, "
                  f"idle CPU {cpu:.0f} ms/min, show sessions {f['show_sessions_ms']:.0f} ms", flush=True)
            opened, prev_rss = n, rss
    finally:
        if proxy:
            b.PROCS.stop(proxy.proc)
        b.stop_backend(be)


# ------------------------------------------------------------------ servers

SERVERS_FIRST_PORT = 20000  # the N servers listen on 127.0.0.1:20000.. (BENCH_SERVERS_PORT)


def render_servers(s: ScaleSettings, variant: str, algo: str, ports: list[int]) -> Path:
    """The bench's config with N servers, `algo`, no stick table and no health checks (so
    that a connection's cost is the pick's, not a check's or a pin's)."""
    be = b.Backend("echo1", [f"{b.HOST}:{p}" for p in ports[:3]])
    sock, _ = proxy_files(s, variant)
    if variant == "haproxy":
        text = b.render(b.BENCH / "haproxy.cfg", s.haproxy_port, b.REF_HAPROXY_PORT, be)
        text = re.sub(r"^global\n", f"global\n    stats socket {sock} mode 600 level admin\n", text,
                      count=1, flags=re.M)
        text = re.sub(r"^\s*(stick-table|stick on|default-server|server) .*\n", "", text, flags=re.M)
        text = text.replace("    balance source\n", f"    balance {algo}\n", 1)
        text += "".join(f"    server s{i + 1} {b.HOST}:{p}\n" for i, p in enumerate(ports))
        cfg = s.workdir / f"haproxy-servers-{algo}-{len(ports)}.cfg"
    else:
        text = b.render(b.BENCH / "sclb.toml", s.sclb_port, b.REF_SCLB_PORT, be)
        text = text.replace("[global]\n", f'[global]\nadmin = {{ path = "{sock}" }}\n', 1)
        text = re.sub(r"^(stick|check|servers) = .*\n", "", text, flags=re.M)
        text = text.replace('balance = "source"\n', f'balance = "{algo}"\n', 1)
        text += "servers = [\n" + "".join(f'  {{ name = "s{i + 1}", addr = "{b.HOST}:{p}" }},\n'
                                        for i, p in enumerate(ports)) + "]\n"
        cfg = s.workdir / f"sclb-servers-{algo}-{len(ports)}.toml"
    if algo not in text:
        raise b.BenchError(f"{variant}: could not set balance {algo} in {cfg}")
    cfg.write_text(text)
    return cfg


def run_servers(s: ScaleSettings, variant: str, rows: list[Row], direct: dict) -> None:
    first = int(os.environ.get("BENCH_SERVERS_PORT", SERVERS_FIRST_PORT))
    ports = list(range(first, first + max(s.server_ns)))
    busy = sorted(set(ports) & b.listening_ports())
    if busy:
        raise b.BenchError(f"servers: ports {busy[:5]} in use (set BENCH_SERVERS_PORT)")
    backend = b.PROCS.start("backend-echo1-servers", [b.TOOL, "echo1", 3600, *ports])
    count = 3000 if s.quick else 20000
    try:
        deadline = time.monotonic() + 30
        while not set(ports) <= b.listening_ports():
            if time.monotonic() > deadline or not backend.alive():
                raise b.Broken(f"servers: the echo1 backend does not listen:\n{backend.log_tail()}")
            time.sleep(0.1)
        for n in s.server_ns:
            for algo in ALGOS:
                cfg = render_servers(s, variant, algo, ports[:n])
                proxy, start_s = start_proxy(s, variant, cfg, f"{variant}-servers-{algo}-{n}")
                try:
                    conns(f"{variant}-servers-warm-{algo}-{n}", proxy.port, 500, 16, 0, 0, "seq", 60)
                    cpu0 = b.cpu_seconds(proxy.proc.pid)
                    load = conns(f"{variant}-servers-{algo}-{n}", proxy.port, count, 32, 1000, 0, "seq", 600)
                    cpu = b.cpu_seconds(proxy.proc.pid) - cpu0
                    lat = conns(f"{variant}-servers-lat-{algo}-{n}", proxy.port, s.samples // 2, 1, 0,
                                10_000_000, "rand", 600)
                    f = {"cpu_us_per_conn": cpu * 1e6 / count, "conns_per_s": load["per_s"],
                         "conn_added_p50_us": lat["p50_us"] - direct["p50_us"],
                         "conn_added_p99_us": lat["p99_us"] - direct["p99_us"],
                         "start_ms": start_s * 1000}
                    if variant == "sclb":  # reload with nothing changed: the admin answer
                        f["reload_ms"] = statistics.median(b.admin(proxy.sock, "reload")[1] for _ in range(3)) * 1000
                    if not proxy.proc.alive():
                        raise b.Broken(f"{variant} died:\n{proxy.proc.log_tail()}")
                finally:
                    b.PROCS.stop(proxy.proc)
                rows.append(Row(f"servers-{algo}", variant, n, f))
                print(f"  servers {variant} {algo} N={n}: {f['cpu_us_per_conn']:.0f} µs CPU/conn, "
                      f"added p50 {f['conn_added_p50_us']:+.0f} µs"
                      + (f", reload {f['reload_ms']:.0f} ms" if 'reload_ms' in f else ""), flush=True)
    finally:
        b.PROCS.stop(backend)


def direct_baseline(s: ScaleSettings) -> dict:
    """Connect-to-echo latency straight to an echo1 backend (no proxy): the added latency's zero."""
    be = b.start_backend(s, "echo1")
    try:
        port = int(be.addrs[0].rsplit(":", 1)[1])
        return conns("direct-connlat", port, s.samples, 1, 0, 1000, "rand", 600)
    finally:
        b.stop_backend(be)


# ------------------------------------------------------------------- report

PIN_COLUMNS = [  # (figure key, header, format)
    ("rss_kb", "RSS MB", lambda v: f"{v / 1024:.1f}"),
    ("bytes_per_entry", "B/entry", lambda v: f"{v:.0f}"),
    ("bytes_per_entry_marginal", "B/entry (since last N)", lambda v: f"{v:.0f}"),
    ("fill_conns_per_s", "fill conns/s", lambda v: f"{v:.0f}"),
    ("cpu_us_per_new_pin", "CPU µs per new conn+pin", lambda v: f"{v:.0f}"),
    ("conn_added_p50_us", "connect added p50 µs", lambda v: f"{v:+.0f}"),
    ("conn_added_p99_us", "connect added p99 µs", lambda v: f"{v:+.0f}"),
    ("show_table_ms", "show table ms", lambda v: f"{v:.1f}"),
    ("save_ms", "save ms", lambda v: f"{v:.1f}"),
    ("start_ms", "start with the file ms", lambda v: f"{v:.0f}"),
    ("load_ms", "… minus an empty start", lambda v: f"{v:.0f}"),
    ("base_pingpong_p99_us", "ping-pong p99 µs: alone", lambda v: f"{v:.0f}"),
    ("show_pingpong_p99_us", "… during show table", lambda v: f"{v:.0f}"),
    ("save_pingpong_p99_us", "… during saves", lambda v: f"{v:.0f}"),
    ("base_conn_p99_us", "new conn p99 µs: alone", lambda v: f"{v:.0f}"),
    ("show_conn_p99_us", "… during show table", lambda v: f"{v:.0f}"),
    ("save_conn_p99_us", "… during saves", lambda v: f"{v:.0f}"),
    ("base_conn_max_us", "new conn max µs: alone", lambda v: f"{v:.0f}"),
    ("show_conn_max_us", "… during show table", lambda v: f"{v:.0f}"),
    ("save_conn_max_us", "… during saves", lambda v: f"{v:.0f}"),
    ("reload_loop_median_ms", "reload ms (median)", lambda v: f"{v:.1f}"),
    ("reload_conn_p99_us", "new conn p99 µs during reloads", lambda v: f"{v:.0f}"),
    ("reload_conn_errors", "new conns refused/failed during reloads", lambda v: f"{v:.0f}"),
    ("reload_loop_runs", "reloads run", lambda v: f"{v:.0f}"),
    ("show_loop_runs", "show tables run", lambda v: f"{v:.0f}"),
    ("save_loop_runs", "saves run", lambda v: f"{v:.0f}"),
]


COLORS = {"haproxy": "#8c8c8c", "sclb": "#e4572e", "direct": "#1b9e77"}


def chart(s: ScaleSettings, rows: list[Row], png: Path) -> str | None:
    """Curves (x = N, log scale) with gnuplot: one panel per figure, one line per proxy."""
    if not shutil.which("gnuplot"):
        return "gnuplot missing: no chart"
    panels = [  # (part, title, y log?, [(variant, key, label, dashtype)])
        ("pins", "RSS per stick entry, bytes (lower is better)", False,
         [(v, "bytes_per_entry", f"{v}", 1) for v in s.proxies]),
        ("pins", "connect path, added latency of a pinned client, µs", False,
         [(v, k, f"{v} {lbl}", d) for v in s.proxies
          for k, lbl, d in (("conn_added_p50_us", "p50", 2), ("conn_added_p99_us", "p99", 1))]),
        ("pins", "show table / state file, ms (log)", True,
         [(v, "show_table_ms", f"{v} show table", 1) for v in s.proxies]
         + [("sclb", "save_ms", "sclb save", 2), ("sclb", "load_ms", "sclb load (start minus empty start)", 3)]),
        ("pins", "ping-pong (established connection) p99 / max, µs (log)", True,
         [(v, k, f"{v} {lbl}", d) for v in s.proxies
          for k, lbl, d in (("base_pingpong_p99_us", "p99 alone", 1),
                            ("show_pingpong_p99_us", "p99 + show table", 2),
                            ("save_pingpong_p99_us", "p99 + saves", 3),
                            ("show_pingpong_max_us", "max + show table", 4))]),
        ("pins", "new connection (pinned client) p99 / max, µs (log)", True,
         [(v, k, f"{v} {lbl}", d) for v in s.proxies
          for k, lbl, d in (("base_conn_p99_us", "p99 alone", 1),
                            ("show_conn_p99_us", "p99 + show table", 2),
                            ("save_conn_p99_us", "p99 + saves", 3),
                            ("show_conn_max_us", "max + show table", 4),
                            ("save_conn_max_us", "max + saves", 5))]),
        ("sessions", "RSS per live gateway session, bytes", False,
         [("sclb", "bytes_per_session", "sclb-gateway", 1)]),
        ("sessions", "idle CPU (session reaper every 1 s), ms per minute", False,
         [("sclb", "reaper_cpu_ms_per_min", "sclb-gateway, above the idle baseline", 1)]),
        ("sessions", "show sessions, ms (log)", True,
         [("sclb", "show_sessions_ms", "sclb-gateway", 1)]),
        ("sessions", "first RPC of a new session, µs (log)", True,
         [("sclb", "first_rpc_p50_us", "p50 (16 in flight)", 2), ("sclb", "first_rpc_p99_us", "p99", 1)]),
    ]
    panels += [
        ("servers-" + algo, f"balance {algo}: proxy CPU per connection, µs", False,
         [(v, "cpu_us_per_conn", v, 1) for v in s.proxies]) for algo in ALGOS]
    panels.append(("servers-roundrobin", "sclb reload with nothing changed, ms", False,
                   [("sclb", "reload_ms", "N servers (roundrobin)", 1)]))
    panels.append(("pins", "sclb reload with N pins: ms, and new connections failed", False,
                   [("sclb", "reload_loop_median_ms", "reload ms (median)", 1),
                    ("sclb", "reload_conn_errors", "connections failed during reloads", 2)]))
    panels.append(("sessions", "sclb reload with N sessions, ms", False,
                   [("sclb", "reload_ms", "reload ms (median of 3)", 1)]))
    panels += scale_gwconc.PANELS
    xlabel = {"pins": "N (stick entries)", "sessions": "N (live sessions)", "gwconc": scale_gwconc.XLABEL}
    xlabel.update({"servers-" + a: "N (servers in the backend)" for a in ALGOS})
    plots = []
    for i, (part, title, ylog, series) in enumerate(panels):
        curves = []
        for j, (variant, key, label, dash) in enumerate(series):
            pts = sorted((r.n, r.figures[key]) for r in rows
                         if r.part == part and r.variant == variant and key in r.figures)
            if not pts or (ylog and any(y <= 0 for _, y in pts)):
                continue
            dat = s.workdir / f"scale{i}-{j}.dat"
            dat.write_text("".join(f"{x}\t{y}\n" for x, y in pts))
            curves.append(f"'{dat}' using 1:2 with linespoints linewidth 2 dashtype {dash} pointtype 7 "
                          f"linecolor rgb '{COLORS[variant]}' title '{label}'")
        if curves:
            plots.append(f"set title '{title}'\nset xlabel '{xlabel[part]}'\n"
                         f"{'set logscale y' if ylog else 'unset logscale y'}\n"
                         f"plot " + ", \\\n  ".join(curves))
    if not plots:
        return "no figures: no chart"
    rows_n = (len(plots) + 1) // 2
    script = f"""set terminal pngcairo size 1200,{400 * rows_n} font 'sans,10'
set output '{png}'
set datafile separator '\\t'
set logscale x
set format x '10^{{%L}}'
set grid
set key top left font ',8'
set multiplot layout {rows_n},2 title 'sclb scale curves {s.stamp}{" (quick)" if s.quick else ""}'
{chr(10).join(plots)}
unset multiplot
"""
    (s.workdir / "scale.gp").write_text(script)
    r = subprocess.run(["gnuplot", str(s.workdir / "scale.gp")], capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 and png.exists() else f"gnuplot failed: {r.stderr[-300:]}"


SESSION_COLUMNS = [
    ("rss_kb", "RSS MB", lambda v: f"{v / 1024:.1f}"),
    ("bytes_per_session", "B/session", lambda v: f"{v:.0f}"),
    ("bytes_per_session_marginal", "B/session (since last N)", lambda v: f"{v:.0f}"),
    ("new_sessions_per_s", "new sessions/s", lambda v: f"{v:.0f}"),
    ("cpu_us_per_new_session", "CPU µs per new session", lambda v: f"{v:.0f}"),
    ("first_rpc_p50_us", "first RPC p50 µs", lambda v: f"{v:.0f}"),
    ("first_rpc_p99_us", "first RPC p99 µs", lambda v: f"{v:.0f}"),
    ("show_sessions_ms", "show sessions ms", lambda v: f"{v:.1f}"),
    ("idle_cpu_ms_per_min", "idle CPU ms/min", lambda v: f"{v:.0f}"),
    ("reaper_cpu_ms_per_min", "… above N=0", lambda v: f"{v:+.0f}"),
    ("reload_ms", "reload ms", lambda v: f"{v:.1f}"),
]


SERVER_COLUMNS = [
    ("cpu_us_per_conn", "CPU µs per connection", lambda v: f"{v:.0f}"),
    ("conns_per_s", "conns/s (32 in flight)", lambda v: f"{v:.0f}"),
    ("conn_added_p50_us", "added p50 µs (1 at a time)", lambda v: f"{v:+.0f}"),
    ("conn_added_p99_us", "added p99 µs", lambda v: f"{v:+.0f}"),
    ("start_ms", "start ms", lambda v: f"{v:.0f}"),
    ("reload_ms", "reload (nothing changed) ms", lambda v: f"{v:.1f}"),
]


def figures_table(rows: list[Row], part: str, columns: list) -> str:
    rs = [r for r in rows if r.part == part]
    if not rs:
        return f"(no {part} figures)"
    cols = [c for c in columns if any(c[0] in r.figures for r in rs)]
    lines = ["| N | proxy | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---:|---|" + "---:|" * len(cols)]
    for r in sorted(rs, key=lambda r: (r.n, r.variant)):
        cells = [fmt(r.figures[k]) if k in r.figures else "–" for k, _, fmt in cols]
        lines.append(f"| {r.n:,} | {r.variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(s: ScaleSettings, rows: list[Row], errors: list[str], envlog: list[str],
                 direct: dict | None) -> Path:
    s.outdir.mkdir(parents=True, exist_ok=True)
    base = s.outdir / f"{s.stamp}-scale{'-quick' if s.quick else ''}"
    png = base.with_suffix(".png")
    problem = chart(s, rows, png)
    pins = figures_table(rows, "pins", PIN_COLUMNS)
    sessions = figures_table(rows, "sessions", SESSION_COLUMNS)
    servers = "\n\n".join(f"`balance {a}`:\n\n" + figures_table(rows, "servers-" + a, SERVER_COLUMNS)
                          for a in ALGOS if any(r.part == "servers-" + a for r in rows))
    doc = [f"# sclb scale curves {s.stamp}{' (quick: small N, the harness works)' if s.quick else ''}", "",
           "How the cost grows with the work held. See bench/README.md (Scale curves).", "",
           "## Stick table pins (stick on src, type ip, server id + expiry)", "",
           "Filled by real connections, one per source address 127.x.y.z. B/entry = (RSS − RSS of "
           "the empty table) ÷ N. Connect latency: connect → 1-byte echo of a new connection from a "
           f"pinned client (random among the N), {s.samples} one at a time; added = minus the same "
           "straight to the backend" + (f" (direct p50 {direct['p50_us']:.0f} µs, p99 "
                                         f"{direct['p99_us']:.0f} µs)" if direct else "") + ". "
           "Save: an admin change, which answers once the state file is on disk (sclb only; "
           "HAProxy keeps no stick-table file). Start with the file: sclb start to listening "
           "(and its admin socket answering) with that file; minus an empty start = the load. "
           f"Stall probes: {s.stall_s:g} s of ping-pong (one connection, 64 B) and new "
           "connections one at a time, alone, then while `show table` (or a save, or a `reload`) "
           "runs in a loop.",
           "", pins, "",
           "## Live gateway sessions (sclb `mode = \"grpc\"`; HAProxy has no equivalent)", "",
           "Opened by unary Config calls (one new Spark session id each, 16 in flight, one h2c "
           "connection) through the gateway to `benchtool grpc`. B/session = (RSS − RSS before) ÷ N. "
           f"Idle CPU: the process's CPU over {s.idle_s:g} s with no traffic and `cleanup_interval = 1s` "
           "(nothing expires: idle_timeout 30m); '… above N=0' is what the N sessions add, i.e. the "
           "session reaper's cost of finding nothing to do.", "", sessions, "",
           *scale_gwconc.section(s, rows, figures_table),
           "## Servers in a backend", "",
           "N servers (all `benchtool echo1`, one port each), no stick table, no health checks, so "
           "a connection's cost is the pick's. CPU per connection over 20,000 connections (32 in "
           "flight, distinct sources); added latency of connections one at a time; reload: sclb's "
           "`reload` on the admin socket with the file unchanged (median of 3).", "",
           servers or "(no servers figures)", "",
           "## Pods in a Kubernetes watch (sclb `discovery.kubernetes`, the real kube-apiserver)", "",
           "N pods created in batches and made Running + Ready by PATCHing their status (the bench "
           "plays the kubelet), one 127.3.x.y podIP each; sclb watches them (`kind = \"pods\"`, a "
           "selector, no health checks). B/pod = (RSS − RSS before any pod) ÷ N. Event → routable: "
           "a pod goes NotReady then Ready; from the Ready PATCH's answer until `get weight` names "
           "it. CPU per event: pods flipped NotReady then Ready, sclb's CPU ÷ events. See "
           "bench/scale_watch.py.", "",
           figures_table(rows, "watch", scale_watch.WATCH_COLUMNS), ""]
    if errors:
        doc += ["## Errors", ""] + [f"- {e.splitlines()[0]}" for e in errors] + [""]
    doc += ["## Environment", "", "```"] + envlog + ["```", ""]
    doc.append(f"![scale curves]({png.name})" if problem is None else f"(chart: {problem})")
    md = base.with_suffix(".md")
    md.write_text("\n".join(doc) + "\n")
    (s.workdir / "scale-rows.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    print("\n" + pins + "\n\n" + sessions + "\n\n" + figures_table(rows, "gwconc", scale_gwconc.COLUMNS)
          + "\n\n" + "\n".join(scale_gwconc.verdicts(rows, s.quick)) + "\n\n" + servers + "\n\n"
          + figures_table(rows, "watch", scale_watch.WATCH_COLUMNS) + "\n")
    for e in errors:
        print(f"ERROR: {e}", file=sys.stderr)
    print(f"bench: wrote {md}" + (f" and {png}" if problem is None else f" ({problem})"))
    return md


def environment(s: ScaleSettings, sclb_note: str) -> list[str]:
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
    mem = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    git = subprocess.run(["git", "-C", str(b.REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip() or "no commit"
    return [
        f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"mode: {'quick' if s.quick else 'full'}; pins N = {','.join(map(str, s.pin_ns))}; "
        f"gwconc N = {','.join(map(str, s.gwconc_ns))}",
        f"cpus: {os.cpu_count()}  model name: {model.group(1) if model else '?'}  "
        f"memory: {int(mem.group(1)) // 1024 if mem else '?'} MiB",
        f"haproxy: {b.tool_version(['haproxy', '-v'])}",
        f"sclb: {sclb_note}; repo HEAD {git}",
        f"loadavg before: {b.loadavg()}",
        f"{b.memcpy_probe()} (before)",
    ]


def main(argv: list[str]) -> int:
    s = parse_args(argv)
    s.stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    s.workdir = b.BENCH / ".work" / f"{s.stamp}-scale"
    s.workdir.mkdir(parents=True, exist_ok=True)
    b.tidy_workdirs(s.workdir)
    b.PROCS.logdir = s.workdir
    signal.signal(signal.SIGTERM, b._on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, b._on_signal)
    rows: list[Row] = []
    errors: list[str] = []
    t_start, cpu0 = time.monotonic(), b.cpu_times()
    try:
        if not b.TOOL.exists():
            raise b.BenchError(f"{b.TOOL} missing: start the bench with bench/run, which compiles it")
        busy = [p for p in (s.haproxy_port, s.sclb_port, *s.backend_ports) if b.listening(p)]
        if busy:
            raise b.BenchError(f"port(s) {busy} already in use (see bench/README.md)")
        sclb_ok, sclb_note = b.prepare_sclb(s) if "sclb" in s.proxies else (False, "not selected")
        proxies = [v for v in s.proxies if v != "sclb" or sclb_ok]
        s.sclb_ok = sclb_ok
        print(f"bench: scale {'quick ' if s.quick else ''}run {s.stamp}, parts {','.join(s.parts)}, "
              f"proxies {','.join(proxies)}; sclb: {sclb_note}; logs in {s.workdir}", flush=True)
        envlog = environment(s, sclb_note)
        direct = None
        def run(what: str, fn) -> None:  # one part for one proxy: its error is recorded, the run goes on
            t0 = time.monotonic()
            try:
                fn()
            except b.BenchError as exc:
                errors.append(f"{what}: {exc}")
            print(f"  {what}: {time.monotonic() - t0:.0f} s", flush=True)

        direct = direct_baseline(s) if {"pins", "servers"} & set(s.parts) else None
        for part, runner in (("pins", run_pins), ("servers", run_servers)):
            if part in s.parts:
                for variant in proxies:
                    run(f"{part} {variant}", lambda: runner(s, variant, rows, direct))
        if "sessions" in s.parts and sclb_ok and "sclb" in s.proxies:
            run("sessions", lambda: run_sessions(s, rows))
        if "watch" in s.parts and sclb_ok and "sclb" in s.proxies:
            run("watch", lambda: scale_watch.run_watch(s, rows, s.watch_ns, Row))
        if "gwconc" in s.parts:
            run("gwconc", lambda: scale_gwconc.run_gwconc(s, rows, Row, SESSION_LIMITS))
        d = [y - x for x, y in zip(cpu0, b.cpu_times())]
        total = sum(d) or 1
        envlog.append(f"machine busy {100 * (total - d[3] - d[4]) / total:.0f}% over the run "
                      f"(this run's own load included), steal {100 * d[7] / total:.1f}%")
        envlog += s.notes
        envlog.append(f"{b.memcpy_probe()} (after)")
        envlog.append(f"loadavg after: {b.loadavg()}; total {time.monotonic() - t_start:.0f} s")
        write_report(s, rows, errors, envlog, direct)
    except b.BenchError as exc:
        print(f"bench: ERROR: {exc}", file=sys.stderr)
        return 1
    finally:
        b.PROCS.stop_all()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
