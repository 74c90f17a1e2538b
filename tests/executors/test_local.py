"""The local executor: one pool of forked workers for a run's phases (used with `with`,
as a run uses it), a new pool after a failed phase, and one pool per map without."""

from __future__ import annotations

import os
import time

import pytest

from dedup.core.errors import ShardError
from dedup.core.progress import Progress
from dedup.executors.local import LocalExecutor


def _pid(item: int) -> int:
    time.sleep(0.05)  # long enough that both workers take some
    return os.getpid()


def _fail_on_three(item: int) -> int:
    if item == 3:
        raise ShardError(f"part-{item}.tar", "damaged on purpose")
    return item * 10


def _pids(executor: LocalExecutor) -> set[int]:
    return set(executor.map(_pid, list(range(8)), Progress("t", total_items=8)))


def test_one_pool_serves_every_phase_of_a_run():
    with LocalExecutor(2) as executor:
        first = _pids(executor)
        pool = executor.pool
        workers = set(pool._processes)
        assert executor.map(_fail_on_three, [0, 1, 2], Progress("t")) == [0, 10, 20]
        assert _pids(executor) | first <= workers and len(workers) == 2
        assert executor.pool is pool and os.getpid() not in workers
    assert executor.pool is None  # closed with the run


def test_a_failed_phase_stops_the_pool_and_the_next_phase_gets_a_new_one():
    with LocalExecutor(2) as executor:
        before = _pids(executor)
        with pytest.raises(ShardError, match="part-3.tar: damaged on purpose"):
            executor.map(_fail_on_three, list(range(6)), Progress("t"))
        assert executor.pool is None
        after = _pids(executor)
        assert after and not after & before  # the old workers are gone
        assert executor.map(_fail_on_three, [4, 5], Progress("t")) == [40, 50]


def test_without_with_each_map_has_a_pool_of_its_own():
    executor = LocalExecutor(2)
    first, second = _pids(executor), _pids(executor)
    assert first and second and not first & second
    assert executor.pool is None
