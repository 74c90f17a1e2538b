"""Binary codes in, (i, j, distance) pairs out, each pair once with i < j.

Two exact engines, chosen by a cost model: FAISS `IndexBinaryFlat` range search
(every query against every code), and multi-index hashing (Norouzi et al., 2012) for
large sets: split the 64 bits into m chunks; two codes within t bits agree within
floor(t / m) bits on at least one chunk (pigeonhole), so probing each chunk's table
at that radius finds every pair, and each candidate is then checked in full.
Both return exactly the pairs a brute force returns; tests hold them to that.
"""

from __future__ import annotations

import os
from itertools import combinations
from math import comb

import numpy as np

from dedup.core.processes import signals_deferred, worker_init

QUERY_BATCH = 65536
MIH_BATCH = 16384
MIH_PARALLEL_MIN = 200_000  # below this, forking search workers costs more than it saves
CODE_BITS = 64
MAX_CHUNK_BITS = 22  # a chunk table has 2^bits + 1 int64 entries (32 MiB at 22)
# How much more a probe or candidate costs in numpy than one brute-force comparison in
# FAISS, measured on 2 cores: at threshold 8 brute force wins up to about 100,000 codes.
MIH_OVERHEAD = 140


def unique_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of `codes` (sorted) and, for each input row, the index of its code."""
    unique, inverse = np.unique(
        np.ascontiguousarray(codes, dtype=np.uint8), axis=0, return_inverse=True
    )
    return unique, inverse.reshape(-1)


def hamming_pairs(
    codes: np.ndarray, threshold: int, engine: str = "auto", workers: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of `codes` (N, 8 bytes) within `threshold` bits, sorted.

    Callers pass distinct codes (see `unique_codes`); equal rows are still found, at
    distance 0, but a code repeated k times would cost k^2 pairs.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if len(codes) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty.astype(np.int32)
    if engine == "auto":
        engine = choose_engine(len(codes), threshold)[0]
    if engine == "flat":
        i, j, d = _flat_pairs(codes, threshold)
    else:
        m = choose_engine(len(codes), threshold, "mih")[1]
        i, j, d = _mih_pairs(codes, threshold, m, workers)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def choose_engine(n: int, threshold: int, force: str | None = None) -> tuple[str, int]:
    """(engine, chunks): the cheaper of brute force and the best multi-index hashing split,
    in expected work per query (probes plus candidates, for uniformly spread codes)."""
    best_m, best_cost = 0, float("inf")
    for m in range(CODE_BITS // MAX_CHUNK_BITS + 1, 17):
        bits = CODE_BITS // m
        radius = threshold // m
        probes = m * sum(comb(bits, k) for k in range(radius + 1))
        cost = probes * (1 + n / 2**bits)
        if cost < best_cost:
            best_m, best_cost = m, cost
    if force == "mih" or (force is None and best_cost * MIH_OVERHEAD < n):
        return "mih", best_m
    return "flat", 0


def _flat_pairs(codes: np.ndarray, threshold: int):
    import faiss  # imported here: a run without pHash never pays for it

    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    # FAISS binary range search keeps distances strictly below the radius.
    i, j, d = self_range_pairs(index, codes, threshold + 1)
    return i, j, d.astype(np.int32)


def self_range_pairs(index, x: np.ndarray, radius) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of `x`, which `index` holds in the same order, that the
    index's range search returns, with their distances; queried in batches."""
    q, labels, values = _range_search(index, x, radius)
    keep = labels > q
    return q[keep], labels[keep], values[keep]


def code_chunks(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m near-equal chunks of a 64-bit word."""
    sizes = [CODE_BITS // m + (1 if k < CODE_BITS % m else 0) for k in range(m)]
    out, shift = [], CODE_BITS
    for bits in sizes:
        shift -= bits
        out.append((shift, bits))
    return out


def _flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        for positions in combinations(range(bits), k):
            masks.append(sum(1 << p for p in positions))
    return np.asarray(masks, dtype=np.int64)


# Set before forking MIH workers, which read them; never changed while they run.
_MIH_STATE: dict = {}


def _mih_pairs(codes: np.ndarray, threshold: int, m: int, workers: int = 1):
    words = codes.view(">u8").reshape(-1).astype(np.uint64)
    n = len(words)
    found = []
    # One chunk's table at a time: 2^bits + 1 int32 bucket starts (16 MiB at 22 bits).
    for shift, bits in code_chunks(m):
        keys = ((words >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int32)
        order = np.argsort(keys, kind="stable").astype(np.int32)
        starts = np.zeros((1 << bits) + 1, dtype=np.int32)
        np.cumsum(np.bincount(keys, minlength=1 << bits), out=starts[1:])
        _MIH_STATE.update(
            words=words,
            table=(keys, order, starts, _flip_masks(bits, threshold // m)),
            threshold=threshold,
        )
        batches = list(range(0, n, MIH_BATCH))
        try:
            if workers > 1 and n >= MIH_PARALLEL_MIN:
                import multiprocessing

                ctx = multiprocessing.get_context("fork")
                with signals_deferred():
                    pool = ctx.Pool(workers, worker_init, (os.getpid(),))
                with pool:
                    found.extend(pool.map(_mih_task, batches, chunksize=1))
            else:
                found.extend(_mih_task(q0) for q0 in batches)
        finally:
            _MIH_STATE.clear()
    i = np.concatenate([f[0] for f in found])
    j = np.concatenate([f[1] for f in found])
    d = np.concatenate([f[2] for f in found])
    # A pair that agrees on several chunks is found once per chunk.
    _, first = np.unique(i * n + j, return_index=True)
    return i[first], j[first], d[first]


def _mih_task(q0: int):
    """Pairs (query < candidate) found by probing the current chunk's table for a batch."""
    words, threshold = _MIH_STATE["words"], _MIH_STATE["threshold"]
    keys, order, starts, masks = _MIH_STATE["table"]
    qkeys = keys[q0 : q0 + MIH_BATCH].astype(np.int64)
    probes = (qkeys[:, None] ^ masks[None, :]).reshape(-1)
    lo = starts[probes].astype(np.int64)
    counts = starts[probes + 1] - lo
    total = int(counts.sum())
    query = np.repeat(np.repeat(np.arange(q0, q0 + len(qkeys), dtype=np.int64), len(masks)), counts)
    cand = order[
        np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total, dtype=np.int64)
    ].astype(np.int64)
    later = cand > query
    query, cand = query[later], cand[later]
    dist = np.bitwise_count(words[query] ^ words[cand]).astype(np.int32)
    close = dist <= threshold
    return query[close], cand[close], dist[close]


# ---------------------------------------------------------------- small uint8 vectors


def maxabs_pairs(vectors: np.ndarray, tolerance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of `vectors` (N, D uint8) whose values all differ by at
    most `tolerance`, with that largest difference; sorted. Exact.

    Rows within `tolerance` in every value are within D * tolerance^2 in squared L2, so
    a FAISS flat L2 range search at that radius finds a superset, which is then checked
    value by value. Like `hamming_pairs`, callers pass distinct rows.
    """
    import faiss

    empty = np.zeros(0, dtype=np.int64)
    if len(vectors) < 2:
        return empty, empty, empty.astype(np.int32)
    # Centred, so float32 squared norms stay small and exact enough; the slack covers
    # the rounding of FAISS's expanded |x|^2 + |y|^2 - 2xy.
    x = np.ascontiguousarray(vectors, dtype=np.float32) - np.float32(128)
    dim = x.shape[1]
    index = faiss.IndexFlatL2(dim)
    index.add(x)
    i, j, _ = self_range_pairs(index, x, float(dim * tolerance * tolerance) + 4.0)
    d = np.zeros(len(i), dtype=np.int32)
    for start in range(0, len(i), QUERY_BATCH):
        a = vectors[i[start : start + QUERY_BATCH]].astype(np.int16)
        b = vectors[j[start : start + QUERY_BATCH]].astype(np.int16)
        d[start : start + QUERY_BATCH] = np.abs(a - b).max(axis=1)
    close = d <= tolerance
    i, j, d = i[close], j[close], d[close]
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def rms_pairs(vectors: np.ndarray, rms: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of `vectors` (N, D uint8) whose root-mean-square difference
    is at most `rms`, with that difference rounded to a whole level (at least 1);
    sorted. Exact: a
    FAISS flat L2 range search with some slack finds a superset, then each candidate's
    sum of squares is checked in integers. Callers pass distinct rows."""
    import faiss

    empty = np.zeros(0, dtype=np.int64)
    if len(vectors) < 2:
        return empty, empty, empty.astype(np.int32)
    x = np.ascontiguousarray(vectors, dtype=np.float32) - np.float32(128)
    dim = x.shape[1]
    limit = int(np.floor(dim * rms * rms))  # the largest sum of squares allowed
    index = faiss.IndexFlatL2(dim)
    index.add(x)
    i, j, _ = self_range_pairs(index, x, float(limit) + 4.0 + 1e-3 * limit)
    squares = np.zeros(len(i), dtype=np.int64)
    for start in range(0, len(i), QUERY_BATCH):
        a = vectors[i[start : start + QUERY_BATCH]].astype(np.int64)
        b = vectors[j[start : start + QUERY_BATCH]].astype(np.int64)
        squares[start : start + QUERY_BATCH] = ((a - b) ** 2).sum(axis=1)
    close = squares <= limit
    i, j = i[close], j[close]
    # at least 1: the rows are distinct, and distance 0 means equal keys to the star rule
    d = np.maximum(1, np.round(np.sqrt(squares[close] / dim))).astype(np.int32)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


# ---------------------------------------------------------------- CLIP vectors

# Exact inner-product search up to this many vectors; above it an IVF index, which is
# approximate. On 2 cores at 512 dimensions: flat 0.7 s at 10,000 and 15.6 s at 50,000
# vectors (it grows with the square); IVF 9.5 s at 50,000 and 26 s at 100,000.
CLIP_FLAT_MAX = 20_000
GPU_NEIGHBOURS = 64


def cosine_pairs(
    vectors: np.ndarray, threshold: float, engine: str = "auto", device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of unit vectors with cosine similarity >= `threshold`, sorted.

    `flat` is exact; `ivf` clusters the vectors into cells and searches the nearest
    cells only (approximate); `auto` picks flat up to CLIP_FLAT_MAX vectors. With a GPU
    build of FAISS and a CUDA device, the flat search runs on the GPU (see
    `inner_product_search`), exact too.
    """
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape if x.ndim == 2 else (0, 0)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, np.zeros(0, dtype=np.float32)
    if engine == "auto":
        engine = "flat" if n <= CLIP_FLAT_MAX else "ivf"
    # FAISS keeps inner products strictly above the radius.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    if engine == "flat":
        q, labels, sims = inner_product_search(x, x, radius, device)
        keep = labels > q
        i, j, s = q[keep], labels[keep], sims[keep].astype(np.float32)
        order = np.lexsort((j, i))
        return i[order], j[order], s[order]
    # FAISS wants 39 training points or more per cell.
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))]
    index.train(sample)
    index.nprobe = min(nlist, 32)
    index.add(x)
    i, j, s = self_range_pairs(index, x, radius)
    s = s.astype(np.float32)
    order = np.lexsort((j, i))
    return i[order], j[order], s[order]


def gpu_count(device: str) -> int:
    """GPUs FAISS can search on for this device setting (0 without a GPU build)."""
    import faiss

    if not device.startswith(("cuda", "auto")) or not hasattr(faiss, "get_num_gpus"):
        return 0
    return faiss.get_num_gpus()


def inner_product_search(
    table: np.ndarray, queries: np.ndarray, radius: float, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query row, table row, inner product) with the product above `radius`, exact.

    On a GPU build of FAISS with a CUDA device: a k-nearest search on the GPU (which
    has no range search), with the queries whose k neighbours are all above the radius
    (there may be more) searched again by range on the CPU; else a CPU range search."""
    import faiss

    if gpu_count(device):  # pragma: no cover - needs a GPU
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, table.shape[1])
        index.add(table)
        return knn_range_search(index, table, queries, radius, GPU_NEIGHBOURS)
    index = faiss.IndexFlatIP(table.shape[1])
    index.add(table)
    return _range_search(index, queries, radius)


def knn_range_search(index, table: np.ndarray, queries: np.ndarray, radius: float, k: int):
    """A range search made of `index`'s k-nearest search: a query's neighbours above the
    radius, except for queries whose k-th neighbour is still above it (the list
    overflowed), which a CPU flat range search over `table` answers in full. Same
    result as a range search; no pair is lost however many neighbours a query has."""
    import faiss

    k = min(k, len(table))
    sims, labels = index.search(queries, k)
    overflow = sims[:, -1] > radius
    inside = (sims > radius) & (labels >= 0) & ~overflow[:, None]
    q = np.repeat(np.arange(len(queries), dtype=np.int64), inside.sum(axis=1))
    found = [(q, labels[inside].astype(np.int64), sims[inside])]
    if overflow.any():
        rows = np.flatnonzero(overflow)
        exact = faiss.IndexFlatIP(table.shape[1])
        exact.add(table)
        oq, ol, os_ = _range_search(exact, queries[rows], radius)
        found.append((rows[oq], ol, os_))
    q, labels, sims = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((labels, q))
    return q[order], labels[order], sims[order]


def _range_search(index, queries: np.ndarray, radius: float):
    out_q, out_l, out_s = [], [], []
    for start in range(0, max(len(queries), 1), QUERY_BATCH):
        lims, sims, labels = index.range_search(queries[start : start + QUERY_BATCH], radius)
        counts = np.diff(lims).astype(np.int64)
        out_q.append(np.repeat(np.arange(start, start + len(counts), dtype=np.int64), counts))
        out_l.append(labels.astype(np.int64))
        out_s.append(sims)
    return np.concatenate(out_q), np.concatenate(out_l), np.concatenate(out_s)


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
