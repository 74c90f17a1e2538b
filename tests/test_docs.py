"""The README stays short and its links resolve; the generated reference pages
(docs/hooks.py) cover every config field, Parquet column and summary.json key."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from dedup.core.config import Config
from dedup.engine.tables import CLUSTERS_SCHEMA, SAMPLES_SCHEMA

ROOT = Path(__file__).resolve().parent.parent


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"


def relative_links(markdown: str) -> list[str]:
    """Link targets that are not URLs or same-page anchors, without their anchor."""
    targets = re.findall(r"\]\(([^)\s]+)\)", markdown)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]


def test_relative_links_finds_links():
    text = "[a](docs/x.md#y) [b](https://e.org) [c](#top) [d](CONTRIBUTING.md)"
    assert relative_links(text) == ["docs/x.md", "CONTRIBUTING.md"]


def test_readme_links_point_to_existing_files():
    links = relative_links((ROOT / "README.md").read_text())
    assert links, "the README links into docs/"
    missing = [t for t in links if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_readme_links_the_thresholds_how_to():
    assert "docs/how-to/thresholds.md" in relative_links((ROOT / "README.md").read_text())


def test_config_reference_lists_every_field():
    table = hooks.config_table()
    listed = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert listed == [f.name for f in dataclasses.fields(Config)]
    for row in table.splitlines()[2:]:
        assert row.split(" | ")[-1].strip(" |"), f"a key without a meaning: {row}"


def test_config_reference_shows_the_code_defaults():
    table = hooks.config_table()
    assert "| `phash_threshold` | int | `8` | `--phash-threshold` |" in table


@pytest.mark.parametrize(
    "name, schema", [("samples", SAMPLES_SCHEMA), ("clusters", CLUSTERS_SCHEMA)]
)
def test_every_parquet_column_is_described(name, schema):
    descriptions = hooks.column_descriptions(name)
    assert sorted(descriptions) == sorted(schema.names)
    table = hooks.schema_table(schema, descriptions, name)
    assert re.findall(r"^\| `(\w+)` \|", table, flags=re.M) == schema.names


def test_described_fails_on_a_missing_or_stale_name():
    with pytest.raises(ValueError, match="no description for \\['b'\\]"):
        hooks.described(["a", "b"], {"a": "x"}, "t")
    with pytest.raises(ValueError, match="described but gone: \\['c'\\]"):
        hooks.described(["a"], {"a": "x", "c": "y"}, "t")


def test_summary_keys_walks_objects_lists_and_maps():
    summary = {"a": {"b": 1, "m": {"x": 1}}, "l": [{"k": "v"}, {"k": None}], "config": {}}
    keys = hooks.summary_keys(summary, maps={"a.m"})
    assert keys == {
        "a": "object",
        "a.b": "integer",
        "a.m": "object",
        "l": "array",
        "l[].k": "string",
        "config": "object",
    }


def test_every_summary_key_is_described(tmp_path):
    """A real run's summary.json (with canaries, a reference and a blocklist): every key
    has a description in docs/reference/summary-keys.yaml and every description a key."""
    descriptions = hooks.summary_descriptions()
    summary = hooks.example_summary(str(tmp_path))
    maps = {k for k, v in descriptions.items() if v.get("map")}
    keys = hooks.summary_keys(summary, maps)
    assert sorted(k for k in keys if k not in descriptions) == []
    assert sorted(k for k in descriptions if k not in keys) == []
    assert {"canaries", "references", "counts.keep_by"} <= set(keys)
    table = hooks.summary_table(summary)
    assert "| `counts.removed` | integer |" in table
