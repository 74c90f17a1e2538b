"""Issue 27, the first ten minutes: what a newcomer meets first (the help, the printed
config, the CLIP hint, the order of refusals, config errors, the Python API's errors)."""

import re

from tests.helpers import dedup


def test_top_level_help_names_every_command_and_the_default_one():
    text = dedup("--help").stdout
    assert text.startswith(
        "Usage: dedup [run] INPUT... --out DIR [OPTIONS]\n   or: dedup COMMAND [ARGS]...\n"
    )
    listed = text.split("\nCommands:\n", 1)[1].split("\n\n", 1)[0]
    names = [line.split()[0] for line in listed.splitlines()]
    assert names == ["calibrate", "cluster", "extract", "index", "report", "run", "write"]
    # the default command's options follow, with their defaults
    run_options = text.split("Options of `dedup run`, the default command:\n", 1)[1]
    assert re.search(r"-o, --out DIR\s", run_options)
    assert "--phash-threshold BITS" in run_options and "[default: 8]" in run_options
    # `-h` is the same page; `dedup run --help` is run's own
    assert dedup("-h").stdout == text
    assert dedup("run", "--help").stdout.startswith("Usage: dedup run [OPTIONS] INPUT...\n")
