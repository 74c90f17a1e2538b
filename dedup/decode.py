"""The one safe way to turn image bytes into a normalized Pillow image."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dedup.config import Config

# dedup checks the pixel count itself from the header (reason `too_large`), so Pillow's
# own bomb guard, which raises or warns on its own limit, is turned off.
Image.MAX_IMAGE_PIXELS = None

BACKGROUND = (255, 255, 255)


@dataclass
class Decoded:
    """A decode outcome: `image` (RGB or L) when ok, else `reason` says why not."""

    image: Image.Image | None
    reason: str | None
    width: int | None = None
    height: int | None = None
    format: str | None = None


def image_member(member_names: list[str], config: Config) -> int | None:
    """Position of the sample's image: the first member whose last extension is an image type."""
    allowed = {e.lower() for e in config.image_extensions}
    for i, name in enumerate(member_names):
        base = name.rsplit("/", 1)[-1]
        if "." in base and base.rsplit(".", 1)[1].lower() in allowed:
            return i
    return None


def decode_image(data: bytes, config: Config) -> Decoded:
    """Sniff, size-check from the header, decode and normalize; never raises on bad bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Exception:  # Pillow raises many types on garbage; all mean the same here
        return Decoded(None, "undecodable")
    fmt = img.format
    if fmt not in config.image_formats:
        return Decoded(None, "unsupported_format", format=fmt)
    width, height = img.size
    if width * height > config.max_pixels:
        return Decoded(None, "too_large", width, height, fmt)
    if width == 0 or height == 0:
        return Decoded(None, "undecodable", width, height, fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            image = normalize(img)
    except Exception:
        return Decoded(None, "undecodable", width, height, fmt)
    return Decoded(image, None, image.width, image.height, fmt)


def normalize(img: Image.Image) -> Image.Image:
    """Orientation applied, first frame, 8-bit RGB or L; alpha composited on white.

    Unrelated images must not collide after this: 16-bit data is scaled rather than
    clipped, and transparent pixels take one fixed background.
    """
    with contextlib.suppress(Exception):  # malformed EXIF: keep the stored orientation
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I") or mode == "F":
        return _scale_to_8bit(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0
    else:
        # 16-bit PNG and TIFF data arrive as I;16* (or as I in some Pillow versions) with
        # range 0..65535; an I image whose values all fit in 8 bits is kept as it is.
        arr = np.clip(arr.astype(np.int64), 0, 65535)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr >> 8
    return Image.fromarray(arr.astype(np.uint8), mode="L")
