"""Edits that make a copy of a picture, as the copies in a training set are made: for
`dedup calibrate` (the recall of each signal per edit, on the user's own images) and for
canaries (`--canaries N`: a run's own recall). Each edit takes an RGB picture and a seeded
random generator and returns encoded bytes; the same seed gives the same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], bytes]


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("L" if img.mode == "L" else "RGB").save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _scale(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.LANCZOS)


def _crop(img: Image.Image, keep: float, corner: str | None = None) -> Image.Image:
    """Keep `keep` of the width and of the height: centred, or at a corner."""
    w, h = img.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    if corner is None:
        x, y = (w - cw) // 2, (h - ch) // 2
    else:
        x = 0 if corner[1] == "l" else w - cw
        y = 0 if corner[0] == "t" else h - ch
    return img.crop((x, y, x + cw, y + ch))


def _corner(rng: np.random.Generator) -> str:
    return ("tl", "tr", "bl", "br")[int(rng.integers(4))]


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Turned, then cropped to the largest centred rectangle of its shape without corners."""
    w, h = img.size
    turned = img.rotate(degrees, resample=Image.BICUBIC)
    a = np.radians(abs(degrees))
    keep = 1.0 / (np.cos(a) + np.sin(a) * max(w / h, h / w))
    return _crop(turned, float(keep))


def _bars(img: Image.Image, side: str, share: float, colour=(0, 0, 0)) -> Image.Image:
    w, h = img.size
    if side == "tb":
        pad = round(h * share)
        out = Image.new("RGB", (w, h + 2 * pad), colour)
        out.paste(img, (0, pad))
    else:
        pad = round(w * share)
        out = Image.new("RGB", (w + 2 * pad, h), colour)
        out.paste(img, (pad, 0))
    return out


def _caption(img: Image.Image) -> Image.Image:
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, round(h * 0.88), w, h), fill=(0, 0, 0))
    draw.text(
        (round(w * 0.03), round(h * 0.9)), "Breaking: all rights reserved", fill=(255, 255, 255)
    )
    return out


def _watermark(img: Image.Image) -> Image.Image:
    out = img.convert("RGBA")
    w, h = out.size
    mark = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(mark)
    box = (round(w * 0.62), round(h * 0.78), round(w * 0.97), round(h * 0.95))
    draw.rectangle(box, fill=(255, 255, 255, 150))
    draw.text((box[0] + 4, box[1] + 4), "(c) stock.example", fill=(0, 0, 0, 200))
    return Image.alpha_composite(out, mark).convert("RGB")


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (img.height, img.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


EDITS: dict[str, Edit] = {
    "jpeg_q30": lambda img, rng: encode(img, quality=30),
    "jpeg_q60": lambda img, rng: encode(img, quality=60),
    "png": lambda img, rng: encode(img, "PNG"),
    "webp": lambda img, rng: encode(img, "WEBP", quality=80),
    "resize_half": lambda img, rng: encode(_scale(img, 0.5)),
    "resize_quarter": lambda img, rng: encode(_scale(img, 0.25)),
    "crop_small": lambda img, rng: encode(_crop(img, 0.95)),
    "crop_large": lambda img, rng: encode(_crop(img, 0.8)),
    "offset_crop": lambda img, rng: encode(_crop(img, 0.9, _corner(rng))),
    "mirror": lambda img, rng: encode(ImageOps.mirror(img)),
    "rotate_3": lambda img, rng: encode(_rotate(img, 3.0)),
    "letterbox": lambda img, rng: encode(_bars(img, "tb", 0.125)),
    "pillarbox": lambda img, rng: encode(_bars(img, "lr", 0.125)),
    "caption": lambda img, rng: encode(_caption(img)),
    "watermark": lambda img, rng: encode(_watermark(img)),
    "brightness": lambda img, rng: encode(ImageEnhance.Brightness(img).enhance(1.3)),
    "contrast": lambda img, rng: encode(ImageEnhance.Contrast(img).enhance(1.4)),
    "blur": lambda img, rng: encode(img.filter(ImageFilter.GaussianBlur(2))),
    "noise": lambda img, rng: encode(_noise(img, rng)),
    "gray": lambda img, rng: encode(img.convert("L")),
    "mirror+offset_crop": lambda img, rng: encode(_crop(ImageOps.mirror(img), 0.9, _corner(rng))),
    "letterbox+jpeg_q40": lambda img, rng: encode(_bars(img, "tb", 0.125), quality=40),
    "resize_half+gray+blur": lambda img, rng: encode(
        _scale(img, 0.5).convert("L").filter(ImageFilter.GaussianBlur(1))
    ),
}


def apply(name: str, img: Image.Image, seed: int) -> bytes:
    """The edit `name` of an RGB picture; the seed fixes its random choices."""
    return EDITS[name](img.convert("RGB"), np.random.default_rng(seed))
