"""Planted test data: procedural images, edited copies, and shards with captions.

Used by the tests, `make demo` and the benchmarks; nothing here is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps


def make_image(seed: int, width: int = 256, height: int = 256) -> Image.Image:
    """A distinct RGB picture per seed: a smooth random colour field with random shapes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    field_img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field_img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.uniform(0, 0.8, 2) * (width, height)
        w, h = rng.uniform(0.1, 0.5, 2) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    arr = np.asarray(field_img, dtype=np.int16) + rng.integers(
        -10, 11, (height, width, 3), dtype=np.int16
    )
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_digit(d: int, variant: int, side: int = 28) -> Image.Image:
    """A handwriting-like digit, MNIST style (white strokes on black); each variant has
    its own offset, stroke, slant and blur, so no two variants are copies."""
    dx, dy = variant % 5 - 2, variant // 5 % 3 - 1
    angle = (variant * 7) % 25 - 12
    img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(side * 0.8))
    draw.text(
        (7 + dx, 1 + dy),
        str(d),
        fill=255,
        font=font,
        stroke_width=variant // 15 % 2,
        stroke_fill=255,
    )
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
    return img.filter(ImageFilter.GaussianBlur(0.4 + 0.1 * (variant % 4)))


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


# Edits a perceptual hash should catch: same picture, other bytes.
NEAR_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "reencode": lambda d: encode(_decoded(d), "JPEG", quality=60),
    "resize": lambda d: encode(
        _decoded(d).resize(
            (_decoded(d).width * 3 // 5, _decoded(d).height * 3 // 5), Image.Resampling.BILINEAR
        ),
        "JPEG",
        quality=90,
    ),
    "brighten": lambda d: encode(
        ImageEnhance.Brightness(_decoded(d)).enhance(1.08), "JPEG", quality=90
    ),
    "png": lambda d: encode(_decoded(d), "PNG"),
    "webp": lambda d: encode(_decoded(d), "WEBP", quality=80),
    "blur": lambda d: encode(_decoded(d).filter(ImageFilter.GaussianBlur(1)), "JPEG", quality=90),
}

# Edits that change the picture's layout; pHash is not expected to catch these.
HARD_EDITS: dict[str, Callable[[bytes], bytes]] = {
    "crop": lambda d: encode(
        ImageOps.crop(_decoded(d), _decoded(d).width // 8), "JPEG", quality=90
    ),
    "mirror": lambda d: encode(ImageOps.mirror(_decoded(d)), "JPEG", quality=90),
    "rotate": lambda d: encode(
        _decoded(d).rotate(8, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)),
        "JPEG",
        quality=90,
    ),
    "letterbox": lambda d: encode(
        ImageOps.pad(
            _decoded(d), (_decoded(d).width, _decoded(d).height * 5 // 4), color=(0, 0, 0)
        ),
        "JPEG",
        quality=90,
    ),
}


@dataclass
class PlantedSample:
    """A sample to write: its key, members by extension, and what it is a copy of."""

    key: str
    members: dict[str, bytes]
    group: int | None  # the original's id; None for samples with no usable image
    edit: str  # original | exact | one of NEAR_EDITS / HARD_EDITS | no_image | undecodable
    shard: str = ""


def planted_dataset(
    n_originals: int = 40,
    copies: dict[str, int] | None = None,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    bad: bool = True,
) -> list[PlantedSample]:
    """Originals plus planted copies, shuffled.

    `copies` maps an edit name (``exact`` or a key of NEAR_EDITS/HARD_EDITS) to how many
    originals get one such copy. With `bad`, add a caption-only sample and a corrupt image.
    """
    copies = {"exact": 8, "reencode": 4, "resize": 4, "png": 3} if copies is None else copies
    rng = np.random.default_rng(seed)
    samples: list[PlantedSample] = []
    originals = []
    for g in range(n_originals):
        data = encode(make_image(seed * 100_003 + g, *size), "JPEG", quality=85)
        originals.append(data)
        samples.append(_sample(data, g, "original"))
    for edit, count in copies.items():
        picks = rng.choice(n_originals, size=min(count, n_originals), replace=False)
        for g in sorted(int(p) for p in picks):
            if edit == "exact":
                data = originals[g]
            else:
                data = {**NEAR_EDITS, **HARD_EDITS}[edit](originals[g])
            samples.append(_sample(data, g, edit))
    if bad:
        samples.append(PlantedSample("", {"txt": b"a caption with no image"}, None, "no_image"))
        samples.append(
            PlantedSample(
                "", {"jpg": b"<html>not an image</html>", "txt": b"html"}, None, "undecodable"
            )
        )
    order = rng.permutation(len(samples))
    shuffled = [samples[i] for i in order]
    for i, s in enumerate(shuffled):
        s.key = f"{i:06d}"
    return shuffled


def _sample(data: bytes, group: int, edit: str) -> PlantedSample:
    ext = {b"\xff\xd8": "jpg", b"\x89P": "png", b"RI": "webp"}[data[:2]]
    caption = f"picture {group} ({edit})"
    return PlantedSample(
        "",
        {ext: data, "txt": caption.encode(), "json": json.dumps({"caption": caption}).encode()},
        group,
        edit,
    )


def write_shards(
    samples: list[PlantedSample], out_dir: str, per_shard: int, prefix: str = "shard"
) -> list[str]:
    """Write samples in order into tars of `per_shard` samples; returns the shard paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for n, start in enumerate(range(0, len(samples), per_shard)):
        path = os.path.join(out_dir, f"{prefix}-{n:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for s in samples[start : start + per_shard]:
                s.shard = path
                for ext, data in s.members.items():
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size = len(data)
                    info.mtime = 1_700_000_000
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# The demo's draw (`python -m dedup.synth`, `python -m dedup.demo`): one seed for both, so
# that the two show the same samples.
DEMO_SEED = 1


def demo_copies(n_originals: int) -> dict[str, int]:
    """How many originals get a copy by each edit in the demo: a fifth an exact copy, a
    tenth each re-encoded and resized, a twentieth each of the other edits."""
    n = n_originals
    return {
        "exact": n // 5,
        "reencode": n // 10,
        "resize": n // 10,
        "png": n // 20,
        "webp": n // 20,
        "brighten": n // 20,
        "crop": n // 20,
        "mirror": n // 20,
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m dedup.synth OUT_DIR [ORIGINALS] [PER_SHARD]`: a demo dataset."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    out_dir = args[0] if args else "demo-data/shards"
    n = int(args[1]) if len(args) > 1 else 200
    per_shard = int(args[2]) if len(args) > 2 else 100
    copies = demo_copies(n)
    samples = planted_dataset(n, copies, seed=DEMO_SEED)
    paths = write_shards(samples, out_dir, per_shard)
    planted = sum(1 for s in samples if s.edit not in ("original", "no_image", "undecodable"))
    print(
        f"wrote {len(samples)} samples ({planted} planted copies: "
        + ", ".join(f"{k} {v}" for k, v in copies.items())
        + f"; 1 caption-only, 1 corrupt image) in {len(paths)} shards to {out_dir}"
    )


if __name__ == "__main__":
    main()
