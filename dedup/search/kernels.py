"""Compiled inner loops (numba): the one place where a per-candidate loop beats numpy's
whole-array steps, which materialize several arrays per candidate pair."""

from __future__ import annotations

import numba
import numpy as np

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@numba.njit(cache=True, nogil=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@numba.njit(cache=True, nogil=True)
def near_pairs(
    q_low,
    q_words,
    q_reps,
    q_used,
    t_words,
    t_reps,
    starts,
    masks,
    mask_end,
    threshold,
    radius,
    earlier,
    q_free,
):
    """Pairs (query rep < table rep) within `threshold` bits, from probing a table ordered
    by its codes' low chunk bits (`starts`: the first entry of each value) with every
    query's low bits flipped by the masks of at most radius - q_used bits; a pair whose
    earlier chunk (shift, bits in `earlier`) is within `radius` bits is left to it.

    Queries come sorted by their low bits and the loop runs mask by mask, so that
    consecutive probes land near each other in the table (a probe per query and mask,
    hundreds per query: random order made each one a cache miss). A query marked in
    `q_free` is in no table (the views signal's crops): it pairs with lower reps too,
    since no probe the other way round can find the pair."""
    cap = 1024
    out_i = np.empty(cap, np.int64)
    out_j = np.empty(cap, np.int64)
    out_d = np.empty(cap, np.int32)
    n = 0
    for m in range(len(masks)):
        mask = masks[m]
        for q in range(len(q_low)):
            used = q_used[q]
            if used > radius or m >= mask_end[radius - used]:
                continue
            v = q_low[q] ^ mask
            lo = starts[v]
            hi = starts[v + 1]
            if lo == hi:
                continue
            word = q_words[q]
            rep = q_reps[q]
            free = q_free[q]
            for k in range(lo, hi):
                other = t_reps[k]
                if rep == other or (rep > other and not free):
                    continue
                x = word ^ t_words[k]
                d = np.int64(_popcount(x))
                if d > threshold:
                    continue
                seen = False
                for e in range(earlier.shape[0]):
                    part = (x >> np.uint64(earlier[e, 0])) & np.uint64((1 << earlier[e, 1]) - 1)
                    if np.int64(_popcount(part)) <= radius:
                        seen = True
                        break
                if seen:
                    continue
                if n == cap:
                    cap *= 2
                    grown_i = np.empty(cap, np.int64)
                    grown_j = np.empty(cap, np.int64)
                    grown_d = np.empty(cap, np.int32)
                    grown_i[:n] = out_i[:n]
                    grown_j[:n] = out_j[:n]
                    grown_d[:n] = out_d[:n]
                    out_i, out_j, out_d = grown_i, grown_j, grown_d
                out_i[n] = rep
                out_j[n] = other
                out_d[n] = d
                n += 1
    return out_i[:n].copy(), out_j[:n].copy(), out_d[:n].copy()


@numba.njit(cache=True, nogil=True)
def star_claims(order, group, mem_start, members, adj_start, adj, fixed):
    """The star rule, greedy: rows in `order` (best first); an unclaimed row becomes a
    survivor and claims every unclaimed row it links to directly; a `fixed` row (a
    reference item, a blocklisted sample: they come first in `order`) is never claimed.
    Per signal s, rows of one key group (`group[s]`: equal digest, equal code) link to
    each other, and to every row of the groups adjacent to theirs (`adj`, CSR by group
    over absolute offsets). A group is scanned in full once: its unclaimed count then drops to 0.
    Returns each row's survivor."""
    signals, n = group.shape
    survivor = np.full(n, -1, np.int64)
    unclaimed = np.zeros((signals, n), np.int64)
    for s in range(signals):
        for r in range(n):
            unclaimed[s, group[s, r]] += 1
    for b in order:
        if survivor[b] >= 0:
            continue
        survivor[b] = b
        for s in range(signals):
            unclaimed[s, group[s, b]] -= 1
        for s in range(signals):
            g = group[s, b]
            for a in range(adj_start[s, g] - 1, adj_start[s, g + 1]):
                target = g if a < adj_start[s, g] else adj[a]
                if unclaimed[s, target] == 0:
                    continue
                for m in range(mem_start[s, target], mem_start[s, target + 1]):
                    y = members[s, m]
                    if survivor[y] >= 0 or fixed[y]:
                        continue
                    survivor[y] = b
                    for s2 in range(signals):
                        unclaimed[s2, group[s2, y]] -= 1
    return survivor


@numba.njit(cache=True, nogil=True)
def cluster_diameters(words, starts):
    """Largest pairwise Hamming distance among the distinct codes of each cluster;
    `words` sorted by cluster, then code, clusters at `starts`. -1 for a cluster with
    fewer than three distinct codes (its caller knows the answer)."""
    out = np.full(len(starts) - 1, -1, np.int64)
    distinct = np.empty(len(words), np.uint64)
    for c in range(len(starts) - 1):
        k = 0
        for r in range(starts[c], starts[c + 1]):
            if k == 0 or words[r] != distinct[k - 1]:
                distinct[k] = words[r]
                k += 1
        if k < 3:
            continue
        best = 0
        for a in range(k):
            for b in range(a + 1, k):
                d = np.int64(_popcount(distinct[a] ^ distinct[b]))
                if d > best:
                    best = d
        out[c] = best
    return out


@numba.njit(cache=True, nogil=True)
def undirected_csr(i, j, keep, group, n):
    """Adjacency of groups over the kept edges (i, j), both directions: (starts, targets)
    with targets[starts[g]:starts[g + 1]] the groups linked to g. Counting sort: no
    sorted copies of the edges."""
    starts = np.zeros(n + 1, np.int64)
    for e in range(len(i)):
        if keep[e]:
            starts[group[i[e]] + 1] += 1
            starts[group[j[e]] + 1] += 1
    for g in range(n):
        starts[g + 1] += starts[g]
    fill = starts[:-1].copy()
    targets = np.empty(starts[n], np.int64)
    for e in range(len(i)):
        if keep[e]:
            a, b = group[i[e]], group[j[e]]
            targets[fill[a]] = b
            fill[a] += 1
            targets[fill[b]] = a
            fill[b] += 1
    return starts, targets
