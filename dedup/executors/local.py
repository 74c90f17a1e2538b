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
    pool: ProcessPoolExecutor | None = None,
) -> list:
    """fn over items in up to `workers` processes, results in input order.

    The first failure stops every worker and is raised here; `describe(item)` names the
    part a dead worker was processing. `pool`: a pool of the caller's to run in (left
    running after a success; stopped, as its own, after a failure).
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
    owned = pool is None
    if owned:
        pool = new_pool(min(workers, len(items)), start_method)
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
    if owned:
        pool.shutdown(wait=True)
    progress.close()
    return results


def new_pool(workers: int, start_method: str = "fork") -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context(start_method),
        initializer=worker_init,
        initargs=(os.getpid(), *progress_counters()),
    )


class LocalExecutor(Executor):
    """This machine's processes (forked; spawned for CUDA, which cannot be forked).

    Used as a context manager (as a run uses it), the executor keeps one pool of forked
    workers for all its phases: each worker imports, and loads the compiled kernels it
    needs, once a run rather than once a phase. A failed phase stops the pool; the next
    phase forks a new one. Without `with`, each map has a pool of its own."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.parallelism = max(1, workers)
        self.keep_pool = False
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalExecutor:
        self.keep_pool = True
        return self

    def map(self, fn, items, progress, describe=str, cuda=False) -> list:
        if cuda or not self.keep_pool or self.parallelism <= 1 or len(items) <= 1:
            start_method = "spawn" if cuda else "fork"
            return map_local(fn, items, self.parallelism, progress, start_method, describe)
        if self.pool is None:  # its workers fork at the first submit, signals held there
            self.pool = new_pool(self.parallelism)
        try:
            return map_local(fn, items, self.parallelism, progress, "fork", describe, self.pool)
        except BaseException:
            self.pool = None  # stopped by map_local
            raise

    def close(self) -> None:
        pool, self.pool, self.keep_pool = self.pool, None, False
        if pool is not None:
            pool.shutdown(wait=True)
