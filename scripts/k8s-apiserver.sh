#!/bin/bash
# A real Kubernetes API server (kube-apiserver v1.20.2 + etcd) for sclb's discovery tests
# (tests/k8s.rs). Only the API server runs: the tests play the kubelet and the spark-operator by
# PATCHing /status. Loopback only; every process is recorded by PID and stopped by PID.
#
#   scripts/k8s-apiserver.sh build            build it once per machine when missing (~10 min, ~2.5 GB)
#   scripts/k8s-apiserver.sh path             print the kube-apiserver binary; exit 1 if not built
#   scripts/k8s-apiserver.sh start DIR PORT ETCD_PORT PEER_PORT [WATCH_PID]
#                                             etcd + apiserver with their data, logs, PIDs and
#                                             kubeconfig under DIR; the spark-operator CRDs
#                                             installed. With WATCH_PID, everything is stopped
#                                             once that process is gone (a test that crashed),
#                                             and a DIR named sclb-k8s-* is removed.
#   scripts/k8s-apiserver.sh stop DIR         stop what start started
#   scripts/k8s-apiserver.sh stop-apiserver DIR / start-apiserver DIR
#                                             restart only the API server (etcd keeps the data)
#
# The build is scripts/k8s-build.sh (Debian bookworm's kubernetes source package, Go 1.19, etcd
# 3.4); it lands in $SCLB_K8S_ROOT (default ~/.cache/sclb/k8s), outside the clone. The CRDs are
# the repository's test fixtures, tests/fixtures/k8s/crds.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
ROOT=$(realpath -m "${SCLB_K8S_ROOT:-$HOME/.cache/sclb/k8s}")
CRDS="$here/tests/fixtures/k8s/crds"
APISERVER="$ROOT/bin/kube-apiserver"
ETCD="$ROOT/root/usr/bin/etcd"

die() { echo "k8s-apiserver: $*" >&2; exit 1; }

built() { [ -x "$APISERVER" ] && [ -x "$ETCD" ] && [ -f "$ROOT/pki/sa.pub" ]; }

build() {
  if built; then
    echo "kube-apiserver already built: $APISERVER"
    return
  fi
  echo "building kube-apiserver v1.20.2 and etcd under $ROOT (once per machine, ~10 min)"
  local started=$SECONDS
  SCLB_K8S_ROOT="$ROOT" "$here/scripts/k8s-build.sh"
  built || die "the build finished without $APISERVER, $ETCD or $ROOT/pki/sa.pub"
  echo "built in $((SECONDS - started)) s: $APISERVER"
}

pid_of() { [ -f "$1/$2.pid" ] && cat "$1/$2.pid"; }

# Stops process $2 of DIR $1 by its recorded PID: SIGTERM, then SIGKILL after 10 s.
stop_one() {
  local pid
  pid=$(pid_of "$1" "$2") || return 0
  # The watchdog runs "stop" itself: it does not stop itself.
  if [ "$pid" = $$ ] || [ "$pid" = "$PPID" ]; then rm -f "$1/$2.pid"; return 0; fi
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1/$2.pid"
}

start_apiserver() {
  local dir=$1
  # shellcheck disable=SC1091
  . "$dir/ports"
  local adv
  adv=$(hostname -I 2>/dev/null | awk '{print $1}')
  [ -n "$adv" ] || adv=10.0.0.1  # must not be loopback; nothing is served on it
  # --advertise-address is only announced; everything binds 127.0.0.1. ServiceAccount admission is
  # off: no controller creates the "default" service account.
  "$APISERVER" --etcd-servers="http://127.0.0.1:$ETCD_PORT" --bind-address=127.0.0.1 \
    --secure-port="$PORT" --advertise-address="$adv" --cert-dir="$dir/certs" \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$ROOT/pki/sa.pub" \
    --service-account-signing-key-file="$ROOT/pki/sa.key" --service-cluster-ip-range=10.96.0.0/24 \
    --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC --anonymous-auth=false \
    --disable-admission-plugins=ServiceAccount </dev/null >>"$dir/apiserver.log" 2>&1 &
  echo $! > "$dir/apiserver.pid"
  for _ in $(seq 600); do
    if curl -sk -m 2 -H 'Authorization: Bearer testtoken' "https://127.0.0.1:$PORT/readyz" 2>/dev/null | grep -q '^ok'; then
      return 0
    fi
    kill -0 "$(pid_of "$dir" apiserver)" 2>/dev/null || break
    sleep 0.1
  done
  tail -20 "$dir/apiserver.log" >&2 || true
  kill -0 "$(pid_of "$dir" apiserver)" 2>/dev/null || die "kube-apiserver on 127.0.0.1:$PORT exited (log: $dir/apiserver.log)"
  die "kube-apiserver on 127.0.0.1:$PORT not ready within 60 s (log: $dir/apiserver.log)"
}

api() {  # api METHOD PATH [curl args...]
  local method=$1 path=$2; shift 2
  # shellcheck disable=SC1091
  . "$DIR/ports"
  curl -sk -m 10 -X "$method" -H 'Authorization: Bearer testtoken' "https://127.0.0.1:$PORT$path" "$@"
}

install_crds() {
  for f in sparkapplications-k120.yaml sparkconnects.yaml; do
    local code yaml
    yaml="$CRDS/$f"
    [ -f "$yaml" ] || die "$yaml not found"
    code=$(api POST /apis/apiextensions.k8s.io/v1/customresourcedefinitions -o "$DIR/crd.out" -w '%{http_code}' \
      -H 'Content-Type: application/yaml' --data-binary @"$yaml")
    case $code in 201|409) ;; *) cat "$DIR/crd.out" >&2; die "installing CRD $f: HTTP $code";; esac
  done
  for p in sparkoperator.k8s.io/v1beta2/sparkapplications sparkoperator.k8s.io/v1alpha1/sparkconnects; do
    for _ in $(seq 300); do
      [ "$(api GET "/apis/$p" -o /dev/null -w '%{http_code}')" = 200 ] && continue 2
      sleep 0.1
    done
    die "CRD $p not served within 30 s"
  done
}

start() {
  [ $# -ge 4 ] || die "usage: $0 start DIR PORT ETCD_PORT PEER_PORT [WATCH_PID]"
  DIR=$(realpath -m "$1")
  built || die "kube-apiserver is not built: run $0 build (once per machine, ~10 min)"
  mkdir -p "$DIR/etcd-data" "$DIR/certs"
  printf 'PORT=%s\nETCD_PORT=%s\nPEER_PORT=%s\n' "$2" "$3" "$4" > "$DIR/ports"
  echo 'testtoken,admin,admin-uid,"system:masters"' > "$DIR/tokens.csv"
  done_ok=
  trap '[ -n "$done_ok" ] || stop "$DIR"' EXIT
  if [ -n "${5:-}" ]; then
    # A watchdog: once the test process is gone, stop everything by PID.
    # shellcheck disable=SC2016
    setsid nohup bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" stop "$3"
      case ${3##*/} in sclb-k8s-*) rm -rf "$3" ;; esac' \
      watchdog "$5" "$0" "$DIR" </dev/null >/dev/null 2>&1 &
    echo $! > "$DIR/watchdog.pid"
  fi
  "$ETCD" --data-dir "$DIR/etcd-data" --name default \
    --listen-client-urls "http://127.0.0.1:$3" --advertise-client-urls "http://127.0.0.1:$3" \
    --listen-peer-urls "http://127.0.0.1:$4" --initial-advertise-peer-urls "http://127.0.0.1:$4" \
    --initial-cluster "default=http://127.0.0.1:$4" </dev/null >"$DIR/etcd.log" 2>&1 &
  echo $! > "$DIR/etcd.pid"
  local ok=
  for _ in $(seq 300); do
    curl -s -m 2 "http://127.0.0.1:$3/health" 2>/dev/null | grep -q true && { ok=1; break; }
    sleep 0.1
  done
  [ -n "$ok" ] || { tail -20 "$DIR/etcd.log" >&2; die "etcd on 127.0.0.1:$3 not healthy within 30 s"; }
  start_apiserver "$DIR"
  install_crds
  cat > "$DIR/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$2", certificate-authority: $DIR/certs/apiserver.crt}}]
users: [{name: admin, user: {token: testtoken}}]
contexts: [{name: local, context: {cluster: local, user: admin, namespace: default}}]
current-context: local
KC
  done_ok=1
  echo "ready: https://127.0.0.1:$2 (token testtoken), kubeconfig $DIR/kubeconfig"
}

stop() {
  local dir
  dir=$(realpath -m "$1")
  stop_one "$dir" apiserver
  stop_one "$dir" etcd
  stop_one "$dir" watchdog
}

cmd=${1:-}
shift || true
case $cmd in
  build) build ;;
  path) built && echo "$APISERVER" || exit 1 ;;
  start) start "$@" ;;
  stop) [ $# -eq 1 ] || die "usage: $0 stop DIR"; stop "$1" ;;
  stop-apiserver) [ $# -eq 1 ] || die "usage: $0 stop-apiserver DIR"; stop_one "$(realpath -m "$1")" apiserver ;;
  start-apiserver)
    [ $# -eq 1 ] || die "usage: $0 start-apiserver DIR"
    DIR=$(realpath -m "$1"); done_ok=
    trap '[ -n "$done_ok" ] || stop_one "$DIR" apiserver' EXIT
    start_apiserver "$DIR"; done_ok=1 ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
