"""Does `dedup calibrate` transfer? Its per-edit recall, estimated from the copies it
plants with its own edit catalogue (dedup.engine.edits), against a real run over copies
made by another generator: bench-keep's (benchmarks/bench_keep.py: its own captions,
watermarks, application windows, bars, crops, each with parameters drawn per copy).

For one bench-keep draw (`--seed`, as bench_keep's; built if missing), the originals are
written into shards of their own and calibrated (`dedup calibrate ORIGINALS --sample ALL
--edits E --seed 0 --signals exact,phash,views`, every original gets every edit), and
bench-keep's shards are run once (`dedup SHARDS --signals exact,phash,views --workers 2`,
the default keep policy). Per kind of bench-keep copy: calibrate's estimate (the share of
planted copies any signal links to their original, the verification tier included;
the mean over its edits where a kind maps to two) against the real share (copies in
their original's cluster), and the difference in points. Mapping: reencode ->
jpeg_q30, jpeg_q60 (bench-keep: q30-70); resize -> resize_half; thumbnail ->
resize_quarter; colour -> brightness, contrast (bench-keep: saturation too); crop ->
offset_crop; the other kinds have an edit of their name.

Tables to stdout, figures to bench-data/bench-transfer[-seedN].json. `--smoke`: the
bench-keep smoke sizes in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_keep  # noqa: E402

from dedup.synth import PlantedSample, write_shards  # noqa: E402

EDITS_OF = {
    "reencode": ("jpeg_q30", "jpeg_q60"),
    "resize": ("resize_half",),
    "thumbnail": ("resize_quarter",),
    "png": ("png",),
    "border": ("border",),
    "letterbox": ("letterbox",),
    "pillarbox": ("pillarbox",),
    "caption": ("caption",),
    "letterbox_caption": ("letterbox_caption",),
    "watermark": ("watermark",),
    "screenshot": ("screenshot",),
    "noise": ("noise",),
    "colour": ("brightness", "contrast"),
    "crop": ("offset_crop",),
}
TARGET_POINTS = 10  # issue 26: calibrate's estimate within 10 points of a real run


def originals_of(data: str, truth: dict, out: str) -> int:
    """bench-keep's originals (their image member only) as shards under `out`."""
    samples = []
    for path in sorted(os.listdir(os.path.join(data, "shards"))):
        with tarfile.open(os.path.join(data, "shards", path)) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                if truth.get(key, {}).get("kind") == "original" and ext in ("jpg", "png"):
                    body = tar.extractfile(member).read()
                    samples.append(PlantedSample(key, {ext: body}, len(samples), "original"))
    write_shards(samples, out, 100, "orig")
    return len(samples)


def calibrate(shards: str, n: int) -> dict:
    edits = sorted({e for es in EDITS_OF.values() for e in es})
    cmd = [bench_keep.DEDUP, "calibrate", shards, "--sample", str(n), "--edits", ",".join(edits)]
    cmd += ["--seed", "0", "--signals", "exact,phash,views", "--json", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--originals", type=int, default=120)
    ap.add_argument("--distractors", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1, help="bench-keep's draw (1: held out)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in a temporary folder")
    opts = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench-transfer-") if opts.smoke else "bench-data"
    if opts.smoke:
        opts.originals, opts.distractors = 10, 6
    name = f"bench-keep-seed{opts.seed}" if opts.seed else "bench-keep"
    data = os.path.join(root, name)
    try:
        keep_opts = SimpleNamespace(
            originals=opts.originals,
            distractors=opts.distractors,
            seed=opts.seed,
            rebuild=False,
            smoke=opts.smoke,
        )
        truth, _ = bench_keep.load_or_build(data, keep_opts)
        folder = tempfile.mkdtemp(prefix="originals-", dir=root)
        n = originals_of(data, truth, folder)
        said = calibrate(folder, n)
        shutil.rmtree(folder, ignore_errors=True)
        real = bench_keep.run("clean,content,quality,hub,typical,noise,first", data)
        per_kind = bench_keep.score(truth, real["samples"])["per_kind"]
        rows = {}
        print(f"{n} originals of {data}; calibrate's edits against bench-keep's copies\n")
        print("| kind | calibrate's edits | calibrate | real run | difference |")
        print("| --- | --- | ---: | ---: | ---: |")
        for kind, edits in EDITS_OF.items():
            estimates = [said["recall"][e]["any"] for e in edits if e in said["recall"]]
            c = per_kind.get(kind, {})
            if not estimates or not c.get("copies"):
                continue
            estimate = sum(estimates) / len(estimates)
            found = c["found"] / c["copies"]
            points = 100 * (estimate - found)
            rows[kind] = {
                "edits": list(edits),
                "calibrate": round(estimate, 4),
                "real": round(found, 4),
                "copies": c["copies"],
                "points": round(points, 1),
            }
            print(
                f"| {kind} | {', '.join(edits)} | {100 * estimate:.0f}% | {100 * found:.0f}% "
                f"({c['found']}/{c['copies']}) | {points:+.0f} |"
            )
        within = sum(abs(r["points"]) <= TARGET_POINTS for r in rows.values())
        print(f"\nwithin {TARGET_POINTS} points: {within} of {len(rows)} kinds")
        tail = f"-seed{opts.seed}" if opts.seed else ""
        out = os.path.join(root, f"bench-transfer{tail}.json")
        with open(out, "w") as f:
            json.dump({"originals": n, "kinds": rows, "within": within}, f, indent=1)
        print(f"results: {out}")
    finally:
        if opts.smoke:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
