"""The views signal's precision at scale: how often two unrelated pictures become a
candidate pair, at each threshold, for plain combinations (two whole frames the same way
round, as the pHash compares them) and for transformed ones (a crop or a mirror against
a whole frame); and what that rate means for 10 million and 1 billion images (README,
"Copies a pHash misses").

Pictures: random crops (30-70% of each side, anywhere) of the photographs bundled with
the bench extra's packages (`pip install -e '.[bench]'`), stored as JPEG q90 with the long
side 480 and coded through dedup's own decode. Only pairs of crops of *different*
photographs count as unrelated. A few million pairs bound a rate down to about 1e-6;
below that, the rate of uniformly random codes (binomial, times the number of
combinations compared) is the floor it cannot beat.

    python benchmarks/views_scale.py [--per-photo 120]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_codes import _photo_files  # noqa: E402  (the bundled photographs)

from dedup.core.config import Config  # noqa: E402
from dedup.io.decode import decode_image  # noqa: E402
from dedup.signals.phash import IMG_SIZE, LOW_DETAIL_BITS, phash_and_detail, phash_input  # noqa: E402
from dedup.signals.views import KIND, PLAIN, TRANSFORMED, code_words, view_codes, view_input  # noqa: E402

THRESHOLDS = (0, 2, 4, 6, 8, 10, 12, 14, 16)
SCALES = (10**7, 10**9)


def pictures(per_photo: int, seed: int = 0):
    """(photo index, JPEG bytes) of random crops of every bundled photograph."""
    rng = np.random.default_rng(seed)
    for p, (_, load) in enumerate(_photo_files()):
        photo = load().convert("RGB")
        w, h = photo.size
        for _ in range(per_photo):
            cw, ch = (rng.uniform(0.3, 0.7, 2) * (w, h)).astype(int)
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            tile = photo.crop((int(x), int(y), int(x + cw), int(y + ch)))
            scale = 480 / max(tile.size)
            tile = tile.resize((max(1, round(cw * scale)), max(1, round(ch * scale))))
            out = io.BytesIO()
            tile.save(out, "JPEG", quality=90)
            yield p, out.getvalue()


def random_rate(threshold: int, combos: int) -> float:
    """The chance that one of `combos` pairs of independent uniform 64-bit codes comes
    within `threshold` bits (union bound)."""
    within = sum(math.comb(64, k) for k in range(threshold + 1)) / 2**64
    return min(1.0, combos * within)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--per-photo", type=int, default=120)
    args = ap.parse_args()
    config = Config()
    photo, inputs = [], []
    for p, data in pictures(args.per_photo):
        image = decode_image(data, config, draft=IMG_SIZE).image
        small = phash_input(image)
        if phash_and_detail(small[None])[1][0] < LOW_DETAIL_BITS:
            continue  # low-detail: the signal leaves it to the colour rules
        photo.append(p)
        inputs.append(view_input(image, small))
    photo = np.asarray(photo)
    words = code_words(view_codes(inputs))
    n = len(words)
    unrelated = photo[:, None] != photo[None, :]
    pairs = int(np.triu(unrelated, 1).sum())
    best = {PLAIN: np.full((n, n), 99, np.int8), TRANSFORMED: np.full((n, n), 99, np.int8)}
    combos = {PLAIN: 0, TRANSFORMED: 0}
    for a, b in zip(*np.nonzero(KIND != 2), strict=True):
        kind = int(KIND[a, b])
        combos[kind] += 1
        d = np.bitwise_count(words[:, a][:, None] ^ words[:, b][None, :]).astype(np.int8)
        np.minimum(best[kind], np.minimum(d, d.T), out=best[kind])
    print(f"{n:,} crops of {len(set(photo.tolist()))} photographs; {pairs:,} unrelated pairs")
    print("| bits | plain: rate | random floor | transformed: rate | random floor |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    upper = np.triu(unrelated, 1)
    rates = {}
    for t in THRESHOLDS:
        row = [f"{t}"]
        for kind in (PLAIN, TRANSFORMED):
            hits = int((best[kind][upper] <= t).sum())
            rate = hits / pairs
            rates[(kind, t)] = rate
            shown = f"{rate:.1e} ({hits:,})" if hits else f"< {1 / pairs:.0e} (0)"
            row += [shown, f"{random_rate(t, combos[kind] // 2):.1e}"]
        print("| " + " | ".join(row) + " |")
    print("\nfalse candidates per image and in all, at the defaults (plain 8, transformed 4)")
    print("and at the grey zone's bound (16), from the measured rates:")
    for t_plain, t_transformed in ((8, 4), (16, 16)):
        rate = rates[(PLAIN, t_plain)] + rates[(TRANSFORMED, t_transformed)]
        for images in SCALES:
            total = rate * images * (images - 1) / 2
            print(
                f"  plain <= {t_plain}, transformed <= {t_transformed}: {images:.0e} images: "
                f"{total:.1e} pairs, {2 * total / images:.1f} per image"
            )


if __name__ == "__main__":
    main()
