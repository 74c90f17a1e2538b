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
                {
                    "reference": ref.label,
                    "kind": "files" if isinstance(shard, FileGroup) else "shard",
                    "shard": shard.path,
                    "location": os.path.abspath(shard.root)
                    if isinstance(shard, FileGroup)
                    else (None if source.images is None else source.images.path),
                    "features": os.path.relpath(path, out),
                    "rows": source.features.rows,
                    "only": None if only is None else os.path.relpath(only, out),
                }
            )
    manifest = {
        "format": INDEX_FORMAT,
        "tool": "dedup",
        "feature_fingerprint": signals.feature_fingerprint(config),
        "clip": None if clip is None else clip.fingerprint,
        "config": config.to_dict(),
        "versions": package_versions(),
        "references": [r.label for r in references],
        "items": sum(usable_rows(s) for r in references for s in r.sources),
        "sources": entries,
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _store_name(label: str) -> str:

    return hashlib.sha256(label.encode("utf-8", "surrogateescape")).hexdigest()[:16]
