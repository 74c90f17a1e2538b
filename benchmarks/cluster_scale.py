"""Global phase at scale: time and peak memory to cluster N planted pHash codes.

`python benchmarks/cluster_scale.py 1000000 [10000000]` plants codes (a fifth are
near copies, 0-6 bits from an earlier code, a tenth exact repeats), then runs the
same function the pipeline runs (dedup.cluster.cluster) and reports time and memory.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from dedup.cluster import Candidates, cluster
from dedup.config import Config


def planted_codes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    words |= rng.integers(0, 2, n, dtype=np.int64).astype(np.uint64)
    near = rng.random(n) < 0.2
    src = rng.integers(0, n, n)
    flips = np.zeros(n, dtype=np.uint64)
    for _ in range(6):  # up to 6 random bit flips
        bit = rng.integers(0, 64, n).astype(np.uint64)
        flips ^= np.where(rng.random(n) < 0.5, np.uint64(1) << bit, np.uint64(0))
    words[near] = words[src[near]] ^ flips[near]
    exact = rng.random(n) < 0.1
    words[exact] = words[src[exact]]
    return words.astype(">u8").view(np.uint8).reshape(n, 8)


def main(sizes: list[int]) -> None:
    for n in sizes:
        codes = planted_codes(n)
        cand = Candidates(
            pixels=np.ones(n, dtype=np.int64),
            nbytes=np.ones(n, dtype=np.int64),
            digest=np.arange(n, dtype=np.int64).view(np.uint8).reshape(n, 8).repeat(4, axis=1),
            phash=codes,
        )
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        result = cluster(cand, Config(signals=("phash",), phash_threshold=8))
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        removed = int((result.survivor != np.arange(n)).sum())
        print(
            f"{n:>11,} codes: {seconds:6.1f} s, {len(result.groups):,} clusters, "
            f"{removed:,} removed, peak RSS {peak / 1024:,.0f} MiB "
            f"(+{(peak - before) / 1024:,.0f} MiB while clustering); largest search worker "
            f"{child / 1024:,.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1_000_000])
