"""A signal defined only here, registered as a third party would (an installed package's
entry point in the group `dedup.signals`), run end to end through the real CLI: its
features computed in the extract phase, its codes through the partitioned global phase
(scatter, pairs, the multi-index near parts, members, the star rule) and into the
outputs, samples.parquet, clusters.parquet, the summary and the report.

The plugin is a difference hash (dHash): 9x8 grey levels, one bit per horizontal step.
It exists nowhere in dedup."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import REPO, dedup, error_line, local_outputs, textured, write_tar

PLUGIN = """
import numpy as np
import pyarrow as pa
from PIL import Image

from dedup.signals import Signal

CALLS = []


def dhash(images, config):
    out = []
    for image in images:
        grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
        g = np.asarray(grey, dtype=np.int16)
        out.append(np.packbits((g[:, 1:] > g[:, :-1]).reshape(-1)).tobytes())
    return out


SIGNAL = Signal(
    name="dhash",
    summary="difference hash (a test's plugin)",
    columns=(pa.field("dhash_code", pa.binary(8)),),
    needs=("phash",),
    links=("dhash",),
    settings=(),
    constants=("9x8 bilinear",),
    thresholds=lambda c: {"dhash": 8},
    search="codes",
    threshold=lambda c: 8,
    compute="dedup_test_dhash:dhash",
)

# Declared wrong: two columns.
BAD = Signal(
    name="badhash",
    summary="",
    columns=(pa.field("a", pa.binary(8)), pa.field("b", pa.binary(8))),
    needs=("phash",),
    links=("badhash",),
    settings=(),
    constants=(),
    thresholds=lambda c: {},
    search="codes",
    threshold=lambda c: 8,
    compute="dedup_test_dhash:dhash",
)
"""

ENTRY_POINTS = """
[dedup.signals]
dhash = dedup_test_dhash:SIGNAL
badhash = dedup_test_dhash:BAD
gone = dedup_test_missing_module:SIGNAL
"""


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict:
    """An installed plugin package: its module and its dist-info on PYTHONPATH, seen by
    the CLI and every worker process it starts."""
    site = tmp_path_factory.mktemp("site")
    (site / "dedup_test_dhash.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "dedup_test_dhash-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dedup-test-dhash\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    path = os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path}


def _jpeg(image: Image.Image, path_quality: int = 90) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=path_quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Three shards: 12 originals and, for 8 of them, a half-size re-encoded copy in a
    later shard (other bytes: the exact signal cannot link them). Returns the folder and
    {copy key: original key}."""
    root = tmp_path_factory.mktemp("planted")
    shards: list[list] = [[], [], []]
    copies = {}
    for k in range(12):
        image = textured(100 + k)
        shards[k % 2].append((f"orig{k:02d}.jpg", _jpeg(image)))
        if k < 8:
            small = image.resize((160, 120), Image.Resampling.LANCZOS)
            shards[2].append((f"copy{k:02d}.jpg", _jpeg(small, 70)))
            copies[f"copy{k:02d}"] = f"orig{k:02d}"
    for n, members in enumerate(shards):
        write_tar(str(root / f"part-{n}.tar"), members)
    return root, copies


def _run(planted_dir: Path, out: Path, env: dict, *extra) -> dict:
    result = dedup(
        planted_dir,
        "--out",
        out,
        "--signals",
        "exact,dhash",
        "--workers",
        "2",
        "--json",
        *extra,
        env=env,
    )
    return json.loads(result.stdout)


def test_plugin_signal_end_to_end(planted, plugin_env, tmp_path):
    folder, copies = planted
    summary = _run(folder, tmp_path / "out", plugin_env)
    samples = pq.read_table(tmp_path / "out" / "dedup-report" / "samples.parquet").to_pylist()
    by_key = {r["key"]: r for r in samples}
    removed = {r["key"]: r for r in samples if r["reason"] not in ("unique", "survivor")}
    # Exactly the planted copies go, each for the plugin's link, to its own original.
    assert set(removed) == set(copies)
    for key, row in removed.items():
        assert row["reason"] == "dhash", row
        assert row["duplicate_of"] == copies[key], row
    assert {k for k, r in by_key.items() if r["reason"] == "survivor"} == set(copies.values())
    assert summary["counts"]["removed_by_reason"] == {"dhash": 8}
    clusters = pq.read_table(tmp_path / "out" / "dedup-report" / "clusters.parquet").to_pylist()
    assert len(clusters) == 8 and all(c["signals"] == ["dhash"] for c in clusters)
    assert summary["config"]["signals"] == ["exact", "dhash"]
    assert summary["thresholds"]["dhash"] == 8
    page = (tmp_path / "out" / "dedup-report" / "report.html").read_text()
    assert "linked by dhash" in page
    # The kept samples, byte for byte, and nothing else.
    kept = [name for name in local_outputs(tmp_path / "out") if name.endswith(".tar")]
    assert len(kept) == 3


def test_plugin_partitioned_equals_one_partition(planted, plugin_env, tmp_path):
    """Many partitions (a few rows each: several scatter runs, pairs parts and near
    parts) give the outputs of one, byte for byte."""
    folder, _ = planted
    config = tmp_path / "small.yaml"
    config.write_text("partition_rows: 3\n")
    _run(folder, tmp_path / "one", plugin_env)
    _run(folder, tmp_path / "many", plugin_env, "--config", config)
    assert local_outputs(tmp_path / "one") == local_outputs(tmp_path / "many")


def test_plugin_features_reused_and_fingerprinted(planted, plugin_env, tmp_path):
    """A rerun reuses the plugin's stored codes; a run without the plugin turned on
    does not depend on it being installed (its outputs equal a run without it)."""
    folder, _ = planted
    first = _run(folder, tmp_path / "out", plugin_env)
    again = _run(folder, tmp_path / "out", plugin_env)
    assert first["counts"]["removed_by_reason"] == again["counts"]["removed_by_reason"]
    assert [s["features_reused"] for s in again["shards"]] == [True, True, True]
    dedup(folder, "--out", tmp_path / "with", "--signals", "exact,phash", env=plugin_env)
    dedup(folder, "--out", tmp_path / "without", "--signals", "exact,phash")
    assert local_outputs(tmp_path / "with") == local_outputs(tmp_path / "without")


def test_broken_plugins_are_one_line_errors_of_the_runs_that_name_them(
    planted, plugin_env, tmp_path
):
    folder, _ = planted
    bad = dedup(folder, "--out", tmp_path / "a", "--signals", "badhash", env=plugin_env, check=2)
    assert "badhash" in error_line(bad) and "one binary(8) column" in error_line(bad)
    gone = dedup(folder, "--out", tmp_path / "b", "--signals", "gone", env=plugin_env, check=2)
    assert "dedup_test_missing_module" in error_line(gone)
    unknown = dedup(folder, "--out", tmp_path / "c", "--signals", "dhash", check=2)
    assert "unknown signal 'dhash'" in error_line(unknown)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
