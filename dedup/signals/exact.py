"""Exact duplicates: identical image bytes, found through a content digest."""

from __future__ import annotations

import hashlib

import blake3
import numpy as np


def digest(data: bytes, algorithm: str = "blake3") -> bytes:
    """A 32-byte cryptographic digest of the image member's bytes.

    BLAKE3 by default: as collision-resistant as SHA-256 and about three times faster
    here (SHA-256 alone cost a tenth of the time of a 2-megapixel JPEG's draft decode).
    `sha256` matches the digests some datasets publish.
    """
    if algorithm == "blake3":
        return blake3.blake3(data).digest()
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
