"""The edit catalogue of calibrate and canaries: each edit draws its parameters per copy
(seeded), so that an estimate holds for a kind of edit, not for one version of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dedup.engine.edits import EDITS, apply
from tests.helpers import textured

PICTURE = textured(11).resize((400, 300))
SEEDS = range(12)


def _image(name: str, seed: int) -> Image.Image:
    return Image.open(io.BytesIO(apply(name, PICTURE, seed)))


@pytest.mark.parametrize("name", list(EDITS))
def test_an_edit_is_fixed_by_its_seed(name):
    assert apply(name, PICTURE, 5) == apply(name, PICTURE, 5)
    assert _image(name, 5).size[0] > 0


@pytest.mark.parametrize(
    "name",
    [n for n in EDITS if n not in ("png", "mirror", "gray")],  # nothing to draw
)
def test_an_edit_draws_its_parameters_per_copy(name):
    # (a quality of 25-35 or a 92-97% crop has a few values only: some seeds share one)
    outputs = {apply(name, PICTURE, seed) for seed in SEEDS}
    assert len(outputs) >= 4


def test_the_drawn_parameters_span_their_ranges():
    # letterbox bars of 8-20% each side: the height grows by 16-40%
    heights = [_image("letterbox", s).height / PICTURE.height - 1 for s in SEEDS]
    assert min(heights) >= 0.16 - 0.01 and max(heights) <= 0.40 + 0.01
    assert max(heights) - min(heights) > 0.08
    # a caption band of 8-18% of the height, at the top or the bottom
    tops = set()
    for s in SEEDS:
        out = np.asarray(_image("caption", s).convert("L"), dtype=np.int16)
        band = out.shape[0] - PICTURE.height
        assert 0.08 * PICTURE.height - 1 <= band <= 0.18 * PICTURE.height + 1
        original = np.asarray(PICTURE.convert("L"), dtype=np.int16)
        below = np.abs(out[band:] - original).mean()  # the picture under a top band
        tops.add(bool(below < np.abs(out[: PICTURE.height] - original).mean()))
    assert tops == {True, False}
    # rotations of 2-4 degrees either way, cropped (smaller) or filled (same size)
    sizes = {_image("rotate_3", s).size for s in SEEDS}
    assert len(sizes) > 3 and all(w < PICTURE.width for w, _ in sizes)
    assert {_image("rotate_fill", s).size for s in SEEDS} == {PICTURE.size}
    # a screenshot: the picture scaled to 70-100% inside a window 1.3-1.6x its size
    for s in SEEDS[:4]:
        w, h = _image("screenshot", s).size
        assert 0.7 * 1.3 * PICTURE.width - 2 <= w <= 1.6 * PICTURE.width + 2
        assert 0.7 * 1.3 * PICTURE.height - 2 <= h <= 1.6 * PICTURE.height + 2
