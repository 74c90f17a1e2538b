"""CLIP's device path on the CPU: JPEGs decoded, oriented, resized and normalized by the
stage (torchvision), compared with the Pillow path; the shared stage process; fallbacks
counted; rows kept aligned when some of a batch fail. The same code runs on a GPU."""

import io
import os
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from dedup.commands.run import run
from dedup.core.errors import ModelError
from dedup.engine.featurestore import feature_path, read_features
from dedup.io.decode import decode_image, read_header
from dedup.io.shards import Shard
from dedup.signals import clipstage
from dedup.signals.clip import resolve
from dedup.signals.clipstage import (
    DEVICE_MODES,
    JPEG,
    PIXELS,
    BatchBuilder,
    ClipStage,
    StageProcesses,
    orient,
    pixel_transform,
    pixels_of,
)
from dedup.synth import make_image
from tests.helpers import (
    DEDUP,
    cfg,
    exif_tagged,
    held_inputs,
    read_tar,
    readers,
    shards_of_every_kind,
    with_orientation,
    write_tar,
)

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def stage(tiny224):
    return ClipStage(resolve(*tiny224), "cpu")


def jpeg(img, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", **options)
    return out.getvalue()


def varied_images() -> list[tuple[str, bytes]]:
    picture = make_image(9, 500, 320)
    out = [
        (f"rgb{k}", jpeg(make_image(k, 300 + 61 * k, 200 + 23 * k), quality=90)) for k in range(5)
    ]
    out += [
        ("portrait", jpeg(make_image(7, 240, 420))),
        ("small", jpeg(make_image(8, 120, 90))),  # upscaled to 224
        ("square", jpeg(make_image(10, 224, 224))),  # no resize at all
        ("gray", jpeg(picture.convert("L"))),
        ("cmyk", jpeg(picture.convert("CMYK"))),
        ("progressive", jpeg(picture, progressive=True)),
        ("subsampling444", jpeg(picture, subsampling=0)),
        ("png", _png(picture)),
        ("png_alpha", _png(picture.convert("RGBA"))),
    ]
    out += [(f"exif{o}", with_orientation(make_image(20 + o, 360, 240), o)) for o in range(2, 9)]
    return out


def _png(img) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_orient_is_pillows_exif_transpose():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    for orientation in range(1, 9):
        img = exif_tagged(Image.fromarray(pixels), orientation)
        want = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        got = orient(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1), orientation)
        # JPEG changed the values; compare with the same decoded values, transposed
        assert got.permute(1, 2, 0).numpy().shape == want.shape
        assert np.array_equal(got.permute(1, 2, 0).numpy(), want), orientation


def test_device_path_agrees_with_the_pillow_path(stage, tiny224):
    """Pixels within a fraction of a level on average, embeddings at cosine >= 0.99, for
    every kind of image the readers meet; EXIF orientation applied the same way."""
    spec = resolve(*tiny224)
    transform = pixel_transform(spec)
    config = cfg()
    device, pillow = BatchBuilder(), BatchBuilder()
    reference = []
    for _, data in varied_images():
        header = read_header(data, config)
        decoded = decode_image(data, config, draft=224, draft_mode="RGB")
        reference.append(pixels_of(decoded.image, transform))
        if header.format == "JPEG":  # CMYK too: the CPU decoder takes it
            device.add(JPEG, data, header.orientation)
        else:
            device.add(PIXELS, reference[-1])
        pillow.add(PIXELS, reference[-1])
    vectors, ok, counts = stage.embed(*device.packed())
    wanted, ok2, counts2 = stage.embed(*pillow.packed())
    assert ok.all() and ok2.all()
    assert counts == {"device": len(varied_images()) - 2} and counts2 == {}
    cosine = (vectors.astype(np.float32) * wanted.astype(np.float32)).sum(axis=1)
    names = [name for name, _ in varied_images()]
    assert cosine.min() >= 0.99, dict(zip(names, cosine.round(4).tolist(), strict=True))
    # The model's input itself: what a random model cannot tell apart, pixels can.
    buffer, table = device.packed()
    rows = [r for r in range(len(table)) if table[r, 0] == JPEG]
    images = stage._decode_jpegs(buffer, table, rows)
    prepared = (stage._prepare(images) * stage.std + stage.mean).permute(0, 2, 3, 1).numpy()
    for k, r in enumerate(rows):
        diff = np.abs(prepared[k] - reference[r].astype(np.float32))
        assert diff.mean() < 0.5 and diff.max() <= 8, (names[r], diff.mean(), diff.max())
    # and unrelated pictures are not mistaken for each other
    other = np.abs(prepared[0][:200, :200] - prepared[1][:200, :200]).mean()
    assert other > 10


def test_rows_stay_aligned_when_decoders_refuse(stage):
    """A row the device decoder refuses is decoded with Pillow in the stage (counted); a
    row no decoder reads comes back not ok; every other row keeps its own vector."""
    good = [jpeg(make_image(k, 300, 200)) for k in range(3)]
    png = _png(make_image(5, 300, 200))  # not a JPEG: the JPEG decoder refuses it
    truncated = good[0][: len(good[0]) // 2]
    batch = BatchBuilder()
    for kind, data in [(JPEG, good[0]), (JPEG, png), (JPEG, truncated), (JPEG, good[1])]:
        batch.add(kind, data)
    batch.add(JPEG, good[2])
    vectors, ok, counts = stage.embed(*batch.packed())
    assert ok.tolist() == [True, True, False, True, True]
    assert counts == {"device": 4 - 1, "cpu_refused": 1}
    assert not vectors[2].any()
    for row, data in [(0, good[0]), (1, png), (3, good[1]), (4, good[2])]:
        alone = BatchBuilder()
        alone.add(JPEG, data)
        single, _, _ = stage.embed(*alone.packed())
        assert float(single[0].astype(np.float32) @ vectors[row].astype(np.float32)) > 0.999


def test_shared_stage_process_answers_like_the_inline_stage(stage, tiny224):
    spec = resolve(*tiny224)
    batch = BatchBuilder()
    for _, data in varied_images()[:6]:
        batch.add(JPEG, data)
    want, _, _ = stage.embed(*batch.packed())
    with StageProcesses(spec, ["cpu"]) as owner:
        client = owner.stages[0].client()
        tickets = [client.submit(batch), client.submit(batch)]  # two in flight
        blocks = [ticket[1].name for ticket in tickets]
        for ticket in tickets:
            vectors, ok, counts = client.collect(ticket)
            assert ok.all() and counts == {"device": 6}
            assert np.array_equal(vectors, want)
        # a stage that dies is one clear error in the reader, not a hang
        os.kill(owner.processes[0].pid, signal.SIGKILL)
        owner.processes[0].join(10)
        with pytest.raises(ModelError, match="stage on cpu: the stage process stopped"):
            ticket = client.submit(batch)
            blocks.append(ticket[1].name)
            client.collect(ticket)
    # every batch's shared-memory block was unlinked by the reader, the failed one too
    # (when sending to the dead stage fails, submit() unlinks its block before raising)
    assert not [name for name in blocks if os.path.exists(f"/dev/shm/{name.lstrip('/')}")]


def test_a_stage_that_cannot_start_is_a_model_error(tiny224, tmp_path):
    spec = resolve(*tiny224)
    gone = tmp_path / "gone.pt"
    with open(spec.checkpoint, "rb") as fh:
        gone.write_bytes(fh.read())
    moved = type(spec)(**{**spec.__dict__, "checkpoint": str(gone)})
    gone.unlink()
    with pytest.raises(ModelError, match="cannot start the stage on cpu"):
        StageProcesses(moved, ["cpu"])


def clip_run(tiny224, tmp_path, name, skip_bad_shards=False, **settings):
    config, checkpoint = tiny224
    c = cfg(
        signals=("exact", "phash", "clip"),
        clip_model=config,
        clip_pretrained=checkpoint,
        device="cpu",
        batch_size=3,
        clip_threshold=0.999,
        **settings,
    )
    out = tmp_path / name
    return run([str(tmp_path / "in")], str(out), c, skip_bad_shards=skip_bad_shards), out


def test_a_run_through_the_shared_stage_equals_inline_and_counts_routes(tiny224, tmp_path):
    shards_of_every_kind(tmp_path / "in")
    shared, out_shared = clip_run(
        tiny224, tmp_path, "shared", clip_decode="device", clip_stage="shared", workers=2
    )
    inline, out_inline = clip_run(
        tiny224, tmp_path, "inline", clip_decode="device", clip_stage="inline", workers=1
    )
    # a0, a1, b1, b2, c0, c1 on the device (a3 repeats a0's bytes: not decoded again);
    # PNGs and the CMYK JPEG by Pillow in the readers; the truncated JPEG is undecodable.
    routes = {"device": 6, "cpu_not_jpeg": 2, "cpu_cmyk": 1}
    assert shared["counts"]["clip_decode"] == routes == inline["counts"]["clip_decode"]
    assert shared["counts"]["passthrough_by_reason"] == {"no_image": 1, "undecodable": 1}
    assert shared["counts"]["removed_by_reason"] == inline["counts"]["removed_by_reason"]
    for shard in "abc":
        assert read_tar(str(out_shared / f"{shard}.tar")) == read_tar(
            str(out_inline / f"{shard}.tar")
        )
        a = read_features(
            feature_path(
                str(out_shared / ".dedup/features"), Shard(str(tmp_path / "in" / f"{shard}.tar"))
            ),
            ["key", "clip", "status"],
        )
        b = read_features(
            feature_path(
                str(out_inline / ".dedup/features"), Shard(str(tmp_path / "in" / f"{shard}.tar"))
            ),
            ["key", "clip", "status"],
        )
        assert a.equals(b)  # the same vectors, bit for bit, whichever process ran them
    samples = pq.read_table(out_shared / "dedup-report/samples.parquet").to_pylist()
    by_key = {r["key"]: r for r in samples}
    assert by_key["a3"]["reason"] == "exact"
    assert by_key["b3"]["reason"] == "undecodable"


def test_device_and_pillow_decodes_find_the_same_duplicates(tiny224, tmp_path):
    shards_of_every_kind(tmp_path / "in")
    device, out_device = clip_run(tiny224, tmp_path, "device", clip_decode="device", workers=2)
    pillow, out_pillow = clip_run(tiny224, tmp_path, "pillow", clip_decode="pillow", workers=2)
    assert pillow["counts"]["clip_decode"] == {"cpu_pillow": 9}
    assert device["counts"]["removed_by_reason"] == pillow["counts"]["removed_by_reason"]
    for shard in "abc":
        assert read_tar(str(out_device / f"{shard}.tar")) == read_tar(
            str(out_pillow / f"{shard}.tar")
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: nvJPEG path not tested here")
def test_gpu_decode_agrees_with_the_pillow_path(tiny224):  # pragma: no cover - needs a GPU
    spec = resolve(*tiny224)
    transform = pixel_transform(spec)
    config = cfg()
    gpu, cpu = ClipStage(spec, "cuda"), ClipStage(spec, "cpu")
    device, pillow = BatchBuilder(), BatchBuilder()
    for _, data in varied_images():
        header = read_header(data, config)
        pixels = pixels_of(decode_image(data, config, draft=224, draft_mode="RGB").image, transform)
        if header.format == "JPEG" and header.mode in DEVICE_MODES:
            device.add(JPEG, data, header.orientation)
        else:
            device.add(PIXELS, pixels)
        pillow.add(PIXELS, pixels)
    vectors, ok, counts = gpu.embed(*device.packed())
    wanted, _, _ = cpu.embed(*pillow.packed())
    assert ok.all() and sum(counts.values()) == len(varied_images()) - 3
    cosine = (vectors.astype(np.float32) * wanted.astype(np.float32)).sum(axis=1)
    assert cosine.min() >= 0.99, cosine


def group_processes(pgid: int) -> list[str]:
    """Command lines of the live processes of a process group."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()  # noqa: SIM115 - one short read
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(open(f"/proc/{entry}/cmdline").read().replace("\0", " "))  # noqa: SIM115
        except (OSError, IndexError, ValueError):
            continue
    return found


@pytest.mark.slow  # a held run with a CLIP stage process, then SIGINT
def test_ctrl_c_stops_a_run_with_a_shared_stage_cleanly(tiny224, tmp_path):
    """Ctrl-C reaches the whole process group, stage included: one line, exit 130, and
    no stage process or shared-memory block left behind."""
    shards_of_every_kind(tmp_path / "in")
    held = tmp_path / "held"
    inputs = held_inputs(tmp_path, held)
    config, checkpoint = tiny224
    blocks_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [DEDUP, *inputs, "--out", str(tmp_path / "out"), "--clip-model", config,
         "--clip-pretrained", checkpoint, "--device", "cpu", "--clip-stage", "shared",
         "--clip-decode", "device", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while len(readers(held)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(readers(held)) == 2, "the readers never started"
        assert any("spawn" in cmd for cmd in group_processes(proc.pid))  # the stage is up
        os.killpg(proc.pid, signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        (held / "go").touch()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "dedup: interrupted: SIGINT: stopped; rerun to resume"
    deadline = time.monotonic() + 15
    while any("spawn" in cmd for cmd in group_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any("spawn" in cmd for cmd in group_processes(proc.pid))
    assert set(os.listdir("/dev/shm")) <= blocks_before


def test_large_images_are_resized_a_few_at_a_time_with_the_same_result(stage, monkeypatch):
    images = [
        torch.from_numpy(np.array(make_image(60 + k, 300, 200))).permute(2, 0, 1) for k in range(5)
    ]
    whole = stage._prepare(images)
    monkeypatch.setattr(clipstage, "PREPARE_VALUES", 3 * 300 * 200 * 2)  # two at a time
    assert torch.equal(stage._prepare(images), whole)


def test_a_camera_sized_jpeg_is_prepared_by_the_reader(tiny224, tmp_path):
    """Above DEVICE_MAX_PIXELS a JPEG takes the reader's draft decode (route
    `cpu_large`): a batch of camera originals must not be decoded at full size on the
    device."""
    w, h = 5200, 3200
    assert w * h > clipstage.DEVICE_MAX_PIXELS
    y, x = np.mgrid[0:h:8, 0:w:8]
    ramp = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    large = Image.fromarray(ramp).resize((w, h), Image.Resampling.NEAREST)
    write_tar(
        str(tmp_path / "in" / "s.tar"),
        [("big.jpg", jpeg(large, quality=80)), ("small.jpg", jpeg(make_image(3, 320, 240)))],
    )
    summary, out = clip_run(tiny224, tmp_path, "out", clip_decode="device", workers=1)
    assert summary["counts"]["clip_decode"] == {"cpu_large": 1, "device": 1}
    rows = pq.read_table(out / "dedup-report/samples.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [("big", "unique"), ("small", "unique")]


def test_a_shard_that_breaks_mid_way_gives_up_its_batches_in_flight(tiny224, tmp_path):
    """A tar cut inside its 10th image, read through a shared stage in batches of 3:
    the batches already sent are given up (their shared memory freed), the shard is
    skipped with --skip-bad-shards, and the other shard's output is whole."""
    members = [(f"k{k:02d}.jpg", jpeg(make_image(700 + k, 320, 240))) for k in range(12)]
    write_tar(str(tmp_path / "in" / "a.tar"), members)
    good = write_tar(str(tmp_path / "in" / "b.tar"), members[:2])
    whole = (tmp_path / "in" / "a.tar").read_bytes()
    cut = whole.index(members[9][1]) + 100
    (tmp_path / "in" / "a.tar").write_bytes(whole[:cut])
    blocks_before = set(os.listdir("/dev/shm"))
    summary, _ = clip_run(
        tiny224,
        tmp_path,
        "out",
        skip_bad_shards=True,
        clip_decode="device",
        clip_stage="shared",
        workers=2,
    )
    assert [s["shard"] for s in summary["skipped_shards"]] == [str(tmp_path / "in" / "a.tar")]
    assert read_tar(str(tmp_path / "out" / "b.tar")) == read_tar(good)
    assert set(os.listdir("/dev/shm")) <= blocks_before
