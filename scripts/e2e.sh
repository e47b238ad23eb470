#!/usr/bin/env bash
# Run the end-to-end suite: real PySpark clients -> sclb -> two real Spark Connect servers.
# Args are passed to pytest (e.g. -k drain, -x). Env: SCLB_BIN (default target/debug/sclb).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/venv.sh
# Per-test bound: pytest-timeout (tests/e2e/pytest.ini). Whole-run bound: SIGTERM lets pytest
# run its finalizers (which stop the Spark servers and sclb by PID); SIGKILL 60 s later.
exec timeout -k 60 "${SCLB_E2E_TIMEOUT:-1800}" .venv/bin/pytest tests/e2e -q "$@"
