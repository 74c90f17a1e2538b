"""The Ray executor on a simulated two-node cluster (one session-wide `ray_cluster`): the
same output bytes as local processes, work on every node, a node lost in the middle of a
phase, and errors that cross Ray's process boundary with their exit code and message."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dedup.core import errors
from dedup.core.progress import Progress
from dedup.io import storage
from tests.helpers import (
    DEDUP,
    FLAGS,
    RAY_NODE,
    REPO,
    PlantedBug,
    dedup,
    error_line,
    free_port,
    held_inputs,
    local_outputs,
    outputs,
    read_tar,
    readers,
    remote_outputs,
    shards_of_every_kind,
    upload,
)

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a simulated two-node cluster

from dedup.executors.ray import RayExecutor  # noqa: E402 - after the skip without Ray


def on(cluster) -> list[str]:
    return ["--executor", "ray", "--ray-address", cluster.address]


@pytest.fixture
def shard_set(five_shards):
    """Five shards of about 20 planted samples (root/in), and the output of a local run
    of them (root/clean): (root, samples)."""
    return five_shards


def survivors(out: Path) -> set[str]:
    """Keys of the samples in an OUT's shards."""
    return {
        name.split(".", 1)[0] for shard in out.glob("*.tar") for name, _ in read_tar(str(shard))
    }


# ------------------------------------------------------------ the same output, every node


def test_a_ray_run_equals_a_local_run(ray_cluster, shard_set, tmp_path):
    root, samples = shard_set
    assert len(list((root / "in").glob("*.tar"))) == 5
    result = dedup(root / "in", "--out", tmp_path / "out", *on(ray_cluster), *FLAGS)
    assert outputs(tmp_path / "out") == outputs(root / "clean")  # every byte
    kept = survivors(tmp_path / "out")
    assert kept == survivors(root / "clean")
    groups = [s.group for s in samples if s.key in kept and s.group is not None]
    assert sorted(groups) == sorted({s.group for s in samples if s.group is not None})
    assert {s.key for s in samples if s.group is None} <= kept  # passed through
    assert f"ray: joined the Ray cluster at {ray_cluster.address}: 2 nodes, 2 CPUs" in (
        result.stderr
    )
    assert "ran on 2 nodes" in result.stderr


@pytest.fixture(scope="module")
def executor(ray_cluster):
    """A RayExecutor in this process, joined to the cluster (its workers serve every test
    here that maps through it)."""
    with RayExecutor(ray_cluster.address) as executor:
        yield executor


def slow_square(n: int) -> int:
    time.sleep(0.2)
    return n * n


def test_tasks_run_on_every_node_and_come_back_in_order(ray_cluster, executor):
    assert executor.parallelism == 2
    got = executor.map(slow_square, list(range(8)), Progress("test", total_items=8))
    assert got == [n * n for n in range(8)]
    assert executor.nodes_used == {node.node_id for node in ray_cluster.list_all_nodes()}


# ------------------------------------------------------------ errors cross processes


def test_a_bad_shard_among_several_names_the_shard(ray_cluster, shard_set, tmp_path):
    root, _ = shard_set
    inputs = tmp_path / "in"
    inputs.mkdir()
    for shard in (root / "in").glob("*.tar"):
        (inputs / shard.name).write_bytes(shard.read_bytes())
    (inputs / "shard-000002.tar").write_bytes(os.urandom(5000))
    # Relative paths, as typed: tasks resolve them where the driver runs, not where the
    # cluster's nodes were started.
    result = dedup("in", "--out", "out", *on(ray_cluster), *FLAGS, check=3, cwd=tmp_path)
    assert error_line(result).startswith("dedup: error: in/shard-000002.tar")


def raise_a_shard_error(n: int) -> int:
    if n == 3:
        raise errors.ShardError("in/x.tar", "damaged tar header", 512)
    return n


def raise_a_planted_bug(n: int) -> int:
    if n == 2:
        raise PlantedBug(f"planted in part {n}")
    return n


def test_a_task_error_comes_back_as_itself(executor):
    with pytest.raises(errors.ShardError) as raised:
        executor.map(raise_a_shard_error, list(range(6)), Progress("test"))
    assert type(raised.value) is errors.ShardError
    assert str(raised.value) == "in/x.tar at byte 512: damaged tar header"
    assert (raised.value.shard, raised.value.offset) == ("in/x.tar", 512)
    assert raised.value.exit_code == errors.EXIT_BAD_INPUT
    with pytest.raises(errors.TaskFailed) as raised:
        executor.map(raise_a_planted_bug, list(range(6)), Progress("test"))
    assert str(raised.value) == "PlantedBug: planted in part 2"
    assert "in raise_a_planted_bug" in raised.value.worker_traceback


def run_with_a_planted_bug(*args) -> subprocess.CompletedProcess:
    code = (
        "import sys; from dedup.engine import reading\n"
        "from tests.helpers import BuggyExtract\n"
        "reading.ExtractTask = BuggyExtract\n"
        "from dedup.cli import main; main(sys.argv[1:])"
    )
    return dedup(*args, *FLAGS, check=None, cwd=REPO, program=[sys.executable, "-c", code])


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_an_unknown_exception_in_a_task_is_one_line(ray_cluster, shard_set, tmp_path, executor):
    root, _ = shard_set
    flags = on(ray_cluster) if executor == "ray" else []
    result = run_with_a_planted_bug(root / "in", "--out", tmp_path / "out", *flags)
    assert result.returncode == errors.EXIT_INTERNAL, result.stderr
    assert "Traceback" not in result.stderr
    assert error_line(result) == "dedup: error: PlantedBug: planted in shard-000001.tar"


def test_without_ray_the_error_names_the_extra(shard_set, tmp_path):
    root, _ = shard_set
    code = "import sys; sys.modules['ray'] = None\nfrom dedup.cli import main; main(sys.argv[1:])"
    result = dedup(
        root / "in",
        "--out",
        tmp_path / "o",
        *FLAGS,
        "--executor",
        "ray",
        check=errors.EXIT_USAGE,
        program=[sys.executable, "-c", code],
    )
    assert result.returncode == errors.EXIT_USAGE
    assert result.stderr.strip() == (
        "dedup: error: executor ray: Ray is not installed; pip install 'dedup-wds[ray]'"
    )
    assert not (tmp_path / "o").exists()


def test_a_cluster_that_is_not_there_is_one_line(shard_set, tmp_path):
    root, _ = shard_set
    address = f"127.0.0.1:{free_port()}"
    result = dedup(
        root / "in",
        "--out",
        tmp_path / "o",
        "--executor",
        "ray",
        "--ray-address",
        address,
        *FLAGS,
        check=errors.EXIT_USAGE,
    )
    assert result.returncode == errors.EXIT_USAGE
    assert result.stderr.strip().splitlines()[-1] == (
        f"dedup: error: executor ray: cannot join the Ray cluster at {address}: Connection refused"
    )
    assert not (tmp_path / "o").exists()  # nothing is claimed before the cluster is joined


def test_sigterm_stops_a_ray_run_with_one_line(ray_cluster, shard_set, tmp_path):
    root, _ = shard_set
    held = tmp_path / "held"
    inputs = held_inputs(root, held)
    proc = subprocess.Popen(
        [DEDUP, *inputs, "--out", str(tmp_path / "out"), *FLAGS, *on(ray_cluster)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while len(readers(held)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        (held / "go").touch()
    assert proc.returncode == errors.EXIT_TERMINATED, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "dedup: interrupted: SIGTERM: stopped; rerun to resume"
    )


# ------------------------------------------------------------ object storage


def test_s3_in_s3_out_on_ray_equals_a_local_run(ray_cluster, s3, shard_set, tmp_path):
    root, _ = shard_set
    bucket = "s3://ray-bucket"
    storage.filesystem(bucket).mkdir("ray-bucket")
    upload(root / "in", f"{bucket}/in")
    dedup(f"{bucket}/in/", "--out", f"{bucket}/out", *on(ray_cluster), *FLAGS, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert remote_outputs(f"{bucket}/out") == local_outputs(root / "clean")


# ------------------------------------------------------------ a node lost mid-phase


# A pipe: input that notes which process reads it, then holds its bytes back until the
# test writes `go` (30 s at most): tasks stay running until the test has done its part.
def ancestors(pid: int) -> set[int]:
    found = set()
    with contextlib.suppress(OSError, ValueError):
        while pid > 1:
            found.add(pid)
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def test_a_node_lost_during_extract_changes_nothing(ray_cluster, shard_set, tmp_path):
    root, _ = shard_set
    held = tmp_path / "held"
    inputs = held_inputs(root, held)
    [worker_node] = ray_cluster.worker_nodes
    lost: list[str] = []

    def remove_the_worker_node() -> None:
        # Both CPUs hold a read of a shard; remove the node that runs one of them.
        deadline = time.monotonic() + 60
        try:
            while not lost and time.monotonic() < deadline:
                for name, pid in readers(held):
                    if raylet_pid(worker_node) in ancestors(pid):
                        ray_cluster.remove_node(worker_node)
                        lost.append(name)
                        break
                time.sleep(0.05)
        finally:
            (held / "go").touch()

    remover = threading.Thread(target=remove_the_worker_node)
    remover.start()
    try:
        dedup(*inputs, "--out", tmp_path / "out", *on(ray_cluster), *FLAGS, timeout=120)
    finally:
        remover.join()
        if worker_node not in ray_cluster.worker_nodes:
            ray_cluster.add_node(**RAY_NODE)  # two nodes again for the tests after this
            ray_cluster.wait_for_nodes()
    assert lost, "no read of a shard ran on the worker node"
    # The lost shard's read was started again (on the head node); its command runs in
    # the extract task only (the write reads the run's copy of its bytes).
    assert [name for name, _ in readers(held)].count(lost[0]) >= 2
    # Every shard byte-equal, every table row equal (its shard named by file name: here
    # the input is a pipe: command, there the file).
    assert local_outputs(tmp_path / "out") == local_outputs(root / "clean")


# ------------------------------------------------------------ CLIP stages as actors


def test_clip_stage_actors_give_the_output_of_a_local_run(ray_cluster, tiny224, tmp_path):
    """The shared CLIP stage as a Ray actor (on the CPU here; num_gpus=1 on a GPU
    cluster): readers on both nodes send it their batches; the output is a local run's."""
    shards_of_every_kind(tmp_path / "in")
    config, checkpoint = tiny224
    flags = [
        "--signals", "exact,phash,clip", "--clip-model", config, "--clip-pretrained",
        checkpoint, "--device", "cpu", "--clip-decode", "device", "--batch-size", "3",
        "--clip-threshold", "0.999", "--json",
    ]  # fmt: skip
    runs = {}
    for name, extra in [
        ("local", ["--clip-stage", "inline", "--workers", "1"]),
        ("ray", ["--clip-stage", "shared", *on(ray_cluster)]),
    ]:
        result = dedup(tmp_path / "in", "--out", tmp_path / name, *flags, *extra)
        runs[name] = json.loads(result.stdout)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert runs["ray"]["counts"]["clip_decode"] == {"cpu_cmyk": 1, "cpu_not_jpeg": 2, "device": 6}
    assert runs["ray"]["counts"] == runs["local"]["counts"]


def test_the_verification_tier_on_ray_equals_a_local_run(ray_cluster, grey_set, tmp_path):
    """The views signal's grey-zone checks run as Ray tasks (images read again from the
    shards by offset on any node): the same bytes and the same verified pairs."""
    root, _, _ = grey_set
    args = ["--signals", "exact,phash,views", "--workers", "2", "--keep", "first", "-q"]
    for name, extra in (("local", []), ("ray", on(ray_cluster))):
        dedup(root / "in", "--out", tmp_path / name, *args, *extra)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    summary = json.loads((tmp_path / "ray" / "dedup-report" / "summary.json").read_text())
    assert summary["counts"]["verify"]["accepted"] == 3
    assert summary["counts"]["removed_by_reason"] == {"verified": 3}


def test_references_and_blocklists_on_ray_equal_a_local_run(ray_cluster, decontam, tmp_path):
    """--against an image folder and --blocklist, with every phase's tasks on Ray: the
    same bytes, the same matches."""
    root, _, truth = decontam
    args = ["--against", str(root / "eval"), "--signals", "exact,phash,views", "--workers", "2"]
    runs = {}
    for name, extra in (("local", []), ("ray", on(ray_cluster))):
        if name == "ray":  # a blocklist naming a sample the local run kept
            table = pq.read_table(tmp_path / "local" / "dedup-report" / "samples.parquet")
            kept = [r for r in table.to_pylist() if r["kept"] and r["digest"]][3]
            (tmp_path / "list.txt").write_text(f"blake3:{kept['digest']}\n")
            args += ["--blocklist", str(tmp_path / "list.txt")]
            dedup(root / "train", "--out", tmp_path / "local", *args, "-q")
        dedup(root / "train", "--out", tmp_path / name, *args, *extra, "-q")
        runs[name] = json.loads((tmp_path / name / "dedup-report" / "summary.json").read_text())
    runs["local"] = json.loads((tmp_path / "local" / "dedup-report" / "summary.json").read_text())
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert runs["ray"]["references"] == runs["local"]["references"]
    assert runs["ray"]["references"]["against"][0]["matched"] == len(truth)
    assert runs["ray"]["references"]["blocklists"][0]["matched"] >= 1
