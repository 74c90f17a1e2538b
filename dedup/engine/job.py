"""What every phase of one run shares, and where the run keeps its state in OUT."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dedup.core.config import Config
from dedup.core.errors import DedupError
from dedup.engine.blocklist import Blocklist
from dedup.engine.references import (
    Reference,
)
from dedup.executors import Executor
from dedup.io import storage
from dedup.io.outdir import (
    REFERENCES_DIR,
    STATE_DIR,
)
from dedup.io.shards import (
    SPOOL_DIR,
    remove_spool,
)

log = logging.getLogger("dedup")


@dataclass
class Job:
    """What every phase of one run shares."""

    out: str
    store: str
    config: Config
    executor: Executor
    dry_run: bool
    skip_bad_shards: bool
    clip: Any
    references: list[Reference] = field(default_factory=list)
    blocklists: list[Blocklist] = field(default_factory=list)


def reference_store(out: str) -> str:
    """Where the features of --against shard sets and folders are kept (inside OUT)."""
    return storage.join(storage.join(out, STATE_DIR), REFERENCES_DIR)


def spool_folder(out: str) -> str:
    """Where a run keeps its pipe: inputs' bytes, read once, until it ends: inside OUT's
    state (every node of a cluster reads OUT), never at a final path in OUT."""
    return storage.join(storage.join(out, STATE_DIR), SPOOL_DIR)


def discard_spool(out: str) -> None:
    """Delete the run's copies of its pipe: inputs (spool_folder) once nothing reads them
    again. A failure to is logged, never hides how the run ended; the next run into OUT
    removes what is left."""
    try:
        remove_spool(spool_folder(out))
    except DedupError as e:
        log.warning("could not remove the copies of this run's pipe: inputs: %s", e)
