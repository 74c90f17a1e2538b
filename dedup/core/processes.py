"""What every process of a run shares: stop signals noted and checked between units of
work, and workers that ignore Ctrl-C and never outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

from dedup.core.errors import Interrupted
from dedup.core.progress import attach as progress_attach

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
