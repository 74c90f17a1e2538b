"""The global phase's files: fixed-width records of candidate rows, runs of them per
partition, arrays and edges saved between tasks, and the member records of rows."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import DedupError
from dedup.engine.extract import STATUS_OK
from dedup.engine.featurestore import KEEP_COLUMNS, TEXTURE_COLUMNS, read_features
from dedup.io import storage
from dedup.io.fsutil import read_file, write_atomic
from dedup.signals.edges import Candidates, Edges
from dedup.signals.phash import (
    SIGNATURE_BYTES,
    shape_code,
)
from dedup.signals.views import (
    VIEW_BYTES,
)

# What the global phase reads from the feature store.
CLUSTER_COLUMNS = [
    "status",
    "width",
    "height",
    "bytes",
    *KEEP_COLUMNS,
    "digest",
    "phash",
    "detail",
    "colour_signature",
    "clip",
    "views",
    # a `codes` plugin's column, named after it
    *(s.columns[0].name for s in signals.plugins()),
]


DIGEST_RECORD = np.dtype([("digest", "u1", 32), ("row", "<i8")])


CODE_RECORD = np.dtype([("word", "<u8"), ("row", "<i8")])


SIGNATURE_RECORD = np.dtype(
    [("signature", "u1", SIGNATURE_BYTES), ("row", "<i8"), ("tiny", "?"), ("shape", "u1")]
)


VIEWS_RECORD = np.dtype([("views", "u1", VIEW_BYTES), ("row", "<i8")])


def vector_record(dim: int) -> np.dtype:
    return np.dtype([("vector", "<f2", (dim,)), ("row", "<i8")])


def member_record(
    dim: int, views: bool = False, plugins: tuple[str, ...] = (), keep_by: int = 0
) -> np.dtype:
    """Everything the star rule reads about one row (and its CLIP vector, view codes and
    `codes` plugins' codes, if any)."""
    fields = [
        ("row", "<i8"),
        ("pixels", "<i8"),
        ("nbytes", "<i8"),
        ("digest", "u1", 32),
        ("word", "<u8"),
        ("detail", "<i2"),
        ("signature", "u1", SIGNATURE_BYTES),
        ("shape", "u1"),
        ("content", "<i8"),
        ("overlay", "i1"),
        ("quality", "<i2"),
        ("noise", "<f4"),
        ("tone", "<f4", len(TEXTURE_COLUMNS) - 1),
    ]
    if keep_by:
        fields.append(("keep_values", "<f8", (keep_by,)))
    if dim:
        fields.append(("vector", "<f2", (dim,)))
    if views:
        fields.append(("views", "u1", VIEW_BYTES))
    fields += [(f"code_{name}", "u1", 8) for name in plugins]
    return np.dtype(fields)


def plugin_codes(config: Config) -> tuple[str, ...]:
    """The `codes` plugins a config turns on, in registry order."""
    return tuple(s.name for s in signals.enabled(config) if not s.builtin)


def vectors_of(column: pa.ChunkedArray) -> np.ndarray:
    """Stored float16 embeddings (all of one length) as an (N, dim) array."""
    array = column.combine_chunks()
    if array.null_count:
        raise DedupError(
            "the feature store lacks CLIP embeddings; rerun with overwrite (--overwrite)"
        )
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset :]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    start, stop = int(offsets[0]), int(offsets[len(array)])
    return data[start:stop].view(np.float16).reshape(len(array), -1)


def fixed_binary_array(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size binary column without nulls as an (N, width) uint8 array, without a
    detour through Python objects."""
    width = column.type.byte_width
    array = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if array.null_count:
        raise ValueError("fixed_binary_array needs a column without nulls")
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width : (array.offset + len(array)) * width].reshape(-1, width)


def write_runs(path: str, records: np.ndarray, part: np.ndarray, parts: int) -> list[int]:
    """Write `records` grouped by `part` (stable: row order kept within a part); return
    the record offset of each part (parts + 1 entries)."""
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part, minlength=parts) if len(part) else np.zeros(parts, np.int64)
    write_atomic(path, np.ascontiguousarray(records[order]).tobytes(), durable=False)
    return [0, *np.cumsum(counts).tolist()]


def read_run(path: str, dtype: np.dtype, offsets: list[int], part: int) -> np.ndarray:
    """The records of one part of a file `write_runs` wrote."""
    lo, hi = offsets[part], offsets[part + 1]
    if hi == lo:
        return np.zeros(0, dtype=dtype)
    (data,) = storage.read_ranges(path, [(lo * dtype.itemsize, (hi - lo) * dtype.itemsize)])
    if len(data) != (hi - lo) * dtype.itemsize:
        raise DedupError(f"{path}: shorter than its index says; rerun")
    return np.frombuffer(data, dtype=dtype)


def gather(runs: list[tuple[str, list[int]]], dtype: np.dtype, part: int) -> np.ndarray:
    """One part from every run file, in file order."""
    pieces = [read_run(path, dtype, offsets, part) for path, offsets in runs]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def save_arrays(path: str, **arrays: np.ndarray) -> None:
    """The global phase's scratch arrays (not synced: see fsutil.atomic_path)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue(), durable=False)


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_file(path))) as data:
        return {name: data[name] for name in data.files}


def save_edges(path: str, edges: Edges) -> None:
    save_arrays(path, i=edges.i, j=edges.j, distance=edges.distance, signal=edges.signal)


def load_edges(path: str) -> Edges:
    a = load_arrays(path)
    return Edges(a["i"], a["j"], a["distance"], a["signal"])


def read_members(
    path: str,
    start: int,
    local_rows: np.ndarray,
    dim: int,
    views: bool = False,
    plugins: tuple[str, ...] = (),
    keep_by: int = 0,
) -> np.ndarray:
    """Member records of the given rows of one shard (all candidates)."""
    _, _, cand = read_candidates(path, local_rows)
    records = np.zeros(len(local_rows), member_record(dim, views, plugins, keep_by))
    records["row"] = local_rows.astype(np.int64) + start
    records["pixels"] = candidate_pixels(cand)
    records["shape"] = candidate_shape(cand)
    records["nbytes"] = np.asarray(cand.column("bytes").to_numpy(), dtype=np.int64)
    records["digest"] = fixed_binary_array(
        pc.fill_null(cand.column("digest"), pa.scalar(bytes(32), pa.binary(32)))
    )
    keep_features(cand, records, keep_by)
    phash = cand.column("phash")
    if phash.null_count == 0 and len(local_rows):
        records["word"] = phash_words(phash)
        records["detail"] = np.asarray(cand.column("detail").to_numpy(), dtype=np.int16)
        sig = pc.fill_null(
            cand.column("colour_signature"),
            pa.scalar(bytes(SIGNATURE_BYTES), pa.binary(SIGNATURE_BYTES)),
        )
        records["signature"] = fixed_binary_array(sig)
    if dim and len(local_rows):
        records["vector"] = vectors_of(cand.column("clip"))
    if views and len(local_rows):
        records["views"] = fixed_binary_array(
            pc.fill_null(cand.column("views"), pa.scalar(bytes(VIEW_BYTES), pa.binary(VIEW_BYTES)))
        )
    for name in plugins:
        if len(local_rows):
            column = cand.column(signals.REGISTRY[name].columns[0].name)
            records[f"code_{name}"] = fixed_binary_array(column)
    return records


def keep_features(cand: pa.Table, records: np.ndarray, keep_by: int) -> None:
    """The keep policy's features of candidate rows into member records (a feature store
    older than them reads as content = pixels, no overlay, unknown quality)."""
    pixels = candidate_pixels(cand)
    content = pc.fill_null(cand.column("content_pixels"), -1).to_numpy()
    records["content"] = np.where(content < 0, pixels, content)
    records["overlay"] = pc.fill_null(cand.column("overlay"), 0).to_numpy()
    records["quality"] = pc.fill_null(cand.column("quality"), 0).to_numpy()
    records["noise"] = pc.fill_null(cand.column("noise"), math.inf).to_numpy()
    for c, name in enumerate(TEXTURE_COLUMNS[1:]):  # level, contrast, chroma
        records["tone"][:, c] = pc.fill_null(cand.column(name), 0.0).to_numpy()
    if keep_by and len(records):
        flat = pc.list_flatten(cand.column("keep_values")).to_numpy(zero_copy_only=False)
        if len(flat) != len(records) * keep_by:
            raise DedupError(
                "the feature store lacks keep_by values; rerun with overwrite (--overwrite)"
            )
        records["keep_values"] = np.asarray(flat, dtype=np.float64).reshape(-1, keep_by)


def members_candidates(records: np.ndarray, config: Config) -> Candidates:
    """Candidates (in record order) from member records."""
    # The views signal needs detail and signatures too (low-detail rows take no part).
    phash = "phash" in signals.computed(config)
    return Candidates(
        pixels=records["pixels"],
        nbytes=records["nbytes"],
        digest=np.ascontiguousarray(records["digest"]),
        phash=records["word"].astype(">u8").view(np.uint8).reshape(-1, 8) if phash else None,
        clip=(
            np.ascontiguousarray(records["vector"])
            if "clip" in config.signal_names and "vector" in records.dtype.names
            else None
        ),
        detail=records["detail"] if phash else None,
        signature=np.ascontiguousarray(records["signature"]) if phash else None,
        shape=records["shape"],
        views=np.ascontiguousarray(records["views"]) if "views" in records.dtype.names else None,
        content=records["content"],
        overlay=records["overlay"],
        quality=records["quality"],
        noise=records["noise"],
        tone=records["tone"],
        keep_values=(
            np.ascontiguousarray(records["keep_values"])
            if "keep_values" in records.dtype.names
            else np.zeros((len(records), 0))
        ),
        codes={
            name: np.ascontiguousarray(records[f"code_{name}"])
            for name in plugin_codes(config)
            if f"code_{name}" in records.dtype.names
        },
    )


def read_candidates(
    path: str, local_rows: np.ndarray | None = None, only: np.ndarray | None = None
):
    """(features, candidate local rows, their features) of one shard; `local_rows`
    names the rows instead; `only` limits the candidates to those local rows (a
    reference's: an earlier run's kept samples)."""
    table = read_features(path, CLUSTER_COLUMNS)
    ok = pc.equal(table.column("status"), STATUS_OK).to_numpy(zero_copy_only=False)
    if only is not None:
        chosen = np.zeros(len(ok), dtype=bool)
        chosen[only] = True
        ok &= chosen
    rows = np.flatnonzero(ok) if local_rows is None else local_rows
    return table, rows, table.take(pa.array(rows, type=pa.int64()))


def candidate_pixels(cand: pa.Table) -> np.ndarray:
    """width x height of candidate rows (decoded images: never null)."""
    width = np.asarray(cand.column("width").to_numpy(), dtype=np.int64)
    return width * np.asarray(cand.column("height").to_numpy(), dtype=np.int64)


def candidate_shape(cand: pa.Table) -> np.ndarray:
    """Shape codes of candidate rows (dedup.signals.phash.shape_code)."""
    return shape_code(cand.column("width").to_numpy(), cand.column("height").to_numpy())


def phash_words(column: pa.ChunkedArray) -> np.ndarray:
    return fixed_binary_array(column).view(">u8").reshape(-1).astype(np.uint64)
