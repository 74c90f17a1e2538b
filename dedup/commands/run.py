"""`dedup run`: extract (per shard) -> cluster (global) -> write (per shard) -> the
report, chained in one process over the run's executor."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from dedup.core.config import Config
from dedup.core.errors import DedupError, OutputError
from dedup.engine.blocklist import load_blocklist
from dedup.engine.canaries import canary_phase
from dedup.engine.finish import write_phase
from dedup.engine.job import Job, discard_spool, reference_store
from dedup.engine.plan import cluster_phase, work_folder
from dedup.engine.reading import extract_phase, extract_references, log_extract
from dedup.engine.references import (
    check_stored,
    resolve_references,
)
from dedup.executors import make_executor
from dedup.io import storage
from dedup.io.fsutil import read_file, scratch_dir, staged_folder
from dedup.io.outdir import (
    PARTS_DIR,
    STATE_DIR,
    claim_output,
    feature_store,
    refuse_output,
)
from dedup.io.shards import (
    Shard,
    list_shards,
)
from dedup.report.summary import make_report
from dedup.signals.choice import choose_signals

log = logging.getLogger("dedup")

REPORT_DIR = "dedup-report"
DRY_RUN_REPORT_DIR = "dedup-report-dry-run"  # a dry run's, beside a real run's report


def run(
    inputs: list[str],
    out: str,
    config: Config,
    report_dir: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    skip_bad_shards: bool = False,
    state_dir: str | None = None,
) -> dict[str, Any]:
    """The whole job: list shards, extract, cluster, write, report. Returns summary.json.

    `out`, `report_dir` and `state_dir` may be local paths or s3:// / gs:// prefixes."""
    shards = list_shards(inputs)
    report_dir = _report_dir(out, report_dir, dry_run)
    refuse_output(out, report_dir, shards)  # cheap refusals before CLIP's weights load
    config, clip = choose_signals(config)
    store = feature_store(out, state_dir)
    # What the run matches against, checked before OUT is touched.
    references = resolve_references(list(config.against), config, reference_store(out), shards, out)
    check_stored(references, config, clip)
    blocklists = [load_blocklist(path, config) for path in config.blocklist]
    # The executor first: a cluster that cannot be reached leaves OUT untouched.
    with (
        make_executor(config.executor, config.worker_count, config.ray_address) as executor,
        claim_output(out, shards, overwrite, report_dir, dry_run, state_dir),
        scratch_dir() as scratch,
    ):
        job = Job(
            out, store, config, executor, dry_run, skip_bad_shards, clip, references, blocklists
        )
        try:
            return _run(shards, job, report_dir, scratch)
        finally:  # a pipe: input's bytes are this run's only: never kept past it
            discard_spool(out)


def _report_dir(out: str, report_dir: str | None, dry_run: bool) -> str:
    """Where the report goes: --report, else OUT/dedup-report. A dry run never replaces
    a real run's report: it writes OUT/dedup-report-dry-run beside it (and says so), and
    refuses a --report that holds one."""
    chosen = report_dir or storage.join(out, REPORT_DIR)
    if not dry_run:
        return chosen
    try:
        earlier = json.loads(read_file(storage.join(chosen, "summary.json")))
        real = not earlier.get("output", {}).get("dry_run", True)
    except (OSError, ValueError, AttributeError, DedupError):
        real = False
    if not real:
        return chosen
    if report_dir is not None:
        raise OutputError(
            f"--report {report_dir}: holds the report of a real run; a dry run does not "
            "replace it (give another --report)"
        )
    beside = storage.join(out, DRY_RUN_REPORT_DIR)
    log.info("dry run: the report goes to %s (%s holds a real run's report)", beside, chosen)
    return beside


def _run(shards: list[Shard], job: Job, report_dir: str, scratch: str) -> dict[str, Any]:
    """The phases in order, then the report from what they returned."""
    log.info(
        "%d shards, signals %s, executor %s (%d parallel tasks)",
        len(shards),
        ",".join(job.config.signals),
        job.executor.name,
        job.executor.parallelism,
    )
    t0 = time.monotonic()
    features, bad = extract_phase(shards, job)
    bad += extract_references(job.references, job)
    t1 = time.monotonic()
    log_extract(features, t1 - t0)
    the_plan = cluster_phase(features, job)
    t2 = time.monotonic()
    # Write tasks put their samples.parquet parts beside OUT, where every node of a
    # cluster can write (the report folder may be this machine's staging folder).
    parts_dir = storage.join(storage.join(job.out, STATE_DIR), PARTS_DIR)
    with work_folder(parts_dir):
        finished = write_phase(features, the_plan, job, parts_dir)
        t3 = time.monotonic()
        planted = canary_phase(features, job)
        seconds = {"extract": t1 - t0, "cluster": t2 - t1, "write": t3 - t2}
        if planted is not None:
            seconds["canaries"] = time.monotonic() - t3
        with staged_folder(report_dir, scratch) as folder:
            return make_report(
                features,
                bad,
                the_plan,
                finished,
                job,
                folder,
                parts_dir,
                seconds,
                planted,
                shown_as=report_dir,
            )
