import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import yaml
from click.testing import CliRunner

from dedup.cli import main
from dedup.core.config import Config, load_config
from tests.helpers import NO_MODEL_FLAGS, REPO

ROOT = str(REPO)


def test_default_yaml_holds_every_default():
    with open(os.path.join(ROOT, "configs", "default.yaml")) as fh:
        assert yaml.safe_load(fh) == Config().to_dict()


def test_presets_load(tmp_path):
    assert load_config(os.path.join(ROOT, "configs", "strict.yaml")).phash_threshold == 4
    assert load_config(os.path.join(ROOT, "configs", "loose.yaml")).phash_threshold == 12


def test_flags_override_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("phash_threshold: 3\nkeep: first\n")
    result = CliRunner().invoke(
        main, ["--config", str(cfg), "--phash-threshold", "6", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)  # stderr may say why CLIP is off
    assert printed["phash_threshold"] == 6 and printed["keep"] == ["first"]


def test_bad_config_is_one_line_exit_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("phash_treshold: 3\n")
    result = CliRunner().invoke(main, ["x.tar", "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == (
        f"dedup: error: config {cfg}:1: unknown setting 'phash_treshold'; did you mean "
        "'phash_threshold'? `dedup --print-config` lists every setting"
    )
    result = CliRunner().invoke(main, ["x.tar", "--out", "o", "--signals", "exact,clipp"])
    assert result.exit_code == 2 and "unknown signal 'clipp'" in result.output


def test_cli_runs_and_prints_json(planted, tmp_path):
    out = tmp_path / "clean"
    result = CliRunner().invoke(
        main, [planted[2], "--out", str(out), "--json", "--workers", "1", "-q", *NO_MODEL_FLAGS]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["counts"]["samples"] == len(planted[0])
    assert "dedup: " in result.stderr and "removed" in result.stderr
    assert summary == json.loads((out / "dedup-report" / "summary.json").read_text())


def test_bad_shard_exits_3_naming_it(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.tar").write_bytes(b"not a tar at all" * 64)
    result = CliRunner().invoke(
        main, [str(tmp_path / "in"), "--out", str(tmp_path / "o"), *NO_MODEL_FLAGS]
    )
    assert result.exit_code == 3
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("dedup: error: ") and "broken.tar" in lines[-1]
    assert "Traceback" not in result.output


def test_refused_out_exits_4(planted, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.me").write_text("x")
    result = CliRunner().invoke(
        main, [planted[1][0], "--out", str(tmp_path / "o"), *NO_MODEL_FLAGS]
    )
    assert result.exit_code == 4 and "--overwrite" in result.stderr


def test_installed_console_script_as_subprocess(planted, tmp_path):
    exe = shutil.which("dedup", path=os.path.dirname(sys.executable))
    assert exe, "the dedup console script is installed beside this Python"
    out = tmp_path / "clean"
    proc = subprocess.run(
        [
            exe,
            planted[2],
            "--out",
            str(out),
            "--report",
            str(tmp_path / "r"),
            "--json",
            *NO_MODEL_FLAGS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    rows = pq.read_table(tmp_path / "r" / "samples.parquet").num_rows
    assert rows == summary["counts"]["samples"] == len(planted[0])
    assert sorted(os.listdir(out)) == sorted([".dedup"] + [os.path.basename(p) for p in planted[1]])
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("dedup: wrote 4 shards")


def test_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(b"clip_threshold: 0.5\n\xff\xfe junk: 1\n")
    result = CliRunner().invoke(main, ["--config", str(cfg), "--print-config"])
    assert result.exit_code == 2 and "not UTF-8 text" in result.output


def test_runs_with_stderr_closed(planted, tmp_path):
    exe = shutil.which("dedup", path=os.path.dirname(sys.executable))
    proc = subprocess.run(
        [exe, planted[2], "--out", str(tmp_path / "o"), "--json", *NO_MODEL_FLAGS],
        stdout=subprocess.PIPE,
        preexec_fn=lambda: os.close(2),
        timeout=300,
    )
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["counts"]["samples"] == len(planted[0])


def test_report_command_on_something_else(tmp_path):
    (tmp_path / "summary.json").write_text("[]")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("dedup: error: ")
