"""MkDocs hook: the reference pages generated from the code at build time, so that they
cannot drift (every config key with its default, the columns of samples.parquet and
clusters.parquet, the keys of summary.json). A page holds a placeholder line, `{{ NAME }}`,
that becomes a table; tests/test_docs.py checks the generators against the code."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path(__file__).resolve().parent / "reference"
SUMMARY_KEYS = REFERENCE / "summary-keys.yaml"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _default_yaml_comments() -> dict[str, str]:
    """Each key's comment block in configs/default.yaml (the block just above it)."""
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in (ROOT / "configs" / "default.yaml").read_text().splitlines():
        if line.startswith("#"):
            block.append(line.lstrip("#").strip())
        elif m := re.match(r"^([a-z_]+):", line):
            comments[m.group(1)] = " ".join(block)
            block = []
        else:
            block = []
    return comments


def _cli_options() -> dict[str, str]:
    """The `dedup run` option that sets each config field."""
    from dedup.cli import run_command

    names: dict[str, str] = {}
    for param in run_command.params:
        if param.name and param.opts:
            flags = " / ".join([*param.opts, *param.secondary_opts])
            names[param.name] = f"`{flags}`"
    return names


def config_table() -> str:
    """Every field of `dedup.core.config.Config`: key, type, default, the option that sets
    it, and what it does (its comment in configs/default.yaml)."""
    from dedup.core.config import Config

    comments = _default_yaml_comments()
    options = _cli_options()
    defaults = Config().to_dict()
    rows = [
        "| key | type | default | option | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for field in dataclasses.fields(Config):
        kind = str(field.type).replace("tuple[str, ...]", "list of str")
        default = json.dumps(defaults[field.name])
        option = options.get(field.name, "")
        meaning = comments.get(field.name, "") or "(described with the key above it)"
        rows.append(
            f"| `{field.name}` | {kind} | `{_cell(default)}` | {option} | {_cell(meaning)} |"
        )
    return "\n".join(rows)


def described(names: list[str], descriptions: dict, what: str) -> None:
    """Every name has a description and every description a name, or the build fails."""
    missing = [n for n in names if n not in descriptions]
    stale = [n for n in descriptions if n not in names]
    if missing or stale:
        raise ValueError(f"{what}: no description for {missing}; described but gone: {stale}")


def column_descriptions(name: str) -> dict[str, str]:
    """docs/reference/NAME-columns.yaml: column -> what it holds."""
    return yaml.safe_load((REFERENCE / f"{name}-columns.yaml").read_text())


def schema_table(schema, descriptions: dict[str, str], what: str) -> str:
    """A pyarrow schema as a table: column, type (from the code), meaning (from docs/)."""
    described(schema.names, descriptions, what)
    rows = ["| column | type | meaning |", "| --- | --- | --- |"]
    rows += [f"| `{f.name}` | `{f.type}` | {_cell(descriptions[f.name])} |" for f in schema]
    return "\n".join(rows)


def samples_table() -> str:
    from dedup.engine.tables import SAMPLES_SCHEMA

    return schema_table(SAMPLES_SCHEMA, column_descriptions("samples"), "samples.parquet")


def clusters_table() -> str:
    from dedup.engine.tables import CLUSTERS_SCHEMA

    return schema_table(CLUSTERS_SCHEMA, column_descriptions("clusters"), "clusters.parquet")


# summary.json has no schema in the code: its keys come from a real run on a tiny planted
# set (with canaries, a reference folder and a blocklist, so that their keys appear too).


def example_summary(workdir: str) -> dict:
    """summary.json of a real run on a tiny planted set, made in `workdir` (seconds)."""
    from dedup import signals
    from dedup.commands.run import run
    from dedup.core.config import KNOWN_SIGNALS, Config
    from dedup.synth import encode, make_image, planted_dataset, write_shards

    samples = planted_dataset(12, {"exact": 3, "reencode": 2, "mirror": 2}, seed=3, size=(96, 96))
    write_shards(samples, os.path.join(workdir, "shards"), 20)
    refs = os.path.join(workdir, "refs")
    os.makedirs(refs)
    with open(os.path.join(refs, "a.jpg"), "wb") as f:
        f.write(next(s.members["jpg"] for s in samples if s.edit == "original"))
    with open(os.path.join(refs, "b.jpg"), "wb") as f:
        f.write(encode(make_image(999, 96, 96)))
    blocklist = os.path.join(workdir, "blocklist.txt")
    with open(blocklist, "w") as f:
        f.write("phash:0000000000000000\n")
    config = Config(
        signals=("exact", "phash", "views"),
        workers=1,
        canaries=4,
        against=(refs,),
        blocklist=(blocklist,),
        keep_by=("json:score",),
    )
    summary = run([os.path.join(workdir, "shards")], os.path.join(workdir, "out"), config)
    # CLIP's threshold too, though this run has no CLIP: every built-in signal's key
    every = Config(signals=KNOWN_SIGNALS)
    summary["thresholds"] = {**signals.thresholds(every), **summary["thresholds"]}
    return summary


def summary_keys(summary: dict, maps: set[str]) -> dict[str, str]:
    """Every key path of a summary and its JSON type. `a.b` is a key of a key; `a[].b` a
    key of the objects in list `a`; below a path in `maps` (keys that are data, such as
    reasons or package names) nothing is listed. `config` is the config reference's."""
    found: dict[str, str] = {}
    names = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }

    def walk(value, path: str) -> None:
        if path and found.get(path, "null") == "null":  # a null in one item, a value in another
            found[path] = names[type(value)]
        if path in maps or path == "config":
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else key)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    walk(item, f"{path}[]")

    walk(summary, "")
    return {k: v for k, v in found.items() if not k.endswith("[]")}


def summary_descriptions() -> dict[str, dict]:
    """docs/reference/summary-keys.yaml: key path -> {description, map (optional)}."""
    return yaml.safe_load(SUMMARY_KEYS.read_text())


def summary_table(summary: dict | None = None) -> str:
    """The keys of summary.json: path, type (from a real run), meaning (from
    docs/reference/summary-keys.yaml)."""
    descriptions = summary_descriptions()
    if summary is None:
        with tempfile.TemporaryDirectory() as tmp:
            summary = example_summary(tmp)
    maps = {k for k, v in descriptions.items() if v.get("map")}
    keys = summary_keys(summary, maps)
    described(list(keys), descriptions, "summary.json")
    rows = ["| key | type | meaning |", "| --- | --- | --- |"]
    for path in keys:
        meaning = descriptions[path]["description"]
        rows.append(f"| `{path}` | {keys[path]} | {_cell(meaning)} |")
    return "\n".join(rows)


GENERATED = {
    "CONFIG_TABLE": config_table,
    "SAMPLES_TABLE": samples_table,
    "CLUSTERS_TABLE": clusters_table,
    "SUMMARY_TABLE": summary_table,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill each `{{ NAME }}` placeholder line with its generated table."""
    for name, make in GENERATED.items():
        placeholder = "{{ " + name + " }}"
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, make())
    return markdown
