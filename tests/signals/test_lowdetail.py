"""Low-detail images (solid colours, near-flat frames, gradients): their pHash is mostly
rounding noise, so they are matched by a colour signature instead (reason `flat`)."""

import io
import os

import imagehash
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dedup.commands.run import run
from dedup.core.config import Config
from dedup.engine.cluster import cluster
from dedup.io.decode import decode_image
from dedup.search.pairs import maxabs_pairs, unique_codes
from dedup.signals.edges import DECISIONS, Candidates, direct_links
from dedup.signals.phash import (
    DETAIL_FLOOR,
    LOW_DETAIL_BITS,
    SIGNATURE_BYTES,
    SIGNATURE_TOLERANCE,
    colour_signature,
    phash_and_detail,
    phash_batch,
    phash_input,
    shape_code,
    shrink,
    stack_shrunk,
)
from dedup.synth import encode, make_digit, make_image
from tests.helpers import cfg, write_tar

COLOURS = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "gray": (128, 128, 128),
}


def solid(rgb, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def noisy(rgb, seed, amplitude=2, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-amplitude, amplitude + 1, (size[1], size[0], 3))
    pixels = np.clip(np.asarray(solid(rgb, size), dtype=np.int16) + noise, 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def gradient(start, stop, direction, size=(128, 128)) -> Image.Image:
    """A linear ramp from colour `start` to `stop`, left to right ("h") or top down ("v")."""
    w, h = size
    t = (
        np.linspace(0, 1, w)[None, :, None]
        if direction == "h"
        else np.linspace(0, 1, h)[:, None, None]
    )
    t = np.broadcast_to(t, (h, w, 1))
    pixels = np.asarray(start, float) * (1 - t) + np.asarray(stop, float) * t
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def png(img) -> bytes:
    return encode(img, "PNG")


def jpeg(img, quality=95) -> bytes:
    return encode(img, "JPEG", quality=quality)


def detail_of(images) -> np.ndarray:
    return phash_and_detail(stack_shrunk([shrink(i) for i in images]))[1]


def dedup_run(tmp_path, shards, workers=2, **settings) -> list[dict]:
    """Run on shards given as lists of (member name, bytes); the samples.parquet rows."""
    paths = [
        write_tar(str(tmp_path / "in" / f"shard-{k:02d}.tar"), members)
        for k, members in enumerate(shards)
    ]
    out = str(tmp_path / "out")
    run(paths, out, cfg(workers=workers, **settings))
    return pq.read_table(os.path.join(out, "dedup-report", "samples.parquet")).to_pylist()


def removed(rows: list[dict]) -> dict:
    """{removed key: (reason, survivor key)}."""
    return {r["key"]: (r["reason"], r["duplicate_of"]) for r in rows if not r["kept"]}


# ---------------------------------------------------------------- the detail measure


def _dct_matrix_detail(pixels: np.ndarray) -> np.ndarray:
    """The detail measure from first principles: the unnormalized DCT-II as a matrix."""
    n = np.arange(32)
    basis = 2 * np.cos(np.pi * np.arange(8)[:, None] * (2 * n[None, :] + 1) / 64)
    low = np.einsum("kx,bxy,ly->bkl", basis, pixels.astype(np.float64), basis).reshape(
        len(pixels), -1
    )
    deviation = np.abs(low - np.median(low, axis=1, keepdims=True))
    return (deviation > DETAIL_FLOOR).sum(axis=1)


def test_detail_counts_coefficients_beyond_the_floor_against_a_matrix_dct():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (1, 32, 32)).astype(np.float64)
    # From flat to busy: contrast 0 .. 1 around mid grey, so counts span 0..64.
    pixels = np.stack([np.clip(128 + c * (base[0] - 128), 0, 255) for c in np.linspace(0, 1, 60)])
    pixels = np.round(pixels).astype(np.uint8)
    got = phash_and_detail(pixels)[1]
    want = _dct_matrix_detail(pixels)
    assert got.tolist() == want.tolist()
    assert got.dtype == np.int16
    assert got.min() <= 1 and got.max() >= 55 and len(set(got.tolist())) > 20


def test_detail_of_flat_ramps_and_pictures():
    zeros = np.zeros((32, 32), np.uint8)
    grey = np.full((32, 32), 200, np.uint8)
    ramp = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8), (32, 1))
    got = phash_and_detail(np.stack([zeros, grey, ramp, ramp.T]))[1]
    # Black: nothing; a solid colour: its DC term only; a ramp: DC and odd columns 1, 3, 5, 7.
    assert got.tolist() == [0, 1, 5, 5]
    # Pictures, small and large: far above the threshold (measured minimum 43).
    small = detail_of([make_image(s, 28, 28) for s in range(1000)])
    large = detail_of([make_image(s, 256, 256) for s in range(1000, 1200)])
    assert small.min() >= LOW_DETAIL_BITS + 20
    assert large.min() >= LOW_DETAIL_BITS + 20


def test_flat_near_flat_and_gradients_are_low_detail():
    images = [solid(c) for c in COLOURS.values()]
    images += [noisy(c, seed, size=(28, 28)) for seed, c in enumerate(COLOURS.values())]
    images += [Image.open(io.BytesIO(jpeg(noisy(c, 9), quality=50))) for c in COLOURS.values()]
    images += [gradient((0, 0, 0), (255, 255, 255), d) for d in "hv"]
    images += [gradient((200, 30, 30), (30, 30, 200), d, (640, 360)) for d in "hv"]
    detail = detail_of(images)
    assert (detail < LOW_DETAIL_BITS).all(), detail.tolist()


def test_phash_of_an_rgb_draft_decode_is_imagehash_of_that_image():
    # Phase 1 now decodes JPEGs in RGB (the colour signature needs colour).
    for seed, size in ((1, (640, 360)), (2, (96, 80)), (3, (33, 47))):
        data = jpeg(make_image(seed, *size), quality=80)
        image = decode_image(data, Config(), draft=32, draft_mode="RGB").image
        assert image.mode == "RGB"
        ours = phash_batch(phash_input(image)[None])[0]
        assert ours.tobytes().hex() == str(imagehash.phash(image))


def test_colour_signature_is_an_8x8_rgb_thumbnail():
    left_red = Image.new("RGB", (64, 32), (255, 0, 0))
    left_red.paste((0, 0, 255), (32, 0, 64, 32))
    sig = np.frombuffer(colour_signature(left_red), np.uint8).reshape(8, 8, 3)
    assert len(colour_signature(left_red)) == SIGNATURE_BYTES == 192
    assert (sig[:, :4] == (255, 0, 0)).all() and (sig[:, 4:] == (0, 0, 255)).all()
    grey = colour_signature(Image.new("L", (10, 10), 77))
    assert grey == bytes([77]) * 192


# ---------------------------------------------------------------- pair search


@pytest.mark.parametrize("tolerance", [0, 1, 4, 9])
def test_maxabs_pairs_equal_brute_force(tolerance):
    rng = np.random.default_rng(tolerance)
    centres = rng.integers(0, 256, (40, 48))
    rows = centres[rng.integers(0, 40, 600)] + rng.integers(-6, 7, (600, 48))
    # Boundary cases: every value off by exactly the tolerance, and by one more.
    rows[:40] = np.clip(centres, 10, 245)
    rows[40:80] = np.clip(centres, 10, 245) + tolerance
    rows[80:120] = np.clip(centres, 10, 245) - tolerance - 1
    vectors = unique_codes(np.clip(rows, 0, 255).astype(np.uint8))[0]
    got = maxabs_pairs(vectors, tolerance)
    diff = np.abs(vectors[:, None].astype(np.int16) - vectors[None].astype(np.int16)).max(-1)
    i, j = np.nonzero(np.triu(diff <= tolerance, 1))
    assert got[0].tolist() == i.tolist()
    assert got[1].tolist() == j.tolist()
    assert got[2].tolist() == diff[i, j].tolist()
    assert len(i) >= (40 if tolerance else 0)  # distinct rows: none at tolerance 0


def test_maxabs_pairs_small_inputs():
    assert [len(a) for a in maxabs_pairs(np.zeros((1, 48), np.uint8), 4)] == [0, 0, 0]
    assert [a.tolist() for a in maxabs_pairs(np.array([[0, 9], [4, 5]], np.uint8), 4)] == [
        [0],
        [1],
        [4],
    ]


# ---------------------------------------------------------------- clustering rules


def _candidates(phash, detail, signature, clip=None, pixels=None):
    n = len(phash)
    return Candidates(
        pixels=np.full(n, 640 * 480, dtype=np.int64) if pixels is None else np.asarray(pixels),
        nbytes=np.ones(n, dtype=np.int64),
        digest=np.arange(n, dtype=np.int64).view(np.uint8).reshape(n, 8).repeat(4, axis=1),
        phash=np.asarray(phash, dtype=np.uint8),
        clip=clip,
        detail=np.asarray(detail, dtype=np.int16),
        signature=np.asarray(signature, dtype=np.uint8),
    )


def test_a_low_detail_row_never_links_to_a_detailed_row_by_phash():
    # Equal codes and equal signatures: only the detail of each row differs.
    phash = np.zeros((4, 8))
    signature = np.full((4, SIGNATURE_BYTES), 50)
    config = Config(signals=("exact", "phash"), keep="first")
    both_detailed = cluster(_candidates(phash[:2], [40, 40], signature[:2]), config)
    assert [DECISIONS[r] for r in both_detailed.reason] == ["survivor", "phash"]
    mixed = _candidates(phash, [40, 3, 40, 3], signature)
    result = cluster(mixed, config)
    assert [DECISIONS[r] for r in result.reason] == ["survivor", "survivor", "phash", "flat"]
    assert result.survivor.tolist() == [0, 1, 0, 1]
    links = direct_links(np.array([0, 0, 1, 2]), np.array([1, 3, 3, 3]), mixed, config)
    assert [DECISIONS[r] for r in links] == ["unique", "unique", "flat", "unique"]
    # The pHash distance of a flat copy is noise: not reported.
    assert result.phash_distance.tolist() == [-1, -1, 0, -1]
    assert result.groups.max_phash_distance.tolist() == [0, -1]
    assert [result.groups.signal_names(k) for k in range(2)] == [["phash"], ["flat"]]


def test_flat_rule_is_part_of_the_phash_signal():
    signature = np.full((2, SIGNATURE_BYTES), 50)
    cand = _candidates(np.zeros((2, 8)), [1, 1], signature)
    on = cluster(cand, Config(signals=("exact", "phash"), keep="first"))
    off = cluster(cand, Config(signals=("exact",), keep="first"))
    assert [DECISIONS[r] for r in on.reason] == ["survivor", "flat"]
    assert [DECISIONS[r] for r in off.reason] == ["unique", "unique"]


def test_signature_tolerance_and_chains():
    # A-B and B-C within the tolerance, A-C not: the star rule keeps C; components
    # removes it through B, and its reason is the flat edge, not the CLIP one it also has.
    t = SIGNATURE_TOLERANCE
    signature = np.array([[100 + k * t + (k == 3)] * SIGNATURE_BYTES for k in range(4)])
    clip = np.array([[1, 0], [0, 1], [0, 1], [0.6, 0.8]], dtype=np.float16)
    cand = _candidates(np.zeros((4, 8)), [2, 2, 2, 2], signature, clip)
    signals = ("exact", "phash", "clip")
    star = cluster(cand, Config(signals=signals, keep="first", clip_threshold=0.9))
    assert star.survivor.tolist() == [0, 0, 2, 3]
    assert [DECISIONS[r] for r in star.reason] == ["survivor", "flat", "unique", "unique"]
    comp = cluster(
        cand, Config(signals=signals, keep="first", clip_threshold=0.9, cluster_rule="components")
    )
    assert comp.survivor.tolist() == [0, 0, 0, 3]
    assert [DECISIONS[r] for r in comp.reason] == ["survivor", "flat", "flat", "unique"]


# ---------------------------------------------------------------- whole runs


def test_six_solid_colours_are_all_kept(tmp_path):
    shard = [(f"{name}.png", png(solid(rgb))) for name, rgb in COLOURS.items()]
    rows = dedup_run(tmp_path, [shard])
    assert removed(rows) == {}
    assert sorted(r["reason"] for r in rows) == ["unique"] * 6


def test_each_solid_colour_as_png_and_jpeg_is_one_sample(tmp_path):
    shard = []
    for name, rgb in COLOURS.items():
        shard += [(f"{name}-png.png", png(solid(rgb))), (f"{name}-jpg.jpg", jpeg(solid(rgb)))]
    rows = dedup_run(tmp_path, [shard])
    # Equal pixels, no bars (a solid colour is no padding): the lossless copy survives.
    want = {f"{name}-jpg": ("flat", f"{name}-png") for name in COLOURS}
    assert removed(rows) == want
    rows = dedup_run(tmp_path / "largest", [shard], keep="largest")
    sizes = dict((n.split(".")[0], len(d)) for n, d in shard)
    want = {}
    for name in COLOURS:
        # keep largest, equal pixels: the larger file survives.
        small, large = sorted([f"{name}-png", f"{name}-jpg"], key=sizes.get)
        want[small] = ("flat", large)
    assert removed(rows) == want
    assert all(r["phash_distance"] is None for r in rows if not r["kept"])


def test_near_flat_copies_merge_and_other_colours_do_not(tmp_path):
    a, b, c = (120, 60, 30), (120 + SIGNATURE_TOLERANCE + 4, 60, 30), (40, 40, 200)
    shard = [
        ("a1.png", png(noisy(a, 1))),
        ("a2.png", png(noisy(a, 2))),
        ("a3.jpg", jpeg(noisy(a, 3), quality=85)),
        ("b1.png", png(noisy(b, 4))),
        ("c1.png", png(noisy(c, 5))),
        ("c2.png", png(noisy(c, 6, size=(48, 48)))),
    ]
    rows = dedup_run(tmp_path, [shard], keep="first")
    assert removed(rows) == {"a2": ("flat", "a1"), "a3": ("flat", "a1"), "c2": ("flat", "c1")}


def test_gradients(tmp_path):
    black, white = (0, 0, 0), (255, 255, 255)
    h = gradient(black, white, "h")
    shard = [
        ("h.png", png(h)),
        ("h-jpeg.jpg", jpeg(h, quality=90)),  # the same gradient re-encoded: merges
        ("v.png", png(gradient(black, white, "v"))),
        ("h-reversed.png", png(gradient(white, black, "h"))),
        ("h-red-blue.png", png(gradient((255, 0, 0), (0, 0, 255), "h"))),
        ("h-dark.png", png(gradient((0, 0, 0), (128, 128, 128), "h"))),
    ]
    rows = dedup_run(tmp_path, [shard], keep="first")
    assert removed(rows) == {"h-jpeg": ("flat", "h")}


def test_pictures_and_flat_images_do_not_link(tmp_path):
    picture = make_image(11, 96, 80)
    mean = tuple(int(v) for v in np.asarray(picture).reshape(-1, 3).mean(0).round())
    shard = [
        ("picture.png", png(picture)),
        ("picture-jpeg.jpg", jpeg(picture, quality=75)),
        ("mean-colour.png", png(solid(mean, (96, 80)))),
        ("mean-colour-jpeg.jpg", jpeg(solid(mean, (96, 80)))),
    ]
    rows = dedup_run(tmp_path, [shard], keep="first")
    assert removed(rows) == {
        "picture-jpeg": ("phash", "picture"),
        "mean-colour-jpeg": ("flat", "mean-colour"),
    }
    cluster_of = {r["key"]: r["cluster_id"] for r in rows}
    assert cluster_of["picture"] != cluster_of["mean-colour"]


def test_across_shards_with_repeated_bytes(tmp_path):
    red = png(solid(COLOURS["red"]))
    ramp = gradient((20, 40, 60), (220, 200, 180), "v", (96, 96))
    first = [
        ("red.png", red),
        ("red-again.png", red),  # same bytes: features copied, not decoded again
        ("blue.png", png(solid(COLOURS["blue"]))),
        ("ramp.png", png(ramp)),
        ("picture.png", png(make_image(5, 96, 80))),
    ]
    second = [
        ("red-jpeg.jpg", jpeg(solid(COLOURS["red"]), quality=75)),
        ("ramp-jpeg.jpg", jpeg(ramp, quality=90)),
        ("green.png", png(solid(COLOURS["green"]))),
        ("red-again.png", red),
    ]
    rows = dedup_run(tmp_path, [first, second], workers=2, keep="first")
    assert len(rows) == 9
    gone = sorted(
        (os.path.basename(r["shard"]), r["key"], r["reason"], r["duplicate_of"])
        for r in rows
        if not r["kept"]
    )
    assert gone == [
        ("shard-00.tar", "red-again", "exact", "red"),
        ("shard-01.tar", "ramp-jpeg", "flat", "ramp"),
        ("shard-01.tar", "red-again", "exact", "red"),
        ("shard-01.tar", "red-jpeg", "flat", "red"),
    ]
    clusters = pq.read_table(tmp_path / "out" / "dedup-report" / "clusters.parquet").to_pylist()
    signals = sorted(sorted(c["signals"]) for c in clusters)
    assert signals == [["exact", "flat"], ["flat"]]
    assert all(c["max_phash_distance"] is None for c in clusters)


def test_no_planted_picture_is_low_detail(planted):
    # The planted set's survivors (tests/test_pipeline.py) stay as they were: none of its
    # pictures or their copies leaves the pHash search.
    samples, _, _ = planted
    images = []
    for s in samples:
        for ext, data in s.members.items():
            if ext in ("jpg", "png", "webp"):
                decoded = decode_image(data, Config(), draft=32, draft_mode="RGB")
                if decoded.image is not None:
                    images.append(decoded.image)
    assert len(images) >= 60
    assert detail_of(images).min() >= LOW_DETAIL_BITS + 16


# ---------------------------------------------------------------- tiny images


def tiny_set():
    """Shards of 28x28 digits (10 digits x 24 variants, PNG) and 32x32 pictures (60,
    PNG), with copies of some: JPEG q90 and q75, WebP, BMP, and a PNG with other pixels'
    bytes (a different compression level: equal pixels)."""
    import random

    originals = {f"d{d}v{v:02d}": make_digit(d, v) for d in range(10) for v in range(24)}
    originals |= {f"p{k:02d}": make_image(500 + k, 32, 32) for k in range(60)}
    copies = {}
    for n, key in enumerate(sorted(originals)[::9]):
        img = originals[key]
        edit = n % 5
        if edit == 0:
            copies[f"{key}-q90"] = ("jpg", encode(img.convert("RGB"), "JPEG", quality=90))
        elif edit == 1:
            copies[f"{key}-q75"] = ("jpg", encode(img.convert("RGB"), "JPEG", quality=75))
        elif edit == 2:
            copies[f"{key}-webp"] = ("webp", encode(img, "WEBP", quality=85))
        elif edit == 3:
            copies[f"{key}-bmp"] = ("bmp", encode(img, "BMP"))
        else:
            out = io.BytesIO()
            img.save(out, "PNG", compress_level=1)
            copies[f"{key}-png1"] = ("png", out.getvalue())
    members = [(f"{k}.png", png(img)) for k, img in originals.items()]
    members += [(f"{k}.{ext}", data) for k, (ext, data) in copies.items()]
    random.Random(7).shuffle(members)
    return originals, copies, [members[: len(members) // 2], members[len(members) // 2 :]]


def test_distinct_tiny_images_are_all_kept_and_their_copies_found(tmp_path):
    originals, copies, shards = tiny_set()
    # The hazard: their pHashes collide. Many pairs of different digits are within the
    # default 8 bits, which merged them before the tiny rule.
    digits = [originals[k] for k in sorted(originals) if k.startswith("d")]
    codes = phash_and_detail(stack_shrunk([shrink(i) for i in digits]))[0]
    words = codes.view(">u8").reshape(-1)
    close = np.bitwise_count(words[:, None] ^ words[None, :]) <= 8
    different = np.array(
        [[a[1] != b[1] for b in sorted(originals)[:240]] for a in sorted(originals)[:240]]
    )
    assert (close & different).sum() // 2 > 20
    rows = dedup_run(tmp_path, shards, keep="first")
    gone = removed(rows)
    # Exactly one of each original and its copy goes (whichever comes later: keep
    # first), linked to the other by the tiny rule; no two different images merge.
    base = {k: k.split("-")[0] for k in [*originals, *copies]}
    assert sorted(base[k] for k in gone) == sorted(base[k] for k in copies)
    for key, (reason, survivor) in gone.items():
        assert reason == "tiny" and base[survivor] == base[key] and survivor != key
    assert len(rows) == len(originals) + len(copies)


def test_tiny_rule_without_copies_and_with_phash_off(tmp_path):
    _, _, shards = tiny_set()
    only = [[m for m in shard if "-" not in m[0]] for shard in shards]
    assert removed(dedup_run(tmp_path / "a", only)) == {}
    # The rule is part of the pHash signal: off with it
    assert removed(dedup_run(tmp_path / "b", shards, signals=("exact",))) == {}


def test_tiny_and_large_copies_of_one_picture_do_not_link(tmp_path):
    """A tiny image is compared with tiny images only: its 4x upscale (128x128) is not
    linked to it (a documented shortfall), while a large picture's copies still are."""
    small = make_image(900, 32, 32)
    big = make_image(901, 320, 240)
    shard = [
        ("s.png", png(small)),
        ("s4x.png", png(small.resize((128, 128), Image.Resampling.BICUBIC))),
        ("b.png", png(big)),
        ("bq.jpg", jpeg(big, quality=80)),
    ]
    assert removed(dedup_run(tmp_path, [shard], keep="first")) == {"bq": ("phash", "b")}


def test_tiny_images_of_equal_luminance_or_equal_means_but_other_shapes_stay_apart(tmp_path):
    """Found by a hostile-input hunt: a red cross on green and a green cross on red have
    the same luminance (76.2 and 76.3), and a 2x512 strip has 1,024 pixels like a 32x32
    square; colours are compared too, and a tiny image's shape is part of its signature."""
    from PIL import ImageDraw

    def cross(fg, bg):
        img = Image.new("RGB", (32, 32), bg)
        draw = ImageDraw.Draw(img)
        draw.rectangle((13, 2, 18, 29), fill=fg)
        draw.rectangle((2, 13, 29, 18), fill=fg)
        return img

    red, green = (255, 0, 0), (0, 130, 0)
    # black and white rows along its length: grey at any coarse scale
    strip = Image.fromarray((np.indices((512, 2))[0] % 2 * 255).astype(np.uint8), "L")
    shard = [
        ("a.png", png(cross(red, green))),
        ("b.png", png(cross(green, red))),
        ("b2.jpg", jpeg(cross(green, red), quality=85)),  # a copy: still found
        ("c.png", png(strip)),
        ("d.png", png(solid((128, 128, 128), size=(32, 32)))),
    ]
    assert removed(dedup_run(tmp_path, [shard], keep="first")) == {"b2": ("tiny", "b")}


@pytest.mark.parametrize("partition_rows", [1_000_000, 2])
def test_low_detail_images_of_other_shapes_stay_apart(tmp_path, partition_rows):
    """The flat rule counts shape, as the tiny rule does: a 100000x1 strip and a 1x100000
    strip of one colour, or a 300x10 and a 10x300 bar, are different images; a copy of the
    same shape (another size, another format) still merges; several shards, two workers,
    the global phase in one process and in tasks."""
    colour = (90, 140, 200)
    shards = [
        [
            ("strip_h.png", png(solid(colour, (100_000, 1)))),
            ("wide.png", png(solid(colour, (300, 10)))),
            ("square.png", png(solid(colour, (64, 64)))),
        ],
        [
            ("strip_v.png", png(solid(colour, (1, 100_000)))),
            ("tall.png", png(solid(colour, (10, 300)))),
            ("wide2.png", png(solid(colour, (600, 20)))),
            ("square2.jpg", jpeg(solid(colour, (96, 96)))),
        ],
    ]
    rows = dedup_run(tmp_path, shards, keep="first", partition_rows=partition_rows)
    assert removed(rows) == {"wide2": ("flat", "wide"), "square2": ("flat", "square")}
    codes = shape_code(np.array([100_000, 1, 300, 600, 64]), np.array([1, 100_000, 10, 20, 64]))
    assert codes.tolist() == [255, 0, 207, 207, 128]  # 128 + 16 log2(w / h), clipped
