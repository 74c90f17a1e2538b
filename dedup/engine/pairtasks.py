"""The global phase's pair tasks: candidate rows scattered to partitions, pairs found in
each (exact digests, equal codes, low-detail signatures, CLIP cells), and the
multi-index hashing search for codes within a distance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup import signals
from dedup.core.config import Config
from dedup.engine.extract import STATUS_OK
from dedup.engine.featurestore import read_features
from dedup.engine.records import (
    CODE_RECORD,
    DIGEST_RECORD,
    SIGNATURE_RECORD,
    VIEWS_RECORD,
    candidate_pixels,
    candidate_shape,
    fixed_binary_array,
    gather,
    load_arrays,
    phash_words,
    read_candidates,
    save_arrays,
    save_edges,
    vector_record,
    vectors_of,
    write_runs,
)
from dedup.engine.rows import rows_by_shard
from dedup.io import storage
from dedup.io.fsutil import atomic_path
from dedup.search.kernels import near_pairs
from dedup.search.pairs import (
    CLIP_FLAT_MAX,
    choose_engine,
    code_chunks,
    inner_product_search,
)
from dedup.signals.edges import (
    CLIP,
    PHASH,
    VIEWS,
    Edges,
    clip_edges,
    code_threshold,
    exact_edges,
    flat_edges,
    signal_code,
    tiny_edges,
)
from dedup.signals.phash import (
    SIGNATURE_SIDE,
    TINY_RMS,
    by_signature,
    is_low_detail,
    is_tiny,
    signature_luma,
)
from dedup.signals.views import VIEWS as VIEWS_PER_ROW
from dedup.signals.views import (
    WHOLE_VIEWS,
    distinct_codes,
    row_pairs,
    search_bound,
    split_ids,
)

# CLIP vectors beyond CLIP_FLAT_MAX are split into k-means cells of about this many
# rows; each vector is searched against the vectors of its CLIP_PROBES nearest cells.
CLIP_CELL_ROWS = 20_000


CLIP_PROBES = 4


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
        bound = search_bound(config, rows)
        return Layout.of_codes(rows * VIEWS_PER_ROW, bound, config.partition_rows)

    @staticmethod
    def of_plugins(rows: int, config: Config) -> dict[str, Layout]:
        """The layout of each `codes` plugin's search, by signal name."""
        return {
            s.name: Layout.of_codes(rows, code_threshold(s.name, config), config.partition_rows)
            for s in signals.enabled(config)
            if s.search == "codes"
        }

    @staticmethod
    def of_codes(codes: int, threshold: int, partition_rows: int) -> Layout:
        """The layout of a search of `codes` 64-bit codes within `threshold` bits."""
        parts = max(1, math.ceil(codes / partition_rows))
        m = choose_engine(max(codes, 2), threshold, "mih")[1]
        bits = min(b for _, b in code_chunks(m))
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


@dataclass
class Scattered:
    """What a scatter task wrote for one shard and what it saw."""

    candidate: np.ndarray  # bool per row: a decoded image that takes part
    reason: np.ndarray  # int8 per row: the status's index in `reasons` (-1: unknown)
    runs: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    dim: int = 0  # CLIP vector length


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


@dataclass
class ScatterTask:
    work: str
    config: Config
    layout: Layout
    reasons: tuple[str, ...]
    views_layout: Layout
    centroids: np.ndarray | None = None  # CLIP cells (float32), when there are several
    code_layouts: dict[str, Layout] = field(default_factory=dict)  # `codes` plugins'

    def __call__(self, item: tuple[int, str, int, np.ndarray | None]) -> Scattered:
        pos, path, start, only = item
        table, local, cand = read_candidates(path, only=only)
        codes = pc.fill_null(pc.index_in(table.column("status"), pa.array(self.reasons)), -1)
        reason = np.asarray(codes.to_numpy(zero_copy_only=False), dtype=np.int8)
        candidate = np.zeros(len(reason), dtype=bool)
        candidate[local] = True
        out = Scattered(candidate, reason)
        rows = local.astype(np.int64) + start
        if len(rows):
            for signal in signals.enabled(self.config):
                if signal.search == "codes":
                    self._scatter_codes(signal.name, pos, rows, cand, out)
                else:
                    getattr(self, f"_scatter_{signal.search}")(pos, rows, cand, out)
        return out

    def _scatter_codes(self, name: str, pos: int, rows: np.ndarray, cand: pa.Table, out):
        """A `codes` plugin's codes (every candidate row), by a hash of the code."""
        words = phash_words(cand.column(signals.REGISTRY[name].columns[0].name))
        self._code_runs(name, pos, words, rows, self.code_layouts[name].parts, out)

    def _code_runs(self, kind, pos, words: np.ndarray, rows: np.ndarray, parts: int, out):
        """64-bit codes of `rows` into `parts` runs by a hash of the code (out.runs[kind])."""
        records = np.zeros(len(rows), CODE_RECORD)
        records["word"], records["row"] = words, rows
        path = self._path(pos, kind)
        out.runs[kind] = (path, write_runs(path, records, _hash_part(words, parts), parts))

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
        low = by_signature(detail, candidate_pixels(cand))
        words = phash_words(cand.column("phash"))
        detailed = np.flatnonzero(~low)
        self._code_runs("phash", pos, words[detailed], rows[detailed], parts, out)
        tiny = is_tiny(candidate_pixels(cand))
        flat = np.flatnonzero(is_low_detail(detail))
        if len(flat):
            sig = fixed_binary_array(cand.column("colour_signature").take(pa.array(flat)))
            records = np.zeros(len(flat), SIGNATURE_RECORD)
            records["signature"], records["row"] = sig, rows[flat]
            records["tiny"], records["shape"] = tiny[flat], candidate_shape(cand)[flat]
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
        detailed = np.flatnonzero(~by_signature(detail, candidate_pixels(cand)))
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


@dataclass
class PairsTask:
    work: str
    config: Config
    layout: Layout
    runs: dict[str, list[tuple[str, list[int]]]]
    clip_dim: int
    clip_cells: int = 1
    views_layout: Layout | None = None
    code_layouts: dict[str, Layout] = field(default_factory=dict)  # `codes` plugins'

    def __call__(self, item: tuple[str, int]) -> int:
        kind, part = item
        target = storage.join(self.work, f"edges-{kind}-{part:06d}")
        if kind in self.code_layouts:
            edges = self._codes(kind, part, self.code_layouts[kind], signal_code(kind))
        elif kind == "exact":
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
                records["shape"],
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
        """The pHash's codes of detailed rows (see _codes)."""
        return self._codes("phash", part, self.layout, PHASH)

    def _codes(self, kind: str, part: int, layout: Layout, signal: int) -> Edges:
        """Equal codes link to their first row; the distinct codes (with that row) are
        routed to the near-pair parts (NearTask)."""
        records = gather(self.runs[kind], CODE_RECORD, part)
        words, rows = records["word"], records["row"]
        unique, first, inverse = np.unique(words, return_index=True, return_inverse=True)
        # Rows arrive in ascending order, so a code's first index is its earliest row.
        rep = rows[first]
        same = np.flatnonzero(first[inverse] != np.arange(len(rows)))
        edges = Edges.of(rep[inverse[same]], rows[same], np.zeros(len(same)), signal)
        _route(unique, rep, layout, storage.join(self.work, routed_name(kind, part)))
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
        _route(words, ids, self.views_layout, storage.join(self.work, routed_name("views", part)))
        return edges


def routed_name(kind: str, part: int) -> str:
    """The file of the distinct codes a pairs part routes to the near parts."""
    prefix = {"phash": "routed", "views": "vrouted"}.get(kind, f"routed-{kind}")
    return f"{prefix}-{part:06d}"


def near_edges_name(kind: str, bucket: int) -> str:
    """The file of the edges a near part found."""
    prefix = {"phash": "edges-near", "views": "edges-vnear"}.get(kind, f"edges-near-{kind}")
    return f"{prefix}-{bucket:06d}"


def _route(words: np.ndarray, ids: np.ndarray, lay: Layout, path: str) -> None:
    """Send each code (with its id) to the near parts that must see it: for each chunk,
    the parts whose prefix is within the radius of the code's (see the module's step 3).
    Parts are chunk-major; one chunk's copies at a time are appended to one file, so a
    task holds a chunk's share of them, not all."""
    k, r = lay.prefix_bits, lay.radius
    flips = _masks(k, range(min(r, k) + 1))
    offsets = [0]
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as fh:  # scratch
        for shift, bits in code_chunks(lay.chunks):
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


@dataclass
class NearTask:
    work: str
    config: Config
    layout: Layout
    parts: int  # partitions whose routed files are read
    kind: str = "phash"  # "views": ids are virtual rows (row, view); or a `codes` plugin
    grey: int = -1  # views: the grey zone's bound (-1: none, no verification)

    def __call__(self, bucket: int) -> NearStats:
        views = self.kind == "views"
        t = self.layout.threshold
        lay = self.layout
        k, r = lay.prefix_bits, lay.radius
        chunk, prefix = divmod(bucket, 1 << k)
        chunks = code_chunks(lay.chunks)
        shift, bits = chunks[chunk]
        low_bits = bits - k
        runs = []
        for p in range(self.parts):
            path = storage.join(self.work, routed_name(self.kind, p))
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
            code = PHASH if self.kind == "phash" else signal_code(self.kind)
            save_edges(
                storage.join(self.work, near_edges_name(self.kind, bucket)), Edges.of(i, j, d, code)
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
        save_edges(storage.join(self.work, near_edges_name("views", bucket)), edges)
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
