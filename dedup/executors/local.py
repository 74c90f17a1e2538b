"""Run a task over numbered parts in worker processes; results and errors come back as
values, in input order.

Workers never outlive the main process: each asks the kernel to kill it when its parent
dies (and checks the parent's pid as a fallback), ignores Ctrl-C (the main process
decides), and is terminated as soon as the run fails or is stopped. Every exception a
task raises reaches the main process as a DedupError with its exit code and message.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from dedup.core.errors import (
    OUTPUT_ERRNOS,
    DedupError,
    Interrupted,
    TaskFailed,
    WorkerDied,
    output_error,
)
from dedup.core.progress import Progress
from dedup.core.progress import attach as progress_attach
from dedup.core.progress import counters as progress_counters

TICK_SECONDS = 0.5
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_stop_requested: list[int] = []


def request_stop(signum: int) -> None:
    """Note a stop signal; raise Interrupted here and at every later check. A signal
    handler's exception can be swallowed (one raised inside an at-fork or finalizer
    callback is only printed); the note makes the next check stop the run anyway."""
    _stop_requested.append(signum)
    raise Interrupted(signum)


def check_stop() -> None:
    """Raise Interrupted if a stop signal arrived (called between units of work)."""
    if _stop_requested:
        raise Interrupted(_stop_requested[0])


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while processes are forked: a handler that raised inside
    fork's own callbacks would be swallowed and print a traceback. They are delivered,
    and handled, as soon as the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@dataclass
class _Guarded:
    """Runs the task; turns whatever it raises into an error that pickles."""

    fn: Callable

    def __call__(self, item: Any) -> Any:
        try:
            return self.fn(item)
        except DedupError:
            raise
        except OSError as e:
            if e.errno in OUTPUT_ERRNOS:
                raise output_error(e) from None
            raise TaskFailed(f"{type(e).__name__}: {e}", traceback.format_exc()) from None
        except Exception as e:
            raise TaskFailed(f"{type(e).__name__}: {e}", traceback.format_exc()) from None


def worker_init(parent_pid: int, *progress_args) -> None:
    """Initializer of every worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # forked while held
    die_with_parent(parent_pid)
    # OpenMP's thread pool does not survive fork: a forked worker whose parent already
    # ran a parallel FAISS search hangs in its first one. One thread per worker (there
    # is a worker per core) never starts the pool.
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    if progress_args:
        progress_attach(*progress_args)


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` is gone: SIGKILL from the kernel on Linux, and
    a watcher thread elsewhere (and for the moment between fork and prctl)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="dedup-parent-watch").start()


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
    guarded = _Guarded(fn)
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


# ---------------------------------------------------------------- the seam


class Executor:
    """Runs a task over numbered parts and returns the results in input order.

    Tasks are picklable callables over picklable items; they read their inputs and
    write their results as files (atomically), so a task that runs twice (a retry, a
    rerun after a stop) does no harm. Every failure reaches the caller as a DedupError
    with its exit code and message. `cuda` says the task uses CUDA (a GPU stage).
    """

    name = "base"
    # Tasks that can run at once; partitioned phases size their partitions by it.
    parallelism = 1

    def map(
        self,
        fn: Callable,
        items: list,
        progress: Progress,
        describe: Callable[[Any], str] = str,
        cuda: bool = False,
    ) -> list:
        raise NotImplementedError

    def clip_stages(self, spec, devices: list[str]):
        """A context manager whose value lists one CLIP stage per device (picklable
        handles with `.client()`), stopped when it exits."""
        from dedup.signals.clipstage import StageProcesses

        return _Stages(StageProcesses(spec, devices))

    def close(self) -> None:
        """Release what the executor started (worker pools, a local Ray cluster)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stages:
    def __init__(self, owner) -> None:
        self.owner = owner

    def __enter__(self) -> list:
        return self.owner.stages

    def __exit__(self, *exc) -> None:
        self.owner.close()


class LocalExecutor(Executor):
    """This machine's processes (forked; spawned for CUDA, which cannot be forked)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.parallelism = max(1, workers)

    def map(self, fn, items, progress, describe=str, cuda=False) -> list:
        start_method = "spawn" if cuda else "fork"
        return map_local(fn, items, self.parallelism, progress, start_method, describe)


def make_executor(name: str, workers: int, ray_address: str = "") -> Executor:
    """The executor a run's config names."""
    if name == "ray":
        from dedup.executors.ray import RayExecutor

        return RayExecutor(ray_address)
    return LocalExecutor(workers)
