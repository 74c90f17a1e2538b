import io
import logging

from dedup.core.progress import Progress, advance


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
