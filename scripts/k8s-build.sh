#!/usr/bin/env bash
# Builds the real Kubernetes API server that sclb's discovery tests run against: kube-apiserver
# v1.20.2 and etcd 3.4, both from Debian bookworm. Debian's `kubernetes` binary package ships only
# kubectl, but its source package is the full tree with vendor/, and kube-apiserver builds from it
# with Debian's Go 1.19. scripts/k8s-apiserver.sh build calls this; it can also run on its own.
#
#   scripts/k8s-build.sh      once per machine: ~10 min on 2 cores, ~2.5 GB under the root below
#
# Env: SCLB_K8S_ROOT (default ~/.cache/sclb/k8s), where everything lands;
#      SCLB_DEBIAN_MIRROR (default: this machine's Debian mirror, else http://deb.debian.org/debian).
#
# Nothing is installed system-wide except missing tools (dpkg-dev, curl, openssl, xz-utils,
# debian-archive-keyring) with apt-get. Go, etcd and reflect2 are unpacked from their .debs under
# the root, and the downloads go through a private apt configuration there, so the machine's own
# apt sources and lists are not touched (it needs no deb-src line).
#
# Each step records that it finished (ROOT/done/STEP); a step that did not is redone from scratch,
# so an interrupted build resumes at the step it stopped in. bin/kube-apiserver is written last,
# by rename: it exists only once the whole build has finished.
#
# Layout under the root: root/ (the unpacked .debs: root/usr/bin/etcd, root/usr/lib/go-1.19),
# src/k8s (the Kubernetes source), gopath/ and gocache/ (Go), pki/sa.{key,pub} (the
# service-account signing key), bin/kube-apiserver, apt/ and debs/ (downloads).
set -euo pipefail

ROOT=$(realpath -m "${SCLB_K8S_ROOT:-$HOME/.cache/sclb/k8s}")
K8S_VERSION=1.20.2   # the upstream version the source package must carry
DEBS=(etcd-server golang-1.19-go golang-1.19-src golang-github-modern-go-reflect2-dev)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

say() { echo "k8s-build: $*"; }
die() { echo "k8s-build: $*" >&2; exit 1; }
trap 'echo "k8s-build: failed (line $LINENO, exit $?); run it again to resume" >&2' ERR

if [ -x "$ROOT/bin/kube-apiserver" ] && [ -x "$ROOT/root/usr/bin/etcd" ] && [ -f "$ROOT/pki/sa.pub" ]; then
  say "already built: $ROOT/bin/kube-apiserver"
  exit 0
fi

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)

# need CMD PACKAGE [CMD PACKAGE ...]: apt-get install the packages whose command is missing.
need() {
  local missing=()
  while [ $# -gt 0 ]; do
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
    shift 2
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  say "installing ${missing[*]} (apt-get)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

done_() { [ -f "$ROOT/done/$1" ]; }
mark() { mkdir -p "$ROOT/done"; touch "$ROOT/done/$1"; }

# ---------------------------------------------------------------- tools
command -v apt-get >/dev/null || die "apt-get not found: the build takes Go, etcd and the Kubernetes source from Debian"
need dpkg-source dpkg-dev curl curl openssl openssl xz xz-utils
if [ ! -f "$KEYRING" ]; then
  say "installing debian-archive-keyring (apt-get)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq debian-archive-keyring >/dev/null
fi
[ -f "$KEYRING" ] || die "$KEYRING not found: install debian-archive-keyring"

# ---------------------------------------------------------------- private apt configuration
# The machine's own Debian mirror when it has one (a local mirror or proxy may be all it reaches).
host_mirror() {
  local id=
  # shellcheck disable=SC1091
  [ -r /etc/os-release ] && id=$(. /etc/os-release && echo "${ID:-}")
  [ "$id" = debian ] || return 0
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hs '^deb ' /etc/apt/sources.list | sed 's/\[[^]]*\]//' | awk '{print $2}'
  } 2>/dev/null | grep -v security | head -1 || true
}
mirror=${SCLB_DEBIAN_MIRROR:-$(host_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

APT=(-o "Dir::Etc::SourceList=$ROOT/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$ROOT/apt/lists" -o "Dir::Cache=$ROOT/apt/cache"
     -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null)
# Root's apt downloads as user _apt, which cannot write under root's home: download as root.
[ "$(id -u)" -ne 0 ] || APT+=(-o APT::Sandbox::User=root)
apt_ready=
apt_update() {
  [ -z "$apt_ready" ] || return 0
  mkdir -p "$ROOT/apt/lists/partial" "$ROOT/apt/cache/archives/partial"
  printf 'deb [signed-by=%s] %s bookworm main\ndeb-src [signed-by=%s] %s bookworm main\n' \
    "$KEYRING" "$mirror" "$KEYRING" "$mirror" > "$ROOT/apt/sources.list"
  say "apt-get update (bookworm main from $mirror, lists under $ROOT/apt)"
  apt-get "${APT[@]}" -qq update || die "apt-get update of bookworm from $mirror failed (set SCLB_DEBIAN_MIRROR?)"
  apt_ready=1
}

mkdir -p "$ROOT"
say "building kube-apiserver v$K8S_VERSION and etcd under $ROOT"

# ---------------------------------------------------------------- 1. etcd, Go 1.19, reflect2 1.0.2
if ! done_ debs; then
  apt_update
  rm -rf "$ROOT/debs" "$ROOT/root"
  mkdir -p "$ROOT/debs" "$ROOT/root"
  say "downloading ${DEBS[*]}"
  (cd "$ROOT/debs" && apt-get "${APT[@]}" -qq download "${DEBS[@]}")
  for deb in "$ROOT"/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT/root"; done
  for f in usr/bin/etcd usr/lib/go-1.19/bin/go usr/share/gocode/src/github.com/modern-go/reflect2/reflect2.go; do
    [ -e "$ROOT/root/$f" ] || die "$f is not in the unpacked packages"
  done
  mark debs
fi
say "etcd: $("$ROOT/root/usr/bin/etcd" --version | head -1)"

# ---------------------------------------------------------------- 2. the Kubernetes source
if ! done_ source; then
  apt_update
  rm -rf "$ROOT/src" "$ROOT/gopath"
  rm -f "$ROOT/done/openapi"
  mkdir -p "$ROOT/src"
  say "downloading Debian's kubernetes source package"
  (cd "$ROOT/src" && apt-get "${APT[@]}" -qq source --download-only kubernetes)
  dsc=$(find "$ROOT/src" -maxdepth 1 -name 'kubernetes_*.dsc' | head -1)
  [ -n "$dsc" ] || die "apt-get source kubernetes left no .dsc in $ROOT/src"
  deb_version=$(sed -n 's/^Version: //p' "$dsc")
  case $deb_version in
    *"$K8S_VERSION"*) ;;
    *) die "Debian's kubernetes source is $deb_version, not upstream $K8S_VERSION: this build and the tests expect $K8S_VERSION" ;;
  esac
  say "unpacking kubernetes $deb_version"
  dpkg-source -q -x --no-check "$dsc" "$ROOT/src/k8s" >/dev/null
  # The vendored reflect2 v1.0.1 crashes under Go >= 1.18 (it reads runtime internals that moved);
  # Debian's v1.0.2 does not.
  v="$ROOT/src/k8s/vendor/github.com/modern-go/reflect2"
  [ -d "$v" ] || die "$v not found in the source"
  rm -rf "${v:?}"/*
  cp "$ROOT"/root/usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
     "$ROOT"/root/usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$v/"
  mark source
fi

# ---------------------------------------------------------------- Go, in GOPATH mode
# The tree predates modules in Debian's packaging: build it as k8s.io/kubernetes in a GOPATH,
# offline, from vendor/.
export GOROOT="$ROOT/root/usr/lib/go-1.19" GOPATH="$ROOT/gopath" GOCACHE="$ROOT/gocache" \
       GO111MODULE=off CGO_ENABLED=0 GOPROXY=off GOFLAGS=
export PATH="$GOROOT/bin:$PATH"
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$ROOT/src/k8s" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
say "$(go version)"

# ---------------------------------------------------------------- 3. pkg/generated/openapi
# Not in the source package; kube-apiserver imports it. Generated the way hack/ does: for every
# package with a +k8s:openapi-gen tag, staging/ seen through vendor/.
if ! done_ openapi; then
  say "generating pkg/generated/openapi (openapi-gen)"
  go build -o "$ROOT/bin/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # The files with a +k8s: tag line, then those tagging openapi-gen (build/root/Makefile.generated_files).
  tagged() { xargs -0 grep -lZ -- "$1" || [ $? -eq 123 ]; }  # 123: some batch had no match
  pkgs=$(find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print0 \
    | tagged '^// *+k8s:' | tagged '+k8s:openapi-gen=' | xargs -0 -n1 dirname \
    | sed 's|^\./staging/src|vendor|; s|^\./||' \
    | grep -Ev '^vendor/k8s.io/(code-generator|sample-apiserver)/' \
    | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)
  [ -n "$pkgs" ] || die "found no package tagged +k8s:openapi-gen"
  rm -f pkg/generated/openapi/zz_generated.openapi.go
  "$ROOT/bin/openapi-gen" -i "$pkgs" -p k8s.io/kubernetes/pkg/generated/openapi \
    -O zz_generated.openapi -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r /dev/null
  [ -s pkg/generated/openapi/zz_generated.openapi.go ] || die "openapi-gen wrote no pkg/generated/openapi"
  mark openapi
fi

# ---------------------------------------------------------------- 4. the service-account key
if ! done_ pki || [ ! -f "$ROOT/pki/sa.key" ] || [ ! -f "$ROOT/pki/sa.pub" ]; then
  say "service-account signing key (openssl)"
  rm -rf "$ROOT/pki"
  mkdir -p "$ROOT/pki"
  openssl genrsa -out "$ROOT/pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$ROOT/pki/sa.key" -pubout -out "$ROOT/pki/sa.pub" 2>/dev/null
  mark pki
fi

# ---------------------------------------------------------------- 5. kube-apiserver
say "building cmd/kube-apiserver (the longest step: several minutes on 2 cores)"
p=k8s.io/kubernetes/vendor/k8s.io
go build -o "$ROOT/bin/kube-apiserver.partial" -ldflags "-s -w \
  -X $p/component-base/version.gitVersion=v$K8S_VERSION -X $p/component-base/version.gitMajor=1 \
  -X $p/component-base/version.gitMinor=20 -X $p/component-base/version.gitTreeState=clean \
  -X $p/client-go/pkg/version.gitVersion=v$K8S_VERSION" ./cmd/kube-apiserver
got=$("$ROOT/bin/kube-apiserver.partial" --version)
[ "$got" = "Kubernetes v$K8S_VERSION" ] || die "the built kube-apiserver says \"$got\", not Kubernetes v$K8S_VERSION"
mv -f "$ROOT/bin/kube-apiserver.partial" "$ROOT/bin/kube-apiserver"
say "built: $ROOT/bin/kube-apiserver ($got), etcd $ROOT/root/usr/bin/etcd"
