"""Pillow's resize of a grayscale image, bit for bit, on numpy arrays: the pHash's
32x32 Lanczos shrink and the views' rasters without a Pillow image per step.

Pillow (src/libImaging/Resample.c) computes each output pixel's weights in double
precision, turns them into 22-bit fixed point and sums 8-bit pixels with them, one pass
per axis. The weights depend only on the sizes, the box and the filter: here they are
computed once per such key (in Python, with the same libm `sin` Pillow's C calls, in the
same order of operations) and the passes run in a compiled loop
(dedup.search.kernels.resample_grey). tests/signals/test_resample.py holds the result to
Pillow's on thousands of random sizes, boxes and pixels.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import PIL

from dedup.search.kernels import resample_grey

PRECISION = 1 << 22  # Pillow's PRECISION_BITS: 32 - 8 - 2
# Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
# many pixels as the width; earlier versions always ran the horizontal one first. The two
# orders differ in the last bit of some pixels: the installed Pillow's order is followed
# (its version is part of the stored features' fingerprint).
ORDER_BY_SHRINK = int(PIL.__version__.split(".")[0]) >= 13
LANCZOS = "lanczos"
BILINEAR = "bilinear"


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    if x < 1.0:
        return 1.0 - x
    return 0.0


_FILTERS = {LANCZOS: (_lanczos, 3.0), BILINEAR: (_bilinear, 1.0)}


@lru_cache(maxsize=4096)
def coefficients(
    in_size: int, in0: float, in1: float, out_size: int, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """(bounds (out_size, 2): first source pixel and count; weights (out_size, ksize) in
    22-bit fixed point) of one axis, as Pillow's precompute_coeffs and
    normalize_coeffs_8bpc make them."""
    filt, support = _FILTERS[kind]
    scale = (in1 - in0) / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    inv = 1.0 / filterscale
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)  # Pillow's INT32
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size) - lo
        k = [filt((x + lo - center + 0.5) * inv) for x in range(hi)]
        total = 0.0
        for w in k:  # in order, as the C loop adds (Python 3.12's sum() compensates)
            total += w
        if total != 0.0:
            k = [w / total for w in k]
        for x, w in enumerate(k):
            weights[xx, x] = int(-0.5 + w * PRECISION) if w < 0 else int(0.5 + w * PRECISION)
        bounds[xx] = (lo, hi)
    bounds.flags.writeable = False
    weights.flags.writeable = False
    return bounds, weights


def resize_grey(
    pixels: np.ndarray,
    size: tuple[int, int],
    kind: str,
    box: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """`Image.fromarray(pixels).resize(size, filter, box)` as a (h, w) uint8 array, for an
    (H, W) uint8 array and an integer box (default: the whole image)."""
    height, width = pixels.shape
    out_w, out_h = size
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    if (out_w, out_h) == (width, height) and (x0, y0, x1, y1) == (0, 0, width, height):
        return pixels.copy()
    need_h = out_w != width or x0 != 0 or x1 != out_w
    need_v = out_h != height or y0 != 0 or y1 != out_h
    shrink = height - out_h
    horizontal_first = not (ORDER_BY_SHRINK and shrink > 0 and shrink > (width - out_w) * 2)
    hb, hk = coefficients(width, float(x0), float(x1), out_w, kind)
    vb, vk = coefficients(height, float(y0), float(y1), out_h, kind)
    return resample_grey(pixels, hb, hk, vb, vk, need_h, need_v, horizontal_first)
