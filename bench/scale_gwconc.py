"""bench/run --scale, part `gwconc`: N concurrent Spark sessions doing small RPCs, straight to
the servers, through HAProxy `mode http` (h2 on both sides, bench/haproxy-http.cfg) and
through the sclb gateway (bench/sclb-gateway.toml), in one run.

`benchtool grpcconc` keeps N h2c connections open, each from its own source address (so that
both proxies' `balance source` spread them over the three `benchtool grpc` servers) and each
carrying its own Spark session id, as PySpark keeps one channel per session. Every connection
opens its session with one call, then makes unary Config calls (the request the gateway
scenario sends), at most one in flight per connection, in two phases:

- paced: RATE calls/s offered over all N connections (open loop; a call's latency counts from
  when it was due, so a proxy that falls behind shows it): latency p50/p99, and added
  latency = minus the same straight to the servers; the proxy's CPU per call;
- closed loop: each connection calls again as soon as its call returns (N calls in flight):
  calls/s, and calls per proxy CPU-second, the proxy's utime+stime over the window.

The target (issue 22): sclb at least as good as HAProxy at every N, in calls per CPU-second
and in added p50/p99. Every error (a status other than 200, grpc-status other than 0, a
RST_STREAM, a lost connection, a call unanswered after the window) is counted and shown, and
makes the part fail.

Python standard library only.
"""
from __future__ import annotations

import json
import os
import re
import resource
import select
import subprocess
import time
from pathlib import Path

import bench as b

VARIANTS = ("direct", "haproxy", "sclb")
# Client source addresses: address k is 127.1.0.0 + k (benchtool conns), this range is the part's.
ADDR_BASE = 0x200000
SESSION_BASE = 1 << 36  # session ids' last 12 hex digits: this + the connection's number
# The proxies' descriptors per client connection in their budgets (client + server socket):
# N must fit twice in the fd limit with room for the rest.
FD_PER_CONN, FD_ROOM = 2, 512

COLUMNS = [  # (figure key, header, format)
    ("opened", "sessions open", lambda v: f"{v:,.0f}"),
    ("errors", "errors", lambda v: f"{v:.0f}"),
    ("paced_per_s", "paced calls/s", lambda v: f"{v:,.0f}"),
    ("paced_p50_us", "p50 µs", lambda v: f"{v:.0f}"),
    ("paced_p99_us", "p99 µs", lambda v: f"{v:.0f}"),
    ("paced_added_p50_us", "added p50 µs", lambda v: f"{v:+.0f}"),
    ("paced_added_p99_us", "added p99 µs", lambda v: f"{v:+.0f}"),
    ("paced_cpu_us_per_rpc", "proxy CPU µs/call (paced)", lambda v: f"{v:.1f}"),
    ("paced_behind", "paced calls never sent", lambda v: f"{v:.0f}"),
    ("paced_pings_per_call", "proxy PINGs per call", lambda v: f"{v:.2f}"),
    ("closed_per_s", "closed-loop calls/s", lambda v: f"{v:,.0f}"),
    ("closed_p50_us", "p50 µs", lambda v: f"{v:,.0f}"),
    ("closed_p99_us", "p99 µs", lambda v: f"{v:,.0f}"),
    ("closed_cpu_pct", "proxy CPU %", lambda v: f"{v:.0f}"),
    ("closed_rpcs_per_cpu_s", "calls per proxy CPU-s", lambda v: f"{v:,.0f}"),
]

PANELS = [  # (part, title, y log?, [(variant, key, label, dashtype)]), for scale.chart
    ("gwconc", "N sessions, closed loop: calls per proxy CPU-second (target: sclb ≥ haproxy)", False,
     [("haproxy", "closed_rpcs_per_cpu_s", "haproxy mode http (the target line)", 2),
      ("sclb", "closed_rpcs_per_cpu_s", "sclb gateway", 1)]),
    ("gwconc", "N sessions, closed loop: calls/s", False,
     [(v, "closed_per_s", v, 1) for v in VARIANTS]),
    ("gwconc", "N sessions, paced: added latency µs (target: sclb ≤ haproxy)", False,
     [(v, k, f"{v} {lbl}", d) for v in ("haproxy", "sclb")
      for k, lbl, d in (("paced_added_p50_us", "p50", 2), ("paced_added_p99_us", "p99", 1))]),
]
XLABEL = "N (concurrent sessions, one h2 connection each)"


def fitting_ns(ns: list[int]) -> tuple[list[int], str | None]:
    """The N that the hard fd limit can hold (it cannot be raised here without privileges);
    a larger N is lowered to the largest round number that fits, and the note says so."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return ns, None
    cap = (hard - FD_ROOM) // FD_PER_CONN
    step = 10 ** max(0, len(str(cap)) - 1)
    top = cap // step * step
    fitted = sorted({min(n, top) for n in ns})
    if fitted == ns:
        return ns, None
    return fitted, (f"gwconc: N above {top:,} lowered to {top:,}: the hard fd limit is {hard:,} and "
                    f"each proxy budgets {FD_PER_CONN} descriptors per client connection")


def render(s, variant: str, be: b.Backend, maxconn: int, session_limits: str) -> Path:
    """The bench's L7 config with maxconn raised to hold the largest N (and, for sclb, the
    session limits of the sessions part: every session is accepted)."""
    if variant == "haproxy":
        text = b.render(b.BENCH / "haproxy-http.cfg", s.haproxy_port, b.REF_HAPROXY_PORT, be)
        text, k = re.subn(r"^(\s*)maxconn \d+$", rf"\g<1>maxconn {maxconn}", text, flags=re.M)
        want, cfg = 2, s.workdir / "haproxy-http-gwconc.cfg"
    else:
        text = b.render(b.BENCH / "sclb-gateway.toml", s.sclb_port, b.REF_SCLB_PORT, be)
        text, k = re.subn(r"^maxconn = \d+$", f"maxconn = {maxconn}", text, flags=re.M)
        if 'mode = "grpc"\n' not in text:
            raise b.BenchError('bench/sclb-gateway.toml no longer has a mode = "grpc" frontend')
        text = text.replace('mode = "grpc"\n', f'mode = "grpc"\n{session_limits}\n', 1)
        want, cfg = 1, s.workdir / "sclb-gateway-gwconc.toml"
    if k != want:
        raise b.BenchError(f"gwconc: the {variant} config's maxconn lines moved ({k} found)")
    cfg.write_text(text)
    return cfg


def start(s, variant: str, cfg: Path, n: int) -> tuple[b.Proc, int]:
    if variant == "haproxy":
        proc, port = b.PROCS.start(f"gwconc-haproxy-{n}", ["haproxy", "-db", "-f", cfg]), s.haproxy_port
    else:
        proc, port = b.PROCS.start(f"gwconc-sclb-{n}", [s.sclb_bin, "-c", cfg]), s.sclb_port
    try:
        b.wait_listening([port], [proc], timeout=60)
        b.probe("grpc", b.HOST, port, what=f"gwconc {variant}")
    except b.BenchError:
        b.PROCS.stop(proc)
        raise
    return proc, port


def client(s, name: str, port: int, n: int, pid: int | None) -> tuple[dict, dict]:
    """Runs benchtool grpcconc; samples the proxy's CPU at each window's edges as the tool
    announces them. Returns (its JSON result, {phase: (proxy CPU seconds, wall seconds)})."""
    argv = [b.TOOL, "grpcconc", b.HOST, port, b.GRPC_BODY, n, ADDR_BASE, SESSION_BASE,
            f"{s.gwconc_rate:g}", f"{s.gwconc_warm_s:g}", f"{s.gwconc_s:g}"]
    proc = b.PROCS.start(name, argv, stdout=subprocess.PIPE)
    marks: dict[tuple[str, str], tuple[float, float]] = {}
    result, buf = None, b""
    # the tool's own bounds: 300 s to open, and per phase warm-up + window + a 10 s drain
    bound = 300 + 2 * (s.gwconc_warm_s + s.gwconc_s + 10) + 30
    deadline = time.monotonic() + bound
    fd = proc.popen.stdout.fileno()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise b.BenchError(f"{name}: no result within {bound:.0f} s")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode(errors="replace").split()
                if words[:1] == ["window"] and len(words) == 3:
                    marks[(words[1], words[2])] = (time.monotonic(), b.cpu_seconds(pid) if pid else 0.0)
                elif line.startswith(b"{"):
                    result = json.loads(line)
        rc = proc.popen.wait(30)
    finally:
        b.PROCS.stop(proc)
    if result is None:
        raise b.BenchError(f"{name} exited with {rc} and no result: {proc.log_tail(5)}")
    cpu = {ph: (marks[(ph, "end")][1] - marks[(ph, "start")][1], marks[(ph, "end")][0] - marks[(ph, "start")][0])
           for ph in ("paced", "closed") if (ph, "start") in marks and (ph, "end") in marks}
    return result, cpu


def figures(r: dict, cpu: dict, proxied: bool) -> dict:
    f = {"opened": r["opened"], "open_s": r["open_s"]}
    errors = r["open_failed"]
    for ph in ("paced", "closed"):
        p = r.get(ph)
        if not p:
            continue
        errors += p["errors"] + p["conns_lost"] + p["unfinished"]
        f[f"{ph}_per_s"] = p["per_s"]
        f.update({f"{ph}_{k}": p[k] for k in ("p50_us", "p99_us", "p999_us", "max_us") if k in p})
        if ph == "paced":
            f["paced_behind"] = p["behind"]
            if p["count"]:
                f["paced_pings_per_call"] = p.get("server_pings", 0) / p["count"]
        used, wall = cpu.get(ph, (0.0, 0.0))
        if proxied and wall > 0:
            f[f"{ph}_cpu_pct"] = 100 * used / wall
            if p["count"]:
                f[f"{ph}_cpu_us_per_rpc"] = used * 1e6 / p["count"]
            if used > 0:
                f[f"{ph}_rpcs_per_cpu_s"] = p["count"] / used
    f["errors"] = errors
    return f


def run_gwconc(s, rows: list, row_type, session_limits: str) -> None:
    """One row per (variant, N): direct, haproxy, sclb one after the other at each N, each
    proxy freshly started. Raises after the whole curve if any call or connection failed."""
    ns, note = fitting_ns(s.gwconc_ns)
    if note:
        print(f"  {note}", flush=True)
        s.notes.append(note)
    proxies = [v for v in ("haproxy", "sclb") if v in s.proxies and (v != "sclb" or s.sclb_ok)]
    be = b.start_backend(s, "grpc")
    failed = []
    try:
        b.probe("grpc", b.HOST, int(be.addrs[0].rsplit(":", 1)[1]), what="gwconc direct")
        cfgs = {v: render(s, v, be, max(ns) + 200, session_limits) for v in proxies}
        for n in ns:
            for variant in ("direct", *proxies):
                proc = None
                if variant == "direct":
                    port = int(be.addrs[0].rsplit(":", 1)[1])
                else:
                    proc, port = start(s, variant, cfgs[variant], n)
                try:
                    r, cpu = client(s, f"gwconc-{variant}-{n}", port, n, proc.pid if proc else None)
                    if proc and not proc.alive():
                        raise b.Broken(f"{variant} died:\n{proc.log_tail()}")
                finally:
                    if proc:
                        b.PROCS.stop(proc)
                f = figures(r, cpu, proc is not None)
                rows.append(row_type("gwconc", variant, n, f))
                if f["errors"]:
                    failed.append(f"{variant} N={n}: {f['errors']:.0f} errors ({json.dumps(r)[:300]})")
                print(f"  gwconc {variant} N={n}: {f['opened']} open, paced p50 "
                      f"{f.get('paced_p50_us', 0):.0f} µs p99 {f.get('paced_p99_us', 0):.0f} µs, closed "
                      f"{f.get('closed_per_s', 0):.0f} calls/s"
                      + (f", {f['closed_rpcs_per_cpu_s']:.0f} per proxy CPU-s" if 'closed_rpcs_per_cpu_s' in f else "")
                      + f", {f['errors']:.0f} errors", flush=True)
            direct = next(r for r in rows if r.part == "gwconc" and r.variant == "direct" and r.n == n).figures
            for r in rows:
                if r.part == "gwconc" and r.n == n and r.variant != "direct":
                    for k in ("p50_us", "p99_us"):
                        if f"paced_{k}" in r.figures and f"paced_{k}" in direct:
                            r.figures[f"paced_added_{k}"] = r.figures[f"paced_{k}"] - direct[f"paced_{k}"]
    finally:
        b.stop_backend(be)
    if failed:
        raise b.BenchError("gwconc: calls failed: " + "; ".join(failed))


def verdicts(rows: list, quick: bool) -> list[str]:
    """Per N: sclb against HAProxy, calls per proxy CPU-second (closed loop) and added p50/p99
    (paced). Quick runs (small N, CI's debug build) show the figures, not a verdict."""
    out = []
    for n in sorted({r.n for r in rows if r.part == "gwconc"}):
        by = {r.variant: r.figures for r in rows if r.part == "gwconc" and r.n == n}
        sc, ha = by.get("sclb"), by.get("haproxy")
        if not sc or not ha:
            continue
        cells = []
        for key, label, better in (("closed_rpcs_per_cpu_s", "calls per CPU-s", "ge"),
                                   ("paced_added_p50_us", "added p50", "le"),
                                   ("paced_added_p99_us", "added p99", "le")):
            if key not in sc or key not in ha:
                cells.append(f"{label}: no figure")
                continue
            ok = sc[key] >= ha[key] if better == "ge" else sc[key] <= ha[key]
            verdict = "—" if quick else ("pass" if ok and not sc["errors"] else "miss")
            cells.append(f"{label} {sc[key]:,.0f} vs {ha[key]:,.0f}: {verdict}")
        if sc["errors"]:
            cells.append(f"{sc['errors']:.0f} errors: miss")
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    if not out:
        return []
    return ["| N | sclb vs HAProxy: calls per proxy CPU-s (≥) | added p50 µs (≤) | added p99 µs (≤) |",
            "|---:|---|---|---|"] + out


def section(s, rows: list, table) -> list[str]:
    """The report's section: how it was measured, the figures, the verdicts."""
    v = verdicts(rows, s.quick)
    return ["## Concurrent gateway sessions doing small RPCs (beside HAProxy `mode http`, h2 both sides)", "",
            "N h2c connections, each from its own source address 127.x.y.z and carrying its own Spark "
            "session id (PySpark keeps one channel per session), unary Config calls (the captured "
            "PySpark request), at most one in flight per connection (`benchtool grpcconc`); "
            "`benchtool grpc` servers behind; each proxy freshly started per N. Paced: "
            f"{s.gwconc_rate:g} calls/s offered over all N, {s.gwconc_warm_s:g} s warm-up then "
            f"{s.gwconc_s:g} s measured, latency from when a call was due, added = minus direct. "
            "Closed loop: every connection calls again when its call returns (N in flight), "
            "calls/s and calls per proxy CPU-second (utime+stime over the window). Errors: "
            "sessions not opened, non-200, grpc-status ≠ 0, RST_STREAM, lost connections, calls "
            "unanswered 10 s after the window. Target (issue 22): sclb ≥ HAProxy at every N.", "",
            table(rows, "gwconc", COLUMNS), ""] + (v + [""] if v else [])
