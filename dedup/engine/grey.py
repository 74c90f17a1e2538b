"""The views signal's grey zone: candidate pairs whose view codes are too far apart for
the hashes alone (beyond phash_threshold for the two full frames, beyond views_threshold
for a trimmed frame, a crop or a mirror) but within the grey zone's bound
(Config.grey_bound) are checked by local features under one geometric transform
(dedup/engine/verify.py): the pairs among the `verify_per_image` nearest candidates of either
of their images. The images are read again from the input shards by offset.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dedup.core.config import Config
from dedup.core.errors import DedupError, ShardError
from dedup.core.progress import Progress
from dedup.engine.featurestore import image_ranges, read_features
from dedup.engine.records import load_arrays
from dedup.engine.rows import rows_by_shard
from dedup.engine.verify import VERIFY_SIDE, features, verify_both
from dedup.executors.base import Executor
from dedup.io.decode import decode_image
from dedup.io.shards import Shard, read_ranges_of
from dedup.signals.edges import VERIFIED, Edges, linked
from dedup.signals.exact import digest

# A reference item whose image cannot be read again (a stored index keeps features only).
NOT_AT_HAND = "not at hand"

# Pairs per verification task: each task decodes the images of its pairs once and holds
# their features (about 40 KB an image).
TASK_PAIRS = 500
# Fewer pairs than TASK_PAIRS are still spread over this many tasks (of MIN_TASK_PAIRS
# at least), so that every worker has some. The split depends on the pairs alone, never
# on the workers: the summary's count of images decoded is the same whatever runs it.
SPREAD_TASKS = 8
MIN_TASK_PAIRS = 16


def task_pairs(pairs: int) -> int:
    """Pairs per verification task (a verdict depends on its pair alone: any split gives
    the same edges)."""
    return max(1, min(TASK_PAIRS, max(MIN_TASK_PAIRS, -(-pairs // SPREAD_TASKS))))


def pair_items(i: np.ndarray, j: np.ndarray, mirrored: np.ndarray) -> list:
    """The verification tasks' items: (i, j, mirrored) slices of task_pairs pairs."""
    size = task_pairs(len(i))
    return [
        (i[s : s + size], j[s : s + size], mirrored[s : s + size]) for s in range(0, len(i), size)
    ]


@dataclass
class GreyPairs:
    """Candidate pairs of rows (i < j) in the grey zone, and whether each matched as
    mirror images."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    mirrored: np.ndarray

    def take(self, keep: np.ndarray) -> GreyPairs:
        return GreyPairs(self.i[keep], self.j[keep], self.distance[keep], self.mirrored[keep])


def load_grey(paths: list[str]) -> GreyPairs:
    """The near tasks' grey pairs, one per pair of rows (the closest match; ties: the
    plain one before the mirrored), sorted by rows."""

    parts = [load_arrays(p) for p in paths]
    cat = {
        name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, np.int64)
        for name in ("i", "j", "distance", "mirrored")
    }
    i, j = cat["i"].astype(np.int64), cat["j"].astype(np.int64)
    d, mirrored = cat["distance"].astype(np.int32), cat["mirrored"].astype(bool)
    order = np.lexsort((mirrored, d, j, i))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (i[order][1:] != i[order][:-1]) | (j[order][1:] != j[order][:-1])
    pick = order[first]
    return GreyPairs(i[pick], j[pick], d[pick], mirrored[pick])


def drop_linked(grey: GreyPairs, edges: Edges) -> GreyPairs:
    """Grey pairs whose rows no edge already joins directly."""
    if not len(grey.i) or not len(edges.i):
        return grey
    return grey.take(~linked(edges, grey.i, grey.j))


def nearest_per_image(grey: GreyPairs, per_image: int) -> GreyPairs:
    """The pairs among the `per_image` nearest candidates (distance, then the other row)
    of either of their images: at most per_image x images checks, however many
    candidates a popular picture has."""
    if not len(grey.i):
        return grey
    k = np.arange(len(grey.i))
    ends = np.concatenate([grey.i, grey.j])
    others = np.concatenate([grey.j, grey.i])
    pair = np.concatenate([k, k])
    order = np.lexsort((others, np.concatenate([grey.distance, grey.distance]), ends))
    ends_sorted = ends[order]
    starts = np.flatnonzero(np.r_[True, ends_sorted[1:] != ends_sorted[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = np.zeros(len(k), dtype=bool)
    keep[pair[order[rank < per_image]]] = True
    return grey.take(keep)


@dataclass
class VerifyStats:
    """What the verification tier did, for the summary."""

    candidates: int = 0  # grey pairs found by the hashes, not linked otherwise
    checked: int = 0  # of them, checked (the nearest per image)
    accepted: int = 0
    images: int = 0  # images decoded for a check (counted once per task)
    seconds: float = 0.0  # summed over tasks
    rejected: dict[str, int] = field(default_factory=dict)  # by the verdict's reason

    def to_dict(self) -> dict:
        return {
            "candidates": self.candidates,
            "checked": self.checked,
            "accepted": self.accepted,
            "images_decoded": self.images,
            "task_seconds": round(self.seconds, 3),
            "rejected_by_reason": dict(sorted(self.rejected.items())),
        }


@dataclass
class PairCheck:
    """A verification task: decode the images of its pairs, check each pair."""

    config: Config
    sources: list[tuple[str, int]]  # (feature file, first row) per shard
    inputs: list  # the shards (a Shard, a path, or None where the images are not at hand)
    starts: np.ndarray  # first row per shard, and the total
    first_reference: int | None = None  # rows from here on are reference items

    def __call__(self, item: tuple[np.ndarray, np.ndarray, np.ndarray]):
        import cv2

        began = time.perf_counter()
        i, j, mirrored = item
        wanted = {(int(a), False) for a in i} | {
            (int(b), bool(m)) for b, m in zip(j, mirrored, strict=True)
        }
        found = self._features(sorted(wanted))
        accepted = np.zeros(len(i), dtype=bool)
        rejected: Counter = Counter()
        for k, (a, b, m) in enumerate(zip(i.tolist(), j.tolist(), mirrored.tolist(), strict=True)):
            fa, fb = found[(a, False)], found[(b, bool(m))]
            if fa is NOT_AT_HAND or fb is NOT_AT_HAND:
                rejected["reference_images_not_at_hand"] += 1
                continue
            if fa is None or fb is None:
                rejected["undecodable"] += 1
                continue
            try:
                verdict = verify_both(fa, fb)
            except cv2.error:  # a degenerate picture OpenCV refuses: never a duplicate
                rejected["unverifiable"] += 1
                continue
            accepted[k] = verdict.accepted
            if not verdict.accepted:
                rejected[verdict.reason] += 1
        rows = len({row for row, _ in wanted})
        return accepted, rows, time.perf_counter() - began, dict(rejected)

    def _features(self, wanted: list[tuple[int, bool]]) -> dict[tuple[int, bool], object]:
        """Local features of each (row, mirrored) wanted, None where no decoder reads the
        image; each image is decoded once, its features taken at once and the pixels
        dropped, so a task holds features, not images. The image's bytes are checked
        against the digest taken when the shard's features were computed."""
        import cv2

        out: dict[tuple[int, bool], object] = {}
        rows = np.array(sorted({row for row, _ in wanted}), dtype=np.int64)
        mirrors = {row for row, m in wanted if m}
        plain = {row for row, m in wanted if not m}
        for pos, at in rows_by_shard(self.starts, rows):
            path, start = self.sources[pos]
            local = rows[at] - start
            shard = self.inputs[pos]
            if shard is None:  # a stored reference whose images were not kept
                for row in rows[at].tolist():
                    out[(row, False)] = out[(row, True)] = NOT_AT_HAND
                continue
            shard = shard if isinstance(shard, Shard) else Shard(shard)
            table = read_features(
                path,
                ["key", "member_names", "member_offsets", "member_sizes", "image_member", "digest"],
            ).take(pa.array(local, type=pa.int64()))
            cols = table.to_pydict()
            raw, ranges = image_ranges(cols)
            reference = self.first_reference is not None and start >= self.first_reference
            try:
                images = read_ranges_of(shard, raw, ranges)
            except (OSError, DedupError):
                if not reference:
                    raise
                images = [b""] * len(ranges)  # a reference's images gone since it was read
            for k, data in enumerate(images):
                row = int(rows[at][k])
                if digest(data, self.config.exact_digest) != cols["digest"][k]:
                    if reference:  # changed or gone: that item is not checked
                        out[(row, False)] = out[(row, True)] = NOT_AT_HAND
                        continue
                    raise ShardError(
                        shard.path, f"sample {cols['key'][k]} changed since it was read; rerun"
                    )
                image = decode_image(data, self.config, VERIFY_SIDE, "L").image
                for mirror, needed in ((False, row in plain), (True, row in mirrors)):
                    if needed:
                        try:
                            out[(row, mirror)] = None if image is None else features(image, mirror)
                        except cv2.error:  # a degenerate picture: nothing to match
                            out[(row, mirror)] = None
        return out


def _describe(item) -> str:
    return f"verification of {len(item[0])} pairs from row {int(item[0][0])}"


def verify_grey(
    grey_files: list[str],
    edges: Edges,
    sources: list[tuple[str, int]],
    inputs: list[str] | None,
    shard_starts: np.ndarray,
    config: Config,
    executor: Executor,
    first_reference: int | None = None,
) -> tuple[Edges, dict]:
    """`verified` edges from the grey zone, and the tier's figures (tasks return their
    results: a flag per pair, nothing on disk). Rows from `first_reference` on are
    reference items: a pair of two of them is never checked."""
    grey = drop_linked(load_grey(grey_files), edges)
    if first_reference is not None:
        grey = grey.take(grey.i < first_reference)  # i < j: both are references otherwise
    stats = VerifyStats(candidates=len(grey.i))
    grey = nearest_per_image(grey, config.verify_per_image)
    if not len(grey.i) or inputs is None:
        return Edges.concat([]), stats.to_dict()
    stats.checked = len(grey.i)
    items = pair_items(grey.i, grey.j, grey.mirrored)
    results = executor.map(
        PairCheck(config, sources, inputs, np.asarray(shard_starts), first_reference),
        items,
        Progress("verify", total_items=len(items)),
        describe=_describe,
    )
    accepted = np.concatenate([r[0] for r in results])
    rejected: Counter = Counter()
    for _, images, seconds, reasons in results:
        stats.images += images
        stats.seconds += seconds
        rejected.update(reasons)
    stats.accepted = int(accepted.sum())
    stats.rejected = dict(rejected)
    verified = Edges.of(grey.i[accepted], grey.j[accepted], grey.distance[accepted] + 1, VERIFIED)
    return verified, stats.to_dict()
