"""Progress per phase: a live line on a terminal, plain periodic log lines elsewhere.

Worker processes add to shared counters (inherited through fork); the main process
reads them while it waits for shard results.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import time

log = logging.getLogger("dedup")

# Locked: two workers adding at once would lose one's update, and a phase whose last
# tasks land together would end short of 100%.
_items = multiprocessing.get_context("fork").Value("q", 0)
_bytes = multiprocessing.get_context("fork").Value("q", 0)
REPORT_EVERY = 64  # samples between counter updates in a worker


def attach(items, nbytes) -> None:
    """Pool initializer: use the parent's counters (needed where workers are spawned,
    not forked, as for CUDA)."""
    global _items, _bytes
    _items, _bytes = items, nbytes


def counters():
    """The shared counters, for a pool initializer's arguments."""
    return _items, _bytes


def advance(items: int, nbytes: int = 0) -> None:
    """Called by a phase's inner loop (in any process) as work gets done."""
    # The display only: the final counts come from results, never from here. A worker
    # killed inside this lock (SIGKILL, the OOM killer) would hold it for ever: wait a
    # second at most, then drop the update rather than hang.
    for counter, amount in ((_items, items), (_bytes, nbytes)):
        lock = counter.get_lock()
        if lock.acquire(timeout=1.0):
            try:
                counter.get_obj().value += amount
            finally:
                lock.release()


def _read(counter) -> int:
    """A counter's value without its lock (one aligned 8-byte word): the main process
    never waits on a lock a killed worker may hold."""
    return counter.get_obj().value


def counted(n: int, noun: str) -> str:
    """`n` with thousands separators and `noun` in the plural unless n is 1."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


class Progress:
    """Shows one phase's progress; `total_bytes` or `total_items` gives the ETA.
    `total_items` counts tasks (the global phase's steps, whose tasks advance nothing)
    unless `unit` is "samples" (a phase whose tasks advance per sample: write). Work a
    rerun finds done (stored features, unchanged outputs) is advanced as done, so a
    resumed phase ends at 100%."""

    def __init__(
        self,
        phase: str,
        total_items: int | None = None,
        total_bytes: int | None = None,
        log_interval: float = 30.0,
        stream=None,
        unit: str = "tasks",
    ) -> None:
        self.phase = phase
        self.unit = unit
        self.total_items = total_items
        self.total_bytes = total_bytes
        self.stream = stream or sys.stderr  # None when stderr is closed (2>&-)
        self.tty = bool(
            self.stream is not None
            and getattr(self.stream, "isatty", None)
            and self.stream.isatty()
        )
        self.log_interval = log_interval
        self.started = time.monotonic()
        self.last_log = self.started
        _items.get_obj().value = 0
        _bytes.get_obj().value = 0

    def _fraction(self) -> float | None:
        if self.total_bytes:
            return min(_read(_bytes) / self.total_bytes, 1.0)
        if self.total_items:
            return min(_read(_items) / self.total_items, 1.0)
        return None

    def _text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        items = _read(_items)
        if self._of_tasks():
            tasks = counted(self.total_items, "task")
            return f"{self.phase}: {tasks}, running for {elapsed:.0f} s"
        text = f"{self.phase}: {counted(items, 'sample')}, {items / elapsed:,.0f}/s"
        fraction = self._fraction()
        if fraction is not None:
            text += f", {fraction:.0%}"
            if 0 < fraction < 1:
                eta = elapsed * (1 - fraction) / fraction
                text += f", ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        return text

    def _of_tasks(self) -> bool:
        """A phase of tasks, not of samples: its line counts the tasks."""
        return (
            self.unit == "tasks"
            and _read(_items) == 0
            and bool(self.total_items)
            and not self.total_bytes
        )

    def tick(self) -> None:
        """Refresh the live line, or log when the interval has passed."""
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + self._text())
            self.stream.flush()
        elif now - self.last_log >= self.log_interval:
            self.last_log = now
            log.info("%s", self._text())

    def close(self) -> None:
        if self.tty and self.stream is not None:
            self.stream.write("\r\033[K")
            self.stream.flush()
        text = self._text()
        if _read(_items) == 0 and self.total_bytes:  # every shard's stored features reused
            text = f"{self.phase}: nothing to read (stored features reused)"
        elif self._of_tasks():
            text = f"{self.phase}: {counted(self.total_items, 'task')}"
        log.info("%s, done in %.1f s", text, time.monotonic() - self.started)
