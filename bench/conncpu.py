"""bench/run --conncpu: CPU per proxied connection and connections/s, sclb beside HAProxy, both
with their access logs on, the proxies taking turns round by round.

`bench/run --scenarios connrate` drives the proxies with wrk against nginx: on a 2-core machine
wrk, nginx and the proxy share the cores, and one proxy's repetitions spread over ±25 %, more
than the differences it is asked about. Here the load is lighter and steadier: `benchtool conns`
(connect, one byte each way, close; from 127.x.y.z addresses) at a fixed concurrency against
`benchtool echo1` servers, N connections per round, and the variants interleaved so that a
change of the machine's load lands on all of them. CPU = the proxy's user + system time read
from /proc (every thread) over the round.

Variants (each with its access log on, as in bench/run's `-log` variants):
- haproxy-log        bench/haproxy.cfg + `log stdout format raw local0` (HAProxy's defaults)
- haproxy-log-smart  the same + `option tcp-smart-connect` (off in HAProxy by default)
- sclb-log           bench/sclb.toml, log.level = "info" (sclb's defaults: tcp_smart_connect on)
- sclb-log-nosmart   the same with `tcp_smart_connect = false`

Python standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench as b
import instructions as ins

VARIANTS = ("haproxy-log", "haproxy-log-smart", "sclb-log", "sclb-log-nosmart")


def base_and_edit(variant: str):
    """(the bench/instructions.py variant it starts from, its config change or None)."""
    if variant == "haproxy-log-smart":
        return "haproxy-log", lambda t: t.replace("backend spark_servers\n",
                                                   "backend spark_servers\n    option tcp-smart-connect\n", 1)
    if variant == "sclb-log-nosmart":
        return "sclb-log", lambda t: t.replace('name = "spark_servers"\n',
                                                'name = "spark_servers"\ntcp_smart_connect = false\n', 1)
    return variant, None


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(f[11]) + int(f[12])
        except (OSError, IndexError, ValueError):
            pass  # a thread that ended meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def round_of(variant: str, n: int, conc: int, sclb_bin: Path, logdir: Path) -> tuple[float, float]:
    """(CPU µs per connection, connections/s) for one round."""
    base, edit = base_and_edit(variant)
    suffix = "" if base == variant else variant.removeprefix(base)
    with ins.Proxied(base, sclb_bin, logdir, [], suffix, edit) as p:
        c0, t0 = cpu_seconds(p.proxy.pid), time.monotonic()
        out = subprocess.run([str(b.TOOL), "conns", b.HOST, str(p.port), str(n), str(conc), "100", "1", "rand", "300"],
                             capture_output=True, text=True, timeout=360)
        elapsed, c1 = time.monotonic() - t0, cpu_seconds(p.proxy.pid)
    if out.returncode != 0:
        raise b.BenchError(f"benchtool conns failed: {out.stderr[-300:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r.get("errors"):
        raise b.BenchError(f"{variant}: {r['errors']} of {n} connections failed")
    return (c1 - c0) / n * 1e6, n / elapsed


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/run --conncpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--conncpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 round of 2,000 connections (CI), else 4 of 20,000")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--conns", type=int, help="connections per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-build", action="store_true", help="never run cargo build")
    ap.add_argument("--out", default=str(b.BENCH / "results"))
    a = ap.parse_args(argv)
    variants = ins.chosen(ap, a.variants, VARIANTS)
    rounds = a.rounds or (1 if a.quick else 4)
    n = a.conns or (2000 if a.quick else 20000)
    if not 1 <= rounds <= 50 or not 100 <= n <= 200000 or not 1 <= a.concurrency <= 256:
        ap.error("--rounds 1-50, --conns 100-200000, --concurrency 1-256")
    sclb_bin = ins.sclb_ready(variants, a.no_build)
    if sclb_bin is None:
        return 1
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    logdir = b.BENCH / ".work" / f"{stamp}-conncpu"
    logdir.mkdir(parents=True, exist_ok=True)
    load_before = b.loadavg()
    print(f"bench: conncpu run {stamp}, {rounds} rounds of {n} connections at concurrency {a.concurrency}; "
          f"logs in {logdir}", flush=True)
    got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    errors: list[str] = []
    for rnd in range(rounds):
        for v in variants:
            try:
                got[v].append(round_of(v, n, a.concurrency, sclb_bin, logdir))
                us, rate = got[v][-1]
                print(f"  round {rnd + 1}/{rounds} {v:<18} {us:6.1f} µs CPU per connection  {rate:8.0f} connections/s",
                      flush=True)
            except (b.BenchError, subprocess.SubprocessError, OSError) as e:
                errors.append(f"{v}, round {rnd + 1}: {e}")
                print(f"  round {rnd + 1}/{rounds} {v:<18} failed: {e}", flush=True)
    med = {v: (statistics.median(x[0] for x in r), statistics.median(x[1] for x in r)) for v, r in got.items() if r}
    lines = [f"# CPU per connection, proxies taking turns ({stamp})", "",
             f"`bench/run --conncpu{' --quick' if a.quick else ''}`: {rounds} round(s) of {n} connections "
             f"(`benchtool conns`, concurrency {a.concurrency}, one byte each way, from 127.x.y.z) through each "
             "proxy in turn to `benchtool echo1`; access logs on; CPU = the proxy's user + system time from /proc. "
             "See bench/conncpu.py.", "",
             f"haproxy: {b.tool_version(['haproxy', '-v'])}; sclb: {sclb_bin}; load average before: {load_before}, "
             f"after: {b.loadavg()}", "",
             "| variant | CPU µs per connection, median (each round) | connections/s, median | CPU ÷ haproxy-log | "
             "connections/s ÷ haproxy-log |", "|---|---|---|---|---|"]
    table_at = len(lines) - 2
    ref = med.get("haproxy-log")
    for v, (us, rate) in med.items():
        each = ", ".join(f"{x[0]:.1f}" for x in got[v])
        cpu_r = f"{us / ref[0]:.2f}×" if ref else "—"
        rate_r = f"{rate / ref[1]:.2f}×" if ref else "—"
        lines.append(f"| {v} | {us:.1f} ({each}) | {rate:.0f} | {cpu_r} | {rate_r} |")
    return ins.write_report(lines, table_at, errors, Path(a.out) / f"{stamp}-conncpu.md")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
