"""Phase 2 as partitioned tasks: no task holds every sample's features.

Every step is a task over numbered parts that reads files and writes files (atomically),
run by the run's executor; a rerun redoes it whole. Rows are global: a shard's first row
follows the previous shard's last, so (shard, key) order is row order and every result
(edges, cluster ids, survivors) is the same whatever the partitioning, executor or
worker count.

1. scatter (per shard): a shard's candidate rows go into per-partition runs of fixed
   records: digests by digest prefix, pHash codes by a hash of the code, low-detail
   colour signatures and CLIP vectors to their own parts.
2. pairs (per partition): exact digests link to the first row with the same bytes;
   equal pHash codes link to their first row, whose distinct codes are routed onward;
   low-detail signatures and CLIP vectors are searched as before.
3. near (per pHash chunk and prefix): multi-index hashing, partitioned by chunk value.
   A code is within t bits of another only if some chunk of m is within r = t // m
   bits (pigeonhole). Part (c, q) holds the distinct codes whose chunk c starts with
   the k-bit prefix q; every code whose prefix is within r bits of q is sent there as a
   query and probes only values that start with q. A pair is reported once: by its
   first chunk within r bits, from its lower row.
4. components (the driver, from edges only): compact ids, union-find, components
   grouped into parts of about `partition_rows` rows.
5. members (per shard): the features of the rows in components, scattered by group.
6. resolve (per group): the star rule (cluster.resolve) on whole components.

The driver holds, per sample, the decisions the write phase needs (see pipeline.Plan),
and every edge while it forms components; the README gives the figures.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import DedupError
from dedup.core.progress import Progress
from dedup.engine.cluster import (
    BLOCKED,
    CLIP,
    NOT_ANCHOR,
    PHASH,
    REFERENCE,
    VIEWS,
    Candidates,
    Edges,
    Groups,
    clip_edges,
    connected_components,
    exact_edges,
    flat_edges,
    resolve,
    tiny_edges,
)
from dedup.engine.extract import STATUS_OK, read_features
from dedup.executors.local import Executor
from dedup.io import storage
from dedup.io.fsutil import atomic_path, read_file, write_atomic
from dedup.search.kernels import near_pairs
from dedup.search.pairs import _chunks, choose_engine, gpu_count, inner_product_search
from dedup.signals.phash import (
    SIGNATURE_BYTES,
    SIGNATURE_SIDE,
    TINY_RMS,
    by_signature,
    is_low_detail,
    is_tiny,
    signature_luma,
)
from dedup.signals.views import VIEW_BYTES, WHOLE_VIEWS, distinct_codes, row_pairs, split_ids
from dedup.signals.views import VIEWS as VIEWS_PER_ROW

log = logging.getLogger("dedup")

# What the global phase reads from the feature store.
CLUSTER_COLUMNS = [
    "status",
    "width",
    "height",
    "bytes",
    "digest",
    "phash",
    "detail",
    "colour_signature",
    "clip",
    "views",
]
DIGEST_RECORD = np.dtype([("digest", "u1", 32), ("row", "<i8")])
CODE_RECORD = np.dtype([("word", "<u8"), ("row", "<i8")])
SIGNATURE_RECORD = np.dtype([("signature", "u1", SIGNATURE_BYTES), ("row", "<i8"), ("tiny", "?")])
VIEWS_RECORD = np.dtype([("views", "u1", VIEW_BYTES), ("row", "<i8")])
# CLIP vectors beyond CLIP_FLAT_MAX are split into k-means cells of about this many
# rows; each vector is searched against the vectors of its CLIP_PROBES nearest cells.
CLIP_CELL_ROWS = 20_000
CLIP_PROBES = 4


def vector_record(dim: int) -> np.dtype:
    return np.dtype([("vector", "<f2", (dim,)), ("row", "<i8")])


def member_record(dim: int, views: bool = False) -> np.dtype:
    """Everything the star rule reads about one row (and its CLIP vector and view codes,
    if any)."""
    fields = [
        ("row", "<i8"),
        ("pixels", "<i8"),
        ("nbytes", "<i8"),
        ("digest", "u1", 32),
        ("word", "<u8"),
        ("detail", "<i2"),
        ("signature", "u1", SIGNATURE_BYTES),
    ]
    if dim:
        fields.append(("vector", "<f2", (dim,)))
    if views:
        fields.append(("views", "u1", VIEW_BYTES))
    return np.dtype(fields)


def vectors_of(column: pa.ChunkedArray) -> np.ndarray:
    """Stored float16 embeddings (all of one length) as an (N, dim) array."""
    array = column.combine_chunks()
    if array.null_count:
        raise DedupError("the feature store lacks CLIP embeddings; rerun with --overwrite")
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


def rows_by_shard(shard_starts, rows: np.ndarray):
    """(shard position, indices into `rows`) for each shard that global `rows` fall in;
    `shard_starts` holds each shard's first row (a last total entry may follow)."""
    shard_of = np.searchsorted(np.asarray(shard_starts), rows, side="right") - 1
    for pos in np.unique(shard_of).tolist():
        yield pos, np.flatnonzero(shard_of == pos)


# ---------------------------------------------------------------- files of records


def write_runs(path: str, records: np.ndarray, part: np.ndarray, parts: int) -> list[int]:
    """Write `records` grouped by `part` (stable: row order kept within a part); return
    the record offset of each part (parts + 1 entries)."""
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part, minlength=parts) if len(part) else np.zeros(parts, np.int64)
    write_atomic(path, np.ascontiguousarray(records[order]).tobytes())
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
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def load_arrays(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_file(path))) as data:
        return {name: data[name] for name in data.files}


def save_edges(path: str, edges: Edges) -> None:
    save_arrays(path, i=edges.i, j=edges.j, distance=edges.distance, signal=edges.signal)


def load_edges(path: str) -> Edges:
    a = load_arrays(path)
    return Edges(a["i"], a["j"], a["distance"], a["signal"])


# ---------------------------------------------------------------- the layout


@dataclass(frozen=True)
class Layout:
    """How the global phase is partitioned: a function of the data sizes and the config
    only (never of the executor or worker count), so results never depend on them."""

    parts: int  # exact-digest and pHash-code partitions
    chunks: int  # m: pHash chunks
    prefix_bits: int  # k: bits of a chunk's value that pick its part
    radius: int  # r: bits a chunk may differ by
    threshold: int = 0  # t: the largest distance found

    @staticmethod
    def of(rows: int, config: Config) -> Layout:
        """The layout of the digests' and pHash codes' search."""
        return Layout.of_codes(rows, config.phash_threshold, config.partition_rows)

    @staticmethod
    def of_views(rows: int, config: Config) -> Layout:
        """The layout of the view codes' search: up to VIEWS codes a row, within the grey
        zone's bound when verification is on."""
        bound = config.views_bound(rows)
        return Layout.of_codes(rows * VIEWS_PER_ROW, bound, config.partition_rows)

    @staticmethod
    def of_codes(codes: int, threshold: int, partition_rows: int) -> Layout:
        """The layout of a search of `codes` 64-bit codes within `threshold` bits."""
        parts = max(1, math.ceil(codes / partition_rows))
        m = choose_engine(max(codes, 2), threshold, "mih")[1]
        bits = min(b for _, b in _chunks(m))
        k = min(bits, max(0, math.ceil(math.log2(parts)))) if parts > 1 else 0
        return Layout(parts, m, k, threshold // m, threshold)

    @property
    def near_parts(self) -> int:
        return self.chunks << self.prefix_bits


def _masks(bits: int, weights: range) -> np.ndarray:
    """Every `bits`-bit mask whose number of set bits is in `weights`."""
    out = [sum(1 << p for p in ps) for w in weights for ps in combinations(range(bits), w)]
    return np.asarray(out, dtype=np.int64)


def _hash_part(words: np.ndarray, parts: int) -> np.ndarray:
    """A well-mixed partition of 64-bit values (splitmix64's finalizer)."""
    x = words.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(parts)).astype(np.int64)


# ---------------------------------------------------------------- 1. scatter


@dataclass
class Scattered:
    """What a scatter task wrote for one shard and what it saw."""

    candidate: np.ndarray  # bool per row: a decoded image that takes part
    reason: np.ndarray  # int8 per row: the status's index in `reasons` (-1: unknown)
    runs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    dim: int = 0  # CLIP vector length


def _read_candidates(
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


# Tiny images are searched in buckets of their signatures' mean luminance. Two of them
# within TINY_RMS (root mean square) have means at most TINY_RMS apart, so each row is
# sent to its own bucket and, when its mean is that close to the bucket below, to that
# one too: a pair is then always in the bucket of its smaller mean.
TINY_BUCKET_LEVELS = 8
TINY_PARTS = 256 // TINY_BUCKET_LEVELS


def tiny_sums(signatures: np.ndarray) -> np.ndarray:
    """The sum of each signature's luminance values (an integer; the mean times 64)."""
    return signature_luma(signatures).astype(np.int64).sum(axis=1)


def tiny_buckets(signatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(home bucket, lowest bucket) of each tiny row: the buckets whose rows it may pair
    with are lowest..home (one or two)."""
    values = SIGNATURE_SIDE * SIGNATURE_SIDE
    width = TINY_BUCKET_LEVELS * values
    sums = tiny_sums(signatures)
    reach = int(np.floor(TINY_RMS * values))  # |sum difference| <= RMS x values
    return sums // width, np.maximum(sums - reach, 0) // width


def _pixels(cand: pa.Table) -> np.ndarray:
    """width x height of candidate rows (decoded images: never null)."""
    width = np.asarray(cand.column("width").to_numpy(), dtype=np.int64)
    return width * np.asarray(cand.column("height").to_numpy(), dtype=np.int64)


def _words(column: pa.ChunkedArray) -> np.ndarray:
    return fixed_binary_array(column).view(">u8").reshape(-1).astype(np.uint64)


@dataclass
class _Scatter:
    work: str
    config: Config
    layout: Layout
    reasons: tuple[str, ...]
    views_layout: Layout
    centroids: np.ndarray | None = None  # CLIP cells (float32), when there are several

    def __call__(self, item: tuple[int, str, int, np.ndarray | None]) -> Scattered:
        pos, path, start, only = item
        table, local, cand = _read_candidates(path, only=only)
        codes = pc.fill_null(pc.index_in(table.column("status"), pa.array(self.reasons)), -1)
        reason = np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.int8)
        candidate = np.zeros(len(reason), dtype=bool)
        candidate[local] = True
        out = Scattered(candidate, reason)
        rows = local.astype(np.int64) + start
        if len(rows):
            for signal in signals.enabled(self.config):
                getattr(self, f"_scatter_{signal.name}")(pos, rows, cand, out)
        return out

    def _scatter_exact(self, pos: int, rows: np.ndarray, cand: pa.Table, out: Scattered):
        """Digests, partitioned by their first bytes."""
        parts = self.layout.parts
        records = np.zeros(len(rows), DIGEST_RECORD)
        records["digest"] = fixed_binary_array(cand.column("digest"))
        records["row"] = rows
        words = records["digest"][:, :8].copy().view("<u8").reshape(-1)
        out.runs["exact"] = (
            self._path(pos, "exact"),
            write_runs(self._path(pos, "exact"), records, _hash_part(words, parts), parts),
        )

    def _scatter_phash(self, pos: int, rows: np.ndarray, cand: pa.Table, out: Scattered):
        """Codes of detailed rows by a hash of the code; low-detail and tiny rows'
        colour signatures to their own parts."""
        parts = self.layout.parts
        detail = np.asarray(cand.column("detail").to_numpy(), dtype=np.int16)
        low = by_signature(detail, _pixels(cand))
        words = _words(cand.column("phash"))
        detailed = np.flatnonzero(~low)
        records = np.zeros(len(detailed), CODE_RECORD)
        records["word"], records["row"] = words[detailed], rows[detailed]
        out.runs["phash"] = (
            self._path(pos, "phash"),
            write_runs(
                self._path(pos, "phash"), records, _hash_part(records["word"], parts), parts
            ),
        )
        tiny = is_tiny(_pixels(cand))
        flat = np.flatnonzero(is_low_detail(detail))
        if len(flat):
            sig = fixed_binary_array(cand.column("colour_signature").take(pa.array(flat)))
            records = np.zeros(len(flat), SIGNATURE_RECORD)
            records["signature"], records["row"] = sig, rows[flat]
            records["tiny"] = tiny[flat]
            out.runs["flat"] = (
                self._path(pos, "flat"),
                write_runs(self._path(pos, "flat"), records, np.zeros(len(flat), int), 1),
            )
        small = np.flatnonzero(tiny)
        if len(small):
            sig = fixed_binary_array(cand.column("colour_signature").take(pa.array(small)))
            records = np.zeros(len(small), SIGNATURE_RECORD)
            records["signature"], records["row"], records["tiny"] = sig, rows[small], True
            home, lowest = tiny_buckets(sig)
            again = np.flatnonzero(lowest != home)  # also sent to the bucket below
            records = np.concatenate([records, records[again]])
            bucket = np.concatenate([home, lowest[again]])
            out.runs["tiny"] = (
                self._path(pos, "tiny"),
                write_runs(self._path(pos, "tiny"), records, bucket, TINY_PARTS),
            )

    def _scatter_views(self, pos: int, rows: np.ndarray, cand: pa.Table, out: Scattered):
        """Code vectors of detailed rows, by a hash of their full frame's code."""
        detail = np.asarray(cand.column("detail").to_numpy(), dtype=np.int16)
        detailed = np.flatnonzero(~by_signature(detail, _pixels(cand)))
        records = np.zeros(len(detailed), VIEWS_RECORD)
        records["views"] = fixed_binary_array(cand.column("views").take(pa.array(detailed)))
        records["row"] = rows[detailed]
        # Equal code vectors share their full frame's code: the same part.
        full = np.ascontiguousarray(records["views"][:, :8]).view(">u8").reshape(-1)
        part = _hash_part(full.astype(np.uint64), self.views_layout.parts)
        out.runs["views"] = (
            self._path(pos, "views"),
            write_runs(self._path(pos, "views"), records, part, self.views_layout.parts),
        )

    def _scatter_clip(self, pos: int, rows: np.ndarray, cand: pa.Table, out: Scattered):
        """Vectors, to their cells (and as queries to their nearest cells)."""
        vectors = vectors_of(cand.column("clip"))
        out.dim = vectors.shape[1]
        records = np.zeros(len(rows), vector_record(vectors.shape[1]))
        records["vector"], records["row"] = vectors, rows
        part, cells = np.zeros(len(rows), dtype=np.int64), 1
        if self.centroids is not None:
            # Its nearest cell holds a vector; its CLIP_PROBES nearest get it as a query.
            cells = len(self.centroids)
            nearest = _nearest_cells(self.centroids, vectors, min(CLIP_PROBES, cells))
            records = np.concatenate([records, np.repeat(records, nearest.shape[1])])
            part = np.concatenate([nearest[:, 0], cells + nearest.reshape(-1)])
        out.runs["clip"] = (
            self._path(pos, "clip"),
            write_runs(self._path(pos, "clip"), records, part, 2 * cells),
        )

    def _path(self, pos: int, kind: str) -> str:
        return storage.join(self.work, f"scatter-{pos:08d}.{kind}")


def _nearest_cells(centroids: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, nearest = index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
    return nearest.astype(np.int64)


def clip_cells(sources: list[tuple[str, int]], rows_total: int, config: Config):
    """k-means centroids that split the CLIP vectors into cells of about CLIP_CELL_ROWS,
    trained on a seeded sample of rows; None when one exact search does (few vectors,
    or clip_index flat)."""
    from dedup.search.pairs import CLIP_FLAT_MAX

    if config.clip_index == "flat" or rows_total <= CLIP_FLAT_MAX:
        return None
    cells = math.ceil(rows_total / CLIP_CELL_ROWS)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(rows_total, min(rows_total, 100 * cells), replace=False))
    parts = []
    for pos, at in rows_by_shard([start for _, start in sources], sample):
        path, start = sources[pos]
        table = read_features(path, ["status", "clip"])
        local = sample[at] - start
        ok = pc.equal(table.column("status"), STATUS_OK).to_numpy(zero_copy_only=False)[local]
        if ok.any():
            parts.append(vectors_of(table.column("clip").take(pa.array(local[ok]))))
    if not parts:
        return None
    x = np.concatenate(parts).astype(np.float32)
    cells = min(cells, len(x) // 39)  # FAISS wants 39 training points per centroid
    if cells < 2:
        return None
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], cells, niter=20, seed=1, spherical=True)
    kmeans.train(x)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


# ---------------------------------------------------------------- 2. pairs


@dataclass
class _Pairs:
    work: str
    config: Config
    layout: Layout
    runs: dict[str, list[tuple[str, list[int]]]]
    clip_dim: int
    clip_cells: int = 1
    views_layout: Layout | None = None

    def __call__(self, item: tuple[str, int]) -> int:
        kind, part = item
        target = storage.join(self.work, f"edges-{kind}-{part:06d}")
        if kind == "exact":
            records = gather(self.runs["exact"], DIGEST_RECORD, part)
            e = exact_edges(np.ascontiguousarray(records["digest"]))
            edges = _renumber(e, records["row"])
        elif kind == "phash":
            edges = self._phash(part)
        elif kind == "views":
            edges = self._views(part)
        elif kind == "flat":
            records = gather(self.runs["flat"], SIGNATURE_RECORD, 0)
            e = flat_edges(
                np.ascontiguousarray(records["signature"]),
                np.arange(len(records), dtype=np.int64),
                records["tiny"],
            )
            edges = _renumber(e, records["row"])
        elif kind == "tiny":
            records = gather(self.runs["tiny"], SIGNATURE_RECORD, part)
            # visitors were written after each shard's own rows: input order again, so
            # that a group of equal keys links to its first row, as in one process
            records = records[np.argsort(records["row"], kind="stable")]
            sig = np.ascontiguousarray(records["signature"])
            e = tiny_edges(sig, np.arange(len(records), dtype=np.int64))
            # A pair is found in the bucket of the endpoint with the smaller luminance sum,
            # which holds both (see tiny_buckets); the other bucket that holds both drops it.
            home = tiny_buckets(sig)[0]
            sums = tiny_sums(sig)
            smaller = np.where(sums[e.i] <= sums[e.j], e.i, e.j)
            mine = home[smaller] == part
            e = Edges(e.i[mine], e.j[mine], e.distance[mine], e.signal[mine])
            edges = _renumber(e, records["row"])
        elif self.clip_cells == 1:
            records = gather(self.runs["clip"], vector_record(self.clip_dim), 0)
            c = self.config
            e = clip_edges(
                np.ascontiguousarray(records["vector"]), c.clip_threshold, c.clip_index, c.device
            )
            edges = _renumber(e, records["row"])
        else:
            edges = self._clip_cell(part)
        save_edges(target, edges)
        return len(edges.i)

    def _clip_cell(self, cell: int) -> Edges:
        """Pairs of a cell's vectors with the vectors that probe it (each pair once here;
        a pair found in two cells is made unique by the driver)."""
        dtype = vector_record(self.clip_dim)
        table = gather(self.runs["clip"], dtype, cell)
        queries = gather(self.runs["clip"], dtype, self.clip_cells + cell)
        if not len(table) or not len(queries):
            return Edges.concat([])
        x = np.ascontiguousarray(queries["vector"], dtype=np.float32)
        radius = float(np.nextafter(np.float32(self.config.clip_threshold), np.float32(-np.inf)))
        vectors = np.ascontiguousarray(table["vector"], dtype=np.float32)
        q, labels, sims = inner_product_search(vectors, x, radius, self.config.device)
        a, b = queries["row"][q], table["row"][labels]
        keep = a != b
        lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        sim = sims[keep]
        order = np.lexsort((hi, lo))
        first = np.ones(len(order), dtype=bool)
        first[1:] = (lo[order][1:] != lo[order][:-1]) | (hi[order][1:] != hi[order][:-1])
        pick = order[first]
        return Edges.of(lo[pick], hi[pick], np.round((1.0 - sim[pick]) * 1e6), CLIP)

    def _phash(self, part: int) -> Edges:
        """Equal codes link to their first row; the distinct codes (with that row) are
        routed to the near-pair parts."""
        records = gather(self.runs["phash"], CODE_RECORD, part)
        words, rows = records["word"], records["row"]
        unique, first, inverse = np.unique(words, return_index=True, return_inverse=True)
        # Rows arrive in ascending order, so a code's first index is its earliest row.
        rep = rows[first]
        same = np.flatnonzero(first[inverse] != np.arange(len(rows)))
        edges = Edges.of(rep[inverse[same]], rows[same], np.zeros(len(same)), PHASH)
        _route(unique, rep, self.layout, storage.join(self.work, f"routed-{part:06d}"))
        return edges

    def _views(self, part: int) -> Edges:
        """Equal code vectors link to their first row (distance 0); the distinct codes of
        each vector's first row are routed onward, as virtual rows (row, view)."""
        records = gather(self.runs["views"], VIEWS_RECORD, part)
        vectors, rows = np.ascontiguousarray(records["views"]), records["row"]
        _, first, inverse = np.unique(vectors, axis=0, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        rep = rows[first]
        same = np.flatnonzero(first[inverse] != np.arange(len(rows)))
        edges = Edges.of(rep[inverse[same]], rows[same], np.zeros(len(same)), VIEWS)
        ids, words = distinct_codes(rep, vectors[first])
        _route(words, ids, self.views_layout, storage.join(self.work, f"vrouted-{part:06d}"))
        return edges


def _route(words: np.ndarray, ids: np.ndarray, lay: Layout, path: str) -> None:
    """Send each code (with its id) to the near parts that must see it: for each chunk,
    the parts whose prefix is within the radius of the code's (see the module's step 3).
    Parts are chunk-major; one chunk's copies at a time are appended to one file, so a
    task holds a chunk's share of them, not all."""
    k, r = lay.prefix_bits, lay.radius
    flips = _masks(k, range(min(r, k) + 1))
    offsets = [0]
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for shift, bits in _chunks(lay.chunks):
            prefix = (words >> np.uint64(shift + bits - k)).astype(np.int64) & ((1 << k) - 1)
            targets = (prefix[:, None] ^ flips[None, :]).reshape(-1)
            order = np.argsort(targets, kind="stable")
            chosen = order // len(flips)
            routed = np.zeros(len(chosen), CODE_RECORD)
            routed["word"], routed["row"] = words[chosen], ids[chosen]
            fh.write(memoryview(routed).cast("B"))
            counts = np.bincount(targets, minlength=1 << k)
            offsets += (offsets[-1] + np.cumsum(counts)).tolist()
            del targets, order, chosen, routed
    save_arrays(path + ".index", offsets=np.asarray(offsets, dtype=np.int64))


def _renumber(edges: Edges, rows: np.ndarray) -> Edges:
    """Edges over positions in a gathered part, as edges over global rows."""
    return Edges(rows[edges.i], rows[edges.j], edges.distance, edges.signal)


# ---------------------------------------------------------------- 3. near pHash pairs


@dataclass
class _Near:
    work: str
    config: Config
    layout: Layout
    parts: int  # partitions whose routed files are read
    kind: str = "phash"  # or "views": ids are virtual rows (row, view)
    grey: int = -1  # views: the grey zone's bound (-1: none, no verification)

    def __call__(self, bucket: int) -> NearStats:
        views = self.kind == "views"
        t = self.layout.threshold
        lay = self.layout
        k, r = lay.prefix_bits, lay.radius
        chunk, prefix = divmod(bucket, 1 << k)
        chunks = _chunks(lay.chunks)
        shift, bits = chunks[chunk]
        low_bits = bits - k
        runs = []
        for p in range(self.parts):
            path = storage.join(self.work, f"{'v' if views else ''}routed-{p:06d}")
            offsets = load_arrays(path + ".index")["offsets"].tolist()
            runs.append((path, offsets))
        queries = gather(runs, CODE_RECORD, bucket)
        words, reps = np.ascontiguousarray(queries["word"]), np.ascontiguousarray(queries["row"])
        value = ((words >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        low = value & ((1 << low_bits) - 1)
        flipped = np.bitwise_count((value >> low_bits) ^ prefix).astype(np.int64)
        # The table: the codes of this part (prefix q itself), ordered by the low bits.
        # The views' crops are queries only: a crop pairs with whole frames, never with
        # another crop, so the tables hold the whole frames (4 codes of 14 at most).
        crop = split_ids(reps)[1] >= WHOLE_VIEWS if views else np.zeros(len(reps), bool)
        own = np.flatnonzero((flipped == 0) & ~crop)
        order = own[np.argsort(low[own], kind="stable")]
        t_low, t_words, t_reps = low[order], words[order], reps[order]
        starts = np.zeros((1 << low_bits) + 1, dtype=np.int64)
        np.cumsum(np.bincount(t_low, minlength=1 << low_bits), out=starts[1:])
        masks = _masks(low_bits, range(r + 1))  # by weight: 0, then 1, ...
        mask_end = np.cumsum([math.comb(low_bits, w) for w in range(r + 1)]).astype(np.int64)
        earlier = np.asarray(chunks[:chunk], dtype=np.int64).reshape(-1, 2)
        by_low = np.argsort(low, kind="stable")
        i, j, d = near_pairs(
            low[by_low],
            words[by_low],
            reps[by_low],
            flipped[by_low],
            t_words,
            t_reps,
            starts,
            masks,
            mask_end,
            t,
            r,
            earlier,
            crop[by_low],
        )
        if views:
            self._save_views(bucket, i, j, d)
        else:
            sort = np.lexsort((j, i))  # the same file whatever order the probes ran in
            i, j, d = i[sort], j[sort], d[sort]
            save_edges(
                storage.join(self.work, f"edges-near-{bucket:06d}"), Edges.of(i, j, d, PHASH)
            )
        sizes = np.diff(starts)
        return NearStats(
            len(i), len(order), len(words), int(sizes.max(initial=0)), int(sizes @ sizes)
        )

    def _save_views(self, bucket: int, i: np.ndarray, j: np.ndarray, d: np.ndarray) -> None:
        """Row pairs from code pairs: those the hashes link, edges (distance + 1: rows of
        distinct vectors); the others, the grey zone's candidates for verification."""
        c = self.config
        found = row_pairs(i, j, d, c.phash_threshold, c.views_threshold)
        strict = found.strict
        edges = Edges.of(found.i[strict], found.j[strict], found.distance[strict] + 1, VIEWS)
        save_edges(storage.join(self.work, f"edges-vnear-{bucket:06d}"), edges)
        if self.grey < 0:
            return
        grey = ~strict & (found.distance <= self.grey)
        save_arrays(
            storage.join(self.work, f"grey-{bucket:06d}"),
            i=found.i[grey],
            j=found.j[grey],
            distance=found.distance[grey],
            mirrored=found.mirrored[grey],
        )


@dataclass
class NearStats:
    """What one near-pair part saw: its load, for the benchmark's occupancy figures."""

    edges: int
    table: int  # distinct codes it owns
    queries: int  # codes sent to it (its own included)
    largest_bucket: int  # codes sharing one chunk value
    squared: int  # sum of bucket sizes squared: a code's expected bucket, times the table


# ---------------------------------------------------------------- 5. members, 6. resolve


def read_members(
    path: str, start: int, local_rows: np.ndarray, dim: int, views: bool = False
) -> np.ndarray:
    """Member records of the given rows of one shard (all candidates)."""
    _, _, cand = _read_candidates(path, local_rows)
    records = np.zeros(len(local_rows), member_record(dim, views))
    records["row"] = local_rows.astype(np.int64) + start
    records["pixels"] = _pixels(cand)
    records["nbytes"] = np.asarray(cand.column("bytes").to_numpy(), dtype=np.int64)
    records["digest"] = fixed_binary_array(
        pc.fill_null(cand.column("digest"), pa.scalar(bytes(32), pa.binary(32)))
    )
    phash = cand.column("phash")
    if phash.null_count == 0 and len(local_rows):
        records["word"] = _words(phash)
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
    return records


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
        views=np.ascontiguousarray(records["views"]) if "views" in records.dtype.names else None,
    )


@dataclass
class _Members:
    work: str
    dim: int
    groups: int
    views: bool = False

    def __call__(self, item: tuple[int, str, int, np.ndarray, np.ndarray]):
        pos, path, start, local_rows, group = item
        records = read_members(path, start, local_rows, self.dim, self.views)
        target = storage.join(self.work, f"members-{pos:08d}")
        return target, write_runs(target, records, group, self.groups)


@dataclass
class _Resolve:
    work: str
    config: Config
    dim: int
    runs: list[tuple[str, list[int]]]
    first_reference: int  # rows from here on are reference items
    blocked: np.ndarray  # sorted input rows a blocklist names

    def __call__(self, group: int) -> str:
        records = gather(
            self.runs, member_record(self.dim, "views" in self.config.signal_names), group
        )
        rows = records["row"]
        e = load_edges(storage.join(self.work, f"group-edges-{group:06d}"))
        local = Edges(np.searchsorted(rows, e.i), np.searchsorted(rows, e.j), e.distance, e.signal)
        cand = members_candidates(records, self.config)
        cand.anchor = anchor_codes(rows, self.first_reference, self.blocked)
        result = resolve(cand, local, self.config)
        g = result.groups
        target = storage.join(self.work, f"resolved-{group:06d}")
        save_arrays(
            target,
            rows=rows,
            cluster_id=rows[result.cluster_id],
            cluster_size=result.cluster_size,
            survivor=rows[result.survivor],
            reason=result.reason,
            phash_distance=result.phash_distance,
            clip_similarity=result.clip_similarity,
            link=result.link,
            g_cluster_id=rows[g.cluster_id],
            g_size=g.size,
            g_survivor=rows[g.survivor],
            g_signals=g.signals,
            g_max_phash_distance=g.max_phash_distance,
            g_max_phash_distance_to_survivor=g.max_phash_distance_to_survivor,
            g_min_clip_similarity_to_survivor=g.min_clip_similarity_to_survivor,
        )
        return target


def anchor_codes(rows: np.ndarray, first_reference: int, blocked: np.ndarray) -> np.ndarray:
    """The anchor code (cluster.REFERENCE, BLOCKED or NOT_ANCHOR) of sorted global rows."""
    out = np.full(len(rows), NOT_ANCHOR, dtype=np.int8)
    out[np.isin(rows, blocked)] = BLOCKED
    out[rows >= first_reference] = REFERENCE
    return out


# ---------------------------------------------------------------- the driver


@dataclass
class References:
    """Items INPUT's samples are matched against (--against), as global rows after the
    input's: per source, its feature file and first row, the local rows that take part
    (None: every decoded image) and where its images are read for the views signal's
    verification (a shard path, a FileGroup, or None when they are not at hand)."""

    sources: list[tuple[str, int]] = field(default_factory=list)
    only: list = field(default_factory=list)
    images: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return 0 if not self.sources else self.end - self.sources[0][1]

    end: int = 0  # one past the last reference row


@dataclass
class Resolved:
    """The global phase's outcome, over global rows."""

    candidate: np.ndarray  # bool per row
    reason: np.ndarray  # int8 per row: the status's index in `reasons` (-1: unknown)
    members: dict[str, np.ndarray] | None  # per row in a component: rows, cluster_id, ...
    groups: Groups | None  # clusters of two or more, by cluster id
    edges: Edges
    dim: int  # CLIP vector length, 0 without the signal
    stats: dict = field(default_factory=dict)  # the layout and each near part's load


def _describe_part(item) -> str:
    return f"global phase part {item}"


def run_global(
    paths: list[str],
    shard_starts: np.ndarray,
    config: Config,
    executor: Executor,
    work: str,
    reasons: tuple[str, ...],
    inputs: list | None = None,
    references: References | None = None,
    blocked: np.ndarray | None = None,
) -> Resolved:
    """Phase 2 over shards' feature files `paths`, whose first global rows are
    `shard_starts` (one more entry: the total); `work` is a folder (or prefix) for the
    phase's files. `inputs`: the shards themselves, which the views signal's grey zone
    reads images from (no verification without them). `references`: items searched with
    the input's rows, never linked to each other, never removed (anchors); `blocked`:
    sorted input rows a blocklist names, anchors too."""
    first_reference = int(shard_starts[-1])
    references = references or References(end=first_reference)
    blocked = np.zeros(0, np.int64) if blocked is None else blocked
    rows_total = first_reference + references.rows
    stats: dict = {"layout": None, "near": []}
    sources = [(path, int(shard_starts[pos])) for pos, path in enumerate(paths)]
    shard_items = [(pos, path, start, None) for pos, (path, start) in enumerate(sources)]
    shard_items += [
        (len(sources) + k, path, start, only)
        for k, ((path, start), only) in enumerate(
            zip(references.sources, references.only, strict=True)
        )
    ]
    sources = sources + references.sources
    if inputs is not None:
        inputs = list(inputs) + list(references.images)
    starts_all = np.asarray([start for _, start in sources] + [rows_total], dtype=np.int64)
    layout = Layout.of(rows_total, config)
    views_layout = Layout.of_views(rows_total, config)
    grey = config.grey_bound(rows_total)
    stats["layout"] = layout
    centroids = clip_cells(sources, rows_total, config) if "clip" in config.signal_names else None
    cells = 1 if centroids is None else len(centroids)
    stats["clip_cells"] = cells
    scattered: list[Scattered] = executor.map(
        _Scatter(work, config, layout, reasons, views_layout, centroids),
        shard_items,
        Progress("scatter", total_items=len(shard_items)),
        describe=_describe_part,
    )
    mine = scattered[: len(paths)]  # the input's; the references' rows are not decided
    reason = np.concatenate([s.reason for s in mine] or [np.zeros(0, np.int8)])
    candidate = np.concatenate([s.candidate for s in mine] or [np.zeros(0, bool)])
    runs = {
        kind: [s.runs[kind] for s in scattered if s.runs.get(kind)]
        for kind in ("exact", "phash", "flat", "tiny", "views", "clip")
    }
    dim = max([s.dim for s in scattered] or [0])
    items = [("exact", p) for p in range(layout.parts) if runs["exact"]]
    items += [("phash", p) for p in range(layout.parts) if runs["phash"]]
    items += [("views", p) for p in range(views_layout.parts) if runs["views"]]
    items += [("flat", 0)] if runs["flat"] else []
    items += [("tiny", p) for p in range(TINY_PARTS) if runs["tiny"]]
    items += [("clip", p) for p in range(cells) if runs["clip"]]
    # FAISS on a GPU (faiss-gpu, a CUDA device) needs workers that start CUDA afresh.
    gpu_search = bool(runs["clip"]) and gpu_count(config.device) > 0
    executor.map(
        _Pairs(work, config, layout, runs, dim, cells, views_layout),
        items,
        Progress("pairs", total_items=len(items)),
        describe=_describe_part,
        cuda=gpu_search,
    )
    edge_files = [storage.join(work, f"edges-{kind}-{p:06d}") for kind, p in items]
    if runs["phash"]:
        buckets = list(range(layout.near_parts))
        stats["near"] = executor.map(
            _Near(work, config, layout, layout.parts),
            buckets,
            Progress("near pairs", total_items=len(buckets)),
            describe=_describe_part,
        )
        edge_files += [storage.join(work, f"edges-near-{b:06d}") for b in buckets]
    grey_files = []
    if runs["views"]:
        buckets = list(range(views_layout.near_parts))
        stats["views_near"] = executor.map(
            _Near(work, config, views_layout, views_layout.parts, "views", grey),
            buckets,
            Progress("view pairs", total_items=len(buckets)),
            describe=_describe_part,
        )
        edge_files += [storage.join(work, f"edges-vnear-{b:06d}") for b in buckets]
        if grey >= 0:
            grey_files = [storage.join(work, f"grey-{b:06d}") for b in buckets]
    edges = Edges.concat([load_edges(f) for f in edge_files])
    edges = _not_among_references(edges, first_reference)
    if cells > 1:  # a CLIP pair of vectors that share cells is found in each of them
        edges = _unique_edges(edges, CLIP)
    if runs["views"]:  # a pair of rows may match by several pairs of views
        edges = _unique_edges(edges, VIEWS)
    if "views" in config.signal_names and config.verify:
        from dedup.engine.grey import VerifyStats, verify_grey

        stats["verify"] = VerifyStats().to_dict()
        if grey_files:
            verified, stats["verify"] = verify_grey(
                grey_files, edges, sources, inputs, starts_all, config, executor, first_reference
            )
            edges = Edges.concat([edges, verified])
        stats["verify"]["bound"] = grey
    members, groups = _components(
        edges, sources, config, executor, work, dim, first_reference, blocked
    )
    return Resolved(candidate, reason, members, groups, edges, dim, stats)


def _not_among_references(edges: Edges, first_reference: int) -> Edges:
    """Edges but those joining two reference items: a reference set is never deduplicated
    by a run that matches against it."""
    keep = (edges.i < first_reference) | (edges.j < first_reference)
    if keep.all():
        return edges
    return Edges(edges.i[keep], edges.j[keep], edges.distance[keep], edges.signal[keep])


def _unique_edges(edges: Edges, signal: int) -> Edges:
    """One edge of `signal` per pair of rows (either way round): the shortest, then the
    first found."""
    of = np.flatnonzero(edges.signal == signal)
    lo = np.minimum(edges.i[of], edges.j[of])
    hi = np.maximum(edges.i[of], edges.j[of])
    order = np.lexsort((np.arange(len(of)), edges.distance[of], hi, lo))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (lo[order][1:] != lo[order][:-1]) | (hi[order][1:] != hi[order][:-1])
    keep = np.concatenate([np.flatnonzero(edges.signal != signal), of[order[first]]])
    keep.sort()
    return Edges(edges.i[keep], edges.j[keep], edges.distance[keep], edges.signal[keep])


def _components(
    edges: Edges,
    sources,
    config: Config,
    executor: Executor,
    work: str,
    dim: int,
    first_reference: int,
    blocked: np.ndarray,
):
    """Components from edges only (compact ids), grouped into parts of whole components;
    the members' features scattered by group; the star rule per group."""
    if not len(edges.i):
        return None, None
    # Compact ids: the rows that have an edge, numbered in row order (a mark per row and
    # a dense lookup: cheaper than sorting twice the edges).
    rows_total = sources[-1][1] + 1 if sources else 0
    rows_total = max(rows_total, int(max(edges.i.max(), edges.j.max())) + 1)
    seen = np.zeros(rows_total, dtype=bool)
    seen[edges.i] = True
    seen[edges.j] = True
    nodes = np.flatnonzero(seen)
    del seen
    lookup = np.full(rows_total, -1, dtype=np.int64)
    lookup[nodes] = np.arange(len(nodes))
    ci, cj = lookup[edges.i], lookup[edges.j]
    del lookup
    label = connected_components(len(nodes), ci, cj)
    del cj
    # Groups of whole components, each about partition_rows rows, in label order.
    sizes = np.bincount(label, minlength=len(nodes))
    comp_ids = np.flatnonzero(sizes)
    comp_group = np.cumsum(sizes[comp_ids]) // max(1, config.partition_rows)
    comp_group -= comp_group[0]
    _, comp_group = np.unique(comp_group, return_inverse=True)
    groups_count = int(comp_group.max()) + 1
    group_of_comp = np.zeros(len(nodes), dtype=np.int64)
    group_of_comp[comp_ids] = comp_group
    node_group = group_of_comp[label]
    # Each group's edges, in global rows.
    edge_group = node_group[ci]
    del ci
    by_group = np.argsort(edge_group, kind="stable")
    bounds = np.searchsorted(edge_group[by_group], np.arange(groups_count + 1))
    for g in range(groups_count):
        sel = by_group[bounds[g] : bounds[g + 1]]
        save_edges(
            storage.join(work, f"group-edges-{g:06d}"),
            Edges(edges.i[sel], edges.j[sel], edges.distance[sel], edges.signal[sel]),
        )
    member_items = []
    for pos, at in rows_by_shard([start for _, start in sources], nodes):
        path, start = sources[pos]
        member_items.append((pos, path, start, nodes[at] - start, node_group[at]))
    runs = executor.map(
        _Members(work, dim, groups_count, "views" in config.signal_names),
        member_items,
        Progress("members", total_items=len(member_items)),
        describe=_describe_part,
    )
    targets = executor.map(
        _Resolve(work, config, dim, runs, first_reference, blocked),
        list(range(groups_count)),
        Progress("resolve", total_items=groups_count),
        describe=_describe_part,
    )
    parts = [load_arrays(t) for t in targets]
    members = {
        name: np.concatenate([p[name] for p in parts])
        for name in (
            "rows",
            "cluster_id",
            "cluster_size",
            "survivor",
            "reason",
            "phash_distance",
            "clip_similarity",
            "link",
        )
    }
    g_cols = {
        name: np.concatenate([p["g_" + name] for p in parts])
        for name in (
            "cluster_id",
            "size",
            "survivor",
            "signals",
            "max_phash_distance",
            "max_phash_distance_to_survivor",
            "min_clip_similarity_to_survivor",
        )
    }
    order = np.argsort(g_cols["cluster_id"], kind="stable")
    groups = Groups(**{name: value[order] for name, value in g_cols.items()})
    return members, groups
