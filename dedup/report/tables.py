"""The report: samples.parquet, clusters.parquet and summary.json."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dedup.io import storage
from dedup.io.fsutil import atomic_path, read_file, write_atomic

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

SAMPLES_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("cluster_id", pa.int64()),
        ("cluster_size", pa.int64()),
        ("kept", pa.bool_()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_of_shard", pa.string()),
        # reason reference / blocklist: which REF or blocklist FILE, and which item or
        # entry in it; reference_signal: the signal that matched (exact, phash, ...)
        ("reference", pa.string()),
        ("reference_key", pa.string()),
        ("reference_signal", pa.string()),
        ("phash_distance", pa.int32()),
        ("clip_similarity", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
        ("image_member", pa.string()),
        ("digest", pa.string()),
        ("phash", pa.string()),
    ]
)

CLUSTERS_SCHEMA = pa.schema(
    [
        ("cluster_id", pa.int64()),
        ("size", pa.int64()),
        ("survivor_shard", pa.string()),
        ("survivor_key", pa.string()),
        ("signals", pa.list_(pa.string())),
        ("max_phash_distance", pa.int32()),
        ("max_phash_distance_to_survivor", pa.int32()),
        ("min_clip_similarity_to_survivor", pa.float32()),
        # the survivor is a reference item (--against REF), or a blocklisted sample
        ("reference", pa.string()),
        ("reference_key", pa.string()),
    ]
)


def write_table(table: pa.Table, path: str) -> None:
    """Parquet, written atomically; no timestamps, so equal tables give equal bytes."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def merge_parts(parts: list[str], path: str) -> None:
    """Concatenate per-shard Parquet parts (paths or URLs), in order, into one file.

    One part is read at a time, so memory does not grow with the number of shards."""
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, SAMPLES_SCHEMA, compression="zstd") as w:
        for part in parts:
            source = pa.BufferReader(read_file(part)) if storage.is_url(part) else part
            w.write_table(pq.read_table(source).cast(SAMPLES_SCHEMA))


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


def human_summary(summary: dict[str, Any]) -> list[str]:
    """A few lines for a person reading stderr or a task log."""
    c = summary["counts"]

    def by(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"

    hist = summary["clusters"]["size_histogram"]
    largest = summary["clusters"]["largest"]
    lines = [
        f"{c['samples']:,} samples in {len(summary['shards'])} shards: kept {c['kept']:,}, "
        f"removed {c['removed']:,} ({by(c['removed_by_reason'])}), "
        f"passed through {c['passthrough']:,} ({by(c['passthrough_by_reason'])})",
        f"{summary['clusters']['count']:,} clusters of 2 or more "
        f"(sizes {', '.join(f'{k}: {v:,}' for k, v in hist.items())})"
        + (f"; largest has {largest[0]['size']:,}" if largest else ""),
    ]
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
    phases = summary["phases"]
    lines.append(
        "time: "
        + ", ".join(
            f"{name} {p['seconds']:.1f} s ({p['images_per_second']:,.0f} images/s)"
            for name, p in phases.items()
        )
    )
    out = summary["output"]
    if out["dry_run"]:
        lines.append(f"dry run: no shards written; report in {out['report']}")
    else:
        lines.append(
            f"wrote {len(summary['shards'])} shards to {out['dir']}; report in {out['report']}"
        )
    return lines
