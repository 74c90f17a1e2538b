"""Phase 1: per-shard features (digest, pHash, size) into one Parquet file per shard."""

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
from dedup.shards import Shard, iter_samples
from dedup.signals.exact import digest
from dedup.signals.phash import HASH_SIZE, phash_batch, phash_input

FEATURE_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("key", pa.string()),
        ("members", pa.int32()),
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


@dataclass
class ShardFeatures:
    """A shard's feature table plus the members it skipped (non-regular), by kind."""

    shard: Shard
    table: pa.Table
    skipped_members: dict[str, int]
    reused: bool = False


def feature_path(store: str, shard: Shard) -> str:
    return os.path.join(store, shard.name + ".parquet")


def shard_fingerprint(shard: Shard, config: Config) -> str:
    """What the stored features depend on: the input file's identity, settings, versions."""
    st = os.stat(shard.path)
    import PIL
    import scipy

    return json.dumps(
        {
            "path": os.path.realpath(shard.path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "config": config.feature_fingerprint(),
            "phash": "phash" in config.signals,
            "versions": [__version__, PIL.__version__, np.__version__, scipy.__version__],
        },
        sort_keys=True,
    )


def extract_shard(shard: Shard, config: Config, store: str) -> ShardFeatures:
    """Features of one shard, reused from `store` when its fingerprint still matches."""
    path = feature_path(store, shard)
    fingerprint = shard_fingerprint(shard, config)
    cached = _load_if_current(path, fingerprint, shard)
    if cached is not None:
        return cached
    features = compute_features(shard, config)
    meta = {
        b"dedup.fingerprint": fingerprint.encode(),
        b"dedup.skipped_members": json.dumps(features.skipped_members, sort_keys=True).encode(),
    }
    table = features.table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return features


def _load_if_current(path: str, fingerprint: str, shard: Shard) -> ShardFeatures | None:
    if not os.path.exists(path):
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return None  # unreadable leftovers are recomputed, never trusted
    meta = table.schema.metadata or {}
    if meta.get(b"dedup.fingerprint", b"").decode() != fingerprint:
        return None
    if table.schema.remove_metadata() != FEATURE_SCHEMA:
        return None
    skipped = json.loads(meta.get(b"dedup.skipped_members", b"{}"))
    return ShardFeatures(shard, table.replace_schema_metadata(None), skipped, reused=True)


def compute_features(shard: Shard, config: Config) -> ShardFeatures:
    """Read every sample of `shard` and compute its feature row; no caching."""
    want_phash = "phash" in config.signals
    cols: dict[str, list] = {name: [] for name in FEATURE_SCHEMA.names}
    phash_rows: list[int] = []
    phash_pixels: list[np.ndarray] = []
    skipped: Counter = Counter()
    for sample in iter_samples(shard, skipped):
        names = [m.name for m in sample.members]
        pos = image_member(names, config)
        row = {"index": sample.index, "key": sample.key, "members": len(names)}
        if pos is None:
            row["status"] = "no_image"
        else:
            data = sample.members[pos].data
            decoded = decode_image(data, config)
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
                    phash_rows.append(len(cols["index"]))
                    phash_pixels.append(phash_input(decoded.image))
        for name in FEATURE_SCHEMA.names:
            cols[name].append(row.get(name))
    if phash_pixels:
        codes = phash_batch(np.stack(phash_pixels))
        for row_index, code in zip(phash_rows, codes, strict=True):
            cols["phash"][row_index] = code.tobytes()
    table = pa.table(cols, schema=FEATURE_SCHEMA)
    return ShardFeatures(shard, table, dict(sorted(skipped.items())))
