"""Run a task over numbered parts in this machine's worker processes; results and
errors come back as values, in input order.

Workers never outlive the main process: each asks the kernel to kill it when its parent
dies (and checks the parent's pid as a fallback), ignores Ctrl-C (the main process
decides), and is terminated as soon as the run fails or is stopped. Every exception a
task raises reaches the main process as a DedupError with its exit code and message.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dedup.core.errors import (
    WorkerDied,
)
from dedup.core.processes import check_stop, signals_deferred, worker_init
from dedup.core.progress import Progress
from dedup.core.progress import counters as progress_counters
from dedup.executors.base import Executor, Guarded

TICK_SECONDS = 0.5


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate a pool's workers now and wait for them (no task finishes after this)."""
    processes = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(5)


def map_local(
    fn: Callable,
    items: list,
    workers: int,
    progress: Progress,
    start_method: str = "fork",
    describe: Callable[[Any], str] = str,
) -> list:
    """fn over items in up to `workers` processes, results in input order.

    The first failure stops every worker and is raised here; `describe(item)` names the
    part a dead worker was processing.
    """
    results: list = [None] * len(items)
    check_stop()
    if workers <= 1 or len(items) <= 1:
        for n, item in enumerate(items):
            results[n] = fn(item)
            check_stop()
            progress.tick()
        progress.close()
        return results
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(items)),
        mp_context=multiprocessing.get_context(start_method),
        initializer=worker_init,
        initargs=(os.getpid(), *progress_counters()),
    )
    guarded = Guarded(fn)
    try:
        with signals_deferred():  # submit() forks the workers
            pending = {pool.submit(guarded, item): n for n, item in enumerate(items)}
        while pending:
            check_stop()
            done, _ = wait(pending, timeout=TICK_SECONDS, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                n = pending.pop(future)
                try:
                    results[n] = future.result()
                except BrokenProcessPool:
                    raise WorkerDied(
                        f"{describe(items[n])}: a worker process died while working on it "
                        "(killed, or out of memory?)"
                    ) from None
            progress.tick()
    except BaseException:
        stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    progress.close()
    return results


class LocalExecutor(Executor):
    """This machine's processes (forked; spawned for CUDA, which cannot be forked)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.parallelism = max(1, workers)

    def map(self, fn, items, progress, describe=str, cuda=False) -> list:
        start_method = "spawn" if cuda else "fork"
        return map_local(fn, items, self.parallelism, progress, start_method, describe)
