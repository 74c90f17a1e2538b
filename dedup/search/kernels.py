"""Compiled inner loops (numba): the one place where a per-candidate loop beats numpy's
whole-array steps, which materialize several arrays per candidate pair."""

from __future__ import annotations

import os

import numba
import numpy as np
from numba.core import config as numba_config


def cache_dir() -> str:
    """Where the compiled kernels are kept between runs: NUMBA_CACHE_DIR when set (numba's
    own setting), else $DEDUP_CACHE_DIR/numba, else $XDG_CACHE_HOME/dedup/numba
    (~/.cache/dedup/numba). Outside the installed package, so a reinstall of the same
    version finds them (numba keys them by the source's content); the first run on a
    machine compiles them (seconds). Unwritable, or no home folder to put it in ("" here):
    numba's own places (beside the source), or no cache."""
    if numba_config.CACHE_DIR:
        return numba_config.CACHE_DIR
    root = os.environ.get("DEDUP_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME", "")
        if not os.path.isabs(base):  # unset, or relative: ignored, as the XDG spec says
            base = os.path.join(os.path.expanduser("~"), ".cache")
        if not os.path.isabs(base):  # no home to expand: numba's own places, never the cwd
            return ""
        root = os.path.join(base, "dedup")
    return os.path.join(os.path.abspath(root), "numba")


# numba picks a function's cache folder when the function is decorated: these kernels'
# is set for the decorations below only (other libraries' numba caches are untouched).
_numba_cache_before = numba_config.CACHE_DIR
numba_config.CACHE_DIR = cache_dir()

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


@numba.njit(cache=True, nogil=True)
def band_scan(
    lines, tolerance, flat_share, text_lines, picture_share, lowest, limit, uniform, stroke
):
    """A band along the first lines of `lines` (2-D uint8, the edge first), for
    dedup.signals.keep: (depth, strokes share). A band's lines mostly (flat_share) lie
    within `tolerance` of the edge line's median, with runs of up to `text_lines` other
    lines between such lines, and end at a line mostly unlike it (at most picture_share
    alike); then `depth` is its lines and the share of its pixels (the inner line left
    out) more than `stroke` levels from that colour. Failing that, leading lines of one
    exact colour (their levels spanning at most `uniform`, their median within 4 of the
    edge's) give -depth and no strokes. 0 when neither lies within lowest..limit-1."""
    n, m = lines.shape
    edge = int(np.median(lines[0]))
    depth = 0
    gap = 0
    for k in range(limit):
        near = 0
        for x in range(m):
            if abs(int(lines[k, x]) - edge) <= tolerance:
                near += 1
        if near >= flat_share * m:
            depth = k + 1
            gap = 0
        else:
            gap += 1
            if gap > text_lines or depth == 0:
                break
    next_line = min(depth, n - 1)
    near = 0
    for x in range(m):
        if abs(int(lines[next_line, x]) - edge) <= tolerance:
            near += 1
    if near > picture_share * m or depth < lowest or depth >= limit:
        run = 0
        while run < n:
            lo, hi = 255, 0
            for x in range(m):
                v = int(lines[run, x])
                lo = min(lo, v)
                hi = max(hi, v)
            if hi - lo > uniform or abs(np.median(lines[run]) - edge) > 4:
                break
            run += 1
        if run < lowest or run >= limit:
            return 0, 0.0
        return -run, 0.0
    rows = max(1, depth - 1)
    far = 0
    for k in range(rows):
        for x in range(m):
            if abs(int(lines[k, x]) - edge) > stroke:
                far += 1
    return depth, far / (rows * m)


@numba.njit(cache=True, nogil=True)
def frame_features(
    gray, tolerance, flat_share, text_lines, text_share, picture_share, min_band, max_band,
    uniform, stroke, stroke_share, exact, exact_flat,
):  # fmt: skip
    """The picture inside a frame of a 2-D uint8 image, for dedup.signals.keep: (content
    share, overlay bits: 1 bars, 2 caption, 4 frame, the bands' depths: top, bottom,
    left, right, and whether a band holds strokes; all 0 when none counts). Per side
    (top, bottom, left, right), band_scan on the side's lines (edge first; lowest:
    min_band of the side and 2 lines at least; limit: max_band of it plus one, short of
    the last line; runs of text: text_share of the side, text_lines at least); where
    that finds no band, band_scan
    again with `exact` for the tolerance and `exact_flat` for the flat share, its band
    counted only when it holds strokes (a caption's band of one colour, the picture
    next to it near that colour: a blue band under a dark blue sky). A bar of one
    colour found without a clear edge (a negative depth) counts only opposite another
    band. Strokes in a top or bottom band, none at the sides: a caption; bands on three
    sides or more, one with strokes: a frame; any band: bars. Less than a quarter of a
    side left: no bands (a graphic, not padding)."""
    h, w = gray.shape
    if h < 8 or w < 8:
        return 1.0, 0, 0, 0, 0, 0, False
    depths = np.zeros(4, np.int64)
    strokes = np.zeros(4, np.bool_)
    for s in range(4):
        if s == 0:
            lines = gray.copy()
        elif s == 1:
            lines = gray[::-1].copy()
        elif s == 2:
            lines = gray.T.copy()
        else:
            lines = gray.T[::-1].copy()
        n = lines.shape[0]
        limit = min(int(max_band * n) + 1, n - 1)
        lowest = max(2, int(np.ceil(min_band * n)))
        text = max(text_lines, int(text_share * n))
        d, share = band_scan(
            lines, tolerance, flat_share, text, picture_share, lowest, limit, uniform, stroke
        )
        if d <= 0:  # a band of one exact colour holding strokes, the picture near its tone
            d2, share2 = band_scan(
                lines, exact, exact_flat, text, picture_share, lowest, limit, uniform, stroke
            )
            if d2 > 0 and share2 >= stroke_share:
                d, share = d2, share2
        depths[s] = d
        strokes[s] = d > 0 and share >= stroke_share
    for a in (0, 2):  # opposite sides: top and bottom, left and right
        b = a + 1
        da, db = depths[a], depths[b]
        depths[a] = abs(da) if (da > 0 or (da < 0 and db != 0)) else 0
        depths[b] = abs(db) if (db > 0 or (db < 0 and da != 0)) else 0
    inner_h = h - depths[0] - depths[1]
    inner_w = w - depths[2] - depths[3]
    if inner_h < 0.25 * h or inner_w < 0.25 * w:
        return 1.0, 0, 0, 0, 0, 0, False
    bits = 0
    sides = 0
    for s in range(4):
        if depths[s] > 0:
            sides += 1
    if sides > 0:
        bits |= 1
    if (strokes[0] or strokes[1]) and not (strokes[2] or strokes[3]):
        bits |= 2
    marked = strokes[0] or strokes[1] or strokes[2] or strokes[3]
    if sides >= 3 and marked:
        bits = (bits | 4) & ~2
    share = (inner_h * inner_w) / (h * w)
    return share, bits, depths[0], depths[1], depths[2], depths[3], marked


def warm() -> None:
    """Set up numba's compiler state in this process (about 0.2 s, once a process; each
    kernel then loads from its cache in milliseconds). Done before workers are forked,
    they inherit it rather than each paying for it."""
    chroma_sum(np.zeros((1, 1, 3), np.uint8))


@numba.njit(cache=True, nogil=True)
def chroma_sum(ycbcr):
    """Sum of |Cb - 128| + |Cr - 128| over an (h, w, 3) uint8 YCbCr image, for
    dedup.signals.keep.chroma_of."""
    h, w, _ = ycbcr.shape
    total = 0
    for y in range(h):
        for x in range(w):
            cb = np.int64(ycbcr[y, x, 1]) - 128
            cr = np.int64(ycbcr[y, x, 2]) - 128
            total += (cb if cb >= 0 else -cb) + (cr if cr >= 0 else -cr)
    return total


@numba.njit(cache=True, nogil=True)
def texture_sums(gray):
    """Integer sums over a 2-D uint8 image, for dedup.signals.keep.texture_of: (the
    absolute responses to the 3x3 Laplacian difference mask [[1,-2,1],[-2,4,-2],[1,-2,1]]
    over the inner pixels, the levels, the squared levels)."""
    h, w = gray.shape
    lap = 0
    total = 0
    squares = 0
    for y in range(h):
        for x in range(w):
            v = np.int64(gray[y, x])
            total += v
            squares += v * v
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            r = (
                np.int64(gray[y - 1, x - 1]) + np.int64(gray[y - 1, x + 1])
                + np.int64(gray[y + 1, x - 1]) + np.int64(gray[y + 1, x + 1])
                - 2 * (np.int64(gray[y - 1, x]) + np.int64(gray[y, x - 1])
                       + np.int64(gray[y, x + 1]) + np.int64(gray[y + 1, x]))
                + 4 * np.int64(gray[y, x])
            )  # fmt: skip
            lap += r if r >= 0 else -r
    return lap, total, squares


@numba.njit(cache=True, nogil=True)
def blend_inset(lines, depth, blend_share):
    """A band's depth along `lines` (2-D uint8, the edge first), plus the line where it
    meets the picture when that line blends the two: nearer the edge line's median than
    the next line is, by blend_share (mean absolute differences; the sums are exact)."""
    if depth <= 0 or depth + 1 >= lines.shape[0]:
        return max(depth, 0)
    colour = np.median(lines[0])
    m = lines.shape[1]
    line = 0.0
    inner = 0.0
    for x in range(m):
        line += abs(np.float64(lines[depth, x]) - colour)
        inner += abs(np.float64(lines[depth + 1, x]) - colour)
    return depth + 1 if line / m < blend_share * (inner / m) else depth


@numba.njit(cache=True, nogil=True)
def keep_measure(gray, ycbcr, colour, params):
    """The keep features of a draft in one pass, for dedup.signals.keep.measure:
    frame_features, each band's blend_inset, then texture_sums of the grey levels and
    (`colour`: ycbcr holds the draft's YCbCr planes) chroma_sum inside the picture's box.
    `params` (float64, one array: a call's arguments cost more than its work): tolerance,
    flat_share, text_lines, text_share, picture_share, min_band, max_band, uniform,
    stroke, stroke_share, exact, exact_flat, blend_share, rounds: frame_features runs
    again inside the box it found, up to `rounds` times in all, while it finds bands and
    the box keeps a quarter of each side (the content share is the product of the
    rounds'; the overlay bits their union, a FRAME where the rounds found bands on three
    sides and strokes). Returns (content share, overlay bits, x0, y0, x1, y1, laplacian,
    levels, squares, chroma)."""
    h, w = gray.shape
    blend_share = params[12]
    share, bits = 1.0, 0
    x0, y0, x1, y1 = 0, 0, w, h
    sides = np.zeros(4, np.bool_)
    strokes = False
    for _ in range(np.int64(params[13])):
        inner = gray[y0:y1, x0:x1]
        sh, sw = inner.shape
        found, more, top, bottom, left, right, marked = frame_features(
            inner, np.int64(params[0]), params[1], np.int64(params[2]), params[3], params[4],
            params[5], params[6], np.int64(params[7]), np.int64(params[8]), params[9],
            np.int64(params[10]), params[11],
        )  # fmt: skip
        if more == 0:
            break
        nx0 = blend_inset(inner.T, left, blend_share)
        ny0 = blend_inset(inner, top, blend_share)
        nx1 = sw - blend_inset(inner.T[::-1], right, blend_share)
        ny1 = sh - blend_inset(inner[::-1], bottom, blend_share)
        if bits != 0 and (nx1 - nx0 < 0.25 * w or ny1 - ny0 < 0.25 * h):
            break  # what is left is a quarter of a side: a graphic, not a frame
        sides[0] |= top > 0
        sides[1] |= bottom > 0
        sides[2] |= left > 0
        sides[3] |= right > 0
        share *= found
        bits |= more
        strokes |= marked
        x0, y0, x1, y1 = x0 + nx0, y0 + ny0, x0 + nx1, y0 + ny1
    if sides.sum() >= 3 and strokes:  # bands on three sides over the rounds, strokes
        bits = (bits | 4) & ~2
    lap, total, squares = texture_sums(gray[y0:y1, x0:x1])
    chroma = chroma_sum(ycbcr[y0:y1, x0:x1]) if colour else 0
    return share, bits, x0, y0, x1, y1, lap, total, squares, chroma


@numba.njit(cache=True, nogil=True, inline="always")
def _clip8(ss):
    v = ss >> 22
    return 0 if v < 0 else (255 if v > 255 else v)


@numba.njit(cache=True, nogil=True)
def _horizontal(src, first, rows, hb, hk):
    # the vertical pass over the transposed rows: its inner loop runs along memory
    turned = np.ascontiguousarray(src[first : first + rows].T)
    return np.ascontiguousarray(_vertical(turned, 0, hb, hk).T)


@numba.njit(cache=True, nogil=True)
def _vertical(src, shift, vb, vk):
    width = src.shape[1]
    out = np.empty((vb.shape[0], width), np.uint8)
    acc = np.empty(width, np.int32)
    for yy in range(vb.shape[0]):
        lo = vb[yy, 0] - shift
        acc[:] = 1 << 21
        for y in range(vb[yy, 1]):
            k = vk[yy, y]
            line = src[y + lo]
            for xx in range(width):  # the sums are exact integers: any order gives them
                acc[xx] += np.int32(line[xx]) * k
        for xx in range(width):
            out[yy, xx] = _clip8(acc[xx])
    return out


@numba.njit(cache=True, nogil=True)
def resample_grey(src, hb, hk, vb, vk, need_h, need_v, horizontal_first):
    """Pillow's two-pass 8-bit resampling (ImagingResampleInner) of an (H, W) uint8
    image, given each pass's bounds (first source pixel, count) and 22-bit fixed-point
    weights per output pixel, as dedup.signals.resample computes them. Horizontal first:
    over the rows the vertical pass reads only; else the vertical pass over every
    column first. Each sum is rounded and clipped as Pillow's clip8 does."""
    if horizontal_first:
        first = vb[0, 0]
        out = src
        if need_h:
            last = vb[vb.shape[0] - 1, 0] + vb[vb.shape[0] - 1, 1]
            out = _horizontal(src, first, last - first, hb, hk)
        if need_v:
            out = _vertical(out, first if need_h else 0, vb, vk)
    else:
        out = src
        if need_v:
            out = _vertical(src, 0, vb, vk)
        if need_h:
            out = _horizontal(out, 0, out.shape[0], hb, hk)
    return out.copy() if not (need_h or need_v) else out


@numba.njit(cache=True, nogil=True)
def _uniform_run(lo, hi, tolerance, reverse):
    """Leading lines (from the end when `reverse`) whose pixels all lie within
    `tolerance` of the middle of the first line's range (itself no wider than twice it)."""
    n = lo.shape[0]
    first = n - 1 if reverse else 0
    if np.int64(hi[first]) - np.int64(lo[first]) > 2 * tolerance:
        return 0
    ref = (np.int64(lo[first]) + np.int64(hi[first])) // 2
    for k in range(n):
        at = n - 1 - k if reverse else k
        if not (lo[at] >= ref - tolerance and hi[at] <= ref + tolerance):
            return k
    return n


@numba.njit(cache=True, nogil=True)
def border_runs(gray, tolerance):
    """(top, bottom, left, right): the uniform lines on each side of an (h, w) uint8
    image, for dedup.signals.views.content_box (one pass for the four sides' minima and
    maxima instead of four numpy reductions and their temporaries)."""
    h, w = gray.shape
    row_lo = np.empty(h, np.uint8)
    row_hi = np.empty(h, np.uint8)
    col_lo = np.full(w, 255, np.uint8)
    col_hi = np.zeros(w, np.uint8)
    for y in range(h):
        lo = np.uint8(255)
        hi = np.uint8(0)
        for x in range(w):
            v = gray[y, x]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            if v < col_lo[x]:
                col_lo[x] = v
            if v > col_hi[x]:
                col_hi[x] = v
        row_lo[y] = lo
        row_hi[y] = hi
    return (
        _uniform_run(row_lo, row_hi, tolerance, False),
        _uniform_run(row_lo, row_hi, tolerance, True),
        _uniform_run(col_lo, col_hi, tolerance, False),
        _uniform_run(col_lo, col_hi, tolerance, True),
    )


numba_config.CACHE_DIR = _numba_cache_before
