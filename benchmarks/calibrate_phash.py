"""Measure pHash distances of planted near-duplicates and of unrelated images, and how
far dedup's fast JPEG path (grayscale draft decode) moves hashes from a full decode.

The default `phash_threshold` is chosen from these tables: it must sit above what
edits of one picture produce and below what different pictures produce.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dedup.config import Config
from dedup.decode import decode_image
from dedup.signals.phash import IMG_SIZE, hamming, phash_batch, phash_input
from dedup.synth import HARD_EDITS, NEAR_EDITS, encode, make_image

CONFIG = Config()


def code(data: bytes, draft: bool = True) -> np.ndarray:
    """The code dedup computes: the product's decode path, draft or full."""
    image = decode_image(data, CONFIG, draft=IMG_SIZE if draft else None).image
    return phash_batch(phash_input(image)[None])[0]


def _rgb(d: bytes) -> Image.Image:
    return Image.open(io.BytesIO(d)).convert("RGB")


STRONGER = {
    "jpeg_q25": lambda d: encode(_rgb(d), "JPEG", quality=25),
    "resize_quarter": lambda d: encode(_rgb(d).resize((128, 96)), "JPEG", quality=85),
    "brighten_25pct": lambda d: encode(ImageEnhance.Brightness(_rgb(d)).enhance(1.25), "JPEG"),
    "contrast_30pct": lambda d: encode(ImageEnhance.Contrast(_rgb(d)).enhance(1.3), "JPEG"),
    "blur_r3": lambda d: encode(_rgb(d).filter(ImageFilter.GaussianBlur(3)), "JPEG"),
}


def main(n: int = 2000, edited: int = 300) -> None:
    originals = [encode(make_image(10_000 + s, 512, 384), "JPEG", quality=85) for s in range(n)]
    codes = np.stack([code(d) for d in originals])
    full = np.stack([code(d, draft=False) for d in originals[:edited]])
    moved = hamming(codes[:edited], full)
    print(
        f"draft vs full decode, {edited} JPEGs of 512x384: bits differing mean "
        f"{moved.mean():.2f}, p99 {np.percentile(moved, 99):.0f}, max {moved.max()}"
    )
    print(
        f"\n{n} originals, 512x384 JPEG q85; distance of each edited copy to its original "
        "(dedup's default draft path)"
    )
    print(f"{'edit':<16}{'mean':>7}{'p99':>6}{'max':>6}")
    for name, edit in {**NEAR_EDITS, **STRONGER, **HARD_EDITS}.items():
        d = np.array(
            [
                int(hamming(code(edit(o)), c))
                for o, c in zip(originals[:edited], codes[:edited], strict=True)
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
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
