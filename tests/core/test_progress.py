import io
import logging
import multiprocessing
import os
import signal
import time

from dedup.core.progress import Progress, advance, attach, counted, counters


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_one_live_line_with_eta(caplog):
    term = FakeTerminal()
    progress = Progress("extract", total_bytes=1000, stream=term)
    advance(50, 250)
    progress.tick()
    text = term.getvalue()
    assert text.startswith("\r\x1b[K") and "extract: 50 samples" in text
    assert "25%" in text and "ETA" in text
    with caplog.at_level(logging.INFO, logger="dedup"):
        progress.close()
    assert term.getvalue().endswith("\r\x1b[K")  # the live line is cleared
    assert "extract: 50 samples" in caplog.text and "done in" in caplog.text


def test_log_lines_without_a_terminal(caplog):
    stream = io.StringIO()
    progress = Progress("write", total_items=200, stream=stream, log_interval=0)
    with caplog.at_level(logging.INFO, logger="dedup"):
        advance(100)
        progress.tick()
        advance(100)
        progress.close()
    assert stream.getvalue() == ""  # no control codes in a log file
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("write: 100 samples") and "50%" in lines[0]
    assert lines[-1].startswith("write: 200 samples") and "100%" in lines[-1]


def test_counts_read_as_words():
    assert counted(1, "task") == "1 task"
    assert counted(0, "sample") == "0 samples"
    assert counted(1234567, "sample") == "1,234,567 samples"


def test_a_phase_of_tasks_counts_one_task(caplog):
    progress = Progress("resolve", total_items=1, stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="dedup"):
        progress.close()
    assert caplog.records[-1].getMessage().startswith("resolve: 1 task, done in ")


def test_a_phase_of_samples_never_counts_tasks(caplog):
    """write's total is samples: with none written yet it says 0 samples, not 1,234 tasks."""
    stream = io.StringIO()
    progress = Progress("write", total_items=1234, stream=stream, log_interval=0, unit="samples")
    with caplog.at_level(logging.INFO, logger="dedup"):
        progress.tick()
        advance(1234)
        progress.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("write: 0 samples, 0/s, 0%")
    assert lines[-1].startswith("write: 1,234 samples, ") and ", 100%, done in " in lines[-1]


def test_a_worker_killed_inside_the_counters_lock_stops_nothing(caplog):
    """A worker SIGKILLed (the OOM killer, a stop) while it holds a counter's lock holds
    it for ever: the main process's display and reset must not wait on it, and the
    other workers' updates give up after a second instead of hanging the run."""
    saved = counters()
    ctx = multiprocessing.get_context("fork")
    fresh = (ctx.Value("q", 0), ctx.Value("q", 0))
    attach(*fresh)
    try:
        held = ctx.Event()

        def hold_and_wait():
            fresh[0].get_lock().acquire()
            held.set()
            time.sleep(60)

        worker = ctx.Process(target=hold_and_wait)
        worker.start()
        assert held.wait(10)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        start = time.monotonic()
        progress = Progress("write", total_items=10, stream=io.StringIO(), unit="samples")
        advance(4, 100)  # the items' lock is lost: that update is dropped, the bytes' kept
        with caplog.at_level(logging.INFO, logger="dedup"):
            progress.close()
        assert time.monotonic() - start < 5
        assert fresh[1].get_obj().value == 100 and fresh[0].get_obj().value == 0
        assert "write: 0 samples" in caplog.text
    finally:
        attach(*saved)
