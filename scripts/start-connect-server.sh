#!/usr/bin/env bash
# start-connect-server.sh - run one Apache Spark Connect server in the foreground.
#
# The Spark driver runs in this process (YARN client mode); its executors run in
# YARN queue `sparkconnect`. The script ends with `exec spark-submit ...`, and
# spark-submit execs java, so systemd (sparkconnect.service) tracks the JVM itself.
# Installed on EMR as /usr/local/lib/sclb/start-connect-server.sh; settings come
# from the environment (/etc/default/sparkconnect via the unit's EnvironmentFile).
#
# Usage: start-connect-server.sh [extra spark-submit options...]
#
# Environment (default):
#   SPARK_HOME                   Spark installation (/usr/lib/spark)
#   SPARK_SUBMIT                 spark-submit to run ($SPARK_HOME/bin/spark-submit)
#   MASTER                       yarn | local[N] | spark://... (yarn)
#   SPARK_CONNECT_QUEUE          YARN queue, used only with MASTER=yarn (sparkconnect)
#   SPARK_DRIVER_MEMORY          driver heap (4g)
#   SPARK_DRIVER_CORES           spark.driver.cores (2); in client mode this is
#                                bookkeeping only, it does not limit the JVM
#   SPARK_CONNECT_PORT           gRPC port (15002); PORT is accepted as a fallback
#   SPARK_CONNECT_BIND_ADDRESS   bind address, Spark >= 4.0 only (unset: all interfaces)
#   SPARK_CONNECT_MAX_INBOUND_MESSAGE_SIZE   spark.connect.grpc.maxInboundMessageSize
#                                bytes (134217728 = 128 MiB)
#   SPARK_ARROW_MAX_RECORDS_PER_BATCH        spark.sql.execution.arrow.maxRecordsPerBatch (10000)
#   SPARK_SQL_SHUFFLE_PARTITIONS             spark.sql.shuffle.partitions (200)
#   SPARK_AUTO_BROADCAST_JOIN_THRESHOLD      spark.sql.autoBroadcastJoinThreshold
#                                bytes (104857600 = 100 MiB)
#   SPARK_CONNECT_APP_NAME       YARN application name ("Spark Connect server on <host>")
#   SPARK_CONNECT_JAR            spark-connect server jar to pass with --jars
#   SPARK_CONNECT_PACKAGES       Maven coordinates to pass with --packages instead,
#                                e.g. org.apache.spark:spark-connect_2.12:3.5.1
#   SPARK_CONNECT_EXTRA_ARGS     more spark-submit options, split on whitespace
#                                (no quoting), e.g. "--conf spark.ui.port=4050"
#
# Without SPARK_CONNECT_JAR/SPARK_CONNECT_PACKAGES the server jar is looked up in
# $SPARK_HOME/jars (Spark 4.x and the pyspark wheel ship it there: nothing to add),
# then $SPARK_HOME/connect and $SPARK_HOME/connector/connect (passed with --jars).
#
# About gRPC message sizes: Spark has spark.connect.grpc.maxInboundMessageSize
# (client -> server). There is NO spark.connect.grpc.maxOutboundMessageSize; the
# size of result batches (server -> client) is bounded by
# spark.connect.grpc.arrow.maxBatchSize, left at Spark's default here.
#
# Exit codes: 78 (EX_CONFIG) for a configuration error that a restart cannot fix
# (the unit has RestartPreventExitStatus=78); 1 when Spark is not installed yet
# (EMR still provisioning: systemd retries every 10 s).
#
# Local test (pip install "pyspark[connect]==4.0.5"):
#   SPARK_HOME=$(python -c 'import pyspark,os;print(os.path.dirname(pyspark.__file__))') \
#   MASTER='local[2]' SPARK_DRIVER_MEMORY=1g SPARK_CONNECT_BIND_ADDRESS=127.0.0.1 \
#   SPARK_CONNECT_EXTRA_ARGS='--conf spark.ui.enabled=false' ./scripts/start-connect-server.sh
set -euo pipefail

readonly EX_CONFIG=78

die_config() {
    echo "start-connect-server: $*" >&2
    exit "$EX_CONFIG"
}

SPARK_HOME=${SPARK_HOME:-/usr/lib/spark}
SPARK_SUBMIT=${SPARK_SUBMIT:-$SPARK_HOME/bin/spark-submit}
MASTER=${MASTER:-yarn}
SPARK_CONNECT_QUEUE=${SPARK_CONNECT_QUEUE:-sparkconnect}
SPARK_DRIVER_MEMORY=${SPARK_DRIVER_MEMORY:-4g}
SPARK_DRIVER_CORES=${SPARK_DRIVER_CORES:-2}
SPARK_CONNECT_PORT=${SPARK_CONNECT_PORT:-${PORT:-15002}}
SPARK_CONNECT_BIND_ADDRESS=${SPARK_CONNECT_BIND_ADDRESS:-}
SPARK_CONNECT_MAX_INBOUND_MESSAGE_SIZE=${SPARK_CONNECT_MAX_INBOUND_MESSAGE_SIZE:-134217728}
SPARK_ARROW_MAX_RECORDS_PER_BATCH=${SPARK_ARROW_MAX_RECORDS_PER_BATCH:-10000}
SPARK_SQL_SHUFFLE_PARTITIONS=${SPARK_SQL_SHUFFLE_PARTITIONS:-200}
SPARK_AUTO_BROADCAST_JOIN_THRESHOLD=${SPARK_AUTO_BROADCAST_JOIN_THRESHOLD:-104857600}
SPARK_CONNECT_APP_NAME=${SPARK_CONNECT_APP_NAME:-Spark Connect server on ${HOSTNAME:-$(uname -n)}}
SPARK_CONNECT_JAR=${SPARK_CONNECT_JAR:-}
SPARK_CONNECT_PACKAGES=${SPARK_CONNECT_PACKAGES:-}
SPARK_CONNECT_EXTRA_ARGS=${SPARK_CONNECT_EXTRA_ARGS:-}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

if ! is_uint "$SPARK_CONNECT_PORT" || ((10#$SPARK_CONNECT_PORT < 1 || 10#$SPARK_CONNECT_PORT > 65535)); then
    die_config "SPARK_CONNECT_PORT='$SPARK_CONNECT_PORT' is not a port (1-65535)"
fi
[[ $SPARK_DRIVER_MEMORY =~ ^[0-9]+[kKmMgGtT]?$ ]] ||
    die_config "SPARK_DRIVER_MEMORY='$SPARK_DRIVER_MEMORY' is not a JVM size like 4g or 4096m"
if ! is_uint "$SPARK_DRIVER_CORES" || ((10#$SPARK_DRIVER_CORES < 1)); then
    die_config "SPARK_DRIVER_CORES='$SPARK_DRIVER_CORES' is not a positive integer"
fi
for var in SPARK_CONNECT_MAX_INBOUND_MESSAGE_SIZE SPARK_ARROW_MAX_RECORDS_PER_BATCH \
    SPARK_SQL_SHUFFLE_PARTITIONS; do
    is_uint "${!var}" || die_config "$var='${!var}' is not a non-negative integer"
done
# -1 disables broadcast joins, so allow it here.
[[ $SPARK_AUTO_BROADCAST_JOIN_THRESHOLD =~ ^(-1|[0-9]+)$ ]] ||
    die_config "SPARK_AUTO_BROADCAST_JOIN_THRESHOLD='$SPARK_AUTO_BROADCAST_JOIN_THRESHOLD' is not an integer"

# Not installed (yet): on EMR, bootstrap actions run before Spark is installed.
# Exit 1 so that systemd retries instead of giving up.
if [[ ! -x $SPARK_SUBMIT ]]; then
    echo "start-connect-server: $SPARK_SUBMIT not found or not executable" \
        "(Spark not installed yet? set SPARK_HOME or SPARK_SUBMIT)" >&2
    exit 1
fi

# newest matching jar in a directory (empty if none)
newest_jar() {
    local dir=$1
    [[ -d $dir ]] || return 0
    find "$dir" -maxdepth 1 -type f -name 'spark-connect_2.1[0-9]-*.jar' 2>/dev/null |
        sort -V | tail -n 1
}

jar_args=()
if [[ -n $SPARK_CONNECT_JAR ]]; then
    [[ -f $SPARK_CONNECT_JAR ]] || die_config "SPARK_CONNECT_JAR=$SPARK_CONNECT_JAR: no such file"
    jar_args=(--jars "$SPARK_CONNECT_JAR")
elif [[ -n $SPARK_CONNECT_PACKAGES ]]; then
    jar_args=(--packages "$SPARK_CONNECT_PACKAGES")
elif [[ -n $(newest_jar "$SPARK_HOME/jars") ]]; then
    : # already on spark-submit's classpath
else
    jar=""
    for dir in "$SPARK_HOME/connect" "$SPARK_HOME/connector/connect"; do
        jar=$(newest_jar "$dir")
        [[ -n $jar ]] && break
    done
    [[ -n $jar ]] || die_config "no spark-connect_*.jar in $SPARK_HOME/jars," \
        "$SPARK_HOME/connect or $SPARK_HOME/connector/connect;" \
        "set SPARK_CONNECT_JAR=/path/to/spark-connect_<scala>-<version>.jar or" \
        "SPARK_CONNECT_PACKAGES=org.apache.spark:spark-connect_<scala>:<spark version>"
    jar_args=(--jars "$jar")
fi

cmd=(
    "$SPARK_SUBMIT"
    --class org.apache.spark.sql.connect.service.SparkConnectServer
    --name "$SPARK_CONNECT_APP_NAME"
    --master "$MASTER"
    --deploy-mode client
)
if [[ $MASTER == yarn ]]; then
    cmd+=(--queue "$SPARK_CONNECT_QUEUE")
fi
cmd+=(
    --driver-memory "$SPARK_DRIVER_MEMORY"
    --driver-cores "$SPARK_DRIVER_CORES"
    "${jar_args[@]}"
    --conf "spark.connect.grpc.binding.port=$SPARK_CONNECT_PORT"
)
if [[ -n $SPARK_CONNECT_BIND_ADDRESS ]]; then
    cmd+=(--conf "spark.connect.grpc.binding.address=$SPARK_CONNECT_BIND_ADDRESS")
fi
cmd+=(
    --conf "spark.connect.grpc.maxInboundMessageSize=$SPARK_CONNECT_MAX_INBOUND_MESSAGE_SIZE"
    --conf "spark.sql.execution.arrow.maxRecordsPerBatch=$SPARK_ARROW_MAX_RECORDS_PER_BATCH"
    --conf "spark.sql.shuffle.partitions=$SPARK_SQL_SHUFFLE_PARTITIONS"
    --conf "spark.sql.autoBroadcastJoinThreshold=$SPARK_AUTO_BROADCAST_JOIN_THRESHOLD"
)
if [[ -n $SPARK_CONNECT_EXTRA_ARGS ]]; then
    read -r -a extra <<<"$SPARK_CONNECT_EXTRA_ARGS"
    cmd+=("${extra[@]}")
fi
cmd+=("$@")

printf 'start-connect-server: exec' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2
exec "${cmd[@]}"
