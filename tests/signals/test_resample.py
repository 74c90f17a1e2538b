"""dedup.signals.resample gives Pillow's resize bit for bit (the pHash must stay
imagehash's, and the views' codes what they were)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dedup.signals.resample import BILINEAR, LANCZOS, resize_grey

PIL_FILTER = {LANCZOS: Image.Resampling.LANCZOS, BILINEAR: Image.Resampling.BILINEAR}


def _pillow(pixels, size, kind, box=None):
    return np.asarray(Image.fromarray(pixels).resize(size, PIL_FILTER[kind], box=box))


@pytest.mark.parametrize("kind", [LANCZOS, BILINEAR])
def test_random_sizes_boxes_and_pixels_equal_pillow(kind):
    rng = np.random.default_rng(11 if kind == LANCZOS else 12)
    for case in range(1500):
        h, w = (int(v) for v in rng.integers(1, 160, 2))
        if case % 3 == 0:  # smooth pictures too, where rounding ties are likelier
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = ((xx * 7 + yy * 3) % 256).astype(np.uint8)
        else:
            pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        size = (int(rng.integers(1, 80)), int(rng.integers(1, 80)))
        box = None
        if case % 2:
            x0, x1 = sorted(int(v) for v in rng.integers(0, w + 1, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, h + 1, 2))
            box = (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
            if box[2] > w or box[3] > h:
                box = None
        ours = resize_grey(pixels, size, kind, box)
        theirs = _pillow(pixels, size, kind, box)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (h, w, size, box)


@pytest.mark.parametrize("kind", [LANCZOS, BILINEAR])
def test_the_shapes_dedup_uses_equal_pillow(kind):
    """Web-size JPEG drafts (64x48 and the like) to the pHash's 32x32 and the views'
    64x64 raster, whole and boxed; the same size and box (Pillow copies)."""
    rng = np.random.default_rng(3)
    for h, w in [(48, 64), (64, 48), (64, 64), (32, 32), (204, 153), (1, 1), (1, 300)]:
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        for size in [(32, 32), (64, 64), (w, h)]:
            for box in [None, (0, 0, w, h), (w // 4, h // 5, w - w // 6, h - h // 7)]:
                if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
                    continue
                ours = resize_grey(pixels, size, kind, box)
                assert np.array_equal(ours, _pillow(pixels, size, kind, box)), (h, w, size, box)
