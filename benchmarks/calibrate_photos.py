"""pHash on real photographs: how far common web edits move a picture's code, and how
close unrelated pictures come (README, "The pHash threshold on real photographs").

The photographs are the ones bundled with scikit-image, scikit-learn, matplotlib and
PyWavelets (`pip install -e '.[bench]'`; nothing is downloaded). Each gives 14
distinct pictures per photograph: the whole frame, its four quadrants and its nine
thirds (3x3 grid). Tiles of one photograph are hard negatives (neighbouring and
overlapping parts of one scene), and a tile is not a duplicate of its whole frame.
Every picture is stored as a JPEG (q90, long side 480) and edited; codes are computed
through dedup's own decode path (the grayscale draft decode).

Unrelated pairs here number tens of thousands, which bounds a false-pair rate only down
to about 1e-4; the rate that matters at scale is far smaller. So each threshold also
gets the rate of two independent, uniformly random 64-bit codes (binomial), the
smallest it can be: real codes cluster, so real rates are higher.

    python benchmarks/calibrate_photos.py

`--smoke`: three photographs; without the bench extra, three synthetic pictures
(dedup.synth.make_image) stand in for them, and a line says so (the test suite runs it:
tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from itertools import combinations

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale_codes import _photo_files  # noqa: E402  (the bundled photographs)

from dedup.core.config import Config  # noqa: E402
from dedup.io.decode import decode_image  # noqa: E402
from dedup.signals.phash import IMG_SIZE, phash_batch, phash_input  # noqa: E402
from dedup.synth import make_image  # noqa: E402

CONFIG = Config()
THRESHOLDS = (4, 6, 8, 10, 12, 14, 16)
LONG_SIDE = 480


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


def code(data: bytes) -> int:
    image = decode_image(data, CONFIG, draft=IMG_SIZE).image
    return int.from_bytes(phash_batch(phash_input(image)[None])[0].tobytes(), "big")


def pictures(photos: list[tuple[str, callable]]) -> list[tuple[str, Image.Image]]:
    """(name, picture): 14 per photograph of `photos` ((name, loader) pairs)."""
    out = []
    for name, load in photos:
        photo = load().convert("RGB")
        w, h = photo.size
        frames = [("whole", photo)]
        frames += [
            (f"q{k}", photo.crop((x, y, x + w // 2, y + h // 2)))
            for k, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)])
        ]
        frames += [
            (f"t{r}{c}", photo.crop((c * w // 3, r * h // 3, (c + 1) * w // 3, (r + 1) * h // 3)))
            for r in range(3)
            for c in range(3)
        ]
        for part, frame in frames:
            scale = LONG_SIDE / max(frame.size)
            size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
            out.append((f"{name}:{part}", frame.resize(size, Image.Resampling.LANCZOS)))
    return out


def _crop(img, left, top, right, bottom):
    w, h = img.size
    return img.crop((round(w * left), round(h * top), round(w * right), round(h * bottom)))


def _pad(img, vertical: bool, share: float = 0.125):
    w, h = img.size
    if vertical:  # letterbox: bars above and below
        pad = round(h * share)
        canvas = Image.new("RGB", (w, h + 2 * pad))
        canvas.paste(img, (0, pad))
    else:  # pillarbox
        pad = round(w * share)
        canvas = Image.new("RGB", (w + 2 * pad, h))
        canvas.paste(img, (pad, 0))
    return canvas


def _overlay(img, caption: bool):
    img = img.convert("RGB").copy()
    draw = ImageDraw.Draw(img, "RGBA")
    w, h = img.size
    font = ImageFont.load_default(size=max(12, h // 14))
    if caption:  # a caption bar across the bottom
        draw.rectangle((0, round(h * 0.86), w, h), fill=(0, 0, 0, 255))
        draw.text((8, round(h * 0.88)), "Breaking: caption text here", fill="white", font=font)
    else:  # a semi-transparent watermark in a corner
        draw.text((w // 2, h - h // 8), "(c) stock.example", fill=(255, 255, 255, 140), font=font)
    return img


def _noise(img, sigma: float = 6.0):
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    arr += np.random.default_rng(0).normal(0, sigma, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


EDITS = {
    "JPEG q50": lambda i: jpeg(i, 50),
    "resize to 50%": lambda i: jpeg(i.resize((i.width // 2, i.height // 2)), 85),
    "brightness +20%": lambda i: jpeg(ImageEnhance.Brightness(i).enhance(1.2)),
    "contrast +30%": lambda i: jpeg(ImageEnhance.Contrast(i).enhance(1.3)),
    "blur r1.5": lambda i: jpeg(i.filter(ImageFilter.GaussianBlur(1.5))),
    "noise sigma 6": lambda i: jpeg(_noise(i)),
    "grayscale": lambda i: jpeg(i.convert("L")),
    "watermark": lambda i: jpeg(_overlay(i, caption=False)),
    "caption bar": lambda i: jpeg(_overlay(i, caption=True)),
    "centre crop 95%": lambda i: jpeg(_crop(i, 0.025, 0.025, 0.975, 0.975)),
    "centre crop 90%": lambda i: jpeg(_crop(i, 0.05, 0.05, 0.95, 0.95)),
    "centre crop 80%": lambda i: jpeg(_crop(i, 0.1, 0.1, 0.9, 0.9)),
    "offset crop 10%": lambda i: jpeg(_crop(i, 0.0, 0.0, 0.9, 0.9)),
    "rotate 2 deg": lambda i: jpeg(i.rotate(2, resample=Image.Resampling.BICUBIC)),
    "rotate 5 deg": lambda i: jpeg(i.rotate(5, resample=Image.Resampling.BICUBIC)),
    "mirror": lambda i: jpeg(ImageOps.mirror(i)),
    "letterbox 12.5%": lambda i: jpeg(_pad(i, vertical=True)),
    "pillarbox 12.5%": lambda i: jpeg(_pad(i, vertical=False)),
    "resize 75% + q60 + brighter": lambda i: jpeg(
        ImageEnhance.Brightness(i.resize((i.width * 3 // 4, i.height * 3 // 4))).enhance(1.1), 60
    ),
}


def smoke_photos() -> list[tuple[str, callable]]:
    """Three bundled photographs, or three synthetic pictures without the bench extra."""
    try:
        return _photo_files()[:3]
    except ImportError as e:
        print(f"--smoke: synthetic pictures stand in for the photographs ({e}; the bench extra)")
        return [(f"synth/{k}", lambda k=k: make_image(900 + k, 640, 480)) for k in range(3)]


def main(photos: list[tuple[str, callable]]) -> None:
    pics = pictures(photos)
    names = [n for n, _ in pics]
    originals = np.array([code(jpeg(img)) for _, img in pics], dtype=np.uint64)
    print(f"{len(pics)} distinct pictures from {len(pics) // 14} photographs\n")
    header = " | ".join(f"<= {t}" for t in THRESHOLDS)
    print(f"| edit | median distance | {header} |")
    print("| --- | ---: | " + " | ".join("---:" for _ in THRESHOLDS) + " |")
    for edit, fn in EDITS.items():
        edited = np.array([code(fn(img)) for _, img in pics], dtype=np.uint64)
        d = np.bitwise_count(originals ^ edited)
        cells = " | ".join(f"{(d <= t).mean():.0%}" for t in THRESHOLDS)
        print(f"| {edit} | {np.median(d):.0f} | {cells} |")
    pairs = list(combinations(range(len(pics)), 2))
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    d = np.bitwise_count(originals[a] ^ originals[b])
    same_photo = np.array([names[i].split(":")[0] == names[j].split(":")[0] for i, j in pairs])
    print(f"\nunrelated pairs: {len(pairs):,} ({same_photo.sum()} within one photograph)")
    low, mid = np.percentile(d, 0.1), np.median(d)
    print(f"closest: {d.min()} bits; 0.1% within {low:.0f}; median {mid:.0f}")
    print(
        "| threshold | false pairs | within one photograph | rate per pair, 95% upper "
        "| random codes' rate | false pairs at 10 million images, at that rate | at 1 billion |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in THRESHOLDS:
        k = int((d <= t).sum())
        upper = _upper(k, len(pairs))
        floor = sum(math.comb(64, j) for j in range(t + 1)) / 2.0**64
        print(
            f"| {t} | {k} | {int((d <= t)[same_photo].sum())} | {upper:.1e} | {floor:.1e} | "
            f"{floor * 1e7**2 / 2:,.0f} | {floor * 1e9**2 / 2:.1e} |"
        )


def _upper(k: int, n: int) -> float:
    """A 95% upper bound on a rate seen k times in n trials (Wilson score)."""
    z = 1.96
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre + spread) / (1 + z * z / n)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="three photographs")
    if ap.parse_args().smoke:
        main(smoke_photos())
    else:
        try:
            photos = _photo_files()
        except ImportError as e:
            sys.exit(f"needs the bench extra's photographs ({e}): `make calibrate-photos`")
        main(photos)
