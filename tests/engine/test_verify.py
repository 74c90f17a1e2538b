"""Geometric verification: edited copies accepted, look-alikes rejected with the reason
that should catch them. Every picture is drawn here (no scikit-image)."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from dedup.engine import verify as V
from dedup.engine.verify import (
    Features,
    Verdict,
    content_box,
    features,
    hamming_distances,
    mutual_matches,
    verify,
)
from dedup.synth import make_image

W, H = 480, 360


def picture(seed: int, width: int = W, height: int = H) -> Image.Image:
    """A textured RGB picture: synth's colour field under 150 random shapes, so ORB
    finds corners all over it (synth's own pictures give it under 200, mostly noise)."""
    img = make_image(seed, width, height)
    rng = np.random.default_rng(seed + 10_000)
    draw = ImageDraw.Draw(img)
    for _ in range(150):
        x, y = rng.uniform(0, 1, 2) * (width, height)
        size = rng.uniform(0.02, 0.12) * min(width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x, y, x + size, y + size * rng.uniform(0.5, 1.5)), fill=colour)
        elif kind == 1:
            draw.rectangle((x, y, x + size * rng.uniform(0.5, 1.5), y + size), fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 3))
            draw.polygon(
                [(x + size * np.cos(t), y + size * np.sin(t)) for t in angles], fill=colour
            )
    return img


def poster(seed: int) -> Image.Image:
    """Flat colour blocks on a plain ground: most thumbnail cells are flat."""
    img = Image.new("RGB", (W, H), (200, 200, 190))
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x, y = rng.uniform(0, 1, 2) * (W, H)
        size = rng.uniform(0.05, 0.25) * min(W, H)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle((x, y, x + size * rng.uniform(0.5, 2), y + size), fill=colour)
    return img


def jpeg(img: Image.Image, quality: int = 90) -> Image.Image:
    """`img` after a JPEG round trip, as copies on the web are."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def crop(img: Image.Image, left: float, top: float, right: float, bottom: float):
    w, h = img.size
    return img.crop((round(w * left), round(h * top), round(w * right), round(h * bottom)))


def pad(img: Image.Image, vertical: bool, colour=(0, 0, 0), share: float = 0.15):
    """Letterbox (bars above and below) or pillarbox (bars left and right)."""
    w, h = img.size
    bar = round((h if vertical else w) * share)
    size = (w, h + 2 * bar) if vertical else (w + 2 * bar, h)
    canvas = Image.new("RGB", size, colour)
    canvas.paste(img, (0, bar) if vertical else (bar, 0))
    return canvas


def logo(img: Image.Image, share: float = 0.3) -> Image.Image:
    """A high-contrast emblem with a word on it, stamped in the bottom right corner."""
    img = img.convert("RGB").copy()
    side = round(min(img.size) * share)
    emblem = Image.new("RGB", (side, side), (20, 20, 120))
    draw = ImageDraw.Draw(emblem)
    for k in range(4):
        inset = k * side // 9
        draw.rectangle((inset, inset, side - inset, side - inset), outline=(250, 220, 0), width=3)
    draw.text((side // 5, side // 3), "ACME", fill="white", font=ImageFont.load_default(side // 4))
    img.paste(emblem, (img.width - side - 10, img.height - side - 10))
    return img


def watermark(img: Image.Image, alpha: int = 150) -> Image.Image:
    """Translucent text across the middle of the picture."""
    img = img.convert("RGB").copy()
    draw = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default(img.height // 9)
    draw.text(
        (img.width * 0.1, img.height * 0.45), "(c) stock", fill=(255, 255, 255, alpha), font=font
    )
    return img


def caption(img: Image.Image) -> Image.Image:
    """A black strip with white text over the bottom 14% of the picture."""
    img = img.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, round(img.height * 0.86), img.width, img.height), fill=(0, 0, 0))
    font = ImageFont.load_default(img.height // 14)
    draw.text((8, round(img.height * 0.88)), "Breaking: a caption", fill="white", font=font)
    return img


def banner(img: Image.Image, share: float = 0.3) -> Image.Image:
    """One fixed textured band, `share` of the height, pasted across the middle."""
    img = img.convert("RGB").copy()
    band = picture(998, img.width, round(img.height * share))
    img.paste(band, (0, round(img.height * (0.5 - share / 2))))
    return img


def noise(img: Image.Image, sigma: float = 8.0) -> Image.Image:
    pixels = np.asarray(img, np.float32) + np.random.default_rng(0).normal(0, sigma, (H, W, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def template(photo: Image.Image, inset: float) -> Image.Image:
    """`photo` set in the middle of one fixed design: a patterned frame with a title."""
    frame = picture(999, 640, 480)
    draw = ImageDraw.Draw(frame)
    draw.text((20, 8), "SUMMER SALE", fill="white", font=ImageFont.load_default(36))
    width, height = round(640 * inset), round(480 * inset)
    frame.paste(photo.resize((width, height)), ((640 - width) // 2, (480 - height) // 2))
    return jpeg(frame)


ORIGINAL = picture(1)

POSITIVE_EDITS = {
    "jpeg q50": lambda i: jpeg(i, 50),
    "resize 0.5": lambda i: jpeg(i.resize((W // 2, H // 2), Image.Resampling.BILINEAR)),
    "letterbox black": lambda i: jpeg(pad(i, vertical=True)),
    "pillarbox white": lambda i: jpeg(pad(i, vertical=False, colour=(255, 255, 255))),
    "centre crop 5%": lambda i: jpeg(crop(i, 0.025, 0.025, 0.975, 0.975)),
    "centre crop 20%": lambda i: jpeg(crop(i, 0.1, 0.1, 0.9, 0.9)),
    "corner crop 20%": lambda i: jpeg(crop(i, 0.2, 0.2, 1, 1)),
    "rotate 4": lambda i: jpeg(i.rotate(4, resample=Image.Resampling.BICUBIC)),
    "watermark": lambda i: jpeg(watermark(i)),
    "logo": lambda i: jpeg(logo(i)),
    "caption": lambda i: jpeg(caption(i)),
    "blur 1.5": lambda i: jpeg(i.filter(ImageFilter.GaussianBlur(1.5))),
    "noise": lambda i: jpeg(noise(i)),
    "brighter 30%": lambda i: jpeg(ImageEnhance.Brightness(i).enhance(1.3)),
    "darker 30%": lambda i: jpeg(ImageEnhance.Brightness(i).enhance(0.7)),
    "grayscale": lambda i: jpeg(i.convert("L")),
    "crop, shrink, q60": lambda i: jpeg(
        crop(i, 0.05, 0.05, 0.95, 0.95).resize((W * 7 // 10, H * 7 // 10)), 60
    ),
    "letterbox, watermark, q70": lambda i: jpeg(pad(watermark(i), vertical=True), 70),
    "rotate, blur, brighter": lambda i: jpeg(
        ImageEnhance.Brightness(i.rotate(3).filter(ImageFilter.GaussianBlur(1))).enhance(1.2)
    ),
}


@pytest.fixture(scope="module")
def original() -> Features:
    return features(jpeg(ORIGINAL))


@pytest.mark.parametrize("edit", list(POSITIVE_EDITS))
def test_edited_copy_is_accepted(original, edit):
    verdict = verify(original, features(POSITIVE_EDITS[edit](ORIGINAL)))
    assert (verdict.accepted, verdict.reason) == (True, "ok"), verdict


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_areas_agree_after_a_brightness_change(seed):
    # Flat cells are compared by level, so b's tones must be matched to a's first.
    verdict = verify(
        features(jpeg(poster(seed))),
        features(jpeg(ImageEnhance.Brightness(poster(seed)).enhance(0.7))),
    )
    assert (verdict.accepted, verdict.agreement) == (True, 1.0), verdict


@pytest.mark.parametrize("seed", [1, 2])
def test_flat_panel_in_another_level_differs_in_content(seed):
    def with_panel(level: int) -> Image.Image:
        img = picture(seed)
        box = (W // 4, H // 4, W * 3 // 4, H * 3 // 4)  # the middle half of each side
        ImageDraw.Draw(img).rectangle(box, fill=(level, level, level))
        return jpeg(img)

    verdict = verify(features(with_panel(50)), features(with_panel(170)))
    # Everything around the panel matches; flat cells must be compared by level.
    assert verdict.inliers > 100
    assert (verdict.accepted, verdict.reason) == (False, "content_differs"), verdict


def test_mirror_is_accepted_only_with_the_mirror_flag(original):
    mirrored = jpeg(ImageOps.mirror(ORIGINAL))
    assert verify(original, features(mirrored, mirror=True)).accepted
    assert not verify(original, features(mirrored)).accepted


def test_different_pictures_are_rejected(original):
    verdict = verify(original, features(jpeg(picture(2))))
    assert not verdict.accepted
    assert verdict.reason in ("few_matches", "few_inliers")


def test_shared_logo_on_different_pictures_is_clustered():
    verdict = verify(features(jpeg(logo(picture(3)))), features(jpeg(logo(picture(4)))))
    assert (verdict.accepted, verdict.reason) == (False, "clustered"), verdict


def test_shared_banner_on_different_pictures_differs_in_content():
    verdict = verify(features(jpeg(banner(picture(3)))), features(jpeg(banner(picture(4)))))
    assert (verdict.accepted, verdict.reason) == (False, "content_differs"), verdict
    # The band spans the width: its inliers are spread enough; only the pixels outside
    # it tell the pictures apart.
    assert min(verdict.spread_a, verdict.spread_b) >= V.MIN_SPREAD


@pytest.mark.parametrize("seeds", [(3, 4), (5, 6), (7, 8)])
def test_shared_translucent_watermark_is_rejected(seeds):
    first, second = (features(jpeg(watermark(picture(s), alpha=220))) for s in seeds)
    assert not verify(first, second).accepted


def test_quadrant_tile_is_a_partial_overlap(original):
    tile = crop(ORIGINAL, 0.5, 0.5, 1, 1)
    for copy in (tile, tile.resize((W, H))):  # as cut, and blown up to the whole's size
        verdict = verify(original, features(jpeg(copy)))
        assert (verdict.accepted, verdict.reason) == (False, "partial_overlap"), verdict
        assert verdict.overlap_a == pytest.approx(0.25, abs=0.05)


def test_third_of_a_photo_is_a_partial_overlap(original):
    verdict = verify(original, features(jpeg(crop(ORIGINAL, 0, 0, 1 / 3, 1))))
    assert (verdict.accepted, verdict.reason) == (False, "partial_overlap"), verdict


def test_same_template_with_different_photos_is_rejected():
    verdict = verify(
        features(template(picture(5), inset=0.6)), features(template(picture(6), inset=0.6))
    )
    assert (verdict.accepted, verdict.reason) == (False, "content_differs"), verdict
    # The frame alone matches: the geometry passes, only the pixels tell them apart.
    assert verdict.overlap_a > 0.95 and verdict.spread_a >= V.MIN_SPREAD


def test_small_photo_in_a_large_template_differs_in_the_centre():
    verdict = verify(
        features(template(picture(5), inset=0.4)), features(template(picture(6), inset=0.4))
    )
    # Most of the frame agrees; its middle, where the photos are, does not.
    assert verdict.agreement >= V.MIN_AGREEMENT
    assert (verdict.accepted, verdict.reason) == (False, "centre_differs"), verdict


def test_large_rotation_is_implausible(original):
    verdict = verify(original, features(jpeg(ORIGINAL.rotate(30, expand=True))))
    assert (verdict.accepted, verdict.reason) == (False, "implausible_transform"), verdict
    assert verdict.rotation == pytest.approx(-30, abs=1)


def test_content_box_trims_letterbox_and_pillarbox_bars_exactly():
    content = np.asarray(ORIGINAL.convert("L"))
    letterbox = np.zeros((H + 100, W), np.uint8)
    letterbox[40 : 40 + H] = content
    assert content_box(letterbox) == (0, 40, W, 40 + H)
    pillarbox = np.full((H, W + 90), 255, np.uint8)
    pillarbox[:, 90:] = content
    assert content_box(pillarbox) == (90, 0, W + 90, H)
    assert content_box(content) == (0, 0, W, H)


def test_content_box_keeps_the_frame_of_a_mostly_flat_picture():
    gray = np.zeros((200, 200), np.uint8)
    gray[90:110, 20:180] = np.arange(160, dtype=np.uint8)  # a strip 10% high: not a picture
    assert content_box(gray) == (0, 0, 200, 200)
    assert content_box(np.full((50, 60), 7, np.uint8)) == (0, 0, 60, 50)


def test_features_are_resized_and_found_inside_the_content_box_only():
    big = pad(picture(7, 1024, 640), vertical=True, share=0.2)  # 1024 x 896
    found = features(big)
    assert found.size == (V.VERIFY_SIDE, round(896 * V.VERIFY_SIDE / 1024))
    x0, y0, x1, y1 = found.box
    assert (x0, x1) == (0, V.VERIFY_SIDE) and abs(y0 - 64) <= 1 and abs(y1 - 384) <= 1
    assert found.keypoints.dtype == np.float32 and found.descriptors.dtype == np.uint8
    assert found.descriptors.shape == (len(found.keypoints), 32) and len(found.keypoints) > 500
    assert (found.keypoints[:, 1] >= y0).all() and (found.keypoints[:, 1] < y1).all()


def test_small_copy_is_blown_up_and_accepted(original):
    small = jpeg(ORIGINAL.resize((W // 4, H // 4), Image.Resampling.BILINEAR))  # 120 x 90
    found = features(small)
    assert found.size == (V.MIN_VERIFY_SIDE, V.MIN_VERIFY_SIDE * 3 // 4)
    verdict = verify(original, found)
    assert (verdict.accepted, verdict.reason) == (True, "ok"), verdict
    assert verdict.scale == pytest.approx(V.MIN_VERIFY_SIDE / W, rel=0.02)


def test_flat_picture_has_no_features_and_is_rejected(original):
    flat = features(Image.new("RGB", (300, 200), (90, 140, 30)))
    assert len(flat.keypoints) == 0 and flat.descriptors.shape == (0, 32)
    assert verify(original, flat) == Verdict(False, "few_matches")


def test_results_are_deterministic(original):
    copy_image = POSITIVE_EDITS["rotate 4"](ORIGINAL)
    first, second = features(copy_image), features(copy_image)
    assert np.array_equal(first.keypoints, second.keypoints)
    assert np.array_equal(first.descriptors, second.descriptors)
    cv2.setRNGSeed(1)
    verdict = verify(original, first)
    cv2.setRNGSeed(12345)  # RANSAC must not depend on OpenCV's global generator
    assert verify(original, second) == verdict
    assert verify(original, first) == verdict


def test_hamming_distances_equal_brute_force():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (37, 32), dtype=np.uint8)
    b = rng.integers(0, 256, (23, 32), dtype=np.uint8)
    brute = np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)
    assert np.array_equal(hamming_distances(a, b), brute)


def test_mutual_matches_keep_clear_mutual_nearest_only():
    rng = np.random.default_rng(1)
    b = rng.integers(0, 256, (6, 32), dtype=np.uint8)
    base = b[5].copy()
    b[3] = base
    b[3, :4] ^= 0xFF  # 32 bits from base one way ...
    b[5, 4:8] ^= 0xFF  # ... and 32 bits the other: base fails the ratio test
    near, nearer = b[1].copy(), b[1].copy()
    near[:2] ^= 0x0F  # 8 bits from b[1]: its nearest is b[1], but b[1]'s nearest is `nearer`
    nearer[0] ^= 0x01
    a = np.vstack([b[2], b[4], b[0], base, near, nearer])
    assert mutual_matches(a, b).tolist() == [[0, 2], [1, 4], [2, 0], [5, 1]]


def slide(seed: int) -> Image.Image:
    """A slide of one template: the same title bar, logo and bullet layout on a white
    ground, different words in every line."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=18)
    draw.rectangle((0, 0, W, 50), fill=(30, 60, 120))
    draw.ellipse((W - 45, 8, W - 10, 42), fill=(240, 180, 0))
    words = ["data", "model", "images", "training", "copies", "shards", "recall", "scale"]
    draw.text((15, 14), " ".join(rng.choice(words, 3)).title(), fill=(255, 255, 255), font=font)
    for line in range(7):
        y = 75 + line * 38
        draw.ellipse((20, y + 6, 30, y + 16), fill=(30, 60, 120))
        draw.text((42, y), " ".join(rng.choice(words, 4)), fill=(20, 20, 20), font=font)
    return img


def test_slides_of_one_template_are_not_copies_but_a_slide_is_its_own():
    """Their flat ground agrees everywhere and their bullets match under the identity:
    the textured cells (the words) must agree too. Checked both ways round, as dedup does."""
    slides = [V.features(slide(k)) for k in range(6)]
    for a, b in [(a, b) for a in range(6) for b in range(6) if a != b]:
        verdict = V.verify(slides[a], slides[b])
        assert not verdict.accepted, (a, b, verdict)
    assert V.verify(slides[3], V.features(jpeg(slide(3), 60))).accepted
