"""The compiled kernels are cached outside the installed package (dedup.search.kernels
.cache_dir): a reinstall of the same code finds them, and no run compiles them again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dedup

PROBE = (
    "import numpy as np\n"
    "from dedup.search import kernels\n"
    "kernels.chroma_sum(np.zeros((2, 2, 3), np.uint8))\n"
    "s = kernels.chroma_sum.stats\n"
    "print(s.cache_path, sum(s.cache_hits.values()), sum(s.cache_misses.values()))\n"
)


def _install(target: Path) -> None:
    """A fresh copy of the package (new files, new times, no __pycache__)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(
        Path(dedup.__file__).parent, target / "dedup", ignore=shutil.ignore_patterns("__pycache__")
    )


def _probe(site: Path, cache: Path) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), DEDUP_CACHE_DIR=str(cache))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_kernels_compile_once_and_survive_a_reinstall(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    _install(site)
    path, hits, misses = _probe(site, cache)
    assert (hits, misses) == (0, 1)  # the first run on this machine compiles
    assert Path(path).is_relative_to(cache / "numba")
    assert not list(site.rglob("*.nbi"))  # nothing written into the package
    _install(site)  # reinstalled: the same code in new files
    assert _probe(site, cache)[1:] == (1, 0)  # loaded, not compiled


def test_numba_cache_dir_is_respected(tmp_path):
    site = tmp_path / "site"
    _install(site)
    env = {**os.environ, "PYTHONPATH": str(site), "NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(out[0]).is_relative_to(tmp_path / "mine")


def test_no_home_folder_leaves_numba_its_own_places(monkeypatch):
    """Without DEDUP_CACHE_DIR, XDG_CACHE_HOME or a home to expand, the cache is never a
    relative folder under the working directory."""
    from numba.core import config as numba_config

    from dedup.search import kernels

    monkeypatch.setattr(numba_config, "CACHE_DIR", "")
    monkeypatch.delenv("DEDUP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # "~" stays "~"
    assert kernels.cache_dir() == ""
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert kernels.cache_dir() == ""
    monkeypatch.setenv("DEDUP_CACHE_DIR", "rel")
    assert kernels.cache_dir() == os.path.join(os.path.abspath("rel"), "numba")
