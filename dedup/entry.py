"""The `dedup` command's entry point (and `python -m dedup`'s): a Ctrl-C (SIGINT) that
arrives while dedup's modules load, a second or more before any work, ends the command
with the interrupted line and exit 130, as one during the run does, instead of a
KeyboardInterrupt traceback from inside an import. The handler is set before the CLI's
modules are imported and put back once they are; the CLI then sets its own."""

from __future__ import annotations

import signal
import sys

from dedup.core.errors import EXIT_INTERRUPTED


def _interrupted_while_loading(signum, frame) -> None:
    sys.stderr.write("dedup: interrupted: SIGINT: stopped before the run began\n")
    raise SystemExit(EXIT_INTERRUPTED)


_default = signal.signal(signal.SIGINT, _interrupted_while_loading)
from dedup.cli import main as _cli_main  # noqa: E402  (imported under the handler above)

signal.signal(signal.SIGINT, _default)


def main() -> None:
    """The command line (dedup.cli.main)."""
    _cli_main()
