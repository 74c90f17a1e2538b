"""Exact duplicates: identical image bytes, found through a content digest."""

from __future__ import annotations

import hashlib

import numpy as np


def digest(data: bytes) -> bytes:
    """SHA-256 of the image member's bytes."""
    return hashlib.sha256(data).digest()


def exact_groups(digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For (N, 32) digests: (first, row) pairs linking every row to the first earlier row
    with the same digest; rows with a unique digest appear in neither."""
    n = len(digests)
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    words = np.ascontiguousarray(digests).view(np.uint64).reshape(n, -1)
    order = np.lexsort((np.arange(n),) + tuple(words[:, k] for k in range(words.shape[1])))
    ranked = words[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (ranked[1:] != ranked[:-1]).any(axis=1)
    # Within a group rows are in input order (the last lexsort key), so its first row is
    # the group's earliest.
    first = order[np.maximum.accumulate(np.where(new_group, np.arange(n), 0))]
    dup = ~new_group
    return first[dup], order[dup]
