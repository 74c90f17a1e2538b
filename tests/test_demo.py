"""`python -m dedup.demo` (`make demo`): its figures are the planted truth held against the
run's own report, it names every copy it missed, and it needs nothing the base install
lacks (no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow.parquet as pq
import pytest

from dedup.synth import DEMO_SEED, demo_copies, planted_dataset
from tests.helpers import REPO

# The demo in a fresh interpreter, then the heavy optional modules it loaded on the way.
PROBE = (
    "import sys\n"
    "from dedup.demo import main\n"
    "code = main(sys.argv[1:])\n"
    "print('heavy modules:', sorted({m.split('.')[0] for m in sys.modules}\n"
    "      & {'torch', 'torchvision', 'open_clip', 'ray'}))\n"
    "sys.exit(code)\n"
)
# 120 originals: two crops missed, one never a candidate, one rejected by verification.
ORIGINALS = "120"


def run_demo(folder, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(folder), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def shard_name(row: dict) -> str:
    return row["shard"].rsplit("/", 1)[1]


@pytest.mark.slow
def test_the_demo_prints_the_planted_truth_against_the_report(tmp_path):
    folder = tmp_path / "demo"
    result = run_demo(folder, "--originals", ORIGINALS)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "heavy modules: []"

    samples = planted_dataset(int(ORIGINALS), demo_copies(int(ORIGINALS)), seed=DEMO_SEED)
    report = folder / "clean" / "dedup-report"
    rows = {r["key"]: r for r in pq.read_table(report / "samples.parquet").to_pylist()}
    summary = json.loads((report / "summary.json").read_text())
    group = {s.key: s.group for s in samples}
    original = {s.group: s.key for s in samples if s.edit == "original"}
    copies = [s for s in samples if s.group is not None and s.edit != "original"]
    edits = Counter(s.edit for s in copies)
    assert (
        f"  {len(copies)} copies of {len({s.group for s in copies})} originals: "
        + ", ".join(f"{e} {n}" for e, n in demo_copies(int(ORIGINALS)).items())
        in lines
    )

    removed = Counter(r["reason"] for r in rows.values() if not r["kept"])
    assert removed == Counter(summary["counts"]["removed_by_reason"])
    for reason, n in removed.items():
        assert any(line.startswith(f"  {reason:<9} {n:>4}  ") for line in lines), reason

    def caught(s) -> bool:
        return rows[s.key]["cluster_id"] == rows[original[s.group]]["cluster_id"]

    for edit, n in edits.items():
        hit = sum(caught(s) for s in copies if s.edit == edit)
        assert f"  {edit:<9} {hit:>3} of {n:>3} caught ({100 * hit / n:.0f}%)" in lines
    missed = sorted((s for s in copies if not caught(s)), key=lambda s: s.key)
    assert [s.key for s in missed] == ["000063", "000104"]
    assert f"Missed copies: {len(missed)}" in lines
    for s in missed:
        of = original[s.group]
        at = lines.index(
            f"  {s.key} ({shard_name(rows[s.key])}), a {s.edit} copy of {of} "
            f"({shard_name(rows[of])}):"
        )
        a, b = rows[s.key]["phash"], rows[of]["phash"]
        distance = bin(int(a, 16) ^ int(b, 16)).count("1")
        assert lines[at + 1] == f"    pHash distance {distance} bits, over the pHash threshold 8"
        assert lines[at + 2].startswith("    closest views ")
    # One was never a candidate pair; verification rejected the other: the two whys.
    assert "    so it was never a candidate pair" in lines
    assert any(line.startswith("    verification rejected the pair: ") for line in lines)

    false = [k for k, r in rows.items() if not r["kept"] and group[r["duplicate_of"]] != group[k]]
    assert false == []
    assert "False removals (a sample removed as a copy of another picture): none" in lines
    lonely = [k for g, k in original.items() if g not in {s.group for s in copies}]
    assert all(rows[k]["kept"] for k in lonely)
    assert any(
        line.startswith(f"Distractors kept: {len(lonely)} of {len(lonely)}; ") for line in lines
    )
    assert lines[-2].startswith(f"The report: {report / 'report.html'} ")

    # The same lines a second time, but for the CLI's timings.
    folder.rename(tmp_path / "first")
    again = run_demo(folder, "--originals", ORIGINALS)
    assert again.returncode == 0, again.stderr
    timeless = [line for line in lines if not line.startswith("dedup: time: ")]
    assert [
        ln for ln in again.stdout.splitlines() if not ln.startswith("dedup: time: ")
    ] == timeless


def test_the_demo_refuses_a_folder_that_holds_something(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_demo(tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr == f"dedup demo: {tmp_path} is not empty; remove it or name another folder\n"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
