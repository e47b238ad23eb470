#!/usr/bin/env bash
# tests/deploy/run.sh - tests for the EMR deployment kit: systemd units, scripts/,
# conf/emr.toml and conf/yarn/. Runs without EMR, Spark or a running systemd:
# every install goes into a temp dir (emr-bootstrap.sh --root), Spark and sclb
# are stubs. The one real-Spark smoke test runs only when .venv/ has pyspark.
#
# Usage: tests/deploy/run.sh        (as root to apt-get shellcheck/systemd if missing)
# Last line: "N passed, N failed"; exit status 1 if anything failed.
set -uo pipefail
umask 022

here=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
boot=$repo/scripts/emr-bootstrap.sh
deploy=$repo/scripts/deploy-server.sh
start=$repo/scripts/start-connect-server.sh

passed=0
failed=0
skipped=0
T=$(mktemp -d "${TMPDIR:-/tmp}/sclb-deploy-test.XXXXXX")
spark_pid=""
cleanup() {
    if [[ -n $spark_pid ]]; then kill -9 "$spark_pid" 2>/dev/null; fi
    rm -rf -- "$T"
}
trap cleanup EXIT

ok() {
    passed=$((passed + 1))
    echo "ok    $1"
}
not_ok() {
    failed=$((failed + 1))
    echo "FAIL  $1"
    if [[ -s $T/out ]]; then sed 's/^/      | /' "$T/out" | tail -n 40; fi
}
skip() {
    skipped=$((skipped + 1))
    echo "skip  $1"
}
# t DESC CMD...: run CMD (output to $T/out), pass if it exits 0
t() {
    local desc=$1
    shift
    # output goes to $T/out only afterwards, so CMD may read the previous $T/out
    if "$@" >"$T/out.new" 2>&1; then
        mv -f "$T/out.new" "$T/out"
        ok "$desc"
    else
        mv -f "$T/out.new" "$T/out"
        not_ok "$desc"
    fi
}
# t_fails DESC STATUS PATTERN CMD...: CMD must exit with STATUS and print PATTERN (ERE)
t_fails() {
    local desc=$1 want=$2 pattern=$3 rc=0
    shift 3
    "$@" >"$T/out.new" 2>&1 || rc=$?
    mv -f "$T/out.new" "$T/out"
    if [[ $rc -eq $want ]] && { [[ -z $pattern ]] || grep -Eq -- "$pattern" "$T/out"; }; then
        ok "$desc"
    else
        echo "exit status $rc (want $want), want output matching: $pattern" >>"$T/out"
        not_ok "$desc"
    fi
}
out_has() { grep -Eq -- "$1" "$T/out"; }

# snapshot DIR: every path with type, mode, size, mtime (ns) and content hash
snapshot() {
    (cd "$1" && find . -printf '%y %m %s %T@ %p\n' | LC_ALL=C sort -k5 &&
        find . -type f -exec sha256sum {} + | LC_ALL=C sort -k2)
}
# files DIR: "mode path" of regular files, EMR fixtures (mnt/) left out
files() {
    (cd "$1" && find . -path ./mnt -prune -o \( -type f -o -type l \) -printf '%m %P\n' | LC_ALL=C sort -k2)
}

# ---------------------------------------------------------------- tools
ensure_tool() { # ensure_tool COMMAND DEBIAN_PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $2 (for $1) with apt-get"
        { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" ||
            { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2"; }; } \
            >"$T/apt.log" 2>&1
    fi
    command -v "$1" >/dev/null 2>&1
}
t "shellcheck is available (apt-get install shellcheck if missing)" ensure_tool shellcheck shellcheck
t "systemd-analyze is available (apt-get install systemd if missing)" ensure_tool systemd-analyze systemd
for tool in python3 awk sha256sum; do
    t "$tool is available" command -v "$tool"
done

# ---------------------------------------------------------------- shellcheck
# every shell script in scripts/ and tests/deploy/, by name (*.sh) or by #! line
for f in "$repo"/scripts/* "$repo"/tests/deploy/*; do
    [[ -f $f ]] || continue
    if [[ $f == *.sh ]] || head -n 1 -- "$f" | grep -Eq '^#!.*[/ ](ba|da|k)?sh( |$)'; then
        t "shellcheck ${f#"$repo"/}" shellcheck -x "$f"
    fi
done
for f in scripts/emr-bootstrap.sh scripts/deploy-server.sh scripts/start-connect-server.sh tests/deploy/run.sh; do
    t "$f is executable" test -x "$repo/$f"
done

# ---------------------------------------------------------------- systemd units
# verify --root resolves units and ExecStart= paths inside a fake root: give it
# systemd's own units (sysinit.target, ...) and stub executables.
vroot=$T/verify-root
mkdir -p "$vroot/etc/systemd/system" "$vroot/usr/lib/systemd" "$vroot/usr/local/bin" \
    "$vroot/usr/local/lib/sclb" "$vroot/bin"
for d in /usr/lib/systemd/system /lib/systemd/system; do
    if [[ -d $d ]]; then
        cp -r "$d" "$vroot/usr/lib/systemd/"
        break
    fi
done
for stub in usr/local/bin/sclb usr/local/lib/sclb/start-connect-server.sh bin/kill; do
    printf '#!/bin/sh\nexit 0\n' >"$vroot/$stub"
    chmod 0755 "$vroot/$stub"
done
verify_unit() { # verify_unit UNIT: exit 0 and not one warning
    cp "$repo/systemd/$1" "$vroot/etc/systemd/system/$1"
    local rc=0
    systemd-analyze verify --root="$vroot" "$1" >"$T/verify.out" 2>&1 || rc=$?
    cat "$T/verify.out"
    [[ $rc -eq 0 && ! -s $T/verify.out ]]
}
for unit in sclb.service sparkconnect.service; do
    t "systemd-analyze verify $unit: no errors, no warnings" verify_unit "$unit"
done
# control: the harness must see a bad unit (else the two tests above prove nothing)
sed 's/^RestartSec=10s$/RestartSec=10s\nRestartSecc=1/' "$repo/systemd/sclb.service" \
    >"$vroot/etc/systemd/system/broken.service"
t_fails "control: verify flags an unknown key in a unit" 0 "Unknown key 'RestartSecc'" \
    systemd-analyze verify --root="$vroot" broken.service
rm -f "$vroot/etc/systemd/system/broken.service"

security_ok() {
    systemd-analyze security --offline=true --root="$vroot" sclb.service >"$T/sec.out" 2>&1
    local score
    score=$(sed -n 's/.*Overall exposure level for sclb.service: \([0-9.]*\).*/\1/p' "$T/sec.out")
    echo "exposure: ${score:-?}"
    [[ -n $score ]] && awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'
}
t "systemd-analyze security: sclb.service exposure <= 2.0 (OK)" security_ok

unit_has() { # unit_has UNIT LINE...: each line present verbatim
    local unit=$1 line
    shift
    for line in "$@"; do
        grep -qxF -- "$line" "$repo/systemd/$unit" || { echo "missing in $unit: $line"; return 1; }
    done
}
t "sclb.service: notify, check before start, HUP reload, restart 10s, user, dirs" unit_has sclb.service \
    Type=notify "ExecStartPre=/usr/local/bin/sclb check -c /etc/sclb/sclb.toml" \
    "ExecStart=/usr/local/bin/sclb -c /etc/sclb/sclb.toml" \
    "ExecReload=/usr/local/bin/sclb check -c /etc/sclb/sclb.toml" "ExecReload=/bin/kill -HUP \$MAINPID" \
    Restart=on-failure RestartSec=10s User=sclb StateDirectory=sclb RuntimeDirectory=sclb \
    "CapabilityBoundingSet=" NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
    PrivateDevices=yes ProtectKernelTunables=yes ProtectKernelModules=yes ProtectKernelLogs=yes \
    ProtectControlGroups=yes "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX" RestrictNamespaces=yes \
    LockPersonality=yes MemoryDenyWriteExecute=yes SystemCallArchitectures=native
t_fails "sclb.service: no CAP_NET_BIND_SERVICE granted (15002 and 9000 are unprivileged)" 1 "" \
    grep -E '^(Ambient|)Capabilit[a-zA-Z]*=.*CAP_NET_BIND_SERVICE' "$repo/systemd/sclb.service"
t "sparkconnect.service: hadoop, env file, script path, restart 10s, JVM exit 143" unit_has sparkconnect.service \
    User=hadoop EnvironmentFile=-/etc/default/sparkconnect \
    ExecStart=/usr/local/lib/sclb/start-connect-server.sh Restart=on-failure RestartSec=10s \
    SuccessExitStatus=143 RestartPreventExitStatus=78
# A bad file must fail `systemctl reload sclb` (systemd runs ExecReload lines in order and stops
# at the first failure), so the check comes before the HUP.
reload_checks_first() {
    grep '^ExecReload=' "$repo/systemd/sclb.service" | head -1 | grep -q 'sclb check'
}
t "sclb.service: reload checks the config before HUP" reload_checks_first

# seconds of a systemd/humantime span like "5min 30s", "5m", "90s", "2h"
span_secs() {
    python3 - "$1" <<'EOF'
import re, sys
units = {"h": 3600, "min": 60, "m": 60, "s": 1, "": 1}
total = 0
for n, u in re.findall(r"(\d+)\s*(min|h|m|s|)", sys.argv[1]):
    total += int(n) * units[u]
print(total)
EOF
}
stop_timeout_covers_hard_stop() {
    local hard stop
    hard=$(sed -n 's/^hard_stop_after = "\(.*\)"$/\1/p' "$repo/conf/emr.toml")
    stop=$(sed -n 's/^TimeoutStopSec=//p' "$repo/systemd/sclb.service")
    echo "hard_stop_after=$hard ($(span_secs "$hard")s) TimeoutStopSec=$stop ($(span_secs "$stop")s)"
    (($(span_secs "$stop") > $(span_secs "$hard")))
}
t "sclb.service: TimeoutStopSec > hard_stop_after of conf/emr.toml" stop_timeout_covers_hard_stop
nofile_covers_maxconn() {
    local maxconn nofile
    maxconn=$(sed -n 's/^maxconn = \([0-9]*\)$/\1/p' "$repo/conf/emr.toml")
    nofile=$(sed -n 's/^LimitNOFILE=//p' "$repo/systemd/sclb.service")
    echo "maxconn=$maxconn LimitNOFILE=$nofile"
    ((nofile >= 2 * maxconn + 1000))
}
t "sclb.service: LimitNOFILE >= 2 * maxconn + 1000" nofile_covers_maxconn

# ---------------------------------------------------------------- conf/
emr_toml_is_the_format() {
    python3 - "$repo/conf/emr.toml" <<'EOF'
import sys, tomllib
got = tomllib.load(open(sys.argv[1], "rb"))
want = {
    "global": {
        "maxconn": 20000, "hard_stop_after": "5m",
        "log": {"level": "info", "format": "text"},
        "admin": {"path": "/run/sclb/admin.sock", "mode": "0600", "level": "admin"},
        "stats": {"bind": "0.0.0.0:9000"},
        "state_file": "/var/lib/sclb/state.json",
    },
    "defaults": {
        "timeout": {"connect": "5s", "client": "4h", "server": "4h", "tunnel": "4h", "queue": "30s"},
        "retries": 3,
        "check": {"type": "spark", "inter": "2s", "rise": 2, "fall": 3, "timeout": "2s"},
    },
    "frontend": [{"name": "sparkconnect", "bind": ["0.0.0.0:15002"], "backend": "sparkconnect_servers"}],
    "backend": [{
        "name": "sparkconnect_servers", "balance": "roundrobin",
        "stick": {"on": "src", "expire": "2h", "size": 100000},
        "servers": [{"name": f"sc{i}", "addr": f"10.0.1.1{i}:15002"} for i in (1, 2, 3)],
    }],
}
if got != want:
    print("conf/emr.toml differs from the sclb format:\n got:", got, "\nwant:", want)
    sys.exit(1)
EOF
}
t "conf/emr.toml parses as TOML and holds exactly the sclb format (no invented keys)" emr_toml_is_the_format
t "conf/emr.toml follows the one-server-per-line contract (deploy-server.sh --list)" \
    "$deploy" --config "$repo/conf/emr.toml" --list
yarn_files_agree() {
    python3 - "$repo/conf/yarn/capacity-scheduler.xml" "$repo/conf/yarn/emr-configurations.json" <<'EOF'
import json, sys
import xml.etree.ElementTree as ET
xml = {p.findtext("name"): p.findtext("value") for p in ET.parse(sys.argv[1]).getroot().iter("property")}
cls = {c["Classification"]: c["Properties"] for c in json.load(open(sys.argv[2]))}
emr = cls["capacity-scheduler"]
assert xml == emr, f"capacity-scheduler.xml and emr-configurations.json differ:\n{xml}\n{emr}"
q = "yarn.scheduler.capacity.root."
assert xml[q + "queues"] == "default,sparkconnect"
assert xml[q + "default.capacity"] == "70" and xml[q + "sparkconnect.capacity"] == "30"
assert float(xml[q + "default.capacity"]) + float(xml[q + "sparkconnect.capacity"]) == 100
# default can never grow into the sparkconnect share
assert float(xml[q + "default.maximum-capacity"]) <= 70
# the single YARN user (hadoop) can reach the queue's maximum-capacity
mx, cap, ulf = (float(xml[q + "sparkconnect." + k]) for k in ("maximum-capacity", "capacity", "user-limit-factor"))
assert cap * ulf >= mx, (cap, ulf, mx)
print("queues:", {k[len(q):]: v for k, v in xml.items()})
EOF
}
t "conf/yarn: capacity-scheduler.xml == emr-configurations.json; 70/30, caps and user-limit-factor hold" yarn_files_agree

# ---------------------------------------------------------------- start-connect-server.sh
# fake SPARK_HOME whose spark-submit prints its pid and argv, one per line
fake_spark() { # fake_spark DIR [jar location relative to DIR]
    mkdir -p "$1/bin"
    cat >"$1/bin/spark-submit" <<'EOF'
#!/usr/bin/env bash
echo "pid=$$"
printf 'arg=%s\n' "$@"
EOF
    chmod 0755 "$1/bin/spark-submit"
    if [[ -n ${2:-} ]]; then
        mkdir -p "$1/$(dirname "$2")"
        : >"$1/$2"
    fi
}
fake_spark "$T/spark4" jars/spark-connect_2.13-4.0.5.jar
fake_spark "$T/spark35" connect/spark-connect_2.12-3.5.1.jar
fake_spark "$T/spark-nojar"
run_start() { # run_start SPARK_HOME [VAR=value...] -- [args]: clean env, like systemd
    local home=$1
    shift
    local envs=()
    while [[ $# -gt 0 && $1 != -- ]]; do envs+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift
    env -i PATH="$PATH" HOSTNAME=node1 SPARK_HOME="$home" "${envs[@]}" "$start" "$@"
}
# start_argv SPARK_HOME [VAR=value...] -- [args]: run it, argv of spark-submit to $T/argv
start_argv() { run_start "$@" >"$T/argv" 2>&1; }
args_have() { # args_have ARG...: each is one argv entry in $T/argv
    local a
    for a in "$@"; do grep -qxF -- "arg=$a" "$T/argv" || { echo "missing argv entry: $a"; return 1; }; done
}
args_lack() {
    local a
    for a in "$@"; do ! grep -qF -- "arg=$a" "$T/argv" || { echo "unexpected argv entry: $a"; return 1; }; done
}
t "start-connect-server: defaults run (Spark 4 layout, jar in jars/)" start_argv "$T/spark4"
t "start-connect-server: YARN client mode, queue, driver sizing, port, design confs" args_have \
    --class org.apache.spark.sql.connect.service.SparkConnectServer --master yarn --deploy-mode client \
    --queue sparkconnect --driver-memory 4g --driver-cores 2 "Spark Connect server on node1" \
    spark.connect.grpc.binding.port=15002 spark.connect.grpc.maxInboundMessageSize=134217728 \
    spark.sql.execution.arrow.maxRecordsPerBatch=10000 spark.sql.shuffle.partitions=200 \
    spark.sql.autoBroadcastJoinThreshold=104857600
t "start-connect-server: no --jars when the jar is already in \$SPARK_HOME/jars" args_lack --jars
# Only settings that exist in Spark 4.0 (checked against
# sql/connect/server/.../config/Connect.scala and SQLConf): no maxOutboundMessageSize.
only_real_confs() {
    local conf
    while read -r conf; do
        case ${conf%%=*} in
        spark.connect.grpc.binding.port | spark.connect.grpc.binding.address | \
            spark.connect.grpc.maxInboundMessageSize | spark.sql.execution.arrow.maxRecordsPerBatch | \
            spark.sql.shuffle.partitions | spark.sql.autoBroadcastJoinThreshold) ;;
        *) echo "unexpected conf: $conf"; return 1 ;;
        esac
    done < <(grep -A1 -xF 'arg=--conf' "$T/argv" | sed -n 's/^arg=\(spark\..*\)/\1/p')
}
t "start-connect-server: every --conf is a real Spark 4.0 setting" only_real_confs
start_argv "$T/spark35"
t "start-connect-server: jar under \$SPARK_HOME/connect is passed with --jars" \
    args_have --jars "$T/spark35/connect/spark-connect_2.12-3.5.1.jar"
: >"$T/custom-connect.jar"
start_argv "$T/spark4" SPARK_CONNECT_JAR="$T/custom-connect.jar"
t "start-connect-server: SPARK_CONNECT_JAR overrides the lookup" args_have --jars "$T/custom-connect.jar"
start_argv "$T/spark-nojar" SPARK_CONNECT_PACKAGES=org.apache.spark:spark-connect_2.12:3.5.1
t "start-connect-server: SPARK_CONNECT_PACKAGES -> --packages" \
    args_have --packages org.apache.spark:spark-connect_2.12:3.5.1
start_argv "$T/spark4" 'MASTER=local[2]' PORT=16000 SPARK_DRIVER_MEMORY=1g SPARK_CONNECT_BIND_ADDRESS=127.0.0.1 \
    'SPARK_CONNECT_EXTRA_ARGS=--conf spark.ui.enabled=false' -- --verbose
t "start-connect-server: local master, PORT fallback, bind address, extra args, \"\$@\"" args_have \
    'local[2]' spark.connect.grpc.binding.port=16000 --driver-memory 1g \
    spark.connect.grpc.binding.address=127.0.0.1 spark.ui.enabled=false --verbose
t "start-connect-server: no --queue unless MASTER=yarn" args_lack --queue
exec_keeps_pid() { # systemd must see the JVM as the main PID: the script execs
    env -i PATH="$PATH" SPARK_HOME="$T/spark4" "$start" >"$T/exec.out" 2>&1 &
    local pid=$!
    wait "$pid"
    grep -qx "pid=$pid" "$T/exec.out" || { echo "spark-submit ran as a child, not via exec ($pid)"; cat "$T/exec.out"; return 1; }
}
t "start-connect-server: execs spark-submit (same PID)" exec_keeps_pid
t_fails "start-connect-server: no connect jar -> exit 78 with a hint" 78 "SPARK_CONNECT_JAR" run_start "$T/spark-nojar"
t_fails "start-connect-server: bad port -> exit 78" 78 "not a port" run_start "$T/spark4" SPARK_CONNECT_PORT=70000
t_fails "start-connect-server: bad driver memory -> exit 78" 78 "SPARK_DRIVER_MEMORY" run_start "$T/spark4" SPARK_DRIVER_MEMORY=lots
t_fails "start-connect-server: Spark not installed (yet) -> exit 1, retried by systemd" 1 "not found" \
    run_start "$T/no-such-spark"

# ---------------------------------------------------------------- emr-bootstrap.sh
stubs=$T/stubs
mkdir -p "$stubs"
# sclb stub: `check -c FILE` passes when FILE has a [[backend]]; logs its calls
cat >"$stubs/sclb" <<EOF
#!/bin/sh
echo "\$*" >>"$T/sclb-calls.log"
[ "\$1" = check ] && [ "\$2" = -c ] && grep -q '^\[\[backend\]\]' "\$3" && exit 0
echo "stub sclb: rejected: \$*" >&2
exit 1
EOF
printf '#!/bin/sh\necho "config error: everything" >&2\nexit 1\n' >"$stubs/sclb-rejects"
chmod 0755 "$stubs/sclb" "$stubs/sclb-rejects"

# emr_root DIR ISMASTER [GROUP_ID]: fake EMR node info
emr_root() {
    mkdir -p "$1/mnt/var/lib/info"
    printf '{"isMaster": %s, "isRunningNodeManager": %s, "instanceGroupId": "%s"}\n' \
        "$2" "$([[ $2 == true ]] && echo false || echo true)" "${3:-ig-MASTER}" >"$1/mnt/var/lib/info/instance.json"
    cat >"$1/mnt/var/lib/info/job-flow.json" <<'EOF'
{"jobFlowId": "j-TESTCLUSTER", "instanceGroups": [
  {"instanceGroupId": "ig-MASTER", "instanceRole": "Master", "instanceGroupName": "MASTER"},
  {"instanceGroupId": "ig-CORE", "instanceRole": "Core", "instanceGroupName": "CORE"},
  {"instanceGroupId": "ig-TASK", "instanceRole": "Task", "instanceGroupName": "TASK"}]}
EOF
}

primary_files="640 etc/sclb/sclb.toml
644 etc/systemd/system/sclb.service
755 usr/local/bin/sclb
755 usr/local/sbin/sclb-deploy-server
644 usr/local/share/sclb/yarn/capacity-scheduler.xml
644 usr/local/share/sclb/yarn/emr-configurations.json"
core_files="644 etc/default/sparkconnect
644 etc/systemd/system/sparkconnect.service
755 usr/local/lib/sclb/start-connect-server.sh"

expect_files() { # expect_files ROOT LIST
    local got
    got=$(files "$1")
    [[ $got == "$2" ]] || { diff <(echo "$2") <(echo "$got") | sed 's/^/expected vs got: /'; return 1; }
}
same_as_source() { # same_as_source ROOT (DEST SRC)...
    local root=$1
    shift
    while [[ $# -gt 0 ]]; do
        cmp -- "$root/$1" "$2" || return 1
        shift 2
    done
}

# primary, first run
P=$T/primary
mkdir -p "$P"
emr_root "$P" true
P_ARGS=(--root "$P" --sclb-binary "$stubs/sclb" --servers "10.0.1.21, 10.0.1.22:15002,ip-10-0-1-23.ec2.internal")
t "bootstrap primary: first run succeeds" "$boot" "${P_ARGS[@]}"
cp "$T/out" "$T/p1.out"
t "bootstrap primary: says it skips useradd under --root" \
    grep -Eq 'skipped \(--root\): useradd .*sclb$' "$T/p1.out"
t "bootstrap primary: says it skips systemctl enable --now sclb.service under --root" \
    grep -q 'skipped (--root): systemctl enable --now sclb.service' "$T/p1.out"
t "bootstrap primary: exactly the expected files and modes" expect_files "$P" "$primary_files"
t "bootstrap primary: installed files are the repo's" same_as_source "$P" \
    usr/local/bin/sclb "$stubs/sclb" usr/local/sbin/sclb-deploy-server "$deploy" \
    etc/systemd/system/sclb.service "$repo/systemd/sclb.service" \
    usr/local/share/sclb/yarn/capacity-scheduler.xml "$repo/conf/yarn/capacity-scheduler.xml" \
    usr/local/share/sclb/yarn/emr-configurations.json "$repo/conf/yarn/emr-configurations.json"
rendered_is_template_plus_servers() {
    local want
    want='  { name = "sc1", addr = "10.0.1.21:15002" },
  { name = "sc2", addr = "10.0.1.22:15002" },
  { name = "sc3", addr = "ip-10-0-1-23.ec2.internal:15002" },'
    # outside the servers list: byte for byte conf/emr.toml
    diff <(sed '/^servers = \[$/,/^\]$/{/^servers = \[$/!{/^\]$/!d}}' "$repo/conf/emr.toml") \
        <(sed '/^servers = \[$/,/^\]$/{/^servers = \[$/!{/^\]$/!d}}' "$P/etc/sclb/sclb.toml") || return 1
    [[ $(sed -n '/^servers = \[$/,/^\]$/{/^servers = \[$/!{/^\]$/!p}}' "$P/etc/sclb/sclb.toml") == "$want" ]]
}
t "bootstrap primary: sclb.toml = conf/emr.toml with only the servers list replaced" rendered_is_template_plus_servers
t "bootstrap primary: rendered sclb.toml is valid TOML" \
    python3 -c 'import sys,tomllib; tomllib.load(open(sys.argv[1],"rb"))' "$P/etc/sclb/sclb.toml"
t "bootstrap primary: rendered config was checked with sclb check -c" grep -q '^check -c ' "$T/sclb-calls.log"
t "bootstrap primary: rendered sclb.toml keeps the deploy-server contract" \
    "$deploy" --no-check --config "$P/etc/sclb/sclb.toml" --list

# primary, second run: nothing changes
snapshot "$P" >"$T/snap1"
"$boot" "${P_ARGS[@]}" >"$T/run2.out" 2>&1
rc=$?
snapshot "$P" >"$T/snap2"
cp "$T/run2.out" "$T/out"
t "bootstrap primary: second run succeeds" test "$rc" -eq 0
t "bootstrap primary: second run leaves every file, mode and mtime as it was" cmp "$T/snap1" "$T/snap2"
count_unchanged() { [[ $(grep -c '^emr-bootstrap: unchanged /' "$T/run2.out") -eq $2 ]] && grep -q "$1" "$T/run2.out"; }
t "bootstrap primary: second run prints 'unchanged' for all 6 files and changes 0" \
    count_unchanged 'done: 0 file(s) changed, 6 unchanged' 6
t_fails "bootstrap primary: second run does not daemon-reload" 1 "" grep -q daemon-reload "$T/run2.out"

# dry run on an installed node and on a fresh one
"$boot" "${P_ARGS[@]}" --dry-run >"$T/out" 2>&1
snapshot "$P" >"$T/snap3"
t "bootstrap --dry-run on an installed primary: nothing written" cmp "$T/snap1" "$T/snap3"
D=$T/dry
mkdir -p "$D"
emr_root "$D" true
snapshot "$D" >"$T/snapd1"
"$boot" --root "$D" --sclb-binary "$stubs/sclb" --servers 10.0.1.21 --dry-run >"$T/out" 2>&1
rc=$?
snapshot "$D" >"$T/snapd2"
dry_said() {
    [[ $rc -eq 0 ]] && grep -q 'would write /etc/sclb/sclb.toml' "$T/dry.out" &&
        grep -q 'would run: systemctl enable --now sclb.service' "$T/dry.out" && grep -q 'nothing written' "$T/dry.out"
}
cp "$T/out" "$T/dry.out"
t "bootstrap --dry-run on a fresh primary: says what it would do" dry_said
t "bootstrap --dry-run on a fresh primary: writes nothing" cmp "$T/snapd1" "$T/snapd2"

# hand edits to the config survive a re-run, --force-config resets them
"$deploy" --no-check --config "$P/etc/sclb/sclb.toml" sc9 10.0.1.99:15002 >/dev/null 2>&1
cp "$P/etc/sclb/sclb.toml" "$T/edited.toml"
t "bootstrap primary: re-run with an edited sclb.toml succeeds" "$boot" "${P_ARGS[@]}"
cp "$T/out" "$T/kept.out"
t "bootstrap primary: ... the edit is still there" cmp "$T/edited.toml" "$P/etc/sclb/sclb.toml"
t "bootstrap primary: ... and prints 'kept'" grep -q '^emr-bootstrap: kept /etc/sclb/sclb.toml' "$T/kept.out"
t "bootstrap primary: --force-config rewrites it" "$boot" "${P_ARGS[@]}" --force-config
t_fails "bootstrap primary: ... without the edit" 1 "" grep -q sc9 "$P/etc/sclb/sclb.toml"

# --discover through a stub aws CLI
mkdir -p "$T/awsbin"
cat >"$T/awsbin/aws" <<EOF
#!/bin/sh
echo "\$*" >>"$T/aws-calls.log"
printf '10.0.1.40\t10.0.1.5\tNone\n10.0.1.40\n'
EOF
chmod 0755 "$T/awsbin/aws"
G=$T/discover
mkdir -p "$G"
emr_root "$G" true
t "bootstrap primary --discover: succeeds with the aws CLI's instance list" \
    env PATH="$T/awsbin:$PATH" "$boot" --root "$G" --sclb-binary "$stubs/sclb" --discover
discovered() {
    grep -q -- '--cluster-id j-TESTCLUSTER --instance-group-types CORE ' "$T/aws-calls.log" &&
        [[ $("$deploy" --no-check --config "$G/etc/sclb/sclb.toml" --list) == "sc1 10.0.1.5:15002
sc2 10.0.1.40:15002" ]]
}
t "bootstrap primary --discover: asks EMR for CORE instances of this cluster; IPs sorted, deduplicated" discovered

# errors: clear message, right status, nothing written
E=$T/errors
mkdir -p "$E"
emr_root "$E" true
snapshot "$E" >"$T/snape1"
t_fails "bootstrap: primary without --servers/--discover -> usage error" 2 "needs --servers" \
    "$boot" --root "$E" --sclb-binary "$stubs/sclb"
t_fails "bootstrap: bad --servers entry -> usage error" 2 "bad entry 'not_a host'" \
    "$boot" --root "$E" --sclb-binary "$stubs/sclb" --servers "10.0.1.1,not_a host"
t_fails "bootstrap: duplicate --servers entry -> usage error" 2 "duplicate address" \
    "$boot" --root "$E" --sclb-binary "$stubs/sclb" --servers "10.0.1.1,10.0.1.1:15002"
t_fails "bootstrap: config rejected by sclb check -> error" 1 "sclb check rejected" \
    "$boot" --root "$E" --sclb-binary "$stubs/sclb-rejects" --servers 10.0.1.1
t_fails "bootstrap: unknown option -> usage error" 2 "unknown argument: --frobnicate" \
    "$boot" --root "$E" --frobnicate
t_fails "bootstrap: missing --sclb-binary file -> error" 1 "no such file" \
    "$boot" --root "$E" --sclb-binary "$T/nope" --servers 10.0.1.1
snapshot "$E" >"$T/snape2"
t "bootstrap: failed runs wrote nothing" cmp "$T/snape1" "$T/snape2"
N=$T/not-emr
mkdir -p "$N"
t_fails "bootstrap: no instance.json -> error naming it and --role" 1 "instance.json not found.*--role" \
    "$boot" --root "$N"
t "bootstrap: --help prints usage" "$boot" --help
t "bootstrap: ... which lists --root and --dry-run" grep -q -- '--dry-run' "$T/out"

# core node (python3 JSON path), second run, dry run
C=$T/core
mkdir -p "$C"
emr_root "$C" false ig-CORE
C_ARGS=(--root "$C" --driver-memory 8g --driver-cores 4 --port 15003 --servers ignored:1)
t "bootstrap core (JSON via python3): first run succeeds" env SCLB_JSON_TOOL=python3 "$boot" "${C_ARGS[@]}"
t "bootstrap core: detected role core" grep -q 'node role: core' "$T/out"
t "bootstrap core: exactly the expected files and modes" expect_files "$C" "$core_files"
t "bootstrap core: installed files are the repo's" same_as_source "$C" \
    usr/local/lib/sclb/start-connect-server.sh "$start" \
    etc/systemd/system/sparkconnect.service "$repo/systemd/sparkconnect.service"
env_file_ok() {
    grep -qx SPARK_DRIVER_MEMORY=8g "$C/etc/default/sparkconnect" &&
        grep -qx SPARK_DRIVER_CORES=4 "$C/etc/default/sparkconnect" &&
        grep -qx SPARK_CONNECT_PORT=15003 "$C/etc/default/sparkconnect" &&
        grep -qx SPARK_CONNECT_QUEUE=sparkconnect "$C/etc/default/sparkconnect"
}
t "bootstrap core: /etc/default/sparkconnect carries --driver-memory/--driver-cores/--port" env_file_ok
env_file_drives_script() { # the env file, as systemd would load it, gives the expected argv
    local vars
    mapfile -t vars < <(grep -E '^[A-Z_]+=' "$C/etc/default/sparkconnect" | grep -v '^SPARK_HOME=')
    start_argv "$T/spark4" "${vars[@]}" &&
        args_have --driver-memory 8g --driver-cores 4 spark.connect.grpc.binding.port=15003 --queue sparkconnect
}
t "bootstrap core: start script reads /etc/default/sparkconnect as intended" env_file_drives_script
snapshot "$C" >"$T/snapc1"
"$boot" "${C_ARGS[@]}" >"$T/run2.out" 2>&1
rc=$?
snapshot "$C" >"$T/snapc2"
cp "$T/run2.out" "$T/out"
t "bootstrap core (JSON via jq or python3): second run succeeds" test "$rc" -eq 0
t "bootstrap core: second run leaves every file, mode and mtime as it was" cmp "$T/snapc1" "$T/snapc2"
t "bootstrap core: second run prints 'unchanged' for all 3 files" count_unchanged 'done: 0 file(s) changed, 3 unchanged' 3
"$boot" "${C_ARGS[@]}" --dry-run >"$T/out" 2>&1
snapshot "$C" >"$T/snapc3"
t "bootstrap --dry-run on a core node: nothing written" cmp "$T/snapc1" "$T/snapc3"
C2=$T/core-norole
mkdir -p "$C2"
t "bootstrap --role core works without instance.json" "$boot" --root "$C2" --role core
t "bootstrap --role core: same files" expect_files "$C2" "$core_files"

# task node: nothing unless --server-roles includes task
K=$T/task
mkdir -p "$K"
emr_root "$K" false ig-TASK
snapshot "$K" >"$T/snapk1"
t "bootstrap task node: succeeds" "$boot" --root "$K"
t "bootstrap task node: says nothing to install" grep -q 'nothing to install' "$T/out"
snapshot "$K" >"$T/snapk2"
t "bootstrap task node: writes nothing by default" cmp "$T/snapk1" "$T/snapk2"
t "bootstrap task node with --server-roles core,task: installs the server" \
    "$boot" --root "$K" --server-roles core,task
t "bootstrap task node with --server-roles core,task: the core file set" expect_files "$K" "$core_files"

# ---------------------------------------------------------------- deploy-server.sh
cfg=$T/deploy/sclb.toml
mkdir -p "$T/deploy"
cp "$repo/conf/emr.toml" "$cfg"
chmod 0640 "$cfg"
ino_before=$(stat -c %i "$cfg")
t "deploy-server: add sc4" "$deploy" --config "$cfg" --sclb "$stubs/sclb" sc4 10.0.1.14:15002
added_one_line() {
    diff "$repo/conf/emr.toml" "$cfg" >"$T/diff.out"
    cat "$T/diff.out"
    [[ $(grep -c '^[<>]' "$T/diff.out") -eq 1 ]] &&
        grep -qxF '>   { name = "sc4", addr = "10.0.1.14:15002" },' "$T/diff.out"
}
t "deploy-server: exactly one line added, inside the servers list, same indentation" added_one_line
t "deploy-server: validated the new file with --sclb" grep -q "^check -c $T/deploy/\.sclb\.toml\." "$T/sclb-calls.log"
replaced_atomically() {
    [[ $(stat -c %i "$cfg") != "$ino_before" && $(stat -c %a "$cfg") == 640 ]] &&
        [[ -z $(find "$T/deploy" -name '.sclb.toml.*') ]]
}
t "deploy-server: file replaced by rename (new inode), mode kept, no temp file left" replaced_atomically
t "deploy-server: result is valid TOML with 4 servers" python3 -c '
import sys, tomllib
s = tomllib.load(open(sys.argv[1], "rb"))["backend"][0]["servers"]
assert [x["name"] for x in s] == ["sc1", "sc2", "sc3", "sc4"], s' "$cfg"
cp "$cfg" "$T/cfg.before"
t_fails "deploy-server: refuses a duplicate name" 1 "server 'sc4' already exists" \
    "$deploy" --config "$cfg" --no-check sc4 10.0.1.15:15002
t_fails "deploy-server: refuses a duplicate address" 1 "already server 'sc1'" \
    "$deploy" --config "$cfg" --no-check sc5 10.0.1.11:15002
t_fails "deploy-server: bad address -> usage error" 2 "bad address" \
    "$deploy" --config "$cfg" --no-check sc5 10.0.1.15
t_fails "deploy-server: sclb check rejects -> file unchanged" 1 "sclb check rejected" \
    "$deploy" --config "$cfg" --sclb "$stubs/sclb-rejects" sc5 10.0.1.15:15002
t_fails "deploy-server: --dry-run shows the diff" 0 '^\+  \{ name = "sc5", addr = "\[fd00::5\]:15002" \},' \
    "$deploy" --config "$cfg" --no-check --dry-run sc5 '[fd00::5]:15002'
t "deploy-server: refused, failed and dry runs left the file alone" cmp "$T/cfg.before" "$cfg"
t_fails "deploy-server: --remove of an unknown name fails clearly" 1 "no server 'sc7'" \
    "$deploy" --config "$cfg" --no-check --remove sc7
t "deploy-server: --remove sc4" "$deploy" --config "$cfg" --sclb "$stubs/sclb" --remove sc4
t "deploy-server: after add + remove the file is byte for byte the original" cmp "$repo/conf/emr.toml" "$cfg"
t_fails "deploy-server: --sclb that does not exist -> error" 1 "not an executable" \
    "$deploy" --config "$cfg" --sclb "$T/nope" sc5 10.0.1.15:15002
# files that break the contract are refused, untouched
sed 's/^  { name = "sc2", addr = "10.0.1.12:15002" },$/  { name = "sc2", addr = "10.0.1.12:15002", weight = 2 },/' \
    "$repo/conf/emr.toml" >"$T/deploy/weight.toml"
cp "$T/deploy/weight.toml" "$T/weight.before"
t_fails "deploy-server: a servers line with other keys -> refused with file:line" 1 "weight.toml:[0-9]+: not one" \
    "$deploy" --config "$T/deploy/weight.toml" --no-check sc4 10.0.1.14:15002
t "deploy-server: ... file untouched" cmp "$T/weight.before" "$T/deploy/weight.toml"
{
    sed '/^servers = \[$/,/^\]$/d' "$repo/conf/emr.toml"
    echo 'servers = [ { name = "sc1", addr = "10.0.1.11:15002" } ]'
} >"$T/deploy/oneline.toml"
t_fails "deploy-server: a one-line servers array -> refused" 1 "must be alone on its line" \
    "$deploy" --config "$T/deploy/oneline.toml" --no-check sc4 10.0.1.14:15002
sed '/^\]$/d' "$repo/conf/emr.toml" >"$T/deploy/open.toml"
t_fails "deploy-server: an unclosed servers list -> refused" 1 "never closed" \
    "$deploy" --config "$T/deploy/open.toml" --no-check sc4 10.0.1.14:15002
{
    cat "$repo/conf/emr.toml"
    printf '\n[[backend]]\nname = "other"\nbalance = "roundrobin"\nservers = [\n  { name = "o1", addr = "10.0.2.1:15002" },\n]\n'
} >"$T/deploy/two.toml"
t_fails "deploy-server: two backends and no --backend -> asks for one" 1 "pick one with --backend" \
    "$deploy" --config "$T/deploy/two.toml" --no-check sc4 10.0.1.14:15002
t "deploy-server: --backend other adds to that backend only" \
    "$deploy" --config "$T/deploy/two.toml" --no-check --backend other o2 10.0.2.2:15002
o2_follows_o1() {
    grep -A1 -F '{ name = "o1"' "$T/deploy/two.toml" | grep -qF '{ name = "o2", addr = "10.0.2.2:15002" },'
}
t "deploy-server: ... o2 lands right after o1, in the other backend's list" o2_follows_o1
t_fails "deploy-server: missing config -> error" 1 "no such file" \
    "$deploy" --config "$T/deploy/none.toml" sc4 10.0.1.14:15002

# ---------------------------------------------------------------- optional: real sclb binary
# With a built sclb (SCLB_BIN, default target/debug/sclb; not built here) the
# stubs above are replaced by the real `sclb check`.
sclb_bin=${SCLB_BIN:-$repo/target/debug/sclb}
if [[ -x $sclb_bin ]] && "$sclb_bin" check --help >/dev/null 2>&1; then
    t "real sclb: check accepts conf/emr.toml" "$sclb_bin" check -c "$repo/conf/emr.toml"
    R=$T/real-primary
    mkdir -p "$R"
    emr_root "$R" true
    t "real sclb: bootstrap primary with the real binary (rendered config checked)" \
        "$boot" --root "$R" --sclb-binary "$sclb_bin" --servers 10.0.1.21,10.0.1.22
    t "real sclb: check accepts the installed /etc/sclb/sclb.toml" "$sclb_bin" check -c "$R/etc/sclb/sclb.toml"
    t "real sclb: deploy-server adds sc3, validated by sclb check" \
        "$deploy" --config "$R/etc/sclb/sclb.toml" --sclb "$sclb_bin" sc3 10.0.1.23:15002
    cp "$R/etc/sclb/sclb.toml" "$T/real.before"
    t_fails "real sclb: deploy-server refuses a server sclb check rejects (unresolvable name)" 1 \
        "sclb check rejected" "$deploy" --config "$R/etc/sclb/sclb.toml" --sclb "$sclb_bin" sc4 no-such-host.invalid:15002
    t "real sclb: ... file unchanged" cmp "$T/real.before" "$R/etc/sclb/sclb.toml"
    t "real sclb: deploy-server removes sc3" \
        "$deploy" --config "$R/etc/sclb/sclb.toml" --sclb "$sclb_bin" --remove sc3
else
    skip "real sclb checks: no sclb binary with a check command at $sclb_bin (set SCLB_BIN)"
fi

# ---------------------------------------------------------------- optional: real Spark
# Needs pyspark[connect] in $repo/.venv (not created here) and java. Bounded: one
# start, wait for the port (90 s), one query, SIGTERM.
venv_py=$repo/.venv/bin/python
if [[ -x $venv_py ]] && command -v java >/dev/null 2>&1 &&
    spark_home=$("$venv_py" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))' 2>/dev/null); then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    env SPARK_HOME="$spark_home" 'MASTER=local[2]' SPARK_DRIVER_MEMORY=1g SPARK_LOCAL_IP=127.0.0.1 \
        SPARK_CONNECT_BIND_ADDRESS=127.0.0.1 SPARK_CONNECT_PORT="$port" \
        'SPARK_CONNECT_EXTRA_ARGS=--conf spark.ui.enabled=false' "$start" >"$T/spark.log" 2>&1 &
    spark_pid=$!
    up=0
    for _ in $(seq 1 90); do
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
            up=1
            break
        fi
        kill -0 "$spark_pid" 2>/dev/null || break
        sleep 1
    done
    spark_up() { ((up)) || { tail -n 30 "$T/spark.log"; return 1; }; }
    t "real Spark: start-connect-server.sh serves on :$port (pyspark in .venv)" spark_up
    t "real Spark: the JVM is the script's PID (exec)" grep -q java "/proc/$spark_pid/cmdline"
    if ((up)); then
        t "real Spark: select 1 through the server" timeout 120 "$venv_py" -c '
import sys
from pyspark.sql import SparkSession
s = SparkSession.builder.remote(f"sc://127.0.0.1:{sys.argv[1]}").getOrCreate()
assert s.sql("select 1 as x").collect()[0]["x"] == 1' "$port"
    fi
    kill -TERM "$spark_pid" 2>/dev/null
    for _ in $(seq 1 30); do kill -0 "$spark_pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$spark_pid" 2>/dev/null; then
        not_ok "real Spark: stops within 30 s of SIGTERM"
        kill -9 "$spark_pid" 2>/dev/null
    else
        ok "real Spark: stops within 30 s of SIGTERM"
    fi
    wait "$spark_pid" 2>/dev/null
    spark_pid=""
    # the keys this script sets must be defined by Spark itself (Spark ignores
    # unknown keys silently, so a running server proves nothing about them)
    start_argv "$T/spark4" SPARK_CONNECT_BIND_ADDRESS=127.0.0.1
    confs_in_jars() {
        grep -A1 -xF 'arg=--conf' "$T/argv" | sed -n 's/^arg=\(spark\.[^=]*\)=.*/\1/p' |
            python3 -c '
import glob, sys, zipfile
keys = [k.strip() for k in sys.stdin if k.strip()]
jars = glob.glob(sys.argv[1] + "/jars/spark-connect_*.jar") + glob.glob(sys.argv[1] + "/jars/spark-catalyst_*.jar")
assert len(jars) == 2, jars
found = set()
for j in jars:
    z = zipfile.ZipFile(j)
    for n in z.namelist():
        if n.endswith(".class") and ("/connect/config/" in n or "/internal/SQLConf" in n):
            data = z.read(n)
            found |= {k for k in keys if k.encode() in data}
missing = sorted(set(keys) - found)
print("defined:", sorted(found), "missing:", missing)
assert not missing and len(keys) >= 6
assert b"spark.connect.grpc.maxOutboundMessageSize" not in b"".join(
    zipfile.ZipFile(jars[0]).read(n) for n in zipfile.ZipFile(jars[0]).namelist() if "/connect/config/" in n)
' "$spark_home"
    }
    t "real Spark: every --conf key of start-connect-server.sh is defined in pyspark's Spark jars" confs_in_jars
else
    skip "real Spark smoke test: no pyspark in $repo/.venv (or no java)"
fi

t "grafana dashboard: valid, every query uses only metrics sclb exports" python3 "$here/test_grafana.py"

echo "$skipped skipped"
echo "$passed passed, $failed failed"
((failed == 0))
