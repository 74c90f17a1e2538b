"""Every benchmark behind a make target (bench, bench-scale, bench-gpu, bench-storage,
bench-against, bench-calibrate, bench-keep, bench-transfer, calibrate, calibrate-photos,
golden-record) run at a tiny size in a subprocess, as a user runs it: it must finish,
print its figures, and find the copies it planted. Counts are asserted, never timings.
Each runs in a temporary folder as its working directory, and none may write a
bench-data/ there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dedup.synth import HARD_EDITS, NEAR_EDITS

pytestmark = pytest.mark.slow  # about two minutes together

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def bench(cwd: Path, script: str, *args: str) -> str:
    """stdout of `python benchmarks/SCRIPT ARGS`, which must exit 0."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"{script} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    assert not (cwd / "bench-data").exists(), f"{script} wrote bench-data/"
    return result.stdout


def number(text: str) -> int:
    return int(text.replace(",", ""))


def lines_with(out: str, marker: str) -> list[str]:
    return [line for line in out.splitlines() if marker in line]


def test_bench(tmp_path):
    """make bench: both sets; (b) removes exactly the planted copies, and the views runs
    remove at least those."""
    out = bench(tmp_path, "bench.py", "--smoke")
    sets = out.split("\n== ")[1:]
    assert len(sets) == 2
    for text, images, shards in ((sets[0], 120, 3), (sets[1], 10, 1)):
        copies = number(re.search(r"planted copies: ([\d,]+)", text)[1])
        assert copies > 0
        assert re.search(r"\(a\) decode floor +[\d,]+ images/s", text)
        removed = re.search(r"\(b\) dedup exact,phash .*removed ([\d,]+) of ([\d,]+)\)", text)
        assert (number(removed[1]), number(removed[2])) == (copies, images)
        for run in ("(b2)", "(b3)"):
            (line,) = lines_with(text, run)
            assert number(re.search(r"removed ([\d,]+)[;)]", line)[1]) >= copies
        assert "signals exact,phash,views)" in lines_with(text, "(b3)")[0]  # the default's
        limit = re.search(r"limit: floor \+ copy +([\d,]+) images/s", text)
        assert number(limit[1]) > 0
        assert len(re.findall(r"start-up and report -?\d+\.\d\d s", text)) == 2
        checked = re.search(r"checked ([\d,]+) pairs \(([\d,]+) accepted\)", text)
        assert number(checked[1]) >= number(checked[2])
        assert "(c) skipped: imagededup is not installed" in text or "(c) imagededup" in text
        assert re.search(r"\(d\) imagehash\.phash loop +[\d,]+ images/s", text)
        memory = re.findall(
            r"peak memory of \(b\), (\d+) shards \(([\d,]+) images\): (\d+) MiB", text
        )
        halves = sorted({max(1, shards // 2), shards})
        assert [(int(s), number(n)) for s, n, _ in memory] == [
            (k, images // shards * k) for k in halves
        ]
        assert all(int(mib) > 0 for _, _, mib in memory)


def test_bench_scale(tmp_path):
    """make bench-scale, first script: feature files written by the feature store's
    writer are read by the global phase; every brute-force pair is linked, no edge is
    longer than the threshold, and the old engine removes as many."""
    out = bench(tmp_path, "bench_scale.py", "--smoke")
    clip = json.loads(lines_with(out, '{"clip"')[0])["clip"]
    assert clip["vectors"] == 2000 and clip["true_pairs"] > 0
    assert clip["recall"] >= 0.95 and clip["false_pairs"] == 0
    (row,) = json.loads(out[out.rindex("\n[\n") :])
    assert row["codes"] == 20_000
    check = row["check"]
    assert check["pairs_brute_force"] > 0
    assert check["pairs_linked"] == check["pairs_brute_force"]
    assert check["edges_over_threshold"] == 0 and check["edge_distance_mismatch"] == 0
    assert row["new"]["edges"] > 0 and row["new"]["removed"] > 0
    assert row["old"]["removed"] == row["new"]["removed"]
    assert row["old"]["clusters"] == row["new"]["clusters"]


def test_bench_ray(tmp_path):
    """make bench-scale, second script: the Ray executor writes what the local one does."""
    out = bench(tmp_path, "bench_ray.py", "--smoke")
    assert "output shards byte-identical across executors and rounds: True" in out
    removed = re.search(r"removed ([\d,]+) of ([\d,]+) \(planted copies: ([\d,]+)\)", out)
    assert number(removed[2]) == 100
    assert number(removed[1]) == number(removed[3]) > 0
    for name in ("local", "ray"):
        assert re.search(rf"{name} +best +[\d,]+ +median +[\d,]+", out)


def test_bench_gpu(tmp_path):
    """make bench-gpu: its ceilings and the four end-to-end runs, on the GPU if there is
    one and else on the CPU, with a tiny random model."""
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    out = bench(tmp_path, "bench_gpu.py", "--smoke")
    for label in ("decode only", "decode + resize + normalize", "model only, batch 8"):
        assert re.search(rf"{re.escape(label)} .* images/s +\(\d+ in", out), label
    assert "one stage: bytes to vectors" in out
    assert "end to end on 40 images" in out
    labels = (
        "exact,phash ",
        "exact,phash,clip ",
        "the Pillow path (baseline) ",
        "(default signals)",
    )
    for label in labels:
        (line,) = [x for x in lines_with(out, label) if "images/s" in x]
        assert "(40 in " in line
    decoded = [json.loads(x.split("decoded by: ")[1].replace("'", '"')) for x in out.splitlines()
               if "decoded by: " in x]  # fmt: skip
    assert len(decoded) == 3 and all(sum(d.values()) > 0 for d in decoded)
    assert "written: " in out


def test_bench_storage(tmp_path):
    """make bench-storage: the same run over local disk and a local S3 server writes the
    same shards and removes the planted copies."""
    out = bench(tmp_path, "bench_storage.py", "--smoke")
    head = re.search(r"([\d,]+) samples in (\d+) shards \(([\d,]+) planted copies\)", out)
    assert number(head[1]) == 122 and number(head[3]) == 20  # 100 + 20 copies + 2 bad
    removed = re.search(r"run 1 removed: local ([\d,]+), s3 ([\d,]+); output shards identical", out)
    assert number(removed[1]) == number(removed[2]) == 20
    assert re.search(r"^1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out, re.M)


def test_bench_against(tmp_path):
    """make bench-against: an index written by dedup's own writers, and a folder, each
    with 20 planted input images; every one is removed as a copy of a reference."""
    out = bench(tmp_path, "bench_against.py", "--smoke")
    found = re.findall(
        r"removed ([\d,]+) \(.*\); (planted|copies) found: ([\d,]+) of ([\d,]+)", out
    )
    assert [what for _, what, _, _ in found] == ["planted", "copies", "copies"]
    for removed, _, hit, planted in found:
        assert number(hit) == number(planted) == number(removed) == 20
    assert "(a) 200 images, exact,phash" in out and "(d0) 200 images" in out


def test_bench_calibrate(tmp_path):
    """make bench-calibrate: canaries planted and caught; the edit suite's part says why
    it was skipped (it needs the bench extra's photographs); calibrate on the set."""
    out = bench(tmp_path, "bench_calibrate.py", "--smoke")
    assert "(a) 200 images, exact,phash,views" in out
    caught = re.findall(r"with --canaries (\d+): .*caught (\d+) of (\d+)", out)
    assert [n for n, _, _ in caught] == ["20"]
    for n, hit, planted in caught:
        assert int(planted) == int(n) and 0 < int(hit) <= int(planted)
    assert "(b) skipped: no edit suite" in out
    copies = re.search(
        r"\(c\) calibrate --sample 20 on the web-size set: .*\(([\d,]+) copies\)", out
    )
    assert number(copies[1]) > 0


def test_bench_keep(tmp_path):
    """make bench-keep: every kind of copy planted; each default policy's run is scored,
    every group that lost a member is counted, and most planted copies are removed."""
    out = bench(tmp_path, "bench_keep.py", "--smoke")
    head = re.search(r"(\d+) samples in 4 shards: 10 originals, (\d+) copies, 6 distractors", out)
    copies = int(head[2])
    assert int(head[1]) == 16 + copies
    planted = re.findall(r"(\w+) (\d+)", out.split("copies per kind: ")[1].splitlines()[0])
    assert len(planted) == 14 and all(int(n) >= 2 for _, n in planted)
    assert sum(int(n) for _, n in planted) == copies
    for policy in ("largest", "first", "clean,content,quality,hub,typical,noise,first"):
        section = out.split(f"== keep {policy}: ")[1].split("== keep ")[0]
        rows = re.findall(r"^\| (\w+) \| (\d+) \| ", section, re.M)
        assert [(k, int(n)) for k, n in rows] == [(k, int(n)) for k, n in planted]
        kept = re.search(r"original kept: (\d+)/(\d+) .*\((\d+) groups untouched", section)
        assert int(kept[1]) <= int(kept[2]) and int(kept[2]) + int(kept[3]) == 10
        pairs = re.search(r"pair recall: (\d+)/(\d+) .*; precision: (\d+)/(\d+)", section)
        assert int(pairs[2]) == copies and int(pairs[1]) == int(pairs[3])
        assert copies // 2 <= int(pairs[1]) <= int(pairs[4])


def test_bench_transfer(tmp_path):
    """make bench-transfer: calibrate's estimate and the real run's share for every kind of
    bench-keep copy, the difference in points, and the count within 10 points."""
    out = bench(tmp_path, "bench_transfer.py", "--smoke")
    assert "10 originals of" in out
    rows = re.findall(
        r"^\| (\w+) \| [\w, +]+ \| (\d+)% \| (\d+)% \((\d+)/(\d+)\) \| ([+-]\d+) \|", out, re.M
    )
    assert len(rows) >= 10
    for _, said, real, found, copies, points in rows:
        assert int(found) <= int(copies) and int(copies) >= 1
        assert abs(int(said) - int(real) - int(points)) <= 1  # rounding
    within = re.search(r"within 10 points: (\d+) of (\d+) kinds", out)
    assert int(within[2]) == len(rows)
    assert int(within[1]) == sum(abs(int(p)) <= 10 for *_, p in rows)


def test_calibrate(tmp_path):
    """make calibrate: the draft check on every set, a row for every synthetic edit, and
    the unrelated pairs of 60 originals."""
    out = bench(tmp_path, "calibrate_phash.py", "--smoke")
    drafts = re.findall(r"mean +[\d.]+ +p99 +\d+ +max +\d+ +\((\d+) images\)", out)
    assert [int(n) for n in drafts] == [20, 4, 20, 10, 10]
    for edit in (*NEAR_EDITS, *HARD_EDITS):
        assert re.search(rf"^{edit} +[\d.]+ +\d+ +\d+$", out, re.M), edit
    assert "unrelated pairs: 1,770;" in out
    within = [number(n) for n in re.findall(r"pairs within +\d+ bits: ([\d,]+)", out)]
    assert len(within) == 7 and within == sorted(within)


def test_calibrate_photos(tmp_path):
    """make calibrate-photos: the edit table and the false-pair table on three
    photographs (synthetic stand-ins without the bench extra), then tiny_images.py."""
    out = bench(tmp_path, "calibrate_photos.py", "--smoke")
    assert "42 distinct pictures from 3 photographs" in out
    edits = re.findall(r"^\| [^|]+ \| \d+ \|((?: \d+% \|){7})$", out, re.M)
    assert len(edits) >= 10
    assert "unrelated pairs: 861 (" in out  # 42 * 41 / 2
    thresholds = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \|", out, re.M)
    assert [int(t) for t, _, _ in thresholds] == [4, 6, 8, 10, 12, 14, 16]
    assert all(int(within) <= int(k) for _, k, within in thresholds)
    out = bench(tmp_path, "tiny_images.py")
    assert "| 28x28 digits, distinct: false pairs | 28,680 |" in out  # 240 * 239 / 2
    assert "| 32x32 pictures, distinct: false pairs | 19,900 |" in out  # 200 * 199 / 2
    recall = re.findall(
        r"^\| [^|]+ \| (\d+)% \(pHash \d+%\) \| (\d+)% \(pHash \d+%\) \|$", out, re.M
    )
    assert len(recall) >= 5


def test_golden_record(tmp_path):
    """make golden-record: every configuration runs and every output is digested."""
    out = bench(tmp_path, "golden.py", "record", "golden.json", "--work", "work")
    recorded = json.loads((tmp_path / "golden.json").read_text())
    assert set(recorded) == {"exact-phash", "default", "against", "fanout", "ray"}
    for files in recorded.values():
        assert {"samples.parquet", "clusters.parquet", "summary.json"} < set(files)
        assert any(name.endswith(".tar") for name in files)
        assert all(re.fullmatch(r"[0-9a-f]{64}", digest) for digest in files.values())
    total = sum(map(len, recorded.values()))
    assert f"golden: recorded {total} outputs in golden.json" in out
    assert os.path.isdir(tmp_path / "work" / "out" / "ray")
