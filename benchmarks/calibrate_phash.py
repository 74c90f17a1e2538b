"""Measure pHash distances of planted near-duplicates and of unrelated images.

The default `phash_threshold` is chosen from this table: it must sit above what edits
of one picture produce and below what different pictures produce.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dedup.decode import normalize
from dedup.signals.phash import hamming, phash_batch, phash_input
from dedup.synth import HARD_EDITS, NEAR_EDITS, encode, make_image


def code(data: bytes) -> np.ndarray:
    return phash_batch(phash_input(normalize(Image.open(io.BytesIO(data))))[None])[0]


def _rgb(d: bytes) -> Image.Image:
    return Image.open(io.BytesIO(d)).convert("RGB")


STRONGER = {
    "jpeg_q25": lambda d: encode(_rgb(d), "JPEG", quality=25),
    "resize_quarter": lambda d: encode(_rgb(d).resize((64, 64)), "JPEG", quality=85),
    "brighten_25pct": lambda d: encode(ImageEnhance.Brightness(_rgb(d)).enhance(1.25), "JPEG"),
    "contrast_30pct": lambda d: encode(ImageEnhance.Contrast(_rgb(d)).enhance(1.3), "JPEG"),
    "blur_r3": lambda d: encode(_rgb(d).filter(ImageFilter.GaussianBlur(3)), "JPEG"),
}


def main(n: int = 1000) -> None:
    originals = [encode(make_image(10_000 + s), "JPEG", quality=85) for s in range(n)]
    codes = np.stack([code(d) for d in originals])
    print(f"{n} originals, 256x256 JPEG q85; distance of each edited copy to its original")
    print(f"{'edit':<16}{'mean':>7}{'p99':>6}{'max':>6}")
    for name, edit in {**NEAR_EDITS, **STRONGER, **HARD_EDITS}.items():
        d = np.array(
            [
                int(hamming(code(edit(o)), c))
                for o, c in zip(originals[:300], codes[:300], strict=True)
            ]
        )
        print(f"{name:<16}{d.mean():>7.2f}{np.percentile(d, 99):>6.0f}{d.max():>6}")
    iu = np.triu_indices(n, 1)
    d = hamming(codes[:, None], codes[None])[iu]
    print(
        f"\nunrelated pairs: {len(d):,}; min {d.min()}, p0.01 {np.percentile(d, 0.01):.0f}, "
        f"median {np.median(d):.0f}"
    )
    for t in (4, 6, 8, 10, 12, 14, 16):
        print(f"  pairs within {t:>2} bits: {(d <= t).sum():,}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
