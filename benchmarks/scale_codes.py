"""pHash codes with the skew of real photographs, for benchmarks of the global phase.

Uniform random codes understate the work of pair finding by orders of magnitude: two
unrelated photographs fall within 8 bits far more often than two random words, and
their codes crowd into a few buckets of every chunk table. The codes here are hashes
of real photographs that ship inside installed packages (scikit-image, scikit-learn,
matplotlib, PyWavelets), each tile a random view of one of them:

- a crop at a random position, scale (10% to 100% of the short side) and aspect ratio
  (0.6 to 1.67), usually upright and otherwise turned a few degrees or by quarter
  turns, mirrored half the time;
- one of the photograph's grey renderings (luma, or its red, green or blue channel);
- a tone curve: gamma 0.67 to 1.5, contrast 0.7 to 1.3, brightness -30 to +30;
- a tenth are two-picture collages (left and right, or top and bottom halves) and a
  twentieth double exposures (two views blended), so that the set is not only views of
  a few dozen scenes; a twentieth come from scikit-image's LFW subset (100 faces and
  100 non-face patches of the same photographs, 25x25 each).

A tile is rendered straight to the 32x32 grey image that pHash transforms, sampled
bilinearly (a numba loop) from a 2x2 box pyramid of the photograph, at the level whose
pixel is just under one output pixel: about 35 us a tile on one core, and 13 us more
for the hash, so 10 million tiles take about 4 minutes on two idle cores and 100
million about 40. `imagehash.phash` of that 32x32 image is bit for bit the code here
(PIL's resize to the same size is a copy); `lanczos_codes` hashes the same upright
crops through PIL's full-size Lanczos resize, as imagehash does on a real file, for
comparing the statistics of the two paths (`check`).

Tiles whose pHash is low-detail (dedup compares those by colour signature instead)
are dropped, as the pipeline drops them from the pHash search. Tiles are made in
chunks of CHUNK, each from its own seed, and cached as .npy under `cache_dir`, so any
n is the first n detailed tiles of the same stream and runs can share them.

Planted copies (`plant_copies`) follow `uniform_codes`: a fifth of the rows become
near copies (0 to 6 distinct random bit flips) of an earlier row, a tenth exact
repeats. `realistic_codes` returns the planted set; `tile_codes` the unplanted tiles
with their source photographs, for statistics.

`python benchmarks/scale_codes.py N [N ...]` builds and caches the planted sets;
`python benchmarks/scale_codes.py 0` runs `check` (imagehash equality, Lanczos path).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from dedup.signals.phash import IMG_SIZE, is_low_detail, phash_and_detail

VERSION = "v1"
CHUNK = 1 << 20  # tiles per cached chunk (before low-detail ones are dropped)
BATCH = 4096  # tiles rendered at once
MAX_SIZE = 1024  # photographs are shrunk to this long side first

# Shares of the tile kinds (the rest are single views of one photograph).
COLLAGE = 0.10
BLEND = 0.05
FACE = 0.05
FACE_ID = 1000  # source ids of faces start here (photographs are numbered from 0)
NO_SOURCE = -1
SCALE_RANGE = (0.1, 1.0)  # crop side as a share of the short side, log-uniform
# Gamma values (log-spaced, 0.67 to 1.5) and their curves over the 256 grey levels.
GAMMAS = np.exp(np.linspace(np.log(1 / 1.5), np.log(1.5), 65))
GAMMA_CURVES = 255.0 * (np.arange(256) / 255.0)[None, :] ** GAMMAS[:, None]

# Planted copies, as in `uniform_codes`: a fifth of the rows are near copies
# (up to 6 random bit flips) of an earlier row's code, a tenth exact repeats.
NEAR_SHARE = 0.2
EXACT_SHARE = 0.1
MAX_FLIPS = 6


def _site(package: str) -> str:
    module = __import__(package)
    return os.path.dirname(module.__file__)


def _photo_files() -> list[tuple[str, callable]]:
    """(name, loader) of every bundled photograph used; a loader returns a PIL image."""
    skimage_data = os.path.join(_site("skimage"), "data")
    sklearn_images = os.path.join(_site("sklearn"), "datasets", "images")
    mpl_sample = os.path.join(_site("matplotlib"), "mpl-data", "sample_data")
    # Photographs only: no drawings, test charts or logos (chessboard, color, horse,
    # logo, phantom), and one of each stereo pair or duplicate (motorcycle_right, and
    # PyWavelets' camera, which is scikit-image's).
    skimage_names = [
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
        "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
        "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
        "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
    ]  # fmt: skip
    files = [(f"skimage/{name}", os.path.join(skimage_data, name)) for name in skimage_names]
    files += [
        ("sklearn/china.jpg", os.path.join(sklearn_images, "china.jpg")),
        ("sklearn/flower.jpg", os.path.join(sklearn_images, "flower.jpg")),
        ("matplotlib/grace_hopper.jpg", os.path.join(mpl_sample, "grace_hopper.jpg")),
    ]
    out = [(name, lambda path=path: Image.open(path)) for name, path in files]

    def pywt_image(name):
        import pywt.data

        return Image.fromarray(getattr(pywt.data, name)())

    out += [(f"pywt/{n}", lambda n=n: pywt_image(n)) for n in ("aero", "ascent")]
    return out


@dataclass
class Source:
    """One photograph: grey renderings, each a pyramid of float32 levels."""

    name: str
    width: int
    height: int
    renderings: list[list[np.ndarray]]  # [rendering][level] -> (h, w) float32


def _pyramid(grey: Image.Image) -> list[np.ndarray]:
    levels = [grey]
    while min(levels[-1].size) >= 8:
        levels.append(levels[-1].reduce(2))
    return [np.asarray(level, dtype=np.float32) for level in levels]


def _renderings(image: Image.Image) -> list[Image.Image]:
    if image.mode in ("L", "I;16", "I", "F"):
        return [image.convert("L")]
    rgb = image.convert("RGB")
    return [rgb.convert("L"), *rgb.split()]


@cache
def sources() -> tuple[list[Source], list[Source]]:
    """(photographs, faces), loaded once per process."""
    photos = []
    for name, load in _photo_files():
        image = load()
        image.load()
        if max(image.size) > MAX_SIZE:
            scale = MAX_SIZE / max(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        photos.append(
            Source(name, image.width, image.height, [_pyramid(g) for g in _renderings(image)])
        )
    lfw = np.load(os.path.join(_site("skimage"), "data", "lfw_subset.npy"))
    faces = [
        Source(f"lfw/{k}", 25, 25, [[np.asarray(face * 255.0, dtype=np.float32)]])
        for k, face in enumerate(lfw)
    ]
    return photos, faces


# ------------------------------------------------------------------ rendering


@dataclass
class Views:
    """Parameters of a batch of views, one row each (level-0 pixel coordinates)."""

    source: np.ndarray  # int: photographs from 0, faces from FACE_ID
    rendering: np.ndarray  # int: index into the source's renderings
    cx: np.ndarray
    cy: np.ndarray
    width: np.ndarray
    height: np.ndarray
    angle: np.ndarray  # radians
    quarter: np.ndarray  # quarter turns of the output, 0-3
    mirror: np.ndarray  # bool
    gamma: np.ndarray
    contrast: np.ndarray
    brightness: np.ndarray


def _draw_views(rng: np.random.Generator, n: int, faces: bool | np.ndarray) -> Views:
    photos, face_list = sources()
    face = np.broadcast_to(np.asarray(faces), (n,)).copy()
    pick_photo = rng.integers(0, len(photos), n)
    pick_face = rng.integers(0, len(face_list), n)
    source = np.where(face, FACE_ID + pick_face, pick_photo)
    chosen = [face_list[s - FACE_ID] if s >= FACE_ID else photos[s] for s in source]
    w = np.array([s.width for s in chosen], dtype=np.float64)
    h = np.array([s.height for s in chosen], dtype=np.float64)
    nrend = np.array([len(s.renderings) for s in chosen])
    rendering = (rng.random(n) * nrend).astype(np.int64)
    # Faces: most of the (already tight) face crop; photographs: 10% to 100% of the side.
    low, high = np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1])
    scale = np.where(face, rng.uniform(0.6, 1.0, n), np.exp(rng.uniform(low, high, n)))
    aspect = np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6), n))
    side = scale * np.minimum(w, h)
    cw = np.minimum(side * np.sqrt(aspect), w)
    ch = np.minimum(side / np.sqrt(aspect), h)
    turned = rng.random(n) < 0.15
    angle = np.where(turned, rng.normal(0.0, np.radians(8.0), n), 0.0)
    # The turned box must fit inside the photograph: shrink it where it does not.
    ex = np.abs(cw * np.cos(angle)) + np.abs(ch * np.sin(angle))
    ey = np.abs(cw * np.sin(angle)) + np.abs(ch * np.cos(angle))
    shrink = np.minimum(1.0, np.minimum(w / ex, h / ey))
    cw, ch, ex, ey = cw * shrink, ch * shrink, ex * shrink, ey * shrink
    cx = ex / 2 + rng.random(n) * (w - ex)
    cy = ey / 2 + rng.random(n) * (h - ey)
    quarter = np.where(rng.random(n) < 0.05, rng.integers(1, 4, n), 0)
    return Views(
        source=source,
        rendering=rendering,
        cx=cx,
        cy=cy,
        width=cw,
        height=ch,
        angle=angle,
        quarter=quarter,
        mirror=rng.random(n) < 0.5,
        gamma=GAMMAS[rng.integers(0, len(GAMMAS), n)],
        contrast=rng.uniform(0.7, 1.3, n),
        brightness=rng.uniform(-30.0, 30.0, n),
    )


def _render(views: Views) -> np.ndarray:
    """(n, 32, 32) uint8 tiles of a batch of views, tone curve applied."""
    table = _level_table()
    # The pyramid level whose pixel is just under one output pixel (step 1 to 2 there).
    step = np.minimum(views.width, views.height) / IMG_SIZE
    wanted = np.floor(np.log2(np.maximum(step, 1.0))).astype(np.int64)
    first = table.first[views.source, views.rendering]
    level = first + np.minimum(wanted, table.count[views.source, views.rendering] - 1)
    # Where output pixel (row, column) samples: centre + a * u + b * v, with u and v the
    # output position in -0.5..0.5; quarter turns and the mirror act on (u, v).
    cos, sin = np.cos(views.angle), np.sin(views.angle)
    ux, uy = cos * views.width, sin * views.width  # image step along u
    vx, vy = -sin * views.height, cos * views.height  # along v
    turn = views.quarter % 4
    # (u, v) -> (v, -u) per quarter turn, then u -> -u when mirrored.
    mu = np.where(views.mirror, -1.0, 1.0)
    coeffs = np.empty((len(turn), 4))
    for k in range(4):
        sel = turn == k
        # Column step (along output u) and row step (along output v) in image space.
        cu = [(1, 0), (0, -1), (-1, 0), (0, 1)][k]  # how u' maps onto (u, v)
        cv = [(0, 1), (1, 0), (0, -1), (-1, 0)][k]  # how v' maps onto (u, v)
        coeffs[sel, 0] = (cu[0] * ux[sel] + cu[1] * vx[sel]) * mu[sel]
        coeffs[sel, 1] = (cu[0] * uy[sel] + cu[1] * vy[sel]) * mu[sel]
        coeffs[sel, 2] = cv[0] * ux[sel] + cv[1] * vx[sel]
        coeffs[sel, 3] = cv[0] * uy[sel] + cv[1] * vy[sel]
    out = np.empty((len(turn), IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    _sample(
        table.pixels, table.offset[level], table.width[level], table.height[level],
        table.scale_x[level], table.scale_y[level], views.cx, views.cy, coeffs,
        GAMMA_CURVES, np.searchsorted(GAMMAS, views.gamma), views.contrast,
        views.brightness, out,
    )  # fmt: skip
    return out


def _sample_kernel(
    pixels, offset, width, height, scale_x, scale_y, cx, cy, coeffs, gamma_curves, gamma,
    contrast, brightness, out,
):  # fmt: skip
    side = out.shape[1]
    for t in range(out.shape[0]):
        w, h, base = width[t], height[t], offset[t]
        curve = gamma_curves[gamma[t]]
        lut = np.empty(256)
        for k in range(256):
            lut[k] = contrast[t] * (curve[k] - 128.0) + 128.0 + brightness[t]
        for row in range(side):
            v = (row + 0.5) / side - 0.5
            for col in range(side):
                u = (col + 0.5) / side - 0.5
                x = cx[t] + coeffs[t, 0] * u + coeffs[t, 2] * v
                y = cy[t] + coeffs[t, 1] * u + coeffs[t, 3] * v
                fx = min(max(x * scale_x[t] - 0.5, 0.0), w - 1.0)
                fy = min(max(y * scale_y[t] - 0.5, 0.0), h - 1.0)
                x0 = min(int(fx), max(w - 2, 0))
                y0 = min(int(fy), max(h - 2, 0))
                ax, ay = fx - x0, fy - y0
                i = base + y0 * w + x0
                dx = 1 if w > 1 else 0
                dy = w if h > 1 else 0
                top = pixels[i] * (1 - ax) + pixels[i + dx] * ax
                bottom = pixels[i + dy] * (1 - ax) + pixels[i + dy + dx] * ax
                value = min(max(top * (1 - ay) + bottom * ay, 0.0), 255.0)
                # Tone curve, interpolated in the table of whole grey levels.
                k = min(int(value), 254)
                f = value - k
                toned = lut[k] * (1 - f) + lut[k + 1] * f
                out[t, row, col] = np.uint8(min(max(round(toned), 0.0), 255.0))


def _compiled():
    import numba

    return numba.njit(cache=True, nogil=True)(_sample_kernel)


def _sample(*args) -> None:
    global _sample_fn
    if _sample_fn is None:
        _sample_fn = _compiled()
    _sample_fn(*args)


_sample_fn = None


@dataclass
class _Levels:
    """Every pyramid level of every source in one flat buffer, for vectorized lookups."""

    pixels: np.ndarray  # float32, all levels one after another
    offset: np.ndarray  # per level
    width: np.ndarray
    height: np.ndarray
    scale_x: np.ndarray  # level pixels per level-0 pixel
    scale_y: np.ndarray
    first: np.ndarray  # [source id, rendering] -> first level's row
    count: np.ndarray  # [source id, rendering] -> number of levels


@cache
def _level_table() -> _Levels:
    photos, faces = sources()
    ids = list(enumerate(photos)) + [(FACE_ID + k, f) for k, f in enumerate(faces)]
    first = np.zeros((FACE_ID + len(faces), 4), dtype=np.int64)
    count = np.ones((FACE_ID + len(faces), 4), dtype=np.int64)
    arrays, offset, width, height, scale_x, scale_y = [], [], [], [], [], []
    total = 0
    for sid, source in ids:
        for r, pyramid in enumerate(source.renderings):
            first[sid, r], count[sid, r] = len(offset), len(pyramid)
            for img in pyramid:
                offset.append(total)
                height.append(img.shape[0])
                width.append(img.shape[1])
                scale_x.append(img.shape[1] / source.width)
                scale_y.append(img.shape[0] / source.height)
                arrays.append(img.reshape(-1))
                total += img.size
    return _Levels(
        np.concatenate(arrays),
        np.array(offset, dtype=np.int64),
        np.array(width, dtype=np.int64),
        np.array(height, dtype=np.int64),
        np.array(scale_x),
        np.array(scale_y),
        first,
        count,
    )


def render_tiles(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32) uint8 tiles and (n, 2) int16 source ids (second one NO_SOURCE unless
    the tile mixes two photographs)."""
    kind = rng.random(n)
    collage = kind < COLLAGE
    blend = (kind >= COLLAGE) & (kind < COLLAGE + BLEND)
    faces = kind >= 1.0 - FACE
    first = _draw_views(rng, n, faces)
    pixels = _render(first)
    meta = np.full((n, 2), NO_SOURCE, dtype=np.int16)
    meta[:, 0] = first.source
    mixed = np.flatnonzero(collage | blend)
    if len(mixed):
        second = _draw_views(rng, len(mixed), False)
        other = _render(second)
        meta[mixed, 1] = second.source
        is_blend = blend[mixed]
        alpha = rng.uniform(0.3, 0.7, len(mixed))[:, None, None]
        blended = np.rint(alpha * pixels[mixed] + (1 - alpha) * other).astype(np.uint8)
        halves = pixels[mixed].copy()
        vertical = rng.random(len(mixed)) < 0.5
        half = IMG_SIZE // 2
        halves[vertical, :, half:] = other[vertical, :, half:]
        halves[~vertical, half:, :] = other[~vertical, half:, :]
        pixels[mixed] = np.where(is_blend[:, None, None], blended, halves)
    return pixels, meta


def lanczos_codes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes from the fast renderer, codes through PIL) for n upright single views:
    the PIL path crops the full-size rendering, resizes it to 32x32 with Lanczos (as
    imagehash does), then applies the same tone curve. Slow: for checking statistics."""
    photos, _ = sources()
    views = _draw_views(rng, n, False)
    views.angle[:] = 0.0
    views.quarter[:] = 0
    fast = phash_and_detail(_render(views))[0]
    smalls = []
    for k in range(n):
        src = photos[views.source[k]]
        image = Image.fromarray(np.rint(src.renderings[views.rendering[k]][0]).astype(np.uint8))
        box = (
            views.cx[k] - views.width[k] / 2,
            views.cy[k] - views.height[k] / 2,
            views.cx[k] + views.width[k] / 2,
            views.cy[k] + views.height[k] / 2,
        )
        small = image.resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS, box=box)
        if views.mirror[k]:
            small = small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        smalls.append(np.asarray(small, dtype=np.float64))
    x = 255.0 * (np.stack(smalls) / 255.0) ** views.gamma[:, None, None]
    x = views.contrast[:, None, None] * (x - 128.0) + 128.0 + views.brightness[:, None, None]
    slow = phash_and_detail(np.clip(np.rint(x), 0, 255).astype(np.uint8))[0]
    return fast, slow


# ------------------------------------------------------------------ cached stream


def _chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, chunk, 0x5C0DE5])


def make_chunk(seed: int, chunk: int, size: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Codes (k, 8) and source ids (k, 2) of the detailed tiles among `size` tiles."""
    rng = _chunk_rng(seed, chunk)
    codes, meta = [], []
    for start in range(0, size, BATCH):
        pixels, ids = render_tiles(rng, min(BATCH, size - start))
        code, detail = phash_and_detail(pixels)
        keep = ~is_low_detail(detail)
        codes.append(code[keep])
        meta.append(ids[keep])
    return np.concatenate(codes), np.concatenate(meta)


def _chunk_paths(cache_dir: str, seed: int, chunk: int) -> tuple[str, str]:
    stem = os.path.join(cache_dir, f"tiles-{VERSION}-s{seed}-c{chunk:05d}")
    return stem + ".codes.npy", stem + ".sources.npy"


def _save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.{os.getpid()}.tmp.npy"  # two runs may build the same chunk at once
    np.save(tmp, array)
    os.replace(tmp, path)


def _build_chunk(args: tuple[str, int, int]) -> int:
    cache_dir, seed, chunk = args
    codes_path, meta_path = _chunk_paths(cache_dir, seed, chunk)
    if not os.path.exists(codes_path):
        codes, meta = make_chunk(seed, chunk)
        _save(meta_path, meta)
        _save(codes_path, codes)
    return len(np.load(codes_path, mmap_mode="r"))


def tile_codes(
    n: int, seed: int = 0, cache_dir: str = "bench-data/codes", workers: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first n detailed tiles of stream `seed`: codes (n, 8) uint8 and source ids
    (n, 2) int16. Chunks are built (in `workers` processes) and cached as needed."""
    os.makedirs(cache_dir, exist_ok=True)
    workers = workers or min(2, os.cpu_count() or 1)
    sources()  # loaded before forking, shared by the workers
    counts: list[int] = []
    chunk = 0
    while sum(counts) < n:
        # Detailed tiles are about 97% of a chunk: build as many chunks as n will need.
        need = max(1, -(-(n - sum(counts)) * 100 // (97 * CHUNK)))
        batch = [(cache_dir, seed, c) for c in range(chunk, chunk + need)]
        if workers > 1 and len(batch) > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(workers, len(batch))) as pool:
                counts += pool.map(_build_chunk, batch, chunksize=1)
        else:
            counts += [_build_chunk(b) for b in batch]
        chunk += need
    codes = np.empty((n, 8), dtype=np.uint8)
    meta = np.empty((n, 2), dtype=np.int16)
    filled = 0
    for c in range(chunk):
        if filled == n:
            break
        codes_path, meta_path = _chunk_paths(cache_dir, seed, c)
        take = min(counts[c], n - filled)
        codes[filled : filled + take] = np.load(codes_path, mmap_mode="r")[:take]
        meta[filled : filled + take] = np.load(meta_path, mmap_mode="r")[:take]
        filled += take
    return codes, meta


def plant_copies(codes: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Codes with planted copies, and for each row the earlier row it copies (-1 where
    none): NEAR_SHARE near copies (0 to MAX_FLIPS random flips), EXACT_SHARE repeats."""
    n = len(codes)
    rng = np.random.default_rng([seed, 0xC0B1E5])
    words = codes.view(">u8").reshape(-1).astype(np.uint64)
    rows = np.arange(n)
    copied = np.full(n, -1, dtype=np.int64)
    kind = rng.random(n)
    near = (kind < NEAR_SHARE) & (rows > 0)
    exact = (kind >= NEAR_SHARE) & (kind < NEAR_SHARE + EXACT_SHARE) & (rows > 0)
    source = (rng.random(n) * rows).astype(np.int64)  # an earlier row
    flips = np.zeros(n, dtype=np.uint64)
    count = rng.integers(0, MAX_FLIPS + 1, n)
    for _ in range(MAX_FLIPS):  # distinct bits: a flipped bit is never flipped back
        free = np.bitwise_count(flips) < count
        bit = np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64)
        flips |= np.where(free, bit, np.uint64(0))
    planted = words.copy()
    planted[near] = words[source[near]] ^ flips[near]
    planted[exact] = words[source[exact]]
    copied[near | exact] = source[near | exact]
    return planted.astype(">u8").view(np.uint8).reshape(n, 8), copied


def uniform_codes(n: int, seed: int = 0) -> np.ndarray:
    """Uniform random codes with the same planted copies, for comparison: they
    understate the near pairs of real photographs by orders of magnitude."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    words |= rng.integers(0, 2, n, dtype=np.int64).astype(np.uint64)
    near = rng.random(n) < 0.2
    src = rng.integers(0, n, n)
    flips = np.zeros(n, dtype=np.uint64)
    for _ in range(6):  # up to 6 random bit flips
        bit = rng.integers(0, 64, n).astype(np.uint64)
        flips ^= np.where(rng.random(n) < 0.5, np.uint64(1) << bit, np.uint64(0))
    words[near] = words[src[near]] ^ flips[near]
    exact = rng.random(n) < 0.1
    words[exact] = words[src[exact]]
    return words.astype(">u8").view(np.uint8).reshape(n, 8)


def realistic_codes(n: int, seed: int = 0, cache_dir: str = "bench-data/codes") -> np.ndarray:
    """n pHash codes (n, 8) uint8 with the skew of real photographs and planted copies
    (see `plant_copies`); cached under `cache_dir`."""
    path = os.path.join(cache_dir, f"realistic-{VERSION}-n{n}-s{seed}.npy")
    if os.path.exists(path):
        return np.load(path)
    codes, _ = plant_copies(tile_codes(n, seed, cache_dir)[0], seed)
    _save(path, codes)
    return codes


def check(views: int = 100_000, sample: int = 2000, seed: int = 9) -> dict:
    """imagehash on `sample` tiles must give the codes here, bit for bit; and the fast
    renderer against PIL's Lanczos path on the same `views` upright views: how far the
    two codes of a view lie apart, and the near-pair rate of each set."""
    import faiss
    import imagehash

    from dedup.search.pairs import self_range_pairs

    rng = np.random.default_rng(seed)
    pixels, _ = render_tiles(rng, sample)
    codes = phash_and_detail(pixels)[0]
    mismatches = sum(
        bytes.fromhex(str(imagehash.phash(Image.fromarray(p)))) != c.tobytes()
        for p, c in zip(pixels, codes, strict=True)
    )
    fast, slow = lanczos_codes(rng, views)
    apart = np.bitwise_count(fast ^ slow).sum(axis=1)
    out = {"imagehash_sample": sample, "imagehash_mismatches": int(mismatches)}
    out["fast_vs_lanczos_bits"] = {
        "mean": float(apart.mean()),
        "median": float(np.median(apart)),
        "p90": float(np.percentile(apart, 90)),
    }
    for name, x in (("fast", fast), ("lanczos", slow)):
        index = faiss.IndexBinaryFlat(64)
        index.add(np.ascontiguousarray(x))
        i, _, _ = self_range_pairs(index, np.ascontiguousarray(x), 9)
        out[f"{name}_rate_within_8"] = len(i) / (views * (views - 1) / 2)
        out[f"{name}_bit_ones"] = np.round(np.unpackbits(x, axis=1).mean(axis=0), 3).tolist()
    return out


def main(sizes: list[int]) -> None:
    if sizes == [0]:
        import json

        print(json.dumps(check()))
        return
    for n in sizes:
        t = time.perf_counter()
        codes = realistic_codes(n)
        print(f"{n:,} codes in {time.perf_counter() - t:.1f} s: {codes.shape}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1_000_000])
