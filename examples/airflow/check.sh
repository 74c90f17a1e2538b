#!/bin/sh
# `make airflow-check`: the example DAGs under `airflow dags test` (Airflow in its own
# virtual environment, SQLite), on a small planted dataset; the fanned-out run and the
# one-task run must give the same bytes, and remove the planted copies.
set -eu
repo=$(pwd)
root="$repo/demo-data/airflow"
rm -rf "$root"
mkdir -p "$root"
.venv/bin/python -m dedup.synth "$root/shards" 120 20 >/dev/null
export AIRFLOW_HOME="$root/home"
export AIRFLOW__CORE__DAGS_FOLDER="$repo/examples/airflow"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export DEDUP_BIN="$repo/.venv/bin/dedup"
export DEDUP_INPUT="$root/shards"
export DEDUP_OUT="$root/clean"
export DEDUP_OUT_ONE="$root/clean-one"
export DEDUP_PARTS=3
export DEDUP_FLAGS="--signals exact,phash,views --workers 1"
airflow="$repo/.venv-airflow/bin/airflow"
"$airflow" db migrate >"$root/migrate.log" 2>&1 || { tail -20 "$root/migrate.log"; exit 1; }
"$airflow" dags test dedup_fanout >"$root/fanout.log" 2>&1 || { tail -40 "$root/fanout.log"; exit 1; }
"$airflow" dags test dedup_one_task >"$root/one.log" 2>&1 || { tail -40 "$root/one.log"; exit 1; }
.venv/bin/python examples/airflow/check_outputs.py "$root/clean" "$root/clean-one"
