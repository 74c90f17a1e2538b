"""Geometric verification of candidate duplicate pairs, without learned weights.

The hash tier proposes pairs in a grey zone, where a code distance alone cannot tell an
edited copy from a look-alike. Here each pair is confirmed or rejected by matching ORB
features and fitting ONE similarity transform (rotation, uniform scale, translation) with
RANSAC. A pair is a duplicate when that transform explains matches spread over the
textured part of both frames, the two frames mostly cover each other, and the aligned
pictures agree cell by cell, in the middle of the frame too. A shared logo, a tile of a
photo, or two photos in one template design each fail one of these tests, and
`Verdict.reason` names which.

Mirrored copies: the caller passes ``features(image_b, mirror=True)`` when the hash tier
matched the pair as mirror images; `verify` itself never fits a reflection.

The thresholds were set on the photographs bundled with scikit-image, scikit-learn,
matplotlib and PyWavelets (24 photographs; a scratch script, not kept in the repository):
864 edited copies (36 edits each: JPEG, resizing, mirroring, bars, crops, rotations,
overlays, blur, noise, brightness, grayscale, combinations) and 4,716 hard negatives
(different photos; one logo, watermark or caption stamped on two photos; tiles of a
photo against each other and against the whole; two photos in one template design), at
the photos' own sizes and blown up 2x. "Positives" and "negatives" below mean those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from dedup.signals.views import content_box

# Verification runs one task per core: OpenCV's own thread pool would oversubscribe them.
cv2.setNumThreads(1)

# Long side of the picture features are computed on; larger pictures are shrunk. 384 and
# 512 accepted the same positives (within one pair); 320 accepted a negative (a
# template); 640 and 768 accepted 1-3 fewer positives, at more cost.
VERIFY_SIDE = 512
# Smaller pictures are blown up to this long side: ORB finds no keypoint within 31 pixels
# of an edge, which leaves a 128-pixel picture half its area. With every photo shrunk to
# 256 pixels first, positives accepted went from 797 to 818 of 864 (negatives: none).
MIN_VERIFY_SIDE = 256

# content_box (the views signal's, at this decode's size): a line at a frame's edge is a
# bar when every pixel lies within this many grey levels of the outermost line's colour.
# Black or white bars after JPEG q50-q95 are then trimmed to within 6 pixels (2 at the
# 90th percentile); at 4-8, 5 pixels of bar stay at the 90th percentile; at 16 and above,
# more photos lose their own flat edges. (Measured with the median of the outermost line
# as its colour; the middle of its range, which content_box uses, gives the same boxes on
# the tests' bars.)
BORDER_TOLERANCE = 12
# Pictures whose content is narrower or lower than this at the verification size give
# no features (ORB's pyramid cannot shrink a line of a few pixels): never accepted.
MIN_CONTENT_SIDE = 32

# ORB keypoints per picture: 500 loses 9 more positives than 1000; matching costs the
# square of it (about 3 ms a pair at 500, 10 ms at 1000).
ORB_FEATURES = 1000
# FAST's contrast threshold: OpenCV's default of 20 loses 41 more positives, mostly
# low-contrast photos (a microscope slide, a motion-blurred clock) left with a dozen
# corners.
ORB_FAST_THRESHOLD = 10

# Not tuned: Lowe's ratio (the nearest descriptor must be nearer than this share of the
# second nearest) and RANSAC's reprojection error, in pixels of the resized pictures.
RATIO = 0.8
RANSAC_THRESHOLD = 5.0
RANSAC_ITERATIONS = 2000
RANSAC_CONFIDENCE = 0.999
# OpenCV's RANSAC draws from its own fixed-seed generator: the same matches give the same
# transform whatever cv2.setRNGSeed was given (checked in the tests).

# Unrelated pictures reached at most 4 inliers (different photos) and 9 (tiles of one
# photo); the faintest accepted copies have 10.
MIN_INLIERS = 10
# Positives were fitted with scales 0.50-1.26 and rotations up to 5.6 degrees.
MIN_SCALE, MAX_SCALE = 1 / 3, 3.0
MAX_ROTATION_DEG = 15.0
# A crop of 20% per side keeps 0.64 of the frame (positives' lowest, with the loose
# transforms of low-contrast photos: 0.58); a half of a photo and two tiles sharing half
# their area reach 0.50-0.51, a third 0.33, a quadrant 0.25.
MIN_OVERLAP = 0.55
# Spread: share of the textured cells (MIN_CELL_KEYPOINTS keypoints of each picture) of a
# SPREAD_GRID x SPREAD_GRID grid over the overlap holding an inlier. Positives: 0.92 at
# the 10th percentile, lowest 0.33-0.40 (a translucent watermark across the middle); one
# logo on two photos: median 0.17. What it lets through, the agreement below catches.
SPREAD_GRID = 4
MIN_CELL_KEYPOINTS = 2
MIN_SPREAD = 0.3

# Dense check: cells of CELL x CELL pixels of thumbnails with a long side of THUMB_SIDE
# (up to 16 x 16 cells). Not tuned: the flat-cell limits.
THUMB_SIDE = 128
CELL = 8
FLAT_STD = 4.0
FLAT_MEAN_TOLERANCE = 12.0
# Of 0.5, 0.6 and 0.7, 0.7 set the centres of templates furthest from positives' centres.
MIN_CELL_CORRELATION = 0.7
# Positives' lowest agreement: 0.80 (+30% brightness clipping the highlights; a caption
# and a logo on a half-size copy); one logo or watermark on two photos: at most 0.63.
# Templates holding low-contrast photos reach 0.76 (flat cells agree on level): their
# centres, below, do not.
MIN_AGREEMENT = 0.76
# Positives' lowest centre agreement: 0.71 (a translucent watermark across the middle);
# templates at most 0.51.
MIN_CENTRE_AGREEMENT = 0.6
# Over the textured cells alone (cells flat in both pictures left out): see _agreement.
# 30 slides of one template (a hostile-input hunt's): pairs accepted at 0.5 / 0.6 / 0.7 /
# 0.76: 20 / 7 / 3 / 1 of 435, photo copies (logo, 5-degree rotation, 10% crop of 19
# photographs) 53 / 53 / 53 / 50 of 57.
MIN_TEXTURED_AGREEMENT = 0.7
MIN_JUDGED_CELLS = 4


@dataclass
class Features:
    """What `verify` needs of one picture, in the resized picture's pixels.

    `box` is the content box (x0, y0, x1, y1), x1 and y1 exclusive: the frame with
    uniform bars trimmed. `thumb` is the grey picture with its long side at most
    THUMB_SIDE, for the dense check.
    """

    keypoints: np.ndarray  # float32 (N, 2): x, y
    descriptors: np.ndarray  # uint8 (N, 32): ORB's 256 bits
    size: tuple[int, int]  # (w, h) after resizing
    box: tuple[int, int, int, int]
    thumb: np.ndarray  # uint8 (h', w')


@dataclass
class Verdict:
    """The outcome for one pair. `reason` is ``ok`` when accepted, else the first test
    that failed, in this order: few_matches, few_inliers, implausible_transform,
    partial_overlap, clustered, content_differs, centre_differs. Measures after the
    failing test are left at 0."""

    accepted: bool
    reason: str
    matches: int = 0
    inliers: int = 0
    scale: float = 0.0  # b's pixels per a's pixel, of the fitted transform
    rotation: float = 0.0  # degrees, of the fitted transform
    overlap_a: float = 0.0  # share of a's content box covered by b's, mapped
    overlap_b: float = 0.0
    spread_a: float = 0.0  # share of the textured grid cells of the overlap with an inlier
    spread_b: float = 0.0
    agreement: float = 0.0  # share of the overlap's thumbnail cells that agree
    centre_agreement: float = 0.0  # the same, over the middle half of the overlap
    textured_agreement: float = 0.0  # the same, over the cells not flat in both


def features(image: Image.Image, mirror: bool = False) -> Features:
    """ORB keypoints of a decoded `image`, shrunk to VERIFY_SIDE, found inside its content
    box only; `mirror` flips it left to right first."""
    gray = np.asarray(image.convert("L"))
    h, w = gray.shape
    if max(w, h) > VERIFY_SIDE or max(w, h) < MIN_VERIFY_SIDE:
        target = VERIFY_SIDE if max(w, h) > VERIFY_SIDE else MIN_VERIFY_SIDE
        scale = target / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        shrinking = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        gray = cv2.resize(gray, (w, h), interpolation=shrinking)
    if mirror:
        gray = gray[:, ::-1]
    gray = np.ascontiguousarray(gray)
    box = content_box(gray, BORDER_TOLERANCE)
    x0, y0, x1, y1 = box
    if x1 - x0 < MIN_CONTENT_SIDE or y1 - y0 < MIN_CONTENT_SIDE:
        empty = np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
        return Features(*empty, (w, h), box, np.zeros((1, 1), np.uint8))
    # ORB runs on the content alone rather than under a mask: the edge between a bar and
    # the picture would give corners, and a keypoint's patch would reach into the bar.
    orb = cv2.ORB_create(nfeatures=ORB_FEATURES, fastThreshold=ORB_FAST_THRESHOLD)
    found, descriptors = orb.detectAndCompute(np.ascontiguousarray(gray[y0:y1, x0:x1]), None)
    if descriptors is None:
        keypoints = np.zeros((0, 2), np.float32)
        descriptors = np.zeros((0, 32), np.uint8)
    else:
        keypoints = np.array([k.pt for k in found], np.float32).reshape(-1, 2) + (x0, y0)
    shrink = min(1.0, THUMB_SIDE / max(w, h))
    thumb_size = (max(1, round(w * shrink)), max(1, round(h * shrink)))
    thumb = cv2.resize(gray, thumb_size, interpolation=cv2.INTER_AREA)
    return Features(keypoints.astype(np.float32), descriptors, (w, h), box, thumb)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Hamming distances between rows of 32-byte descriptors."""
    words_a = np.ascontiguousarray(a).view(np.uint64)
    words_b = np.ascontiguousarray(b).view(np.uint64)
    # One 64-bit word at a time keeps the temporary at len(a) x len(b) words.
    distance = np.zeros((len(a), len(b)), np.uint16)
    for k in range(words_a.shape[1]):
        distance += np.bitwise_count(words_a[:, k, None] ^ words_b[None, :, k])
    return distance


def mutual_matches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(K, 2) index pairs (row of a, row of b): mutual nearest neighbours in Hamming
    distance whose nearest is nearer than RATIO times the second nearest."""
    if len(a) < 2 or len(b) < 2:
        return np.zeros((0, 2), np.intp)
    distance = hamming_distances(a, b)
    rows = np.arange(len(a))
    nearest_b = np.argmin(distance, axis=1)  # the first of equals: deterministic
    nearest_a = np.argmin(distance, axis=0)
    best = distance[rows, nearest_b]
    distance[rows, nearest_b] = np.iinfo(distance.dtype).max
    second = distance.min(axis=1)
    keep = (nearest_a[nearest_b] == rows) & (best < RATIO * second)
    return np.stack([rows[keep], nearest_b[keep]], axis=1)


def verify_both(a: Features, b: Features) -> Verdict:
    """verify, both ways round: the pixels are compared in the first picture's frame, so
    a pair is accepted only when each way accepts it, and its fate does not depend on
    which comes first (the verification tier's rule)."""
    verdict = verify(a, b)
    return verify(b, a) if verdict.accepted else verdict


def verify(a: Features, b: Features) -> Verdict:
    """Whether `b` is an edited copy of `a` under one similarity transform (see the
    module's docstring); the same inputs always give the same Verdict."""
    pairs = mutual_matches(a.descriptors, b.descriptors)
    verdict = Verdict(False, "few_matches", matches=len(pairs))
    if len(pairs) < MIN_INLIERS:
        return verdict
    points_a = a.keypoints[pairs[:, 0]]
    points_b = b.keypoints[pairs[:, 1]]
    a_to_b, inlier_mask = cv2.estimateAffinePartial2D(
        points_a,
        points_b,
        method=cv2.RANSAC,
        ransacReprojThreshold=RANSAC_THRESHOLD,
        maxIters=RANSAC_ITERATIONS,
        confidence=RANSAC_CONFIDENCE,
    )
    verdict.inliers = 0 if a_to_b is None else int(inlier_mask.sum())
    if verdict.inliers < MIN_INLIERS:
        verdict.reason = "few_inliers"
        return verdict

    verdict.scale = math.hypot(a_to_b[0, 0], a_to_b[1, 0])
    verdict.rotation = math.degrees(math.atan2(a_to_b[1, 0], a_to_b[0, 0]))
    if not MIN_SCALE <= verdict.scale <= MAX_SCALE or abs(verdict.rotation) > MAX_ROTATION_DEG:
        verdict.reason = "implausible_transform"
        return verdict

    b_to_a = cv2.invertAffineTransform(a_to_b)
    overlap_in_a, verdict.overlap_a = _overlap(a.box, b.box, b_to_a)
    overlap_in_b, verdict.overlap_b = _overlap(b.box, a.box, a_to_b)
    if min(verdict.overlap_a, verdict.overlap_b) < MIN_OVERLAP:
        verdict.reason = "partial_overlap"
        return verdict

    inside = inlier_mask.ravel().astype(bool)
    b_in_a, a_in_b = _mapped(b.keypoints, b_to_a), _mapped(a.keypoints, a_to_b)
    verdict.spread_a = _spread(points_a[inside], a.keypoints, b_in_a, overlap_in_a)
    verdict.spread_b = _spread(points_b[inside], b.keypoints, a_in_b, overlap_in_b)
    if min(verdict.spread_a, verdict.spread_b) < MIN_SPREAD:
        verdict.reason = "clustered"
        return verdict

    verdict.agreement, verdict.centre_agreement, verdict.textured_agreement = _agreement(
        a, b, a_to_b, overlap_in_a
    )
    if verdict.agreement < MIN_AGREEMENT or verdict.textured_agreement < MIN_TEXTURED_AGREEMENT:
        verdict.reason = "content_differs"
    elif verdict.centre_agreement < MIN_CENTRE_AGREEMENT:
        verdict.reason = "centre_differs"
    else:
        verdict.accepted, verdict.reason = True, "ok"
    return verdict


Rect = tuple[float, float, float, float]


def _corners(box: Rect) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def _mapped(points: np.ndarray, transform: np.ndarray) -> np.ndarray:
    return cv2.transform(points.reshape(-1, 1, 2), transform).reshape(-1, 2)


def _overlap(box: Rect, other_box: Rect, other_to_box: np.ndarray) -> tuple[Rect, float]:
    """The bounding rectangle of `box` covered by `other_box` mapped into its frame, and
    the share of `box` that the mapped box covers."""
    mapped = _mapped(_corners(other_box), other_to_box)
    area, polygon = cv2.intersectConvexConvex(_corners(box), mapped)
    if polygon is None or area <= 0:
        return (0.0, 0.0, 0.0, 0.0), 0.0
    polygon = polygon.reshape(-1, 2)
    bounds = (*polygon.min(axis=0).tolist(), *polygon.max(axis=0).tolist())
    x0, y0, x1, y1 = box
    return bounds, float(area / ((x1 - x0) * (y1 - y0)))


def _grid_counts(points: np.ndarray, rect: Rect) -> np.ndarray:
    """(SPREAD_GRID, SPREAD_GRID) counts of the points falling in each cell of `rect`."""
    x0, y0, x1, y1 = rect
    width, height = max(x1 - x0, 1e-6), max(y1 - y0, 1e-6)
    col = np.floor((points[:, 0] - x0) * SPREAD_GRID / width).astype(int)
    row = np.floor((points[:, 1] - y0) * SPREAD_GRID / height).astype(int)
    inside = (col >= 0) & (col < SPREAD_GRID) & (row >= 0) & (row < SPREAD_GRID)
    counts = np.zeros((SPREAD_GRID, SPREAD_GRID), np.int64)
    np.add.at(counts, (row[inside], col[inside]), 1)
    return counts


def _spread(inliers: np.ndarray, own: np.ndarray, other: np.ndarray, overlap: Rect) -> float:
    """Share of the textured cells of a grid over `overlap` (at least MIN_CELL_KEYPOINTS
    keypoints of each picture, `other`'s mapped into this frame) holding an inlier.

    Cells without texture are left out: a photo with a plain sky matches nowhere in the
    sky, and that is no sign of a shared logo.
    """
    textured = (_grid_counts(own, overlap) >= MIN_CELL_KEYPOINTS) & (
        _grid_counts(other, overlap) >= MIN_CELL_KEYPOINTS
    )
    if not textured.any():
        return 0.0
    matched = _grid_counts(inliers, overlap) > 0
    return float((matched & textured).sum() / textured.sum())


def _to_thumb(picture: Features) -> np.ndarray:
    """3x3 map from the resized picture's pixels to its thumbnail's (centres aligned)."""
    th, tw = picture.thumb.shape
    w, h = picture.size
    sx, sy = tw / w, th / h
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def _agreement(
    a: Features, b: Features, a_to_b: np.ndarray, overlap: Rect
) -> tuple[float, float, float]:
    """Shares of agreeing CELL x CELL cells of a's thumbnail over `overlap`, b's thumbnail
    warped onto it: all cells, and the cells in the middle half of the overlap.

    A cell agrees when its pixels correlate (MIN_CELL_CORRELATION) or, flat in both
    pictures, when their levels match within FLAT_MEAN_TOLERANCE after b's tones are
    matched to a's (brightness and contrast edits move every level). 1.0 when fewer than
    MIN_JUDGED_CELLS cells lie inside both content boxes.
    """
    to_thumb_a = _to_thumb(a)
    thumb_a_to_b = (_to_thumb(b) @ np.vstack([a_to_b, [0, 0, 1]]) @ np.linalg.inv(to_thumb_a))[:2]
    th, tw = a.thumb.shape
    warped = cv2.warpAffine(
        b.thumb, thumb_a_to_b, (tw, th), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    )
    valid = cv2.warpAffine(
        _box_mask(b), thumb_a_to_b, (tw, th), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    )
    valid &= _box_mask(a)

    corner0 = to_thumb_a @ (overlap[0], overlap[1], 1)
    corner1 = to_thumb_a @ (overlap[2], overlap[3], 1)
    x0, y0 = max(0, math.ceil(corner0[0])), max(0, math.ceil(corner0[1]))
    x1, y1 = min(tw, math.floor(corner1[0])), min(th, math.floor(corner1[1]))
    rows, cols = (y1 - y0) // CELL, (x1 - x0) // CELL
    if rows < 1 or cols < 1:
        return 1.0, 1.0
    # The cells are centred in the overlap: the leftover pixels split between both sides.
    y0 += (y1 - y0 - rows * CELL) // 2
    x0 += (x1 - x0 - cols * CELL) // 2

    def cells(image: np.ndarray) -> np.ndarray:
        region = image[y0 : y0 + rows * CELL, x0 : x0 + cols * CELL]
        return region.reshape(rows, CELL, cols, CELL).swapaxes(1, 2).reshape(rows * cols, -1)

    judged = cells(valid).mean(axis=1) >= 0.9
    if judged.sum() < MIN_JUDGED_CELLS:
        return 1.0, 1.0
    pixels_a = cells(a.thumb).astype(np.float32)
    pixels_b = _match_tones(cells(warped).astype(np.float32), pixels_a, judged)
    centred_a = pixels_a - pixels_a.mean(axis=1, keepdims=True)
    centred_b = pixels_b - pixels_b.mean(axis=1, keepdims=True)
    std_a = np.sqrt((centred_a**2).mean(axis=1))
    std_b = np.sqrt((centred_b**2).mean(axis=1))
    correlation = (centred_a * centred_b).mean(axis=1) / np.maximum(std_a * std_b, 1e-6)
    flat = (std_a < FLAT_STD) & (std_b < FLAT_STD)
    level_gap = np.abs(pixels_a.mean(axis=1) - pixels_b.mean(axis=1))
    agree = np.where(flat, level_gap <= FLAT_MEAN_TOLERANCE, correlation >= MIN_CELL_CORRELATION)

    row, col = np.divmod(np.arange(rows * cols), cols)
    centre = (np.abs(row + 0.5 - rows / 2) <= rows / 4) & (np.abs(col + 0.5 - cols / 2) <= cols / 4)

    def share(cells_: np.ndarray) -> float:
        return float(agree[cells_].mean()) if cells_.sum() >= MIN_JUDGED_CELLS else 1.0

    # Flat cells agree easily: over two slides or screenshots of one template, mostly
    # background, they carried the agreement past MIN_AGREEMENT (a hostile-input hunt:
    # 86 of 780 pairs of different slides accepted). The textured cells must agree too
    # (MIN_TEXTURED_AGREEMENT), the third share.
    return share(judged), share(judged & centre), share(judged & ~flat)


def _box_mask(picture: Features) -> np.ndarray:
    """1 inside the content box on the thumbnail (whole thumbnail pixels only), else 0."""
    th, tw = picture.thumb.shape
    w, h = picture.size
    x0, y0, x1, y1 = picture.box
    mask = np.zeros((th, tw), np.uint8)
    mask[
        math.ceil(y0 * th / h) : math.floor(y1 * th / h),
        math.ceil(x0 * tw / w) : math.floor(x1 * tw / w),
    ] = 1
    return mask


def _match_tones(pixels: np.ndarray, reference: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """`pixels` with their levels mapped so that their histogram over the judged cells
    matches `reference`'s (quantile by quantile)."""
    quantiles = np.linspace(0, 100, 101)
    source = np.percentile(pixels[judged], quantiles)
    target = np.percentile(reference[judged], quantiles)
    source, first = np.unique(source, return_index=True)
    if len(source) < 2:
        return pixels
    return np.interp(pixels, source, target[first]).astype(np.float32)
