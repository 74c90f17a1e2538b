"""The package's shape, checked: the import graph is the truth (no import of a dedup
module inside a function, no cycle), modules stay small enough to read, and only io asks
whether a path is a URL. The layers' one-way rule itself is import-linter's contracts in
pyproject.toml, run by `make lint`."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "dedup"
MAX_LINES = 700  # "about 600": cli.py's option table is the largest


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _function_local_imports(tree: ast.AST) -> list[tuple[int, str]]:
    found = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
            )
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                names = [child.module or ""] if isinstance(child, ast.ImportFrom) else []
                names += [a.name for a in child.names] if isinstance(child, ast.Import) else []
                found.extend((child.lineno, n) for n in names if n.split(".")[0] == "dedup")
            walk(child, inside)

    walk(tree, False)
    return found


def test_no_dedup_module_is_imported_inside_a_function():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name}"
        for path in modules()
        for line, name in _function_local_imports(ast.parse(path.read_text()))
    ]
    assert offenders == []


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("dedup")
    cycles = [
        (a, b)
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if a != b and graph.chain_exists(importer=b, imported=a)
    ]
    assert cycles == []


def test_no_module_is_too_long_to_read():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_only_io_asks_whether_a_path_is_a_url():
    askers = []
    for path in modules():
        if path.parent.name == "io":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if name in ("is_url", "normal_url", "scheme"):
                askers.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert askers == []


def test_each_signals_pair_rule_resolves_inside_the_signals_layer():
    """A registry entry names its in-memory pair rule as "module:function" (imported on
    first use): a name the graph cannot see, so it is checked here."""
    from dedup import signals

    for signal in signals.REGISTRY.values():
        module = signal.pairs.split(":")[0]
        assert module.startswith("dedup.signals."), (signal.name, module)
        assert callable(signal.find_pairs()), signal.name
