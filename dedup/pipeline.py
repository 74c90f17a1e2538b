"""extract (per shard) -> cluster (global) -> write (per shard), and the run that chains them."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from dedup.cluster import NO_DISTANCE, Candidates, Clusters, cluster
from dedup.config import Config
from dedup.errors import DedupError, ShardError
from dedup.extract import FEATURE_SCHEMA, STATUS_OK, ShardFeatures, extract_shard, read_features
from dedup.outdir import claim_output, feature_store
from dedup.progress import Progress
from dedup.report import (
    CLUSTERS_SCHEMA,
    LARGEST_CLUSTERS,
    SAMPLES_SCHEMA,
    package_versions,
    report_paths,
    size_histogram,
    write_summary,
    write_table,
)
from dedup.shards import Shard, list_shards
from dedup.write import WriteResult, write_shard

log = logging.getLogger("dedup")

REPORT_DIR = "dedup-report"
TICK_SECONDS = 0.5
# What phase 2 and the report read from the feature store; member layout stays on disk.
PLAN_COLUMNS = ["key", "image_member", "status", "width", "height", "bytes", "digest", "phash"]


@dataclass
class Plan:
    """Phase 2's result over all shards, in input order (one entry per sample)."""

    shard_of: np.ndarray  # int64 shard position of each sample
    features: pa.Table  # all shards' feature rows, concatenated
    keep: np.ndarray  # bool: the sample goes to the output
    passthrough: np.ndarray  # bool: no decodable image; kept untouched, counted by reason
    cluster_id: np.ndarray
    cluster_size: np.ndarray
    reason: np.ndarray  # object
    survivor: np.ndarray  # int64 global row, -1 when the sample is not removed
    phash_distance: np.ndarray
    clusters: Clusters | None
    candidate_rows: np.ndarray  # global row of each candidate


# ---------------------------------------------------------------- parallel map


def map_shards(fn: Callable, items: list, workers: int, progress: Progress) -> list:
    """fn over items in worker processes (forked), results in input order.

    The first failure cancels the shards not yet started and is raised here.
    """
    results: list = [None] * len(items)
    if workers <= 1 or len(items) <= 1:
        for n, item in enumerate(items):
            results[n] = fn(item)
            progress.tick()
        progress.close()
        return results
    ctx = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx)
    try:
        pending = {pool.submit(fn, item): n for n, item in enumerate(items)}
        while pending:
            done, _ = wait(pending, timeout=TICK_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                results[pending.pop(future)] = future.result()
            progress.tick()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    progress.close()
    return results


# ---------------------------------------------------------------- phases


@dataclass
class BadShard:
    """A shard left out under --skip-bad-shards, and why."""

    shard: Shard
    error: str


def extract_all(
    shards: list[Shard], config: Config, store: str, skip_bad_shards: bool = False
) -> list[ShardFeatures | BadShard]:
    """Phase 1 over every shard; with `skip_bad_shards`, a damaged shard becomes a BadShard
    instead of ending the run."""
    total = sum(_size(s.path) for s in shards)
    return map_shards(
        _Extract(config, store, skip_bad_shards),
        shards,
        config.worker_count,
        Progress("extract", total_bytes=total),
    )


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@dataclass
class _Extract:
    config: Config
    store: str
    skip_bad_shards: bool

    def __call__(self, shard: Shard) -> ShardFeatures | BadShard:
        try:
            return extract_shard(shard, self.config, self.store)
        except ShardError as e:
            if not self.skip_bad_shards:
                raise
            return BadShard(shard, str(e))


def plan(features: list[ShardFeatures], config: Config) -> Plan:
    """Phase 2: cluster every decoded image of every shard; decide each sample's fate."""
    tables = [read_features(f.path, PLAN_COLUMNS) for f in features]
    table = pa.concat_tables(tables) if tables else _empty_plan_table()
    n = table.num_rows
    shard_of = np.repeat(
        np.arange(len(features), dtype=np.int64), [f.rows for f in features]
    ).astype(np.int64)
    status = np.array(table.column("status").to_pylist(), dtype=object)
    candidate_rows = np.flatnonzero(status == STATUS_OK)
    rows = np.arange(n, dtype=np.int64)
    keep = np.ones(n, dtype=bool)
    cluster_id = rows.copy()
    cluster_size = np.ones(n, dtype=np.int64)
    reason = status.copy()  # passthrough reasons stay as they are
    survivor = np.full(n, -1, dtype=np.int64)
    phash_distance = np.full(n, NO_DISTANCE, dtype=np.int32)
    clusters = None
    if len(candidate_rows):
        cand_table = table.take(pa.array(candidate_rows))
        pixels = np.asarray(cand_table.column("width").to_numpy(), dtype=np.int64) * np.asarray(
            cand_table.column("height").to_numpy(), dtype=np.int64
        )
        phash = None
        if "phash" in config.signals:
            phash = fixed_binary_array(cand_table.column("phash"))
        cand = Candidates(
            pixels=pixels,
            nbytes=np.asarray(cand_table.column("bytes").to_numpy(), dtype=np.int64),
            digest=fixed_binary_array(cand_table.column("digest")),
            phash=phash,
        )
        clusters = cluster(cand, config)
        cand_global = candidate_rows
        cluster_id[cand_global] = cand_global[clusters.cluster_id]
        cluster_size[cand_global] = clusters.cluster_size
        reason[cand_global] = clusters.reason
        removed = clusters.survivor != np.arange(len(cand_global))
        keep[cand_global[removed]] = False
        survivor[cand_global[removed]] = cand_global[clusters.survivor[removed]]
        phash_distance[cand_global] = clusters.phash_distance
    return Plan(
        shard_of,
        table,
        keep,
        status != STATUS_OK,
        cluster_id,
        cluster_size,
        reason,
        survivor,
        phash_distance,
        clusters,
        candidate_rows,
    )


def fixed_binary_array(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size binary column without nulls as an (N, width) uint8 array, without a
    detour through Python objects."""
    width = column.type.byte_width
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count:
        raise ValueError("fixed_binary_array needs a column without nulls")
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width : (array.offset + len(array)) * width].reshape(-1, width)


def _empty_plan_table() -> pa.Table:
    return FEATURE_SCHEMA.empty_table().select(PLAN_COLUMNS)


def write_all(
    features: list[ShardFeatures], the_plan: Plan, out: str, workers: int
) -> list[WriteResult]:
    """Phase 3 over every shard."""
    jobs = []
    for pos, f in enumerate(features):
        rows = np.flatnonzero(the_plan.shard_of == pos)
        jobs.append((f, the_plan.keep[rows].tolist(), os.path.join(out, f.shard.name)))
    total = int(the_plan.keep.sum())
    return map_shards(_write_job, jobs, workers, Progress("write", total_items=total))


def _write_job(job) -> WriteResult:
    return write_shard(*job)


# ---------------------------------------------------------------- run


def run(
    inputs: list[str],
    out: str,
    config: Config,
    report_dir: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    skip_bad_shards: bool = False,
) -> dict[str, Any]:
    """The whole job: list shards, extract, cluster, write, report. Returns summary.json."""
    shards = list_shards(inputs)
    report_dir = report_dir or os.path.join(out, REPORT_DIR)
    with claim_output(out, shards, overwrite, report_dir):
        return _run(shards, out, config, report_dir, dry_run, skip_bad_shards)


def _run(shards, out, config: Config, report_dir: str, dry_run: bool, skip_bad_shards: bool):
    store = feature_store(out)
    log.info(
        "%d shards, signals %s, %d workers",
        len(shards),
        ",".join(config.signals),
        config.worker_count,
    )

    t0 = time.monotonic()
    extracted = extract_all(shards, config, store, skip_bad_shards)
    bad = [r for r in extracted if isinstance(r, BadShard)]
    features = [r for r in extracted if isinstance(r, ShardFeatures)]
    shards = [f.shard for f in features]
    for b in bad:
        log.warning("skipped bad shard: %s", b.error)
        # An output an earlier run wrote for this shard no longer reflects the input.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, b.shard.name))
    t1 = time.monotonic()
    the_plan = plan(features, config)
    t2 = time.monotonic()
    written = [] if dry_run else write_all(features, the_plan, out, config.worker_count)
    t3 = time.monotonic()

    shard_counts = _check_counts(shards, features, the_plan, written, dry_run)
    n_images = len(the_plan.candidate_rows)
    phases = {
        "extract": _phase(t1 - t0, len(the_plan.keep)),
        "cluster": _phase(t2 - t1, n_images),
        "write": _phase(t3 - t2, len(the_plan.keep) if not dry_run else 0),
    }
    paths = report_paths(report_dir)
    write_table(_samples_table(shards, the_plan), paths["samples"])
    clusters = _clusters_table(shards, the_plan)
    write_table(clusters, paths["clusters"])
    summary = _summary(
        features, the_plan, clusters, shard_counts, config, phases, out, report_dir, dry_run
    )
    summary["skipped_shards"] = [{"shard": b.shard.path, "error": b.error} for b in bad]
    write_summary(summary, paths["summary"])
    return summary


def _phase(seconds: float, items: int) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "images_per_second": round(items / seconds, 1) if seconds > 0 else 0.0,
    }


def _check_counts(shards, features, the_plan: Plan, written, dry_run) -> list[dict[str, Any]]:
    """Samples in = kept + removed + passthrough, per shard; the writer agrees. Else fail."""
    out = []
    passthrough_mask = the_plan.passthrough
    for pos, shard in enumerate(shards):
        rows = the_plan.shard_of == pos
        samples = int(rows.sum())
        passthrough = int((rows & passthrough_mask).sum())
        removed = int((rows & ~the_plan.keep).sum())
        kept = int((rows & the_plan.keep & ~passthrough_mask).sum())
        if samples != kept + removed + passthrough or samples != features[pos].rows:
            raise DedupError(
                f"{shard.path}: sample counts do not add up "
                f"({samples} != {kept} + {removed} + {passthrough})"
            )
        if not dry_run and written[pos].samples_written != kept + passthrough:
            raise DedupError(
                f"{shard.path}: wrote {written[pos].samples_written} samples, "
                f"expected {kept + passthrough}"
            )
        out.append(
            {
                "shard": shard.path,
                "output": None if dry_run else written[pos].output,
                "samples": samples,
                "kept": kept,
                "removed": removed,
                "passthrough": passthrough,
                "skipped_members": features[pos].skipped_members,
                "features_reused": features[pos].reused,
            }
        )
    return out


def _samples_table(shards: list[Shard], p: Plan) -> pa.Table:
    n = len(p.keep)
    if n == 0:
        return SAMPLES_SCHEMA.empty_table()
    shard_paths = np.array([s.path for s in shards], dtype=object)
    keys = np.array(p.features.column("key").to_pylist(), dtype=object)
    removed = p.survivor >= 0
    dup_of = np.full(n, None, dtype=object)
    dup_of[removed] = keys[p.survivor[removed]]
    dup_shard = np.full(n, None, dtype=object)
    dup_shard[removed] = shard_paths[p.shard_of[p.survivor[removed]]]
    sha = [None if d is None else d.hex() for d in p.features.column("digest").to_pylist()]
    ph = [None if d is None else d.hex() for d in p.features.column("phash").to_pylist()]
    distance = pa.array(p.phash_distance, mask=p.phash_distance == NO_DISTANCE)
    kept = p.keep & ~p.passthrough
    return pa.table(
        {
            "shard": pa.array(shard_paths[p.shard_of], type=pa.string()),
            "key": pa.array(keys, type=pa.string()),
            "cluster_id": p.cluster_id,
            "cluster_size": p.cluster_size,
            "kept": kept,
            "reason": pa.array(p.reason, type=pa.string()),
            "duplicate_of": pa.array(dup_of, type=pa.string()),
            "duplicate_of_shard": pa.array(dup_shard, type=pa.string()),
            "phash_distance": distance,
            "width": p.features.column("width"),
            "height": p.features.column("height"),
            "bytes": p.features.column("bytes"),
            "image_member": p.features.column("image_member"),
            "digest": pa.array(sha, type=pa.string()),
            "phash": pa.array(ph, type=pa.string()),
        },
        schema=SAMPLES_SCHEMA,
    )


def _clusters_table(shards: list[Shard], p: Plan) -> pa.Table:
    """One row per cluster of two or more, in cluster-id order, with global row ids."""
    if p.clusters is None or not len(p.clusters.groups):
        return CLUSTERS_SCHEMA.empty_table()
    g = p.clusters.groups
    keys = np.array(p.features.column("key").to_pylist(), dtype=object)
    shard_paths = np.array([s.path for s in shards], dtype=object)
    survivors = p.candidate_rows[g.survivor]
    return pa.table(
        {
            "cluster_id": p.candidate_rows[g.cluster_id],
            "size": g.size,
            "survivor_shard": pa.array(shard_paths[p.shard_of[survivors]], type=pa.string()),
            "survivor_key": pa.array(keys[survivors], type=pa.string()),
            "signals": [g.signal_names(k) for k in range(len(g))],
            "max_distance": pa.array(g.max_distance, mask=g.max_distance == NO_DISTANCE),
            "max_distance_to_survivor": pa.array(
                g.max_distance_to_survivor, mask=g.max_distance_to_survivor == NO_DISTANCE
            ),
        },
        schema=CLUSTERS_SCHEMA,
    )


def _summary(
    features,
    p: Plan,
    clusters: pa.Table,
    shard_counts,
    config: Config,
    phases,
    out,
    report_dir,
    dry_run,
) -> dict[str, Any]:
    removed_by = Counter(p.reason[~p.keep].tolist())
    pass_mask = p.passthrough
    passthrough_by = Counter(p.reason[pass_mask].tolist())
    sizes = clusters.column("size").to_numpy()
    largest = np.lexsort((clusters.column("cluster_id").to_numpy(), -sizes))[:LARGEST_CLUSTERS]
    largest_rows = clusters.take(pa.array(largest, type=pa.int64())).to_pylist()
    skipped = Counter()
    for f in features:
        skipped.update(f.skipped_members)
    return {
        "counts": {
            "samples": int(len(p.keep)),
            "kept": int(sum(c["kept"] for c in shard_counts)),
            "removed": int((~p.keep).sum()),
            "passthrough": int(pass_mask.sum()),
            "removed_by_reason": dict(sorted(removed_by.items())),
            "passthrough_by_reason": dict(sorted(passthrough_by.items())),
            "skipped_members": dict(sorted(skipped.items())),
        },
        "clusters": {
            "count": clusters.num_rows,
            "size_histogram": size_histogram(sizes),
            "largest": largest_rows,
        },
        "thresholds": {"phash": config.phash_threshold} if "phash" in config.signals else {},
        "config": config.to_dict(),
        "versions": package_versions(),
        "phases": phases,
        "shards": shard_counts,
        "output": {"dir": out, "report": report_dir, "dry_run": dry_run},
    }
