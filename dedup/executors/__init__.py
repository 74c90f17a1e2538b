"""Run tasks over parts: in local worker processes or on a Ray cluster."""

from __future__ import annotations

from dedup.executors.base import Executor
from dedup.executors.local import LocalExecutor
from dedup.executors.ray import RayExecutor

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "make_executor"]


def make_executor(name: str, workers: int, ray_address: str = "") -> Executor:
    """The executor a run's config names."""
    if name == "ray":
        return RayExecutor(ray_address)
    return LocalExecutor(workers)
