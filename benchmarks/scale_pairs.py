"""Pair-finding engines on realistic pHash codes: statistics, time, memory, exactness.

Commands (each prints one JSON line; see `python benchmarks/scale_pairs.py -h`):

  stats  --n N [--kind realistic|uniform]   near-pair rate of unrelated tiles, bucket
                                            occupancy and MIH candidates per query
  run    ENGINE --n N [--kind ...] [--sub S] one engine on the distinct codes (or on a
                                            seeded subsample of S of them); pairs saved
                                            under bench-data/pairs/, time and peak RSS
  compare FILE FILE ...                      exact equality of saved pair sets
  spot-check FILE --n N                      brute force for 1,000 random codes against
                                            all N: their saved pairs must match exactly

Engines: `dedup-mih` (dedup.search.pairs.hamming_pairs, engine="mih", workers=2), `flat`
(FAISS IndexBinaryFlat range search: the brute-force oracle), `faiss-mh:NHASH:B:NFLIP`
(FAISS IndexBinaryMultiHash range search at radius threshold + 1; exact only when
NHASH * (NFLIP + 1) > threshold), and `numba-mih:M` (multi-index hashing compiled with
numba, threads over query ranges, each pair reported by the first chunk that finds it;
`numba-mih:Mi` chunks interleaved bits instead of contiguous ones).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations
from math import comb

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale_codes import NO_SOURCE, realistic_codes, tile_codes, uniform_codes  # noqa: E402

from dedup.search.pairs import code_chunks, hamming_pairs, self_range_pairs, unique_codes  # noqa: E402

THRESHOLD = 8
PAIRS_DIR = "bench-data/pairs"


def load_codes(kind: str, n: int) -> np.ndarray:
    """Planted codes of `kind`: realistic (scale_codes) or uniform (scale_codes.uniform_codes)."""
    if kind == "realistic":
        return realistic_codes(n)
    if kind == "uniform":
        return uniform_codes(n)
    raise ValueError(kind)


def words_of(codes: np.ndarray) -> np.ndarray:
    return codes.view(">u8").reshape(-1).astype(np.uint64)


# ------------------------------------------------------------------ statistics


def near_pair_rates(codes: np.ndarray, sources: np.ndarray, sample: int, seed: int = 0) -> dict:
    """Exact counts over all pairs of a random sample of tiles (a FAISS brute force):
    pairs within THRESHOLD bits, split by whether the two tiles share a photograph."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(codes), size=min(sample, len(codes)), replace=False))
    x, src = np.ascontiguousarray(codes[rows]), sources[rows]
    import faiss

    index = faiss.IndexBinaryFlat(64)
    index.add(x)
    i, j, d = self_range_pairs(index, x, THRESHOLD + 1)
    shared = _share_source(src[i], src[j])
    total = len(rows) * (len(rows) - 1) // 2
    # Pairs that share a photograph, among all pairs: estimated from 10^7 random pairs.
    a, b = rng.integers(0, len(rows), (2, 10_000_000))
    keep = a != b
    share_fraction = float(_share_source(src[a[keep]], src[b[keep]]).mean())
    cross_total = total * (1 - share_fraction)
    hist = np.bincount(d.astype(np.int64), minlength=THRESHOLD + 1).tolist()
    cross_hist = np.bincount(d[~shared].astype(np.int64), minlength=THRESHOLD + 1).tolist()
    return {
        "sample": len(rows),
        "pairs": total,
        "within_8": int(len(i)),
        "rate_all": len(i) / total,
        "rate_other_photo": int((~shared).sum()) / cross_total,
        "rate_same_photo": int(shared.sum()) / (total - cross_total) if share_fraction else None,
        "share_same_photo": share_fraction,
        "hist_all": hist,
        "hist_other_photo": cross_hist,
        "equal_codes": int(hist[0]),
    }


def _share_source(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise: do two tiles (two source ids each, NO_SOURCE unused) share a source?"""
    out = np.zeros(len(a), dtype=bool)
    for p in range(2):
        for q in range(2):
            out |= (a[:, p] == b[:, q]) & (a[:, p] != NO_SOURCE)
    return out


def uniform_rate(threshold: int = THRESHOLD) -> float:
    return sum(comb(64, k) for k in range(threshold + 1)) / 2.0**64


def flip_masks(bits: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << p for p in c) for c in combinations(range(bits), k)]
    return np.asarray(masks, dtype=np.int64)


def bucket_stats(words: np.ndarray, m: int, threshold: int = THRESHOLD) -> list[dict]:
    """Per chunk of dedup's m-way split: the largest bucket, the mean bucket size seen
    by a code (sum of squares / N), and MIH candidates per query (bucket entries
    scanned over all probes within floor(threshold / m) bits), each with its
    expectation for uniform codes."""
    n = len(words)
    out = []
    for shift, bits in code_chunks(m):
        keys = ((words >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        counts = np.bincount(keys, minlength=1 << bits).astype(np.float64)
        masks = flip_masks(bits, threshold // m)
        index = np.arange(1 << bits, dtype=np.int64)
        scanned = sum(float(counts @ counts[index ^ mask]) for mask in masks)
        out.append(
            {
                "bits": bits,
                "largest": int(counts.max()),
                "uniform_largest_approx": _uniform_max(n, bits),
                "seen_by_code": float((counts**2).sum() / n),
                "uniform_seen_by_code": 1 + (n - 1) / 2**bits,
                "candidates_per_query": scanned / n,
                "uniform_candidates_per_query": 1 + len(masks) * (n - 1) / 2**bits,
                "empty_buckets": float((counts == 0).mean()),
            }
        )
    return out


def _uniform_max(n: int, bits: int) -> int:
    """Roughly the largest of 2^bits Poisson(n / 2^bits) counts (its 1 - 2^-bits quantile)."""
    from scipy.stats import poisson

    return int(poisson.ppf(1 - 1 / 2**bits, n / 2**bits))


def stats(kind: str, n: int, sample: int) -> dict:
    codes = load_codes(kind, n)
    unique, _ = unique_codes(codes)
    words = words_of(unique)
    out = {"kind": kind, "n": n, "distinct": len(unique)}
    if kind == "realistic":
        tiles, sources = tile_codes(n)
        out["tile_rates"] = near_pair_rates(tiles, sources, sample)
    else:
        out["tile_rates"] = near_pair_rates(
            unique, np.full((len(unique), 2), NO_SOURCE, dtype=np.int16), sample
        )
    out["uniform_rate"] = uniform_rate()
    bits = np.unpackbits(unique[: min(len(unique), 2_000_000)], axis=1).mean(axis=0)
    out["bit_ones_fraction"] = [round(float(b), 3) for b in bits]
    out["buckets"] = {m: bucket_stats(words, m) for m in (3, 4)}
    out["buckets_interleaved"] = {
        m: bucket_stats(words_of(interleave_bits(unique, m)), m) for m in (3, 4)
    }
    return out


# ------------------------------------------------------------------ engines


def run_engine(name: str, codes: np.ndarray, workers: int = 2) -> tuple[tuple, dict]:
    """(i, j, d) sorted pairs within THRESHOLD and engine details."""
    if name == "dedup-mih":
        return hamming_pairs(codes, THRESHOLD, engine="mih", workers=workers), {}
    if name == "flat":
        return hamming_pairs(codes, THRESHOLD, engine="flat"), {}
    if name.startswith("faiss-mh:"):
        return _faiss_multihash(codes, *[int(x) for x in name.split(":")[1:]], workers)
    if name.startswith("numba-mih:"):
        spec = name.split(":")[1]
        m = int(spec.rstrip("i"))
        if spec.endswith("i"):  # chunks of interleaved bits: a bit permutation keeps distances
            codes = interleave_bits(codes, m)
        return numba_mih(codes, THRESHOLD, m, workers)
    raise ValueError(name)


def interleave_bits(codes: np.ndarray, m: int) -> np.ndarray:
    """Codes with their bits reordered so that dedup's m contiguous chunks each take
    every m-th bit (bit c, c + m, ...): each chunk then mixes low and high DCT
    frequencies, and buckets fill more evenly. Hamming distances are unchanged."""
    order = np.concatenate([np.arange(c, 64, m) for c in range(m)])
    out = np.empty_like(codes)
    for start in range(0, len(codes), 1 << 20):
        bits = np.unpackbits(codes[start : start + (1 << 20)], axis=1)
        out[start : start + (1 << 20)] = np.packbits(bits[:, order], axis=1)
    return out


def _faiss_multihash(codes, nhash: int, b: int, nflip: int, workers: int):
    import faiss

    faiss.omp_set_num_threads(workers)
    t = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(64, nhash, b)
    index.nflip = nflip
    index.add(codes)
    built = time.perf_counter() - t
    faiss.cvar.indexBinaryHash_stats.reset()
    i, j, d = self_range_pairs(index, codes, THRESHOLD + 1)
    st = faiss.cvar.indexBinaryHash_stats
    order = np.lexsort((j, i))
    exact = nhash * (nflip + 1) > THRESHOLD
    info = {"build_s": built, "ndis_per_query": st.ndis / len(codes), "exact_by_design": exact}
    return (i[order], j[order], d[order].astype(np.int32)), info


# --- compiled multi-index hashing


def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def _mih_segment(
    table_words, order, keys, starts, masks, shifts, widths, chunk, radius, threshold, p0, p1
):
    """Pairs found through chunk `chunk`'s table by the codes at table positions
    [p0, p1) (the table holds rows sorted by chunk key, so neighbouring queries probe
    neighbouring buckets). Each unordered pair is looked at once: within a bucket from
    its earlier position, across buckets from the lower bucket; and it is kept only
    when no earlier chunk is within `radius` (that chunk reports it)."""
    cap = 1 << 12
    oi = np.empty(cap, dtype=np.int64)
    oj = np.empty(cap, dtype=np.int64)
    od = np.empty(cap, dtype=np.int8)
    count = 0
    scanned = 0
    for p in range(p0, p1):
        w = table_words[p]
        key = keys[p]
        for mask in masks:
            bucket = key ^ mask
            if bucket < key:
                continue
            lo = p + 1 if mask == 0 else starts[bucket]
            hi = starts[bucket + 1]
            scanned += hi - lo
            for p2 in range(lo, hi):
                x = w ^ table_words[p2]
                d = _popcount(x)
                if d > threshold:
                    continue
                first = True
                for c in range(chunk):
                    part = (x >> shifts[c]) & ((np.uint64(1) << widths[c]) - np.uint64(1))
                    if _popcount(part) <= radius:
                        first = False
                        break
                if not first:
                    continue
                if count == cap:
                    cap *= 2
                    oi2 = np.empty(cap, dtype=np.int64)
                    oj2 = np.empty(cap, dtype=np.int64)
                    od2 = np.empty(cap, dtype=np.int8)
                    oi2[:count] = oi[:count]
                    oj2[:count] = oj[:count]
                    od2[:count] = od[:count]
                    oi, oj, od = oi2, oj2, od2
                a, b = order[p], order[p2]
                oi[count] = min(a, b)
                oj[count] = max(a, b)
                od[count] = d
                count += 1
    return oi[:count], oj[:count], od[:count], scanned


_compiled: dict = {}


def _kernel():
    if "segment" not in _compiled:
        import numba

        jit = numba.njit(cache=True, nogil=True)
        globals()["_popcount"] = jit(_popcount)
        _compiled["segment"] = jit(_mih_segment)
    return _compiled["segment"]


def numba_mih(codes: np.ndarray, threshold: int, m: int, workers: int = 2):
    """Multi-index hashing over dedup's m-way split, compiled: per chunk, one table of
    the codes sorted by chunk key with bucket starts; ranges of table positions run in
    `workers` threads."""
    segment = _kernel()
    words = words_of(codes)
    n = len(words)
    parts = code_chunks(m)
    shifts = np.array([s for s, _ in parts], dtype=np.uint64)
    widths = np.array([b for _, b in parts], dtype=np.uint64)
    radius = threshold // m
    found, scanned = [], 0
    for c, (shift, bits) in enumerate(parts):
        keys = ((words >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int32)
        order = np.argsort(keys, kind="stable")
        table_keys = keys[order]
        table_words = words[order]
        del keys
        starts = np.zeros((1 << bits) + 1, dtype=np.int64)
        np.cumsum(np.bincount(table_keys, minlength=1 << bits), out=starts[1:])
        masks = flip_masks(bits, radius).astype(np.int32)
        step = max(1, -(-n // (workers * 64)))
        ranges = [(p0, min(n, p0 + step)) for p0 in range(0, n, step)]

        def task(r, tw=table_words, order=order, tk=table_keys, st=starts, masks=masks, c=c):
            return segment(tw, order, tk, st, masks, shifts, widths, c, radius, threshold, *r)

        with ThreadPoolExecutor(workers) as pool:
            for oi, oj, od, s in pool.map(task, ranges):
                found.append((oi, oj, od))
                scanned += s
        del table_words, order, table_keys, starts
    i = np.concatenate([f[0] for f in found])
    j = np.concatenate([f[1] for f in found])
    d = np.concatenate([f[2] for f in found]).astype(np.int32)
    order = np.lexsort((j, i))
    return (i[order], j[order], d[order]), {"scanned_per_query": scanned / n, "chunks": m}


def run(name: str, kind: str, n: int, sub: int | None, workers: int) -> dict:
    codes = load_codes(kind, n)
    unique, _ = unique_codes(codes)
    if sub:
        rng = np.random.default_rng(1)
        unique = unique[np.sort(rng.choice(len(unique), size=sub, replace=False))]
    del codes
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu0 = _cpu_seconds()
    t = time.perf_counter()
    (i, j, d), info = run_engine(name, unique, workers)
    seconds = time.perf_counter() - t
    cpu = _cpu_seconds() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    os.makedirs(PAIRS_DIR, exist_ok=True)
    tag = f"{kind}-n{n}" + (f"-sub{sub}" if sub else "")
    path = os.path.join(PAIRS_DIR, f"{tag}-{name.replace(':', '_')}.npz")
    np.savez(path, i=i, j=j, d=d)
    return {
        "engine": name,
        "kind": kind,
        "n": n,
        "codes": len(unique),
        "sub": sub,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2),
        "load_average": os.getloadavg()[0],
        "pairs": int(len(i)),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),
        "rss_before_mib": round(before / 1024),
        "peak_child_rss_mib": round(children / 1024),
        "file": path,
        **info,
    }


def _cpu_seconds() -> float:
    """User and system time of this process and its waited-for children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def compare(paths: list[str]) -> dict:
    ref = dict(np.load(paths[0]))
    out = {"reference": paths[0], "equal": {}}
    for p in paths[1:]:
        other = dict(np.load(p))
        same = all(np.array_equal(ref[k], other[k]) for k in ("i", "j", "d"))
        out["equal"][p] = same
        if not same:
            span = int(max(ref["j"].max(initial=0), other["j"].max(initial=0))) + 1
            a = ref["i"] * span + ref["j"]
            b = other["i"] * span + other["j"]
            missing = np.setdiff1d(a, b, assume_unique=True)
            extra = np.setdiff1d(b, a, assume_unique=True)
            out.setdefault("diff", {})[p] = {"missing": len(missing), "extra": len(extra)}
    return out


def spot_check(path: str, kind: str, n: int, queries: int = 1000, seed: int = 2) -> dict:
    """Brute force for `queries` random codes against all n distinct codes: their pairs
    in the saved file must be exactly those (for sets too large for a full oracle)."""
    unique, _ = unique_codes(load_codes(kind, n))
    words = words_of(unique)
    saved = dict(np.load(path))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(words), size=queries, replace=False))
    expected = set()
    for q in rows:
        close = np.flatnonzero(np.bitwise_count(words ^ words[q]) <= THRESHOLD)
        expected.update((min(q, c), max(q, c)) for c in close.tolist() if c != q)
    touch = np.isin(saved["i"], rows) | np.isin(saved["j"], rows)
    found = set(zip(saved["i"][touch].tolist(), saved["j"][touch].tolist(), strict=True))
    return {
        "file": path,
        "queries": queries,
        "pairs_expected": len(expected),
        "missing": len(expected - found),
        "extra": len(found - expected),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats")
    s.add_argument("--n", type=int, default=1_000_000)
    s.add_argument("--kind", default="realistic")
    s.add_argument("--sample", type=int, default=200_000)
    r = sub.add_parser("run")
    r.add_argument("engine")
    r.add_argument("--n", type=int, default=1_000_000)
    r.add_argument("--kind", default="realistic")
    r.add_argument("--sub", type=int, default=None)
    r.add_argument("--workers", type=int, default=2)
    c = sub.add_parser("compare")
    c.add_argument("files", nargs="+")
    k = sub.add_parser("spot-check")
    k.add_argument("file")
    k.add_argument("--n", type=int, default=10_000_000)
    k.add_argument("--kind", default="realistic")
    k.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.cmd == "stats":
        result = stats(args.kind, args.n, args.sample)
    elif args.cmd == "run":
        result = run(args.engine, args.kind, args.n, args.sub, args.workers)
    elif args.cmd == "compare":
        result = compare(args.files)
    else:
        result = spot_check(args.file, args.kind, args.n, args.queries)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
