"""Fixtures that build their own tiny images and shards; nothing is downloaded. Shared
functions live in tests/helpers.py."""

from __future__ import annotations

import logging
import os

import pytest

from dedup.io import storage
from dedup.synth import (
    HARD_EDITS,
    NEAR_EDITS,
    PlantedSample,
    encode,
    make_image,
    planted_dataset,
    write_shards,
)
from tests.helpers import (
    FLAGS,
    RAY_NODE,
    captioned,
    dedup,
    free_port,
    rotated,
    textured,
    tiny_model,
)


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


@pytest.fixture(scope="session")
def five_shards(tmp_path_factory):
    """Five shards of 20 planted samples (60 originals, 20 exact and 15 re-encoded copies)
    under root/in, and the output of a clean run of them (the CLI, two workers) under
    root/clean: (root, samples)."""
    root = tmp_path_factory.mktemp("five-shards")
    samples = planted_dataset(60, {"exact": 20, "reencode": 15}, seed=11, size=(64, 48))
    write_shards(samples, str(root / "in"), per_shard=20)
    dedup(root / "in", "--out", root / "clean", *FLAGS)
    return root, samples


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


_bucket_count = iter(range(1000))


@pytest.fixture
def bucket(s3):
    """A new, empty bucket on the S3 server: its URL."""
    name = f"bucket-{next(_bucket_count)}"
    storage.filesystem("s3://x").mkdir(name)
    return f"s3://{name}"


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


@pytest.fixture(scope="module")
def grey_set(tmp_path_factory):
    """Eight textured originals (first in input order); a 5-degree rotation of 0 and of
    1 and a captioned copy of 2, which the hashes leave in the grey zone; the left half
    of 3 (a part, not a copy); in 3 shards."""
    root = tmp_path_factory.mktemp("grey")
    originals = [textured(500 + k) for k in range(8)]
    samples, truth = [], {}

    def add(image, label):
        key = f"{len(samples):04d}"
        samples.append(PlantedSample(key, {"jpg": encode(image, "JPEG", quality=90)}, None, label))
        truth[key] = label

    for k, image in enumerate(originals):
        add(image, f"original {k}")
    add(rotated(originals[0], 5), "rotated 0")
    add(rotated(originals[1], -5), "rotated 1")
    add(captioned(originals[2]), "captioned 2")
    add(originals[3].crop((0, 0, 160, 240)), "half 3")
    paths = write_shards(samples, str(root / "in"), 5)
    return root, truth, paths


# Edits of evaluation images hidden in the training shards, all of which the model-free
# signals catch on these pictures (mirror and letterbox: the views' hashes).
EVAL_EDITS = ("exact", "reencode", "resize", "png", "mirror", "letterbox", "webp", "brighten")


@pytest.fixture(scope="module")
def decontam(tmp_path_factory):
    """An evaluation set kept as files (12 pictures in nested folders, JPEG and PNG, one
    damaged file, one text file), and training shards with edited copies of 8 of them
    hidden among 30 originals with their own copies."""
    root = tmp_path_factory.mktemp("decontam")
    ev = root / "eval"
    originals = {}
    for k in range(12):
        folder = ev / ("birds" if k % 3 == 0 else "cars/day" if k % 3 == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        fmt, ext = ("PNG", "png") if k % 4 == 3 else ("JPEG", "jpg")
        data = encode(
            make_image(9000 + k, 160, 120), fmt, **({"quality": 92} if ext == "jpg" else {})
        )
        name = folder / f"img{k:02d}.{ext}"
        name.write_bytes(data)
        originals[str(name.relative_to(ev))] = data
    (ev / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (ev / "README.txt").write_text("evaluation set")
    samples = planted_dataset(30, {"exact": 4, "reencode": 4}, seed=21, size=(160, 120))
    planted = {}
    for k, (relpath, data) in enumerate(sorted(originals.items())[: len(EVAL_EDITS)]):
        edit = EVAL_EDITS[k]
        copy = data if edit == "exact" else {**NEAR_EDITS, **HARD_EDITS}[edit](data)
        sample = PlantedSample("", {"jpg": copy, "txt": b"eval copy"}, 1000 + k, edit)
        samples.insert((7 * k) % len(samples), sample)
        planted[id(sample)] = relpath
    # Two copies of one evaluation picture: both go, whichever would have survived.
    twin = sorted(originals)[0]
    second = PlantedSample("", {"jpg": NEAR_EDITS["resize"](originals[twin])}, 1000, "resize")
    samples.append(second)
    planted[id(second)] = twin
    for i, s in enumerate(samples):
        s.key = f"{i:06d}"
    write_shards(samples, str(root / "train"), per_shard=16)
    truth = {s.key: planted[id(s)] for s in samples if id(s) in planted}
    return root, samples, truth
