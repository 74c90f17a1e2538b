"""Fixtures that build their own tiny images and shards; nothing is downloaded."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from dedup.config import Config
from dedup.synth import planted_dataset, write_shards

# The signals that need no model weights; CLIP tests build their own tiny model.
NO_MODEL = ("exact", "phash")
NO_MODEL_FLAGS = ["--signals", "exact,phash"]


def cfg(**settings) -> Config:
    """A Config with the model-free signals unless the test names others."""
    return Config(**{"signals": NO_MODEL, **settings})


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


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """40 originals with exact, re-encoded, resized and PNG copies, plus two bad samples,
    in four shards of 17 samples."""
    root = tmp_path_factory.mktemp("planted")
    samples = planted_dataset(
        40,
        {"exact": 8, "reencode": 5, "resize": 5, "png": 4, "webp": 3, "brighten": 3},
        seed=7,
        size=(96, 80),
    )
    paths = write_shards(samples, str(root / "shards"), per_shard=18)
    return samples, paths, str(root / "shards")
