"""The Ray executor: each part of a phase is one Ray task on a cluster's CPUs (or GPUs).

It joins the cluster that `ray_address` or RAY_ADDRESS names, else starts a local Ray for
the run and stops it at the end; a cluster it only joined is left running. Tasks read and
write files as under the local executor, so every node must see the same paths (a shared
file system or an object store) and import the same `dedup`. Results come back in input
order, and every failure as the DedupError the task raised (or WorkerDied / TaskFailed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from dedup.core.errors import (
    ConfigError,
    DedupError,
    Interrupted,
    ModelError,
    TaskFailed,
    WorkerDied,
)
from dedup.core.processes import check_stop
from dedup.core.progress import Progress, counted
from dedup.core.progress import advance as progress_advance
from dedup.core.progress import counters as progress_counters
from dedup.executors.base import Executor, Guarded
from dedup.executors.local import TICK_SECONDS
from dedup.signals.clipstage import ClipStage

log = logging.getLogger("dedup")

# Ray reruns a task whose worker or node died this many times; a task's own exception is
# final (retry_exceptions stays off): rerunning a bad shard gives the same error.
MAX_RETRIES = 3
# How long joining a cluster may wait for its address to answer at all.
CONNECT_TIMEOUT_SECONDS = 10.0
# How long a failed or stopped run waits for the tasks it cancelled to end.
CANCEL_WAIT_SECONDS = 10.0


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "executor ray: Ray is not installed; pip install 'dedup-wds[ray]'"
        ) from None
    return ray


def _run_task(fn: Callable, item: Any, cwd: str) -> tuple[str, tuple[int, int], Any]:
    """One part on a Ray worker: the node that ran it, the progress it made (samples,
    bytes) and its result; whatever it raises comes back as a DedupError.

    It runs in the driver's working directory where the node has it (as a forked local
    worker does), so that a relative path means the same file on both sides; a Ray
    worker starts in the directory its node was started from."""
    import ray

    if os.getcwd() != cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    items, nbytes = progress_counters()
    items_before, bytes_before = items.value, nbytes.value
    result = Guarded(fn)(item)
    node = ray.get_runtime_context().get_node_id()
    return node, (items.value - items_before, nbytes.value - bytes_before), result


def _check_reachable(address: str) -> None:
    """Fail in seconds where nothing listens at a cluster's address: Ray's own client
    retries such an address for minutes, printing a warning every few seconds."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or another form that Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_SECONDS).close()
    except OSError as e:
        raise ConfigError(
            f"executor ray: cannot join the Ray cluster at {address}: {e.strerror or e}"
        ) from None


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """Keep dedup's SIGINT and SIGTERM handlers: ray.init sets its own SIGTERM handler
    (a bare sys.exit), which would turn a stop into an exit without cleanup or message."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except SystemExit as e:  # SIGTERM arrived while Ray's handler was in place
        if e.code == signal.SIGTERM:
            raise Interrupted(signal.SIGTERM) from None
        raise
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


@contextlib.contextmanager
def _token_auth_notice_hidden() -> Iterator[None]:
    """Hide the warning Ray logs when it turns token authentication on for the local Ray
    it starts (its secure default, kept): a notice about Ray's defaults on every run."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def notice(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")

    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


class RayExecutor(Executor):
    """Tasks on a Ray cluster, one per part, `parallelism` = the cluster's CPUs."""

    name = "ray"

    def __init__(self, ray_address: str = "") -> None:
        ray = self._ray = _import_ray()
        self.address = ray_address or os.environ.get("RAY_ADDRESS", "")
        # The Ray node id of every task that returned a result, and how many ran there.
        self.tasks_by_node: Counter[str] = Counter()
        self._connected = False  # this executor called ray.init (and so ends it)
        self._started = False  # ... and that started a local Ray
        if not ray.is_initialized():
            self._init()
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.parallelism = max(1, int(resources.get("CPU", 0)))
        self.gpus = int(resources.get("GPU", 0))
        address = self.address or ray.get_runtime_context().gcs_address
        what = "started a local Ray" if self._started else f"joined the Ray cluster at {address}"
        log.info(
            "ray: %s: %s, %d CPUs, %d GPUs",
            what,
            counted(len(nodes), "node"),
            self.parallelism,
            self.gpus,
        )
        # SPREAD: a part is seconds of work on files, not on objects in Ray's store, so
        # every node gets parts from the first ones on (the default packs them onto the
        # driver's node until it is half busy).
        self._task = ray.remote(_run_task).options(
            num_cpus=1, max_retries=MAX_RETRIES, scheduling_strategy="SPREAD"
        )

    def _init(self) -> None:
        ray = self._ray
        options = {
            "log_to_driver": False,  # workers' output stays in the cluster's log files
            "logging_level": logging.WARNING,
        }
        if not self.address:
            # "local", not None: None would join whatever cluster this machine ran last.
            options.update(address="local", include_dashboard=False)
        else:
            _check_reachable(self.address)
            options.update(address=self.address)
        try:
            with _own_signal_handlers(), _token_auth_notice_hidden():
                ray.init(**options)
        except Interrupted:
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise
        except Exception as e:
            with contextlib.suppress(Exception):
                ray.shutdown()
            check_stop()
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            if self.address:
                raise ConfigError(
                    f"executor ray: cannot join the Ray cluster at {self.address}: {reason}"
                ) from None
            raise DedupError(f"executor ray: cannot start a local Ray: {reason}") from None
        self._connected = True
        self._started = not self.address

    @property
    def nodes_used(self) -> set[str]:
        """Ray node ids of the nodes that ran at least one task."""
        return set(self.tasks_by_node)

    def map(self, fn, items, progress: Progress, describe=str, cuda=False) -> list:
        ray = self._ray
        results: list = [None] * len(items)
        check_stop()
        if cuda and not self.gpus:
            raise ModelError("executor ray: the tasks need a GPU and the Ray cluster has none")
        task = self._task.options(num_gpus=1) if cuda else self._task
        fn_ref = ray.put(fn)  # sent once, not once per task
        cwd = os.getcwd()
        pending = {task.remote(fn_ref, item, cwd): n for n, item in enumerate(items)}
        try:
            while pending:
                check_stop()
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=TICK_SECONDS)
                if ready:  # and every other one that is done by now
                    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in sorted(ready, key=pending.get):
                    n = pending.pop(ref)
                    node, (done_items, done_bytes), results[n] = self._get(ref, items[n], describe)
                    self.tasks_by_node[node] += 1
                    progress_advance(done_items, done_bytes)
                progress.tick()
        except BaseException:
            self._cancel(list(pending))
            check_stop()  # a stop's Interrupted raised inside Ray's C code comes out changed
            raise
        progress.close()
        return results

    def _get(self, ref, item, describe: Callable[[Any], str]):
        """A finished task's value, or its failure as a DedupError."""
        exceptions = self._ray.exceptions
        try:
            return self._ray.get(ref)
        except exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, DedupError):
                raise cause from None
            # Not from the task's code (which Guarded wraps): a worker that could not
            # load the task, say, or a BaseException.
            raise TaskFailed(f"{type(cause).__name__}: {cause}", str(e)) from None
        except (
            exceptions.WorkerCrashedError,
            exceptions.NodeDiedError,
            exceptions.LocalRayletDiedError,
            exceptions.ObjectLostError,
            exceptions.OutOfMemoryError,
        ) as e:
            raise WorkerDied(
                f"{describe(item)}: the Ray worker running it died and Ray's retries ran out "
                f"(killed, out of memory, or its node left the cluster? {type(e).__name__})"
            ) from None
        except exceptions.RayError as e:
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            raise TaskFailed(
                f"{describe(item)}: Ray: {type(e).__name__}: {reason}", str(e)
            ) from None

    def clip_stages(self, spec, devices: list[str]):
        """One CLIP stage actor per GPU of the cluster (num_gpus=1 each, Ray picks the
        node), or one CPU actor per listed device when the run is on the CPU."""
        ray = self._ray
        if devices[0].startswith("cuda"):
            if not self.gpus:
                raise ModelError("executor ray: CLIP on cuda, and the Ray cluster has no GPU")
            placed = [("cuda", 1)] * self.gpus  # Ray sets CUDA_VISIBLE_DEVICES per actor
        else:
            placed = [(device, 0) for device in devices]
        actor_class = ray.remote(_StageActor)
        stages = [
            RayStage(actor_class.options(num_gpus=gpus, num_cpus=1).remote(spec, device), device)
            for device, gpus in placed
        ]
        try:  # the model is built before any reader starts, so a failure ends the run here
            ray.get([stage.actor.ready.remote() for stage in stages])
        except self._ray.exceptions.RayError as e:
            for stage in stages:
                ray.kill(stage.actor)
            cause = getattr(e, "cause", None)
            raise ModelError(
                f"clip: cannot start the stage on {devices[0]} ({cause or type(e).__name__})"
            ) from None
        return _RayStages(ray, stages)

    def _cancel(self, refs: list) -> None:
        """Stop tasks not yet done (their workers are killed) and wait a little for them to
        end, so that none writes after the run has failed or stopped."""
        if not refs:
            return
        with contextlib.suppress(Exception):
            for ref in refs:
                self._ray.cancel(ref, force=True)
            self._ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS)

    def close(self) -> None:
        if self.tasks_by_node:
            tasks = sum(self.tasks_by_node.values())
            log.info(
                "ray: %s ran on %s",
                counted(tasks, "task"),
                counted(len(self.tasks_by_node), "node"),
            )
        if self._connected:
            # Disconnects from a joined cluster; stops the Ray this executor started.
            self._connected = False
            with contextlib.suppress(Exception), _own_signal_handlers():
                self._ray.shutdown()


class _StageActor:
    """A CLIP stage (dedup/signals/clipstage.py) as a Ray actor."""

    def __init__(self, spec, device: str) -> None:

        self.stage = ClipStage(spec, device)

    def ready(self) -> bool:
        return True

    def embed(self, buffer, table):
        return self.stage.embed(buffer, table)


class RayStage:
    """A reader's handle on a stage actor (picklable: Ray sends actor handles)."""

    def __init__(self, actor, device: str) -> None:
        self.actor = actor
        self.device = device

    def client(self) -> RayStage:
        return self

    def submit(self, batch):
        return self.actor.embed.remote(*batch.packed())

    def discard(self, ref) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.cancel(ref)

    def collect(self, ref):
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            raise ModelError(
                f"clip: stage on {self.device}: {type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:200]}"
            ) from None


class _RayStages:
    def __init__(self, ray, stages: list[RayStage]) -> None:
        self.ray = ray
        self.stages = stages

    def __enter__(self) -> list[RayStage]:
        return self.stages

    def __exit__(self, *exc) -> None:
        for stage in self.stages:
            with contextlib.suppress(Exception):
                self.ray.kill(stage.actor)
