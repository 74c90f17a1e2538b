"""extract (per shard) -> cluster (global) -> write (per shard), and the run that chains them."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup import signals
from dedup.core.config import AUTO, WITHOUT_CLIP, Config
from dedup.core.errors import ConfigError, DedupError, ModelError, OutputError, ShardError
from dedup.core.progress import Progress
from dedup.engine.blocklist import Blocklist, load_blocklist, match_blocklists
from dedup.engine.cluster import (
    DECISIONS,
    NO_DISTANCE,
    Edges,
    Groups,
    calibration_from,
    calibration_sample,
)
from dedup.engine.extract import (
    PASSTHROUGH_REASONS,
    STATUS_OK,
    ShardFeatures,
    extract_shard,
    file_identity,
    input_identity,
    read_features,
)
from dedup.engine.globalphase import (
    References,
    Resolved,
    members_candidates,
    read_members,
    rows_by_shard,
    run_global,
)
from dedup.engine.references import (
    Reference,
    ReferenceError_,
    Source,
    check_stored,
    resolve_references,
    status_counts,
    usable_rows,
)
from dedup.engine.thumbs import read_previews
from dedup.engine.write import WRITE_COLUMNS, write_shard
from dedup.executors.local import Executor, LocalExecutor, check_stop, make_executor
from dedup.io import storage
from dedup.io.fsutil import read_file, scratch_dir, write_atomic
from dedup.io.outdir import (
    CANARIES_DIR,
    GLOBAL_DIR,
    PARTS_DIR,
    REFERENCES_DIR,
    STATE_DIR,
    WRITTEN_DIR,
    claim_output,
    feature_store,
    remove_output,
)
from dedup.io.shards import (
    SPOOL_DIR,
    FileGroup,
    Shard,
    display_name,
    list_shards,
    raw_name,
    remove_spool,
    shard_size,
    sidecars,
)
from dedup.report.html import (
    CALIBRATION_SCHEMA,
    MATCHES_SCHEMA,
    PREVIEWS_SCHEMA,
    SHOWN_MEMBERS,
    shown_clusters,
)
from dedup.report.html import render as render_html
from dedup.report.tables import (
    CLUSTERS_SCHEMA,
    LARGEST_CLUSTERS,
    SAMPLES_SCHEMA,
    merge_parts,
    package_versions,
    report_paths,
    size_histogram,
    write_summary,
    write_table,
)

log = logging.getLogger("dedup")

REPORT_DIR = "dedup-report"
DRY_RUN_REPORT_DIR = "dedup-report-dry-run"  # a dry run's, beside a real run's report


# ---------------------------------------------------------------- phases


@dataclass
class BadShard:
    """A shard left out under --skip-bad-shards, and why."""

    shard: Shard
    error: str
    identity: tuple | None = None  # the input's identity when it failed, where known


def choose_signals(config: Config) -> tuple[Config, Any]:
    """The config with `signals: auto` made concrete, and the resolved CLIP spec (None
    without CLIP). Auto takes CLIP when it can run here (torch and open_clip installed,
    the weights found, the device there) and says in one log line why not otherwise;
    CLIP asked for by name fails fast instead (exit 6), as does a CLIP model or checkpoint
    named in the settings that cannot be loaded."""
    if config.signals != AUTO:
        return config, resolve_clip(config)
    full = dataclasses.replace(config, signals=(*WITHOUT_CLIP, "clip"))
    try:
        return full, resolve_clip(full)
    except ModelError as e:
        default = Config()
        named = (config.clip_model, config.clip_pretrained) != (
            default.clip_model,
            default.clip_pretrained,
        )
        if named and "needs torch" not in str(e):
            raise
        log.info(
            "clip: off, %s. Signals %s. To turn CLIP on: pip install 'dedup-wds[clip]' and "
            "give its weights (--clip-pretrained PATH, or the open_clip cache)",
            str(e).removeprefix("clip: ").split(";")[0].split(": pip")[0],
            ",".join(WITHOUT_CLIP),
        )
        return dataclasses.replace(config, signals=WITHOUT_CLIP), None


def resolve_clip(config: Config):
    """The CLIP weights and device for this run, found before any work starts (a missing
    checkpoint ends the run in seconds, with the remedies); None without the signal."""
    if "clip" not in config.signal_names:
        return None
    from dedup.signals.clip import pick_device, resolve
    from dedup.signals.clipstage import device_decodes

    spec = resolve(config.clip_model, config.clip_pretrained)
    device = pick_device(config.device)
    decode = config.clip_decode
    if decode == "auto":
        decode = "device" if device.startswith("cuda") else "pillow"
    if decode == "device" and not device_decodes(spec):
        log.info("clip: %s's input (%s) is prepared with Pillow", spec.model, spec.pixels)
        decode = "pillow"
    # What else the vectors depend on: where JPEGs are decoded, by what, and the kind of
    # device (fp16 on a GPU, fp32 on a CPU).
    import torchvision

    from dedup.signals.clipstage import DEVICE_MAX_PIXELS

    route = f"decode={decode} torchvision={torchvision.__version__}"
    if decode == "device":
        route += f" device_max_pixels={DEVICE_MAX_PIXELS}"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    spec = dataclasses.replace(
        spec, decode=decode, fingerprint=f"{spec.fingerprint} {route} {kind}"
    )
    log.info(
        "clip: %s from %s on %s, JPEGs decoded by %s", spec.model, spec.checkpoint, device, decode
    )
    return spec


def extract_all(
    shards: list[Shard],
    config: Config,
    store: str,
    skip_bad_shards: bool = False,
    clip=None,
    executor: Executor | None = None,
    spool: str | None = None,
) -> list[ShardFeatures | BadShard]:
    """Phase 1 over every shard; with `skip_bad_shards`, a damaged shard becomes a BadShard
    instead of ending the run. `clip` is the resolved spec when the clip signal is on.
    `spool`: the folder where each pipe: input's output is kept, its command run once
    (see spool_folder); without it a pipe: input is read again by each later phase."""
    executor = executor or LocalExecutor(config.worker_count)
    total = sum(shard_size(s) for s in shards)
    progress = Progress("extract", total_bytes=total)
    if clip is None:
        task = _Extract(config, store, skip_bad_shards, spool=spool)
        return executor.map(task, shards, progress, _shard_path)
    from dedup.signals.clip import stage_devices

    devices = stage_devices(config.device)
    on_gpu = devices[0].startswith("cuda")
    if config.clip_stage == "inline" or (config.clip_stage == "auto" and not on_gpu):
        task = _Extract(config, store, skip_bad_shards, clip, spool=spool)
        return executor.map(task, shards, progress, _shard_path, cuda=on_gpu)
    # One stage per device owns the model; the readers never touch the GPU themselves.
    with executor.clip_stages(clip, devices) as stages:
        log.info("clip: one shared stage on each of %s", ", ".join(devices))
        task = _Extract(config, store, skip_bad_shards, clip, tuple(stages), spool)
        return executor.map(task, shards, progress, _shard_path)


def _shard_path(shard: Shard) -> str:
    return shard.path


@dataclass
class _Extract:
    config: Config
    store: str
    skip_bad_shards: bool
    clip: Any = None  # a resolved ClipSpec when the clip signal is on
    stages: tuple = ()  # shared CLIP stages; shards are spread over them by name
    spool: str | None = None  # where pipe: inputs are kept, read once (see spool_folder)

    def __call__(self, shard: Shard) -> ShardFeatures | BadShard:
        stage = None
        if self.stages:
            stage = self.stages[zlib.crc32(raw_name(shard.name)) % len(self.stages)]
        try:
            return extract_shard(shard, self.config, self.store, self.clip, stage, self.spool)
        except ShardError as e:
            if not self.skip_bad_shards:
                raise
            try:
                identity = input_identity(shard)
            except DedupError:
                identity = None
            return BadShard(shard, str(e), identity)


@dataclass
class Plan:
    """Phase 2's decisions, one entry per sample in input order, as plain arrays.

    Only what clustering needs is held for every sample (a few tens of bytes each);
    keys and other text stay in the feature store until a per-shard job writes them.
    """

    shard_starts: np.ndarray  # int64 (shards + 1,): first global row of each shard
    keep: np.ndarray  # bool: the sample goes to the output
    passthrough: np.ndarray  # bool: no usable image; copied untouched, counted by reason
    cluster_id: np.ndarray  # int64 global row of the cluster's first sample
    cluster_size: np.ndarray  # int64
    reason: np.ndarray  # int8 index into REASONS
    survivor: np.ndarray  # int64 global row of the survivor; -1 unless removed
    phash_distance: np.ndarray  # int32 distance to the survivor, NO_DISTANCE if none
    clip_similarity: np.ndarray  # float32 cosine to the survivor, NaN if none
    clusters: pa.Table  # clusters.parquet rows
    calibration: list = field(default_factory=list)  # (signal, side, row, row, value)
    verify: dict | None = None  # the views signal's verification tier, for the summary
    # The signal linking each removed row to its survivor (a DECISIONS code; UNIQUE for
    # the others): a reference or blocklist match says which signal found it.
    link: np.ndarray | None = None
    # Rows a blocklist names: global row -> (blocklist label, entry).
    blocked: dict = field(default_factory=dict)
    # Matches the HTML report shows per reference: (label, "closest"/"farthest", row).
    shown_matches: list = field(default_factory=list)

    def rows(self, shard: int) -> slice:
        return slice(int(self.shard_starts[shard]), int(self.shard_starts[shard + 1]))

    def blocked_in(self, rows: slice) -> list[int]:
        """Global rows in `rows` that a blocklist names."""
        if not self.blocked:
            return []
        ordered = np.fromiter(sorted(self.blocked), dtype=np.int64, count=len(self.blocked))
        lo, hi = np.searchsorted(ordered, [rows.start, rows.stop])
        return ordered[lo:hi].tolist()


# Reasons in samples.parquet: decisions, then pass-through statuses from phase 1.
REASONS = (*DECISIONS, *PASSTHROUGH_REASONS)


def plan(
    features: list[ShardFeatures],
    config: Config,
    executor: Executor | None = None,
    work: str | None = None,
    references: list[Reference] | None = None,
    blocklists: list[Blocklist] | None = None,
) -> Plan:
    """Phase 2: cluster every decoded image of every shard; decide each sample's fate.
    The work runs as partitioned tasks (dedup.engine.globalphase) with their files in `work`
    (a fresh temporary folder when None). `references` (resolved, extracted) are matched
    against; `blocklists` name samples to remove."""
    counts = [f.rows for f in features]
    shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    executor = executor or LocalExecutor(config.worker_count)
    refs = _reference_rows(references or [], int(shard_starts[-1]))
    b_rows, b_which, b_entry = match_blocklists(
        blocklists or [], features, shard_starts, config, executor
    )
    blocked = {
        int(row): (blocklists[int(b)].label, blocklists[int(b)].entries[int(e)])
        for row, b, e in zip(b_rows.tolist(), b_which.tolist(), b_entry.tolist(), strict=True)
    }
    with _work_folder(work) as folder:
        r = run_global(
            [f.path for f in features],
            shard_starts,
            config,
            executor,
            folder,
            REASONS,
            [f.shard for f in features],
            refs,
            b_rows,
        )
        p = _assemble(features, config, shard_starts, r, references or [], blocked)
    p.blocked = blocked
    p.keep[b_rows] = False
    p.reason[b_rows] = REASONS.index("blocklist")
    p.shown_matches = shown_matches(p, references or [])
    return p


SHOWN_MATCHES = 6  # per reference: the closest and the farthest matches in the report


def shown_matches(p: Plan, references: list[Reference]) -> list[tuple[str, str, int]]:
    """(reference label, side, row) of each reference's SHOWN_MATCHES closest and farthest
    matches: by pHash distance to the item (exact and low-detail matches count as 0), then
    CLIP similarity, then row."""
    rows = np.flatnonzero(p.reason == REASONS.index("reference"))
    if not len(rows):
        return []
    refs = _reference_rows(references, len(p.keep))
    starts = np.asarray([start for _, start in refs.sources], dtype=np.int64)
    owner = np.asarray([k for k, ref in enumerate(references) for _ in ref.sources])
    of_row = owner[np.searchsorted(starts, p.survivor[rows], side="right") - 1]
    distance = np.maximum(p.phash_distance[rows], 0)
    similarity = np.nan_to_num(p.clip_similarity[rows], nan=1.0)
    out = []
    for k, ref in enumerate(references):
        mine = np.flatnonzero(of_row == k)
        order = mine[np.lexsort((rows[mine], -similarity[mine], distance[mine]))]
        closest = order[:SHOWN_MATCHES]
        farthest = [x for x in order[::-1][:SHOWN_MATCHES] if x not in set(closest.tolist())]
        out += [(ref.label, "closest", int(rows[x])) for x in closest]
        out += [(ref.label, "farthest", int(rows[x])) for x in farthest]
    return out


def _reference_rows(references: list[Reference], first: int) -> References:
    """The references' sources as global rows after the input's `first` rows."""
    out = References(end=first)
    for ref in references:
        for source in ref.sources:
            out.sources.append((source.features.path, out.end))
            out.only.append(source.only)
            out.images.append(source.images)
            out.end += source.features.rows
    return out


@contextlib.contextmanager
def _work_folder(work: str | None):
    """`work`, emptied before and removed after; or a temporary folder."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="dedup-global-") as folder:
            yield folder
        return
    _remove_tree(work)
    try:
        yield work
    finally:
        _remove_tree(work)


def _remove_tree(path: str) -> None:
    if storage.is_url(path):
        fs = storage.filesystem(path)
        if storage.retry(lambda: fs.exists(path), path):
            storage.retry(lambda: fs.rm(path, recursive=True), path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _assemble(
    features,
    config: Config,
    shard_starts: np.ndarray,
    r: Resolved,
    references=(),
    blocked: dict | None = None,
) -> Plan:
    """The Plan from the global phase's outcome (rows past the input's are reference
    items: only ever survivors, never decided on)."""
    n = int(shard_starts[-1])
    candidate = r.candidate
    reason = r.reason.copy()
    if (reason[~candidate] < len(DECISIONS)).any():
        raise DedupError("the feature store holds an unknown status; rerun with --overwrite")
    reason[candidate] = DECISIONS.index("unique")
    keep = np.ones(n, dtype=bool)
    cluster_id = np.arange(n, dtype=np.int64)
    cluster_size = np.ones(n, dtype=np.int64)
    survivor = np.full(n, -1, dtype=np.int64)
    phash_distance = np.full(n, NO_DISTANCE, dtype=np.int32)
    clip_similarity = np.full(n, np.nan, dtype=np.float32)
    link = np.zeros(n, dtype=np.int8)
    if r.members is not None:
        mine = r.members["rows"] < n
        m = {name: value[mine] for name, value in r.members.items()}
        rows = m["rows"]
        cluster_id[rows] = m["cluster_id"]
        cluster_size[rows] = m["cluster_size"]
        reason[rows] = m["reason"]
        removed = m["survivor"] != rows
        keep[rows[removed]] = False
        survivor[rows[removed]] = m["survivor"][removed]
        phash_distance[rows] = m["phash_distance"]
        clip_similarity[rows] = m["clip_similarity"]
        link[rows] = m["link"]
    candidate_rows = np.flatnonzero(candidate)
    calibration = []
    if len(candidate_rows):
        sample_rows = candidate_rows[calibration_sample(len(candidate_rows))]
        sample = members_candidates(_read_rows(features, shard_starts, sample_rows, r.dim), config)
        e = r.edges
        inside = (e.i < n) & (e.j < n)  # pairs of the input's own samples
        e = Edges(e.i[inside], e.j[inside], e.distance[inside], e.signal[inside])
        calibration = calibration_from(e, config, sample, sample_rows)
    clusters = _clusters_table(features, shard_starts, r.groups, references, blocked or {})
    return Plan(
        shard_starts,
        keep,
        ~candidate,
        cluster_id,
        cluster_size,
        reason,
        survivor,
        phash_distance,
        clip_similarity,
        clusters,
        calibration,
        r.stats.get("verify"),
        link,
    )


def _read_rows(features, shard_starts, rows: np.ndarray, dim: int) -> np.ndarray:
    """Member records of sorted global `rows`, read shard by shard."""
    parts = []
    for pos, at in rows_by_shard(shard_starts, rows):
        start = int(shard_starts[pos])
        local = rows[at] - start
        parts.append(read_members(features[pos].path, start, local, dim))
    return np.concatenate(parts)


def keys_at(features, shard_starts, rows: np.ndarray) -> tuple[list, list]:
    """(shard path, key) of global rows, reading only the key column of their shards."""
    rows = np.asarray(rows, dtype=np.int64)
    shard_of = np.searchsorted(shard_starts, rows, side="right") - 1
    keys = np.empty(len(rows), dtype=object)
    for pos in np.unique(shard_of).tolist():
        at = np.flatnonzero(shard_of == pos)
        column = read_features(features[pos].path, ["key"]).column("key")
        keys[at] = column.take(pa.array(rows[at] - shard_starts[pos])).to_pylist()
    paths = [display_name(features[pos].shard.path) for pos in shard_of.tolist()]
    return paths, keys.tolist()


def identities(features, shard_starts, references, rows: np.ndarray):
    """(shard, key, reference, reference_key) of global rows; rows past the input's are
    reference items (shard: a folder's path for its files), the others have no reference."""
    n = int(shard_starts[-1])
    all_features = list(features)
    starts = list(np.asarray(shard_starts[:-1]).tolist())
    owner = []
    end = n
    for ref in references:
        for source in ref.sources:
            all_features.append(source.features)
            starts.append(end)
            owner.append(ref)
            end += source.features.rows
    rows = np.asarray(rows, dtype=np.int64)
    paths, keys = keys_at(all_features, np.asarray([*starts, end], dtype=np.int64), rows)
    labels, ref_keys = [None] * len(rows), [None] * len(rows)
    if len(rows) and rows.max() >= n:
        pos_of = np.searchsorted(np.asarray(starts), rows, side="right") - 1
        for k in np.flatnonzero(rows >= n).tolist():
            pos = int(pos_of[k])
            ref, shard = owner[pos - len(features)], all_features[pos].shard
            labels[k] = ref.label
            ref_keys[k] = ref.key_of(shard, keys[k])
            if isinstance(shard, FileGroup):
                paths[k] = display_name(shard.root)
    return paths, keys, labels, ref_keys


def _clusters_table(
    features, shard_starts, groups: Groups | None, references=(), blocked=None
) -> pa.Table:
    """One row per cluster of two or more, in cluster-id order (groups over global rows);
    a cluster whose survivor is a reference item or a blocklisted sample names it."""
    if groups is None or not len(groups):
        return CLUSTERS_SCHEMA.empty_table()
    paths, keys, labels, ref_keys = identities(features, shard_starts, references, groups.survivor)
    for k, row in enumerate(groups.survivor.tolist()):
        if blocked and row in blocked:
            labels[k], ref_keys[k] = blocked[row]
    return pa.table(
        {
            "cluster_id": groups.cluster_id,
            "size": groups.size,
            "survivor_shard": pa.array(paths, type=pa.string()),
            "survivor_key": pa.array(keys, type=pa.string()),
            "signals": [groups.signal_names(k) for k in range(len(groups))],
            "max_phash_distance": pa.array(
                groups.max_phash_distance, mask=groups.max_phash_distance == NO_DISTANCE
            ),
            "max_phash_distance_to_survivor": pa.array(
                groups.max_phash_distance_to_survivor,
                mask=groups.max_phash_distance_to_survivor == NO_DISTANCE,
            ),
            "min_clip_similarity_to_survivor": pa.array(
                groups.min_clip_similarity_to_survivor,
                mask=np.isnan(groups.min_clip_similarity_to_survivor),
            ),
            "reference": pa.array(labels, type=pa.string()),
            "reference_key": pa.array(ref_keys, type=pa.string()),
        },
        schema=CLUSTERS_SCHEMA,
    )


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
            ref[k], ref_key[k] = p.blocked[row]
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
    return executor.map(
        _finish, jobs, Progress("write", total_items=total), describe=_job_shard_path
    )


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
        if not unchanged:
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
                write_atomic(record, json.dumps(mark, sort_keys=True).encode())
    write_table(samples_part(job, f.select(SAMPLE_COLUMNS)), job.part)
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
    if storage.is_url(path):
        return list(storage.identity(path) or ())
    return list(file_identity(os.stat(path)))


def _exists(path: str) -> bool:
    return storage.exists(path) if storage.is_url(path) else os.path.exists(path)


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
            "shard": pa.array([display_name(job.features.shard.path)] * n, type=pa.string()),
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
        },
        schema=SAMPLES_SCHEMA,
    )


SAMPLE_COLUMNS = ["key", "width", "height", "bytes", "image_member", "digest", "phash"]
FINISH_COLUMNS = [*SAMPLE_COLUMNS, "member_names", "member_offsets", "member_sizes"]


# ---------------------------------------------------------------- run


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
    config, clip = choose_signals(config)
    report_dir = _report_dir(out, report_dir, dry_run)
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
        job = _Job(
            out, store, config, executor, dry_run, skip_bad_shards, clip, references, blocklists
        )
        try:
            return report_into(report_dir, lambda folder: _run(shards, job, folder), scratch)
        finally:  # a pipe: input's bytes are this run's only: never kept past it
            discard_spool(out)


def report_into(report_dir: str, make, scratch: str | None = None) -> dict[str, Any]:
    """`make(folder)` writes the report into a folder and returns the summary. A report in
    a store is made in a local folder, then put object by object, summary.json last:
    whoever sees the summary sees a complete report."""
    if not storage.is_url(report_dir):
        return make(report_dir)
    with tempfile.TemporaryDirectory(dir=scratch) as staging:
        summary = make(staging)
        summary["output"]["report"] = report_dir
        write_summary(summary, report_paths(staging)["summary"])
        for name in sorted(os.listdir(staging), key=lambda n: n == "summary.json"):
            if os.path.isfile(os.path.join(staging, name)):
                storage.put_file(os.path.join(staging, name), storage.join(report_dir, name))
        return summary


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


@dataclass
class _Job:
    """What every phase of one run shares."""

    out: str
    store: str
    config: Config
    executor: Executor
    dry_run: bool
    skip_bad_shards: bool
    clip: Any
    references: list[Reference] = field(default_factory=list)
    blocklists: list[Blocklist] = field(default_factory=list)


def reference_store(out: str) -> str:
    """Where the features of --against shard sets and folders are kept (inside OUT)."""
    return storage.join(storage.join(out, STATE_DIR), REFERENCES_DIR)


def spool_folder(out: str) -> str:
    """Where a run keeps its pipe: inputs' bytes, read once, until it ends: inside OUT's
    state (every node of a cluster reads OUT), never at a final path in OUT."""
    return storage.join(storage.join(out, STATE_DIR), SPOOL_DIR)


def discard_spool(out: str) -> None:
    """Delete the run's copies of its pipe: inputs (spool_folder) once nothing reads them
    again. A failure to is logged, never hides how the run ended; the next run into OUT
    removes what is left."""
    try:
        remove_spool(spool_folder(out))
    except DedupError as e:
        log.warning("could not remove the copies of this run's pipe: inputs: %s", e)


def extract_references(references: list[Reference], job: _Job) -> list[BadShard]:
    """Features of the shard sets and folders among `references` (reused when current);
    a REF left with no usable image is a ReferenceError_."""
    bad = []
    for ref in references:
        if ref.shards and not ref.sources:
            done = extract_all(
                ref.shards,
                job.config,
                ref.store,
                job.skip_bad_shards,
                job.clip,
                job.executor,
                spool_folder(job.out),
            )
            for result in done:
                if isinstance(result, BadShard):
                    bad.append(result)
                else:
                    ref.sources.append(Source(result, None, result.shard))
        if not any(usable_rows(source) for source in ref.sources):
            raise ReferenceError_(f"--against {ref.label}: holds no usable images")
    return bad


def _run(shards: list[Shard], job: _Job, report_dir: str) -> dict[str, Any]:
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
    with _work_folder(parts_dir):
        finished = write_phase(features, the_plan, job, parts_dir)
        t3 = time.monotonic()
        planted = canary_phase(features, job)
        seconds = {"extract": t1 - t0, "cluster": t2 - t1, "write": t3 - t2}
        if planted is not None:
            seconds["canaries"] = time.monotonic() - t3
        return make_report(
            features, bad, the_plan, finished, job, report_dir, parts_dir, seconds, planted
        )


def canary_phase(features: list[ShardFeatures], job: _Job) -> dict | None:
    """--canaries N: the run's own recall per signal and edit, on N planted copies of its
    samples (in OUT/.dedup/canaries while measured; never written to OUT, never part of
    a decision); None without canaries."""
    if not job.config.canaries:
        return None
    from dedup.commands.calibrate import run_canaries

    t = time.monotonic()
    folder = storage.join(storage.join(job.out, STATE_DIR), CANARIES_DIR)
    with _work_folder(folder):
        result = run_canaries(features, job.config, job.clip, job.executor, folder)
    log.info(
        "canaries: %d planted, %d caught (%s), in %.1f s",
        result["planted"],
        result.get("caught", 0),
        "none" if result.get("recall") is None else f"{100 * result['recall']:.0f}%",
        time.monotonic() - t,
    )
    return result


def extract_phase(shards: list[Shard], job: _Job) -> tuple[list[ShardFeatures], list[BadShard]]:
    """Phase 1 over `shards`: their features, and the bad shards left out (whose earlier
    outputs are removed: they no longer reflect the input)."""
    extracted = extract_all(
        shards,
        job.config,
        job.store,
        job.skip_bad_shards,
        job.clip,
        job.executor,
        spool_folder(job.out),
    )
    bad = [r for r in extracted if isinstance(r, BadShard)]
    for b in bad:
        log.warning("skipped bad shard: %s", b.error)
        if not job.dry_run:
            remove_output(storage.join(job.out, b.shard.name))
    return [r for r in extracted if isinstance(r, ShardFeatures)], bad


def log_extract(features: list[ShardFeatures], seconds: float) -> None:
    reused = sum(f.reused for f in features)
    log.info(
        "phase extract done in %.1f s: %d shards, %d samples%s",
        seconds,
        len(features),
        sum(f.rows for f in features),
        f" ({reused} shards' stored features reused)" if reused else "",
    )


def cluster_phase(features: list[ShardFeatures], job: _Job) -> Plan:
    """Phase 2: the plan, from every shard's features (and the references)."""
    t = time.monotonic()
    work = storage.join(storage.join(job.out, STATE_DIR), GLOBAL_DIR)
    the_plan = plan(features, job.config, job.executor, work, job.references, job.blocklists)
    log.info(
        "phase cluster done in %.1f s: %d clusters of 2 or more, %d samples to remove",
        time.monotonic() - t,
        the_plan.clusters.num_rows,
        int((~the_plan.keep).sum()),
    )
    return the_plan


def write_phase(
    features: list[ShardFeatures], p: Plan, job: _Job, parts_dir: str, only=None
) -> list[Finished]:
    """Phase 3 over the shards (the positions in `only`, when given): each one's cleaned
    copy and its part of samples.parquet in `parts_dir`."""
    t = time.monotonic()
    finished = finish_all(features, p, job.out, parts_dir, job.dry_run, job.executor, only)
    same = sum(f.unchanged for f in finished)
    log.info(
        "phase write done in %.1f s: %d shards%s",
        time.monotonic() - t,
        len(finished),
        f", {same} of them unchanged since the last run (left as they were)" if same else "",
    )
    return finished


def make_report(
    features,
    bad,
    the_plan: Plan,
    finished,
    job: _Job,
    report_dir,
    parts_dir,
    seconds,
    canaries: dict | None = None,
) -> dict[str, Any]:
    """The report from the phases' results: samples.parquet merged from the write tasks'
    parts, the counts checked, clusters, previews, summary.json, report.html."""
    merge_parts(
        [storage.join(parts_dir, f"{k:08d}.parquet") for k in range(len(features))],
        report_paths(report_dir)["samples"],
    )
    shard_counts = _check_counts(features, the_plan, finished, job.dry_run)
    n = len(the_plan.keep)
    phases = {
        "extract": _phase(seconds["extract"], n),
        "cluster": _phase(seconds["cluster"], int((~the_plan.passthrough).sum())),
        "write": _phase(seconds["write"], n),
    }
    if "canaries" in seconds:
        phases["canaries"] = _phase(seconds["canaries"], (canaries or {}).get("planted", 0))
    paths = report_paths(report_dir)
    write_table(the_plan.clusters, paths["clusters"])
    _write_report_extras(features, the_plan, finished, report_dir, job.references)
    summary = _summary(
        features, the_plan, shard_counts, job.config, phases, job.out, report_dir, job.dry_run
    )
    summary["output"]["state_dir"] = absolute(job.store)
    if job.references or job.blocklists:
        summary["references"] = match_counts(the_plan, job.references, job.blocklists)
    if canaries is not None:
        summary["canaries"] = canaries
    summary["skipped_shards"] = [{"shard": b.shard.path, "error": b.error} for b in bad]
    check_stop()  # a stop signal that came while the report was made still stops the run
    write_summary(summary, paths["summary"])
    render_html(report_dir)
    return summary


def _write_report_extras(
    features, p: Plan, finished: list[Finished], report_dir: str, references=()
) -> None:
    """previews.parquet (thumbnails and captions of the shown samples and reference
    items), calibration.parquet, and matches.parquet when there are references."""
    shard_col, key_col, thumb_col, cap_col = [], [], [], []
    for done in finished:
        for key, thumb, cap in done.previews:
            shard_col.append(display_name(done.shard_path))
            key_col.append(key)
            thumb_col.append(thumb)
            cap_col.append(cap)
    if references:
        matches, items = _matches_table(features, p, references)
        write_table(matches, os.path.join(report_dir, "matches.parquet"))
        for shard, key, thumb, cap in items:
            shard_col.append(shard)
            key_col.append(key)
            thumb_col.append(thumb)
            cap_col.append(cap)
    else:  # a matches.parquet of an earlier run with references no longer applies
        remove_output(os.path.join(report_dir, "matches.parquet"))
    write_table(
        pa.table(
            {"shard": shard_col, "key": key_col, "thumbnail": thumb_col, "caption": cap_col},
            schema=PREVIEWS_SCHEMA,
        ),
        os.path.join(report_dir, "previews.parquet"),
    )
    cal = p.calibration
    rows_a = np.array([c[2] for c in cal], dtype=np.int64)
    rows_b = np.array([c[3] for c in cal], dtype=np.int64)
    shards_a, keys_a = keys_at(features, p.shard_starts, rows_a)
    shards_b, keys_b = keys_at(features, p.shard_starts, rows_b)
    write_table(
        pa.table(
            {
                "signal": [c[0] for c in cal],
                "side": [c[1] for c in cal],
                "value": [float(c[4]) for c in cal],
                "shard_a": shards_a,
                "key_a": keys_a,
                "shard_b": shards_b,
                "key_b": keys_b,
            },
            schema=CALIBRATION_SCHEMA,
        ),
        os.path.join(report_dir, "calibration.parquet"),
    )


def match_counts(p: Plan, references: list[Reference], blocklists: list[Blocklist]) -> dict:
    """summary.json's references section: per REF and blocklist, what it held and how
    many input samples it removed, by the signal that matched."""
    n = len(p.keep)
    refs = _reference_rows(references, n)
    owner = [ref for ref in references for _ in ref.sources]
    starts = np.asarray([start for _, start in refs.sources], dtype=np.int64)
    matched = {id(ref): Counter() for ref in references}
    by_list: dict[str, Counter] = {b.label: Counter() for b in blocklists}
    names = np.array(DECISIONS, dtype=object)
    for row in np.flatnonzero(p.reason == REASONS.index("reference")).tolist():
        at = int(np.searchsorted(starts, p.survivor[row], side="right")) - 1
        matched[id(owner[at])][names[p.link[row]]] += 1
    for row in np.flatnonzero(p.reason == REASONS.index("blocklist")).tolist():
        if row in p.blocked:
            label, entry = p.blocked[row]
            by_list[label]["phash" if entry.startswith("phash:") else "exact"] += 1
        else:  # a copy of a blocklisted sample
            label = p.blocked[int(p.survivor[row])][0]
            by_list[label][names[p.link[row]]] += 1
    out = {"against": [], "blocklists": []}
    for ref in references:
        statuses: Counter = Counter()
        for source in ref.sources:
            statuses.update(status_counts(source))
        usable = statuses.pop(STATUS_OK, 0)
        out["against"].append(
            {
                "reference": ref.label,
                "kind": ref.kind,
                "items": usable + sum(statuses.values()),
                "usable": usable,
                "skipped_by_reason": dict(sorted(statuses.items())),
                "matched": sum(matched[id(ref)].values()),
                "matched_by_signal": dict(sorted(matched[id(ref)].items())),
            }
        )
    for b in blocklists:
        out["blocklists"].append(
            {
                "blocklist": b.label,
                **b.counts(),
                "matched": sum(by_list[b.label].values()),
                "matched_by_signal": dict(sorted(by_list[b.label].items())),
            }
        )
    return out


def _matches_table(features, p: Plan, references: list[Reference]):
    """matches.parquet (the shown matches of each reference), and the previews of the
    reference items in them: (shard, key, thumbnail, caption)."""
    shown = p.shown_matches
    rows = np.asarray([row for _, _, row in shown], dtype=np.int64)
    items = p.survivor[rows] if len(rows) else np.zeros(0, np.int64)
    paths, keys = keys_at(features, p.shard_starts, rows)
    r_paths, r_keys, _, ref_keys = identities(features, p.shard_starts, references, items)
    names = np.array(DECISIONS, dtype=object)
    table = pa.table(
        {
            "reference": [label for label, _, _ in shown],
            "side": [side for _, side, _ in shown],
            "signal": [names[p.link[row]] for row in rows.tolist()],
            "phash_distance": pa.array(
                p.phash_distance[rows], mask=p.phash_distance[rows] == NO_DISTANCE
            ),
            "clip_similarity": pa.array(
                p.clip_similarity[rows], mask=np.isnan(p.clip_similarity[rows])
            ),
            "shard": paths,
            "key": keys,
            "reference_shard": r_paths,
            "reference_item": r_keys,
            "reference_key": ref_keys,
        },
        schema=MATCHES_SCHEMA,
    )
    # The items' thumbnails, read from where their images are (none for a stored index
    # whose images are gone).
    refs = _reference_rows(references, len(p.keep))
    starts = np.asarray([start for _, start in refs.sources], dtype=np.int64)
    sources = [source for ref in references for source in ref.sources]
    previews = {}
    wanted = np.unique(items)
    for pos, at in rows_by_shard(starts, wanted):
        source = sources[pos]
        if source.images is None:
            continue
        local = (wanted[at] - starts[pos]).tolist()
        f = read_features(
            source.features.path, ["member_names", "member_offsets", "member_sizes", "image_member"]
        )
        found = read_previews(
            source.images,
            local,
            f.column("member_names").to_pylist(),
            f.column("member_offsets").to_pylist(),
            f.column("member_sizes").to_pylist(),
            f.column("image_member").to_pylist(),
        )
        for global_row, (_, thumb, cap) in zip(wanted[at].tolist(), found, strict=True):
            previews[global_row] = (thumb, cap)
    out, seen = [], set()
    for k, row in enumerate(items.tolist()):
        if row in previews and row not in seen:
            seen.add(row)
            out.append((r_paths[k], r_keys[k], *previews[row]))
    return table, out


def absolute(path: str) -> str:
    """A path for summary.json: a URL as it is, a local path made absolute (never
    relative to the caller's working directory)."""
    return path if storage.is_url(path) else os.path.abspath(path)


def _phase(seconds: float, items: int) -> dict[str, float]:
    return {
        "seconds": round(seconds, 3),
        "images_per_second": round(items / seconds, 1) if seconds > 0 else 0.0,
    }


def _check_counts(features, p: Plan, finished, dry_run) -> list[dict[str, Any]]:
    """Samples in = kept + removed + passthrough, per shard; the writer agrees. Else fail."""
    out = []
    for pos, f in enumerate(features):
        rows = p.rows(pos)
        samples = rows.stop - rows.start
        passthrough = int(p.passthrough[rows].sum())
        removed = int((~p.keep[rows]).sum())
        kept = int((p.keep[rows] & ~p.passthrough[rows]).sum())
        if samples != kept + removed + passthrough or samples != f.rows:
            raise DedupError(
                f"{f.shard.path}: sample counts do not add up "
                f"({samples} != {kept} + {removed} + {passthrough})"
            )
        if not dry_run and finished[pos].samples_written != kept + passthrough:
            raise DedupError(
                f"{f.shard.path}: wrote {finished[pos].samples_written} samples, "
                f"expected {kept + passthrough}"
            )
        out.append(
            {
                "shard": f.shard.path,
                "output": None if finished[pos].output is None else absolute(finished[pos].output),
                "samples": samples,
                "kept": kept,
                "removed": removed,
                "passthrough": passthrough,
                "skipped_members": f.skipped_members,
                "features_reused": f.reused,
                "output_unchanged": finished[pos].unchanged,
            }
        )
    return out


def _summary(
    features, p: Plan, shard_counts, config: Config, phases, out, report_dir, dry_run
) -> dict[str, Any]:
    names = np.array(REASONS, dtype=object)
    removed_by = Counter(names[p.reason[~p.keep]].tolist())
    passthrough_by = Counter(names[p.reason[p.passthrough]].tolist())
    clusters = p.clusters
    sizes = clusters.column("size").to_numpy()
    largest = np.lexsort((clusters.column("cluster_id").to_numpy(), -sizes))[:LARGEST_CLUSTERS]
    largest_rows = clusters.take(pa.array(largest, type=pa.int64())).to_pylist()
    skipped, routes = Counter(), Counter()
    for f in features:
        skipped.update(f.skipped_members)
        routes.update(f.clip_decode)
    return {
        "counts": {
            "samples": int(len(p.keep)),
            "kept": int(sum(c["kept"] for c in shard_counts)),
            "removed": int((~p.keep).sum()),
            "passthrough": int(p.passthrough.sum()),
            "removed_by_reason": dict(sorted(removed_by.items())),
            "passthrough_by_reason": dict(sorted(passthrough_by.items())),
            "skipped_members": dict(sorted(skipped.items())),
            # images embedded, by where they were decoded (see README: CLIP on a GPU)
            **(
                {"clip_decode": dict(sorted(routes.items()))}
                if "clip" in config.signal_names
                else {}
            ),
            # the views signal's grey zone: pairs checked by local features (README)
            **({"verify": p.verify} if p.verify is not None else {}),
        },
        "clusters": {
            "count": clusters.num_rows,
            "size_histogram": size_histogram(sizes),
            "largest": largest_rows,
        },
        "thresholds": signals.thresholds(config)
        | ({"verify": p.verify["bound"]} if p.verify is not None else {}),
        "digest": config.exact_digest,
        "config": config.to_dict(),
        "versions": package_versions(),
        "phases": phases,
        "shards": shard_counts,
        "output": {"dir": absolute(out), "report": absolute(report_dir), "dry_run": dry_run},
    }


# ---------------------------------------------------------------- dedup index


def build_index(refs: list[str], out: str, config: Config, overwrite: bool = False) -> dict:
    """`dedup index REF... --out INDEX`: the features of every REF (shard sets, image
    folders, earlier OUTs, stores, other indexes) in one folder with a manifest of the
    settings and versions they were computed with; `--against INDEX` then decodes
    nothing. Returns the manifest."""
    from dedup.engine.references import INDEX_FILE, INDEX_FORMAT

    if storage.is_url(out):
        raise ConfigError(f"--out {out}: an index is written to a local folder")
    foreign = os.path.isdir(out) and not os.path.isfile(os.path.join(out, INDEX_FILE))
    if foreign and os.listdir(out) and not overwrite:
        raise OutputError(f"{out}: not empty and not a dedup index (--overwrite to use it)")
    config, clip = choose_signals(config)
    features_root = os.path.join(out, "features")
    references = resolve_references(refs, config, features_root, [], out)
    check_stored(references, config, clip)
    os.makedirs(features_root, exist_ok=True)
    manifest_path = os.path.join(out, INDEX_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an index being rebuilt is no index until it is done
    try:
        with make_executor(config.executor, config.worker_count, config.ray_address) as executor:
            job = _Job(out, features_root, config, executor, False, False, clip)
            bad = extract_references(references, job)
    finally:  # pipe: references were read once into the index's spool; not kept
        discard_spool(out)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(out, STATE_DIR))
    if bad:
        raise ShardError(bad[0].shard.path, bad[0].error)
    entries = []
    for ref in references:
        folder = ref.store or os.path.join(features_root, _store_name(ref.label))
        os.makedirs(folder, exist_ok=True)
        for k, source in enumerate(ref.sources):
            path = source.features.path
            if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
                # stored elsewhere (an earlier run, a store, another index): copied in
                target = os.path.join(folder, f"{k:06d}.parquet")
                for suffix in ("", ".done"):
                    shutil.copyfile(path + suffix, target + suffix + ".tmp")
                    os.replace(target + suffix + ".tmp", target + suffix)
                path = target
            only = None
            if source.only is not None:
                only = os.path.join(folder, f"{k:06d}.rows.npy")
                np.save(only, np.asarray(source.only, dtype=np.int64))
            shard = source.features.shard
            entries.append(
                {
                    "reference": ref.label,
                    "kind": "files" if isinstance(shard, FileGroup) else "shard",
                    "shard": shard.path,
                    "location": os.path.abspath(shard.root)
                    if isinstance(shard, FileGroup)
                    else (None if source.images is None else source.images.path),
                    "features": os.path.relpath(path, out),
                    "rows": source.features.rows,
                    "only": None if only is None else os.path.relpath(only, out),
                }
            )
    manifest = {
        "format": INDEX_FORMAT,
        "tool": "dedup",
        "feature_fingerprint": config.feature_fingerprint(),
        "clip": None if clip is None else clip.fingerprint,
        "config": config.to_dict(),
        "versions": package_versions(),
        "references": [r.label for r in references],
        "items": sum(usable_rows(s) for r in references for s in r.sources),
        "sources": entries,
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _store_name(label: str) -> str:
    import hashlib

    return hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16]
