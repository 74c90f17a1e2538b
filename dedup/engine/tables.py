"""The tables a run writes (samples.parquet, clusters.parquet) and how; which clusters
the report shows, so that the write phase captures their thumbnails."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dedup.io.fsutil import atomic_path, read_table

SAMPLES_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("cluster_id", pa.int64()),
        ("cluster_size", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_of_shard", pa.string()),
        # reason reference / blocklist: which REF or blocklist FILE, and which item or
        # entry in it; reference_signal: the signal that matched (exact, phash, ...)
        ("reference", pa.string()),
        ("reference_key", pa.string()),
        ("reference_signal", pa.string()),
        ("phash_distance", pa.int32()),
        ("clip_similarity", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("image_member", pa.string()),
        ("digest", pa.string()),
        ("phash", pa.string()),
        # the keep policy's features (dedup.signals.keep): pixels of picture, the share of
        # the frame that is bars, bands or frame, the overlay evidence, the quality, the
        # fine noise estimate, and the tone `typical` compares (grey level, contrast and
        # chroma inside the picture's box)
        ("content_pixels", pa.int64()),
        ("padding", pa.float32()),
        ("overlay", pa.string()),
        ("quality", pa.string()),
        ("noise", pa.float32()),
        ("level", pa.float32()),
        ("contrast", pa.float32()),
        ("chroma", pa.float32()),
        ("keep_values", pa.list_(pa.float64())),
    ]
)


CLUSTERS_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int64()),
        ("size", pa.int64()),
        ("survivor_shard", pa.string()),
        ("survivor_key", pa.string()),
        ("signals", pa.list_(pa.string())),
        ("max_phash_distance", pa.int32()),
        ("max_phash_distance_to_survivor", pa.int32()),
        ("min_clip_similarity_to_survivor", pa.float32()),
        # the survivor is a reference item (--against REF), or a blocklisted sample
        ("reference", pa.string()),
        ("reference_key", pa.string()),
        # why the survivor won over the best removed member: the keep policy's deciding
        # criterion (or reference, or input order) and both values
        ("kept_by", pa.string()),
        ("kept_detail", pa.string()),
    ]
)


def write_table(table: pa.Table, path: str, sync_folder: bool = True) -> None:
    """Parquet, written atomically; no timestamps, so equal tables give equal bytes.
    `sync_folder`: as dedup.io.fsutil.atomic_path."""
    with atomic_path(path, sync_folder=sync_folder) as tmp:
        pq.write_table(table, tmp, compression="zstd")


# Rows gathered from the parts before they are written as one row group: few, large row
# groups (one per 256k rows) write several times faster than one per part, and bound the
# memory the merge holds whatever the number of shards.
MERGE_ROWS = 1 << 18


def merge_parts(parts: list[str], path: str) -> None:
    """Concatenate per-shard Parquet parts (paths or URLs), in order, into one file."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, SAMPLES_SCHEMA, compression="zstd") as w:
        held: list[pa.Table] = []
        rows = 0
        for part in parts:
            table = read_table(part).cast(SAMPLES_SCHEMA)
            held.append(table)
            rows += table.num_rows
            if rows >= MERGE_ROWS:
                w.write_table(pa.concat_tables(held))
                held, rows = [], 0
        if held:
            w.write_table(pa.concat_tables(held))


SHOWN_CLUSTERS = 50


SHOWN_MEMBERS = 12  # thumbnails per cluster strip; the rest are counted


def shown_clusters(clusters: pa.Table, limit: int = SHOWN_CLUSTERS) -> pa.Table:
    """The largest clusters, biggest first, ties by id."""
    if clusters.num_rows == 0:
        return clusters
    order = pc.sort_indices(clusters, [("size", "descending"), ("cluster_id", "ascending")])
    return clusters.take(order[:limit])
