"""`make bench-calibrate`: what canaries cost a run, and a calibration on photographs.

(a) make bench's web-size set (24,000 images of 512x384): `dedup --signals
    exact,phash,views` against the same with `--canaries 200` and `--canaries 1000`,
    each run from a fresh OUT, in one run of this script: the time ratio;
(b) `dedup calibrate` on the edit suite's pictures (cut from the photographs bundled
    with scikit-image, scikit-learn, matplotlib and PyWavelets; benchmarks/edit_suite.py
    builds them), every picture sampled, every edit: the table it prints;
(c) `dedup calibrate --sample 2000` on the web-size set: its time.

(b) needs the edit suite, which needs the bench extra's photographs: without it, a line
says it was skipped. `--smoke`: 200 images, 20 canaries, a sample of 20, in a
temporary folder (tests/benchmarks/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import DEDUP, build, machine, run_dedup  # noqa: E402

SIGNALS = ("--signals", "exact,phash,views")


@dataclass(frozen=True)
class Sizes:
    images: int = 24_000  # make bench's web-size set
    per_shard: int = 1_000
    canaries: tuple[int, ...] = (200, 1000)
    sample: int = 2000


SMOKE = Sizes(images=200, per_shard=50, canaries=(20,), sample=20)


def calibrate(inputs: str, sample: int, report: str) -> tuple[float, dict, str]:
    t = time.perf_counter()
    proc = subprocess.run(
        [
            DEDUP,
            "calibrate",
            inputs,
            "--sample",
            str(sample),
            *SIGNALS,
            "--json",
            "--report",
            report,
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"calibrate failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - t, json.loads(proc.stdout), proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default="bench-data")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in a temporary folder")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    if not args.smoke:
        measure(args.data, Sizes())
        return
    with tempfile.TemporaryDirectory(prefix="bench-calibrate-smoke-") as data:
        measure(data, SMOKE)


def measure(data: str, sizes: Sizes) -> None:
    small = os.path.join(data, "small")
    build(small, sizes.images, sizes.per_shard, 512, 384)
    shards = [os.path.join(small, "shards")]
    work = os.path.join(data, "calibrate")
    os.makedirs(work, exist_ok=True)
    base, _, _ = run_dedup(shards, os.path.join(work, "plain"), SIGNALS)
    print(f"  (a) {sizes.images:,} images, exact,phash,views: {base:.1f} s", flush=True)
    for n in sizes.canaries:
        t, _, s = run_dedup(
            shards, os.path.join(work, f"canaries-{n}"), (*SIGNALS, "--canaries", str(n))
        )
        c = s["canaries"]
        print(
            f"      with --canaries {n}: {t:.1f} s ({t / base:.3f}x; canary phase "
            f"{s['phases']['canaries']['seconds']:.1f} s); caught {c['caught']} of "
            f"{c['planted']} ({c['recall_by_signal']})",
            flush=True,
        )
    suite = os.path.join(data, "edit-suite", "shards")
    if os.path.isdir(suite):
        # The suite holds planted copies: dedup it first, so that the sample's pairs are
        # of distinct pictures as far as dedup can tell (the false links then measure
        # what is left: lookalikes, and copies it missed).
        run_dedup([suite], os.path.join(work, "suite-clean"), SIGNALS)
        t, result, table = calibrate(
            os.path.join(work, "suite-clean"), sizes.sample, os.path.join(work, "report-suite")
        )
        print(f"  (b) calibrate on the edit suite's pictures: {t:.1f} s", flush=True)
        print(
            "\n".join(
                "      " + line
                for line in table.splitlines()
                if "calibrate" in line
                or "%" in line
                or "recommended" in line
                or "false links" in line
            )
        )
    else:
        print(
            f"  (b) skipped: no edit suite under {data} (`python benchmarks/edit_suite.py` "
            "builds it from the bench extra's photographs)"
        )
    t, result, _ = calibrate(shards[0], sizes.sample, os.path.join(work, "report-small"))
    print(
        f"  (c) calibrate --sample {sizes.sample:,} on the web-size set: {t:.1f} s "
        f"({result['sample']['copies']:,} copies)",
        flush=True,
    )


if __name__ == "__main__":
    main()
