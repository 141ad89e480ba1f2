"""The layout keeps its layers: each package imports only the ones below it, nothing imports the CLI, and
there are no import circles (read from the source with `ast`, every import counted, lazy ones too).

    errors < config < data < model < train < infer < tools < stages < board < cli

It also keeps imports honest: a name is imported from the module that defines it (no re-export hubs), an
import sits inside a function only when that keeps a heavy library out of a lighter module, and functions
stay short enough to read.
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


# --- honest imports ------------------------------------------------------------------------------------

# Libraries whose import costs start-up time (torch alone is seconds); importing them inside a function is
# how a light module (config, the CLI, the board's pure views) stays quick to import.
HEAVY = {
    "torch", "transformers", "datasets", "peft", "trl", "accelerate", "bitsandbytes", "safetensors", "gradio",
    "fastapi", "starlette", "uvicorn", "pydantic", "numpy", "pandas", "matplotlib", "lm_eval", "deepspeed",
}  # fmt: skip
# The start-up path of every command (`sftflow --help`): at module level it imports no sftflow module but
# errors, and may import the rest inside functions.
START_UP = {"sftflow.cli", "sftflow.cli.__main__"}

TREES = {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in SRC.rglob("*.py")}
PATHS = {module_name(p): p for p in SRC.rglob("*.py")}


def _type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run at import: the body, with the branches of top-level if/try, without the
    `if TYPE_CHECKING:` blocks."""
    out: list[ast.stmt] = []
    for node in body:
        if _type_checking(node):
            continue
        out.append(node)
        if isinstance(node, ast.If):
            out += _module_level(node.body) + _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            out += _module_level(node.body) + _module_level(node.orelse) + _module_level(node.finalbody)
            for handler in node.handlers:
                out += _module_level(handler.body)
    return out


def _imported_at_import(module: str) -> set[str]:
    """Modules `module` imports when it is imported (module level, outside TYPE_CHECKING), with the
    packages above it, whose __init__ runs first."""
    parts = module.split(".")
    found = {".".join(parts[:i]) for i in range(1, len(parts))}
    for node in _module_level(TREES[module].body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(
                f"{node.module}.{alias.name}" for alias in node.names if node.module.startswith("sftflow")
            )
    return found


def heavy_at_import(module: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The heavy libraries that importing `module` imports, following sftflow modules transitively."""
    heavy = set()
    for name in _imported_at_import(module):
        if name.split(".")[0] in HEAVY:
            heavy.add(name.split(".")[0])
        elif name in TREES and name != module and name not in seen:
            heavy |= heavy_at_import(name, seen | {module})
    return heavy


def function_imports(module: str) -> list[tuple[int, str]]:
    """(line, sftflow module) of every import inside a function body of `module`."""
    found = set()
    for fn in ast.walk(TREES[module]):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sftflow"):
                found.add((node.lineno, node.module))
            elif isinstance(node, ast.Import):
                found |= {(node.lineno, a.name) for a in node.names if a.name.startswith("sftflow")}
    return sorted(found)


def test_function_local_imports_keep_a_heavy_library_out():
    """An sftflow import inside a function hides what the module needs; it is allowed only when the module
    it imports brings in, at import, a heavy library that the importing module does not."""
    hidden = [
        f"{PATHS[module].relative_to(SRC.parent)}:{line} imports {target} inside a function, but it brings "
        "no heavy library (HEAVY) the module lacks: import it at the top"
        for module in sorted(TREES)
        if module not in START_UP
        for line, target in function_imports(module)
        if target in TREES and not heavy_at_import(target) - heavy_at_import(module)
    ]
    assert not hidden, "\n".join(hidden)


def test_start_up_imports_only_errors():
    """`sftflow --help` stays instant: the CLI package imports no other sftflow module at import."""
    for module in START_UP:
        loaded = {m for m in _imported_at_import(module) if m in TREES}
        assert loaded <= {"sftflow", "sftflow.cli", "sftflow.errors"}, (module, loaded)


def defined_names(module: str) -> set[str]:
    """Names `module` defines at top level (def, class, assignment), and its submodules."""
    names = {m.rsplit(".", 1)[1] for m in TREES if m.rpartition(".")[0] == module}
    for node in _module_level(TREES[module].body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _public_face(module: str) -> bool:
    """A package __init__ may gather its own submodules' names for users (`from sftflow.config import
    load_args` in a script); sftflow's own modules still import each name from where it is defined."""
    return PATHS[module].name == "__init__.py"


def test_names_come_from_the_module_that_defines_them():
    """No re-export hubs: each `from sftflow.X import name` names something X defines, and a module's
    __all__ lists only names it defines."""
    breaks = []
    for module, tree in sorted(TREES.items()):
        where = str(PATHS[module].relative_to(SRC.parent))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in TREES:
                breaks += [
                    f"{where}:{node.lineno} imports {a.name} from {node.module}, which only re-exports it"
                    for a in node.names
                    if a.name not in defined_names(node.module)
                ]
        if _public_face(module):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
                listed = {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
                breaks += [
                    f"{where}:{node.lineno} lists {name} in __all__ but does not define it"
                    for name in sorted(listed - defined_names(module))
                ]
    assert not breaks, "\n".join(breaks)


def test_engine_helpers_take_no_engine():
    """The modules sftflow.infer.engine imports are its helpers: none of their functions or methods takes
    a parameter named `engine` or annotated ChatEngine, so no helper reaches back into the engine (it
    passes them what they use). This names the one back-reference the layout had; it is not a general
    object-cycle check."""
    engine = "sftflow.infer.engine"
    if engine not in TREES:
        return
    helpers = {m for m in GRAPH[engine] if m in TREES and m != engine}
    breaks = []
    for module in sorted(helpers):
        where = str(PATHS[module].relative_to(SRC.parent))
        for fn in ast.walk(TREES[module]):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs
                breaks += [
                    f"{where}:{fn.lineno} {fn.name}() takes the engine ({a.arg})"
                    for a in args
                    if a.arg == "engine"
                    or (a.annotation is not None and "ChatEngine" in ast.unparse(a.annotation))
                ]
    assert not breaks, "\n".join(breaks)


# --- readable units ---------------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 100  # a function longer than a screen or two does more than one thing
MAX_MODULE_LINES = 800  # a loose alarm: past it a module usually holds two topics


def test_no_function_is_over_100_lines():
    long = [
        f"{PATHS[module].relative_to(SRC.parent)}:{fn.lineno} {fn.name}() is {n} lines (at most "
        f"{MAX_FUNCTION_LINES}): split it by what its parts do"
        for module, tree in sorted(TREES.items())
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := fn.end_lineno - fn.lineno + 1 - len(fn.decorator_list)) > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)


def test_no_module_is_over_800_lines():
    long = {m: n for m, p in PATHS.items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long
