"""The global phase at scale, on pHash codes with the skew of real photographs.

`python benchmarks/bench_scale.py 1000000 10000000 100000000 --old-up-to 10000000`

For each N: the planted codes of benchmarks/scale_codes.py go into feature files of a
million rows (written by the feature store's own writer, benchmarks/featurefiles.py, as
the extract phase writes them); then, each in a fresh process so that
peak memory is its own:
- new: the partitioned global phase (dedup.engine.globalphase.run_global) on the local
  executor with every core: time, peak RSS of the driver and of the largest worker,
  the layout and the load of the near-pair parts (bucket occupancy);
- old: the one-process engine this replaced (dedup.engine.cluster.cluster over every code in
  memory), up to --old-up-to codes;
- a check against brute force: for 200 sampled rows, every row within the threshold
  (FAISS flat search over all N) must be linked to it by an edge (through its code's
  first row, as equal codes are collapsed), and no edge may be longer than the
  threshold.

`--smoke`: 20,000 uniform codes and 2,000 CLIP vectors in a temporary folder (the
test suite runs it: tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from featurefiles import feature_table, fixed_binary, write_feature_file  # noqa: E402
from scale_codes import realistic_codes, uniform_codes  # noqa: E402

from dedup.core.config import Config  # noqa: E402

SHARD_ROWS = 1_000_000
THRESHOLD = 8
SAMPLE = 200


def planted(n: int, kind: str, cache_dir: str) -> np.ndarray:
    """n planted codes: pHashes of real photographs' views (the bench extra's bundled
    photographs; cached under cache_dir) or uniform random words."""
    if kind == "uniform":
        return uniform_codes(n)
    try:
        return realistic_codes(n, cache_dir=cache_dir)
    except ImportError as e:
        raise SystemExit(
            f"realistic codes need the bench extra's photographs ({e}): `make bench-scale` "
            "installs it; --kind uniform runs without"
        ) from None


def write_features(codes: np.ndarray, folder: str, config: Config) -> tuple[list[str], np.ndarray]:
    """Feature files of SHARD_ROWS decoded rows each (only what the global phase reads is
    set: size, pHash code, detail), written as the extract phase writes them."""
    paths, starts = [], [0]
    for start in range(0, len(codes), SHARD_ROWS):
        chunk = codes[start : start + SHARD_ROWS]
        n = len(chunk)
        path = os.path.join(folder, f"{len(paths):06d}.parquet")
        table = feature_table(
            n,
            width=np.full(n, 100, dtype=np.int32),
            height=np.full(n, 100, dtype=np.int32),
            bytes=np.full(n, 1000, dtype=np.int64),
            phash=fixed_binary(chunk),
            detail=np.full(n, 64, dtype=np.int16),
        )
        write_feature_file(path, table, f"bench-scale/part-{len(paths):06d}.tar", config)
        paths.append(path)
        starts.append(start + n)
    return paths, np.asarray(starts, dtype=np.int64)


def _peak_mib(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def run_new(folder: str, paths: list[str], starts: np.ndarray, rows: int, out: dict) -> None:
    from dedup.engine.globalphase import run_global
    from dedup.engine.plan import REASONS
    from dedup.executors.local import LocalExecutor

    config = Config(signals=("phash",), phash_threshold=THRESHOLD, partition_rows=rows)
    t = time.perf_counter()
    r = run_global(
        paths, starts, config, LocalExecutor(os.cpu_count() or 1), folder + "/work", REASONS
    )
    seconds = time.perf_counter() - t
    near = r.stats["near"]
    removed = int((r.members["survivor"] != r.members["rows"]).sum()) if r.members else 0
    np.savez(folder + "/edges.npz", i=r.edges.i, j=r.edges.j, d=r.edges.distance)
    layout = r.stats["layout"]
    out.update(
        seconds=round(seconds, 1),
        partition_rows=rows,
        driver_peak_mib=round(_peak_mib(resource.RUSAGE_SELF)),
        worker_peak_mib=round(_peak_mib(resource.RUSAGE_CHILDREN)),
        edges=len(r.edges.i),
        clusters=len(r.groups) if r.groups is not None else 0,
        removed=removed,
        layout=dict(
            parts=layout.parts,
            chunks=layout.chunks,
            prefix_bits=layout.prefix_bits,
            radius=layout.radius,
        ),
        near_parts=len(near),
        table_codes_max=max(s.table for s in near),
        queries_max=max(s.queries for s in near),
        largest_bucket=max(s.largest_bucket for s in near),
        # A code's expected bucket: sum of squared bucket sizes over the codes.
        mean_bucket_seen=round(
            sum(s.squared for s in near) / max(1, sum(s.table for s in near)), 2
        ),
    )


def run_old(codes_path: str, out: dict) -> None:
    from dedup.engine.cluster import cluster
    from dedup.signals.edges import Candidates

    codes = np.load(codes_path)
    n = len(codes)
    cand = Candidates(
        pixels=np.full(n, 10000, dtype=np.int64),
        nbytes=np.full(n, 1000, dtype=np.int64),
        digest=np.zeros((n, 32), dtype=np.uint8),
        phash=codes,
    )
    t = time.perf_counter()
    result = cluster(cand, Config(signals=("phash",), phash_threshold=THRESHOLD))
    out.update(
        seconds=round(time.perf_counter() - t, 1),
        driver_peak_mib=round(_peak_mib(resource.RUSAGE_SELF)),
        worker_peak_mib=round(_peak_mib(resource.RUSAGE_CHILDREN)),
        clusters=len(result.groups),
        removed=int((result.survivor != np.arange(n)).sum()),
    )


def _in_child(target, *args, timeout: float | None = None) -> dict:
    with multiprocessing.Manager() as manager:
        out = manager.dict()
        process = multiprocessing.get_context("spawn").Process(target=target, args=(*args, out))
        process.start()
        process.join(timeout)
        if process.is_alive():  # the old engine past its budget: say so, do not wait
            for child in _children(process.pid):
                os.kill(child, 9)
            process.kill()
            process.join()
            return {"seconds": None, "stopped_after_seconds": timeout}
        if process.exitcode:
            raise SystemExit(f"{target.__name__} failed with exit code {process.exitcode}")
        return dict(out)


def _children(pid: int) -> list[int]:
    import subprocess

    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def check(codes: np.ndarray, edges_path: str) -> dict:
    """Every pair within the threshold of a sampled row is an edge between the first
    rows of the two codes (or the codes are equal); no edge is longer."""
    import faiss

    e = np.load(edges_path)
    i, j, d = e["i"], e["j"], e["d"]
    words = codes.view(">u8").reshape(-1)
    _, first, inverse = np.unique(words, return_index=True, return_inverse=True)
    rep = first[inverse]
    keys = np.sort(np.minimum(i, j) * len(codes) + np.maximum(i, j))
    rng = np.random.default_rng(1)
    sample = rng.choice(len(codes), SAMPLE, replace=False)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    lims, dist, labels = index.range_search(codes[sample], THRESHOLD + 1)
    pairs = linked = 0
    for k, x in enumerate(sample.tolist()):
        for y in labels[lims[k] : lims[k + 1]].tolist():
            if y == x:
                continue
            pairs += 1
            a, b = int(rep[x]), int(rep[y])
            if a == b:
                linked += 1  # equal codes: an equal-code edge each to the first row
                continue
            key = min(a, b) * len(codes) + max(a, b)
            at = np.searchsorted(keys, key)
            linked += bool(at < len(keys) and keys[at] == key)
    actual = np.bitwise_count(words[i] ^ words[j])
    return {
        "sampled_rows": SAMPLE,
        "pairs_brute_force": pairs,
        "pairs_linked": linked,
        "edges_over_threshold": int((actual > THRESHOLD).sum()),
        "edge_distance_mismatch": int((actual != d).sum()),
    }


def clip_recall(n: int, data: str, dim: int = 512, threshold: float = 0.94) -> dict:
    """The CLIP search by k-means cell against an exact search over all pairs, on
    clustered unit vectors (a tenth near copies of another vector)."""
    from dedup.engine.globalphase import run_global
    from dedup.engine.plan import REASONS
    from dedup.executors.local import LocalExecutor
    from dedup.search.pairs import cosine_pairs

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(n // 20, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + rng.normal(scale=0.9, size=(n, dim))
    copies = rng.random(n) < 0.1
    source = rng.integers(0, n, n)
    x[copies] = x[source[copies]] + rng.normal(scale=0.15, size=(int(copies.sum()), dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    t = time.perf_counter()
    a, b, _ = cosine_pairs(x, threshold, engine="flat")
    exact_seconds = time.perf_counter() - t
    truth = set(zip(a.tolist(), b.tolist(), strict=True))
    config = Config(signals=("clip",), clip_threshold=threshold)
    with tempfile.TemporaryDirectory(prefix="bench-clip-", dir=data) as folder:
        table = feature_table(
            n,
            width=np.full(n, 100, dtype=np.int32),
            height=np.full(n, 100, dtype=np.int32),
            bytes=np.full(n, 1000, dtype=np.int64),
            clip=[v.tobytes() for v in x],
        )
        path = os.path.join(folder, "000000.parquet")
        write_feature_file(path, table, "bench-scale/clip.tar", config)
        t = time.perf_counter()
        r = run_global(
            [path],
            np.array([0, n]),
            config,
            LocalExecutor(os.cpu_count() or 1),
            folder + "/work",
            REASONS,
        )
        cell_seconds = time.perf_counter() - t
    found = set(zip(r.edges.i.tolist(), r.edges.j.tolist(), strict=True))
    return {
        "vectors": n,
        "cells": r.stats["clip_cells"],
        "true_pairs": len(truth),
        "found": len(found),
        "recall": round(len(found & truth) / max(1, len(truth)), 4),
        "false_pairs": len(found - truth),
        "exact_search_seconds": round(exact_seconds, 1),
        "global_phase_seconds": round(cell_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sizes", nargs="*", type=int)
    parser.add_argument("--old-up-to", type=int, default=10_000_000)
    parser.add_argument("--old-timeout", type=float, default=1800.0)
    parser.add_argument("--partition-rows", type=int, default=Config().partition_rows)
    parser.add_argument("--clip", type=int, default=200_000, help="CLIP vectors; 0: skip")
    parser.add_argument("--clip-dim", type=int, default=128)
    parser.add_argument("--kind", choices=("realistic", "uniform"), default="realistic")
    parser.add_argument("--data", default="bench-data", help="work folders and the codes' cache")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny: 20,000 uniform codes and 2,000 CLIP vectors in a temporary folder",
    )
    args = parser.parse_args()
    if not args.smoke:
        os.makedirs(args.data, exist_ok=True)
        measure(args)
        return
    args.sizes = args.sizes or [20_000]
    args.clip = min(args.clip, 2_000)
    if args.kind == "realistic":
        print("--smoke: uniform random codes (real photographs' codes take minutes to build)")
        args.kind = "uniform"
    with tempfile.TemporaryDirectory(prefix="bench-scale-smoke-") as data:
        args.data = data
        measure(args)


def measure(args: argparse.Namespace) -> None:
    if args.clip:
        clip = clip_recall(args.clip, args.data, args.clip_dim)
        print(json.dumps({"clip": clip}), flush=True)
    rows = []
    config = Config(signals=("phash",), phash_threshold=THRESHOLD)
    for n in args.sizes:
        codes = planted(n, args.kind, os.path.join(args.data, "codes"))
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=args.data) as folder:
            t = time.perf_counter()
            paths, starts = write_features(codes, folder, config)
            print(f"{n:,} codes: features written in {time.perf_counter() - t:.0f} s", flush=True)
            row = {
                "codes": n,
                "new": _in_child(run_new, folder, paths, starts, args.partition_rows),
            }
            print(json.dumps(row), flush=True)
            row["check"] = check(codes, folder + "/edges.npz")
            print(json.dumps(row["check"]), flush=True)
            if n <= args.old_up_to:
                np.save(folder + "/codes.npy", codes)
                row["old"] = _in_child(run_old, folder + "/codes.npy", timeout=args.old_timeout)
                old = row["old"]["seconds"] or row["old"]["stopped_after_seconds"]
                row["speedup"] = round(old / max(row["new"]["seconds"], 0.1), 2)
                print(json.dumps(row["old"]), f"speedup {row['speedup']}", flush=True)
            rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
