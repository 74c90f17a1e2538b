"""The report: samples.parquet, clusters.parquet and summary.json."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import numpy as np

from dedup.core.errors import EXIT_SKIPPED_SHARDS
from dedup.core.progress import counted
from dedup.io.fsutil import write_atomic

# Cluster sizes from which memorization risk is flagged: Carlini et al. (2023) extracted
# images duplicated about a hundred times; ten copies is the early warning.
RISK_TIERS = (10, 100)
SIZE_TIERS = (
    ("2", 2, 2),
    (f"3-{RISK_TIERS[0] - 1}", 3, RISK_TIERS[0] - 1),
    (f"{RISK_TIERS[0]}-{RISK_TIERS[1] - 1}", RISK_TIERS[0], RISK_TIERS[1] - 1),
    (f"{RISK_TIERS[1]}+", RISK_TIERS[1], None),
)
LARGEST_CLUSTERS = 20
SKIPPED_SHOWN = 5  # skipped shards named in the stderr summary; summary.json lists all
PACKAGES = (
    "dedup-wds",
    "numpy",
    "scipy",
    "pillow",
    "imagehash",
    "faiss-cpu",
    "pyarrow",
    "click",
    "opencv-python-headless",  # the views signal's verification tier
)


def write_summary(summary: dict[str, Any], path: str) -> None:
    write_atomic(path, (json.dumps(summary, indent=2, sort_keys=False) + "\n").encode())


def size_histogram(sizes: np.ndarray) -> dict[str, int]:
    """Clusters of two or more, counted by size tier; 100+ is the memorization-risk tier."""
    out = {}
    for name, lo, hi in SIZE_TIERS:
        mask = sizes >= lo if hi is None else (sizes >= lo) & (sizes <= hi)
        out[name] = int(mask.sum())
    return out


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the results, for the record."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def report_paths(report_dir: str) -> dict[str, str]:
    return {
        "samples": os.path.join(report_dir, "samples.parquet"),
        "clusters": os.path.join(report_dir, "clusters.parquet"),
        "summary": os.path.join(report_dir, "summary.json"),
    }


def thresholds_text(thresholds: dict[str, Any]) -> str:
    """Thresholds as a person reads them: `phash 8, views 4, verify 12`."""
    return ", ".join(f"{name} {value}" for name, value in thresholds.items()) or "none"


def human_summary(summary: dict[str, Any]) -> list[str]:
    """A few lines for a person reading stderr or a task log."""
    c = summary["counts"]

    def by(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"

    hist = summary["clusters"]["size_histogram"]
    largest = summary["clusters"]["largest"]
    lines = [
        f"{c['samples']:,} samples in {counted(len(summary['shards']), 'shard')}: "
        f"kept {c['kept']:,}, "
        f"removed {c['removed']:,} ({by(c['removed_by_reason'])}), "
        f"passed through {c['passthrough']:,} ({by(c['passthrough_by_reason'])})",
        f"{summary['clusters']['count']:,} clusters of 2 or more "
        f"(sizes {', '.join(f'{k}: {v:,}' for k, v in hist.items())})"
        + (f"; largest has {largest[0]['size']:,}" if largest else "")
        + (
            f"; {c['detached']:,} linked samples kept apart from their links' survivors"
            if c.get("detached")
            else ""
        ),
    ]
    for spec, notes in c.get("keep_by", {}).items():
        if notes:
            lines.append(f"keep-by {spec}: no usable number in {by(notes)} (ranked last)")
    for r in summary.get("references", {}).get("against", []):
        skipped = r["skipped_by_reason"]
        lines.append(
            f"against {r['reference']} ({r['kind']}, {r['usable']:,} images"
            + (f"; skipped {by(skipped)}" if skipped else "")
            + f"): removed {r['matched']:,} ({by(r['matched_by_signal'])})"
        )
    c = summary.get("canaries")
    if c and c.get("planted"):
        signals = ", ".join(
            f"{name} {100 * v:.0f}%" for name, v in c["recall_by_signal"].items() if v is not None
        )
        lines.append(
            f"canaries: {c['caught']:,} of {c['planted']:,} caught ({100 * c['recall']:.0f}%; "
            f"{signals})"
        )
    for b in summary.get("references", {}).get("blocklists", []):
        lines.append(
            f"blocklist {b['blocklist']} ({b['digests']:,} digests, {b['phash_codes']:,} pHash "
            f"codes): removed {b['matched']:,} ({by(b['matched_by_signal'])})"
        )
    skipped = summary.get("skipped_shards", [])
    for b in skipped[:SKIPPED_SHOWN]:
        lines.append(f"skipped damaged shard {b['shard']}: {b['error']}")
    if len(skipped) > SKIPPED_SHOWN:
        lines.append(f"skipped {len(skipped) - SKIPPED_SHOWN:,} more damaged shards")
    phases = summary["phases"]
    lines.append(
        "time: "
        + ", ".join(
            f"{name} {p['seconds']:.1f} s ({p['images_per_second']:,.0f} images/s)"
            for name, p in phases.items()
        )
    )
    out = summary["output"]
    left_out = f" ({len(skipped):,} skipped: exit code {EXIT_SKIPPED_SHARDS})" if skipped else ""
    if out["dry_run"]:
        lines.append(f"dry run: no shards written{left_out}; report in {out['report']}")
    else:
        lines.append(
            f"wrote {counted(len(summary['shards']), 'shard')} to {out['dir']}{left_out}; "
            f"report in {out['report']}"
        )
    return lines
