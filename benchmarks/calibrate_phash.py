"""Measure pHash distances of planted near-duplicates and of unrelated images, and how
far dedup's fast JPEG path (grayscale draft decode) moves hashes from a full decode.

The default `phash_threshold` is chosen from these tables: it must sit above what
edits of one picture produce and below what different pictures produce.

`python benchmarks/calibrate_phash.py [N]` (2,000 originals by default); `--smoke`: 60
originals, a tenth of the draft-check images (tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from dedup.core.config import Config
from dedup.io.decode import decode_image
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


def varied_jpegs(originals: list[bytes], share: float = 1.0) -> dict[str, list[bytes]]:
    """JPEGs of several sizes, contents and qualities for the draft-versus-full check
    (`share` of the usual number of each)."""
    rng = np.random.default_rng(5)

    def gradient(k: int) -> Image.Image:
        y, x = np.mgrid[0:300, 0:400]
        angle = k * 0.7
        v = (np.cos(angle) * x + np.sin(angle) * y) / 500 * 255
        rgb = np.stack([v, v[::-1], 255 - v], -1)
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")

    def noise() -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "RGB")

    return {
        "shapes 512x384 q85": originals,
        "shapes 1632x1224 q90": [
            encode(make_image(50_000 + k, 1632, 1224), "JPEG", quality=90)
            for k in range(round(40 * share))
        ],
        "shapes 200x150 q75": [
            encode(make_image(60_000 + k, 200, 150), "JPEG", quality=75)
            for k in range(round(200 * share))
        ],
        "noise 256x256 q90": [
            encode(noise(), "JPEG", quality=90) for _ in range(round(100 * share))
        ],
        "gradients 400x300 q85": [
            encode(gradient(k), "JPEG", quality=85) for k in range(round(100 * share))
        ],
    }


def main(n: int = 2000, edited: int = 300, share: float = 1.0) -> None:
    originals = [encode(make_image(10_000 + s, 512, 384), "JPEG", quality=85) for s in range(n)]
    codes = np.stack([code(d) for d in originals])
    print("bits that the draft decode moves, against a full decode of the same JPEG:")
    for label, images in varied_jpegs(originals[:edited], share).items():
        moved = np.array([int(hamming(code(d), code(d, draft=False))) for d in images])
        print(
            f"  {label:<24} mean {moved.mean():5.2f}  p99 {np.percentile(moved, 99):3.0f}"
            f"  max {moved.max():3d}  ({len(images)} images)"
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("originals", nargs="?", type=int, default=2000)
    ap.add_argument("--smoke", action="store_true", help="60 originals, fewer draft checks")
    args = ap.parse_args()
    if args.smoke:
        main(60, 20, 0.1)
    else:
        main(args.originals)
