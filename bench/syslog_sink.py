#!/usr/bin/python3
"""A local syslog for the haproxy-log-syslog variant: receives datagrams on a Unix socket and
appends them, one line each, to a file, as rsyslog or journald would (without their parsing).

    syslog_sink.py SOCKET_PATH OUT_FILE

Stops on SIGTERM (bench.py stops it by PID with the proxy it serves).
"""
import os
import signal
import socket
import sys

path, out = sys.argv[1], sys.argv[2]
if os.path.exists(path):
    os.unlink(path)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(path)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with open(out, "ab", buffering=1 << 16) as f:
    try:
        while True:
            line = s.recv(65536)
            f.write(line if line.endswith(b"\n") else line + b"\n")
    finally:
        os.unlink(path)
