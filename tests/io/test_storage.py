"""Object storage and URLs against real servers on the loopback: an S3-compatible server
(moto's server mode, one per test session) and Python's HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dedup.core import errors
from dedup.io import storage
from dedup.synth import planted_dataset, write_shards
from tests.helpers import (
    FLAGS,
    dedup,
    error_line,
    free_port,
    local_outputs,
    remote_outputs,
    upload,
)


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """Four local shards and the output of a local run of them (the reference)."""
    root = tmp_path_factory.mktemp("store")
    samples = planted_dataset(50, {"exact": 15, "reencode": 12}, seed=21, size=(64, 48))
    write_shards(samples, str(root / "in"), per_shard=20)
    dedup(root / "in", "--out", root / "local", *FLAGS)
    return root


@pytest.mark.slow  # S3: two runs and every object compared
def test_s3_in_s3_out_equals_a_local_run(s3, shard_set, bucket, tmp_path):
    upload(shard_set / "in", f"{bucket}/in")
    result = dedup(
        f"{bucket}/in/", "--out", f"{bucket}/out", "--json", *FLAGS, env=s3, cwd=tmp_path
    )
    assert list(tmp_path.iterdir()) == []  # nothing local, no folder named "s3:"
    summary = json.loads(result.stdout)
    assert remote_outputs(f"{bucket}/out") == local_outputs(shard_set / "local")
    assert summary["output"]["report"] == f"{bucket}/out/dedup-report"
    stored = json.loads(storage.read_bytes(f"{bucket}/out/dedup-report/summary.json"))
    assert stored["counts"] == summary["counts"]
    # A rerun reuses every shard's features (identified by size and ETag) and gives
    # the same bytes.
    again = json.loads(
        dedup(f"{bucket}/in/", "--out", f"{bucket}/out", "--json", *FLAGS, env=s3).stdout
    )
    assert [s["features_reused"] for s in again["shards"]] == [True] * 4
    assert remote_outputs(f"{bucket}/out") == local_outputs(shard_set / "local")
    # Nothing but dedup's own objects in OUT: shards, report, state.
    assert storage.listdir(f"{bucket}/out") == sorted(
        [".dedup", "dedup-report", *(p.name for p in (shard_set / "in").glob("*.tar"))]
    )


@pytest.mark.slow  # S3: a run per pattern
def test_braces_globs_and_a_local_out(s3, shard_set, bucket, tmp_path):
    upload(shard_set / "in", f"{bucket}/in")
    for spec in (f"{bucket}/in/shard-{{000000..000003}}.tar", f"{bucket}/in/*.tar"):
        out = tmp_path / hashlib.md5(spec.encode()).hexdigest()
        dedup(spec, "--out", out, *FLAGS, env=s3)
        assert local_outputs(out) == local_outputs(shard_set / "local")


@pytest.mark.slow  # S3
def test_local_in_s3_out_with_a_local_state_dir(s3, shard_set, bucket, tmp_path):
    state = tmp_path / "state"
    dedup(shard_set / "in", "--out", f"{bucket}/clean", "--state-dir", state, *FLAGS, env=s3)
    assert remote_outputs(f"{bucket}/clean") == local_outputs(shard_set / "local")
    assert len(list(state.glob("*.done"))) == 4
    assert not [n for n in storage.listdir(f"{bucket}/clean/.dedup") if n == "features"]


def test_a_shard_that_vanishes_mid_run_is_named(s3, shard_set, bucket, monkeypatch, tmp_path):
    """Deleted between reading and writing, with two workers: exit 3 naming the URL."""
    from dedup.commands import run as pipeline
    from dedup.core.config import Config

    upload(shard_set / "in", f"{bucket}/in")
    gone = f"{bucket}/in/shard-000002.tar"
    original = pipeline.cluster_phase

    def plan_then_delete(*args):
        storage.remove(gone)
        return original(*args)

    monkeypatch.setattr(pipeline, "cluster_phase", plan_then_delete)
    config = Config(signals=("exact", "phash"), workers=2)
    with pytest.raises(errors.InputError, match=f"^{gone}: no such object"):
        pipeline.run([f"{bucket}/in/"], f"{bucket}/out", config)
    assert not storage.exists(f"{bucket}/out/shard-000002.tar")


def test_a_damaged_object_among_several_is_exit_3(s3, shard_set, bucket):
    upload(shard_set / "in", f"{bucket}/in")
    storage.put_bytes(f"{bucket}/in/shard-000001.tar", b"not a tar" * 100)
    result = dedup(f"{bucket}/in/", "--out", f"{bucket}/out", *FLAGS, env=s3, check=3)
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"dedup: error: {bucket}/in/shard-000001.tar at byte 0: not a readable tar")
    )


@pytest.mark.slow  # S3 client retries against a closed port
def test_an_unreachable_endpoint_is_one_line(shard_set, tmp_path):
    pytest.importorskip("s3fs")
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_MAX_ATTEMPTS": "1",
    }
    result = dedup(
        "s3://nowhere/in/", "--out", tmp_path / "out", *FLAGS, env=env, check=3, timeout=120
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedup: error: s3://nowhere/in/: ")
    assert "after 4 tries" in lines[0]
    assert not (tmp_path / "out").exists()
    out = dedup(
        shard_set / "in", "--out", "s3://nowhere/out", *FLAGS, env=env, check=4, timeout=120
    )
    assert out.stderr.strip().splitlines()[-1].startswith("dedup: error: s3://nowhere/out")


@pytest.mark.slow  # S3: three runs
def test_s3_out_refusals_and_lock(s3, shard_set, bucket):
    storage.put_bytes(f"{bucket}/mine/notes.txt", b"mine")
    refused = dedup(shard_set / "in", "--out", f"{bucket}/mine", *FLAGS, env=s3, check=4)
    assert "was not written by dedup" in refused.stderr
    assert storage.read_bytes(f"{bucket}/mine/notes.txt") == b"mine"
    lock = f"{bucket}/out/.dedup/lock"
    storage.put_bytes(f"{bucket}/out/.dedup/job.json", b"{}")
    storage.put_bytes(lock, json.dumps({"host": "elsewhere", "pid": 42}).encode())
    busy = dedup(shard_set / "in", "--out", f"{bucket}/out", *FLAGS, env=s3, check=4)
    assert "another dedup run (pid 42 on elsewhere) is writing here" in busy.stderr
    storage.remove(lock)
    dedup(shard_set / "in", "--out", f"{bucket}/out", *FLAGS, env=s3)
    assert not storage.exists(lock)  # released at the end


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def http_root(shard_set):
    handler = functools.partial(_QuietHandler, directory=str(shard_set / "in"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_and_pipe_inputs_equal_a_local_run(shard_set, http_root, tmp_path):
    pytest.importorskip("aiohttp")
    out = tmp_path / "http"
    dedup(f"{http_root}/shard-{{000000..000003}}.tar", "--out", out, *FLAGS)
    assert local_outputs(out) == local_outputs(shard_set / "local")
    shards = sorted((shard_set / "in").glob("*.tar"))
    pipes = [f"pipe:cat {p}" for p in shards]
    out = tmp_path / "pipe"
    dedup(*pipes, "--out", out, *FLAGS)
    assert local_outputs(out) == local_outputs(shard_set / "local")
    again = json.loads(dedup(*pipes, "--out", out, "--json", *FLAGS).stdout)
    assert [s["features_reused"] for s in again["shards"]] == [True] * 4


def test_a_failing_pipe_command_is_exit_3(shard_set, tmp_path):
    shards = sorted((shard_set / "in").glob("*.tar"))
    broken = f"pipe:cat {shards[0]}; exit 7 # {shards[0].name}"
    result = dedup(broken, f"pipe:cat {shards[1]}", "--out", tmp_path / "o", *FLAGS, check=3)
    assert "exited with status 7" in result.stderr.strip().splitlines()[-1]


def test_a_missing_extra_names_it(tmp_path, monkeypatch):
    import fsspec

    def missing(protocol, **kwargs):
        raise ImportError("Install gcsfs to access Google Storage", name="gcsfs")

    monkeypatch.setattr(fsspec, "filesystem", missing)
    with pytest.raises(errors.ConfigError, match=r"pip install 'dedup-wds\[gcs\]'"):
        storage.list_url("gs://bucket/in/")


def test_stream_skip_read_and_ranges(s3, bucket):
    data = os.urandom(3 << 20)
    storage.put_bytes(f"{bucket}/blob", data)
    with storage.open_stream(f"{bucket}/blob") as stream:
        assert stream.skip(1000) == 1000
        assert stream.read(5) == data[1000:1005]
        assert stream.read() == data[1005:]
    assert storage.read_ranges(f"{bucket}/blob", [(7, 3), (0, 2)]) == [data[7:10], data[:2]]


def test_one_prefix_spelled_two_ways_is_one_place(s3, shard_set, bucket):
    upload(shard_set / "in", f"{bucket}/victim")
    before = {
        n: storage.read_bytes(f"{bucket}/victim/{n}") for n in storage.listdir(f"{bucket}/victim")
    }
    spelled = bucket.replace("s3://", "s3a://") + "//victim/"
    result = dedup(spelled, "--out", f"{bucket}/victim", "--overwrite", *FLAGS, env=s3, check=4)
    assert "holds input shard" in result.stderr.strip().splitlines()[-1]
    after = {
        n: storage.read_bytes(f"{bucket}/victim/{n}") for n in storage.listdir(f"{bucket}/victim")
    }
    assert after == before


@pytest.mark.slow  # S3
def test_uploads_in_the_making_stay_in_the_runs_scratch_folder(s3, shard_set, bucket, tmp_path):
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = {**s3, "TMPDIR": str(scratch_root)}
    dedup(shard_set / "in", "--out", f"{bucket}/out", *FLAGS, env=env)
    assert list(scratch_root.iterdir()) == []


def test_the_scratch_folder_goes_when_a_run_fails():
    from dedup.io.fsutil import SCRATCH_ENV, scratch_dir

    with pytest.raises(RuntimeError), scratch_dir() as path:
        assert os.environ[SCRATCH_ENV] == path
        Path(path, "upload-x").write_bytes(b"partial")
        raise RuntimeError("stopped")
    assert not os.path.exists(path) and SCRATCH_ENV not in os.environ


@pytest.mark.slow  # S3: two runs
def test_a_stale_lock_object_is_taken_over_and_a_taken_lock_is_left_alone(
    s3, shard_set, bucket, monkeypatch
):
    from dedup.commands import run as pipeline
    from dedup.core.config import Config
    from dedup.io import outdir

    config = Config(signals=("exact", "phash"), workers=2)
    lock = f"{bucket}/out/.dedup/lock"
    storage.put_bytes(f"{bucket}/out/.dedup/job.json", b"{}")
    storage.put_bytes(lock, json.dumps({"host": "gone", "pid": 1, "token": "old"}).encode())
    monkeypatch.setattr(outdir, "LOCK_STALE_SECONDS", 0.0)  # every lock counts as stale
    pipeline.run([str(shard_set / "in")], f"{bucket}/out", config)
    assert not storage.exists(lock)
    # A run whose lock another run took over must not delete the new owner's lock.
    real_run = pipeline._run

    def taken_over(*args, **kwargs):
        storage.put_bytes(lock, b'{"token": "the new owner"}')
        return real_run(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_run", taken_over)
    pipeline.run([str(shard_set / "in")], f"{bucket}/out", config)
    assert storage.read_bytes(lock) == b'{"token": "the new owner"}'


@pytest.mark.slow  # S3: four runs
def test_a_url_that_names_an_object_or_prefix_is_never_a_pattern(s3, shard_set, bucket, tmp_path):
    """Objects and prefixes whose names hold glob or brace characters, each given as an
    input, with decoys that the pattern would match (not tars: reading one fails the
    run): each URL is itself, as a local path is, and the run equals the local one."""
    shards = sorted((shard_set / "in").glob("*.tar"))
    lit = f"{bucket}/lit"
    named = {
        f"{lit}/x[1].tar": shards[0],
        f"{lit}/y{{1,2}}.tar": shards[1],
        f"{lit}/d[1]/{shards[2].name}": shards[2],
        f"{lit}/e{{1,2}}/{shards[3].name}": shards[3],
    }
    for url, shard in named.items():
        storage.put_file(str(shard), url)
    for decoy in ("x1.tar", "y1.tar", "y2.tar", "d1/", "e1/", "e2/"):
        url = f"{lit}/{decoy}" + (shards[2].name if decoy.endswith("/") else "")
        storage.put_bytes(url, b"a decoy, not a tar" * 40)
    inputs = [f"{lit}/x[1].tar", f"{lit}/y{{1,2}}.tar", f"{lit}/d[1]/", f"{lit}/e{{1,2}}"]
    out = tmp_path / "out"
    result = dedup(*inputs, "--out", out, "--json", *FLAGS, env=s3)
    summary = json.loads(result.stdout)
    assert [s["shard"] for s in summary["shards"]] == list(named)
    local = json.loads((shard_set / "local" / "dedup-report" / "summary.json").read_text())
    assert summary["counts"] == local["counts"]
    written = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    expected = {
        storage.basename(url): (shard_set / "local" / s.name).read_bytes()
        for url, s in named.items()
    }
    assert written == expected
    # A prefix that exists but holds no shard is named, even after one that does.
    storage.put_bytes(f"{lit}/notes[1]/readme.txt", b"no shards here")
    empty = dedup(
        f"{lit}/x[1].tar", f"{lit}/notes[1]/", "--out", tmp_path / "o2", *FLAGS, env=s3, check=3
    )
    assert error_line(empty) == f"dedup: error: {lit}/notes[1]/: names no *.tar shards"
    # --against goes through the same listing: the object, never the decoy; it counts and
    # removes exactly what the same shard given as a local file does.
    copy = tmp_path / "ref" / "x[1].tar"
    copy.parent.mkdir()
    copy.write_bytes(shards[0].read_bytes())
    runs = {}
    for name, ref in (("url", f"{lit}/x[1].tar"), ("local", copy)):
        out = tmp_path / name
        done = dedup(shard_set / "in", "--out", out, "--against", ref, "--json", *FLAGS, env=s3)
        section = json.loads(done.stdout)["references"]["against"]
        assert [r.pop("reference") for r in section] == [str(ref)]
        samples = pq.read_table(out / "dedup-report" / "samples.parquet").to_pylist()
        runs[name] = section, [(r["key"], r["kept"], r["reason"]) for r in samples]
    assert runs["url"] == runs["local"]
    section, decided = runs["url"]
    assert (section[0]["kind"], section[0]["items"]) == ("shards", 20)
    assert section[0]["matched"] == sum(reason == "reference" for _, _, reason in decided) >= 19


@pytest.mark.slow  # an HTTP server and a run
def test_an_http_url_that_names_a_file_is_never_a_brace_pattern(shard_set, tmp_path):
    """`https://host/x{1,2}.tar` that the server has is that file, not x1.tar and x2.tar
    (decoys here, not tars: reading one fails the run)."""
    pytest.importorskip("aiohttp")
    served = tmp_path / "served"
    served.mkdir()
    shards = sorted((shard_set / "in").glob("*.tar"))
    (served / "x{1,2}.tar").write_bytes(shards[0].read_bytes())
    for decoy in ("x1.tar", "x2.tar"):
        (served / decoy).write_bytes(b"a decoy, not a tar" * 40)
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/x{{1,2}}.tar"
        result = dedup(url, *shards[1:], "--out", tmp_path / "out", "--json", *FLAGS)
    finally:
        server.shutdown()
    summary = json.loads(result.stdout)
    assert [s["shard"] for s in summary["shards"]] == [url, *map(str, shards[1:])]
    local = json.loads((shard_set / "local" / "dedup-report" / "summary.json").read_text())
    assert summary["counts"] == local["counts"]
    assert (tmp_path / "out" / "x{1,2}.tar").read_bytes() == (
        shard_set / "local" / shards[0].name
    ).read_bytes()
