"""The Ray executor against local processes, same data, same run.

On the 24,000-image set that `make bench` builds (bench-data/small), runs
`dedup --signals exact,phash` as a user does, alternately with `--executor local`
(all cores) and `--executor ray` joined to a local Ray started here with as many CPUs
as this machine has (its start-up excluded; each run's own joining, and the start of
its Ray workers, included). Prints images per second over the extract and write phases
(the per-shard work the executor runs), the ratio Ray / local (target >= 0.8), and
whether both wrote the same bytes.

`--smoke`: 100 images, one round each, in a temporary folder (tests/benchmarks/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared data builder)

DEDUP = os.path.join(os.path.dirname(sys.executable), "dedup")


def run(shards: list[str], out: str, flags: list[str]) -> tuple[float, dict]:
    """Wall time and summary of one run."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [DEDUP, *shards, "--out", out, "--signals", "exact,phash", "--json", "-q", *flags]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"dedup failed: {proc.stderr[-2000:]}")
    return elapsed, json.loads(proc.stdout)


def digest(out: str) -> str:
    """One digest of an OUT's shards, by name."""
    h = hashlib.sha256()
    for path in sorted(Path(out).glob("*.tar")):
        h.update(path.name.encode())
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def per_shard_rate(summary: dict) -> tuple[float, float]:
    """Images per second over extract + write, and those seconds."""
    phases = summary["phases"]
    seconds = phases["extract"]["seconds"] + phases["write"]["seconds"]
    return summary["counts"]["samples"] / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--images", type=int, default=24_000)
    ap.add_argument("--rounds", type=int, default=2, help="local and Ray runs, alternated")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in a temporary folder")
    args = ap.parse_args()
    if not args.smoke:
        measure(args.data, args.images, 1000, args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-ray-smoke-") as data:
        measure(data, 100, 25, 1)


def measure(data: str, images: int, per_shard: int, rounds: int) -> None:
    from ray.cluster_utils import Cluster

    cpus = os.cpu_count() or 1
    print(f"machine: {bench.machine()}")
    root = os.path.join(data, "small")
    copies = bench.build(root, images, per_shard, 512, 384)
    shards = sorted(
        os.path.join(root, "shards", f) for f in os.listdir(os.path.join(root, "shards"))
    )
    t = time.perf_counter()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False}
    )
    print(f"  local Ray with {cpus} CPUs started in {time.perf_counter() - t:.1f} s (excluded)")
    executors = {
        "local": ["--executor", "local", "--workers", str(cpus)],
        "ray": ["--executor", "ray", "--ray-address", cluster.address],
    }
    rates: dict[str, list[float]] = {name: [] for name in executors}
    digests: dict[str, set[str]] = {name: set() for name in executors}
    try:
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            for round_no in range(1, rounds + 1):
                for name, flags in executors.items():
                    out = os.path.join(tmp, name)
                    wall, summary = run(shards, out, flags)
                    rate, seconds = per_shard_rate(summary)
                    rates[name].append(rate)
                    digests[name].add(digest(out))
                    phases = ", ".join(
                        f"{k} {v['seconds']:.2f} s" for k, v in summary["phases"].items()
                    )
                    print(
                        f"  round {round_no} {name:<5} extract+write {rate:>7,.0f} images/s "
                        f"({seconds:.2f} s of {wall:.2f} s wall; {phases})",
                        flush=True,
                    )
    finally:
        cluster.shutdown()
    samples = summary["counts"]["samples"]
    best = {name: max(r) for name, r in rates.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"  {samples:,} images, {rounds} runs each; extract+write images/s:")
    for name in executors:
        print(f"  {name:<5} best {best[name]:>7,.0f}   median {median[name]:>7,.0f}")
    print(
        f"  ray/local = {best['ray'] / best['local']:.2f} (best), "
        f"{median['ray'] / median['local']:.2f} (median)   (target >= 0.8)"
    )
    same = len(digests["local"] | digests["ray"]) == 1
    print(f"  output shards byte-identical across executors and rounds: {same}")
    planted = "" if copies is None else f" (planted copies: {copies:,})"
    print(f"  removed {summary['counts']['removed']:,} of {samples:,}{planted}")


if __name__ == "__main__":
    main()
