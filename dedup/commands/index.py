"""`dedup index REF... --out INDEX`: the features of every REF in one folder, with a
manifest of the settings and versions they were computed with."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

import numpy as np

from dedup import signals
from dedup.core.config import Config
from dedup.core.errors import ShardError
from dedup.engine.job import Job, discard_spool
from dedup.engine.reading import extract_references
from dedup.engine.references import (
    INDEX_FILE,
    INDEX_FORMAT,
    check_stored,
    resolve_references,
    usable_rows,
)
from dedup.executors import make_executor
from dedup.io.fsutil import write_atomic
from dedup.io.outdir import (
    STATE_DIR,
    check_index_folder,
)
from dedup.io.shards import (
    FileGroup,
)
from dedup.report.tables import (
    package_versions,
)
from dedup.signals.choice import choose_signals
from dedup.signals.clip import ClipSpec


def build_index(refs: list[str], out: str, config: Config, overwrite: bool = False) -> dict:
    """`dedup index REF... --out INDEX`: the features of every REF (shard sets, image
    folders, earlier OUTs, stores, other indexes) in one folder with a manifest of the
    settings and versions they were computed with; `--against INDEX` then decodes
    nothing. Returns the manifest."""

    check_index_folder(out, INDEX_FILE, overwrite)
    config, clip = choose_signals(config)
    features_root = os.path.join(out, "features")
    references = resolve_references(refs, config, features_root, [], out)
    check_stored(references, config, clip)
    os.makedirs(features_root, exist_ok=True)
    manifest_path = os.path.join(out, INDEX_FILE)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an index being rebuilt is no index until it is done
    try:
        with make_executor(config.executor, config.worker_count, config.ray_address) as executor:
            job = Job(out, features_root, config, executor, False, False, clip)
            bad = extract_references(references, job)
    finally:  # pipe: references were read once into the index's spool; not kept
        discard_spool(out)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(out, STATE_DIR))
    if bad:
        raise ShardError(bad[0].shard.path, bad[0].error)
    entries = []
    for ref in references:
        folder = ref.store or os.path.join(features_root, _store_name(ref.label))
        os.makedirs(folder, exist_ok=True)
        for k, source in enumerate(ref.sources):
            path = source.features.path
            if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder):
                # stored elsewhere (an earlier run, a store, another index): copied in
                target = os.path.join(folder, f"{k:06d}.parquet")
                for suffix in ("", ".done"):
                    shutil.copyfile(path + suffix, target + suffix + ".tmp")
                    os.replace(target + suffix + ".tmp", target + suffix)
                path = target
            only = None
            if source.only is not None:
                only = os.path.join(folder, f"{k:06d}.rows.npy")
                np.save(only, np.asarray(source.only, dtype=np.int64))
            shard = source.features.shard
            entries.append(
                manifest_entry(
                    ref.label,
                    "files" if isinstance(shard, FileGroup) else "shard",
                    shard.path,
                    os.path.abspath(shard.root)
                    if isinstance(shard, FileGroup)
                    else (None if source.images is None else source.images.path),
                    os.path.relpath(path, out),
                    source.features.rows,
                    None if only is None else os.path.relpath(only, out),
                )
            )
    items = sum(usable_rows(s) for r in references for s in r.sources)
    return write_manifest(out, config, clip, [r.label for r in references], items, entries)


def manifest_entry(
    reference: str,
    kind: str,
    shard: str,
    location: str | None,
    features: str,
    rows: int,
    only: str | None = None,
) -> dict:
    """One source of an index manifest: a shard ("shard") or a folder's image files
    ("files") of `reference`, its feature file and rows.npy relative to the index."""
    return {
        "reference": reference,
        "kind": kind,
        "shard": shard,
        "location": location,
        "features": features,
        "rows": rows,
        "only": only,
    }


def write_manifest(
    out: str,
    config: Config,
    clip: ClipSpec | None,
    references: list[str],
    items: int,
    sources: list[dict],
) -> dict:
    """Write the manifest that makes folder `out` an index (written last, atomically):
    the settings and versions its features were computed with, and its `sources`
    (manifest_entry). Returns the manifest."""
    manifest = {
        "format": INDEX_FORMAT,
        "tool": "dedup",
        "feature_fingerprint": signals.feature_fingerprint(config),
        "clip": None if clip is None else clip.fingerprint,
        "config": config.to_dict(),
        "versions": package_versions(),
        "references": references,
        "items": items,
        "sources": sources,
    }
    path = os.path.join(out, INDEX_FILE)
    write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _store_name(label: str) -> str:

    return hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16]
