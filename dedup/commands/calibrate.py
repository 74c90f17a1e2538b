"""Measured recall on the user's own images: `dedup calibrate` and a run's canaries.

Both plant edited copies of sampled images (dedup.engine.edits) into shards of their own, in a
scratch folder, read them through the run's own extract phase and executor, and ask of
each (original, copy) pair what each signal's rule says at the config's thresholds
(signals.edges.pair_links), the views signal's grey zone checked by the verification tier as a
run checks it. Nothing planted ever reaches OUT or a decision about a real sample.

`dedup calibrate` also measures how often unrelated sampled images fall within each
threshold (all pairs of the sample; the views' verification on a seeded subset of its
candidates), with a 95% upper bound, what that means at the dataset's size, and which
thresholds reach a target precision.
"""

from __future__ import annotations

import logging
import tempfile

import numpy as np

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import ConfigError, InputError
from dedup.core.progress import counted
from dedup.engine.canaries import (
    LINKS,
    PairResult,
    Rows,
    candidate_words,
    cosine_of_rows,
    edit_order,
    image_bytes,
    measure,
    recall_table,
    sample_images,
    share_of,
    upper95,
    views_distance,
)
from dedup.engine.edits import EDITS
from dedup.engine.rows import source_of
from dedup.executors import make_executor
from dedup.io.fsutil import scratch_dir
from dedup.io.shards import list_shards
from dedup.report.calibration import copies_in_sample, write_calibration_report
from dedup.report.tables import thresholds_text
from dedup.signals.choice import choose_signals
from dedup.signals.edges import pair_links
from dedup.signals.views import grey_zone

log = logging.getLogger("dedup")

SAMPLE = 2000  # calibrate's default sample of the user's images
VERIFY_SAMPLE = 200  # unrelated grey-zone candidates whose check is run, per calibration
COPY_CHECKS = 2000  # linked pairs of sampled images checked for being copies of each other
PHASH_SWEEP = range(0, 25)
VIEWS_SWEEP = range(0, 13)
CLIP_SWEEP = tuple(round(x, 2) for x in np.arange(0.80, 1.0, 0.01))


# ---------------------------------------------------------------- sampling


# ---------------------------------------------------------------- planting


def plan_copies(originals: int, edits: list[str], seed: int) -> list[tuple[int, str, int]]:
    """(original, edit, seed) of every copy: each original gets each edit."""
    return [
        (k, e, seed * 1_000_003 + k * 101 + j)
        for k in range(originals)
        for j, e in enumerate(edits)
    ]


# ---------------------------------------------------------------- measuring


# ---------------------------------------------------------------- statistics


# ---------------------------------------------------------------- calibrate


def calibrate(
    inputs: list[str],
    config: Config,
    sample: int = SAMPLE,
    target_precision: float = 0.99,
    edits: list[str] | None = None,
    report_dir: str | None = None,
) -> dict:
    """`dedup calibrate`: recall per signal and edit on a sample of the user's images,
    false links among unrelated sampled images, recommended thresholds."""

    if not 0.0 < target_precision < 1.0:
        raise ValueError("target precision must be between 0 and 1")
    edits = list(edits or EDITS)
    unknown = [e for e in edits if e not in EDITS]
    if unknown:
        raise ConfigError(f"--edits: unknown edit {unknown[0]!r}; known: {', '.join(EDITS)}")
    shards = list_shards(inputs)
    config, clip = choose_signals(config)
    originals, seen, read = sample_images(shards, sample, config.seed, config)
    if not originals:
        raise InputError("calibrate: the input holds no decodable image")
    dataset = max(len(originals), round(seen / max(read, 1) * len(shards)))
    log.info(
        "calibrate: %s sampled (of %s read in %s of %s; about %s in all), %s each",
        counted(len(originals), "image"),
        f"{seen:,}",
        f"{read:,}",
        counted(len(shards), "shard"),
        f"{dataset:,}",
        counted(len(edits), "edit"),
    )
    with (
        scratch_dir() as scratch,
        tempfile.TemporaryDirectory(dir=scratch) as folder,
        make_executor(config.executor, config.worker_count, config.ray_address) as executor,
    ):
        copies = plan_copies(len(originals), edits, config.seed)
        measured = measure(originals, copies, folder, config, clip, executor, dataset)
        planted, features, starts, rows, verifier, pairs = measured
        grey = grey_zone(config, dataset)
        signals = [s for s in LINKS if s in config.signal_names]
        result = {
            "sample": {
                "images": int(rows.ok[planted.original_rows].sum()),
                "requested": sample,
                "seed": config.seed,
                "images_read": seen,
                "shards_read": read,
                "dataset_estimate": dataset,
                "copies": int(pairs.usable.sum()),
                "copies_undecodable": int((~pairs.usable).sum()),
            },
            "signals": signals,
            "thresholds": _thresholds(config, grey),
            "recall": recall_table(pairs, planted.edit_of, signals),
            "recall_all": {
                s: share_of(pairs.links[s][pairs.usable]) for s in signals if s in pairs.links
            },
            "distances": _distances(pairs, planted.edit_of),
        }
        unrelated = _unrelated(rows, planted.original_rows, config, grey, verifier, dataset)
        result["false_links"] = unrelated["false_links"]
        if "copies_in_sample" in unrelated:
            result["copies_in_sample"] = unrelated["copies_in_sample"]
        result["curves"], result["recommend"] = _curves(
            pairs, unrelated, config, dataset, target_precision
        )
        if report_dir:

            def image_of(row: int) -> bytes:
                pos = int(source_of(starts, row))
                f = features[pos]
                return image_bytes(f.path, f.shard, [row - int(starts[pos])])[0]

            write_calibration_report(report_dir, result, planted, pairs, image_of)
    return result


def _thresholds(config: Config, grey: int) -> dict:

    out = signals.thresholds(config)
    if "views" in config.signal_names and config.verify:
        out["verify"] = grey
    return out


def _quantiles(values: np.ndarray) -> dict | None:
    values = values[~np.isnan(values)] if values.dtype.kind == "f" else values
    if not len(values):
        return None
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {
        "p10": round(float(q[0]), 4),
        "median": round(float(q[1]), 4),
        "p90": round(float(q[2]), 4),
    }


def _distances(pairs: PairResult, edit_of: list[str]) -> dict:
    """Per edit: the spread of each signal's distance (pHash bits, the views' transformed
    bits) or similarity (CLIP cosine) between copy and original."""
    edits = np.array(edit_of, dtype=object)
    out = {}
    for edit in sorted(set(edit_of), key=edit_order):
        at = (edits == edit) & pairs.usable
        row = {}
        d = pairs.phash_distance[at]
        row["phash"] = _quantiles(d[d >= 0])
        if "views" in pairs.links:
            row["views"] = _quantiles(pairs.views_distance[at])
        if "clip" in pairs.links:
            row["clip"] = _quantiles(pairs.clip_similarity[at])
        out[edit] = row
    return out


def _unrelated(
    rows: Rows, originals: np.ndarray, config: Config, grey: int, verifier, dataset: int
) -> dict:
    """Every pair of distinct sampled originals: how many each signal links. The input
    may hold real duplicates, and the sample copies of each other: pairs a signal links
    that the local-feature check accepts (copies_in_sample) are counted apart and left
    out of the false links and the sweeps' histograms."""
    ok = originals[rows.ok[originals]]
    cand = rows.cand
    a, b = np.triu_indices(len(ok), k=1)
    a, b = ok[a], ok[b]
    out: dict = {"pairs": len(a), "false_links": {}}
    if not len(a):
        return out
    links = pair_links(a, b, cand, config)
    if "phash" in links:
        links["phash"] = links["phash"] | links.pop("flat") | links.pop("tiny")
    copies, out["copies_in_sample"] = _copies_in_sample(a, b, cand, links, verifier)
    if copies.any():
        a, b = a[~copies], b[~copies]
        links = {name: flags[~copies] for name, flags in links.items()}
    pairs = len(a)
    out["pairs"] = pairs
    if not pairs:
        return out
    low = cand.low_detail()
    detailed = ~low[a] & ~low[b]
    if cand.phash is not None:
        words = candidate_words(cand)
        d = np.bitwise_count(words[a] ^ words[b]).astype(np.int64)
        out["phash_hist"] = np.bincount(d[detailed], minlength=65)
        out["phash_pairs"] = int(detailed.sum())
    verified_rate = None
    if "views" in links:
        plain, transformed, mirrored = views_distance(cand.views[a], cand.views[b])
        plain_linked = detailed & (plain <= config.phash_threshold)
        out["views_plain"] = int(plain_linked.sum())
        out["views_hist"] = np.bincount(transformed[detailed & ~plain_linked], minlength=65)
        out["views_pairs"] = int(detailed.sum())
        closest = np.minimum(plain, transformed)
        grey_at = np.flatnonzero(detailed & ~links["views"] & (closest <= grey))
        if config.verify and len(grey_at):
            rng = np.random.default_rng(config.seed + 17)
            checked = np.sort(rng.choice(grey_at, min(VERIFY_SAMPLE, len(grey_at)), replace=False))
            accepted = verifier(a[checked], b[checked], mirrored[checked])
            share = float(accepted.mean())
            verified_rate = {
                "grey_candidates": len(grey_at),
                "checked": len(checked),
                "accepted": int(accepted.sum()),
                "rate": share * len(grey_at) / pairs,
                "upper95": upper95(int(accepted.sum()), len(checked)) * len(grey_at) / pairs,
            }
    if "clip" in links:
        out["clip_sims"] = np.sort(cosine_of_rows(cand, a, b))
    for name, flags in links.items():
        events = int(flags.sum())
        rate = events / pairs
        high = upper95(events, pairs)
        if name == "views" and verified_rate is not None:
            rate += verified_rate["rate"]
            high += verified_rate["upper95"]
        out["false_links"][name] = {
            "pairs": pairs,
            "linked": events,
            "rate": rate,
            "upper95": high,
            "per_image_at_dataset_size": rate * (dataset - 1),
            "upper95_per_image": high * (dataset - 1),
            **({"verification": verified_rate} if name == "views" and verified_rate else {}),
        }
    return out


def _copies_in_sample(a, b, cand, links: dict, verifier) -> tuple[np.ndarray, dict]:
    """Which pairs (a[k], b[k]) of sampled images are copies of each other: linked by a
    signal and accepted by the views' local-feature check (the verification tier:
    matched keypoints under one geometric transform, checked both ways), the first
    COPY_CHECKS such pairs; the rest stay false links (said in `unchecked`). Images of
    the same bytes are one picture to the sampler already. The check's own false
    accepts are counted as copies here: calibrate does not measure them."""
    linked = np.zeros(len(a), dtype=bool)
    for flags in links.values():
        linked |= flags
    at = np.flatnonzero(linked)
    checked = at[:COPY_CHECKS]
    copies = np.zeros(len(a), dtype=bool)
    if len(checked):
        if cand.views is not None:
            mirrored = views_distance(cand.views[a[checked]], cand.views[b[checked]])[2]
        else:
            mirrored = np.zeros(len(checked), dtype=bool)
        copies[checked] = verifier(a[checked], b[checked], mirrored)
    return copies, {
        "pairs": int(copies.sum()),
        "checked": int(len(checked)),
        "unchecked": int(len(at) - len(checked)),
    }


def _precision(recall: float, rate: float, dataset: int) -> float:
    """The precision of links in a dataset of this size where every image has one copy:
    true links recall, false links rate x (images - 1), per image."""
    false = rate * (dataset - 1)
    return recall / (recall + false) if recall + false > 0 else 1.0


def _curves(pairs: PairResult, unrelated: dict, config: Config, dataset: int, target: float):
    """Per signal and threshold: recall over all copies, the unrelated link rate, the
    precision at the dataset's size; and the loosest threshold that reaches `target`."""
    curves, recommend = {}, {"target_precision": target}
    ok = pairs.usable
    if "phash_hist" in unrelated:
        d = pairs.phash_distance[ok & (pairs.phash_distance >= 0)]
        cum = np.cumsum(unrelated["phash_hist"]) / max(unrelated["phash_pairs"], 1)
        points = [
            (t, float((d <= t).mean()) if len(d) else 0.0, float(cum[t])) for t in PHASH_SWEEP
        ]
        curves["phash"], recommend["phash_threshold"] = _sweep(points, dataset, target, loosest=max)
    if "views_hist" in unrelated:
        plain_linked = unrelated["views_plain"]
        cum = np.cumsum(unrelated["views_hist"])
        total = max(unrelated["views_pairs"], 1)
        vd = pairs.views_distance[ok]
        ph = pairs.phash_distance[ok]
        full = (ph >= 0) & (ph <= config.phash_threshold)
        points = [
            (
                t,
                float((full | (vd <= t)).mean()) if len(vd) else 0.0,
                (plain_linked + cum[t]) / total,
            )
            for t in VIEWS_SWEEP
        ]
        curves["views"], recommend["views_threshold"] = _sweep(points, dataset, target, loosest=max)
    if "clip_sims" in unrelated:
        sims = unrelated["clip_sims"]
        s = pairs.clip_similarity[ok]
        points = [
            (
                t,
                float((s >= t).mean()) if len(s) else 0.0,
                float((len(sims) - np.searchsorted(sims, t, side="left")) / max(len(sims), 1)),
            )
            for t in CLIP_SWEEP
        ]
        curves["clip"], recommend["clip_threshold"] = _sweep(points, dataset, target, loosest=min)
    return curves, recommend


def _sweep(points, dataset: int, target: float, loosest):
    curve = {
        "threshold": [p[0] for p in points],
        "recall": [round(p[1], 4) for p in points],
        "unrelated_rate": [p[2] for p in points],
        "precision": [round(_precision(p[1], p[2], dataset), 6) for p in points],
    }
    good = [p for p in points if _precision(p[1], p[2], dataset) >= target]
    if not good:
        return curve, {"value": None, "note": "no threshold reaches the target precision"}
    best = loosest(good, key=lambda p: p[0])
    return curve, {
        "value": best[0],
        "recall": round(best[1], 4),
        "precision": round(_precision(best[1], best[2], dataset), 6),
    }


def human_table(result: dict) -> list[str]:
    """The calibration as lines for stderr: recall per edit and signal, false links,
    recommendations."""
    signals = result["signals"]
    s = result["sample"]
    lines = [
        f"calibrate: {s['images']:,} sampled images, {s['copies']:,} edited copies; "
        f"dataset about {s['dataset_estimate']:,} images; "
        f"thresholds {thresholds_text(result['thresholds'])}",
        f"{'edit':<24}{'copies':>7}{'any':>7}" + "".join(f"{x:>7}" for x in signals),
    ]
    for edit, row in result["recall"].items():
        cells = "".join(f"{_pct(row.get(x)):>7}" for x in signals)
        lines.append(f"{edit:<24}{row['copies']:>7}{_pct(row['any']):>7}{cells}")
    copies = copies_in_sample(result)
    if copies:
        lines.append(f"copies in the sample: {copies}; left out of the false links")
    for name, f in result["false_links"].items():
        v = f.get("verification")
        checked = (
            f" by the hashes; verification accepted {v['accepted']} of {v['checked']} checked "
            f"of {v['grey_candidates']:,} grey-zone candidates"
            if v
            else ""
        )
        lines.append(
            f"false links, {name}: {f['linked']:,} of {f['pairs']:,} unrelated pairs{checked} "
            f"(rate {f['rate']:.2e}, 95% upper {f['upper95']:.2e}); at the dataset's size "
            f"{f['per_image_at_dataset_size']:.3g} per image (upper {f['upper95_per_image']:.3g})"
        )
    rec = result["recommend"]
    for name in ("phash_threshold", "views_threshold", "clip_threshold"):
        if name in rec:
            r = rec[name]
            text = (
                r.get("note")
                or f"{r['value']} (recall {_pct(r['recall'])}, precision {r['precision']:.4f})"
            )
            lines.append(f"recommended {name} for precision {rec['target_precision']}: {text}")
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


# ---------------------------------------------------------------- canaries
