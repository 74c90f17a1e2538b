"""CLIP through open_clip with a tiny, randomly initialized model whose checkpoint the
test writes and then loads by path, exactly as real weights are loaded."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dedup.cli import main
from dedup.commands.run import run
from dedup.core.errors import ModelError
from dedup.search.pairs import cosine_pairs
from dedup.signals.clip import Embedder, resolve
from dedup.synth import encode, make_image
from tests.helpers import cfg, read_tar, tiny_model, write_tar

torch = pytest.importorskip("torch")
faiss = pytest.importorskip("faiss")
open_clip = pytest.importorskip("open_clip")

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config JSON path, checkpoint path) of a random tiny open_clip model."""
    return tiny_model(tmp_path_factory.mktemp("tiny"), "dedup-tiny", TINY)


def clip_cfg(tiny, **settings):
    config, checkpoint = tiny
    return cfg(
        **{
            "signals": ("clip",),
            "clip_model": config,
            "clip_pretrained": checkpoint,
            "device": "cpu",
            "batch_size": 4,
            "workers": 1,
            "clip_threshold": 0.999,
            **settings,
        }
    )


def test_checkpoint_loads_by_path_and_identical_images_have_cosine_one(tiny):
    config, checkpoint = tiny
    spec = resolve(config, checkpoint)
    assert spec.model == "dedup-tiny" and spec.checkpoint == os.path.abspath(checkpoint)
    embedder = Embedder.get(spec, "cpu")
    reference = open_clip.create_model("dedup-tiny", pretrained=checkpoint)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            embedder.model.state_dict().values(), reference.state_dict().values(), strict=True
        )
    )
    a, b = make_image(1, 64, 48), make_image(2, 64, 48)
    stored = embedder.embed([a, a.copy(), b])
    assert stored.dtype == np.float16 and stored.shape == (3, 32)  # what the store keeps
    vectors = stored.astype(np.float32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert float(vectors[0] @ vectors[1]) == pytest.approx(1.0, abs=2e-3)
    assert float(vectors[0] @ vectors[2]) < 0.999


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("engine", ["flat", "ivf"])
def test_cosine_pairs_equal_brute_force(threshold, engine):
    # 4,000 vectors: IVF gets 102 cells and probes 32 of them, so it really approximates.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, 16)).astype(np.float32)
    x[2000:] = x[:2000] + rng.normal(scale=0.3, size=(2000, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, s = cosine_pairs(x, threshold, engine=engine)
    sims = x @ x.T
    bi, bj = np.nonzero(np.triu(sims >= np.float32(threshold), k=1))
    got = set(zip(i.tolist(), j.tolist(), strict=True))
    want = set(zip(bi.tolist(), bj.tolist(), strict=True))
    assert np.allclose(s, sims[i, j], atol=1e-5)
    if engine == "flat":
        assert got == want
    else:  # approximate: nothing wrong found; near pairs all found, loose ones mostly
        assert got <= want
        recall = len(got) / len(want)
        assert recall == 1.0 if threshold >= 0.9 else 0.9 <= recall < 1.0


def test_end_to_end_clip_only(tiny, tmp_path):
    a = encode(make_image(11, 80, 60))
    b = encode(make_image(12, 80, 60))
    write_tar(
        str(tmp_path / "in/s.tar"),
        [("x.jpg", a), ("x.txt", b"x"), ("y.jpg", b), ("z.jpg", a), ("z.txt", b"z copy")],
    )
    # A random model does not tell pictures apart as a trained one does: only (nearly)
    # identical images are above this threshold.
    summary = run([str(tmp_path / "in")], str(tmp_path / "out"), clip_cfg(tiny))
    assert summary["counts"]["removed_by_reason"] == {"clip": 1}
    assert summary["thresholds"] == {"clip": 0.999}
    assert read_tar(str(tmp_path / "out/s.tar")) == [("x.jpg", a), ("x.txt", b"x"), ("y.jpg", b)]
    rows = pq.read_table(tmp_path / "out/dedup-report/samples.parquet").to_pylist()
    z = next(r for r in rows if r["key"] == "z")
    assert z["reason"] == "clip" and z["duplicate_of"] == "x"
    assert z["clip_similarity"] == pytest.approx(1.0, abs=2e-3)
    clusters = pq.read_table(tmp_path / "out/dedup-report/clusters.parquet").to_pylist()
    assert [c["signals"] for c in clusters] == [["clip"]]
    # Embeddings are stored per shard and reused by a rerun with the same model.
    again = run([str(tmp_path / "in")], str(tmp_path / "out"), clip_cfg(tiny))
    assert again["counts"] == summary["counts"]
    assert again["shards"][0]["features_reused"] is True


def test_all_three_signals_reasons(tiny, tmp_path):
    a = encode(make_image(21, 96, 72), quality=90)
    reencoded = encode(make_image(21, 96, 72), quality=60)
    write_tar(str(tmp_path / "in/s.tar"), [("a.jpg", a), ("b.jpg", a), ("c.jpg", reencoded)])
    summary = run(
        [str(tmp_path / "in")],
        str(tmp_path / "out"),
        clip_cfg(tiny, signals=("exact", "phash", "clip")),
    )
    # b repeats a's bytes (exact wins over the other links); c is a's picture re-encoded.
    assert summary["counts"]["removed_by_reason"] == {"exact": 1, "phash": 1}


def test_missing_weights_fail_fast_with_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_tar(str(tmp_path / "in/s.tar"), [("x.jpg", encode(make_image(1, 32, 32)))])
    # The default (signals: auto) runs what can run, and says in one line why not CLIP.
    result = CliRunner().invoke(main, [str(tmp_path / "in"), "--out", str(tmp_path / "auto")])
    assert result.exit_code == 0, result.output
    off = [ln for ln in result.stderr.splitlines() if "clip: off" in ln]
    assert len(off) == 1 and "--clip-pretrained PATH" in off[0], result.stderr
    assert "weights ViT-B-32/laion2b_s34b_b79k are not in the local cache" in off[0]
    assert "dedup-wds[clip]" not in off[0]  # torch and open_clip are installed
    summary = json.loads((tmp_path / "auto" / "dedup-report" / "summary.json").read_text())
    assert summary["config"]["signals"] == ["exact", "phash", "views"]
    # CLIP asked for by name fails fast.
    args = [str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--signals", "exact,phash,clip"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 6
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dedup: error: clip: weights ViT-B-32/")
    assert not (tmp_path / "out").exists()  # refused before any work
    assert "--clip-pretrained PATH" in lines[0] and "--signals exact,phash" in lines[0]
    assert "Traceback" not in result.output
    result = CliRunner().invoke(
        main,
        [
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "o2"),
            "--clip-pretrained",
            str(tmp_path / "nope.pt"),
        ],
    )
    # weights named in the settings that cannot be loaded: an error, even under auto
    assert result.exit_code == 6 and "neither a checkpoint file nor" in result.stderr


def test_bad_model_name(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'ViT-Q-99'"):
        resolve("ViT-Q-99", "x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: CUDA path not tested here")
def test_gpu_embeddings_match_cpu(tiny):  # pragma: no cover - runs on a GPU machine
    spec = resolve(*tiny)
    images = [make_image(k, 64, 48) for k in range(8)]
    cpu = Embedder.get(spec, "cpu").embed(images).astype(np.float32)
    gpu = Embedder.get(spec, "cuda").embed(images).astype(np.float32)
    assert np.allclose(cpu, gpu, atol=2e-2)


def test_a_run_without_clip_never_imports_torch(tmp_path):
    import subprocess
    import sys

    write_tar(str(tmp_path / "in/s.tar"), [("x.jpg", encode(make_image(1, 32, 32)))])
    code = (
        "import sys; from dedup.core.config import Config; from dedup.commands.run import run; "
        f"run([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, "
        "Config(signals=('exact', 'phash'), workers=1)); "
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_check_clip_flag(tiny):
    config, checkpoint = tiny
    result = CliRunner().invoke(
        main,
        [
            "--check-clip",
            "--clip-model",
            config,
            "--clip-pretrained",
            checkpoint,
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0
    assert f"dedup-tiny weights at {os.path.abspath(checkpoint)}, device cpu" in result.stderr


def test_weights_that_do_not_fit_the_model_fail_before_any_work(tiny, tmp_path):
    config, _ = tiny
    other = dict(TINY, embed_dim=16)
    (tmp_path / "other.json").write_text(json.dumps(other))
    open_clip.add_model_config(str(tmp_path / "other.json"))
    torch.save(open_clip.create_model("other").state_dict(), tmp_path / "other.pt")
    (tmp_path / "notes.yaml").write_text("not: weights\n")
    write_tar(str(tmp_path / "in/s.tar"), [("x.jpg", encode(make_image(1, 32, 32)))])
    for weights in (tmp_path / "other.pt", tmp_path / "notes.yaml"):
        args = ["--clip-model", config, "--clip-pretrained", str(weights), "--device", "cpu"]
        check = CliRunner().invoke(main, ["--check-clip", *args])
        assert check.exit_code == 6 and "does not load into dedup-tiny" in check.stderr
        result = CliRunner().invoke(
            main, [str(tmp_path / "in"), "--out", str(tmp_path / "out"), *args]
        )
        assert result.exit_code == 6 and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_a_model_config_that_is_not_json(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    result = CliRunner().invoke(
        main, ["--check-clip", "--clip-model", str(tmp_path / "broken.json")]
    )
    assert result.exit_code == 6 and "is not a readable JSON file" in result.stderr


@pytest.mark.parametrize("k", [1, 4, 64])
def test_knn_search_with_range_fallback_loses_no_pair(k):
    """The GPU search's shape on the CPU: a k-nearest search whose overflowing queries
    (k neighbours all above the threshold) are searched again by range. Clusters of up
    to 150 near-identical vectors overflow any k; the pairs equal brute force exactly."""
    from dedup.search.pairs import knn_range_search

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, 24)).astype(np.float32)
    sizes = rng.integers(1, 150, size=30)
    x = np.concatenate(
        [c + rng.normal(scale=0.05, size=(s, 24)) for c, s in zip(centres, sizes, strict=True)]
    ).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    radius = 0.98
    index = faiss.IndexFlatIP(24)
    index.add(x)
    q, labels, sims = knn_range_search(index, x, x, radius, k)
    brute = x @ x.T
    bq, bl = np.nonzero(brute > radius)
    assert ((brute > radius).sum(axis=1) > k).sum() > 100  # many queries overflow k
    assert set(zip(q.tolist(), labels.tolist(), strict=True)) == set(
        zip(bq.tolist(), bl.tolist(), strict=True)
    )
    assert len(q) == len(bq)  # each pair once per query
    assert np.allclose(sims, brute[q, labels], atol=1e-5)


def test_workers_forked_after_a_model_was_built_do_not_hang(tiny, tmp_path):
    """resolve() builds the model in the process that later forks the global phase's
    workers. Had torch started its OpenMP pool there, a forked worker's FAISS search
    would hang for ever (seen with ViT-B-32 on a CPU); with the fix it returns."""
    import subprocess
    import sys

    code = f"""
import numpy as np, torch
from dedup.signals.clip import resolve
resolve({tiny[0]!r}, {tiny[1]!r})
x = torch.randn(1500, 1500)
(x @ x).sum()  # the driver's own torch work after resolve(), as a 1-shard run does
from dedup.executors.local import LocalExecutor
from dedup.core.progress import Progress
from tests.helpers import near_identical_pairs
print(LocalExecutor(2).map(near_identical_pairs, [1, 2], Progress("t", total_items=2)))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[499500, 499500]"


def test_a_model_with_a_timm_image_tower_loads_and_embeds(tmp_path):
    """Towers built by timm (EVA, ConvNeXt, SigLIP configs) have no `output_dim`; the
    embedding size comes from the model config."""
    pytest.importorskip("timm")
    from dedup.signals.clipstage import JPEG, BatchBuilder, ClipStage

    timm_tower = {
        "embed_dim": 24,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": TINY["text_cfg"],
    }
    spec = resolve(*tiny_model(tmp_path, "dedup-timm-tower", timm_tower))
    embedder = Embedder.get(spec, "cpu")
    assert not hasattr(embedder.model.visual, "output_dim") and embedder.output_dim == 24
    batch = BatchBuilder()
    for k in range(2):
        batch.add(JPEG, encode(make_image(k, 300, 200)))
    vectors, ok, counts = ClipStage(spec, "cpu").embed(*batch.packed())
    assert vectors.shape == (2, 24) and ok.all() and counts == {"device": 2}


def test_calibrate_measures_clip_too(tiny, tmp_path):
    """With the CLIP signal on, calibrate embeds originals and copies through the run's
    own CLIP stage: a recall per edit, a similarity spread, a similarity curve."""
    from dedup.commands.calibrate import calibrate

    for k in range(6):
        write_tar(
            str(tmp_path / "in" / f"s{k}.tar"),
            [(f"{k}{i}.jpg", encode(make_image(40 + 10 * k + i, 64, 48))) for i in range(2)],
        )
    config = clip_cfg(tiny, signals=("exact", "phash", "clip"), clip_threshold=0.9)
    result = calibrate([str(tmp_path / "in")], config, sample=8, edits=["jpeg_q60", "mirror"])
    assert result["signals"] == ["exact", "phash", "clip"]
    assert set(result["recall"]) == {"jpeg_q60", "mirror"}
    assert result["recall"]["jpeg_q60"]["clip"] is not None
    assert result["distances"]["jpeg_q60"]["clip"]["median"] > 0.5
    assert "clip_threshold" in result["recommend"]
    assert result["false_links"]["clip"]["pairs"] == 8 * 7 // 2
