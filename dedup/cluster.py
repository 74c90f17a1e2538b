"""Phase 2: edges from every signal into one union-find; one survivor per cluster."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dedup.config import Config
from dedup.index import hamming_pairs, unique_codes
from dedup.signals.exact import exact_groups

NO_DISTANCE = -1
# What happened to a candidate row; Clusters.reason holds indices into this.
DECISIONS = ("unique", "kept", "exact", "phash")
UNIQUE, KEPT, EXACT_COPY, PHASH_COPY = range(4)
# Edge signals as small integers; a cluster's signals are a bit mask of these.
SIGNALS = ("exact", "phash")
EXACT, PHASH = 0, 1


@dataclass
class Candidates:
    """Global, input-ordered columns of the rows that took part (decoded images)."""

    pixels: np.ndarray  # int64 (N,)
    nbytes: np.ndarray  # int64 (N,)
    digest: np.ndarray  # uint8 (N, 32) image-byte digests
    phash: np.ndarray | None  # uint8 (N, 8), or None when the signal is off


@dataclass
class Edges:
    """Undirected links between candidate rows; `signal` says what linked them."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    signal: np.ndarray  # int8 index into SIGNALS

    @staticmethod
    def of(i, j, distance, signal: int) -> Edges:
        i = np.asarray(i, dtype=np.int64)
        return Edges(
            i,
            np.asarray(j, dtype=np.int64),
            np.asarray(distance, dtype=np.int32),
            np.full(len(i), signal, dtype=np.int8),
        )

    @staticmethod
    def concat(parts: list[Edges]) -> Edges:
        if not parts:
            return Edges.of([], [], [], 0)
        return Edges(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("i", "j", "distance", "signal")
            )
        )


@dataclass
class Groups:
    """Columns describing each cluster of two or more rows, in cluster-id order."""

    cluster_id: np.ndarray  # int64: the cluster's smallest row
    size: np.ndarray  # int64
    survivor: np.ndarray  # int64 row
    signals: np.ndarray  # int64 bit mask over SIGNALS
    max_distance: np.ndarray  # int32 largest pairwise pHash distance, NO_DISTANCE if none
    max_distance_to_survivor: np.ndarray  # int32, NO_DISTANCE if none

    def __len__(self) -> int:
        return len(self.cluster_id)

    def signal_names(self, k: int) -> list[str]:
        return [name for bit, name in enumerate(SIGNALS) if self.signals[k] >> bit & 1]


@dataclass
class Clusters:
    """Per candidate row: its cluster, the cluster's survivor, and why it was removed."""

    cluster_id: np.ndarray  # int64: smallest row of the cluster
    cluster_size: np.ndarray  # int64
    survivor: np.ndarray  # int64 row of the cluster's survivor
    reason: np.ndarray  # int8 index into DECISIONS
    phash_distance: np.ndarray  # int32 distance to the survivor, NO_DISTANCE when n/a
    groups: Groups


def exact_edges(digests: np.ndarray) -> Edges:
    """Each row with the same image bytes as an earlier row links to the first such row."""
    first, rows = exact_groups(digests)
    return Edges.of(first, rows, np.zeros(len(rows)), EXACT)


def phash_edges(codes: np.ndarray, threshold: int, workers: int = 1) -> Edges:
    """Rows within `threshold` bits: equal codes link to one representative row, and
    representatives of distinct codes link when their codes are close enough."""
    if len(codes) < 2:
        return Edges.concat([])
    unique, inverse = unique_codes(codes)
    rep = np.full(len(unique), -1, dtype=np.int64)
    # The representative of a code is its first row in input order.
    rows_desc = np.arange(len(codes) - 1, -1, -1)
    rep[inverse[rows_desc]] = rows_desc
    same = np.flatnonzero(rep[inverse] != np.arange(len(codes)))
    a, b, d = hamming_pairs(unique, threshold, workers=workers)
    return Edges.concat(
        [
            Edges.of(rep[inverse[same]], same, np.zeros(len(same)), PHASH),
            Edges.of(rep[a], rep[b], d, PHASH),
        ]
    )


def build_edges(cand: Candidates, config: Config) -> Edges:
    """Edges from every enabled signal."""
    parts = []
    if "exact" in config.signals:
        parts.append(exact_edges(cand.digest))
    if "phash" in config.signals and cand.phash is not None:
        parts.append(phash_edges(cand.phash, config.phash_threshold, config.worker_count))
    return Edges.concat(parts)


def cluster(cand: Candidates, config: Config) -> Clusters:
    """Connected components over all edges, a survivor per component, reasons per row."""
    n = len(cand.pixels)
    edges = build_edges(cand, config)
    rows = np.arange(n, dtype=np.int64)
    # A cluster's id is its first row in input order: stable across runs and engines.
    cluster_id = connected_components(n, edges.i, edges.j)
    size = np.bincount(cluster_id, minlength=n)[cluster_id] if n else rows

    survivor = _survivors(cluster_id, cand, config.keep)
    reason = np.full(n, UNIQUE, dtype=np.int8)
    in_cluster = size > 1
    reason[in_cluster] = PHASH_COPY
    reason[in_cluster & (survivor == rows)] = KEPT
    removed = in_cluster & (survivor != rows)
    if "exact" in config.signals:
        same_bytes = (cand.digest[removed] == cand.digest[survivor[removed]]).all(axis=1)
        reason[np.flatnonzero(removed)[same_bytes]] = EXACT_COPY
    distance = np.full(n, NO_DISTANCE, dtype=np.int32)
    words = None
    if cand.phash is not None:
        words = cand.phash.view(">u8").reshape(-1).astype(np.uint64)
        distance[removed] = np.bitwise_count(words[removed] ^ words[survivor[removed]])
    groups = _describe(cluster_id, size, survivor, distance, edges, words)
    return Clusters(cluster_id, size, survivor, reason, distance, groups)


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over edges (i, j), vectorized: each row's label is the smallest row of
    its component.

    Hook-and-compress: every edge points the larger of its two roots at the smaller,
    then paths are halved until every row points at a root; repeat until no edge joins
    two roots. A root only ever points lower, so the last root of a component is its
    smallest row.
    """
    parent = np.arange(n, dtype=np.int64)
    if len(i) == 0:
        return parent
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    while True:
        ri, rj = parent[i], parent[j]
        differ = ri != rj
        if not differ.any():
            return parent
        lo = np.minimum(ri[differ], rj[differ])
        hi = np.maximum(ri[differ], rj[differ])
        np.minimum.at(parent, hi, lo)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _survivors(cluster_id: np.ndarray, cand: Candidates, keep: str) -> np.ndarray:
    """The survivor row of each row's cluster, by the keep rule; ties go to input order."""
    n = len(cluster_id)
    rows = np.arange(n, dtype=np.int64)
    if keep == "largest":
        order = np.lexsort((rows, -cand.nbytes, -cand.pixels, cluster_id))
    else:  # first
        order = np.lexsort((rows, cluster_id))
    sorted_ids = cluster_id[order]
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    best = np.empty(n, dtype=np.int64)
    best[sorted_ids[is_first]] = order[is_first]
    return best[cluster_id]


def _describe(cluster_id, size, survivor, distance, edges: Edges, words) -> Groups:
    """Groups for every cluster of two or more rows, vectorized but for the diameter of
    clusters with three or more distinct codes."""
    n = len(cluster_id)
    ids = np.flatnonzero((cluster_id == np.arange(n)) & (size > 1))
    mask = np.zeros(n, dtype=np.int64)
    np.bitwise_or.at(mask, cluster_id[edges.i], np.int64(1) << edges.signal.astype(np.int64))
    to_survivor = np.full(n, NO_DISTANCE, dtype=np.int32)
    diameter = np.full(n, NO_DISTANCE, dtype=np.int32)
    if words is not None:
        np.maximum.at(to_survivor, cluster_id, np.maximum(distance, 0))
        diameter[ids] = to_survivor[ids]  # exact for clusters with at most two codes
        members = np.flatnonzero(size > 2)
        if len(members):
            order = members[np.argsort(cluster_id[members], kind="stable")]
            bounds = np.flatnonzero(np.diff(cluster_id[order])) + 1
            for group in np.split(order, bounds):
                codes = np.unique(words[group])
                if len(codes) > 2:
                    diameter[cluster_id[group[0]]] = _diameter(codes)
    return Groups(ids, size[ids], survivor[ids], mask[ids], diameter[ids], to_survivor[ids])


def _diameter(words: np.ndarray, chunk: int = 2048) -> int:
    """Largest pairwise Hamming distance among distinct 64-bit codes, in chunks."""
    best = 0
    for start in range(0, len(words), chunk):
        block = words[start : start + chunk]
        best = max(best, int(np.bitwise_count(block[:, None] ^ words[None, :]).max()))
    return best
