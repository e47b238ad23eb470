#!/usr/bin/env bash
# Installs the benchmark's tools from Debian packages, only if one is missing
# (one `apt-get update`, then one `apt-get install`). Called by bench/run.
set -euo pipefail

# command -> Debian package
declare -A pkg=(
  [haproxy]=haproxy [iperf3]=iperf3 [wrk]=wrk [h2load]=nghttp2-client [nghttp]=nghttp2-client
  [nginx]=nginx [gnuplot]=gnuplot-nox [gcc]=gcc [/usr/bin/python3]=python3
  [psql]=postgresql [setpriv]=util-linux   # sclb-gateway-pg: its session store
  [openssl]=openssl [curl]=curl            # tls: certificates, jwt: keys; the HTTPS download
  [valgrind]=valgrind [callgrind_control]=valgrind [strace]=strace   # --instructions
)

have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /sbin/$1 ]]; }

missing=()
for cmd in "${!pkg[@]}"; do
  have "$cmd" || missing+=("${pkg[$cmd]}")
done
# Debian keeps initdb off PATH; psql alone (postgresql-client) is not the server.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
# benchtool's grpcconc decodes response headers (HPACK) with libnghttp2: its header and library.
[[ -f /usr/include/nghttp2/nghttp2.h ]] || missing+=(libnghttp2-dev)
if ((${#missing[@]} == 0)); then
  exit 0
fi

sudo=()
if ((EUID != 0)); then
  command -v sudo >/dev/null || { echo "bench: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
echo "bench: installing ${missing[*]} from Debian" >&2
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-o DPkg::Lock::Timeout=600 -qq)
"${sudo[@]}" apt-get "${apt_opts[@]}" update
"${sudo[@]}" apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}"
