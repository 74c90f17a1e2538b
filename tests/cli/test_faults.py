"""Faults at random, seeded points, through a real `dedup` process on the default path
(five shards, two workers): damaged shards, a damaged feature store, and SIGTERM or
SIGKILL of the main process at a random moment. After every run the same invariants
hold (see `check_run` and `check_out`); after the last rerun the output is byte-identical
to an uninterrupted run on the same input.

Every example is its own test id, and a failure names the fault and the command that
reproduces it, e.g. `pytest 'tests/test_faults.py::test_damaged_shards[seed3]'` (a
signal's exact moment varies from run to run; its seed fixes the delay and the signal).
DEDUP_FAULT_EXAMPLES=N runs N examples of each kind instead of the defaults below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pyarrow.parquet as pq
import pytest

from dedup.synth import planted_dataset, write_shards
from tests.helpers import DEDUP, NO_MODEL_FLAGS

WORKERS = ["--workers", "2"]
RUN_TIMEOUT = 120  # seconds; a run of the test set takes about 1.5
STOP_WITHIN = 20  # seconds after a signal, the main process has ended
GONE_WITHIN = 3.0  # seconds after the main process ends, no worker may be left
BLOCK = 512

RESULT_FILES = ("dedup-report/samples.parquet", "dedup-report/clusters.parquet")
REPORT_PARQUETS = (
    *RESULT_FILES,
    "dedup-report/previews.parquet",
    "dedup-report/calibration.parquet",
)
SUMMARY = "dedup-report/summary.json"

# Documented exit codes: 0 done, 3 bad input shard, 4 output refused, 5 done with skipped
# shards; 143 after SIGTERM (with one line saying so). A process ended by the signal's
# default action shows as minus the signal number: always for SIGKILL, and for SIGTERM
# only before the run has started or after it has finished its work.
EXIT_OK, EXIT_BAD_INPUT, EXIT_OUTPUT, EXIT_SKIPPED = 0, 3, 4, 5
EXIT_TERMINATED = 143

EXAMPLES_ENV = "DEDUP_FAULT_EXAMPLES"

pytestmark = pytest.mark.slow  # 22 faulted runs, each with its reruns


def _examples(default: int) -> list[int]:
    return list(range(int(os.environ.get(EXAMPLES_ENV, 0)) or default))


# ---------------------------------------------------------------- one example


@dataclass
class Case:
    """One example: its seeded random stream, the faults it injected, and how to rerun it."""

    nodeid: str
    rng: random.Random
    logs: Path
    faults: list[str] = field(default_factory=list)

    def say(self, problem: str) -> str:
        faults = "; ".join(self.faults) or "none"
        env = f"{EXAMPLES_ENV}={os.environ[EXAMPLES_ENV]} " if os.environ.get(EXAMPLES_ENV) else ""
        return (
            f"{problem}\n  fault: {faults}\n"
            f"  reproduce: {env}{sys.executable} -m pytest -q '{self.nodeid}'"
        )

    def check(self, condition: object, problem: str) -> None:
        if not condition:
            self.fail(problem)

    def fail(self, problem: str) -> NoReturn:
        pytest.fail(self.say(problem), pytrace=False)


@pytest.fixture
def case(request, tmp_path) -> Iterator[Case]:
    """The example's Case, seeded by its test id (`seed` picks the id); its faults are
    printed (shown with -rP) when it ends."""
    (tmp_path / "logs").mkdir()
    one = Case(request.node.nodeid, random.Random(request.node.name), tmp_path / "logs")
    yield one
    print(f"{request.node.name}: " + "; ".join(one.faults))
    kill_leftovers(tmp_path)


@dataclass
class Result:
    args: list[str]
    code: int
    stdout: str
    stderr: str

    def tail(self) -> str:
        return "\n    ".join(["", *self.stderr.strip().splitlines()[-6:]])


def dedup_args(inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [DEDUP, *inputs, "--out", str(out), *NO_MODEL_FLAGS, *WORKERS, "-q", *extra]


class Running:
    """A dedup process whose stdout and stderr go to files, not pipes: a worker that
    outlives the main process would hold a pipe open, and waiting for its end would hang."""

    def __init__(self, case: Case, args: list[str]):
        self.case, self.args = case, args
        n = len(list(case.logs.iterdir())) // 2
        self.paths = (case.logs / f"{n}.stdout", case.logs / f"{n}.stderr")
        with open(self.paths[0], "wb") as out, open(self.paths[1], "wb") as err:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def wait(self, timeout: float = RUN_TIMEOUT, after: str = "its start") -> Result:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.case.fail(f"`{' '.join(self.args[1:])}` still ran {timeout} s after {after}")
        out, err = (p.read_text(errors="replace") for p in self.paths)
        return Result(self.args, code, out, err)


def run_dedup(case: Case, args: list[str]) -> Result:
    return Running(case, args).wait()


# ---------------------------------------------------------------- data and reference


def digest_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(out: Path) -> dict[str, str]:
    """Digests of what must not depend on how a run got there: shards and result tables."""
    found = {p.name: digest_file(p) for p in sorted(out.glob("*.tar")) if p.is_file()}
    for name in RESULT_FILES:
        if (out / name).is_file():
            found[name] = digest_file(out / name)
    return found


def snapshot_inputs(directory: Path) -> dict[str, tuple[str, int, int]]:
    """(sha256, size, mtime) of every input file."""
    return {
        p.name: (digest_file(p), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
    }


@dataclass
class Dataset:
    inputs: Path  # five clean shards
    reference: Path  # OUT of an uninterrupted run on them
    expected: dict[str, str]  # outputs(reference)
    snapshot: dict[str, tuple[str, int, int]]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    """100 samples (planted copies across shards, a caption-only and a corrupt sample) of
    64x48 pictures in five shards of 20, and one uninterrupted run on them."""
    root = tmp_path_factory.mktemp("faults")
    samples = planted_dataset(70, {"exact": 14, "reencode": 8, "resize": 6}, seed=11, size=(64, 48))
    write_shards(samples, str(root / "in"), per_shard=20)
    reference = root / "reference"
    with open(root / "reference.stderr", "w+") as err:
        code = subprocess.call(
            dedup_args([str(root / "in")], reference),
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=RUN_TIMEOUT,
        )
        err.seek(0)
        assert code == 0, f"the uninterrupted reference run failed:\n{err.read()}"
    expected = outputs(reference)
    assert len([n for n in expected if n.endswith(".tar")]) == 5
    return Dataset(root / "in", reference, expected, snapshot_inputs(root / "in"))


# ---------------------------------------------------------------- invariants


def check_run(
    case: Case,
    result: Result,
    allowed: set[int],
    *,
    damaged: set[str] = frozenset(),
    signalled: int | None = None,
) -> None:
    """The exit code is one of `allowed`; stderr has no traceback and, on failure, one
    line saying why (for exit 3, naming a damaged shard's file name)."""
    what = f"`{' '.join(result.args[1:])}`"
    case.check(
        result.code in allowed,
        f"{what} exited {result.code}, expected one of {sorted(allowed)}:{result.tail()}",
    )
    for bad in ("Traceback", "internal error"):
        case.check(bad not in result.stderr, f"{what}: stderr shows {bad!r}:{result.tail()}")
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("dedup: error:")]
    stops = [line for line in lines if line.startswith(("dedup: interrupted", "dedup: terminated"))]
    if result.code in (EXIT_OK, EXIT_SKIPPED):
        case.check(not errors, f"{what} exited {result.code} but said:{result.tail()}")
    elif result.code == EXIT_TERMINATED and signalled == signal.SIGTERM:
        case.check(
            len(stops) + len(errors) == 1,
            f"{what} exited 143 after SIGTERM without one 'dedup: interrupted/terminated' "
            f"line:{result.tail()}",
        )
    elif result.code > 0:
        case.check(
            len(errors) == 1,
            f"{what} exited {result.code} without exactly one 'dedup: error:' line:{result.tail()}",
        )
    if result.code == EXIT_BAD_INPUT:
        case.check(
            any(name in errors[0] for name in damaged),
            f"{what}: exit 3 names none of the damaged shards {sorted(damaged)}:{result.tail()}",
        )


def check_inputs(case: Case, directory: Path, before: dict) -> None:
    after = snapshot_inputs(directory)
    changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
    case.check(not changed, f"input files changed (bytes, size or mtime): {changed}")


def wait_for_no_workers(case: Case, out: Path, main_pid: int | None = None) -> None:
    """No process of this run (its command line names OUT: workers are forked, so theirs
    equals the main process's; or a child of the main process) lives on after the main
    process ended."""
    deadline = time.monotonic() + GONE_WITHIN
    alive = _run_processes(out, main_pid)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = _run_processes(out, main_pid)
    case.check(
        not alive,
        f"{len(alive)} process(es) of the run outlived the main process by {GONE_WITHIN} s: "
        f"{alive}",
    )


def _run_processes(out: Path, main_pid: int | None = None, prefix: bool = False) -> dict[int, str]:
    """Live processes with `out` as an argument (or, with `prefix`, an argument under it),
    or whose parent is `main_pid`."""
    needle = os.fsencode(str(out))
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat[stat.rindex(b")") + 2 :].split()[:2]
        if state in (b"Z", b"X"):
            continue  # dead, waiting to be reaped
        named = any(a == needle or (prefix and a.startswith(needle + b"/")) for a in args)
        if named or (main_pid is not None and int(ppid) == main_pid):
            found[int(entry)] = b" ".join(args).decode(errors="replace")[:120]
    return found


def kill_leftovers(root: Path) -> None:
    """SIGKILL, by pid, every process still running with an argument under `root` (this
    example's directory): a failed example must not leak workers into the next."""
    for _ in range(50):
        alive = _run_processes(root, prefix=True)
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _tar_members(path: Path, complete: bool = True) -> list[tuple[str, bytes]]:
    """Every member of a tar as (name, bytes); raises on anything tarfile cannot read and,
    when `complete`, unless only end-of-archive blocks (two or more) follow the members."""
    members = []
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isreg() else None
            members.append((info.name, data))
            end = info.offset_data + (info.size + BLOCK - 1) // BLOCK * BLOCK
    if not complete:
        return members
    tail = path.read_bytes()[end if members else 0 :]
    if len(tail) < 2 * BLOCK or tail.count(0) != len(tail):
        raise tarfile.ReadError(f"{len(tail)} bytes after the last member are not end blocks")
    return members


def _key(name: str) -> str:
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return name if dot < 0 else name[:dot]


def check_out(
    case: Case, out: Path, inputs: Path, expected: dict[str, str] | None = None
) -> dict | None:
    """What a reader of OUT may rely on at any moment, even after a crash: every shard at a
    final name is a complete tar whose members are byte-equal to the same-named members of
    the same-named input shard, in input order; report files at final names are complete;
    summary.json's counts add up and match the shards; and a summary that exists claims
    an output equal to `expected` (when given). Returns the summary, if any."""
    written: dict[str, int] = {}
    for shard in sorted(out.glob("*.tar")):
        try:
            got = _tar_members(shard)
        except (tarfile.TarError, OSError, EOFError) as e:
            case.fail(f"OUT/{shard.name} is not a complete tar: {e}")
        source = inputs / shard.name
        case.check(source.is_file(), f"OUT/{shard.name} has no input shard of that name")
        try:
            original = _tar_members(source, complete=False)
        except (tarfile.TarError, OSError, EOFError) as e:
            case.fail(f"OUT/{shard.name} was written from an unreadable input: {e}")
        position = {name: n for n, (name, _) in enumerate(original)}
        last = -1
        for name, data in got:
            n = position.get(name)
            case.check(
                n is not None and original[n][1] == data,
                f"OUT/{shard.name}: member {name!r} is not byte-equal to the input's",
            )
            case.check(n > last, f"OUT/{shard.name}: member {name!r} is out of input order")
            last = n
        written[shard.name] = len({_key(name) for name, _ in got})
    for name in REPORT_PARQUETS:
        if (out / name).exists():
            try:
                pq.read_table(out / name)
            except Exception as e:
                case.fail(f"OUT/{name} is not a complete Parquet file: {e}")
    if not (out / SUMMARY).exists():
        return None
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except ValueError as e:
        case.fail(f"OUT/{SUMMARY} is not complete JSON: {e}")
    _check_counts(case, summary, written)
    if expected is not None:
        case.check(
            outputs(out) == expected,
            f"OUT/{SUMMARY} claims success, but the output differs from an uninterrupted "
            f"run's in: {_differences(outputs(out), expected)}",
        )
    return summary


def _check_counts(case: Case, summary: dict, written: dict[str, int]) -> None:
    counts = summary["counts"]
    parts = ("kept", "removed", "passthrough")
    case.check(
        counts["samples"] == sum(counts[p] for p in parts),
        f"summary counts do not add up: {counts}",
    )
    for shard in summary["shards"]:
        case.check(
            shard["samples"] == sum(shard[p] for p in parts),
            f"summary counts of {shard['shard']} do not add up: {shard}",
        )
        name = os.path.basename(shard["shard"])
        if not summary["output"]["dry_run"]:
            case.check(
                written.get(name) == shard["kept"] + shard["passthrough"],
                f"OUT/{name} holds {written.get(name)} samples, the summary says "
                f"{shard['kept']} kept + {shard['passthrough']} passed through",
            )
    for p in ("samples", *parts):
        case.check(
            counts[p] == sum(s[p] for s in summary["shards"]),
            f"summary total {p} is not the sum over shards",
        )
    samples = Path(summary["output"]["report"]) / "samples.parquet"
    case.check(samples.is_file(), f"summary.json exists but {samples} does not")
    rows = pq.read_metadata(samples).num_rows
    case.check(
        rows == counts["samples"],
        f"samples.parquet has {rows} rows, the summary counts {counts['samples']} samples",
    )


def _differences(got: dict[str, str], want: dict[str, str]) -> list[str]:
    return sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))


def check_identical(case: Case, out: Path, expected: dict[str, str], what: str) -> None:
    got = outputs(out)
    case.check(
        got == expected,
        f"{what}: output differs from an uninterrupted run's in: {_differences(got, expected)}",
    )


# ---------------------------------------------------------------- (a) damaged shards


def _layout(path: Path) -> list[tuple[int, int, str]]:
    """(start, stop, what) byte ranges of a clean tar: each header, data, padding, the end."""
    ranges = []
    with tarfile.open(path) as tar:
        for info in tar:
            data_end = info.offset_data + info.size
            ranges.append((info.offset, info.offset_data, f"header of {info.name}"))
            ranges.append((info.offset_data, data_end, f"data of {info.name}"))
            padded = info.offset_data + (info.size + BLOCK - 1) // BLOCK * BLOCK
            if padded > data_end:
                ranges.append((data_end, padded, f"padding after {info.name}"))
    ranges.append((padded, path.stat().st_size, "end-of-archive blocks"))
    return ranges


def damage_shard(rng: random.Random, path: Path) -> str:
    """Flip, zero or cut bytes at a random position of a header, member data, the end
    blocks or anywhere; return what was done where."""
    layout = _layout(path)
    region = rng.choice(["header", "data", "end-of-archive", "anywhere"])
    spans = [r for r in layout if region == "anywhere" or r[2].startswith(region)]
    start, stop, _ = rng.choice(spans)
    pos = rng.randrange(start, stop)
    where = next(what for a, b, what in layout if a <= pos < b)
    data = bytearray(path.read_bytes())
    op = rng.choice(["flip", "zero", "truncate"])
    if op == "flip":
        mask = rng.randrange(1, 256)
        data[pos] ^= mask
        done = f"xor 0x{mask:02x} at byte {pos}"
    elif op == "zero":
        length = rng.randrange(1, 2 * BLOCK)
        data[pos : pos + length] = bytes(len(data[pos : pos + length]))
        done = f"zero {length} bytes from byte {pos}"
    else:
        del data[pos:]
        done = f"truncate to {pos} bytes"
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime, mtime + 1))  # a damaged copy, not the reference's file
    return f"{path.name}: {done} ({where})"


@pytest.mark.parametrize("seed", _examples(6), ids=lambda s: f"seed{s}")
def test_damaged_shards(dataset, tmp_path, case, seed):
    """One or two shards damaged at random: without --skip-bad-shards the run ends (exit 3
    naming the shard) or, when the damage leaves a valid tar, succeeds; with it, the run
    skips exactly the bad shards (exit 5) and writes what a run on the others writes."""
    inputs = tmp_path / "in"
    shutil.copytree(dataset.inputs, inputs)
    names = sorted(p.name for p in inputs.glob("*.tar"))
    damaged = set(case.rng.sample(names, case.rng.choice([1, 1, 2])))
    for name in sorted(damaged):
        case.faults.append(damage_shard(case.rng, inputs / name))
    before = snapshot_inputs(inputs)
    out = tmp_path / "out"

    strict = run_dedup(case, dedup_args([str(inputs)], out))
    check_run(case, strict, {EXIT_OK, EXIT_BAD_INPUT}, damaged=damaged)
    wait_for_no_workers(case, out)
    check_inputs(case, inputs, before)
    check_out(case, out, inputs)
    first = outputs(out)

    lenient = run_dedup(case, dedup_args([str(inputs)], out, "--skip-bad-shards"))
    check_run(case, lenient, {EXIT_SKIPPED} if strict.code else {EXIT_OK}, damaged=damaged)
    wait_for_no_workers(case, out)
    check_inputs(case, inputs, before)
    summary = check_out(case, out, inputs)
    case.check(summary is not None, "a finished run left no summary.json")
    skipped = {os.path.basename(s["shard"]) for s in summary["skipped_shards"]}
    case.check(skipped <= damaged, f"skipped {sorted(skipped)}, damaged {sorted(damaged)}")
    if strict.code == EXIT_BAD_INPUT:
        named = {n for n in damaged if n in strict.stderr}
        case.check(named & skipped, f"the shard exit 3 named is not skipped: {skipped}")
        for name in skipped:
            case.check(name in lenient.stderr, f"stderr does not name skipped {name}")
            case.check(not (out / name).exists(), f"skipped {name} has an output shard")
        # Skipping a shard is not listing it: a run on the good shards writes the same.
        good = [str(inputs / n) for n in names if n not in skipped]
        alone = tmp_path / "good-only"
        result = run_dedup(case, dedup_args(good, alone))
        check_run(case, result, {EXIT_OK}, damaged=damaged)
        wait_for_no_workers(case, alone)
        check_identical(case, out, outputs(alone), "--skip-bad-shards against a run on the rest")
    else:
        case.check(not skipped, f"exit 0 without the flag, yet skipped {skipped}")
        check_identical(case, out, first, "a rerun on unchanged input")


# ---------------------------------------------------------------- (b) damaged feature store


def damage_state_file(rng: random.Random, out: Path) -> str:
    """Flip one bit, cut, or zero a block at a random position of a random regular file
    under OUT/.dedup/ (not the lock)."""
    state = out / ".dedup"
    files = sorted(
        p for p in state.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "lock"
    )
    assert files, "no state files to damage"
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    pos = rng.randrange(len(data)) if data else 0
    where = ""
    chunks = _column_chunks(path)
    if chunks and rng.random() < 0.5:  # half the time inside a column's stored values
        column, start, size = rng.choice(chunks)
        pos = rng.randrange(start, start + size)
        where = f" (in column {column!r})"
    op = rng.choice(["bit", "bit", "truncate", "zero"]) if data else "truncate"
    if op == "bit":
        bit = rng.randrange(8)
        data[pos] ^= 1 << bit
        done = f"flip bit {bit} of byte {pos}{where}"
    elif op == "truncate":
        del data[pos:]
        done = f"truncate to {pos} bytes{where}"
    else:
        length = rng.choice([8, 64, BLOCK, 4096])
        data[pos : pos + length] = bytes(len(data[pos : pos + length]))
        done = f"zero {length} bytes from byte {pos}{where}"
    stat = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # damage that leaves no trace
    return f"OUT/{path.relative_to(out)} ({len(data)} of {stat.st_size} bytes): {done}"


@pytest.mark.parametrize("seed", _examples(8), ids=lambda s: f"seed{s}")
def test_damaged_feature_store(dataset, tmp_path, case, seed):
    """A completed OUT whose state (feature files, job file) took a bit flip, a cut or a
    zeroed block: the rerun never trusts the damage, and writes the reference output."""
    out = tmp_path / "out"
    shutil.copytree(dataset.reference, out, symlinks=True, ignore=_locks)
    case.faults.append(damage_state_file(case.rng, out))
    damaged_job = "job.json" in case.faults[-1]
    rerun = run_dedup(case, dedup_args([str(dataset.inputs)], out))
    # A damaged job file may make OUT look foreign: refusing it (exit 4) is safe too.
    check_run(case, rerun, {EXIT_OK, EXIT_OUTPUT} if damaged_job else {EXIT_OK})
    wait_for_no_workers(case, out)
    check_inputs(case, dataset.inputs, dataset.snapshot)
    if rerun.code == EXIT_OUTPUT:
        check_out(case, out, dataset.inputs)
        rerun = run_dedup(case, dedup_args([str(dataset.inputs)], out, "--overwrite"))
        check_run(case, rerun, {EXIT_OK})
    check_identical(case, out, dataset.expected, "rerun after damage to the feature store")
    check_out(case, out, dataset.inputs, dataset.expected)


def _column_chunks(path: Path) -> list[tuple[str, int, int]]:
    """(column, start, size) of each column chunk of a Parquet file; [] for other files."""
    try:
        meta = pq.read_metadata(path)
    except Exception:
        return []
    chunks = []
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            start = col.dictionary_page_offset or col.data_page_offset
            chunks.append((col.path_in_schema, start, col.total_compressed_size))
    return [chunk for chunk in chunks if chunk[2] > 0]


def _locks(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "lock" or n.endswith(".lock")]


# ---------------------------------------------------------------- (c) signals


# When the delay starts: at the process's start (its imports take most of a run of this
# small set), when the run has claimed OUT, or when its first feature file appears (workers
# are at work), so that kills land in every phase.
ANCHORS = {
    "start": (0.05, 1.5, None),
    "OUT claimed": (0.0, 0.5, lambda out: (out / ".dedup").is_dir()),
    "first feature file": (
        0.0,
        0.2,
        lambda out: any((out / ".dedup" / "features").glob("*.parquet")),
    ),
}


@pytest.mark.parametrize("seed", _examples(8), ids=lambda s: f"seed{s}")
def test_signal_then_rerun(dataset, tmp_path, case, seed):
    """SIGTERM or SIGKILL to the main process (not its group) at a random moment: the run
    ends with the signal's code and one line saying so, no worker outlives it, nothing
    partial is at a final name, and the rerun (not refused by a leftover lock) writes the
    reference output."""
    out = tmp_path / "out"
    signum = case.rng.choice([signal.SIGTERM, signal.SIGKILL])
    anchor = case.rng.choice(sorted(ANCHORS))
    low, high, reached = ANCHORS[anchor]
    delay = round(case.rng.uniform(low, high), 3)
    case.faults.append(f"{signum.name} to the main process {delay} s after {anchor}")
    args = dedup_args([str(dataset.inputs)], out)
    run = Running(case, args)
    end = time.monotonic() + RUN_TIMEOUT
    while reached and not reached(out) and run.proc.poll() is None and time.monotonic() < end:
        time.sleep(0.002)
    time.sleep(delay)
    if run.proc.poll() is None:
        run.proc.send_signal(signum)
    else:
        case.faults[-1] += " (the run had already ended)"
    result = run.wait(STOP_WITHIN, signum.name)
    allowed = {EXIT_OK, EXIT_TERMINATED} if signum == signal.SIGTERM else {EXIT_OK, -signum}
    if signum == signal.SIGTERM and (not out.exists() or (out / SUMMARY).exists()):
        # Killed by the default action before dedup installed its handler (nothing had
        # started) or after the run had finished its work: a shell sees 143 either way.
        allowed.add(-signum)
    check_run(case, result, allowed, signalled=signum)
    wait_for_no_workers(case, out, run.proc.pid)
    check_inputs(case, dataset.inputs, dataset.snapshot)
    check_out(case, out, dataset.inputs, dataset.expected)

    rerun = run_dedup(case, args)
    check_run(case, rerun, {EXIT_OK})
    wait_for_no_workers(case, out)
    check_inputs(case, dataset.inputs, dataset.snapshot)
    check_identical(case, out, dataset.expected, f"rerun after {signum.name}")
    check_out(case, out, dataset.inputs, dataset.expected)
