"""Phase 2's outcome as a plan: each sample's fate, its cluster and survivor, the
clusters table; and the identities of global rows."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dedup.core.config import Config
from dedup.core.errors import DedupError
from dedup.core.progress import counted
from dedup.engine.blocklist import Blocklist, match_blocklists
from dedup.engine.cluster import Groups
from dedup.engine.extract import PASSTHROUGH_REASONS, ShardFeatures
from dedup.engine.featurestore import read_features
from dedup.engine.globalphase import Resolved, run_global
from dedup.engine.job import Job
from dedup.engine.ranking import kept_because
from dedup.engine.references import (
    Reference,
)
from dedup.engine.rows import reference_rows, source_of, starts_of
from dedup.engine.tables import (
    CLUSTERS_SCHEMA,
)
from dedup.executors import Executor, LocalExecutor
from dedup.io import storage
from dedup.io.outdir import (
    GLOBAL_DIR,
    STATE_DIR,
)
from dedup.io.shards import (
    FileGroup,
    display_name,
)
from dedup.signals.edges import DECISIONS, NO_DISTANCE

log = logging.getLogger("dedup")


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
    # bool per row: alone in its cluster although a signal links it to another row (the
    # star rule left it apart from the survivor of the rows it links to)
    detached: np.ndarray | None = None

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
    shard_starts = starts_of(counts)
    executor = executor or LocalExecutor(config.worker_count)
    refs = reference_rows(references or [], int(shard_starts[-1]))
    b_rows, b_which, b_entry = match_blocklists(
        blocklists or [], features, shard_starts, config, executor
    )
    blocked = {
        int(row): (blocklists[int(b)].label, blocklists[int(b)].entries[int(e)])
        for row, b, e in zip(b_rows.tolist(), b_which.tolist(), b_entry.tolist(), strict=True)
    }
    with work_folder(work) as folder:
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
    refs = reference_rows(references, len(p.keep))
    starts = np.asarray([start for _, start in refs.sources], dtype=np.int64)
    owner = np.asarray([k for k, ref in enumerate(references) for _ in ref.sources])
    of_row = owner[source_of(starts, p.survivor[rows])]
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


@contextlib.contextmanager
def work_folder(work: str | None):
    """`work`, emptied before and removed after; or a temporary folder."""
    if work is None:
        with tempfile.TemporaryDirectory(prefix="dedup-global-") as folder:
            yield folder
        return
    storage.remove_tree(work)
    try:
        yield work
    finally:
        storage.remove_tree(work)


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
    detached = np.zeros(n, dtype=bool)
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
        detached[rows] = m["detached"]
    clusters = _clusters_table(features, shard_starts, r.groups, config, references, blocked or {})
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
        r.calibration,
        r.stats.get("verify"),
        link,
        detached=detached,
    )


def keys_at(features, shard_starts, rows: np.ndarray) -> tuple[list, list]:
    """(shard path, key) of global rows, reading only the key column of their shards."""
    rows = np.asarray(rows, dtype=np.int64)
    shard_of = source_of(shard_starts, rows)
    keys = np.empty(len(rows), dtype=object)
    for pos in np.unique(shard_of).tolist():
        at = np.flatnonzero(shard_of == pos)
        column = read_features(features[pos].path, ["key"]).column("key")
        keys[at] = column.take(pa.array(rows[at] - shard_starts[pos])).to_pylist()
    # as summary.json names them: absolute (a URL as it is), so the tables join with it
    paths = [display_name(storage.absolute(features[pos].shard.path)) for pos in shard_of.tolist()]
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
        pos_of = source_of(starts, rows)
        for k in np.flatnonzero(rows >= n).tolist():
            pos = int(pos_of[k])
            ref, shard = owner[pos - len(features)], all_features[pos].shard
            labels[k] = storage.absolute(ref.label)
            ref_keys[k] = ref.key_of(shard, keys[k])
            if isinstance(shard, FileGroup):
                paths[k] = display_name(storage.absolute(shard.root))
    return paths, keys, labels, ref_keys


def _clusters_table(
    features, shard_starts, groups: Groups | None, config: Config, references=(), blocked=None
) -> pa.Table:
    """One row per cluster of two or more, in cluster-id order (groups over global rows);
    a cluster whose survivor is a reference item or a blocklisted sample names it."""
    if groups is None or not len(groups):
        return CLUSTERS_SCHEMA.empty_table()
    paths, keys, labels, ref_keys = identities(features, shard_starts, references, groups.survivor)
    for k, row in enumerate(groups.survivor.tolist()):
        if blocked and row in blocked:
            labels[k], ref_keys[k] = storage.absolute(blocked[row][0]), blocked[row][1]
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
            **kept_because(groups, config),
        },
        schema=CLUSTERS_SCHEMA,
    )


def cluster_phase(features: list[ShardFeatures], job: Job) -> Plan:
    """Phase 2: the plan, from every shard's features (and the references)."""
    t = time.monotonic()
    work = storage.join(storage.join(job.out, STATE_DIR), GLOBAL_DIR)
    the_plan = plan(features, job.config, job.executor, work, job.references, job.blocklists)
    log.info(
        "phase cluster done in %.1f s: %s of 2 or more, %s to remove",
        time.monotonic() - t,
        counted(the_plan.clusters.num_rows, "cluster"),
        counted(int((~the_plan.keep).sum()), "sample"),
    )
    return the_plan
