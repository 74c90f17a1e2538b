"""The feature store: one Parquet file per shard, named by the shard's name, and a marker
written last that names the file's digest and the fingerprint it was computed with.
Its schema, path, marker, writer and reader live here and nowhere else."""

from __future__ import annotations

import hashlib
import json

import blake3
import pyarrow as pa
import pyarrow.parquet as pq

from dedup import signals
from dedup.core.errors import DedupError, FeatureStoreError
from dedup.io import storage
from dedup.io.fsutil import atomic_path, read_file, read_table, write_atomic
from dedup.io.shards import (
    Shard,
    display_name,
    raw_name,
)

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
        # The keep policy's features (dedup.signals.keep): pixels of picture, overlay
        # evidence bits, quality, fine noise, tone (level, contrast) and colour (chroma);
        # keep_by's JSON values (NaN: none) and why not
        ("content_pixels", pa.int64()),
        ("overlay", pa.int8()),
        ("quality", pa.int16()),
        ("noise", pa.float32()),
        ("level", pa.float32()),
        ("contrast", pa.float32()),
        ("chroma", pa.float32()),
        ("keep_values", pa.list_(pa.float64())),
        ("keep_notes", pa.list_(pa.int8())),
        *signals.feature_columns(),
    ]
)


# The keep features texture_of measures, in its order, and chroma_of's.
TEXTURE_COLUMNS = ("noise", "level", "contrast", "chroma")
# The keep features the global phase reads (dedup.engine.records).
KEEP_COLUMNS = ("content_pixels", "overlay", "quality", *TEXTURE_COLUMNS, "keep_values")


# Every signal's columns: cleared together when an image turns out undecodable.
SIGNAL_COLUMNS = tuple(f.name for f in signals.feature_columns())


def feature_path(store: str, shard: Shard) -> str:
    """The feature file of a shard: named by a digest of the shard's file name, so any
    name (not UTF-8, 255 bytes long) gives a short, valid file name."""
    digest = hashlib.sha256(raw_name(shard.name)).hexdigest()[:32]
    return storage.join(store, f"{digest}.parquet")


# A shard's features are complete when this marker, written last, names the feature
# file's digest: a flipped bit anywhere in the feature file, or a marker from another
# fingerprint, means the features are computed again, never trusted.
DONE_SUFFIX = ".done"


def store_features(
    path: str, table: pa.Table, fingerprint: str, skipped: dict, routes: dict | None = None
) -> None:
    """Write a shard's feature table to `path` (atomically, page checksums on), then its
    marker naming the file's digest: the one writer of the feature store."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
        stored = _file_digest(tmp)
    marker = {
        "fingerprint": fingerprint,
        "rows": table.num_rows,
        "skipped_members": skipped,
        "clip_decode": routes or {},
        "blake3": stored,
    }
    write_atomic(path + DONE_SUFFIX, json.dumps(marker, sort_keys=True).encode())


def _file_digest(path: str) -> str:
    return blake3.blake3(read_file(path)).hexdigest()


def load_if_current(path: str, fingerprint: str) -> tuple[int, dict, dict] | None:
    try:
        marker = json.loads(read_file(path + DONE_SUFFIX))
        if marker["fingerprint"] != fingerprint:
            return None
        data = read_file(path)
        if blake3.blake3(data).hexdigest() != marker["blake3"]:
            return None
        rows, skipped = int(marker["rows"]), dict(marker["skipped_members"])
        routes = dict(marker.get("clip_decode", {}))
        if pq.read_schema(pa.BufferReader(data)).remove_metadata() != FEATURE_SCHEMA:
            return None
    except (
        OSError,
        DedupError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        pa.ArrowException,
    ):
        return None  # missing, unreadable or damaged: recomputed, never trusted
    return rows, skipped, routes


def image_ranges(cols: dict) -> tuple[list[str], list[tuple[int, int]]]:
    """The image member's raw name and (offset, size) of each row, from the feature
    columns member_names, member_offsets, member_sizes and image_member (to_pydict)."""
    names, ranges = [], []
    for k in range(len(cols["image_member"])):
        raw = [n.decode("utf-8", "surrogateescape") for n in cols["member_names"][k]]
        m = [display_name(n) for n in raw].index(cols["image_member"][k])
        ranges.append((cols["member_offsets"][k][m], cols["member_sizes"][k][m]))
        names.append(raw[m])
    return names, ranges


def read_features(path: str, columns: list[str]) -> pa.Table:
    """Columns of a stored feature file, its page checksums verified."""
    try:
        table = read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise FeatureStoreError(
            f"{path}: feature file damaged during the run ({e}); rerun"
        ) from None
    return table.replace_schema_metadata(None)
