"""`dedup report DIR`: report.html rendered again from the report's files; DIR may be
the report folder or the OUT that holds it."""

from __future__ import annotations

import os

from dedup.commands.run import DRY_RUN_REPORT_DIR, REPORT_DIR
from dedup.core.errors import ConfigError
from dedup.report.html import render


def rerender(folder: str) -> str:
    """Write report.html again in the report folder `folder` names; return its path."""
    return render(report_folder(folder))


def report_folder(folder: str) -> str:
    """`folder` when it holds summary.json; else the one report an OUT holds
    (OUT/dedup-report or OUT/dedup-report-dry-run): `dedup report OUT` is what a newcomer
    types after `dedup IN --out OUT`. Two reports in OUT, or none, is a one-line error."""
    if os.path.isfile(os.path.join(folder, "summary.json")):
        return folder
    inside = [
        os.path.join(folder, name)
        for name in (REPORT_DIR, DRY_RUN_REPORT_DIR)
        if os.path.isfile(os.path.join(folder, name, "summary.json"))
    ]
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise ConfigError(f"{folder}: holds two reports: give one of {' or '.join(inside)}")
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: no such folder (expected a report folder: OUT/{REPORT_DIR})")
    raise ConfigError(
        f"{folder}: not a dedup report (no summary.json here, nor a {REPORT_DIR} folder "
        f"with one; expected a report folder: OUT/{REPORT_DIR})"
    )
