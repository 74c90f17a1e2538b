"""The planted edit suite: recall of dedup per kind of edit, and its precision, on
real-looking pictures.

What it builds (once, cached under bench-data/edit-suite/; `--rebuild` redoes it):

- **Pictures.** The photographs bundled with scikit-image, scikit-learn, matplotlib and
  PyWavelets (`scale_codes._photo_files`, 24 of them; nothing is downloaded) are cut
  into distinct pictures: each photograph's whole frame and the tiles of one grid over
  it (4x4 for photographs of 800 px and more on the short side, 3x3 from 400 px, 2x2
  from 250 px, two halves side by side for long strips of text; the 102 px
  microaneurysms photograph gives its whole frame only). Every picture is resized to a
  long side of 480 to 640 px (drawn per picture) and stored as JPEG q90, grayscale
  photographs as grayscale JPEGs. Pictures whose pHash is low-detail through dedup's
  own decode path (near-flat tiles: the black sky of the Hubble field, the moon's
  surroundings) are left out: two of those look alike, and the flat rule that matches
  them is not what this suite measures. No two pictures of one photograph are copies:
  a tile covers at most half of its whole frame's side, grid tiles only touch, and the
  shifted tiles below share at most half their area with another tile.
- **Originals** (default 104), drawn round-robin over the photographs; each gets planted
  copies, and each copy's group is its original.
- **Edits.** Each edit is applied to the same number of originals (`--per-edit`,
  default 24; drawn so that every original gets about as many copies), to the decoded
  original JPEG, and stored as JPEG q90 unless said otherwise:

  | edit | what it does |
  | --- | --- |
  | exact | the original's bytes, unchanged |
  | jpeg_q40 | re-encoded as JPEG q40 |
  | resize_half | resized to half the width and height (Lanczos) |
  | blur | Gaussian blur, radius 2 px |
  | noise | Gaussian noise, sigma 8 grey levels, per pixel and channel |
  | brightness | brightness +30% (PIL ImageEnhance.Brightness 1.3) |
  | gray | converted to grayscale (stored as a grayscale JPEG); colour originals only |
  | watermark | matplotlib's logo, 30% of the width, 60% opaque, in the bottom right corner |
  | caption | an opaque black strip over the bottom 12% of the height, with a line of text |
  | mirror | flipped left to right |
  | letterbox | black bars above and below, each 12.5% of the picture's height |
  | pillarbox | black bars left and right, each 12.5% of the picture's width |
  | pillarbox_white | white bars left and right, each 12.5% of the width |
  | centre_crop_N | N% of the width and N% of the height cut, half from each side: |
  |  | centre_crop_20 keeps the middle 80% x 80% (as offset_crop_20 keeps a corner's) |
  | offset_crop_N | N% of the width cut from one side and N% of the height from one end, |
  |  | keeping one corner (drawn per copy, recorded): offset_crop_20 keeps 80% x 80% |
  | rotate_D | turned D degrees anticlockwise, then cropped to the largest centred |
  |  | rectangle of the same shape with no black corner (5 degrees keeps 85-92% of a side) |
  | a+b+... | the edits above, applied left to right, one encode at the end (q40 when |
  |  | jpeg_q40 is among them): mirror+offset_crop_10, letterbox+jpeg_q40, |
  |  | offset_crop_10+watermark, resize_half+gray+blur |

- **Distractors**: the remaining whole frames and grid tiles, unedited and without
  copies (some are tiles of an original's photograph: the pair categories below say so).
- **Hard negatives**, labelled with the category they were made for, never copies:
  `overlapping_tiles` (tiles shifted by half a tile from the grid, sharing a half or a
  quarter of their area with grid tiles; they exist only as hard negatives),
  `shared_watermark` (pictures that appear only with one of three stamps: the
  watermark edit's matplotlib logo in the corner, scikit-image's logo large and faint in
  the centre, or a large semi-transparent "(c) stock.example"; each stamp's pictures
  come from different photographs), `shared_template` (pictures that appear only inside
  one of two card designs, a "photo of the day" card and a polaroid with a caption and a
  logo; the design covers 46% and 37% of the card).

Every pair of samples of different groups has a category, by the first that applies:
the same photograph (`tile_vs_whole` when one picture's rectangle holds the other's,
`overlapping_tiles` when they overlap, `adjacent_tiles` when they touch, else
`same_photo_apart`), `shared_template`, `shared_watermark` (watermark copies carry the
corner logo too), else `unrelated`. Samples are shuffled into shards
(bench-data/edit-suite/shards, KEY.jpg and KEY.json with the sample's ground truth),
with neutral keys; bench-data/edit-suite/truth.json maps each key to its group, role,
edit and negative category.

Then dedup runs once per configuration, one at a time, as `dedup SHARDS --out
runs/NAME --workers 2 ARGS` (runs/NAME is deleted first; its output stays there for a
look at report.html, its log in runs/NAME.log), and each is scored from its
`dedup-report/samples.parquet`:

- a copy is **found** when its cluster is its original's (equal `cluster_id`); recall
  per edit is found / planted. Each found copy is credited to the `reason` of the
  removed one of the pair (the copy's, unless the copy survived; when neither survived,
  both link to a third sample, often a larger copy, and the copy's reason is its link
  to that one: counted apart as "third survivor"). A copy not found but sharing a
  cluster with another copy of its picture was split from its original by the star
  rule ("missed, with a sibling");
- **pair precision**: of all pairs of samples that share a cluster, the share in one
  group; false pairs are counted by category, and each category's row in the table is
  its linked pairs out of all its pairs in the data;
- **keeping**: pictures (groups) kept exactly once (the ideal), kept more than once (a
  copy missed), or lost (every sample removed for another picture's); originals removed
  for a copy of their own, by the surviving copy's edit (the survivor rule at work);
  samples removed for another picture's sample, by role.

The markdown tables go to stdout, everything to bench-data/edit-suite/results.json.
Defaults: 104 originals, 24 copies per edit, 8 shards, `--workers 2`, one configuration
`phash='--signals exact,phash'`; `--build-only` builds and prints the sizes:

    python benchmarks/edit_suite.py
    python benchmarks/edit_suite.py --config phash='--signals exact,phash' \\
        --config phash12='--signals exact,phash --phash-threshold 12'
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_codes import _photo_files, _site  # noqa: E402  (the bundled photographs)

from dedup.core.config import Config  # noqa: E402
from dedup.io.decode import decode_image  # noqa: E402
from dedup.signals.phash import IMG_SIZE, is_low_detail, phash_and_detail, phash_input  # noqa: E402
from dedup.synth import PlantedSample, write_shards  # noqa: E402

DEDUP_CONFIG = Config()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(REPO, "bench-data", "edit-suite")
# Bump when anything that changes the built data changes, so that a cached build is redone.
SUITE_VERSION = "v2"  # v2: centre crops cut N% of each side in all, half per side
SEED = 0
JPEG_QUALITY = 90
LONG_SIDE = (480, 640)  # each picture's long side is drawn from this range, inclusive

DEFAULT_ORIGINALS = 104
DEFAULT_PER_EDIT = 24
DEFAULT_SHARDS = 8
DEFAULT_CONFIGS = ("phash=--signals exact,phash",)

# How many pictures carry each stamp or sit in each card design (each from its own photo).
STAMPED = {"logo_corner": 9, "logo_centre": 9, "text": 9}
TEMPLATED = {"card": 10, "polaroid": 10}
WATERMARK_STAMP = "logo_corner"  # the watermark edit uses the first negatives' stamp

EDITS = (
    "exact",
    "jpeg_q40",
    "resize_half",
    "blur",
    "noise",
    "brightness",
    "gray",
    "watermark",
    "caption",
    "mirror",
    "letterbox",
    "pillarbox",
    "pillarbox_white",
    "centre_crop_5",
    "centre_crop_10",
    "centre_crop_20",
    "offset_crop_5",
    "offset_crop_10",
    "offset_crop_20",
    "rotate_2",
    "rotate_5",
    "mirror+offset_crop_10",
    "letterbox+jpeg_q40",
    "offset_crop_10+watermark",
    "resize_half+gray+blur",
)

# Pair categories, in the order the tables list them (see the module docstring).
CATEGORIES = (
    "tile_vs_whole",
    "adjacent_tiles",
    "overlapping_tiles",
    "same_photo_apart",
    "shared_watermark",
    "shared_template",
    "unrelated",
)
# Reasons dedup gives, in its own order; any other reason is listed after these.
KNOWN_REASONS = ("exact", "phash", "flat", "tiny", "clip")

HEADLINES = (
    "Breaking: city council approves new budget",
    "Live: the view from the scene this morning",
    "Exclusive pictures, all rights reserved",
    "Weekend special: our readers' best shots",
    "Update: more photos as the story develops",
)


# ------------------------------------------------------------------ pictures


@dataclass
class Picture:
    """One distinct picture, a group of the ground truth: its original and its copies."""

    group: int
    name: str  # photograph:tile, e.g. "skimage/astronaut.png:r0c1"
    photo: str
    rect: tuple[float, float, float, float]  # left, top, right, bottom, shares of the photo
    long_side: int
    role: str = "distractor"  # original | distractor | hard_negative
    negative: str | None = None  # for hard negatives, the category it was made for
    stamp: str | None = None
    template: str | None = None
    colour: bool = True
    data: bytes = b""  # the stored JPEG


def _grid(width: int, height: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid over a photograph of this size; (1, 1): none."""
    short = min(width, height)
    if max(width, height) / short > 1.8:  # long strips of text: two halves side by side
        return (2, 1) if width > height else (1, 2)
    if short >= 800:
        return 4, 4
    if short >= 400:
        return 3, 3
    if short >= 250:
        return 2, 2
    return 1, 1


def _shifted_tiles(cols: int, rows: int, rng: np.random.Generator) -> list[tuple[str, tuple]]:
    """Tiles shifted by half a tile from the grid: one sideways (half its area on each of
    two grid tiles) and one diagonally (a quarter on each of four), where the grid allows."""
    w, h = 1 / cols, 1 / rows
    out = []
    if cols >= 2 and rows >= 2:
        r = int(rng.integers(0, rows))
        c = int(rng.integers(0, cols - 1))
        out.append((f"h{r}{c}", ((c + 0.5) * w, r * h, (c + 1.5) * w, (r + 1) * h)))
        r, c = int(rng.integers(0, rows - 1)), int(rng.integers(0, cols - 1))
        rect = ((c + 0.5) * w, (r + 0.5) * h, (c + 1.5) * w, (r + 1.5) * h)
        out.append((f"d{r}{c}", rect))
    return out[: 1 if cols * rows <= 4 else 2]


def _fit_long_side(img: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _cut(photo: Image.Image, rect: tuple[float, ...]) -> Image.Image:
    w, h = photo.size
    left, top, right, bottom = rect
    return photo.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


def jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an L or RGB image (anything else is converted to RGB first)."""
    out = io.BytesIO()
    img = img if img.mode in ("L", "RGB") else img.convert("RGB")
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _low_detail(data: bytes) -> bool:
    """dedup's own test, through its own decode path: too few confident pHash bits."""
    image = decode_image(data, DEDUP_CONFIG, draft=IMG_SIZE).image
    _, detail = phash_and_detail(phash_input(image)[None])
    return bool(is_low_detail(detail)[0])


# ------------------------------------------------------------------ stamps and designs


def _font(size: int, face: str = "DejaVuSans-Bold.ttf") -> ImageFont.FreeTypeFont:
    """A font shipped with matplotlib, so that text looks the same on every machine."""
    path = os.path.join(_site("matplotlib"), "mpl-data", "fonts", "ttf", face)
    return ImageFont.truetype(path, max(8, size))


def _logo(which: str) -> Image.Image:
    if which == "matplotlib":
        path = os.path.join(_site("matplotlib"), "mpl-data", "sample_data", "logo2.png")
    else:
        path = os.path.join(_site("skimage"), "data", "logo.png")
    return Image.open(path).convert("RGBA")


def _faded(logo: Image.Image, width: int, opacity: float) -> Image.Image:
    height = max(1, round(logo.height * width / logo.width))
    logo = logo.resize((max(1, width), height), Image.Resampling.LANCZOS)
    logo.putalpha(logo.getchannel("A").point(lambda a: round(a * opacity)))
    return logo


def stamp(img: Image.Image, which: str) -> Image.Image:
    """The picture with one of the stamps of the module docstring, as RGB."""
    base = img.convert("RGBA")
    w, h = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    if which == "logo_corner":
        logo = _faded(_logo("matplotlib"), round(w * 0.30), 0.6)
        margin = round(min(w, h) * 0.03)
        layer.paste(logo, (w - logo.width - margin, h - logo.height - margin))
    elif which == "logo_centre":
        logo = _faded(_logo("skimage"), round(min(w, h) * 0.45), 0.4)
        layer.paste(logo, ((w - logo.width) // 2, (h - logo.height) // 2))
    elif which == "text":
        draw = ImageDraw.Draw(layer)
        font = _font(round(w / 11))
        text = "\u00a9 stock.example"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=2)
        xy = ((w - (right - left)) // 2, round(h * 0.72) - (bottom - top) // 2)
        draw.text(
            xy,
            text,
            font=font,
            fill=(255, 255, 255, 150),
            stroke_width=2,
            stroke_fill=(0, 0, 0, 90),
        )
    else:
        raise ValueError(f"unknown stamp {which!r}")
    return Image.alpha_composite(base, layer).convert("RGB")


def in_template(img: Image.Image, which: str) -> Image.Image:
    """The picture placed in one of two card designs (the same border and text for all)."""
    if which == "card":  # 640 x 640: a dark header, the picture 544 x 408, a footer line
        card = Image.new("RGB", (640, 640), (236, 231, 220))
        draw = ImageDraw.Draw(card)
        draw.rectangle((0, 0, 640, 96), fill=(28, 40, 64))
        draw.text((48, 26), "PHOTO OF THE DAY", font=_font(40), fill=(250, 250, 250))
        draw.rectangle((40, 120, 600, 544), outline=(28, 40, 64), width=8)
        window = (48, 128, 592, 536)
        footer = "Shot by our readers  |  send yours to photos@example.org"
        draw.text((48, 570), footer, font=_font(20, "DejaVuSans.ttf"), fill=(60, 60, 60))
    elif which == "polaroid":  # 600 x 720: white, a square picture, a caption, a logo
        card = Image.new("RGB", (600, 720), (250, 250, 248))
        draw = ImageDraw.Draw(card)
        draw.rectangle((0, 0, 599, 719), outline=(200, 200, 200), width=3)
        window = (40, 40, 560, 560)
        font = _font(34, "DejaVuSerif-Italic.ttf")
        draw.text((48, 590), "summer holidays, 2023", font=font, fill=(40, 40, 90))
        logo = _faded(_logo("matplotlib"), 160, 1.0)
        card.paste(logo, (600 - 40 - logo.width, 720 - 30 - logo.height), logo)
    else:
        raise ValueError(f"unknown template {which!r}")
    size = (window[2] - window[0], window[3] - window[1])
    card.paste(ImageOps.fit(img.convert("RGB"), size, Image.Resampling.LANCZOS), window[:2])
    return card


# ------------------------------------------------------------------ edits


def _pad(img: Image.Image, vertical: bool, colour: int, share: float = 0.125) -> Image.Image:
    """Bars of `share` of the height (vertical: above and below) or width, each side."""
    w, h = img.size
    fill = colour if img.mode == "L" else (colour,) * 3
    if vertical:
        pad = round(h * share)
        canvas = Image.new(img.mode, (w, h + 2 * pad), fill)
        canvas.paste(img, (0, pad))
    else:
        pad = round(w * share)
        canvas = Image.new(img.mode, (w + 2 * pad, h), fill)
        canvas.paste(img, (pad, 0))
    return canvas


def _centre_crop(img: Image.Image, share: float) -> Image.Image:
    """Cut `share` of the width and of the height, half from each side."""
    w, h = img.size
    dx, dy = round(w * share / 2), round(h * share / 2)
    return img.crop((dx, dy, w - dx, h - dy))


def _offset_crop(img: Image.Image, share: float, corner: str) -> Image.Image:
    """Cut `share` of the width and of the height from one side each, keeping `corner`
    (tl, tr, bl, br)."""
    w, h = img.size
    kw, kh = w - round(w * share), h - round(h * share)
    left = 0 if corner[1] == "l" else w - kw
    top = 0 if corner[0] == "t" else h - kh
    return img.crop((left, top, left + kw, top + kh))


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Turned anticlockwise, then cropped to the largest centred rectangle of the same
    shape that holds no corner of the canvas (a "straighten" tool's result)."""
    w, h = img.size
    turned = img.rotate(degrees, resample=Image.Resampling.BICUBIC)
    a = math.radians(abs(degrees))
    cos, sin = math.cos(a), math.sin(a)
    # The scaled rectangle's corners, turned back, must lie inside the original frame.
    scale = min(w / (w * cos + h * sin), h / (w * sin + h * cos))
    kw, kh = math.floor(w * scale), math.floor(h * scale)
    left, top = (w - kw) // 2, (h - kh) // 2
    return turned.crop((left, top, left + kw, top + kh))


def _caption(img: Image.Image, text: str) -> Image.Image:
    img = img.convert("RGB")
    w, h = img.size
    strip = round(h * 0.12)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, h - strip, w, h), fill=(0, 0, 0))
    # At most 45% of the strip high, and narrow enough for the line to fit the width.
    font = _font(min(round(strip * 0.45), round(w * 0.94 / (0.6 * len(text)))), "DejaVuSans.ttf")
    draw.text((round(w * 0.03), h - strip + round(strip * 0.25)), text, font=font, fill="white")
    return img


def _noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), img.mode)


# A step takes the picture, the copy's random generator and its notes (what was drawn).
Step = Callable[[Image.Image, np.random.Generator, dict], Image.Image]


def _offset_step(share: float) -> Step:
    def step(img, rng, notes):
        notes["corner"] = ("tl", "tr", "bl", "br")[int(rng.integers(0, 4))]
        return _offset_crop(img, share, notes["corner"])

    return step


def _caption_step(img, rng, notes):
    notes["caption"] = HEADLINES[int(rng.integers(0, len(HEADLINES)))]
    return _caption(img, notes["caption"])


STEPS: dict[str, Step] = {
    "jpeg_q40": lambda img, rng, notes: img,  # the quality of the final encode
    "resize_half": lambda img, rng, notes: img.resize(
        (max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS
    ),
    "blur": lambda img, rng, notes: img.filter(ImageFilter.GaussianBlur(2)),
    "noise": lambda img, rng, notes: _noise(img, 8.0, rng),
    "brightness": lambda img, rng, notes: ImageEnhance.Brightness(img).enhance(1.3),
    "gray": lambda img, rng, notes: img.convert("L"),
    "watermark": lambda img, rng, notes: stamp(img, WATERMARK_STAMP),
    "caption": _caption_step,
    "mirror": lambda img, rng, notes: ImageOps.mirror(img),
    "letterbox": lambda img, rng, notes: _pad(img, vertical=True, colour=0),
    "pillarbox": lambda img, rng, notes: _pad(img, vertical=False, colour=0),
    "pillarbox_white": lambda img, rng, notes: _pad(img, vertical=False, colour=255),
    **{
        f"centre_crop_{p}": (lambda img, rng, notes, s=p / 100: _centre_crop(img, s))
        for p in (5, 10, 20)
    },
    **{f"offset_crop_{p}": _offset_step(p / 100) for p in (5, 10, 20)},
    "rotate_2": lambda img, rng, notes: _rotate(img, 2.0),
    "rotate_5": lambda img, rng, notes: _rotate(img, 5.0),
}


def apply_edit(edit: str, original: bytes, rng: np.random.Generator) -> tuple[bytes, dict]:
    """(JPEG bytes of the copy, notes on what was drawn) for one named edit."""
    if edit == "exact":
        return original, {}
    steps = edit.split("+")
    img, notes = _decode(original), {}
    for step in steps:
        img = STEPS[step](img, rng, notes)
    return jpeg(img, 40 if "jpeg_q40" in steps else JPEG_QUALITY), notes


# ------------------------------------------------------------------ the data set


def _base_pictures(rng: np.random.Generator) -> tuple[list[Picture], list[Picture], int]:
    """(grid pictures, shifted tiles, pictures left out as low-detail), unassigned."""
    grid, shifted, dropped = [], [], 0
    for photo_name, load in _photo_files():
        photo = load()
        colour = photo.mode not in ("L", "I", "I;16", "F")
        photo = photo.convert("RGB" if colour else "L")
        cols, rows = _grid(*photo.size)
        tiles = [("whole", (0.0, 0.0, 1.0, 1.0))]
        if cols * rows > 1:
            tiles += [
                (f"r{r}c{c}", (c / cols, r / rows, (c + 1) / cols, (r + 1) / rows))
                for r in range(rows)
                for c in range(cols)
            ]
        for kind, entries in ((grid, tiles), (shifted, _shifted_tiles(cols, rows, rng))):
            for tile, rect in entries:
                long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
                image = _fit_long_side(_cut(photo, rect), long_side)
                data = jpeg(image)
                if _low_detail(data):
                    dropped += 1
                    continue
                kind.append(
                    Picture(
                        -1,
                        f"{photo_name}:{tile}",
                        photo_name,
                        rect,
                        long_side,
                        colour=colour,
                        data=data,
                    )
                )
    return grid, shifted, dropped


def _take_one(pool: list[Picture], photo: str, rng: np.random.Generator) -> Picture:
    """A random picture of `photo` from the pool, removed from it."""
    candidates = [p for p in pool if p.photo == photo]
    pick = candidates[int(rng.integers(0, len(candidates)))]
    pool.remove(pick)
    return pick


def _take_from_distinct_photos(
    pool: list[Picture], count: int, rng: np.random.Generator
) -> list[Picture]:
    """`count` pictures of the pool, each from a different photograph (removed from it)."""
    photos = sorted({p.photo for p in pool})
    order = rng.permutation(len(photos))
    taken = []
    for k in order[:count]:
        taken.append(_take_one(pool, photos[k], rng))
    if len(taken) < count:
        raise ValueError(f"only {len(photos)} photographs for {count} distinct ones")
    return taken


def _round_robin(pool: list[Picture], count: int, rng: np.random.Generator) -> list[Picture]:
    """`count` pictures of the pool drawn one photograph at a time (removed from it)."""
    taken = []
    while len(taken) < count and pool:
        photos = sorted({p.photo for p in pool})
        for k in rng.permutation(len(photos)):
            if len(taken) == count:
                break
            taken.append(_take_one(pool, photos[k], rng))
    if len(taken) < count:
        raise ValueError(f"only {len(taken)} pictures for {count} originals")
    return taken


def _assign_edits(
    originals: list[Picture], per_edit: int, rng: np.random.Generator
) -> list[tuple[str, Picture]]:
    """(edit, original) for every planted copy: per_edit originals per edit, each time
    those with the fewest copies so far (ties drawn), so that copies spread evenly."""
    load = Counter()
    planted = []
    for edit in EDITS:
        eligible = [p for p in originals if p.colour or "gray" not in edit.split("+")]
        if len(eligible) < per_edit:
            raise ValueError(f"{edit}: {len(eligible)} eligible originals for {per_edit}")
        order = rng.permutation(len(eligible))
        ranked = sorted(order, key=lambda k: load[eligible[k].group])  # stable: ties drawn
        for k in sorted(ranked[:per_edit]):
            load[eligible[k].group] += 1
            planted.append((edit, eligible[k]))
    return planted


def build(data_dir: str, n_originals: int, per_edit: int, n_shards: int) -> dict:
    """Make the pictures, copies and shards under data_dir; returns the ground truth."""
    rng = np.random.default_rng(SEED)
    grid, shifted, dropped = _base_pictures(rng)
    pool = list(grid)
    for which, count in TEMPLATED.items():
        for p in _take_from_distinct_photos(pool, count, rng):
            p.role, p.negative, p.template = "hard_negative", "shared_template", which
            p.data = jpeg(in_template(_decode(p.data), which))
    for which, count in STAMPED.items():
        for p in _take_from_distinct_photos(pool, count, rng):
            p.role, p.negative, p.stamp = "hard_negative", "shared_watermark", which
            p.data = jpeg(stamp(_decode(p.data), which))
    for p in _round_robin(pool, n_originals, rng):
        p.role = "original"
    for p in shifted:
        p.role, p.negative = "hard_negative", "overlapping_tiles"
    pictures = sorted(grid + shifted, key=lambda p: p.name)
    for g, p in enumerate(pictures):
        p.group = g
    originals = [p for p in pictures if p.role == "original"]

    # (picture, edit, bytes, stamp, notes) for every sample, originals and copies alike.
    rows = [
        (p, "original" if p.role == "original" else None, p.data, p.stamp, {}) for p in pictures
    ]
    for k, (edit, p) in enumerate(_assign_edits(originals, per_edit, rng)):
        data, notes = apply_edit(edit, p.data, np.random.default_rng([SEED, k]))
        copy_stamp = WATERMARK_STAMP if "watermark" in edit.split("+") else None
        rows.append((p, edit, data, copy_stamp, notes))

    order = rng.permutation(len(rows))
    samples, truth_samples = [], {}
    for i, pos in enumerate(order):
        p, edit, data, sample_stamp, notes = rows[pos]
        key = f"{i:06d}"
        truth = {
            "group": p.group,
            "picture": p.name,
            "role": "copy" if edit not in (None, "original") else p.role,
            "edit": edit,
            "negative": p.negative,
            "photo": p.photo,
            "stamp": sample_stamp,
            "template": p.template,
            **({"notes": notes} if notes else {}),
        }
        truth_samples[key] = truth
        meta = json.dumps({"caption": f"{p.name} ({edit or p.role})", "truth": truth})
        samples.append(
            PlantedSample(key, {"jpg": data, "json": meta.encode()}, p.group, edit or p.role)
        )

    shards_dir = os.path.join(data_dir, "shards")
    if os.path.isdir(shards_dir):
        shutil.rmtree(shards_dir)
    write_shards(samples, shards_dir, math.ceil(len(samples) / n_shards), prefix="edits")
    for s in samples:
        truth_samples[s.key]["shard"] = os.path.basename(s.shard)

    roles = Counter(p.role for p in pictures)
    truth = {
        "version": SUITE_VERSION,
        "params": _params(n_originals, per_edit, n_shards),
        "sizes": {
            "samples": len(samples),
            "shards": n_shards,
            "groups": len(pictures),
            "originals": roles["original"],
            "copies": len(samples) - len(pictures),
            "copies_per_edit": per_edit,
            "distractors": roles["distractor"],
            "hard_negatives": dict(
                sorted(Counter(p.negative for p in pictures if p.negative).items())
            ),
            "photographs": len({p.photo for p in pictures}),
            "left_out_low_detail": dropped,
        },
        "edits": {e: {"steps": e.split("+"), "planted": per_edit} for e in EDITS},
        "groups": {
            str(p.group): {
                "name": p.name,
                "photo": p.photo,
                "rect": [round(v, 6) for v in p.rect],
                "role": p.role,
                "negative": p.negative,
                "stamp": p.stamp,
                "template": p.template,
                "colour": p.colour,
                "long_side": p.long_side,
            }
            for p in pictures
        },
        "samples": truth_samples,
    }
    _write_json(os.path.join(data_dir, "truth.json"), truth)
    return truth


def _params(n_originals: int, per_edit: int, n_shards: int) -> dict:
    return {
        "seed": SEED,
        "originals": n_originals,
        "per_edit": per_edit,
        "shards": n_shards,
        "edits": list(EDITS),
        "stamped": STAMPED,
        "templated": TEMPLATED,
    }


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_or_build(data_dir: str, n_originals: int, per_edit: int, n_shards: int, rebuild: bool):
    """The ground truth of the cached build when it matches these settings, else a new one."""
    path = os.path.join(data_dir, "truth.json")
    if not rebuild and os.path.exists(path):
        with open(path) as f:
            truth = json.load(f)
        shards = {s["shard"] for s in truth["samples"].values()}
        if (
            truth.get("version") == SUITE_VERSION
            and truth.get("params")
            == json.loads(json.dumps(_params(n_originals, per_edit, n_shards)))
            and all(os.path.exists(os.path.join(data_dir, "shards", s)) for s in shards)
        ):
            return truth, False
    os.makedirs(data_dir, exist_ok=True)
    return build(data_dir, n_originals, per_edit, n_shards), True


# ------------------------------------------------------------------ pair categories


def pair_categories(truth: dict, keys: list[str]) -> np.ndarray:
    """(n, n) category index into CATEGORIES for every pair of samples of different
    groups (the first that applies, as in the module docstring); -1 within a group."""
    groups = truth["groups"]
    info = [truth["samples"][k] for k in keys]
    group = np.array([s["group"] for s in info])
    rect = np.array([groups[str(s["group"])]["rect"] for s in info], dtype=np.float64)

    def ids(values):
        names = {v: i for i, v in enumerate(sorted({v for v in values if v is not None}))}
        return np.array([names[v] if v is not None else -1 for v in values])

    photo = ids([s["photo"] for s in info])
    template = ids([s["template"] for s in info])
    stamp_id = ids([s["stamp"] for s in info])

    left, top, right, bottom = (rect[:, i] for i in range(4))
    eps = 1e-9
    ix = np.minimum(right[:, None], right[None]) - np.maximum(left[:, None], left[None])
    iy = np.minimum(bottom[:, None], bottom[None]) - np.maximum(top[:, None], top[None])

    # inside[a, b]: a's rectangle lies within b's.
    inside = (
        (left[:, None] >= left[None] - eps)
        & (top[:, None] >= top[None] - eps)
        & (right[:, None] <= right[None] + eps)
        & (bottom[:, None] <= bottom[None] + eps)
    )
    contains = inside | inside.T
    overlap = (ix > eps) & (iy > eps)
    touch = (ix > -eps) & (iy > -eps)
    same_photo = photo[:, None] == photo[None]
    cat = np.full((len(keys), len(keys)), CATEGORIES.index("unrelated"), dtype=np.int8)
    for name, where in reversed(
        [
            ("tile_vs_whole", same_photo & contains),
            ("overlapping_tiles", same_photo & overlap),
            ("adjacent_tiles", same_photo & touch),
            ("same_photo_apart", same_photo),
            ("shared_template", (template[:, None] == template[None]) & (template[:, None] >= 0)),
            ("shared_watermark", (stamp_id[:, None] == stamp_id[None]) & (stamp_id[:, None] >= 0)),
        ]
    ):
        cat[where] = CATEGORIES.index(name)
    cat[group[:, None] == group[None]] = -1
    return cat


# ------------------------------------------------------------------ running and scoring


def dedup_command() -> list[str]:
    """The dedup CLI of the running environment (its console script, else `-m dedup`)."""
    script = os.path.join(os.path.dirname(sys.executable), "dedup")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "dedup"]


def run_config(name: str, args: str, data_dir: str, workers: int) -> dict:
    """Run dedup on the suite's shards into a fresh runs/NAME; returns rc, times, paths."""
    out = os.path.join(data_dir, "runs", name)
    if os.path.exists(out):
        shutil.rmtree(out)  # dedup refuses a non-empty OUT it did not write; ours to clear
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cmd = [
        *dedup_command(),
        os.path.join(data_dir, "shards"),
        "--out",
        out,
        "--workers",
        str(workers),
        *shlex.split(args),
    ]
    log = os.path.join(data_dir, "runs", f"{name}.log")
    start = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - start
    report = os.path.join(out, "dedup-report")
    summary_path = os.path.join(report, "summary.json")
    phases = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            phases = json.load(f).get("phases", {})
    return {
        "command": shlex.join(cmd),
        "rc": rc,
        "wall_s": round(wall, 2),
        "log": log,
        "report": report,
        "phases": phases,
    }


def _reason_order(reasons) -> list[str]:
    return [r for r in KNOWN_REASONS if r in reasons] + sorted(set(reasons) - set(KNOWN_REASONS))


def score(truth: dict, samples_parquet: str) -> dict:
    """Recall per edit, pair precision and categories, and keeping, from one run's report."""
    rows = pq.read_table(samples_parquet).to_pylist()
    by_key = {r["key"]: r for r in rows}
    if len(by_key) != len(rows):
        raise ValueError("keys repeat in samples.parquet; the suite's keys are unique")
    keys = sorted(truth["samples"])
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise ValueError(f"{len(missing)} samples missing from the report, e.g. {missing[:3]}")
    info = truth["samples"]
    original_of = {s["group"]: k for k, s in info.items() if s["edit"] == "original"}

    # Recall per edit, and the reason of the removed one of each found pair.
    # Clusters holding each group's samples, to tell a copy the star rule split from its
    # original (in a cluster with a sibling copy, not with the original) from one missed.
    group_clusters = Counter((s["group"], by_key[k]["cluster_id"]) for k, s in info.items())
    recall = {e: _cell_counts() for e in truth["edits"]}
    for key, s in info.items():
        if s["role"] != "copy":
            continue
        copy, orig = by_key[key], by_key[original_of[s["group"]]]
        cell = recall[s["edit"]]
        cell["planted"] += 1
        if copy["cluster_id"] == orig["cluster_id"]:
            cell["found"] += 1
            cell["by_reason"][orig["reason"] if copy["kept"] else copy["reason"]] += 1
            # Neither survived: both link to a third sample, the copy by its reason.
            cell["third_survivor"] += not copy["kept"] and not orig["kept"]
        elif group_clusters[(s["group"], copy["cluster_id"])] > 1:
            cell["with_sibling_only"] += 1
    total = _cell_counts()
    for cell in recall.values():
        for name, value in cell.items():
            total[name] += value

    # Every pair of samples within a cluster, true when both are of one group.
    cat = pair_categories(truth, keys)
    position = {k: i for i, k in enumerate(keys)}
    group = np.array([info[k]["group"] for k in keys])
    clusters: dict[int, list[int]] = {}
    for k in keys:
        clusters.setdefault(by_key[k]["cluster_id"], []).append(position[k])
    linked = np.zeros_like(cat, dtype=bool)
    for members in clusters.values():
        idx = np.array(members)
        linked[np.ix_(idx, idx)] = True
    upper = np.triu(np.ones_like(linked), k=1)
    same_group = group[:, None] == group[None]
    in_cluster = int((linked & upper).sum())
    true_pairs = int((linked & upper & same_group).sum())
    all_true = int((upper & same_group).sum())
    categories = {}
    for c, name in enumerate(CATEGORIES):
        where = upper & (cat == c)
        categories[name] = {"pairs": int(where.sum()), "linked": int((where & linked).sum())}

    # Samples that share a cluster with another picture's sample, by role.
    linked_to_other = Counter()
    for members in clusters.values():
        if len({int(group[i]) for i in members}) > 1:
            linked_to_other.update(info[keys[i]]["role"] for i in members)

    # Keeping: one sample per group is the ideal.
    kept_per_group = Counter(info[k]["group"] for k in keys if by_key[k]["kept"])
    n_groups = len(truth["groups"])
    wrongly_removed, examples = Counter(), []
    for k in keys:
        r = by_key[k]
        if r["kept"] or r["duplicate_of"] is None:
            continue
        survivor = info.get(r["duplicate_of"])
        if survivor is not None and survivor["group"] == info[k]["group"]:
            continue
        wrongly_removed[info[k]["role"]] += 1
        if len(examples) < 20:
            examples.append(
                {
                    "key": k,
                    "picture": info[k]["picture"],
                    "role": info[k]["role"],
                    "edit": info[k]["edit"],
                    "reason": r["reason"],
                    "survivor": r["duplicate_of"],
                    "survivor_picture": survivor["picture"] if survivor else None,
                    "category": CATEGORIES[cat[position[k], position[r["duplicate_of"]]]]
                    if survivor
                    else None,
                }
            )
    # The survivor rule at work: which copy replaced an original of its own group.
    survivor_edits = Counter(
        info[by_key[k]["duplicate_of"]]["edit"]
        for k in keys
        if info[k]["role"] == "original"
        and not by_key[k]["kept"]
        and info.get(by_key[k]["duplicate_of"], {}).get("group") == info[k]["group"]
    )
    return {
        "recall": {e: _plain(c) for e, c in recall.items()},
        "total": _plain(total),
        "pairs": {
            "in_clusters": in_cluster,
            "true": true_pairs,
            "false": in_cluster - true_pairs,
            "precision": true_pairs / in_cluster if in_cluster else None,
            "true_pairs_in_data": all_true,
            "pair_recall": true_pairs / all_true if all_true else None,
        },
        "categories": categories,
        "keeping": {
            "groups": n_groups,
            "kept_once": sum(1 for n in kept_per_group.values() if n == 1),
            "kept_more": sum(1 for n in kept_per_group.values() if n > 1),
            "lost": n_groups - len(kept_per_group),
            "samples_kept": sum(kept_per_group.values()),
            "originals_removed_for_own_copy": sum(survivor_edits.values()),
            "own_copy_survivors_by_edit": dict(survivor_edits.most_common()),
            "removed_for_other_group": dict(sorted(wrongly_removed.items())),
            "linked_to_other_group": dict(sorted(linked_to_other.items())),
            "examples": examples,
        },
        "reasons": dict(Counter(r["reason"] for r in rows)),
    }


def _cell_counts() -> dict:
    return {
        "planted": 0,
        "found": 0,
        "by_reason": Counter(),
        "third_survivor": 0,
        "with_sibling_only": 0,
    }


def _plain(cell: dict) -> dict:
    out = dict(cell, by_reason=dict(cell["by_reason"]))
    out["recall"] = cell["found"] / cell["planted"] if cell["planted"] else None
    return out


# ------------------------------------------------------------------ printing


def _cell(k: int, n: int, digits: int = 0) -> str:
    """k/n and its percentage; a share that rounds to zero but is not says so."""
    if not n:
        return "-"
    share = f"{100 * k / n:.{digits}f}"
    if k and float(share) == 0:
        share = f"<{10**-digits:g}"
    return f"{k}/{n} ({share}%)"


def print_tables(truth: dict, results: dict) -> None:
    """Recall and negatives per configuration, reasons per configuration, then precision."""
    names = [n for n, r in results.items() if "score" in r]
    sizes = truth["sizes"]
    print(
        f"\n{sizes['samples']} samples in {sizes['shards']} shards: {sizes['originals']} "
        f"originals, {sizes['copies']} copies ({sizes['copies_per_edit']} per edit), "
        f"{sizes['distractors']} distractors, hard negatives "
        + ", ".join(f"{k} {v}" for k, v in sizes["hard_negatives"].items())
        + f"; {sizes['photographs']} photographs\n"
    )
    if not names:
        return
    print("| copies found (same cluster as the original) | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for edit in truth["edits"]:
        cells = [results[n]["score"]["recall"][edit] for n in names]
        print(f"| {edit} | " + " | ".join(_cell(c["found"], c["planted"]) for c in cells) + " |")
    totals = [results[n]["score"]["total"] for n in names]
    print(
        "| **all copies** | " + " | ".join(_cell(t["found"], t["planted"]) for t in totals) + " |"
    )
    print("| **pairs of different pictures linked** | " + " | ".join("" for _ in names) + " |")
    for category in CATEGORIES:
        cells = [results[n]["score"]["categories"][category] for n in names]
        print(
            f"| {category} | " + " | ".join(_cell(c["linked"], c["pairs"], 2) for c in cells) + " |"
        )
    print("| **wall time** | " + " | ".join(f"{results[n]['wall_s']:.1f} s" for n in names) + " |")

    for n in names:
        s = results[n]["score"]
        reasons = _reason_order(s["total"]["by_reason"])
        print(
            f"\n{n}: copies found, by the reason of the removed sample of the pair; of those,"
            " found through a third survivor; and copies missed that share a cluster with"
            " another copy of their picture (split from the original by the star rule)\n"
        )
        print("| edit | " + " | ".join(reasons) + " | third survivor | missed, with a sibling |")
        print("| --- |" + " ---: |" * (len(reasons) + 2))
        for edit, c in [*s["recall"].items(), ("**all copies**", s["total"])]:
            counts = [c["by_reason"].get(r, 0) for r in reasons]
            counts += [c["third_survivor"], c["with_sibling_only"]]
            print(f"| {edit} | " + " | ".join(map(str, counts)) + " |")

    print()
    for n in names:
        s, r = results[n]["score"], results[n]
        p, k = s["pairs"], s["keeping"]
        false_by = {c: v["linked"] for c, v in s["categories"].items() if v["linked"]}
        precision = f"{100 * p['precision']:.2f}%" if p["precision"] is not None else "-"
        recall = f"{100 * p['pair_recall']:.1f}%" if p["pair_recall"] is not None else "-"
        print(
            f"- {n}: pair precision {precision} ({p['true']} true of {p['in_clusters']} pairs "
            f"in clusters; pair recall {recall} of {p['true_pairs_in_data']}); "
            f"false pairs: {_counts(false_by)}"
        )
        print(
            f"  kept: {k['samples_kept']} samples for {k['groups']} pictures: kept once "
            f"{k['kept_once']}, more than once {k['kept_more']}, lost {k['lost']}"
        )
        print(
            f"  originals removed for a copy of their own: {k['originals_removed_for_own_copy']}"
            f" (survivor: {_counts(k['own_copy_survivors_by_edit'])})"
        )
        print(
            f"  removed for another picture's sample: {_counts(k['removed_for_other_group'])}; "
            f"in a cluster with another picture: {_counts(k['linked_to_other_group'])}"
        )
        phases = {
            ph: v["seconds"]
            for ph, v in r["phases"].items()
            if isinstance(v, dict) and "seconds" in v
        }
        timing = ", ".join(f"{ph} {sec:.1f} s" for ph, sec in phases.items())
        print(f"  time: {r['wall_s']:.1f} s wall" + (f" ({timing})" if timing else ""))


def _counts(counts: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in counts.items()) or "none"


# ------------------------------------------------------------------ main


def _parse_config(text: str) -> tuple[str, str]:
    name, sep, args = text.partition("=")
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME='DEDUP ARGS', got {text!r}")
    return name, args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        action="append",
        type=_parse_config,
        metavar="NAME='ARGS'",
        help="a configuration: a name and the dedup options to run it with; "
        f"repeatable (default: {DEFAULT_CONFIGS[0]})",
    )
    parser.add_argument("--data", default=DEFAULT_DIR, help="where the suite lives")
    parser.add_argument("--rebuild", action="store_true", help="build the data again")
    parser.add_argument("--build-only", action="store_true", help="build, run nothing")
    parser.add_argument(
        "--originals", type=int, default=DEFAULT_ORIGINALS, help="pictures that get copies"
    )
    parser.add_argument(
        "--per-edit",
        type=int,
        default=DEFAULT_PER_EDIT,
        help="copies planted per edit, each of a different original",
    )
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS, help="shards to write")
    parser.add_argument("--workers", type=int, default=2, help="dedup --workers")
    opts = parser.parse_args(argv)
    configs = opts.config or [_parse_config(c) for c in DEFAULT_CONFIGS]
    if len({n for n, _ in configs}) != len(configs):
        parser.error("configuration names repeat")

    start = time.monotonic()
    truth, built = load_or_build(
        opts.data, opts.originals, opts.per_edit, opts.shards, opts.rebuild
    )
    how = f"built in {time.monotonic() - start:.1f} s" if built else "cached"
    print(f"edit suite: {opts.data} ({how})", file=sys.stderr)
    if opts.build_only:
        print_tables(truth, {})
        return 0

    results = {}
    for name, args in configs:
        print(f"edit suite: running {name}: dedup ... {args}", file=sys.stderr)
        run = run_config(name, args, opts.data, opts.workers)
        samples = os.path.join(run["report"], "samples.parquet")
        if run["rc"] not in (0, 5) or not os.path.exists(samples):
            with open(run["log"]) as f:
                tail = f.read()[-2000:]
            print(f"edit suite: {name} failed (exit {run['rc']}):\n{tail}", file=sys.stderr)
        else:
            run["score"] = score(truth, samples)
        results[name] = {"args": args, **run}

    # Written before printing, so that a closed stdout (`| head`) cannot lose the results.
    out = {"sizes": truth["sizes"], "edits": truth["edits"], "configs": results}
    _write_json(os.path.join(opts.data, "results.json"), out)
    print(f"edit suite: results in {os.path.join(opts.data, 'results.json')}", file=sys.stderr)
    print_tables(truth, results)
    return 0 if all("score" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
