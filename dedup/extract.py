"""Phase 1: per-shard features (digest, pHash, size, member layout) into one Parquet file."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup import __version__
from dedup.config import Config
from dedup.decode import decode_image, image_member
from dedup.fsutil import atomic_path
from dedup.progress import REPORT_EVERY, advance
from dedup.shards import Shard, display_name, iter_samples, raw_name
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
    input_size: int
    input_mtime_ns: int
    reused: bool = False


def feature_path(store: str, shard: Shard) -> str:
    return os.path.join(store, shard.name + ".parquet")


def shard_fingerprint(
    shard: Shard, config: Config, clip: ClipSpec | None = None
) -> tuple[str, os.stat_result]:
    """What stored features depend on: the input file's identity, settings, versions."""
    import PIL
    import scipy

    try:
        st = os.stat(shard.path)
    except OSError as e:
        from dedup.errors import ShardError

        raise ShardError(shard.path, f"cannot stat ({e.strerror or e})") from None
    text = json.dumps(
        {
            "path": os.path.realpath(shard.path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "config": config.feature_fingerprint(),
            "clip": clip.fingerprint if clip is not None else None,
            "versions": [__version__, PIL.__version__, np.__version__, scipy.__version__],
        },
        sort_keys=True,
    )
    return text, st


def extract_shard(
    shard: Shard, config: Config, store: str, clip: ClipSpec | None = None
) -> ShardFeatures:
    """Features of one shard, reused from `store` when its fingerprint still matches."""
    path = feature_path(store, shard)
    fingerprint, st = shard_fingerprint(shard, config, clip)
    cached = _load_if_current(path, fingerprint)
    if cached is not None:
        rows, skipped = cached
        return ShardFeatures(shard, path, rows, skipped, st.st_size, st.st_mtime_ns, True)
    table, skipped = compute_features(shard, config, clip)
    meta = {
        b"dedup.fingerprint": fingerprint.encode(),
        b"dedup.skipped_members": json.dumps(skipped, sort_keys=True).encode(),
    }
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    return ShardFeatures(shard, path, table.num_rows, skipped, st.st_size, st.st_mtime_ns)


def _load_if_current(path: str, fingerprint: str) -> tuple[int, dict[str, int]] | None:
    if not os.path.exists(path):
        return None
    try:
        meta = pq.read_metadata(path)
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return None  # unreadable leftovers are recomputed, never trusted
    kv = meta.metadata or {}
    if kv.get(b"dedup.fingerprint", b"").decode() != fingerprint:
        return None
    if schema.remove_metadata() != FEATURE_SCHEMA:
        return None
    return meta.num_rows, json.loads(kv.get(b"dedup.skipped_members", b"{}"))


def read_features(path: str, columns: list[str]) -> pa.Table:
    """Columns of a stored feature file."""
    return pq.read_table(path, columns=columns).replace_schema_metadata(None)


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
    advance(len(cols["index"]) - reported_samples, _file_size(shard.path) - reported_bytes)
    return pa.table(cols, schema=FEATURE_SCHEMA), dict(sorted(skipped.items()))


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
