"""Phase 1 over every shard (extract tasks on the executor), and over the references."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any

from dedup.core.config import Config
from dedup.core.errors import DedupError, ShardError
from dedup.core.processes import signals_deferred
from dedup.core.progress import Progress, counted
from dedup.engine.extract import ShardFeatures, extract_shard, input_identity
from dedup.engine.job import Job, spool_folder
from dedup.engine.references import (
    Reference,
    ReferencesError,
    Source,
    usable_rows,
)
from dedup.executors import Executor, LocalExecutor
from dedup.io import storage
from dedup.io.outdir import (
    remove_output,
)
from dedup.io.shards import (
    Shard,
    raw_name,
    shard_size,
)
from dedup.search import kernels
from dedup.signals.clip import stage_devices

log = logging.getLogger("dedup")


@dataclass
class BadShard:
    """A shard left out under --skip-bad-shards, and why."""

    shard: Shard
    error: str
    identity: tuple | None = None  # the input's identity when it failed, where known


def extract_all(
    shards: list[Shard],
    config: Config,
    store: str,
    skip_bad_shards: bool = False,
    clip=None,
    executor: Executor | None = None,
    spool: str | None = None,
) -> list[ShardFeatures | BadShard]:
    """Phase 1 over every shard; with `skip_bad_shards`, a damaged shard becomes a BadShard
    instead of ending the run. `clip` is the resolved spec when the clip signal is on.
    `spool`: the folder where each pipe: input's output is kept, its command run once
    (see spool_folder); without it a pipe: input is read again by each later phase."""
    executor = executor or LocalExecutor(config.worker_count)
    with signals_deferred():  # a stop signal lands after it, never inside numba
        kernels.warm()  # before the workers fork: they inherit it (the global phase's too)
    total = sum(shard_size(s) for s in shards)
    progress = Progress("extract", total_bytes=total)
    if clip is None:
        task = ExtractTask(config, store, skip_bad_shards, spool=spool)
        return executor.map(task, shards, progress, _shard_path)

    devices = stage_devices(config.device)
    on_gpu = devices[0].startswith("cuda")
    if config.clip_stage == "inline" or (config.clip_stage == "auto" and not on_gpu):
        task = ExtractTask(config, store, skip_bad_shards, clip, spool=spool)
        return executor.map(task, shards, progress, _shard_path, cuda=on_gpu)
    # One stage per device owns the model; the readers never touch the GPU themselves.
    with executor.clip_stages(clip, devices) as stages:
        log.info("clip: one shared stage on each of %s", ", ".join(devices))
        task = ExtractTask(config, store, skip_bad_shards, clip, tuple(stages), spool)
        return executor.map(task, shards, progress, _shard_path)


def _shard_path(shard: Shard) -> str:
    return shard.path


@dataclass
class ExtractTask:
    config: Config
    store: str
    skip_bad_shards: bool
    clip: Any = None  # a resolved ClipSpec when the clip signal is on
    stages: tuple = ()  # shared CLIP stages; shards are spread over them by name
    spool: str | None = None  # where pipe: inputs are kept, read once (see spool_folder)

    def __call__(self, shard: Shard) -> ShardFeatures | BadShard:
        stage = None
        if self.stages:
            stage = self.stages[zlib.crc32(raw_name(shard.name)) % len(self.stages)]
        try:
            return extract_shard(shard, self.config, self.store, self.clip, stage, self.spool)
        except ShardError as e:
            if not self.skip_bad_shards:
                raise
            try:
                identity = input_identity(shard)
            except DedupError:
                identity = None
            return BadShard(shard, str(e), identity)


def extract_references(references: list[Reference], job: Job) -> list[BadShard]:
    """Features of the shard sets and folders among `references` (reused when current);
    a REF left with no usable image is a ReferencesError."""
    bad = []
    for ref in references:
        if ref.shards and not ref.sources:
            done = extract_all(
                ref.shards,
                job.config,
                ref.store,
                job.skip_bad_shards,
                job.clip,
                job.executor,
                spool_folder(job.out),
            )
            for result in done:
                if isinstance(result, BadShard):
                    bad.append(result)
                else:
                    ref.sources.append(Source(result, None, result.shard))
        if not any(usable_rows(source) for source in ref.sources):
            raise ReferencesError(f"against {ref.label}: holds no usable images")
    return bad


def extract_phase(shards: list[Shard], job: Job) -> tuple[list[ShardFeatures], list[BadShard]]:
    """Phase 1 over `shards`: their features, and the bad shards left out (whose earlier
    outputs are removed: they no longer reflect the input)."""
    extracted = extract_all(
        shards,
        job.config,
        job.store,
        job.skip_bad_shards,
        job.clip,
        job.executor,
        spool_folder(job.out),
    )
    bad = [r for r in extracted if isinstance(r, BadShard)]
    for b in bad:
        log.warning("skipped bad shard: %s", b.error)
        if not job.dry_run:
            remove_output(storage.join(job.out, b.shard.name))
    return [r for r in extracted if isinstance(r, ShardFeatures)], bad


def log_extract(features: list[ShardFeatures], seconds: float) -> None:
    reused = sum(f.reused for f in features)
    log.info(
        "phase extract done in %.1f s: %s, %s%s",
        seconds,
        counted(len(features), "shard"),
        counted(sum(f.rows for f in features), "sample"),
        f" (stored features of {counted(reused, 'shard')} reused)" if reused else "",
    )
