"""Fixtures that build their own tiny images and shards; nothing is downloaded."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import tarfile
from pathlib import Path

import pytest

from dedup.core.config import Config
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1, and the environment that points at it."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


# One simulated Ray node: one CPU, and small logical memory and object store, so that
# several nodes on this one machine do not each claim its whole memory.
RAY_NODE = {"num_cpus": 1, "memory": 512 * 2**20, "object_store_memory": 150 * 2**20}


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A simulated two-node Ray cluster (a head and one worker node) on this machine, for
    the session; started only when a test asks for it (about 8 s and 1 GB).

    Its workers inherit this process's environment as it is when a node starts, so the S3
    server's endpoint is set first: runs on the cluster reach it too. Ray's token
    authentication follows RAY_AUTH_MODE (off unless set), for the nodes and the drivers
    that tests start alike."""
    cluster_utils = pytest.importorskip("ray.cluster_utils")
    cluster = cluster_utils.Cluster(
        initialize_head=True, head_node_args={**RAY_NODE, "include_dashboard": False}
    )
    try:
        cluster.add_node(**RAY_NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


# ViT-B-32's input size (224) on a tiny random model, so resizing is tested at full scale.
TINY224 = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 56},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny224(tmp_path_factory):
    """(config JSON, checkpoint) of a random tiny open_clip model with ViT-B-32's input
    size; built only by tests that ask for it."""
    return tiny_model(tmp_path_factory.mktemp("tiny224"), "dedup-tiny224", TINY224)


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


# A pipe: input whose reader waits for a `go` file before it sends the shard, so a test
# can act while a run's readers are all started and none is done.
HELD_SHARD = """\
echo "$(basename "$2") $$" >> "$1/readers"
i=0
while [ ! -e "$1/go" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
exec cat "$2"
"""


def held_inputs(root: Path, folder: Path) -> list[str]:
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
