import io

import imagehash
import numpy as np
import pytest
from PIL import Image

from dedup.io.decode import normalize
from dedup.signals.phash import hamming, phash_batch, phash_input
from dedup.synth import make_image


def varied_images():
    rng = np.random.default_rng(3)
    yield make_image(1, 256, 256)
    yield make_image(2, 640, 360)
    yield make_image(3, 33, 47)
    yield Image.fromarray(rng.integers(0, 256, (100, 120, 3), dtype=np.uint8), "RGB")
    yield Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L")
    yield Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (50, 1)), "L")
    yield make_image(4, 80, 80).convert("P", palette=Image.Palette.ADAPTIVE)
    rgba = make_image(5, 90, 70).convert("RGBA")
    rgba.putalpha(128)
    yield rgba
    yield Image.new("RGB", (50, 50), (10, 200, 30))  # flat: every coefficient ties
    yield Image.open(io.BytesIO(_jpeg(make_image(6, 500, 300))))


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75)
    return buf.getvalue()


@pytest.mark.parametrize("img", list(varied_images()))
def test_phash_matches_imagehash_bit_for_bit(img):
    image = normalize(img)
    ours = phash_batch(phash_input(image)[None])[0]
    theirs = imagehash.phash(image)
    assert np.array_equal(np.unpackbits(ours).reshape(8, 8).astype(bool), theirs.hash)
    assert ours.tobytes().hex() == str(theirs)


def test_batch_equals_one_at_a_time():
    images = [normalize(i) for i in varied_images()]
    batch = phash_batch(np.stack([phash_input(i) for i in images]))
    single = np.stack([phash_batch(phash_input(i)[None])[0] for i in images])
    assert np.array_equal(batch, single)


def test_hamming_counts_differing_bits():
    a = np.array([[0b1011, 0, 0, 0, 0, 0, 0, 0xFF]], dtype=np.uint8)
    b = np.array([[0b0001, 0, 0, 0, 0, 0, 0, 0x0F]], dtype=np.uint8)
    assert hamming(a, b).tolist() == [2 + 4]


def test_stacked_strip_equals_per_image_arrays():
    from dedup.signals.phash import shrink, stack_shrunk

    images = [normalize(i) for i in varied_images()]
    want = np.stack([phash_input(i) for i in images])
    assert np.array_equal(stack_shrunk([shrink(i) for i in images]), want)
