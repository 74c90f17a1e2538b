"""Feature files for the benchmarks that plant pHash codes or CLIP vectors instead of
decoding images (bench_scale.py, bench_against.py): built on the feature store's schema
and written by its one writer (dedup.engine.featurestore), with a fingerprint made as
the extract phase makes one, so that a change to either reaches these benchmarks too."""

from __future__ import annotations

import blake3
import numpy as np
import pyarrow as pa

from dedup.core.config import Config
from dedup.engine.extract import shard_fingerprint
from dedup.engine.featurestore import FEATURE_SCHEMA, store_features
from dedup.io.shards import Shard


def fixed_binary(rows: np.ndarray) -> pa.Array:
    """A (n, width) uint8 array as a column of n fixed-size binary values."""
    data = np.ascontiguousarray(rows, dtype=np.uint8)
    n, width = data.shape
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), n, [None, pa.py_buffer(data.tobytes())]
    )


def feature_table(n: int, **columns) -> pa.Table:
    """n decoded rows with the feature store's schema: the `columns` given (Arrow arrays
    or sequences), `index` 0..n-1, a key per row and status ok unless given, nulls in
    every other column."""
    unknown = set(columns) - set(FEATURE_SCHEMA.names)
    if unknown:
        raise ValueError(f"not feature columns: {sorted(unknown)}")
    given = {
        "index": np.arange(n, dtype=np.int64),
        "key": [f"{i:09d}" for i in range(n)],
        "status": ["ok"] * n,
        **columns,
    }
    arrays = {}
    for f in FEATURE_SCHEMA:
        value = given.get(f.name)
        if value is None:
            arrays[f.name] = pa.nulls(n, f.type)
        elif isinstance(value, pa.Array | pa.ChunkedArray):
            arrays[f.name] = value
        else:
            arrays[f.name] = pa.array(value, type=f.type)
    return pa.table(arrays, schema=FEATURE_SCHEMA)


def write_feature_file(path: str, table: pa.Table, shard: str, config: Config) -> None:
    """`table` stored at `path` as phase 1 stores the features of the shard named
    `shard`, marker included. The shard does not exist: the fingerprint is by content,
    the table's bytes standing for the shard's."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    content = blake3.blake3(sink.getvalue()).hexdigest()
    fingerprint, _ = shard_fingerprint(Shard(shard), config, None, None, content)
    store_features(path, table, fingerprint, {})
