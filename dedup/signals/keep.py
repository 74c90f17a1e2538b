"""Which copy survives: per-image keep features and the keep policy's order.

The features are cheap and come from what phase 1 already has: the image's bytes (its
JPEG quantization tables) and the decode the pHash makes (a draft of at least 32 pixels
a side; a colour JPEG's in YCbCr, its Y plane the grey decode, its Cb and Cr the
chroma). The policy is an ordered list of criteria; rows are ranked by the
first, ties broken by the next, and input order last, so the order is total and the
same whatever the partitioning.

Criteria (best first):
- `clean`: no evidence of an overlay: a picture inside an application frame (a
  screenshot), a caption or banner band (a flat band across the top or bottom holding
  strokes), uniform bars or a border. Worse evidence ranks lower: frame, caption, bars.
- `content`: more pixels of picture, after uniform bars, borders, caption bands and frames
  are taken away (compared in steps of about 9%: a re-encode or a copy with a border has
  the original's content; a resize or a crop has less).
- `quality`: lossless before lossy, then the JPEG quality its quantization tables say,
  in tiers (85 and above, 70-84, 50-69, 30-49, below): above about 85 a JPEG's artefacts
  are not visible, and a copy saved again at a higher quality is no better than its
  original, so the criteria after this one decide.
- `hub`: linked directly to more rows (summed over the signals), then closer to them (the
  mean distance in bits of the pHash's and the views' links, in steps of 4 bits). An
  original links to all its copies, each one edit away; copies of different kinds
  rarely link to each other.
- `typical`: a tone (mean grey level, contrast, chroma, and the noise below, measured
  inside the picture's box) nearer the median tone of the rows linked to it whole frame
  to whole frame (same bytes, the pHash; the views too where a row has bands; the
  noise's median over those at the row's own scale), in steps of 2 grey levels
  (engine.ranking): a brightness, contrast, saturation, noise or blur edit is the odd
  one out among re-encodes, resizes and padded copies of one picture.
- `noise`: less fine noise per level of contrast (Immerkaer's estimate on the pHash's
  decode, at the JPEG draft's scale): added noise, a watermark's strokes and JPEG's
  blocking raise it; a change of tone does not.
- `first`: input order.
- `largest`: pixels, then bytes (the old default; bars are pixels and noise is bytes).
- `json:FIELD[:asc|desc]` (from `keep_by`): a number in the sample's JSON sidecar,
  descending unless `:asc`; samples without a usable number rank after those with one.
"""

from __future__ import annotations

import json
import math
import struct

import numpy as np

from dedup.search.kernels import chroma_sum as _chroma_sum
from dedup.search.kernels import keep_measure as _keep_measure
from dedup.search.kernels import texture_sums as _texture_sums
from dedup.signals.phash import IMG_SIZE

# Overlay evidence, a bit each; `clean` ranks by the worst (frame > caption > bars).
BARS, CAPTION, FRAME = 1, 2, 4
OVERLAY_NAMES = {BARS: "bars", CAPTION: "caption", FRAME: "frame"}

LOSSLESS = 101  # `quality` of a lossless format (PNG, BMP, TIFF, lossless WebP)
UNKNOWN_QUALITY = 0

# keep_note: why a `json:` value is missing
NOTE_OK, NOTE_NO_FIELD, NOTE_NOT_NUMBER, NOTE_BAD_JSON, NOTE_NO_JSON = range(5)
NOTE_NAMES = ("ok", "missing_field", "not_a_number", "unparseable_json", "no_json_member")

# A band: lines from an edge whose pixels mostly (FLAT_SHARE) lie within BAND_TOLERANCE of
# the edge line's colour; it ends where the picture starts: a line mostly unlike it.
BAND_TOLERANCE = 12
FLAT_SHARE = 0.6
TEXT_LINES = 3
TEXT_SHARE = 0.10  # of the side: a caption's text in large type spans more lines than 3
PICTURE_SHARE = 0.35
MIN_BAND = 0.02  # of the side (and 2 lines at least): thinner bands are not counted
UNIFORM_LEVELS = 6  # a bar of one colour: its lines' grey levels span at most this
MAX_BAND = 0.35
STROKE_LEVELS = 40  # a pixel this far from the band's colour is a stroke (text, icons)
STROKE_SHARE = 0.02  # of a band's pixels: a band holding this many strokes has text
# A band of one exact colour: its lines mostly (EXACT_FLAT) within EXACT_TOLERANCE of the
# edge's colour, then a line mostly unlike it at that tolerance; counted where the first
# scan finds none, and only when it holds strokes: a caption band of one colour next to
# a picture of nearly that tone (a blue band under a dark blue sky, grey 65 against 60).
EXACT_TOLERANCE = 1
EXACT_FLAT = 0.8
BLEND_SHARE = 0.75  # the picture's box leaves out a line this much nearer the band
# The band search runs again inside the box it found, up to FRAME_ROUNDS times in all:
# an application window's toolbar and status bar cross its side margins, so the side
# lines are not flat until those are taken away (on bench-keep's drawn windows: the
# picture found whole in 75 of 125 after one round, 99 after two, 101 after three; on
# 2,160 real-photo tiles no picture more flagged, three of the 88 flagged cut deeper).
FRAME_ROUNDS = 3
# `noise` is measured at the scale of the pHash's JPEG draft: the largest of 1/1, 1/2, 1/4
# and 1/8 that leaves at least NOISE_SIDE pixels a side (Pillow's rule; the pHash drafts
# to its input's side); an image decoded larger (a PNG, a WebP, CLIP's decode) is
# box-reduced to it first, so every format and route measures at one scale.
NOISE_SIDE = IMG_SIZE
NOISE_DIGITS = 3  # rounded: one value on every platform's float arithmetic
# What the stored features depend on (the feature fingerprint).
CONSTANTS = (BAND_TOLERANCE, FLAT_SHARE, TEXT_LINES, TEXT_SHARE, PICTURE_SHARE, MIN_BAND, MAX_BAND,
             STROKE_LEVELS, STROKE_SHARE, UNIFORM_LEVELS, "dqt: nearest ijg table",
             "noise: immerkaer at the draft scale", NOISE_SIDE, NOISE_DIGITS,
             BLEND_SHARE, EXACT_TOLERANCE, EXACT_FLAT,
             "chroma: mean |cb-128|+|cr-128| at the draft scale",
             "tone: inside the picture's box", "rounds", FRAME_ROUNDS,
             "draft factor: nearest ratio")  # fmt: skip


def frame_features(gray: np.ndarray) -> tuple[float, int, tuple[int, int, int, int]]:
    """(content share, overlay bits, box) of a 2-D uint8 image: the share of the frame left
    after bands are taken from each side (uniform bars and borders, caption bands, an
    application's toolbars and margins), and the evidence: BARS, CAPTION (a band holding
    strokes at the top or the bottom), FRAME (bands on three sides, holding strokes: a
    screenshot). Per side, a band's lines are mostly (FLAT_SHARE) within BAND_TOLERANCE
    of the edge line's colour, but for runs of up to TEXT_SHARE of the side (TEXT_LINES
    lines at least) between two such lines (a line of text), and the picture starts
    sharply after it (a line at most PICTURE_SHARE alike); failing that, a band of one
    exact colour (EXACT_TOLERANCE, EXACT_FLAT) that holds strokes; without a clear edge, lines
    of one exact colour (spanning UNIFORM_LEVELS) make a bar, but only opposite another
    band (bars come in pairs; a flat sky on one side is no bar). The box (x0, y0, x1,
    y1; x1, y1 exclusive) is the picture inside the bands: the whole frame when there
    are none, where a band meets the picture on a blended line, past it. The search runs
    again inside the box (FRAME_ROUNDS in all) while it finds bands and leaves a quarter
    of each side: a window's side margins are found once its toolbar and status bar,
    which cross them, are taken away; bands on three sides over the rounds, one with
    strokes, make a FRAME.
    dedup.search.kernels.keep_measure does the work."""
    g = np.ascontiguousarray(gray, dtype=np.uint8)
    share, bits, x0, y0, x1, y1, *_ = _keep_measure(g, _NO_PLANES, False, _PARAMS)
    return float(share), int(bits), (int(x0), int(y0), int(x1), int(y1))


def severity(overlay: np.ndarray) -> np.ndarray:
    """How bad the overlay evidence is: 0 clean, then bars, caption, frame."""
    o = overlay.astype(np.int64)
    return np.where(o & FRAME, 3, np.where(o & CAPTION, 2, np.where(o & BARS, 1, 0)))


# The IJG's standard luminance table (JPEG Annex K), row by row; DQT segments store
# tables in zigzag order (ZIGZAG: the row-by-row index of each stored value).
_STD_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    dtype=np.float64,
)  # fmt: skip
ZIGZAG = np.array(
    [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48,
     41, 34, 27, 20, 13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15,
     23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63],
)  # fmt: skip


def jpeg_quality(data: bytes) -> int:
    """The IJG quality (1-100) whose scaling of the standard luminance table comes closest
    to the image's first quantization table (read from the DQT segment, no decode);
    UNKNOWN_QUALITY when the bytes are not a JPEG with one."""
    if data[:2] != b"\xff\xd8":
        return UNKNOWN_QUALITY
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return UNKNOWN_QUALITY
        marker = data[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xDB:
            body = data[pos + 4 : pos + 2 + length]
            if not body:
                return UNKNOWN_QUALITY
            precision = body[0] >> 4
            if precision:
                values = np.frombuffer(body[1:129], dtype=">u2").astype(np.float64)
            else:
                values = np.frombuffer(body[1:65], dtype=np.uint8).astype(np.float64)
            if len(values) != 64:
                return UNKNOWN_QUALITY
            return _quality_of(values)
        if marker in (0xDA, 0xD9):  # scan data: no table before it
            return UNKNOWN_QUALITY
        pos += 2 + length
    return UNKNOWN_QUALITY


def _ijg_table(quality: int) -> np.ndarray:
    """libjpeg's luminance table at `quality` (jpeg_quality_scaling, baseline: 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_STD_LUMA[ZIGZAG] * scale + 50) // 100, 1, 255)


_IJG_TABLES = np.stack([_ijg_table(q) for q in range(1, 101)])


_QUALITIES: dict[bytes, int] = {}  # tables seen -> quality: a data set has few tables


def _quality_of(table: np.ndarray) -> int:
    """The IJG quality whose luminance table is closest to `table` (exact for libjpeg's
    and Pillow's encoders; the nearest for others)."""
    key = table.tobytes()
    quality = _QUALITIES.get(key)
    if quality is None:
        quality = int(np.argmin(np.abs(_IJG_TABLES - table[None, :]).sum(axis=1))) + 1
        if len(_QUALITIES) < 4096:
            _QUALITIES[key] = quality
    return quality


def quality_of(data: bytes, image_format: str | None, img=None) -> int:
    """`quality` of an image's bytes: LOSSLESS for lossless formats, the JPEG estimate,
    UNKNOWN_QUALITY for the rest (GIF, lossy WebP, ...). `img`: the image as Pillow opened
    it, whose parsed tables (natural order) spare reading them again."""
    if image_format in ("PNG", "BMP", "TIFF"):
        return LOSSLESS
    if image_format == "WEBP" and data[12:16] == b"VP8L":
        return LOSSLESS
    if image_format in ("JPEG", "MPO"):
        tables = getattr(img, "quantization", None)
        if tables and 0 in tables and len(tables[0]) == 64:
            return _natural_quality(tuple(tables[0]))
        return jpeg_quality(data)
    return UNKNOWN_QUALITY


_NATURAL: dict[tuple, int] = {}  # Pillow's tables seen -> quality


def _natural_quality(table: tuple) -> int:
    """_quality_of for a table in natural order (as Pillow gives it)."""
    quality = _NATURAL.get(table)
    if quality is None:
        zigzag = np.asarray(table, dtype=np.float64)[ZIGZAG]
        quality = _quality_of(zigzag)
        if len(_NATURAL) < 4096:
            _NATURAL[table] = quality
    return quality


def quality_name(value: int) -> str:
    """`quality` as text: lossless, qN, or unknown."""
    if value == LOSSLESS:
        return "lossless"
    return "unknown" if value == UNKNOWN_QUALITY else f"q{value}"


def quality_tier(quality: np.ndarray) -> np.ndarray:
    """`quality` in tiers: lossless, then JPEG q85 and above, q70-84, q50-69, q30-49, lower,
    unknown."""
    q = np.asarray(quality, dtype=np.int64)
    return np.where(
        q == LOSSLESS, 6, np.searchsorted(np.array([1, 30, 50, 70, 85]), q, side="right")
    )


def content_bin(content_pixels: np.ndarray) -> np.ndarray:
    """Content pixels in steps of 1/8 of an octave of area (about 9%): equal content
    whatever the encoder's rounding, a resize or a crop less."""
    c = np.maximum(content_pixels.astype(np.float64), 1.0)
    return np.floor(np.log2(c) * 8).astype(np.int64)


def json_value(data: bytes | None, field: str) -> tuple[float, int]:
    """(value, note) of `field` (dots go into objects: a.b) in a JSON sidecar's bytes:
    NaN and a NOTE_* saying why when there is no usable number."""
    if data is None:
        return math.nan, NOTE_NO_JSON
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return math.nan, NOTE_BAD_JSON
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return math.nan, NOTE_NO_FIELD
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan, NOTE_NOT_NUMBER
    number = float(value)
    if not math.isfinite(number):
        return math.nan, NOTE_NOT_NUMBER
    return number, NOTE_OK


def is_json_name(name: str) -> bool:
    """Whether a member is a sample's JSON sidecar (its last extension is json)."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[1].lower() == "json"


def json_values(members, fields: list[str]) -> tuple[list[float], list[int]]:
    """Each keep_by field's value (NaN when unusable) and note, from a sample's first JSON
    member (members: objects with .name and .data)."""
    if not fields:
        return [], []
    data = next((m.data for m in members if is_json_name(m.name)), None)
    pairs = [json_value(data, f) for f in fields]
    return [v for v, _ in pairs], [n for _, n in pairs]


def noise_scale(width: int, height: int) -> int:
    """The reduction the pHash's JPEG draft applies to a width x height image."""
    fit = min(width // NOISE_SIDE, height // NOISE_SIDE)
    return next((s for s in (8, 4, 2) if s <= fit), 1)


def _draft_factor(decoded: int, full: int, width: int, height: int) -> int:
    """The box reduction that brings a side decoded at `decoded` pixels (of `full` at full
    size, in a width x height image) to the draft's scale (noise_scale): the nearest whole
    ratio (a 65-pixel side decoded in full is 2 of a 33-pixel draft side, not 1)."""
    target = -(-full // noise_scale(width, height))
    return max(1, int(decoded / target + 0.5)) if target else 1


def texture_of(gray, width: int, height: int, pixels=None, box=None) -> tuple[float, float, float]:
    """(noise, level, contrast) of a decoded image's grey levels (a PIL "L" image at any
    scale of a width x height image; `pixels`: its array, when at hand), measured at the
    draft's scale (see noise_scale): the mean grey level, its standard deviation, and the
    fine noise: Immerkaer's estimate (the mean absolute response to the 3x3 Laplacian
    difference mask, times sqrt(pi/2)/6) per 100 levels of contrast. Added noise, a
    watermark's strokes and JPEG's blocking raise the noise; a change of brightness or
    contrast moves the level and contrast but leaves the noise per contrast as it was.
    `box` (x0, y0, x1, y1 in the decode's pixels): measure the picture inside it only
    (frame_features' picture: a letterboxed or captioned copy measures as its original)."""
    k = _draft_factor(gray.width, width, width, height)
    if box is not None and tuple(box) != (0, 0, gray.width, gray.height):
        gray, pixels = gray.crop(tuple(box)), None
    if k >= 2:
        pixels = np.asarray(gray.reduce(k))
    elif pixels is None:
        pixels = np.asarray(gray)
    g = np.ascontiguousarray(pixels, dtype=np.uint8)
    if g.ndim != 2 or g.size == 0:
        return 0.0, 0.0, 0.0
    return _texture(*_texture_sums(g), *g.shape)


def _texture(lap: int, total: int, squares: int, h: int, w: int) -> tuple[float, float, float]:
    """(noise, level, contrast) from texture_sums' sums over h x w pixels."""
    if h <= 0 or w <= 0:
        return 0.0, 0.0, 0.0
    size = h * w
    level = total / size
    contrast = math.sqrt(max(squares / size - level * level, 0.0))
    inner = max(h - 2, 0) * max(w - 2, 0)
    value = lap / inner * math.sqrt(math.pi / 2) / 6 if inner else 0.0
    noise = 100 * value / max(contrast, 1.0)
    return tuple(round(v, NOISE_DIGITS) for v in (noise, level, contrast))


def chroma_of(image, ycbcr, width: int, height: int, box=None) -> float:
    """How colourful a decoded image is: the mean of |Cb - 128| + |Cr - 128| (ITU-R 601
    YCbCr, as JPEG stores it) at the draft's scale (see noise_scale). `ycbcr`: a JPEG's
    YCbCr draft (dedup.io.decode), already at that scale; else an RGB `image` (at any
    scale of a width x height image) is box-reduced to it first and converted; a grey
    image is 0. A saturation edit scales it by its factor, as a brightness or contrast
    edit does; re-encodes and resizes leave it. `box`: as texture_of's, in the decode's
    pixels. One compiled pass of integer sums (dedup.search.kernels.chroma_sum)."""
    whole = box is None or tuple(box) == (0, 0, image.width, image.height)
    if ycbcr is not None:  # at the draft's scale, in the decode's pixels
        planes = np.asarray(ycbcr)
        if not whole:
            x0, y0, x1, y1 = box
            planes = planes[y0:y1, x0:x1]
    elif image.mode == "RGB":
        k = _draft_factor(max(image.size), max(width, height), width, height)
        image = image if whole else image.crop(tuple(box))
        planes = np.asarray((image.reduce(k) if k >= 2 else image).convert("YCbCr"))
    else:
        return 0.0
    count = planes.shape[0] * planes.shape[1]
    if count == 0:
        return 0.0
    return _chroma(int(_chroma_sum(np.ascontiguousarray(planes))), count)


def _chroma(total: int, count: int) -> float:
    """chroma_of's value from chroma_sum's integer total over `count` pixels."""
    return round(total / count, NOISE_DIGITS) if count > 0 else 0.0


def content_of(
    gray: np.ndarray, width: int, height: int
) -> tuple[int, int, tuple[int, int, int, int]]:
    """(content pixels at full size, overlay bits, the picture's box in the decode's
    pixels) of a decoded image's grey levels (any scale) whose full size is width x
    height."""
    share, bits, box = frame_features(gray)
    return int(round(share * width * height)), bits, box


_NO_PLANES = np.zeros((1, 1, 3), dtype=np.uint8)
# keep_measure's parameters, in its order
_PARAMS = np.array(
    [BAND_TOLERANCE, FLAT_SHARE, TEXT_LINES, TEXT_SHARE, PICTURE_SHARE, MIN_BAND, MAX_BAND,
     UNIFORM_LEVELS, STROKE_LEVELS, STROKE_SHARE, EXACT_TOLERANCE, EXACT_FLAT, BLEND_SHARE,
     FRAME_ROUNDS],
    dtype=np.float64,
)  # fmt: skip


def measure(
    grey: tuple, width: int, height: int, image, ycbcr=None
) -> tuple[int, int, tuple[int, int, int, int], tuple[float, float, float, float]]:
    """Every keep feature of one decode: (content pixels, overlay bits, the picture's box,
    (noise, level, contrast, chroma)), as content_of, texture_of and chroma_of give
    them. `grey`: dedup.signals.views.grey_levels(image); `ycbcr`: a JPEG's YCbCr draft.
    A decode already at the draft's scale (every JPEG draft) is measured in one compiled
    pass (dedup.search.kernels.keep_measure); a larger one (a PNG, a WebP) is reduced
    first, by the three functions."""
    gray, pixels = grey
    colour = ycbcr is not None
    if _draft_factor(gray.width, width, width, height) >= 2 or (not colour and image.mode != "L"):
        content, bits, box = content_of(pixels, width, height)
        texture = texture_of(gray, width, height, pixels, box)
        return content, bits, box, (*texture, chroma_of(image, ycbcr, width, height, box))
    planes = np.asarray(ycbcr) if colour else _NO_PLANES
    share, bits, x0, y0, x1, y1, lap, total, squares, chroma = _keep_measure(
        np.ascontiguousarray(pixels, dtype=np.uint8), planes, colour, _PARAMS
    )
    h, w = int(y1 - y0), int(x1 - x0)
    texture = _texture(int(lap), int(total), int(squares), h, w)
    hue = _chroma(int(chroma), h * w) if colour else 0.0
    content = int(round(float(share) * width * height))
    return content, int(bits), (int(x0), int(y0), int(x1), int(y1)), (*texture, hue)
