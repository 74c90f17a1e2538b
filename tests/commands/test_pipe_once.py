"""A pipe: input is read once per run: its command runs in its extract task, its output is
kept in OUT/.dedup/spool, and every later read (the features, the views' verification,
the write, the report's thumbnails, the canaries) reads that copy, which is gone when
the run ends. Through the real CLI on the default path (several shards, two workers),
with local processes, the Ray executor and OUT in S3."""

from __future__ import annotations

import itertools
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dedup.io import storage
from dedup.synth import encode, make_image
from tests.helpers import (
    VIEWS,
    dedup,
    error_line,
    local_outputs,
    remote_outputs,
    rotated,
    textured,
    write_tar,
)

VERIFY = [*VIEWS, "--verify"]

# Reads a shard for a pipe: input: notes each invocation (the name of its last argument)
# in LOG, then sends FIRST on odd invocations and SECOND (FIRST when not given) on even
# ones: a command whose output differs from one invocation to the next.
READ = """\
log="$1"; first="$2"; second="${3:-$2}"
name=$(basename "$second")
echo "$name" >> "$log"
n=$(grep -cx "$name" "$log")
if [ $((n % 2)) -eq 1 ]; then exec cat "$first"; else exec cat "$second"; fi
"""


def with_comment(jpeg: bytes, size: int) -> bytes:
    """The JPEG made `size` bytes long by a comment segment after its start marker."""
    pad = size - len(jpeg) - 4
    assert pad >= 0
    return jpeg[:2] + b"\xff\xfe" + (pad + 2).to_bytes(2, "big") + bytes(pad) + jpeg[2:]


@pytest.fixture(scope="module")
def pipe_set(tmp_path_factory):
    """Three shards: six textured originals, a rotated copy of 0 (the views' grey zone,
    verified), an exact copy of 1, a re-encoded copy of 2; and sample `x` in the last
    shard, which is unique in `in` and an exact copy of 3 in `other`: the same shards
    but for x's image bytes, of the same length."""
    root = tmp_path_factory.mktemp("pipe-once")
    originals = [textured(700 + k) for k in range(6)]
    jpeg = [encode(image, "JPEG", quality=90) for image in originals]
    unique_x = with_comment(encode(make_image(801, 64, 48), "JPEG", quality=90), len(jpeg[3]))
    rot, reenc = encode(rotated(originals[0], 5)), encode(originals[2], "JPEG", quality=60)
    layout = [
        [("o0", jpeg[0]), ("o1", jpeg[1]), ("o2", jpeg[2]), ("o3", jpeg[3])],
        [("o4", jpeg[4]), ("o5", jpeg[5]), ("rot", rot), ("exact", jpeg[1])],
        [("reenc", reenc), ("x", unique_x)],
    ]
    for folder, x in (("in", unique_x), ("other", jpeg[3])):
        for n, samples in enumerate(layout):
            members = []
            for key, data in samples:
                data = x if key == "x" else data
                members += [(f"{key}.jpg", data), (f"{key}.txt", f"caption of {key}".encode())]
            write_tar(str(root / folder / f"shard-{n:06d}.tar"), members)
    script = root / "read.sh"
    script.write_text(READ)
    dedup(root / "in", "--out", root / "local", *VERIFY)
    return root


def pipes(root: Path, log: Path, alternate: bool = False) -> list[str]:
    """A pipe: input per shard of `root/in`; with `alternate`, the last one sends `in`'s
    shard, then `other`'s, then `in`'s ... on its invocations."""
    shards = sorted((root / "in").glob("*.tar"))
    out = [f"pipe:sh {root / 'read.sh'} {log} {p}" for p in shards]
    if alternate:
        out[-1] += f" {root / 'other' / shards[-1].name}"
    return out


def invocations(log: Path) -> Counter:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def removed(rows: list[dict]) -> dict[str, tuple[str, str]]:
    return {r["key"]: (r["duplicate_of"], r["reason"]) for r in rows if not r["kept"]}


EXPECTED_REMOVED = {"rot": ("o0", "verified"), "exact": ("o1", "exact"), "reenc": ("o2", "phash")}


def test_the_planted_set_is_what_the_tests_say(pipe_set):
    """Over local files: x is unique in `in`, an exact copy in `other`."""
    rows = pq.read_table(pipe_set / "local" / "dedup-report" / "samples.parquet").to_pylist()
    assert removed(rows) == EXPECTED_REMOVED
    other = pipe_set / "other-out"
    dedup(pipe_set / "other", "--out", other, *VERIFY)
    rows = pq.read_table(other / "dedup-report" / "samples.parquet").to_pylist()
    assert removed(rows) == {**EXPECTED_REMOVED, "x": ("o3", "exact")}
    shutil.rmtree(other)


def test_each_pipe_input_is_read_once_per_run(pipe_set, tmp_path):
    log, out = tmp_path / "log", tmp_path / "out"
    inputs = pipes(pipe_set, log)
    made = dedup(*inputs, "--out", out, "--canaries", 6, "--json", *VERIFY)
    names = [f"shard-{n:06d}.tar" for n in range(3)]
    assert invocations(log) == Counter(names)
    summary = json.loads(made.stdout)
    assert summary["counts"]["verify"]["checked"] >= 1  # the views' check read images
    assert summary["canaries"]["planted"] == 6  # the canaries read images
    previews = pq.read_table(out / "dedup-report" / "previews.parquet").to_pylist()
    assert previews and all(p["thumbnail"] for p in previews)  # and the report did
    assert local_outputs(out) == local_outputs(pipe_set / "local")
    assert not (out / ".dedup" / "spool").exists()
    # A rerun runs each command once again; the same bytes: the stored features serve.
    again = json.loads(dedup(*inputs, "--out", out, "--json", *VERIFY).stdout)
    assert invocations(log) == Counter(names * 2)
    assert [s["features_reused"] for s in again["shards"]] == [True] * 3
    # A dry run reads the features, and the report's thumbnails, from its one read too.
    dedup(*inputs, "--out", tmp_path / "dry", "--dry-run", *VERIFY)
    assert invocations(log) == Counter(names * 3)
    assert not (tmp_path / "dry" / ".dedup" / "spool").exists()
    assert (tmp_path / "dry" / "dedup-report" / "previews.parquet").exists()


_buckets = itertools.count()

# Where a run goes: local processes, or (slow) the simulated Ray cluster, OUT in S3.
WHERE = [
    "local",
    pytest.param("ray", marks=pytest.mark.slow),
    pytest.param("s3", marks=pytest.mark.slow),
]


def where_out(where: str, tmp_path: Path, request) -> tuple[str, list[str]]:
    """OUT and the executor flags of a run `where`: local, ray or s3."""
    if where == "ray":
        cluster = request.getfixturevalue("ray_cluster")
        return str(tmp_path / "out"), ["--executor", "ray", "--ray-address", cluster.address]
    if where == "s3":
        request.getfixturevalue("s3")
        name = f"pipe-once-{next(_buckets)}"
        storage.filesystem("s3://").mkdir(name)
        return f"s3://{name}/out", []
    return str(tmp_path / "out"), []


def outputs_of(out: str) -> dict:
    return remote_outputs(out) if storage.is_url(out) else local_outputs(Path(out))


def spool_left(out: str) -> bool:
    spool = f"{out}/.dedup/spool"
    if storage.is_url(out):
        return bool(storage.listdir(spool))
    return Path(spool).exists()


@pytest.mark.parametrize("where", WHERE)
def test_a_command_whose_output_changes_is_judged_and_written_from_one_read(
    pipe_set, tmp_path, request, where
):
    """The last input sends other bytes on every invocation: the decisions, the shard
    written and samples.parquet all come from the one read (x is unique in it)."""
    out, flags = where_out(where, tmp_path, request)
    log = tmp_path / "log"
    made = dedup(*pipes(pipe_set, log, alternate=True), "--out", out, *flags, *VERIFY, cwd=tmp_path)
    assert ("ray: joined the Ray cluster" in made.stderr) == (where == "ray")
    assert invocations(log) == Counter(f"shard-{n:06d}.tar" for n in range(3))
    got = outputs_of(out)
    assert removed(got["samples.parquet"]) == EXPECTED_REMOVED
    assert got == local_outputs(pipe_set / "local")  # a run over a copy of the bytes read
    assert not spool_left(out)


@pytest.mark.parametrize("where", WHERE)
def test_the_spool_is_gone_after_a_failing_run(pipe_set, tmp_path, request, where):
    out, flags = where_out(where, tmp_path, request)
    log = tmp_path / "log"
    inputs = pipes(pipe_set, log)
    inputs[-1] += f"; exit 7 # {Path(inputs[-1].split()[-1]).name}"
    result = dedup(*inputs, "--out", out, *flags, *VERIFY, check=3, cwd=tmp_path)
    assert "exited with status 7" in error_line(result)
    assert "shard-000002.tar" in invocations(log)
    assert not spool_left(out)
