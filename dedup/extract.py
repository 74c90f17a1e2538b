"""Phase 1: per-shard features (digest, pHash, size, member layout) into one Parquet file."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup import __version__
from dedup.config import Config
from dedup.decode import decode_image, image_member
from dedup.errors import FeatureStoreError, ShardError
from dedup.fsutil import atomic_path, write_atomic
from dedup.progress import REPORT_EVERY, advance
from dedup.shards import Shard, display_name, iter_samples, raw_name, shard_size
from dedup.signals.exact import digest

if TYPE_CHECKING:
    from dedup.signals.clip import ClipSpec
from dedup.signals.phash import HASH_SIZE, IMG_SIZE, phash_batch, shrink, stack_shrunk

FEATURE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("offset", pa.int64()),
        ("member_names", pa.list_(pa.binary())),  # exact bytes: names may not be UTF-8
        ("member_offsets", pa.list_(pa.int64())),
        ("member_sizes", pa.list_(pa.int64())),
        ("image_member", pa.string()),
        ("status", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("digest", pa.binary(32)),
        ("phash", pa.binary(HASH_SIZE)),
        ("clip", pa.binary()),  # float16 L2-normalized embedding
    ]
)
STATUS_OK = "ok"
# Why a sample passes through untouched; decode.py and compute_features set these.
PASSTHROUGH_REASONS = ("no_image", "undecodable", "unsupported_format", "too_large")
PHASH_BATCH = 256


@dataclass
class ShardFeatures:
    """Where a shard's features are stored and what phase 1 saw while reading it."""

    shard: Shard
    path: str
    rows: int
    skipped_members: dict[str, int]
    identity: tuple[int, ...]  # the input file's (size, mtime, ctime, inode) when read
    reused: bool = False


def feature_path(store: str, shard: Shard) -> str:
    """The feature file of a shard: named by a digest of the shard's file name, so any
    name (not UTF-8, 255 bytes long) gives a short, valid file name."""
    digest = hashlib.sha256(raw_name(shard.name)).hexdigest()[:32]
    return os.path.join(store, f"{digest}.parquet")


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells a rewritten file from the one that was read. `cp -p`, `rsync -a` and
    `tar x` restore the modification time, but the change time and the inode are set
    by the kernel; none of the three can give a rewritten file the old ones."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def stat_shard(shard: Shard) -> os.stat_result:
    try:
        return os.stat(shard.path)
    except OSError as e:
        raise ShardError(shard.path, f"cannot stat ({e.strerror or e})") from None


def content_digest(shard: Shard) -> str:
    """BLAKE3 of the shard's bytes (the `fingerprint: content` check)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    try:
        with open(shard.path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                hasher.update(chunk)
    except OSError as e:
        raise ShardError(shard.path, f"cannot read ({e.strerror or e})") from None
    return hasher.hexdigest()


def shard_fingerprint(
    shard: Shard, config: Config, st: os.stat_result, clip: ClipSpec | None = None
) -> str:
    """What stored features depend on: the input file's identity (and, with
    `fingerprint: content`, its bytes), the settings and the versions."""
    import PIL
    import scipy

    return json.dumps(
        {
            "path": display_name(os.path.realpath(shard.path)),
            "identity": file_identity(st),
            "content": content_digest(shard) if config.fingerprint == "content" else None,
            "config": config.feature_fingerprint(),
            "clip": clip.fingerprint if clip is not None else None,
            "versions": [__version__, PIL.__version__, np.__version__, scipy.__version__],
        },
        sort_keys=True,
    )


def extract_shard(
    shard: Shard, config: Config, store: str, clip: ClipSpec | None = None
) -> ShardFeatures:
    """Features of one shard, reused from `store` when its fingerprint still matches and
    the stored file is intact."""
    path = feature_path(store, shard)
    st = stat_shard(shard)
    fingerprint = shard_fingerprint(shard, config, st, clip)
    cached = _load_if_current(path, fingerprint)
    if cached is not None:
        rows, skipped = cached
        return ShardFeatures(shard, path, rows, skipped, file_identity(st), True)
    table, skipped = compute_features(shard, config, clip)
    if file_identity(stat_shard(shard)) != file_identity(st):
        raise ShardError(shard.path, "the shard changed while it was being read; rerun")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
        stored = _file_digest(tmp)
    marker = {
        "fingerprint": fingerprint,
        "rows": table.num_rows,
        "skipped_members": skipped,
        "blake3": stored,
    }
    write_atomic(path + DONE_SUFFIX, json.dumps(marker, sort_keys=True).encode())
    return ShardFeatures(shard, path, table.num_rows, skipped, file_identity(st))


# A shard's features are complete when this marker, written last, names the feature
# file's digest: a flipped bit anywhere in the feature file, or a marker from another
# fingerprint, means the features are computed again, never trusted.
DONE_SUFFIX = ".done"


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return blake3.blake3(fh.read()).hexdigest()


def _load_if_current(path: str, fingerprint: str) -> tuple[int, dict[str, int]] | None:
    try:
        with open(path + DONE_SUFFIX, "rb") as fh:
            marker = json.loads(fh.read())
        if marker["fingerprint"] != fingerprint or _file_digest(path) != marker["blake3"]:
            return None
        rows, skipped = int(marker["rows"]), dict(marker["skipped_members"])
        if pq.read_schema(path).remove_metadata() != FEATURE_SCHEMA:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException):
        return None  # missing, unreadable or damaged: recomputed, never trusted
    return rows, skipped


def read_features(path: str, columns: list[str]) -> pa.Table:
    """Columns of a stored feature file, its page checksums verified."""
    try:
        table = pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise FeatureStoreError(
            f"{path}: feature file damaged during the run ({e}); rerun"
        ) from None
    return table.replace_schema_metadata(None)


def compute_features(
    shard: Shard, config: Config, clip: ClipSpec | None = None
) -> tuple[pa.Table, dict[str, int]]:
    """Read every sample of `shard` and compute its feature row; no caching.

    An image whose bytes repeat an earlier one of the shard is not decoded again: equal
    bytes decode to equal features.
    """
    want_phash = "phash" in config.signals
    draft = IMG_SIZE if (want_phash and config.phash_draft) else None
    draft_mode = "L"
    embedder = None
    if clip is not None:
        from dedup.signals.clip import Embedder, pick_device

        embedder = Embedder.get(clip, pick_device(config.device))
        # One RGB decode serves both signals, at the scale CLIP needs.
        draft, draft_mode = embedder.image_size, "RGB"
    cols: dict[str, list] = {name: [] for name in FEATURE_SCHEMA.names}
    phash_col = cols["phash"]
    clip_col = cols["clip"]
    clip_rows: list[int] = []
    clip_images: list = []
    pending_rows: list[int] = []
    pending_smalls: list = []
    seen: dict[bytes, int] = {}  # digest -> first row with those image bytes
    copies: list[tuple[int, int]] = []  # (row, first row) whose vectors are copied at the end
    skipped: Counter = Counter()

    def flush_clip() -> None:
        if clip_images:
            vectors = embedder.embed(clip_images)
            for row_index, vector in zip(clip_rows, vectors, strict=True):
                clip_col[row_index] = vector.tobytes()
            clip_rows.clear()
            clip_images.clear()

    def flush() -> None:
        if pending_smalls:
            codes = phash_batch(stack_shrunk(pending_smalls))
            for row_index, code in zip(pending_rows, codes, strict=True):
                phash_col[row_index] = code.tobytes()
            pending_rows.clear()
            pending_smalls.clear()

    reported_samples = reported_bytes = 0
    for sample in iter_samples(shard, skipped):
        row = sample.index
        if row - reported_samples >= REPORT_EVERY:
            advance(row - reported_samples, sample.offset - reported_bytes)
            reported_samples, reported_bytes = row, sample.offset
        members = sample.members
        names = [m.name for m in members]
        cols["index"].append(row)
        cols["key"].append(display_name(sample.key))
        cols["offset"].append(sample.offset)
        cols["member_names"].append([raw_name(n) for n in names])
        cols["member_offsets"].append([m.offset for m in members])
        cols["member_sizes"].append([m.size for m in members])
        pos = image_member(names, config)
        status, width, height, nbytes, image_digest = "no_image", None, None, None, None
        if pos is not None:
            data = members[pos].data
            nbytes = len(data)
            image_digest = digest(data, config.exact_digest)
            first = seen.get(image_digest)
            if first is not None:
                status, width, height = (
                    cols["status"][first],
                    cols["width"][first],
                    cols["height"][first],
                )
                if status == STATUS_OK:
                    copies.append((row, first))
            else:
                seen[image_digest] = row
                decoded = decode_image(data, config, draft=draft, draft_mode=draft_mode)
                status, width, height = decoded.reason or STATUS_OK, decoded.width, decoded.height
                if decoded.image is not None and want_phash:
                    pending_rows.append(row)
                    pending_smalls.append(shrink(decoded.image))
                if decoded.image is not None and embedder is not None:
                    clip_rows.append(row)
                    clip_images.append(decoded.image)
            if status != STATUS_OK:
                image_digest = None
        cols["image_member"].append(None if pos is None else display_name(names[pos]))
        cols["status"].append(status)
        cols["width"].append(width)
        cols["height"].append(height)
        cols["bytes"].append(nbytes)
        cols["digest"].append(image_digest)
        phash_col.append(None)  # filled by flush() or from a repeat's first row
        clip_col.append(None)
        if len(pending_smalls) >= PHASH_BATCH:
            flush()
        if len(clip_images) >= config.batch_size:
            flush_clip()
    flush()
    flush_clip()
    for row, first in copies:
        phash_col[row] = phash_col[first]
        clip_col[row] = clip_col[first]
    advance(len(cols["index"]) - reported_samples, shard_size(shard) - reported_bytes)
    return pa.table(cols, schema=FEATURE_SCHEMA), dict(sorted(skipped.items()))
