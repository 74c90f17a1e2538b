"""What the tests share: the dedup CLI in a subprocess, tars built and read, outputs to
compare byte for byte, planted pictures, held and simultaneous starts. Fixtures live in
conftest.py; no test file imports another."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageOps

from dedup.core.config import Config
from dedup.io import storage
from dedup.search.pairs import cosine_pairs
from dedup.synth import encode, make_image

REPO = Path(__file__).resolve().parents[1]

# The console script installed beside this Python.
DEDUP = os.path.join(os.path.dirname(sys.executable), "dedup")

# The signals that need no model weights; CLIP tests build their own tiny model.
NO_MODEL = ("exact", "phash")
NO_MODEL_FLAGS = ["--signals", "exact,phash"]
# The default path of the CLI tests: several worker processes (errors must cross the
# process boundary with their exit code and message).
FLAGS = [*NO_MODEL_FLAGS, "--workers", "2"]
VIEWS = ["--signals", "exact,phash,views", "--workers", "2"]

# One simulated Ray node: one CPU, and small logical memory and object store, so that
# several nodes on this one machine do not each claim its whole memory.
RAY_NODE = {"num_cpus": 1, "memory": 512 * 2**20, "object_store_memory": 150 * 2**20}


# ------------------------------------------------------------ the CLI in a subprocess


def _arg(value) -> str:
    return os.fsdecode(value) if isinstance(value, bytes | os.PathLike) else str(value)


def dedup(
    *args,
    check: int | None = 0,
    env: dict | None = None,
    timeout: float | None = None,
    cwd=None,
    preexec_fn=None,
    program: Sequence[str] = (DEDUP,),
) -> subprocess.CompletedProcess:
    """The dedup CLI with `args` (paths, bytes and numbers as given): no traceback and no
    internal error on stderr, and exit code `check` (None: any). `env` is added to this
    process's environment; `program` runs the CLI another way (a Python wrapper)."""
    result = subprocess.run(
        [*program, *map(_arg, args)],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        env=None if env is None else {**os.environ, **env},
        timeout=timeout,
        cwd=cwd,
        preexec_fn=preexec_fn,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    if check is not None:
        assert result.returncode == check, result.stderr
    return result


def error_line(result) -> str:
    """The one line a failed run prints."""
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("dedup: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def cfg(**settings) -> Config:
    """A Config with the model-free signals unless the test names others."""
    return Config(**{"signals": NO_MODEL, **settings})


# ------------------------------------------------------------ tars and outputs


def read_tar(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of every regular member, in order."""
    out = []
    with tarfile.open(path) as tar:
        for info in tar:
            if info.isreg():
                out.append((info.name, tar.extractfile(info).read()))
    return out


def write_tar(path: str, members: list[tuple[str, bytes]]) -> str:
    """A tar with exactly these members, in this order."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def add_sample(shard, key: str, data: bytes) -> None:
    """Rewrite a shard with one more sample (a new inode, size and times)."""
    members = []
    with tarfile.open(shard) as tar:
        for info in tar:
            members.append((info.name, tar.extractfile(info).read()))
    members.append((f"{key}.jpg", data))
    tmp = str(shard) + ".new"
    write_tar(tmp, members)
    os.replace(tmp, shard)


def first_image(shard) -> bytes:
    """The bytes of a shard's first JPEG member."""
    with tarfile.open(shard) as tar:
        info = next(i for i in tar if i.name.endswith(".jpg"))
        return tar.extractfile(info).read()


def outputs(out: Path) -> dict[str, bytes]:
    """Shards and result tables of an OUT, by name."""
    names = [p for p in out.glob("*.tar")] + [
        out / "dedup-report" / n for n in ("samples.parquet", "clusters.parquet")
    ]
    return {p.name: p.read_bytes() for p in sorted(names)}


def _tables(read) -> dict[str, list]:
    """samples.parquet and clusters.parquet rows, shard paths reduced to file names (the
    report names shards as they were listed: a URL or a local path)."""
    out = {}
    for name in ("samples.parquet", "clusters.parquet"):
        rows = pq.read_table(pa.BufferReader(read(name))).to_pylist()
        for row in rows:
            for column in ("shard", "duplicate_of_shard", "survivor_shard"):
                if row.get(column):
                    row[column] = row[column].rsplit("/", 1)[-1]
        out[name] = rows
    return out


def local_outputs(out: Path) -> dict:
    """An OUT's shards (bytes) and result rows (shards named by file name)."""
    shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}
    return {**shards, **_tables(lambda n: (out / "dedup-report" / n).read_bytes())}


def remote_outputs(url: str, report: str | None = None) -> dict:
    """local_outputs of an OUT in object storage."""
    report = report or f"{url}/dedup-report"
    names = [n for n in storage.listdir(url) if n.endswith(".tar")]
    shards = {n: storage.read_bytes(f"{url}/{n}") for n in names}
    return {**shards, **_tables(lambda n: storage.read_bytes(f"{report}/{n}"))}


def upload(local: Path, url: str) -> None:
    """Every shard of a local folder to a URL prefix."""
    for path in sorted(local.glob("*.tar")):
        storage.put_file(str(path), f"{url.rstrip('/')}/{path.name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------ images


def textured(seed: int) -> Image.Image:
    """A picture with enough corners for local features: make_image and 150 shapes."""
    image = make_image(seed, 320, 240)
    rng = np.random.default_rng(seed)
    draw = ImageDraw.Draw(image)
    for _ in range(150):
        x, y = rng.uniform(0, 300), rng.uniform(0, 220)
        w, h = rng.uniform(4, 30, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle([x, y, x + w, y + h], fill=colour)
    return image


def rotated(image: Image.Image, degrees: float) -> Image.Image:
    """Turned and cropped to the middle 84% (no black corners)."""
    w, h = image.size
    turned = image.rotate(degrees, resample=Image.Resampling.BICUBIC)
    return turned.crop((w * 0.08, h * 0.08, w * 0.92, h * 0.92))


def captioned(image: Image.Image) -> Image.Image:
    """A dark band with white words over the bottom fifth."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    draw.rectangle([0, h * 0.8, w, h], fill=(20, 20, 20))
    draw.text((10, h * 0.84), "A CAPTION OVER THE PICTURE", fill=(255, 255, 255))
    return out


def exif_tagged(img: Image.Image, orientation: int) -> Image.Image:
    """`img` as a JPEG whose EXIF says `orientation`, opened (not transposed)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return Image.open(io.BytesIO(encode(img, "JPEG", quality=95, exif=exif.tobytes())))


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    """`img` stored so that a viewer applying EXIF `orientation` shows `img`: stored
    transformed by the inverse of that orientation's transform."""
    inverse = {6: 8, 8: 6}.get(orientation, orientation)
    stored = ImageOps.exif_transpose(exif_tagged(img, inverse))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for a huge grayscale image with a tiny compressed body."""
    import struct
    import zlib

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    raw = zlib.compress(b"\x00" * (width + 1) * 64, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )


def shards_of_every_kind(root) -> dict[str, bytes]:
    """Three shards: JPEGs (some repeated and re-encoded), PNG, CMYK, EXIF-rotated,
    grayscale, a truncated JPEG that no decoder reads, and a caption-only sample."""
    pictures = [make_image(40 + k, 320, 240) for k in range(6)]
    items = {
        "a0": encode(pictures[0], "JPEG", quality=92),
        "a1": encode(pictures[1], "JPEG"),
        "a2": encode(pictures[2], "PNG"),
        "a3": encode(pictures[0], "JPEG", quality=92),  # a0's bytes
        "b0": encode(pictures[3].convert("CMYK"), "JPEG"),
        "b1": with_orientation(pictures[4], 6),
        "b2": encode(pictures[5].convert("L"), "JPEG"),
        "b3": encode(pictures[1], "JPEG")[:900],  # truncated
        "c0": encode(pictures[3], "JPEG"),
        "c1": encode(pictures[2], "JPEG", quality=97),
        "c2": encode(pictures[1], "PNG"),
    }
    for shard in "abc":
        members = []
        for key in sorted(k for k in items if k[0] == shard):
            members += [(f"{key}.jpg", items[key]), (f"{key}.txt", key.encode())]
        if shard == "c":
            members.append(("c9.txt", b"caption only"))
        write_tar(str(root / f"{shard}.tar"), members)
    return items


# ------------------------------------------------------------ CLIP models


def tiny_model(root: Path, name: str, model_config: dict) -> tuple[str, str]:
    """A random open_clip model `name` (config JSON registered with open_clip, seeded
    weights saved to a checkpoint), loaded by path as real weights are."""
    import open_clip
    import torch

    config = root / f"{name}.json"
    config.write_text(json.dumps(model_config))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    checkpoint = root / f"{name}.pt"
    torch.save(open_clip.create_model(name).state_dict(), checkpoint)
    return str(config), str(checkpoint)


def near_identical_pairs(seed: int) -> int:
    """Pairs among 1,000 near-identical unit vectors: FAISS runs it in parallel. (A
    task that a test's subprocess maps over forked workers, hence importable here.)"""
    v = np.random.default_rng(seed).normal(size=(1000, 64)).astype("float32") * 0.01 + 1
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return len(cosine_pairs(v, 0.9)[0])


# ------------------------------------------------------------ tasks planted in a driver


class PlantedBug(Exception):
    """An exception type no part of dedup knows."""


class BuggyExtract:
    """Takes the place of the extract task (dedup.engine.reading.ExtractTask) in a driver
    that a test starts (`from tests.helpers import BuggyExtract` in its code)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __call__(self, shard):
        if shard.name == "shard-000001.tar":
            raise PlantedBug(f"planted in {shard.name}")
        time.sleep(0.5)  # the other parts are still running when it fails


# ------------------------------------------------------------ held and simultaneous starts

# A pipe: input whose reader waits for a `go` file before it sends the shard, so a test
# can act while a run's readers are all started and none is done.
HELD_SHARD = """\
echo "$(basename "$2") $$" >> "$1/readers"
i=0
while [ ! -e "$1/go" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
exec cat "$2"
"""


def held_inputs(root: Path, folder: Path) -> list[str]:
    """A held pipe: input per shard of root/in; `folder` gets the script and the log."""
    folder.mkdir()
    script = folder / "held.sh"
    script.write_text(HELD_SHARD)
    return [f"pipe:sh {script} {folder} {p}" for p in sorted((root / "in").glob("*.tar"))]


def readers(folder: Path) -> list[tuple[str, int]]:
    """(shard name, pid) of every read of a held input so far."""
    with contextlib.suppress(FileNotFoundError):
        lines = (folder / "readers").read_text().splitlines()
        return [(name, int(pid)) for name, pid in (ln.split() for ln in lines)]
    return []


# Runs the dedup CLI once a `go` file appears: the modules are imported first, so that
# processes started together reach OUT within a millisecond of each other.
STARTER = """
import os, sys, time
import dedup.cli, dedup.commands.fanout, dedup.commands.run
go = sys.argv[1]
open(f"{go}.ready-{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
sys.argv = ["dedup", *sys.argv[2:]]
sys.exit(dedup.cli.main())
"""


def started_together(commands: list[list], go, env=None) -> list[tuple[int, str]]:
    """(exit code, stderr) of dedup commands released at the same instant."""
    go = Path(go)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(go), *map(str, args)],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        for args in commands
    ]
    deadline = time.monotonic() + 120
    while len(list(go.parent.glob(go.name + ".ready-*"))) < len(procs):
        assert time.monotonic() < deadline, "the dedup processes did not start"
        time.sleep(0.01)
    go.touch()  # every process has imported dedup and waits: released together
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for path in [go, *go.parent.glob(go.name + ".ready-*")]:
        path.unlink()
    for _, stderr in results:
        assert "Traceback" not in stderr, stderr
    return results


# ------------------------------------------------------------ the report in a browser


def chromium() -> str:
    """Debian's headless Chromium; skips the test where there is none (fails in CI)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium (.ci/run does)")
    pytest.skip("no chromium here; .ci/run installs it")


def chromium_flags(tmp_path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",  # network off
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
    ]


def render_in_chromium(page: Path, tmp_path) -> tuple[str, str, list[str]]:
    """(the page's <body> attributes after load, its DOM, the browser's flags), the
    network off."""
    browser = chromium()
    flags = chromium_flags(tmp_path)
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "ERROR" in line or "Uncaught" in line], console
    return re.search(r"<body([^>]*)>", dom.stdout).group(1), dom.stdout, flags
