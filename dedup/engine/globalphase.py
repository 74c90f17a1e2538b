"""Phase 2 as partitioned tasks: no task holds every sample's features.

Every step is a task over numbered parts that reads files and writes files (atomically),
run by the run's executor; a rerun redoes it whole. Rows are global: a shard's first row
follows the previous shard's last, so (shard, key) order is row order and every result
(edges, cluster ids, survivors) is the same whatever the partitioning, executor or
worker count.

1. scatter (per shard): a shard's candidate rows go into per-partition runs of fixed
   records: digests by digest prefix, pHash codes by a hash of the code, low-detail
   colour signatures and CLIP vectors to their own parts.
2. pairs (per partition): exact digests link to the first row with the same bytes;
   equal pHash codes link to their first row, whose distinct codes are routed onward;
   low-detail signatures and CLIP vectors are searched as before.
3. near (per pHash chunk and prefix): multi-index hashing, partitioned by chunk value.
   A code is within t bits of another only if some chunk of m is within r = t // m
   bits (pigeonhole). Part (c, q) holds the distinct codes whose chunk c starts with
   the k-bit prefix q; every code whose prefix is within r bits of q is sent there as a
   query and probes only values that start with q. A pair is reported once: by its
   first chunk within r bits, from its lower row.
4. components (the driver, from edges only): compact ids, union-find, components
   grouped into parts of about `partition_rows` rows.
5. members (per shard): the features of the rows in components, scattered by group.
6. resolve (per group): the star rule (engine.cluster.resolve) on whole components.

The driver holds, per sample, the decisions the write phase needs (see engine.plan.Plan),
and every edge while it forms components; the README gives the figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from dedup.core.config import Config
from dedup.core.progress import Progress
from dedup.engine.cluster import (
    Groups,
    calibration_from,
    calibration_sample,
    resolve,
)
from dedup.engine.grey import VerifyStats, verify_grey
from dedup.engine.pairtasks import (
    TINY_PARTS,
    Layout,
    NearTask,
    PairsTask,
    Scattered,
    ScatterTask,
    clip_cells,
    near_edges_name,
)
from dedup.engine.records import (
    gather,
    load_arrays,
    load_edges,
    member_record,
    members_candidates,
    plugin_codes,
    read_members,
    save_arrays,
    save_edges,
    write_runs,
)
from dedup.engine.rows import References, rows_by_shard
from dedup.executors.base import Executor
from dedup.io import storage
from dedup.search.pairs import (
    connected_components,
    gpu_count,
)
from dedup.signals.edges import BLOCKED, CLIP, NOT_ANCHOR, REFERENCE, VIEWS, Edges
from dedup.signals.views import (
    grey_zone,
)

log = logging.getLogger("dedup")


# ---------------------------------------------------------------- files of records


# ---------------------------------------------------------------- the layout


# ---------------------------------------------------------------- 1. scatter


# ---------------------------------------------------------------- 2. pairs


# ---------------------------------------------------------------- 3. near pHash pairs


# ---------------------------------------------------------------- 5. members, 6. resolve


@dataclass
class _Members:
    work: str
    dim: int
    groups: int
    views: bool = False
    plugins: tuple[str, ...] = ()  # `codes` plugins turned on
    keep_by: int = 0  # keep_by's JSON fields

    def __call__(self, item: tuple[int, str, int, np.ndarray, np.ndarray]):
        pos, path, start, local_rows, group = item
        records = read_members(
            path, start, local_rows, self.dim, self.views, self.plugins, self.keep_by
        )
        target = storage.join(self.work, f"members-{pos:08d}")
        return target, write_runs(target, records, group, self.groups)


@dataclass
class _Resolve:
    work: str
    config: Config
    dim: int
    runs: list[tuple[str, list[int]]]
    first_reference: int  # rows from here on are reference items
    blocked: np.ndarray  # sorted input rows a blocklist names

    def __call__(self, group: int) -> str:
        c = self.config
        dtype = member_record(self.dim, "views" in c.signal_names, plugin_codes(c), len(c.keep_by))
        records = gather(self.runs, dtype, group)
        rows = records["row"]
        e = load_edges(storage.join(self.work, f"group-edges-{group:06d}"))
        local = Edges(np.searchsorted(rows, e.i), np.searchsorted(rows, e.j), e.distance, e.signal)
        cand = members_candidates(records, self.config)
        cand.anchor = anchor_codes(rows, self.first_reference, self.blocked)
        result = resolve(cand, local, self.config)
        g = result.groups
        target = storage.join(self.work, f"resolved-{group:06d}")
        save_arrays(
            target,
            rows=rows,
            cluster_id=rows[result.cluster_id],
            cluster_size=result.cluster_size,
            survivor=rows[result.survivor],
            reason=result.reason,
            phash_distance=result.phash_distance,
            clip_similarity=result.clip_similarity,
            link=result.link,
            detached=result.detached,
            g_cluster_id=rows[g.cluster_id],
            g_size=g.size,
            g_survivor=rows[g.survivor],
            g_signals=g.signals,
            g_max_phash_distance=g.max_phash_distance,
            g_max_phash_distance_to_survivor=g.max_phash_distance_to_survivor,
            g_min_clip_similarity_to_survivor=g.min_clip_similarity_to_survivor,
            g_kept_by=g.kept_by,
            g_kept_value=g.kept_value,
            g_runner_value=g.runner_value,
            g_runner_up=np.where(g.runner_up >= 0, rows[np.maximum(g.runner_up, 0)], -1),
        )
        return target


def anchor_codes(rows: np.ndarray, first_reference: int, blocked: np.ndarray) -> np.ndarray:
    """The anchor code (cluster.REFERENCE, BLOCKED or NOT_ANCHOR) of sorted global rows."""
    out = np.full(len(rows), NOT_ANCHOR, dtype=np.int8)
    out[np.isin(rows, blocked)] = BLOCKED
    out[rows >= first_reference] = REFERENCE
    return out


# ---------------------------------------------------------------- the driver


@dataclass
class Resolved:
    """The global phase's outcome, over global rows."""

    candidate: np.ndarray  # bool per row
    reason: np.ndarray  # int8 per row: the status's index in `reasons` (-1: unknown)
    members: dict[str, np.ndarray] | None  # per row in a component: rows, cluster_id, ...
    groups: Groups | None  # clusters of two or more, by cluster id
    edges: Edges
    dim: int  # CLIP vector length, 0 without the signal
    stats: dict = field(default_factory=dict)  # the layout and each near part's load
    # The report's calibration pairs among the input's rows: (signal, side, row, row, value).
    calibration: list = field(default_factory=list)


def _describe_part(item) -> str:
    return f"global phase part {item}"


def run_global(
    paths: list[str],
    shard_starts: np.ndarray,
    config: Config,
    executor: Executor,
    work: str,
    reasons: tuple[str, ...],
    inputs: list | None = None,
    references: References | None = None,
    blocked: np.ndarray | None = None,
) -> Resolved:
    """Phase 2 over shards' feature files `paths`, whose first global rows are
    `shard_starts` (one more entry: the total); `work` is a folder (or prefix) for the
    phase's files. `inputs`: the shards themselves, which the views signal's grey zone
    reads images from (no verification without them). `references`: items searched with
    the input's rows, never linked to each other, never removed (anchors); `blocked`:
    sorted input rows a blocklist names, anchors too."""
    first_reference = int(shard_starts[-1])
    references = references or References(end=first_reference)
    blocked = np.zeros(0, np.int64) if blocked is None else blocked
    rows_total = first_reference + references.rows
    stats: dict = {"layout": None, "near": []}
    sources = [(path, int(shard_starts[pos])) for pos, path in enumerate(paths)]
    shard_items = [(pos, path, start, None) for pos, (path, start) in enumerate(sources)]
    shard_items += [
        (len(sources) + k, path, start, only)
        for k, ((path, start), only) in enumerate(
            zip(references.sources, references.only, strict=True)
        )
    ]
    sources = sources + references.sources
    if inputs is not None:
        inputs = list(inputs) + list(references.images)
    starts_all = np.asarray([start for _, start in sources] + [rows_total], dtype=np.int64)
    layout = Layout.of(rows_total, config)
    views_layout = Layout.of_views(rows_total, config)
    code_layouts = Layout.of_plugins(rows_total, config)
    grey = grey_zone(config, rows_total)
    stats["layout"] = layout
    centroids = clip_cells(sources, rows_total, config) if "clip" in config.signal_names else None
    cells = 1 if centroids is None else len(centroids)
    stats["clip_cells"] = cells
    scattered: list[Scattered] = executor.map(
        ScatterTask(work, config, layout, reasons, views_layout, centroids, code_layouts),
        shard_items,
        Progress("scatter", total_items=len(shard_items)),
        describe=_describe_part,
    )
    mine = scattered[: len(paths)]  # the input's; the references' rows are not decided
    reason = np.concatenate([s.reason for s in mine] or [np.zeros(0, np.int8)])
    candidate = np.concatenate([s.candidate for s in mine] or [np.zeros(0, bool)])
    runs = {
        kind: [s.runs[kind] for s in scattered if s.runs.get(kind)]
        for kind in ("exact", "phash", "flat", "tiny", "views", "clip", *code_layouts)
    }
    dim = max([s.dim for s in scattered] or [0])
    items = [("exact", p) for p in range(layout.parts) if runs["exact"]]
    items += [("phash", p) for p in range(layout.parts) if runs["phash"]]
    items += [("views", p) for p in range(views_layout.parts) if runs["views"]]
    items += [("flat", 0)] if runs["flat"] else []
    items += [("tiny", p) for p in range(TINY_PARTS) if runs["tiny"]]
    items += [("clip", p) for p in range(cells) if runs["clip"]]
    for name, lay in code_layouts.items():
        items += [(name, p) for p in range(lay.parts) if runs[name]]
    # FAISS on a GPU (faiss-gpu, a CUDA device) needs workers that start CUDA afresh.
    gpu_search = bool(runs["clip"]) and gpu_count(config.device) > 0
    executor.map(
        PairsTask(work, config, layout, runs, dim, cells, views_layout, code_layouts),
        items,
        Progress("pairs", total_items=len(items)),
        describe=_describe_part,
        cuda=gpu_search,
    )
    edge_files = [storage.join(work, f"edges-{kind}-{p:06d}") for kind, p in items]
    if runs["phash"]:
        buckets = list(range(layout.near_parts))
        stats["near"] = executor.map(
            NearTask(work, config, layout, layout.parts),
            buckets,
            Progress("near pairs", total_items=len(buckets)),
            describe=_describe_part,
        )
        edge_files += [storage.join(work, near_edges_name("phash", b)) for b in buckets]
    for name, lay in code_layouts.items():
        if runs[name]:
            buckets = list(range(lay.near_parts))
            stats[f"{name}_near"] = executor.map(
                NearTask(work, config, lay, lay.parts, name),
                buckets,
                Progress(f"{name} pairs", total_items=len(buckets)),
                describe=_describe_part,
            )
            edge_files += [storage.join(work, near_edges_name(name, b)) for b in buckets]
    grey_files = []
    if runs["views"]:
        buckets = list(range(views_layout.near_parts))
        stats["views_near"] = executor.map(
            NearTask(work, config, views_layout, views_layout.parts, "views", grey),
            buckets,
            Progress("view pairs", total_items=len(buckets)),
            describe=_describe_part,
        )
        edge_files += [storage.join(work, near_edges_name("views", b)) for b in buckets]
        if grey >= 0:
            grey_files = [storage.join(work, f"grey-{b:06d}") for b in buckets]
    edges = Edges.concat([load_edges(f) for f in edge_files])
    edges = _not_among_references(edges, first_reference)
    if cells > 1:  # a CLIP pair of vectors that share cells is found in each of them
        edges = _unique_edges(edges, CLIP)
    if runs["views"]:  # a pair of rows may match by several pairs of views
        edges = _unique_edges(edges, VIEWS)
    if "views" in config.signal_names and config.verify:
        stats["verify"] = VerifyStats().to_dict()
        if grey_files:
            verified, stats["verify"] = verify_grey(
                grey_files, edges, sources, inputs, starts_all, config, executor, first_reference
            )
            edges = Edges.concat([edges, verified])
        stats["verify"]["bound"] = grey
    members, groups = _components(
        edges, sources, config, executor, work, dim, first_reference, blocked
    )
    calibration = _calibration(paths, shard_starts, candidate, edges, dim, config)
    return Resolved(candidate, reason, members, groups, edges, dim, stats, calibration)


def _calibration(paths, shard_starts, candidate, edges: Edges, dim: int, config: Config) -> list:
    """The pairs the report shows per signal and threshold side, drawn from a sample of
    the input's candidate rows (reference items take no part)."""
    n = int(shard_starts[-1])
    candidate_rows = np.flatnonzero(candidate[:n])
    if not len(candidate_rows):
        return []
    sample_rows = candidate_rows[calibration_sample(len(candidate_rows))]
    parts = []
    for pos, at in rows_by_shard(shard_starts, sample_rows):
        start = int(shard_starts[pos])
        parts.append(read_members(paths[pos], start, sample_rows[at] - start, dim))
    sample = members_candidates(np.concatenate(parts), config)
    inside = (edges.i < n) & (edges.j < n)  # pairs of the input's own samples
    e = Edges(edges.i[inside], edges.j[inside], edges.distance[inside], edges.signal[inside])
    return calibration_from(e, config, sample, sample_rows)


def _not_among_references(edges: Edges, first_reference: int) -> Edges:
    """Edges but those joining two reference items: a reference set is never deduplicated
    by a run that matches against it."""
    keep = (edges.i < first_reference) | (edges.j < first_reference)
    if keep.all():
        return edges
    return Edges(edges.i[keep], edges.j[keep], edges.distance[keep], edges.signal[keep])


def _unique_edges(edges: Edges, signal: int) -> Edges:
    """One edge of `signal` per pair of rows (either way round): the shortest, then the
    first found."""
    of = np.flatnonzero(edges.signal == signal)
    lo = np.minimum(edges.i[of], edges.j[of])
    hi = np.maximum(edges.i[of], edges.j[of])
    order = np.lexsort((np.arange(len(of)), edges.distance[of], hi, lo))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (lo[order][1:] != lo[order][:-1]) | (hi[order][1:] != hi[order][:-1])
    keep = np.concatenate([np.flatnonzero(edges.signal != signal), of[order[first]]])
    keep.sort()
    return Edges(edges.i[keep], edges.j[keep], edges.distance[keep], edges.signal[keep])


def _components(
    edges: Edges,
    sources,
    config: Config,
    executor: Executor,
    work: str,
    dim: int,
    first_reference: int,
    blocked: np.ndarray,
):
    """Components from edges only (compact ids), grouped into parts of whole components;
    the members' features scattered by group; the star rule per group."""
    if not len(edges.i):
        return None, None
    # Compact ids: the rows that have an edge, numbered in row order (a mark per row and
    # a dense lookup: cheaper than sorting twice the edges).
    rows_total = sources[-1][1] + 1 if sources else 0
    rows_total = max(rows_total, int(max(edges.i.max(), edges.j.max())) + 1)
    seen = np.zeros(rows_total, dtype=bool)
    seen[edges.i] = True
    seen[edges.j] = True
    nodes = np.flatnonzero(seen)
    del seen
    lookup = np.full(rows_total, -1, dtype=np.int64)
    lookup[nodes] = np.arange(len(nodes))
    ci, cj = lookup[edges.i], lookup[edges.j]
    del lookup
    label = connected_components(len(nodes), ci, cj)
    del cj
    # Groups of whole components, each about partition_rows rows, in label order.
    sizes = np.bincount(label, minlength=len(nodes))
    comp_ids = np.flatnonzero(sizes)
    comp_group = np.cumsum(sizes[comp_ids]) // max(1, config.partition_rows)
    comp_group -= comp_group[0]
    _, comp_group = np.unique(comp_group, return_inverse=True)
    groups_count = int(comp_group.max()) + 1
    group_of_comp = np.zeros(len(nodes), dtype=np.int64)
    group_of_comp[comp_ids] = comp_group
    node_group = group_of_comp[label]
    # Each group's edges, in global rows.
    edge_group = node_group[ci]
    del ci
    by_group = np.argsort(edge_group, kind="stable")
    bounds = np.searchsorted(edge_group[by_group], np.arange(groups_count + 1))
    for g in range(groups_count):
        sel = by_group[bounds[g] : bounds[g + 1]]
        save_edges(
            storage.join(work, f"group-edges-{g:06d}"),
            Edges(edges.i[sel], edges.j[sel], edges.distance[sel], edges.signal[sel]),
        )
    member_items = []
    for pos, at in rows_by_shard([start for _, start in sources], nodes):
        path, start = sources[pos]
        member_items.append((pos, path, start, nodes[at] - start, node_group[at]))
    runs = executor.map(
        _Members(
            work,
            dim,
            groups_count,
            "views" in config.signal_names,
            plugin_codes(config),
            len(config.keep_by),
        ),
        member_items,
        Progress("members", total_items=len(member_items)),
        describe=_describe_part,
    )
    targets = executor.map(
        _Resolve(work, config, dim, runs, first_reference, blocked),
        list(range(groups_count)),
        Progress("resolve", total_items=groups_count),
        describe=_describe_part,
    )
    parts = [load_arrays(t) for t in targets]
    members = {
        name: np.concatenate([p[name] for p in parts])
        for name in (
            "rows",
            "cluster_id",
            "cluster_size",
            "survivor",
            "reason",
            "phash_distance",
            "clip_similarity",
            "link",
            "detached",
        )
    }
    g_cols = {
        name: np.concatenate([p["g_" + name] for p in parts])
        for name in (
            "cluster_id",
            "size",
            "survivor",
            "signals",
            "max_phash_distance",
            "max_phash_distance_to_survivor",
            "min_clip_similarity_to_survivor",
            "kept_by",
            "kept_value",
            "runner_value",
            "runner_up",
        )
    }
    order = np.argsort(g_cols["cluster_id"], kind="stable")
    groups = Groups(**{name: value[order] for name, value in g_cols.items()})
    return members, groups
