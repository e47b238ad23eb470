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

Then the same run without valgrind, `strace -c -f` attached to the proxy after its warm-up:
system calls per connection, by name (the kernel's work follows them).

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


class Proxied:
    """`variant` with its config, `benchtool echo1` as its three servers, optionally under a
    wrapper (valgrind); stopped, with the servers, on exit."""

    def __init__(self, variant: str, sclb_bin: Path, logdir: Path, wrapper: list[str], suffix: str,
                 edit=None):
        self.variant, self.sclb_bin, self.logdir, self.wrapper = variant, sclb_bin, logdir, wrapper
        self.suffix, self.edit = suffix, edit

    def __enter__(self) -> "Proxied":
        backends = [free_port() for _ in range(3)]
        self.port = free_port()
        _, text = rendered(self.variant, self.port, backends)
        if self.edit:  # a change to the config, by the caller (bench/conncpu.py)
            text = self.edit(text)
        cfg = self.logdir / f"{self.variant}{self.suffix}.{'cfg' if self.variant.startswith('haproxy') else 'toml'}"
        cfg.write_text(text)
        argv = list(self.wrapper)
        argv += ["haproxy", "-db", "-f", str(cfg)] if self.variant.startswith("haproxy") \
            else [str(self.sclb_bin), "-c", str(cfg)]
        self.echo = subprocess.Popen([str(b.TOOL), "echo1", "900", *map(str, backends)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.log = open(self.logdir / f"{self.variant}{self.suffix}.log", "ab")
        self.proxy = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, self.proxy, 120)
            conns(self.port, 300)  # warm-up
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *_exc) -> None:
        for p in (self.proxy, self.echo):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.log.close()


def measure(variant: str, n: int, sclb_bin: Path, logdir: Path) -> int:
    out = logdir / f"{variant}.callgrind"
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with Proxied(variant, sclb_bin, logdir, wrapper, "") as p:
        pid = str(p.proxy.pid)
        subprocess.run(["callgrind_control", "-z", pid], capture_output=True, timeout=60, check=True)
        conns(p.port, n)
        subprocess.run(["callgrind_control", "-d", pid], capture_output=True, timeout=60, check=True)
        dumps = sorted(logdir.glob(f"{variant}.callgrind.*"), key=lambda f: f.stat().st_mtime)
        if not dumps:
            raise b.BenchError(f"callgrind wrote no dump for {variant}")
        ir = total_ir(dumps[-1])
        top = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(dumps[-1])],
                             capture_output=True, text=True, timeout=120).stdout
        (logdir / f"{variant}.top.txt").write_text("\n".join(top.splitlines()[:80]) + "\n")
        return ir // n


def syscalls(variant: str, n: int, sclb_bin: Path, logdir: Path) -> dict[str, float]:
    """System calls per connection by name (`strace -c -f` attached to every thread of the
    proxy after its warm-up, for n connections)."""
    out = logdir / f"{variant}.strace"
    with Proxied(variant, sclb_bin, logdir, [], "-strace") as p:
        st = subprocess.Popen(["strace", "-f", "-c", "-qq", "-o", str(out), "-p", str(p.proxy.pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)  # attached to every thread
            if st.poll() is not None:
                raise b.BenchError(f"strace exited: {st.stderr.read().decode(errors='replace')[-300:]}")
            conns(p.port, n)
        finally:
            st.send_signal(2)
            try:
                st.wait(timeout=30)
            except subprocess.TimeoutExpired:
                st.kill()
                st.wait()
    calls: dict[str, float] = {}
    for line in out.read_text(errors="replace").splitlines():
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(f) >= 5 and f[-1] != "total" and f[3].isdigit() and re.match(r"^[\d.]+$", f[0]):
            calls[f[-1]] = int(f[3]) / n
    if not calls:
        raise b.BenchError(f"strace counted nothing for {variant} (see {out})")
    return calls


def chosen(ap: argparse.ArgumentParser, listed: str, known: tuple[str, ...]) -> list[str]:
    """The variants of a comma list, each one of `known` (else an argparse error)."""
    variants = [v for v in listed.split(",") if v]
    if set(variants) - set(known):
        ap.error(f"unknown variant(s): {', '.join(sorted(set(variants) - set(known)))}; out of {', '.join(known)}")
    return variants


def sclb_ready(variants: list[str], no_build: bool) -> Path | None:
    """The sclb binary to run ($SCLB_BIN or the release build, built unless `no_build`), or
    None (reported) when a variant needs it and it is missing."""
    sclb_bin = Path(os.environ.get("SCLB_BIN", str(b.DEFAULT_SCLB_BIN))).absolute()
    if any(v.startswith("sclb") for v in variants):
        if not no_build:
            subprocess.run(["cargo", "build", "--release", "--bin", "sclb"], cwd=b.REPO, check=True)
        if not sclb_bin.exists():
            print(f"bench: {sclb_bin} missing", file=sys.stderr)
            return None
    return sclb_bin


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
    variants = chosen(ap, a.variants, VARIANTS)
    n = 300 if a.quick else 3000
    sclb_bin = sclb_ready(variants, a.no_build)
    if sclb_bin is None:
        return 1
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    logdir = b.BENCH / ".work" / f"{stamp}-instructions"
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"bench: instructions run {stamp}, {n} connections per variant; logs in {logdir}", flush=True)
    results: dict[str, int] = {}
    calls: dict[str, dict[str, float]] = {}
    errors: list[str] = []
    for v in variants:
        t0 = time.monotonic()
        try:
            results[v] = measure(v, n, sclb_bin, logdir)
            print(f"  {v:<16} {results[v]:>9,} instructions per connection  ({time.monotonic() - t0:.0f} s)", flush=True)
            calls[v] = syscalls(v, n, sclb_bin, logdir)
            print(f"  {v:<16} {sum(calls[v].values()):>9.1f} system calls per connection", flush=True)
        except (b.BenchError, subprocess.SubprocessError, OSError) as e:
            errors.append(f"{v}: {e}")
            print(f"  {v:<16} failed: {e}", flush=True)
    lines = [f"# Instructions per connection ({stamp})", "",
             f"`bench/run --instructions{' --quick' if a.quick else ''}`: user-space instructions per proxied "
             f"connection (callgrind; {n} sequential connections from one address through each proxy to "
             "`benchtool echo1`, after 300 to warm up). The kernel's work is not counted.", "",
             f"valgrind: {b.tool_version(['valgrind', '--version'])}; haproxy: {b.tool_version(['haproxy', '-v'])}; "
             f"sclb: {sclb_bin}", ""]
    table_at = len(lines)
    lines += ["| variant | instructions per connection | ÷ HAProxy (same log setting) | system calls per "
             "connection (strace -c) |", "|---|---|---|---|"]
    for v in variants:
        if v not in results:
            continue
        ref = {"sclb": "haproxy", "sclb-log": "haproxy-log", "sclb-log-json": "haproxy-log"}.get(v)
        ratio = f"{results[v] / results[ref]:.2f}×" if ref in results else "—"
        lines.append(f"| {v} | {results[v]:,} | {ratio} | {sum(calls.get(v, {}).values()):.1f} |")
    if calls:
        names = sorted({c for per in calls.values() for c, k in per.items() if k >= 0.05},
                       key=lambda c: -max(per.get(c, 0) for per in calls.values()))
        lines += ["", "System calls per connection by name (≥ 0.05 in some variant):", "",
                  "| call | " + " | ".join(calls) + " |", "|---|" + "---|" * len(calls)]
        lines += [f"| `{c}` | " + " | ".join(f"{per.get(c, 0):.2f}" for per in calls.values()) + " |"
                  for c in names]
    return write_report(lines, table_at, errors, Path(a.out) / f"{stamp}-instructions.md")


def write_report(lines: list[str], table_at: int, errors: list[str], report: Path) -> int:
    """Writes the report (with its errors), prints its tables; the exit status."""
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[table_at:]))
    print(f"bench: wrote {report}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
