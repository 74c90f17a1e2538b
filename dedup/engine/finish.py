"""Phase 3: each shard's cleaned copy and its part of samples.parquet, written by the
executor's tasks; outputs an earlier run wrote from the same plan are left as they are."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.core.errors import DedupError
from dedup.core.progress import Progress, advance, counted
from dedup.engine.extract import ShardFeatures, input_identity
from dedup.engine.featurestore import read_features
from dedup.engine.job import Job
from dedup.engine.plan import REASONS, Plan
from dedup.engine.tables import (
    SAMPLES_SCHEMA,
    SHOWN_MEMBERS,
    shown_clusters,
    write_table,
)
from dedup.engine.thumbs import read_previews
from dedup.engine.write import WRITE_COLUMNS, write_shard
from dedup.executors import Executor
from dedup.io import storage
from dedup.io.fsutil import read_file, sync_folders, write_atomic
from dedup.io.outdir import (
    STATE_DIR,
    WRITTEN_DIR,
)
from dedup.io.shards import (
    display_name,
    raw_name,
    sidecars,
)
from dedup.signals.edges import DECISIONS, NO_DISTANCE
from dedup.signals.keep import OVERLAY_NAMES, quality_name

log = logging.getLogger("dedup")


@dataclass
class FinishJob:
    """Phase 3 for one shard: its decisions, and where to write the shard and report part."""

    features: ShardFeatures
    keep: np.ndarray
    passthrough: np.ndarray
    cluster_id: np.ndarray
    cluster_size: np.ndarray
    reason: np.ndarray
    phash_distance: np.ndarray
    clip_similarity: np.ndarray
    duplicate_of: list  # survivor key per row (None unless removed)
    duplicate_of_shard: list
    reference: tuple  # (reference, reference_key, reference_signal) lists, per row
    output: str | None  # None in a dry run
    part: str
    preview_rows: list[int] = field(default_factory=list)  # rows the HTML report shows
    written_dir: str = ""  # records of the outputs written (OUT/.dedup/written)
    sidecars: list = field(default_factory=list)  # (img2dataset file beside the input, target)


@dataclass
class Finished:
    shard_path: str
    output: str | None
    samples_written: int
    previews: list = field(default_factory=list)  # (key, thumbnail, caption)
    unchanged: bool = False  # the output shard was left as an earlier run wrote it


def finish_all(
    features: list[ShardFeatures],
    p: Plan,
    out: str,
    parts_dir: str,
    dry_run: bool,
    executor: Executor,
    only=None,
) -> list[Finished]:
    """Phase 3 over every shard (the positions in `only`, when given): write its cleaned
    copy and its part of samples.parquet."""
    survivor_of = {}
    if p.clusters.num_rows:
        c = p.clusters
        ids = c.column("cluster_id").to_numpy()
        about = zip(
            *(
                c.column(name).to_pylist()
                for name in ("survivor_key", "survivor_shard", "reference", "reference_key")
            ),
            strict=True,
        )
        survivor_of = dict(zip(ids.tolist(), about, strict=True))
    matched = (REASONS.index("reference"), REASONS.index("blocklist"))
    shown = preview_rows(p)
    jobs = []
    for pos, f in enumerate(features):
        if only is not None and pos not in only:
            continue
        rows = p.rows(pos)
        local = shown[(shown >= rows.start) & (shown < rows.stop)] - rows.start
        removed = p.survivor[rows] >= 0
        dup = [None] * (rows.stop - rows.start)
        dup_shard, ref, ref_key, ref_signal = ([None] * len(dup) for _ in range(4))
        for k in np.flatnonzero(removed).tolist():
            row = rows.start + k
            dup[k], dup_shard[k], ref[k], ref_key[k] = survivor_of[int(p.cluster_id[row])]
            if p.reason[row] in matched:
                ref_signal[k] = DECISIONS[p.link[row]]
            else:  # a plain copy in a cluster that also holds a reference item
                ref[k] = ref_key[k] = None
        for row in p.blocked_in(rows):
            k = row - rows.start
            ref[k], ref_key[k] = storage.absolute(p.blocked[row][0]), p.blocked[row][1]
            ref_signal[k] = "phash" if ref_key[k].startswith("phash:") else "exact"
        jobs.append(
            FinishJob(
                f,
                p.keep[rows],
                p.passthrough[rows],
                p.cluster_id[rows],
                p.cluster_size[rows],
                p.reason[rows],
                p.phash_distance[rows],
                p.clip_similarity[rows],
                dup,
                dup_shard,
                (ref, ref_key, ref_signal),
                None if dry_run else storage.join(out, f.shard.name),
                storage.join(parts_dir, f"{pos:08d}.parquet"),
                local.tolist(),
                storage.join(storage.join(out, STATE_DIR), WRITTEN_DIR),
                []
                if dry_run
                else [(p, storage.join(out, storage.basename(p))) for p in sidecars(f.shard)],
            )
        )
    total = sum(int(j.keep.sum()) if not dry_run else len(j.keep) for j in jobs)
    progress = Progress("write", total_items=total, unit="samples")
    finished = executor.map(_finish, jobs, progress, describe=_job_shard_path)
    # Each task's files were synced before their renames: their folders once for all of
    # them (a folder's fsync commits the filesystem's journal: once a file, amid other
    # workers' writes, it cost more than the writes).
    written = [f.output for f in finished if f.output is not None and not f.unchanged]
    folders = {os.path.dirname(path) for path in written + [j.part for j in jobs]}
    sync_folders(folders | {j.written_dir for j in jobs if j.output is not None})
    return finished


def _job_shard_path(job: FinishJob) -> str:
    return job.features.shard.path


def _finish(job: FinishJob) -> Finished:
    # One read of the shard's features serves the writer, samples.parquet and previews.
    f = read_features(job.features.path, sorted({*WRITE_COLUMNS, *FINISH_COLUMNS}))
    written, captured, unchanged = 0, {}, False
    if job.output is not None:
        name = hashlib.sha256(raw_name(job.features.shard.name)).hexdigest()[:32]
        record = storage.join(job.written_dir, f"{name}.json")
        plan_digest = _output_plan(job)
        written = _unchanged(job.output, record, plan_digest) if same_input(job.features) else None
        unchanged = written is not None
        if unchanged:  # written before: a resumed write still ends at 100%
            advance(written)
        else:
            written, captured = write_shard(
                job.features,
                job.keep.tolist(),
                job.output,
                frozenset(job.preview_rows),
                f.select(WRITE_COLUMNS),
            )
            carry_sidecars(job, f.column("key").to_pylist())
            if plan_digest is not None:
                mark = {
                    "plan": plan_digest,
                    "output": _identity(job.output),
                    "samples": written,
                    "beside": [(t, _identity(t)) for _, t in job.sidecars if _exists(t)],
                }
                write_atomic(record, json.dumps(mark, sort_keys=True).encode(), sync_folder=False)
    else:  # a dry run: the samples judged, their report rows written
        advance(len(job.keep))
    write_table(samples_part(job, f.select(SAMPLE_COLUMNS)), job.part, sync_folder=False)
    previews = []
    if job.preview_rows:
        keys = f.column("key").to_pylist()
        found = read_previews(
            job.features.shard,
            job.preview_rows,
            f.column("member_names").to_pylist(),
            f.column("member_offsets").to_pylist(),
            f.column("member_sizes").to_pylist(),
            f.column("image_member").to_pylist(),
            captured,
        )
        previews = [(keys[row], thumb, cap) for row, thumb, cap in found]
    return Finished(job.features.shard.path, job.output, written, previews, unchanged)


def carry_sidecars(job: FinishJob, keys: list[str]) -> None:
    """img2dataset's files beside an input shard, carried to OUT for the kept samples: the
    Parquet without the rows of removed samples (matched by `key`; rows of samples that
    were never in the tar stay), the stats JSON with `successes` lowered by the removed
    count and a `dedup` entry. A Parquet without a `key` column is not carried (a warning
    says so): its rows could not be matched to samples."""
    removed = {key for key, kept in zip(keys, job.keep.tolist(), strict=True) if not kept}
    for source, target in job.sidecars:
        data = read_file(source)
        if source.endswith(".parquet"):
            try:
                table = pq.read_table(pa.BufferReader(data))
            except pa.ArrowException as e:
                log.warning("%s: not carried to OUT (not a readable Parquet file: %s)", source, e)
                continue
            if "key" not in table.column_names:
                log.warning("%s: not carried to OUT (no key column to match samples by)", source)
                continue
            mask = pc.invert(pc.is_in(table.column("key"), pa.array(sorted(removed), pa.string())))
            buf = pa.BufferOutputStream()
            pq.write_table(table.filter(pc.fill_null(mask, True)), buf)
            write_atomic(target, buf.getvalue().to_pybytes())
        else:
            try:
                stats = json.loads(data)
            except ValueError:
                stats = None
            if not isinstance(stats, dict):
                log.warning("%s: not carried to OUT (not a JSON object)", source)
                continue
            if isinstance(stats.get("successes"), int):
                stats["successes"] -= len(removed)
            stats["dedup"] = {"removed": len(removed), "kept": len(keys) - len(removed)}
            write_atomic(target, json.dumps(stats, indent=2, sort_keys=True).encode())


def _output_plan(job: FinishJob) -> str | None:
    """What an output shard's bytes depend on: the input's identity (or content digest)
    and which samples are kept. None when the input has no identity (a pipe: command)."""
    f = job.features
    if f.identity is None and f.content is None:
        return None
    beside = [(source, _identity(source)) for source, _ in job.sidecars]
    text = json.dumps(
        [f.shard.path, f.identity, f.content, job.keep.astype(np.uint8).tobytes().hex(), beside],
        default=list,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _identity(path: str):
    """A written output's identity: size, times and inode locally; size and ETag in a store."""
    return list(storage.path_identity(path) or ())


def _exists(path: str) -> bool:
    return storage.exists(path)


def same_input(f: ShardFeatures) -> bool:
    """Whether the input is still what its features were computed from (by its identity;
    an input known only by its bytes is checked while it is written)."""
    if f.identity is None:
        return True
    try:
        return input_identity(f.shard) == f.identity
    except DedupError:
        return False


def _unchanged(output: str, record: str, plan_digest: str | None) -> int | None:
    """The samples of an output shard an earlier run wrote from the same plan and nobody
    touched since (same identity): it is left as it is (bytes and mtime). None otherwise."""
    if plan_digest is None:
        return None
    try:
        mark = json.loads(read_file(record))
        if mark["plan"] != plan_digest or mark["output"] != _identity(output):
            return None
        if any(_identity(target) != identity for target, identity in mark.get("beside", [])):
            return None  # a carried sidecar was changed or removed
        return int(mark["samples"])
    except (OSError, ValueError, KeyError, TypeError, DedupError):
        return None


def preview_rows(p: Plan) -> np.ndarray:
    """Global rows the HTML report shows: the survivor and first copies of each of the
    largest clusters, and both sides of every calibration pair."""
    rows = [np.asarray([r for _, _, a, b, _ in p.calibration for r in (a, b)], dtype=np.int64)]
    rows.append(np.asarray([row for _, _, row in p.shown_matches], dtype=np.int64))
    shown = shown_clusters(p.clusters).column("cluster_id").to_numpy()
    if len(shown):
        members = np.flatnonzero(np.isin(p.cluster_id, shown))
        survivors = members[p.survivor[members] < 0]
        copies = members[p.survivor[members] >= 0]
        order = np.argsort(p.cluster_id[copies], kind="stable")
        copies = copies[order]
        starts = np.searchsorted(p.cluster_id[copies], p.cluster_id[copies], side="left")
        rank = np.arange(len(copies)) - starts
        rows += [survivors, copies[rank < SHOWN_MEMBERS - 1]]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def samples_part(job: FinishJob, f: pa.Table) -> pa.Table:
    """This shard's rows of samples.parquet, from its SAMPLE_COLUMNS `f`."""
    n = f.num_rows
    hexed = {
        name: pa.array(
            [None if v is None else v.hex() for v in f.column(name).to_pylist()], type=pa.string()
        )
        for name in ("digest", "phash")
    }
    return pa.table(
        {
            "shard": pa.array(
                [display_name(storage.absolute(job.features.shard.path))] * n, type=pa.string()
            ),
            "key": f.column("key"),
            "cluster_id": job.cluster_id,
            "cluster_size": job.cluster_size,
            "kept": job.keep,
            "reason": pa.array(np.array(REASONS, dtype=object)[job.reason], type=pa.string()),
            "duplicate_of": pa.array(job.duplicate_of, type=pa.string()),
            "duplicate_of_shard": pa.array(job.duplicate_of_shard, type=pa.string()),
            "reference": pa.array(job.reference[0], type=pa.string()),
            "reference_key": pa.array(job.reference[1], type=pa.string()),
            "reference_signal": pa.array(job.reference[2], type=pa.string()),
            "phash_distance": pa.array(job.phash_distance, mask=job.phash_distance == NO_DISTANCE),
            "clip_similarity": pa.array(job.clip_similarity, mask=np.isnan(job.clip_similarity)),
            "width": f.column("width"),
            "height": f.column("height"),
            "bytes": f.column("bytes"),
            "image_member": f.column("image_member"),
            "digest": hexed["digest"],
            "phash": hexed["phash"],
            **keep_columns(f),
        },
        schema=SAMPLES_SCHEMA,
    )


def keep_columns(f: pa.Table) -> dict[str, pa.Array]:
    """samples.parquet's keep features, from the feature store's (null without an image)."""
    content = f.column("content_pixels").to_numpy(zero_copy_only=False)
    area = pc.multiply(
        pc.cast(f.column("width"), pa.int64()), pc.cast(f.column("height"), pa.int64())
    ).to_numpy(zero_copy_only=False)
    content = np.asarray(content, dtype=np.float64)
    area = np.asarray(area, dtype=np.float64)
    unknown = np.isnan(content) | np.isnan(area) | (area <= 0)
    padding = np.where(unknown, 0.0, 1.0 - content / np.where(unknown, 1.0, area))
    overlay = [
        None if v is None else "+".join(n for bit, n in OVERLAY_NAMES.items() if v & bit)
        for v in f.column("overlay").to_pylist()
    ]
    quality = [None if v is None else quality_name(v) for v in f.column("quality").to_pylist()]
    return {
        "content_pixels": f.column("content_pixels"),
        "padding": pa.array(padding.astype(np.float32), mask=unknown),
        "overlay": pa.array(overlay, type=pa.string()),
        "quality": pa.array(quality, type=pa.string()),
        "noise": f.column("noise"),
        "level": f.column("level"),
        "contrast": f.column("contrast"),
        "chroma": f.column("chroma"),
        "keep_values": f.column("keep_values"),
    }


SAMPLE_COLUMNS = [
    "key",
    "width",
    "height",
    "bytes",
    "image_member",
    "digest",
    "phash",
    "content_pixels",
    "overlay",
    "quality",
    "noise",
    "level",
    "contrast",
    "chroma",
    "keep_values",
]


FINISH_COLUMNS = [*SAMPLE_COLUMNS, "member_names", "member_offsets", "member_sizes"]


def write_phase(
    features: list[ShardFeatures], p: Plan, job: Job, parts_dir: str, only=None
) -> list[Finished]:
    """Phase 3 over the shards (the positions in `only`, when given): each one's cleaned
    copy and its part of samples.parquet in `parts_dir`."""
    t = time.monotonic()
    finished = finish_all(features, p, job.out, parts_dir, job.dry_run, job.executor, only)
    same = sum(f.unchanged for f in finished)
    log.info(
        "phase write done in %.1f s: %s%s",
        time.monotonic() - t,
        counted(len(finished), "shard"),
        f", {same:,} of them unchanged since the last run (left as they were)" if same else "",
    )
    return finished
