"""Fan-out for orchestrators: `dedup extract --part I/N`, `dedup cluster`, `dedup write
--part I/N` give OUT byte for byte as one `dedup` run, in any order, concurrently, in
object storage; cluster waits for every extract part and names the missing ones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.commands.fanout import parts_of
from dedup.io import storage
from dedup.synth import planted_dataset, write_shards
from tests.helpers import (
    DEDUP,
    FLAGS,
    NO_MODEL_FLAGS,
    VIEWS,
    add_sample,
    dedup,
    error_line,
    first_image,
    local_outputs,
    outputs,
    remote_outputs,
    started_together,
    upload,
)


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
    dedup(root / "in", "--out", root / "one", *VIEWS, *extra)
    return root, extra


def user_tree(out: Path) -> list[str]:
    """The files and folders of an OUT outside its state folder (.dedup), but the lock
    file a run holds on its report folder (fan-out tasks take no lock)."""
    return sorted(
        str(p.relative_to(out))
        for p in out.rglob("*")
        if p.relative_to(out).parts[0] != ".dedup" and p.name != ".dedup-report.lock"
    )


def temporaries(out: Path) -> list[Path]:
    """Temporary folders (.dedup-tmp) anywhere in OUT, its state folder's included."""
    return [p for p in out.rglob("*") if p.name == ".dedup-tmp"]


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
        dedup("extract", root / "in", "--out", out, "--part", f"{i}/3", *VIEWS, *extra)
    dedup("cluster", "--out", out, "--workers", "1")
    first = dedup("write", "--out", out, "--part", "1/2", "--json")
    assert json.loads(first.stdout) == {"part": "1/2", "report": False}
    last = dedup("write", "--out", out, "--part", "0/2", "--json")
    summary = json.loads(last.stdout)
    assert outputs(out) == outputs(root / "one")
    assert user_tree(out) == user_tree(root / "one")
    assert temporaries(out) == []
    one = json.loads((root / "one" / "dedup-report" / "summary.json").read_text())
    for counts in (summary["counts"], one["counts"]):
        counts["verify"].pop("task_seconds")  # a timing
    assert summary["counts"] == one["counts"] and summary["references"] == one["references"]
    assert (out / "dedup-report" / "report.html").exists()
    job = json.loads((out / ".dedup" / "job.json").read_text())
    assert job["complete"] is True


@pytest.mark.slow  # eleven tasks, then three writes at once
def test_cluster_waits_for_every_extract_part(crawl, tmp_path):
    root, extra = crawl
    out = tmp_path / "out"
    dedup("extract", root / "in", "--out", out, "--part", "0/4", *VIEWS, *extra)
    dedup("extract", root / "in", "--out", out, "--part", "2/4", *VIEWS, *extra)
    waiting = dedup("cluster", "--out", out, check=2)
    assert "extract parts 1/4, 3/4 have not finished" in error_line(waiting)
    early = dedup("write", "--out", out, "--part", "0/1", check=2)
    assert "the cluster task has not finished" in error_line(early)
    other = dedup(
        "extract", root / "in", "--out", out, "--part", "1/4", "--phash-threshold", "4", check=2
    )
    assert "other inputs or settings" in error_line(other)
    dedup("extract", root / "in", "--out", out, "--part", "1/4", *VIEWS, *extra)
    dedup("extract", root / "in", "--out", out, "--part", "3/4", *VIEWS, *extra)
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
    assert temporaries(out) == []  # the last part to finish removed them
    # a write part run again after a failure: the same bytes, its shards left as they were
    again = dedup("write", "--out", out, "--part", "2/3")
    assert "unchanged since the last run" in again.stderr
    assert outputs(out) == outputs(root / "one")


@pytest.mark.slow  # S3: a fan-out of seven tasks
def test_a_fan_out_in_object_storage(crawl, s3, bucket, tmp_path):
    root, _ = crawl
    upload(root / "in", f"{bucket}/in")
    out = f"{bucket}/out"
    for i in (1, 0):
        dedup("extract", f"{bucket}/in/", "--out", out, "--part", f"{i}/2", *VIEWS, env=s3)
    dedup("cluster", "--out", out, env=s3)
    for i in (0, 1, 2):
        dedup("write", "--out", out, "--part", f"{i}/3", env=s3)
    dedup(root / "in", "--out", tmp_path / "local", *VIEWS)
    local = {p.name: p.read_bytes() for p in sorted((tmp_path / "local").glob("*.tar"))}
    remote = {n: storage.read_bytes(f"{out}/{n}") for n in local}
    assert remote == local
    rows = pq.read_table(pa.BufferReader(storage.read_bytes(f"{out}/dedup-report/samples.parquet")))
    mine = pq.read_table(tmp_path / "local" / "dedup-report" / "samples.parquet")
    assert rows.column("kept").to_pylist() == mine.column("kept").to_pylist()


@pytest.mark.slow  # ten tasks and one run
def test_a_new_fan_out_into_a_finished_out(crawl, tmp_path):
    """Next week's DAG run writes the same OUT with other inputs: once the last run
    finished, a new fan-out starts; parts of the old run are never mixed in."""
    root, _ = crawl
    out = tmp_path / "out"
    for i in range(2):
        dedup("extract", root / "in", "--out", out, "--part", f"{i}/2", *VIEWS)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/1")
    fewer = sorted((root / "in").glob("*.tar"))[:3]
    dedup("extract", *fewer, "--out", out, "--part", "1/2", *VIEWS)
    waiting = dedup("cluster", "--out", out, check=2)  # part 0/2 is the old run's
    assert "extract part 0/2 has not finished" in error_line(waiting)
    dedup("extract", *fewer, "--out", out, "--part", "0/2", *VIEWS)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/1")
    dedup(*fewer, "--out", tmp_path / "one", *VIEWS)
    assert outputs(out) == outputs(tmp_path / "one")  # the dropped shards' outputs gone


# ------------------------------------------------------------ as orchestrators run it


def five_small_shards(folder: Path) -> Path:
    """Five shards (copies within and across them) in `folder`."""
    samples = planted_dataset(
        24, {"exact": 5, "reencode": 4, "resize": 3}, seed=5, size=(64, 48), bad=False
    )
    write_shards(samples, str(folder), 8)
    return folder


def one_run(inputs, dest, *flags):
    """The oracle: one `dedup` run over the inputs as they are now."""
    dedup(*inputs, "--out", dest, *(flags or FLAGS))
    return outputs(dest)


@pytest.fixture
def small(tmp_path):
    """The five small shards in a folder the test may change."""
    return five_small_shards(tmp_path / "in")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """The five small shards, left as they are, and the oracle of a fan-out over them:
    (folder, the outputs of one run)."""
    root = tmp_path_factory.mktemp("small")
    inputs = five_small_shards(root / "in")
    return inputs, one_run([inputs], root / "one")


def fan_out(inputs, out, parts=2, writes=1, flags=FLAGS, env=None):
    for i in range(parts):
        dedup("extract", *inputs, "--out", out, "--part", f"{i}/{parts}", *flags, env=env)
    dedup("cluster", "--out", out, env=env)
    for i in range(writes):
        dedup("write", "--out", out, "--part", f"{i}/{writes}", env=env)


@pytest.mark.slow  # three fan-outs, three oracle runs
def test_a_rerun_after_an_input_changed_describes_the_current_inputs(small, tmp_path):
    """A finished fan-out; one input shard gains a sample; the orchestrator reruns only
    cluster and write (or only write). The plan is made from the current inputs, or
    refused: never an exit 0 with the old shard's results."""
    out = tmp_path / "out"
    fan_out([small], out, parts=2, writes=2)
    assert outputs(out) == one_run([small], tmp_path / "one")
    shards = sorted(small.glob("*.tar"))
    add_sample(shards[2], "added-copy", first_image(shards[0]))  # an exact copy of another
    # Only write rerun: its plan was made from the old bytes: refused, exit 3.
    stale = dedup("write", "--out", out, "--part", "0/2", check=None)
    stale_other = dedup("write", "--out", out, "--part", "1/2", check=None)
    codes = sorted([stale.returncode, stale_other.returncode])
    assert codes == [0, 3], (stale.stderr, stale_other.stderr)
    refused = stale if stale.returncode == 3 else stale_other
    assert f"{shards[2]}" in error_line(refused) and "changed" in error_line(refused)
    assert not (out / "dedup-report" / "summary.json").exists()
    assert json.loads((out / ".dedup" / "job.json").read_text())["complete"] is False
    # cluster and write rerun: the changed shard is extracted again by cluster.
    again = dedup("cluster", "--out", out)
    assert "1 shards changed since their extract part read them" in again.stderr
    for i in range(2):
        dedup("write", "--out", out, "--part", f"{i}/2")
    current = one_run([small], tmp_path / "two")
    assert outputs(out) == current
    rows = pq.read_table(out / "dedup-report" / "samples.parquet").to_pylist()
    added = [r for r in rows if r["key"] == "added-copy"]
    assert len(added) == 1 and added[0]["kept"] is False  # a copy: removed
    # A full rerun after another change gives the current bytes too.
    add_sample(shards[4], "added-unique", first_image(shards[1])[:-7] + b"\0" * 7)
    fan_out([small], out, parts=3, writes=1)
    assert outputs(out) == one_run([small], tmp_path / "three")


@pytest.mark.slow  # Airflow's mapped tasks: started together, repeated
def test_extract_parts_started_together_on_a_fresh_out(small_set, tmp_path):
    """Airflow's mapped tasks start at the same time: every part claims OUT or sees a
    claim of the same job; none is refused. Repeated to meet the race."""
    small, oracle = small_set
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        parts = [["extract", small, "--out", out, "--part", f"{i}/4", *FLAGS] for i in range(4)]
        results = started_together(parts, tmp_path / "go")
        assert [code for code, _ in results] == [0] * 4, results
        dedup("cluster", "--out", out)
        procs = [
            subprocess.Popen([DEDUP, "write", "--out", str(out), "--part", f"{i}/2", "-q"])
            for i in range(2)
        ]
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
        assert outputs(out) == oracle


@pytest.mark.slow  # Airflow's mapped tasks: started together, repeated
def test_extract_parts_started_together_in_object_storage(small_set, s3, bucket, tmp_path):
    small, local = small_set
    upload(small, f"{bucket}/in")
    for attempt in range(2):
        out = f"{bucket}/out{attempt}"
        parts = [
            ["extract", f"{bucket}/in/", "--out", out, "--part", f"{i}/3", *FLAGS] for i in range(3)
        ]
        results = started_together(parts, tmp_path / "go", env=s3)
        assert [code for code, _ in results] == [0] * 3, results
        dedup("cluster", "--out", out, env=s3)
        dedup("write", "--out", out, "--part", "0/1", env=s3)
        assert {n: storage.read_bytes(f"{out}/{n}") for n in local if n.endswith(".tar")} == {
            n: data for n, data in local.items() if n.endswith(".tar")
        }


@pytest.mark.slow  # six tasks
def test_a_task_chooses_its_own_workers_and_executor(small_set, tmp_path):
    """Settings that change where and how fast a task runs may differ between parts;
    a setting that changes results may not."""
    small, oracle = small_set
    out = tmp_path / "out"
    signals = ["--signals", "exact,phash"]
    dedup("extract", small, "--out", out, "--part", "0/3", *signals, "--workers", "1")
    dedup("extract", small, "--out", out, "--part", "1/3", *signals, "--workers", "2")
    dedup(
        "extract", small, "--out", out, "--part", "2/3", *signals, "--executor", "local",
        "--batch-size", "8",
    )  # fmt: skip
    other = dedup(
        "extract", small, "--out", out, "--part", "2/3", *signals, "--keep", "first", check=2
    )
    assert (
        "keep: 'first' here, 'clean,content,quality,hub,typical,noise,first' there"
        in error_line(other)
    )
    dedup("cluster", "--out", out, "--workers", "1")
    dedup("write", "--out", out, "--part", "0/1", "--workers", "2")
    assert outputs(out) == oracle


@pytest.mark.slow  # twelve tasks and one run
def test_a_new_part_count_starts_the_extract_afresh(small_set, tmp_path):
    small, oracle = small_set
    out = tmp_path / "out"
    dedup("extract", small, "--out", out, "--part", "0/2", *FLAGS)  # 1/2 never ran
    for i in range(3):
        dedup("extract", small, "--out", out, "--part", f"{i}/3", *FLAGS)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/2")
    dedup("write", "--out", out, "--part", "1/2")
    assert outputs(out) == oracle
    # Back to two parts, with --overwrite; a part of the new N still missing is named.
    dedup("extract", small, "--out", out, "--part", "1/2", *FLAGS, "--overwrite")
    waiting = dedup("cluster", "--out", out, check=2)
    assert "extract part 0/2 has not finished" in error_line(waiting)
    dedup("extract", small, "--out", out, "--part", "0/2", *FLAGS, "--overwrite")
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/1")
    assert outputs(out) == oracle


@pytest.mark.slow  # nine tasks and one run
def test_a_new_job_retires_the_finished_summary_at_once(small_set, tmp_path):
    """While a new job is half written, no finished summary describes OUT: neither in
    OUT's report folder nor in the earlier job's --report folder."""
    small, _ = small_set
    out, elsewhere = tmp_path / "out", tmp_path / "report"
    for i in range(2):
        dedup("extract", small, "--out", out, "--part", f"{i}/2", *FLAGS, "--report", elsewhere)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/1")
    assert (elsewhere / "summary.json").exists()
    fewer = sorted(small.glob("*.tar"))[:2]
    dedup("extract", *fewer, "--out", out, "--part", "0/2", *FLAGS)
    assert not (elsewhere / "summary.json").exists()
    assert not (elsewhere / "report.html").exists()
    assert json.loads((out / ".dedup" / "job.json").read_text())["complete"] is False
    dedup("extract", *fewer, "--out", out, "--part", "1/2", *FLAGS)
    dedup("cluster", "--out", out)
    dedup("write", "--out", out, "--part", "0/2")
    assert not (out / "dedup-report" / "summary.json").exists()  # part 1/2 still to write
    dedup("write", "--out", out, "--part", "1/2")
    assert json.loads((out / ".dedup" / "job.json").read_text())["complete"] is True
    assert outputs(out) == one_run(fewer, tmp_path / "one")


@pytest.mark.slow  # about twenty tasks against the S3 server
def test_reruns_part_counts_settings_and_new_jobs_in_object_storage(small, s3, bucket, tmp_path):
    """The orchestrator's schedule in S3: a task's own settings differ between parts; the
    part count changes; an input object is replaced after a finished run and only
    cluster and write rerun (the changed object is extracted again); a new job retires
    the finished summary at once. OUT equals one run over the inputs as they are."""
    inputs, out = f"{bucket}/in", f"{bucket}/out"
    upload(small, inputs)
    summary = f"{out}/dedup-report/summary.json"

    def run_parts(n, *extra, listing=(f"{inputs}/",)):
        for i in range(n):
            workers = ["--workers", str(1 + i % 2)]
            dedup("extract", *listing, "--out", out, "--part", f"{i}/{n}", *NO_MODEL_FLAGS,
                  *workers, *extra, env=s3)  # fmt: skip

    def oracle(name: str, folder) -> dict:
        dedup(*sorted(folder.glob("*.tar")), "--out", tmp_path / name, *FLAGS)
        return local_outputs(tmp_path / name)

    dedup("extract", f"{inputs}/", "--out", out, "--part", "0/2", *FLAGS, env=s3)
    run_parts(3)  # the part count changed: parts of 2 are discarded
    dedup("cluster", "--out", out, "--workers", "1", env=s3)
    dedup("write", "--out", out, "--part", "0/1", env=s3)
    assert remote_outputs(out) == oracle("one", small)
    # An input object replaced (a new ETag); only cluster and write rerun.
    shard = sorted(small.glob("*.tar"))[3]
    add_sample(shard, "added-copy", first_image(sorted(small.glob("*.tar"))[0]))
    storage.put_file(str(shard), f"{inputs}/{shard.name}")
    again = dedup("cluster", "--out", out, env=s3)
    assert "1 shards changed since their extract part read them" in again.stderr
    assert not storage.exists(summary)  # OUT is being rewritten
    for i in range(2):
        dedup("write", "--out", out, "--part", f"{i}/2", env=s3)
    assert remote_outputs(out) == oracle("two", small)
    # A new job (fewer inputs): its first part retires the finished summary.
    fewer = [f"{inputs}/{p.name}" for p in sorted(small.glob("*.tar"))[:2]]
    run_parts(2, listing=fewer)
    assert not storage.exists(summary)
    job = json.loads(storage.read_bytes(f"{out}/.dedup/job.json"))
    assert job["complete"] is False
    dedup("cluster", "--out", out, env=s3)
    dedup("write", "--out", out, "--part", "0/1", env=s3)
    folder = tmp_path / "fewer"
    folder.mkdir()
    for p in sorted(small.glob("*.tar"))[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    assert remote_outputs(out) == oracle("three", folder)
