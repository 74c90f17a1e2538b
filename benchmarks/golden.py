"""Golden outputs: a restructuring must change no output byte.

`python benchmarks/golden.py record FILE` runs dedup in several configurations over
data it makes itself (the demo set and a planted set of a few hundred images with every
kind of synthetic edit) and writes the SHA-256 of every output: each output shard,
samples.parquet, clusters.parquet, and summary.json less its timings and this machine's
paths. `python benchmarks/golden.py check FILE` runs the same again and lists every
output whose bytes differ (exit 1), or says they are identical.

Configurations: `exact,phash` on the demo set; the weightless default signals
(exact,phash,views with verification) on the planted set; `--against` a folder of image
files; a fan-out (two extract parts, cluster, two write parts); the Ray executor.
`make golden-record` / `make golden-check` run it (bench-data/golden/ holds the data;
`--work DIR` puts it elsewhere, as the test suite does: tests/benchmarks/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEDUP = str(Path(sys.executable).parent / "dedup")
DEFAULT = ["--signals", "exact,phash,views", "--workers", "2"]
TIMINGS = {"phases", "seconds", "task_seconds", "images_per_second", "versions"}


def make_data(work: Path) -> dict[str, Path]:
    """The demo set, a planted set with every synthetic edit, and a folder of images,
    under `work` (emptied first)."""
    from dedup.synth import HARD_EDITS, NEAR_EDITS, main, planted_dataset, write_shards

    if work.exists():
        shutil.rmtree(work)
    main([str(work / "demo"), "200", "100"])
    edits = {"exact": 20, **dict.fromkeys(NEAR_EDITS, 12), **dict.fromkeys(HARD_EDITS, 12)}
    samples = planted_dataset(80, edits, seed=21, size=(192, 144))
    write_shards(samples, str(work / "planted"), 60)
    folder = work / "folder"
    folder.mkdir()
    for s in samples[:40]:
        for ext, data in s.members.items():
            if ext in ("jpg", "png", "webp"):
                (folder / f"{s.key}.{ext}").write_bytes(data)
    return {"demo": work / "demo", "planted": work / "planted", "folder": folder}


def dedup(*args) -> None:
    result = subprocess.run([DEDUP, *map(str, args), "-q"], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"golden: dedup {' '.join(map(str, args))} failed:\n{result.stderr}")


def runs(data: dict[str, Path], work: Path) -> dict[str, Path]:
    """Each configuration's OUT."""
    outs = {name: work / "out" / name for name in ("exact-phash", "default", "against")}
    outs |= {"fanout": work / "out" / "fanout", "ray": work / "out" / "ray"}
    dedup(data["demo"], "--out", outs["exact-phash"], "--signals", "exact,phash")
    dedup(data["planted"], "--out", outs["default"], *DEFAULT)
    dedup(data["planted"], "--out", outs["against"], *DEFAULT, "--against", data["folder"])
    for i in range(2):
        dedup("extract", data["planted"], "--out", outs["fanout"], "--part", f"{i}/2", *DEFAULT)
    dedup("cluster", "--out", outs["fanout"])
    for i in range(2):
        dedup("write", "--out", outs["fanout"], "--part", f"{i}/2")
    dedup(data["planted"], "--out", outs["ray"], *DEFAULT, "--executor", "ray")
    return outs


def _normal(value, root: str):
    """summary.json without timings, versions and this machine's paths."""
    if isinstance(value, dict):
        return {k: _normal(v, root) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_normal(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return value


def digests(outs: dict[str, Path], work: Path) -> dict[str, dict[str, str]]:
    out = {}
    for name, folder in outs.items():
        files = {}
        for path in sorted(folder.glob("*.tar")):
            files[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        report = folder / "dedup-report"
        for table in ("samples.parquet", "clusters.parquet"):
            files[table] = hashlib.sha256((report / table).read_bytes()).hexdigest()
        summary = _normal(json.loads((report / "summary.json").read_text()), str(work))
        text = json.dumps(summary, sort_keys=True)
        files["summary.json"] = hashlib.sha256(text.encode()).hexdigest()
        out[name] = files
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=("record", "check"))
    ap.add_argument("file", type=Path)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-data" / "golden")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ADDRESS", "")
    work = args.work.resolve()
    found = digests(runs(make_data(work), work), work)
    path = args.file
    if args.mode == "record":
        path.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"golden: recorded {sum(map(len, found.values()))} outputs in {path}")
        return
    want = json.loads(path.read_text())
    differ = [
        f"{run}/{name}"
        for run in sorted(set(want) | set(found))
        for name in sorted(set(want.get(run, {})) | set(found.get(run, {})))
        if want.get(run, {}).get(name) != found.get(run, {}).get(name)
    ]
    if differ:
        sys.exit("golden: outputs differ: " + ", ".join(differ))
    print(f"golden: all {sum(map(len, found.values()))} outputs identical")


if __name__ == "__main__":
    main()
