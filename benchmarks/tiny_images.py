"""The tiny-image rule's effect (README, "Tiny images"): pHash at the default 8 bits
against the rule (signature luminance within TINY_RMS, colours within TINY_RGB_RMS),
on 240 distinct 28x28 digits (10 digits x 24 handwriting-like variants,
`dedup.synth.make_digit`) and 200 distinct 32x32 pictures (`make_image`), and on
copies of each made with common edits.

    python benchmarks/tiny_images.py
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dedup.signals.edges import tiny_match
from dedup.signals.phash import (
    TINY_RGB_RMS,
    TINY_RMS,
    colour_signature,
    phash_and_detail,
    shrink,
    stack_shrunk,
)
from dedup.synth import encode, make_digit, make_image

PHASH_THRESHOLD = 8


def reopen(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


EDITS = {
    "PNG, other compression": lambda img: reopen(encode(img, "PNG", compress_level=1)),
    "BMP": lambda img: reopen(encode(img, "BMP")),
    "JPEG q90": lambda img: reopen(encode(img.convert("RGB"), "JPEG", quality=90)),
    "JPEG q75": lambda img: reopen(encode(img.convert("RGB"), "JPEG", quality=75)),
    "JPEG q50": lambda img: reopen(encode(img.convert("RGB"), "JPEG", quality=50)),
    "WebP q85": lambda img: reopen(encode(img, "WEBP", quality=85)),
    "grayscale": lambda img: img.convert("L").convert("RGB"),
}


def features(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    codes = phash_and_detail(stack_shrunk([shrink(i) for i in images]))[0]
    sigs = np.stack([np.frombuffer(colour_signature(i), np.uint8) for i in images])
    return codes.view(">u8").reshape(-1), sigs


def within(words_a, sig_a, words_b, sig_b) -> tuple[np.ndarray, np.ndarray]:
    """(pHash within the threshold, tiny rule matches) for aligned pairs."""
    bits = np.bitwise_count(words_a ^ words_b)
    return bits <= PHASH_THRESHOLD, tiny_match(sig_a, sig_b)


def main() -> None:
    sets = {
        "28x28 digits": ([make_digit(d, v) for d in range(10) for v in range(24)], 24),
        "32x32 pictures": ([make_image(500 + k, 32, 32) for k in range(200)], 1),
    }
    rule = f"tiny rule (luma RMS <= {TINY_RMS:g}, RGB RMS <= {TINY_RGB_RMS:g})"
    print(f"| set | pairs | pHash <= {PHASH_THRESHOLD} bits | {rule} |")
    print("| --- | ---: | ---: | ---: |")
    for name, (images, per_class) in sets.items():
        words, sigs = features(images)
        iu = np.triu_indices(len(images), 1)
        ph, tiny = within(words[iu[0]], sigs[iu[0]], words[iu[1]], sigs[iu[1]])
        cls = np.arange(len(images)) // per_class
        other = cls[iu[0]] != cls[iu[1]]
        print(
            f"| {name}, distinct: false pairs | {len(iu[0]):,} | {ph.sum()} "
            f"({(ph & other).sum()} between different digits) | {tiny.sum()} |"
            if per_class > 1
            else f"| {name}, distinct: false pairs | {len(iu[0]):,} | {ph.sum()} | {tiny.sum()} |"
        )
    print()
    print(f"| copies found (recall) | {' | '.join(sets)} |")
    print("| --- | " + " | ".join("---:" for _ in sets) + " |")
    for edit, fn in EDITS.items():
        cells = []
        for images, _ in sets.values():
            words, sigs = features(images)
            cw, cl = features([fn(i) for i in images])
            ph, tiny = within(words, sigs, cw, cl)
            cells.append(f"{tiny.mean():.0%} (pHash {ph.mean():.0%})")
        print(f"| {edit} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
