"""The executor seam: a task over numbered parts, results in input order, every failure
a DedupError with its exit code and message, wherever the task ran."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dedup.core.errors import OUTPUT_ERRNOS, DedupError, TaskFailed, output_error
from dedup.core.progress import Progress
from dedup.signals.clipstage import StageProcesses


@dataclass
class Guarded:
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
