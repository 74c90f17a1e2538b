"""The keep policy's per-image features: JPEG quality from the quantization tables,
bars, caption bands and application frames found on the decode the pHash makes, and
JSON sidecar values."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from dedup.core.config import Config
from dedup.io.decode import decode_image
from dedup.signals.keep import (
    BARS,
    CAPTION,
    FRAME,
    LOSSLESS,
    NOTE_BAD_JSON,
    NOTE_NO_FIELD,
    NOTE_NO_JSON,
    NOTE_NOT_NUMBER,
    NOTE_OK,
    UNKNOWN_QUALITY,
    _draft_factor,
    chroma_of,
    content_of,
    jpeg_quality,
    json_value,
    measure,
    noise_scale,
    quality_of,
    quality_tier,
    texture_of,
)
from dedup.signals.views import grey_levels
from dedup.synth import make_image
from tests.helpers import textured


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [1, 10, 37, 50, 51, 75, 88, 95, 100])
def test_jpeg_quality_is_read_exactly_from_the_tables(quality):
    image = textured(1)
    assert jpeg_quality(_jpeg(image, quality)) == quality
    assert jpeg_quality(_jpeg(image.convert("L"), quality)) == quality


def test_quality_of_formats():
    image = textured(2)
    png, webp_lossless, webp = io.BytesIO(), io.BytesIO(), io.BytesIO()
    image.save(png, "PNG")
    image.save(webp_lossless, "WEBP", lossless=True)
    image.save(webp, "WEBP", quality=80)
    assert quality_of(png.getvalue(), "PNG") == LOSSLESS
    assert quality_of(webp_lossless.getvalue(), "WEBP") == LOSSLESS
    assert quality_of(webp.getvalue(), "WEBP") == UNKNOWN_QUALITY
    assert quality_of(_jpeg(image, 64), "JPEG") == 64
    # damaged or truncated tables never raise
    assert jpeg_quality(b"\xff\xd8\xff\xdb\x00") == UNKNOWN_QUALITY
    assert jpeg_quality(b"not a jpeg") == UNKNOWN_QUALITY


def _bordered(image, colour, share):
    w, h = image.size
    d = int(share * min(w, h))
    out = Image.new("RGB", (w + 2 * d, h + 2 * d), colour)
    out.paste(image, (d, d))
    return out


def _letterboxed(image, colour=(0, 0, 0), share=0.15):
    w, h = image.size
    d = int(share * h)
    out = Image.new("RGB", (w, h + 2 * d), colour)
    out.paste(image, (0, d))
    return out


def _caption_band(image, at="bottom", colour=(255, 255, 255), ink=(0, 0, 0)):
    w, h = image.size
    d = int(0.15 * h)
    out = Image.new("RGB", (w, h + d), colour)
    out.paste(image, (0, d if at == "top" else 0))
    font = ImageFont.load_default(size=int(d * 0.6))
    y = 2 if at == "top" else h + 2
    ImageDraw.Draw(out).text((8, y), "Photo of the day, all rights", fill=ink, font=font)
    return out


def _screenshot(image):
    w, h = image.size
    canvas = Image.new("RGB", (int(w * 1.5), int(h * 1.45)), (236, 236, 240))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, canvas.width, int(0.12 * canvas.height)], fill=(50, 54, 64))
    font = ImageFont.load_default(size=14)
    for k in range(4):
        draw.text((12 + 70 * k, 8), f"Tab {k}", fill=(255, 255, 255), font=font)
    top = int(0.16 * canvas.height)
    canvas.paste(image, ((canvas.width - w) // 2, top))
    for k in range(5):
        draw.text((6, top + 24 * k), f"link {k}", fill=(20, 20, 20), font=font)
    return canvas


def _features(image: Image.Image) -> tuple[int, int]:
    """content pixels and overlay bits as the extract phase computes them: from the
    pHash's grayscale draft decode of the JPEG."""
    data = _jpeg(image, 90)
    decoded = decode_image(data, Config(), 32, "L")
    return content_of(decoded.image, image.width, image.height)[:2]


@pytest.mark.parametrize("seed", range(6))
def test_bars_captions_and_frames_are_found_and_originals_are_clean(seed):
    original = textured(100 + seed)
    pixels = original.width * original.height
    content, bits = _features(original)
    assert (content, bits) == (pixels, 0)
    rng = np.random.default_rng(seed)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    for edited, expected in (
        (_bordered(original, colour, 0.06), BARS),
        (_letterboxed(original), BARS),
        (_caption_band(original, "bottom"), CAPTION),
        (_caption_band(original, "top", (30, 30, 30), (250, 250, 250)), CAPTION),
        (_screenshot(original), FRAME),
    ):
        content, bits = _features(edited)
        assert bits & expected, (expected, bits)
        # the picture's own pixels, within the decode's block size
        assert abs(content - pixels) < 0.12 * pixels, (expected, content, pixels)


def test_json_values_and_why_they_are_missing():
    assert json_value(b'{"score": 3.5}', "score") == (3.5, NOTE_OK)
    assert json_value(b'{"a": {"b": 2}}', "a.b") == (2.0, NOTE_OK)
    for data, note in (
        (b'{"other": 1}', NOTE_NO_FIELD),
        (b'{"score": "high"}', NOTE_NOT_NUMBER),
        (b'{"score": NaN}', NOTE_NOT_NUMBER),
        (b'{"score": true}', NOTE_NOT_NUMBER),
        (b'{"score": ', NOTE_BAD_JSON),
        (b"\xff\xfe", NOTE_BAD_JSON),
        (b"[1, 2]", NOTE_NO_FIELD),
        (None, NOTE_NO_JSON),
    ):
        value, why = json_value(data, "score")
        assert math.isnan(value) and why == note, data


@pytest.mark.parametrize("quality", [5, 50, 77, 90, 100])
def test_the_tables_pillow_parsed_give_the_same_quality(quality):
    data = _jpeg(textured(3), quality)
    opened = Image.open(io.BytesIO(data))
    assert quality_of(data, "JPEG", opened) == quality_of(data, "JPEG") == quality


def test_quality_tiers():
    q = np.array([LOSSLESS, 100, 85, 84, 70, 69, 50, 49, 30, 29, 1, UNKNOWN_QUALITY])
    assert quality_tier(q).tolist() == [6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0]


def _texture(data: bytes, size: tuple[int, int]) -> tuple[tuple[float, float, float], tuple]:
    """texture_of on the decode the pHash makes (a JPEG draft; a PNG at full size)."""
    decoded = decode_image(data, Config(), 32, "L")
    return texture_of(grey_levels(decoded.image)[0], *size), decoded.image.size


@pytest.mark.parametrize("seed", range(4))
def test_noise_rises_with_added_noise_and_not_with_a_tone_change(seed):
    image = textured(seed) if seed % 2 else make_image(seed, 640, 480)
    w, h = image.size
    rng = np.random.default_rng(seed)
    grain = rng.normal(0, 6, (h, w, 3))
    noisy = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype("u1"))
    (noise, level, contrast), drafted = _texture(_jpeg(image, 92), (w, h))
    assert drafted == (80, 60)  # the draft at 1/8 (640x480) or 1/4 (320x240)
    # a noisy copy saved at a higher quality: more noise
    assert _texture(_jpeg(noisy, 95), (w, h))[0][0] > 1.08 * noise
    # brighter, or flatter: the tone moves, the noise per contrast does not
    for edit in (
        ImageEnhance.Brightness(image).enhance(1.25),
        ImageEnhance.Contrast(image).enhance(0.75),
    ):
        n, lv, c = _texture(_jpeg(edit, 92), (w, h))[0]
        assert abs(n - noise) < 0.07 * noise
        assert abs(lv - level) + abs(c - contrast) > 8
    # a PNG decodes at full size and is measured at the draft's scale: the same noise
    png = io.BytesIO()
    image.save(png, "PNG")
    (n, lv, c), decoded = _texture(png.getvalue(), (w, h))
    assert decoded == (w, h)
    assert abs(n - noise) < 0.03 * noise and abs(lv - level) < 0.5 and abs(c - contrast) < 0.5


def _chroma(data: bytes, size: tuple[int, int]) -> float:
    """chroma_of on the decode the pHash makes (a JPEG's YCbCr draft; a PNG in full)."""
    decoded = decode_image(data, Config(), 32, "YCbCr")
    return chroma_of(decoded.image, decoded.chroma, *size)


@pytest.mark.parametrize("seed", range(4))
def test_chroma_scales_with_saturation_and_stays_under_reencodes(seed):
    image = textured(seed) if seed % 2 else make_image(seed, 640, 480)
    size = image.size
    chroma = _chroma(_jpeg(image, 92), size)
    assert chroma > 5
    for factor in (0.7, 0.85, 1.2):  # a saturation edit scales it by about its factor
        edited = _chroma(_jpeg(ImageEnhance.Color(image).enhance(factor), 92), size)
        assert abs(edited / chroma - factor) < 0.05 * factor, (factor, edited, chroma)
    # re-encoded, resized, or lossless (a PNG measured at the draft's scale): within 5%
    half = image.resize((size[0] // 2, size[1] // 2), Image.Resampling.LANCZOS)
    png = io.BytesIO()
    image.save(png, "PNG")
    same = ((_jpeg(image, 60), size), (_jpeg(half, 90), half.size), (png.getvalue(), size))
    for data, at in same:
        assert abs(_chroma(data, at) - chroma) < 0.05 * chroma
    assert _chroma(_jpeg(image.convert("L"), 92), size) == 0.0


def _under_a_dark_sky(seed: int) -> Image.Image:
    """A picture whose top 45% is a dark blue evening sky (grey about 55-62, clouds of
    low frequency and sensor noise): a band of grey 65 above it lies within 12 levels of
    it all the way down, so no edge shows at that tolerance."""
    picture = textured(300 + seed)
    w, h = picture.size
    rng = np.random.default_rng(seed)
    clouds = Image.fromarray(rng.normal(0, 2.5, (3, 6)).astype(np.float32), "F")
    clouds = np.asarray(clouds.resize((w, int(0.45 * h)), Image.Resampling.BILINEAR))
    shade = clouds[:, :, None] + rng.normal(0, 1.5, clouds.shape + (1,))
    sky = np.array([35, 58, 120], np.float32) + shade
    picture.paste(Image.fromarray(np.clip(np.rint(sky), 0, 255).astype(np.uint8)), (0, 0))
    return picture


@pytest.mark.parametrize("seed", range(4))
def test_a_caption_band_near_the_pictures_tone_is_found_by_its_exact_colour(seed):
    # a blue band (grey 65) holding white text, above or below a dark blue sky (grey
    # 50-60): no sharp edge at 12 grey levels, but the band is one exact colour
    picture = _under_a_dark_sky(seed)
    if seed % 2:
        picture = picture.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    pixels = picture.width * picture.height
    assert _features(picture) == (pixels, 0)
    at = "bottom" if seed % 2 else "top"
    captioned = _caption_band(picture, at, (27, 53, 226), (250, 250, 250))
    content, bits = _features(captioned)
    assert bits & CAPTION and not bits & FRAME, bits
    assert abs(content - pixels) < 0.12 * pixels
    # the same band without text is no evidence: a flat sky's edge looks the same
    plain = Image.new("RGB", captioned.size, (27, 53, 226))
    plain.paste(picture, (0, captioned.height - picture.height if at == "top" else 0))
    assert _features(plain)[1] == 0


@pytest.mark.parametrize("seed", range(3))
def test_a_padded_copy_measures_its_pictures_tone_inside_the_box(seed):
    # the tone (level, contrast, noise) and the chroma inside frame_features' picture:
    # a letterboxed or captioned copy measures as its original; the whole frame does not
    image = make_image(40 + seed, 640, 480)
    w, h = image.size

    def measured(picture, box=True):
        data = _jpeg(picture, 92)
        decoded = decode_image(data, Config(), 32, "YCbCr")
        grey = grey_levels(decoded.image)
        inside = content_of(grey[1], *picture.size)[2] if box else None
        return (
            *texture_of(grey[0], *picture.size, grey[1], inside),
            chroma_of(decoded.image, decoded.chroma, *picture.size, inside),
        )

    original = measured(image)
    for copy in (
        _letterboxed(image, (250, 250, 250), 0.12),
        _caption_band(image, "bottom", (20, 90, 200)),
    ):
        noise, level, contrast, chroma = measured(copy)
        assert abs(level - original[1]) < 2 and abs(contrast - original[2]) < 2
        assert abs(chroma - original[3]) < 0.05 * original[3]
        assert abs(noise - original[0]) < 0.1 * original[0]
        whole = measured(copy, box=False)
        assert abs(whole[1] - original[1]) + abs(whole[2] - original[2]) > 4


@pytest.mark.parametrize("seed", range(4))
def test_measure_in_one_pass_equals_the_three_functions(seed):
    # the compiled pass (a JPEG draft: YCbCr or grey) and the reduce-first route (a PNG
    # decoded in full, an RGB draft) give content_of's, texture_of's and chroma_of's values
    image = make_image(60 + seed, 480 + 40 * seed, 360)
    copies = [image, _letterboxed(image, (30, 30, 30), 0.1), _caption_band(image, "top")]
    boxes = 0
    for picture in copies:
        for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("L", "PNG")):
            buf = io.BytesIO()
            picture.convert(mode).save(buf, fmt, quality=70 + 5 * seed)
            for draft, draft_mode in ((32, "YCbCr"), (32, "L"), (224, "RGB"), (None, "L")):
                decoded = decode_image(buf.getvalue(), Config(), draft, draft_mode)
                grey = grey_levels(decoded.image)
                size = picture.size
                content, bits, box = content_of(grey[1], *size)
                expected = (
                    content,
                    bits,
                    box,
                    (
                        *texture_of(grey[0], *size, grey[1], box),
                        chroma_of(decoded.image, decoded.chroma, *size, box),
                    ),
                )
                assert measure(grey, *size, decoded.image, decoded.chroma) == expected
                boxes += box != (0, 0, *decoded.image.size)
    assert boxes >= 16  # the padded copies' boxes were measured inside


def _window(image, bar=(40, 44, 52), margin=(222, 226, 232)):
    """The picture in an application window whose toolbar (28% of the height) and status
    bar (15%) cross its side margins: the margins' lines are 57% margin colour, short of
    FLAT_SHARE, until the bars are taken away."""
    w, h = image.size
    width, height = int(w * 1.5), int(h * 1.9)
    top, bottom = int(0.28 * height), int(0.15 * height)
    canvas = Image.new("RGB", (width, height), margin)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width, top], fill=bar)
    draw.rectangle([0, height - bottom, width, height], fill=bar)
    font = ImageFont.load_default(size=top // 3)  # large enough to show in a 1/8 draft
    for k in range(3):
        draw.text((12 + top * k, top // 3), f"Menu{k}", fill=(250, 250, 250), font=font)
    draw.text((12, height - bottom + 6), "Ready | 100%", fill=(250, 250, 250), font=font)
    left = int((width - w) * 0.3)
    y = top + (height - top - bottom - h) // 2
    canvas.paste(image, (left, y))
    return canvas, (left, y, left + w, y + h)


@pytest.mark.parametrize("seed", range(4))
def test_a_window_frame_is_found_in_rounds(seed):
    # one round finds the toolbar and the status bar only; the next, inside them, the
    # side margins: the box is the picture (to a draft pixel) and the evidence a frame
    image = textured(300 + seed)
    window, picture = _window(image)
    data = _jpeg(window, 92)
    decoded = decode_image(data, Config(), 32, "YCbCr")
    grey = grey_levels(decoded.image)
    content, bits, box = measure(grey, *window.size, decoded.image, decoded.chroma)[:3]
    scale = window.width / decoded.image.width
    assert [abs(b * scale - p) <= 2 * scale for b, p in zip(box, picture, strict=True)] == [
        True
    ] * 4, (box, picture, scale)
    assert bits & FRAME
    # content counts the bands' depths in draft pixels (8 of the window's): the picture
    # and a draft pixel's line or two
    assert 1.0 <= content / (image.width * image.height) < 1.15
    # the same picture alone: no bands, in any round
    alone = decode_image(_jpeg(image, 92), Config(), 32, "YCbCr")
    g = grey_levels(alone.image)
    assert measure(g, *image.size, alone.image, alone.chroma)[1:3] == (0, (0, 0, *alone.image.size))


def test_strokes_found_in_a_later_round_make_a_frame():
    # plain bars above and below (44% of the height: the side lines are not flat until
    # they are taken away), then a sidebar of links at the left, found in the second
    # round: bands on three sides over the rounds, one holding strokes, make a frame
    image = textured(320)
    w, h = image.size
    bar, side = int(0.28 * h), int(0.35 * w)
    canvas = Image.new("RGB", (w + side, h + 2 * bar), (230, 232, 236))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, canvas.width, bar], fill=(40, 40, 48))
    draw.rectangle([0, bar + h, canvas.width, canvas.height], fill=(40, 40, 48))
    font = ImageFont.load_default(size=bar // 3)
    for k in range(4):
        draw.text((8, bar + 10 + k * (h // 4)), f"link {k}", fill=(10, 10, 10), font=font)
    canvas.paste(image, (side, bar))
    decoded = decode_image(_jpeg(canvas, 92), Config(), 32, "YCbCr")
    grey = grey_levels(decoded.image)
    _, bits, box = measure(grey, *canvas.size, decoded.image, decoded.chroma)[:3]
    scale = canvas.width / decoded.image.width
    picture = (side, bar, side + w, bar + h)
    assert all(abs(b * scale - p) <= 2 * scale for b, p in zip(box, picture, strict=True))
    assert bits & FRAME and not bits & CAPTION


def test_a_full_decode_is_reduced_to_the_drafts_scale_by_the_nearest_ratio():
    # the draft of a side of n pixels at scale s holds ceil(n / s): a full decode of 65,
    # 129 or 257 pixels is 2, 4 or 8 draft pixels each, not 1, 3 or 7 (floor division)
    for side, scale in ((65, 2), (129, 4), (257, 8), (64, 2), (512, 8)):
        assert noise_scale(side, side) == scale
        assert _draft_factor(side, side, side, side) == scale
        assert _draft_factor(-(-side // scale), side, side, side) == 1  # the draft itself
