"""Real-Spark scenario client for `bench/run --spark` (hook; the Spark harness
has its own owner). Run with a Python that has pyspark[connect]
(default: <repo>/.venv/bin/python, override with SPARK_PYTHON).

Connects to a Spark Connect endpoint (direct or through a balancer), runs
spark.range(ROWS).toPandas() once to warm up, then ITERATIONS timed times,
and prints one JSON line: {"rows": ..., "seconds": [t1, t2, ...]}.
"""
import argparse
import json
import time

from pyspark.sql import SparkSession


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--remote", required=True, help="sc://host:port")
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--iterations", type=int, default=5)
    a = ap.parse_args()

    spark = SparkSession.builder.remote(a.remote).getOrCreate()
    try:
        df = spark.range(a.rows)
        if len(df.toPandas()) != a.rows:  # warm-up, and a correctness check
            raise SystemExit("toPandas returned the wrong number of rows")
        seconds = []
        for _ in range(a.iterations):
            t0 = time.perf_counter()
            pdf = df.toPandas()
            seconds.append(time.perf_counter() - t0)
            assert len(pdf) == a.rows
    finally:
        spark.stop()
    print(json.dumps({"rows": a.rows, "seconds": seconds}))


if __name__ == "__main__":
    main()
