"""Exact duplicates: identical image bytes, found through a content digest."""

from __future__ import annotations

import hashlib

import numpy as np


def digest(data: bytes) -> bytes:
    """SHA-256 of the image member's bytes."""
    return hashlib.sha256(data).digest()


def exact_groups(digests: list[bytes | None]) -> list[np.ndarray]:
    """Row indices of each group of two or more equal digests, in first-seen order."""
    first: dict[bytes, list[int]] = {}
    for row, d in enumerate(digests):
        if d is not None:
            first.setdefault(d, []).append(row)
    return [np.asarray(rows, dtype=np.int64) for rows in first.values() if len(rows) > 1]
