#!/usr/bin/env bash
# Builds every fuzz target in fuzz/ and runs each for a bounded time; exits non-zero if one
# crashes (panic, AddressSanitizer report), hangs (-timeout), or allocates without bound
# (-rss_limit_mb, -malloc_limit_mb). Prints one summary line per target.
#
#   scripts/fuzz.sh [SECONDS [TARGET...]]   SECONDS per target, default 30; every target
#                                           in fuzz/fuzz_targets, or the ones named
#
# SCLB_FUZZ_TARGET_DIR builds elsewhere than the shared cache (a second checkout fuzzing on
# the same machine as CI).
# Tools: cargo-fuzz (libFuzzer) from crates.io, installed under ~/.cache/sclb/tools when missing.
# cargo-fuzz passes -Zsanitizer=address, a nightly flag: RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept it (no other toolchain is needed). Builds go to ~/.cache/sclb/fuzz-target so
# that a second run on the same machine only rebuilds sclb.
#
# Inputs: the committed seeds in fuzz/corpus/<target>/ are read, never written; what a run
# discovers goes to ~/.cache/sclb/fuzz-corpus/<target>/ and is reused by the next run. A crash
# leaves its input in fuzz/artifacts/<target>/; replay it with
#   ~/.cache/sclb/fuzz-target/x86_64-unknown-linux-gnu/release/<target> fuzz/artifacts/<target>/crash-*
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-30}
[[ "$secs" =~ ^[0-9]+$ ]] || { echo "usage: $0 [seconds per target [target...]]" >&2; exit 2; }
shift || true
cache=${SCLB_CACHE:-$HOME/.cache/sclb}
tools=$cache/tools
export PATH=$tools/bin:$PATH

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz into $tools"
  cargo install --locked --quiet --root "$tools" cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
target_dir=${SCLB_FUZZ_TARGET_DIR:-$cache/fuzz-target}
host=$(rustc -vV | sed -n 's/^host: //p')
echo "==> building fuzz targets (cargo fuzz build, AddressSanitizer) into $target_dir"
build_log=$(mktemp)
if ! (cd fuzz && cargo fuzz build --release --target-dir "$target_dir") >"$build_log" 2>&1; then
  cat "$build_log" >&2
  rm -f "$build_log"
  exit 1
fi
grep -E '^ *(Finished|error|warning: unused)' "$build_log" || true
rm -f "$build_log"
mapfile -t targets < <(cd fuzz && cargo fuzz list)
((${#targets[@]})) || { echo "no fuzz targets found" >&2; exit 1; }
if (($#)); then
  for t in "$@"; do
    printf '%s\n' "${targets[@]}" | grep -qx -- "$t" || { echo "no fuzz target $t" >&2; exit 2; }
  done
  targets=("$@")
fi

# Largest input per target: a config file, an admin line (the socket's MAX_LINE), a probe reply
# (spark_proto::MAX_REPLY plus the 5-byte gRPC prefix and some), the start of a request body
# (the routing key sits in its first ~100 bytes).
max_len() {
  case $1 in
    config_parse) echo 65536 ;;
    admin_command) echo 65536 ;;
    spark_reply) echo 70000 ;;
    gateway_routing_key) echo 16384 ;;
    *) echo 4096 ;;
  esac
}

failed=0
summary=()
for t in "${targets[@]}"; do
  bin=$target_dir/$host/release/$t
  [[ -x "$bin" ]] || { echo "missing $bin (did the build fail?)" >&2; exit 1; }
  work=$cache/fuzz-corpus/$t
  mkdir -p "$work" "fuzz/corpus/$t" "fuzz/artifacts/$t"
  dict=()
  [[ -f "fuzz/$t.dict" ]] && dict=("-dict=fuzz/$t.dict")
  log=$(mktemp)
  echo "==> $t: ${secs}s"
  set +e
  # The first directory collects new inputs; the committed seeds are only read.
  "$bin" "$work" "fuzz/corpus/$t" "${dict[@]}" \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
    -max_len="$(max_len "$t")" -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1
  rc=$?
  set -e
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -1)
  if ((rc == 0)); then
    summary+=("$(printf '%-20s ok      %9s runs  %s' "$t" "${runs:-?}" "$cov")")
  else
    failed=1
    summary+=("$(printf '%-20s FAILED  exit %s; input in fuzz/artifacts/%s/' "$t" "$rc" "$t")")
    grep -E -A30 'ERROR: |panicked at|==ERROR|SUMMARY' "$log" | head -60 >&2 || tail -40 "$log" >&2
  fi
  rm -f "$log"
done

echo
echo "fuzz summary (${secs}s per target):"
printf '  %s\n' "${summary[@]}"
exit "$failed"
