"""content_box's compiled pass gives the box of its numpy definition (kept here as the
reference) on random pictures with uniform and near-uniform borders."""

from __future__ import annotations

import numpy as np
import pytest

from dedup.signals.views import MAX_TRIM, content_box


def reference(gray: np.ndarray, tolerance: int) -> tuple[int, int, int, int]:
    h, w = gray.shape

    def run(low: np.ndarray, high: np.ndarray) -> int:
        if high[0] - low[0] > 2 * tolerance:
            return 0
        ref = (int(low[0]) + int(high[0])) // 2
        uniform = (low >= ref - tolerance) & (high <= ref + tolerance)
        return len(uniform) if uniform.all() else int(np.argmin(uniform))

    row_lo, row_hi = gray.min(axis=1).astype(np.int16), gray.max(axis=1).astype(np.int16)
    col_lo, col_hi = gray.min(axis=0).astype(np.int16), gray.max(axis=0).astype(np.int16)
    top, bottom = run(row_lo, row_hi), run(row_lo[::-1], row_hi[::-1])
    left, right = run(col_lo, col_hi), run(col_lo[::-1], col_hi[::-1])
    y0, y1, x0, x1 = top, h - bottom, left, w - right
    if (y1 - y0) < (1 - MAX_TRIM) * h or (x1 - x0) < (1 - MAX_TRIM) * w:
        return 0, 0, w, h
    return x0, y0, x1, y1


def test_random_bordered_pictures_match_the_reference():
    rng = np.random.default_rng(0)
    for case in range(3000):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        img = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if case % 2:  # low contrast: near-uniform lines inside too
            img = (img // 16 + rng.integers(0, 240)).astype(np.uint8)
        for side in range(4):
            if rng.random() < 0.6:
                k = int(rng.integers(0, max(1, (h if side < 2 else w) // 2 + 1)))
                jitter = rng.integers(-12, 13, size=img.shape)
                band = np.clip(int(rng.integers(0, 256)) + jitter, 0, 255).astype(np.uint8)
                if side == 0:
                    img[:k] = band[:k]
                elif side == 1 and k:
                    img[-k:] = band[-k:]
                elif side == 2:
                    img[:, :k] = band[:, :k]
                elif k:
                    img[:, -k:] = band[:, -k:]
        for tolerance in (10, 3, 0, 40):
            assert content_box(img, tolerance) == reference(img, tolerance), (case, tolerance)


def test_strided_input_and_an_empty_image():
    img = np.zeros((20, 30), np.uint8)
    img[5:15, 8:22] = np.arange(140, dtype=np.uint8).reshape(10, 14)
    flipped = img[:, ::-1]  # a mirror, as the verification tier passes it
    assert content_box(flipped, 10) == reference(flipped, 10)
    with pytest.raises(ValueError):
        content_box(np.zeros((0, 5), np.uint8))
