"""Config from the Python API: a wrong value is a ConfigError naming the field."""

import numpy as np
import pytest

from dedup.core.config import Config, load_config
from dedup.core.errors import EXIT_USAGE, ConfigError


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"phash_threshold": "8"}, "phash_threshold: expected a whole number, got '8'"),
        ({"clip_threshold": "high"}, "clip_threshold: expected a number, got 'high'"),
        ({"verify": 1}, "verify: expected true or false, got 1"),
        ({"device": 0}, "device: expected text, got 0"),
        ({"signals": 3}, "signals: expected a list of names, got 3"),
    ],
)
def test_a_value_of_the_wrong_type_is_a_config_error_naming_the_field(settings, message):
    with pytest.raises(ConfigError) as raised:
        Config(**settings)
    assert str(raised.value) == message
    assert raised.value.exit_code == EXIT_USAGE


def test_values_of_the_right_kind_are_taken_as_the_fields_types():
    config = Config(signals=["exact", "phash"], keep="first", clip_threshold=1)
    assert config.signals == ("exact", "phash") and config.keep == ("first",)
    assert config.clip_threshold == 1.0 and isinstance(config.clip_threshold, float)
    assert Config() == Config(**Config().to_dict())


def _error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), overrides)
    assert raised.value.exit_code == EXIT_USAGE
    return str(raised.value)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "dedup.yaml"
    path.write_text("keep: first\nphash_threshold: [8\nworkers: 2\n")
    message = _error(path)
    assert message.startswith(f"config {path}:3:8: not valid YAML (")
    assert "\n" not in message


def test_a_bad_value_in_a_file_names_the_file_and_the_line_of_its_key(tmp_path):
    path = tmp_path / "dedup.yaml"
    path.write_text("# thresholds\nkeep: first\nphash_threshold: eight\n")
    assert _error(path) == (
        f"config {path}:3: phash_threshold: expected a whole number, got 'eight'"
    )
    path.write_text("keep: first\n\nphash_threshold: 99\n")
    assert _error(path).startswith(f"config {path}:3: phash_threshold: 99 ")
    path.write_text("keep: first\nphash_treshold: 3\n")
    assert _error(path).startswith(f"config {path}:2: unknown setting 'phash_treshold'")


def test_a_flag_that_replaces_a_files_value_is_not_blamed_on_the_file(tmp_path):
    path = tmp_path / "dedup.yaml"
    path.write_text("phash_threshold: 8\n")
    assert _error(path, {"phash_threshold": 99}).startswith("phash_threshold: 99 ")


def test_numpy_scalars_are_taken_as_numbers():
    """A threshold computed in a numpy sweep is a numpy scalar: taken, as a Python one."""
    config = Config(phash_threshold=np.int64(6), clip_threshold=np.float32(0.5), verify=np.True_)
    assert config.phash_threshold == 6 and type(config.phash_threshold) is int
    assert config.clip_threshold == 0.5 and type(config.clip_threshold) is float
    assert config.verify is True
    with pytest.raises(ConfigError, match="phash_threshold: expected a whole number"):
        Config(phash_threshold=np.float64(6.0))
