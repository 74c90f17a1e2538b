"""`make bench-calibrate`: what canaries cost a run, and a calibration on photographs.

(a) make bench's web-size set (24,000 images of 512x384): `dedup --signals
    exact,phash,views` against the same with `--canaries 200` and `--canaries 1000`,
    each run from a fresh OUT, in one run of this script: the time ratio;
(b) `dedup calibrate` on the edit suite's pictures (cut from the photographs bundled
    with scikit-image, scikit-learn, matplotlib and PyWavelets; benchmarks/edit_suite.py
    builds them), every picture sampled, every edit: the table it prints;
(c) `dedup calibrate --sample 2000` on the web-size set: its time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import DEDUP, build, machine, run_dedup  # noqa: E402

SIGNALS = ("--signals", "exact,phash,views")


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
    args = ap.parse_args()
    print(f"machine: {machine()}")
    small = os.path.join(args.data, "small")
    build(small, 24_000, 1000, 512, 384)
    shards = [os.path.join(small, "shards")]
    work = os.path.join(args.data, "calibrate")
    os.makedirs(work, exist_ok=True)
    base, _, _ = run_dedup(shards, os.path.join(work, "plain"), SIGNALS)
    print(f"  (a) 24,000 images, exact,phash,views: {base:.1f} s", flush=True)
    for n in (200, 1000):
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
    suite = os.path.join(args.data, "edit-suite", "shards")
    if os.path.isdir(suite):
        # The suite holds planted copies: dedup it first, so that the sample's pairs are
        # of distinct pictures as far as dedup can tell (the false links then measure
        # what is left: lookalikes, and copies it missed).
        run_dedup([suite], os.path.join(work, "suite-clean"), SIGNALS)
        t, result, table = calibrate(
            os.path.join(work, "suite-clean"), 2000, os.path.join(work, "report-suite")
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
        print("  (b) skipped: run `python benchmarks/edit_suite.py` first")
    t, result, _ = calibrate(shards[0], 2000, os.path.join(work, "report-small"))
    print(
        f"  (c) calibrate --sample 2000 on the web-size set: {t:.1f} s "
        f"({result['sample']['copies']:,} copies)",
        flush=True,
    )


if __name__ == "__main__":
    main()
