"""dedup in Airflow: a run fanned out over mapped tasks, and the same run as one task.

- `dedup_fanout`: `dedup extract --part I/N` as N mapped tasks, then `dedup cluster`, then
  `dedup write --part I/N` as N mapped tasks; the last write task to finish makes the
  report. The tasks share OUT (a path every worker sees, or an s3:// / gs:// prefix).
- `dedup_one_task`: `dedup INPUT --out OUT`, for data one machine handles.

Every task prints one JSON line last (`--json`), which BashOperator pushes to XCom; exit
codes fail the task (2 bad usage, 3 bad input shard, 4 OUT refused, 5 done with skipped
shards, 6 CLIP unavailable). Settings come from the environment of the scheduler:

  DEDUP_BIN     the dedup command (default: dedup on PATH)
  DEDUP_INPUT   the shards: a directory, glob, brace pattern or URL
  DEDUP_OUT     OUT for the fanned-out run; DEDUP_OUT_ONE for the one-task run
  DEDUP_PARTS   N, the mapped tasks per phase (default 4; a part is a group of shards
                balanced by bytes, so 10,000 shards can go to a few hundred tasks:
                Airflow caps a mapped task at 1,024 by default)
  DEDUP_FLAGS   further options, the same for every task (e.g. --signals exact,phash)
"""

from __future__ import annotations

import os
import shlex
from datetime import datetime

from airflow import DAG

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

DEDUP = os.environ.get("DEDUP_BIN", "dedup")
INPUT = os.environ.get("DEDUP_INPUT", "/data/shards")
OUT = os.environ.get("DEDUP_OUT", "/data/clean")
OUT_ONE = os.environ.get("DEDUP_OUT_ONE", "/data/clean-one")
PARTS = int(os.environ.get("DEDUP_PARTS", "4"))
FLAGS = os.environ.get("DEDUP_FLAGS", "")


def command(*args: str) -> str:
    """A shell command line; the trailing space keeps Airflow from reading a command that
    ends in .sh as a template file."""
    return " ".join([shlex.quote(DEDUP), *map(shlex.quote, args), FLAGS, "--json"]) + " "


with DAG(
    dag_id="dedup_fanout",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    max_active_tasks=16,
    tags=["dedup"],
):
    extract = BashOperator.partial(task_id="extract").expand(
        bash_command=[
            command("extract", INPUT, "--out", OUT, "--part", f"{i}/{PARTS}") for i in range(PARTS)
        ]
    )
    cluster = BashOperator(task_id="cluster", bash_command=command("cluster", "--out", OUT))
    write = BashOperator.partial(task_id="write").expand(
        bash_command=[
            command("write", "--out", OUT, "--part", f"{i}/{PARTS}") for i in range(PARTS)
        ]
    )
    extract >> cluster >> write


with DAG(
    dag_id="dedup_one_task",
    start_date=datetime(2026, 1, 1),
    schedule=None,
    catchup=False,
    tags=["dedup"],
):
    BashOperator(task_id="dedup", bash_command=command(INPUT, "--out", OUT_ONE))
