"""Command line: options -> Config -> one command call; no logic of its own."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys

import click

from dedup import __version__
from dedup.commands.calibrate import calibrate, human_table
from dedup.commands.fanout import cluster_task, extract_part, write_part
from dedup.commands.index import build_index
from dedup.commands.report import rerender
from dedup.commands.run import run
from dedup.core.config import (
    CLIP_DECODES,
    CLIP_INDEXES,
    CLIP_STAGES,
    CLUSTER_RULES,
    EXECUTORS,
    FINGERPRINTS,
    KEEP_CRITERIA,
    Config,
    dump_config,
    load_config,
)
from dedup.core.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OUTPUT,
    EXIT_SKIPPED_SHARDS,
    EXIT_USAGE,
    OUTPUT_ERRNOS,
    DedupError,
    Interrupted,
    output_error,
)
from dedup.core.processes import request_stop
from dedup.report.tables import human_summary
from dedup.signals.choice import resolved_config
from dedup.signals.clip import pick_device, resolve

log = logging.getLogger("dedup")
HELP_OPTIONS = ("-h", "--help")
CONTEXT = {"help_option_names": list(HELP_OPTIONS)}


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s dedup %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class _DefaultToRun(click.Group):
    """`dedup ARGS` means `dedup run ARGS` unless ARGS starts with another command's name
    or is a bare `--help`, so `dedup shards/ --out clean/` works as written and `dedup
    --help` names every command, then shows the default command's options."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in HELP_OPTIONS):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[run] INPUT... --out DIR [OPTIONS]")
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        run = self.commands["run"]
        run_ctx = click.Context(run, info_name="run", parent=ctx)
        options = [p for p in run.get_params(run_ctx) if isinstance(p, click.Option)]
        rows = [row for p in options if (row := p.get_help_record(run_ctx))]
        with formatter.section("Options of `dedup run`, the default command"):
            formatter.write_dl(rows)


@click.group(cls=_DefaultToRun, context_settings=CONTEXT)
def main() -> None:
    """dedup: remove duplicate images from WebDataset shards (`dedup run`, the default),
    build a reference index (`dedup index`), split a run for an orchestrator (`dedup
    extract`, `dedup cluster`, `dedup write`), measure each signal on your own images
    (`dedup calibrate`), and re-render a report (`dedup report`)."""


def setting_options(command):
    """The options that set Config fields (shared by `run` and `index`); `--help` shows
    each one's default (the config file's value, when one is given, wins over it)."""
    for option in reversed(_SETTING_OPTIONS):
        command = option(command)
    defaults = Config().to_dict()
    for param in getattr(command, "__click_params__", []):
        if param.name in defaults:
            value = defaults[param.name]
            if isinstance(value, list):  # spaced, so that a long list wraps between items
                value = ", ".join(map(str, value)) or "none"
            elif isinstance(value, bool):
                value = param.opts[0].lstrip("-") if value else param.secondary_opts[0].lstrip("-")
            param.help = f"{param.help}  [default: {value if value != '' else 'none'}]"
    return command


_SETTING_OPTIONS = [
    click.option(
        "--signals",
        metavar="LIST",
        help="Comma list of duplicate signals: exact (same bytes), phash (perceptual hash), "
        "views (hashes of crops, trimmed and mirrored frames), clip (CLIP embeddings).",
    ),
    click.option(
        "--phash-threshold",
        type=int,
        metavar="BITS",
        help="Largest pHash Hamming distance (of 64 bits) that counts as a duplicate.",
    ),
    click.option(
        "--views-threshold",
        type=int,
        metavar="BITS",
        help="views signal: largest distance (of 64 bits) between a trimmed, cropped or mirrored "
        "view of one image and a whole frame of the other that links them without a check.",
    ),
    click.option(
        "--verify/--no-verify",
        default=None,
        help="views signal: check pairs in the grey zone (up to --verify-threshold bits) by "
        "matching local features (default: on).",
    ),
    click.option(
        "--verify-threshold",
        type=int,
        metavar="BITS",
        help="views signal: the grey zone's bound; pairs up to it are checked by local features "
        "(0, the default: chosen by the data's size).",
    ),
    click.option(
        "--verify-per-image",
        type=int,
        metavar="N",
        help="views signal: check each image's N nearest grey-zone candidates (default 4).",
    ),
    click.option(
        "--keep",
        metavar="CRITERIA",
        help="Survivor of each cluster: the best by these criteria, in order (comma list of "
        f"{', '.join(KEEP_CRITERIA)}; largest: the old rule, pixels then bytes).",
    ),
    click.option(
        "--keep-by",
        metavar="json:FIELD[:asc|desc]",
        multiple=True,
        help="Rank survivors first by a number in each sample's JSON sidecar (descending "
        "unless :asc); samples without one rank last; repeatable, then --keep.",
    ),
    click.option(
        "--cluster-rule",
        type=click.Choice(CLUSTER_RULES),
        help="star: each removed sample is within a threshold of its survivor (default); "
        "components: plain connected components.",
    ),
    click.option("--clip-model", metavar="NAME", help="open_clip model name or config JSON path."),
    click.option(
        "--clip-pretrained", metavar="TAG|PATH", help="open_clip pretrained tag or checkpoint file."
    ),
    click.option(
        "--clip-threshold",
        type=float,
        metavar="COS",
        help="Smallest CLIP cosine that is a duplicate.",
    ),
    click.option(
        "--clip-index",
        type=click.Choice(CLIP_INDEXES),
        help="CLIP search: flat (exact), ivf, auto.",
    ),
    click.option("--device", metavar="DEV", help="Where CLIP runs: auto, cpu, cuda, cuda:N."),
    click.option("--batch-size", type=int, metavar="N", help="Images per CLIP forward pass."),
    click.option(
        "--clip-decode",
        type=click.Choice(CLIP_DECODES),
        help="Decode CLIP's JPEGs on the model's device (torchvision) or with Pillow; "
        "auto: device on a GPU, pillow on a CPU.",
    ),
    click.option(
        "--clip-stage",
        type=click.Choice(CLIP_STAGES),
        help="Run the model in one shared process per device or inline in every worker; "
        "auto: shared on a GPU, inline on a CPU.",
    ),
    click.option("--workers", type=int, metavar="N", help="Worker processes; 0 means all cores."),
    click.option(
        "--executor",
        type=click.Choice(EXECUTORS),
        help="Where tasks run: local processes (default) or a Ray cluster (dedup-wds[ray]).",
    ),
    click.option(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster for --executor ray (default: RAY_ADDRESS, else a new local one).",
    ),
    click.option(
        "--max-pixels",
        type=int,
        metavar="N",
        help="Images above this many pixels (read from the header) pass through unhashed.",
    ),
    click.option(
        "--fingerprint",
        type=click.Choice(FINGERPRINTS),
        help="Reuse stored features of a shard when its stat (size, times, inode) is unchanged, "
        "or only when its content (bytes) is too.",
    ),
]


_SETTING_OPTIONS += [
    click.option(
        "--canaries",
        type=int,
        metavar="N",
        help="Plant N edited copies of sampled images virtually (never written, never part of "
        "a decision) and report the share each signal caught, per edit.",
    ),
    click.option(
        "--seed", type=int, metavar="N", help="Seed of calibrate's sample and of the canaries."
    ),
    click.option(
        "--against",
        multiple=True,
        metavar="REF",
        help="Also remove samples that match a reference set: a shard set, a folder of image "
        "files, an earlier OUT or --state-dir, or a `dedup index` INDEX (repeatable; reason "
        "reference). Reference items are only read.",
    ),
    click.option(
        "--blocklist",
        multiple=True,
        metavar="FILE",
        help="Remove samples whose image digest (sha256/blake3) or pHash code a list names: "
        "text, CSV or Parquet (repeatable; reason blocklist; README: Blocklists).",
    ),
]


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="YAML config file; flags given here override it.",
)
debug_option = click.option("--debug", is_flag=True, help="Show tracebacks for errors.")


@main.command("run", context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option(
    "-o",
    "--out",
    metavar="DIR",
    help="Output directory: one cleaned shard per input shard, same file name.",
)
@setting_options
@config_option
@click.option(
    "--report", "report_dir", metavar="DIR", help="Report directory (default OUT/dedup-report)."
)
@click.option(
    "--state-dir",
    metavar="DIR|URL",
    help="Where per-shard features are stored (default OUT/.dedup/features); "
    "a local directory or an s3:// or gs:// prefix.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print summary.json to stdout at the end, as one line (the human summary stays on "
    "stderr).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Write into a non-empty OUT not made by dedup, and recompute all features.",
)
@click.option("--dry-run", is_flag=True, help="Compute and report duplicates; write no shards.")
@click.option(
    "--skip-bad-shards",
    is_flag=True,
    help="Leave out damaged shards (listed in the report, exit code 5) instead of failing.",
)
@click.option("--print-config", is_flag=True, help="Print the resolved config as YAML and exit.")
@click.option(
    "--check-clip",
    is_flag=True,
    help="Check that the CLIP weights can be loaded, say where from, and exit (0 or 6).",
)
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and the final summary on stderr.")
@debug_option
@click.version_option(__version__, prog_name="dedup")
def run_command(
    inputs,
    out,
    config_path,
    report_dir,
    state_dir,
    as_json,
    overwrite,
    dry_run,
    skip_bad_shards,
    print_config,
    check_clip,
    quiet,
    debug,
    **settings,
):
    """Remove duplicate and near-duplicate images from WebDataset shards.

    Each INPUT is a directory (its *.tar shards, sorted), a shard file, a glob, or a
    brace pattern such as 'data/shard-{000000..000099}.tar'; or a URL: s3://bucket/prefix/
    (its *.tar objects), s3:// or gs:// objects, globs and braces, http(s):// shards, or
    pipe:COMMAND. OUT and --report may be local or s3:// / gs:// prefixes. `dedup report DIR`
    re-renders DIR/report.html from the report's Parquet files.

    Exit codes: 0 done, 1 internal error, 2 bad usage or config, 3 bad input shard,
    4 output or report directory refused or not writable, 5 done but damaged shards were
    skipped (--skip-bad-shards), 6 CLIP weights or device not available, 130 / 143
    stopped by SIGINT / SIGTERM (rerun to resume).
    """
    _setup_logging(quiet)
    _handle_stop_signals()
    with one_line_errors(debug):
        # a repeatable option not given is (): the config file's value stands
        settings = {k: (None if v == () else v) for k, v in settings.items()}
        config = load_config(config_path, settings)  # flags given override the file
        if print_config:
            click.echo(dump_config(resolved_config(config)), nl=False)
            return
        if check_clip:
            spec = resolve(config.clip_model, config.clip_pretrained)
            device = pick_device(config.device)
            click.echo(
                f"dedup: clip: {spec.model} weights at {spec.checkpoint}, device {device}", err=True
            )
            return
        if not inputs:
            raise click.UsageError("give at least one INPUT (shard, directory, glob or pattern)")
        if not out:
            raise click.UsageError("--out DIR is required")

        summary = run(
            list(inputs),
            out,
            config,
            report_dir=report_dir,
            overwrite=overwrite,
            dry_run=dry_run,
            skip_bad_shards=skip_bad_shards,
            state_dir=state_dir,
        )
        # The work is done and recorded: a stop signal from here on must not turn a
        # finished run into a killed one (Python drops its handlers as it exits).
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):
                signal.signal(signum, signal.SIG_IGN)
    for line in human_summary(summary):
        click.echo(f"dedup: {line}", err=True)
    if as_json:
        try:
            # one line: an orchestrator keeps the last line of stdout (Airflow's XCom)
            click.echo(json.dumps(summary, separators=(",", ":"), sort_keys=True))
            sys.stdout.flush()
        except OSError as e:  # a closed pipe (`| head -c0`), a full device
            with contextlib.suppress(OSError):  # nothing more may go to that stdout
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            click.echo(
                f"dedup: error: cannot write the summary to stdout ({e.strerror or e}); "
                "the run itself finished: see summary.json in the report",
                err=True,
            )
            sys.exit(EXIT_OUTPUT)
    if summary["skipped_shards"]:
        sys.exit(EXIT_SKIPPED_SHARDS)


@contextlib.contextmanager
def one_line_errors(debug: bool):
    """Every failure of a command as one line and its exit code (a traceback only with
    --debug): named errors, Ctrl-C, output errors (full disk, read-only), bugs."""
    try:
        yield
    except click.UsageError:
        raise
    except DedupError as e:
        if debug:
            _print_worker_traceback(e)
            raise
        prefix = "interrupted" if isinstance(e, Interrupted) else "error"
        click.echo(f"dedup: {prefix}: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("dedup: interrupted: SIGINT: stopped; rerun to resume", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS or debug:
            _internal_error(e, debug)
        click.echo(f"dedup: error: {output_error(e)}", err=True)
        sys.exit(EXIT_OUTPUT)
    except Exception as e:  # a bug: one line unless --debug
        _internal_error(e, debug)


def _internal_error(e: Exception, debug: bool) -> None:
    if debug:
        raise e
    click.echo(
        f"dedup: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
        err=True,
    )
    sys.exit(EXIT_INTERNAL)


def _print_worker_traceback(e: DedupError) -> None:
    worker_traceback = getattr(e, "worker_traceback", "")
    if worker_traceback:
        click.echo(f"dedup: in a worker process:\n{worker_traceback}", err=True)


def _raise_on_signal(signum: int, frame) -> None:

    request_stop(signum)


def _handle_stop_signals() -> None:
    """SIGTERM (a supervisor, a container runtime, `kill`) stops a run as Ctrl-C does:
    workers stopped, temporaries removed, one line, exit 143 (130 for Ctrl-C)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (an embedding app)
            signal.signal(signum, _raise_on_signal)


@main.command("index", context_settings=CONTEXT)
@click.argument("refs", nargs=-1, metavar="REF...")
@click.option("-o", "--out", metavar="INDEX", help="Folder for the index (local).")
@setting_options
@config_option
@click.option("--overwrite", is_flag=True, help="Rebuild into a non-empty folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the index's manifest to stdout.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings on stderr.")
@debug_option
def index_command(refs, out, config_path, overwrite, as_json, quiet, debug, **settings):
    """Build a stored reference index from REF... (shard sets, folders of image files,
    earlier OUTs, feature stores, other indexes) for `dedup --against INDEX`: features
    computed once, with the settings and versions recorded. Use the same signal options
    as the runs that will match against it; other settings are an exit-2 error there.
    """
    _setup_logging(quiet)
    _handle_stop_signals()
    with one_line_errors(debug):
        settings = {k: (None if v == () else v) for k, v in settings.items()}
        if settings.get("against") or settings.get("blocklist"):
            raise click.UsageError("dedup index takes its references as REF arguments")
        config = load_config(config_path, settings)
        if not refs:
            raise click.UsageError("give at least one REF")
        if not out:
            raise click.UsageError("--out INDEX is required")

        manifest = build_index(list(refs), out, config, overwrite)
    click.echo(
        f"dedup: index {out}: {manifest['items']} usable images from "
        f"{len(manifest['references'])} reference(s), signals {','.join(config.signals)}",
        err=True,
    )
    if as_json:
        click.echo(json.dumps(manifest, separators=(",", ":")))


def _given(settings: dict, config_path: str | None) -> dict:
    """The settings a task was given: a config file's, then its flags (not defaults)."""
    given = {}
    if config_path:
        given.update(load_config(config_path).to_dict())
        defaults = Config().to_dict()
        given = {k: v for k, v in given.items() if v != defaults[k]}
    given.update({k: v for k, v in settings.items() if v is not None and v != ()})
    return given


def _part_option(command):
    return click.option(
        "--part",
        required=True,
        metavar="I/N",
        help="This task's part: I of N (I counts from 0, as Airflow's map_index); parts "
        "are groups of shards balanced by bytes.",
    )(command)


def _task_options(command):
    for option in reversed(
        [
            click.option("-o", "--out", required=True, metavar="OUT", help="The run's OUT."),
            setting_options,
            config_option,
            click.option("--json", "as_json", is_flag=True, help="Print a one-line result."),
            click.option("-q", "--quiet", is_flag=True, help="Only warnings on stderr."),
            debug_option,
        ]
    ):
        command = option(command)
    return command


@main.command("extract", context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@_part_option
@click.option(
    "--report", "report_dir", metavar="DIR", help="Report directory (default OUT/dedup-report)."
)
@click.option("--state-dir", metavar="DIR|URL", help="Where per-shard features are stored.")
@click.option(
    "--skip-bad-shards", is_flag=True, help="Leave out damaged shards (exit 5 at the end)."
)
@click.option("--overwrite", is_flag=True, help="Write into a non-empty OUT not made by dedup.")
@_task_options
def extract_command(
    inputs,
    part,
    report_dir,
    state_dir,
    skip_bad_shards,
    overwrite,
    out,
    config_path,
    as_json,
    quiet,
    debug,
    **settings,
):
    """Phase 1 of a fanned-out run, for part I of N: read the part's shards and store
    their features in OUT. Parts run in any order, at once, on machines sharing OUT, and
    again after a failure; then `dedup cluster`, then `dedup write --part I/N`."""
    _setup_logging(quiet)
    _handle_stop_signals()
    with one_line_errors(debug):
        settings = {k: (None if v == () else v) for k, v in settings.items()}
        config = load_config(config_path, settings)
        if not inputs:
            raise click.UsageError("give at least one INPUT")

        result = extract_part(
            list(inputs), out, config, part, report_dir, state_dir, skip_bad_shards, overwrite
        )
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":"), sort_keys=True))


@main.command("cluster", context_settings=CONTEXT)
@_task_options
def cluster_command(out, config_path, as_json, quiet, debug, **settings):
    """Phase 2 of a fanned-out run: once every extract part has finished (it refuses to
    start otherwise, naming the missing parts), find the duplicates and make the plan.
    Settings are the extract parts'; any given must agree (workers, executor and device
    may differ)."""
    _setup_logging(quiet)
    _handle_stop_signals()
    with one_line_errors(debug):
        result = cluster_task(out, _given(settings, config_path))
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":"), sort_keys=True))


@main.command("write", context_settings=CONTEXT)
@_part_option
@_task_options
def write_command(part, out, config_path, as_json, quiet, debug, **settings):
    """Phase 3 of a fanned-out run, for part I of N: write the part's cleaned shards. The
    last part to finish makes the report (the same as one `dedup` run's) and prints the
    summary; exit 5 then if damaged shards were skipped."""
    _setup_logging(quiet)
    _handle_stop_signals()
    with one_line_errors(debug):
        summary = write_part(out, part, _given(settings, config_path))
    if summary is None:
        if as_json:
            click.echo(json.dumps({"part": part, "report": False}, separators=(",", ":")))
        return
    for line in human_summary(summary):
        click.echo(f"dedup: {line}", err=True)
    if as_json:
        click.echo(json.dumps(summary, separators=(",", ":"), sort_keys=True))
    if summary["skipped_shards"]:
        sys.exit(EXIT_SKIPPED_SHARDS)


@main.command("calibrate", context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option(
    "--sample", type=int, default=2000, show_default=True, metavar="N", help="Images sampled."
)
@click.option(
    "--target-precision",
    type=float,
    default=0.99,
    show_default=True,
    metavar="P",
    help="Recommend the loosest thresholds whose precision at the dataset's size reaches P.",
)
@click.option("--edits", metavar="LIST", help="Comma list of edits (default: all of them).")
@click.option(
    "--report", "report_dir", metavar="DIR", help="Write calibration.json and .html here."
)
@setting_options
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as one line.")
@click.option("-q", "--quiet", is_flag=True, help="Only the table on stderr.")
@debug_option
def calibrate_command(
    inputs,
    sample,
    target_precision,
    edits,
    report_dir,
    config_path,
    as_json,
    quiet,
    debug,
    **settings,
):
    """Measure, on a sample of your own images, what each signal catches: edited copies of
    every sampled image are made in memory (re-encodes, resizes, crops, mirror, rotation,
    bars, overlays, tone, blur, noise, gray, combinations) and read through the same
    extract phase and signals as a run. Prints recall per signal and edit, how often
    unrelated sampled images fall within each threshold (with a 95% upper bound, and per
    image at the dataset's size), and the thresholds that reach --target-precision."""
    _setup_logging(quiet)
    _handle_stop_signals()
    with one_line_errors(debug):
        settings = {k: (None if v == () else v) for k, v in settings.items()}
        config = load_config(config_path, settings)
        if not inputs:
            raise click.UsageError("give at least one INPUT")
        if sample < 2:
            raise click.UsageError("--sample must be at least 2")
        if not 0 < target_precision < 1:
            raise click.UsageError("--target-precision must be between 0 and 1")

        chosen = [e.strip() for e in edits.split(",") if e.strip()] if edits else None
        result = calibrate(list(inputs), config, sample, target_precision, chosen, report_dir)
    for line in human_table(result):
        click.echo(f"dedup: {line}", err=True)
    if as_json:
        click.echo(json.dumps(result, separators=(",", ":"), sort_keys=True))


@main.command("report", context_settings=CONTEXT)
@click.argument("report_dir", metavar="REPORT_DIR", type=click.Path(file_okay=False))
def report_command(report_dir: str) -> None:
    """Re-render REPORT_DIR/report.html from samples.parquet, clusters.parquet,
    previews.parquet, calibration.parquet and summary.json (REPORT_DIR: the report folder,
    or the OUT that holds it)."""
    import pyarrow as pa

    try:
        path = rerender(report_dir)
    except DedupError as e:  # no report there, or the page cannot be written
        click.echo(f"dedup: error: {e}", err=True)
        sys.exit(e.exit_code)
    except (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        RecursionError,
        pa.ArrowException,
    ) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        click.echo(f"dedup: error: {report_dir}: not a readable dedup report ({reason})", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"dedup: wrote {path}", err=True)
