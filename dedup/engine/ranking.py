"""The keep policy in phase 2: rows ranked by its criteria (the per-image features are
dedup.signals.keep's), the `hub` criterion's link counts, and why each survivor won."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dedup.core.config import Config, keep_by_field
from dedup.search.pairs import connected_components
from dedup.signals.edges import (
    EXACT,
    FLAT,
    GROUPS_OF,
    LINKS_ONLY,
    PHASH,
    TINY,
    VERIFIED,
    VIEWS,
    Candidates,
    Edges,
)
from dedup.signals.keep import content_bin, quality_name, quality_tier, severity


def criteria(config: Config) -> tuple[str, ...]:
    """The policy's criteria in rank order: keep_by's JSON fields, then keep."""
    return (*config.keep_by, *config.keep)


def because_names(config: Config) -> tuple[str, ...]:
    """What Groups.kept_by indexes: an anchor, the criteria, input order."""
    return ("reference", *criteria(config), "input order")


def link_degree(
    edges: Edges,
    n: int,
    tone: np.ndarray | None = None,
    overlay: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, the rows it links to directly, summed over the signals, and the mean
    distance in bits to those the pHash and the views link (the `hub` criterion: an
    original links to all its copies, each one edit away; a copy is two edits from the
    others); and how far its tone (n, k: typical_features) lies from the median tone of
    the rows linked to it whole frame to whole frame, directly or through others
    (typical_off: the `typical` criterion). Edges come collapsed as the star rule reads
    them (engine.cluster): rows of one key group link to each other at distance 0 and to
    every row of an adjacent group at that edge's distance."""
    degree = np.zeros(n, dtype=np.int64)
    bits = np.zeros(n, dtype=np.int64)  # summed distances of the hashes' links
    hashed = np.zeros(n, dtype=np.int64)  # how many links those are
    for s in np.unique(edges.signal).tolist():
        keys = GROUPS_OF.get(s, s)
        group = np.arange(n, dtype=np.int64)
        star = np.zeros(len(edges.i), dtype=bool)
        if keys not in LINKS_ONLY:
            star = (edges.signal == keys) & (edges.distance == 0)
            group[edges.j[star]] = edges.i[star]
        size = np.bincount(group, minlength=n)
        link = (edges.signal == s) & ~star
        gi, gj = group[edges.i[link]], group[edges.j[link]]
        d = edges.distance[link].astype(np.int64)
        apart = gi != gj
        lo, hi, d = np.minimum(gi, gj)[apart], np.maximum(gi, gj)[apart], d[apart]
        # one link per pair of groups: the shortest
        order = np.lexsort((d, hi, lo))
        lo, hi, d = lo[order], hi[order], d[order]
        first = np.ones(len(lo), dtype=bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        lo, hi, d = lo[first], hi[first], d[first]
        adjacent = np.zeros(n, dtype=np.int64)
        np.add.at(adjacent, lo, size[hi])
        np.add.at(adjacent, hi, size[lo])
        linked = size[group] - 1 + adjacent[group]
        degree += linked
        if s in (PHASH, VIEWS):
            # views edges between distinct vectors carry their distance plus one
            d = d - 1 if s == VIEWS else d
            far = np.zeros(n, dtype=np.int64)
            np.add.at(far, lo, size[hi] * d)
            np.add.at(far, hi, size[lo] * d)
            bits += far[group]
            hashed += linked
    mean = np.where(hashed > 0, bits / np.maximum(hashed, 1), 0.0)
    return degree, mean, typical_off(edges, n, tone, overlay, scale)


def typical_off(
    edges: Edges,
    n: int,
    tone: np.ndarray | None,
    overlay: np.ndarray | None = None,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Per row, how far its tone (n, k) lies from the median tone of its whole-frame
    component (the rows linked to it by EXACT, PHASH, FLAT or TINY, directly or through
    others, and by VIEWS or VERIFIED where either row has overlay evidence: the tone is
    measured inside the picture's box, so a letterboxed, captioned or framed copy has its
    original's; a crop's view link is left out, its tone being another part's), summed
    over the k features, in steps of TONE_STEP; 0 alone or without tones. The last
    feature, the noise, depends on the scale it was measured at (a resize's or a
    thumbnail's draft holds the picture in fewer pixels): with `scale` (content_scale),
    its median is taken over the rows of the component at the row's own scale.
    A median, not the mean of its neighbours: an original links to every copy, so one
    darkened copy pulls the mean of its neighbours away from it, while a noisy copy that
    links to the original alone has the original's tone for that mean; the median of
    the component is the tone most of its rows share. Of an even count, the mean of the
    middle two: two rows lie equally far from it. In thousandths, as integers: one value
    whatever the partitioning (a component is resolved whole)."""
    if tone is None or n == 0:
        return np.zeros(n, dtype=np.int64)
    tone = np.round(np.asarray(tone, dtype=np.float64) * 1000).astype(np.int64)
    whole = np.isin(edges.signal, WHOLE_FRAME)
    if overlay is not None:  # a padded, captioned or framed copy: its picture's tone
        framed = (overlay[edges.i] != 0) | (overlay[edges.j] != 0)
        whole |= np.isin(edges.signal, (VIEWS, VERIFIED)) & framed
    part = connected_components(n, edges.i[whole], edges.j[whole])
    count = np.bincount(part, minlength=n)[part]
    twice = np.zeros(tone.shape, dtype=np.int64)  # twice the component's median
    for c in range(tone.shape[1]):
        twice[:, c] = _twice_median(tone[:, c], part)
    if scale is not None:  # the noise: against the rows measured at its scale
        _, same = np.unique(np.column_stack([part, scale]), axis=0, return_inverse=True)
        twice[:, -1] = _twice_median(tone[:, -1], same.ravel())
    apart = np.abs(2 * tone - twice).sum(axis=1)
    return np.where(count > 1, apart // (2 * TONE_STEP * 1000), 0)


def _twice_median(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per row, twice the median of `values` over the rows of its group (labels 0..n-1)."""
    size = np.bincount(group, minlength=len(values))
    start = np.concatenate([[0], np.cumsum(size)[:-1]])[group]
    count = size[group]
    v = values[np.lexsort((values, group))]
    return v[start + (count - 1) // 2] + v[start + count // 2]


# `hub` compares the mean distance of a row's hash links in steps of HUB_STEP bits: finer
# steps let a bit or two of chance (a noisy or recoloured copy's pHash a little nearer
# the others) decide before `typical` and `noise` are asked. Measured on bench-keep
# (README, "Which copy survives"): exact means 111, 109, 107, 107, 106 of about 120
# groups on draws 0-4; steps of 4 bits 114, 110, 109, 110, 108; no distance at all 113,
# 108, 109, 109, 107 (watermarked copies, farther from the others, win more).
HUB_STEP = 4

# `typical` compares tones (grey level, contrast, chroma, and the noise at NOISE_WEIGHT,
# measured inside the picture's box) in steps of TONE_STEP grey levels from the median
# of the rows linked to it whole frame to whole frame (same bytes, pHash, or its colour
# signature), and by the views where a row has bands (typical_off): a re-encode moves
# them by less than a step, a brightness, contrast, saturation, noise or blur edit by
# more; a crop moves them anyway (another part of the picture), so its links are not
# counted.
TONE_STEP = 2
WHOLE_FRAME = (EXACT, PHASH, FLAT, TINY)
# The noise joins the tone at this weight (one unit of noise counts as 5 grey levels),
# so that a noisy copy (its noise up by 10-25%) and a blurred one (down) lie a step or
# more from the others. Measured (README, "Which copy survives"): without it, `noise`
# keeps a blurred copy over its original in 14 of the edit suite's 104 groups; with
# it, 3, for 2 to 4 points less on bench-keep's noisy copies.
NOISE_WEIGHT = 5.0


def typical_features(cand: Candidates) -> np.ndarray | None:
    """What `typical` compares, per row: grey level, contrast, chroma, and the noise
    times NOISE_WEIGHT (0 where not measured); None without tones."""
    if cand.tone is None:
        return None
    noise = np.zeros(len(cand.tone)) if cand.noise is None else cand.noise.astype(np.float64)
    noise = np.where(np.isfinite(noise), noise, 0.0)
    return np.column_stack([cand.tone.astype(np.float64), np.round(noise * NOISE_WEIGHT, 3)])


def content_pixels(cand: Candidates) -> np.ndarray:
    """Per row, its pixels of picture (all its pixels where not measured)."""
    return (cand.pixels if cand.content is None else cand.content).astype(np.int64)


def content_scale(cand: Candidates) -> np.ndarray:
    """Per row, its content pixels in bins of about 9% (keep.content_bin): the `content`
    criterion's key, and the scale `typical` compares the noise at."""
    return content_bin(content_pixels(cand))


@dataclass
class Ranking:
    """Rows ranked by a keep policy: per criterion, its sort keys (ascending: best first)
    and the value the report shows."""

    names: tuple[str, ...]
    keys: list[list[np.ndarray]]
    values: list[np.ndarray]

    def lexsort(self, first: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """Rows best first: by `first` keys (anchors), the criteria, then input order."""
        flat = [k for ks in self.keys for k in ks]
        return np.lexsort(tuple(reversed([*first, *flat, rows])))


def rank(
    cand: Candidates, config: Config, links: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> Ranking:
    """The keep policy's keys for every candidate row (see the module's criteria)."""
    n = len(cand.pixels)
    pixels, nbytes = cand.pixels.astype(np.int64), cand.nbytes.astype(np.int64)
    overlay = np.zeros(n, np.int8) if cand.overlay is None else cand.overlay
    quality = np.zeros(n, np.int64) if cand.quality is None else cand.quality.astype(np.int64)
    values = cand.keep_values if cand.keep_values is not None else np.zeros((n, 0))
    noise = np.full(n, np.inf, np.float32) if cand.noise is None else cand.noise
    degree, distance, odd = links
    names, keys, shown = [], [], []
    field = 0
    for name in criteria(config):
        if name.startswith("json:"):
            _, descending = keep_by_field(name)
            v = values[:, field] if field < values.shape[1] else np.full(n, np.nan)
            field += 1
            missing = np.isnan(v)
            filled = np.where(missing, 0.0, v)
            k, value = [missing.astype(np.int8), -filled if descending else filled], v
        elif name == "clean":
            k, value = [severity(overlay)], severity(overlay)
        elif name == "content":
            k, value = [-content_scale(cand)], content_pixels(cand)
        elif name == "hub":  # more links, then closer to those the hashes make
            step = np.floor(distance / HUB_STEP).astype(np.int64)
            k, value = [-degree, step], degree + step / 1000  # shown: links, then the step
        elif name == "typical":  # nearer the tone of the rows it links to first
            k, value = [odd], odd
        elif name == "noise":  # less first; unmeasured last
            k, value = [noise], noise
        elif name == "quality":
            k, value = [-quality_tier(quality)], quality
        elif name == "largest":
            k, value = [-pixels, -nbytes], pixels
        else:  # first: rows are in input order (the report names no row: they are local)
            k, value = [np.arange(n, dtype=np.int64)], np.full(n, np.nan)
        names.append(name)
        keys.append(k)
        shown.append(np.asarray(value, dtype=np.float64))
    return Ranking(tuple(names), keys, shown)


def why(
    ranking: Ranking, survivor: np.ndarray, order: np.ndarray, anchor: np.ndarray, ids
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the clusters whose survivors are `ids` (rows): (kept_by, survivor's value,
    runner-up's value, runner-up row): the first criterion on which the survivor beats
    the best removed member of its cluster, as an index into because_names (0: an
    anchor; the last: input order), with both values (NaN when none is compared)."""
    n = len(survivor)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    rows = np.arange(n, dtype=np.int64)
    removed = rows[survivor != rows]
    best = np.full(n, n, dtype=np.int64)  # by survivor: the best removed position
    np.minimum.at(best, survivor[removed], position[removed])
    runner = np.full(len(ids), -1, dtype=np.int64)
    has = best[ids] < n
    runner[has] = order[best[ids][has]]
    kept_by = np.full(len(ids), len(ranking.names) + 1, dtype=np.int8)
    s_value = np.full(len(ids), np.nan)
    r_value = np.full(len(ids), np.nan)
    undecided = has.copy()
    undecided &= ~(anchor[ids] & ~anchor[np.maximum(runner, 0)])
    kept_by[has & ~undecided] = 0
    for c, (keys, value) in enumerate(zip(ranking.keys, ranking.values, strict=True)):
        if not undecided.any():
            break
        at = np.flatnonzero(undecided)
        a, b = ids[at], runner[at]
        differs = np.zeros(len(at), dtype=bool)
        for k in keys:
            differs |= k[a] != k[b]
        decided = at[differs]
        kept_by[decided] = c + 1
        s_value[decided] = value[ids[decided]]
        r_value[decided] = value[runner[decided]]
        undecided[decided] = False
    kept_by[~has] = len(ranking.names) + 1
    return kept_by, s_value, r_value, runner


SEVERITY_NAMES = ("clean", "bars", "caption", "frame")


def describe_value(name: str, value: float) -> str:
    """A criterion's value as the report shows it."""
    if math.isnan(value):
        return "none"
    if name == "clean":
        return SEVERITY_NAMES[int(value)]
    if name in ("content", "largest"):
        return f"{int(value):,} px"
    if name == "hub":
        links = int(value)
        step = round((value - links) * 1000)
        return f"{links} links, {step * HUB_STEP}-{(step + 1) * HUB_STEP} bits away"
    if name == "quality":
        return quality_name(int(value))
    if name == "noise":
        return f"noise {value:.2f}"
    if name == "typical":
        return f"{value * TONE_STEP:g}-{(value + 1) * TONE_STEP:g} grey levels off"
    return f"{value:g}"


def kept_because(groups, config: Config) -> dict[str, list]:
    """clusters.parquet's `kept_by` (the criterion that chose the survivor over the best
    removed member: a criterion's name, `reference` for an anchor, `input order` when
    every criterion ties) and `kept_detail` (both values)."""
    names = because_names(config)
    if groups.kept_by is None:
        return {"kept_by": [None] * len(groups), "kept_detail": [None] * len(groups)}
    by, detail = [], []
    for k, c in enumerate(groups.kept_by.tolist()):
        name = names[c]
        by.append(name)
        if name in ("first", "input order"):
            detail.append("earlier in the input")
        elif 0 < c < len(names) - 1:
            a = describe_value(name, float(groups.kept_value[k]))
            b = describe_value(name, float(groups.runner_value[k]))
            detail.append(f"{a} over {b}")
        else:
            detail.append(None)
    return {"kept_by": by, "kept_detail": detail}
