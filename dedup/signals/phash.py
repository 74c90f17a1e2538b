"""64-bit DCT perceptual hash, bit for bit the same as `imagehash.phash`, batched; and
for low-detail images, whose hash is mostly noise, a colour signature instead."""

from __future__ import annotations

import numpy as np
import scipy.fftpack
from PIL import Image

from dedup.signals.resample import LANCZOS, resize_grey

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
IMG_SIZE = HASH_SIZE * HIGHFREQ_FACTOR  # 32
CODE_BYTES = HASH_SIZE * HASH_SIZE // 8  # one bit per coefficient of the 8x8 block


def shrink(image: Image.Image) -> Image.Image:
    """The 32x32 grayscale image imagehash hashes: convert("L"), then a Lanczos resize."""
    return image.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS)


def shrink_pixels(pixels: np.ndarray) -> np.ndarray:
    """`shrink` of a grayscale image given as an (h, w) uint8 array: the same 32x32
    pixels (dedup.signals.resample: Pillow's Lanczos resize, bit for bit), five times
    faster at web size and without a Pillow image."""
    return resize_grey(pixels, (IMG_SIZE, IMG_SIZE), LANCZOS)


def phash_input(image: Image.Image) -> np.ndarray:
    """`shrink(image)` as a (32, 32) uint8 array."""
    return np.asarray(shrink(image), dtype=np.uint8)


def stack_shrunk(smalls: list[Image.Image]) -> np.ndarray:
    """(N, 32, 32) uint8 from N shrunk images, pasted into one strip and read once (one
    array conversion per batch instead of one per image)."""
    strip = Image.new("L", (IMG_SIZE, IMG_SIZE * len(smalls)))
    for k, small in enumerate(smalls):
        strip.paste(small, (0, IMG_SIZE * k))
    return np.frombuffer(strip.tobytes(), dtype=np.uint8).reshape(-1, IMG_SIZE, IMG_SIZE)


def phash_batch(pixels: np.ndarray) -> np.ndarray:
    """Hash a (N, 32, 32) uint8 batch into (N, 8) uint8 codes, most significant bit first.

    Same steps as imagehash: 2-D DCT-II, the top-left 8x8 block, each bit set when the
    coefficient is above the block's median; bits packed row-major, like its hex string.
    """
    return phash_and_detail(pixels)[0]


# A flat or near-flat image (solid colour, blank frame, gradient) has almost every
# coefficient of the block at ~0, so most of its bits are signs of rounding noise and
# unrelated flat images collide. A bit is confident when its coefficient lies more than
# DETAIL_FLOOR from the block median. scipy's DCT is unnormalized: a full-frame cosine
# of amplitude A grey levels gives a coefficient of 1024 A, so the floor is half a grey
# level. Measured (README, "Flat and low-detail images"): a solid colour as PNG or JPEG
# has no AC coefficient above 0 (small WebPs: up to 3 past the floor); with +-2 noise,
# as PNG or JPEG q95, none above 452.
DETAIL_FLOOR = 512.0
# Fewer confident bits than this: low-detail. Measured minimum for 7,000 synthetic
# pictures (28x28 to 1024x768): 43; screenshots of text 31; linear gradients at most 11;
# a solid colour 1 (its DC term; 0 for black).
LOW_DETAIL_BITS = 16
# Low-detail images are compared by a colour signature instead: a SIGNATURE_SIDE^2 RGB
# thumbnail (box filter), two of them matching when no value differs by more than
# SIGNATURE_TOLERANCE (a solid colour re-encoded as JPEG q50 to q95 moves at most 3).
SIGNATURE_SIDE = 8
SIGNATURE_BYTES = 3 * SIGNATURE_SIDE * SIGNATURE_SIDE
SIGNATURE_TOLERANCE = 4
# Tiny images (MNIST's 28x28 digits, CIFAR's 32x32 photos, icons): at most this many
# pixels. Their pHash is no fingerprint: 300 distinct 28x28 digits drawn in one style
# have 310 pairs within 8 bits, 107 of them between different digits. They are matched
# by their signature instead: two tiny images match when the root-mean-square
# difference of their signatures' luminance is at most TINY_RMS grey levels (README,
# "Tiny images": JPEG q50 to q90 and WebP copies of 32x32 pictures differ by at most
# 1.7, of 28x28 digits by 2.4; different digits by 5.2 at the least). Luminance, not
# RGB: JPEG's chroma subsampling moves a 32x32 picture's colours by up to 11 RMS.
TINY_PIXELS = 32 * 32
# A low-detail image's shape counts too, as a tiny one's does (its signature is taken on
# a square): a 100000x1 strip is not a 1x100000 strip of the same colour. The shape code
# is 128 + SHAPE_SCALE * log2(width / height), rounded and clipped to a byte, and two
# low-detail images link only when their codes differ by at most SIGNATURE_TOLERANCE:
# aspect ratios within about a fifth (4:3 and 3:2 link, 4:3 and 16:9 do not; a resize
# keeps its code).
SHAPE_SCALE = 16
TINY_RMS = 3.0
# ... and their colours too, more loosely (JPEG q50 moves a 32x32 picture's colours by up
# to 11.4 RMS): a picture and its recoloured copy of equal luminance stay apart.
TINY_RGB_RMS = 12.0


def phash_and_detail(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8) uint8 pHash codes of a (N, 32, 32) uint8 batch, and (N,) int16 detail: how
    many of the 64 coefficients lie more than DETAIL_FLOOR from the block median."""
    if pixels.ndim != 3 or pixels.shape[1:] != (IMG_SIZE, IMG_SIZE):
        raise ValueError(f"expected (N, {IMG_SIZE}, {IMG_SIZE}) pixels, got {pixels.shape}")
    if len(pixels) == 0:
        return np.zeros((0, CODE_BYTES), dtype=np.uint8), np.zeros(0, dtype=np.int16)
    data = pixels.astype(np.float64)
    # The second transform runs on the 8 low rows only: each row is transformed on its
    # own, so those rows come out exactly as in imagehash's full 32x32 transform.
    rows = scipy.fftpack.dct(data, axis=1)[:, :HASH_SIZE, :]
    low = scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIZE].reshape(len(pixels), -1)
    median = np.median(low, axis=1, keepdims=True)
    detail = (np.abs(low - median) > DETAIL_FLOOR).sum(axis=1).astype(np.int16)
    return np.packbits(low > median, axis=1), detail


def is_low_detail(detail: np.ndarray) -> np.ndarray:
    """True where a pHash has too few confident bits to be compared bit by bit."""
    return np.asarray(detail) < LOW_DETAIL_BITS


def is_tiny(pixels: np.ndarray) -> np.ndarray:
    """True for images of at most TINY_PIXELS pixels (width x height)."""
    return np.asarray(pixels) <= TINY_PIXELS


def shape_code(width: np.ndarray, height: np.ndarray) -> np.ndarray:
    """(N,) uint8 shape codes of images width x height (SHAPE_SCALE)."""
    ratio = np.log2(np.asarray(width, dtype=np.float64) / np.asarray(height, dtype=np.float64))
    return np.clip(128 + np.round(SHAPE_SCALE * ratio), 0, 255).astype(np.uint8)


def by_signature(detail: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Rows the pHash signal matches by signature, not bit by bit: low-detail or tiny."""
    return is_low_detail(detail) | is_tiny(pixels)


def signature_luma(signatures: np.ndarray) -> np.ndarray:
    """(N, SIGNATURE_SIDE^2) uint8 luminance (ITU-R 601, as Pillow's "L") of (N,
    SIGNATURE_BYTES) RGB signatures."""
    rgb = np.asarray(signatures, dtype=np.float32).reshape(len(signatures), SIGNATURE_SIDE**2, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)


def colour_signature(image: Image.Image) -> bytes:
    """SIGNATURE_BYTES bytes: the image box-filtered to an 8x8 RGB thumbnail, row-major.
    A tiny image that is not square is first centred on a black square, so that its
    shape is part of its signature (a 2x512 strip is not a 32x32 square)."""
    w, h = image.size
    if w * h <= TINY_PIXELS and w != h:
        square = Image.new(image.mode, (max(w, h), max(w, h)))
        square.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        image = square
    # Resized first: normalized images are RGB or L, and L's channels only repeat.
    side = (SIGNATURE_SIDE, SIGNATURE_SIDE)
    return image.resize(side, Image.Resampling.BOX).convert("RGB").tobytes()


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between packed codes, broadcasting over leading axes."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1)
