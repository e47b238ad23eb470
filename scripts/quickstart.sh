#!/usr/bin/env bash
# Quickstart: two local Spark Connect servers behind sclb, and a PySpark session through it.
#
#   scripts/quickstart.sh        # Ctrl-C stops everything it started
#
# Starts Spark Connect on 127.0.0.1:15012 and :15013 (from the pyspark package in .venv),
# sclb with conf/local.toml (frontend 127.0.0.1:15002, gateway :15003, stats 127.0.0.1:9000,
# admin socket /tmp/sclb-admin.sock), then runs a small PySpark session against
# sc://127.0.0.1:15002, and stays up for you to explore.
#
# On a fresh machine it first installs what it needs: Java 17 (openjdk-17-jre-headless, with
# apt-get) when no Java 17-21 is found, .venv with the pinned pyspark[connect] (scripts/venv.sh),
# and sclb itself (cargo build --release, a no-op when up to date; Rust must be installed).
# Env: SCLB_BIN (an sclb binary to use instead of building one), SCLB_CONF (default
# conf/local.toml).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

sclb_bin="${SCLB_BIN:-${CARGO_TARGET_DIR:-target}/release/sclb}"
sclb_conf="${SCLB_CONF:-conf/local.toml}"
front_port=15002
spark_ports=(15012 15013)
admin_sock=/tmp/sclb-admin.sock
spark_budget=90   # seconds for a Spark Connect server to accept connections
sclb_budget=15

pids=()
work="$(mktemp -d /tmp/sclb-quickstart.XXXXXX)"

cleanup() {
    trap - EXIT INT TERM
    local pid i
    if ((${#pids[@]})); then
        echo
        echo "quickstart: stopping PIDs ${pids[*]}"
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
        for pid in "${pids[@]}"; do
            for ((i = 0; i < 100; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    fi
    echo "quickstart: logs kept in $work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_port NAME PID PORT BUDGET LOG: until PORT accepts; fail if PID dies or BUDGET passes.
wait_port() {
    local name=$1 pid=$2 port=$3 budget=$4 log=$5 start=$SECONDS
    until port_open "$port"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "quickstart: $name (PID $pid) exited; last lines of $log:" >&2
            tail -n 30 "$log" >&2
            exit 1
        fi
        if ((SECONDS - start >= budget)); then
            echo "quickstart: $name not accepting on :$port after ${budget}s; see $log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "quickstart: $name accepting on 127.0.0.1:$port after $((SECONDS - start))s"
}

for port in "$front_port" 15003 "${spark_ports[@]}" 9000; do
    if port_open "$port"; then
        echo "quickstart: 127.0.0.1:$port is already in use; stop what runs there first" >&2
        exit 1
    fi
done
if [[ ! -f "$sclb_conf" ]]; then
    echo "quickstart: $sclb_conf not found" >&2
    exit 1
fi

# ---------------------------------------------------------------- what it needs
sudo=()
((EUID == 0)) || sudo=(sudo)
apt_install() {
    if ! command -v apt-get >/dev/null; then
        echo "quickstart: $* needed and there is no apt-get: install it, then run me again" >&2
        exit 1
    fi
    echo "quickstart: installing $* (apt-get)"
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
}

# Spark 4.0 runs on Java 17 or 21; spark-submit takes $JAVA_HOME, else java on the PATH.
java_major() {  # java_major JAVA: its major version, 0 when it does not run
    local v
    v=$("$1" -version 2>&1 | sed -n 's/.* version "\([0-9]*\).*/\1/p' | head -1)
    echo "${v:-0}"
}
java_bin="${JAVA_HOME:+$JAVA_HOME/bin/java}"
java_bin="${java_bin:-$(command -v java || true)}"
major=0
[[ -n "$java_bin" && -x "$java_bin" ]] && major=$(java_major "$java_bin")
if ((major < 17 || major > 21)); then
    if ((major == 0)); then echo "quickstart: no Java found"; else echo "quickstart: $java_bin is Java $major"; fi
    for java_bin in /usr/lib/jvm/java-17-openjdk-*/bin/java; do break; done
    [[ -x "$java_bin" ]] || apt_install openjdk-17-jre-headless
    for java_bin in /usr/lib/jvm/java-17-openjdk-*/bin/java; do break; done
    [[ -x "$java_bin" ]] || { echo "quickstart: no Java 17 in /usr/lib/jvm after installing it" >&2; exit 1; }
    export JAVA_HOME="${java_bin%/bin/java}"
    echo "quickstart: Spark runs on JAVA_HOME=$JAVA_HOME"
fi

scripts/venv.sh

if [[ -n "${SCLB_BIN:-}" ]]; then
    [[ -x "$sclb_bin" ]] || { echo "quickstart: SCLB_BIN=$sclb_bin is not an executable" >&2; exit 1; }
else
    if ! command -v cargo >/dev/null; then
        echo "quickstart: cargo not found: install Rust (https://rustup.rs), then run me again" >&2
        exit 1
    fi
    command -v cc >/dev/null || apt_install gcc libc6-dev   # ring (rustls) compiles C
    echo "quickstart: cargo build --release (a few minutes the first time)"
    cargo build --release
fi

# ---------------------------------------------------------------- Spark Connect, sclb, PySpark
spark_home="$(.venv/bin/python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"

spark_pids=()
for i in 0 1; do
    name="sc$((i + 1))"
    port="${spark_ports[$i]}"
    mkdir -p "$work/$name"
    # spark-submit execs java, so $! is the JVM's PID
    (
        cd "$work/$name"
        SPARK_HOME="$spark_home" SPARK_LOCAL_IP=127.0.0.1 exec "$spark_home/bin/spark-submit" \
            --class org.apache.spark.sql.connect.service.SparkConnectServer \
            --master 'local[2]' --driver-memory 1g \
            --conf spark.connect.grpc.binding.address=127.0.0.1 \
            --conf "spark.connect.grpc.binding.port=$port" \
            --conf spark.ui.enabled=false
    ) >"$work/$name.log" 2>&1 &
    pids+=("$!")
    spark_pids+=("$!")
    echo "quickstart: started Spark Connect $name on 127.0.0.1:$port (PID $!, log $work/$name.log)"
done
for i in 0 1; do
    wait_port "sc$((i + 1))" "${spark_pids[$i]}" "${spark_ports[$i]}" "$spark_budget" \
        "$work/sc$((i + 1)).log"
done

"$sclb_bin" -c "$sclb_conf" 2>"$work/sclb.log" &
sclb_pid=$!
pids+=("$sclb_pid")
echo "quickstart: started sclb -c $sclb_conf (PID $sclb_pid, log $work/sclb.log)"
wait_port sclb "$sclb_pid" "$front_port" "$sclb_budget" "$work/sclb.log"

echo "quickstart: running a PySpark session through sc://127.0.0.1:$front_port"
timeout 180 .venv/bin/python - "$front_port" <<'EOF'
import sys
from pyspark.sql import SparkSession

spark = SparkSession.builder.remote(f"sc://127.0.0.1:{sys.argv[1]}").create()
port = spark.conf.get("spark.connect.grpc.binding.port")
print(f"  connected: Spark {spark.version}, served by the server on port {port}")
print(f"  spark.range(1_000_000).count() = {spark.range(1_000_000).count()}")
spark.range(10).createOrReplaceTempView("numbers")
row = spark.sql("SELECT count(*) AS n, sum(id) AS total FROM numbers").collect()[0]
print(f"  temp view 'numbers': count={row.n} sum={row.total}")
spark.stop()
EOF

cat <<EOF

quickstart: all up. Try:
  PySpark:      SparkSession.builder.remote("sc://127.0.0.1:$front_port").getOrCreate()
  stats page:   http://127.0.0.1:9000/stats
  admin socket: $sclb_bin ctl -s $admin_sock show stat
                echo "show table local" | socat stdio unix-connect:$admin_sock
  logs:         $work
Press Ctrl-C to stop sclb and both Spark servers.
EOF
wait "$sclb_pid"
