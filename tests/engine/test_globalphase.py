"""The partitioned global phase against the one-process oracle (dedup.engine.cluster.cluster):
the same edges, clusters, survivors, reasons and distances, whatever the partitioning
and the number of workers."""

import numpy as np
import pyarrow as pa
import pytest

from dedup.core.config import Config
from dedup.engine.cluster import cluster
from dedup.engine.extract import PASSTHROUGH_REASONS
from dedup.engine.featurestore import FEATURE_SCHEMA, KEEP_COLUMNS, store_features
from dedup.engine.globalphase import run_global
from dedup.engine.pairtasks import Layout
from dedup.engine.records import CLUSTER_COLUMNS
from dedup.executors.local import LocalExecutor
from dedup.signals.edges import DECISIONS, SIGNALS, Candidates, build_edges
from dedup.signals.phash import (
    LOW_DETAIL_BITS,
    SIGNATURE_BYTES,
    SIGNATURE_TOLERANCE,
    shape_code,
)
from dedup.signals.views import VIEW_BYTES, VIEWS, WHOLE_VIEWS

REASONS = (*DECISIONS, *PASSTHROUGH_REASONS)


def planted_rows(n: int, seed: int, dim: int = 0):
    """Candidate columns with planted exact repeats, pHash near copies and exact code
    repeats (re-encodes), low-detail rows with close colour signatures, and CLIP vectors
    with near copies; a few rows that did not decode."""
    rng = np.random.default_rng(seed)
    # Codes from a few "photos" with skew: many share chunks, as real pHashes do.
    base = rng.integers(0, 2**63, 40, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    words = base[rng.integers(0, 40, n)]
    flips = np.zeros(n, dtype=np.uint64)
    for _ in range(rng.integers(0, 14)):
        bit = rng.integers(0, 64, n).astype(np.uint64)
        flips ^= np.where(rng.random(n) < 0.5, np.uint64(1) << bit, np.uint64(0))
    words ^= flips
    digest = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    copies = rng.random(n) < 0.15
    src = rng.integers(0, n, n)
    digest[copies] = digest[src[copies]]
    words[copies] = words[src[copies]]
    detail = rng.integers(LOW_DETAIL_BITS, 64, n).astype(np.int16)
    low_detail = rng.random(n) < 0.08
    detail[low_detail] = rng.integers(0, LOW_DETAIL_BITS, int(low_detail.sum()))
    # Tiny images (some of them low-detail too) are matched by signature at a wider
    # tolerance than the others: offsets up to 10 straddle both tolerances.
    tiny = rng.random(n) < 0.08
    pixels = np.where(tiny, rng.integers(1, 11, n) * 100, rng.integers(1, 5, n) * 100_000)
    low = low_detail | tiny
    signature = np.zeros((n, SIGNATURE_BYTES), dtype=np.uint8)
    colours = rng.integers(0, 256, (6, SIGNATURE_BYTES))
    # low-detail: a colour moved by a few levels; tiny: noise in every value (each rule
    # then links some pairs the other would not)
    noise = np.where(
        tiny[:, None],
        rng.integers(-3, 4, (n, SIGNATURE_BYTES)),
        rng.integers(-3, 4, (n, 1)),
    )
    signature[low] = np.clip(colours[rng.integers(0, 6, n)] + noise, 0, 255)[low]
    status = np.array(["ok"] * n, dtype=object)
    status[rng.random(n) < 0.03] = "undecodable"
    # Shapes from wide to tall (equal signatures of other shapes stay apart: flat rule)
    height = np.where(tiny, 10, rng.choice(np.array([10, 250, 400, 640]), n))
    vectors = None
    if dim:
        centres = rng.normal(size=(30, dim))
        v = centres[rng.integers(0, 30, n)] + rng.normal(scale=0.25, size=(n, dim))
        vectors = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    return {
        "words": words,
        "digest": digest,
        "detail": detail,
        "signature": signature,
        "low": low,
        "status": status,
        "pixels": pixels,
        "height": height,
        "nbytes": rng.integers(1000, 1010, n),
        "vectors": vectors,
        "views": planted_views(words, rng),
    }


def planted_views(words: np.ndarray, rng) -> np.ndarray:
    """(N, VIEW_BYTES) view codes whose full frame is the row's pHash word: the other
    views are drawn per picture (rows with a close word share them, a few bits moved),
    and some rows' full frame is another picture's crop, or its mirror, so that every
    allowed combination links some pair and crop-to-crop matches must be dropped."""
    n = len(words)
    pictures = rng.integers(0, 2**63, (n, VIEWS), dtype=np.int64).astype(np.uint64)
    # rows whose words are within 8 bits of an earlier row's take that row's views
    views = pictures.copy()
    views[:, 0] = words
    src = rng.integers(0, n, n)
    near = rng.random(n) < 0.3
    views[near, 1:] = views[src[near], 1:] ^ (
        np.uint64(1) << rng.integers(0, 64, (int(near.sum()), VIEWS - 1)).astype(np.uint64)
    )
    # a crop of another row: its full frame is that row's crop view (plus a bit or two)
    cropped = rng.random(n) < 0.1
    view = rng.integers(WHOLE_VIEWS, VIEWS, n)
    views[cropped, 0] = views[src[cropped], view[cropped]] ^ np.uint64(1 << 5)
    # two unrelated rows sharing a crop code: never linked by it
    shared = rng.random(n) < 0.05
    views[shared, WHOLE_VIEWS] = views[src[shared], WHOLE_VIEWS + 1]
    # a mirror copy: its mirror view is another row's full frame
    mirrored = rng.random(n) < 0.05
    views[mirrored, 2] = views[src[mirrored], 0]
    # re-encodes that moved no bit: equal vectors
    repeat = rng.random(n) < 0.05
    views[repeat] = views[src[repeat]]
    return views.astype(">u8").view(np.uint8).reshape(n, VIEW_BYTES)


def write_features(tmp_path, data, shard_sizes) -> list[str]:
    paths, start = [], 0
    for pos, size in enumerate(shard_sizes):
        sl = slice(start, start + size)
        start += size
        ok = data["status"][sl] == "ok"
        codes = data["words"][sl].astype(">u8").view(np.uint8).reshape(-1, 8)
        sig = [
            bytes(s) if low and good else None
            for s, low, good in zip(data["signature"][sl], data["low"][sl], ok, strict=True)
        ]
        vectors = data["vectors"]
        table = pa.table(
            {
                "index": np.arange(size),
                "key": [f"{pos:03d}-{k:05d}" for k in range(size)],
                "status": list(data["status"][sl]),
                "width": (data["pixels"][sl] // data["height"][sl]).astype(np.int32),
                "height": data["height"][sl].astype(np.int32),
                "bytes": data["nbytes"][sl],
                "digest": [
                    bytes(d) if g else None for d, g in zip(data["digest"][sl], ok, strict=True)
                ],
                "phash": [bytes(c) if g else None for c, g in zip(codes, ok, strict=True)],
                "detail": pa.array(data["detail"][sl], mask=~ok),
                "colour_signature": pa.array(sig, type=pa.binary(SIGNATURE_BYTES)),
                "clip": [
                    vectors[start - size + k].tobytes() if vectors is not None and g else None
                    for k, g in enumerate(ok)
                ],
                "views": pa.array(
                    [bytes(v) if g else None for v, g in zip(data["views"][sl], ok, strict=True)],
                    type=pa.binary(VIEW_BYTES),
                ),
            }
        )
        for name in KEEP_COLUMNS:  # not known
            table = table.append_column(name, pa.nulls(size, FEATURE_SCHEMA.field(name).type))
        schema = pa.schema([FEATURE_SCHEMA.field(name) for name in table.column_names])
        path = str(tmp_path / f"{pos:04d}.parquet")
        store_features(path, table.cast(schema), "planted rows", {})
        paths.append(path)
    return paths


def oracle(data, config):
    ok = np.flatnonzero(data["status"] == "ok")
    cand = Candidates(
        pixels=data["pixels"][ok] // data["height"][ok] * data["height"][ok],
        nbytes=data["nbytes"][ok],
        digest=data["digest"][ok],
        phash=data["words"][ok].astype(">u8").view(np.uint8).reshape(-1, 8),
        clip=data["vectors"][ok] if data["vectors"] is not None else None,
        detail=data["detail"][ok],
        signature=np.where(data["low"][ok, None], data["signature"][ok], 0).astype(np.uint8),
        views=data["views"][ok],
        shape=shape_code(data["pixels"][ok] // data["height"][ok], data["height"][ok]),
    )
    return ok, cand, cluster(cand, config), build_edges(cand, config)


def edge_set(i, j, signal):
    return {
        (min(a, b), max(a, b), s)
        for a, b, s in zip(i.tolist(), j.tolist(), signal.tolist(), strict=True)
    }


@pytest.mark.parametrize(
    ("seed", "partition_rows", "workers", "threshold"),
    [(0, 10**9, 1, 8), (1, 97, 2, 8), (2, 31, 2, 10), (3, 250, 1, 4), (4, 61, 2, 0)],
)
def test_partitioned_global_phase_equals_one_process_oracle(
    tmp_path, seed, partition_rows, workers, threshold
):
    n = 1500
    data = planted_rows(n, seed)
    sizes = [400, 1, 0, 350, 749]
    paths = write_features(tmp_path, data, sizes)
    config = Config(
        signals=("exact", "phash"), phash_threshold=threshold, partition_rows=partition_rows
    )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    r = run_global(paths, starts, config, LocalExecutor(workers), str(tmp_path / "w"), REASONS)
    ok, cand, want, want_edges = oracle(data, config)
    assert np.array_equal(np.flatnonzero(r.candidate), ok)
    # The same links: pHash equal-code and near edges may name another row of the same
    # code, so compare the components they make, and exact and flat edges as sets.
    assert edge_set(r.edges.i, r.edges.j, r.edges.signal) == edge_set(
        ok[want_edges.i], ok[want_edges.j], want_edges.signal
    )
    got = {name: np.zeros(n, dtype=np.int64) - 7 for name in ("cluster", "survivor", "reason")}
    m = r.members
    got["cluster"][ok] = ok  # rows in no edge are their own cluster
    got["survivor"][ok] = ok
    got["reason"][ok] = DECISIONS.index("unique")
    got["cluster"][m["rows"]] = m["cluster_id"]
    got["survivor"][m["rows"]] = m["survivor"]
    got["reason"][m["rows"]] = m["reason"]
    assert np.array_equal(got["cluster"][ok], ok[want.cluster_id])
    assert np.array_equal(got["survivor"][ok], ok[want.survivor])
    assert np.array_equal(got["reason"][ok], want.reason)
    g = r.groups
    assert np.array_equal(g.cluster_id, ok[want.groups.cluster_id])
    assert np.array_equal(g.survivor, ok[want.groups.survivor])
    assert np.array_equal(g.size, want.groups.size)
    assert np.array_equal(g.signals, want.groups.signals)
    assert np.array_equal(g.max_phash_distance, want.groups.max_phash_distance)
    assert len(want.groups) > 20  # the planted set has real clusters
    # ... and every kind of edge, with tiny pairs that the flat rule would not link
    assert set(want_edges.signal.tolist()) == {
        SIGNALS.index(name) for name in ("exact", "phash", "flat", "tiny")
    }
    tiny_edges = want_edges.signal == SIGNALS.index("tiny")
    a = cand.signature[want_edges.i[tiny_edges]].astype(int)
    b = cand.signature[want_edges.j[tiny_edges]].astype(int)
    assert (np.abs(a - b).max(axis=1) > SIGNATURE_TOLERANCE).any()
    if partition_rows < n:
        layout = Layout.of(n, config)
        assert layout.parts > 1 and layout.near_parts > layout.chunks


@pytest.mark.parametrize(
    ("seed", "partition_rows", "workers", "threshold"),
    [(0, 10**9, 1, 8), (1, 1500, 2, 8), (2, 4000, 2, 10), (3, 2500, 1, 4)],
)
def test_partitioned_view_search_equals_one_process_oracle(
    tmp_path, seed, partition_rows, workers, threshold
):
    """The views signal over partitioned multi-index hashing of virtual rows (row, view),
    its bound the grey zone's: the same edges and clusters as the one-process search of
    distinct code vectors, with equal vectors collapsed, crop-to-crop matches dropped,
    and links by a crop, by a mirror and by equal vectors all present."""
    n = 1200
    data = planted_rows(n, seed)
    sizes = [500, 0, 1, 699]
    paths = write_features(tmp_path, data, sizes)
    config = Config(
        signals=("views",),
        phash_threshold=threshold,
        views_threshold=threshold // 2,
        verify_threshold=threshold + 4,
        partition_rows=partition_rows,
    )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    r = run_global(paths, starts, config, LocalExecutor(workers), str(tmp_path / "w"), REASONS)
    ok, cand, want, want_edges = oracle(data, config)
    got_edges = edge_set(r.edges.i, r.edges.j, r.edges.signal)
    assert got_edges == edge_set(ok[want_edges.i], ok[want_edges.j], want_edges.signal)
    assert set(want_edges.signal.tolist()) == {SIGNALS.index("views")}
    assert (want_edges.distance == 0).sum() > 20 and (want_edges.distance > 1).sum() > 20
    m = r.members
    got = np.full(n, -1)
    got[m["rows"]] = m["survivor"]
    removed = want.survivor != np.arange(len(ok))
    assert np.array_equal(got[ok[removed]], ok[want.survivor[removed]])
    assert np.array_equal(r.groups.cluster_id, ok[want.groups.cluster_id])
    assert len(want.groups) > 20
    # the planted crop and mirror links are among the edges; shared crop codes are not
    words = data["views"].view(">u8").reshape(n, VIEWS)
    crops = words[:, WHOLE_VIEWS:]
    shares_crop = np.zeros((n, n), dtype=bool)
    for v in range(crops.shape[1]):
        shares_crop |= (crops[:, None, v, None] == crops[None, :, :]).any(axis=2)
    crop_only = []
    for a, b in zip(*np.nonzero(np.triu(shares_crop, 1)), strict=True):
        if data["status"][a] == data["status"][b] == "ok" and not (data["low"][[a, b]]).any():
            whole = min(
                np.bitwise_count(words[a, :WHOLE_VIEWS, None] ^ words[b, None, :]).min(),
                np.bitwise_count(words[b, :WHOLE_VIEWS, None] ^ words[a, None, :]).min(),
            )
            if whole > threshold:
                crop_only.append((int(a), int(b)))
    assert crop_only  # the planted shared crops exist ...
    views = SIGNALS.index("views")
    assert not any((a, b, views) in got_edges for a, b in crop_only)  # ... and unlinked
    if partition_rows < n * VIEWS:
        layout = Layout.of_views(n, config)
        assert layout.parts > 1 and layout.near_parts > layout.chunks


def test_layout_depends_on_data_and_config_only():
    config = Config(partition_rows=1000)
    assert Layout.of(10**6, config) == Layout.of(10**6, config)
    small = Layout.of(10, config)
    assert small.parts == 1 and small.prefix_bits == 0


def test_cluster_columns_are_stored():
    assert set(CLUSTER_COLUMNS) <= set(FEATURE_SCHEMA.names)


def test_clip_cells_find_true_pairs_the_same_way_every_time(tmp_path, monkeypatch):
    """Past CLIP_FLAT_MAX vectors, CLIP pairs are searched per k-means cell (approximate):
    every pair found is a true pair with its true similarity, nearly all true pairs are
    found, and one and two workers give the same edges."""
    import dedup.engine.pairtasks
    import dedup.search.pairs
    from dedup.search.pairs import cosine_pairs
    from dedup.signals.edges import CLIP

    monkeypatch.setattr(dedup.search.pairs, "CLIP_FLAT_MAX", 500)
    monkeypatch.setattr(dedup.engine.pairtasks, "CLIP_FLAT_MAX", 500)
    monkeypatch.setattr(dedup.engine.pairtasks, "CLIP_CELL_ROWS", 150)
    n, sizes = 1500, [700, 800]
    data = planted_rows(n, 5, dim=16)
    paths = write_features(tmp_path, data, sizes)
    config = Config(signals=("clip",), clip_threshold=0.9, clip_index="auto")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    found = []
    for workers in (1, 2):
        r = run_global(
            paths, starts, config, LocalExecutor(workers), str(tmp_path / f"w{workers}"), REASONS
        )
        assert r.stats["clip_cells"] == 10
        e = r.edges
        assert (e.signal == CLIP).all()
        found.append(sorted(zip(e.i.tolist(), e.j.tolist(), e.distance.tolist(), strict=True)))
    assert found[0] == found[1]
    ok = np.flatnonzero(data["status"] == "ok")
    a, b, sim = cosine_pairs(data["vectors"][ok], 0.9, engine="flat")
    truth = {(int(ok[x]), int(ok[y])): s for x, y, s in zip(a, b, sim, strict=True)}
    got = {(i, j): 1 - d / 1e6 for i, j, d in found[0]}
    assert set(got) <= set(truth)
    assert all(abs(got[p] - truth[p]) < 1e-3 for p in got)
    assert len(got) >= 0.95 * len(truth) and len(truth) > 1000


def test_run_output_is_the_same_bytes_for_any_partitioning_and_worker_count(planted, tmp_path):
    """The whole run: OUT's shards, samples.parquet and clusters.parquet are byte-equal
    with one partition and one worker, and with partitions of 7 rows and two workers."""
    import os
    import pathlib

    from dedup.commands.run import run

    _, paths, shards = planted
    outs = []
    for name, settings in (("a", {"workers": 1}), ("b", {"workers": 2, "partition_rows": 7})):
        out = str(tmp_path / name)
        run([shards], out, Config(signals=("exact", "phash"), **settings))
        outs.append(out)
    names = [os.path.basename(p) for p in paths]
    reports = ["samples.parquet", "clusters.parquet", "calibration.parquet"]
    for name in names + [os.path.join("dedup-report", r) for r in reports]:
        a, b = (pathlib.Path(out, name).read_bytes() for out in outs)
        assert a == b, name
    assert not os.path.exists(os.path.join(outs[1], ".dedup", "global"))
    assert not os.path.exists(os.path.join(outs[1], ".dedup", "parts"))


def test_tiny_rows_are_searched_in_luminance_buckets_without_losing_a_pair(tmp_path):
    """Tiny rows only, their signatures' mean luminance spread evenly over 0..255 with
    pairs straddling every bucket boundary: the bucketed search finds exactly the pairs
    of the one-process search, each once."""
    from dedup.engine.pairtasks import tiny_buckets

    n = 1200
    data = planted_rows(n, seed=5)
    rng = np.random.default_rng(5)
    level = rng.integers(0, 256, n)
    noise = rng.integers(-2, 3, (n, SIGNATURE_BYTES))
    data["signature"] = np.clip(level[:, None] + noise, 0, 255).astype(np.uint8)
    data["pixels"] = np.full(n, 28 * 28 // 10 * 10)  # every row tiny
    data["height"] = np.full(n, 10)
    data["low"] = np.ones(n, dtype=bool)  # every row stores its signature
    sizes = [500, 0, 700]
    paths = write_features(tmp_path, data, sizes)
    config = Config(signals=("phash",), partition_rows=300)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    r = run_global(paths, starts, config, LocalExecutor(2), str(tmp_path / "w"), REASONS)
    ok, cand, want, want_edges = oracle(data, config)
    got = edge_set(r.edges.i, r.edges.j, r.edges.signal)
    assert got == edge_set(ok[want_edges.i], ok[want_edges.j], want_edges.signal)
    assert len(r.edges.i) == len(got)  # no pair twice
    tiny = want_edges.signal == SIGNALS.index("tiny")
    home = tiny_buckets(cand.signature)[0]
    assert tiny.sum() > 500
    assert (home[want_edges.i[tiny]] != home[want_edges.j[tiny]]).sum() > 20  # straddling
    assert np.array_equal(r.members["survivor"], ok[want.survivor][np.isin(ok, r.members["rows"])])
