"""Phase 1: per-shard features (digest, pHash, size, member layout) into one Parquet file."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup import __version__
from dedup.config import Config
from dedup.decode import decode_image, image_member
from dedup.fsutil import atomic_path
from dedup.progress import REPORT_EVERY, advance
from dedup.shards import Shard, iter_samples
from dedup.signals.exact import digest
from dedup.signals.phash import HASH_SIZE, IMG_SIZE, phash_batch, phash_input

FEATURE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("offset", pa.int64()),
        ("member_names", pa.list_(pa.string())),
        ("member_offsets", pa.list_(pa.int64())),
        ("member_sizes", pa.list_(pa.int64())),
        ("image_member", pa.string()),
        ("status", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.binary(32)),
        ("phash", pa.binary(HASH_SIZE)),
    ]
)
STATUS_OK = "ok"
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


def shard_fingerprint(shard: Shard, config: Config) -> tuple[str, os.stat_result]:
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
            "versions": [__version__, PIL.__version__, np.__version__, scipy.__version__],
        },
        sort_keys=True,
    )
    return text, st


def extract_shard(shard: Shard, config: Config, store: str) -> ShardFeatures:
    """Features of one shard, reused from `store` when its fingerprint still matches."""
    path = feature_path(store, shard)
    fingerprint, st = shard_fingerprint(shard, config)
    cached = _load_if_current(path, fingerprint)
    if cached is not None:
        rows, skipped = cached
        return ShardFeatures(shard, path, rows, skipped, st.st_size, st.st_mtime_ns, True)
    table, skipped = compute_features(shard, config)
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


def compute_features(shard: Shard, config: Config) -> tuple[pa.Table, dict[str, int]]:
    """Read every sample of `shard` and compute its feature row; no caching."""
    want_phash = "phash" in config.signals
    draft = IMG_SIZE if config.phash_draft else None
    cols: dict[str, list] = {name: [] for name in FEATURE_SCHEMA.names}
    pending_rows: list[int] = []
    pending_pixels: list[np.ndarray] = []
    skipped: Counter = Counter()

    def flush() -> None:
        if pending_pixels:
            codes = phash_batch(np.stack(pending_pixels))
            for row_index, code in zip(pending_rows, codes, strict=True):
                cols["phash"][row_index] = code.tobytes()
            pending_rows.clear()
            pending_pixels.clear()

    reported_samples = reported_bytes = 0
    for sample in iter_samples(shard, skipped):
        if sample.index - reported_samples >= REPORT_EVERY:
            advance(sample.index - reported_samples, sample.offset - reported_bytes)
            reported_samples, reported_bytes = sample.index, sample.offset
        names = [m.name for m in sample.members]
        row = {
            "index": sample.index,
            "key": sample.key,
            "offset": sample.offset,
            "member_names": names,
            "member_offsets": [m.offset for m in sample.members],
            "member_sizes": [m.size for m in sample.members],
        }
        pos = image_member(names, config)
        if pos is None:
            row["status"] = "no_image"
        else:
            data = sample.members[pos].data
            decoded = decode_image(data, config, draft=draft if want_phash else None)
            row.update(
                image_member=names[pos],
                status=decoded.reason or STATUS_OK,
                width=decoded.width,
                height=decoded.height,
                bytes=len(data),
            )
            if decoded.image is not None:
                row["sha256"] = digest(data)
                if want_phash:
                    pending_rows.append(len(cols["index"]))
                    pending_pixels.append(phash_input(decoded.image))
        for name in FEATURE_SCHEMA.names:
            cols[name].append(row.get(name))
        if len(pending_pixels) >= PHASH_BATCH:
            flush()
    flush()
    advance(len(cols["index"]) - reported_samples, _file_size(shard.path) - reported_bytes)
    return pa.table(cols, schema=FEATURE_SCHEMA), dict(sorted(skipped.items()))


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
