"""The `views` signal: several 64-bit DCT hashes per image, so that copies one pHash of
the whole frame cannot see are found without model weights: the trimmed frame (uniform
borders, letterbox, pillarbox, padding; or the picture inside the bands the keep
features find: a caption band with text, an application's toolbar and margins),
corner and centre crops of it, and the mirror image of the whole and the trimmed frame.

Two images are candidates when a code of one comes close to a code of the other and at
least one of the two codes is of a whole frame (full, trimmed or mirrored): a crop of
one picture matches the whole of its copy, but two crops never match each other
(neighbouring tiles of one photograph would), nor two mirrors (see KIND). The hashes
alone link the two full frames within phash_threshold and any other allowed pair within
the stricter views_threshold; the pairs beyond, up to the grey zone's bound, are what
dedup/engine/grey.py and dedup/engine/verify.py check by local features (link kind `verified`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dedup.core.config import Config
from dedup.search.kernels import border_runs
from dedup.search.pairs import hamming_pairs
from dedup.signals.phash import CODE_BYTES, DETAIL_FLOOR, IMG_SIZE, LOW_DETAIL_BITS
from dedup.signals.resample import BILINEAR, LANCZOS, resize_grey

# View order: a row's codes are stored in this order; a code equal to an earlier view's
# of the same image (a frame with nothing to trim, a symmetric picture) is dropped from
# the search, so the earlier, plainer view names the match.
CROP_FRACTIONS = (0.9, 0.8)  # share of the trimmed frame's width and height kept
CORNERS = ("tl", "tr", "bl", "br", "c")
VIEW_NAMES = ("full", "trim", "mirror", "mirror_trim") + tuple(
    f"{corner}{round(f * 100)}" for f in CROP_FRACTIONS for corner in CORNERS
)
VIEWS = len(VIEW_NAMES)  # 14
WHOLE_VIEWS = 4  # the first four: whole frames; the rest are crops
MIRRORED = np.array([name.startswith("mirror") for name in VIEW_NAMES])
VIEW_BYTES = VIEWS * CODE_BYTES
# A border row or column: every pixel within BORDER_TOLERANCE grey levels of the colour
# of the frame's outermost row (or column) on that side. JPEG at q40 moves a flat bar's
# pixels by up to 5 levels, away from its edge; the edge itself rings and is kept.
BORDER_TOLERANCE = 10
# Trim no more than this share of a side: a picture that is mostly one colour (a
# silhouette on white) keeps its frame rather than being cut to a sliver.
MAX_TRIM = 0.75


def content_box(gray: np.ndarray, tolerance: int = BORDER_TOLERANCE) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a 2-D uint8 image with uniform borders removed (x1, y1
    exclusive): each side drops its outer rows (or columns) while all their pixels are
    within `tolerance` of the middle of that side's outermost line (itself that uniform).
    The whole frame when trimming would leave less than 1 - MAX_TRIM of either side.
    One compiled pass (dedup.search.kernels.border_runs)."""
    h, w = gray.shape
    if not h or not w:
        raise ValueError("content_box of an empty image")
    top, bottom, left, right = border_runs(gray, tolerance)
    y0, y1, x0, x1 = top, h - bottom, left, w - right
    if (y1 - y0) < (1 - MAX_TRIM) * h or (x1 - x0) < (1 - MAX_TRIM) * w:
        return 0, 0, w, h
    return int(x0), int(y0), int(x1), int(y1)


# Crops are resampled from the trimmed frame on a GRID x GRID raster (one resize_grey),
# by fixed area-average matrices: all crops of a batch in two matrix products.
GRID = 64


def _area_matrix(start: float, stop: float) -> np.ndarray:
    """(32, GRID) weights averaging the grid interval [start, stop) (in grid cells) into
    32 equal cells."""
    edges = np.linspace(start, stop, IMG_SIZE + 1)
    cells = np.arange(GRID + 1, dtype=np.float64)
    lo = np.maximum(edges[:-1, None], cells[None, :-1])
    hi = np.minimum(edges[1:, None], cells[None, 1:])
    weights = np.clip(hi - lo, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def _crop_matrices() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = [], []
    for f in CROP_FRACTIONS:
        span = GRID * f
        for corner in CORNERS:
            left = (GRID - span) / 2 if corner == "c" else (0 if corner[1] == "l" else GRID - span)
            top = (GRID - span) / 2 if corner == "c" else (0 if corner[0] == "t" else GRID - span)
            rows.append(_area_matrix(top, top + span))
            cols.append(_area_matrix(left, left + span))
    return np.stack(rows).astype(np.float32), np.stack(cols).astype(np.float32)


# scipy's unnormalized DCT-II, its 8 lowest frequencies, as a matrix: the pHash's block
# is DCT8 @ pixels @ DCT8.T.
DCT8 = 2.0 * np.cos(
    np.pi * np.arange(8)[:, None] * (2 * np.arange(IMG_SIZE)[None, :] + 1) / (2 * IMG_SIZE)
)
# Each crop's resampling folded into the transform: block = rows @ grid @ cols.T.
CROP_ROWS, CROP_COLS = (
    np.ascontiguousarray((DCT8[None] @ m).astype(np.float32)) for m in _crop_matrices()
)
# A horizontal mirror flips the sign of the odd horizontal frequencies.
MIRROR_SIGNS = np.where(np.arange(8) % 2 == 1, -1.0, 1.0)[None, :]


@dataclass
class ViewInput:
    """What one image contributes to a batch: its full frame shrunk as the pHash shrinks
    it, its trimmed frame at 32 x 32 (None when nothing was trimmed) and at GRID x GRID."""

    full: np.ndarray
    trim: np.ndarray | None
    grid: np.ndarray


def grey_levels(image: Image.Image) -> tuple[Image.Image, np.ndarray]:
    """A decoded image in grayscale, as an image and as an array (made once: the views
    and the keep features both read them)."""
    gray = image if image.mode == "L" else image.convert("L")
    return gray, np.asarray(gray)


def view_input(
    image: Image.Image,
    full: np.ndarray,
    grey: tuple[Image.Image, np.ndarray] | None = None,
    picture: tuple[int, int, int, int] | None = None,
) -> ViewInput:
    """The views' pixels of a decoded image whose pHash input (32 x 32 uint8) is `full`:
    the trimmed frame on the GRID x GRID raster (Pillow's bilinear resize, bit for bit,
    by dedup.signals.resample; a float matrix product per image cost 5 ms at 2 MP, BLAS
    threads fighting the worker processes),
    and, when something was trimmed, the trimmed frame shrunk as the pHash shrinks.
    `grey`: grey_levels(image), when the caller has it. `picture`: the picture inside
    the bands the keep features found (dedup.signals.keep.frame_features: bars, caption
    bands, an application's frame), the trimmed frame when it is smaller than the
    uniform borders' (content_box), so that a screenshot or a captioned copy has its
    picture as a view."""
    _, pixels = grey if grey is not None else grey_levels(image)
    h, w = pixels.shape
    box = content_box(pixels)
    if picture is not None and _area(picture) < _area(box):
        box = picture
    trim = None
    if box != (0, 0, w, h):
        trim = resize_grey(pixels, (IMG_SIZE, IMG_SIZE), LANCZOS, box)
    grid = resize_grey(pixels, (GRID, GRID), BILINEAR, box)
    return ViewInput(full, trim, grid)


def _area(box: tuple[int, int, int, int]) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def view_codes(inputs: list[ViewInput]) -> np.ndarray:
    """(N, VIEW_BYTES) uint8 codes, in VIEW_NAMES order. A view with fewer than
    LOW_DETAIL_BITS confident bits (a crop of sky) gets the full frame's code, which the
    search drops as a repeat of the full view."""
    n = len(inputs)
    if n == 0:
        return np.zeros((0, VIEW_BYTES), dtype=np.uint8)
    full = np.stack([v.full for v in inputs]).astype(np.float64)
    trim = np.stack([v.full if v.trim is None else v.trim for v in inputs]).astype(np.float64)
    grid = np.stack([v.grid for v in inputs]).astype(np.float32)
    crops = np.matmul(np.matmul(CROP_ROWS[None], grid[:, None]), CROP_COLS.transpose(0, 2, 1))
    blocks = np.empty((n, VIEWS, 8, 8), dtype=np.float64)
    blocks[:, 0] = DCT8 @ full @ DCT8.T
    blocks[:, 1] = DCT8 @ trim @ DCT8.T
    blocks[:, 2] = blocks[:, 0] * MIRROR_SIGNS
    blocks[:, 3] = blocks[:, 1] * MIRROR_SIGNS
    blocks[:, WHOLE_VIEWS:] = crops
    flat = blocks.reshape(n, VIEWS, 64)
    median = np.median(flat, axis=2, keepdims=True)
    detail = (np.abs(flat - median) > DETAIL_FLOOR).sum(axis=2)
    codes = np.packbits(flat > median, axis=2)
    weak = detail < LOW_DETAIL_BITS
    codes[weak] = np.repeat(codes[:, :1], VIEWS, axis=1)[weak]
    return codes.reshape(n, VIEW_BYTES)


# How often two unrelated pictures come within each bound by some allowed combination of
# views (plain and transformed rates added), measured by benchmarks/views_scale.py on
# 2,870 crops of the bundled photographs (3.9 million pairs of different photographs;
# README, "Copies a pHash misses"). The grey zone's automatic bound is the largest whose
# unrelated candidates stay within GREY_BUDGET per image at the data's size.
UNRELATED_RATE = {0: 0.0, 2: 2.5e-7, 4: 1.5e-6, 6: 8.4e-6, 8: 3.3e-5, 10: 1.2e-4, 12: 4.0e-4,
                  14: 1.6e-3, 16: 8.1e-3}  # fmt: skip
GREY_BUDGET = 2.0


def grey_bound(rows: int) -> int:
    """The grey zone's bound for `rows` images (verify_threshold 0): at most GREY_BUDGET
    expected unrelated candidates per image."""
    fits = [t for t, rate in UNRELATED_RATE.items() if rate * max(rows - 1, 1) <= GREY_BUDGET]
    return max(fits)


def grey_zone(config: Config, rows: int) -> int:
    """The views signal's grey zone among `rows` images: pairs the hashes do not link up
    to this many bits are checked (verify_threshold, or for 0 the bound that suits the
    data's size); -1 without verification."""
    if not config.verify:
        return -1
    return config.verify_threshold or grey_bound(rows)


def search_bound(config: Config, rows: int) -> int:
    """The largest distance the views signal's search must find among `rows` images: the
    larger of its two thresholds and the grey zone's bound."""
    return max(config.phash_threshold, config.views_threshold, grey_zone(config, rows))


# A virtual row: one code of one image, searched as the pHash searches a row's code; its
# id orders by row, then view.
VIEW_BITS = 5


def virtual_ids(rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """int64 ids of (row, view) codes."""
    return (rows.astype(np.int64) << VIEW_BITS) | views.astype(np.int64)


def split_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, views) of virtual ids."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> VIEW_BITS, ids & ((1 << VIEW_BITS) - 1)


def distinct_codes(rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(virtual ids, big-endian uint64 words) of each row's distinct view codes; a code
    equal to an earlier view's of the same row is dropped. `codes`: (N, VIEW_BYTES)."""
    words = code_words(codes)
    keep = np.ones(words.shape, dtype=bool)
    for v in range(1, VIEWS):
        keep[:, v] = ~(words[:, :v] == words[:, v : v + 1]).any(axis=1)
    r, v = np.nonzero(keep)
    return virtual_ids(rows[r], v), words[r, v]


@dataclass
class ViewPairs:
    """Candidate pairs of rows (i < j) from pairs of codes: the smallest distance, whether
    it is within its combination's threshold (`strict`: linked by the hashes alone), and
    whether that match is between a mirror view and a plain one."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    strict: np.ndarray
    mirrored: np.ndarray


# The kind of each (view, view) combination. Plain: the two full frames, as the pHash
# compares them (its threshold applies). Transformed: a trimmed frame, a crop or a
# mirror against a whole frame (views_threshold applies, stricter: see README, "Copies a
# pHash misses"); a trim is transformed too, since it also trims the white around a
# cut-out object or above a caption. Never: two crops (neighbouring tiles of one photo
# share crops), and two mirrors (the same comparison as the two unmirrored views, with
# other rounding: a second chance for noise, not a new match).
PLAIN, TRANSFORMED, NEVER = 0, 1, 2
KIND = np.full((VIEWS, VIEWS), TRANSFORMED, dtype=np.int8)
KIND[WHOLE_VIEWS:, WHOLE_VIEWS:] = NEVER
KIND[np.ix_(MIRRORED, MIRRORED)] = NEVER
KIND[0, 0] = PLAIN


def row_pairs(
    a_ids: np.ndarray, b_ids: np.ndarray, distance: np.ndarray, plain: int, transformed: int
) -> ViewPairs:
    """Row pairs from code pairs (virtual ids). Pairs within one row and crop-to-crop
    pairs are dropped; a code pair is strict within `plain` bits for the two full frames,
    within `transformed` bits otherwise (KIND). Each row pair keeps its
    closest strict match if it has one, else its closest match (ties: the plain one)."""
    ra, va = split_ids(a_ids)
    rb, vb = split_ids(b_ids)
    kind = KIND[va, vb]
    ok = (ra != rb) & (kind != NEVER)
    ra, rb, va, vb, kind = ra[ok], rb[ok], va[ok], vb[ok], kind[ok]
    d = np.asarray(distance, dtype=np.int32)[ok]
    strict = d <= np.where(kind == PLAIN, plain, transformed)
    lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
    mirrored = MIRRORED[va] != MIRRORED[vb]
    order = np.lexsort((mirrored, d, ~strict, hi, lo))
    lo, hi, d, strict, mirrored = lo[order], hi[order], d[order], strict[order], mirrored[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return ViewPairs(lo[first], hi[first], d[first], strict[first], mirrored[first])


def code_words(codes: np.ndarray) -> np.ndarray:
    """(N, VIEWS) uint64 words of (N, VIEW_BYTES) codes."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    return codes.view(">u8").reshape(len(codes), VIEWS).astype(np.uint64)


def views_linked(a: np.ndarray, b: np.ndarray, plain: int, transformed: int) -> np.ndarray:
    """Row by row, whether two aligned (N, VIEW_BYTES) code arrays match by the hashes
    alone: some pair of views within its combination's threshold (see row_pairs)."""
    wa, wb = code_words(a), code_words(b)
    out = np.zeros(len(wa), dtype=bool)
    for va, vb in zip(*np.nonzero(KIND != NEVER), strict=True):
        limit = plain if KIND[va, vb] == PLAIN else transformed
        out |= np.bitwise_count(wa[:, va] ^ wb[:, vb]) <= limit
    return out


def view_pairs(vectors: np.ndarray, plain: int, transformed: int) -> ViewPairs:
    """Row pairs of distinct code vectors (N, VIEW_BYTES) that match by the hashes alone
    (see row_pairs): brute force over codes through hamming_pairs; the global phase finds
    the same pairs by partitioned multi-index hashing."""

    ids, words = distinct_codes(np.arange(len(vectors), dtype=np.int64), vectors)
    order = np.argsort(ids, kind="stable")
    ids, words = ids[order], words[order]
    codes = words.astype(">u8").view(np.uint8).reshape(-1, CODE_BYTES)
    i, j, d = hamming_pairs(codes, max(plain, transformed))
    found = row_pairs(ids[i], ids[j], d, plain, transformed)
    s = found.strict
    return ViewPairs(found.i[s], found.j[s], found.distance[s], s[s], found.mirrored[s])
