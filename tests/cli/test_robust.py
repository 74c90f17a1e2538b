"""Bad inputs, crashes and reruns: nothing lost, nothing partial."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup.cli import main
from dedup.commands.run import run
from dedup.core.errors import OutputError, ShardError
from dedup.engine import finish
from dedup.io.decode import decode_image
from dedup.io.fsutil import TEMP_DIR
from dedup.io.shards import Shard, iter_samples
from dedup.synth import encode, make_image, planted_dataset, write_shards
from tests.helpers import DEDUP, NO_MODEL_FLAGS, cfg, dedup, png_bomb, read_tar, write_tar


def _valid_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [
            ("a.jpg", encode(make_image(1, 24, 24))),
            ("a.txt", b"caption"),
            ("b/" + "long" * 30 + ".png", encode(make_image(2, 16, 16), "PNG")),
            ("c.json", b"{}"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VALID_TAR = _valid_tar()
VALID_JPEG = encode(make_image(3, 40, 30))


def _mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, pos, value in edits:
        if not out:
            break
        pos %= len(out)
        if kind == 0:
            out[pos] = value
        elif kind == 1:
            del out[pos:]
        else:
            out[pos:pos] = bytes([value]) * 7
    return bytes(out)


EDITS = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.integers(0, 255)),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(edits=EDITS)
def test_fuzzed_tars_give_samples_or_a_shard_error(tmp_path, edits):
    path = tmp_path / "fuzz.tar"
    path.write_bytes(_mutate(VALID_TAR, edits))
    try:
        for sample in iter_samples(Shard(str(path))):
            assert sample.members and all(isinstance(m.data, bytes) for m in sample.members)
    except ShardError as e:
        assert str(e).startswith(str(path))


@settings(max_examples=300, deadline=None)
@given(edits=EDITS)
def test_fuzzed_images_decode_or_get_a_reason(edits):
    for draft in (None, 32):
        d = decode_image(_mutate(VALID_JPEG, edits), cfg(), draft=draft)
        assert (d.image is None) == (d.reason is not None)
        assert d.reason in (None, "undecodable", "unsupported_format", "too_large")


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


RESULT_FILES = ["dedup-report/samples.parquet", "dedup-report/clusters.parquet"]


def _outputs(out: Path) -> dict[str, str]:
    digests = _digest_tree(out)
    return {k: v for k, v in digests.items() if k.endswith(".tar") or k in RESULT_FILES}


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    samples = planted_dataset(
        150, {"exact": 30, "reencode": 20, "resize": 20}, seed=3, size=(320, 240)
    )
    write_shards(samples, str(root / "in"), per_shard=20)
    clean = root / "clean"
    run([str(root / "in")], str(clean), cfg(workers=1))
    return root, _outputs(clean)


def _start(args):
    return subprocess.Popen(
        [DEDUP, *args, *NO_MODEL_FLAGS, "--workers", "1", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(predicate, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


@pytest.mark.parametrize(
    "point",
    [
        pytest.param("first features", marks=pytest.mark.slow),
        pytest.param("some features", marks=pytest.mark.slow),
        "outputs",
    ],
)
def test_sigkill_then_rerun_gives_identical_output(many_shards, tmp_path, point):
    root, clean = many_shards
    out = tmp_path / "out"
    proc = _start([str(root / "in"), "--out", str(out)])
    features = out / ".dedup" / "features"
    if point == "first features":
        reached = _wait_for(lambda: len(list(features.glob("*.done"))) >= 1, proc)
    elif point == "some features":
        reached = _wait_for(lambda: len(list(features.glob("*.done"))) >= 10, proc)
    else:
        reached = _wait_for(lambda: len(list(out.glob("*.tar"))) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached and proc.returncode == -signal.SIGKILL, "the run ended before the kill point"
    assert not (out / "dedup-report" / "summary.json").exists()
    # Nothing partial at a final path: every shard present is a complete tar.
    for shard in out.glob("*.tar"):
        read_tar(str(shard))
    rerun = dedup(root / "in", "--out", out, *NO_MODEL_FLAGS, "--workers", "1", "--json", "-q")
    summary = json.loads(rerun.stdout)
    reused = [s["features_reused"] for s in summary["shards"]]
    assert any(reused) and (point == "outputs" or not all(reused))
    assert _outputs(out) == clean
    assert [p for p in out.rglob("*") if TEMP_DIR in p.parts] == []


def test_leftover_temporaries_are_removed(many_shards, tmp_path):
    root, clean = many_shards
    out = tmp_path / "out"
    (out / ".dedup" / "features").mkdir(parents=True)
    (out / ".dedup" / "job.json").write_text(json.dumps({"tool": "dedup", "outputs": []}))
    (out / TEMP_DIR).mkdir()
    (out / TEMP_DIR / "999-partial").write_bytes(b"partial")
    (out / ".dedup" / "features" / TEMP_DIR).mkdir()
    (out / ".dedup" / "features" / TEMP_DIR / "999-x").write_bytes(b"x")
    run([str(root / "in")], str(out), cfg(workers=1))
    assert not [p for p in out.rglob("*") if TEMP_DIR in p.parts]
    assert _outputs(out) == clean


def test_stale_features_are_recomputed(many_shards, tmp_path):
    root, clean = many_shards
    out = tmp_path / "out"
    first = run([str(root / "in")], str(out), cfg(workers=1))
    assert not any(s["features_reused"] for s in first["shards"])
    again = run([str(root / "in")], str(out), cfg(workers=1, phash_threshold=4))
    assert all(s["features_reused"] for s in again["shards"])  # a threshold is not a feature
    shard = sorted((root / "in").glob("*.tar"))[0]
    st_ = shard.stat()
    os.utime(shard, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    try:
        touched = run([str(root / "in")], str(out), cfg(workers=1))
        assert [s["features_reused"] for s in touched["shards"]][:2] == [False, True]
        assert _outputs(out) == clean
    finally:
        os.utime(shard, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    other = run([str(root / "in")], str(out), cfg(workers=1, max_pixels=10**6))
    assert not any(s["features_reused"] for s in other["shards"])


def test_overwrite_starts_over(many_shards, tmp_path):
    root, clean = many_shards
    out = tmp_path / "out"
    run([str(root / "in")], str(out), cfg(workers=1))
    summary = run([str(root / "in")], str(out), cfg(workers=1), overwrite=True)
    assert not any(s["features_reused"] for s in summary["shards"])
    assert _outputs(out) == clean


def test_inputs_are_never_modified(many_shards, tmp_path):
    root, _ = many_shards
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "in").glob("*.tar")}
    run([str(root / "in")], str(tmp_path / "out"), cfg(workers=2))
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "in").glob("*.tar")}
    assert after == before


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds dedup's lock on `path` until killed."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'%d' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"locked\n"
    return holder


def test_a_second_run_on_the_same_out_is_refused_and_a_dead_owner_is_taken_over(
    many_shards, tmp_path
):
    root, clean = many_shards
    out = tmp_path / "out"
    (out / ".dedup").mkdir(parents=True)
    (out / ".dedup" / "job.json").write_text("{}")
    holder = _hold_lock(out / ".dedup" / "lock")
    try:
        with pytest.raises(OutputError, match=rf"another dedup run \(pid {holder.pid}\)"):
            run([str(root / "in")], str(out), cfg(workers=2))
    finally:
        holder.kill()
        holder.wait()
    run([str(root / "in")], str(out), cfg(workers=2))
    assert _outputs(out) == clean


def test_two_runs_sharing_a_report_directory(many_shards, tmp_path):
    root, _ = many_shards
    report = tmp_path / "report"
    run([str(root / "in")], str(tmp_path / "out1"), cfg(workers=2), report_dir=str(report))
    holder = _hold_lock(report / ".dedup-report.lock")
    try:
        with pytest.raises(OutputError, match="another dedup run"):
            run([str(root / "in")], str(tmp_path / "out2"), cfg(workers=2), report_dir=str(report))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "out2" / "shard-000000.tar").exists()


def test_skip_bad_shards(tmp_path):
    image = encode(make_image(5, 64, 64))
    write_tar(str(tmp_path / "in/a.tar"), [("x.jpg", image), ("x.txt", b"kept")])
    (tmp_path / "in/b.tar").write_bytes(VALID_TAR[:700])  # truncated
    write_tar(str(tmp_path / "in/c.tar"), [("y.jpg", image), ("z.txt", b"no image")])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, [str(tmp_path / "in"), "--out", str(out), *NO_MODEL_FLAGS, "--workers", "1"]
    )
    assert result.exit_code == 3
    assert "b.tar at byte" in result.stderr.strip().splitlines()[-1]
    result = CliRunner().invoke(
        main,
        [
            str(tmp_path / "in"),
            "--out",
            str(out),
            "--skip-bad-shards",
            "--json",
            "-q",
            *NO_MODEL_FLAGS,
        ],
    )
    assert result.exit_code == 5
    summary = json.loads(result.stdout)
    assert [s["shard"] for s in summary["skipped_shards"]] == [str(tmp_path / "in/b.tar")]
    assert "truncated" in summary["skipped_shards"][0]["error"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["a.tar", "c.tar"]
    assert read_tar(str(out / "a.tar")) == [("x.jpg", image), ("x.txt", b"kept")]
    assert read_tar(str(out / "c.tar")) == [("z.txt", b"no image")]  # y.jpg copies x.jpg
    assert summary["counts"]["samples"] == 3


def test_unusual_keys_round_trip(tmp_path):
    image = encode(make_image(6, 48, 48))
    other = encode(make_image(7, 48, 48))
    members = [
        ("données/élan.v2.jpg", image),
        ("données/élan.v2.txt", "légende".encode()),
        ("x" * 150 + "/deep.key.with.dots.png", encode(make_image(8, 32, 32), "PNG")),
        ("ключ.jpg", other),
        ("noext", b"a member with no extension"),
        ("./rel/../odd.jpg", image),  # a name, never a path: same bytes as élan, removed
        ("/abs/path.txt", b"absolute names stay strings"),
    ]
    write_tar(str(tmp_path / "in/s.tar"), members)
    summary = run([str(tmp_path / "in")], str(tmp_path / "out"), cfg(workers=1))
    rows = pq.read_table(tmp_path / "out/dedup-report/samples.parquet").to_pylist()
    assert [r["key"] for r in rows] == [
        "données/élan",
        "x" * 150 + "/deep",
        "ключ",
        "noext",
        "./rel/../odd",
        "/abs/path",
    ]
    assert summary["counts"]["removed_by_reason"] == {"exact": 1}
    kept = [m for m in members if not m[0].startswith("./rel")]
    assert read_tar(str(tmp_path / "out/s.tar")) == kept
    assert not (tmp_path / "abs").exists() and not Path("/abs/path.txt").exists()


def test_pixel_bomb_costs_no_memory(tmp_path):
    write_tar(
        str(tmp_path / "in/bomb.tar"), [("b.png", png_bomb(30_000, 30_000)), ("b.txt", b"bomb")]
    )
    code = (
        "from dedup.core.config import Config; from dedup.commands.run import run\n"
        f"s = run([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, "
        "Config(workers=1, signals=('exact', 'phash')))\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print(s['counts']['passthrough_by_reason'], hwm.split()[1])"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    reasons, rss_kib = res.stdout.rsplit(" ", 1)
    assert reasons == "{'too_large': 1}"
    assert int(rss_kib) < 400 * 1024  # a decoded 30,000 x 30,000 image would be 900 MB
    assert read_tar(str(tmp_path / "out/bomb.tar"))[1] == ("b.txt", b"bomb")


def test_member_names_that_are_not_utf8_round_trip(tmp_path):
    a = encode(make_image(31, 48, 48))
    b = encode(make_image(32, 48, 48))
    path = tmp_path / "in" / "latin1.tar"
    path.parent.mkdir()
    raw = [(b"caf\xe9.jpg", a), (b"caf\xe9.txt", b"x"), (b"ok.jpg", b), (b"copy\xff.jpg", a)]
    with tarfile.open(
        path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for name, data in raw:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    run([str(tmp_path / "in")], str(tmp_path / "out"), cfg(workers=1))
    with tarfile.open(
        tmp_path / "out" / "latin1.tar", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        got = [(i.name.encode("utf-8", "surrogateescape"), tar.extractfile(i).read()) for i in tar]
    assert got == raw[:3]  # the copy of café.jpg is removed; names are byte-exact
    rows = pq.read_table(tmp_path / "out/dedup-report/samples.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["caf\\xe9", "ok", "copy\\xff"]


def test_dry_run_leaves_other_shards_alone(many_shards, tmp_path):
    root, _ = many_shards
    out = tmp_path / "out"
    run([str(root / "in")], str(out), cfg(workers=1))
    before = sorted(p.name for p in out.glob("*.tar"))
    first = sorted((root / "in").glob("*.tar"))[0]
    run([str(first)], str(out), cfg(workers=1), dry_run=True)
    assert sorted(p.name for p in out.glob("*.tar")) == before


def test_a_failed_rerun_leaves_no_summary_claiming_success(many_shards, tmp_path, monkeypatch):
    root, clean = many_shards
    out = tmp_path / "out"
    run([str(root / "in")], str(out), cfg(workers=1))
    assert json.loads((out / ".dedup/job.json").read_text())["complete"] is True
    real = finish.write_shard

    def failing(features, keep, output, *args):
        if output.endswith("shard-000003.tar"):
            raise OSError("disk full")
        return real(features, keep, output, *args)

    monkeypatch.setattr(finish, "write_shard", failing)
    with pytest.raises(OSError):
        run([str(root / "in")], str(out), cfg(workers=1, keep="first"))
    assert not (out / "dedup-report/summary.json").exists()
    assert not (out / "dedup-report/report.html").exists()
    assert json.loads((out / ".dedup/job.json").read_text())["complete"] is False
    monkeypatch.undo()
    run([str(root / "in")], str(out), cfg(workers=1))
    assert _outputs(out) == clean
    assert json.loads((out / ".dedup/job.json").read_text())["complete"] is True
