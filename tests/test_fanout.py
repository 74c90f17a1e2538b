"""Fan-out for orchestrators: `dedup extract --part I/N`, `dedup cluster`, `dedup write
--part I/N` give OUT byte for byte as one `dedup` run, in any order, concurrently, in
object storage; cluster waits for every extract part and names the missing ones."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup import storage
from dedup.fanout import parts_of
from dedup.synth import planted_dataset, write_shards
from tests.test_hostile import DEDUP, error_line, outputs
from tests.test_storage import bucket, upload  # noqa: F401 - a fixture

FLAGS = ["--signals", "exact,phash,views", "--workers", "2"]


def dedup(*args, check: int | None = 0, env=None):
    result = subprocess.run(
        [DEDUP, *map(str, args)],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )
    assert "Traceback" not in result.stderr, result.stderr
    if check is not None:
        assert result.returncode == check, result.stderr
    return result


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    """Seven shards of unequal sizes, copies within and across them; an evaluation set;
    and the output of one `dedup` run over them."""
    root = tmp_path_factory.mktemp("fanout")
    samples = planted_dataset(
        50, {"exact": 8, "reencode": 8, "mirror": 5, "resize": 5}, seed=9, size=(112, 84)
    )
    sizes = [4, 20, 9, 13, 3, 18, 11]
    at = 0
    for n, size in enumerate(sizes):
        part = samples[at : at + size]
        at += size
        write_shards(part, str(root / "in"), size, f"s{n}")
    write_shards(samples[at:], str(root / "in"), 100, "s7")
    eval_copy = planted_dataset(3, {}, seed=9, size=(112, 84), bad=False)  # originals 0-2
    write_shards(eval_copy, str(root / "eval"), 10, "eval")
    extra = ["--against", root / "eval"]
    dedup(root / "in", "--out", root / "one", *FLAGS, *extra)
    return root, extra


def test_parts_are_balanced_by_bytes():
    assert parts_of([10, 1, 1, 1, 7, 2], 2) == [[0, 2], [1, 3, 4, 5]]  # 11 and 11 bytes
    assert parts_of([5, 5, 5], 4) == [[0], [1], [2], []]
    groups = parts_of(list(range(1, 101)), 7)
    loads = [sum(p + 1 for p in g) for g in groups]
    assert sorted(p for g in groups for p in g) == list(range(100))
    assert max(loads) - min(loads) <= 100  # within one shard of each other


def test_all_parts_equal_one_run_byte_for_byte(crawl, tmp_path):
    root, extra = crawl
    out = tmp_path / "out"
    for i in (2, 0, 1):  # any order
        dedup("extract", root / "in", "--out", out, "--part", f"{i}/3", *FLAGS, *extra)
    dedup("cluster", "--out", out, "--workers", "1")
    first = dedup("write", "--out", out, "--part", "1/2", "--json")
    assert json.loads(first.stdout) == {"part": "1/2", "report": False}
    last = dedup("write", "--out", out, "--part", "0/2", "--json")
    summary = json.loads(last.stdout)
    assert outputs(out) == outputs(root / "one")
    one = json.loads((root / "one" / "dedup-report" / "summary.json").read_text())
    for counts in (summary["counts"], one["counts"]):
        counts["verify"].pop("task_seconds")  # a timing
    assert summary["counts"] == one["counts"] and summary["references"] == one["references"]
    assert (out / "dedup-report" / "report.html").exists()
    job = json.loads((out / ".dedup" / "job.json").read_text())
    assert job["complete"] is True


def test_cluster_waits_for_every_extract_part(crawl, tmp_path):
    root, extra = crawl
    out = tmp_path / "out"
    dedup("extract", root / "in", "--out", out, "--part", "0/4", *FLAGS, *extra)
    dedup("extract", root / "in", "--out", out, "--part", "2/4", *FLAGS, *extra)
    waiting = dedup("cluster", "--out", out, check=2)
    assert "extract parts 1/4, 3/4 have not finished" in error_line(waiting)
    early = dedup("write", "--out", out, "--part", "0/1", check=2)
    assert "the cluster task has not finished" in error_line(early)
    other = dedup(
        "extract", root / "in", "--out", out, "--part", "1/4", "--phash-threshold", "4", check=2
    )
    assert "other inputs or settings" in error_line(other)
    dedup("extract", root / "in", "--out", out, "--part", "1/4", *FLAGS, *extra)
    dedup("extract", root / "in", "--out", out, "--part", "3/4", *FLAGS, *extra)
    differs = dedup("cluster", "--out", out, "--phash-threshold", "4", check=2)
    assert "phash_threshold: 4 differs from this fan-out's 8" in error_line(differs)
    dedup("cluster", "--out", out)
    # write parts at the same time; either may make the report, once both are done
    procs = [
        subprocess.Popen([DEDUP, "write", "--out", str(out), "--part", f"{i}/3", "-q"])
        for i in range(3)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert outputs(out) == outputs(root / "one")
    # a write part run again after a failure: the same bytes, its shards left as they were
    again = dedup("write", "--out", out, "--part", "2/3")
    assert "unchanged since the last run" in again.stderr
    assert outputs(out) == outputs(root / "one")


def test_a_fan_out_in_object_storage(crawl, s3, bucket, tmp_path):  # noqa: F811
    root, _ = crawl
    upload(root / "in", f"{bucket}/in")
    out = f"{bucket}/out"
    for i in (1, 0):
        dedup("extract", f"{bucket}/in/", "--out", out, "--part", f"{i}/2", *FLAGS, env=s3)
    dedup("cluster", "--out", out, env=s3)
    for i in (0, 1, 2):
        dedup("write", "--out", out, "--part", f"{i}/3", env=s3)
    dedup(root / "in", "--out", tmp_path / "local", *FLAGS)
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("*.tar"))}
    remote = {n: storage.read_bytes(f"{out}/{n}") for n in local}
    assert remote == local
    rows = pq.read_table(pa.BufferReader(storage.read_bytes(f"{out}/dedup-report/samples.parquet")))
    mine = pq.read_table(tmp_path / "local" / "dedup-report" / "samples.parquet")
    assert rows.column("kept").to_pylist() == mine.column("kept").to_pylist()


def test_a_new_fan_out_into_a_finished_out(crawl, tmp_path):
    """Next week's DAG run writes the same OUT with other inputs: once the last run
    finished, a new fan-out starts; parts of the old run are never mixed in."""
    root, _ = crawl
    out = tmp_path / "out"
    for i in range(2):
        dedup("extract", root / "in", "--out", out, "--part", f"{i}/2", *FLAGS)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/1")
    fewer = sorted((root / "in").glob("*.tar"))[:3]
    dedup("extract", *fewer, "--out", out, "--part", "1/2", *FLAGS)
    waiting = dedup("cluster", "--out", out, check=2)  # part 0/2 is the old run's
    assert "extract part 0/2 has not finished" in error_line(waiting)
    dedup("extract", *fewer, "--out", out, "--part", "0/2", *FLAGS)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/1")
    dedup(*fewer, "--out", tmp_path / "one", *FLAGS)
    assert outputs(out) == outputs(tmp_path / "one")  # the dropped shards' outputs gone
