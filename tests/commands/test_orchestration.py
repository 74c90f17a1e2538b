"""dedup inside Make and Airflow: one-line --json, workers from the CPUs this process may
use, the light install's default signals, --help's defaults, phase log lines, summary
paths that do not depend on the caller's working directory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from dedup.core.config import _cgroup_quota, available_cpus
from dedup.synth import planted_dataset, write_shards
from tests.helpers import dedup


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("orch")
    samples = planted_dataset(20, {"exact": 4, "reencode": 3}, seed=2, size=(96, 72))
    write_shards(samples, str(root / "in"), 10)
    return root


def test_json_is_one_line_for_xcom(small_set, tmp_path):
    result = dedup(
        small_set / "in", "--out", tmp_path / "out", "--signals", "exact,phash", "--json"
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # Airflow's BashOperator pushes the last line
    summary = json.loads(lines[0])
    assert summary["counts"]["removed"] == 7
    assert "kept" in result.stderr and "removed 7" in result.stderr  # the human summary


def test_workers_follow_the_affinity_mask(small_set, tmp_path):
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs and sched_setaffinity")
    result = dedup(
        small_set / "in",
        "--out",
        tmp_path / "out",
        "--signals",
        "exact,phash",
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),
    )
    assert "executor local (1 parallel tasks)" in result.stderr


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_containers_cpu_quota_caps_the_workers(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(str(tmp_path)) == expected
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    want = mask if expected is None else min(mask, -(-expected // 1))
    assert available_cpus(str(tmp_path)) == want


BLOCK_TORCH = """
import sys
class NoTorch:  # the light install: torch, torchvision and open_clip are not there
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "open_clip"):
            raise ImportError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from dedup.cli import main
sys.argv = ["dedup", *sys.argv[1:]]
main()
"""


def test_without_torch_the_default_runs_and_clip_by_name_fails(small_set, tmp_path):
    no_torch = [sys.executable, "-c", BLOCK_TORCH]
    result = dedup(small_set / "in", "--out", tmp_path / "out", "--json", program=no_torch)
    summary = json.loads(result.stdout)
    assert summary["config"]["signals"] == ["exact", "phash", "views"]
    off = [ln for ln in result.stderr.splitlines() if "clip: off" in ln]
    assert len(off) == 1 and "needs torch and open_clip" in off[0], result.stderr
    asked = dedup(
        small_set / "in",
        "--out",
        tmp_path / "o2",
        "--signals",
        "exact,clip",
        program=no_torch,
        check=6,
    )
    assert "pip install 'dedup-wds[clip]'" in asked.stderr
    assert not (tmp_path / "o2").exists()


def test_help_shows_each_default():
    text = dedup("--help").stdout
    for shown in (
        "[default: 8]",
        "[default: auto]",
        "[default: clean, content, quality, hub, typical, noise, first]",
        "[default: verify]",
    ):
        assert shown in " ".join(text.split()), shown


def test_phase_lines_and_a_rerun_that_reuses_features(small_set, tmp_path):
    flags = ["--signals", "exact,phash", "--workers", "2"]
    first = dedup(small_set / "in", "--out", tmp_path / "out", *flags)
    for phase in ("extract", "cluster", "write"):
        assert f"phase {phase} done in" in first.stderr
    again = dedup(small_set / "in", "--out", tmp_path / "out", *flags)
    assert "extract: nothing to read (stored features reused)" in again.stderr
    assert "extract: 0 samples" not in again.stderr
    assert "(stored features of 3 shards reused)" in again.stderr


def test_summary_paths_do_not_depend_on_the_working_directory(small_set, tmp_path):
    dedup(small_set / "in", "--out", "out", "--signals", "exact,phash", cwd=tmp_path)
    summary = json.loads((tmp_path / "out" / "dedup-report" / "summary.json").read_text())
    out = summary["output"]
    assert out["dir"] == str(tmp_path / "out")
    assert out["report"] == str(tmp_path / "out" / "dedup-report")
    assert all(Path(s["output"]).is_absolute() for s in summary["shards"])


@pytest.mark.slow  # four runs
def test_a_rerun_leaves_unchanged_shards_untouched(small_set, tmp_path):
    """Make fires downstream targets on a changed mtime: an unchanged shard keeps its
    bytes and mtime; only shards whose content changes are written again."""
    out = tmp_path / "out"
    flags = ["--signals", "exact,phash", "--workers", "2"]
    dedup(small_set / "in", "--out", out, *flags)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar"))}
    os.utime(out, ns=(1, 1))  # nothing below must depend on time passing
    again = dedup(small_set / "in", "--out", out, *flags, "--json")
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.glob("*.tar"))}
    assert after == before
    summary = json.loads(again.stdout)
    assert [s["output_unchanged"] for s in summary["shards"]] == [True] * 3
    assert "3 of them unchanged since the last run" in again.stderr
    # A shard someone touched is written again; so is one whose decisions change.
    first = sorted(out.glob("*.tar"))[0]
    first.write_bytes(b"not what dedup wrote")
    changed = dedup(small_set / "in", "--out", out, "--signals", "exact", "--json")
    shards = json.loads(changed.stdout)["shards"]
    assert not shards[0]["output_unchanged"]
    exact_only = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    dedup(small_set / "in", "--out", tmp_path / "fresh", "--signals", "exact")
    assert exact_only == {
        p.name: p.read_bytes() for p in sorted((tmp_path / "fresh").glob("*.tar"))
    }


@pytest.mark.slow  # three runs
def test_a_dry_run_never_replaces_a_real_runs_report(small_set, tmp_path):
    out = tmp_path / "out"
    dedup(small_set / "in", "--out", out, "--signals", "exact,phash")
    real = {p.name: p.read_bytes() for p in (out / "dedup-report").iterdir()}
    dry = dedup(small_set / "in", "--out", out, "--signals", "exact", "--dry-run")
    assert "the report goes to" in dry.stderr and "dedup-report-dry-run" in dry.stderr
    assert {p.name: p.read_bytes() for p in (out / "dedup-report").iterdir()} == real
    summary = json.loads((out / "dedup-report-dry-run" / "summary.json").read_text())
    assert summary["output"]["dry_run"] is True
    refused = dedup(
        small_set / "in", "--out", out, "--report", out / "dedup-report", "--dry-run", check=4
    )
    assert "holds the report of a real run" in refused.stderr


def test_img2dataset_sidecars_are_carried_for_the_kept_samples(tmp_path):
    """img2dataset writes 00000.parquet (a row per URL it tried) and 00000_stats.json
    beside 00000.tar: in OUT they describe the kept samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = planted_dataset(12, {"exact": 3, "reencode": 2}, seed=4, size=(96, 72), bad=False)
    for i, s in enumerate(samples):
        s.key = f"{i:09d}"
    write_shards(samples, str(tmp_path / "in"), 10, "x")
    for n, shard in enumerate(sorted((tmp_path / "in").glob("*.tar"))):
        stem = f"{n:05d}"
        shard.rename(tmp_path / "in" / f"{stem}.tar")
        mine = [s.key for s in samples[n * 10 : n * 10 + 10]]
        keys = [*mine, f"9{n:08d}"]  # and a URL that failed: in the table, not in the tar
        pq.write_table(
            pa.table(
                {
                    "url": [f"http://x/{k}" for k in keys],
                    "key": keys,
                    "status": ["success"] * len(mine) + ["failed_to_download"],
                }
            ),
            tmp_path / "in" / f"{stem}.parquet",
        )
        stats = {"count": len(keys), "successes": len(mine), "failed_to_download": 1}
        (tmp_path / "in" / f"{stem}_stats.json").write_text(json.dumps(stats))
    out = tmp_path / "out"
    dedup(tmp_path / "in", "--out", out, "--signals", "exact,phash")
    rows = pq.read_table(out / "dedup-report" / "samples.parquet").to_pylist()
    removed = {r["key"] for r in rows if not r["kept"]}
    assert len(removed) == 5
    for n in range(2):
        stem = f"{n:05d}"
        original = pq.read_table(tmp_path / "in" / f"{stem}.parquet").column("key").to_pylist()
        carried = pq.read_table(out / f"{stem}.parquet").column("key").to_pylist()
        assert carried == [k for k in original if k not in removed]
        stats = json.loads((out / f"{stem}_stats.json").read_text())
        gone = len(set(original) & removed)
        assert stats["successes"] == len(original) - 1 - gone
        assert stats["dedup"] == {"removed": gone, "kept": len(original) - 1 - gone}
    # dropping an input removes its carried files on the next run, nothing else
    (out / "notes.txt").write_text("mine")
    dedup(tmp_path / "in" / "00000.tar", "--out", out, "--signals", "exact,phash")
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
        "notes.txt",
    ]
