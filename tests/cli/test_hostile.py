"""Hostile inputs and faults, each through the real CLI on the default path: several shards,
two workers (errors must cross the process boundary with their exit code and message)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dedup.core import errors
from dedup.engine.extract import ShardFeatures
from dedup.engine.featurestore import DONE_SUFFIX, feature_path, store_features
from dedup.engine.write import write_shard
from dedup.io.shards import Shard
from dedup.io.storage import file_identity
from dedup.synth import encode, make_image, planted_dataset, write_shards
from tests.helpers import DEDUP, FLAGS, dedup, error_line, outputs, read_tar, write_tar


@pytest.fixture
def shard_set(five_shards):
    """Five shards of 20 samples (the planted set) and the output of a clean run."""
    return five_shards[0]


def copy_inputs(shard_set: Path, dest: Path) -> Path:
    shutil.copytree(shard_set / "in", dest, copy_function=shutil.copy2)
    return dest


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    return {
        str(p): (p.lstat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------ errors cross processes


@pytest.mark.parametrize(
    "error",
    [
        errors.ShardError("in/a.tar", "damaged tar header", 1024),
        errors.ShardError("in/a.tar", "empty file"),
        errors.ConfigError("bad"),
        errors.InputError("missing"),
        errors.OutputError("refused"),
        errors.FeatureStoreError("damaged"),
        errors.ModelError("no weights"),
        errors.WorkerDied("died"),
        errors.TaskFailed("ValueError: bug", "Traceback ..."),
        errors.Interrupted(signal.SIGTERM),
    ],
)
def test_every_error_pickles_with_its_message_and_exit_code(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error)
    assert str(back) == str(error) and back.exit_code == error.exit_code
    assert back.__dict__ == error.__dict__


# One kind of damage in the quick tests; every kind in the whole suite.
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param("empty", marks=pytest.mark.slow),
        "garbage",
        pytest.param("truncated", marks=pytest.mark.slow),
        pytest.param("bad header", marks=pytest.mark.slow),
    ],
)
def test_a_bad_shard_among_several_names_the_shard_with_workers(shard_set, tmp_path, damage):
    inputs = copy_inputs(shard_set, tmp_path / "in")
    bad = inputs / "shard-000002.tar"
    data = bad.read_bytes()
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "garbage":
        bad.write_bytes(os.urandom(5000))
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.write_bytes(data[:100] + b"\xff" * 8 + data[108:])  # the mode field
    result = dedup(inputs, "--out", tmp_path / "out", *FLAGS, check=3)
    assert error_line(result).startswith(f"dedup: error: {bad}")
    skipped = dedup(inputs, "--out", tmp_path / "out2", "--skip-bad-shards", *FLAGS, check=5)
    assert not (tmp_path / "out2" / bad.name).exists()
    assert "skipped bad shard" in skipped.stderr


def test_a_shard_that_changes_during_the_run_is_named(shard_set, tmp_path):
    inputs = copy_inputs(shard_set, tmp_path / "in")
    out = tmp_path / "out"
    dedup(inputs, "--out", out, "--dry-run", *FLAGS)
    # Features are now stored; rewrite one shard after they were taken (same size).
    target = inputs / "shard-000001.tar"
    path = feature_path(str(out / ".dedup" / "features"), Shard(str(target)))
    rows = pq.read_metadata(path).num_rows
    identity = file_identity(target.stat())
    data = bytearray(target.read_bytes())
    data[700] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(errors.ShardError, match="changed since its features"):
        write_shard(
            ShardFeatures(Shard(str(target)), path, rows, {}, identity),
            [True] * rows,
            str(tmp_path / "x.tar"),
        )
    assert not (tmp_path / "x.tar").exists()


# ------------------------------------------------------------ signals and workers


def _dedup_processes(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmdline = Path("/proc", entry, "cmdline").read_bytes()
                if marker.encode() in cmdline and b"dedup" in cmdline:
                    pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def slow_set(tmp_path_factory):
    """Enough work (about 3 s) to stop a run in the middle: planted shards under root/in
    and the output of a clean run under root/clean."""
    root = tmp_path_factory.mktemp("slow")
    samples = planted_dataset(900, {"exact": 100, "reencode": 100}, seed=5, size=(320, 240))
    write_shards(samples, str(root / "in"), per_shard=100)
    dedup(root / "in", "--out", root / "clean", *FLAGS)
    return root


@pytest.mark.parametrize(
    "signum, group",
    [
        (signal.SIGTERM, False),
        (signal.SIGKILL, False),
        (signal.SIGINT, False),
        (signal.SIGINT, True),  # Ctrl-C in a terminal: the whole process group
    ],
)
@pytest.mark.slow  # a large set, stopped by a signal, then rerun
def test_stopping_the_main_process_stops_its_workers(slow_set, tmp_path, signum, group):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [DEDUP, str(slow_set / "in"), "--out", str(out), *FLAGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    features = out / ".dedup" / "features"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(features.glob("*.done")):
        time.sleep(0.01)
    assert len(_dedup_processes(str(out))) == 3  # the main process and two workers
    if group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)  # the main process only, not its group
    stderr = proc.communicate(timeout=30)[1]
    deadline = time.monotonic() + 5
    while _dedup_processes(str(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dedup_processes(str(out)) == []
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signum
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines()[-1] == (
            f"dedup: interrupted: {signal.Signals(signum).name}: stopped; rerun to resume"
        )
        assert [p for p in out.rglob("*") if ".dedup-tmp" in p.parts] == []
    assert not (out / "dedup-report" / "summary.json").exists()
    dedup(slow_set / "in", "--out", out, *FLAGS)
    assert outputs(out) == outputs(slow_set / "clean")


# ------------------------------------------------------------ the feature store


@pytest.mark.parametrize("target", ["parquet", pytest.param("done", marks=pytest.mark.slow)])
def test_a_flipped_bit_in_the_feature_store_is_not_trusted(shard_set, tmp_path, target):
    out = tmp_path / "out"
    dedup(shard_set / "in", "--out", out, *FLAGS)
    stored = sorted((out / ".dedup" / "features").glob(f"*.{target}"))
    assert len(stored) == 5
    for k, path in enumerate(stored):
        data = bytearray(path.read_bytes())
        data[(k * 997 + 40) % len(data)] ^= 1 << (k % 8)
        path.write_bytes(bytes(data))
    result = dedup(shard_set / "in", "--out", out, "--json", *FLAGS)
    reused = [s["features_reused"] for s in json.loads(result.stdout)["shards"]]
    assert reused == [False] * 5
    assert outputs(out) == outputs(shard_set / "clean")


def test_a_damaged_member_offset_never_shifts_a_member(shard_set, tmp_path):
    """A feature record whose checksum matches but whose offset is wrong (as if written
    wrong) is caught by the tar header check before a byte is copied."""
    out = tmp_path / "out"
    dedup(shard_set / "in", "--out", out, *FLAGS)
    shard = Shard(str(shard_set / "in" / "shard-000000.tar"))
    path = feature_path(str(out / ".dedup" / "features"), shard)
    table = pq.read_table(path)
    offsets = table.column("member_offsets").to_pylist()
    offsets[3] = [o + 2 for o in offsets[3]]
    column = pa.array(offsets, type=table.schema.field("member_offsets").type)
    damaged = table.set_column(
        table.schema.get_field_index("member_offsets"), "member_offsets", column
    )
    marker = json.loads(Path(path + DONE_SUFFIX).read_text())
    store_features(path, damaged, marker["fingerprint"], marker["skipped_members"])
    features = ShardFeatures(shard, path, table.num_rows, {}, file_identity(os.stat(shard.path)))
    with pytest.raises(errors.ShardError, match="does not match the member recorded"):
        write_shard(features, [True] * table.num_rows, str(tmp_path / "x.tar"))
    assert not (tmp_path / "x.tar").exists()


def test_an_equal_size_swap_with_the_mtime_restored_is_seen(tmp_path):
    """`cp -p` / `rsync -a` restore the mtime; the change time and inode still differ."""
    a, b, c = (encode(make_image(seed, 64, 64)) for seed in (1, 2, 3))
    b2 = encode(make_image(4, 64, 64))
    while len(b2) != len(a):  # a different picture with exactly the bytes' length of `a`
        b2 = b2[:-1] if len(b2) > len(a) else b2 + b"\0"
    write_tar(str(tmp_path / "in/s0.tar"), [("x.jpg", a), ("y.jpg", b)])
    write_tar(str(tmp_path / "in/s1.tar"), [("z.jpg", a), ("w.jpg", c)])
    out = tmp_path / "out"
    first = json.loads(dedup(tmp_path / "in", "--out", out, "--json", *FLAGS).stdout)
    assert first["counts"]["removed"] == 1  # z.jpg is a copy of x.jpg
    shard = tmp_path / "in/s1.tar"
    st = shard.stat()
    swapped = tmp_path / "swap.tar"
    write_tar(str(swapped), [("z.jpg", b2), ("w.jpg", c)])
    assert swapped.stat().st_size == st.st_size
    os.replace(swapped, shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = json.loads(dedup(tmp_path / "in", "--out", out, "--json", *FLAGS).stdout)
    assert [s["features_reused"] for s in second["shards"]] == [True, False]
    assert second["counts"]["removed"] == 0
    assert [n for n, _ in read_tar(str(out / "s1.tar"))] == ["z.jpg", "w.jpg"]


def test_content_fingerprint_reads_the_bytes(tmp_path):
    a, b = (encode(make_image(seed, 48, 48)) for seed in (1, 2))
    write_tar(str(tmp_path / "in/s0.tar"), [("x.jpg", a)])
    write_tar(str(tmp_path / "in/s1.tar"), [("y.jpg", b)])
    out = tmp_path / "out"
    dedup(tmp_path / "in", "--out", out, "--fingerprint", "content", *FLAGS)
    again = dedup(tmp_path / "in", "--out", out, "--fingerprint", "content", "--json", *FLAGS)
    assert [s["features_reused"] for s in json.loads(again.stdout)["shards"]] == [True, True]


# ------------------------------------------------------------ listing inputs


def test_a_dangling_symlink_among_the_shards_is_an_error(shard_set, tmp_path):
    inputs = copy_inputs(shard_set, tmp_path / "in")
    os.symlink(tmp_path / "gone.tar", inputs / "shard-000009.tar")
    for spec in (inputs, f"{inputs}/*.tar", f"{inputs}/shard-00000{{0,1,2,3,4,9}}.tar"):
        result = dedup(spec, "--out", tmp_path / "out", *FLAGS, check=3)
        assert str(inputs / "shard-000009.tar") in error_line(result)
        assert "does not exist" in error_line(result)


def test_an_existing_path_is_taken_literally_before_patterns(tmp_path):
    a, b = (encode(make_image(seed, 48, 48)) for seed in (1, 2))
    write_tar(str(tmp_path / "in/x[1].tar"), [("a.jpg", a)])
    write_tar(str(tmp_path / "in/x1.tar"), [("b.jpg", b)])
    write_tar(str(tmp_path / "in/y{1,2}.tar"), [("c.jpg", b)])
    out = tmp_path / "out"
    summary = json.loads(
        dedup(
            tmp_path / "in/x[1].tar", tmp_path / "in/y{1,2}.tar", "--out", out, "--json", *FLAGS
        ).stdout
    )
    assert [s["shard"] for s in summary["shards"]] == [
        str(tmp_path / "in/x[1].tar"),
        str(tmp_path / "in/y{1,2}.tar"),
    ]
    assert read_tar(str(out / "x[1].tar")) == [("a.jpg", a)]


@pytest.mark.parametrize(
    "name",
    [
        b"caf\xe9.tar",
        pytest.param(b"s" * 251 + b".tar", marks=pytest.mark.slow),
        pytest.param("snow-\u2603.tar".encode(), marks=pytest.mark.slow),
    ],
)
def test_odd_shard_file_names(tmp_path, name):
    a, b = (encode(make_image(seed, 48, 48)) for seed in (1, 2))
    inputs = tmp_path / "in"
    write_tar(str(inputs / "plain.tar"), [("x.jpg", a), ("y.jpg", b)])
    odd = os.path.join(os.fsencode(inputs), name)
    shutil.copyfile(inputs / "plain.tar", odd)
    out = tmp_path / "out"
    counts = json.loads(dedup(inputs, "--out", out, "--json", *FLAGS).stdout)["counts"]
    assert (counts["samples"], counts["removed"]) == (4, 2)
    written = os.path.join(os.fsencode(out), name)
    assert os.path.exists(written)
    again = dedup(inputs, "--out", out, "--json", *FLAGS)
    assert [s["features_reused"] for s in json.loads(again.stdout)["shards"]] == [True, True]


def test_macos_appledouble_members_are_skipped_and_counted(tmp_path):
    a, b = (encode(make_image(seed, 48, 48)) for seed in (1, 2))
    members = [
        ("./._s0.jpg", b"\x00\x05\x16\x07appledouble"),
        ("./s0.jpg", a),
        ("./s0.txt", b"caption"),
        ("./._s1.jpg", b"\x00\x05\x16\x07appledouble"),
        ("./s1.jpg", b),
        ("./.DS_Store", b"junk"),
    ]
    write_tar(str(tmp_path / "in/a.tar"), members)
    write_tar(str(tmp_path / "in/b.tar"), [("./._c.jpg", b"x"), ("./c.jpg", a)])
    out = tmp_path / "out"
    summary = json.loads(dedup(tmp_path / "in", "--out", out, "--json", *FLAGS).stdout)
    assert summary["counts"]["skipped_members"] == {"hidden": 4}
    assert summary["counts"]["removed"] == 1
    assert read_tar(str(out / "a.tar")) == [
        ("./s0.jpg", a),
        ("./s0.txt", b"caption"),
        ("./s1.jpg", b),
    ]
    assert read_tar(str(out / "b.tar")) == []


def test_a_posix_sparse_member_is_refused_not_rewritten(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "s0.jpg").write_bytes(encode(make_image(1, 48, 48)))
    with open(work / "s0.bin", "wb") as fh:
        fh.seek(1 << 20)
        fh.write(b"end of a sparse file")
    inputs = tmp_path / "in"
    inputs.mkdir()
    subprocess.run(
        ["tar", "--format=posix", "--sparse", "-cf", str(inputs / "a.tar"), "s0.jpg", "s0.bin"],
        cwd=work,
        check=True,
    )
    write_tar(str(inputs / "b.tar"), [("t.jpg", encode(make_image(2, 48, 48)))])
    assert b"GNU.sparse.major=1" in (inputs / "a.tar").read_bytes()
    result = dedup(inputs, "--out", tmp_path / "out", *FLAGS, check=3)
    line = error_line(result)
    assert line.startswith(f"dedup: error: {inputs / 'a.tar'} at byte ")
    assert "'s0.bin' is a sparse file" in line


# ------------------------------------------------------------ OUT and the report directory


def test_report_into_a_users_directory_is_refused(shard_set, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    files = {
        "summary.json": b"my summary",
        "report.html": b"my page",
        "samples.parquet": b"my table",
        ".report.html.tmp-123": b"my draft",
    }
    for name, data in files.items():
        (mine / name).write_bytes(data)
    result = dedup(shard_set / "in", "--out", tmp_path / "out", "--report", mine, *FLAGS, check=4)
    assert "was not written by dedup (--report)" in error_line(result)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == files
    # With --overwrite, dedup's own file names are replaced; nothing else is touched.
    dedup(shard_set / "in", "--out", tmp_path / "out", "--report", mine, "--overwrite", *FLAGS)
    assert (mine / ".report.html.tmp-123").read_bytes() == b"my draft"
    clean = json.loads((shard_set / "clean/dedup-report/summary.json").read_text())
    assert json.loads((mine / "summary.json").read_text())["counts"] == clean["counts"]


def test_overwrite_never_deletes_a_users_file(shard_set, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    users = {".draft.tmp-123": b"mine", ".shard-000000.tar.tmp-9": b"also mine", "notes": b"x"}
    for name, data in users.items():
        (out / name).write_bytes(data)
    dedup(shard_set / "in", "--out", out, "--overwrite", *FLAGS)
    dedup(shard_set / "in", "--out", out, "--overwrite", *FLAGS)
    for name, data in users.items():
        assert (out / name).read_bytes() == data
    assert outputs(out) == outputs(shard_set / "clean")


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    if not _mount_tmpfs(mount, "size=256k"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow  # the large set
def test_a_full_disk_is_an_output_error(slow_set, small_disk):
    before = tree_state(slow_set / "in")
    result = dedup(slow_set / "in", "--out", small_disk / "out", *FLAGS, check=4)
    assert "No space left on device" in error_line(result)
    assert tree_state(slow_set / "in") == before
    partial = [p for p in (small_disk / "out").rglob("*") if ".dedup-tmp" in p.parts]
    assert partial == []
    for shard in (small_disk / "out").glob("*.tar"):
        read_tar(str(shard))


@pytest.mark.slow  # the large set
def test_a_file_size_limit_is_an_output_error(slow_set, tmp_path):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    result = dedup(slow_set / "in", "--out", tmp_path / "out", *FLAGS, preexec_fn=limit, check=4)
    assert "File too large" in error_line(result)


def test_a_read_only_report_directory_is_an_output_error(shard_set, tmp_path):
    ro = tmp_path / "ro"
    if not _mount_tmpfs(ro, "ro,size=64k"):
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        result = dedup(
            shard_set / "in", "--out", tmp_path / "out", "--report", ro / "r", *FLAGS, check=4
        )
        assert "Read-only file system" in error_line(result)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# ------------------------------------------------------------ config and report command


def test_a_deeply_nested_yaml_config_is_a_usage_error(shard_set, tmp_path):
    config = tmp_path / "deep.yaml"
    config.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    result = dedup(shard_set / "in", "--out", tmp_path / "out", "--config", config, *FLAGS, check=2)
    assert "nested too deeply" in error_line(result)


@pytest.mark.parametrize(
    "damage", [b"", b"{", b"[1, 2]", b'{"counts": 5}', b"\xff\xfe", b"[" * 100000]
)
def test_dedup_report_on_a_damaged_summary(shard_set, tmp_path, damage):
    report = tmp_path / "report"
    shutil.copytree(shard_set / "clean" / "dedup-report", report)
    (report / "summary.json").write_bytes(damage)
    result = dedup("report", report, check=2)
    assert error_line(result).startswith("dedup: error: ")


# ------------------------------------------------------------ found by the hostile-input hunt


def test_a_run_killed_before_job_json_is_resumed_not_refused(shard_set, tmp_path):
    out = tmp_path / "out"
    (out / ".dedup").mkdir(parents=True)
    (out / ".dedup" / "lock").write_bytes(b"")  # all a run killed this early leaves
    dedup(shard_set / "in", "--out", out, *FLAGS)
    assert outputs(out) == outputs(shard_set / "clean")
    foreign = tmp_path / "foreign"
    (foreign / ".dedup").mkdir(parents=True)
    (foreign / ".dedup" / "mine.txt").write_text("x")
    result = dedup(shard_set / "in", "--out", foreign, "--overwrite", *FLAGS, check=4)
    assert "holds a .dedup that dedup did not write" in error_line(result)


def test_a_nul_in_a_pax_member_name_is_shard_damage_found_while_reading(shard_set, tmp_path):
    import io
    import tarfile

    inputs = copy_inputs(shard_set, tmp_path / "in")
    bad = inputs / "shard-000004.tar"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tar:
        data = encode(make_image(9, 32, 32))
        info = tarfile.TarInfo("pq.jpg")
        info.pax_headers = {"path": "p\x00q.jpg"}
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = dedup(inputs, "--out", tmp_path / "out", *FLAGS, check=3)
    assert error_line(result).startswith(f"dedup: error: {bad} at byte 0: member name")
    dedup(inputs, "--out", tmp_path / "out2", "--skip-bad-shards", *FLAGS, check=5)
    assert not (tmp_path / "out2" / bad.name).exists()


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_integer_and_float_images_are_scaled_not_clipped(tmp_path, mode):
    """Two different pictures stored with values far outside 0..255 (or 0..1) must not
    clip to the same saturated image."""
    import numpy as np
    from PIL import Image

    def stored(seed: int) -> bytes:
        pixels = np.asarray(make_image(seed, 64, 64).convert("L"), dtype=np.float64)
        values = pixels * 1_000_000 + 70_000 if mode == "I" else pixels * 40.0 - 100.0
        image = Image.fromarray(values.astype(np.int32 if mode == "I" else np.float32), mode)
        return encode(image, "TIFF")

    write_tar(str(tmp_path / "in/a.tar"), [("x.tif", stored(1))])
    write_tar(str(tmp_path / "in/b.tar"), [("y.tif", stored(2)), ("z.tif", stored(1))])
    summary = json.loads(dedup(tmp_path / "in", "--out", tmp_path / "o", "--json", *FLAGS).stdout)
    assert summary["counts"]["removed_by_reason"] == {"exact": 1}


def test_a_yaml_alias_bomb_is_a_quick_usage_error(shard_set, tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 9):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]")
    lines.append("signals: *a8")
    config = tmp_path / "bomb.yaml"
    config.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    result = dedup(shard_set / "in", "--out", tmp_path / "out", "--config", config, *FLAGS, check=2)
    assert time.monotonic() - start < 30
    assert len(error_line(result)) < 400


def test_a_huge_integer_in_a_config_is_a_usage_error(shard_set, tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("workers: " + "9" * 5000 + "\n")
    result = dedup(shard_set / "in", "--out", tmp_path / "out", "--config", config, *FLAGS, check=2)
    assert error_line(result).startswith(f"dedup: error: config {config}: ")


def test_json_to_a_closed_pipe_is_one_line(shard_set, tmp_path):
    result = subprocess.run(
        f"'{DEDUP}' '{shard_set / 'in'}' --out '{tmp_path / 'out'}' {' '.join(FLAGS)} "
        "-q --json | head -c0; exit ${PIPESTATUS[0]}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("dedup: error: cannot write the summary to stdout (Broken pipe)")
    )


@pytest.mark.slow  # a 600 MB member
def test_a_huge_caption_member_is_copied_without_holding_it_in_memory(tmp_path):
    """A 600 MB non-image member (a hole on disk) passes through phase 1 in bounded chunks
    and is copied byte for byte; no process of the run holds it whole."""
    import tarfile

    size = 600 << 20
    image = encode(make_image(1, 48, 48))
    shard = tmp_path / "in" / "big.tar"
    shard.parent.mkdir()
    with open(shard, "wb") as fh:
        for name, data in [("a.jpg", image), ("a.bin", None)]:
            info = tarfile.TarInfo(name)
            info.size = len(data) if data is not None else size
            fh.write(info.tobuf(tarfile.PAX_FORMAT))
            if data is None:
                fh.seek(size + (-size % 512), os.SEEK_CUR)  # zeros, left as a hole
            else:
                fh.write(data + bytes(-len(data) % 512))
        fh.write(bytes(1024))
    write_tar(str(tmp_path / "in" / "small.tar"), [("b.jpg", encode(make_image(2, 48, 48)))])
    measure = (
        "import resource, subprocess, sys\n"
        "code = subprocess.call(sys.argv[1:])\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(code)\n"
    )
    out = tmp_path / "out"
    result = dedup(
        tmp_path / "in", "--out", out, *FLAGS, program=[sys.executable, "-c", measure, DEDUP]
    )
    peak_mib = int(result.stdout.strip()) / 1024
    assert peak_mib < 450, f"a process of the run peaked at {peak_mib:.0f} MiB"
    with tarfile.open(out / "big.tar") as tar:
        members = tar.getmembers()
        assert [(m.name, m.size) for m in members] == [("a.jpg", len(image)), ("a.bin", size)]
        stream = tar.extractfile(members[1])
        while chunk := stream.read(1 << 24):
            assert not chunk.strip(b"\0")


# ------------------------------------------------------------ found in review


@pytest.mark.slow  # five runs
def test_a_state_dir_is_claimed_like_out(shard_set, tmp_path):
    state = tmp_path / "scratch"
    state.mkdir()
    (state / "user-notes.txt").write_text("mine")
    result = dedup(
        shard_set / "in", "--out", tmp_path / "o1", "--state-dir", state, *FLAGS, check=4
    )
    assert "holds files dedup did not write" in error_line(result)
    dedup(shard_set / "in", "--out", tmp_path / "o1", "--state-dir", state, "--overwrite", *FLAGS)
    dedup(shard_set / "in", "--out", tmp_path / "o1", "--state-dir", state, "--overwrite", *FLAGS)
    assert (state / "user-notes.txt").read_text() == "mine"
    assert len(list(state.glob("*.parquet.done"))) == 5
    inputs = copy_inputs(shard_set, tmp_path / "in")
    refused = dedup(
        inputs, "--out", tmp_path / "o2", "--state-dir", inputs, "--overwrite", *FLAGS, check=4
    )
    assert "is the directory of input shard" in error_line(refused)
    assert sorted(p.name for p in inputs.iterdir()) == sorted(
        p.name for p in (shard_set / "in").iterdir()
    )


def test_two_pipe_inputs_with_one_output_name_are_refused(tmp_path):
    for folder, seed in (("a", 1), ("b", 2)):
        write_tar(str(tmp_path / folder / "s.tar"), [("x.jpg", encode(make_image(seed, 32, 32)))])
    result = dedup(
        f"pipe:cat {tmp_path / 'a' / 's.tar'}",
        f"pipe:cd {tmp_path / 'b'} && cat s.tar",
        "--out",
        tmp_path / "out",
        *FLAGS,
        check=3,
    )
    assert "shares the file name 's.tar'" in error_line(result)
