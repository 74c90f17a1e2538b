"""Planted copies measured through a run's own phases: the edits planted as scratch
shards by the executor's tasks, read by the extract phase, judged by each signal's
rule and the verification tier. Shared by `dedup calibrate` and a run's --canaries."""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dedup.core.config import Config
from dedup.core.errors import ShardError
from dedup.core.progress import Progress
from dedup.engine.edits import EDITS, apply
from dedup.engine.extract import STATUS_OK, ShardFeatures
from dedup.engine.featurestore import image_ranges, read_features
from dedup.engine.grey import PairCheck, pair_items
from dedup.engine.job import Job
from dedup.engine.plan import work_folder
from dedup.engine.reading import extract_all
from dedup.engine.records import members_candidates, plugin_codes, read_members, vectors_of
from dedup.engine.rows import starts_of
from dedup.io import storage
from dedup.io.decode import decode_image, image_member, is_image_name, read_header
from dedup.io.fsutil import atomic_path
from dedup.io.outdir import (
    CANARIES_DIR,
    STATE_DIR,
)
from dedup.io.shards import Shard, display_name, iter_samples, read_ranges_of
from dedup.signals.edges import Candidates, pair_links
from dedup.signals.views import KIND, MIRRORED, NEVER, PLAIN, code_words, grey_zone

log = logging.getLogger("dedup")


PER_SHARD = 400  # planted images per scratch shard (a task each)


SCAN = 4  # calibrate reads images until SCAN x the sample has been seen (reservoir)


@dataclass
class Sampled:
    """A sampled image: where it came from ("shard key") and its bytes."""

    source: str
    data: bytes


def sample_images(shards: list[Shard], n: int, seed: int, config: Config):
    """A reproducible random sample of n decodable, distinct images (equal bytes count
    once): shards in a seeded order, a reservoir over the images read, until SCAN x n
    were seen or every shard was read.
    Returns (sample, images seen, shards read) for the dataset-size estimate."""
    rng = np.random.default_rng(seed)
    pool: list[Sampled] = []
    held: set[bytes] = set()  # digests in the pool: equal bytes are one picture
    seen = read = 0
    for index in rng.permutation(len(shards)).tolist():
        try:
            for source, data in _images(shards[index], config):
                key = hashlib.blake2b(data, digest_size=16).digest()
                if key in held:
                    continue
                seen += 1
                if len(pool) < n:
                    pool.append(Sampled(source, data))
                    held.add(key)
                    continue
                k = int(rng.integers(seen))
                if k < n:
                    held.discard(hashlib.blake2b(pool[k].data, digest_size=16).digest())
                    pool[k] = Sampled(source, data)
                    held.add(key)
        except ShardError as e:  # a measurement: the rest of a damaged shard is left out
            log.warning("calibrate: left out the rest of %s", e)
        read += 1
        if seen >= SCAN * n:
            break
    return pool, seen, read


def _images(shard: Shard, config: Config):
    """("shard key", image bytes) of a shard's samples whose image's header reads."""
    for sample in iter_samples(shard, Counter(), keep=lambda name: is_image_name(name, config)):
        pos = image_member([m.name for m in sample.members], config)
        if pos is None:
            continue
        data = sample.members[pos].data
        if read_header(data, config).reason is None:
            yield f"{display_name(shard.path)} {display_name(sample.key)}", data


@dataclass
class Planted:
    """Sampled images and their edited copies, written as scratch shards: each original
    row followed by its copies' rows."""

    shards: list[Shard]
    original_rows: np.ndarray  # the row of each original that decoded
    pair_original: np.ndarray  # per copy: its original's row
    pair_copy: np.ndarray  # per copy: its row
    edit_of: list[str]  # per copy: the edit


def _ext(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:4] == b"\x89PNG":
        return "png"
    if data[:4] == b"RIFF":
        return "webp"
    if data[:3] == b"GIF":
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return "tiff"


@dataclass
class _Plant:
    """A planting task: some originals and their copies, edited and written as a shard
    (an original that does not decode is left out, and its copies with it)."""

    config: Config
    folder: str

    def __call__(self, item) -> list[tuple[int, str | None]]:
        number, group = item
        rows: list[tuple[int, str | None]] = []  # (original, edit; None: the original)
        images: list[bytes] = []
        for k, data, copies in group:
            decoded = decode_image(data, self.config).image
            if decoded is None:
                continue
            picture = decoded.convert("RGB")
            rows.append((k, None))
            images.append(data)
            for edit, seed in copies:
                rows.append((k, edit))
                images.append(apply(edit, picture, seed))
        name = f"planted-{number:05d}.tar"
        with (
            atomic_path(storage.join(self.folder, name)) as path,
            tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for row, data in enumerate(images):
                info = tarfile.TarInfo(f"{row:08d}.{_ext(data)}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return rows


def plant(
    originals: list[Sampled],
    copies: list[tuple[int, str, int]],
    folder: str,
    config: Config,
    executor,
) -> Planted:
    """Write the originals and their edited copies as shards under `folder` (a path, or a
    URL every worker can reach), edited in the executor's tasks."""

    wanted: dict[int, list[tuple[str, int]]] = {k: [] for k in range(len(originals))}
    for k, edit, seed in copies:
        wanted[k].append((edit, seed))
    per_task = max(1, PER_SHARD // (1 + max((len(v) for v in wanted.values()), default=0)))
    items = [
        (
            number,
            [
                (k, originals[k].data, wanted[k])
                for k in range(start, min(start + per_task, len(originals)))
            ],
        )
        for number, start in enumerate(range(0, len(originals), per_task))
    ]
    storage.makedirs(folder)
    layouts = executor.map(
        _Plant(config, folder), items, Progress("plant", total_items=len(items)), describe=_describe
    )
    original_rows, pair_original, pair_copy, edit_of = [], [], [], []
    row = 0
    for layout in layouts:
        first = -1
        for _, edit in layout:
            if edit is None:
                first = row
                original_rows.append(row)
            else:
                pair_original.append(first)
                pair_copy.append(row)
                edit_of.append(edit)
            row += 1
    shards = [Shard(storage.join(folder, f"planted-{number:05d}.tar")) for number, _ in items]
    return Planted(
        shards,
        np.asarray(original_rows, dtype=np.int64),
        np.asarray(pair_original, dtype=np.int64),
        np.asarray(pair_copy, dtype=np.int64),
        edit_of,
    )


def _describe(item) -> str:
    return f"planting part {item[0]}"


def candidates(features: list[ShardFeatures], config: Config) -> tuple[Rows, np.ndarray]:
    """Every row's features (zeros where the image did not decode) and shard starts."""

    starts = starts_of(f.rows for f in features)
    dim = 0
    parts, ok = [], []
    for f in features:
        status = read_features(f.path, ["status"]).column("status")
        good = pc.equal(status, STATUS_OK).to_numpy(zero_copy_only=False)
        if "clip" in config.signal_names and good.any():
            dim = max(dim, _dim(f.path))
        ok.append(good)
    views = "views" in config.signal_names
    for pos, f in enumerate(features):
        good = np.flatnonzero(ok[pos])
        records = read_members(
            f.path, int(starts[pos]), good, dim, views, plugin_codes(config), len(config.keep_by)
        )
        full = np.zeros(f.rows, dtype=records.dtype)
        full[good] = records
        full["row"] = np.arange(f.rows) + starts[pos]
        parts.append(full)
    records = np.concatenate(parts) if parts else np.zeros(0)
    return Rows(members_candidates(records, config), np.concatenate(ok)), starts


def _dim(path: str) -> int:

    column = read_features(path, ["status", "clip"])
    good = pc.equal(column.column("status"), STATUS_OK)
    vectors = vectors_of(column.filter(good).column("clip").slice(0, 1))
    return vectors.shape[1] if len(vectors) else 0


def judge_pairs(
    rows: Rows,
    i: np.ndarray,
    j: np.ndarray,
    config: Config,
    grey_bound: int,
    verifier=None,
) -> PairResult:
    """Each signal's verdict on pairs (i[k], j[k]) of rows; `verifier(i, j, mirrored)`
    runs the views' verification tier on grey-zone pairs (None: no verification)."""
    cand = rows.cand
    usable = rows.ok[i] & rows.ok[j]
    links = {name: value & usable for name, value in pair_links(i, j, cand, config).items()}
    if "phash" in links:  # the pHash signal's three rules
        links["phash"] = links["phash"] | links.pop("flat") | links.pop("tiny")
    phash_d = np.full(len(i), -1, dtype=np.int64)
    if cand.phash is not None:
        words = candidate_words(cand)
        low = cand.low_detail()
        detailed = usable & ~low[i] & ~low[j]
        phash_d[detailed] = np.bitwise_count(words[i[detailed]] ^ words[j[detailed]])
    views_d = np.full(len(i), 64, dtype=np.int64)
    if "views" in links:
        low = cand.low_detail()
        detailed = usable & ~low[i] & ~low[j]
        plain, transformed, mirrored = views_distance(cand.views[i], cand.views[j])
        views_d = np.where(detailed, transformed, 64)
        closest = np.minimum(plain, transformed)
        grey = detailed & ~links["views"] & (closest <= grey_bound)
        if config.verify and verifier is not None and grey.any():
            at = np.flatnonzero(grey)
            accepted = verifier(i[at], j[at], mirrored[at])
            links["views"][at[accepted]] = True
    similarity = np.full(len(i), np.nan, dtype=np.float32)
    if "clip" in links:
        similarity[usable] = cosine_of_rows(cand, i[usable], j[usable])
    return PairResult(links, phash_d, views_d, similarity, usable)


def make_verifier(config: Config, sources, inputs, starts, executor=None):
    """The views' verification tier on given pairs, as a run's tasks check them (in the
    executor's tasks, split as the run splits them, when one is given)."""

    check = PairCheck(config, sources, inputs, np.asarray(starts))

    def verify(i: np.ndarray, j: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
        # a mirror relation holds whichever side is mirrored: the check mirrors the second
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        items = pair_items(lo, hi, mirrored)
        if executor is None or len(items) < 2:
            results = [check(item) for item in items]
        else:
            results = executor.map(check, items, Progress("verify", total_items=len(items)))
        return np.concatenate([r[0] for r in results]) if results else np.zeros(0, bool)

    return verify


class Measured(NamedTuple):
    """Planted originals and copies, read by the extract phase, and each pair judged."""

    planted: Planted
    features: list[ShardFeatures]
    starts: np.ndarray
    rows: Rows
    verifier: object
    pairs: PairResult


def measure(
    originals: list[Sampled], copies, folder: str, config: Config, clip, executor, dataset: int
) -> Measured:
    """Plant `copies` of `originals` under `folder`, read them through the run's extract
    phase and executor, and judge every (original, copy) pair, the views' grey zone at
    the bound a dataset of `dataset` images has."""

    planted = plant(originals, copies, folder, config, executor)
    store = storage.join(folder, "features")
    storage.makedirs(store)
    features = [
        f
        for f in extract_all(planted.shards, config, store, False, clip, executor)
        if isinstance(f, ShardFeatures)
    ]
    rows, starts = candidates(features, config)
    sources = [(f.path, int(starts[k])) for k, f in enumerate(features)]
    verifier = make_verifier(config, sources, planted.shards, starts, executor)
    grey = grey_zone(config, dataset)
    pairs = judge_pairs(rows, planted.pair_original, planted.pair_copy, config, grey, verifier)
    return Measured(planted, features, starts, rows, verifier, pairs)


def upper95(events: int, trials: int) -> float:
    """Clopper-Pearson one-sided 95% upper bound of a rate."""
    if trials == 0:
        return 1.0
    if events >= trials:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(0.95, events + 1, trials - events))


def recall_table(result: PairResult, edit_of: list[str], signals: list[str]) -> dict:
    """Per edit: copies, and the share each signal (and any) links to its original."""
    table = {}
    edits = np.array(edit_of, dtype=object)
    any_link = np.zeros(len(edits), dtype=bool)
    for name in signals:
        any_link |= result.links.get(name, np.zeros(len(edits), bool))
    for edit in sorted(set(edit_of), key=edit_order):
        at = (edits == edit) & result.usable
        n = int(at.sum())
        row = {"copies": n, "any": share_of(any_link[at])}
        for name in signals:
            row[name] = share_of(result.links[name][at]) if name in result.links else None
        table[edit] = row
    return table


def run_canaries(
    features: list[ShardFeatures], config: Config, clip, executor, folder: str
) -> dict:
    """`--canaries N`: N sampled images of the run (seeded), each planted as an edited copy
    (the edits in turn) in scratch shards with its original, read by the run's extract
    phase; which signals link each copy to its original, per edit. Nothing planted is
    written to OUT or takes part in the run's decisions."""

    rng = np.random.default_rng(config.seed)
    ok = [
        pc.equal(read_features(f.path, ["status"]).column("status"), STATUS_OK).to_numpy(
            zero_copy_only=False
        )
        for f in features
    ]
    usable = [np.flatnonzero(good) for good in ok]
    ends = np.cumsum([len(u) for u in usable])
    total = int(ends[-1]) if len(ends) else 0
    count = min(config.canaries, total)
    if not count:
        return {"planted": 0}
    pick = np.sort(rng.choice(total, count, replace=False))  # among usable rows, in order
    shard_of = np.searchsorted(ends, pick, side="right")
    starts = np.concatenate([[0], ends[:-1]])
    chosen = [
        (int(pos), int(usable[pos][k - starts[pos]]))
        for pos, k in zip(shard_of.tolist(), pick.tolist(), strict=True)
    ]
    originals: list[Sampled] = []
    for pos in sorted({p for p, _ in chosen}):
        local = [r for p, r in chosen if p == pos]
        f = features[pos]
        keys = read_features(f.path, ["key"]).column("key").take(pa.array(local)).to_pylist()
        for key, data in zip(keys, image_bytes(f.path, f.shard, local), strict=True):
            originals.append(Sampled(f"{display_name(f.shard.path)} {key}", data))
    names = list(EDITS)
    copies = [
        (k, names[k % len(names)], config.seed * 1_000_003 + k) for k in range(len(originals))
    ]
    dataset = int(sum(len(g) for g in ok))
    measured = measure(originals, copies, folder, config, clip, executor, dataset)
    planted, pairs = measured.planted, measured.pairs
    signals = [s for s in LINKS if s in config.signal_names]
    table = recall_table(pairs, planted.edit_of, signals)
    any_link = np.zeros(len(planted.pair_copy), dtype=bool)
    for name in signals:
        any_link |= pairs.links.get(name, any_link & False)
    return {
        "planted": int(pairs.usable.sum()),
        "seed": config.seed,
        "caught": int((any_link & pairs.usable).sum()),
        "recall": share_of(any_link[pairs.usable]),
        "recall_by_signal": {
            s: share_of(pairs.links[s][pairs.usable]) for s in signals if s in pairs.links
        },
        "by_edit": table,
    }


def canary_phase(features: list[ShardFeatures], job: Job) -> dict | None:
    """--canaries N: the run's own recall per signal and edit, on N planted copies of its
    samples (in OUT/.dedup/canaries while measured; never written to OUT, never part of
    a decision); None without canaries."""
    if not job.config.canaries:
        return None

    t = time.monotonic()
    folder = storage.join(storage.join(job.out, STATE_DIR), CANARIES_DIR)
    with work_folder(folder):
        result = run_canaries(features, job.config, job.clip, job.executor, folder)
    log.info(
        "canaries: %d planted, %d caught (%s), in %.1f s",
        result["planted"],
        result.get("caught", 0),
        "none" if result.get("recall") is None else f"{100 * result['recall']:.0f}%",
        time.monotonic() - t,
    )
    return result


LINKS = ("exact", "phash", "views", "clip")  # the signals a table reports, in this order


@dataclass
class Rows:
    """Member records of some rows, as Candidates, and which rows decoded."""

    cand: Candidates
    ok: np.ndarray  # bool per row


def views_distance(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per aligned pair of view-code rows: the full frames' distance, the smallest distance
    of a trimmed frame, crop or mirror against a whole frame, and whether the closest
    combination of all is a mirror (as the grey zone's check is run)."""
    wa, wb = code_words(a), code_words(b)
    plain = np.full(len(wa), 64, dtype=np.int64)
    transformed = np.full(len(wa), 64, dtype=np.int64)
    best = np.full(len(wa), 65, dtype=np.int64)
    mirrored = np.zeros(len(wa), dtype=bool)
    for va, vb in zip(*np.nonzero(KIND != NEVER), strict=True):
        d = np.bitwise_count(wa[:, va] ^ wb[:, vb]).astype(np.int64)
        if KIND[va, vb] == PLAIN:
            plain = np.minimum(plain, d)
        else:
            transformed = np.minimum(transformed, d)
        closer = d < best
        best[closer] = d[closer]
        mirrored[closer] = MIRRORED[va] != MIRRORED[vb]
    return plain, transformed, mirrored


def cosine_of_rows(cand: Candidates, rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    a = cand.clip[rows].astype(np.float32)
    b = cand.clip[others].astype(np.float32)
    return (a * b).sum(axis=1)


def candidate_words(cand: Candidates) -> np.ndarray:
    return cand.phash.view(">u8").reshape(-1).astype(np.uint64)


@dataclass
class PairResult:
    """What each signal says of each (original, copy) pair."""

    links: dict[str, np.ndarray]  # signal -> bool per pair (views: hashes or verified)
    phash_distance: np.ndarray  # -1 where a side is low-detail
    views_distance: np.ndarray  # the transformed views' distance (64 without views)
    clip_similarity: np.ndarray  # NaN without CLIP
    usable: np.ndarray  # bool: both sides decoded


def image_bytes(feature_path: str, shard: Shard, local_rows: list[int]) -> list[bytes]:
    """The image member's bytes of given rows of a shard, read by offset."""
    table = read_features(
        feature_path, ["member_names", "member_offsets", "member_sizes", "image_member"]
    ).take(pa.array(local_rows, type=pa.int64()))
    names, ranges = image_ranges(table.to_pydict())
    return read_ranges_of(shard, names, ranges)


def edit_order(name: str) -> tuple[int, str]:
    names = list(EDITS)
    return (names.index(name) if name in names else len(names), name)


def share_of(flags: np.ndarray) -> float | None:
    return round(float(flags.mean()), 4) if len(flags) else None
