"""The views signal: several hashes per image (trimmed frame, crops, mirror images) find
the copies one pHash of the whole frame misses, and never link two crops."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps

from dedup.commands.run import run
from dedup.core.config import Config
from dedup.core.errors import ConfigError
from dedup.io.decode import decode_image
from dedup.signals.keep import frame_features
from dedup.signals.phash import IMG_SIZE, phash_batch, phash_input
from dedup.signals.views import (
    KIND,
    NEVER,
    PLAIN,
    TRANSFORMED,
    VIEW_NAMES,
    WHOLE_VIEWS,
    code_words,
    content_box,
    grey_levels,
    view_codes,
    view_input,
)
from dedup.synth import PlantedSample, encode, make_image, write_shards


def codes_of(image: Image.Image, bands: bool = True) -> np.ndarray:
    """(VIEWS,) words of an image, through dedup's own JPEG draft decode, with the
    picture inside the bands the keep features find, as the extract phase does (without
    `bands`: the uniform-border trim alone)."""
    decoded = decode_image(encode(image, "JPEG", quality=90), Config(), draft=IMG_SIZE).image
    grey = grey_levels(decoded)
    picture = frame_features(grey[1])[2] if bands else None
    return code_words(view_codes([view_input(decoded, phash_input(decoded), grey, picture)]))[0]


def letterbox(image: Image.Image, colour=(0, 0, 0)) -> Image.Image:
    w, h = image.size
    out = Image.new("RGB", (w, h + h // 3), colour)
    out.paste(image, (0, h // 6))
    return out


def pillarbox(image: Image.Image, colour=(255, 255, 255)) -> Image.Image:
    w, h = image.size
    out = Image.new("RGB", (w + w // 3, h), colour)
    out.paste(image, (w // 6, 0))
    return out


def crop(image: Image.Image, share: float, corner: str) -> Image.Image:
    """`share` of each side cut: from two sides for a corner crop, evenly for "c"."""
    w, h = image.size
    cw, ch = round(w * (1 - share)), round(h * (1 - share))
    if corner == "c":
        x, y = (w - cw) // 2, (h - ch) // 2
    else:
        x = 0 if corner[1] == "l" else w - cw
        y = 0 if corner[0] == "t" else h - ch
    return image.crop((x, y, x + cw, y + ch))


def test_content_box_trims_uniform_borders_and_nothing_else():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (60, 80), dtype=np.uint8)
    framed = np.zeros((100, 80), dtype=np.uint8)
    framed[20:80] = picture
    assert content_box(framed) == (0, 20, 80, 80)
    padded = np.full((60, 120), 255, dtype=np.uint8)
    padded[:, 20:100] = picture
    padded[:, :20] = 250  # JPEG-like wobble within the tolerance
    assert content_box(padded) == (20, 0, 100, 60)
    assert content_box(picture) == (0, 0, 80, 60)
    # mostly one colour: trimming would leave a sliver, so the whole frame is kept
    sliver = np.full((100, 100), 255, dtype=np.uint8)
    sliver[45:55, 45:55] = 0
    assert content_box(sliver) == (0, 0, 100, 100)


def test_full_view_is_the_phash_and_mirror_views_are_the_mirrored_image():
    image = make_image(3, 256, 192)
    decoded = decode_image(encode(image, "JPEG", quality=90), Config(), draft=IMG_SIZE).image
    words = codes_of(image)
    phash = phash_batch(phash_input(decoded)[None])[0]
    assert int(words[0]) == int.from_bytes(phash.tobytes(), "big")
    mirrored = codes_of(ImageOps.mirror(image))
    mirror = VIEW_NAMES.index("mirror")
    assert int(np.bitwise_count(words[mirror] ^ mirrored[0])) <= 2
    assert int(np.bitwise_count(words[0] ^ mirrored[0])) > 16


def test_two_crops_and_two_mirrors_never_match_and_only_full_frames_are_plain():
    assert (KIND[WHOLE_VIEWS:, WHOLE_VIEWS:] == NEVER).all()
    mirrors = [VIEW_NAMES.index("mirror"), VIEW_NAMES.index("mirror_trim")]
    assert (KIND[np.ix_(mirrors, mirrors)] == NEVER).all()
    assert (KIND == PLAIN).sum() == 1 and KIND[0, 0] == PLAIN
    assert (KIND[0, :] == TRANSFORMED).sum() == len(VIEW_NAMES) - 1


def caption(image: Image.Image) -> Image.Image:
    """A white band under the picture, a fifth of its height, holding a line of text: not
    uniform, so the uniform-border trim keeps it; the keep features' bands find it."""
    w, h = image.size
    out = Image.new("RGB", (w, h + h // 5), (250, 250, 250))
    out.paste(image, (0, 0))
    font = ImageFont.load_default(size=h // 10)
    ImageDraw.Draw(out).text((6, h + h // 20), "Photo of the day", (10, 10, 10), font)
    return out


EDITS = {
    "mirror": ImageOps.mirror,
    "letterbox": letterbox,
    "pillarbox": pillarbox,
    "crop_tl10": lambda i: crop(i, 0.1, "tl"),
    "crop_br20": lambda i: crop(i, 0.2, "br"),
    "crop_c10": lambda i: crop(i, 0.1, "c"),
    "mirror_crop": lambda i: ImageOps.mirror(crop(i, 0.2, "tl")),
    "caption": caption,
}


@pytest.fixture(scope="module")
def edited(tmp_path_factory):
    """14 originals (first, in input order), a copy of each of the first eight by one
    edit, and hard negatives: a quadrant of original 11 and the two halves of original
    12 (crops of one picture that are not copies of it or of each other); 4 shards."""
    root = tmp_path_factory.mktemp("views")
    originals = [make_image(1000 + k, 256, 192) for k in range(14)]
    samples, truth = [], {}

    def add(image: Image.Image, label: str, quality: int = 90) -> None:
        key = f"{len(samples):04d}"
        samples.append(
            PlantedSample(key, {"jpg": encode(image, "JPEG", quality=quality)}, None, label)
        )
        truth[key] = label

    for k, image in enumerate(originals):
        add(image, f"original {k}")
    for k, (name, edit) in enumerate(EDITS.items()):
        add(edit(originals[k]), f"{name} {k}", quality=85)
    add(originals[11].crop((0, 0, 128, 96)), "quadrant 11")
    add(originals[12].crop((0, 0, 150, 192)), "left 12")
    add(originals[12].crop((106, 0, 256, 192)), "right 12")
    write_shards(samples, str(root / "in"), 6)
    return root, truth


def _removed(out: str, truth: dict) -> dict[str, tuple[str, str]]:
    rows = pq.read_table(f"{out}/dedup-report/samples.parquet").to_pylist()
    return {truth[r["key"]]: (truth[r["duplicate_of"]], r["reason"]) for r in rows if not r["kept"]}


def test_views_find_mirrored_padded_and_cropped_copies_that_phash_misses(edited, tmp_path):
    root, truth = edited
    base = {"keep": "first", "workers": 2, "verify": False}
    run([str(root / "in")], str(tmp_path / "phash"), Config(signals=("exact", "phash"), **base))
    assert _removed(str(tmp_path / "phash"), truth) == {
        "crop_c10 5": ("original 5", "phash")  # a 10% centre crop moves 4 bits of 64
    }
    out = str(tmp_path / "views")
    run([str(root / "in")], out, Config(signals=("exact", "phash", "views"), **base))
    want = {f"{name} {k}": (f"original {k}", "views") for k, name in enumerate(EDITS)}
    want["crop_c10 5"] = ("original 5", "phash")  # the stronger signal names it
    assert _removed(out, truth) == want  # the tile and the two halves are kept
    summary = json.loads(Path(out, "dedup-report", "summary.json").read_text())
    assert summary["counts"]["removed_by_reason"] == {"phash": 1, "views": len(EDITS) - 1}
    assert summary["thresholds"] == {"phash": 8, "views": 4}
    clusters = pq.read_table(f"{out}/dedup-report/clusters.parquet").to_pylist()
    signals = sorted(tuple(c["signals"]) for c in clusters)
    assert signals == [("phash", "views")] + [("views",)] * (len(EDITS) - 1)


def test_views_alone_link_a_copy_the_same_way_round_at_the_phash_threshold(edited, tmp_path):
    """Without the pHash signal, the views' plain combinations (whole frames, the same
    way round) stand in for it: the centre crop is linked by views."""
    root, truth = edited
    out = str(tmp_path / "o")
    run([str(root / "in")], out, Config(signals=("views",), keep="first", verify=False))
    removed = _removed(out, truth)
    assert removed["crop_c10 5"] == ("original 5", "views")
    assert len(removed) == len(EDITS)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"views_threshold": 30}, "views_threshold: 30 is outside 0..24"),
        (
            {"views_threshold": 6, "verify_threshold": 4},
            "verify_threshold: 4 is outside views_threshold",
        ),
        ({"verify_per_image": 0}, "verify_per_image: 0 must be at least 1"),
        ({"signals": ("views", "crops")}, "unknown signal 'crops'"),
    ],
)
def test_views_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config(**settings)


def _window(image: Image.Image) -> Image.Image:
    """The picture in an application window: a dark toolbar with text above it, light
    margins around it."""
    w, h = image.size
    window = Image.new("RGB", (round(w * 1.4), round(h * 1.45)), (235, 235, 235))
    draw = ImageDraw.Draw(window)
    top = round(h * 0.3)
    draw.rectangle((0, 0, window.width, top), fill=(60, 60, 70))
    font = ImageFont.load_default(size=top // 3)
    draw.text((10, 4), "File  Edit  View  Share", (240, 240, 240), font)
    window.paste(image, ((window.width - w) // 2, top))
    return window


def test_the_picture_inside_a_caption_band_or_an_app_window_is_a_view():
    """The trimmed view of a captioned copy, or of the picture in an application window,
    comes within the views' threshold of the original's full frame: every caption, and
    most windows (on a 1/8 draft the picture's edge blends into the margin); the
    uniform-border trim alone finds none of them."""
    trim, limit = VIEW_NAMES.index("trim"), Config().views_threshold
    matched = {"caption": 0, "window": 0}
    for seed in range(10):
        image = make_image(2000 + seed, 512, 384)
        full = codes_of(image)[0]
        for name, copy in (("caption", caption(image)), ("window", _window(image))):
            matched[name] += int(np.bitwise_count(full ^ codes_of(copy)[trim])) <= limit
            uniform = codes_of(copy, bands=False)[trim]
            assert int(np.bitwise_count(full ^ uniform)) > 2 * limit
    assert matched["caption"] == 10 and matched["window"] >= 7, matched
