"""Config from the Python API: a wrong value is a ConfigError naming the field."""

import pytest

from dedup.core.config import Config
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
