"""The one safe way to turn image bytes into a normalized Pillow image."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from dedup.core.config import Config

# dedup checks the pixel count itself from the header (reason `too_large`), so Pillow's
# own bomb guard, which raises or warns on its own limit, is turned off.
Image.MAX_IMAGE_PIXELS = None

BACKGROUND = (255, 255, 255)


@dataclass
class Decoded:
    """A decode outcome: `image` (RGB or L) when ok, else `reason` says why not.
    `chroma`: with draft_mode "YCbCr", a colour JPEG's YCbCr draft (oriented as
    `image`, which is then its Y plane as L: the L draft's very pixels)."""

    image: Image.Image | None
    reason: str | None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    chroma: Image.Image | None = None


def image_member(member_names: list[str], config: Config) -> int | None:
    """Position of the sample's image: the first member whose last extension is an image type."""
    for i, name in enumerate(member_names):
        if is_image_name(name, config):
            return i
    return None


def is_image_name(name: str, config: Config) -> bool:
    """Whether a member's last extension is one of the image types."""
    base = name.rsplit("/", 1)[-1]
    return "." in base and base.rsplit(".", 1)[1].lower() in config.image_extension_set


@dataclass
class Header:
    """What an image's header says, read without decoding its pixels; `reason` is set
    when the image will not be decoded (its other fields as far as they are known)."""

    img: Image.Image | None
    reason: str | None
    width: int | None = None  # after EXIF orientation
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    orientation: int = 1


def read_header(data: bytes, config: Config) -> Header:
    """Sniff the format, check the pixel count and read the EXIF orientation; never
    raises on bad bytes. Nothing is decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Exception:  # Pillow raises many types on garbage; all mean the same here
        return Header(None, "undecodable")
    fmt = img.format
    if fmt not in config.image_formats:
        return Header(None, "unsupported_format", format=fmt)
    width, height = img.size
    if width * height > config.max_pixels:
        return Header(None, "too_large", width, height, fmt)
    if width == 0 or height == 0:
        return Header(None, "undecodable", width, height, fmt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            orientation = _orientation(img)
    except Exception:
        return Header(None, "undecodable", width, height, fmt)
    if orientation in TRANSPOSED:
        width, height = height, width
    return Header(img, None, width, height, fmt, img.mode, orientation)


def decode_image(
    data: bytes,
    config: Config,
    draft: int | None = None,
    draft_mode: str = "L",
    header: Header | None = None,
) -> Decoded:
    """Sniff, size-check from the header, decode and normalize; never raises on bad bytes.

    With `draft`, a JPEG is decoded (in `draft_mode`: "L" grayscale, "RGB", or "YCbCr":
    the L decode's very pixels as `image`, and the colour planes apart) at the
    smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at least `draft` pixels:
    enough for a 32x32 hash or a 224x224 CLIP input, several times cheaper than a full
    decode. `width` and `height` are always the full image's,
    after EXIF orientation. `header`: this image's `read_header`, when already read.
    """
    h = header if header is not None else read_header(data, config)
    if h.img is None:
        return Decoded(None, h.reason, h.width, h.height, h.format)
    img, fmt, width, height = h.img, h.format, h.width, h.height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if draft is not None and fmt == "JPEG":
                img.draft(draft_mode, (draft, draft))
            img.load()
            chroma = None
            if img.mode == "YCbCr":  # a colour JPEG drafted in YCbCr: Y is the L decode
                chroma = _oriented(img, h.orientation)
                image = chroma.getchannel(0)
            else:
                image = normalize(img, h.orientation)
    except Exception:
        if draft_mode == "YCbCr" and draft is not None and fmt == "JPEG":
            return _grey_and_colours(data, config, draft)
        return Decoded(None, "undecodable", width, height, fmt)
    return Decoded(image, None, width, height, fmt, chroma)


def _grey_and_colours(data: bytes, config: Config, draft: int) -> Decoded:
    """A JPEG that libjpeg will not draft in YCbCr (one stored in RGB, Adobe's transform
    0: it converts RGB to grey, not to YCbCr): its L draft, as every other JPEG's image,
    and its colours from an RGB draft of the same scale, converted."""
    grey = decode_image(data, config, draft, "L")
    if grey.image is None:
        return grey
    rgb = decode_image(data, config, draft, "RGB").image
    colours = rgb if rgb is not None and rgb.mode == "RGB" and rgb.size == grey.image.size else None
    chroma = None if colours is None else colours.convert("YCbCr")
    return Decoded(grey.image, None, grey.width, grey.height, grey.format, chroma)


# EXIF orientations that swap width and height.
TRANSPOSED = (5, 6, 7, 8)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, 1 when absent or malformed."""
    if "exif" not in img.info and img.format not in ("TIFF", "MPO"):
        return 1
    try:
        value = img.getexif().get(0x0112, 1)
    except Exception:  # malformed EXIF: keep the stored orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented(img: Image.Image, orientation: int | None) -> Image.Image:
    """The image turned as its EXIF orientation says (None: read it)."""
    if orientation is None:
        orientation = _orientation(img)
    if orientation != 1:
        with contextlib.suppress(Exception):  # malformed EXIF: keep the stored orientation
            img = ImageOps.exif_transpose(img)
    return img


def normalize(img: Image.Image, orientation: int | None = None) -> Image.Image:
    """Orientation applied, first frame, 8-bit RGB or L; alpha composited on white.

    Unrelated images must not collide after this: 16-bit data is scaled rather than
    clipped, and transparent pixels take one fixed background.
    """
    img = _oriented(img, orientation)
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
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            return _stretch(arr)  # not a 0..1 image: its own range, never clipped
        arr = arr * 255.0
    else:
        # 16-bit PNG and TIFF data arrive as I;16* (or as I in some Pillow versions) with
        # range 0..65535; an I image whose values all fit in 8 bits is kept as it is.
        arr = arr.astype(np.int64)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            return _stretch(arr)  # 32-bit data: its own range, never clipped
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr >> 8
    return Image.fromarray(arr.astype(np.uint8), mode="L")


def _stretch(arr: np.ndarray) -> Image.Image:
    """Map an image's own value range onto 0..255 (deterministic, per image)."""
    lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr, dtype=float)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
