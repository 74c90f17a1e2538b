"""Edits that make a copy of a picture, as the copies in a training set are made: for
`dedup calibrate` (the recall of each signal per edit, on the user's own images) and for
canaries (`--canaries N`: a run's own recall). Each edit takes an RGB picture and a seeded
random generator and returns encoded bytes; the same seed gives the same bytes.

Every edit draws its parameters from the generator, per copy, so that an estimate holds
for the kind of edit and not for one version of it (a calibration that planted one
caption band, one watermark and one angle did not transfer to other captions,
watermarks and angles). The ranges, per edit (JPEG at quality 90 unless said):

- jpeg_q30, jpeg_q60: quality 25-35, 55-70; png (lossless); webp: quality 70-90
- resize_half, resize_quarter: 40-60%, 20-30% of each side
- crop_small, crop_large: 92-97%, 75-85% of each side, centred; offset_crop: 75-90%
  of each side, off-centre (in the first or last 30% of the slack, per axis)
- mirror; rotate_3: 2-4 degrees either way, cropped to the largest upright rectangle;
  rotate_fill: 2-4 degrees either way, the corners filled (black, white or a colour)
- letterbox, pillarbox: bars of 8-20% of the height (width) each side, black, white or
  a colour; border: 3-10% of each side, a colour
- caption: a band of 8-18% of the height added at the top or the bottom, a colour,
  with a line of text; letterbox_caption: letterbox bars of 10-20% with the text in
  the lower bar
- watermark: semi-transparent (35-70%) white text or a logo (a ring, a letter and a
  word) in a corner, 15-30% of the width
- screenshot: the picture, scaled to 70-100%, on a page in a browser window 1.3-1.6
  times its size (a tab strip and an address bar, a sidebar of links or none, the
  picture anywhere in the free space, a line of text under it or none, a status bar or
  none), dark or light
- brightness: x1.15-1.4 or x0.6-0.85; contrast: x1.2-1.5 or x0.65-0.85; blur: radius
  1.5-2.5; noise: Gaussian, sigma 5-12; gray
- mirror+offset_crop; letterbox+jpeg_q40 (quality 35-45); resize_half+gray+blur
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Edit = Callable[[Image.Image, np.random.Generator], bytes]

TEXTS = (
    "Breaking: all rights reserved",
    "Photo of the day",
    "You won't believe what happened next",
    "Sunset over the bay, 2019",
    "Share if you agree",
    "Exclusive pictures",
)
LABELS = ("File", "Edit", "View", "Image", "Tools", "Help", "Share", "Export")


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.convert("L" if img.mode == "L" else "RGB").save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _either(rng: np.random.Generator, up: tuple[float, float], down: tuple[float, float]) -> float:
    """A factor drawn above 1 or below it, as often."""
    return _uniform(rng, *(up if rng.random() < 0.5 else down))


def random_colour(rng: np.random.Generator, tone: str | None = None) -> tuple[int, int, int]:
    low, high = {"dark": (0, 60), "light": (196, 256), None: (0, 256)}[tone]
    return tuple(int(v) for v in rng.integers(low, high, 3))


def _bar_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """Black, white or a drawn colour, as often."""
    pick = int(rng.integers(3))
    return ((0, 0, 0), (255, 255, 255), random_colour(rng))[pick]


def ink_for(colour) -> tuple[int, int, int]:
    return (20, 20, 20) if sum(colour) > 380 else (245, 245, 245)


def draw_text(draw: ImageDraw.ImageDraw, box, text: str, fill, share: float = 0.6) -> int:
    """A line of text in `box`, left-aligned and centred vertically, at the largest size
    up to `share` of the box's height that fits its width (Pillow's own font); returns
    the size."""
    left, top, right, bottom = box
    size = max(6, int((bottom - top) * share))
    while size > 6 and ImageFont.load_default(size).getlength(text) > (right - left) * 0.92:
        size -= 1
    font = ImageFont.load_default(size)
    draw.text((left + (right - left) * 0.04, (top + bottom - size) / 2), text, font=font, fill=fill)
    return size


def _scale(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.LANCZOS)


def _crop(img: Image.Image, keep: float, at: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """Keep `keep` of the width and of the height, placed at `at` (0: left or top, 1:
    right or bottom, per axis) of the slack."""
    w, h = img.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    x, y = round((w - cw) * at[0]), round((h - ch) * at[1])
    return img.crop((x, y, x + cw, y + ch))


def _off_centre(rng: np.random.Generator) -> tuple[float, float]:
    """Per axis, a place in the first or the last 30% of the slack."""
    return tuple(
        _uniform(rng, 0, 0.3) if rng.random() < 0.5 else _uniform(rng, 0.7, 1) for _ in "xy"
    )


def _angle(rng: np.random.Generator) -> float:
    return _uniform(rng, 2, 4) * (1 if rng.random() < 0.5 else -1)


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Turned, then cropped to the largest centred rectangle of its shape without corners."""
    w, h = img.size
    turned = img.rotate(degrees, resample=Image.BICUBIC)
    a = np.radians(abs(degrees))
    keep = 1.0 / (np.cos(a) + np.sin(a) * max(w / h, h / w))
    return _crop(turned, float(keep))


def padded(img: Image.Image, left: int, top: int, right: int, bottom: int, colour) -> Image.Image:
    out = Image.new("RGB", (img.width + left + right, img.height + top + bottom), colour)
    out.paste(img, (left, top))
    return out


def _bars(img: Image.Image, rng: np.random.Generator, vertical: bool) -> Image.Image:
    """Letterbox (vertical: bars above and below) or pillarbox bars, 8-20% each."""
    share, colour = _uniform(rng, 0.08, 0.2), _bar_colour(rng)
    if vertical:
        pad = round(img.height * share)
        return padded(img, 0, pad, 0, pad, colour)
    pad = round(img.width * share)
    return padded(img, pad, 0, pad, 0, colour)


def _border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    share, colour = _uniform(rng, 0.03, 0.1), random_colour(rng)
    dx, dy = round(img.width * share), round(img.height * share)
    return padded(img, dx, dy, dx, dy, colour)


def _caption(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A band of 8-18% of the height added at the top or the bottom, with text."""
    band, colour = max(8, round(img.height * _uniform(rng, 0.08, 0.18))), random_colour(rng)
    text = TEXTS[int(rng.integers(len(TEXTS)))]
    top = rng.random() < 0.5
    out = padded(img, 0, band if top else 0, 0, 0 if top else band, colour)
    y = 0 if top else img.height
    draw_text(ImageDraw.Draw(out), (0, y, out.width, y + band), text, ink_for(colour))
    return out


def _letterbox_caption(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Letterbox bars of 10-20% each, the text in the lower one."""
    pad, colour = max(8, round(img.height * _uniform(rng, 0.1, 0.2))), _bar_colour(rng)
    text = TEXTS[int(rng.integers(len(TEXTS)))]
    out = padded(img, 0, pad, 0, pad, colour)
    lower = (0, pad + img.height, out.width, out.height)
    draw_text(ImageDraw.Draw(out), lower, text, ink_for(colour))
    return out


def _watermark(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """White text or a logo, 35-70% opaque, 15-30% of the width, in a corner."""
    logo, corner = rng.random() < 0.5, ("tl", "tr", "bl", "br")[int(rng.integers(4))]
    w = max(16, round(img.width * _uniform(rng, 0.15, 0.3)))
    h = max(8, round(w * (0.45 if logo else 0.22)))
    white = (255, 255, 255, round(255 * _uniform(rng, 0.35, 0.7)))
    mark = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(mark)
    if logo:  # a ring with a letter in it, and a word beside it
        draw.ellipse((2, 2, h - 2, h - 2), outline=white, width=max(2, h // 10))
        draw_text(draw, (h * 0.25, 0, h, h * 0.9), "P", white)
        draw_text(draw, (h, 0, w, h), "photonews", white, 0.5)
    else:
        draw_text(draw, (0, 0, w, h), "\u00a9 stock.example", white, 0.9)
    margin = round(min(img.size) * 0.03)
    x = margin if corner[1] == "l" else img.width - w - margin
    y = margin if corner[0] == "t" else img.height - h - margin
    out = img.convert("RGBA")
    out.alpha_composite(mark, (max(0, x), max(0, y)))
    return out.convert("RGB")


def _screenshot(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The picture scaled to 70-100% on a page in a browser window 1.3-1.6x its size: a
    tab strip and an address bar above, a sidebar of links at the left (or none), the
    picture anywhere in the page's free space, a line of text under it when there is
    room, and a status bar (or none)."""
    pic = _scale(img, _uniform(rng, 0.7, 1.0))
    tone = "dark" if rng.random() < 0.5 else "light"
    width, height = (round(s * _uniform(rng, 1.3, 1.6)) for s in pic.size)
    chrome, page = random_colour(rng, tone), random_colour(rng, tone)
    out = Image.new("RGB", (width, height), page)
    draw = ImageDraw.Draw(out)
    spare_h = height - pic.height
    tabs = max(6, round(spare_h * _uniform(rng, 0.15, 0.25)))
    address = max(6, round(spare_h * _uniform(rng, 0.15, 0.25)))
    top = tabs + address
    draw.rectangle((0, 0, width, top), fill=chrome)
    tab_w = round(width * _uniform(rng, 0.2, 0.35))
    draw.rectangle((6, 3, 6 + tab_w, tabs), fill=page)
    draw_text(draw, (6, 3, 6 + tab_w, tabs), TEXTS[int(rng.integers(len(TEXTS)))], ink_for(page))
    bar = (round(width * 0.08), tabs + 2, round(width * 0.9), top - 2)
    draw.rectangle(bar, fill=random_colour(rng, "light"), outline=ink_for(chrome))
    draw_text(draw, bar, "https://news.example/photos/2291", (60, 60, 60), 0.7)
    status = round(spare_h * _uniform(rng, 0.08, 0.15)) if rng.random() < 0.4 else 0
    if status:
        draw.rectangle((0, height - status, width, height), fill=chrome)
        draw_text(draw, (0, height - status, width * 0.5, height), "Done", ink_for(chrome))
    left = 0
    spare_w = width - pic.width
    if rng.random() < 0.5 and spare_w > 20:  # a sidebar of links
        left = round(spare_w * _uniform(rng, 0.4, 0.8))
        draw.rectangle((0, top, left, height - status), fill=chrome)
        line = max(8, round((height - top - status) / 9))
        for k, word in enumerate(rng.permutation(LABELS)[: int(rng.integers(4, 8))]):
            y = top + line * (k + 0.5)
            draw_text(draw, (0, y, left, y + line), str(word), ink_for(chrome), 0.7)
    x = left + round((width - left - pic.width) * rng.random())
    free = max(0, height - top - status - pic.height)
    y = top + round(free * rng.random())
    out.paste(pic, (x, y))
    below = height - status - (y + pic.height)
    if below >= 8 and rng.random() < 0.5:  # a line of text under the picture
        text = TEXTS[int(rng.integers(len(TEXTS)))]
        draw_text(draw, (x, y + pic.height, x + pic.width, y + pic.height + below), text,
                  ink_for(page), 0.6)  # fmt: skip
    return out


def _rotate_fill(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    degrees, fill = _angle(rng), _bar_colour(rng)
    return img.rotate(degrees, resample=Image.BICUBIC, fillcolor=fill)


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    sigma = _uniform(rng, 5, 12)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _quality(rng: np.random.Generator, low: int, high: int) -> int:
    return int(rng.integers(low, high + 1))


EDITS: dict[str, Edit] = {
    "jpeg_q30": lambda img, rng: encode(img, quality=_quality(rng, 25, 35)),
    "jpeg_q60": lambda img, rng: encode(img, quality=_quality(rng, 55, 70)),
    "png": lambda img, rng: encode(img, "PNG"),
    "webp": lambda img, rng: encode(img, "WEBP", quality=_quality(rng, 70, 90)),
    "resize_half": lambda img, rng: encode(_scale(img, _uniform(rng, 0.4, 0.6))),
    "resize_quarter": lambda img, rng: encode(_scale(img, _uniform(rng, 0.2, 0.3))),
    "crop_small": lambda img, rng: encode(_crop(img, _uniform(rng, 0.92, 0.97))),
    "crop_large": lambda img, rng: encode(_crop(img, _uniform(rng, 0.75, 0.85))),
    "offset_crop": lambda img, rng: encode(_crop(img, _uniform(rng, 0.75, 0.9), _off_centre(rng))),
    "mirror": lambda img, rng: encode(ImageOps.mirror(img)),
    "rotate_3": lambda img, rng: encode(_rotate(img, _angle(rng))),
    "rotate_fill": lambda img, rng: encode(_rotate_fill(img, rng)),
    "letterbox": lambda img, rng: encode(_bars(img, rng, vertical=True)),
    "pillarbox": lambda img, rng: encode(_bars(img, rng, vertical=False)),
    "border": lambda img, rng: encode(_border(img, rng)),
    "caption": lambda img, rng: encode(_caption(img, rng)),
    "letterbox_caption": lambda img, rng: encode(_letterbox_caption(img, rng)),
    "watermark": lambda img, rng: encode(_watermark(img, rng)),
    "screenshot": lambda img, rng: encode(_screenshot(img, rng)),
    "brightness": lambda img, rng: encode(
        ImageEnhance.Brightness(img).enhance(_either(rng, (1.15, 1.4), (0.6, 0.85)))
    ),
    "contrast": lambda img, rng: encode(
        ImageEnhance.Contrast(img).enhance(_either(rng, (1.2, 1.5), (0.65, 0.85)))
    ),
    "blur": lambda img, rng: encode(img.filter(ImageFilter.GaussianBlur(_uniform(rng, 1.5, 2.5)))),
    "noise": lambda img, rng: encode(_noise(img, rng)),
    "gray": lambda img, rng: encode(img.convert("L")),
    "mirror+offset_crop": lambda img, rng: encode(
        _crop(ImageOps.mirror(img), _uniform(rng, 0.75, 0.9), _off_centre(rng))
    ),
    "letterbox+jpeg_q40": lambda img, rng: encode(
        _bars(img, rng, vertical=True), quality=_quality(rng, 35, 45)
    ),
    "resize_half+gray+blur": lambda img, rng: encode(
        _scale(img, _uniform(rng, 0.4, 0.6)).convert("L").filter(ImageFilter.GaussianBlur(1))
    ),
}


def apply(name: str, img: Image.Image, seed: int) -> bytes:
    """The edit `name` of an RGB picture; the seed fixes its random choices."""
    return EDITS[name](img.convert("RGB"), np.random.default_rng(seed))
