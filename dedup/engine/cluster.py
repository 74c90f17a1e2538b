"""Phase 2's clusters: edges from every signal into components, the star rule's one
survivor per cluster, reasons per row, and the pairs the report's calibration shows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dedup.core.config import Config
from dedup.engine.ranking import content_scale, link_degree, rank, typical_features, why
from dedup.search.kernels import cluster_diameters, star_claims, undirected_csr
from dedup.search.pairs import connected_components, cosine_pairs, hamming_pairs, unique_codes
from dedup.signals.edges import (
    BLOCKED,
    BLOCKLISTED,
    CLIP,
    GROUPS_OF,
    LINKS_ONLY,
    NO_DISTANCE,
    NOT_ANCHOR,
    PHASH,
    PRECEDENCE,
    RANK_DECISION,
    REFERENCE,
    REFERENCE_COPY,
    SIGNALS,
    SURVIVOR,
    UNIQUE,
    Candidates,
    Edges,
    build_edges,
    cosine_of_rows,
    direct_links,
)


@dataclass
class Groups:
    """Columns describing each cluster of two or more rows, in cluster-id order."""

    cluster_id: np.ndarray  # int64: the cluster's smallest row
    size: np.ndarray  # int64
    survivor: np.ndarray  # int64 row
    signals: np.ndarray  # int64 bit mask over SIGNALS
    max_phash_distance: np.ndarray  # int32 largest pairwise pHash distance, NO_DISTANCE if none
    max_phash_distance_to_survivor: np.ndarray  # int32, NO_DISTANCE if none
    min_clip_similarity_to_survivor: np.ndarray  # float32 cosine, NaN without clip
    # Why the survivor won (engine.ranking.why): the deciding criterion, an index into
    # ranking.because_names(config), the survivor's and the runner-up's values there,
    # and the runner-up row (the best removed member)
    kept_by: np.ndarray | None = None  # int8
    kept_value: np.ndarray | None = None  # float64
    runner_value: np.ndarray | None = None  # float64
    runner_up: np.ndarray | None = None  # int64 row

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
    clip_similarity: np.ndarray  # float32 cosine to the survivor, NaN when n/a
    groups: Groups
    calibration: list = field(default_factory=list)  # (signal, side, row, row, value)
    # bool per row: alone in its cluster although some signal links it to another row
    detached: np.ndarray | None = None
    link: np.ndarray | None = None  # int8 DECISIONS code: the signal that links a removed


def cluster(cand: Candidates, config: Config) -> Clusters:
    """Clusters over the edges of all signals, a survivor per cluster, reasons per row.

    `cluster_rule: components` takes connected components as they are. `star` (the
    default) then keeps in a cluster only the rows linked directly to its survivor by
    some signal; the others are clustered again among themselves, round after round, so
    a chain of near-duplicates never removes a picture unlike the one that is kept.
    """
    edges = build_edges(cand, config)
    result = resolve(cand, edges, config)
    result.calibration = calibration_pairs(cand, config, edges)
    return result


def resolve(cand: Candidates, edges: Edges, config: Config) -> Clusters:
    """Clusters, survivors and reasons from given edges (row indices into `cand`); the
    star rule's rounds and every other step work per connected component, so the rows
    of any set of whole components can be resolved apart from the rest."""
    n = len(cand.pixels)
    rows = np.arange(n, dtype=np.int64)
    links = link_degree(edges, n, typical_features(cand), cand.overlay, content_scale(cand))
    ranking = rank(cand, config, links)
    anchored = cand.anchors() != NOT_ANCHOR
    order = ranking.lexsort([~anchored], rows)  # anchors first, then the keep policy
    if config.cluster_rule == "components":
        cluster_id = connected_components(n, edges.i, edges.j)
        survivor = _survivors(cluster_id, order)
    else:
        survivor = star_survivors(cand, edges, order)
        # A cluster's id is its first row in input order: stable across runs and engines.
        first = np.full(n, n, dtype=np.int64)
        np.minimum.at(first, survivor, rows)
        cluster_id = first[survivor]
    size = np.bincount(cluster_id, minlength=n)[cluster_id] if n else rows

    reason = np.full(n, UNIQUE, dtype=np.int8)
    in_cluster = size > 1
    reason[in_cluster & (survivor == rows)] = SURVIVOR
    removed = np.flatnonzero(in_cluster & (survivor != rows))
    link = direct_links(removed, survivor[removed], cand, config, edges)
    if (link == UNIQUE).any():  # components rule: linked through a chain only
        link[link == UNIQUE] = _strongest_incident(edges, removed[link == UNIQUE])
    reason[removed] = link
    # A copy of a reference item or of a blocklisted sample is removed for that reason
    # (`link` keeps the signal); a blocklisted sample itself too.
    anchor = cand.anchors()
    reason[removed[anchor[survivor[removed]] == REFERENCE]] = REFERENCE_COPY
    reason[removed[anchor[survivor[removed]] == BLOCKED]] = BLOCKLISTED
    reason[anchor == BLOCKED] = BLOCKLISTED
    links = np.full(n, UNIQUE, dtype=np.int8)
    links[removed] = link
    distance = np.full(n, NO_DISTANCE, dtype=np.int32)
    words = None
    # A pHash distance means something between two detailed images only.
    low = cand.low_detail()
    hashed = ~low & ~low[survivor]
    if cand.phash is not None:
        words = cand.phash.view(">u8").reshape(-1).astype(np.uint64)
        measured = removed[hashed[removed]]
        distance[measured] = np.bitwise_count(words[measured] ^ words[survivor[measured]])
    similarity = np.full(n, np.nan, dtype=np.float32)
    if cand.clip is not None:
        similarity[removed] = cosine_of_rows(cand.clip, removed, survivor[removed])
    groups = _describe(cluster_id, size, survivor, distance, similarity, edges, words, hashed)
    groups.kept_by, groups.kept_value, groups.runner_value, groups.runner_up = why(
        ranking, survivor, order, anchored, groups.survivor
    )
    linked = np.zeros(n, dtype=bool)
    linked[edges.i] = linked[edges.j] = True
    return Clusters(
        cluster_id,
        size,
        survivor,
        reason,
        distance,
        similarity,
        groups,
        detached=linked & (size == 1),
        link=links,
    )


CALIBRATION_PAIRS = 6  # per signal and side of its threshold
CALIBRATION_SAMPLE = 20_000  # rows searched for pairs just outside a threshold


def calibration_sample(n: int) -> np.ndarray:
    """The candidate ordinals (sorted) searched for pairs just outside a threshold."""
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(n, size=min(n, CALIBRATION_SAMPLE), replace=False))


def calibration_pairs(cand: Candidates, config: Config, edges: Edges) -> list[tuple]:
    """Pairs just inside and just outside each threshold, for a person to judge it:
    (signal, "inside" | "outside", row a, row b, distance or similarity)."""
    sample = calibration_sample(len(cand.pixels))
    return calibration_from(edges, config, cand.take(sample), sample)


def calibration_from(
    edges: Edges, config: Config, sample: Candidates, sample_rows: np.ndarray
) -> list[tuple]:
    """`calibration_pairs` from the run's edges and the sampled candidates (`sample`,
    whose rows are `sample_rows` in the edges' numbering)."""
    out: list[tuple] = []
    if "phash" in config.signal_names and sample.phash is not None:
        t = config.phash_threshold
        inside = (edges.signal == PHASH) & (edges.distance > 0)
        order = np.lexsort((edges.j[inside], edges.i[inside], -edges.distance[inside]))
        for k in order[:CALIBRATION_PAIRS]:
            out.append(
                (
                    "phash",
                    "inside",
                    int(edges.i[inside][k]),
                    int(edges.j[inside][k]),
                    float(edges.distance[inside][k]),
                )
            )
        # Distinct codes only (their first rows): a repeated picture is one pair, not many.
        # Low-detail rows take no part: their codes are noise.
        pool = np.flatnonzero(~sample.low_detail())
        unique, inverse = unique_codes(sample.phash[pool])
        rep = np.full(len(unique), len(pool), dtype=np.int64)
        np.minimum.at(rep, inverse, np.arange(len(pool)))
        a, b, d = hamming_pairs(unique, min(t + 8, 32))
        beyond = d > t
        a, b, d = rep[a[beyond]], rep[b[beyond]], d[beyond]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        order = np.lexsort((hi, lo, d))[:CALIBRATION_PAIRS]
        out += [
            (
                "phash",
                "outside",
                int(sample_rows[pool[lo[k]]]),
                int(sample_rows[pool[hi[k]]]),
                float(d[k]),
            )
            for k in order
        ]
    if "clip" in config.signal_names and sample.clip is not None:
        t = config.clip_threshold
        sims = 1.0 - edges.distance / 1e6
        inside = (edges.signal == CLIP) & (sims < 0.9999)
        order = np.lexsort((edges.j[inside], edges.i[inside], sims[inside]))
        for k in order[:CALIBRATION_PAIRS]:
            out.append(
                (
                    "clip",
                    "inside",
                    int(edges.i[inside][k]),
                    int(edges.j[inside][k]),
                    round(float(sims[inside][k]), 4),
                )
            )
        a, b, s = cosine_pairs(sample.clip[:5000], max(t - 0.1, 0.0), engine="flat")
        below = s < np.float32(t)
        order = np.lexsort((b[below], a[below], -s[below]))[:CALIBRATION_PAIRS]
        out += [
            (
                "clip",
                "outside",
                int(sample_rows[a[below][k]]),
                int(sample_rows[b[below][k]]),
                round(float(s[below][k]), 4),
            )
            for k in order
        ]
    return out


def _strongest_incident(edges: Edges, rows: np.ndarray) -> np.ndarray:
    """The first signal, by PRECEDENCE, among the edges touching each row."""
    size = int(max(edges.i.max(), edges.j.max())) + 1
    best = np.full(size, len(SIGNALS), dtype=np.int8)
    for side in (edges.i, edges.j):
        np.minimum.at(best, side, PRECEDENCE[edges.signal])
    return RANK_DECISION[best[rows]]


def star_survivors(cand: Candidates, edges: Edges, order: np.ndarray) -> np.ndarray:
    """Each row's survivor under the star rule: best rows first (the keep rule), each
    row not yet claimed is kept and claims every unclaimed row it links to directly.

    Edges come collapsed: rows with equal keys (digest, pHash code, colour signature)
    link to their group's first row at distance 0, and groups link by their first rows;
    every row of a group adjacent to a row's group links to it directly. CLIP edges
    link rows. Work is linear in rows and edges, however large a cluster is.
    """
    n = len(cand.pixels)
    rows = np.arange(n, dtype=np.int64)
    anchor = cand.anchors() != NOT_ANCHOR
    # Only signals that have edges take part: the others leave every row alone.
    present = [s for s in range(len(SIGNALS)) if (edges.signal == s).any()]
    group = np.tile(rows, (len(present), 1))
    mem_start = np.empty((len(present), n + 1), dtype=np.int64)
    members = np.empty((len(present), n), dtype=np.int64)
    adj_start = np.empty((len(present), n + 1), dtype=np.int64)
    adj_parts, base = [], 0
    for k, s in enumerate(present):
        of = edges.signal == s
        keys = GROUPS_OF.get(s, s)
        star = (
            (edges.signal == keys) & (edges.distance == 0)
            if keys not in LINKS_ONLY
            else np.zeros(len(of), bool)
        )
        group[k, edges.j[star]] = edges.i[star]
        members[k] = np.argsort(group[k], kind="stable")
        mem_start[k, 0] = 0
        np.cumsum(np.bincount(group[k], minlength=n), out=mem_start[k, 1:])
        starts, targets = undirected_csr(edges.i, edges.j, of & ~star, group[k], n)
        adj_parts.append(targets)
        adj_start[k] = starts + base
        base += len(targets)
    adj = np.concatenate(adj_parts) if adj_parts else np.zeros(0, dtype=np.int64)
    return star_claims(order.astype(np.int64), group, mem_start, members, adj_start, adj, anchor)


def _survivors(cluster_id: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The survivor row of each row's cluster: its first row in `order` (best first)."""
    n = len(cluster_id)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    best = np.full(n, n, dtype=np.int64)
    np.minimum.at(best, cluster_id, position)
    return order[best[cluster_id]]


def _describe(
    cluster_id, size, survivor, distance, similarity, edges: Edges, words, hashed
) -> Groups:
    """Groups for every cluster of two or more rows, vectorized but for the diameter of
    clusters with three or more distinct codes. pHash distances count between `hashed`
    rows only (detailed rows with a detailed survivor)."""
    n = len(cluster_id)
    ids = np.flatnonzero((cluster_id == np.arange(n)) & (size > 1))
    mask = np.zeros(n, dtype=np.int64)
    inside = cluster_id[edges.i] == cluster_id[edges.j]  # the star rule may cut an edge
    np.bitwise_or.at(
        mask, cluster_id[edges.i[inside]], np.int64(1) << edges.signal[inside].astype(np.int64)
    )
    to_survivor = np.full(n, NO_DISTANCE, dtype=np.int32)
    diameter = np.full(n, NO_DISTANCE, dtype=np.int32)
    if words is not None:
        np.maximum.at(
            to_survivor, cluster_id, np.where(hashed, np.maximum(distance, 0), NO_DISTANCE)
        )
        diameter[ids] = to_survivor[ids]  # exact for clusters with at most two codes
        members = np.flatnonzero((size > 2) & hashed)
        if len(members):
            order = members[np.lexsort((words[members], cluster_id[members]))]
            labels = cluster_id[order]
            bounds = np.flatnonzero(np.diff(labels)) + 1
            starts = np.concatenate([[0], bounds, [len(order)]]).astype(np.int64)
            found = cluster_diameters(words[order], starts)
            big = found >= 0  # clusters with three or more distinct codes
            diameter[labels[starts[:-1][big]]] = found[big]
    lowest = np.full(n, np.nan, dtype=np.float32)
    np.fmin.at(lowest, cluster_id, similarity)
    return Groups(
        ids, size[ids], survivor[ids], mask[ids], diameter[ids], to_survivor[ids], lowest[ids]
    )
