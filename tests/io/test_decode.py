import io

import numpy as np
import pytest
from PIL import Image

from dedup.core.config import Config
from dedup.io.decode import decode_image, image_member
from dedup.synth import encode, make_image
from tests.helpers import png_bomb

CONFIG = Config()


def test_image_member_is_first_with_image_extension():
    names = ["k.json", "k.txt", "k.seg.png", "k.jpg"]
    assert image_member(names, CONFIG) == 2
    assert image_member(["k.txt", "k.cls"], CONFIG) is None
    assert image_member(["k.JPG"], CONFIG) == 0


def test_format_is_sniffed_not_trusted():
    png = encode(make_image(1, 40, 30), "PNG")
    d = decode_image(png, CONFIG)  # whatever the member is called
    assert d.reason is None and d.format == "PNG" and (d.width, d.height) == (40, 30)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"<html><body>404</body></html>", "undecodable"),
        (encode(make_image(1, 64, 64), "JPEG")[:300], "undecodable"),
        (encode(make_image(1, 16, 16), "PPM"), "unsupported_format"),
        (b"", "undecodable"),
    ],
)
def test_bad_images_get_a_reason(data, reason):
    assert decode_image(data, CONFIG).reason == reason


def test_pixel_limit_checked_from_header():
    d = decode_image(png_bomb(30_000, 30_000), CONFIG)
    assert d.reason == "too_large" and (d.width, d.height) == (30_000, 30_000)


def test_sixteen_bit_images_are_scaled_not_clipped_white():
    ramp = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    img = Image.fromarray(ramp)
    d = decode_image(encode(img, "PNG"), CONFIG)
    arr = np.asarray(d.image)
    assert d.image.mode == "L"
    assert arr.min() == 0 and arr.max() == (64 * 64 - 1) * 16 >> 8
    assert len(np.unique(arr)) > 200


def test_alpha_and_palette_composite_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    d = decode_image(encode(rgba, "PNG"), CONFIG)
    assert d.image.mode == "RGB" and d.image.getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    d = decode_image(encode(pal, "PNG"), CONFIG)
    assert d.image.getpixel((3, 3)) == (0, 0, 255)


def test_exif_orientation_applied():
    img = make_image(2, 60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    d = decode_image(encode(img, "JPEG", exif=exif.tobytes()), CONFIG)
    assert (d.width, d.height) == (40, 60)


def test_malformed_exif_does_not_crash():
    data = encode(make_image(2, 60, 40), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    d = decode_image(data, CONFIG)
    assert d.reason is None and (d.width, d.height) == (60, 40)


def test_cmyk_and_animated_first_frame():
    cmyk = make_image(3, 32, 32).convert("CMYK")
    d = decode_image(encode(cmyk, "JPEG"), CONFIG)
    assert d.image.mode == "RGB"
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    d = decode_image(buf.getvalue(), CONFIG)
    assert d.image.getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_a_ycbcr_draft_is_the_grey_draft_plus_the_colour_planes(orientation, subsampling):
    # the pHash, the views and the keep features read `image`: it must be the L draft's
    # very pixels, turned the same way; the colour planes come turned with it
    img = make_image(7 + subsampling, 330, 250)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", exif=exif.tobytes(), subsampling=subsampling, quality=90)
    grey = decode_image(data, CONFIG, 32, "L")
    both = decode_image(data, CONFIG, 32, "YCbCr")
    assert both.image.mode == "L" and grey.chroma is None
    assert np.array_equal(np.asarray(both.image), np.asarray(grey.image))
    assert both.chroma.mode == "YCbCr" and both.chroma.size == grey.image.size
    rgb = decode_image(data, CONFIG, 32, "RGB").image.convert("YCbCr")
    planes = np.asarray(both.chroma)[:, :, 1:].astype(int)
    assert np.abs(np.asarray(rgb)[:, :, 1:].astype(int) - planes).mean() < 1.5
    # a grey JPEG, a CMYK one and a PNG: as the L draft, no planes
    for other in (img.convert("L"), img.convert("CMYK")):
        d = decode_image(encode(other, "JPEG"), CONFIG, 32, "YCbCr")
        assert d.chroma is None and d.image.mode == ("L" if other.mode == "L" else "RGB")
    assert decode_image(encode(img, "PNG"), CONFIG, 32, "YCbCr").chroma is None


def test_a_jpeg_stored_in_rgb_is_drafted_grey_with_its_colours_apart():
    # Adobe's transform 0 (keep_rgb): libjpeg converts RGB to grey but not to YCbCr, so a
    # YCbCr draft fails; the decode falls back to the L draft (the pixels every run used
    # before) and takes the colours from an RGB draft: never "undecodable"
    img = make_image(11, 400, 300)
    data = encode(img, "JPEG", quality=90, keep_rgb=True)
    grey = decode_image(data, CONFIG, 32, "L")
    both = decode_image(data, CONFIG, 32, "YCbCr")
    assert both.reason is None and both.image.mode == "L"
    assert np.array_equal(np.asarray(both.image), np.asarray(grey.image))
    assert both.chroma.mode == "YCbCr" and both.chroma.size == grey.image.size
    usual = decode_image(encode(img, "JPEG", quality=90), CONFIG, 32, "YCbCr").chroma
    planes = np.asarray(both.chroma)[:, :, 1:].astype(int)
    assert np.abs(planes - np.asarray(usual)[:, :, 1:]).mean() < 2
    # a damaged one is still undecodable, one line of reason
    assert decode_image(data[: len(data) // 3], CONFIG, 32, "YCbCr").reason == "undecodable"
