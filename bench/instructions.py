"""bench/run --instructions: user-space instructions per proxied connection, sclb beside HAProxy,
counted by valgrind's callgrind. Unlike CPU time, an instruction count does not move with the
machine's load, so this figure tells a change in sclb's own work apart from noise; what it
leaves out is the kernel's work (the two TCP connections), which `perf` shows is ~80 % of
either proxy's CPU per connection.

For each variant: `benchtool echo1` on three ports as the servers (each closes after its
one-byte echo, so no TIME_WAIT builds up), the proxy under callgrind with the same config as
`bench/run`'s connrate scenario (sclb: bench/sclb.toml; HAProxy: bench/haproxy.cfg; the `-log`
variants with each one's access log on, as `bench/run` turns it on), 300 connections to warm
up, the counters zeroed (`callgrind_control -z`), then N sequential connections from one
address (`benchtool conns`: connect, one byte each way, close) and a dump. Instructions per
connection = the dump's total ÷ N. Per variant, the functions with the most inclusive
instructions go to the log directory (callgrind_annotate).

Python standard library only.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import bench as b

VARIANTS = ("haproxy", "haproxy-log", "sclb", "sclb-log", "sclb-log-json")


def rendered(variant: str, port: int, backends: list[int]) -> tuple[Path, str]:
    """The proxy's config for `variant` (the files bench/run uses), and its kind."""
    kind = "haproxy" if variant.startswith("haproxy") else "sclb"
    template = b.BENCH / ("haproxy.cfg" if kind == "haproxy" else "sclb.toml")
    be = b.Backend(kind="echo1", procs=[], addrs=[f"{b.HOST}:{p}" for p in backends])
    ref = b.REF_HAPROXY_PORT if kind == "haproxy" else b.REF_SCLB_PORT
    text = b.render(template, port, ref, be)
    if variant.endswith("-log") or variant.endswith("-log-json"):
        text = b.with_log(text, kind, "stdout")
    if variant.endswith("-json"):
        text = text.replace('log = { level = "info" }', 'log = { level = "info", format = "json" }', 1)
    return template, text


def wait_port(port: int, proc: subprocess.Popen, secs: float) -> None:
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise b.BenchError(f"the proxy exited (status {proc.returncode}) before listening")
        if b.listening(port):
            return
        time.sleep(0.2)
    raise b.BenchError(f"nothing listens on {port} after {secs:.0f} s")


def conns(port: int, count: int) -> dict:
    out = subprocess.run([str(b.TOOL), "conns", b.HOST, str(port), str(count), "1", "100", "1", "rand", "600"],
                         capture_output=True, text=True, timeout=660)
    if out.returncode != 0:
        raise b.BenchError(f"benchtool conns failed: {out.stderr[-300:]}")
    r = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    if r.get("errors"):
        raise b.BenchError(f"{r['errors']} of {count} connections failed")
    return r


def total_ir(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        m = re.match(r"^(?:summary|totals):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise b.BenchError(f"no total in {dump}")


def measure(variant: str, n: int, sclb_bin: Path, logdir: Path) -> int:
    backends = [free_port() for _ in range(3)]
    port = free_port()
    _, text = rendered(variant, port, backends)
    cfg = logdir / f"{variant}.{'cfg' if variant.startswith('haproxy') else 'toml'}"
    cfg.write_text(text)
    out = logdir / f"{variant}.callgrind"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    argv += ["haproxy", "-db", "-f", str(cfg)] if variant.startswith("haproxy") else [str(sclb_bin), "-c", str(cfg)]
    echo = subprocess.Popen([str(b.TOOL), "echo1", "900", *map(str, backends)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(logdir / f"{variant}.log", "wb")
    proxy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proxy, 120)
        conns(port, 300)
        subprocess.run(["callgrind_control", "-z", str(proxy.pid)], capture_output=True, timeout=60, check=True)
        conns(port, n)
        subprocess.run(["callgrind_control", "-d", str(proxy.pid)], capture_output=True, timeout=60, check=True)
        dumps = sorted(logdir.glob(f"{variant}.callgrind.*"), key=lambda p: p.stat().st_mtime)
        if not dumps:
            raise b.BenchError(f"callgrind wrote no dump for {variant}")
        ir = total_ir(dumps[-1])
        top = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dumps[-1])],
                             capture_output=True, text=True, timeout=120).stdout
        (logdir / f"{variant}.top.txt").write_text("\n".join(top.splitlines()[:80]) + "\n")
        return ir // n
    finally:
        for p in (proxy, echo):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        log.close()


def free_port() -> int:
    import socket
    with socket.socket() as sk:
        sk.bind((b.HOST, 0))
        return sk.getsockname()[1]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench/run --instructions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instructions", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="300 connections per variant (CI), else 3,000")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-build", action="store_true", help="never run cargo build")
    ap.add_argument("--out", default=str(b.BENCH / "results"))
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        ap.error(f"unknown variant(s): {', '.join(sorted(set(variants) - set(VARIANTS)))}; out of {', '.join(VARIANTS)}")
    n = 300 if a.quick else 3000
    sclb_bin = Path(os.environ.get("SCLB_BIN", str(b.DEFAULT_SCLB_BIN))).absolute()
    if any(v.startswith("sclb") for v in variants):
        if not a.no_build:
            subprocess.run(["cargo", "build", "--release", "--bin", "sclb"], cwd=b.REPO, check=True)
        if not sclb_bin.exists():
            print(f"bench: {sclb_bin} missing", file=sys.stderr)
            return 1
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    logdir = b.BENCH / ".work" / f"{stamp}-instructions"
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"bench: instructions run {stamp}, {n} connections per variant; logs in {logdir}", flush=True)
    results: dict[str, int] = {}
    errors: list[str] = []
    for v in variants:
        t0 = time.monotonic()
        try:
            results[v] = measure(v, n, sclb_bin, logdir)
            print(f"  {v:<16} {results[v]:>9,} instructions per connection  ({time.monotonic() - t0:.0f} s)", flush=True)
        except (b.BenchError, subprocess.SubprocessError, OSError) as e:
            errors.append(f"{v}: {e}")
            print(f"  {v:<16} failed: {e}", flush=True)
    lines = [f"# Instructions per connection ({stamp})", "",
             f"`bench/run --instructions{' --quick' if a.quick else ''}`: user-space instructions per proxied "
             f"connection (callgrind; {n} sequential connections from one address through each proxy to "
             "`benchtool echo1`, after 300 to warm up). The kernel's work is not counted.", "",
             f"valgrind: {b.tool_version(['valgrind', '--version'])}; haproxy: {b.tool_version(['haproxy', '-v'])}; "
             f"sclb: {sclb_bin}", "",
             "| variant | instructions per connection | ÷ HAProxy (same log setting) |", "|---|---|---|"]
    for v in variants:
        if v not in results:
            continue
        ref = {"sclb": "haproxy", "sclb-log": "haproxy-log", "sclb-log-json": "haproxy-log"}.get(v)
        ratio = f"{results[v] / results[ref]:.2f}×" if ref in results else "—"
        lines.append(f"| {v} | {results[v]:,} | {ratio} |")
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / f"{stamp}-instructions.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(len(results) + 2 + (len(errors) + 3 if errors else 0)):]))
    print(f"bench: wrote {report}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
