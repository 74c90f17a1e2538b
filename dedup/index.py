"""FAISS search: binary codes in, (i, j, distance) pairs out, each pair once with i < j."""

from __future__ import annotations

import faiss
import numpy as np

QUERY_BATCH = 65536


def unique_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of `codes` (sorted) and, for each input row, the index of its code."""
    unique, inverse = np.unique(
        np.ascontiguousarray(codes, dtype=np.uint8), axis=0, return_inverse=True
    )
    return unique, inverse.reshape(-1)


def hamming_pairs(codes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of `codes` (N, bytes) within `threshold` bits, by range search.

    Callers pass distinct codes (see `unique_codes`); equal rows are still found, at
    distance 0, but a code repeated k times would cost k^2 pairs.
    """
    n = len(codes)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, empty.astype(np.int32)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, QUERY_BATCH):
        # FAISS binary range search keeps distances strictly below the radius.
        lims, dist, labels = index.range_search(codes[start : start + QUERY_BATCH], threshold + 1)
        counts = np.diff(lims).astype(np.int64)
        query = np.repeat(np.arange(start, start + len(lims) - 1, dtype=np.int64), counts)
        keep = labels > query
        out_i.append(query[keep])
        out_j.append(labels[keep].astype(np.int64))
        out_d.append(dist[keep].astype(np.int32))
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]
