"""Phase 2: edges from every signal into one union-find; one survivor per cluster."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

from dedup.config import Config
from dedup.index import hamming_pairs, unique_codes
from dedup.signals.exact import exact_groups
from dedup.signals.phash import hamming

NO_DISTANCE = -1


@dataclass
class Candidates:
    """Global, input-ordered columns of the rows that took part (decoded images)."""

    pixels: np.ndarray  # int64 (N,)
    nbytes: np.ndarray  # int64 (N,)
    sha256: list[bytes]  # N digests
    phash: np.ndarray | None  # uint8 (N, 8), or None when the signal is off


@dataclass
class Edges:
    """Undirected links between candidate rows; `signal` names what linked them."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    signal: np.ndarray  # object array of signal names

    @staticmethod
    def concat(parts: list[Edges]) -> Edges:
        if not parts:
            empty = np.zeros(0, dtype=np.int64)
            return Edges(empty, empty, empty.astype(np.int32), np.zeros(0, dtype=object))
        return Edges(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("i", "j", "distance", "signal")
            )
        )


@dataclass
class Clusters:
    """Per candidate row: its cluster, the cluster's survivor, and why it was removed."""

    cluster_id: np.ndarray  # int64: smallest row of the cluster
    cluster_size: np.ndarray  # int64
    survivor: np.ndarray  # int64 row of the cluster's survivor
    reason: np.ndarray  # object: unique | kept | exact | phash
    phash_distance: np.ndarray  # int32 distance to the survivor, NO_DISTANCE when n/a
    groups: list[ClusterInfo]


@dataclass
class ClusterInfo:
    """A cluster of two or more rows."""

    cluster_id: int
    size: int
    survivor: int
    members: np.ndarray
    signals: list[str]
    max_distance: int | None
    max_distance_to_survivor: int | None


def exact_edges(sha256: list[bytes]) -> Edges:
    """Each row with the same image bytes as an earlier row links to the first such row."""
    parts = []
    for rows in exact_groups(sha256):
        parts.append(_star(rows, "exact"))
    return Edges.concat(parts)


def phash_edges(codes: np.ndarray, threshold: int) -> Edges:
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
    parts = [
        Edges(
            rep[inverse[same]],
            same,
            np.zeros(len(same), dtype=np.int32),
            np.full(len(same), "phash", dtype=object),
        )
    ]
    a, b, d = hamming_pairs(unique, threshold)
    parts.append(Edges(rep[a], rep[b], d, np.full(len(a), "phash", dtype=object)))
    return Edges.concat(parts)


def _star(rows: np.ndarray, signal: str) -> Edges:
    n = len(rows) - 1
    return Edges(
        np.full(n, rows[0]), rows[1:], np.zeros(n, dtype=np.int32), np.full(n, signal, dtype=object)
    )


def build_edges(cand: Candidates, config: Config) -> Edges:
    """Edges from every enabled signal."""
    parts = []
    if "exact" in config.signals:
        parts.append(exact_edges(cand.sha256))
    if "phash" in config.signals and cand.phash is not None:
        parts.append(phash_edges(cand.phash, config.phash_threshold))
    return Edges.concat(parts)


def cluster(cand: Candidates, config: Config) -> Clusters:
    """Connected components over all edges, a survivor per component, reasons per row."""
    n = len(cand.pixels)
    edges = build_edges(cand, config)
    graph = scipy.sparse.coo_matrix(
        (np.ones(len(edges.i), dtype=np.int8), (edges.i, edges.j)), shape=(n, n)
    )
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    rows = np.arange(n, dtype=np.int64)
    # A cluster's id is its first row in input order: stable across runs and engines.
    cluster_id = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(cluster_id, labels, rows)
    cluster_id = cluster_id[labels]
    size = np.bincount(cluster_id, minlength=n)[cluster_id] if n else rows

    survivor = _survivors(cluster_id, cand, config.keep)
    reason = np.full(n, "unique", dtype=object)
    in_cluster = size > 1
    reason[in_cluster] = "phash"
    reason[in_cluster & (survivor == rows)] = "kept"
    removed = in_cluster & (survivor != rows)
    if "exact" in config.signals:
        same_bytes = np.array(
            [
                cand.sha256[r] == cand.sha256[s]
                for r, s in zip(rows[removed], survivor[removed], strict=True)
            ],
            dtype=bool,
        )
        reason[np.flatnonzero(removed)[same_bytes]] = "exact"
    distance = np.full(n, NO_DISTANCE, dtype=np.int32)
    if cand.phash is not None:
        distance[removed] = hamming(cand.phash[removed], cand.phash[survivor[removed]])
    groups = _describe(cluster_id, survivor, distance, edges, cand)
    return Clusters(cluster_id, size, survivor, reason, distance, groups)


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


def _describe(cluster_id, survivor, distance, edges: Edges, cand: Candidates) -> list[ClusterInfo]:
    """A ClusterInfo for each cluster of two or more rows, in cluster-id order."""
    order = np.argsort(cluster_id, kind="stable")
    ids = cluster_id[order]
    bounds = np.flatnonzero(np.diff(ids)) + 1
    edge_cluster = cluster_id[edges.i]
    signals_of: dict[int, set[str]] = {}
    for cid, sig in zip(edge_cluster.tolist(), edges.signal.tolist(), strict=True):
        signals_of.setdefault(cid, set()).add(sig)
    groups = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        cid = int(cluster_id[members[0]])
        surv = int(survivor[members[0]])
        max_d = max_to_s = None
        if cand.phash is not None:
            max_d = _diameter(cand.phash[members])
            max_to_s = int(distance[members].max(initial=0))
        groups.append(
            ClusterInfo(
                cid, len(members), surv, members, sorted(signals_of.get(cid, ())), max_d, max_to_s
            )
        )
    return groups


def _diameter(codes: np.ndarray, chunk: int = 1024) -> int:
    """Largest pairwise Hamming distance among `codes`, over distinct codes, in chunks."""
    unique = np.unique(codes, axis=0)
    best = 0
    for start in range(0, len(unique), chunk):
        block = unique[start : start + chunk]
        best = max(best, int(hamming(block[:, None, :], unique[None, :, :]).max()))
    return best
