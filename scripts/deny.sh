#!/usr/bin/env bash
# cargo deny check licenses bans: every dependency under a license deny.toml allows; crates
# present in two versions reported (warnings). Installs cargo-deny from crates.io under
# ~/.cache/sclb/tools when it is missing, so that later runs on the same machine reuse it.
#
#   scripts/deny.sh
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${SCLB_CACHE:-$HOME/.cache/sclb}/tools
export PATH=$tools/bin:$PATH
if ! cargo deny --version >/dev/null 2>&1; then
  echo "==> installing cargo-deny into $tools"
  cargo install --locked --quiet --root "$tools" cargo-deny
fi
# Warnings (duplicates) are printed without the inclusion graphs; errors fail the run.
cargo deny --log-level warn check --hide-inclusion-graph licenses bans
