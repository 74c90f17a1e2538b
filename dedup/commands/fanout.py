"""One run split for an orchestrator: `dedup extract --part I/N`, `dedup cluster`,
`dedup write --part I/N`, each a task that can run on any machine sharing OUT (a local
or network filesystem, or object storage), in any order within its phase, at the same
time, and again after a failure.

OUT/.dedup/fanout/ holds the job (inputs and resolved settings, written by the first
extract part, checked by every later task), each extract part's results, the plan the
cluster task made, and each write part's results. The last write part to finish (each
looks after writing its own results) assembles the report, as one `dedup` run does: the
shards, samples.parquet and clusters.parquet are the same bytes.

A part is a group of shards balanced by bytes (greedy, largest first), a function of
the input listing and N only; I counts from 0 (Airflow's map_index).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import pickle
import time
import uuid
from collections.abc import Iterator

from dedup.core.config import Config, load_config
from dedup.core.errors import ConfigError, DedupError, InputError
from dedup.engine.blocklist import load_blocklist
from dedup.engine.canaries import canary_phase
from dedup.engine.extract import input_identity
from dedup.engine.finish import same_input, write_phase
from dedup.engine.job import Job, discard_spool, reference_store
from dedup.engine.plan import cluster_phase
from dedup.engine.reading import extract_phase, extract_references, log_extract
from dedup.engine.references import check_stored, resolve_references
from dedup.executors import make_executor
from dedup.io import storage
from dedup.io.fsutil import read_file, staged_folder, write_atomic
from dedup.io.outdir import (
    FANOUT_DIR,
    REPORT_MARKER,
    STATE_DIR,
    check_output,
    feature_store,
    mark_job,
    mark_report,
    output_names,
    refuse_output,
    remove_empty_temporaries,
    remove_output,
    retire_outputs,
)
from dedup.io.shards import list_shards, shard_size
from dedup.report.summary import make_report
from dedup.signals.choice import choose_signals, resolve_clip

log = logging.getLogger("dedup")

JOB = "job.json"
# Settings a task may choose for itself: they change where and how fast it runs, never
# what it computes.
TASK_SETTINGS = ("workers", "executor", "ray_address", "device", "batch_size", "clip_stage")


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N), 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--part {text!r}: expected I/N, such as 0/8 (I counts from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--part {text}: I must be 0..N-1 (I counts from 0)")
    return i, n


def parts_of(sizes: list[int], n: int) -> list[list[int]]:
    """Positions 0..len(sizes)-1 in n groups balanced by bytes: largest first, each to the
    lightest group (ties: the lower group); each group in position order."""
    groups: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for pos in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        g = min(range(n), key=lambda k: (load[k], k))
        groups[g].append(pos)
        load[g] += sizes[pos]
    return [sorted(g) for g in groups]


def _folder(out: str) -> str:
    return storage.join(storage.join(out, STATE_DIR), FANOUT_DIR)


def _name(phase: str, i: int, n: int) -> str:
    return f"{phase}-{i:05d}-of-{n:05d}.pickle"


def _save(path: str, value) -> None:
    write_atomic(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _load(path: str):
    return pickle.loads(read_file(path))


def _exists(path: str) -> bool:
    try:
        read_file(path)
    except (OSError, DedupError):
        return False
    return True


# ---------------------------------------------------------------- the job


@dataclasses.dataclass
class FanoutJob:
    """What every task of one fanned-out run shares (OUT/.dedup/fanout/job.json)."""

    inputs: list[str]
    config: dict  # resolved (signals chosen)
    report_dir: str | None
    state_dir: str | None
    skip_bad_shards: bool

    def digest(self) -> str:
        """Identifies the run: a part's results from another run are never mixed in."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def settings(self, given: dict) -> Config:
        """The job's config, with a task's own choices (TASK_SETTINGS); any other setting
        given must equal the job's (exit 2 naming it)."""
        config = load_config(None, self.config)
        task = {}
        for name, value in given.items():
            if value is None or value == ():
                continue
            mine = getattr(load_config(None, {name: value}), name)
            if name in TASK_SETTINGS:
                task[name] = mine
            elif mine != getattr(config, name):
                raise ConfigError(
                    f"{name}: {mine!r} differs from this fan-out's {getattr(config, name)!r} "
                    "(set by its extract parts); every task runs with the same settings"
                )
        return dataclasses.replace(config, **task)


def _job_at(path: str) -> FanoutJob | None:
    try:
        return FanoutJob(**json.loads(read_file(path)))
    except (OSError, DedupError, ValueError, TypeError):
        return None


def job_settings(config: Config) -> dict:
    """The settings that identify a fan-out job: all but a task's own (TASK_SETTINGS),
    which each task may choose for itself."""
    return {k: v for k, v in config.to_dict().items() if k not in TASK_SETTINGS}


def _shown(value):
    """A setting as a user writes it: a list as a comma list."""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else value


def _difference(earlier: FanoutJob, job: FanoutJob) -> str:
    """What sets two jobs apart, for the refusal's message."""
    if earlier.inputs != job.inputs:
        return "inputs differ"
    for name in sorted(set(earlier.config) | set(job.config)):
        if earlier.config.get(name) != job.config.get(name):
            here, there = _shown(job.config.get(name)), _shown(earlier.config.get(name))
            return f"{name}: {here!r} here, {there!r} there"
    for name in ("report_dir", "state_dir", "skip_bad_shards"):
        if getattr(earlier, name) != getattr(job, name):
            return f"{name}: {getattr(job, name)!r} here, {getattr(earlier, name)!r} there"
    return "settings differ"


def _unfinished(out: str, shards, report: str, earlier: FanoutJob | None) -> None:
    """OUT's job.json says not complete, and the summaries that describe OUT (this job's
    report folder's, and an earlier job's elsewhere) are removed: OUT is being
    rewritten, and a reader must never see a finished summary of other bytes."""
    mark_job(out, shards, complete=False, report_dir=report)
    folders = {report}
    if earlier is not None:
        folders.add(earlier.report_dir or storage.join(out, "dedup-report"))
    for folder in sorted(folders):
        if folder != report and not _report_of(folder, out):
            continue  # not dedup's report of this OUT: left alone
        for name in ("summary.json", "report.html"):
            remove_output(storage.join(folder, name))


def _report_of(folder: str, out: str) -> bool:
    try:
        marker = json.loads(read_file(storage.join(folder, REPORT_MARKER)))
    except (OSError, DedupError, ValueError):
        return False
    want = storage.absolute(out)
    return isinstance(marker, dict) and marker.get("out") == want


def _other_n(out: str, n: int) -> list[str]:
    """Extract results of parts of another N: a new N starts the job's extract afresh."""
    return [name for name in _markers(out, "extract") if not name.endswith(f"-of-{n:05d}.pickle")]


def _read_job(out: str) -> FanoutJob:
    try:
        return FanoutJob(**json.loads(read_file(storage.join(_folder(out), JOB))))
    except (OSError, DedupError, ValueError, TypeError):
        raise ConfigError(
            f"{out}: holds no fanned-out run; run `dedup extract INPUT... --out {out} "
            "--part I/N` first"
        ) from None


def _task_job(out: str, fan: FanoutJob, config: Config, clip, executor):
    """The pipeline's Job for one task (references and blocklists resolved again: their
    features are reused from OUT)."""

    store = feature_store(out, fan.state_dir)
    shards = list_shards(fan.inputs)
    references = resolve_references(list(config.against), config, reference_store(out), shards, out)
    check_stored(references, config, clip)
    blocklists = [load_blocklist(path, config) for path in config.blocklist]
    return Job(
        out, store, config, executor, False, fan.skip_bad_shards, clip, references, blocklists
    )


# ---------------------------------------------------------------- extract


def extract_part(
    inputs: list[str],
    out: str,
    config: Config,
    part: str,
    report_dir: str | None = None,
    state_dir: str | None = None,
    skip_bad_shards: bool = False,
    overwrite: bool = False,
) -> dict:
    """`dedup extract INPUT... --out OUT --part I/N`: phase 1 for part I of N."""

    report = report_dir or storage.join(out, "dedup-report")
    with _tidied(out, report, feature_store(out, state_dir)):
        return _extract_part(
            inputs, out, config, part, report_dir, state_dir, skip_bad_shards, overwrite
        )


def _extract_part(
    inputs: list[str],
    out: str,
    config: Config,
    part: str,
    report_dir: str | None,
    state_dir: str | None,
    skip_bad_shards: bool,
    overwrite: bool,
) -> dict:
    i, n = parse_part(part)
    shards = list_shards(inputs)
    report = report_dir or storage.join(out, "dedup-report")
    refuse_output(out, report, shards)  # cheap refusals before CLIP's weights load
    config, clip = choose_signals(config)
    check_output(out, shards, overwrite, report, state_dir)
    job = FanoutJob(list(inputs), job_settings(config), report_dir, state_dir, skip_bad_shards)
    path = storage.join(_folder(out), JOB)
    earlier = _job_at(path)
    if earlier is not None and earlier != job and not _complete(out):
        # A part of this job starting beside us may have just made it OUT's job (it
        # writes the job before it marks OUT unfinished): read it again before refusing.
        earlier = _job_at(path)
    if earlier is not None and earlier != job and not _complete(out) and not overwrite:
        raise ConfigError(
            f"{out}: holds an unfinished fanned-out run of other inputs or settings "
            f"({_difference(earlier, job)}); finish it, start again in a new OUT, or give "
            "--overwrite to every part of this run to replace it"
        )
    if earlier != job:  # a new run (the last one into this OUT finished)
        write_atomic(path, json.dumps(dataclasses.asdict(job), indent=1).encode())
    mark_report(report, out)
    # From here until the last write part finishes, OUT mixes this job's shards with an
    # earlier run's: no summary may say otherwise.
    _unfinished(out, shards, report, earlier)
    for done in (_plan_name(), *_markers(out, "write"), *_other_n(out, n)):  # now stale
        remove_output(storage.join(_folder(out), done))
    group = parts_of([shard_size(s) for s in shards], n)[i]
    mine = [shards[pos] for pos in group]
    log.info("extract part %d/%d: %d of %d shards", i, n, len(mine), len(shards))
    t = time.monotonic()
    with make_executor(config.executor, config.worker_count, config.ray_address) as executor:
        task = Job(
            out, feature_store(out, state_dir), config, executor, False, skip_bad_shards, clip
        )
        features, bad = extract_phase(mine, task)
    seconds = time.monotonic() - t
    log_extract(features, seconds)
    result = {
        "job": job.digest(),
        "n": n,
        "positions": group,
        "features": features,
        "bad": bad,
        "seconds": seconds,
        "finished": time.time(),  # the newest part's N wins when parts of two N are found
    }
    _save(storage.join(_folder(out), _name("extract", i, n)), result)
    return {"part": f"{i}/{n}", "shards": len(mine), "bad": len(bad), "seconds": round(seconds, 3)}


@contextlib.contextmanager
def _tidied(out: str, report: str, store: str) -> Iterator[None]:
    """A task's body; after it, however it ends, the temporary folders it may have made
    are removed where empty, so a fanned-out OUT holds what one run's does. Tasks take
    no lock on OUT and may run at once: none sweeps the folders, as one run's end does,
    and a folder another task is using stays."""
    try:
        yield
    finally:
        remove_empty_temporaries(out, report, store)


def _markers(out: str, phase: str) -> list[str]:
    folder = _folder(out)
    names = storage.names_in(folder)
    return sorted(n for n in names if n.startswith(phase + "-") and n.endswith(".pickle"))


def _plan_name() -> str:
    return "plan.pickle"


def _complete(out: str) -> bool:
    """Whether OUT's last run finished (its job.json says so)."""
    try:
        return bool(
            json.loads(read_file(storage.join(storage.join(out, STATE_DIR), "job.json")))[
                "complete"
            ]
        )
    except (OSError, DedupError, ValueError, KeyError, TypeError):
        return False


def _gather_extract(out: str, fan: FanoutJob):
    """Every extract part's results, in input order; a missing part (or one from another
    run) is an error naming it. Parts of two N (the part count changed between tries):
    the N of the part that finished last is the job's."""
    digest = fan.digest()
    found = {}
    for name in _markers(out, "extract"):
        result = _load_part(storage.join(_folder(out), name))
        if result is not None and result.get("job") == digest:
            found[name] = result
    if not found:
        raise ConfigError(
            f"{out}: no extract part has finished; run `dedup extract ... --part I/N`"
        )
    newest = max(found, key=lambda name: (found[name].get("finished", 0), name))
    n = int(found[newest]["n"])
    missing = [i for i in range(n) if _name("extract", i, n) not in found]
    if missing:
        listed = ", ".join(f"{i}/{n}" for i in missing[:10])
        raise ConfigError(
            f"{out}: extract part{'s' if len(missing) > 1 else ''} {listed} "
            f"{'have' if len(missing) > 1 else 'has'} not finished; cluster waits for all {n}"
        )
    results = [found[_name("extract", i, n)] for i in range(n)]
    placed = {}
    bad = {}
    for r in results:
        for b in r["bad"]:
            bad[b.shard.path] = b
        for f in r["features"]:
            placed[f.shard.path] = f
    seconds = sum(r["seconds"] for r in results)
    return placed, bad, seconds


def _load_part(path: str) -> dict | None:
    """A part's saved results; None when unreadable (a damaged file is computed again
    or named by the phase that needs it, never trusted)."""
    try:
        value = _load(path)
    except (OSError, DedupError, pickle.UnpicklingError, EOFError, AttributeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _current(shards, placed: dict, bad: dict):
    """Split the input listing into shards whose extract results still describe them
    (same identity as when read) and shards to extract again: changed since their part
    read them, or not read by any part (the listing changed)."""
    ready, again = {}, []
    for shard in shards:
        f = placed.get(shard.path)
        if f is not None and f.identity is not None and input_identity(shard) == f.identity:
            ready[shard.path] = f
        elif f is not None and f.identity is None and f.content is not None:
            ready[shard.path] = f  # known by its bytes alone (pipe:); write checks them
        elif shard.path in bad and _still_bad(shard, bad[shard.path]):
            continue
        else:
            again.append(shard)
    return ready, again


def _still_bad(shard, bad) -> bool:
    """A shard left out as damaged that nobody has changed since."""
    try:
        return bad.identity is not None and input_identity(shard) == bad.identity
    except DedupError:
        return False


# ---------------------------------------------------------------- cluster


def cluster_task(out: str, given: dict) -> dict:
    """`dedup cluster --out OUT`: phase 2 once every extract part has finished. A shard
    changed since its part read it (or not read by any part: the listing changed) is
    extracted again here, so the plan always describes the current inputs."""

    fan = _read_job(out)
    with _tidied(out, _report(out, fan), feature_store(out, fan.state_dir)):
        return _cluster_task(out, fan, given)


def _cluster_task(out: str, fan: FanoutJob, given: dict) -> dict:
    config = fan.settings(given)
    placed, bad, extract_seconds = _gather_extract(out, fan)
    shards = list_shards(fan.inputs)
    ready, again = _current(shards, placed, bad)
    _unfinished(out, shards, _report(out, fan), None)
    clip = resolve_clip(config)
    with make_executor(config.executor, config.worker_count, config.ray_address) as executor:
        job = _task_job(out, fan, config, clip, executor)
        t = time.monotonic()
        if again:
            log.info(
                "cluster: %d shards changed since their extract part read them (or were "
                "not read by one); extracting them again",
                len(again),
            )
            fresh, fresh_bad = extract_phase(again, job)
            ready.update((f.shard.path, f) for f in fresh)
            bad.update((b.shard.path, b) for b in fresh_bad)
        features = [ready[s.path] for s in shards if s.path in ready]
        left_out = [bad[s.path] for s in shards if s.path not in ready]
        left_out += extract_references(job.references, job)
        the_plan = cluster_phase(features, job)
        seconds = time.monotonic() - t
        planted = canary_phase(features, job)
    for name in _markers(out, "write"):
        remove_output(storage.join(_folder(out), name))
    job_path = storage.join(storage.join(out, STATE_DIR), "job.json")
    retire_outputs(out, job_path, output_names(shards))
    state = {
        "id": uuid.uuid4().hex,  # write parts' results name the plan they wrote
        "features": features,
        "sizes": [shard_size(f.shard) for f in features],  # write parts group by these
        "bad": left_out,
        "plan": the_plan,
        "seconds": {"extract": extract_seconds, "cluster": seconds},
        "canaries": planted,
    }
    _save(storage.join(_folder(out), _plan_name()), state)
    removed = int((~the_plan.keep).sum())
    return {"shards": len(features), "samples": len(the_plan.keep), "removed": removed}


def _report(out: str, fan: FanoutJob) -> str:
    return fan.report_dir or storage.join(out, "dedup-report")


# ---------------------------------------------------------------- write


def write_part(out: str, part: str, given: dict) -> dict | None:
    """`dedup write --out OUT --part I/N`: phase 3 for part I of N; the last part to
    finish makes the report and returns its summary (None from the others)."""

    i, n = parse_part(part)
    fan = _read_job(out)
    with _tidied(out, _report(out, fan), feature_store(out, fan.state_dir)):
        return _write_part(out, fan, i, n, given)


def _write_part(out: str, fan: FanoutJob, i: int, n: int, given: dict) -> dict | None:
    config = fan.settings(given)
    try:
        state = _load(storage.join(_folder(out), _plan_name()))
    except (OSError, DedupError):
        raise ConfigError(
            f"{out}: the cluster task has not finished; run `dedup cluster --out {out}`"
        ) from None
    features, p = state["features"], state["plan"]
    group = parts_of(state["sizes"], n)[i]
    parts_dir = storage.join(_folder(out), "parts")
    storage.makedirs(parts_dir)
    _unfinished(out, list_shards(fan.inputs), _report(out, fan), None)
    mine = storage.join(_folder(out), _name("write", i, n))
    remove_output(mine)  # redone now: an earlier try's results no longer count
    with make_executor(config.executor, config.worker_count, config.ray_address) as executor:
        job = _task_job(out, fan, config, None, executor)  # writing runs no model
        t = time.monotonic()
        finished = write_phase(features, p, job, parts_dir, only=set(group))
        seconds = time.monotonic() - t
        result = {"plan": state["id"], "finished": finished, "seconds": seconds, "positions": group}
        _save(mine, result)
        return _report_if_last(out, fan, job, state, n, i, parts_dir)


def _report_if_last(out, fan: FanoutJob, job, state, n: int, i: int, parts_dir: str):
    """The report, when every write part has saved its results (else None)."""

    features = state["features"]
    # The last part to finish assembles the report (each checks after saving its own).
    # A report says OUT describes its inputs: not when one changed after it was read.
    results = [_load_part(storage.join(_folder(out), _name("write", k, n))) for k in range(n)]
    if any(r is None or r.get("plan") != state["id"] for r in results):
        log.info("write part %d/%d done; the last write part to finish makes the report", i, n)
        return None
    by_position = {}
    for r in results:
        for pos, done in zip(r["positions"], r["finished"], strict=True):
            by_position[pos] = done
    finished = [by_position[pos] for pos in range(len(features))]
    changed = [f.shard.path for f in features if not same_input(f)]
    if changed:
        raise InputError(
            f"{changed[0]}: changed after the cluster task read it"
            f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; rerun "
            f"`dedup cluster --out {out}` and the write parts"
        )
    seconds = {**state["seconds"], "write": sum(r["seconds"] for r in results)}
    report_dir = _report(out, fan)
    p = state["plan"]
    extract_references(job.references, job)  # their stored features, for the report
    with staged_folder(report_dir) as folder:
        summary = make_report(
            features,
            state["bad"],
            p,
            finished,
            job,
            folder,
            parts_dir,
            seconds,
            state.get("canaries"),
            shown_as=report_dir,
        )
    mark_job(out, list_shards(fan.inputs), complete=True, report_dir=report_dir)
    # The copies of pipe: inputs, read by every task since extract, are needed no more;
    # a write part that failed keeps them for its rerun.
    discard_spool(out)
    return summary
