#!/usr/bin/env bash
# emr-bootstrap.sh - EMR bootstrap action: sclb on the primary node, one Spark
# Connect server (sparkconnect.service) on every core node.
#
# Usage: emr-bootstrap.sh [options]
#
# Primary node (instance.json isMaster = true):
#   --sclb-binary PATH|s3://...  the sclb binary (default: <source>/bin/sclb)
#   --servers H[:P],H[:P],...    Spark Connect servers for /etc/sclb/sclb.toml,
#                                named sc1, sc2, ... in this order
#   --discover                   instead of --servers: ask EMR for the private IPs of
#                                this cluster's server nodes (aws emr list-instances;
#                                the instance profile needs elasticmapreduce:ListInstances),
#                                named sc1, sc2, ... in IP order
#   --discover-wait SECONDS      keep asking this long until one shows up (300)
#   --force-config               overwrite /etc/sclb/sclb.toml and /etc/default/sparkconnect
#                                even when they differ from what this script writes
#                                (by default hand edits and sclb-deploy-server edits are kept)
# Server nodes:
#   --server-roles core[,task]   node roles that run a Spark Connect server (core)
#   --port N                     Spark Connect port: default for --servers entries
#                                and SPARK_CONNECT_PORT on the nodes (15002)
#   --driver-memory SIZE         SPARK_DRIVER_MEMORY on the nodes (4g)
#   --driver-cores N             SPARK_DRIVER_CORES on the nodes (2)
#   --queue NAME                 YARN queue of the servers (sparkconnect)
# Every node:
#   --source DIR|s3://...        where systemd/, scripts/ and conf/ of the sclb repo are
#                                (default: the repo this script sits in)
#   --role primary|core|task     skip instance.json/job-flow.json detection
#   --instance-json FILE         (default /mnt/var/lib/info/instance.json)
#   --root DIR                   install under DIR instead of /; user creation and
#                                systemctl are printed, not run (for tests)
#   --dry-run                    print what would change, write nothing
#   --no-start                   install and enable units, but do not start or reload
#   -h, --help
#
# What lands where:
#   primary: /usr/local/bin/sclb (0755), /usr/local/sbin/sclb-deploy-server (0755),
#            /etc/sclb/sclb.toml (0640 root:sclb), /etc/systemd/system/sclb.service (0644),
#            /usr/local/share/sclb/yarn/{capacity-scheduler.xml,emr-configurations.json}
#            (0644, reference copies: YARN queues are configured by EMR
#            configurations at cluster creation, not by this script);
#            system user sclb; sclb.service enabled and started.
#   core:    /usr/local/lib/sclb/start-connect-server.sh (0755),
#            /etc/systemd/system/sparkconnect.service (0644),
#            /etc/default/sparkconnect (0644); sparkconnect.service enabled and
#            started (it retries every 10 s until EMR has installed Spark and YARN).
#   task (not in --server-roles): nothing.
#
# /etc/sclb/sclb.toml is conf/emr.toml with only the lines inside `servers = [ ... ]`
# replaced, so the two never drift; it is checked with `sclb check -c` first.
#
# Idempotent: a file is written only when its content or mode differs (else
# "unchanged"). A re-run never restarts a running service (a restart of
# sparkconnect ends every Spark session on it): it says when one is due.
#
# Exit codes: 0 ok, 1 failure, 2 usage error.
set -euo pipefail
# Directories created here are 0755, files get their mode explicitly.
umask 022

prog=emr-bootstrap
say() { echo "$prog: $*"; }
warn() { echo "$prog: warning: $*" >&2; }
die() {
    echo "$prog: error: $*" >&2
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^#   -h, --help/{s/^# \{0,1\}//;p}' "$0"
}
usage_error() {
    echo "$prog: $*" >&2
    echo "Try '$0 --help'." >&2
    exit 2
}
need_arg() {
    [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"
}

sclb_binary=""
servers_arg=""
discover=0
discover_wait=300
force_config=0
server_roles=core
port=15002
driver_memory=4g
driver_cores=2
queue=sparkconnect
source_arg=""
role=""
instance_json=""
ROOT=""
dry_run=0
no_start=0

orig_args=("$@")
while [[ $# -gt 0 ]]; do
    case $1 in
    --sclb-binary) need_arg "$@"; sclb_binary=$2; shift 2 ;;
    --servers) need_arg "$@"; servers_arg=$2; shift 2 ;;
    --discover) discover=1; shift ;;
    --discover-wait) need_arg "$@"; discover_wait=$2; shift 2 ;;
    --force-config) force_config=1; shift ;;
    --server-roles) need_arg "$@"; server_roles=$2; shift 2 ;;
    --port) need_arg "$@"; port=$2; shift 2 ;;
    --driver-memory) need_arg "$@"; driver_memory=$2; shift 2 ;;
    --driver-cores) need_arg "$@"; driver_cores=$2; shift 2 ;;
    --queue) need_arg "$@"; queue=$2; shift 2 ;;
    --source) need_arg "$@"; source_arg=$2; shift 2 ;;
    --role) need_arg "$@"; role=$2; shift 2 ;;
    --instance-json) need_arg "$@"; instance_json=$2; shift 2 ;;
    --root) need_arg "$@"; ROOT=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --no-start) no_start=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
    esac
done

# ---- argument checks (before anything is fetched or written) ----
is_port() { [[ $1 =~ ^[0-9]{1,5}$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }
is_port "$port" || usage_error "--port '$port' is not a port (1-65535)"
[[ $driver_memory =~ ^[0-9]+[kKmMgGtT]?$ ]] || usage_error "--driver-memory '$driver_memory' is not a JVM size like 4g"
[[ $driver_cores =~ ^[1-9][0-9]*$ ]] || usage_error "--driver-cores '$driver_cores' is not a positive integer"
[[ $queue =~ ^[A-Za-z0-9_.-]+$ ]] || usage_error "--queue '$queue' is not a YARN queue name"
[[ $discover_wait =~ ^[0-9]+$ ]] || usage_error "--discover-wait '$discover_wait' is not a number of seconds"
[[ $server_roles =~ ^(core|task)(,(core|task))*$ ]] || usage_error "--server-roles '$server_roles' (want core, task or core,task)"
case $role in "" | primary | core | task) ;; *) usage_error "--role '$role' (want primary, core or task)" ;; esac
if [[ -n $servers_arg ]] && ((discover)); then
    usage_error "--servers and --discover exclude each other"
fi
if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || usage_error "--root $ROOT: no such directory"
    ROOT=$(cd "$ROOT" && pwd)
    [[ $ROOT != / ]] || ROOT=""
fi

# Real installs need root; EMR runs bootstrap actions as user hadoop, with sudo.
if [[ -z $ROOT && $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root (or with --root DIR)"
    exec sudo -n -- "$BASH" "$0" "${orig_args[@]}"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/emr-bootstrap.XXXXXX")
trap 'rm -rf -- "$work"' EXIT

# ---- JSON (jq if present, else python3) ----
json_tool=${SCLB_JSON_TOOL:-}
if [[ -z $json_tool ]]; then
    if command -v jq >/dev/null 2>&1; then json_tool=jq
    elif command -v python3 >/dev/null 2>&1; then json_tool=python3
    else die "need jq or python3 to read EMR's JSON files"
    fi
fi
# json_field FILE KEY: top-level KEY as text (true/false for booleans), empty if absent
json_field() {
    case $json_tool in
    jq) jq -r --arg k "$2" 'if has($k) then .[$k] | tostring else empty end' "$1" ;;
    *) python3 -c 'import json,sys
v = json.load(open(sys.argv[1])).get(sys.argv[2])
if v is not None: print(v if isinstance(v, str) else json.dumps(v))' "$1" "$2" ;;
    esac
}
# group_role JOB_FLOW_JSON GROUP_ID: instanceRole of that instance group (Master/Core/Task)
group_role() {
    case $json_tool in
    jq) jq -r --arg g "$2" '.instanceGroups[]? | select(.instanceGroupId == $g) | .instanceRole' "$1" ;;
    *) python3 -c 'import json,sys
for g in json.load(open(sys.argv[1])).get("instanceGroups", []):
    if g.get("instanceGroupId") == sys.argv[2]: print(g.get("instanceRole", ""))' "$1" "$2" ;;
    esac
}

# ---- which node is this ----
info_dir=$ROOT/mnt/var/lib/info
instance_json=${instance_json:-$info_dir/instance.json}
if [[ -z $role ]]; then
    [[ -f $instance_json ]] || die "$instance_json not found: not an EMR node? Pass --role primary|core|task"
    is_master=$(json_field "$instance_json" isMaster) || die "cannot parse $instance_json"
    case $is_master in
    true) role=primary ;;
    false)
        role=core
        group_id=$(json_field "$instance_json" instanceGroupId) || true
        if [[ -n $group_id && -f $info_dir/job-flow.json ]]; then
            r=$(group_role "$info_dir/job-flow.json" "$group_id") || true
            case ${r,,} in task) role=task ;; core) role=core ;; esac
        fi
        ;;
    *) die "$instance_json: isMaster is '$is_master', want true or false" ;;
    esac
fi
mode_note=${ROOT:+ (root $ROOT)}
((!dry_run)) || mode_note+=" (dry run)"
say "node role: $role$mode_note"

if [[ $role == task && ,$server_roles, != *,task,* ]]; then
    say "task node and --server-roles is '$server_roles': nothing to install"
    exit 0
fi
if [[ $role != primary && ( -n $servers_arg || $discover -eq 1 ) ]]; then
    say "--servers/--discover only matter on the primary node: ignored here"
fi
if [[ $role == primary && -z $servers_arg && $discover -eq 0 ]]; then
    usage_error "the primary node needs --servers H:P,... or --discover"
fi

# ---- sources ----
fetch_s3() { # fetch_s3 [--recursive] URI DEST
    command -v aws >/dev/null 2>&1 || die "aws CLI not found, cannot fetch ${*: -2:1}"
    aws s3 cp --only-show-errors "$@" || die "aws s3 cp $* failed"
}
if [[ -z $source_arg ]]; then
    src=$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
elif [[ $source_arg == s3://* ]]; then
    fetch_s3 --recursive "${source_arg%/}/" "$work/src"
    src=$work/src
else
    src=$source_arg
fi
for f in systemd/sclb.service systemd/sparkconnect.service scripts/start-connect-server.sh \
    scripts/deploy-server.sh conf/emr.toml conf/yarn/capacity-scheduler.xml \
    conf/yarn/emr-configurations.json; do
    [[ -f $src/$f ]] || die "source $src has no $f (use --source DIR|s3://bucket/prefix/)"
done

# ---- install helpers ----
changed=0
unchanged=0
kept=0
last_changed=0

# run_system CMD...: a command that changes the system outside --root
run_system() {
    local shown
    shown=$(printf '%q ' "$@")
    if ((dry_run)); then
        say "would run: ${shown% }"
    elif [[ -n $ROOT ]]; then
        say "skipped (--root): ${shown% }"
    else
        say "run: ${shown% }"
        "$@"
    fi
}

# install_file SRC DEST MODE OWNER:GROUP [config]
# Writes $ROOT/DEST from SRC when content or mode differ; `config` files that
# exist with other content are kept unless --force-config.
install_file() {
    local from=$1 to=$2 mode=$3 owner=$4 kind=${5:-} dest=$ROOT$2 verb=installed
    last_changed=0
    if [[ -e $dest || -L $dest ]]; then
        [[ -f $dest && ! -L $dest ]] || die "$dest exists and is not a regular file"
        if cmp -s -- "$from" "$dest"; then
            if [[ $(stat -c %a -- "$dest") == "${mode#0}" ]] &&
                [[ -n $ROOT || $(stat -c %U:%G -- "$dest") == "$owner" ]]; then
                say "unchanged $to"
                unchanged=$((unchanged + 1))
                return 0
            fi
            verb="fixed mode/owner of"
        elif [[ $kind == config ]] && ((!force_config)); then
            say "kept $to: it differs from what this script writes (edited by hand or" \
                "with sclb-deploy-server?); --force-config overwrites it. Difference:"
            diff -u --label "$to (current)" --label "$to (rendered)" -- "$dest" "$from" || true
            kept=$((kept + 1))
            return 0
        else
            verb=updated
        fi
    fi
    changed=$((changed + 1))
    last_changed=1
    if ((dry_run)); then
        if [[ -n $ROOT ]]; then say "would write $to (mode $mode)"; else say "would write $to (mode $mode, owner $owner)"; fi
        if [[ -f $dest && $kind == config ]]; then
            diff -u --label "$to (current)" --label "$to (new)" -- "$dest" "$from" || true
        fi
        return 0
    fi
    local dir tmp
    dir=$(dirname -- "$dest")
    mkdir -p -- "$dir"
    tmp=$(mktemp "$dir/.${dest##*/}.XXXXXX")
    cat -- "$from" >"$tmp"
    chmod "$mode" -- "$tmp"
    if [[ -z $ROOT ]]; then chown "$owner" -- "$tmp"; fi
    mv -f -- "$tmp" "$dest"
    say "$verb $to (mode $mode)"
}

server_re='^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:([0-9]{1,5}))?$'

# server list -> lines "host:port"
server_list() {
    local entry ips=() deadline
    if [[ -n $servers_arg ]]; then
        IFS=, read -r -a entries <<<"$servers_arg"
        for entry in "${entries[@]}"; do
            entry=${entry#"${entry%%[![:space:]]*}"}
            entry=${entry%"${entry##*[![:space:]]}"}
            [[ -n $entry ]] || continue
            [[ $entry =~ $server_re ]] || usage_error "--servers: bad entry '$entry' (want HOST or HOST:PORT)"
            if [[ -n ${BASH_REMATCH[4]} ]]; then
                is_port "${BASH_REMATCH[4]}" || usage_error "--servers: bad port in '$entry'"
                echo "$entry"
            else
                echo "$entry:$port"
            fi
        done
        return 0
    fi
    # --discover
    command -v aws >/dev/null 2>&1 || die "--discover needs the aws CLI"
    local cluster_id types=()
    cluster_id=$(json_field "$info_dir/job-flow.json" jobFlowId 2>/dev/null) || true
    [[ $cluster_id == j-* ]] || die "--discover: no jobFlowId in $info_dir/job-flow.json"
    [[ ,$server_roles, == *,core,* ]] && types+=(CORE)
    [[ ,$server_roles, == *,task,* ]] && types+=(TASK)
    deadline=$((SECONDS + discover_wait))
    while :; do
        mapfile -t ips < <(aws emr list-instances --cluster-id "$cluster_id" \
            --instance-group-types "${types[@]}" \
            --instance-states AWAITING_FULFILLMENT PROVISIONING BOOTSTRAPPING RUNNING \
            --query 'Instances[].PrivateIpAddress' --output text |
            tr -s '[:space:]' '\n' | grep -E '^[0-9]+(\.[0-9]+){3}$' | sort -u -V || true)
        ((${#ips[@]} == 0)) || break
        ((SECONDS < deadline)) || die "--discover: no ${types[*]} instance of $cluster_id has an IP after ${discover_wait}s"
        say "--discover: no ${types[*]} instances yet, asking again in 15 s" >&2
        sleep 15
    done
    say "--discover: ${#ips[@]} server node(s) in $cluster_id: ${ips[*]}" >&2
    for entry in "${ips[@]}"; do echo "$entry:$port"; done
}

# render_sclb_toml OUT: conf/emr.toml with its servers list replaced
render_sclb_toml() {
    local out=$1 list n=0 addr lines=""
    list=$(server_list)
    [[ -n $list ]] || usage_error "--servers: empty list"
    [[ -z $(sort <<<"$list" | uniq -d) ]] || usage_error "--servers: duplicate address: $(sort <<<"$list" | uniq -d | head -n 1)"
    while read -r addr; do
        n=$((n + 1))
        lines+="  { name = \"sc$n\", addr = \"$addr\" },"$'\n'
    done <<<"$list"
    awk -v lines="$lines" '
        /^[ \t]*servers[ \t]*=[ \t]*\[[ \t]*(#.*)?$/ { print; printf "%s", lines; skip = 1; blocks++; next }
        skip && /^[ \t]*\][ \t]*(#.*)?$/ { skip = 0 }
        !skip { print }
        END { if (blocks != 1 || skip) exit 1 }' "$src/conf/emr.toml" >"$out" ||
        die "$src/conf/emr.toml does not hold exactly one servers = [ ... ] list (see scripts/deploy-server.sh)"
}

# ---- primary node ----
if [[ $role == primary ]]; then
    if [[ -z $sclb_binary ]]; then
        [[ -f $src/bin/sclb ]] || usage_error "the primary node needs --sclb-binary PATH|s3://..."
        sclb_binary=$src/bin/sclb
    fi
    if [[ $sclb_binary == s3://* ]]; then
        fetch_s3 "$sclb_binary" "$work/sclb"
        sclb_binary=$work/sclb
    fi
    [[ -f $sclb_binary ]] || die "--sclb-binary $sclb_binary: no such file"
    [[ -x $sclb_binary ]] || chmod +x -- "$sclb_binary" 2>/dev/null || true

    render_sclb_toml "$work/sclb.toml"
    if [[ -x $sclb_binary ]]; then
        out=$("$sclb_binary" check -c "$work/sclb.toml" 2>&1) ||
            die "sclb check rejected the rendered config:"$'\n'"$out"
    else
        warn "$sclb_binary is not executable here: rendered config not checked"
    fi

    if [[ -z $ROOT ]] && getent passwd sclb >/dev/null 2>&1; then
        say "unchanged user sclb"
    else
        run_system useradd --system --user-group --no-create-home --home-dir /var/lib/sclb \
            --shell /sbin/nologin --comment "sclb load balancer" sclb
    fi

    install_file "$sclb_binary" /usr/local/bin/sclb 0755 root:root
    bin_changed=$last_changed
    install_file "$src/scripts/deploy-server.sh" /usr/local/sbin/sclb-deploy-server 0755 root:root
    install_file "$work/sclb.toml" /etc/sclb/sclb.toml 0640 root:sclb config
    config_changed=$last_changed
    install_file "$src/systemd/sclb.service" /etc/systemd/system/sclb.service 0644 root:root
    unit_changed=$last_changed
    install_file "$src/conf/yarn/capacity-scheduler.xml" /usr/local/share/sclb/yarn/capacity-scheduler.xml 0644 root:root
    install_file "$src/conf/yarn/emr-configurations.json" /usr/local/share/sclb/yarn/emr-configurations.json 0644 root:root

    if ((unit_changed)); then run_system systemctl daemon-reload; fi
    if ((no_start)); then
        run_system systemctl enable sclb.service
    else
        was_active=0
        if [[ -z $ROOT ]] && ((!dry_run)) && systemctl is-active --quiet sclb.service; then
            was_active=1
        fi
        if ((was_active && (bin_changed || unit_changed))); then
            say "sclb is running the old binary/unit: run 'systemctl restart sclb' when convenient" \
                "(stops gracefully, up to hard_stop_after; stick table survives in /var/lib/sclb)"
        elif ((was_active && config_changed)); then
            run_system systemctl reload sclb.service
        fi
        run_system systemctl enable --now sclb.service
    fi
    say "YARN queues (default 70%, $queue 30%) come from EMR configurations at cluster" \
        "creation: see /usr/local/share/sclb/yarn/emr-configurations.json"
fi

# ---- server node ----
if [[ $role == core || $role == task ]]; then
    if [[ -z $ROOT ]] && ! getent passwd hadoop >/dev/null 2>&1; then
        warn "user hadoop does not exist (not EMR?): sparkconnect.service runs as User=hadoop"
    fi
    cat >"$work/sparkconnect.env" <<EOF
# /etc/default/sparkconnect: settings of sparkconnect.service, read by
# /usr/local/lib/sclb/start-connect-server.sh (its header lists every variable
# and its default). Written by emr-bootstrap.sh; a re-run keeps your edits
# unless --force-config. After a change: drain this server in sclb, then
# systemctl restart sparkconnect (a restart ends every Spark session on it).
SPARK_HOME=/usr/lib/spark
MASTER=yarn
SPARK_CONNECT_QUEUE=$queue
SPARK_DRIVER_MEMORY=$driver_memory
SPARK_DRIVER_CORES=$driver_cores
SPARK_CONNECT_PORT=$port
#SPARK_CONNECT_JAR=/usr/lib/spark/jars/spark-connect_2.13-4.0.0.jar
#SPARK_CONNECT_EXTRA_ARGS=--conf spark.ui.port=4050
EOF
    install_file "$src/scripts/start-connect-server.sh" /usr/local/lib/sclb/start-connect-server.sh 0755 root:root
    script_changed=$last_changed
    install_file "$work/sparkconnect.env" /etc/default/sparkconnect 0644 root:root config
    env_changed=$last_changed
    install_file "$src/systemd/sparkconnect.service" /etc/systemd/system/sparkconnect.service 0644 root:root
    unit_changed=$last_changed

    if ((unit_changed)); then run_system systemctl daemon-reload; fi
    if ((no_start)); then
        run_system systemctl enable sparkconnect.service
    else
        if [[ -z $ROOT ]] && ((!dry_run)) && systemctl is-active --quiet sparkconnect.service &&
            ((script_changed || env_changed || unit_changed)); then
            say "sparkconnect is running with the old settings: drain it in sclb, then" \
                "'systemctl restart sparkconnect' (a restart ends its Spark sessions)"
        fi
        run_system systemctl enable --now sparkconnect.service
    fi
fi

if ((dry_run)); then
    say "dry run: $changed file(s) would change, $unchanged unchanged, $kept kept; nothing written"
else
    say "done: $changed file(s) changed, $unchanged unchanged, $kept kept"
fi
