#!/usr/bin/env bash
# deploy-server.sh - add or remove a Spark Connect server in sclb's config file.
# Installed on the EMR primary node as /usr/local/sbin/sclb-deploy-server.
#
# Usage:
#   deploy-server.sh [options] NAME HOST:PORT    add server NAME at HOST:PORT
#   deploy-server.sh [options] --remove NAME     remove server NAME
#   deploy-server.sh [options] --list            print "NAME ADDR" per server
# Options:
#   --config FILE    sclb config to edit (default /etc/sclb/sclb.toml)
#   --backend NAME   backend to edit (default: the only backend with a servers list)
#   --sclb PATH      sclb binary that validates the result with `sclb check -c`
#                    (default: `sclb` in PATH, else /usr/local/bin/sclb; when none is
#                    found the check is skipped with a warning)
#   --no-check       do not validate with sclb
#   --dry-run        print the change as a diff, write nothing
#   -h, --help
#
# The file format contract (conf/emr.toml follows it; so does the
# /etc/sclb/sclb.toml that emr-bootstrap.sh writes). Inside a [[backend]] table,
# after its `name = "..."` line:
#
#   servers = [
#     { name = "sc1", addr = "10.0.1.11:15002" },
#     { name = "sc2", addr = "10.0.1.12:15002" },
#   ]
#
#  - `servers = [` alone on its line (a trailing # comment is fine);
#  - exactly one server per line: `{ name = "NAME", addr = "HOST:PORT" }` with the
#    keys in that order and an optional trailing comma; blank and # lines allowed;
#  - the list ends with a line holding only `]`.
# Anything else inside the list (other keys such as weight, two servers on one
# line, a multi-line table) makes this script stop without touching the file:
# edit such files by hand and check them with `sclb check -c FILE`.
#
# The new file is written next to the old one, validated, then renamed over it
# (atomic: readers see the old or the new file, never half of one). sclb's file
# watcher treats the rename as a reload; a file sclb rejects is never installed.
# Names are stable ids (stick table, admin commands): a name or an address that
# is already in the list is refused.
#
# Exit codes: 0 done, 1 refused or failed (file unchanged), 2 usage error.
set -euo pipefail

prog=${0##*/}
config=/etc/sclb/sclb.toml
backend=""
sclb=""
check=auto
dry_run=0
action=add

usage() {
    sed -n '/^# Usage:/,/^#   -h, --help/{s/^# \{0,1\}//;p}' "$0"
}
die() {
    echo "$prog: $*" >&2
    exit 1
}
usage_error() {
    echo "$prog: $*" >&2
    echo "Try '$prog --help'." >&2
    exit 2
}
need_arg() {
    [[ $# -ge 2 && -n $2 ]] || usage_error "$1 needs a value"
}

args=()
while [[ $# -gt 0 ]]; do
    case $1 in
    --config) need_arg "$@"; config=$2; shift 2 ;;
    --backend) need_arg "$@"; backend=$2; shift 2 ;;
    --sclb) need_arg "$@"; sclb=$2; check=yes; shift 2 ;;
    --no-check) check=no; shift ;;
    --dry-run) dry_run=1; shift ;;
    --remove) action=remove; shift ;;
    --list) action=list; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    -*) usage_error "unknown option: $1" ;;
    *) args+=("$1"); shift ;;
    esac
done

case $action in
add) [[ ${#args[@]} -eq 2 ]] || usage_error "adding a server needs NAME and HOST:PORT" ;;
remove) [[ ${#args[@]} -eq 1 ]] || usage_error "--remove needs exactly one NAME" ;;
list) [[ ${#args[@]} -eq 0 ]] || usage_error "--list takes no arguments" ;;
esac
name=${args[0]:-}
addr=${args[1]:-}

if [[ $action != list ]]; then
    [[ $name =~ ^[A-Za-z0-9_.-]{1,64}$ ]] ||
        usage_error "bad server name '$name' (letters, digits, '_', '.', '-'; at most 64)"
fi
if [[ $action == add ]]; then
    # host:port, host = IPv4 address, DNS name or [IPv6 address]
    if [[ $addr =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})$ ]]; then
        port=${BASH_REMATCH[3]}
        ((10#$port >= 1 && 10#$port <= 65535)) || usage_error "bad port in '$addr'"
    else
        usage_error "bad address '$addr' (want HOST:PORT, e.g. 10.0.1.14:15002 or [fd00::1]:15002)"
    fi
fi

[[ -f $config ]] || die "$config: no such file"
[[ -r $config ]] || die "$config: not readable (run with sudo?)"

# Serialise concurrent edits of the same file, from before reading it until the
# rename (lock the directory: the file's inode changes with every rename).
dir=$(dirname -- "$config")
if [[ $action != list ]] && ((!dry_run)); then
    [[ -w $dir ]] || die "$dir: not writable (run with sudo?)"
    if command -v flock >/dev/null 2>&1; then
        exec 9<"$dir"
        flock -w 30 9 || die "$dir is locked by another $prog for 30 s"
    fi
fi

# Parse the file against the contract. Output, one record per line:
#   B <backend> <open line> <close line> <indent of last server line>
#   S <backend> <line> <name> <addr>
# Violations go to stderr as FILE:LINE: message, and the exit status is 1.
parse() {
    awk -v file="$config" '
    function err(msg) { printf "%s:%d: %s\n", file, NR, msg > "/dev/stderr"; bad = 1 }
    BEGIN { sect = ""; bname = ""; inblk = 0; indent = "  " }
    {
        line = $0
        if (inblk) {
            if (line ~ /^[ \t]*\][ \t]*(#.*)?$/) {
                print "B", blkname, open, NR, "\"" indent "\""
                inblk = 0
                next
            }
            if (line ~ /^[ \t]*(#.*)?$/) next
            if (line ~ /^[ \t]*\{[ \t]*name[ \t]*=[ \t]*"[^"]*"[ \t]*,[ \t]*addr[ \t]*=[ \t]*"[^"]*"[ \t]*\}[ \t]*,?[ \t]*(#.*)?$/) {
                split(line, q, "\"")
                match(line, /^[ \t]*/)
                indent = substr(line, 1, RLENGTH)
                print "S", blkname, NR, q[2], q[4]
            } else {
                err("not one `{ name = \"...\", addr = \"host:port\" },` per line inside servers = [ ... ]: " line)
            }
            next
        }
        if (line ~ /^[ \t]*\[\[[ \t]*backend[ \t]*\]\]/) { sect = "backend"; bname = ""; next }
        if (line ~ /^[ \t]*\[/) { sect = "other"; next }
        if (sect == "backend" && bname == "" && line ~ /^[ \t]*name[ \t]*=[ \t]*"[^"]*"/) {
            split(line, q, "\""); bname = q[2]; next
        }
        if (line ~ /^[ \t]*servers[ \t]*=/) {
            if (sect != "backend") { err("servers outside a [[backend]] table"); next }
            if (bname == "") { err("the backend name = \"...\" line must come before servers"); next }
            if (line !~ /^[ \t]*servers[ \t]*=[ \t]*\[[ \t]*(#.*)?$/) {
                err("`servers = [` must be alone on its line, one server per following line"); next
            }
            inblk = 1; blkname = bname; open = NR; indent = "  "
        }
    }
    END {
        if (inblk) { NR = open; err("servers = [ is never closed by a line holding only ]") }
        exit bad
    }' "$config"
}

records=$(parse) || die "$config does not follow the servers-list contract (see $prog --help); file unchanged"

mapfile -t blocks < <(awk '$1 == "B"' <<<"$records")
[[ ${#blocks[@]} -gt 0 ]] || die "$config: no servers = [ ... ] list in any [[backend]]"
if [[ -z $backend ]]; then
    if [[ ${#blocks[@]} -gt 1 ]]; then
        die "$config has several backends with servers ($(awk '$1 == "B" {printf "%s ", $2}' <<<"$records")); pick one with --backend"
    fi
    backend=$(awk '{print $2}' <<<"${blocks[0]}")
fi
block=$(awk -v b="$backend" '$1 == "B" && $2 == b' <<<"$records")
[[ -n $block ]] || die "$config: no backend '$backend' with a servers list"
[[ $(wc -l <<<"$block") -eq 1 ]] || die "$config: backend '$backend' has more than one servers list"
close_line=$(awk '{print $4}' <<<"$block")
indent=$(awk -F'"' '{print $2}' <<<"$block")
servers=$(awk -v b="$backend" '$1 == "S" && $2 == b {print $3, $4, $5}' <<<"$records")

if [[ $action == list ]]; then
    [[ -z $servers ]] || awk '{print $2, $3}' <<<"$servers"
    exit 0
fi

case $action in
add)
    dup=$(awk -v n="$name" '$2 == n {print $3}' <<<"$servers")
    [[ -z $dup ]] || die "server '$name' already exists in backend '$backend' (addr $dup); nothing changed. Remove it first or pick a new name."
    dup=$(awk -v a="$addr" '$3 == a {print $2}' <<<"$servers")
    [[ -z $dup ]] || die "address $addr is already server '$dup' in backend '$backend'; nothing changed."
    new_line="${indent}{ name = \"$name\", addr = \"$addr\" },"
    edit() { awk -v at="$close_line" -v l="$new_line" 'NR == at {print l} {print}' "$config"; }
    what="added server $name ($addr) to backend $backend"
    ;;
remove)
    line_no=$(awk -v n="$name" '$2 == n {print $1}' <<<"$servers")
    [[ -n $line_no ]] || die "no server '$name' in backend '$backend'; nothing changed."
    [[ $(wc -l <<<"$servers") -gt 1 ]] ||
        echo "$prog: warning: '$name' is the last server of backend '$backend'" >&2
    edit() { awk -v at="$line_no" 'NR != at' "$config"; }
    what="removed server $name from backend $backend"
    ;;
esac

if [[ $check != no && -z $sclb ]]; then
    if command -v sclb >/dev/null 2>&1; then
        sclb=$(command -v sclb)
    elif [[ -x /usr/local/bin/sclb ]]; then
        sclb=/usr/local/bin/sclb
    else
        echo "$prog: warning: no sclb binary found, not validating (use --sclb PATH)" >&2
        check=no
    fi
fi
if [[ $check != no && ! -x $sclb ]]; then
    die "--sclb $sclb: not an executable file"
fi

if ((dry_run)); then
    edit | diff -u --label "$config" --label "$config (new)" "$config" - || true
    echo "$prog: dry run: would have $what; nothing written"
    exit 0
fi

tmp=$(mktemp "$dir/.${config##*/}.XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
edit >"$tmp"
chmod --reference="$config" "$tmp"
chown --reference="$config" "$tmp" 2>/dev/null ||
    echo "$prog: warning: could not copy the owner of $config (not root?)" >&2

if [[ $check != no ]]; then
    if ! out=$("$sclb" check -c "$tmp" 2>&1); then
        printf '%s\n' "$out" >&2
        die "sclb check rejected the new config; $config unchanged"
    fi
fi

mv -f -- "$tmp" "$config"
trap - EXIT
echo "$prog: $what in $config"
