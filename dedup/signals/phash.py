"""64-bit DCT perceptual hash, bit for bit the same as `imagehash.phash`, batched."""

from __future__ import annotations

import numpy as np
import scipy.fftpack
from PIL import Image

HASH_SIZE = 8
HIGHFREQ_FACTOR = 4
IMG_SIZE = HASH_SIZE * HIGHFREQ_FACTOR  # 32


def shrink(image: Image.Image) -> Image.Image:
    """The 32x32 grayscale image imagehash hashes: convert("L"), then a Lanczos resize."""
    return image.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS)


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
    if pixels.ndim != 3 or pixels.shape[1:] != (IMG_SIZE, IMG_SIZE):
        raise ValueError(f"expected (N, {IMG_SIZE}, {IMG_SIZE}) pixels, got {pixels.shape}")
    if len(pixels) == 0:
        return np.zeros((0, HASH_SIZE), dtype=np.uint8)
    data = pixels.astype(np.float64)
    # The second transform runs on the 8 low rows only: each row is transformed on its
    # own, so those rows come out exactly as in imagehash's full 32x32 transform.
    rows = scipy.fftpack.dct(data, axis=1)[:, :HASH_SIZE, :]
    low = scipy.fftpack.dct(rows, axis=2)[:, :, :HASH_SIZE].reshape(len(pixels), -1)
    median = np.median(low, axis=1, keepdims=True)
    return np.packbits(low > median, axis=1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between packed codes, broadcasting over leading axes."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1)
