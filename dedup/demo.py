"""`python -m dedup.demo [FOLDER] [--originals N]`: dedup on planted data, explained.

Plants originals and edited copies with dedup.synth (it knows which picture every
sample shows and which edit made it), runs the dedup CLI on them with the model-free
signals, and holds the report against that truth: what was removed and by which signal,
recall per edit, every planted copy missed and why, and any false removal. Needs only
the base install (no torch); `make demo` runs it. The same folder and size print the
same lines every time, apart from the CLI's timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from dedup.core.config import Config
from dedup.engine.featurestore import feature_path, read_features
from dedup.engine.verify import VERIFY_SIDE, features, verify_both
from dedup.io.decode import decode_image
from dedup.io.shards import Shard
from dedup.signals.phash import LOW_DETAIL_BITS
from dedup.signals.views import KIND, MIRRORED, NEVER, VIEW_NAMES, code_words
from dedup.synth import (
    DEMO_SEED,
    HARD_EDITS,
    PlantedSample,
    demo_copies,
    planted_dataset,
    write_shards,
)

# The signals that need no model weights: the same run with or without the clip extra.
SIGNALS = "exact,phash,views"
PER_SHARD = 100
BAD = ("no_image", "undecodable")
REASONS = {
    "exact": "same bytes as the kept sample",
    "phash": "whole-frame perceptual hash within the pHash threshold",
    "views": "hash of a trimmed, cropped or mirrored view within the views threshold",
    "verified": "hash in the grey zone, confirmed by ORB feature matching",
}
# The verification tier's reasons (dedup.engine.verify.Verdict), in words.
VERDICTS = {
    "few_matches": "too few ORB features matched ({matches})",
    "few_inliers": "too few matches fit one transform ({inliers} of {matches})",
    "implausible_transform": "the fitted transform scales or turns too far (scale "
    "{scale:.2f}, {rotation:.1f} degrees)",
    "partial_overlap": "aligned, the two frames cover too little of each other "
    "({overlap_a:.0%} and {overlap_b:.0%})",
    "clustered": "the matches bunch in one part of the frame",
    "content_differs": "aligned, the pictures disagree cell by cell ({agreement:.0%} agree)",
    "centre_differs": "aligned, the middles disagree ({centre_agreement:.0%} agree)",
}


@dataclass
class Copy:
    """A planted copy held against the run: its sample, its original's, their rows."""

    sample: PlantedSample
    original: PlantedSample
    row: dict
    original_row: dict

    @property
    def caught(self) -> bool:
        return self.row["cluster_id"] == self.original_row["cluster_id"]


def main(argv: list[str] | None = None) -> int:
    """Plant, run, explain; returns the exit code (the CLI's, when it fails)."""
    parser = argparse.ArgumentParser(prog="python -m dedup.demo", description=__doc__)
    parser.add_argument("folder", nargs="?", default="demo-data")
    parser.add_argument("--originals", type=int, default=200)
    args = parser.parse_args(argv)
    if os.path.exists(args.folder) and os.listdir(args.folder):
        print(
            f"dedup demo: {args.folder} is not empty; remove it or name another folder",
            file=sys.stderr,
        )
        return 2
    shards_dir = os.path.join(args.folder, "shards")
    out = os.path.join(args.folder, "clean")
    copies = demo_copies(args.originals)
    samples = planted_dataset(args.originals, copies, seed=DEMO_SEED)
    paths = write_shards(samples, shards_dir, PER_SHARD)
    for line in planted_lines(samples, copies, len(paths)):
        print(line)
    command = ["dedup", shards_dir, "--out", out, "--signals", SIGNALS, "--quiet"]
    print(f"\n$ {' '.join(command)}")
    # Its lines are printed here, in order with the demo's own (it writes them to stderr).
    done = subprocess.run([*_cli(), *command[1:]], capture_output=True, text=True)
    if done.returncode:
        print(done.stdout + done.stderr, end="", file=sys.stderr)
        return done.returncode
    print(done.stdout + done.stderr, end="")
    report = os.path.join(out, "dedup-report")
    with open(os.path.join(report, "summary.json")) as f:
        summary = json.load(f)
    rows = {r["key"]: r for r in pq.read_table(os.path.join(report, "samples.parquet")).to_pylist()}
    print()
    for line in result_lines(samples, rows, summary):
        print(line)
    print(
        f"\nThe report: {os.path.join(report, 'report.html')} (open it in a browser), beside "
        "summary.json, samples.parquet (one row per sample: kept or why removed) and "
        "clusters.parquet"
    )
    return 0


def _cli() -> list[str]:
    """The console script beside this Python: the installed CLI (`python -m dedup` would
    run a dedup/ folder in the current directory first, a checkout's)."""
    script = os.path.join(os.path.dirname(sys.executable), "dedup")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "dedup"]


def planted_lines(samples: list[PlantedSample], copies: dict[str, int], shards: int) -> list[str]:
    """What was planted, from dedup.synth's own record of it (`copies`: edits in order)."""
    edits = Counter(s.edit for s in samples)
    with_copy = {s.group for s in samples if s.group is not None and s.edit != "original"}
    copies = {e: edits[e] for e in copies}
    hard = [e for e in copies if e in HARD_EDITS]
    return [
        f"Planted (dedup.synth, seed {DEMO_SEED}): {len(samples)} samples in {shards} shards",
        f"  {edits['original']} originals; {edits['original'] - len(with_copy)} of them have "
        "no copy (distractors: each must be kept)",
        f"  {sum(copies.values())} copies of {len(with_copy)} originals: "
        + ", ".join(f"{e} {n}" for e, n in copies.items()),
        f"    ({', '.join(hard)}: edits that change the layout, which one pHash of the whole "
        "frame cannot see; the views signal looks for them)",
        f"  {edits['no_image']} caption with no image and {edits['undecodable']} corrupt image "
        "(passed through untouched, never removed)",
    ]


def result_lines(samples: list[PlantedSample], rows: dict[str, dict], summary: dict) -> list[str]:
    """The run held against the planted truth."""
    by_key = {s.key: s for s in samples}
    original = {s.group: s for s in samples if s.edit == "original"}
    copies = [
        Copy(s, original[s.group], rows[s.key], rows[original[s.group].key])
        for s in samples
        if s.group is not None and s.edit != "original"
    ]
    c = summary["counts"]
    lines = [
        f"dedup kept {c['kept']}, removed {c['removed']} and passed {c['passthrough']} "
        "through; removed by signal (the link to the sample kept in its cluster):"
    ]
    for reason, n in c["removed_by_reason"].items():
        lines.append(f"  {reason:<9} {n:>4}  {REASONS.get(reason, '')}".rstrip())
    lines.append("Recall per edit (a copy is caught when it lands in its original's cluster):")
    for edit in sorted({cp.sample.edit for cp in copies}, key=list(demo_copies(1)).index):
        of = [cp for cp in copies if cp.sample.edit == edit]
        caught = sum(cp.caught for cp in of)
        lines.append(
            f"  {edit:<9} {caught:>3} of {len(of):>3} caught ({100 * caught / len(of):.0f}%)"
        )
    caught = sum(cp.caught for cp in copies)
    lines.append(f"  {'all':<9} {caught:>3} of {len(copies):>3} caught")
    missed = [cp for cp in copies if not cp.caught]
    lines.append(f"Missed copies: {len(missed) or 'none'}")
    if missed:
        why = MissExplainer(summary, samples)
        for cp in missed:
            lines.extend(why.lines(cp))
    false = [
        s
        for s in samples
        if s.group is not None
        and not rows[s.key]["kept"]
        and by_key[rows[s.key]["duplicate_of"]].group != s.group
    ]
    lines.append(
        "False removals (a sample removed as a copy of another picture): "
        + (", ".join(f"{s.key} ({s.edit} of picture {s.group})" for s in false) or "none")
    )
    lonely = [s for s in original.values() if sum(cp.original is s for cp in copies) == 0]
    kept = sum(rows[s.key]["kept"] for s in lonely)
    bad = [s for s in samples if s.edit in BAD]
    lines.append(
        f"Distractors kept: {kept} of {len(lonely)}; bad samples passed through: "
        + ", ".join(f"{s.key} {rows[s.key]['reason']}" for s in bad)
    )
    return lines


class MissExplainer:
    """Why a copy stayed out of its original's cluster, from what the run stored: the two
    pHash codes (samples.parquet), every view's code (the feature store), the thresholds
    (summary.json), and the verification tier's verdict on the pair, taken again."""

    def __init__(self, summary: dict, samples: list[PlantedSample]) -> None:
        self.thresholds = summary["thresholds"]
        self.per_image = summary["config"]["verify_per_image"]
        self.config = Config(signals=tuple(summary["config"]["signals"]))  # decoding's limits
        store = summary["output"]["state_dir"]
        self.features: dict[str, dict] = {}
        for shard in sorted({s.shard for s in samples}):
            table = read_features(feature_path(store, Shard(shard)), ["key", "views", "detail"])
            self.features.update((r["key"], r) for r in table.to_pylist())

    def lines(self, cp: Copy) -> list[str]:
        a, b = cp.sample, cp.original
        phash = bin(int(cp.row["phash"], 16) ^ int(cp.original_row["phash"], 16)).count("1")
        lines = [
            f"  {a.key} ({os.path.basename(a.shard)}), a {a.edit} copy of {b.key} "
            f"({os.path.basename(b.shard)}):",
            f"    pHash distance {phash} bits, "
            + ("within" if phash <= self.thresholds["phash"] else "over")
            + f" the pHash threshold {self.thresholds['phash']}",
        ]
        detail = min(self.features[a.key]["detail"], self.features[b.key]["detail"])
        if detail < LOW_DETAIL_BITS:
            lines.append(
                f"    low-detail ({detail} confident bits of 64, under {LOW_DETAIL_BITS}): "
                "compared by colour signature, not bit by bit"
            )
        distance, view_a, view_b = self.closest_views(a.key, b.key)
        grey = self.thresholds.get("verify", -1)
        lines.append(
            f"    closest views {distance} bits (its {_view(view_a)} against the original's "
            f"{_view(view_b)}): "
            + ("within" if distance <= self.thresholds["views"] else "over")
            + f" the views threshold {self.thresholds['views']}, "
            + ("inside" if distance <= grey else "outside")
            + f" the verification zone (up to {grey} bits)"
        )
        if distance > grey:
            lines.append("    so it was never a candidate pair")
            return lines
        verdict = self.verdict(cp, MIRRORED[view_a] != MIRRORED[view_b])
        if verdict.accepted:
            lines.append(
                "    verification accepts the pair, but it was not among the "
                f"{self.per_image} nearest candidates verified per image"
            )
        else:
            said = VERDICTS.get(verdict.reason, verdict.reason).format(**vars(verdict))
            lines.append(f"    verification rejected the pair: {said}")
        return lines

    def closest_views(self, key_a: str, key_b: str) -> tuple[int, int, int]:
        """(distance, a's view, b's view) of the closest pair of views the signal compares."""
        wa, wb = (
            code_words(np.frombuffer(self.features[k]["views"], np.uint8)[None])[0]
            for k in (key_a, key_b)
        )
        pairs = [(va, vb) for va, vb in zip(*np.nonzero(KIND != NEVER), strict=True)]
        pairs += [(vb, va) for va, vb in pairs]
        return min((int(np.bitwise_count(wa[va] ^ wb[vb])), int(va), int(vb)) for va, vb in pairs)

    def verdict(self, cp: Copy, mirrored: bool):
        """The verification tier's verdict as the run takes it: the earlier row first, the
        later one mirrored when the views matched a mirror image, then both ways round."""
        first, second = sorted((cp.sample, cp.original), key=lambda s: s.key)
        fa, fb = (
            features(decode_image(_image(s), self.config, VERIFY_SIDE, "L").image, m)
            for s, m in ((first, False), (second, mirrored))
        )
        return verify_both(fa, fb)


def _image(sample: PlantedSample) -> bytes:
    return next(data for ext, data in sample.members.items() if ext not in ("txt", "json"))


def _view(index: int) -> str:
    """A view's name in words: full frame, trimmed frame, mirror image, top-left 90% crop."""
    name = VIEW_NAMES[index]
    words = {
        "full": "full frame",
        "trim": "trimmed frame",
        "mirror": "mirror image",
        "mirror_trim": "trimmed mirror image",
    }
    if name in words:
        return words[name]
    corner = {"tl": "top-left", "tr": "top-right", "bl": "bottom-left", "br": "bottom-right"}
    return f"{corner.get(name[:2], 'centre')} {name.lstrip('tlbrc')}% crop"


if __name__ == "__main__":
    sys.exit(main())
