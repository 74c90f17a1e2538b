"""Phase 2's vocabulary and pair rules: the decisions and edge signals, the candidate
rows, and each signal's edges between them (in memory, for a group of rows)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dedup import signals
from dedup.core.config import Config
from dedup.search.pairs import cosine_pairs, hamming_pairs, maxabs_pairs, rms_pairs, unique_codes
from dedup.signals.exact import exact_groups
from dedup.signals.phash import (
    SIGNATURE_TOLERANCE,
    TINY_RGB_RMS,
    TINY_RMS,
    is_low_detail,
    is_tiny,
    signature_luma,
)
from dedup.signals.views import view_pairs, views_linked

NO_DISTANCE = -1
# What happened to a candidate row; Clusters.reason holds indices into this.
# The built-ins' codes never change; a plugin's link follows them (dedup.signals).
PLUGIN_LINKS = tuple(s.name for s in signals.plugins())
DECISIONS = (
    "unique",
    "survivor",
    "exact",
    "phash",
    "clip",
    "flat",
    "tiny",
    "views",
    "verified",
    "reference",
    "blocklist",
    *PLUGIN_LINKS,
)
UNIQUE, SURVIVOR, EXACT_COPY, PHASH_COPY, CLIP_COPY, FLAT_COPY, TINY_COPY = range(7)
VIEWS_COPY, VERIFIED_COPY, REFERENCE_COPY, BLOCKLISTED = 7, 8, 9, 10
# Anchors: rows that are never removed by a copy of theirs and claim their copies first
# (see star_survivors): items of a reference set (--against), and samples a blocklist
# names. Candidates.anchor holds these codes; a row they claim is removed for that reason.
NOT_ANCHOR, REFERENCE, BLOCKED = 0, 1, 2
# Edge signals as small integers; a cluster's signals are a bit mask of these. `flat`
# and `tiny` are the pHash signal's rules for low-detail and for tiny images: their
# colour signatures match.
# `views` and `verified` are the views signal's two tiers: its hashes alone, and its grey
# zone confirmed by local features (dedup/engine/verify.py).
SIGNALS = ("exact", "phash", "clip", "flat", "tiny", "views", "verified", *PLUGIN_LINKS)
EXACT, PHASH, CLIP, FLAT, TINY, VIEWS, VERIFIED = range(7)
# Which signal names a removal when several link a pair: exact, then phash, flat or
# tiny (a pair is linked by one of the three at most), then views, verified, clip, then
# the plugins' in registry order. Indexed by signal.
PRECEDENCE = np.array([0, 1, 6, 2, 3, 4, 5, *range(7, len(SIGNALS))], dtype=np.int8)
# The decision each precedence rank names.
RANK_DECISION = np.array(
    [
        EXACT_COPY,
        PHASH_COPY,
        FLAT_COPY,
        TINY_COPY,
        VIEWS_COPY,
        VERIFIED_COPY,
        CLIP_COPY,
        *(DECISIONS.index(name) for name in PLUGIN_LINKS),
    ],
    dtype=np.int8,
)
# Signals whose distance-0 edges are not "equal keys": their edges link rows as they are.
# A views edge between different code vectors has distance bits + 1 and one between equal
# vectors 0, so the views signal collapses equal vectors like the pHash does.
LINKS_ONLY = (CLIP,)
# A signal whose edges join the groups of another's equal keys: a verified pair was
# checked between the first rows of two groups of equal view codes, and holds for every
# row of both groups (an exact re-upload of a checked image is the same picture).
GROUPS_OF = {VERIFIED: VIEWS}


@dataclass
class Candidates:
    """Global, input-ordered columns of the rows that took part (decoded images)."""

    pixels: np.ndarray  # int64 (N,)
    nbytes: np.ndarray  # int64 (N,)
    digest: np.ndarray  # uint8 (N, 32) image-byte digests
    phash: np.ndarray | None  # uint8 (N, 8), or None when the signal is off
    clip: np.ndarray | None = None  # float16 (N, dim) unit vectors, or None
    # The pHash's confident bits (int16 (N,)) and colour signatures (uint8 (N, 48)); with
    # both, low-detail rows are matched by signature instead of by pHash.
    detail: np.ndarray | None = None
    signature: np.ndarray | None = None
    views: np.ndarray | None = None  # uint8 (N, VIEW_BYTES), or None when the signal is off
    anchor: np.ndarray | None = None  # int8 (N,): NOT_ANCHOR, REFERENCE or BLOCKED
    # The keep policy's features (dedup.signals.keep; None: not read, every row alike):
    content: np.ndarray | None = None  # int64 (N,) pixels of picture
    overlay: np.ndarray | None = None  # int8 (N,) overlay evidence bits
    quality: np.ndarray | None = None  # int16 (N,) LOSSLESS, a JPEG quality, or unknown
    noise: np.ndarray | None = None  # float32 (N,) fine noise (inf: not measured)
    tone: np.ndarray | None = None  # float32 (N, 3) grey level, contrast and chroma
    keep_values: np.ndarray | None = None  # float64 (N, F) keep_by's values, NaN: none
    # A `codes` plugin's 64-bit codes (uint8 (N, 8)) by signal name, the plugins turned on
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    # Shape codes (uint8 (N,), dedup.signals.phash.shape_code): low-detail rows of other
    # shapes never link by the flat rule. None: shape unknown, every row alike.
    shape: np.ndarray | None = None

    def anchors(self) -> np.ndarray:
        """The anchor code of each row (NOT_ANCHOR for all when none is given)."""
        if self.anchor is None:
            return np.zeros(len(self.pixels), dtype=np.int8)
        return self.anchor

    def take(self, rows: np.ndarray) -> Candidates:
        """The candidates at `rows`, in that order."""
        out = Candidates(
            *(
                None if value is None else value[rows]
                for value in (
                    self.pixels,
                    self.nbytes,
                    self.digest,
                    self.phash,
                    self.clip,
                    self.detail,
                    self.signature,
                    self.views,
                    self.anchor,
                )
            )
        )
        for name in ("content", "overlay", "quality", "noise", "tone", "keep_values", "shape"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value[rows])
        out.codes = {name: codes[rows] for name, codes in self.codes.items()}
        return out

    def low_detail(self) -> np.ndarray:
        """Rows matched by colour signature instead of pHash bits: low-detail images (their
        pHash is mostly noise) and tiny ones; none when detail is not known."""
        return self.flat() | self.tiny()

    def flat(self) -> np.ndarray:
        """Low-detail rows (the flat rule's); none when detail is not known."""
        if self.detail is None or self.signature is None:
            return np.zeros(len(self.pixels), dtype=bool)
        return is_low_detail(self.detail)

    def tiny(self) -> np.ndarray:
        """Tiny rows (the tiny rule's); none when signatures are not known."""
        if self.detail is None or self.signature is None:
            return np.zeros(len(self.pixels), dtype=bool)
        return is_tiny(self.pixels)


@dataclass
class Edges:
    """Undirected links between candidate rows; `signal` says what linked them."""

    i: np.ndarray
    j: np.ndarray
    distance: np.ndarray
    signal: np.ndarray  # int8 index into SIGNALS

    @staticmethod
    def of(i, j, distance, signal: int) -> Edges:
        i = np.asarray(i, dtype=np.int64)
        return Edges(
            i,
            np.asarray(j, dtype=np.int64),
            np.asarray(distance, dtype=np.int32),
            np.full(len(i), signal, dtype=np.int8),
        )

    @staticmethod
    def concat(parts: list[Edges]) -> Edges:
        if not parts:
            return Edges.of([], [], [], 0)
        return Edges(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("i", "j", "distance", "signal")
            )
        )

    # row to its survivor directly (UNIQUE for the others); the reason names a reference


def exact_edges(digests: np.ndarray) -> Edges:
    """Each row with the same image bytes as an earlier row links to the first such row."""
    first, rows = exact_groups(digests)
    return Edges.of(first, rows, np.zeros(len(rows)), EXACT)


def phash_edges(
    codes: np.ndarray,
    threshold: int,
    workers: int = 1,
    rows: np.ndarray | None = None,
    signal: int = PHASH,
) -> Edges:
    """Rows within `threshold` bits: equal codes link to one representative row, and
    representatives of distinct codes link when their codes are close enough. With
    `rows`, only those rows take part. `signal`: whose codes they are (a `codes`
    plugin's, searched the same way)."""
    return _collapsed_edges(
        codes, rows, lambda unique: hamming_pairs(unique, threshold, workers=workers), signal
    )


def flat_edges(
    signatures: np.ndarray, rows: np.ndarray, tiny: np.ndarray, shape: np.ndarray | None = None
) -> Edges:
    """Low-detail `rows` whose colour signatures differ by at most SIGNATURE_TOLERANCE
    in every value, and whose shape codes (`shape`, aligned with `signatures`; None: one
    shape) do too (signal `flat`; the distance is the largest difference), except pairs
    of two tiny images (`tiny`, aligned with `rows`), which the tiny rule decides. The
    shape and the tiny flag are part of the key, so that equal signatures of tiny and
    other images are not collapsed into one group whose links the exception would then
    cut, nor equal colours of other shapes into one group."""
    width = signatures.shape[1]
    keys = np.zeros((len(signatures), width + 2), dtype=np.uint8)
    keys[rows, :width] = signatures[rows]
    keys[rows, width] = 128 if shape is None else shape[rows]
    keys[rows, -1] = tiny
    e = _collapsed_edges(keys, rows, lambda unique: _flat_pairs(unique), FLAT)
    if not len(e.i) or not tiny.any():
        return e
    order = np.argsort(rows, kind="stable")

    def tiny_at(r: np.ndarray) -> np.ndarray:
        return tiny[order[np.searchsorted(rows[order], r)]]

    other = ~(tiny_at(e.i) & tiny_at(e.j))
    return Edges(e.i[other], e.j[other], e.distance[other], e.signal[other])


def _flat_pairs(keys: np.ndarray):
    """maxabs pairs of signatures and shape codes, the last column (the tiny flag) left
    out of the distance but kept apart: an equal signature of a tiny and another image
    is 1."""
    i, j, d = maxabs_pairs(keys[:, :-1], SIGNATURE_TOLERANCE)
    return i, j, np.maximum(d, (keys[i, -1] != keys[j, -1]).astype(np.int32))


def tiny_edges(signatures: np.ndarray, rows: np.ndarray) -> Edges:
    """Tiny `rows` whose signatures' luminance differs by at most TINY_RMS and whose
    colours differ by at most TINY_RGB_RMS, root mean square (signal `tiny`; the
    distance is the luminance difference, at least 1 between distinct signatures)."""
    return _collapsed_edges(signatures, rows, _tiny_pairs, TINY)


def _tiny_pairs(unique: np.ndarray):
    i, j, d = rms_pairs(signature_luma(unique), TINY_RMS)
    keep = _within_rms(unique[i], unique[j], TINY_RGB_RMS)
    return i[keep], j[keep], d[keep]


def tiny_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether aligned tiny signatures match by the tiny rule."""
    return _within_rms(signature_luma(a), signature_luma(b), TINY_RMS) & _within_rms(
        a, b, TINY_RGB_RMS
    )


def _within_rms(a: np.ndarray, b: np.ndarray, rms: float) -> np.ndarray:
    """Row by row, whether two uint8 arrays differ by at most `rms`, root mean square
    (in integers: the sum of squares against the largest one allowed)."""
    squares = ((a.astype(np.int64) - b.astype(np.int64)) ** 2).sum(axis=1)
    return squares <= int(np.floor(a.shape[1] * rms * rms))


def _collapsed_edges(keys: np.ndarray, rows: np.ndarray | None, search, signal: int) -> Edges:
    """Edges over distinct keys: rows with equal keys link to the first of them (input
    order); `search(unique keys)` gives (a, b, distance) pairs of distinct keys, which
    link through those first rows. `rows` (sorted) limits the rows that take part."""
    if rows is None:
        rows = np.arange(len(keys), dtype=np.int64)
    if len(rows) < 2:
        return Edges.concat([])
    unique, inverse = unique_codes(keys[rows])
    rep = np.full(len(unique), -1, dtype=np.int64)
    order_desc = np.arange(len(rows) - 1, -1, -1)
    rep[inverse[order_desc]] = order_desc
    same = np.flatnonzero(rep[inverse] != np.arange(len(rows)))
    a, b, d = search(unique)
    return Edges.concat(
        [
            Edges.of(rows[rep[inverse[same]]], rows[same], np.zeros(len(same)), signal),
            Edges.of(rows[rep[a]], rows[rep[b]], d, signal),
        ]
    )


def views_edges(
    vectors: np.ndarray, plain: int, transformed: int, rows: np.ndarray | None = None
) -> Edges:
    """Rows whose view codes match by the hashes alone: the two full frames within `plain`
    bits, a trimmed frame, crop or mirror within `transformed` (signals/views.py, KIND).
    Equal code vectors link to their first row at distance 0; rows of distinct vectors
    link at their distance plus one, so that only equal vectors are collapsed by the star
    rule. With `rows`, only those rows take part."""

    def search(unique: np.ndarray):
        found = view_pairs(unique, plain, transformed)
        return found.i, found.j, found.distance + 1

    return _collapsed_edges(vectors, rows, search, VIEWS)


def clip_edges(vectors: np.ndarray, threshold: float, index: str, device: str) -> Edges:
    """Rows whose embeddings have cosine similarity at least `threshold`."""
    a, b, sim = cosine_pairs(vectors, threshold, engine=index, device=device)
    # Edge distances are integers; a similarity is kept as 1 - cosine in millionths.
    return Edges.of(a, b, np.round((1.0 - sim) * 1e6), CLIP)


def build_edges(cand: Candidates, config: Config) -> Edges:
    """Edges from every enabled signal (each signal's in-memory search: dedup.signals)."""
    parts = []
    for s in signals.enabled(config):
        if s.search == "codes":
            parts += code_signal_edges(cand, config, s.name)
        else:
            parts += s.find_pairs()(cand, config)
    return Edges.concat(parts)


def signal_code(name: str) -> int:
    """A link name's code (an index into SIGNALS)."""
    return SIGNALS.index(name)


def code_threshold(name: str, config: Config) -> int:
    """A `codes` signal's largest distance in bits at this config."""
    return int(signals.REGISTRY[name].threshold(config))


def code_signal_edges(cand: Candidates, config: Config, name: str) -> list[Edges]:
    """A `codes` plugin's links: rows whose codes are within its threshold; equal codes
    link to their first row, as the pHash's do."""
    codes = cand.codes.get(name)
    if codes is None:
        return []
    t = code_threshold(name, config)
    return [phash_edges(codes, t, config.worker_count, None, signal_code(name))]


def exact_signal_edges(cand: Candidates, config: Config) -> list[Edges]:
    """The exact signal's links: equal image bytes."""
    return [exact_edges(cand.digest)]


def phash_signal_edges(cand: Candidates, config: Config) -> list[Edges]:
    """The pHash signal's links: close codes between detailed rows, and the flat and tiny
    rules' colour signatures."""
    if cand.phash is None:
        return []
    low = cand.low_detail()
    detailed = np.flatnonzero(~low) if low.any() else None
    parts = [phash_edges(cand.phash, config.phash_threshold, config.worker_count, detailed)]
    flat, tiny = cand.flat(), cand.tiny()
    if flat.any():
        rows = np.flatnonzero(flat)
        parts.append(flat_edges(cand.signature, rows, tiny[rows], cand.shape))
    if tiny.any():
        parts.append(tiny_edges(cand.signature, np.flatnonzero(tiny)))
    return parts


def views_signal_edges(cand: Candidates, config: Config) -> list[Edges]:
    """The views signal's links by its hashes (detailed rows only); its verified tier
    needs the images and runs in the global phase only."""
    if cand.views is None:
        return []
    low = cand.low_detail()
    detailed = np.flatnonzero(~low) if low.any() else None
    c = config
    return [views_edges(cand.views, c.phash_threshold, c.views_threshold, detailed)]


def clip_signal_edges(cand: Candidates, config: Config) -> list[Edges]:
    """The CLIP signal's links: cosine similarity at least the threshold."""
    if cand.clip is None:
        return []
    return [clip_edges(cand.clip, config.clip_threshold, config.clip_index, config.device)]


def direct_links(
    rows: np.ndarray,
    others: np.ndarray,
    cand: Candidates,
    config: Config,
    edges: Edges | None = None,
) -> np.ndarray:
    """For each pair, the first signal (exact, phash, flat or tiny, views, verified, clip)
    that links rows[k] to others[k] directly, as a DECISIONS code; UNIQUE where none does.
    pHash and views link two detailed rows only, flat two low-detail rows only; verified
    links are read from `edges` (their check cannot be redone from features)."""
    out = np.full(len(rows), UNIQUE, dtype=np.int8)
    if len(rows) == 0:
        return out
    links = pair_links(rows, others, cand, config)
    if edges is not None and (edges.signal == VERIFIED).any():
        # checked between the first rows of groups of equal view codes (GROUPS_OF)
        n = int(max(edges.i.max(), edges.j.max(), rows.max(), others.max())) + 1
        first = np.arange(n)
        equal = (edges.signal == VIEWS) & (edges.distance == 0)
        first[edges.j[equal]] = edges.i[equal]
        links["verified"] = linked(edges, first[rows], first[others], VERIFIED)
    # later ones win: the order is the precedence, last first
    for name in reversed(PLUGIN_LINKS):
        if name in links:
            out[links[name]] = DECISIONS.index(name)
    for name, code in (
        ("clip", CLIP_COPY),
        ("verified", VERIFIED_COPY),
        ("views", VIEWS_COPY),
        ("phash", PHASH_COPY),
        ("flat", FLAT_COPY),
        ("tiny", TINY_COPY),
        ("exact", EXACT_COPY),
    ):
        if name in links:
            out[links[name]] = code
    return out


def pair_links(
    rows: np.ndarray, others: np.ndarray, cand: Candidates, config: Config
) -> dict[str, np.ndarray]:
    """Per signal rule computable from features, whether it links rows[k] and others[k]
    at the config's thresholds: exact, phash, flat, tiny (the pHash signal's rules for
    detailed, low-detail and tiny images), views (its hashes), clip."""
    out: dict[str, np.ndarray] = {}
    for name, codes in cand.codes.items():
        if name in config.signal_names:
            words = codes.view(">u8").reshape(-1)
            distance = np.bitwise_count(words[rows] ^ words[others])
            out[name] = distance <= code_threshold(name, config)
    if "clip" in config.signal_names and cand.clip is not None:
        out["clip"] = cosine_of_rows(cand.clip, rows, others) >= np.float32(config.clip_threshold)
    if "views" in config.signal_names and cand.views is not None:
        low = cand.low_detail()
        c = config
        close = views_linked(
            cand.views[rows], cand.views[others], c.phash_threshold, c.views_threshold
        )
        out["views"] = close & ~low[rows] & ~low[others]
    if "phash" in config.signal_names and cand.phash is not None:
        low = cand.low_detail()
        words = cand.phash.view(">u8").reshape(-1)
        close = np.bitwise_count(words[rows] ^ words[others]) <= config.phash_threshold
        out["phash"] = close & ~low[rows] & ~low[others]
        flat, tiny = cand.flat(), cand.tiny()
        both_tiny = tiny[rows] & tiny[others]
        out["flat"] = np.zeros(len(rows), dtype=bool)
        out["tiny"] = np.zeros(len(rows), dtype=bool)
        both_flat = np.flatnonzero(flat[rows] & flat[others] & ~both_tiny)
        if len(both_flat):
            a = cand.signature[rows[both_flat]].astype(np.int16)
            b = cand.signature[others[both_flat]].astype(np.int16)
            close = np.abs(a - b).max(axis=1) <= SIGNATURE_TOLERANCE
            if cand.shape is not None:
                sa = cand.shape[rows[both_flat]].astype(np.int16)
                close &= np.abs(sa - cand.shape[others[both_flat]]) <= SIGNATURE_TOLERANCE
            out["flat"][both_flat[close]] = True
        both_tiny = np.flatnonzero(both_tiny)
        if len(both_tiny):
            a, b = cand.signature[rows[both_tiny]], cand.signature[others[both_tiny]]
            out["tiny"][both_tiny[tiny_match(a, b)]] = True
    if "exact" in config.signal_names:
        out["exact"] = (cand.digest[rows] == cand.digest[others]).all(axis=1)
    return out


def linked(
    edges: Edges, rows: np.ndarray, others: np.ndarray, signal: int | None = None
) -> np.ndarray:
    """Whether an edge (of `signal`, or of any) joins rows[k] and others[k], either way
    round."""
    of = edges.signal == signal if signal is not None else np.ones(len(edges.i), dtype=bool)
    if not len(rows):
        return np.zeros(0, dtype=bool)
    n = int(max(edges.i.max(initial=0), edges.j.max(initial=0), rows.max(), others.max())) + 1
    keys = np.minimum(edges.i[of], edges.j[of]) * n + np.maximum(edges.i[of], edges.j[of])
    wanted = np.minimum(rows, others) * n + np.maximum(rows, others)
    return np.isin(wanted, keys)


def cosine_of_rows(vectors: np.ndarray, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), 65536):
        a = vectors[rows[start : start + 65536]].astype(np.float32)
        b = vectors[others[start : start + 65536]].astype(np.float32)
        out[start : start + 65536] = np.einsum("ij,ij->i", a, b)
    return out
