"""The layout keeps its layers: each package imports only the ones below it, nothing imports the CLI, and
there are no import circles (read from the source with `ast`, every import counted, lazy ones too).

    errors < config < data < model < train < infer < tools < stages < board < cli
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "sftflow"
LAYERS = ["errors", "config", "data", "model", "train", "infer", "tools", "stages", "board", "cli"]
TOP_LEVEL = {"__init__", "errors"}  # sftflow/__init__.py (the version) sits below everything


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every sftflow module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftflow"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sftflow"))
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    return {name for name in found if name in modules}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # sftflow itself
    return LAYERS.index(parts[1])


GRAPH = {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def test_every_package_is_a_known_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and not p.name.startswith("__")}
    packages |= {p.stem for p in SRC.glob("*.py")} - TOP_LEVEL
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_imports_only_go_down():
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_nothing_imports_the_cli():
    users = [
        m
        for m, targets in GRAPH.items()
        if not m.startswith("sftflow.cli") and any(t.startswith("sftflow.cli") for t in targets)
    ]
    assert not users


def test_stages_do_not_import_each_other():
    crossing = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        if m.startswith("sftflow.stages.") and m != "sftflow.stages.registry"
        for t in targets
        if t.startswith("sftflow.stages")
    ]
    assert not crossing, "\n".join(crossing)


def test_no_import_circles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target == module or target not in GRAPH:
                continue
            if state.get(target) == 1:
                return [*path, module, target]
            if state.get(target) is None and (cycle := visit(target, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module, [])):
            raise AssertionError(" -> ".join(cycle))


def test_no_module_is_over_450_lines():
    long = {module_name(p): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
