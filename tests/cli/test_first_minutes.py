"""Issue 27, the first ten minutes: what a newcomer meets first (the help, the printed
config, the CLIP hint, the order of refusals, config errors, the Python API's errors)."""

import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from dedup.core.config import Config, available_cpus
from dedup.synth import encode, make_image, planted_dataset, write_shards
from tests.helpers import REPO, dedup, error_line, write_tar


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


# The CLI run in-process in a fresh Python, so that what it imported can be asked after.
IN_PROCESS = """
import sys
{block}
from dedup.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code)
print("torch imported" if "torch" in sys.modules else "torch not imported")
"""
# The light install, simulated: open_clip cannot be found (torch and the rest can).
NO_OPEN_CLIP = """
class NoOpenClip:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "open_clip":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoOpenClip())
"""


def in_process(tmp_path, *args, block=""):
    """The CLI in a fresh Python with an empty home (no weights cached) and no hub."""
    hub = str(tmp_path / "home/.cache/huggingface/hub")
    env = {"HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub}
    program = (sys.executable, "-c", IN_PROCESS.format(block=block))
    return dedup(*args, program=program, env=env, check=0)


def one_shard(tmp_path):
    write_tar(str(tmp_path / "in/s.tar"), [("x.jpg", encode(make_image(1, 32, 32)))])
    return tmp_path / "in"


def test_clip_off_without_weights_says_so_and_never_imports_torch(tmp_path):
    cache = tmp_path / "home/.cache"
    result = in_process(tmp_path, one_shard(tmp_path), "--out", tmp_path / "out", "-q")
    assert result.stdout.splitlines()[-2:] == ["exit 0", "torch not imported"]
    asked = in_process(
        tmp_path, one_shard(tmp_path), "--out", tmp_path / "o2", "--signals", "exact,clip"
    )
    assert asked.stdout.splitlines()[-2:] == ["exit 6", "torch not imported"]
    assert error_line(asked) == (
        "dedup: error: clip: weights ViT-B-32/laion2b_s34b_b79k are not in the local cache "
        f"(looked in {cache}/huggingface/hub and {cache}/clip) and the model hub cannot be "
        "reached; pass --clip-pretrained PATH to a local ViT-B-32 checkpoint, or run without "
        "CLIP: --signals exact,phash,views"
    )
    assert "dedup-wds[clip]" not in asked.stderr


def test_cheap_refusals_come_before_the_clip_check(tmp_path):
    """CLIP asked for by name with no weights: an OUT that is the input's directory, or a
    missing input, is refused for what it is (exit 4, exit 3), not as a CLIP error."""
    shards = one_shard(tmp_path)
    clip = ("--signals", "exact,clip")
    same = in_process(tmp_path, shards, "--out", shards, *clip)
    assert same.stdout.splitlines()[-2:] == ["exit 4", "torch not imported"]
    assert error_line(same) == (
        f"dedup: error: {shards}: is the directory of input shard {shards / 's.tar'}; "
        "choose another --out"
    )
    report = in_process(tmp_path, shards, "--out", tmp_path / "o", "--report", shards, *clip)
    assert report.stdout.splitlines()[-2] == "exit 4"
    assert "choose another --report" in error_line(report)
    part = in_process(tmp_path, "extract", shards, "--out", shards, "--part", "0/1", *clip)
    assert part.stdout.splitlines()[-2:] == ["exit 4", "torch not imported"]
    assert "choose another --out" in error_line(part)
    missing = in_process(tmp_path, tmp_path / "nowhere", "--out", tmp_path / "o", *clip)
    assert missing.stdout.splitlines()[-2] == "exit 3"
    assert "nowhere" in error_line(missing) and "clip" not in error_line(missing)
    assert not (tmp_path / "o").exists()


def test_clip_off_without_open_clip_names_the_package(tmp_path):
    asked = in_process(
        tmp_path,
        one_shard(tmp_path),
        "--out",
        tmp_path / "out",
        "--signals",
        "exact,clip",
        block=NO_OPEN_CLIP,
    )
    assert asked.stdout.splitlines()[-2:] == ["exit 6", "torch not imported"]
    assert error_line(asked) == (
        "dedup: error: clip: needs torch and open_clip (cannot import open_clip): "
        "pip install 'dedup-wds[clip]', or run without CLIP: --signals exact,phash,views"
    )


def test_print_config_shows_the_values_auto_and_zero_resolve_to(tmp_path):
    printed = yaml.safe_load(in_process(tmp_path, "--print-config").stdout.split("exit 0")[0])
    assert printed["signals"] == ["exact", "phash", "views"]  # no CLIP weights here
    assert printed["workers"] == available_cpus()
    assert printed == {
        **Config().to_dict(),
        "signals": printed["signals"],
        "workers": printed["workers"],
    }
    printed = yaml.safe_load(
        in_process(tmp_path, "--print-config", "--workers", "3", "--signals", "phash").stdout.split(
            "exit 0"
        )[0]
    )
    assert (printed["signals"], printed["workers"]) == (["phash"], 3)
    # CLIP named without its weights: printed as named; nothing loaded, nothing refused
    named = in_process(tmp_path, "--print-config", "--signals", "exact,clip")
    assert named.stdout.splitlines()[-2:] == ["exit 0", "torch not imported"]
    assert yaml.safe_load(named.stdout.split("exit 0")[0])["signals"] == ["exact", "clip"]


def test_the_licence_is_an_spdx_string_that_setuptools_reads_without_a_warning():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(REPO / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)
    assert project["project"]["license"] == "Apache-2.0"  # a table is deprecated
    # setuptools reads the SPDX string form (License-Expression) from version 77
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_the_strict_preset_removes_a_reencode_and_keeps_a_mirror_and_a_crop(tmp_path):
    samples = planted_dataset(6, {"reencode": 1, "mirror": 1, "crop": 1}, seed=3, size=(128, 96))
    write_shards(samples, str(tmp_path / "in"), per_shard=10)
    strict = REPO / "configs/strict.yaml"
    dedup(tmp_path / "in", "--out", tmp_path / "out", "--config", strict, "--workers", "2")
    table = pq.read_table(tmp_path / "out/dedup-report/samples.parquet").to_pylist()
    kept = {r["key"]: r["kept"] for r in table}
    edits = {s.key: s.edit for s in samples}
    assert sorted(edits[k] for k, was_kept in kept.items() if not was_kept) == ["reencode"]
    assert {edits[k] for k, was_kept in kept.items() if was_kept} >= {"mirror", "crop"}


# The console script's own first step, with a Ctrl-C arriving while dedup's modules load
# (delivered by the import system when it reaches dedup.engine.grey, half way in).
CTRL_C_WHILE_LOADING = """
import os, signal, sys
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "dedup.engine.grey":
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, CtrlC())
sys.argv = ["dedup", "--help"]
module, _, function = {entry!r}.partition(":")
getattr(__import__(module, fromlist=[function]), function)()
"""


def test_ctrl_c_while_the_command_loads_is_one_line_and_exit_130():
    """SIGINT to the process group as the command starts: it may land while the modules
    load, before the CLI's handlers exist; it ends with the interrupted line, never a
    KeyboardInterrupt traceback from inside an import."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(REPO / "pyproject.toml", "rb") as fh:
        entry = tomllib.load(fh)["project"]["scripts"]["dedup"]
    program = CTRL_C_WHILE_LOADING.format(entry=entry)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert result.stderr == "dedup: interrupted: SIGINT: stopped before the run began\n"
    assert result.returncode == 130 and result.stdout == ""
