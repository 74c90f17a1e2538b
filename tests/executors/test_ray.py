"""The Ray executor on a simulated two-node cluster (one session-wide `ray_cluster`): the
same output bytes as local processes, work on every node, a node lost in the middle of a
phase, and errors that cross Ray's process boundary with their exit code and message."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dedup.core import errors
from dedup.core.progress import Progress
from dedup.io import storage
from dedup.synth import planted_dataset, write_shards
from tests.conftest import RAY_NODE, free_port, held_inputs, read_tar, readers
from tests.test_grey import grey_set  # noqa: F401 - a fixture
from tests.test_hostile import DEDUP, FLAGS, dedup, error_line, outputs
from tests.test_references import decontam  # noqa: F401 - a fixture
from tests.test_storage import local_outputs, remote_outputs, upload

pytest.importorskip("ray")

from dedup.executors.ray import RayExecutor  # noqa: E402 - after the skip without Ray

REPO = Path(__file__).resolve().parents[1]


def on(cluster) -> list[str]:
    return ["--executor", "ray", "--ray-address", cluster.address]


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """Five shards of about 20 planted samples, and the output of a local run of them."""
    root = tmp_path_factory.mktemp("ray")
    samples = planted_dataset(60, {"exact": 20, "reencode": 15}, seed=11, size=(64, 48))
    write_shards(samples, str(root / "in"), per_shard=20)
    dedup(root / "in", "--out", root / "local", check=0)
    return root, samples


def survivors(out: Path) -> set[str]:
    """Keys of the samples in an OUT's shards."""
    return {
        name.split(".", 1)[0] for shard in out.glob("*.tar") for name, _ in read_tar(str(shard))
    }


# ------------------------------------------------------------ the same output, every node


def test_a_ray_run_equals_a_local_run(ray_cluster, shard_set, tmp_path):
    root, samples = shard_set
    assert len(list((root / "in").glob("*.tar"))) == 5
    result = dedup(root / "in", "--out", tmp_path / "out", *on(ray_cluster), check=0)
    assert outputs(tmp_path / "out") == outputs(root / "local")  # every byte
    kept = survivors(tmp_path / "out")
    assert kept == survivors(root / "local")
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
    result = dedup("in", "--out", "out", *on(ray_cluster), check=3, cwd=tmp_path)
    assert error_line(result).startswith("dedup: error: in/shard-000002.tar")


def raise_a_shard_error(n: int) -> int:
    if n == 3:
        raise errors.ShardError("in/x.tar", "damaged tar header", 512)
    return n


class PlantedBug(Exception):
    """An exception type no part of dedup knows."""


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


class BuggyExtract:
    """Takes the place of the pipeline's extract task in a driver that a test starts."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, shard):
        if shard.name == "shard-000001.tar":
            raise PlantedBug(f"planted in {shard.name}")
        time.sleep(0.5)  # the other parts are still running when it fails


def run_with_a_planted_bug(*args) -> subprocess.CompletedProcess:
    code = (
        "import sys; from dedup.commands import run as pipeline\n"
        "from tests.test_ray import BuggyExtract\n"
        "pipeline.ExtractTask = BuggyExtract\n"
        "from dedup.cli import main; main(sys.argv[1:])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args), *FLAGS],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


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
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            root / "in",
            "--out",
            tmp_path / "o",
            *FLAGS,
            "--executor",
            "ray",
        ],
        capture_output=True,
        text=True,
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
        root / "in", "--out", tmp_path / "o", "--executor", "ray", "--ray-address", address
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
    dedup(f"{bucket}/in/", "--out", f"{bucket}/out", *on(ray_cluster), check=0, cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert remote_outputs(f"{bucket}/out") == local_outputs(root / "local")


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
        dedup(*inputs, "--out", tmp_path / "out", *on(ray_cluster), check=0, timeout=120)
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
    assert local_outputs(tmp_path / "out") == local_outputs(root / "local")


# ------------------------------------------------------------ CLIP stages as actors


def test_clip_stage_actors_give_the_output_of_a_local_run(ray_cluster, tiny224, tmp_path):
    """The shared CLIP stage as a Ray actor (on the CPU here; num_gpus=1 on a GPU
    cluster): readers on both nodes send it their batches; the output is a local run's."""
    import json

    from tests.test_clipstage import shards_of_every_kind

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
        result = subprocess.run(
            [DEDUP, str(tmp_path / "in"), "--out", str(tmp_path / name), *flags, *extra],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        runs[name] = json.loads(result.stdout)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert runs["ray"]["counts"]["clip_decode"] == {"cpu_cmyk": 1, "cpu_not_jpeg": 2, "device": 6}
    assert runs["ray"]["counts"] == runs["local"]["counts"]


def test_the_verification_tier_on_ray_equals_a_local_run(ray_cluster, grey_set, tmp_path):  # noqa: F811
    """The views signal's grey-zone checks run as Ray tasks (images read again from the
    shards by offset on any node): the same bytes and the same verified pairs."""
    import json

    root, _, _ = grey_set
    args = ["--signals", "exact,phash,views", "--workers", "2", "--keep", "first", "-q"]
    for name, extra in (("local", []), ("ray", on(ray_cluster))):
        result = subprocess.run(
            [DEDUP, str(root / "in"), "--out", str(tmp_path / name), *args, *extra],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    summary = json.loads((tmp_path / "ray" / "dedup-report" / "summary.json").read_text())
    assert summary["counts"]["verify"]["accepted"] == 3
    assert summary["counts"]["removed_by_reason"] == {"verified": 3}


def test_references_and_blocklists_on_ray_equal_a_local_run(ray_cluster, decontam, tmp_path):  # noqa: F811
    """--against an image folder and --blocklist, with every phase's tasks on Ray: the
    same bytes, the same matches."""
    import json

    import pyarrow.parquet as pq

    root, _, truth = decontam
    args = ["--against", str(root / "eval"), "--signals", "exact,phash,views", "--workers", "2"]
    runs = {}
    for name, extra in (("local", []), ("ray", on(ray_cluster))):
        if name == "ray":  # a blocklist naming a sample the local run kept
            table = pq.read_table(tmp_path / "local" / "dedup-report" / "samples.parquet")
            kept = [r for r in table.to_pylist() if r["kept"] and r["digest"]][3]
            (tmp_path / "list.txt").write_text(f"blake3:{kept['digest']}\n")
            args += ["--blocklist", str(tmp_path / "list.txt")]
            subprocess.run(
                [DEDUP, str(root / "train"), "--out", str(tmp_path / "local"), *args, "-q"],
                check=True,
                capture_output=True,
            )
        result = subprocess.run(
            [DEDUP, str(root / "train"), "--out", str(tmp_path / name), *args, *extra, "-q"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((tmp_path / name / "dedup-report" / "summary.json").read_text())
    runs["local"] = json.loads((tmp_path / "local" / "dedup-report" / "summary.json").read_text())
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert runs["ray"]["references"] == runs["local"]["references"]
    assert runs["ray"]["references"]["against"][0]["matched"] == len(truth)
    assert runs["ray"]["references"]["blocklists"][0]["matched"] >= 1
